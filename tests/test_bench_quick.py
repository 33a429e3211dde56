"""The ``--quick`` selection: the ``quick`` marker of the layer benchmark and the ``gpu`` marker plugin."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import bench_linear, harness

REPO = Path(__file__).resolve().parents[1]


def _quick_ids(monkeypatch, grid: harness.Grid) -> set[str]:
    monkeypatch.setattr(harness, "grid", lambda: grid)
    return {c.id for c in bench_linear._cases() if any(m.name == "quick" for m in c.marks)}


def test_quick_on_the_gpu_grid_is_the_fused_layer_targets_and_one_qsorsa_shape(monkeypatch):
    expected = set()
    for shape in ("4096x4096", "4096x11008"):
        expected.add(f"frozen-fwd_bwd-M4096-{shape}-r0-bf16")
        for provider in ("sorsa_fused", "lora"):
            for rank in (64, 128):
                expected.add(f"{provider}-fwd_bwd-M4096-{shape}-r{rank}-bf16")
    expected |= {"qsorsa-fwd_bwd-M4096-4096x4096-r64-bf16", "qlora-fwd_bwd-M4096-4096x4096-r64-bf16"}
    assert _quick_ids(monkeypatch, harness.GPU_GRID) == expected


def test_quick_on_the_cpu_grid_uses_its_own_sizes(monkeypatch):
    ids = _quick_ids(monkeypatch, harness.CPU_GRID)
    assert len(ids) == 12 and all("-fwd_bwd-M256-" in i for i in ids)
    assert {i for i in ids if i.startswith("q")} == {
        "qsorsa-fwd_bwd-M256-256x256-r32-fp32", "qlora-fwd_bwd-M256-256x256-r32-fp32"}


def _collect_gpu(root: Path, target: str) -> list[str]:
    """Test ids that ``pytest -p bench.gpu_marker -m gpu`` collects under ``root``."""
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "bench.gpu_marker", "-m", "gpu", "--collect-only", "-q",
         "-p", "no:cacheprovider", target],
        cwd=root, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(line for line in proc.stdout.splitlines() if "::" in line)


def test_gpu_marker_plugin_selects_marked_and_cuda_only_tests(tmp_path: Path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent('''
        import pytest

        requires_cuda = pytest.mark.skipif(True, reason="needs a CUDA GPU")

        @requires_cuda
        def test_cuda_only(): pass

        @pytest.mark.parametrize("dtype", [pytest.param("bf16", marks=requires_cuda), "fp32"])
        def test_param(dtype): pass

        @pytest.mark.gpu
        def test_marked(): pass

        @pytest.mark.skipif(True, reason="needs pyarrow")
        def test_other_skip(): pass

        def test_plain(): pass
    '''))
    assert _collect_gpu(tmp_path, "test_sample.py") == ["test_sample.py::test_cuda_only", "test_sample.py::test_marked",
                         "test_sample.py::test_param[bf16]"]


def test_quick_autotune_makes_the_benchmarker_short():
    pytest.importorskip("triton")
    from bench import quick_autotune

    class FakeDriver:
        def get_benchmarker(self):
            raise AssertionError("replaced")

    drv = FakeDriver()
    assert quick_autotune.install(drv)
    bench = drv.get_benchmarker()
    assert bench.keywords == {"warmup": quick_autotune.WARMUP_MS, "rep": quick_autotune.REP_MS}
    assert bench.func.__name__ == "do_bench"
    assert not quick_autotune.install(object())  # a Triton without get_benchmarker: left alone


def test_gpu_marker_selects_the_dtype_cases_of_the_kernel_numerics_files(tmp_path: Path):
    kernels = tmp_path / "tests" / "kernels"
    kernels.mkdir(parents=True)
    body = textwrap.dedent('''
        import pytest, torch

        @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
        def test_numerics(dtype): pass

        def test_prune_rule(): pass
    ''')
    (kernels / "test_grouped_sorsa.py").write_text(body)
    (kernels / "test_other.py").write_text(body)
    assert _collect_gpu(tmp_path, "tests") == ["tests/kernels/test_grouped_sorsa.py::test_numerics[float16]",
                         "tests/kernels/test_grouped_sorsa.py::test_numerics[float32]"]


def test_quick_autotune_keeps_at_most_max_configs_after_the_kernels_own_prune():
    from bench import quick_autotune

    class FakeAutotuner:
        def prune_configs(self, kwargs):
            return [c for c in ["a", "b", "c", "d"] if c != kwargs.get("drop")]

    quick_autotune.cap_configs(FakeAutotuner, limit=2)
    quick_autotune.cap_configs(FakeAutotuner, limit=2)  # installing twice does not cap twice
    assert FakeAutotuner().prune_configs({"drop": "a"}) == ["b", "c"]
    quick_autotune.cap_configs(FakeAutotuner, limit=3)
    assert FakeAutotuner().prune_configs({}) == ["a", "b", "c"]


def test_on_timeout_plugin_writes_the_benchmark_json_and_junit_when_sigterm_stops_the_run(tmp_path: Path):
    (tmp_path / "test_slow.py").write_text(textwrap.dedent('''
        import os, signal, time

        def test_fast(benchmark):
            benchmark.pedantic(lambda: None, rounds=1)

        def test_stopped(benchmark):
            os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends
            time.sleep(30)
    '''))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "bench.on_timeout", "-p", "no:cacheprovider", "test_slow.py",
         "--benchmark-json", "out.json", "--junitxml", "out.xml", "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.returncode != 0
    import json

    names = [b["name"] for b in json.loads((tmp_path / "out.json").read_text())["benchmarks"]]
    assert names == ["test_fast"]
    assert 'name="test_fast"' in (tmp_path / "out.xml").read_text()
