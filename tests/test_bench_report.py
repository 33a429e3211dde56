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


def test_report_checks_the_layer_targets(result: Path, tmp_path: Path):
    text = report.write_report(result, tmp_path)[0].read_text()
    assert "| 1.05 | ≤ 1.15 | pass |" in _row(text, "fused SORSA ÷ frozen nn.Linear time")
    assert "| 1.52 | ≥ 1.4 | pass |" in _row(text, "PEFT LoRA ÷ fused SORSA time")
    assert "| 0.95 | ≤ 1 | pass |" in _row(text, "fused SORSA peak ÷ PEFT LoRA peak")
    assert "| 1.08 | ≥ 1.3 | miss |" in _row(text, "QLoRA ÷ QSORSA time")


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
    assert "| 30.00 | ≥ 10 | pass |" in _row(text, "grouped regularizer speed-up over the loop", "224 layers, 448 matrices, r=128, fp32")
    assert "| 8.00 | ≥ 10 | miss |" in _row(text, "grouped regularizer speed-up over the loop", "224 layers, 448 matrices, r=128, bf16")
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


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.kernels.test_sorsa_linear_kernels" name="test_fwd[bfloat16]"/>
<testcase classname="tests.ops.test_sorsa_linear_op" name="test_op[float32]"/>
<testcase classname="tests.quant.test_qsorsa_op" name="test_backends_match_float64_oracle_bf16_gpu[triton]">
  <failure message="rel err 0.3">trace</failure></testcase>
<testcase classname="tests.kernels.test_ortho_reg" name="test_large[bfloat16]"/>
<testcase classname="tests.kernels.test_grouped_sorsa" name="test_fwd[bfloat16]"/>
<testcase classname="tests.ops.test_gpu_numerics" name="test_qsorsa_experts_bf16_matches_float64_oracle_gpu[chunk1]">
  <skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>"""


def _experts(provider, median_s, peak):
    info = {"kind": "experts", "provider": provider, "mode": "fwd_bwd", "tokens": 4096, "dtype": "bf16", "rank": 64,
            "experts": 128, "top_k": 8, "hidden": 2048, "intermediate": 768, "peak_bytes": peak}
    return {"name": f"test_moe_block_fwd_bwd[{provider}]", "extra_info": info, "stats": {"median": median_s}}


def _target(text, name):
    return [c.strip() for c in _row(text, name).strip("|").split("|")]


def test_report_marks_every_issue_33_target_pass_or_miss_from_synthetic_results(tmp_path: Path):
    gib = 1024**3
    fused = [_bench(p, "fwd_bwd", t, rank=128, n=n, m=m, peak=1)
             for n, m, t in ((4096, 4096, 2e-3), (4096, 11008, 5e-3)) for p in ("sorsa_fused",)]
    path = _write(tmp_path, fused + [
        _regularizer("reference_loop", "bf16", 80.0), _regularizer("grouped_fused", "bf16", 4.0),
        {"name": "svd", "extra_info": {"kind": "svd_init", "layers": 224, "rank": 128, "dtype": "bf16",
                                       "total_s": 12.5}, "stats": {"median": 12.5}},
        _experts("lora", 30e-3, 20 * gib), _experts("sorsa", 10e-3, 8 * gib), _experts("qsorsa", 20e-3, 6 * gib),
        {"name": "plan", "extra_info": {"kind": "plan", "plan_over_measured": 1.25, "hidden": 2048, "layers": 4,
                                        "tokens": 4096, "rank": 64, "plan_status": "ok"}, "stats": {"median": 0.1}},
    ])
    path.with_name("synthetic-tests.xml").write_text(JUNIT)
    text = report.write_report(path, tmp_path / "out")[0].read_text()
    # share = 4 / (4 + 32 × (4 × 2 + 3 × 5)) = 0.54 %
    assert _target(text, "regularizer share of a 7B step")[2:5] == ["0.54", "< 1 %", "pass"]
    assert _target(text, "grouped regularizer speed-up over the loop")[2:5] == ["20.00", "≥ 10", "pass"]
    assert _target(text, "randomized SVD init, 224 weights")[2:5] == ["12.50", "≤ 30 s", "pass"]
    assert _target(text, "PEFT LoRA ÷ SORSA experts time (sorsa)")[2:5] == ["3.00", "≥ 2", "pass"]
    assert _target(text, "PEFT LoRA ÷ SORSA experts time (qsorsa)")[2:5] == ["1.50", "≥ 2", "miss"]
    assert _target(text, "SORSA experts peak ÷ PEFT LoRA peak (sorsa)")[2:5] == ["0.40", "≤ 0.5", "pass"]
    assert _target(text, "SORSA experts peak ÷ PEFT LoRA peak (qsorsa)")[2:5] == ["0.30", "≤ 0.5", "pass"]
    assert _target(text, "plan ÷ measured peak")[2:5] == ["1.25", "1 ± 0.1", "miss"]
    assert _target(text, "bf16 numerics vs float64: linear")[1:5] == ["1/1 bf16 tests passed", "1.00", "all pass", "pass"]
    qsorsa = _target(text, "bf16 numerics vs float64: QSORSA linear")
    assert qsorsa[4] == "miss" and "rel err 0.3" in qsorsa[5]
    assert _target(text, "bf16 numerics vs float64: experts (NF4)")[4:6] == ["not measured", "no bf16 test ran"]
    assert _target(text, "QLoRA ÷ QSORSA time")[4] == "not measured"  # no qsorsa row: recorded, no crash
    stored = {t["name"]: t["result"] for t in json.loads(path.read_text())["sorsa_targets"]}
    assert stored["plan ÷ measured peak"] == "miss" and stored["regularizer share of a 7B step"] == "pass"


def test_plan_unavailable_is_recorded_not_measured(tmp_path: Path):
    path = _write(tmp_path, [{"name": "plan", "stats": {"median": 0.1}, "extra_info": {
        "kind": "plan", "plan_over_measured": None, "plan_status": "plan unavailable: No module named 'x'"}}])
    row = _target(report.write_report(path, tmp_path / "out")[0].read_text(), "plan ÷ measured peak")
    assert row[4:6] == ["not measured", "plan unavailable: No module named 'x'"]
