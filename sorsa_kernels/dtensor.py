"""DTensor helpers: whether a tensor is an FSDP2 shard, its whole value, this process's rank.

A leaf (torch only) so that adapter files, PEFT export and the FSDP code can all use it
without importing each other.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["is_sharded", "full_tensor", "local", "process_rank"]


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """True if ``t`` is a DTensor (a parameter FSDP2 has sharded)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: ``t.full_tensor()`` for a DTensor (a collective every rank must join), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: Tensor) -> Tensor:
    return t.to_local() if is_sharded(t) else t


def process_rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
