"""The PNG of ``bench/report.py``: median time against tokens per mode, and the end-to-end step.

Needs matplotlib (imported inside :func:`plot`); ``bench/report.py`` calls it only when it imports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def _order(value: str, order: tuple[str, ...]) -> int:
    return order.index(value) if value in order else len(order)


def plot(rows: list, png: Path, rank: Optional[int], title: str, providers: tuple[str, ...],
         e2e_providers: tuple[str, ...], modes: tuple[str, ...]) -> None:
    """Median time against tokens, one line per provider and shape, a panel per mode (+ the e2e step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    axes = axes.ravel()
    colors = {p: plt.cm.tab10(i) for i, p in enumerate(providers)}
    shapes = sorted({r.shape for r in rows if r.kind == "linear"}, key=lambda s: (s[0] or 0, s[1] or 0))
    markers = "osD^v<>px*h"
    for ax, mode in zip(axes, modes):
        sel = [r for r in rows if r.kind == "linear" and r.mode == mode and (r.rank == rank or r.provider == "frozen")]
        for provider in providers:
            for si, shape in enumerate(shapes):
                pts = sorted((r.tokens, r.median_s * 1e3) for r in sel if r.provider == provider and r.shape == shape)
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=markers[si % len(markers)], color=colors[provider],
                        linestyle="-" if si % 2 == 0 else "--",
                        label=f"{provider} {shape[0]}×{shape[1]}")
        ax.set_title(f"{mode} (r={rank}; frozen has no adapter)")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("median ms")
        if sel:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(plain)
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[5].legend(handles, labels, loc="center", fontsize=7, ncol=2)
    axes[5].axis("off")
    ax = axes[4]
    e2e = sorted((r for r in rows if r.kind == "e2e"), key=lambda r: (r.rank or 0, _order(r.provider, e2e_providers)))
    if e2e:
        labels_e2e = [f"{r.provider}\nr={r.rank}" for r in e2e]
        ax.bar(range(len(e2e)), [r.tokens / r.median_s for r in e2e],
               color=[plt.cm.tab10(_order(r.provider, e2e_providers)) for r in e2e])
        ax.set_xticks(range(len(e2e)), labels_e2e, fontsize=7)
        ax.set_ylabel("tokens/s")
        ax.set_title("end-to-end Llama training step")
    else:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
