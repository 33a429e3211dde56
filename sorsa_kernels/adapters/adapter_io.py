"""Adapter files: one self-describing ``adapter.safetensors`` (+ a readable ``adapter_config.json``).

The file holds, for every adapted layer, the trained factors ``U, S, V`` and the initial
factors ``U0, S0, V0``.  Loading rebuilds the training-time model on the untouched base
with no SVD: the residual is recomputed as ``W0 − scale·U0·diag(S0)·V0ᵀ`` by the same
float32 computation as at initialization (and re-quantized deterministically for QSORSA).
Loading never unpickles.

Format decision: the config travels **inside** the weights file, as the safetensors header
metadata entry ``"sorsa_config"`` (a JSON string).  Weights and config are then one file,
published by one ``os.replace``, so no crash can pair new weights with an old config — the
defect of writing two files and renaming them one after the other.  Publishing the pair by
renaming a whole folder was the alternative; it was not chosen because ``save_adapter``
is given a folder that may hold other things (a run's output folder, the current folder),
which a folder swap would replace, and because a single file can be copied, uploaded or
passed to :func:`load_adapter` on its own without losing its config.

``adapter_config.json`` is still written beside it, as a copy for people and tools that
read JSON.  The loader trusts the embedded config and rejects a JSON copy that disagrees
(a hand edit that would otherwise silently not take effect, or files from two saves put
together).  A save never leaves a disagreeing copy behind: both files are written to
temporaries first, then the old JSON is removed, the weights published, and the new JSON
published; a kill at any point leaves either the old or the new adapter, with the JSON
copy matching it or absent.  Adapters saved before the config was embedded (JSON +
safetensors without ``sorsa_config``) still load from their JSON, with the same checks.

A layer built from a GPT-2 ``Conv1D`` records ``"fan_in_fan_out": true`` and loads only onto
a ``Conv1D``.  Modules kept as trainable copies (``modules_to_save``, e.g. a classification
head) are listed in the config as ``"modules_to_save": {name: [state keys]}`` and stored as
tensors ``modules_to_save/<name>.<key>``; loading puts the copies back.

Every field is validated on load against the tensors (rank and shapes, floating dtypes
equal to ``adapter_dtype``, finiteness) and, in :func:`load_adapter`, against the base
layers; every problem raises :class:`AdapterError` (a ``ValueError``) naming the file,
the layer and the field.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..nn.checks import SUPPORTED_DTYPES, is_conv1d, linear_weight
from ..nn.linear import SORSALinear
from .atomic import atomic_file
from ..dtensor import full_tensor, is_sharded, process_rank
from .base_match import check_base_matches
from .experts import adapt_experts, adapted_experts, expert_weight_names, is_adapted_experts, is_fused_experts
from .modules_to_save import check_saved_state, restore_saved_modules, saved_state
from .surgery import module_aliases, replace_everywhere, sorsa_layers

__all__ = [
    "AdapterError",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "METADATA_KEY",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "validate_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
#: The safetensors metadata entry that holds the adapter config (a JSON string).
METADATA_KEY = "sorsa_config"
FORMAT = "sorsa-kernels/adapter"
FORMAT_VERSION = 1
_FACTORS = ("U", "S", "V", "U0", "S0", "V0")
_QUANTIZE = (None, "nf4")
_DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in SUPPORTED_DTYPES}

PathLike = Union[str, os.PathLike]

#: Test hook: called with the name of each publication step of :func:`save_adapter`
#: ("written", "config_removed", "weights_published"); tests kill the process there.
_between_steps: Optional[Callable[[str], None]] = None


class AdapterError(ValueError):
    """An adapter file that cannot be loaded as it is; the message names file, layer and field."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _step(name: str) -> None:
    if _between_steps is not None:
        _between_steps(name)


# ---------------------------------------------------------------------------------- checks
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_config(config: Any, source: Path) -> None:
    """Raise :class:`AdapterError` unless ``config`` is a well-formed adapter config."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterError(f"{source} is not a sorsa-kernels adapter config (missing format={FORMAT!r})")
    version = config.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise AdapterError(
            f"{source}: format_version {version!r} is unknown; this sorsa-kernels reads versions 1 to {FORMAT_VERSION}"
        )
    dtype = config.get("adapter_dtype")
    if dtype not in _DTYPE_NAMES:
        raise AdapterError(
            f"{source}: adapter_dtype {dtype!r} is not a known dtype; allowed: {', '.join(_DTYPE_NAMES)}"
        )
    alpha = config.get("alpha")
    if alpha is not None and not (_is_real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise AdapterError(f"{source}: alpha must be a finite number > 0 or null, got {alpha!r}")
    dropout = config.get("dropout", 0.0)
    if not (_is_real(dropout) and 0.0 <= dropout < 1.0):
        raise AdapterError(f"{source}: dropout must be a number in [0, 1), got {dropout!r}")
    layers = config.get("layers")
    if not isinstance(layers, dict) or not (layers or config.get("experts")):
        raise AdapterError(f"{source}: the config has no 'layers' (a non-empty object of layer name → settings)")
    targets = config.get("target_modules")
    if targets is not None and (not isinstance(targets, list) or sorted(map(str, targets)) != sorted(layers)):
        raise AdapterError(f"{source}: target_modules {targets!r} do not match the layers {sorted(layers)}")
    for name, lc in layers.items():
        where = f"{source}: layer {name}"
        if not isinstance(lc, dict):
            raise AdapterError(f"{where}: settings must be an object, got {lc!r}")
        for field in ("in_features", "out_features", "rank"):
            v = lc.get(field)
            if not _is_int(v) or v <= 0:
                raise AdapterError(f"{where}: {field} must be a positive integer, got {v!r}")
        if lc["rank"] > min(lc["in_features"], lc["out_features"]):
            raise AdapterError(
                f"{where}: rank {lc['rank']} exceeds min(in_features, out_features) = "
                f"{min(lc['in_features'], lc['out_features'])}"
            )
        if not isinstance(lc.get("bias"), bool):
            raise AdapterError(f"{where}: bias must be true or false, got {lc.get('bias')!r}")
        if lc.get("residual_dtype") not in _DTYPE_NAMES:
            raise AdapterError(
                f"{where}: residual_dtype {lc.get('residual_dtype')!r} is not a known dtype; "
                f"allowed: {', '.join(_DTYPE_NAMES)}"
            )
        if lc.get("quantize") not in _QUANTIZE:
            raise AdapterError(f"{where}: quantize {lc.get('quantize')!r} is unknown; allowed: null, 'nf4'")
        if not isinstance(lc.get("fan_in_fan_out", False), bool):
            raise AdapterError(f"{where}: fan_in_fan_out must be true or false, got {lc.get('fan_in_fan_out')!r}")
    _check_experts_config(config, source)
    _check_saved_config(config, source)


def _check_saved_config(config: dict[str, Any], source: Path) -> None:
    """``modules_to_save``, when present, is ``{module name: [state keys]}``."""
    saved = config.get("modules_to_save", {})
    if not isinstance(saved, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and v and all(isinstance(x, str) for x in v) for k, v in saved.items()
    ):
        raise AdapterError(
            f"{source}: modules_to_save must be an object of module name → non-empty list of state keys, got {saved!r}"
        )


def _check_tensors(config: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Raise :class:`AdapterError` unless ``tensors`` are exactly the factors ``config`` describes."""
    dtype = _DTYPE_NAMES[config["adapter_dtype"]]
    expected_names = set()
    for name, lc in config["layers"].items():
        m, n, r = lc["out_features"], lc["in_features"], lc["rank"]
        shapes = {"U": (m, r), "S": (r,), "V": (n, r)}
        for key in _FACTORS:
            tname = f"{name}.{key}"
            expected_names.add(tname)
            t = tensors.get(tname)
            if t is None:
                raise AdapterError(f"adapter weights {source} lack tensor {tname}")
            where = f"{source}: layer {name}: tensor {key}"
            if not t.is_floating_point():
                raise AdapterError(
                    f"{where} has dtype {_dtype_name(t.dtype)}; adapter factors must be floating point "
                    f"(the config says adapter_dtype {config['adapter_dtype']})"
                )
            if t.dtype != dtype:
                raise AdapterError(
                    f"{where} has dtype {_dtype_name(t.dtype)} but the config says adapter_dtype "
                    f"{config['adapter_dtype']}"
                )
            want = shapes[key.rstrip("0")]
            if tuple(t.shape) != want:
                raise AdapterError(
                    f"{where} has shape {tuple(t.shape)} but the config (out_features={m}, in_features={n}, "
                    f"rank={r}) needs {want}"
                )
            bad = (~torch.isfinite(t)).sum().item()
            if bad:
                raise AdapterError(f"{where} has {bad} non-finite (NaN or inf) values")
    expected_names |= _check_experts_tensors(config, tensors, source)
    for name, keys in config.get("modules_to_save", {}).items():
        for key in keys:
            tname = _saved_tensor_name(name, key)
            expected_names.add(tname)
            if tname not in tensors:
                raise AdapterError(f"adapter weights {source} lack tensor {tname}")
            if tensors[tname].is_floating_point() and not bool(torch.isfinite(tensors[tname]).all()):
                raise AdapterError(f"{source}: saved module tensor {tname} has non-finite (NaN or inf) values")
    extra = sorted(set(tensors) - expected_names)
    if extra:
        raise AdapterError(
            f"adapter weights {source} hold tensors no layer in the config uses: {', '.join(extra[:5])}"
            + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        )


def validate_adapter(config: Any, tensors: dict[str, torch.Tensor], source: PathLike = "<adapter>") -> None:
    """Check an adapter config and its tensors against each other; raise :class:`AdapterError`.

    Checks the format and version, ``adapter_dtype``, ``alpha``, ``dropout``, that
    ``layers`` is present, and for every layer its sizes, rank, bias flag, dtypes and
    quantization, and that its six factors exist with the shapes the rank and sizes give
    (``U``: out×r, ``S``: r, ``V``: in×r, same for ``U0, S0, V0``), in ``adapter_dtype``
    and finite.  ``source`` names the file in messages.

    Example::

        >>> config, tensors = read_adapter("out/adapter")   # already validated
        >>> validate_adapter(config, tensors, "out/adapter")
    """
    source = Path(source)
    _check_config(config, source)
    _check_tensors(config, tensors, source)


# ---------------------------------------------------------------------------------- save
def _adapter_state(model: nn.Module, base_model_name_or_path: Optional[str]):
    layers = sorsa_layers(model)
    experts = adapted_experts(model)
    if not layers and not experts:
        raise ValueError("the model has no SORSA layers; nothing to save")
    tensors: dict[str, torch.Tensor] = {}
    layer_cfg: dict[str, Any] = {}
    sharded = any(is_sharded(layer.U) for layer in layers.values())
    for name, layer in layers.items():
        if layer.init_factors is None:
            raise ValueError(f"layer {name} has no initial factors (it was not built by from_linear/from_factors)")
        U0, S0, V0 = layer.init_factors
        for key, t in zip(_FACTORS, (layer.U, layer.S, layer.V, U0, S0, V0)):
            tensors[f"{name}.{key}"] = full_tensor(t).detach().to("cpu").contiguous()
        layer_cfg[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "rank": layer.rank,
            "bias": layer.bias is not None,
            "residual_dtype": _dtype_name(layer.residual_dtype),
            "quantize": layer.quantize,
        }
        if layer.fan_in_fan_out:  # written only when set: adapters of nn.Linear layers are unchanged
            layer_cfg[name]["fan_in_fan_out"] = True
    sharded = sharded or any(is_sharded(getattr(m, a).U) for m in experts.values() for a in expert_weight_names(m))
    first = next(iter(layers.values())) if layers else getattr(next(iter(experts.values())), "down_proj")
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sorsa_kernels_version": __version__,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None),
        "alpha": first.alpha,
        "dropout": getattr(first, "dropout_p", 0.0),
        "adapter_dtype": _dtype_name(first.U.dtype),
        "target_modules": list(layers),
        "layers": layer_cfg,
    }
    model_class = next((c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers.")), None)
    if model_class is not None:  # the class merge/export-lora/analyze load the base as (FSDP's wrapper skipped)
        config["model_class"] = model_class
    _add_experts(experts, config, tensors)
    _add_saved_modules(model, config, tensors)
    return config, tensors, sharded


def _saved_tensor_name(module: str, key: str) -> str:
    """The tensor name of a saved module's state entry (``/`` never occurs in a module name)."""
    return f"modules_to_save/{module}.{key}"


def _add_saved_modules(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put each trainable copy's state into ``tensors`` and its keys into ``config["modules_to_save"]``."""
    state = saved_state(model)
    if not state:
        return
    config["modules_to_save"] = {name: sorted(sd) for name, sd in state.items()}
    for name, sd in state.items():
        for key, t in sd.items():
            tensors[_saved_tensor_name(name, key)] = full_tensor(t).detach().to("cpu").contiguous()


def _saved_state_of(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {state key: tensor}}`` of the adapter's saved modules (empty when it has none)."""
    return {name: {k: tensors[_saved_tensor_name(name, k)] for k in keys}
            for name, keys in config.get("modules_to_save", {}).items()}


def _check_base_layer(module: nn.Module, name: str, lc: dict[str, Any]) -> None:
    """Raise unless ``module`` is an ``nn.Linear`` or a ``Conv1D`` as the adapter's layer ``name`` was."""
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise TypeError(f"the adapter targets {name}, which is a {type(module).__name__}, not nn.Linear or Conv1D")
    if is_conv1d(module) != lc.get("fan_in_fan_out", False):
        raise AdapterError(
            f"layer {name} is {'a Conv1D' if is_conv1d(module) else 'an nn.Linear'} but the adapter was trained on "
            f"{'a Conv1D' if lc.get('fan_in_fan_out', False) else 'an nn.Linear'} (fan_in_fan_out="
            f"{str(lc.get('fan_in_fan_out', False)).lower()}); it was trained on a different base model"
        )


def save_adapter(
    model: nn.Module, directory: PathLike, *, base_model_name_or_path: Optional[str] = None
) -> Path:
    """Save every SORSA layer's trained and initial factors to ``directory``.

    Writes ``adapter.safetensors`` (factors, with the config in its header) and the
    readable copy ``adapter_config.json``.  Nothing is published until both are fully
    written (and fsynced); a save that fails — a full disk, an interrupt — leaves the
    previous adapter in ``directory`` loadable and unchanged, and a kill at any point
    leaves the old or the new adapter, never a mix (see the module docstring).  The
    adapter is validated before writing, so a model with non-finite factors is refused
    rather than saved as an adapter that cannot be loaded.  Files are ``0644`` under
    the usual umask.

    On a model sharded by FSDP2 (``fully_shard``) every rank must call it: the factors are
    gathered (all-gather, one tensor at a time) and rank 0 writes the files a
    single-process run writes.

    Example::

        >>> save_adapter(model, "out/adapter")
        >>> model = load_adapter(AutoModelForCausalLM.from_pretrained(base), "out/adapter")
    """
    directory = Path(directory)
    config, tensors, sharded = _adapter_state(model, base_model_name_or_path)  # collective when sharded
    if sharded and process_rank() != 0:
        return directory
    try:
        validate_adapter(config, tensors, directory / WEIGHTS_NAME)
    except AdapterError as e:
        raise ValueError(f"refusing to save an adapter that could not be loaded: {e}") from None
    text = json.dumps(config, indent=2)
    directory.mkdir(parents=True, exist_ok=True)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    with atomic_file(cfg_path) as tmp_c:  # exits last: the JSON copy is published after the weights
        with atomic_file(w_path) as tmp_w:
            save_file(tensors, tmp_w, metadata={"format": FORMAT, METADATA_KEY: text})
            tmp_c.write_text(text + "\n")
            _step("written")
            try:  # the old copy goes first, so no moment shows new weights beside an old JSON
                cfg_path.unlink()
            except FileNotFoundError:
                pass
            _step("config_removed")
        _step("weights_published")
    return directory


# ---------------------------------------------------------------------------------- load
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


def read_adapter(path: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate an adapter; returns ``(config, tensors)`` (CPU tensors, stored dtypes).

    ``path`` is an adapter folder or an ``adapter.safetensors`` file itself.  Raises
    :class:`FileNotFoundError` when there is no adapter and :class:`AdapterError` (a
    ``ValueError``) naming the file, layer and field for anything wrong in it.

    Example::

        >>> config, tensors = read_adapter("out/adapter")
        >>> config["layers"]["model.layers.0.self_attn.q_proj"]["rank"]
        8
    """
    path = Path(path)
    if path.is_dir():
        w_path, cfg_path = path / WEIGHTS_NAME, path / CONFIG_NAME
        if not w_path.is_file():
            if cfg_path.is_file():
                raise FileNotFoundError(f"adapter weights {w_path} do not exist (only {CONFIG_NAME} is there)")
            raise FileNotFoundError(f"no adapter in {path}: {w_path} does not exist and {cfg_path} does not exist")
    elif path.is_file():
        w_path, cfg_path = path, None
    else:
        raise FileNotFoundError(
            f"no adapter at {path}: {path / WEIGHTS_NAME} does not exist and {path / CONFIG_NAME} does not exist"
        )
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
    _check_config(config, source)
    _check_tensors(config, tensors, w_path)
    return config, tensors


def load_adapter(base_model: nn.Module, directory: PathLike, *, allow_base_mismatch: bool = False) -> nn.Module:
    """Rebuild, in place on the untouched ``base_model``, exactly the model that was saved.

    No SVD runs: each target ``nn.Linear`` (or ``Conv1D``) becomes a SORSA layer whose residual is
    recomputed from its weight and the saved initial factors, and whose U, S, V are the
    saved trained factors (in the stored ``adapter_dtype``); each saved module
    (``modules_to_save``) gets its trained copy back.  ``directory`` is the adapter
    folder or its ``adapter.safetensors``.  Everything is checked before the model is
    changed; a problem raises a ``ValueError`` naming the file, layer and field.
    The base must be the one the adapter was fitted to: each layer's weight is checked
    against the saved ``U0, S0, V0`` (:mod:`.base_match`; a merged model or another
    checkpoint is refused).  ``allow_base_mismatch=True`` applies it to another base on purpose.

    Example::

        >>> model = load_adapter(AutoModelForCausalLM.from_pretrained(base), "out/adapter")
    """
    config, tensors = read_adapter(directory)
    layers = config["layers"]
    _check_experts_base(base_model, config)
    for name, lc in layers.items():  # validate everything before changing the model
        try:
            linear = base_model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"the adapter targets {name}, which the base model does not have") from None
        if isinstance(linear, SORSALinear):
            raise AdapterError(f"layer {name} is already a SORSA layer; load the adapter on an untouched base model")
        _check_base_layer(linear, name, lc)
        expected = (lc["out_features"], lc["in_features"])
        if tuple(linear_weight(linear).shape) != expected:
            raise AdapterError(
                f"layer {name} has weight shape {tuple(linear_weight(linear).shape)} but the adapter was trained on "
                f"{expected} (out_features, in_features)"
            )
        if (linear.bias is not None) != lc["bias"]:
            raise AdapterError(
                f"layer {name} {'has' if linear.bias is not None else 'has no'} bias but the adapter says "
                f"bias={lc['bias']}; it was trained on a different base model"
            )
    _check_base_rows(base_model, config, tensors, directory, allow_base_mismatch)
    saved = _saved_state_of(config, tensors)
    try:
        check_saved_state(base_model, saved, str(directory))
    except ValueError as e:
        raise AdapterError(str(e)) from None
    for p in base_model.parameters():
        p.requires_grad_(False)
    aliases = module_aliases(base_model)  # a layer shared by two parents is replaced under both names
    for name, lc in layers.items():
        linear = base_model.get_submodule(name)
        U, S, V, U0, S0, V0 = (tensors[f"{name}.{k}"] for k in _FACTORS)
        if lc["quantize"] == "nf4":
            from ..nn.qlinear import QSORSALinear

            cls = QSORSALinear
        else:
            cls = SORSALinear
        layer = cls.from_factors(
            linear, U0, S0, V0, trained=(U, S, V), alpha=config.get("alpha"),
            dropout=config.get("dropout", 0.0), residual_dtype=_DTYPE_NAMES[lc["residual_dtype"]], name=name,
        )
        replace_everywhere(base_model, linear, layer, aliases)
    _load_experts(base_model, config, tensors)
    restore_saved_modules(base_model, saved)
    return base_model


def _check_base_rows(base_model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                     source: PathLike, allow_mismatch: bool) -> None:
    """Every target weight against the adapter's initial factors (:func:`.base_match.check_base_matches`);
    with ``allow_mismatch`` only the meta-device check remains."""
    alpha = config.get("alpha")
    for name, lc in config["layers"].items():
        weight = linear_weight(base_model.get_submodule(name))  # out×in, for Conv1D too
        if allow_mismatch and weight.device.type != "meta":
            continue
        scale = 1.0 if alpha is None else float(alpha) / lc["rank"]
        U0, S0, V0 = (tensors[f"{name}.{k}"] for k in ("U0", "S0", "V0"))
        check_base_matches(name, weight, U0, S0, V0, scale, lc["quantize"], f"adapter {source}")
    for name, ec in config.get("experts", {}).items():  # each expert's matrix like a layer's
        module = base_model.get_submodule(name)
        scale = 1.0 if alpha is None else float(alpha) / ec["rank"]
        for attr in ec["projections"]:
            w = getattr(module, attr)
            w = w.mT if getattr(module, "is_transposed", False) else w  # experts × out × in
            if allow_mismatch and w.device.type != "meta":
                continue
            U0, S0, V0 = (tensors[f"{name}.{attr}.{k}"] for k in ("U0", "S0", "V0"))
            for e in range(w.shape[0]):
                check_base_matches(f"{name}.{attr}[expert {e}]", w[e], U0[e], S0[e], V0[e], scale,
                                   ec.get("quantize"), f"adapter {source}")


# ---------------------------------------------------------------------------------- experts
# A mixture-of-experts model's adapted experts modules are listed under the config key
# "experts": {module name: {"num_experts", "rank", "residual_dtype", "quantize" (null or "nf4";
# absent in files written before QSORSA experts: null), "projections":
# {"gate_up_proj": {"in_features", "out_features", "bias"}, "down_proj": {...}}}}, and their
# factor stacks stored as tensors "<module>.<projection>.<U|S|V|U0|S0|V0>" (E×out×r, E×r,
# E×in×r).  Loading rebuilds each SORSAExperts from the saved initial factors: no SVD.
def _add_experts(experts: dict[str, nn.Module], config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    if not experts:
        return
    cfg: dict[str, Any] = {}
    for name, module in experts.items():
        projections = {}
        for attr in expert_weight_names(module):
            layer = getattr(module, attr)
            for key, t in zip(_FACTORS, (layer.U, layer.S, layer.V, *layer.init_factors)):
                tensors[f"{name}.{attr}.{key}"] = full_tensor(t).detach().to("cpu").contiguous()
            projections[attr] = {"in_features": layer.in_features, "out_features": layer.out_features,
                                 "bias": layer.bias is not None}
        cfg[name] = {"num_experts": layer.num_experts, "rank": layer.rank,
                     "residual_dtype": _dtype_name(layer.residual.dtype), "quantize": layer.quantize,
                     "projections": projections}
    config["experts"] = cfg


def _check_experts_config(config: dict[str, Any], source: Path) -> None:
    experts = config.get("experts", {})
    if not isinstance(experts, dict):
        raise AdapterError(f"{source}: experts must be an object of experts module name → settings, got {experts!r}")
    for name, ec in experts.items():
        where = f"{source}: experts {name}"
        if not isinstance(ec, dict) or not isinstance(ec.get("projections"), dict) or not ec["projections"]:
            raise AdapterError(f"{where}: settings must be an object with a non-empty 'projections', got {ec!r}")
        for field in ("num_experts", "rank"):
            if not _is_int(ec.get(field)) or ec[field] <= 0:
                raise AdapterError(f"{where}: {field} must be a positive integer, got {ec.get(field)!r}")
        if ec.get("quantize") not in _QUANTIZE:
            raise AdapterError(f"{where}: quantize must be null or 'nf4', got {ec.get('quantize')!r}")
        if ec.get("residual_dtype") not in _DTYPE_NAMES:
            raise AdapterError(f"{where}: residual_dtype {ec.get('residual_dtype')!r} is not a known dtype; "
                               f"allowed: {', '.join(_DTYPE_NAMES)}")
        for attr, pc in ec["projections"].items():
            if not isinstance(pc, dict) or not all(_is_int(pc.get(f)) and pc[f] > 0
                                                   for f in ("in_features", "out_features")):
                raise AdapterError(f"{where}.{attr}: in_features and out_features must be positive integers, got {pc!r}")
            if ec["rank"] > min(pc["in_features"], pc["out_features"]):
                raise AdapterError(f"{where}.{attr}: rank {ec['rank']} exceeds min(in_features, out_features) = "
                                   f"{min(pc['in_features'], pc['out_features'])}")


def _check_experts_tensors(config: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path) -> set[str]:
    """Check each expert factor stack's presence, dtype, shape and finiteness; return their names."""
    dtype = _DTYPE_NAMES[config["adapter_dtype"]]
    names: set[str] = set()
    for name, ec in config.get("experts", {}).items():
        E, r = ec["num_experts"], ec["rank"]
        for attr, pc in ec["projections"].items():
            m, n = pc["out_features"], pc["in_features"]
            shapes = {"U": (E, m, r), "S": (E, r), "V": (E, n, r)}
            for key in _FACTORS:
                tname = f"{name}.{attr}.{key}"
                names.add(tname)
                t = tensors.get(tname)
                if t is None:
                    raise AdapterError(f"adapter weights {source} lack tensor {tname}")
                where = f"{source}: experts {name}.{attr}: tensor {key}"
                if t.dtype != dtype:
                    raise AdapterError(f"{where} has dtype {_dtype_name(t.dtype)} but the config says adapter_dtype "
                                       f"{config['adapter_dtype']}")
                if tuple(t.shape) != shapes[key.rstrip("0")]:
                    raise AdapterError(f"{where} has shape {tuple(t.shape)} but the config needs {shapes[key.rstrip('0')]}")
                if not bool(torch.isfinite(t).all()):
                    raise AdapterError(f"{where} has non-finite (NaN or inf) values")
    return names


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


def _load_experts(base_model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    for name, ec in config.get("experts", {}).items():
        factors = {}
        for attr in ec["projections"]:
            U, S, V, U0, S0, V0 = (tensors[f"{name}.{attr}.{k}"] for k in _FACTORS)
            factors[attr] = {"U0": U0, "S0": S0, "V0": V0, "trained": (U, S, V)}
        adapt_experts(base_model.get_submodule(name), ec["rank"], name=name, factors=factors,
                      quantize=ec.get("quantize"), alpha=config.get("alpha"), residual_dtype=_DTYPE_NAMES[ec["residual_dtype"]])
