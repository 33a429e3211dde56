"""How ``compare`` trains one method once: the trainable model of each method, the held-out
evaluator, one Trainer run with its recorder, and what it prints while it works.

:func:`prepare` turns a copy of the base into a method's model; :func:`trainable_state` and
:func:`restore` let one prepared model start every learning rate from the same
initialization (only the trainable tensors change in training); :func:`train_run` trains it
once and returns the run's dict.  Without bars (not a terminal) :class:`RecordLines` prints
one plain line per recorded step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from transformers import TrainerCallback

from ...nn.init_spec import SORSAInit
from ..finetune.config import FinetuneConfig
from ..finetune.encoding import ListDataset, ResponseOnlyCollator
from ..finetune.evaluation import exact_match, heldout_loss
from ..finetune.model import apply_config_sorsa
from ..finetune.training import make_trainer, training_arguments
from .config import NEEDS_PEFT

__all__ = ["MethodFailed", "method_targets", "prepare", "pissa_init", "trainable_state", "restore", "evaluator", "train_run",
           "RecordLines", "quiet_transformers", "say"]

#: Power iterations of the randomized SVD: the init spec's default, given to PEFT's PiSSA as ``pissa_niter_K``.
RANDOMIZED_NITER = next(f.default for f in dataclasses.fields(SORSAInit) if f.name == "niter")


class MethodFailed(Exception):
    """One method of a comparison diverged or failed; the message says at which step and why."""


def say(line: str) -> None:
    """One plain progress line on standard output, flushed (for logs and pipes)."""
    print(line, flush=True)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Keep transformers' and PEFT's warnings (e.g. about label names) out of the progress bars."""
    from transformers.utils import logging as hf_logging

    import warnings

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # PEFT (0.18) calls transformers' deprecated is_gradient_checkpointing on every model it wraps.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
            yield
    finally:
        hf_logging.set_verbosity(level)


def pissa_init(svd: str) -> str:
    """PEFT's ``init_lora_weights`` for PiSSA with the comparison's SVD: the full one, or
    ``pissa_niter_K`` (randomized, with SORSA's number of power iterations)."""
    return "pissa" if svd == "full" else f"pissa_niter_{RANDOMIZED_NITER}"


def method_targets(method: str, targets: list[str], expert_parameters: list[str]) -> dict[str, Any]:
    """What ``method`` adapts: ``{"matrices": [...], "expert_parameters": [...], "note": ...}``.

    SORSA adapts the routed experts it finds (fused 3-D expert weights), LoRA gets the same ones
    through PEFT's ``target_parameters``, full fine-tuning trains them; PEFT's PiSSA cannot
    initialize them (its ``ParamWrapper`` reads a 2-D ``base_layer.weight``), so it adapts the
    linear matrices only, and the note says so.
    """
    out: dict[str, Any] = {"matrices": list(targets), "expert_parameters": list(expert_parameters)}
    if method == "pissa" and expert_parameters:
        out["expert_parameters"] = []
        out["note"] = (f"the {len(targets)} linear matrices only: PEFT's PiSSA cannot initialize the "
                       f"{len(expert_parameters)} fused expert weights the other methods adapt")
    return out


def prepare(method: str, model, cfg: FinetuneConfig, targets: list[str], expert_parameters: tuple[str, ...] = ()):
    """Turn a fresh copy of the base into ``method``'s trainable model; returns the model.

    ``expert_parameters``: the fused expert weights SORSA adapts (see :func:`method_targets`)."""
    if method == "sorsa":
        return apply_config_sorsa(model, dataclasses.replace(cfg, progress=False))
    experts = method_targets(method, targets, list(expert_parameters))["expert_parameters"]
    if method in ("pissa", "lora"):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError(NEEDS_PEFT) from None
        lora = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, lora_dropout=0.0,
            target_modules=targets, bias="none", target_parameters=experts or None,
            init_lora_weights=pissa_init(cfg.svd) if method == "pissa" else True,
        )
        return get_peft_model(model, lora)
    for p in model.parameters():  # full: the target matrices' and experts' weights, nothing else
        p.requires_grad_(False)
    for name in targets:
        model.get_submodule(name).weight.requires_grad_(True)
    for name in experts:
        model.get_parameter(name).requires_grad_(True)
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A copy of the trainable tensors: what :func:`restore` puts back before the next learning rate."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore(model, state: dict[str, torch.Tensor]) -> None:
    """Put the trainable tensors of :func:`trainable_state` back in place."""
    params = dict(model.named_parameters())
    for n, t in state.items():
        params[n].copy_(t)


def evaluator(tokenizer, held_ds, em_rows, cfg: FinetuneConfig, use_chat: bool,
              max_new: int) -> Callable[[Any], dict[str, float]]:
    """``evaluate(model)``: held-out loss (finetune's: the mean over all response tokens) and exact match."""

    def evaluate(model) -> dict[str, float]:
        out = {"heldout_loss": heldout_loss(model, held_ds, tokenizer.pad_token_id, cfg.eval_batch_size)}
        if em_rows:
            out["exact_match"] = exact_match(model, tokenizer, em_rows, cfg.prompt_template, use_chat, max_new,
                                             cfg.eval_batch_size, max_length=cfg.max_length,
                                             answer_pattern=cfg.answer_pattern)
        return out

    return evaluate


class _FingerprintCollator:
    """The finetune collator, also hashing every batch it builds and counting its tokens."""

    def __init__(self, pad_token_id: int) -> None:
        self.inner = ResponseOnlyCollator(pad_token_id)
        self.hash = hashlib.sha256()
        self.tokens = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.hash.update(batch["input_ids"].numpy().tobytes())
        self.tokens += int(batch["attention_mask"].sum())
        return batch


class _ProgressBar(TrainerCallback):
    """One tqdm bar per run, with the latest training loss."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


class RecordLines(TrainerCallback):
    """One plain line per recorded step of ``recorder`` (added after it, so its numbers are in)."""

    def __init__(self, label: str, recorder) -> None:
        self.label, self.recorder, self.printed, self.max_steps = label, recorder, 0, 0

    def _flush(self) -> None:
        for rec in self.recorder.records[self.printed:]:
            parts = [f"{self.label}: step {rec['step']}/{self.max_steps}"]
            for key, name, fmt in (("train_loss", "train loss", "{:.4f}"), ("heldout_loss", "held-out loss", "{:.4f}"),
                                   ("exact_match", "exact match", "{:.1%}")):
                if rec.get(key) is not None:
                    parts.append(f"{name} {fmt.format(rec[key])}")
            say("  ".join(parts))
        self.printed = len(self.recorder.records)

    def on_train_begin(self, args, state, control, **kwargs):
        self.max_steps, self.printed = state.max_steps, 0
        self._flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()


def _check_diverged(run: dict[str, Any]) -> None:
    """A method whose recorded training loss is NaN/Inf diverged, even if nothing raised."""
    for r in run["records"]:
        loss = r.get("train_loss")
        if loss is not None and not math.isfinite(loss):
            raise MethodFailed(f"diverged: training loss {loss} at step {r['step']}")


def train_run(method: str, model, tokenizer, cfg: FinetuneConfig, train_ex, scratch: Path, recorder,
              label: str, bars: bool) -> dict[str, Any]:
    """Train ``model`` once with ``cfg`` and ``recorder`` attached; the run's dict (records,
    budget, data fingerprint, timings).  Raises :class:`MethodFailed` when it diverges or fails."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ...training.callbacks import SORSACallback

    args = training_arguments(
        dataclasses.replace(cfg, progress=False, logging_steps=recorder.every, eval_steps=None, save_steps=None),
        scratch, has_eval=False,
    )
    collator = _FingerprintCollator(tokenizer.pad_token_id)
    trainer = make_trainer(cfg, model, args, train_dataset=ListDataset(train_ex), data_collator=collator)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if method == "sorsa":
        SORSACallback(gamma=cfg.gamma, lr_max=cfg.learning_rate).install(trainer)
    trainer.add_callback(recorder)
    trainer.add_callback(_ProgressBar(label) if bars else RecordLines(label, recorder))
    t_train = time.perf_counter()
    try:
        trainer.train()
    except Exception as e:  # e.g. the recorder's SVD of NaN weights (torch.linalg.LinAlgError)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise MethodFailed(f"failed at step {trainer.state.global_step}: {type(e).__name__}: {reason}") from e
    train_s = time.perf_counter() - t_train
    run = {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "records": recorder.records,
        "steps": trainer.state.global_step,
        "tokens": collator.tokens,
        "data_fingerprint": collator.hash.hexdigest()[:16],
        "train_s": train_s,
        "step_s": statistics.median(recorder.step_seconds) if recorder.step_seconds else None,
        "record_s": recorder.record_seconds,
        "evaluate_s": recorder.evaluate_seconds,
    }
    _check_diverged(run)
    return run
