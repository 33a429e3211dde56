"""Model surgery: replace ``nn.Linear`` layers by SORSA layers, and merge them back."""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..nn.checks import check_finite
from ..nn.init_spec import SORSAInit
from ..nn.kinds import is_adapter_layer
from ..nn.linear import SORSALinear
from .experts import merge_all_experts
from .modules_to_save import unwrap_saved_modules
from .plan import SurgeryPlan, Transaction, module_aliases, pick_targets, plan_sorsa, set_submodule
from .summary import adaptation_summary
from .targets import TARGETS_BY_MODEL_TYPE, TargetSpec, compile_target_regex

__all__ = ["DEFAULT_TARGET_MODULES", "apply_sorsa", "merge_sorsa", "sorsa_layers", "find_targets",
           "compile_target_regex", "module_aliases", "replace_everywhere", "plan_sorsa", "SurgeryPlan", "TargetSpec"]

logger = logging.getLogger(__name__)

#: The projection names of Llama, Mistral and Qwen decoder layers (the default of a ``llama``
#: model; every architecture's are in :data:`~sorsa_kernels.adapters.targets.TARGETS_BY_MODEL_TYPE`).
DEFAULT_TARGET_MODULES = TARGETS_BY_MODEL_TYPE["llama"]


def find_targets(model: nn.Module, target_modules: TargetSpec = None, *, exclude: Sequence[str] = (),
                 allow_empty: bool = False) -> list[str]:
    """Names of the ``nn.Linear`` / ``Conv1D`` modules ``apply_sorsa`` would adapt.

    ``target_modules``: None (the projections of the model's architecture, by
    ``config.model_type``: see :data:`~sorsa_kernels.adapters.targets.TARGETS_BY_MODEL_TYPE`),
    ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` but the output head and MoE routers, as
    PEFT's option), a list of names (a module matches if its full name or a dotted suffix
    equals one: :class:`~sorsa_kernels.adapters.targets.Targets`), or a string taken as a
    regular expression over the full module name.  ``exclude`` are the modules kept as
    trainable copies (left out of the table's and ``all-linear``'s picks; a list or regex
    naming one is refused).  Raises if an entry of a list matches nothing (naming the
    nearest names), if nothing matches (unless ``allow_empty``: experts alone), if a match
    is not an ``nn.Linear``/``Conv1D``, if a match is already a SORSA layer ("already
    adapted"), if the regular expression does not compile, or, with no ``target_modules``,
    if the architecture is unknown (naming ``all-linear`` and the model's linear layers).
    """
    _, linear, _ = pick_targets(model, target_modules, tuple(exclude))
    if not linear and not allow_empty:
        raise ValueError(f"no linear layer of the model matches target_modules={target_modules!r}")
    return linear


def replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module,
                       aliases: Optional[dict[int, list[str]]] = None) -> list[str]:
    """Put ``new`` at every name where ``old`` appears in ``model``; returns those names."""
    names = (aliases if aliases is not None else module_aliases(model)).get(id(old), [])
    for name in names:
        set_submodule(model, name, new)
    return names


def sorsa_layers(model: nn.Module) -> dict[str, SORSALinear]:
    """Every SORSA layer of ``model`` by module name (quantized ones included)."""
    return {n: m for n, m in model.named_modules() if is_adapter_layer(m)}  # any registered kind (nn/kinds.py)


def apply_sorsa(
    model: nn.Module,
    rank: Union[int, SORSAInit],
    target_modules: TargetSpec = None,
    *,
    progress: bool = True,
    modules_to_save: Optional[Sequence[str]] = None,
    quant_report: Optional[str] = "fro",
    **init: Any,
) -> nn.Module:
    """Replace the target ``nn.Linear`` / ``Conv1D`` layers of ``model`` by SORSA layers, in place.

    ``rank`` is r, or a whole :class:`~sorsa_kernels.nn.init_spec.SORSAInit`; ``init`` are its
    fields: ``alpha`` (``scale = alpha / rank``), ``dropout``, ``svd`` (``"full"`` or
    ``"randomized"`` with ``niter`` and ``oversample``), ``svd_dtype``, ``svd_device``,
    ``residual_dtype``, ``adapter_dtype``, ``quantize`` and ``quant_iters`` (see
    :meth:`SORSALinear.from_linear <sorsa_kernels.nn.linear.SORSALinear.from_linear>`).

    ``target_modules`` defaults to every attention and MLP projection of the model's
    architecture (by ``config.model_type``: Llama, Mistral, Mixtral, Qwen2/3 (+MoE), Gemma
    1–3, Phi, Phi-3, GPT-2, GPT-NeoX, GPT-J, Falcon, OPT, Bloom, OLMo, OLMoE, StarCoder2,
    T5, BERT, RoBERTa, ViT; see ``targets.TARGETS_BY_MODEL_TYPE``); ``"all-linear"`` adapts
    every ``nn.Linear``/``Conv1D`` but the output head and MoE routers/gates (a layer whose
    smaller side is below the rank is skipped, with a note in the log); names or a regular
    expression pick layers by hand, and every name must match something.  GPT-2's ``Conv1D``
    layers become SORSA layers with ``fan_in_fan_out``.
    ``modules_to_save`` names whole modules kept as trainable copies (saved with the
    adapter, applied on merge, exported as PEFT's ``modules_to_save``); by default the
    classification head (``classifier``/``score``) of ``*ForSequenceClassification``,
    ``*ForTokenClassification`` and ``*ForImageClassification`` models, else none (``[]``).
    A module both named as a target and kept as a copy is refused.

    All or nothing: the surgery is planned (:func:`~sorsa_kernels.adapters.plan.plan_sorsa`),
    every weight of the plan is checked (rank, dtype, NaN/Inf; experts included) before the
    first change, and a failure while changing the model puts every changed module back.
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
        >>> apply_sorsa(model, SORSAInit(rank=8, alpha=16.0, quantize="nf4"))
    """
    plan = plan_sorsa(model, rank, target_modules, modules_to_save=modules_to_save, quant_report=quant_report,
                      **init)
    plan.apply(model, progress=progress)
    for note in plan.notes():
        logger.info("%s", note)
    logger.info("%s", adaptation_summary(model).line())
    return model


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
    tx = Transaction(model)

    def check(name: str, weight: torch.Tensor) -> None:
        if not allow_non_finite:
            check_finite(weight, f"the merged weight of layer {name}", "merge",
                         " (the adapter diverged or the dtype overflows); allow_non_finite=True keeps them")

    try:
        for name, layer in layers.items():
            merged = layer.merge(dtype)
            check(name, merged.weight)
            tx.replace(aliases.get(id(layer), [name]), merged)
        merged_experts = merge_all_experts(model, dtype, check)
    except BaseException:
        tx.rollback()
        raise
    if not layers and not merged_experts:
        raise ValueError("the model has no SORSA layers to merge")
    unwrap_saved_modules(model)
    return model
