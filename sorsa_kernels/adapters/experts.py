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

import logging
import re
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..nn.checks import validate_rank
from ..nn.experts import SORSAExperts
from ..nn.factory import experts_class
from .targets import default_target_modules, is_all_linear

logger = logging.getLogger(__name__)

__all__ = [
    "is_expert_module",
    "find_expert_targets",
    "adapted_experts",
    "is_fused_experts",
    "is_adapted_experts",
    "expert_weight_names",
    "find_fused_experts",
    "adapt_experts",
    "merge_experts",
    "sorsa_experts_forward",
    "plan_experts",
    "apply_experts",
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


def is_expert_module(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module (adapted or not) or one of its SORSA projections:
    the modules the ``nn.Linear`` target search passes over."""
    return isinstance(module, SORSAExperts) or is_fused_experts(module) or is_adapted_experts(module)


def adapted_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every adapted experts module of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if n and is_adapted_experts(m)}


def find_expert_targets(model: nn.Module, target_modules: Any = None, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the experts modules ``apply_sorsa`` adapts for ``target_modules``.

    None: every fused experts module.  A list of names: the experts modules whose full name,
    last component or dotted suffix is one of them (``"experts"``,
    :data:`~sorsa_kernels.adapters.targets.EXPERTS`, names them all).  A string: a
    regular expression over the full module name.  Modules inside ``exclude`` (kept as
    trainable copies) are never targets.  Raises a ValueError when a matching experts module
    is already adapted.
    """
    found, adapted = [], []
    for name, module in model.named_modules():
        if not name or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        fused, done = is_fused_experts(module), is_adapted_experts(module)
        if not (fused or done):
            continue
        if target_modules is None:
            hit = True
        elif isinstance(target_modules, (str, re.Pattern)):
            pattern = re.compile(target_modules) if isinstance(target_modules, str) else target_modules
            hit = pattern.fullmatch(name) is not None
        else:
            last = name.rsplit(".", 1)[-1]
            hit = any(name == t or last == t or name.endswith("." + t) for t in target_modules)
        if hit:
            (adapted if done else found).append(name)
    if adapted:
        raise ValueError(
            f"the model is already adapted: {adapted[0]} holds SORSA experts; apply_sorsa once per model "
            "(merge_sorsa first to adapt the merged weights)"
        )
    return found


def _orient(module: nn.Module, w: Tensor) -> Tensor:
    """A stored 3-D weight seen as E×out×in (``is_transposed`` classes store E×in×out)."""
    return w.mT if getattr(module, "is_transposed", False) else w


def adapt_experts(module: nn.Module, rank: int, *, name: Optional[str] = None,
                  factors: Optional[dict[str, Any]] = None, quantize: Optional[str] = None,
                  **kwargs: Any) -> None:
    """Replace the 3-D expert weights of ``module`` by :class:`SORSAExperts`, in place.

    ``quantize="nf4"`` builds :class:`~sorsa_kernels.nn.qexperts.QSORSAExperts` (each expert's
    residual in NF4; ``quant_iters`` error-reducing iterations).  ``kwargs`` go to
    ``from_weight`` (``svd``, ``alpha``, ``residual_dtype``, ``quant_iters``, …).  ``factors`` (used by :func:`sorsa_kernels.load_adapter`) maps each projection name to
    ``dict(U0=..., S0=..., V0=..., trained=(U, S, V))``: the layer is then rebuilt without SVD.

    Example::

        >>> adapt_experts(model.model.layers[0].mlp.experts, rank=8, alpha=16.0)
    """
    if not is_fused_experts(module):
        raise TypeError(
            f"{name or type(module).__name__} is a {type(module).__name__}, not a transformers experts module "
            "with fused 3-D expert weights (gate_up_proj/down_proj)"
        )
    if kwargs.get("dropout"):
        raise ValueError(
            f"dropout {kwargs['dropout']} is not supported on expert weights ({name}); use dropout=0 "
            "or leave the experts out of target_modules"
        )
    kwargs.pop("dropout", None)
    cls = experts_class(quantize)
    if quantize is None:
        kwargs.pop("quant_iters", None)
    new = {}
    for attr in expert_weight_names(module):
        full = f"{name}.{attr}" if name else attr
        w = _orient(module, getattr(module, attr))
        bias = getattr(module, f"{attr}_bias", None) if getattr(module, "has_bias", False) else None
        if factors is not None:
            f = factors[attr]
            allowed = {k: v for k, v in kwargs.items() if k in ("alpha", "residual_dtype")}
            new[attr] = cls.from_factors(
                w, f["U0"], f["S0"], f["V0"], trained=f.get("trained"), bias=bias, name=full, **allowed
            )
        else:
            new[attr] = cls.from_weight(w, rank, bias=bias, name=full, **kwargs)
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

    Rows are the (token, choice) pairs sorted by expert; each projection is one grouped SORSA
    op over all experts; gate/activation, routing weights and the sum over choices are the
    model's, as in ``transformers``' ``grouped_mm`` experts implementation.
    """
    up_name, down_name = expert_weight_names(self)
    up, down = getattr(self, up_name), getattr(self, down_name)
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    x = hidden_states[perm // top_k]
    counts = torch.bincount(sorted_ids, minlength=up.num_experts)
    h = up(x, counts)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = down(h, counts)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(out.dtype)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inv].view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def plan_experts(model: nn.Module, rank: int, target_modules: Any = None, *,
                 quantize: Optional[str] = None, dropout: float = 0.0, exclude: tuple[str, ...] = ()) -> list[str]:
    """The experts modules :func:`sorsa_kernels.apply_sorsa` adapts, validated before any change.

    ``target_modules`` None: the architecture's default targets (its row of
    :data:`~sorsa_kernels.adapters.targets.TARGETS_BY_MODEL_TYPE` names
    ``"experts"`` for the MoE models); ``"all-linear"``: none (as PEFT's option, linear
    modules only).  With the default targets, experts are adapted unless the run asks for
    what SORSA experts do not support (``dropout``): they then stay
    frozen, with a warning.  Named explicitly, such a request is a ValueError.  Every
    expert's rank is checked.
    """
    if is_all_linear(target_modules):
        return []
    targets = list(default_target_modules(model)) if target_modules is None else target_modules
    names = find_expert_targets(model, targets, tuple(exclude))
    if names:  # an unknown storage (or a kind without experts) fails before anything is touched
        experts_class(quantize)
    if names and dropout:
        what = f"dropout={dropout}"
        if target_modules is None:
            logger.warning("routed experts (%d modules) left frozen: SORSA experts do not support %s yet",
                           len(names), what)
            return []
        raise ValueError(
            f"{what} is not supported on expert weights ({names[0]}); leave the experts out of target_modules "
            "or use dropout=0"
        )
    for name in names:
        module = model.get_submodule(name)
        for attr in expert_weight_names(module):
            E, m, n = _orient(module, getattr(module, attr)).shape
            validate_rank(rank, n, m, f"{name}.{attr}")
    return names


def apply_experts(model: nn.Module, names: list[str], rank: int, *, svd: str = "full", niter: int = 2,
                  oversample: int = 16, svd_dtype: torch.dtype = torch.float32,
                  residual_dtype: Optional[torch.dtype] = None, adapter_dtype: Optional[torch.dtype] = None,
                  alpha: Optional[float] = None, quantize: Optional[str] = None, quant_iters: int = 1) -> None:
    """:func:`adapt_experts` on each experts module of ``names`` (from :func:`plan_experts`)."""
    for name in names:
        adapt_experts(
            model.get_submodule(name), rank, name=name, svd=svd, niter=niter, oversample=oversample,
            svd_dtype=svd_dtype, residual_dtype=residual_dtype, adapter_dtype=adapter_dtype, alpha=alpha,
            quantize=quantize, quant_iters=quant_iters,
        )


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
