"""bench/harness.py: saved-bytes counting, FLOP counts, grid selection and the CUDA-event timer logic."""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from bench import harness
from sorsa_kernels import SORSALinear


def test_saved_bytes_of_sorsa_layer_are_x_and_u_not_the_weights():
    torch.manual_seed(0)
    layer = SORSALinear.from_linear(torch.nn.Linear(29, 23, bias=False), rank=5)
    x = torch.randn(37, 29, requires_grad=True)
    saved, y = harness.saved_tensor_bytes(lambda: layer(x), exclude=harness.model_state(layer))
    assert y.shape == (37, 23)
    assert saved == 37 * 29 * 4 + 37 * 5 * 4  # x (M×n) and u = x·V (M×r), fp32


def test_saved_bytes_count_a_storage_once_when_saved_twice():
    x = torch.randn(41, 7, requires_grad=True)
    saved, _ = harness.saved_tensor_bytes(lambda: (x * x)[:, :3].sum())  # mul saves x as both operands
    assert saved == 41 * 7 * 4


def test_saved_bytes_of_frozen_linear_exclude_its_weight():
    lin = torch.nn.Linear(13, 11).requires_grad_(False)
    x = torch.randn(9, 13, requires_grad=True)
    saved, _ = harness.saved_tensor_bytes(lambda: lin(x), exclude=harness.model_state(lin))
    assert saved == 0  # only the frozen weight is needed for the input gradient


def test_linear_flops_counts_frozen_and_low_rank_work():
    M, n, m, r = 3, 5, 7, 2
    assert harness.linear_flops("forward", M, n, m, 0) == 2 * M * n * m
    assert harness.linear_flops("forward", M, n, m, r) == 2 * M * n * m + 2 * M * r * (n + m)
    assert harness.linear_flops("backward", M, n, m, r) == 2 * M * n * m + 4 * M * r * (n + m)
    assert harness.linear_flops("step", M, n, m, r) == harness.linear_flops("fwd_bwd", M, n, m, r)


def test_linear_flops_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of .*got 'sideways'"):
        harness.linear_flops("sideways", 1, 1, 1, 1)


def test_grid_rejects_unknown_name(monkeypatch):
    monkeypatch.setenv("SORSA_BENCH_GRID", "tpu")
    with pytest.raises(ValueError, match="SORSA_BENCH_GRID must be 'gpu' or 'cpu', got 'tpu'"):
        harness.grid()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_grid_gpu_without_cuda_says_so(monkeypatch):
    monkeypatch.setenv("SORSA_BENCH_GRID", "gpu")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        harness.grid()


class _FakeEvent:
    """torch.cuda.Event stand-in timing with perf_counter."""

    def __init__(self, enable_timing: bool = True) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return (end.t - self.t) * 1e3


class _FakeBenchmark:
    """pytest-benchmark's pedantic contract: setup before each round, the timer read around the target."""

    disabled = False

    def __init__(self) -> None:
        self._timer = harness.cuda_event_clock
        self.durations: list[float] = []

    def pedantic(self, target, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        assert iterations == 1
        for i in range(warmup_rounds + rounds):
            if setup is not None:
                assert setup() is None
            start = self._timer()
            result = target()
            if i >= warmup_rounds:
                self.durations.append(self._timer() - start)
        self.stats = type("S", (), {"stats": type("T", (), {"median": statistics.median(self.durations)})()})()
        return result


def test_cuda_event_clock_times_the_target_not_the_setup(monkeypatch):
    monkeypatch.setattr(harness, "ON_CUDA", True)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(harness, "flush_l2", lambda: None)
    monkeypatch.setattr(harness, "GPU_REP_S", 0.02)
    bench = _FakeBenchmark()
    result, median = harness.run_benchmark(
        bench, lambda: time.sleep(0.002) or "out", setup=lambda: time.sleep(0.006)
    )
    assert result == "out"
    assert 0.002 <= median < 0.006, median  # setup's 6 ms is not in the time
    assert len(bench.durations) >= 5


def test_gpu_run_without_the_event_timer_mark_is_refused(monkeypatch):
    monkeypatch.setattr(harness, "ON_CUDA", True)
    bench = _FakeBenchmark()
    bench._timer = time.perf_counter
    with pytest.raises(RuntimeError, match=r"pytestmark = harness.timer_marks\(\)"):
        harness.run_benchmark(bench, lambda: None)
