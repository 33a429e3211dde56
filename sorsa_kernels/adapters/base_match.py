"""Is this the base an adapter was fitted to?  The adapter's initial factors say.

An adapter stores ``U0, S0, V0``: the principal part of each base weight it was fitted to
(``W0 ≈ U0·diag(scale·S0)·V0ᵀ + Wr``, with ``U0``, ``V0`` orthonormal).  They are the
fingerprint of the base rows: on the right base ``U0ᵀ·W·V0`` is ``diag(scale·S0)`` up to
rounding, and on another one it is not.  :func:`base_mismatch` measures

    ‖U0ᵀ·W·V0 − diag(scale·S0)‖_F / ‖scale·S0‖₂

(one ``r×m·n`` product per layer, the cost of recomputing its residual): about 1e-6 on the
base in float32, 4e-4 on the same base cast to bfloat16, 0.1–0.2 on the base with the
adapter already merged in (after three training steps of the tiny test model), about 1 on a
base from another seed.  For QSORSA (``quantize="nf4"``) the principal part is chosen
against the quantization error, so the right base reads up to ~2e-2.
:func:`check_base_matches` refuses a layer above :func:`tolerance`; ``load_adapter`` calls
it for every layer before changing the model, unless told the base is meant to differ.

A fixed tolerance cannot see a small update merged in: a fine-tune at a learning rate of
1e-5 moves the weight by ~1e-3 of ``‖scale·S0‖``, below the tolerance.  So the threshold is
also relative to the adapter's own update ``scale·(U·diag(S)·Vᵀ − U0·diag(S0)·V0ᵀ)``, whose
projection ``P = U0ᵀ·ΔW·V0`` the adapter knows: with ``D = U0ᵀ·W·V0 − diag(scale·S0)``, the
right base gives ``D ≈ 0`` (rounding, or the NF4 offset) and the base with this adapter
merged gives ``D ≈ P``; a weight closer to the merged base (``‖D − P‖ < ½‖D‖``) is refused,
however small the update (:func:`merged_mismatch`).  An update below the weight's rounding
is not seen, and changes nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["base_mismatch", "merged_mismatch", "tolerance", "check_base_matches", "BaseMismatchError"]

#: Mismatch allowed for a dense layer (the same base in bf16 reads ~4e-4, a merged one ≥ 8e-2).
DENSE_TOLERANCE = 1e-2
#: Mismatch allowed for an NF4 layer, whose principal part absorbs part of the quantization error.
NF4_TOLERANCE = 5e-2


class BaseMismatchError(ValueError):
    """The base model given is not the one the adapter was fitted to."""


def _gap(weight: Tensor, U0: Tensor, S0: Tensor, V0: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(D, ‖scale·S0‖₂)`` with ``D = U0ᵀ·W·V0 − diag(scale·S0)`` (r×r), float32 on the weight's device."""
    U0, S0, V0 = (t.to(weight.device, torch.float32) for t in (U0, S0, V0))
    with torch.no_grad():
        proj = U0.T @ (weight.detach().to(torch.float32) @ V0)
        sigma = S0 * scale
        return proj - torch.diag(sigma), sigma.norm().clamp_min(1e-30)


def base_mismatch(weight: Tensor, U0: Tensor, S0: Tensor, V0: Tensor, scale: float) -> float:
    """``‖U0ᵀ·W·V0 − diag(scale·S0)‖_F / ‖scale·S0‖₂`` in float32 on the weight's device."""
    gap, norm = _gap(weight, U0, S0, V0, scale)
    return float(torch.linalg.matrix_norm(gap) / norm)


def merged_mismatch(weight: Tensor, U0: Tensor, S0: Tensor, V0: Tensor, scale: float,
                    trained: tuple[Tensor, Tensor, Tensor]) -> float:
    """:func:`base_mismatch` against the base with the adapter's update merged in:
    ``‖D − U0ᵀ·scale·(U·diag(S)·Vᵀ − U0·diag(S0)·V0ᵀ)·V0‖_F / ‖scale·S0‖₂``, ``trained = (U, S, V)``."""
    gap, norm = _gap(weight, U0, S0, V0, scale)
    U0, S0, V0 = (t.to(weight.device, torch.float32) for t in (U0, S0, V0))
    U, S, V = (t.to(weight.device, torch.float32) for t in trained)
    with torch.no_grad():
        update = scale * ((U0.T @ U) * S) @ (V.T @ V0) - torch.diag(S0 * scale)
        return float(torch.linalg.matrix_norm(gap - update) / norm)


def tolerance(quantize: Optional[str], adapter_dtype: torch.dtype) -> float:
    """The largest mismatch taken as "the same base": :data:`DENSE_TOLERANCE` (or
    :data:`NF4_TOLERANCE`), widened to 4 ulps of a low-precision ``adapter_dtype``."""
    base = NF4_TOLERANCE if quantize else DENSE_TOLERANCE
    return max(base, 4 * torch.finfo(adapter_dtype).eps)


def check_base_matches(name: str, weight: Tensor, U0: Tensor, S0: Tensor, V0: Tensor, scale: float,
                       quantize: Optional[str] = None, source: str = "the adapter", *,
                       trained: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> None:
    """Raise :class:`BaseMismatchError` (a one-line ValueError) unless ``weight`` is the base row
    block the factors were fitted to; a weight on the meta device (no values) is refused too.
    With the trained factors ``trained = (U, S, V)``, a weight nearer the base with this adapter
    merged in than the base itself is refused as well, however small the update.

    Example::

        >>> check_base_matches("model.layers.0.self_attn.q_proj", merged_weight, U0, S0, V0, 1.0)
        Traceback (most recent call last):
        BaseMismatchError: adapter out/adapter was not fitted to this base: layer model.layers.0.self_attn.q_proj ...
    """
    if weight.device.type == "meta":
        raise BaseMismatchError(
            f"layer {name} of the base model is on the meta device (it has no weights); load the base "
            "with its weights (not device_map='meta' / init_empty_weights) before loading an adapter"
        )
    if not bool(torch.isfinite(weight).all()):
        raise BaseMismatchError(f"layer {name} of the base model holds NaN/Inf weights; load a finite base")
    got = base_mismatch(weight, U0, S0, V0, scale)
    allowed = tolerance(quantize, U0.dtype)
    if not got <= allowed:
        raise BaseMismatchError(
            f"{source} was not fitted to this base: layer {name}'s weight does not match the adapter's initial "
            f"factors U0, S0, V0 (mismatch {got:.3g}, allowed {allowed:.3g}: another model, or one with an adapter "
            "already merged in); pass the base it was trained from, or "
            "allow_base_mismatch=True (--allow-base-mismatch) to apply it to another base on purpose"
        )
    merged = None if trained is None else merged_mismatch(weight, U0, S0, V0, scale, trained)
    if merged is not None and merged < 0.5 * got:
        raise BaseMismatchError(
            f"{source} was not fitted to this base: layer {name}'s weight does not match the adapter's initial "
            f"factors U0, S0, V0 but holds the adapter's own update (mismatch {got:.3g} to the base, {merged:.3g} to "
            "the base with this adapter merged in: it is already merged); pass the base it was trained from, or "
            "allow_base_mismatch=True (--allow-base-mismatch) to apply it to another base on purpose"
        )
