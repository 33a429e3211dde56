"""Input checks shared by the SORSA layers (dense and NF4) and by model surgery.

Every check raises with a message that names the offending value, what is allowed and,
when known, the layer (``layer_suffix(name)`` → ``" for layer model.layers.0.q_proj"``).
:class:`~sorsa_kernels.nn.linear.SORSALinear`, :class:`~sorsa_kernels.nn.qlinear.QSORSALinear`
and :func:`sorsa_kernels.apply_sorsa` import these instead of each other's private helpers,
so the layer modules depend on this one and not on one another's internals.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = [
    "SUPPORTED_DTYPES",
    "SVD_MODES",
    "layer_suffix",
    "check_dtype",
    "check_linear",
    "is_conv1d",
    "linear_weight",
    "check_svd_args",
    "check_weight_for_svd",
    "validate_rank",
    "check_factor_shapes",
    "non_finite_count",
    "check_finite",
]

#: dtypes a SORSA layer's residual and factors may have.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: The SVDs ``from_linear`` can run at initialization.
SVD_MODES = ("full", "randomized")


def layer_suffix(name: Optional[str]) -> str:
    """``" for layer NAME"`` to end an error message, or ``""`` when the name is unknown."""
    return f" for layer {name}" if name else ""


def check_dtype(dtype: Optional[torch.dtype], what: str) -> None:
    """Raise a TypeError unless ``dtype`` is None or one of :data:`SUPPORTED_DTYPES`."""
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"unsupported {what} {dtype}; allowed: "
            + ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        )


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers``' ``Conv1D`` (GPT-2 family): ``y = x·W + b`` with ``W`` stored in×out.

    Recognised by its class name and its ``nf`` attribute, so this package needs no
    ``transformers`` import to tell it from an ``nn.Linear``.

    Example::

        >>> from transformers.pytorch_utils import Conv1D
        >>> is_conv1d(Conv1D(72, 100)), is_conv1d(torch.nn.Linear(100, 72))
        (True, False)
    """
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, Tensor) and w.dim() == 2


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of an ``nn.Linear`` or a ``Conv1D`` as ``out×in`` (for a ``Conv1D``, a transposed view: no copy).

    Example::

        >>> linear_weight(Conv1D(72, 100)).shape       # Conv1D(nf=out, nx=in) stores 100×72
        torch.Size([72, 100])
    """
    return module.weight.T if is_conv1d(module) else module.weight


def check_linear(linear: nn.Module, name: Optional[str] = None) -> None:
    """Raise a TypeError unless ``linear`` is an ``nn.Linear`` or a ``transformers`` ``Conv1D``."""
    if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
        raise TypeError(
            f"SORSA adapts nn.Linear and Conv1D layers only; got {type(linear).__name__}{layer_suffix(name)}"
        )


def check_svd_args(svd: str, svd_dtype: torch.dtype) -> None:
    """Raise unless ``svd`` is one of :data:`SVD_MODES` and ``svd_dtype`` float32 or float64."""
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be one of {SVD_MODES}, got {svd!r}")
    if svd_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"svd_dtype must be float32 or float64, got {svd_dtype}")


def check_weight_for_svd(weight: Tensor, name: Optional[str] = None) -> None:
    """Raise a ValueError if ``weight`` is on the meta device or holds NaN/Inf (the SVD needs values)."""
    if weight.device.type == "meta":
        raise ValueError(f"cannot initialize SORSA from a weight on the meta device{layer_suffix(name)}")
    if not bool(torch.isfinite(weight).all()):
        bad = "NaN" if bool(torch.isnan(weight).any()) else "Inf"
        raise ValueError(f"weight contains {bad} values{layer_suffix(name)}; SVD needs a finite weight")


def validate_rank(rank: int, in_features: int, out_features: int, name: Optional[str] = None) -> None:
    """Raise a ValueError naming the layer if ``rank`` is not in ``[1, min(m, n)]``.

    Example::

        >>> validate_rank(300, 256, 512, "model.layers.0.mlp.down_proj")
        Traceback (most recent call last):
        ValueError: rank 300 exceeds min(in_features, out_features) = 256 for layer model.layers.0.mlp.down_proj
    """
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}{layer_suffix(name)}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}{layer_suffix(name)}")
    if rank > limit:
        raise ValueError(
            f"rank {rank} exceeds min(in_features, out_features) = {limit}{layer_suffix(name)}"
        )


def check_factor_shapes(
    m: int, n: int, U0: Tensor, S0: Tensor, V0: Tensor,
    trained: Optional[tuple[Tensor, Tensor, Tensor]] = None, name: Optional[str] = None,
) -> None:
    """Raise a ValueError naming the factor if (U0, S0, V0) or the trained (U, S, V) do not fit m×n."""
    r = S0.shape[0]
    expected = {"U0": (m, r), "S0": (r,), "V0": (n, r)}
    for label, t in zip(expected, (U0, S0, V0)):
        if tuple(t.shape) != expected[label]:
            raise ValueError(
                f"{label} has shape {tuple(t.shape)} but the layer needs {expected[label]}{layer_suffix(name)}"
            )
    if trained is not None:
        for label, t, ref in zip(("U", "S", "V"), trained, (U0, S0, V0)):
            if t.shape != ref.shape:
                raise ValueError(
                    f"{label} has shape {tuple(t.shape)} but the layer needs {tuple(ref.shape)}{layer_suffix(name)}"
                )


def non_finite_count(t: Tensor) -> int:
    """How many NaN/Inf values ``t`` holds (0 for integer tensors and the meta device)."""
    if t.device.type == "meta" or not t.is_floating_point():
        return 0
    return int((~torch.isfinite(t)).sum())


def check_finite(t: Tensor, what: str, action: str, hint: str = "") -> None:
    """Raise a one-line ValueError ``refusing to ACTION: WHAT holds N non-finite (NaN or inf) values``
    unless every value of ``t`` is finite — the one check every writer of weights uses
    (:func:`sorsa_kernels.merge_sorsa`, :func:`sorsa_kernels.export_peft_lora`).

    Example::

        >>> check_finite(torch.tensor([1.0, float("nan")]), "layer q_proj weight", "merge")
        Traceback (most recent call last):
        ValueError: refusing to merge: layer q_proj weight holds 1 non-finite (NaN or inf) values
    """
    bad = non_finite_count(t)
    if bad:
        raise ValueError(f"refusing to {action}: {what} holds {bad} non-finite (NaN or inf) values{hint}")
