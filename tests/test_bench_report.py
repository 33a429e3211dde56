"""bench/report.py on a small synthetic pytest-benchmark JSON: the table, the targets and the PNG."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(provider, mode, median_s, *, rank=64, tokens=4096, n=4096, m=11008, peak=None, saved=1000, kind="linear"):
    info = {
        "kind": kind, "provider": provider, "mode": mode, "tokens": tokens, "dtype": "bf16",
        "rank": rank, "device": "cuda", "device_name": "Test GPU", "timer": "cuda_events", "grid": "gpu",
        "median_s": median_s, "peak_bytes": peak, "saved_bytes": saved, "achieved_tflops": 100.0,
        "matmul_peak_tflops": 700.0, "versions": {"torch": "2.11.0", "triton": "3.6.0"},
    }
    if kind == "linear":
        info.update(n=n, m=m)
    else:
        info.update(hidden=4096, layers=2)
    return {
        "group": None, "name": f"test_{provider}_{mode}_r{rank}", "fullname": "x", "params": {}, "param": None,
        "extra_info": info, "options": {}, "stats": {"median": median_s, "mean": median_s, "rounds": 10},
    }


def _write(tmp_path: Path, benchmarks: list[dict]) -> Path:
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps({
        "machine_info": {}, "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": benchmarks, "datetime": "2025-01-01T00:00:00", "version": "5.3.1",
    }))
    return path


@pytest.fixture
def result(tmp_path: Path) -> Path:
    mib = 1024 * 1024
    return _write(tmp_path, [
        _bench("frozen", "fwd_bwd", 1.00e-3, rank=None, peak=900 * mib, saved=0),
        _bench("sorsa_fused", "fwd_bwd", 1.05e-3, peak=950 * mib),
        _bench("lora", "fwd_bwd", 1.60e-3, peak=1000 * mib, saved=2000),
        _bench("dense", "fwd_bwd", 2.00e-3, peak=1500 * mib),
        _bench("qlora", "fwd_bwd", 2.60e-3, peak=500 * mib),
        _bench("qsorsa", "fwd_bwd", 2.40e-3, peak=450 * mib),  # 1.08× QLoRA: misses the 1.3× target
        _bench("sorsa", "train_step", 20e-3, kind="e2e", peak=3000 * mib),
        _bench("lora", "train_step", 30e-3, kind="e2e", peak=3500 * mib),
        {"name": "test_regularizer_step[bf16-grouped_fused]", "extra_info": {}, "stats": {"median": 2e-4}},
    ])


def _row(text: str, *cells: str) -> str:
    lines = [line for line in text.splitlines() if all(f"| {c} |" in line for c in cells)]
    assert len(lines) == 1, f"expected one table row with {cells}, got {lines}"
    return lines[0]


def test_report_writes_markdown_and_png_under_out(result: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    md, png = report.write_report(result, tmp_path / "out")
    assert md == tmp_path / "out" / "synthetic.md" and md.is_file()
    assert png == tmp_path / "out" / "synthetic.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_report_ratios_against_frozen_floor_and_lora(result: Path, tmp_path: Path):
    md, _ = report.write_report(result, tmp_path)
    row = _row(md.read_text(), "fwd_bwd", "sorsa_fused")
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = [c.strip() for c in _row(md.read_text(), "mode", "provider").strip("|").split("|")]
    got = dict(zip(header, cells))
    assert got["time ÷ frozen"] == "1.05"
    assert got["LoRA ÷ time"] == "1.52"  # 1.60 / 1.05
    assert got["QLoRA ÷ time"] == "2.48"  # 2.60 / 1.05
    assert got["peak ÷ LoRA"] == "0.95"
    assert got["saved ÷ LoRA"] == "0.50"
    assert got["M"] == "4096" and got["n×m"] == "4096×11008" and got["r"] == "64"


def test_report_checks_issue3_targets(result: Path, tmp_path: Path):
    text = report.write_report(result, tmp_path)[0].read_text()
    assert _row(text, "fwd+bwd time ÷ frozen").endswith("| ≤ 1.15 | pass |")
    assert _row(text, "speed-up vs PEFT LoRA").endswith("| 1.52 | ≥ 1.4 | pass |")
    assert _row(text, "peak memory ÷ PEFT LoRA").endswith("| pass |")
    assert _row(text, "QSORSA speed-up vs QLoRA").endswith("| 1.08 | ≥ 1.3 | FAIL |")


def test_report_end_to_end_table_and_other_benchmarks(result: Path, tmp_path: Path):
    text = report.write_report(result, tmp_path)[0].read_text()
    assert "| 1.50 |" in _row(text, "sorsa", "20.0")  # LoRA 30 ms / SORSA 20 ms
    assert "test_regularizer_step[bf16-grouped_fused]" in text
    assert "Test GPU" in text.splitlines()[0]


def test_report_rejects_a_file_that_is_not_pytest_benchmark_json(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON file"):
        report.load(bad)


def test_report_rejects_a_rank_absent_from_the_file(result: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"--rank 7 is not in the file; ranks present: \[64\]"):
        report.write_report(result, tmp_path, rank=7)


def test_report_runs_as_a_script_with_out_dir(result: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "script-out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "report.py"), str(result), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "## Layer benchmark" in proc.stdout
    assert (out / "synthetic.md").is_file() and (out / "synthetic.png").is_file()


def test_report_without_matplotlib_writes_markdown_and_says_how_to_get_the_png(
    result: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "no-mpl"
    md, png = report.write_report(result, out)
    assert png is None and not list(out.glob("*.png"))
    text = md.read_text()
    assert "## Layer benchmark" in text and "![time vs tokens]" not in text
    assert "matplotlib is not installed" in text
    assert f"python3 -m bench.report {result} --out {out}" in text


def test_report_script_without_matplotlib_exits_zero_and_names_only_the_markdown(result: Path, tmp_path: Path):
    out = tmp_path / "script-no-mpl"
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, sys.argv[1]); "
        "from bench import report; sys.exit(report.main(sys.argv[2:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REPO), str(result), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no PNG: matplotlib is not installed" in proc.stderr
    assert (out / "synthetic.md").is_file() and not (out / "synthetic.png").exists()


def _regularizer(provider: str, dtype: str, ms: float) -> dict:
    info = {"kind": "regularizer", "provider": provider, "dtype": dtype, "ms_per_step": ms, "rank": 128,
            "matrices": 448, "device": "Test GPU"}
    return {"name": f"test_regularizer_step[{dtype}-{provider}]", "extra_info": info, "stats": {"median": ms / 1e3}}


def test_report_regularizer_table_checks_the_speedup_target(tmp_path: Path):
    path = _write(tmp_path, [
        _regularizer("reference_loop", "fp32", 60.0), _regularizer("grouped_fused", "fp32", 2.0),
        _regularizer("reference_loop", "bf16", 40.0), _regularizer("grouped_fused", "bf16", 5.0),
    ])
    text = report.write_report(path, tmp_path)[0].read_text()
    assert "## Regularizer step" in text
    assert _row(text, "fp32", "grouped_fused").endswith("| 30.00 |")
    assert _row(text, "grouped vs per-matrix loop, fp32").endswith("| 30.0 | ≥ 10 | pass |")
    assert _row(text, "grouped vs per-matrix loop, bf16").endswith("| 8.0 | ≥ 10 | FAIL |")
    assert "Other benchmarks" not in text  # regularizer rows are not listed twice


def test_report_header_names_driver_and_missing_bitsandbytes_from_machine_info(tmp_path: Path):
    path = tmp_path / "machine.json"
    path.write_text(json.dumps({
        "machine_info": {"sorsa_bench": {"device": "cuda", "device_name": "Test GPU", "driver": "550.54.15",
                                         "versions": {"torch": "2.11.0", "bitsandbytes": None}}},
        "benchmarks": [_regularizer("grouped_fused", "fp32", 2.0)], "datetime": "2025-01-01T00:00:00",
    }))
    head = report.write_report(path, tmp_path)[0].read_text().split("## ")[0]
    assert "Test GPU" in head.splitlines()[0]
    assert "driver 550.54.15" in head and "bitsandbytes not installed" in head
