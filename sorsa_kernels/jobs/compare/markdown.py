"""The text of a comparison: the summary table the CLI prints, the ordering, scope and timing
lines under it, and ``compare.md`` (settings, the table, the sweep, every trajectory).

Numbers read as the report means them: a tie or an overlap of seed ranges is written as
one (``PiSSA = LoRA (tie)``, ``≈ … (within noise)``); exact match as a percentage with its
count (``0.0 % (0/8)``); ΔΣ, ΔD and ‖ΔW‖/‖W0‖ in scientific notation, with rounding noise
(below :data:`NOISE`) written as 0; a learning rate at the edge of its sweep as "not bracketed".
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["LABELS", "REAL_MODEL_COMPARISON", "NOISE", "summary_table", "ordering_line", "scope_line",
           "timing_line", "settings_lines", "markdown", "sweep_markdown"]

LABELS = {"sorsa": "SORSA", "pissa": "PiSSA", "lora": "LoRA", "full": "Full FT"}
#: The repository's comparison on a real model, which the toy comparison (only) points to.
REAL_MODEL_COMPARISON = "docs/results/compare-smollm2-cpu.md"
#: ΔΣ/ΔD below this are float64 rounding of an SVD, not drift: written as 0.
NOISE = 1e-12


def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _sci(value, none: str = "–") -> str:
    if value is None:
        return none
    return "0" if abs(value) < NOISE else f"{value:.3e}"


def _pct(value, n: Optional[int] = None) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:.1f} %"
    return f"{text} ({round(value * n)}/{n})" if n else text


def _with_range(text: str, rng, spec: str, scale: float = 1.0) -> str:
    if not rng or rng[0] == rng[1]:
        return text
    return f"{text} [{format(scale * rng[0], spec)}–{format(scale * rng[1], spec)}]"


def _summary_rows(report: dict[str, Any]) -> list[list[str]]:
    s = report["settings"]
    n_em = s.get("exact_match_examples") if s.get("seeds", 1) == 1 else None
    rows = []
    for m, v in report["methods"].items():
        f, rng = v["final"], v.get("final_range", {})
        lr = []
        if "lr_sweep" in report:
            lr = [f"{v['learning_rate']:g}" + ("" if v.get("bracketed", True) else " (not bracketed)")]
        held = _with_range(_fmt(f["heldout_loss"], ".4f"), rng.get("heldout_loss"), ".4f")
        em = _with_range(_pct(f["exact_match"], n_em), rng.get("exact_match"), ".1f", 100)
        rows.append([
            LABELS[m], *lr, f"{v['trainable_params']:,}", _fmt(f["train_loss"], ".4f"),
            f"{_fmt(f['heldout_loss_start'], '.4f')} → {held}", f"{_pct(f['exact_match_start'], n_em)} → {em}",
            _sci(f["delta_sigma"]), _sci(f["delta_d"]), _sci(f.get("relative_change")), _sci(f["orthonormality"]),
            _fmt(v.get("step_s"), ".3f", "–") + " s", f"{v['train_s']:.1f} s",
        ])
    return rows


_SUMMARY_HEADER = ["method", "trainable", "train loss", "held-out loss", "exact match", "ΔΣ", "ΔD",
                   "‖ΔW‖/‖W0‖", "orthonormality", "step (median)", "train time"]


def _summary_header(report: dict[str, Any]) -> list[str]:
    return _SUMMARY_HEADER[:1] + ["best lr"] + _SUMMARY_HEADER[1:] if "lr_sweep" in report else _SUMMARY_HEADER


def summary_table(report: dict[str, Any]) -> str:
    """The final numbers of every method as an aligned plain-text table (what the CLI prints)."""
    rows = [_summary_header(report)] + _summary_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _groups_text(report: dict[str, Any], groups: list[list[str]], key: str, better: str) -> str:
    parts = []
    for g in groups:
        if len(g) == 1:
            parts.append(LABELS[g[0]])
            continue
        values = {report["methods"][m]["final"][key] for m in g}
        ranges = [report["methods"][m].get("final_range", {}).get(key) for m in g]
        if len(values) == 1 and all(not r or r[0] == r[1] for r in ranges):
            parts.append(" = ".join(LABELS[m] for m in g) + " (tie)")
        else:
            parts.append(" ≈ ".join(LABELS[m] for m in g) + " (within noise)")
    return f" {better} ".join(parts)


def ordering_line(report: dict[str, Any]) -> str:
    """How the methods rank (ties and overlapping ranges written as such) and the paper's verdict."""
    o = report["ordering"]
    parts = [f"by held-out loss: {_groups_text(report, o['by_heldout_loss'], 'heldout_loss', '<')}"]
    if o["by_exact_match"]:
        parts.append(f"by exact match: {_groups_text(report, o['by_exact_match'], 'exact_match', '>')}")
    line = "; ".join(parts)
    if "paper_order" in o:
        verdict = {True: "agrees", False: "does not agree", None: "cannot tell (tie or within noise)"}
        line += (f". The paper's ordering ({o['paper_order']}): held-out loss {verdict[o['agrees_heldout_loss']]}, "
                 f"exact match {verdict[o['agrees_exact_match']]}.")
    return line


def scope_line(report: dict[str, Any]) -> str:
    """One sentence on what this comparison's task and budget can and cannot show (printed under the table)."""
    s = report["settings"]
    steps = max((v["steps"] for v in report["methods"].values()), default=0)
    seeds = s.get("seeds", 1)
    seed_text = "one seed" if seeds == 1 else f"{seeds} seeds"
    if s["model"] == "embedded":
        size = f"{s['model_parameters']:,}-parameter" if s.get("model_parameters") else "tiny"
        return (f"On the embedded default (a {size} toy model, {steps} steps) this shows that every method trains "
                "and how far each moves the weights (ΔΣ, ΔD), not which method is better on a real model: one tiny "
                f"model, {seed_text} and a short budget cannot rank them; for a real model see "
                f"{REAL_MODEL_COMPARISON}.")
    return (f"This is {seed_text} and {steps} steps on this data: the ordering says which method was ahead at this "
            "budget, not how the methods rank after a full run (the paper's ordering is for whole epochs on 7B "
            "models).")


def timing_line(report: dict[str, Any]) -> str:
    """Setup, total and CPU time and the run's peak memory (maximum resident set)."""
    t, peak = report["timing_s"], report["machine"].get("peak_rss_bytes")
    memory = f", peak memory (max RSS) {peak / 2**30:.2f} GiB" if peak else ""
    return (f"setup {t['setup_s']:.1f} s (once for every run: the pretrained model's evaluation "
            f"{t.get('start_evaluation_s', 0):.1f} s, the SVD of W0 {t.get('w0_svd_s', 0):.1f} s), total "
            f"{t['total_s']:.1f} s, CPU {t.get('cpu_s', 0):.1f} s{memory}")


def settings_lines(report: dict[str, Any]) -> list[str]:
    """``compare.md``'s settings paragraph: budget, sweep, seeds, held-out and exact-match counts."""
    s = report["settings"]
    steps = s["max_steps"] if s["max_steps"] and s["max_steps"] > 0 else f"{s['num_train_epochs']} epoch(s)"
    if s.get("learning_rate") is not None:
        lr = f"lr {s['learning_rate']:g}"
    else:
        how = "auto: 1e-4, 3e-4, 1e-3 extended beyond edge optima" if s.get("lr_sweep_auto") else "given"
        lr = f"lr swept over {', '.join(f'{x:g}' for x in s['lr_sweep'])} ({how}), each method at its best"
    n = s.get("seeds", 1)
    seeds = f"seed {s['seed']}" if n == 1 else f"seeds {s['seed']}–{s['seed'] + n - 1} (mean, [min–max])"
    pattern = f"answer pattern `{s['answer_pattern']}`" if s.get("answer_pattern") else "whole response compared"
    return [
        f"Model `{s['model']}` ({s.get('model_parameters', 0):,} parameters), data "
        f"`{s['data'] or 'embedded arithmetic problems'}`{' through the chat template' if s.get('chat_template') else ''}; "
        f"{steps} steps × batch {s['per_device_train_batch_size']} × accumulation {s['gradient_accumulation_steps']}; "
        f"{lr} ({s['lr_scheduler_type']}, {100 * s['warmup_ratio']:g} % warm-up); rank {s['rank']}; "
        f"{s.get('svd', 'full')} SVD; {seeds}; γ {s['gamma']:g} (SORSA). Recorded every "
        f"{s['record_every']} steps.", "",
        f"Held out: {s.get('heldout_examples', '?')} examples (held-out loss); exact match on "
        f"{s.get('exact_match_examples', '?')} of them, greedy, max_new_tokens {s.get('max_new_tokens', '?')}, "
        f"{pattern}; prompts cut: {s.get('prompts_cut', 0)} (never: a prompt that does not fit is refused), "
        f"reference answers longer than max_new_tokens: {s.get('answers_cut', 0)}.", "",
    ]


def markdown(report: dict[str, Any]) -> str:
    """``compare.md``: settings, the summary table, the ordering, and every method's trajectory."""
    header = _summary_header(report)
    lines = ["# sorsa-kernels compare", "", *settings_lines(report),
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _summary_rows(report)]
    lines += ["", ordering_line(report), "", scope_line(report), "", timing_line(report) + ".", "",
              f"Parameters: {report['parameter_matching']}", "", f"Definitions: {report['definitions']}", ""]
    if "lr_sweep" in report:
        lines += sweep_markdown(report["lr_sweep"])
    head = ["step", "lr", "train loss", "held-out loss", "exact match", "ΔΣ", "ΔD", "‖ΔW‖/‖W0‖", "orthonormality"]
    for m, v in report["methods"].items():
        lines += [f"## {LABELS[m]} — {v['implementation']}", "",
                  f"{v['trainable_params']:,} trainable parameters, {v['steps']} steps, {v['tokens']:,} tokens "
                  f"(data fingerprint `{v['data_fingerprint']}`); lr {v['learning_rate']:g}, seed {v['seed']}. "
                  f"Median step {_fmt(v.get('step_s'), '.3f')} s; training {v['train_s']:.1f} s of which recording "
                  f"{v.get('record_s', 0):.1f} s and evaluation {v.get('evaluate_s', 0):.1f} s; initialization "
                  f"{v.get('prepare_s', 0):.1f} s. {_targets_text(v.get('targets'))}", "",
                  "| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
        for r in v["records"]:
            lines.append("| " + " | ".join([
                str(r["step"]), _fmt(r.get("learning_rate"), ".2e"), _fmt(r.get("train_loss"), ".4f"),
                _fmt(r.get("heldout_loss"), ".4f"), _pct(r.get("exact_match")), _sci(r.get("delta_sigma")),
                _sci(r.get("delta_d")), _sci(r.get("relative_change")), _sci(r.get("orthonormality")),
            ]) + " |")
        lines.append("")
    return "\n".join(lines)


def _targets_text(targets: Optional[dict[str, Any]]) -> str:
    if not targets:
        return ""
    n, e = len(targets.get("matrices", [])), len(targets.get("expert_parameters", []))
    text = f"Adapts {n} linear matrices" + (f" and {e} fused routed-expert weights" if e else "")
    if targets.get("note"):
        text += f" ({targets['note']})"
    return text + (" (ΔΣ/ΔD and ‖ΔW‖/‖W0‖ are over the linear matrices)." if e else ".")


def sweep_markdown(sweep: dict[str, Any]) -> list[str]:
    """``compare.md``'s learning-rate sweep: final held-out loss and exact match per method and lr."""
    lrs = sweep["learning_rates"]
    edge = [LABELS[m] for m, ok in sweep.get("bracketed", {}).items() if not ok]
    lines = ["## Learning-rate sweep", "",
             f"Every method trained at every learning rate with the same budget; each is reported above at "
             f"its own best ({sweep['selected_by']}, marked **bold**). Cells: final held-out loss / exact match "
             "(mean over seeds).", ""]
    if edge:
        lines += [f"Not bracketed: {', '.join(edge)} — the best learning rate is at the edge of the sweep, so a "
                  "rate beyond it may be better still.", ""]
    lines += ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for m, runs in sweep["runs"].items():
        by_lr = {r["learning_rate"]: r for r in runs}
        cells = []
        for lr in lrs:
            r = by_lr.get(lr)
            if r is None:
                cell = "failed" if f"{lr:g}" in sweep.get("failed", {}).get(m, {}) else "–"
            else:
                cell = f"{_fmt(r['heldout_loss'], '.4f')} / {_pct(r['exact_match'])}"
            cells.append(f"**{cell}**" if lr == sweep["best"].get(m) else cell)
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return lines + [""]
