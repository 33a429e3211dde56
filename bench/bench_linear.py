"""One adapted linear layer: provider × mode × tokens × shape × rank × dtype.

Modes (x requires grad in every mode, as for any layer inside a network):

* ``forward``  — a training forward (autograd records the graph and saves tensors);
* ``backward`` — ``y.backward(dy)`` alone (the forward runs before each call, untimed);
* ``fwd_bwd``  — forward and backward;
* ``step``     — forward, backward, the orthonormal regularizer's gradient for SORSA
  providers (``add_regularizer_grad``; autograd for the authors' dense formulation) and an
  AdamW step.  The frozen floor has nothing to update: its step is forward and backward.

``-m issue3`` selects issue 3's benchmark (forward and forward+backward of frozen,
sorsa_fused, sorsa_reference, lora and dense at the Llama-7B shapes on GPU); ``-m quick``
the fused-layer targets of ``bash bench/run_gpu.sh --quick`` (see :func:`_is_quick`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch

from . import harness, providers

pytestmark = harness.timer_marks()

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ISSUE3_PROVIDERS = ("frozen", "sorsa_fused", "sorsa_reference", "lora", "dense")
ISSUE3_MODES = ("forward", "fwd_bwd")
QUICK_PROVIDERS = ("frozen", "sorsa_fused", "lora")
QUICK_QUANT_PROVIDERS = ("qsorsa", "qlora")
#: Providers whose output is checked against the reference path at the benchmark's shape
#: (the autotuner picked their configs there, which the quick GPU tests may not have run).
CHECKED_PROVIDERS = {"sorsa_fused": "reference", "qsorsa": "reference"}
#: ‖fused − reference‖ / ‖reference‖ allowed per dtype (both paths round to the dtype).
CHECK_TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 2e-2}


def _is_issue3(provider: str, mode: str, shape: tuple[int, int], grid: harness.Grid) -> bool:
    shapes_ok = shape in harness.LLAMA_7B_SHAPES if grid.name == "gpu" else True
    return provider in ISSUE3_PROVIDERS and mode in ISSUE3_MODES and shapes_ok


def _quick_rank(grid: harness.Grid) -> int:
    return min(grid.ranks, key=lambda r: (abs(r - 64), r))


def _is_quick(provider: str, mode: str, tokens: int, shape: tuple[int, int], rank: int, grid: harness.Grid) -> bool:
    """The ``quick`` subset (``bash bench/run_gpu.sh --quick``): the fused-layer targets.

    fwd+bwd at the grid's first M, of ``frozen``/``sorsa_fused``/``lora`` on the first two
    shapes at the two largest ranks (GPU: M 4096, 4096×4096 and 4096×11008, r 64 and 128),
    and of ``qsorsa``/``qlora`` on the first shape at the rank closest to 64.
    """
    if mode != "fwd_bwd" or tokens != grid.tokens[0]:
        return False
    if provider in QUICK_PROVIDERS:
        return shape in grid.shapes[:2] and (rank == 0 or rank in grid.ranks[-2:])
    if provider in QUICK_QUANT_PROVIDERS:
        return shape == grid.shapes[0] and rank == _quick_rank(grid)
    return False


def _cases() -> list:
    # Order: mode varies fastest, so the four modes of one layer reuse one built module.
    grid = harness.grid()
    cases = []
    for dtype in grid.dtypes:
        dt = harness.dtype_name(dtype)
        for tokens in grid.tokens:
            for n, m in grid.shapes:
                for provider in providers.PROVIDERS:
                    for rank in (0,) if provider == "frozen" else grid.ranks:
                        for mode in harness.MODES:
                            marks = [pytest.mark.issue3] if _is_issue3(provider, mode, (n, m), grid) else []
                            if _is_quick(provider, mode, tokens, (n, m), rank, grid):
                                marks.append(pytest.mark.quick)
                            cases.append(pytest.param(
                                provider, mode, tokens, n, m, rank, dt, marks=marks,
                                id=f"{provider}-{mode}-M{tokens}-{n}x{m}-r{rank}-{dt}",
                            ))
    return cases


# One built layer at a time (the GPU grid's layers are large): consecutive modes share it.
# The base nn.Linear is not kept beside it, so that GPU memory holds only the provider's
# own state (SORSA's residual replaces W0, as it does in a model).
_cache: dict[str, Any] = {"key": None, "built": None}


@pytest.fixture(scope="module", autouse=True)
def _release_cache():
    yield
    _cache.update(key=None, built=None)


def _built(provider: str, n: int, m: int, rank: int, dtype: torch.dtype) -> providers.Built:
    key = (provider, n, m, rank, dtype)
    if _cache["key"] != key:
        _cache.update(key=None, built=None)
        lin = providers.base_linear(n, m, dtype, harness.DEVICE)
        try:
            built: Any = providers.build(provider, lin, rank)
        except providers.Unavailable as exc:
            built = exc
        del lin
        _cache.update(key=key, built=built)
    if isinstance(_cache["built"], providers.Unavailable):
        raise _cache["built"]
    return _cache["built"]


def _mode_functions(
    mode: str, built: providers.Built, x: torch.Tensor, dy: torch.Tensor
) -> tuple[Callable[[], Any], Optional[Callable[[], None]]]:
    """``(target, setup)`` of one mode."""
    module = built.module
    optimizer = torch.optim.AdamW(built.trainable, lr=providers.LR) if mode == "step" and built.trainable else None

    def zero_grads() -> None:  # optimizer.zero_grad(set_to_none=True), for x too
        x.grad = None
        for p in built.trainable:
            p.grad = None

    if mode == "forward":
        return (lambda: module(x)), None
    if mode == "backward":
        state: dict[str, torch.Tensor] = {}

        def setup() -> None:
            zero_grads()
            state["y"] = module(x)

        def backward() -> None:
            state.pop("y").backward(dy)

        return backward, setup
    if mode == "fwd_bwd":
        def fwd_bwd() -> torch.Tensor:
            zero_grads()
            y = module(x)
            y.backward(dy)
            return y.detach()

        return fwd_bwd, None
    if mode == "step":
        def step() -> torch.Tensor:
            zero_grads()
            y = module(x)
            y.backward(dy)
            if built.regularize is not None:
                built.regularize()
            if optimizer is not None:
                optimizer.step()
            return y.detach()

        return step, None
    raise ValueError(f"mode must be one of {harness.MODES}, got {mode!r}")


def _check(mode: str, result: Any, built: providers.Built, x: torch.Tensor, shape_y: tuple[int, int]) -> None:
    if mode in ("forward", "fwd_bwd", "step"):
        harness.assert_sane(result, shape_y, "output")
    if mode in ("backward", "fwd_bwd", "step"):
        harness.assert_sane(x.grad, x.shape, "input gradient")
        for i, p in enumerate(built.trainable):
            harness.assert_sane(p.grad, p.shape, f"gradient of trainable parameter {i}")
    if mode == "step":
        for i, p in enumerate(built.trainable):
            harness.assert_sane(p.detach(), p.shape, f"trainable parameter {i} after the step")


def check_against_reference(module: torch.nn.Module, x: torch.Tensor, monkeypatch, backend: str) -> float:
    """``‖y − y_ref‖ / ‖y_ref‖`` of the module's forward against the same module on ``backend``."""
    with torch.no_grad():
        y = module(x).float()
        monkeypatch.setenv("SORSA_KERNELS_BACKEND", backend)
        y_ref = module(x).float()
    return float((y - y_ref).norm() / y_ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize(("provider", "mode", "tokens", "n", "m", "rank", "dtype"), _cases())
def test_linear_layer(benchmark, request, monkeypatch, provider, mode, tokens, n, m, rank, dtype):
    """Time one mode of one provider's layer; record throughput and memory in extra_info."""
    torch_dtype = DTYPES[dtype]
    try:
        built = _built(provider, n, m, rank, torch_dtype)
    except providers.Unavailable as exc:
        benchmark.skipped = True  # keeps pytest-benchmark from warning that the fixture went unused
        pytest.skip(str(exc))
    if built.backend is not None:
        monkeypatch.setenv("SORSA_KERNELS_BACKEND", built.backend)
    benchmark.group = f"linear {mode} M={tokens} n={n} m={m} {dtype}"

    gen = torch.Generator(device=harness.DEVICE).manual_seed(1234)
    x = torch.randn(tokens, n, device=harness.DEVICE, dtype=torch_dtype, generator=gen).requires_grad_(True)
    dy = torch.randn(tokens, m, device=harness.DEVICE, dtype=torch_dtype, generator=gen)
    target, setup = _mode_functions(mode, built, x, dy)

    with torch.enable_grad():
        result, median_s = harness.run_benchmark(benchmark, target, setup=setup, config=request.config)
        _check(mode, result, built, x, (tokens, m))
        del result
        saved, y = harness.saved_tensor_bytes(lambda: built.module(x), exclude=built.state)
        del y
        peak, peak_delta = harness.peak_memory(target, setup)

    rel_err = None
    if mode == "fwd_bwd" and provider in CHECKED_PROVIDERS and harness.ON_CUDA:
        rel_err = check_against_reference(built.module, x, monkeypatch, CHECKED_PROVIDERS[provider])
        monkeypatch.setenv("SORSA_KERNELS_BACKEND", built.backend)
        assert rel_err < CHECK_TOL[dtype], f"{provider} differs from the reference path by {rel_err:.3g}"
    harness.record(
        benchmark, kind="linear", provider=provider, mode=mode, tokens=tokens, dtype=torch_dtype,
        median_s=median_s, flops=harness.linear_flops(mode, tokens, n, m, rank),
        peak_bytes=peak, peak_delta_bytes=peak_delta, saved_bytes=saved,
        n=n, m=m, rank=rank or None, adapter_dtype=harness.dtype_name(built.adapter_dtype),
        backend=built.backend, trainable_params=sum(p.numel() for p in built.trainable),
        rel_err_vs_reference=rel_err,
    )
