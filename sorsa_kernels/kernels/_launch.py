"""Launch helpers shared by the kernel files (no kernels here).

:data:`INTERPRET` (Triton's interpreter is on: the kernel files pick small configs),
:func:`m_bucket` (the M bucket of the autotune keys), :func:`num_sms`,
:func:`input_precision` (the ``tl.dot`` precision of fp32 operands, the same rule the
reference's ``torch.matmul`` follows) and :func:`acc_per_thread` (fp32 accumulators per
thread of a config, for pruning spilling configs).

:func:`device_guard` makes every launch run on the device of its tensors.  Triton launches
on the *current* CUDA device (its stream, its compiled module); a model spread over several
GPUs (``device_map="auto"``) calls layers whose tensors live on another device than the
current one, which gives illegal-address errors or wrong output without the guard.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
from torch import Tensor

__all__ = ["device_guard", "INTERPRET", "m_bucket", "num_sms", "input_precision", "acc_per_thread"]

#: Triton reads TRITON_INTERPRET when a kernel is defined; the kernel files read it too, to
#: pick their config lists (one small config each under the interpreter).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def m_bucket(M: int) -> int:
    """M rounded up to a power of two: the autotune keys' M, so that training with varying
    sequence lengths does not re-tune on every new batch shape."""
    return triton.next_power_of_2(max(M, 1))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (sizes persistent grids and split counts)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands, following ``torch.get_float32_matmul_precision``."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16 / bf16 operands


def acc_per_thread(config: "triton.Config", block_n: int, rows: str = "BLOCK_M") -> int:
    """fp32 accumulator elements per thread of a ``config.kwargs[rows] × block_n`` output
    tile (``rows`` names the config's tile-row parameter: ``BLOCK_M``, or ``BLOCK_K`` for
    the weight-gradient kernel whose output rows run over K)."""
    return config.kwargs[rows] * block_n // (32 * config.num_warps)


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
