"""Bytes a process holds for a model's tensors, by category: the one walk the memory plan and
the memory benchmarks share.

:func:`bytes_by_category` classifies every parameter and buffer of the given layer types
(frozen tensors by their name, trainable ones as adapters, each with its gradient and its
optimizer state) and counts everything else as the rest of the model.  Sizes are those of
the tensor this rank holds: the local shard of an FSDP2 ``DTensor`` (:func:`local_nbytes`),
so a model sharded over a fake process group on the meta device gives per-GPU bytes
without allocating anything.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["local_nbytes", "bytes_by_category", "adamw_state_bytes", "FROZEN_NAMES", "QUANT_STATE_NAMES"]

#: Names of the frozen weight storages: a dense residual, NF4 packed codes, a plain ``weight``.
FROZEN_NAMES = frozenset({"residual", "nf4_packed", "weight", "base_weight", "bias"})
#: Names of the NF4 quantization state: absmax codes, nested absmax, offsets, code tables.
QUANT_STATE_NAMES = frozenset({"nf4_absmax", "nf4_nested_absmax", "absmax", "nested_absmax", "nf4_code",
                               "nf4_nested_code", "nf4_offset", "code", "nested_code", "offset"})


def local_nbytes(t: torch.Tensor) -> int:
    """Bytes of the tensor this rank holds (its local shard for a DTensor)."""
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def adamw_state_bytes(t: torch.Tensor) -> int:
    """``torch.optim.AdamW``'s ``exp_avg`` and ``exp_avg_sq`` for one trainable tensor (its dtype)."""
    return 2 * local_nbytes(t)


def bytes_by_category(model: nn.Module, layer_types: tuple, frozen: dict[str, set[str]],
                      optimizer_bytes: Optional[Callable[[torch.Tensor], int]] = None,
                      nbytes: Optional[Callable[[torch.Tensor, bool], int]] = None) -> dict[str, int]:
    """Bytes rank 0 holds in the ``layer_types`` modules of ``model``, by category.

    Each frozen tensor goes under the category of ``frozen`` whose name set holds its name; each
    trainable one counts as ``adapters`` + its gradient shard (``grads``, same dtype) + its
    optimizer state (``adamw``: ``optimizer_bytes(t)``, default AdamW's m and v in the tensor's
    dtype); every other tensor of the model is ``rest_of_model``.  ``nbytes(t, is_parameter)`` sizes a
    tensor (default :func:`local_nbytes`: the shard a sharded model holds; the memory plan passes the
    shard FSDP2 would make of an unsharded meta model).  A frozen tensor of those layers
    whose name is in no set raises an AssertionError (a new storage must be classified).

    Example::

        >>> bytes_by_category(model, (QSORSALinear,), {"frozen": {"nf4_packed"}, "quant_state": QUANT_STATE_NAMES})
        {'frozen': ..., 'quant_state': ..., 'adapters': ..., 'grads': ..., 'adamw': ..., 'rest_of_model': ...}
    """
    optimizer_bytes = optimizer_bytes or adamw_state_bytes
    nbytes = nbytes or (lambda t, _is_parameter: local_nbytes(t))
    out = dict.fromkeys([*frozen, "adapters", "grads", "adamw", "rest_of_model"], 0)
    seen = set()
    for layer in model.modules():
        if not isinstance(layer, layer_types):
            continue
        params = [(n, t, True) for n, t in layer.named_parameters(recurse=False)]
        for name, t, is_param in params + [(n, t, False) for n, t in layer.named_buffers(recurse=False)]:
            seen.add(id(t))
            b = nbytes(t, is_param)
            category = next((c for c, names in frozen.items() if name in names), None)
            if category is not None and not t.requires_grad:
                out[category] += b
            elif t.requires_grad:
                out["adapters"] += b
                out["grads"] += b       # one gradient shard, same dtype
                out["adamw"] += optimizer_bytes(t)
            else:
                raise AssertionError(f"unclassified tensor {name}")
    for t, is_param in [*((p, True) for p in model.parameters()), *((b, False) for b in model.buffers())]:
        if id(t) not in seen:
            seen.add(id(t))
            out["rest_of_model"] += nbytes(t, is_param)
    return out
