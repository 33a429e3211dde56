"""Adapter files: ``adapter_config.json`` + ``adapter.safetensors``.

The file holds, for every adapted layer, the trained factors ``U, S, V`` and the initial
factors ``U0, S0, V0``.  Loading rebuilds the training-time model on the untouched base
with no SVD: the residual is recomputed as ``W0 − scale·U0·diag(S0)·V0ᵀ`` by the same
float32 computation as at initialization (and re-quantized deterministically for QSORSA).
Writes are atomic (temporary files, then rename); loading never unpickles.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..nn.linear import SORSALinear
from .fsdp import full_tensor, is_sharded, process_rank
from .surgery import _set_submodule, sorsa_layers

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_adapter", "load_adapter", "read_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "sorsa-kernels/adapter"
FORMAT_VERSION = 1
_FACTORS = ("U", "S", "V", "U0", "S0", "V0")

PathLike = Union[str, os.PathLike]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _atomic_write(path: Path, write) -> Path:
    """Write through ``write(tmp_path)`` into a temp file beside ``path``; return the temp path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def save_adapter(
    model: nn.Module, directory: PathLike, *, base_model_name_or_path: Optional[str] = None
) -> Path:
    """Save every SORSA layer's trained and initial factors to ``directory``.

    Both files are first written to temporary files in ``directory`` and then renamed
    over the old ones, so a save that fails leaves the previous adapter intact.

    On a model sharded by FSDP2 (``fully_shard``) every rank must call it: the factors are
    gathered (all-gather, one tensor at a time) and rank 0 writes the files a
    single-process run writes.

    Example::

        >>> save_adapter(model, "out/adapter")
        >>> model = load_adapter(AutoModelForCausalLM.from_pretrained(base), "out/adapter")
    """
    layers = sorsa_layers(model)
    if not layers:
        raise ValueError("the model has no SORSA layers; nothing to save")
    directory = Path(directory)
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
    if sharded and process_rank() != 0:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    first = next(iter(layers.values()))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sorsa_kernels_version": __version__,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None),
        "alpha": first.alpha,
        "dropout": first.dropout_p,
        "adapter_dtype": _dtype_name(first.U.dtype),
        "target_modules": list(layers),
        "layers": layer_cfg,
    }
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    tmp_w = _atomic_write(w_path, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
    try:
        tmp_c = _atomic_write(cfg_path, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    except BaseException:
        os.unlink(tmp_w)
        raise
    os.replace(tmp_w, w_path)
    os.replace(tmp_c, cfg_path)
    return directory


def read_adapter(directory: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate an adapter folder; returns ``(config, tensors)`` (CPU tensors)."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"adapter file {p} does not exist")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"adapter config {cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a sorsa-kernels adapter config (missing format={FORMAT!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path} has format_version {config['format_version']}; this sorsa-kernels reads up to {FORMAT_VERSION}"
        )
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"adapter weights {w_path} are corrupt or truncated: {e}") from None
    for name in config.get("layers", {}):
        for key in _FACTORS:
            if f"{name}.{key}" not in tensors:
                raise ValueError(f"adapter weights {w_path} lack tensor {name}.{key}")
    return config, tensors


def load_adapter(base_model: nn.Module, directory: PathLike) -> nn.Module:
    """Rebuild, in place on the untouched ``base_model``, exactly the model that was saved.

    No SVD runs: each target ``nn.Linear`` becomes a SORSA layer whose residual is
    recomputed from its weight and the saved initial factors, and whose U, S, V are the
    saved trained factors.  Raises a ``ValueError`` naming the layer on any mismatch.

    Example::

        >>> model = load_adapter(AutoModelForCausalLM.from_pretrained(base), "out/adapter")
    """
    config, tensors = read_adapter(directory)
    layers = config["layers"]
    for name, lc in layers.items():  # validate everything before changing the model
        try:
            linear = base_model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapter targets {name}, which the base model does not have") from None
        if isinstance(linear, SORSALinear):
            raise ValueError(f"layer {name} is already a SORSA layer; load the adapter on an untouched base model")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"the adapter targets {name}, which is a {type(linear).__name__}, not nn.Linear")
        expected = (lc["out_features"], lc["in_features"])
        if tuple(linear.weight.shape) != expected:
            raise ValueError(
                f"layer {name} has weight shape {tuple(linear.weight.shape)} but the adapter was trained on {expected}"
            )
    for p in base_model.parameters():
        p.requires_grad_(False)
    adapter_dtype = getattr(torch, config["adapter_dtype"])
    for name, lc in layers.items():
        linear = base_model.get_submodule(name)
        U, S, V, U0, S0, V0 = (tensors[f"{name}.{k}"].to(adapter_dtype) for k in _FACTORS)
        if lc.get("quantize") == "nf4":
            from ..nn.qlinear import QSORSALinear

            cls = QSORSALinear
        elif lc.get("quantize") is None:
            cls = SORSALinear
        else:
            raise ValueError(f"layer {name} uses unknown quantization {lc['quantize']!r}")
        layer = cls.from_factors(
            linear, U0, S0, V0, trained=(U, S, V), alpha=config.get("alpha"),
            dropout=config.get("dropout", 0.0), residual_dtype=getattr(torch, lc["residual_dtype"]), name=name,
        )
        _set_submodule(base_model, name, layer)
    return base_model
