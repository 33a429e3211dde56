"""What ``sorsa-kernels compare`` writes: ``compare.json``, ``compare.md`` and the PNGs.

:func:`build_report` turns every method's runs (one per learning rate and seed) into one
JSON-ready dict: settings (with the held-out and exact-match counts, the generation budget
and the answer pattern), the parameter-matching note, per-method summaries — the mean over
seeds under ``final`` and the min–max range under ``final_range`` — with the chosen run's
trajectory, the ordering (a method ranks above another only where their ranges do not
overlap; otherwise they are a tie or within noise), timings and the machine (peak memory
included).  :func:`write_report` writes it as ``compare.json``, ``compare.md``
(:mod:`.markdown`) and the PNGs (:mod:`.plots`).  Every timing field's name ends in ``_s``
and the machine's load and memory are under ``machine``: the rest is the same for the same seed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..finetune.evaluation import exact_match_definition
from .markdown import LABELS, REAL_MODEL_COMPARISON, markdown, ordering_line, scope_line, summary_table, sweep_markdown, timing_line
from .plots import PLOT_FILES, SWEEP_PLOT, plot_all, plot_sweep
from .sweep import best_learning_rate, is_bracketed, spread

__all__ = ["build_report", "write_report", "summary_table", "ordering_line", "scope_line", "timing_line",
           "markdown", "plot_all", "PLOT_FILES", "REAL_MODEL_COMPARISON", "sweep_section", "sweep_markdown",
           "plot_sweep", "SWEEP_PLOT", "rank_groups", "parameter_matching"]

SWEEP_SELECTION = "lowest final held-out loss (mean over seeds)"
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
    "W0, mean over matrices. ‖ΔW‖/‖W0‖: the Frobenius norm of what training changed, relative to the "
    "pretrained weight, mean over matrices. Orthonormality: mean over factor matrices X of ‖XᵀX − I‖_F, "
    "X ∈ {U, V} for SORSA (the regularizer's value) and {B, Aᵀ} for LoRA/PiSSA (whose factors are not meant "
    "to be orthonormal). Held-out loss: mean cross-entropy over all held-out response tokens."
)
_SETTINGS = ("model", "data", "eval_data", "rank", "alpha", "gamma", "learning_rate", "lr_scheduler_type",
             "warmup_ratio", "max_steps", "num_train_epochs", "per_device_train_batch_size",
             "gradient_accumulation_steps", "max_length", "weight_decay", "max_grad_norm", "seed",
             "eval_samples", "pretrain_steps", "target_modules", "bf16", "answer_pattern", "svd")
#: Final numbers summarised over seeds, and the precision at which two of them are told apart.
_FINAL_KEYS = ("train_loss", "heldout_loss_start", "heldout_loss", "exact_match_start", "exact_match",
               "delta_sigma", "delta_d", "orthonormality", "adapter_norm", "relative_change")
_RANKED = {"heldout_loss": (4, False), "exact_match": (6, True)}  # (decimals, higher is better)


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
        "relative_change": last.get("relative_change"),
    }


def _cell_summary(cell: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(mean over seeds, {key: [min, max]})`` of one (method, learning rate)."""
    per_seed = [_summary(run) for run in cell]
    mean, ranges = {}, {}
    for key in _FINAL_KEYS:
        s = spread([f[key] for f in per_seed])
        mean[key] = None if s is None else s[0]
        ranges[key] = None if s is None else [s[1], s[2]]
    return mean, ranges


def rank_groups(finals: dict[str, dict[str, Any]], ranges: dict[str, dict[str, Any]], key: str) -> list[list[str]]:
    """Methods best first, in groups: a method starts a new group only when its range lies wholly
    beyond every range of the group before (no overlap); a group of several is a tie or within noise.

    Ranges are compared at the precision the report prints (4 decimals of loss, exact match exactly).

    Example::

        >>> rank_groups({"a": {"x": 1.0}, "b": {"x": 1.0}}, {"a": {"x": [1, 1]}, "b": {"x": [1, 1]}}, "heldout_loss")
        [['a', 'b']]
    """
    decimals, higher = _RANKED[key]
    sign = -1 if higher else 1
    items = []
    for m, f in finals.items():
        if f.get(key) is None:
            continue
        lo, hi = ranges[m][key] if ranges[m].get(key) else (f[key], f[key])
        lo, hi = sorted((sign * round(lo, decimals), sign * round(hi, decimals)))
        items.append((sign * round(f[key], decimals), lo, hi, m))
    items.sort(key=lambda t: (t[0], t[1]))
    groups: list[list[str]] = []
    top = None
    for _, lo, hi, m in items:
        if groups and lo <= top:
            groups[-1].append(m)
            top = max(top, hi)
        else:
            groups.append([m])
            top = hi
    return groups


def _paper_agreement(groups: list[list[str]], paper: list[str]) -> Optional[bool]:
    """True: SORSA, PiSSA, LoRA strictly in the paper's order; False: some pair strictly reversed;
    None: some pair a tie or within noise (or a method missing)."""
    where = {m: i for i, g in enumerate(groups) for m in g}
    if any(m not in where for m in paper):
        return None
    pairs = [(where[a], where[b]) for a, b in zip(paper, paper[1:])]
    if any(a > b for a, b in pairs):
        return False
    return True if all(a < b for a, b in pairs) else None


def _ordering(methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How the methods rank (groups of ties), and whether SORSA ≥ PiSSA ≥ LoRA (the paper's) holds."""
    finals = {m: v["final"] for m, v in methods.items()}
    ranges = {m: v["final_range"] for m, v in methods.items()}
    out: dict[str, Any] = {"by_heldout_loss": rank_groups(finals, ranges, "heldout_loss"),
                           "by_exact_match": rank_groups(finals, ranges, "exact_match")}
    paper = [m for m in ("sorsa", "pissa", "lora") if m in finals]
    if len(paper) >= 2:
        out["paper_order"] = " ≥ ".join(LABELS[m] for m in paper)
        out["agrees_heldout_loss"] = _paper_agreement(out["by_heldout_loss"], paper)
        out["agrees_exact_match"] = _paper_agreement(out["by_exact_match"], paper)
    return out


def sweep_section(sweep: dict[str, dict[float, list[dict[str, Any]]]], best: dict[str, float],
                  failed: Optional[dict[str, dict[float, str]]] = None) -> dict[str, Any]:
    """``report["lr_sweep"]``: the learning rates, each method's best and whether the sweep
    brackets it, every (method, lr)'s final numbers (mean and range over seeds) and held-out
    curve of its first seed (the best runs' full trajectories are under ``methods``) and,
    under ``failed``, why a learning rate's run was left out."""
    failed = {m: f for m, f in (failed or {}).items() if f and m in sweep}
    lrs = sorted({lr for by_lr in (*sweep.values(), *failed.values()) for lr in by_lr})
    runs = {}
    for m, by_lr in sweep.items():
        runs[m] = []
        for lr, cell in sorted(by_lr.items()):
            mean, ranges = _cell_summary(cell)
            first = cell[0]
            runs[m].append({"learning_rate": lr, **mean, "range": ranges, "seeds": len(cell), "steps": first["steps"],
                            "tokens": first["tokens"], "data_fingerprint": first["data_fingerprint"],
                            "train_s": first["train_s"],
                            "heldout_curve": [[r["step"], r["heldout_loss"]] for r in first["records"]
                                              if r.get("heldout_loss") is not None]})
    tried = {m: sorted({*sweep[m], *failed.get(m, {})}) for m in sweep}
    section = {"learning_rates": lrs, "selected_by": SWEEP_SELECTION, "best": dict(best), "runs": runs,
               "bracketed": {m: is_bracketed(tried[m], best[m]) for m in sweep}}
    if failed:
        section["failed"] = {m: {f"{lr:g}": why for lr, why in f.items()} for m, f in failed.items()}
    return section


def parameter_matching(targets: dict[str, dict[str, Any]]) -> str:
    """The parameter-matching note: "same targets" only when every method adapts the same matrices
    and expert weights; otherwise what each one adapts."""
    described = {m: (len(t.get("matrices", [])), len(t.get("expert_parameters", []))) for m, t in targets.items()}
    if len(set(described.values())) <= 1:
        experts = next(iter(described.values()), (0, 0))[1]
        if not experts:
            return PARAMETER_MATCHING
        return PARAMETER_MATCHING.replace(
            "Same rank r and target matrices for every adapter:",
            f"Same rank r and target matrices for every adapter (the linear targets and {experts} fused routed-"
            "expert weights, LoRA's through PEFT's target_parameters):")
    parts = []
    for m, t in targets.items():
        n, e = described[m]
        what = f"{n} linear matrices" + (f" and {e} fused routed-expert weights" if e else "")
        parts.append(f"{LABELS[m]}: {what}" + (f" ({t['note']})" if t.get("note") else ""))
    return ("The methods do not adapt the same weights — " + "; ".join(parts) + ". Compare their trainable "
            "parameter counts; the ranking is between different adaptations. Same rank r and scaling otherwise: "
            "SORSA scale alpha/r (1 without --alpha), LoRA/PiSSA lora_alpha = alpha (r without --alpha).")


def build_report(config, cfg, sweep: dict[str, dict[float, list[dict[str, Any]]]],
                 sweep_failed: Optional[dict[str, dict[float, str]]] = None, *, record_every: int,
                 evaluate_every: int, data: dict[str, Any], timing: dict[str, float],
                 machine: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready report of a comparison (see the module docstring).

    ``sweep``: ``{method: {lr: [run per seed]}}`` (one learning rate without a sweep);
    ``sweep_failed``: ``{method: {lr: why}}`` for the runs that diverged or failed; ``data``:
    the counts of the data and the generation budget (settings).
    """
    settings = {k: getattr(cfg, k) for k in _SETTINGS}
    if settings["target_modules"] is not None:
        settings["target_modules"] = list(settings["target_modules"])
    settings.update(data, methods=list(sweep), record_every=record_every, eval_every_records=evaluate_every,
                    seeds=config.seeds)
    methods = {}
    best = {}
    for m, cells in sweep.items():
        best[m] = best_learning_rate(cells)
        chosen = cells[best[m]]
        mean, ranges = _cell_summary(chosen)
        methods[m] = {"implementation": IMPLEMENTATION[m], **chosen[0], "final": mean, "final_range": ranges,
                      "seeds_run": len(chosen)}
    if config.lr_sweep:
        section = sweep_section(sweep, best, sweep_failed)
        settings.update(learning_rate=None, lr_sweep=section["learning_rates"], lr_sweep_auto=config.lr_sweep == "auto")
        for m in methods:
            methods[m]["bracketed"] = section["bracketed"][m]
    report = {
        "settings": settings,
        "parameter_matching": parameter_matching({m: v.get("targets", {}) for m, v in methods.items()}),
        "definitions": f"{DEFINITIONS} {exact_match_definition(cfg.answer_pattern)}",
        "methods": methods,
        "ordering": _ordering(methods),
        "timing_s": timing,
        "machine": machine,
    }
    if config.lr_sweep:
        report["lr_sweep"] = section
    return report


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
