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
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton
from torch import Tensor

__all__ = [
    "device_guard", "INTERPRET", "m_bucket", "num_sms", "input_precision", "acc_per_thread",
    "SMEM_PER_BLOCK", "Target", "device_target", "compile_target", "pipelined_smem", "wgmma_rows", "fit_smem",
    "config_table",
]

#: Triton reads TRITON_INTERPRET when a kernel is defined; the kernel files read it too, to
#: pick their config lists (one small config each under the interpreter).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: Shared memory per block (bytes: the opt-in maximum one kernel may use) of the GPU families
#: the kernels are built for — T4 / RTX 20xx (sm_75, 64 KB), A100 (sm_80, 163 KB), RTX 30xx /
#: A6000 / A10 (sm_86, 99 KB), RTX 40xx / L4 / L40 (sm_89, 99 KB), H100 / H200 (sm_90, 227 KB).
#: The compile-facts tooling targets these (:func:`compile_target`); at run time the device is
#: asked (:func:`device_target`).
SMEM_PER_BLOCK = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class Target:
    """What config choices depend on: compute capability (10·major + minor) and shared
    memory per block in bytes."""

    capability: int
    smem: int


_TARGETS: list[Target] = []  # compile_target's stack


@contextlib.contextmanager
def compile_target(capability: int) -> Iterator[Target]:
    """Make every prune and per-family choice size configs for ``capability`` (75, 80, 86,
    89 or 90) whatever the tensors' device: how tools/compile_facts.py compiles for a
    GPU it does not have.

    Example::

        >>> with compile_target(86):
        ...     launches = capture(lambda: fused_forward(x, Wr, U, S, V, b, 1.0))
    """
    if capability not in SMEM_PER_BLOCK:
        raise ValueError(f"capability {capability} has no shared-memory entry; known: {sorted(SMEM_PER_BLOCK)}")
    _TARGETS.append(Target(capability, SMEM_PER_BLOCK[capability]))
    try:
        yield _TARGETS[-1]
    finally:
        _TARGETS.pop()


@functools.lru_cache(maxsize=None)
def _cuda_target(device_index: int) -> Target:
    """Queried once per device: the limit Triton itself checks before a launch."""
    from triton.runtime import driver

    major, minor = torch.cuda.get_device_capability(device_index)
    smem = driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return Target(10 * major + minor, int(smem))


def device_target(device: torch.device) -> Optional[Target]:
    """The :class:`Target` configs for ``device`` are sized for: the :func:`compile_target`
    in force, else the CUDA device's (cached per device), else None (the interpreter: no
    limit)."""
    if _TARGETS:
        return _TARGETS[-1]
    if device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


def config_table(interpret: bool, names: tuple[str, ...], rows: list[tuple[int, ...]]) -> list:
    """Autotune configs from rows ``(*tile sizes in the order of names, num_warps, num_stages)``.

    Under the interpreter one config with every named tile 16 wide (correctness only: the
    interpreter is no speed measure, and small tiles keep it quick).

    Example::

        >>> [c.kwargs for c in config_table(False, ("BLOCK_K",), [(128, 4, 3)])]
        [{'BLOCK_K': 128}]
    """
    if interpret:
        return [triton.Config({name: 16 for name in names})]
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


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


def pipelined_smem(config: "triton.Config", step_bytes: int, target: Target, wgmma: bool = True) -> int:
    """Shared memory (bytes) a software-pipelined K loop of ``config`` takes on ``target``:
    ``step_bytes`` (the operand tiles one iteration loads) per buffer.  Triton keeps
    ``num_stages`` buffers for a Hopper wgmma dot (operands copied asynchronously into shared
    memory; ``wgmma``: the dot can be one — 16-bit or tf32 operands, ≥ 64 rows, warps a
    multiple of 4) and ``num_stages − 1`` otherwise (mma.sync, FMA, gathered operands).
    Compile facts: the 128×128×64 bf16 GEMM at 4 stages takes 96 KB on sm_80/86 and 128 KB
    on sm_90; the fp32 (IEEE) one 192 KB on sm_90."""
    hopper = target.capability >= 90 and wgmma
    return (config.num_stages if hopper else max(1, config.num_stages - 1)) * step_bytes


def wgmma_rows(config: "triton.Config", rows: int, precision: str) -> bool:
    """Whether a dot of ``rows`` output rows under ``config`` can be a Hopper wgmma."""
    return precision != "ieee" and rows >= 64 and config.num_warps % 4 == 0


def fit_smem(configs: list, target: Optional[Target], step_bytes, wgmma=lambda c: True) -> list:
    """The ``configs`` whose :func:`pipelined_smem` (``step_bytes(config)`` per buffer,
    ``wgmma(config)`` as there) fits ``target``'s shared memory per block; all of them when
    ``target`` is None (the interpreter).  When none fits, the smallest one alone (its launch
    then fails and ops/ falls back to the reference), so a prune never returns an empty list."""
    if target is None:
        return configs
    need = {id(c): pipelined_smem(c, step_bytes(c), target, wgmma(c)) for c in configs}
    kept = [c for c in configs if need[id(c)] <= target.smem]
    return kept or [min(configs, key=lambda c: need[id(c)])]
