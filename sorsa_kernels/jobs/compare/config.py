"""What ``sorsa-kernels compare`` is asked to do: :class:`CompareConfig`, checked on construction.

Its options are declared as the finetune job's are (:mod:`.options`; see
:mod:`.finetune.config` for how to add one): the fields below are ``compare``'s own flags,
``finetune`` holds the finetune flags every method shares.  Kept apart from :mod:`.compare`
(the run) so that the command line can build its parser without importing the training code.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Optional, Union

from ..finetune.config import FinetuneConfig, distributed
from ...nn.knobs import Rule
from ..options import ConfigError, check_fields, field_default, option

__all__ = ["ADAPTER_METHODS", "METHODS", "AUTO", "AUTO_START", "AUTO_RANGE", "AUTO_EXTENSIONS", "CompareConfig",
           "check_compare_environment", "check_eval_every", "parse_lr_sweep"]

#: The adapters ``--methods`` picks from, and every method a report can hold, in report order.
ADAPTER_METHODS = ("sorsa", "pissa", "lora")
METHODS = (*ADAPTER_METHODS, "full")
#: ``--lr-sweep auto``: start from these, then one ×3 step beyond an edge optimum at a time,
#: at most AUTO_EXTENSIONS steps per method, within AUTO_RANGE.
AUTO = "auto"
AUTO_START = (1e-4, 3e-4, 1e-3)
AUTO_RANGE = (1e-6, 1e-1)
AUTO_EXTENSIONS = 3

# finetune options that do not apply to a comparison, and why (refused unless left at their default).
_NOT_FOR_COMPARE = {
    "quantize": "every method trains on the same full-precision base",
    "residual_dtype": "it is a SORSA-only storage option",
    "adapter_dtype": "it is a SORSA-only storage option",
    "fsdp": "compare runs in one process",
    "resume_from_checkpoint": "compare saves no checkpoints",
    "save_steps": "compare saves no checkpoints",
    "save_total_limit": "compare saves no checkpoints",
    "gradient_checkpointing": "the PEFT models would need extra set-up for it",
    "logging_steps": "compare logs at every {record_every:flag} step",
    "evaluate": "held-out loss and exact match are what it compares",
}

_COMPARISON = "comparison"

NEEDS_PEFT = ("compare trains PiSSA and LoRA through PEFT, which is not installed: "
              "pip install 'sorsa-kernels[compare]' (or pip install peft)")


@dataclass
class CompareConfig:
    """A comparison: the finetune job's settings (shared by every method) plus what to compare.

    ``finetune.eval_steps`` sets how often held-out loss and exact match are measured
    (a multiple of ``record_every``; default: at every record).

    Example::

        >>> CompareConfig(FinetuneConfig(quantize="nf4"))
        Traceback (most recent call last):
        ConfigError: compare does not take quantize='nf4': every method trains on the same full-precision base
    """

    finetune: FinetuneConfig = option(default_factory=FinetuneConfig, help="the finetune flags", internal=True)
    methods: tuple[str, ...] = option(ADAPTER_METHODS, "adapters to compare", group=_COMPARISON,
                                      choices=ADAPTER_METHODS, nargs="+")
    full: bool = option(False, "also full fine-tuning of the target matrices (small models)", group=_COMPARISON)
    record_every: Optional[int] = option(
        None, "record every N steps; {eval_steps:flag}, a multiple of N, sets how often held-out loss and exact "
        "match are measured (by default at every record)", group=_COMPARISON, metavar="N", shown="a tenth of the steps",
        rule=Rule("a positive number of steps", integer=True, low=1))
    plots: bool = option(True, "compare.json and compare.md only", group=_COMPARISON, flags=("--no-plots",))
    lr_sweep: Union[str, tuple[float, ...], None] = option(
        None, "train every method at each of these learning rates (same budget) and report each at its own best "
        "final held-out loss; 'auto': 1e-4,3e-4,1e-3, then one ×3 step beyond an optimum at the edge at a time "
        "(at most 3, within 1e-6..1e-1) until each method's best is bracketed; replaces {learning_rate:flag}",
        group=_COMPARISON, metavar="LR[,LR...]|auto", shown="one run per method at {learning_rate:flag}")
    seeds: int = option(1, "train every method (and learning rate) with N seeds ({seed:flag}, +1, …): the report "
                        "shows the mean and the min–max range and ranks two methods only where their ranges do "
                        "not overlap", group=_COMPARISON, metavar="N")

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        check_fields(self)
        if not self.method_list:
            raise ConfigError("no method to compare; pass {methods:flag} with one or more of {allowed}", self,
                              allowed=", ".join(ADAPTER_METHODS))
        given = self.finetune  # as given: resolving fills in finetune's defaults
        fields = {f.name: f for f in dataclasses.fields(given)}
        for name, why in _NOT_FOR_COMPARE.items():
            if getattr(given, name) != field_default(fields[name]):
                raise ConfigError("compare does not take {" + name + ":given}: " + why, given)
        if self.record_every is not None:
            check_eval_every(given.eval_steps, self.record_every)
        if not given.embedded and given.data is not None and given.eval_data is None and given.eval_fraction <= 0:
            raise ConfigError("compare needs held-out data: set {eval_fraction:flag} above 0 or pass "
                              "{eval_data:flag}", given)
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError("{seeds} must be a positive number of seeds, got {v!r}", self, v=self.seeds)
        if self.lr_sweep is not None:
            self.lr_sweep = parse_lr_sweep(self.lr_sweep)
            if given.learning_rate is not None:
                raise ConfigError("compare takes {learning_rate:flag} or {lr_sweep:flag}, not both: the sweep "
                                  "gives every learning rate", self)

    @property
    def method_list(self) -> list[str]:
        chosen = list(dict.fromkeys(self.methods))
        if self.full and "full" not in chosen:
            chosen.append("full")
        return [m for m in METHODS if m in chosen]


def parse_lr_sweep(value) -> tuple[float, ...]:
    """``lr_sweep`` as a tuple of floats: from ``"1e-4,3e-4"`` (the command line) or a sequence of numbers;
    ``"auto"`` stays ``"auto"`` (see :data:`AUTO_START`).

    Raises a one-line ConfigError unless it names distinct positive finite learning rates.

    Example::

        >>> parse_lr_sweep("1e-4, 3e-4")
        (0.0001, 0.0003)
    """
    import math

    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, str):
        try:
            value = [float(part) for part in value.split(",")]
        except ValueError:
            raise ConfigError("{lr_sweep} {v!r} is not a comma-separated list of learning rates, e.g. "
                              "1e-4,3e-4,1e-3, or auto", v=value) from None
    lrs = tuple(value)
    if not lrs:
        raise ConfigError("{lr_sweep} needs at least one learning rate, e.g. 1e-4,3e-4,1e-3")
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError("{lr_sweep}: every learning rate must be a positive finite number, got {v!r}", v=lr)
    if len(set(lrs)) != len(lrs):
        raise ConfigError("{lr_sweep} lists a learning rate twice: {v}", v=", ".join(f"{lr:g}" for lr in lrs))
    return tuple(float(lr) for lr in lrs)


def check_eval_every(eval_steps: Optional[int], record_every: int) -> None:
    """Raise a ConfigError unless held-out evaluation falls on records: ``eval_steps`` a multiple of ``record_every``."""
    if eval_steps is not None and eval_steps % record_every:
        raise ConfigError("{eval_steps} {e} must be a multiple of {record_every} {r}", e=eval_steps, r=record_every)


def check_compare_environment(config: CompareConfig) -> None:
    """One-line errors for what this machine cannot do: a torchrun launch, PiSSA/LoRA without PEFT."""
    if distributed():
        raise ValueError("compare runs in one process; launch it without torchrun")
    if {"pissa", "lora"} & set(config.method_list) and importlib.util.find_spec("peft") is None:
        raise ValueError(NEEDS_PEFT)
