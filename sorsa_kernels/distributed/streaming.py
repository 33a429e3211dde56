"""Load a causal LM for (Q)SORSA without ever holding its full-precision weights.

:func:`load_sorsa_streaming` builds the model with its parameters on the meta device, then
reads the checkpoint's safetensors files tensor by tensor (``safetensors.safe_open``),
decoder layer by decoder layer: every target ``nn.Linear`` is SVD-split and quantized to
NF4 as soon as its weight arrives, and the dense weight is dropped before the next one is
read.  At any moment a process holds the quantized layers built so far, the small
non-target tensors (norms, embeddings, head), and at most one dense target weight.

With a ``mesh`` the loader also shards as it goes: each decoder layer is ``fully_shard``-ed
right after it is built, so a rank keeps only its share of the finished layers; the
SVD/quantization work is spread over the ranks (layer ``i`` is computed by rank
``i mod world`` and broadcast to the others, which also guarantees that every rank holds
the same factors).

Example::

    >>> model = load_sorsa_streaming("Llama-2-70b-hf", 128, quantize="nf4", mesh=mesh,
    ...                              dtype=torch.bfloat16)
    >>> # already sharded: train, then save_adapter / fsdp.save_merged
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..adapters.experts import find_fused_experts
from ..adapters.plan import plan_sorsa, set_submodule
from ..adapters.targets import TargetSpec
from ..nn.factory import layer_class
from ..nn.init_spec import SORSAInit
from ..nn.linear import SORSALinear
from .fsdp import decoder_layers
from .meta import empty_model

__all__ = ["empty_model", "load_sorsa_streaming", "checkpoint_files"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_files(path: Union[str, os.PathLike]) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a ``save_pretrained`` folder (single file or sharded index)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(
        f"{path} has neither model.safetensors nor model.safetensors.index.json; "
        "the streaming loader reads safetensors checkpoints only"
    )


def _read(handle: Any, key: str) -> Tensor:
    """One tensor from an open safetensors file, on the CPU (tests wrap this to track reads)."""
    return handle.get_tensor(key)


class _Reader:
    """Open safetensors files on demand, read tensors by name."""

    def __init__(self, files: dict[str, Path], stack: contextlib.ExitStack) -> None:
        self.files = files
        self.stack = stack
        self.handles: dict[Path, Any] = {}

    def _handle(self, key: str) -> Any:
        from safetensors import safe_open

        if key not in self.files:
            raise KeyError(key)
        f = self.files[key]
        if f not in self.handles:
            self.handles[f] = self.stack.enter_context(safe_open(str(f), "pt"))
        return self.handles[f]

    def read(self, key: str, shape: Optional[tuple] = None, floating: bool = False) -> Tensor:
        """Tensor ``key``, checked against the ``shape`` the model expects (and, with
        ``floating``, to be floating point) before it is used."""
        if floating:
            self.dtype(key)
        t = _read(self._handle(key), key)
        check_stored_tensor(key, t, shape, self.files[key])
        return t

    def dtype(self, key: str) -> torch.dtype:
        stored = self._handle(key).get_slice(key).get_dtype()
        if stored not in _ST_DTYPES:
            raise ValueError(f"{self.files[key]}: tensor {key} is stored as {stored}; the streaming loader reads "
                             f"floating-point checkpoints ({', '.join(_ST_DTYPES)}); dequantize it first")
        return _ST_DTYPES[stored]


def check_stored_tensor(key: str, t: Tensor, shape: Optional[tuple], file: Path) -> None:
    """One-line ValueError when a checkpoint tensor does not have the shape the model's config gives
    (a transposed projection, a wrong-sized norm: either would broadcast or fail at forward)."""
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{file}: tensor {key} has shape {tuple(t.shape)} but the model's config needs "
                         f"{tuple(shape)}; the checkpoint does not match its config.json")


def _owned(prefix: str, key: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + ".")


def load_sorsa_streaming(
    path: Union[str, os.PathLike],
    rank: Union[int, SORSAInit],
    target_modules: TargetSpec = None,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    fsdp_kwargs: Optional[dict[str, Any]] = None,
    quant_report: Optional[str] = None,
    progress: bool = False,
    **init: Any,
) -> nn.Module:
    """Build a (Q)SORSA causal LM from a safetensors checkpoint, one weight at a time.

    The result equals ``apply_sorsa(AutoModelForCausalLM.from_pretrained(path), rank,
    target_modules, quantize=quantize, ...)`` (same factors, same NF4 bytes) but the dense
    weights are never all in memory: each target weight is read, split and quantized, then
    freed, before the next is read.  The layers are those of the same plan
    (:func:`~sorsa_kernels.adapters.plan.plan_sorsa`, made on the meta device before any
    tensor is read).  Mixture-of-experts models are refused in one line before any tensor is
    read: SORSA experts are not built here.

    Args:
        path: a ``save_pretrained`` folder (``config.json`` and safetensors weights).
        rank, target_modules, quant_report, **init: as :func:`~sorsa_kernels.apply_sorsa`
            (``rank`` or a :class:`~sorsa_kernels.nn.init_spec.SORSAInit`; ``quantize``
            defaults to ``"nf4"`` here, ``quantize=None`` gives dense SORSA layers;
            ``quant_report`` defaults to None here).
        dtype: cast every tensor to this dtype as it is read (default: as stored).
        device: where tensors are loaded and the SVD/quantization runs (default: the mesh's
            device type — the current CUDA device for ``"cuda"`` — else the CPU).
        mesh: a 1-D DeviceMesh: ``fully_shard`` each decoder layer as soon as it is built, the
            root at the end; layer ``i`` is built by mesh rank ``i mod world`` and broadcast.
            Every rank must call the loader.  Non-owner ranks get ``quant_report=None``.
        reshard_after_forward, fsdp_kwargs: passed to ``fully_shard`` (``fsdp_kwargs`` e.g.
            ``{"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)}``: the NF4 storage
            is integer-typed, so mixed precision casts only the adapters, bias and the rest).
        progress: a progress bar over the decoder layers (on mesh rank 0).

    Every parameter but the adapter factors is frozen, as ``apply_sorsa`` leaves them.
    """
    from transformers import AutoConfig

    if not isinstance(rank, SORSAInit):
        init.setdefault("quantize", "nf4")
    spec = SORSAInit.of(rank, **init)  # a bad option fails before anything is read
    cls = layer_class(spec.quantize)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a save_pretrained folder")
    files = checkpoint_files(path)
    config = AutoConfig.from_pretrained(path)
    model = empty_model(config, dtype=dtype)
    moe = find_fused_experts(model)
    if moe:
        raise ValueError(f"the streaming loader does not load mixture-of-experts models (routed experts {moe[0]}"
                         f"{' …' if len(moe) > 1 else ''}): it neither builds SORSA experts nor reads their checkpoint "
                         "layout; load the model whole and call apply_sorsa")
    plan = plan_sorsa(model, spec, target_modules, modules_to_save=[], quant_report=quant_report)
    targets = plan.linear

    world, me, group = 1, 0, None
    if mesh is not None:
        if mesh.ndim != 1:
            raise ValueError(f"the streaming loader shards over a 1-D mesh; got {mesh.ndim} dimensions")
        world, me, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    if device is None:
        device = torch.device("cpu")
        if mesh is not None and mesh.device_type != "cpu":
            device = torch.device(mesh.device_type, torch.accelerator.current_device_index())
    device = torch.device(device)

    try:
        blocks = decoder_layers(model)
    except ValueError:
        if mesh is not None:
            raise
        blocks = []
    names = {m: n for n, m in model.named_modules()}
    block_prefixes = [names[b] for b in blocks]
    all_keys = list(model.state_dict(keep_vars=True))
    target_set = set(targets)

    def in_target(key: str) -> bool:
        owner = key.rpartition(".")[0]
        return owner in target_set

    def load_tensor(reader: _Reader, key: str) -> None:
        if key not in files:
            return  # checked at the end (tied weights are filled by tie_weights)
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        slot = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
        t = reader.read(key, None if slot is None else tuple(slot.shape))
        if slot is not None and slot.is_floating_point() and not t.is_floating_point():
            raise ValueError(f"{files[key]}: tensor {key} is {t.dtype} but the model holds a floating-point "
                             "tensor there; the streaming loader reads floating-point checkpoints")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to(device)
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t

    def build_target(reader: _Reader, name: str, owner: int) -> None:
        meta = model.get_submodule(name)
        res_dtype = spec.residual_dtype or dtype or reader.dtype(f"{name}.weight")
        if owner == me:
            w = reader.read(f"{name}.weight", (meta.out_features, meta.in_features), floating=True)
            lin = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
            lin.weight = nn.Parameter(w.to(device, dtype or w.dtype), requires_grad=False)
            del w
            if meta.bias is not None:
                b = reader.read(f"{name}.bias", (meta.out_features,), floating=True)
                lin.bias = nn.Parameter(b.to(device, dtype or b.dtype), requires_grad=False)
            layer = plan.build_linear(name, lin, residual_dtype=res_dtype)
            del lin
        else:  # an empty layer of the same shapes; the owner's tensors arrive by broadcast
            fdt, r = spec.factor_dtype, spec.rank
            layer = cls(meta.in_features, meta.out_features, r, bias=meta.bias is not None, alpha=spec.alpha,
                        dropout=spec.dropout, residual_dtype=res_dtype, adapter_dtype=fdt, device=device)
            layer.init_factors = (torch.zeros(meta.out_features, r, dtype=fdt),
                                  torch.zeros(r, dtype=fdt), torch.zeros(meta.in_features, r, dtype=fdt))
        if world > 1:
            _broadcast_layer(layer, owner, group, device)
        set_submodule(model, name, layer)

    with contextlib.ExitStack() as stack:
        reader = _Reader(files, stack)
        done: set[str] = set()
        bar = tqdm(block_prefixes, desc="SORSA streaming load", unit="layer", disable=not progress or me != 0)
        for i, prefix in enumerate(bar):
            for key in all_keys:
                if _owned(prefix, key) and not in_target(key):
                    load_tensor(reader, key)
                    done.add(key)
            for name in targets:
                if _owned(prefix, name):
                    build_target(reader, name, i % world)
                    done.add(name)
            if mesh is not None:
                from torch.distributed.fsdp import fully_shard

                fully_shard(blocks[i], mesh=mesh, reshard_after_forward=reshard_after_forward, **(fsdp_kwargs or {}))
        for key in all_keys:
            if key not in done and not in_target(key):
                load_tensor(reader, key)
        for name in targets:
            if name not in done:
                build_target(reader, name, 0)

    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"the checkpoint at {path} lacks {', '.join(left[:3])}{' …' if len(left) > 3 else ''}")
    for mod in model.modules():
        for n, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[n] = b.to(device)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **(fsdp_kwargs or {}))
    return model.eval()


def _broadcast_layer(layer: SORSALinear, owner: int, group: Any, device: torch.device) -> None:
    """Send the owner's layer (state and initial factors) to every rank of ``group``, in place."""
    import torch.distributed as dist

    src = dist.get_global_rank(group, owner)
    tensors = [t for _, t in sorted(layer.state_dict(keep_vars=True).items())]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src, group=group)
        init = []
        for t in layer.init_factors:
            buf = t.to(device)
            dist.broadcast(buf, src=src, group=group)
            init.append(buf.to("cpu"))
    layer.init_factors = tuple(init)
