"""Choosing among a comparison's runs: each method's best learning rate, whether the sweep
brackets it, the next learning rate of ``--lr-sweep auto``, and the mean and range over seeds.

A *cell* is every seed's run of one method at one learning rate (a list of run dicts, each
with ``records``); one seed is a cell of one run.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from .config import AUTO_RANGE

__all__ = ["final_value", "spread", "best_learning_rate", "is_bracketed", "next_auto_lr"]

#: ``--lr-sweep auto`` steps by this factor beyond an optimum at the edge.
AUTO_FACTOR = 3.0


def _runs(cell) -> list[dict[str, Any]]:
    return [cell] if isinstance(cell, dict) else list(cell)


def final_value(run: dict[str, Any], key: str) -> Optional[float]:
    """``key`` of the run's last record (None when missing or not finite)."""
    value = run["records"][-1].get(key)
    return value if value is not None and math.isfinite(value) else None


def spread(values: Sequence[Optional[float]]) -> Optional[tuple[float, float, float]]:
    """``(mean, min, max)`` of the values, or None unless every value is a number."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values), min(values), max(values)


def best_learning_rate(by_lr: dict[float, Any]) -> float:
    """The learning rate whose runs end with the lowest mean held-out loss over seeds.

    A diverged cell (some seed without a finite final held-out loss) never wins unless every
    one did; ties go to the smaller learning rate.

    Example::

        >>> best_learning_rate({1e-4: run_a, 1e-3: run_b})
        0.001
    """
    def key(lr: float):
        s = spread([final_value(r, "heldout_loss") for r in _runs(by_lr[lr])])
        return (s is None, s[0] if s is not None else 0.0, lr)

    return min(by_lr, key=key)


def is_bracketed(lrs: Sequence[float], best: float) -> bool:
    """Whether ``best`` has a tried learning rate on each side (one learning rate brackets nothing)."""
    return min(lrs) < best < max(lrs)


def next_auto_lr(lrs: Sequence[float], best: float) -> Optional[float]:
    """One ×3 step beyond an optimum at the edge of ``lrs`` (None when bracketed or the step
    would leave :data:`~.config.AUTO_RANGE`)."""
    if is_bracketed(lrs, best):
        return None
    step = best * AUTO_FACTOR if best == max(lrs) else best / AUTO_FACTOR
    low, high = AUTO_RANGE
    if not low * (1 - 1e-9) <= step <= high * (1 + 1e-9):
        return None
    return float(f"{step:.3g}")  # 3e-3, 1e-2 … as a person writes them
