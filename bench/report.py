"""pytest-benchmark JSON → a markdown table of ratios and a PNG plot.

Usage::

    python -m bench.report bench/results/NVIDIA-H100.json            # or: python bench/report.py …
    python -m bench.report RESULT.json --out DIR --rank 64

Writes ``DIR/<name>.md`` and, when matplotlib is installed, ``DIR/<name>.png`` (``DIR``
defaults to ``bench/results/``) and prints the markdown.  Without matplotlib the markdown
says so and how to add the plot later (the PNG is made from the same JSON).  Ratios are taken between rows of the same file (same process, same
run): ``time ÷ frozen`` against the frozen ``nn.Linear`` of the same mode, tokens, shape
and dtype (lower is better, 1.00 is the floor); ``LoRA ÷ time`` and ``QLoRA ÷ time`` are
speed-ups against PEFT LoRA / QLoRA of the same mode, tokens, shape, rank and dtype
(higher is better); ``peak ÷ LoRA`` and ``saved ÷ LoRA`` compare memory the same way.

Standalone on purpose: it needs only the standard library, and matplotlib for the PNG (no torch).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

try:
    from . import report_plot
    from . import targets as target_checks
except ImportError:  # run as a script: python bench/report.py
    import report_plot  # type: ignore[no-redef]
    import targets as target_checks  # type: ignore[no-redef]

MODES = ("forward", "backward", "fwd_bwd", "step")
PROVIDERS = ("frozen", "sorsa_fused", "sorsa_reference", "lora", "qlora", "dense", "qsorsa")
E2E_PROVIDERS = ("sorsa", "lora", "qlora", "qsorsa")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024
#: What the markdown says when matplotlib is missing.
NO_PNG_NOTE = (
    "No plot: matplotlib is not installed here. `python3 -m pip install matplotlib` (or carry its "
    "wheel, see bench/README.md), then `python3 -m bench.report {json} --out {out}` writes `{png}`."
)
@dataclass
class Row:
    """One benchmark of the file, with what the report needs."""

    name: str
    kind: str
    provider: str
    mode: str
    tokens: int
    dtype: str
    rank: Optional[int]
    n: Optional[int]
    m: Optional[int]
    median_s: float
    info: dict

    def get(self, key: str) -> Any:
        return self.info.get(key)

    @property
    def shape(self) -> tuple:
        return (self.n, self.m)


def load(path: Path) -> tuple[dict, list[Row], list[dict]]:
    """``(the whole JSON, rows of this suite, other benchmarks)`` of a ``--benchmark-json`` file."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' key)")
    rows, others = [], []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        stats = bench.get("stats") or {}
        median = stats.get("median", info.get("median_s"))
        if info.get("kind") not in ("linear", "e2e") or median is None:
            others.append(bench)
            continue
        rows.append(Row(
            name=bench.get("name", ""), kind=info["kind"], provider=info["provider"], mode=info["mode"],
            tokens=int(info["tokens"]), dtype=str(info["dtype"]), rank=info.get("rank"),
            n=info.get("n"), m=info.get("m"), median_s=float(median), info=info,
        ))
    return data, rows, others


# --------------------------------------------------------------------------- formatting
def _ratio(x: Optional[float]) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _num(x: Optional[float], fmt: str = "{:,.0f}") -> str:
    return "—" if x is None else fmt.format(x)


def _mib(b: Optional[float]) -> str:
    return "—" if b is None else f"{b / MIB:,.1f}"


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _table(header: list[str], body: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _order(value: str, order: tuple[str, ...]) -> int:
    return order.index(value) if value in order else len(order)


# --------------------------------------------------------------------------- tables
def _linear_key(r: Row) -> tuple:
    return (r.mode, r.tokens, r.n, r.m, r.dtype)


def linear_table(rows: list[Row]) -> list[str]:
    """The layer benchmark with its ratios; empty when there are no layer rows."""
    linear = [r for r in rows if r.kind == "linear"]
    if not linear:
        return []
    floor = {_linear_key(r): r for r in linear if r.provider == "frozen"}
    lora = {(_linear_key(r), r.rank): r for r in linear if r.provider == "lora"}
    qlora = {(_linear_key(r), r.rank): r for r in linear if r.provider == "qlora"}
    has_q = bool(qlora)
    has_peak = any(r.get("peak_bytes") is not None for r in linear)
    header = ["mode", "dtype", "M", "n×m", "r", "provider", "ms", "tokens/s", "TFLOP/s",
              "time ÷ frozen", "LoRA ÷ time"]
    header += ["QLoRA ÷ time"] if has_q else []
    header += ["peak MiB", "peak ÷ LoRA"] if has_peak else []
    header += ["saved MiB", "saved ÷ LoRA"]
    body = []
    linear.sort(key=lambda r: (_order(r.mode, MODES), r.dtype, r.tokens, r.n or 0, r.m or 0,
                               r.rank or 0, _order(r.provider, PROVIDERS)))
    for r in linear:
        f = floor.get(_linear_key(r))
        lo = lora.get((_linear_key(r), r.rank))
        ql = qlora.get((_linear_key(r), r.rank))
        cells = [r.mode, r.dtype, str(r.tokens), f"{r.n}×{r.m}", "—" if r.rank is None else str(r.rank),
                 r.provider, _ms(r.median_s), _num(r.tokens / r.median_s), _num(r.get("achieved_tflops"), "{:.2f}"),
                 _ratio(_div(r.median_s, f.median_s if f else None)),
                 _ratio(_div(lo.median_s if lo else None, r.median_s))]
        if has_q:
            cells.append(_ratio(_div(ql.median_s if ql else None, r.median_s)))
        if has_peak:
            cells += [_mib(r.get("peak_bytes")), _ratio(_div(r.get("peak_bytes"), lo.get("peak_bytes") if lo else None))]
        cells += [_mib(r.get("saved_bytes")), _ratio(_div(r.get("saved_bytes"), lo.get("saved_bytes") if lo else None))]
        body.append(cells)
    return ["## Layer benchmark", "",
            "`time ÷ frozen`: lower is better (1.00 = the frozen nn.Linear). `LoRA ÷ time`, "
            "`QLoRA ÷ time`: speed-up, higher is better. Memory ratios: lower is better.", "",
            *_table(header, body), ""]


def e2e_table(rows: list[Row]) -> list[str]:
    """The end-to-end Llama step, with speed-up and memory against PEFT LoRA."""
    e2e = [r for r in rows if r.kind == "e2e"]
    if not e2e:
        return []
    key = lambda r: (r.tokens, r.dtype, r.rank)  # noqa: E731
    lora = {key(r): r for r in e2e if r.provider == "lora"}
    qlora = {key(r): r for r in e2e if r.provider == "qlora"}
    has_q, has_peak = bool(qlora), any(r.get("peak_bytes") is not None for r in e2e)
    header = ["model", "dtype", "tokens", "r", "provider", "ms/step", "tokens/s", "TFLOP/s", "LoRA ÷ time"]
    header += ["QLoRA ÷ time"] if has_q else []
    header += ["peak MiB", "peak ÷ LoRA"] if has_peak else []
    header += ["saved MiB", "saved ÷ LoRA"]
    body = []
    for r in sorted(e2e, key=lambda r: (r.dtype, r.tokens, r.rank or 0, _order(r.provider, E2E_PROVIDERS))):
        lo, ql = lora.get(key(r)), qlora.get(key(r))
        model = f"{r.get('layers')}-layer Llama h={r.get('hidden')}"
        cells = [model, r.dtype, str(r.tokens), str(r.rank), r.provider, _ms(r.median_s), _num(r.tokens / r.median_s),
                 _num(r.get("achieved_tflops"), "{:.2f}"), _ratio(_div(lo.median_s if lo else None, r.median_s))]
        if has_q:
            cells.append(_ratio(_div(ql.median_s if ql else None, r.median_s)))
        if has_peak:
            cells += [_mib(r.get("peak_bytes")), _ratio(_div(r.get("peak_bytes"), lo.get("peak_bytes") if lo else None))]
        cells += [_mib(r.get("saved_bytes")), _ratio(_div(r.get("saved_bytes"), lo.get("saved_bytes") if lo else None))]
        body.append(cells)
    return ["## End-to-end training step", "", *_table(header, body), ""]


def _is_regularizer(bench: dict) -> bool:
    info = bench.get("extra_info") or {}
    return info.get("kind") == "regularizer" or str(bench.get("name", "")).startswith("test_regularizer_step")


def regularizer_table(others: list[dict]) -> list[str]:
    """The regularizer step per dtype and provider, with the speed-up over the per-matrix loop."""
    regs = [b for b in others if _is_regularizer(b) and (b.get("extra_info") or {}).get("ms_per_step") is not None]
    if not regs:
        return []
    loop = {b["extra_info"].get("dtype"): b["extra_info"]["ms_per_step"]
            for b in regs if b["extra_info"].get("provider") == "reference_loop"}
    body = []
    for b in regs:
        info = b["extra_info"]
        dtype, ms = info.get("dtype"), info["ms_per_step"]
        speedup = _div(loop.get(dtype), ms)
        body.append([str(dtype), str(info.get("provider")), f"{ms:.3f}", str(info.get("matrices", "—")),
                     str(info.get("rank", "—")), "—" if info.get("provider") == "reference_loop" else _ratio(speedup)])
    return ["## Regularizer step (Llama-7B adapter set)", "",
            *_table(["dtype", "provider", "ms/step", "matrices", "r", "loop ÷ time"], body), ""]


def others_table(others: list[dict]) -> list[str]:
    """Benchmarks of other modules in the same file (e.g. the regularizer), by median."""
    if not others:
        return []
    body = [[b.get("name", "?"), _ms(b["stats"]["median"]) if b.get("stats") else "—"] for b in others]
    return ["## Other benchmarks in this file", "", *_table(["benchmark", "median ms"], body), ""]


def header_lines(path: Path, data: dict, rows: list[Row]) -> list[str]:
    info = rows[0].info if rows else {}
    machine = (data.get("machine_info") or {}).get("sorsa_bench") or {}
    device_name = info.get("device_name") or machine.get("device_name") or "unknown device"
    lines = [f"# sorsa-kernels benchmarks — {device_name}", "",
             f"- source: `{Path(path).name}` ({data.get('datetime', 'no date')})"]
    if info:
        lines.append(f"- device: {info.get('device')} ({info.get('device_name')}), timer: {info.get('timer')}, grid: {info.get('grid')}")
    elif machine:
        lines.append(f"- device: {machine.get('device')} ({machine.get('device_name')})")
    versions = info.get("versions") or machine.get("versions") or {}
    if machine.get("driver") and not versions.get("driver"):
        versions = {**versions, "driver": machine["driver"]}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
                     + ("; bitsandbytes not installed" if "bitsandbytes" in versions and not versions["bitsandbytes"] else ""))
    if info:
        peaks = {}
        for r in rows:
            if r.get("matmul_peak_tflops") is not None:
                peaks[r.dtype] = r.get("matmul_peak_tflops")
        if peaks:
            lines.append("- plain matmul peak measured in the run: "
                         + ", ".join(f"{dt} {tf:.1f} TFLOP/s" for dt, tf in peaks.items()))
    commit = data.get("commit_info") or {}
    if commit.get("id"):
        lines.append(f"- commit: {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''}")
    lines.append("")
    return lines


def tests_xml(path: Path) -> Path:
    """The GPU tests' JUnit XML that ``bench/run_gpu.sh`` writes beside the results JSON."""
    return Path(path).with_name(f"{Path(path).stem}-tests.xml")


def run_targets(path: Path, data: dict) -> list:
    """Issue 33's targets of the results at ``path`` (with its GPU-test XML when there is one)."""
    xml = tests_xml(path)
    tests = target_checks.read_junit(xml) if xml.is_file() else None
    return target_checks.evaluate(data["benchmarks"], tests)


def markdown(path: Path, data: dict, rows: list[Row], others: list[dict], checked: Optional[list] = None) -> str:
    regularizer = regularizer_table(others)
    rest = [b for b in others if not (regularizer and _is_regularizer(b))]
    checked = run_targets(path, data) if checked is None else checked
    parts = (header_lines(path, data, rows) + target_checks.markdown(checked) + linear_table(rows) + e2e_table(rows)
             + regularizer + others_table(rest))
    if not rows and not others:
        parts.append("The file holds no benchmark results (was it run with --benchmark-disable?).")
    return "\n".join(parts).rstrip() + "\n"


# --------------------------------------------------------------------------- plot
def pick_rank(rows: list[Row], wanted: Optional[int]) -> Optional[int]:
    ranks = sorted({r.rank for r in rows if r.kind == "linear" and r.rank})
    if not ranks:
        return None
    if wanted is not None:
        if wanted not in ranks:
            raise ValueError(f"--rank {wanted} is not in the file; ranks present: {ranks}")
        return wanted
    return min(ranks, key=lambda r: (abs(r - 64), r))


# --------------------------------------------------------------------------- entry point
def have_matplotlib() -> bool:
    """Whether matplotlib imports here (the PNG needs it; the markdown does not)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(path: Path, out: Path = DEFAULT_OUT, rank: Optional[int] = None) -> tuple[Path, Optional[Path]]:
    """Write ``out/<stem>.md`` and ``out/<stem>.png`` for the JSON at ``path``; return both paths.

    Without matplotlib only the markdown is written (it says how to get the PNG) and the
    second path is None.  The targets (``bench/targets.py``) go into the markdown and into the
    JSON itself, under ``"sorsa_targets"`` (the file is rewritten with that one key added).

    Example::

        >>> md, png = write_report(Path("bench/results/NVIDIA-H100.json"))
    """
    path, out = Path(path), Path(out)
    data, rows, others = load(path)
    chosen = pick_rank(rows, rank)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{path.stem}.md"
    png: Optional[Path] = out / f"{path.stem}.png"
    checked = run_targets(path, data)
    text = markdown(path, data, rows, others, checked)
    data["sorsa_targets"] = target_checks.as_json(checked)
    path.write_text(json.dumps(data, indent=2))
    if have_matplotlib():
        text += f"\n![time vs tokens]({png.name})\n"
    else:
        text += "\n" + NO_PNG_NOTE.format(json=path, out=out, png=png) + "\n"
        png = None
    md.write_text(text)
    if png is not None:
        device = rows[0].get("device_name") if rows else "unknown device"
        report_plot.plot(rows, png, chosen, f"sorsa-kernels — {device} — {path.name}", PROVIDERS, E2E_PROVIDERS, MODES)
    return md, png


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="a pytest-benchmark --benchmark-json file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: bench/results/)")
    parser.add_argument("--rank", type=int, default=None, help="rank plotted (default: the one closest to 64)")
    args = parser.parse_args(argv)
    if not args.result.is_file():
        parser.error(f"no such file: {args.result}")
    try:
        md, png = write_report(args.result, args.out, args.rank)
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(md.read_text())
    print(f"\nwrote {md}" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
