"""The adapter file format: one self-describing ``adapter.safetensors`` (+ a readable ``adapter_config.json``).

The file holds, for every adapted layer, the tensors its adapter kind names
(:class:`~sorsa_kernels.nn.kinds.AdapterKind`): for SORSA the trained factors ``U, S, V`` and
the initial factors ``U0, S0, V0``, stored as ``<layer>.<name>``.  Loading rebuilds the
training-time model on the untouched base with no SVD: the residual is recomputed as
``W0 − scale·U0·diag(S0)·V0ᵀ`` by the same float32 computation as at initialization (and
re-quantized deterministically for QSORSA).  Loading never unpickles.

Format decision: the config travels **inside** the weights file, as the safetensors header
metadata entry ``"sorsa_config"`` (a JSON string).  Weights and config are then one file,
published by one ``os.replace`` (:mod:`.adapter_save`), so no crash can pair new weights with
an old config.  Publishing the pair by renaming a whole folder was the alternative; it was
not chosen because ``save_adapter`` is given a folder that may hold other things (a run's
output folder, the current folder), which a folder swap would replace, and because a single
file can be copied, uploaded or passed to ``load_adapter`` on its own without losing its config.
``adapter_config.json`` is still written beside it, as a copy for people and tools that read
JSON; the loader trusts the embedded config and rejects a JSON copy that disagrees.

Config: ``format``, ``format_version``, ``adapter_dtype``, ``alpha``, ``dropout``, and
``layers``: ``{name: {in_features, out_features, rank, bias, residual_dtype, quantize (null or
"nf4"), fan_in_fan_out (only when true), kind (only for a kind other than "sorsa")}}``.  A
mixture-of-experts model's adapted experts are under ``experts``: ``{module: {num_experts,
rank, residual_dtype, quantize, projections: {gate_up_proj: {in_features, out_features,
bias}, down_proj: {...}}}}`` with tensors ``<module>.<projection>.<name>`` (a leading expert
dimension).  Modules kept as trainable copies are ``modules_to_save: {name: [state keys]}``
with tensors ``modules_to_save/<name>.<key>``.

Every field is validated against the tensors (rank and shapes, floating dtypes equal to
``adapter_dtype``, finiteness); every problem raises :class:`AdapterError` (a ``ValueError``)
naming the file, the layer and the field.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Union

import torch

from ..nn.checks import SUPPORTED_DTYPES
from ..nn.kinds import DEFAULT_METHOD, AdapterKind, find_kind, registered_kinds

__all__ = ["AdapterError", "CONFIG_NAME", "WEIGHTS_NAME", "METADATA_KEY", "FORMAT", "FORMAT_VERSION",
           "DTYPE_NAMES", "PathLike", "dtype_name", "validate_adapter", "check_config", "check_tensors",
           "layer_kind", "saved_tensor_name", "saved_state_of"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
#: The safetensors metadata entry that holds the adapter config (a JSON string).
METADATA_KEY = "sorsa_config"
FORMAT = "sorsa-kernels/adapter"
FORMAT_VERSION = 1
DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in SUPPORTED_DTYPES}

PathLike = Union[str, os.PathLike]


class AdapterError(ValueError):
    """An adapter file that cannot be loaded as it is; the message names file, layer and field."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``, as the config spells dtypes."""
    return str(dtype).replace("torch.", "")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def layer_kind(entry: dict[str, Any], experts: bool, where: str) -> AdapterKind:
    """The registered kind a config entry (a layer's or an experts module's) describes; AdapterError otherwise."""
    method = entry.get("kind", DEFAULT_METHOD)
    quantize = entry.get("quantize")
    if not isinstance(method, str) or not any(k.method == method and k.experts == experts for k in registered_kinds()):
        known = sorted({k.method for k in registered_kinds() if k.experts == experts})
        raise AdapterError(f"{where}: kind {method!r} is not registered; registered: {', '.join(map(repr, known))} "
                           "(import the module that registers it before loading)")
    try:
        return find_kind(method, quantize, experts)
    except (ValueError, TypeError):
        allowed = [k.quantize for k in registered_kinds() if k.method == method and k.experts == experts]
        text = ", ".join(["null"] * (None in allowed) + sorted(repr(q) for q in allowed if q is not None))
        raise AdapterError(f"{where}: quantize {quantize!r} is unknown; allowed: {text}") from None


def _check_dtype_field(value: Any, where: str, field: str) -> None:
    if value not in DTYPE_NAMES:
        raise AdapterError(f"{where}: {field} {value!r} is not a known dtype; allowed: {', '.join(DTYPE_NAMES)}")


def check_config(config: Any, source: Path) -> None:
    """Raise :class:`AdapterError` unless ``config`` is a well-formed adapter config."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterError(f"{source} is not a sorsa-kernels adapter config (missing format={FORMAT!r})")
    version = config.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise AdapterError(
            f"{source}: format_version {version!r} is unknown; this sorsa-kernels reads versions 1 to {FORMAT_VERSION}"
        )
    _check_dtype_field(config.get("adapter_dtype"), str(source), "adapter_dtype")
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
        _check_sizes(lc, where, lc.get("rank"))
        if not isinstance(lc.get("bias"), bool):
            raise AdapterError(f"{where}: bias must be true or false, got {lc.get('bias')!r}")
        _check_dtype_field(lc.get("residual_dtype"), where, "residual_dtype")
        layer_kind(lc, False, where)
        if not isinstance(lc.get("fan_in_fan_out", False), bool):
            raise AdapterError(f"{where}: fan_in_fan_out must be true or false, got {lc.get('fan_in_fan_out')!r}")
    _check_experts_config(config, source)
    _check_saved_config(config, source)


def _check_sizes(entry: Any, where: str, rank: Any) -> None:
    """``in_features``, ``out_features`` (and ``rank``) positive integers, ``rank ≤ min(in, out)``."""
    for field, v in (("in_features", entry.get("in_features")), ("out_features", entry.get("out_features")),
                     ("rank", rank)):
        if not _is_int(v) or v <= 0:
            raise AdapterError(f"{where}: {field} must be a positive integer, got {v!r}")
    if rank > min(entry["in_features"], entry["out_features"]):
        raise AdapterError(f"{where}: rank {rank} exceeds min(in_features, out_features) = "
                           f"{min(entry['in_features'], entry['out_features'])}")


def _check_experts_config(config: dict[str, Any], source: Path) -> None:
    experts = config.get("experts", {})
    if not isinstance(experts, dict):
        raise AdapterError(f"{source}: experts must be an object of experts module name → settings, got {experts!r}")
    for name, ec in experts.items():
        where = f"{source}: experts {name}"
        if not isinstance(ec, dict) or not isinstance(ec.get("projections"), dict) or not ec["projections"]:
            raise AdapterError(f"{where}: settings must be an object with a non-empty 'projections', got {ec!r}")
        if not _is_int(ec.get("num_experts")) or ec["num_experts"] <= 0:
            raise AdapterError(f"{where}: num_experts must be a positive integer, got {ec.get('num_experts')!r}")
        layer_kind(ec, True, where)
        _check_dtype_field(ec.get("residual_dtype"), where, "residual_dtype")
        for attr, pc in ec["projections"].items():
            if not isinstance(pc, dict):
                raise AdapterError(f"{where}.{attr}: settings must be an object, got {pc!r}")
            _check_sizes(pc, f"{where}.{attr}", ec.get("rank"))


def _check_saved_config(config: dict[str, Any], source: Path) -> None:
    """``modules_to_save``, when present, is ``{module name: [state keys]}``."""
    saved = config.get("modules_to_save", {})
    if not isinstance(saved, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and v and all(isinstance(x, str) for x in v) for k, v in saved.items()
    ):
        raise AdapterError(
            f"{source}: modules_to_save must be an object of module name → non-empty list of state keys, got {saved!r}"
        )


def _check_stack(prefix: str, sizes: dict[str, int], kind: AdapterKind, tensors: dict[str, torch.Tensor],
                 config: dict[str, Any], where: str, source: Path) -> set[str]:
    """One layer's (or experts projection's) tensors: present, floating in ``adapter_dtype``, shaped, finite."""
    shapes = kind.shapes(sizes["out_features"], sizes["in_features"], sizes["rank"], sizes.get("num_experts"))
    text = ", ".join(f"{k}={v}" for k, v in sizes.items())
    dtype = DTYPE_NAMES[config["adapter_dtype"]]
    names = set()
    for key, want in shapes.items():
        tname = f"{prefix}.{key}"
        names.add(tname)
        t = tensors.get(tname)
        if t is None:
            raise AdapterError(f"adapter weights {source} lack tensor {tname}")
        at = f"{source}: {where}: tensor {key}"
        if not t.is_floating_point():
            raise AdapterError(f"{at} has dtype {dtype_name(t.dtype)}; adapter factors must be floating point "
                               f"(the config says adapter_dtype {config['adapter_dtype']})")
        if t.dtype != dtype:
            raise AdapterError(f"{at} has dtype {dtype_name(t.dtype)} but the config says adapter_dtype "
                               f"{config['adapter_dtype']}")
        if tuple(t.shape) != want:
            raise AdapterError(f"{at} has shape {tuple(t.shape)} but the config ({text}) needs {want}")
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            raise AdapterError(f"{at} has {bad} non-finite (NaN or inf) values")
    return names


def check_tensors(config: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Raise :class:`AdapterError` unless ``tensors`` are exactly the ones ``config`` describes."""
    expected: set[str] = set()
    for name, lc in config["layers"].items():
        sizes = {k: lc[k] for k in ("out_features", "in_features", "rank")}
        expected |= _check_stack(name, sizes, layer_kind(lc, False, str(source)), tensors, config, f"layer {name}",
                                 source)
    for name, ec in config.get("experts", {}).items():
        kind = layer_kind(ec, True, str(source))
        for attr, pc in ec["projections"].items():
            sizes = {"num_experts": ec["num_experts"], "out_features": pc["out_features"],
                     "in_features": pc["in_features"], "rank": ec["rank"]}
            expected |= _check_stack(f"{name}.{attr}", sizes, kind, tensors, config, f"experts {name}.{attr}", source)
    for name, keys in config.get("modules_to_save", {}).items():
        for key in keys:
            tname = saved_tensor_name(name, key)
            expected.add(tname)
            if tname not in tensors:
                raise AdapterError(f"adapter weights {source} lack tensor {tname}")
            if tensors[tname].is_floating_point() and not bool(torch.isfinite(tensors[tname]).all()):
                raise AdapterError(f"{source}: saved module tensor {tname} has non-finite (NaN or inf) values")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise AdapterError(
            f"adapter weights {source} hold tensors no layer in the config uses: {', '.join(extra[:5])}"
            + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        )


def validate_adapter(config: Any, tensors: dict[str, torch.Tensor], source: PathLike = "<adapter>") -> None:
    """Check an adapter config and its tensors against each other; raise :class:`AdapterError`.

    Checks the format and version, ``adapter_dtype``, ``alpha``, ``dropout``, that
    ``layers`` is present, and for every layer its sizes, rank, bias flag, dtypes, kind and
    quantization, and that the tensors its kind names exist with the shapes the rank and
    sizes give (``U``: out×r, ``S``: r, ``V``: in×r, same for ``U0, S0, V0``), in
    ``adapter_dtype`` and finite.  ``source`` names the file in messages.

    Example::

        >>> config, tensors = read_adapter("out/adapter")   # already validated
        >>> validate_adapter(config, tensors, "out/adapter")
    """
    source = Path(source)
    check_config(config, source)
    check_tensors(config, tensors, source)


def saved_tensor_name(module: str, key: str) -> str:
    """The tensor name of a saved module's state entry (``/`` never occurs in a module name)."""
    return f"modules_to_save/{module}.{key}"


def saved_state_of(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {state key: tensor}}`` of the adapter's saved modules (empty when it has none)."""
    return {name: {k: tensors[saved_tensor_name(name, k)] for k in keys}
            for name, keys in config.get("modules_to_save", {}).items()}
