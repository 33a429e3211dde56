"""The comparison's figures, in the style of the paper's: ``compare_loss.png`` (training loss,
held-out loss, exact match against steps; cf. Figure 3), ``compare_drift.png`` (mean ΔΣ, ΔD
and orthonormality against steps), ``compare_drift_layers.png`` (ΔD against ΔΣ per layer and
method, joined over steps, with the mean as black dots; cf. Figure 2) and, with a sweep,
``compare_lr_sweep.png`` (held-out loss and exact match against the learning rate).

Each method has its own colour, marker and dash, so equal series (every method at 0 % exact
match) stay visible on top of each other; exact match is in %, as in the tables.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from .markdown import LABELS

__all__ = ["PLOT_FILES", "SWEEP_PLOT", "STYLES", "plot_all", "plot_sweep"]

PLOT_FILES = ("compare_loss.png", "compare_drift.png", "compare_drift_layers.png")
SWEEP_PLOT = "compare_lr_sweep.png"
#: ``{method: (colour, marker, line style, marker size)}``: distinct on every axis, so overlapping lines show.
STYLES = {"sorsa": ("tab:red", "o", "-", 7), "pissa": ("tab:blue", "s", "--", 5.5),
          "lora": ("tab:green", "^", ":", 4.5), "full": ("tab:gray", "D", "-.", 3.5)}
#: Keys plotted as a percentage (the tables' unit).
_PERCENT = {"exact_match"}


def _style(m: str) -> dict[str, Any]:
    colour, marker, dash, size = STYLES[m]
    return dict(color=colour, marker=marker, ls=dash, ms=size, lw=1.3, mfc="none", mew=1.2, label=LABELS[m])


def _scaled(key: str, value: float) -> float:
    return 100 * value if key in _PERCENT else value


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(report: dict[str, Any], out: Path) -> Path:
    """``compare_lr_sweep.png``: final held-out loss and exact match against the learning rate, per method."""
    plt = _pyplot()
    import math

    sweep = report["lr_sweep"]
    path = Path(out) / SWEEP_PLOT
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), dpi=110)
    for ax, (key, ylabel) in zip(axes, (("heldout_loss", "final held-out loss"),
                                        ("exact_match", "final exact match (%)"))):
        for m, runs in sweep["runs"].items():
            pts = [(r["learning_rate"], _scaled(key, r[key])) for r in runs
                   if r.get(key) is not None and math.isfinite(r[key])]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], **_style(m))
            best = [p for p in pts if p[0] == sweep["best"].get(m)]
            if best:
                ax.plot(*best[0], marker="*", ms=13, color=STYLES[m][0], markeredgecolor="k")
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


def _layer_number(name: str) -> Optional[int]:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def plot_all(report: dict[str, Any], out: Path) -> list[Path]:
    """Draw the three PNGs (see the module docstring); ImportError without matplotlib."""
    plt = _pyplot()
    methods = report["methods"]
    paths = [Path(out) / name for name in PLOT_FILES]

    def series(m, key):
        pts = [(r["step"], _scaled(key, r[key])) for r in methods[m]["records"] if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def panels(path, specs, title):
        fig, axes = plt.subplots(1, len(specs), figsize=(4.2 * len(specs), 3.6), dpi=110)
        for ax, (key, ylabel, log) in zip(axes, specs):
            for m in methods:
                xs, ys = series(m, key)
                if xs:
                    ax.plot(xs, ys, **_style(m))
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
                      ("exact_match", "exact match (%)", False)], "Loss and accuracy (cf. paper Fig. 3)")
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
        ax.set_title(LABELS[m], fontsize=10)
        ax.set_xlabel("ΔD")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ΔΣ")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle("ΔD and ΔΣ of each matrix during training (cf. paper Fig. 2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths[2])
    plt.close(fig)
    return paths
