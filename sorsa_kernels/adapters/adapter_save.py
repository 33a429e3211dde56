"""Saving an adapter: collect each adapter layer's tensors (as its kind names them), then publish.

Publication protocol (the format is in :mod:`.adapter_format`): ``adapter.safetensors`` carries
the config in its header, and ``adapter_config.json`` is a readable copy.  A save never leaves
a disagreeing copy behind: both files are written to temporaries first, then the old JSON is
removed, the weights published, and the new JSON published; a kill at any point leaves
either the old or the new adapter, with the JSON copy matching it or absent.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..dtensor import full_tensor, is_sharded, process_rank
from ..nn.kinds import DEFAULT_METHOD, kind_of
from .adapter_format import (CONFIG_NAME, FORMAT, FORMAT_VERSION, METADATA_KEY, WEIGHTS_NAME, AdapterError, PathLike,
                             dtype_name, saved_tensor_name, validate_adapter)
from .atomic import atomic_file
from .experts import adapted_experts, expert_weight_names
from .modules_to_save import saved_state
from .surgery import sorsa_layers

__all__ = ["save_adapter", "adapter_state"]

#: Test hook: called with the name of each publication step of :func:`save_adapter`
#: ("written", "config_removed", "weights_published"); tests kill the process there.
_between_steps: Optional[Callable[[str], None]] = None


def _step(name: str) -> None:
    if _between_steps is not None:
        _between_steps(name)


def _put(tensors: dict[str, torch.Tensor], prefix: str, layer: nn.Module, where: str) -> dict[str, Any]:
    """Store ``layer``'s tensors under ``prefix`` (as its kind names them); returns its config entries
    beyond sizes: ``quantize`` and, for a kind other than SORSA, ``kind``."""
    kind = kind_of(layer)
    try:
        state = kind.state(layer)
    except ValueError as e:
        raise ValueError(f"layer {where}: {e}") from None
    for key, t in state.items():
        tensors[f"{prefix}.{key}"] = full_tensor(t).detach().to("cpu").contiguous()
    return {"quantize": layer.quantize, **({"kind": kind.method} if kind.method != DEFAULT_METHOD else {})}


def adapter_state(model: nn.Module, base_model_name_or_path: Optional[str] = None):
    """``(config, tensors, sharded)`` of ``model``'s adapter: what :func:`save_adapter` writes (CPU tensors).

    Collective on a sharded model (each tensor is gathered)."""
    layers = sorsa_layers(model)
    experts = adapted_experts(model)
    if not layers and not experts:
        raise ValueError("the model has no SORSA layers; nothing to save")
    tensors: dict[str, torch.Tensor] = {}
    layer_cfg: dict[str, Any] = {}
    for name, layer in layers.items():
        layer_cfg[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "rank": layer.rank,
            "bias": layer.bias is not None,
            "residual_dtype": dtype_name(layer.residual_dtype),
            **_put(tensors, name, layer, name),
        }
        if layer.fan_in_fan_out:  # written only when set: adapters of nn.Linear layers are unchanged
            layer_cfg[name]["fan_in_fan_out"] = True
    projections = [getattr(m, a) for m in experts.values() for a in expert_weight_names(m)]
    sharded = any(is_sharded(layer.U) for layer in (*layers.values(), *projections))
    first = next(iter(layers.values())) if layers else projections[0]
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sorsa_kernels_version": __version__,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None),
        "alpha": first.alpha,
        "dropout": getattr(first, "dropout_p", 0.0),
        "adapter_dtype": dtype_name(first.U.dtype),
        "target_modules": list(layers),
        "layers": layer_cfg,
    }
    model_class = next((c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers.")), None)
    if model_class is not None:  # the class merge/export-lora/analyze load the base as (FSDP's wrapper skipped)
        config["model_class"] = model_class
    if experts:
        config["experts"] = {name: _experts_entry(tensors, name, module) for name, module in experts.items()}
    state = saved_state(model)
    if state:
        config["modules_to_save"] = {name: sorted(sd) for name, sd in state.items()}
        for name, sd in state.items():
            for key, t in sd.items():
                tensors[saved_tensor_name(name, key)] = full_tensor(t).detach().to("cpu").contiguous()
    return config, tensors, sharded


def _experts_entry(tensors: dict[str, torch.Tensor], name: str, module: nn.Module) -> dict[str, Any]:
    """One experts module's config entry; stores each projection's stacks as ``<name>.<projection>.<key>``."""
    projections, entry = {}, {}
    for attr in expert_weight_names(module):
        layer = getattr(module, attr)
        entry = _put(tensors, f"{name}.{attr}", layer, f"{name}.{attr}")
        projections[attr] = {"in_features": layer.in_features, "out_features": layer.out_features,
                             "bias": layer.bias is not None}
    return {"num_experts": layer.num_experts, "rank": layer.rank, "residual_dtype": dtype_name(layer.residual.dtype),
            **entry, "projections": projections}


def save_adapter(
    model: nn.Module, directory: PathLike, *, base_model_name_or_path: Optional[str] = None
) -> Path:
    """Save every adapter layer's trained and initial factors to ``directory``.

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
    config, tensors, sharded = adapter_state(model, base_model_name_or_path)  # collective when sharded
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
