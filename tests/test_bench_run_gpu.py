"""bench/run_gpu.sh: argument parsing (--dry-run prints the commands) and exit-status propagation.

The script is run for real with a stub interpreter (``PYTHON=stub``) that logs its arguments,
answers the device query, writes the benchmark JSON and exits with the status asked for, so
these tests need neither a GPU nor torch in the subprocess.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "run_gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")

STUB = r"""#!/usr/bin/env bash
all="$*"
printf '%s\n' "${all//$'\n'/ }" >> "$STUB_LOG"
if [[ "$1" == "-c" ]]; then echo "Fake-GPU-80GB"; exit 0; fi
if [[ "$1 $2" == "-m pytest" ]]; then
    prev=""
    for a in "$@"; do
        if [[ "$prev" == "--benchmark-json" ]]; then echo '{"benchmarks": []}' > "$a"; fi
        prev="$a"
    done
    if [[ " $* " == *" --benchmark-only "* ]]; then exit "${STUB_BENCH_STATUS:-0}"; fi
    exit "${STUB_TEST_STATUS:-0}"
fi
if [[ "$1 $2" == "-m bench.report" ]]; then exit 0; fi
exit 99
"""


def _dry_run(*args: str) -> dict[str, list[str]]:
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = {}
    for line in proc.stdout.splitlines():
        name, _, command = line.partition(":")
        if name in ("tests", "bench", "report"):
            steps[name] = shlex.split(command)
    return steps


def _option(cmd: list[str], flag: str) -> str:
    """The value of ``flag`` among pytest's own arguments (after ``python -m pytest``)."""
    return cmd[cmd.index(flag, 3) + 1]


def test_quick_runs_gpu_tests_then_the_quick_benchmarks_without_compiled_loop():
    steps = _dry_run("--quick")
    assert list(steps) == ["tests", "bench", "report"]
    tests, bench = steps["tests"], steps["bench"]
    assert tests[:3] == ["python3", "-m", "pytest"] and "tests" in tests
    assert _option(tests, "-m") == "gpu"
    plugins = [tests[i + 1] for i, a in enumerate(tests) if a == "-p"]
    assert "bench.gpu_marker" in plugins and "bench.quick_autotune" in plugins
    assert "--benchmark-only" not in tests  # tests are not benchmarks: --benchmark-only would skip them
    assert bench[:5] == ["python3", "-m", "pytest", "bench/bench_linear.py", "bench/bench_regularizer.py"]
    assert _option(tests, "--junitxml") == _option(bench, "--benchmark-json").replace(".json", "-tests.xml")
    assert _option(bench, "-m") == "quick and not compiled_loop"
    assert "--benchmark-only" in bench
    assert _option(bench, "--benchmark-json").startswith("bench/results/DEVICE-")
    assert _option(bench, "--benchmark-json").endswith("-quick.json")
    assert steps["report"][:4] == ["python3", "-m", "bench.report", _option(bench, "--benchmark-json")]


def test_quick_plan_covers_every_target_of_issue_33(monkeypatch):
    """Each target's benchmark file is in the quick step, each selected case carries ``quick``, and
    the report checks every target name (bench/targets.py) — the bf16 numerics from the GPU tests."""
    from bench import bench_e2e, bench_experts, bench_linear, bench_regularizer, bench_svd_init, harness, targets

    bench = _dry_run("--quick")["bench"]
    files = {a for a in bench if a.startswith("bench/bench_")}
    assert files == {"bench/bench_linear.py", "bench/bench_regularizer.py", "bench/bench_experts.py",
                     "bench/bench_svd_init.py", "bench/bench_e2e.py"}
    monkeypatch.setattr(harness, "grid", lambda: harness.GPU_GRID)
    quick = {c.id for c in bench_linear._cases() if any(m.name == "quick" for m in c.marks)}
    for rank in (64, 128):  # fused vs frozen and vs PEFT LoRA, both shapes
        for shape in ("4096x4096", "4096x11008"):
            assert {f"{p}-fwd_bwd-M4096-{shape}-r{rank}-bf16" for p in ("sorsa_fused", "lora")} <= quick
    assert {"qsorsa-fwd_bwd-M4096-4096x4096-r64-bf16", "qlora-fwd_bwd-M4096-4096x4096-r64-bf16"} <= quick
    assert bench_regularizer.RANK == 128 and bench_regularizer.LAYERS * len(bench_regularizer.PROJECTIONS) == 224
    assert (bench_svd_init.LAYERS_GPU * len(bench_svd_init.PROJECTIONS_7B), bench_svd_init.RANK_GPU) == (224, 128)
    s = bench_experts.QWEN3_30B_A3B
    assert (s.experts, s.top_k, s.hidden, s.intermediate, s.tokens) == (128, 8, 2048, 768, 4096)
    assert any(m.name == "quick" for m in bench_experts.pytestmark)
    assert bench_svd_init.pytestmark.name == "quick"
    assert any(m.name == "quick" for m in bench_e2e.test_plan_against_measured_peak.pytestmark)
    checked = {t.name.split(" (")[0].split(":")[0] for t in targets.evaluate([], [])}
    assert checked == set(targets.TARGET_NAMES)


def test_budget_splits_the_time_and_out_copies_every_result():
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--quick", "--budget", "540", "--out", "/tmp/o"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "budget: 540 s; tests 216 s; report 30 s; benchmarks the rest" in proc.stdout
    copy = [line for line in proc.stdout.splitlines() if line.startswith("copy:")][0]
    for suffix in (".json", ".md", ".png", "-tests.xml", "-bench.xml"):
        assert f"-quick{suffix}" in copy
    assert copy.endswith("-> /tmp/o")


@pytest.mark.parametrize("value", ["abc", "60"])
def test_budget_refuses_a_value_that_is_not_whole_seconds_of_at_least_120(value):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--quick", "--budget", value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"--budget is whole seconds, at least 120 (got '{value}')" in proc.stderr


def test_gpu_tests_run_in_one_process_without_xdist_or_with_one_worker(monkeypatch):
    monkeypatch.setenv("PYTHON", sys.executable)  # this interpreter: xdist or not, one worker asked
    monkeypatch.setenv("SORSA_TEST_WORKERS", "1")
    assert "-n" not in _dry_run("--quick")["tests"]


def test_quick_compiled_loop_opts_in_the_compiled_baseline():
    assert _option(_dry_run("--quick", "--compiled-loop")["bench"], "-m") == "quick"


def test_quick_skip_tests_runs_only_the_benchmarks():
    assert list(_dry_run("--quick", "--skip-tests")) == ["bench", "report"]


def test_default_runs_the_whole_suite_and_passes_other_arguments_to_pytest():
    steps = _dry_run("-k", "r64 and lora")
    assert list(steps) == ["bench", "report"]
    bench = steps["bench"]
    assert bench[3] == "bench/" and "-m" not in bench[3:]
    assert _option(bench, "-k") == "r64 and lora"
    json_name = Path(_option(bench, "--benchmark-json")).name
    assert json_name.startswith("DEVICE-") and json_name.endswith(".json") and "quick" not in json_name


def test_issue3_selects_its_marker():
    bench = _dry_run("--issue3")["bench"]
    assert bench[3] == "bench/bench_linear.py" and _option(bench, "-m") == "issue3"
    assert _option(bench, "--benchmark-json").endswith("-issue3.json")


def test_python_override_is_used_for_every_step(monkeypatch):
    monkeypatch.setenv("PYTHON", "/opt/py/bin/python3.12")
    steps = _dry_run("--quick")
    assert {cmd[0] for cmd in steps.values()} == {"/opt/py/bin/python3.12"}


@pytest.mark.parametrize("flag", ["--compiled-loop", "--skip-tests"])
def test_quick_only_flags_are_refused_without_quick(flag):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", flag], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{flag} applies to --quick" in proc.stderr


@pytest.fixture
def stub_run(tmp_path: Path):
    """Run a copy of run_gpu.sh (so results land under tmp_path) with the stub interpreter."""
    (tmp_path / "bench").mkdir()
    shutil.copy(SCRIPT, tmp_path / "bench" / "run_gpu.sh")
    stub = tmp_path / "stub-python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "stub.log"

    def run(*args: str, tests: int = 0, bench: int = 0) -> tuple[subprocess.CompletedProcess, list[str]]:
        env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log),
               "STUB_TEST_STATUS": str(tests), "STUB_BENCH_STATUS": str(bench)}
        proc = subprocess.run(["bash", str(tmp_path / "bench" / "run_gpu.sh"), *args],
                              capture_output=True, text=True, timeout=60, env=env)
        return proc, log.read_text().splitlines() if log.exists() else []

    return run


@pytest.mark.parametrize(
    ("tests", "bench", "expected"),
    [(0, 0, 0), (0, 1, 1), (1, 0, 1), (3, 2, 3), (5, 0, 0), (5, 4, 4)],
    ids=["all-pass", "bench-fails", "tests-fail", "first-failure-wins", "no-gpu-tests", "no-gpu-tests-bench-fails"],
)
def test_quick_exit_status_is_pytests(stub_run, tests, bench, expected):
    proc, calls = stub_run("--quick", tests=tests, bench=bench)
    assert proc.returncode == expected, proc.stderr
    assert [c.split()[:2] for c in calls] == [["-c", "import"], ["-c", "import"], ["-m", "pytest"],
                                              ["-m", "pytest"], ["-m", "bench.report"]]
    assert calls[1] == "-c import xdist"
    assert " -n 8" in calls[2]  # the stub imports xdist: the GPU tests run in 8 processes
    assert f"GPU tests: pytest exit status {tests}" in proc.stderr
    assert f"benchmarks: pytest exit status {bench}" in proc.stderr


def test_full_run_exit_status_is_the_benchmarks_and_the_report_is_still_written(stub_run, tmp_path):
    proc, calls = stub_run(bench=1)
    assert proc.returncode == 1
    assert calls[-1].startswith("-m bench.report bench/results/Fake-GPU-80GB-")  # report despite the failure
    results = list((tmp_path / "bench" / "results").glob("Fake-GPU-80GB-*.json"))
    assert len(results) == 1 and "quick" not in results[0].name
