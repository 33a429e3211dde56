"""One orthonormal-regularizer step over a Llama-7B adapter set (issue 4).

A step is what :func:`sorsa_kernels.add_regularizer_grad` does once per optimizer step:
``value = mean_i ‖A_iᵀA_i − I‖_F`` over every U and V, and ``A_i.grad += coeff·∂value/∂A_i``.
The set is a 7B Llama's at r = 128: 32 layers × 7 projections (q, k, v, o 4096×4096;
gate, up 11008×4096; down 4096×11008, out×in), so 224 SORSA layers and 448 matrices (U
out×r, V in×r), random factors, bf16 or fp32.

Providers, all in the same process and on the same tensors:

* ``grouped_fused``: :func:`sorsa_kernels.kernels.ortho_reg.grouped_ortho_value_and_grad_`
  (3 launches for the whole set);
* ``reference_loop``: :func:`sorsa_kernels.ops.reference.ortho_value_and_grad_`, the plain
  per-matrix PyTorch loop;
* ``compiled_loop``: ``torch.compile`` of that same function (compiled once per dtype; its
  compile time is not timed, but it is minutes of wall time: marked ``compiled_loop``, opt-in
  in ``bash bench/run_gpu.sh --quick --compiled-loop``).

``-m quick`` selects every case (both dtypes); ``-m "quick and not compiled_loop"`` leaves out
the compiled baseline.

Timing: CUDA events around each step after warm-up; the median in ms goes to
``extra_info["ms_per_step"]`` with device, versions, dtype and shapes.  The same steps, each
followed by ``torch.cuda.synchronize()``, are fed to pytest-benchmark through
``benchmark.pedantic`` so that ``--benchmark-json`` and comparisons work.  The set is
~1.3 GB in fp32, far larger than L2, so no L2 flush is needed between steps.

Run: ``pytest bench/bench_regularizer.py --benchmark-only`` (skipped without a CUDA GPU).
"""
from __future__ import annotations

import importlib.metadata
import statistics
from typing import Callable

import pytest
import torch

from sorsa_kernels.ops import reference

from . import harness

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the regularizer benchmark times CUDA kernels with CUDA events and needs a CUDA GPU",
)

RANK = 128
LAYERS = 32
# (name, out_features, in_features) of one Llama-7B decoder layer.
PROJECTIONS = [
    ("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
    ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008),
]
COEFF = 4e-4 / 3e-5  # gamma / lr_max, the paper's values
WARMUP_STEPS = 5
TIMED_STEPS = 30
PROVIDERS = ["reference_loop", "compiled_loop", "grouped_fused"]  # reference first: ratios
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

_MEDIANS: dict[tuple[str, str], float] = {}  # (dtype, provider) -> ms, for the speed-up ratios
_COMPILED: dict[str, Callable] = {}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@pytest.fixture(scope="module", params=list(DTYPES), ids=list(DTYPES))
def adapter_set(request):
    """The 448 adapter matrices of a 7B Llama at r = 128, with zero grads, on the GPU."""
    dtype = DTYPES[request.param]
    g = torch.Generator(device="cuda").manual_seed(0)
    mats = []
    for _ in range(LAYERS):
        for _, out_features, in_features in PROJECTIONS:
            for k in (out_features, in_features):  # U (out×r), then V (in×r)
                a = torch.randn(k, RANK, device="cuda", generator=g) / k**0.5
                a = a.to(dtype).requires_grad_()
                a.grad = torch.zeros_like(a)
                mats.append(a)
    yield request.param, mats
    del mats
    torch.cuda.empty_cache()


def _provider(name: str, dtype_name: str) -> Callable[[list], torch.Tensor]:
    if name == "grouped_fused":
        from sorsa_kernels.kernels import ortho_reg

        return lambda mats: ortho_reg.grouped_ortho_value_and_grad_(mats, COEFF)
    if name == "reference_loop":
        return lambda mats: reference.ortho_value_and_grad_(mats, COEFF)
    if name == "compiled_loop":
        if dtype_name not in _COMPILED:
            _COMPILED[dtype_name] = torch.compile(reference.ortho_value_and_grad_)
        compiled = _COMPILED[dtype_name]
        return lambda mats: compiled(mats, COEFF)
    raise ValueError(f"unknown provider {name!r}; known: {PROVIDERS}")


def _cuda_event_ms(step: Callable[[], object], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _params() -> list:
    marks = {"compiled_loop": [pytest.mark.quick, pytest.mark.compiled_loop]}
    return [pytest.param(p, marks=marks.get(p, [pytest.mark.quick]), id=p) for p in PROVIDERS]


@pytest.mark.parametrize("provider", _params())
def test_regularizer_step(benchmark, adapter_set, provider):
    dtype_name, mats = adapter_set
    fn = _provider(provider, dtype_name)

    # Same value as the reference before anything is timed (grads are not compared: every
    # provider keeps adding into the same .grad tensors).
    expected = float(reference.ortho_norms(mats).mean())
    got = float(fn(mats))
    assert abs(got - expected) <= 1e-4 * abs(expected), (provider, got, expected)

    step = lambda: fn(mats)  # noqa: E731
    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    times = _cuda_event_ms(step, TIMED_STEPS)
    median = statistics.median(times)
    _MEDIANS[(dtype_name, provider)] = median
    q = statistics.quantiles(times, n=5)

    benchmark.group = f"regularizer step, Llama-7B adapters r={RANK} {dtype_name}"
    benchmark.extra_info.update(
        {
            "kind": "regularizer",
            "provider": provider,
            "device": torch.cuda.get_device_name(),
            "driver": harness.driver_version(),
            "versions": dict(harness.versions()),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "cuda": torch.version.cuda,
            "sorsa_kernels": _version("sorsa-kernels"),
            "dtype": dtype_name,
            "rank": RANK,
            "layers": LAYERS * len(PROJECTIONS),
            "matrices": len(mats),
            "shapes": "per layer: " + ", ".join(f"{n} {o}x{i}" for n, o, i in PROJECTIONS),
            "timing": f"CUDA events, median of {TIMED_STEPS} steps after {WARMUP_STEPS} warm-up",
            "ms_per_step": round(median, 4),
            "ms_p20": round(q[0], 4),
            "ms_p80": round(q[-1], 4),
        }
    )
    ref = _MEDIANS.get((dtype_name, "reference_loop"))
    if ref is not None and provider != "reference_loop":
        benchmark.extra_info["speedup_vs_reference_loop"] = round(ref / median, 2)

    def synced_step():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(synced_step, rounds=TIMED_STEPS, iterations=1, warmup_rounds=1)
