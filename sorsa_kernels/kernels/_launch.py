"""Launch helpers shared by the kernel files (no kernels here).

:func:`device_guard` makes every launch run on the device of its tensors.  Triton launches
on the *current* CUDA device (its stream, its compiled module); a model spread over several
GPUs (``device_map="auto"``) calls layers whose tensors live on another device than the
current one, which gives illegal-address errors or wrong output without the guard.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["device_guard"]


def _on_cuda(device: torch.device) -> bool:
    """Whether launches on ``device`` need a CUDA device guard (tests patch this)."""
    return device.type == "cuda"


def device_guard(t: Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor, a no-op context otherwise.

    Example::

        >>> with device_guard(x):
        ...     _my_kernel[grid](x, ...)
    """
    if _on_cuda(t.device):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
