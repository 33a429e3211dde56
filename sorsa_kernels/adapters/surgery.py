"""Model surgery: replace ``nn.Linear`` layers by SORSA layers, and merge them back."""
from __future__ import annotations

import logging
import re
from typing import Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.checks import check_finite, check_weight_for_svd, linear_weight, validate_rank
from ..nn.factory import layer_class, make_sorsa_linear
from ..nn.knobs import check_knob, check_scale
from ..nn.linear import SORSALinear
from .experts import apply_experts, expert_weight_names, is_expert_module, merge_all_experts, plan_experts
from .modules_to_save import resolve_modules_to_save, unwrap_saved_modules, wrap_modules_to_save
from .summary import adaptation_summary
from .targets import (ALL_LINEAR, TARGETS_BY_MODEL_TYPE, all_linear_names, default_target_modules, is_all_linear,
                      is_linear_like)

__all__ = ["DEFAULT_TARGET_MODULES", "apply_sorsa", "merge_sorsa", "sorsa_layers", "find_targets",
           "compile_target_regex", "module_aliases", "replace_everywhere"]

logger = logging.getLogger(__name__)

#: The projection names of Llama, Mistral and Qwen decoder layers (the default of a ``llama``
#: model; every architecture's are in :data:`~sorsa_kernels.adapters.targets.TARGETS_BY_MODEL_TYPE`).
DEFAULT_TARGET_MODULES = TARGETS_BY_MODEL_TYPE["llama"]

TargetSpec = Union[None, str, Sequence[str]]


def compile_target_regex(pattern: str) -> "re.Pattern[str]":
    """``pattern`` compiled, or a one-line ValueError naming it and what is wrong with it.

    Example::

        >>> compile_target_regex("(")
        Traceback (most recent call last):
        ValueError: target_modules '(' is not a valid regular expression: missing ), unterminated subpattern at position 0
    """
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"target_modules {pattern!r} is not a valid regular expression: {e}") from None


def _matches(name: str, targets: TargetSpec) -> bool:
    if isinstance(targets, re.Pattern):  # a regex over the full module name
        return targets.fullmatch(name) is not None
    last = name.rsplit(".", 1)[-1]
    return any(name == t or last == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, target_modules: TargetSpec = None, *, exclude: Sequence[str] = (),
                 allow_empty: bool = False) -> list[str]:
    """Names of the modules ``apply_sorsa`` would adapt.

    ``target_modules``: None (the projections of the model's architecture, by
    ``config.model_type``: see :data:`~sorsa_kernels.adapters.targets.TARGETS_BY_MODEL_TYPE`),
    ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` but the output head, as PEFT's option),
    a list of names (a module matches if its full name, its last component, or a dotted
    suffix equals one), or a string taken as a regular expression over the full module name.
    Modules inside ``exclude`` (the modules kept as trainable copies) are never targets.
    Raises if nothing matches, if a match is not an ``nn.Linear``/``Conv1D``, if a match is
    already a SORSA layer ("already adapted"), if the regular expression does not compile,
    or, with no ``target_modules``, if the architecture is unknown (naming ``all-linear``
    and the model's linear layers).
    """
    exclude = tuple(exclude)
    if is_all_linear(target_modules):
        targets, pattern = ALL_LINEAR, None
    elif target_modules is None:
        targets = pattern = list(default_target_modules(model))
    elif isinstance(target_modules, str):
        targets, pattern = target_modules, compile_target_regex(target_modules)
    else:
        targets = list(target_modules)
        if not targets:
            raise ValueError("target_modules is empty")
        _check_target_names(targets)
        pattern = targets
    names = []
    adapted = []
    seen: set[int] = set()  # a module shared by several parents is adapted once (see module_aliases)
    chosen = set(all_linear_names(model, exclude)) if pattern is None else None
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or id(module) in seen or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if is_expert_module(module):  # fused MoE experts: adapters/experts.py
            continue
        if isinstance(module, SORSALinear):
            if chosen is not None or _matches(name, pattern):
                adapted.append(name)
                seen.add(id(module))
            continue
        if chosen is not None:
            if name in chosen:
                names.append(name)
                seen.add(id(module))
            continue
        if not _matches(name, pattern):
            continue
        if not is_linear_like(module):
            if target_modules is None:  # a table name that is also some other module's: not a projection
                continue
            raise TypeError(
                f"target {name} is a {type(module).__name__}, not nn.Linear or Conv1D; "
                f"SORSA adapts nn.Linear and Conv1D layers only"
            )
        names.append(name)
        seen.add(id(module))
    if adapted:
        raise ValueError(
            f"the model is already adapted: {adapted[0]} is a SORSA layer"
            + (f" (and {len(adapted) - 1} more)" if len(adapted) > 1 else "")
            + "; apply_sorsa once per model (merge_sorsa first to adapt the merged weights)"
        )
    if not names and not allow_empty:
        raise ValueError(f"no module of the model matches target_modules={targets!r}")
    return names


def _check_target_names(targets: list) -> None:
    """A list of target names must hold strings (``[None]`` would fail deep in a string join)."""
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        raise TypeError(f"target_modules must be module names (non-empty strings) or one regular expression; "
                        f"got {bad[0]!r} in {targets!r}")


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): every name it has}``: a module shared by two parents
    (``layers[1].q_proj = layers[0].q_proj``) has two names, and surgery must replace it under both."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            out.setdefault(id(module), []).append(name)
    return out


def replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module,
                       aliases: Optional[dict[int, list[str]]] = None) -> list[str]:
    """Put ``new`` at every name where ``old`` appears in ``model``; returns those names."""
    names = (aliases if aliases is not None else module_aliases(model)).get(id(old), [])
    for name in names:
        _set_submodule(model, name, new)
    return names


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sorsa_layers(model: nn.Module) -> dict[str, SORSALinear]:
    """Every SORSA layer of ``model`` by module name (quantized ones included)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SORSALinear)}


def apply_sorsa(
    model: nn.Module,
    rank: int,
    target_modules: TargetSpec = None,
    *,
    svd: str = "full",
    niter: int = 2,
    oversample: int = 16,
    svd_dtype: torch.dtype = torch.float32,
    svd_device: Optional[Union[str, torch.device]] = None,
    residual_dtype: Optional[torch.dtype] = None,
    adapter_dtype: Optional[torch.dtype] = None,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    quantize: Optional[str] = None,
    quant_iters: int = 1,
    quant_report: Optional[str] = "fro",
    progress: bool = True,
    modules_to_save: Optional[Sequence[str]] = None,
) -> nn.Module:
    """Replace the target ``nn.Linear`` / ``Conv1D`` layers of ``model`` by SORSA layers, in place.

    ``target_modules`` defaults to every attention and MLP projection of the model's
    architecture (by ``config.model_type``: Llama, Mistral, Mixtral, Qwen2/3 (+MoE), Gemma
    1–3, Phi, Phi-3, GPT-2, GPT-NeoX, GPT-J, Falcon, OPT, Bloom, OLMo, OLMoE, StarCoder2,
    T5, BERT, RoBERTa, ViT; see ``targets.TARGETS_BY_MODEL_TYPE``); ``"all-linear"`` adapts
    every ``nn.Linear``/``Conv1D`` but the output head; names or a regular expression pick
    layers by hand.  GPT-2's ``Conv1D`` layers become SORSA layers with ``fan_in_fan_out``.
    ``modules_to_save`` names whole modules kept as trainable copies (saved with the
    adapter, applied on merge, exported as PEFT's ``modules_to_save``); by default the
    classification head (``classifier``/``score``) of ``*ForSequenceClassification``,
    ``*ForTokenClassification`` and ``*ForImageClassification`` models, else none (``[]``).

    Every parameter that is not an adapter factor (U, S, V) or in a saved module's copy is
    frozen, as PEFT does.  What was adapted — layers per projection, trainable parameters,
    and every linear layer and fused expert weight left alone — is logged at INFO
    (``sorsa_kernels.adaptation_summary(model)`` returns it).
    Layers are converted one at a time (the SVD runs on each weight's device, or on
    ``svd_device``), so the extra memory at any moment is about one weight's worth.
    ``quantize="nf4"`` stores each residual in 4-bit NF4 (QSORSA) after ``quant_iters``
    error-reducing iterations; each layer's ``quant_report`` then holds its quantization
    error against NF4(W0) (``quant_report="full"`` adds the nuclear norms, two extra SVDs per
    layer; ``None`` skips the report; ``sorsa_kernels.quant.QuantReport.from_model`` sums them).
    Other arguments are those of :meth:`SORSALinear.from_linear`.

    Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the routed experts,
    fused 3-D weights, are adapted too with the default targets (their rows of the table name
    ``"experts"``; ``"experts"`` in ``target_modules`` names them; ``"all-linear"`` leaves them
    frozen, as PEFT's option does): each expert's ``gate_up_proj`` and ``down_proj`` is split by its own
    SVD (:class:`~sorsa_kernels.nn.experts.SORSAExperts`; with ``quantize="nf4"`` each expert's
    residual is NF4, :class:`~sorsa_kernels.nn.qexperts.QSORSAExperts`), the routing is untouched.

    Example::

        >>> model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        >>> apply_sorsa(model, rank=128)                          # q,k,v,o,gate,up,down
        >>> apply_sorsa(model, rank=16, target_modules="all-linear")
        >>> apply_sorsa(model, rank=8, target_modules=["q_proj", "v_proj"])
        >>> apply_sorsa(model, rank=8, target_modules=r".*layers\\.0\\..*_proj")
    """
    layer_class(quantize)  # a bad `quantize` or knob fails before anything is touched
    for knob, value in (("alpha", alpha), ("dropout", dropout), ("niter", niter), ("oversample", oversample),
                        ("quant_iters", quant_iters)):
        check_knob(knob, value)
    saved = resolve_modules_to_save(model, modules_to_save)
    experts = plan_experts(model, rank, target_modules, quantize=quantize, dropout=dropout, exclude=saved)
    names = find_targets(model, target_modules, exclude=saved, allow_empty=bool(experts))
    for name in names:  # validate every layer before touching any
        w = linear_weight(model.get_submodule(name))
        validate_rank(rank, w.shape[1], w.shape[0], name)
    check_scale(alpha, rank, adapter_dtype)
    for name in names:  # NaN/Inf or meta weights fail here, before any layer is converted
        check_weight_for_svd(linear_weight(model.get_submodule(name)), name)
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    kwargs = dict(
        svd=svd, niter=niter, oversample=oversample, svd_dtype=svd_dtype, svd_device=svd_device,
        residual_dtype=residual_dtype, adapter_dtype=adapter_dtype, alpha=alpha, dropout=dropout,
    )
    if quantize is not None:
        kwargs["quant_report"] = quant_report
    aliases = module_aliases(model)
    done: list[tuple[nn.Module, nn.Module]] = []
    # the bar counts what the summary counts: each linear layer and each fused expert weight
    expert_weights = sum(len(expert_weight_names(model.get_submodule(n))) for n in experts)
    bar = tqdm(total=len(names) + expert_weights, desc="SORSA init", unit="layer", disable=not progress)
    try:
        for name in names:
            linear = model.get_submodule(name)
            layer = make_sorsa_linear(linear, rank, quantize=quantize, quant_iters=quant_iters, name=name, **kwargs)
            replace_everywhere(model, linear, layer, aliases)
            done.append((linear, layer))
            del linear
            bar.update(1)
        apply_experts(model, experts, rank, svd=svd, niter=niter, oversample=oversample, svd_dtype=svd_dtype,
                      residual_dtype=residual_dtype, adapter_dtype=adapter_dtype, alpha=alpha, quantize=quantize,
                      quant_iters=quant_iters)
        bar.update(expert_weights)
        wrap_modules_to_save(model, saved)
    except BaseException:  # all or nothing: put every converted layer back, unfreeze as before
        _undo(model, done, aliases)
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
        raise
    finally:
        bar.close()
    logger.info("%s", adaptation_summary(model).line())
    return model


def _undo(model: nn.Module, done: list[tuple[nn.Module, nn.Module]], aliases: dict[int, list[str]]) -> None:
    """Undo ``(old, new)`` replacements made by :func:`replace_everywhere`, newest first."""
    for old, _new in reversed(done):
        for name in aliases.get(id(old), []):
            _set_submodule(model, name, old)


def merge_sorsa(model: nn.Module, dtype: Optional[torch.dtype] = None, *,
                allow_non_finite: bool = False) -> nn.Module:
    """Replace every SORSA layer of ``model`` by its merged ``nn.Linear`` (``Conv1D`` for one built
    from a ``Conv1D``), and every saved module by its trained copy, in place.

    All or nothing: a merged weight holding NaN/Inf (a diverged adapter, or an overflow in
    ``dtype``) is refused with a one-line ValueError naming the layer and the model is left
    as it was, unless ``allow_non_finite=True`` (PEFT's ``safe_merge`` the other way round).
    A layer shared by several parents is merged once and replaced everywhere.

    Example::

        >>> merge_sorsa(model).save_pretrained("merged")
    """
    layers = sorsa_layers(model)
    aliases = module_aliases(model)
    done: list[tuple[nn.Module, nn.Module]] = []

    def check(name: str, weight: torch.Tensor) -> None:
        if not allow_non_finite:
            check_finite(weight, f"the merged weight of layer {name}", "merge",
                         " (the adapter diverged or the dtype overflows); allow_non_finite=True keeps them")

    try:
        for name, layer in layers.items():
            merged = layer.merge(dtype)
            check(name, merged.weight)
            replace_everywhere(model, layer, merged, aliases)
            done.append((layer, merged))
        merged_experts = merge_all_experts(model, dtype, check)
    except BaseException:
        _undo(model, done, aliases)
        raise
    if not layers and not merged_experts:
        raise ValueError("the model has no SORSA layers to merge")
    unwrap_saved_modules(model)
    return model
