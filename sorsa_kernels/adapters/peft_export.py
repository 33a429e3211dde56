"""Export a SORSA fine-tune as a standard PEFT LoRA adapter for the *original* base model.

``ΔW = scale·(U·diag(S)·Vᵀ − U0·diag(S0)·V0ᵀ)`` has rank ≤ 2r and factors exactly as
``B·A`` with ``B = [scale·U·diag(S) | −scale·U0·diag(S0)]`` (m×2r) and ``A = [Vᵀ ; V0ᵀ]``
(2r×n).  With ``lora_alpha = r_lora`` PEFT's scaling is 1, so ``W0 + B·A`` is the
fine-tuned weight (up to the residual dtype's rounding in training).  Any server that loads
PEFT adapters can then serve a SORSA fine-tune.  Layers built from GPT-2 ``Conv1D`` modules
export with ``fan_in_fan_out: true`` (the factors are the same: PEFT's ``lora_A`` is r×in
for both); modules kept as trainable copies become PEFT's ``modules_to_save``; the
``task_type`` is inferred from the model class (``SEQ_CLS`` for ``*ForSequenceClassification``,
…; see :func:`~.targets.infer_task_type`).  SORSA experts (the fused 3-D expert weights of MoE
models) export as LoRA on PEFT's ``target_parameters``: a rank-2r LoRA per expert, laid out as
PEFT's ``ParamWrapper`` reads it (:func:`peft_expert_lora`), which PEFT loads exactly.  That layout
is PEFT's private one, tested on PEFT :data:`TESTED_PEFT`: an export holding experts refuses an
older installed PEFT (a plain LoRA of linear layers loads on any ``peft>=0.13``).  A layer whose
adapter kind is not a LoRA update (:attr:`~sorsa_kernels.nn.kinds.AdapterKind.lora`) is refused,
naming its kind.  For QSORSA, the exported LoRA applies to
the unquantized base and differs from the quantized training model by the quantization error.

The export is written as a whole folder: both files go to a temporary sibling folder that
replaces ``directory`` by one rename only when complete (:func:`~.atomic.atomic_dir`), so a
full disk or a kill leaves the previous export (or nothing), never a folder holding only
``adapter_config.json``.  As the folder is replaced, it may hold nothing but a previous export.
"""
from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_dir
from ..dtensor import full_tensor, is_sharded, process_rank
from ..nn.checks import check_finite
from ..nn.kinds import kind_of
from .experts import adapted_experts, expert_weight_names
from .modules_to_save import SavedModule, saved_modules
from .surgery import sorsa_layers
from .targets import HEAD_NAMES, infer_task_type

__all__ = ["export_peft_lora", "lora_factors", "peft_expert_lora", "TESTED_PEFT", "installed_peft_version"]

#: The PEFT release whose private expert layout (``target_parameters``, ``ParamWrapper``) the export is tested on.
TESTED_PEFT = "0.21.2"

#: What a PEFT adapter folder may hold; export refuses to replace a folder holding anything else.
_PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"}


def lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` (2r×n, m×2r) in float32 with ``B·A = scale·(U·diag(S)·Vᵀ − U0·diag(S0)·V0ᵀ)``.

    For SORSA experts, the stacks E×2r×n and E×m×2r (one such pair per expert)."""
    if layer.init_factors is None:
        raise ValueError("the layer has no initial factors; cannot express its update as a LoRA")
    U0, S0, V0 = (t.to(layer.U.device, torch.float32) for t in layer.init_factors)
    U, S, V = (full_tensor(t).detach().float() for t in (layer.U, layer.S, layer.V))
    U0, S0, V0 = (t.to(U.device) for t in (U0, S0, V0))
    B = torch.cat([U * (S * layer.scale).unsqueeze(-2), -U0 * (S0 * layer.scale).unsqueeze(-2)], dim=-1)
    A = torch.cat([V.mT, V0.mT], dim=-2)
    return A.contiguous(), B.contiguous()


def peft_expert_lora(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A.weight, lora_B.weight)`` of PEFT's ``ParamWrapper`` for a SORSA experts projection.

    PEFT reads ``lora_A`` (E·R)×n as E blocks of R rows (``A.reshape(E, R, n)``) and ``lora_B``
    m×(R·E) with expert ``e``'s column ``k`` at ``k·E + e`` (``B.reshape(m, R, E)``), and adds
    ``scaling·B_e·A_e`` to expert ``e``; with ``R = 2r`` and ``lora_alpha = R`` that is exactly
    :func:`lora_factors` per expert.
    """
    A, B = lora_factors(layer)  # E×R×n, E×m×R
    E, R, n = A.shape
    return A.reshape(E * R, n).contiguous(), B.permute(1, 2, 0).reshape(B.shape[1], R * E).contiguous()


def export_peft_lora(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    *,
    base_model_name_or_path: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    task_type: Optional[str] = "auto",
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` of a rank-2r PEFT LoRA.

    ``task_type`` ``"auto"`` (default) infers PEFT's task type from the model class
    (``CAUSAL_LM``, ``SEQ_CLS``, ``TOKEN_CLS``, ``SEQ_2_SEQ_LM``, ``FEATURE_EXTRACTION``, or
    None for e.g. image classification); pass one to override.  The trained copies of saved
    modules (``apply_sorsa(modules_to_save=...)``) are written as PEFT's ``modules_to_save``;
    for ``SEQ_CLS``/``TOKEN_CLS``, whose PEFT model always saves the ``classifier``/``score``
    head, an unsaved head is written with its base weights.

    ``peft.PeftModel.from_pretrained(base, directory)`` loads it with no help from this
    package; ``base`` must be the original (un-adapted) model.  ``directory`` is
    replaced as a whole once both files are complete (a failed export leaves the previous
    one); it must be new, empty, or hold only a previous PEFT export.  Files are ``0644``
    under the usual umask.
    On a model sharded by FSDP2 every rank must call it (the factors are gathered);
    rank 0 writes.

    Example::

        >>> export_peft_lora(model, "out/lora")
        >>> lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "out/lora")
    """
    layers = sorsa_layers(model)
    experts = adapted_experts(model)
    if not layers and not experts:
        raise ValueError("the model has no SORSA layers; nothing to export")
    projections = {f"{name}.{attr}": getattr(m, attr) for name, m in experts.items() for attr in expert_weight_names(m)}
    _check_lora_kinds({**layers, **projections})
    if projections:
        _check_peft_version(installed_peft_version())
    directory = Path(directory)
    if directory.is_dir():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in _PEFT_FILES)
        if foreign:
            raise ValueError(
                f"{directory} holds files that are not part of a PEFT adapter ({', '.join(foreign[:5])}); "
                f"the export replaces the whole folder, so choose a new or empty one"
            )
    elif directory.exists():
        raise NotADirectoryError(f"{directory} exists and is not a folder")
    tensors = {}
    rank_pattern = {}
    ranks = {name: 2 * layer.rank for name, layer in layers.items()}
    r = max([*ranks.values(), *(2 * p.rank for p in projections.values())])
    _check_expert_ranks(projections, r)
    _check_peft_moe_renames(model, layers)
    for name, layer in layers.items():
        A, B = lora_factors(layer)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to("cpu", dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to("cpu", dtype).contiguous()
        if ranks[name] != r:
            rank_pattern[name] = ranks[name]
    tensors.update(_expert_tensors(experts, dtype))
    if task_type == "auto":
        task_type = infer_task_type(model)
    saved = _saved_module_tensors(model, task_type)
    tensors.update({f"base_model.model.{name}.{k}": t.to("cpu").contiguous() for name, sd in saved.items()
                    for k, t in sd.items()})
    _check_export_finite(tensors)
    if any(is_sharded(layer.U) for layer in (*layers.values(), *projections.values())) and process_rank() != 0:
        return directory
    base_name = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if base_name and Path(base_name).is_dir():  # a local folder: absolute, so it loads from any working folder
        base_name = str(Path(base_name).resolve())
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "target_modules": sorted(layers),
        **({"target_parameters": sorted(projections)} if projections else {}),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: v for k, v in rank_pattern.items()},
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": sorted(saved) or None,
        "inference_mode": True,
    }
    with atomic_dir(directory) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def installed_peft_version() -> Optional[str]:
    """The installed PEFT's version, or None when PEFT is not installed."""
    try:
        return version("peft")
    except PackageNotFoundError:
        return None


def _check_peft_version(installed: Optional[str]) -> None:
    """Refuse to write the expert layout for an installed PEFT older than :data:`TESTED_PEFT`."""
    from packaging.version import Version

    if installed is not None and Version(installed) < Version(TESTED_PEFT):
        raise ValueError(
            f"export_peft_lora writes SORSA experts in PEFT's target_parameters layout, tested on peft {TESTED_PEFT}, "
            f"but peft {installed} is installed; upgrade (pip install 'peft>={TESTED_PEFT}') or merge with "
            "sorsa_kernels.merge_sorsa(model) and save the merged model instead"
        )


def _check_lora_kinds(layers: dict[str, nn.Module]) -> None:
    """Every adapter layer's kind must be a LoRA update (``AdapterKind.lora``) for PEFT to load it."""
    for name, layer in layers.items():
        kind = kind_of(layer)
        if not kind.lora:
            raise ValueError(
                f"layer {name} is a {kind.label} adapter (kind {kind.method!r}), whose update is not a LoRA; "
                "export_peft_lora cannot write it: merge with sorsa_kernels.merge_sorsa(model) and save the "
                "merged model instead"
            )


def _check_expert_ranks(projections: dict, r: int) -> None:
    """Expert LoRAs are written at the adapter's one rank (no ``rank_pattern`` for ``target_parameters``)."""
    for name, layer in projections.items():
        if 2 * layer.rank != r:
            raise ValueError(
                f"SORSA experts {name} have rank {layer.rank} but other layers rank {r // 2}; export_peft_lora "
                "writes expert LoRAs (target_parameters) only at the adapter's one rank; merge with "
                "sorsa_kernels.merge_sorsa(model) and save the merged model instead"
            )


def peft_moe_renamed_targets(model: nn.Module, names) -> list[str]:
    """Which of the linear-layer ``names`` PEFT would not load as written.

    PEFT ≥ 0.18 on ``transformers`` ≥ 5 converts, on load, the ``target_modules`` of an MoE model
    family whose layout changed from v4 (Mixtral, and the Qwen2-MoE pattern: Qwen3-MoE, OLMoE,
    DeepSeek-V2/V3, GLM-4-MoE, …): an entry ending in a v4 expert projection (``gate_proj``,
    ``up_proj``, ``down_proj``, ``w1``…``w3``, ``gate``) becomes a fused experts' target parameter.
    PEFT 0.18–0.21 did so also for a dense MLP or a shared expert (and dropped it); 0.22 keeps a
    target that names ``nn.Linear`` layers.  The answer is PEFT's own: its conversion runs on a
    view of the base model this LoRA loads on (each SORSA layer shown as the ``nn.Linear`` it
    replaced), and every name missing from the converted ``target_modules`` is returned.  A
    target set PEFT refuses to convert (one of two fused projections alone) returns every name
    it would convert.  Empty when PEFT's conversion is absent or does not apply.
    """
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
            _convert_peft_config_moe,
        )
    except ImportError:  # a PEFT or transformers without the v4 → v5 conversion
        return []
    names = sorted(names)
    config = getattr(model, "config", None)
    mapping = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(getattr(config, "model_type", None)))
    if not names or not mapping:
        return []
    lora = LoraConfig(r=1, target_modules=set(names))
    try:
        _convert_peft_config_moe(lora, _BaseView(model, names))
    except ValueError:  # PEFT refuses these targets as written
        return [n for n in names if n.rsplit(".", 1)[-1] in mapping]
    kept = set(lora.target_modules or ())
    return [n for n in names if n not in kept]


class _BaseView:
    """What PEFT's load-time conversion reads of a model (its config, module names and types, and
    parameters), showing each SORSA layer as the ``nn.Linear`` it replaced (a meta stand-in)."""

    def __init__(self, model: nn.Module, linear_names) -> None:
        self.config = model.config
        self._model = model
        self._linear = set(linear_names)

    def named_modules(self, *args, **kwargs):
        stand_in = nn.Linear(1, 1, bias=False, device="meta")
        inside = None
        for name, module in self._model.named_modules():
            if inside is not None and name.startswith(inside):
                continue  # a SORSA layer's own submodules: the base layer had none
            inside = None
            if name in self._linear:
                inside = f"{name}."
                yield name, stand_in
            else:
                yield name, module

    def named_parameters(self, *args, **kwargs):
        return self._model.named_parameters(*args, **kwargs)


def _check_peft_moe_renames(model: nn.Module, layers: dict) -> None:
    renamed = peft_moe_renamed_targets(model, layers)
    if renamed:
        model_type = model.config.model_type
        raise ValueError(
            f"PEFT would load this {model_type} LoRA wrongly: its transformers-v5 MoE conversion treats the dense "
            f"layers {', '.join(renamed[:3])}{' …' if len(renamed) > 3 else ''} ({len(renamed)} in all) as routed "
            "experts (their names end like v4 expert projections) and drops them; merge instead "
            "(sorsa_kernels.merge_sorsa(model) or `sorsa-kernels merge`), or adapt those layers' models without "
            "them in target_modules"
        )


def _expert_tensors(experts: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's tensors for every SORSA experts projection (``target_parameters``).

    PEFT wraps the parameters of one experts module one inside the other, in the order the module
    registers them (``gate_up_proj`` then ``down_proj``): the last one's LoRA sits at
    ``<module>.lora_A``, the one before at ``<module>.base_layer.lora_A``, and so on.
    """
    out = {}
    for name, module in experts.items():
        attrs = expert_weight_names(module)
        for i, attr in enumerate(attrs):
            prefix = f"base_model.model.{name}" + ".base_layer" * (len(attrs) - 1 - i)
            A, B = peft_expert_lora(getattr(module, attr))
            out[f"{prefix}.lora_A.weight"] = A.to("cpu", dtype).contiguous()
            out[f"{prefix}.lora_B.weight"] = B.to("cpu", dtype).contiguous()
    return out


def _saved_module_tensors(model: nn.Module, task_type: Optional[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: state}`` written as PEFT's ``modules_to_save``: every trained copy, and for
    SEQ_CLS/TOKEN_CLS the classification head even when it was not kept (PEFT loads it regardless)."""
    out = {name: m.trained.state_dict() for name, m in saved_modules(model).items()}
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):
        for name in [n for n, _ in model.named_children() if n in HEAD_NAMES]:
            module = model.get_submodule(name)
            if name not in out and not isinstance(module, SavedModule):
                out[name] = module.state_dict()
    return {name: {k: full_tensor(t).detach() for k, t in sd.items()} for name, sd in out.items()}


def _check_export_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write an export holding NaN/Inf (a diverged adapter, or an overflow in ``dtype``)."""
    for key, t in tensors.items():
        check_finite(t, f"tensor {key}", "export a PEFT LoRA adapter",
                     " (the adapter diverged, or the export dtype overflows)")
