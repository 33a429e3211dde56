"""What ``sorsa-kernels compare`` writes: ``compare.json``, ``compare.md`` and the PNGs.

:func:`build_report` turns the per-method runs into one JSON-ready dict (settings, the
parameter-matching note, per-method summaries and trajectories, timings);
:func:`write_report` writes it as ``compare.json`` and ``compare.md`` and, when matplotlib
is installed, draws three figures in the style of the paper's: ``compare_loss.png``
(training loss, held-out loss, exact match against steps; cf. Figure 3),
``compare_drift.png`` (mean ΔΣ, ΔD and orthonormality against steps) and
``compare_drift_layers.png`` (ΔD against ΔΣ per layer and method, joined over steps,
with the mean as black dots; cf. Figure 2).  With a learning-rate sweep, ``lr_sweep`` holds
every (method, learning rate) run's final numbers and held-out curve, ``compare.md`` a
table of them, and ``compare_lr_sweep.png`` held-out loss and exact match against the
learning rate.  Every timing field's name ends in ``_s``
and the machine's load is under ``machine``: the rest is the same for the same seed.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

__all__ = ["build_report", "write_report", "summary_table", "ordering_line", "scope_line", "markdown", "plot_all",
           "PLOT_FILES", "REAL_MODEL_COMPARISON", "sweep_section", "sweep_markdown", "plot_sweep", "SWEEP_PLOT"]

PLOT_FILES = ("compare_loss.png", "compare_drift.png", "compare_drift_layers.png")
SWEEP_PLOT = "compare_lr_sweep.png"
SWEEP_SELECTION = "lowest final held-out loss"
IMPLEMENTATION = {
    "sorsa": "sorsa_kernels.apply_sorsa + SORSACallback (orthonormal regularizer)",
    "pissa": "peft.LoraConfig(init_lora_weights='pissa')",
    "lora": "peft.LoraConfig() (Kaiming A, B = 0)",
    "full": "every weight of the target matrices trained in full",
}
PARAMETER_MATCHING = (
    "Same rank r and target matrices for every adapter: LoRA and PiSSA train r(m+n) parameters per m×n "
    "matrix, SORSA r(m+n)+r (its S vector; integer ranks cannot match exactly, the difference is 1/(m+n)). "
    "Same scaling: SORSA scale alpha/r (1 without --alpha), LoRA/PiSSA lora_alpha = alpha (r without --alpha). "
    "Full fine-tuning trains all m·n weights of the same matrices."
)
DEFINITIONS = (
    "ΔΣ and ΔD: the paper's Eq. 1–4 on each target matrix's effective weight W0 + ΔW against the pretrained "
    "W0, mean over matrices. Orthonormality: mean over factor matrices X of ‖XᵀX − I‖_F, X ∈ {U, V} for SORSA "
    "(the regularizer's value) and {B, Aᵀ} for LoRA/PiSSA (whose factors are not meant to be orthonormal). "
    "Held-out loss: mean cross-entropy over all held-out response tokens. Exact match: greedy completion "
    "equals the response."
)
#: The repository's comparison on a real model, which the toy comparison points to.
REAL_MODEL_COMPARISON = "docs/results/compare-smollm2-cpu.md"
_SETTINGS = ("model", "data", "eval_data", "rank", "alpha", "gamma", "learning_rate", "lr_scheduler_type",
             "warmup_ratio", "max_steps", "num_train_epochs", "per_device_train_batch_size",
             "gradient_accumulation_steps", "max_length", "weight_decay", "max_grad_norm", "seed",
             "eval_samples", "pretrain_steps", "target_modules", "bf16", "answer_pattern")
_COLORS = {"sorsa": "tab:red", "pissa": "tab:blue", "lora": "tab:green", "full": "tab:gray"}
_LABELS = {"sorsa": "SORSA", "pissa": "PiSSA", "lora": "LoRA", "full": "Full FT"}


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    records = run["records"]
    first, last = records[0], records[-1]
    losses = [r["train_loss"] for r in records if r.get("train_loss") is not None]
    return {
        "train_loss": losses[-1] if losses else None,
        "heldout_loss_start": first.get("heldout_loss"),
        "heldout_loss": last.get("heldout_loss"),
        "exact_match_start": first.get("exact_match"),
        "exact_match": last.get("exact_match"),
        "delta_sigma": last.get("delta_sigma"),
        "delta_d": last.get("delta_d"),
        "orthonormality": last.get("orthonormality"),
        "adapter_norm": last.get("adapter_norm"),
    }


def _ordering(methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How the methods rank, and whether SORSA ≥ PiSSA ≥ LoRA (the paper's ordering) holds."""
    finals = {m: v["final"] for m, v in methods.items()}
    by_loss = sorted((m for m in finals if finals[m]["heldout_loss"] is not None),
                     key=lambda m: finals[m]["heldout_loss"])
    by_em = sorted((m for m in finals if finals[m]["exact_match"] is not None),
                   key=lambda m: -finals[m]["exact_match"])
    out: dict[str, Any] = {"by_heldout_loss": by_loss, "by_exact_match": by_em}
    paper = [m for m in ("sorsa", "pissa", "lora") if m in finals]
    if len(paper) >= 2:
        def holds(key, better):
            vals = [finals[m][key] for m in paper]
            return None if None in vals else all(better(a, b) for a, b in zip(vals, vals[1:]))

        out["paper_order"] = " ≥ ".join(_LABELS[m] for m in paper)
        out["agrees_heldout_loss"] = holds("heldout_loss", lambda a, b: a <= b)
        out["agrees_exact_match"] = holds("exact_match", lambda a, b: a >= b)
    return out


def sweep_section(sweep: dict[str, dict[float, dict[str, Any]]], best: dict[str, float],
                  failed: Optional[dict[str, dict[float, str]]] = None) -> dict[str, Any]:
    """``report["lr_sweep"]``: the learning rates, each method's best, every run's final numbers
    and held-out curve (the best runs' full trajectories are under ``methods``) and, under
    ``failed``, why a learning rate's run was left out."""
    failed = {m: f for m, f in (failed or {}).items() if f and m in sweep}
    lrs = sorted({lr for by_lr in (*sweep.values(), *failed.values()) for lr in by_lr})
    runs = {}
    for m, by_lr in sweep.items():
        runs[m] = [{"learning_rate": lr, **_summary(run), "steps": run["steps"], "tokens": run["tokens"],
                    "data_fingerprint": run["data_fingerprint"], "train_s": run["train_s"],
                    "heldout_curve": [[r["step"], r["heldout_loss"]] for r in run["records"]
                                      if r.get("heldout_loss") is not None]}
                   for lr, run in sorted(by_lr.items())]
    section = {"learning_rates": lrs, "selected_by": SWEEP_SELECTION, "best": dict(best), "runs": runs}
    if failed:
        section["failed"] = {m: {f"{lr:g}": why for lr, why in f.items()} for m, f in failed.items()}
    return section


def build_report(config, cfg, runs: dict[str, dict[str, Any]], *, record_every: int, evaluate_every: int,
                 timing: dict[str, float], machine: dict[str, Any],
                 sweep: Optional[dict[str, dict[float, dict[str, Any]]]] = None,
                 sweep_failed: Optional[dict[str, dict[float, str]]] = None) -> dict[str, Any]:
    """The JSON-ready report of a comparison (see the module docstring).

    ``sweep`` (a learning-rate sweep): ``{method: {lr: run}}``; ``runs`` then holds each
    method's chosen run, whose ``learning_rate`` says which; ``sweep_failed``:
    ``{method: {lr: why}}`` for the runs that diverged or failed.
    """
    settings = {k: getattr(cfg, k) for k in _SETTINGS}
    if settings["target_modules"] is not None:
        settings["target_modules"] = list(settings["target_modules"])
    settings.update(methods=list(runs), record_every=record_every, eval_every_records=evaluate_every)
    methods = {}
    for m, run in runs.items():
        methods[m] = {"implementation": IMPLEMENTATION[m], **run, "final": _summary(run)}
    if sweep:
        section = sweep_section(sweep, {m: run["learning_rate"] for m, run in runs.items()}, sweep_failed)
        settings.update(learning_rate=None, lr_sweep=section["learning_rates"])
    report = {
        "settings": settings,
        "parameter_matching": PARAMETER_MATCHING,
        "definitions": DEFINITIONS,
        "methods": methods,
        "ordering": _ordering(methods),
        "timing_s": timing,
        "machine": machine,
    }
    if sweep:
        report["lr_sweep"] = section
    return report


# ---------------------------------------------------------------------- text
def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _summary_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m, v in report["methods"].items():
        f = v["final"]
        lr = [f"{v['learning_rate']:g}"] if "lr_sweep" in report else []
        rows.append([
            _LABELS[m], *lr, f"{v['trainable_params']:,}", _fmt(f["train_loss"], ".4f"),
            f"{_fmt(f['heldout_loss_start'], '.4f')} → {_fmt(f['heldout_loss'], '.4f')}",
            f"{_pct(f['exact_match_start'])} → {_pct(f['exact_match'])}",
            _fmt(f["delta_sigma"], ".3e"), _fmt(f["delta_d"], ".3e"), _fmt(f["orthonormality"], ".3e"),
            f"{v['train_s']:.1f} s",
        ])
    return rows


_SUMMARY_HEADER = ["method", "trainable", "train loss", "held-out loss", "exact match", "ΔΣ", "ΔD",
                   "orthonormality", "train time"]


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


def ordering_line(report: dict[str, Any]) -> str:
    o = report["ordering"]
    parts = [f"by held-out loss: {' < '.join(_LABELS[m] for m in o['by_heldout_loss'])}"]
    if o["by_exact_match"]:
        parts.append(f"by exact match: {' > '.join(_LABELS[m] for m in o['by_exact_match'])}")
    line = "; ".join(parts)
    if "paper_order" in o:
        verdict = {True: "agrees", False: "does not agree", None: "cannot tell"}
        line += (f". The paper's ordering ({o['paper_order']}): held-out loss {verdict[o['agrees_heldout_loss']]}, "
                 f"exact match {verdict[o['agrees_exact_match']]}.")
    return line


def scope_line(report: dict[str, Any]) -> str:
    """One sentence on what this comparison's task and budget can and cannot show (printed under the table)."""
    s = report["settings"]
    steps = max((v["steps"] for v in report["methods"].values()), default=0)
    if s["model"] == "embedded":
        what = (f"On the embedded default (a 0.6 M-parameter toy model, {steps} steps) this shows that "
                "every method trains and how far each moves the weights (ΔΣ, ΔD), not which method is better on "
                "a real model: one tiny model, one seed and a short budget cannot rank them")
    else:
        what = (f"This is one seed and {steps} steps on this data: the ordering says which method was ahead at "
                "this budget, not how the methods rank after a full run (the paper's ordering is for whole "
                "epochs on 7B models)")
    return f"{what}; for a real model see {REAL_MODEL_COMPARISON}."


def markdown(report: dict[str, Any]) -> str:
    """``compare.md``: settings, the summary table, the ordering, and every method's trajectory."""
    s = report["settings"]
    steps = s["max_steps"] if s["max_steps"] and s["max_steps"] > 0 else f"{s['num_train_epochs']} epoch(s)"
    lr = (f"lr {s['learning_rate']:g}" if s.get("learning_rate") is not None
          else f"lr swept over {', '.join(f'{x:g}' for x in s['lr_sweep'])}, each method at its best")
    header = _summary_header(report)
    lines = [
        "# sorsa-kernels compare", "",
        f"Model `{s['model']}`, data `{s['data'] or 'embedded arithmetic problems'}`; {steps} steps × batch "
        f"{s['per_device_train_batch_size']} × accumulation {s['gradient_accumulation_steps']}; {lr} "
        f"({s['lr_scheduler_type']}, {100 * s['warmup_ratio']:g} % warm-up); rank {s['rank']}; seed {s['seed']}; "
        f"γ {s['gamma']:g} (SORSA). Recorded every {s['record_every']} steps.", "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in _summary_rows(report)]
    lines += ["", ordering_line(report), "", scope_line(report), "", f"Parameters: {report['parameter_matching']}", "",
              f"Definitions: {report['definitions']}", ""]
    if s.get("answer_pattern"):
        lines += [f"Exact match compares the answer extracted by `{s['answer_pattern']}` from completion and "
                  "response, not the whole response.", ""]
    if "lr_sweep" in report:
        lines += sweep_markdown(report["lr_sweep"])
    head = ["step", "lr", "train loss", "held-out loss", "exact match", "ΔΣ", "ΔD", "orthonormality", "adapter norm"]
    for m, v in report["methods"].items():
        lines += [f"## {_LABELS[m]} — {v['implementation']}", "",
                  f"{v['trainable_params']:,} trainable parameters, {v['steps']} steps, {v['tokens']:,} tokens "
                  f"(data fingerprint `{v['data_fingerprint']}`).", "",
                  "| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
        for r in v["records"]:
            lines.append("| " + " | ".join([
                str(r["step"]), _fmt(r.get("learning_rate"), ".2e"), _fmt(r.get("train_loss"), ".4f"),
                _fmt(r.get("heldout_loss"), ".4f"), _pct(r.get("exact_match")), _fmt(r.get("delta_sigma"), ".3e"),
                _fmt(r.get("delta_d"), ".3e"), _fmt(r.get("orthonormality"), ".3e"), _fmt(r.get("adapter_norm"), ".3f"),
            ]) + " |")
        lines.append("")
    return "\n".join(lines)


def sweep_markdown(sweep: dict[str, Any]) -> list[str]:
    """``compare.md``'s learning-rate sweep: final held-out loss and exact match per method and lr."""
    lrs = sweep["learning_rates"]
    lines = ["## Learning-rate sweep", "",
             f"Every method trained at every learning rate with the same budget; each is reported above at "
             f"its own best ({sweep['selected_by']}, marked **bold**). Cells: final held-out loss / exact match.", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|" + "---:|" * len(lrs)]
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
        lines.append(f"| {_LABELS[m]} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_sweep(report: dict[str, Any], out: Path) -> Path:
    """``compare_lr_sweep.png``: final held-out loss and exact match against the learning rate, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report["lr_sweep"]
    path = Path(out) / SWEEP_PLOT
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), dpi=110)
    for ax, (key, ylabel) in zip(axes, (("heldout_loss", "final held-out loss"), ("exact_match", "final exact match"))):
        for m, runs in sweep["runs"].items():
            pts = [(r["learning_rate"], r[key]) for r in runs if r.get(key) is not None and math.isfinite(r[key])]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, lw=1.2, color=_COLORS[m],
                    label=_LABELS[m])
            best = [p for p in pts if p[0] == sweep["best"].get(m)]
            if best:
                ax.plot(*best[0], marker="*", ms=13, color=_COLORS[m], markeredgecolor="k")
        ax.set_xscale("log")
        ax.set_xticks(sweep["learning_rates"], [f"{lr:g}" for lr in sweep["learning_rates"]])
        ax.minorticks_off()
        ax.set_xlabel("learning rate")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Learning-rate sweep (★: each method's best, by {sweep['selected_by']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- files
def write_report(report: dict[str, Any], out: Path, plots: bool = True) -> tuple[list[Path], Optional[str]]:
    """Write ``compare.json``, ``compare.md`` and (if matplotlib is installed) the PNGs to ``out``.

    Returns ``(files written, note)``; the note says why no PNG was written, if none was.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "compare.json", out / "compare.md"]
    files[0].write_text(json.dumps(report, indent=2) + "\n")
    files[1].write_text(markdown(report))
    note = None
    if plots:
        try:
            files += plot_all(report, out)
            if "lr_sweep" in report:
                files.append(plot_sweep(report, out))
        except ImportError:
            note = ("no PNGs: they need matplotlib (pip install matplotlib); "
                    "compare.json holds every number they show")
    return files, note


def _layer_number(name: str) -> Optional[int]:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def plot_all(report: dict[str, Any], out: Path) -> list[Path]:
    """Draw the three PNGs (see the module docstring); ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    paths = [Path(out) / name for name in PLOT_FILES]

    def series(m, key):
        pts = [(r["step"], r[key]) for r in methods[m]["records"] if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def panels(path, specs, title):
        fig, axes = plt.subplots(1, len(specs), figsize=(4.2 * len(specs), 3.6), dpi=110)
        for ax, (key, ylabel, log) in zip(axes, specs):
            for m in methods:
                xs, ys = series(m, key)
                if xs:
                    ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=_COLORS[m], label=_LABELS[m])
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            if log and any(ax.get_lines()):
                ax.set_yscale("symlog", linthresh=1e-4)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    panels(paths[0], [("train_loss", "training loss", False), ("heldout_loss", "held-out loss", False),
                      ("exact_match", "exact match", False)], "Loss and accuracy (cf. paper Fig. 3)")
    panels(paths[1], [("delta_sigma", "ΔΣ (singular values)", False), ("delta_d", "ΔD (singular vectors)", False),
                      ("orthonormality", "orthonormality ‖XᵀX − I‖ (Frobenius)", True)],
           "Drift from the pretrained weights, mean over matrices")

    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), dpi=110,
                             sharex=True, sharey=True, squeeze=False)
    for ax, (m, v) in zip(axes[0], methods.items()):
        records = [r for r in v["records"] if "layers" in r]
        names = list(records[0]["layers"]) if records else []
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        cmap = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
        for name in names:
            kind = name.rsplit(".", 1)[-1]
            xs = [r["layers"][name]["delta_d"] for r in records]
            ys = [r["layers"][name]["delta_sigma"] for r in records]
            ax.plot(xs, ys, marker="o", ms=2, lw=0.7, color=cmap[kind], alpha=0.8)
            number = _layer_number(name)
            if number is not None:
                ax.annotate(str(number), (xs[-1], ys[-1]), fontsize=6, color=cmap[kind],
                            xytext=(2, 2), textcoords="offset points")
        ax.plot([r["delta_d"] for r in records], [r["delta_sigma"] for r in records], "-o", color="k", ms=4,
                lw=1, label="mean")
        for k in kinds:
            ax.plot([], [], marker="o", ls="", color=cmap[k], label=k)
        ax.set_title(_LABELS[m], fontsize=10)
        ax.set_xlabel("ΔD")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ΔΣ")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle("ΔD and ΔΣ of each matrix during training (cf. paper Fig. 2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths[2])
    plt.close(fig)
    return paths
