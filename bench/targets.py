"""Issue 33's targets, checked on one run's results: each target's measured value, pass or miss.

Input: the benchmarks of a pytest-benchmark JSON (their ``extra_info``) and, when the run wrote
one, the GPU tests' JUnit XML (``<result>-tests.xml`` beside the JSON).  Ratios are taken between
rows of the same file (same process, same run).  A target without the rows it needs is listed as
``not measured`` with what is missing, so that a provider skipped on the machine (bitsandbytes
absent, the plan module not merged yet) is recorded, not a crash.

Standalone on purpose (standard library only), like ``bench/report.py`` that prints the table.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

PASS, MISS, NOT_MEASURED = "pass", "miss", "not measured"

FUSED_VS_FROZEN_MAX = {64: 1.15, 128: 1.20}
LORA_VS_FUSED_MIN = (64, 1.4)
FUSED_PEAK_VS_LORA_MAX = 1.0
QLORA_VS_QSORSA_MIN = (64, 1.3)
REGULARIZER_SPEEDUP_MIN = 10.0
REGULARIZER_SHARE_MAX_PCT = 1.0
SVD_INIT_MAX_S = 30.0
EXPERTS_SPEEDUP_MIN = 2.0
EXPERTS_PEAK_MAX = 0.5
PLAN_TOLERANCE = 0.10
#: The Llama-7B adapter set of the regularizer target: layers and, per layer, the projections of
#: each layer-benchmark shape (in × out): q, k, v, o at 4096×4096; gate, up, down at 4096×11008
#: (down is 11008×4096; the same FLOPs, timed as 4096×11008).
LLAMA_7B_LAYERS = 32
LLAMA_7B_LAYER_SET = {(4096, 4096): 4, (4096, 11008): 3}
#: Which GPU tests check each op's bf16 numerics: op → (test module, substring of the test name).
BF16_OPS = {
    "linear": [("test_sorsa_linear_kernels", ""), ("test_sorsa_linear_op", "")],
    "QSORSA linear": [("test_nf4_gemm", ""), ("test_qsorsa_op", "")],
    "regularizer": [("test_ortho_reg", "")],
    "experts (dense)": [("test_grouped_sorsa", ""), ("test_gpu_numerics", "grouped_experts")],
    "experts (NF4)": [("test_gpu_numerics", "qsorsa_experts")],
}
#: Every target this module checks (the run's plan must cover each: tests/test_bench_run_gpu.py).
TARGET_NAMES = (
    "fused SORSA ÷ frozen nn.Linear time", "PEFT LoRA ÷ fused SORSA time", "fused SORSA peak ÷ PEFT LoRA peak",
    "grouped regularizer speed-up over the loop", "regularizer share of a 7B step",
    "QLoRA ÷ QSORSA time", "randomized SVD init, 224 weights", "PEFT LoRA ÷ SORSA experts time",
    "SORSA experts peak ÷ PEFT LoRA peak", "plan ÷ measured peak", "bf16 numerics vs float64",
)


@dataclass
class Target:
    """One checked target: ``result`` is ``pass``, ``miss`` or ``not measured`` (``note`` says why)."""

    name: str
    case: str
    value: Optional[float]
    limit: str
    result: str
    note: str = ""


@dataclass
class TestCase:
    """One test of a JUnit XML file: ``outcome`` is passed, failed, error or skipped."""

    module: str
    name: str
    outcome: str
    message: str = ""


def read_junit(path: Path) -> list[TestCase]:
    """The test cases of a JUnit XML file written by ``pytest --junitxml``."""
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                message = child.get("message", "")
                break
        cases.append(TestCase(tc.get("classname", ""), tc.get("name", ""), outcome, message))
    return cases


def _median(bench: dict) -> Optional[float]:
    stats = bench.get("stats") or {}
    value = stats.get("median", (bench.get("extra_info") or {}).get("median_s"))
    return None if value is None else float(value)


def _check(name: str, case: str, value: Optional[float], limit: float, at_most: bool, note: str = "") -> Target:
    text = ("≤ " if at_most else "≥ ") + f"{limit:g}"
    if value is None:
        return Target(name, case, None, text, NOT_MEASURED, note)
    ok = value <= limit if at_most else value >= limit
    return Target(name, case, value, text, PASS if ok else MISS, note)


def _missing(name: str, limit: str, what: str) -> Target:
    return Target(name, "—", None, limit, NOT_MEASURED, f"no {what} in this run (skipped or not run: see the log)")


class _Index:
    """The benchmarks of one file by kind, with lookups by provider and case."""

    def __init__(self, benchmarks: Iterable[dict]) -> None:
        self.rows = [(b.get("extra_info") or {}, _median(b)) for b in benchmarks]

    def of(self, kind: str, **match: Any) -> list[tuple[dict, Optional[float]]]:
        return [(i, t) for i, t in self.rows if i.get("kind") == kind and all(i.get(k) == v for k, v in match.items())]

    def one(self, kind: str, **match: Any) -> tuple[Optional[dict], Optional[float]]:
        found = self.of(kind, **match)
        return found[0] if found else (None, None)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def linear_targets(ix: _Index) -> list[Target]:
    """Fused layer vs frozen and PEFT LoRA (time, peak) and QSORSA vs QLoRA, fwd+bwd rows."""
    out: list[Target] = []
    fused = ix.of("linear", provider="sorsa_fused", mode="fwd_bwd")
    names = TARGET_NAMES[:3]
    if not fused:
        out += [_missing(n, lim, "sorsa_fused fwd+bwd rows") for n, lim in
                zip(names, ("≤ 1.15 (r 64) / 1.20 (r 128)", f"≥ {LORA_VS_FUSED_MIN[1]:g}", f"≤ {FUSED_PEAK_VS_LORA_MAX:g}"))]
    for info, t in sorted(fused, key=lambda it: (it[0].get("tokens"), it[0].get("n"), it[0].get("m"), it[0].get("rank"))):
        key = {k: info.get(k) for k in ("mode", "tokens", "n", "m", "dtype")}
        case = f"M={info.get('tokens')} {info.get('n')}×{info.get('m')} r={info.get('rank')} {info.get('dtype')}"
        _, t_frozen = ix.one("linear", provider="frozen", **key)
        lora, t_lora = ix.one("linear", provider="lora", rank=info.get("rank"), **key)
        if info.get("rank") in FUSED_VS_FROZEN_MAX:
            out.append(_check(names[0], case, _ratio(t, t_frozen), FUSED_VS_FROZEN_MAX[info["rank"]], True,
                              "" if t_frozen else "no frozen row"))
        if info.get("rank") == LORA_VS_FUSED_MIN[0]:
            out.append(_check(names[1], case, _ratio(t_lora, t), LORA_VS_FUSED_MIN[1], False,
                              "" if t_lora else "no lora row"))
        peak_lora = lora.get("peak_bytes") if lora else None
        out.append(_check(names[2], case, _ratio(info.get("peak_bytes"), peak_lora), FUSED_PEAK_VS_LORA_MAX, True,
                          "" if peak_lora else "no lora peak"))
    q = ix.of("linear", provider="qsorsa", mode="fwd_bwd", rank=QLORA_VS_QSORSA_MIN[0])
    if not q:
        out.append(_missing(TARGET_NAMES[5], f"≥ {QLORA_VS_QSORSA_MIN[1]:g}", "qsorsa fwd+bwd row at r 64"))
    for info, t in q:
        key = {k: info.get(k) for k in ("mode", "tokens", "n", "m", "dtype", "rank")}
        _, t_q = ix.one("linear", provider="qlora", **key)
        case = f"M={info.get('tokens')} {info.get('n')}×{info.get('m')} r={info.get('rank')} {info.get('dtype')}"
        out.append(_check(TARGET_NAMES[5], case, _ratio(t_q, t), QLORA_VS_QSORSA_MIN[1], False,
                          "" if t_q else "no qlora row (bitsandbytes missing?)"))
    return out


def regularizer_targets(ix: _Index) -> list[Target]:
    """Grouped regularizer vs the per-matrix loop per dtype, and its share of a 7B step (bf16)."""
    out: list[Target] = []
    regs = {(i.get("dtype"), i.get("provider")): i.get("ms_per_step") for i, _ in ix.of("regularizer")}
    dtypes = sorted({d for d, p in regs if p == "grouped_fused"})
    if not dtypes:
        return [_missing(TARGET_NAMES[3], f"≥ {REGULARIZER_SPEEDUP_MIN:g}", "regularizer rows"),
                _missing(TARGET_NAMES[4], f"< {REGULARIZER_SHARE_MAX_PCT:g} %", "regularizer rows")]
    for dtype in dtypes:
        loop = regs.get((dtype, "reference_loop"))
        out.append(_check(TARGET_NAMES[3], f"224 layers, 448 matrices, r=128, {dtype}",
                          _ratio(loop, regs[(dtype, "grouped_fused")]), REGULARIZER_SPEEDUP_MIN, False,
                          "" if loop else "no reference_loop row"))
    grouped = regs.get(("bf16", "grouped_fused"))
    layers_ms = 0.0
    for (n, m), count in LLAMA_7B_LAYER_SET.items():
        _, t = ix.one("linear", provider="sorsa_fused", mode="fwd_bwd", tokens=4096, n=n, m=m, rank=128, dtype="bf16")
        layers_ms = None if t is None or layers_ms is None else layers_ms + count * t * 1e3
    basis = ("step ≥ regularizer + 32 × (4 × fused 4096×4096 + 3 × fused 4096×11008) fwd+bwd at M=4096, r=128 "
             "(attention, norms, optimizer left out: the share is an upper bound)")
    share = None
    if grouped is not None and layers_ms is not None:
        share = 100.0 * grouped / (grouped + LLAMA_7B_LAYERS * layers_ms)
    out.append(_check(TARGET_NAMES[4], "bf16, M=4096", share, REGULARIZER_SHARE_MAX_PCT, True,
                      basis if share is not None else "needs bf16 grouped_fused and sorsa_fused r=128 rows"))
    out[-1].limit = f"< {REGULARIZER_SHARE_MAX_PCT:g} %"
    return out


def init_experts_plan_targets(ix: _Index) -> list[Target]:
    """Randomized SVD init time, SORSA experts vs PEFT LoRA (time, peak), the memory plan."""
    out: list[Target] = []
    init, _ = ix.one("svd_init")
    if init is None:
        out.append(_missing(TARGET_NAMES[6], f"≤ {SVD_INIT_MAX_S:g} s", "svd_init row"))
    else:
        out.append(_check(TARGET_NAMES[6], f"{init.get('layers')} layers, r={init.get('rank')}, {init.get('dtype')}",
                          init.get("total_s"), SVD_INIT_MAX_S, True))
        out[-1].limit += " s"
    lora, t_lora = ix.one("experts", provider="lora")
    for provider in ("sorsa", "qsorsa"):
        info, t = ix.one("experts", provider=provider)
        if info is None:
            out += [_missing(f"{TARGET_NAMES[7]} ({provider})", f"≥ {EXPERTS_SPEEDUP_MIN:g}", f"{provider} experts row"),
                    _missing(f"{TARGET_NAMES[8]} ({provider})", f"≤ {EXPERTS_PEAK_MAX:g}", f"{provider} experts row")]
            continue
        case = (f"E={info.get('experts')} top-{info.get('top_k')} {info.get('hidden')}↔{info.get('intermediate')} "
                f"T={info.get('tokens')} r={info.get('rank')} {info.get('dtype')}")
        note = "" if lora else "no PEFT LoRA experts row"
        out.append(_check(f"{TARGET_NAMES[7]} ({provider})", case, _ratio(t_lora, t), EXPERTS_SPEEDUP_MIN, False, note))
        peak_lora = lora.get("peak_bytes") if lora else None
        out.append(_check(f"{TARGET_NAMES[8]} ({provider})", case, _ratio(info.get("peak_bytes"), peak_lora),
                          EXPERTS_PEAK_MAX, True, note or ("" if peak_lora else "no peak (CPU run)")))
    plan, _ = ix.one("plan")
    limit = f"1 ± {PLAN_TOLERANCE:g}"
    if plan is None:
        out.append(_missing(TARGET_NAMES[9], limit, "plan row"))
    else:
        value = plan.get("plan_over_measured")
        case = f"Llama h={plan.get('hidden')} L={plan.get('layers')} T={plan.get('tokens')} r={plan.get('rank')}"
        result = NOT_MEASURED if value is None else (PASS if abs(value - 1) <= PLAN_TOLERANCE else MISS)
        out.append(Target(TARGET_NAMES[9], case, value, limit, result,
                          "" if value is not None else str(plan.get("plan_status") or "no measured peak (CPU run)")))
    return out


def bf16_targets(tests: Optional[list[TestCase]]) -> list[Target]:
    """Per op: every bf16 GPU test against the float64 reference passed (none failed, at least one ran)."""
    out = []
    for op, selectors in BF16_OPS.items():
        name = f"{TARGET_NAMES[10]}: {op}"
        if tests is None:
            out.append(Target(name, "—", None, "all pass", NOT_MEASURED, "no GPU-test XML beside the JSON"))
            continue
        chosen = [c for c in tests if ("bfloat16" in c.name or "bf16" in c.name)
                  and any(c.module.endswith(mod) and sub in c.name for mod, sub in selectors)]
        ran = [c for c in chosen if c.outcome != "skipped"]
        bad = [c for c in ran if c.outcome != "passed"]
        case = f"{len(ran) - len(bad)}/{len(ran)} bf16 tests passed"
        if not ran:
            out.append(Target(name, case, None, "all pass", NOT_MEASURED, "no bf16 test ran"))
        else:
            note = "; ".join(f"{c.name}: {c.message[:80]}" for c in bad[:3])
            out.append(Target(name, case, float(len(ran) - len(bad)) / len(ran), "all pass", MISS if bad else PASS, note))
    return out


def evaluate(benchmarks: Iterable[dict], tests: Optional[list[TestCase]] = None) -> list[Target]:
    """Every target of issue 33 on one run's benchmarks (and GPU-test results), in the issue's order."""
    ix = _Index(benchmarks)
    return linear_targets(ix) + regularizer_targets(ix) + init_experts_plan_targets(ix) + bf16_targets(tests)


def as_json(targets: list[Target]) -> list[dict]:
    """The targets as JSON-ready dicts (the report stores them in the run's JSON)."""
    return [asdict(t) for t in targets]


def markdown(targets: list[Target], fmt: Callable[[float], str] = "{:.2f}".format) -> list[str]:
    """The targets as a markdown section."""
    lines = ["## Targets (issue 33)", "", "| target | case | value | limit | result | note |", "|---|---|---|---|---|---|"]
    for t in targets:
        value = "—" if t.value is None else fmt(t.value)
        lines.append(f"| {t.name} | {t.case} | {value} | {t.limit} | {t.result} | {t.note} |")
    counts = {r: sum(t.result == r for t in targets) for r in (PASS, MISS, NOT_MEASURED)}
    lines += ["", f"{counts[PASS]} pass, {counts[MISS]} miss, {counts[NOT_MEASURED]} not measured.", ""]
    return lines
