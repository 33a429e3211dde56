"""Mixture-of-experts surgery: SORSA on the fused expert weights of ``transformers`` models.

``transformers`` 5 keeps the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, … in one
experts module holding 3-D parameters (``gate_up_proj`` E×2I×H and ``down_proj`` E×H×I, or
``up_proj`` without a gate; optional ``*_bias``; E×in×out when the class is declared
``is_transposed``).  Those classes are decorated with ``use_experts_implementation``, which
gives every instance ``has_gate``, ``has_bias``, ``is_transposed`` and ``_apply_gate``.

:func:`adapt_experts` replaces each 3-D weight by a
:class:`~sorsa_kernels.nn.experts.SORSAExperts` (the submodule takes the parameter's name) and
gives the experts module the forward :func:`sorsa_experts_forward`: the routing stays the
model's (its router picked ``top_k_index`` / ``top_k_weights`` and calls the experts module as
before), and the activation stays the model's (``_apply_gate`` / ``act_fn``).  Only the
expert matmuls change: rows are grouped by expert, as ``transformers``' own ``grouped_mm``
implementation does, and each projection is one grouped SORSA op that never forms an
expert's ``ΔW``.  :func:`merge_experts` puts merged 3-D parameters back and restores the
class's forward.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..nn.experts import SORSAExperts, routed_experts_forward
from ..nn.factory import experts_class
from ..nn.init_spec import SORSAInit

__all__ = [
    "adapted_experts",
    "is_fused_experts",
    "is_adapted_experts",
    "expert_weight_names",
    "find_fused_experts",
    "adapt_experts",
    "merge_experts",
    "sorsa_experts_forward",
    "expert_stacks",
    "merge_all_experts",
]


def expert_weight_names(module: nn.Module) -> tuple[str, str]:
    """The names of the two expert projections: ``("gate_up_proj", "down_proj")``, or
    ``("up_proj", "down_proj")`` for experts without a gate."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"), "down_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` experts module with fused 3-D expert weights
    (not yet adapted)."""
    if not hasattr(module, "has_gate") or not hasattr(module, "_apply_gate"):
        return False
    return all(
        isinstance(getattr(module, n, None), nn.Parameter) and getattr(module, n).dim() == 3
        for n in expert_weight_names(module)
    )


def is_adapted_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module whose projections are SORSA experts."""
    return hasattr(module, "has_gate") and all(
        isinstance(getattr(module, n, None), SORSAExperts) for n in expert_weight_names(module)
    )


def find_fused_experts(model: nn.Module) -> list[str]:
    """Names of every fused experts module of ``model`` (adapted or not), in module order."""
    return [n for n, m in model.named_modules() if n and (is_fused_experts(m) or is_adapted_experts(m))]


def adapted_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every adapted experts module of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if n and is_adapted_experts(m)}


def _orient(module: nn.Module, w: Tensor) -> Tensor:
    """A stored 3-D weight seen as E×out×in (``is_transposed`` classes store E×in×out)."""
    return w.mT if getattr(module, "is_transposed", False) else w


def expert_stacks(module: nn.Module) -> dict[str, Tensor]:
    """The 3-D weights of a fused experts module, each seen as E×out×in (a view; no copy)."""
    return {attr: _orient(module, getattr(module, attr)) for attr in expert_weight_names(module)}


def adapt_experts(module: nn.Module, rank: Union[int, SORSAInit], *, name: Optional[str] = None,
                  factors: Optional[dict[str, Any]] = None, **options: Any) -> None:
    """Replace the 3-D expert weights of ``module`` by :class:`SORSAExperts`, in place.

    ``rank`` is r or a whole :class:`~sorsa_kernels.nn.init_spec.SORSAInit`; ``options`` are
    its fields (``svd``, ``alpha``, ``residual_dtype``, ``quantize``, ``quant_iters``, …).
    ``quantize="nf4"`` builds :class:`~sorsa_kernels.nn.qexperts.QSORSAExperts` (each expert's
    residual in NF4).  ``factors`` (used by :func:`sorsa_kernels.load_adapter`) maps each
    projection name to ``dict(U0=..., S0=..., V0=..., trained=(U, S, V))``: the layer is then
    rebuilt without SVD.  Both projections are built before either is installed.

    Example::

        >>> adapt_experts(model.model.layers[0].mlp.experts, rank=8, alpha=16.0)
    """
    if not is_fused_experts(module):
        raise TypeError(
            f"{name or type(module).__name__} is a {type(module).__name__}, not a transformers experts module "
            "with fused 3-D expert weights (gate_up_proj/down_proj)"
        )
    spec = SORSAInit.of(rank, name, **options)
    cls = experts_class(spec.quantize)
    new = {}
    for attr, w in expert_stacks(module).items():
        full = f"{name}.{attr}" if name else attr
        bias = getattr(module, f"{attr}_bias", None) if getattr(module, "has_bias", False) else None
        if factors is not None:
            f = factors[attr]
            new[attr] = cls.from_factors(w, f["U0"], f["S0"], f["V0"], trained=f.get("trained"), bias=bias,
                                         name=full, alpha=spec.alpha, residual_dtype=spec.residual_dtype)
        else:
            new[attr] = cls.from_weight(w, spec, bias=bias, name=full)
    for attr, layer in new.items():  # swap only once both are built
        delattr(module, attr)
        setattr(module, attr, layer)
        if getattr(module, "has_bias", False):
            delattr(module, f"{attr}_bias")  # held (frozen) by the SORSA layer
    module.forward = sorsa_experts_forward.__get__(module)


def merged_stacks(module: nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """``Wr + scale·U·diag(S)·Vᵀ`` of each projection of an adapted experts module, in the
    module's own layout (``is_transposed`` honoured); the module is not changed."""
    stacks = {}
    for attr in expert_weight_names(module):
        w = getattr(module, attr).merged_weight(dtype)
        stacks[attr] = w.mT.contiguous() if getattr(module, "is_transposed", False) else w
    return stacks


def install_merged(module: nn.Module, stacks: dict[str, Tensor]) -> None:
    """Put the merged stacks (:func:`merged_stacks`) back as the module's fused 3-D parameters,
    in place, and restore the class's own forward."""
    for attr, w in stacks.items():
        bias = getattr(module, attr).bias
        delattr(module, attr)
        setattr(module, attr, nn.Parameter(w, requires_grad=False))
        if bias is not None:
            setattr(module, f"{attr}_bias", nn.Parameter(bias.detach().to(w.dtype), requires_grad=False))
    module.__dict__.pop("forward", None)


def merge_experts(module: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    """Put ``Wr + scale·U·diag(S)·Vᵀ`` back as the module's fused 3-D parameters, in place,
    and restore the class's own forward."""
    install_merged(module, merged_stacks(module, dtype))


def sorsa_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The forward of an adapted experts module (same signature and result as the model's).

    One routed op per projection (:func:`~sorsa_kernels.nn.experts.routed_experts_forward`): the
    row gather, the scatter back and the routing-weight multiply are folded into the grouped
    SORSA op, counts stay on the device (no host sync), and the routing weights get their
    gradient.  The gate/activation (and a post-expert norm) are the model's own.
    """
    up_name, down_name = expert_weight_names(self)
    act = self._apply_gate if self.has_gate else self.act_fn
    norm = self.post_expert_norm if getattr(self, "has_post_expert_norm", False) else None
    return routed_experts_forward(getattr(self, up_name), getattr(self, down_name),
                                  hidden_states, top_k_index, top_k_weights, act, norm)


def merge_all_experts(model: nn.Module, dtype: Optional[torch.dtype] = None,
                      check: Optional[Callable[[str, Tensor], None]] = None) -> int:
    """:func:`merge_experts` on every adapted experts module; returns how many were merged.

    All or nothing: every merged stack is computed (and passed to ``check(name, stack)``,
    which may raise) before any module is changed."""
    found = adapted_experts(model)
    planned = {name: merged_stacks(module, dtype) for name, module in found.items()}
    if check is not None:
        for name, stacks in planned.items():
            for attr, w in stacks.items():
                check(f"{name}.{attr}", w)
    for name, module in found.items():
        install_merged(module, planned[name])
    return len(found)
