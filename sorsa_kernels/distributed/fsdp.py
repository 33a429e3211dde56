"""SORSA and QSORSA under FSDP2 (``torch.distributed.fsdp.fully_shard``).

``QSORSALinear`` holds its packed NF4 bytes, absmax codes and nested absmax as frozen
parameters, so ``fully_shard`` shards them on dim 0 together with the fp32 adapters: each
rank keeps ``1/world`` of the packed residual, FSDP all-gathers one decoder layer's storage
before its forward (and again before its backward when ``reshard_after_forward``), and
the fused kernel dequantizes the gathered bytes tile by tile.  Nothing dense is ever built
for more than the layer being computed.  Parameters of several dtypes in one layer
(uint8 bytes, int32-cast absmax scales, fp32 adapters) are gathered in one collective:
FSDP2 (torch ≥ 2.6) falls back to a uint8 all-gather buffer and views each piece back.
The small constant tables (``nf4_code``, ``nf4_nested_code``, ``nf4_offset``) are
buffers and stay replicated.  The routed experts of a MoE model (``SORSAExperts`` /
``QSORSAExperts``) hold their stacks (packed NF4 bytes E×P, absmax, nested absmax, U, S, V)
as parameters too: ``fully_shard`` splits them on the expert dimension.

The API path::

    >>> model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    >>> apply_sorsa(model, 128, quantize="nf4")
    >>> shard_model(model, mesh)          # fully_shard on every decoder layer, then the root
    >>> ...train; add_regularizer_grad works on the sharded factors...
    >>> save_adapter(model, "out/adapter")      # every rank calls; rank 0 writes
    >>> save_merged(model, "out/merged")        # idem, one layer gathered at a time

A loader that never holds the full-precision model is
:func:`sorsa_kernels.distributed.streaming.load_sorsa_streaming`.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..nn.experts import SORSAExperts
from ..nn.kinds import kind_of
from ..nn.linear import SORSALinear
from ..dtensor import full_tensor, is_sharded, local, process_rank
from ..adapters.experts import adapted_experts, expert_weight_names
from ..adapters.surgery import sorsa_layers

__all__ = [
    "decoder_layers",
    "shard_model",
    "is_sharded",
    "process_rank",
    "full_tensor",
    "unsharded",
    "local_nbytes",
    "gathered_layer",
    "gathered_experts",
    "merged_state_dict",
    "save_merged",
]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: modules whose class is in ``model._no_split_modules``
    (a transformers model's decoder layers), in model order.

    Raises a ValueError if the model names none (pass ``blocks=`` to :func:`shard_model`).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if _original_class(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} declares no _no_split_modules (decoder layers); pass blocks=[...] explicitly"
        )
    return blocks


def shard_model(
    model: nn.Module,
    mesh: Any = None,
    *,
    blocks: Optional[Sequence[nn.Module]] = None,
    reshard_after_forward: bool = True,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """``fully_shard`` each block (default :func:`decoder_layers`), then the root; returns ``model``.

    ``mesh`` is a 1-D ``DeviceMesh`` (default: FSDP2's, over the default process group).
    Extra keyword arguments (``mp_policy``, ``offload_policy``) go to ``fully_shard``.

    Example::

        >>> mesh = init_device_mesh("cuda", (world,))
        >>> shard_model(apply_sorsa(model, 128, quantize="nf4"), mesh)
    """
    from torch.distributed.fsdp import fully_shard

    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, **fully_shard_kwargs)
    for block in blocks if blocks is not None else decoder_layers(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """All-gather every FSDP2 module's parameters for the body, then re-shard.

    Every rank must enter it.  Inside, parameters are plain tensors, so ``layer.residual``,
    ``layer.nf4()``, ``merge_sorsa`` work — at the cost of the whole (quantized) model on
    each rank; to save, prefer :func:`save_merged` and ``save_adapter`` (one layer at a time).
    """
    mods = _fsdp_modules(model)
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()


def local_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds for the SORSA layers, from the local shards of their tensors.

    Keys: ``residual`` (packed NF4 bytes, or the dense residual of a SORSALinear),
    ``quant_state`` (absmax codes and nested absmax: the per-block state), ``quant_tables``
    (the replicated code tables and offset), ``adapters`` (U, S, V and any further trainable tensors
    of the layer's kind), ``bias``.

    Example::

        >>> local_nbytes(model)["residual"]     # halves from world size 1 to 2
    """
    out = dict(residual=0, quant_state=0, quant_tables=0, adapters=0, bias=0)

    def nbytes(t: Optional[Tensor]) -> int:
        if t is None:
            return 0
        t = local(t)
        return t.numel() * t.element_size()

    experts = [getattr(m, a) for m in adapted_experts(model).values() for a in expert_weight_names(m)]
    for layer in [*sorsa_layers(model).values(), *experts]:
        kind = kind_of(layer)
        if kind.quantize == "nf4":
            out["residual"] += nbytes(layer.nf4_packed)
            out["quant_state"] += nbytes(layer.nf4_absmax) + nbytes(layer.nf4_nested_absmax)
            out["quant_tables"] += sum(nbytes(getattr(layer, n)) for n in ("nf4_nested_code", "nf4_offset", "nf4_code"))
        else:
            out["residual"] += nbytes(layer.dense_residual() if kind.experts else layer.residual)
        out["adapters"] += sum(nbytes(getattr(layer, k)) for k in (*kind.trained, *kind.extra))
        out["bias"] += nbytes(layer.bias)
    return out


def _layer_kwargs(layer: SORSALinear) -> dict[str, Any]:
    return dict(
        bias=layer.bias is not None, alpha=layer.alpha, dropout=layer.dropout_p,
        residual_dtype=layer.residual_dtype, adapter_dtype=layer.U.dtype,
    )


def gathered_layer(layer: SORSALinear, *, all_ranks: bool = False) -> Optional[SORSALinear]:
    """A plain (unsharded) CPU copy of one SORSA layer, gathered from its shards.

    Every rank must call it (each tensor is all-gathered).  Returns the copy on rank 0
    (on every rank with ``all_ranks=True``) and None elsewhere; the copy's ``merge()``,
    ``residual``, ``nf4()`` then work as on a single-process layer.
    """
    state = {k: full_tensor(v).detach().to("cpu") for k, v in layer.state_dict().items()}
    if not all_ranks and process_rank() != 0:
        return None
    plain = type(layer)(layer.in_features, layer.out_features, layer.rank, device="meta", **_layer_kwargs(layer))
    plain.load_state_dict(state, assign=True)
    if getattr(layer, "compute_dtype", None) is not None:
        plain.compute_dtype = layer.compute_dtype
    plain.init_factors = layer.init_factors
    plain.quant_report = getattr(layer, "quant_report", None)
    plain.train(layer.training)
    return plain


def gathered_experts(layer: SORSAExperts, *, all_ranks: bool = False) -> Optional[SORSAExperts]:
    """A plain (unsharded) CPU copy of one SORSA experts projection, gathered from its shards.

    Every rank must call it; the copy comes back on rank 0 (every rank with ``all_ranks``).
    """
    state = {k: full_tensor(v).detach().to("cpu") for k, v in layer.state_dict().items()}
    if not all_ranks and process_rank() != 0:
        return None
    plain = type(layer)(layer.num_experts, layer.in_features, layer.out_features, layer.rank,
                        bias=layer.bias is not None, alpha=layer.alpha, residual_dtype=layer.residual.dtype,
                        adapter_dtype=layer.U.dtype, device="meta")
    plain.load_state_dict(state, assign=True)
    plain.init_factors = layer.init_factors
    return plain


def merged_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """The state dict ``merge_sorsa(model).state_dict()`` would have, on the CPU of rank 0.

    Works on a sharded model (every rank must call it; the others get ``{}``) and on a
    plain one.  SORSA layers are gathered and merged one at a time (``QSORSALinear.merge``:
    ``deq(Q) + scale·U·diag(S)·Vᵀ`` in float32, cast to ``dtype``, default the compute
    dtype), so a rank never holds more than one layer's full storage beyond its shards;
    SORSA experts likewise, one projection's stack at a time, back into the fused 3-D parameters.
    """
    layers = sorsa_layers(model)
    experts = adapted_experts(model)
    if not layers and not experts:
        raise ValueError("the model has no SORSA layers to merge")
    main = process_rank() == 0
    out: dict[str, Tensor] = {}
    owners = set(layers) | {f"{n}.{a}" for n, m in experts.items() for a in expert_weight_names(m)}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        while owner and owner not in owners:
            owner = owner.rpartition(".")[0]
        if owner:
            continue
        full = full_tensor(t).detach()
        if main:
            out[key] = full.to("cpu").clone()
    for name, layer in layers.items():
        plain = gathered_layer(layer)
        if main:
            lin = plain.merge(dtype)
            out[f"{name}.weight"] = lin.weight.detach()
            if lin.bias is not None:
                out[f"{name}.bias"] = lin.bias.detach()
    for name, module in experts.items():
        for attr in expert_weight_names(module):
            plain = gathered_experts(getattr(module, attr))
            if main:
                w = plain.merged_weight(dtype)
                out[f"{name}.{attr}"] = w.mT.contiguous() if getattr(module, "is_transposed", False) else w
                if plain.bias is not None:
                    out[f"{name}.{attr}_bias"] = plain.bias.detach().to(w.dtype)
    return out


def _original_class(model: nn.Module) -> type:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def save_merged(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    dtype: Optional[torch.dtype] = None,
    *,
    tokenizer: Any = None,
) -> Optional[Path]:
    """``merge_sorsa(model).save_pretrained(directory)`` for a (sharded) transformers model.

    Every rank must call it; rank 0 gathers the merged weights layer by layer on its CPU
    (:func:`merged_state_dict`), puts them into a fresh model of the same class built on the
    meta device, and writes it with ``save_pretrained`` (and the tokenizer, if given) — the
    files a single-process ``merge_sorsa`` + ``save_pretrained`` writes.  Returns the folder
    on rank 0, None elsewhere.  The trained model is left as it was.
    """
    from .meta import empty_model

    sd = merged_state_dict(model, dtype)
    if process_rank() != 0:
        return None
    cls = _original_class(model)
    fresh = empty_model(copy.deepcopy(model.config), cls=cls)  # save_pretrained may edit its config
    fresh.load_state_dict(sd, strict=False, assign=True)
    missing = [n for n, p in fresh.named_parameters() if p.is_meta]
    if missing and getattr(model.config, "tie_word_embeddings", False) and hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
        missing = [n for n, p in fresh.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the merged state lacks {missing[:3]}{'…' if len(missing) > 3 else ''}")
    directory = Path(directory)
    fresh.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
