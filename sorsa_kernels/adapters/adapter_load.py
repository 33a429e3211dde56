"""Loading an adapter: read and validate the file (:mod:`.adapter_format`), check it against the
base model, then rebuild every adapter layer through its kind (:mod:`sorsa_kernels.nn.kinds`).

The loader trusts the config embedded in ``adapter.safetensors`` and rejects a JSON copy that
disagrees (a hand edit that would otherwise silently not take effect, or files from two saves
put together).  Adapters saved before the config was embedded (JSON + safetensors without
``sorsa_config``) still load from their JSON, with the same checks.  A layer built from a
GPT-2 ``Conv1D`` (``"fan_in_fan_out": true``) loads only onto a ``Conv1D``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..nn.checks import is_conv1d, linear_weight
from ..nn.init_spec import SORSAInit
from ..nn.kinds import building, kind_of
from .adapter_format import (CONFIG_NAME, DTYPE_NAMES, METADATA_KEY, WEIGHTS_NAME, AdapterError, PathLike, check_config,
                             check_tensors, dtype_name, layer_kind, saved_state_of)
from .base_match import check_base_matches
from .experts import adapt_experts, expert_weight_names, is_adapted_experts, is_fused_experts
from .modules_to_save import SavedModule, check_saved_state
from .plan import SurgeryPlan, plan_sorsa

__all__ = ["read_adapter", "load_adapter"]

#: The files of a PEFT adapter folder (``export_peft_lora`` writes one): not loadable here.
_PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k, "<missing>") != b.get(k, "<missing>"):
                return _first_difference(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else k)
    return f"{path or 'config'}: {b!r} in the JSON, {a!r} embedded"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{what} {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise AdapterError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _weights_path(path: Path) -> tuple[Path, Any]:
    """``(adapter.safetensors, adapter_config.json or None)`` of an adapter folder or file."""
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise FileNotFoundError(
            f"no adapter at {path}: {path / WEIGHTS_NAME} does not exist and {path / CONFIG_NAME} does not exist"
        )
    w_path, cfg_path = path / WEIGHTS_NAME, path / CONFIG_NAME
    if w_path.is_file():
        return w_path, cfg_path
    peft = [n for n in _PEFT_WEIGHTS if (path / n).is_file()]
    if peft:
        raise AdapterError(
            f"{path} is a PEFT adapter ({CONFIG_NAME} + {peft[0]}), not a sorsa-kernels adapter ({WEIGHTS_NAME}); "
            f"load it with peft: PeftModel.from_pretrained(base_model, {str(path)!r})"
        )
    if cfg_path.is_file():
        raise FileNotFoundError(f"adapter weights {w_path} do not exist (only {CONFIG_NAME} is there)")
    raise FileNotFoundError(f"no adapter in {path}: {w_path} does not exist and {cfg_path} does not exist")


def read_adapter(path: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate an adapter; returns ``(config, tensors)`` (CPU tensors, stored dtypes).

    ``path`` is an adapter folder or an ``adapter.safetensors`` file itself.  Raises
    :class:`FileNotFoundError` when there is no adapter and :class:`AdapterError` (a
    ``ValueError``) naming the file, layer and field for anything wrong in it (a PEFT
    adapter folder is named as one, with the call that loads it).

    Example::

        >>> config, tensors = read_adapter("out/adapter")
        >>> config["layers"]["model.layers.0.self_attn.q_proj"]["rank"]
        8
    """
    w_path, cfg_path = _weights_path(Path(path))
    try:
        with safe_open(w_path, "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"adapter weights {w_path} are corrupt or truncated: {e}") from None
    embedded = metadata.get(METADATA_KEY)
    if embedded is not None:
        try:
            config = json.loads(embedded)
        except json.JSONDecodeError as e:
            raise AdapterError(f"the config embedded in {w_path} is not valid JSON: {e}") from None
        source = w_path
        if cfg_path is not None and cfg_path.is_file():
            copy = _read_json(cfg_path, "adapter config")
            if copy != config:
                raise AdapterError(
                    f"{cfg_path} disagrees with the config embedded in {w_path} ({_first_difference(config, copy)}); "
                    f"the embedded config is the one that belongs to these weights: delete or restore {CONFIG_NAME}"
                )
    else:  # saved before the config was embedded: the JSON is the only config
        if cfg_path is None or not cfg_path.is_file():
            where = cfg_path or w_path.parent / CONFIG_NAME
            raise AdapterError(
                f"{w_path} has no embedded config (an adapter saved by an older sorsa-kernels) and {where} is missing; "
                f"load its folder with the original {CONFIG_NAME}"
            )
        config = _read_json(cfg_path, "adapter config")
        source = cfg_path
    check_config(config, source)
    check_tensors(config, tensors, w_path)
    return config, tensors


def load_adapter(base_model: nn.Module, directory: PathLike, *, allow_base_mismatch: bool = False) -> nn.Module:
    """Rebuild, in place on the untouched ``base_model``, exactly the model that was saved.

    No SVD runs: each target ``nn.Linear`` (or ``Conv1D``) becomes an adapter layer of the saved
    kind whose residual is recomputed from its weight and the saved initial factors, and whose
    U, S, V (and any further tensors of its kind) are the saved trained ones (in the stored
    ``adapter_dtype``); each saved module (``modules_to_save``) gets its trained copy back.
    ``directory`` is the adapter folder or its ``adapter.safetensors``.  The file's layers and
    experts are the targets, and its saved modules the ``modules_to_save``, of the same surgery
    plan :func:`~sorsa_kernels.apply_sorsa` makes (:func:`~sorsa_kernels.adapters.plan.plan_sorsa`):
    everything is checked before the model is changed (a saved module that is also a target
    layer is refused), and the plan is applied as one transaction, so a failure while
    rebuilding any layer leaves the model as it was.  A problem raises a ``ValueError``
    naming the file, layer and field.  Layers of one file may have different ranks.
    The base must be the one the adapter was fitted to: each layer's weight is checked
    against the saved factors (:mod:`.base_match`; a merged model or another checkpoint is
    refused).  ``allow_base_mismatch=True`` applies it to another base on purpose.

    Example::

        >>> model = load_adapter(AutoModelForCausalLM.from_pretrained(base), "out/adapter")
    """
    config, tensors = read_adapter(directory)
    layers = config["layers"]
    _check_experts_base(base_model, config)
    for name, lc in layers.items():  # file against base first: these messages name the file's fields
        try:
            linear = base_model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"the adapter targets {name}, which the base model does not have") from None
        if kind_of(linear) is not None:
            raise AdapterError(f"layer {name} is already a SORSA layer; load the adapter on an untouched base model")
        _check_base_layer(linear, name, lc)
    saved = saved_state_of(config, tensors)
    try:
        check_saved_state(base_model, saved, str(directory))
    except ValueError as e:
        raise AdapterError(str(e)) from None
    plan = _plan_of(base_model, config, list(saved), directory)
    _check_base_rows(base_model, config, tensors, directory, allow_base_mismatch)
    _check_saved_dtypes(base_model, saved, directory)
    return plan.apply(
        base_model,
        build_linear=lambda name, linear: _rebuild_layer(linear, name, config, tensors),
        build_experts=lambda name, module: _rebuild_experts(module, name, config, tensors),
        build_saved=lambda name, module: SavedModule.restored(module, saved[name]),
    )


def _plan_of(base_model: nn.Module, config: dict[str, Any], saved: list[str], source: PathLike) -> SurgeryPlan:
    """The surgery plan of an adapter file: its layers and experts modules as the targets, its saved
    modules as ``modules_to_save``.  The plan carries one rank, the file's smallest (every weight
    must hold it); each layer is rebuilt at its own rank, from its saved factors."""
    targets = [*config["layers"], *config.get("experts", {})]
    ranks = [lc["rank"] for lc in config["layers"].values()] + [ec["rank"] for ec in config.get("experts", {}).values()]
    init = SORSAInit(rank=min(ranks), alpha=config.get("alpha"), dropout=config.get("dropout", 0.0))
    try:
        plan = plan_sorsa(base_model, init, targets, modules_to_save=saved)
    except ValueError as e:
        raise AdapterError(f"adapter {source}: {e}") from None
    plan.saved = saved  # the file's full names, each restored from its own tensors
    return plan


def _rebuild_layer(linear: nn.Module, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                   ) -> nn.Module:
    """The adapter layer of ``name`` rebuilt from the file's factors through its kind (no SVD)."""
    lc = config["layers"][name]
    kind = layer_kind(lc, False, name)
    U, S, V, U0, S0, V0 = (tensors[f"{name}.{k}"] for k in (*kind.trained, *kind.initial))
    layer = kind.module_class.from_factors(
        linear, U0, S0, V0, trained=(U, S, V), alpha=config.get("alpha"),
        dropout=config.get("dropout", 0.0), residual_dtype=DTYPE_NAMES[lc["residual_dtype"]], name=name,
    )
    _restore_extra(layer, kind.extra, tensors, name)
    return layer


def _restore_extra(layer: nn.Module, extra: dict, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Copy the saved values of a kind's further trainable tensors into the rebuilt ``layer``."""
    with torch.no_grad():
        for key in extra:
            getattr(layer, key).copy_(tensors[f"{prefix}.{key}"])


def _check_base_layer(module: nn.Module, name: str, lc: dict[str, Any]) -> None:
    """Raise unless ``module`` is an ``nn.Linear`` or a ``Conv1D`` of the sizes and bias the adapter's layer was."""
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise TypeError(f"the adapter targets {name}, which is a {type(module).__name__}, not nn.Linear or Conv1D")
    if is_conv1d(module) != lc.get("fan_in_fan_out", False):
        raise AdapterError(
            f"layer {name} is {'a Conv1D' if is_conv1d(module) else 'an nn.Linear'} but the adapter was trained on "
            f"{'a Conv1D' if lc.get('fan_in_fan_out', False) else 'an nn.Linear'} (fan_in_fan_out="
            f"{str(lc.get('fan_in_fan_out', False)).lower()}); it was trained on a different base model"
        )
    expected = (lc["out_features"], lc["in_features"])
    if tuple(linear_weight(module).shape) != expected:
        raise AdapterError(
            f"layer {name} has weight shape {tuple(linear_weight(module).shape)} but the adapter was trained on "
            f"{expected} (out_features, in_features)"
        )
    if (module.bias is not None) != lc["bias"]:
        raise AdapterError(
            f"layer {name} {'has' if module.bias is not None else 'has no'} bias but the adapter says "
            f"bias={lc['bias']}; it was trained on a different base model"
        )


def _check_saved_dtypes(model: nn.Module, saved: dict[str, dict[str, torch.Tensor]], source: PathLike) -> None:
    """A saved module's tensor has the dtype class of the base's own: floating where the base's is
    (an int64 head would load as truncated weights), the exact dtype where the base's is not."""
    for name, state in saved.items():
        module = model.get_submodule(name)
        own = (module.trained if isinstance(module, SavedModule) else module).state_dict()
        for key, t in state.items():
            base = own[key]
            if t.is_floating_point() if base.is_floating_point() else t.dtype == base.dtype:
                continue
            want = "a floating-point dtype" if base.is_floating_point() else dtype_name(base.dtype)
            raise AdapterError(f"{source}: saved module tensor {name}.{key} has dtype {dtype_name(t.dtype)} but the "
                               f"base model's {name}.{key} needs {want}")


def _check_base_rows(base_model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                     source: PathLike, allow_mismatch: bool) -> None:
    """Every target weight against the adapter's factors (:func:`.base_match.check_base_matches`);
    with ``allow_mismatch`` only the meta-device check remains."""
    alpha = config.get("alpha")
    checks = []  # (layer name, out×in weight, factors U, S, V, U0, S0, V0, rank, quantize)
    for name, lc in config["layers"].items():
        kind = layer_kind(lc, False, name)
        factors = [tensors[f"{name}.{k}"] for k in (*kind.trained, *kind.initial)]
        checks.append((name, linear_weight(base_model.get_submodule(name)), factors, lc["rank"], lc["quantize"]))
    for name, ec in config.get("experts", {}).items():  # each expert's matrix like a layer's
        module = base_model.get_submodule(name)
        kind = layer_kind(ec, True, name)
        for attr in ec["projections"]:
            w = getattr(module, attr)
            w = w.mT if getattr(module, "is_transposed", False) else w  # experts × out × in
            stacks = [tensors[f"{name}.{attr}.{k}"] for k in (*kind.trained, *kind.initial)]
            checks += [(f"{name}.{attr}[expert {e}]", w[e], [s[e] for s in stacks], ec["rank"], ec.get("quantize"))
                       for e in range(w.shape[0])]
    for name, weight, (U, S, V, U0, S0, V0), rank, quantize in checks:
        if allow_mismatch and weight.device.type != "meta":
            continue
        scale = 1.0 if alpha is None else float(alpha) / rank
        check_base_matches(name, weight, U0, S0, V0, scale, quantize, f"adapter {source}", trained=(U, S, V))


def _check_experts_base(base_model: nn.Module, config: dict[str, Any]) -> None:
    for name, ec in config.get("experts", {}).items():
        try:
            module = base_model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"the adapter targets experts {name}, which the base model does not have") from None
        if is_adapted_experts(module):
            raise AdapterError(f"experts {name} already hold SORSA experts; load the adapter on an untouched base model")
        if not is_fused_experts(module):
            raise AdapterError(f"the adapter targets experts {name}, which is a {type(module).__name__}, "
                               "not a transformers experts module with fused 3-D weights")
        if sorted(expert_weight_names(module)) != sorted(ec["projections"]):
            raise AdapterError(f"experts {name} have projections {list(expert_weight_names(module))} but the adapter "
                               f"holds {list(ec['projections'])}")
        for attr, pc in ec["projections"].items():
            w = getattr(module, attr)
            w = w.mT if getattr(module, "is_transposed", False) else w
            want = (ec["num_experts"], pc["out_features"], pc["in_features"])
            if tuple(w.shape) != want:
                raise AdapterError(f"experts {name}.{attr} have weight shape {tuple(w.shape)} but the adapter was "
                                   f"trained on {want} (experts, out_features, in_features)")


def _rebuild_experts(module: nn.Module, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                     ) -> None:
    """Adapt the experts module ``name`` in place from the file's factors through its kind (no SVD)."""
    ec = config["experts"][name]
    kind = layer_kind(ec, True, name)
    factors = {}
    for attr in ec["projections"]:
        U, S, V, U0, S0, V0 = (tensors[f"{name}.{attr}.{k}"] for k in (*kind.trained, *kind.initial))
        factors[attr] = {"U0": U0, "S0": S0, "V0": V0, "trained": (U, S, V)}
    with building(kind.method):  # adapt_experts builds through the factory, which reads the kind being built
        adapt_experts(module, ec["rank"], name=name, factors=factors, quantize=kind.quantize,
                      alpha=config.get("alpha"), residual_dtype=DTYPE_NAMES[ec["residual_dtype"]])
    for attr in ec["projections"]:
        _restore_extra(getattr(module, attr), kind.extra, tensors, f"{name}.{attr}")
