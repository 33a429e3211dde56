"""What a run prints while it works: labelled bars for a person, one plain line per logging step for a file.

:class:`LogLines` takes the place of transformers' ``ProgressCallback`` and
``PrinterCallback`` in a ``Trainer``: a ``fine-tuning`` bar and a ``held-out loss`` bar
(when bars are on) and, every logging step, one compact line with the numbers as numbers
(:func:`log_line`) instead of a dict of strings.  :func:`library_bars` turns transformers'
and huggingface_hub's own bars ("Loading weights", "Writing model shards") off for a block,
so that ``progress=False`` means no bar at all.  :func:`phase_line` says, in one plain line, which
phase a run without bars is in (pretraining, SVD init, evaluation), so a log file is never silent
for long.

Example::

    >>> log_line({"loss": 1.6381, "grad_norm": 3.189, "learning_rate": 0.002968, "epoch": 0.6579}, 25, 250)
    'step  25/250  loss 1.6381  grad-norm 3.19  lr 2.97e-03  epoch 0.66'
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Optional

from transformers import TrainerCallback

__all__ = ["LogLines", "log_line", "library_bars", "phase_line"]

# How each logged number is named and written; other keys keep their name and 4 significant digits.
_FIELDS = {
    "loss": ("loss", "{:.4f}"),
    "eval_loss": ("held-out loss", "{:.4f}"),
    "grad_norm": ("grad-norm", "{:.3g}"),
    "learning_rate": ("lr", "{:.2e}"),
    "orthonormality": ("orthonormality", "{:.3g}"),
    "epoch": ("epoch", "{:.2f}"),
}
# Timing and bookkeeping entries the Trainer adds to its logs: not worth a column every step
# (the finetune summary prints the training time).
_SKIPPED_SUFFIXES = ("_runtime", "_per_second", "total_flos")
_SUMMARY_KEY = "train_runtime"  # the Trainer's end-of-training summary


def log_line(logs: dict[str, Any], step: int, max_steps: int) -> Optional[str]:
    """One compact line for a Trainer log entry, or None for the end-of-training summary."""
    if _SUMMARY_KEY in logs:
        return None
    parts = [f"step {step:>{len(str(max_steps))}}/{max_steps}"]
    keys = [k for k in logs if not k.endswith(_SKIPPED_SUFFIXES)]
    keys.sort(key=lambda k: 1 if k not in _FIELDS else 2 if k == "epoch" else 0)  # known first, epoch last
    for key in keys:
        value = logs[key]
        label, fmt = _FIELDS.get(key, (key.replace("_", " "), "{:.4g}"))
        text = fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
        parts.append(f"{label} {text}")
    return "  ".join(parts)


class LogLines(TrainerCallback):
    """Labelled bars (``bars=True``) and one :func:`log_line` per logging step, on the main process.

    Install it in place of transformers' own printers::

        >>> from transformers.trainer_callback import PrinterCallback, ProgressCallback
        >>> for cb in (PrinterCallback, ProgressCallback):
        ...     trainer.remove_callback(cb)
        >>> trainer.add_callback(LogLines(bars=True))
    """

    def __init__(self, bars: bool, label: str = "fine-tuning") -> None:
        self.bars, self.label = bars, label
        self.training_bar = None
        self.prediction_bar = None
        self._step = 0

    def _bar(self, **kwargs):
        from tqdm.auto import tqdm

        return tqdm(dynamic_ncols=True, disable=not self.bars, **kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = self._bar(total=state.max_steps, desc=self.label, unit="step")
            self._step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self._step)
            self._step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not (state.is_world_process_zero and self.bars):
            return
        if self.prediction_bar is None:
            try:
                total = len(eval_dataloader)
            except TypeError:  # an iterable without a length: no bar
                return
            self.prediction_bar = self._bar(total=total, desc="held-out loss", unit="batch", leave=False)
        self.prediction_bar.update(1)

    def _close_prediction_bar(self) -> None:
        if self.prediction_bar is not None:
            self.prediction_bar.close()
            self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_predict(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only while training: the evaluations before and after are reported by the job itself.
        if self.training_bar is None or not logs:
            return
        line = log_line(logs, state.global_step, state.max_steps)
        if line is not None:
            self.training_bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


def phase_line(text: str, bars: bool) -> None:
    """Print ``text`` as one plain line (stdout, flushed) when no bar shows the phase, on the main process.

    Example::

        >>> phase_line("SVD init: 14 layers", bars=False)
        SVD init: 14 layers
    """
    import os

    if not bars and os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's own progress bars on (unchanged) or off for the block.

    Example::

        >>> with library_bars(False):
        ...     model.save_pretrained("out/merged")     # no "Writing model shards" bar
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()
