"""Shared machinery of the benchmark suite: grids, timing, memory, FLOPs and ``extra_info``.

Everything here is generic (no provider knows about it) so that every benchmark module
under ``bench/`` can use it.

Timing
    * CUDA: CUDA events around each call, after warm-up, with the L2 cache flushed before
      every call — the semantics of ``triton.testing.do_bench`` (25 ms of warm-up, 100 ms
      of measured calls, median).  The event times are fed to pytest-benchmark through a
      *custom timer*: :func:`cuda_event_clock` is a clock that only advances by measured
      GPU time, and each module that times on the GPU carries
      ``pytestmark = harness.timer_marks()`` so that pytest-benchmark reads that clock.
      ``--benchmark-json`` and ``--benchmark-compare`` then hold GPU times.
    * CPU: pytest-benchmark's own timer and calibration.

Memory
    * ``torch.cuda.max_memory_allocated`` after a reset (GPU only);
    * on every device, the bytes saved for backward: unique storages packed through
      ``torch.autograd.graph.saved_tensors_hooks``, parameters and buffers excluded.
"""
from __future__ import annotations

import functools
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import pytest
import torch
from torch import Tensor, nn

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

#: The modes of the layer benchmark, in the order they are run.
MODES = ("forward", "backward", "fwd_bwd", "step")

# do_bench's defaults (triton.testing.do_bench): warm-up and measured time per benchmark.
GPU_WARMUP_S = 0.025
GPU_REP_S = 0.100
MAX_ROUNDS = 2000
_L2_FLUSH_BYTES = 256 * 1024 * 1024  # as triton's do_bench: larger than any current L2

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    """``torch.bfloat16 -> "bf16"`` (None stays None)."""
    if dtype is None:
        return None
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# --------------------------------------------------------------------------- grids
@dataclass(frozen=True)
class LlamaSize:
    """A small Llama for the end-to-end step."""

    hidden: int
    intermediate: int
    heads: int
    vocab: int
    layers: int
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class Grid:
    """What the suite sweeps on this machine.

    ``shapes`` are ``(n, m) = (in_features, out_features)``; ``tokens`` is M, the rows of x.
    """

    name: str
    tokens: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    ranks: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    llama: LlamaSize


#: Llama-7B projection shapes (q/k/v/o, gate/up, down).
LLAMA_7B_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
#: Llama-13B projection shapes.
LLAMA_13B_SHAPES = ((5120, 5120), (5120, 13824), (13824, 5120))

GPU_GRID = Grid(
    name="gpu",
    tokens=(4096, 8192),
    shapes=LLAMA_7B_SHAPES + LLAMA_13B_SHAPES,
    ranks=(16, 64, 128),
    dtypes=(torch.bfloat16,),
    llama=LlamaSize(hidden=4096, intermediate=11008, heads=32, vocab=32000, layers=2, batch=2, seq=2048),
)
CPU_GRID = Grid(
    name="cpu",
    tokens=(256,),
    shapes=((256, 256), (256, 688)),
    ranks=(8, 32),
    dtypes=(torch.float32,),
    llama=LlamaSize(hidden=256, intermediate=688, heads=4, vocab=1000, layers=2, batch=2, seq=128),
)


def grid() -> Grid:
    """The GPU grid on CUDA, the scaled-down CPU grid elsewhere.

    ``SORSA_BENCH_GRID=cpu`` runs the small grid on a GPU machine (a quick smoke run).
    """
    choice = os.environ.get("SORSA_BENCH_GRID", "").strip().lower() or ("gpu" if ON_CUDA else "cpu")
    if choice not in ("gpu", "cpu"):
        raise ValueError(f"SORSA_BENCH_GRID must be 'gpu' or 'cpu', got {choice!r}")
    if choice == "gpu" and not ON_CUDA:
        raise RuntimeError("SORSA_BENCH_GRID=gpu needs a CUDA GPU; this machine has none")
    return GPU_GRID if choice == "gpu" else CPU_GRID


# --------------------------------------------------------------------------- environment
@functools.lru_cache(maxsize=None)
def versions() -> dict[str, Optional[str]]:
    """Versions of everything a figure depends on: the GPU driver, and packages read from
    their metadata (no imports; a package missing here is None)."""
    out: dict[str, Optional[str]] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": driver_version(),
    }
    for dist in ("triton", "bitsandbytes", "peft", "transformers", "sorsa-kernels", "pytest-benchmark"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


@functools.lru_cache(maxsize=None)
def driver_version() -> Optional[str]:
    """The GPU driver's version: ``nvidia-smi``'s (e.g. ``"550.54.15"``), else the CUDA driver
    API version torch sees (``"CUDA driver API 12.4"``); None without CUDA."""
    if not ON_CUDA:
        return None
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        v = int(torch._C._cuda_getDriverVersion())
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10}"
    except Exception:  # noqa: BLE001 - a private API; the version is informative only
        return None


@functools.lru_cache(maxsize=None)
def device_name() -> str:
    """``"NVIDIA H100 80GB HBM3"``, or the CPU model and the threads torch uses."""
    if ON_CUDA:
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- timing
_gpu_clock_s = [0.0]


def cuda_event_clock() -> float:
    """A clock (seconds) that advances only by GPU time measured with CUDA events.

    pytest-benchmark computes a round's duration as ``clock() after − clock() before``;
    with this clock that is exactly the event-measured time of the call.
    """
    return _gpu_clock_s[0]


def timer_marks() -> list:
    """``pytestmark`` for a module timed by :func:`run_benchmark`: the CUDA-event clock on GPU."""
    return [pytest.mark.benchmark(timer=cuda_event_clock)] if ON_CUDA else []


class _EventTimed:
    """Calls ``fn`` between two CUDA events and advances :func:`cuda_event_clock` by the time."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.last_s = 0.0

    def __call__(self) -> Any:
        self.start.record()
        out = self.fn()
        self.end.record()
        self.end.synchronize()
        self.last_s = self.start.elapsed_time(self.end) / 1e3
        _gpu_clock_s[0] += self.last_s
        return out


@functools.lru_cache(maxsize=1)
def _l2_buffer() -> Tensor:
    return torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")


def flush_l2() -> None:
    """Overwrite a buffer larger than L2 (do_bench's cache clearing). No-op on CPU."""
    if ON_CUDA:
        _l2_buffer().zero_()


def _returns_none(setup: Optional[Callable[[], Any]]) -> Optional[Callable[[], None]]:
    # pytest-benchmark treats a setup's return value as (args, kwargs) for the target.
    if setup is None:
        return None

    def wrapped() -> None:
        setup()

    return wrapped


def _config_option(config: Any, name: str, default: Any) -> Any:
    try:
        value = config.getoption(name)
    except (ValueError, AttributeError):
        return default
    return default if value is None else value


def run_benchmark(
    benchmark: Any,
    target: Callable[[], Any],
    *,
    setup: Optional[Callable[[], Any]] = None,
    config: Any = None,
) -> tuple[Any, Optional[float]]:
    """Time ``target`` with pytest-benchmark; return ``(target's last result, median seconds)``.

    ``setup`` runs before every call, outside the timing.  With ``--benchmark-disable``
    the target runs once (after ``setup``) and the median is None.  On CUDA the module
    must carry ``pytestmark = harness.timer_marks()``.
    """
    if benchmark.disabled:
        return benchmark.pedantic(target, setup=_returns_none(setup)), None
    min_rounds = int(_config_option(config, "benchmark_min_rounds", 5))
    if ON_CUDA:
        if getattr(benchmark, "_timer", cuda_event_clock) is not cuda_event_clock:
            raise RuntimeError(
                "GPU benchmarks must read harness.cuda_event_clock: add "
                "`pytestmark = harness.timer_marks()` to the benchmark module"
            )
        timed = _EventTimed(target)

        def gpu_setup() -> None:
            if setup is not None:
                setup()
            flush_l2()

        gpu_setup()
        timed()  # first call: compilation, autotuning, lazy state
        estimates = []
        for _ in range(5):
            gpu_setup()
            timed()
            estimates.append(timed.last_s)
        est = max(statistics.median(estimates), 1e-7)
        warmup = max(1, int(GPU_WARMUP_S / est))
        rounds = min(MAX_ROUNDS, max(min_rounds, int(GPU_REP_S / est)))
        result = benchmark.pedantic(timed, setup=gpu_setup, rounds=rounds, warmup_rounds=warmup)
    elif setup is None:
        result = benchmark(target)
    else:
        max_time = float(_config_option(config, "benchmark_max_time", 1.0))
        setup()
        t0 = time.perf_counter()
        target()
        est = max(time.perf_counter() - t0, 1e-7)
        rounds = min(MAX_ROUNDS, max(min_rounds, math.ceil(max_time / est)))
        result = benchmark.pedantic(target, setup=_returns_none(setup), rounds=rounds, warmup_rounds=1)
    return result, float(benchmark.stats.stats.median)


def time_median(fn: Callable[[], Any], *, reps: int = 10) -> float:
    """Median seconds of ``fn`` outside pytest-benchmark (CUDA events on GPU)."""
    fn()
    if ON_CUDA:
        torch.cuda.synchronize()
        timed = _EventTimed(fn)
        times = []
        for _ in range(reps):
            flush_l2()
            timed()
            times.append(timed.last_s)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def matmul_peak_tflops(dtype: torch.dtype) -> float:
    """TFLOP/s of a plain square matmul of ``dtype`` on this device, measured once per session.

    8192³ on GPU, 1024³ on CPU: large enough to be compute-bound on each.
    """
    size = 8192 if ON_CUDA else 1024
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(size, size, device=DEVICE, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype, generator=gen)
    seconds = time_median(lambda: a @ b, reps=20 if ON_CUDA else 5)
    del a, b
    return 2.0 * size**3 / seconds / 1e12


# --------------------------------------------------------------------------- memory
def _storage_key(t: Tensor) -> Optional[tuple[str, int]]:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError, AttributeError):  # sparse, nested, fake…
        return None
    return (str(t.device), storage.data_ptr())


def _storage_bytes(t: Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, AttributeError):
        return int(t.numel() * t.element_size())


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> tuple[int, Any]:
    """Bytes that autograd saves for backward while ``fn`` runs; returns ``(bytes, fn())``.

    Counts each storage once (views and repeated saves of one tensor count once) and leaves
    out the storages of ``exclude`` (pass the model's parameters and buffers: frozen
    weights are module state, not activations).  Independent of the device.

    Example::

        >>> saved, y = saved_tensor_bytes(lambda: layer(x), exclude=model_state(layer))
    """
    skip = {k for k in (_storage_key(t) for t in exclude) if k is not None}
    seen: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key is not None and key not in skip:
            seen[key] = max(seen.get(key, 0), _storage_bytes(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def model_state(module: nn.Module) -> list[Tensor]:
    """Parameters and buffers of ``module`` (what :func:`saved_tensor_bytes` should exclude)."""
    return [*module.parameters(), *module.buffers()]


def peak_memory(fn: Callable[[], Any], setup: Optional[Callable[[], Any]] = None) -> tuple[Optional[int], Optional[int]]:
    """``(max_memory_allocated, peak − allocated before)`` of one call of ``fn`` on CUDA.

    ``setup`` runs first; the peak covers ``fn`` and everything live while it runs (the
    module's weights, inputs, saved activations, gradients, optimizer state), so callers
    must hold nothing else on the GPU.  ``(None, None)`` on CPU.
    """
    if not ON_CUDA:
        return None, None
    _l2_buffer.cache_clear()  # the flush buffer is the harness's, not the provider's
    if setup is not None:
        setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return int(peak), int(peak - before)


# --------------------------------------------------------------------------- FLOPs
def linear_flops(mode: str, tokens: int, n: int, m: int, rank: int) -> int:
    """Model FLOPs of one adapted linear layer (same count for every provider of a rank).

    Forward ``2·M·n·m + 2·M·r·(n+m)``; backward (frozen weight, input gradient needed)
    ``2·M·n·m + 4·M·r·(n+m)``.  ``rank=0`` is the frozen layer.  Work a formulation does
    beyond this (a dense ``U·diag(S)·Vᵀ``, dequantization) is not counted: the achieved
    TFLOP/s is useful work per second.
    """
    base = 2 * tokens * n * m
    low = 2 * tokens * rank * (n + m)
    fwd, bwd = base + low, base + 2 * low
    table = {"forward": fwd, "backward": bwd, "fwd_bwd": fwd + bwd, "step": fwd + bwd}
    if mode not in table:
        raise ValueError(f"mode must be one of {tuple(table)}, got {mode!r}")
    return table[mode]


def llama_step_flops(size: LlamaSize, rank: int) -> int:
    """Model FLOPs of one training step of the adapted Llama (frozen base, adapters on every projection)."""
    T, h, i = size.tokens, size.hidden, size.intermediate
    shapes = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]
    per_layer = sum(linear_flops("fwd_bwd", T, n, m, rank) for n, m in shapes)
    attention = 3 * 4 * size.batch * size.seq**2 * h  # QKᵀ and PV: forward 4·B·S²·h, backward twice that
    lm_head = 2 * 2 * T * h * size.vocab  # forward and input gradient
    return size.layers * (per_layer + attention) + lm_head


# --------------------------------------------------------------------------- checks and records
def assert_sane(t: Optional[Tensor], shape: Sequence[int], what: str) -> None:
    """Fail unless ``t`` exists, has ``shape`` and holds only finite values."""
    assert t is not None, f"{what} is missing"
    assert tuple(t.shape) == tuple(shape), f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}"
    assert bool(torch.isfinite(t).all()), f"{what} has non-finite values"


def record(
    benchmark: Any,
    *,
    kind: str,
    provider: str,
    mode: str,
    tokens: int,
    dtype: torch.dtype,
    median_s: Optional[float],
    flops: int,
    peak_bytes: Optional[int],
    peak_delta_bytes: Optional[int],
    saved_bytes: int,
    **fields: Any,
) -> None:
    """Fill ``benchmark.extra_info`` with everything a figure needs to be a result."""
    info: dict[str, Any] = {
        "kind": kind,
        "provider": provider,
        "mode": mode,
        "tokens": tokens,
        "dtype": dtype_name(dtype),
        **fields,
        "device": DEVICE.type,
        "device_name": device_name(),
        "grid": grid().name,
        "timer": ("cuda_events" if ON_CUDA else "perf_counter") if median_s is not None else None,
        "median_s": median_s,
        "model_flop": flops,
        "peak_bytes": peak_bytes,
        "peak_delta_bytes": peak_delta_bytes,
        "saved_bytes": saved_bytes,
        "versions": dict(versions()),
    }
    if median_s is not None:
        peak = matmul_peak_tflops(dtype)
        achieved = flops / median_s / 1e12
        info.update(
            tokens_per_s=tokens / median_s,
            achieved_tflops=achieved,
            matmul_peak_tflops=peak,
            fraction_of_matmul_peak=achieved / peak,
        )
    benchmark.extra_info.update(info)
