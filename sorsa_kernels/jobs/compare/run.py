"""The job behind ``sorsa-kernels compare``: SORSA, PiSSA and LoRA (and optionally full
fine-tuning) trained side by side on the same data, with the paper's analysis recorded.

Every method gets the same budget and the same inputs: one :class:`FinetuneConfig` (the
``finetune`` flags) gives the steps, batch size, learning rate, schedule and warm-up,
clipping, seed and data; the Trainer's seeded sampler gives the same data order (checked:
each method's ``data_fingerprint`` hashes the batches it saw).  The methods:

* ``sorsa``: this package (:func:`~sorsa_kernels.apply_sorsa` + :class:`~sorsa_kernels.SORSACallback`, γ from ``--gamma``);
* ``pissa``: PEFT ``LoraConfig(init_lora_weights="pissa")`` (full SVD);
* ``lora``: PEFT ``LoraConfig()`` with its default init (Kaiming A, ``B = 0``);
* ``full`` (``--full``): every weight of the target matrices trained in full — the
  paper's "partial fine-tuning" of Section 3; small models only.

Trainable parameters: all three adapters use the same rank ``r`` on the same target
matrices.  LoRA and PiSSA then train ``r(m+n)`` parameters per m×n matrix and SORSA
``r(m+n)+r`` (its ``S`` vector); integer ranks cannot match that exactly, and the
difference is ``1/(m+n)`` (0.4 % on the embedded model).  Scales match too: SORSA's scale
is ``alpha/r`` (1 without ``--alpha``) and LoRA/PiSSA get ``lora_alpha = alpha`` (``r``
without ``--alpha``), i.e. the same scaling — the PiSSA paper's ``lora_alpha = r``.

With ``--lr-sweep LR[,LR...]`` every method is trained at every learning rate with the same
budget, and each is reported at its own best one — the lowest final held-out loss (papers
tune each method; one shared learning rate favours one of them).  The sweep itself goes to
``compare.json`` (``lr_sweep``), ``compare.md`` and ``compare_lr_sweep.png``.

Every ``--record-every`` steps a :class:`~sorsa_kernels.TrajectoryCallback` records the
training loss, orthonormality, ΔΣ/ΔD against the pretrained weights, and (every
``--eval-steps``) the held-out loss — the mean token cross-entropy over all held-out
response tokens — and greedy exact match.  :mod:`.compare_report` writes
``compare.json``, ``compare.md`` and the PNGs.

Example::

    >>> from sorsa_kernels.jobs.compare.run import CompareConfig, run_compare
    >>> result = run_compare(CompareConfig(FinetuneConfig(output_dir="cmp")))   # the embedded default
    >>> result.report["methods"]["sorsa"]["final"]["exact_match"]
    0.8
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from transformers import TrainerCallback

from ...nn.checks import validate_rank
from .config import METHODS, NEEDS_PEFT, CompareConfig, check_compare_environment, check_eval_every
from ...training.data import arithmetic_problems, load_records, split_records
from ..finetune.config import EMBEDDED_EXAMPLES, EMBEDDED_HELD_OUT, FinetuneConfig, check_output_dir, target_spec
from ..finetune.encoding import ListDataset, ResponseOnlyCollator, encode_all
from ..finetune.evaluation import default_max_new_tokens, exact_match
from ..finetune.model import apply_config_sorsa, load_base
from ..progress import library_bars
from ..finetune.training import training_arguments
from ..options import ConfigError
from ...adapters.surgery import find_targets

__all__ = ["METHODS", "CompareConfig", "CompareResult", "run_compare", "load_splits", "best_learning_rate"]

#: ``--full`` trains every target weight with AdamW (weights, grads and two moments):
#: refused above this many parameters in the whole model.
FULL_MAX_PARAMS = 1_000_000_000
#: Roughly how many records a run gets when --record-every is not given.
DEFAULT_RECORDS = 10


@dataclass
class CompareResult:
    """A finished comparison: the report (what ``compare.json`` holds) and the files written."""

    output_dir: Path
    report: dict[str, Any]
    files: list[Path]
    plot_note: Optional[str] = None
    #: ``{method: one-line reason}`` for each method that diverged or failed (its results are left out).
    failed: dict[str, str] = field(default_factory=dict)


def load_splits(cfg: FinetuneConfig) -> tuple[list[dict], list[dict]]:
    """``(training rows, held-out rows)`` exactly as the finetune job splits them."""
    if cfg.data is None:
        rows = arithmetic_problems(EMBEDDED_EXAMPLES, seed=0)
        return rows[EMBEDDED_HELD_OUT:], rows[:EMBEDDED_HELD_OUT]
    rows = load_records(cfg.data, cfg.prompt_field, cfg.response_field)
    if cfg.eval_data is not None:
        return rows, load_records(cfg.eval_data, cfg.prompt_field, cfg.response_field)
    return split_records(rows, cfg.eval_fraction, seed=cfg.seed)


def _planned_steps(cfg: FinetuneConfig, n_train: int) -> int:
    if cfg.max_steps is not None and cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = max(1, math.ceil(n_train / cfg.per_device_train_batch_size) // cfg.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * cfg.num_train_epochs))


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
    """One tqdm bar per method, with the latest training loss."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self.desc, self.enabled, self.bar = desc, enabled, None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", disable=not self.enabled)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()
        return control


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
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


def _prepare(method: str, model, cfg: FinetuneConfig, targets: list[str]):
    """Turn a fresh copy of the base into ``method``'s trainable model; returns the model."""
    if method == "sorsa":
        return apply_config_sorsa(model, dataclasses.replace(cfg, progress=False))
    if method in ("pissa", "lora"):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError(NEEDS_PEFT) from None
        lora = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, lora_dropout=0.0,
            target_modules=targets, bias="none",
            init_lora_weights="pissa" if method == "pissa" else True,
        )
        return get_peft_model(model, lora)
    for p in model.parameters():  # full: the target matrices' weights, nothing else
        p.requires_grad_(False)
    for name in targets:
        model.get_submodule(name).weight.requires_grad_(True)
    return model


def _evaluator(tokenizer, held_ds, em_rows, cfg: FinetuneConfig, use_chat: bool, max_new: int):
    """``evaluate(model)``: held-out loss (mean over all response tokens) and exact match."""
    collate = ResponseOnlyCollator(tokenizer.pad_token_id)

    def evaluate(model) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(held_ds), cfg.eval_batch_size):
            batch = collate([held_ds[i] for i in range(start, min(start + cfg.eval_batch_size, len(held_ds)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
        out = {"heldout_loss": total / max(count, 1)}
        if em_rows:
            out["exact_match"] = exact_match(model, tokenizer, em_rows, cfg.prompt_template, use_chat, max_new,
                                             cfg.eval_batch_size, max_length=cfg.max_length,
                                             answer_pattern=cfg.answer_pattern)
        return out

    return evaluate


# ---------------------------------------------------------------------- learning-rate sweep
def best_learning_rate(by_lr: dict[float, dict[str, Any]]) -> float:
    """The learning rate whose run ends with the lowest held-out loss.

    A diverged run (no finite final held-out loss) never wins unless every run diverged;
    ties go to the smaller learning rate.

    Example::

        >>> best_learning_rate({1e-4: run_a, 1e-3: run_b})
        0.001
    """
    def key(lr: float):
        loss = by_lr[lr]["records"][-1].get("heldout_loss")
        finite = loss is not None and math.isfinite(loss)
        return (not finite, loss if finite else 0.0, lr)

    return min(by_lr, key=key)


def _train_sweep(model, lrs: tuple[float, ...], cfg: FinetuneConfig,
                 train_one) -> tuple[dict[float, dict[str, Any]], dict[float, str]]:
    """``({lr: run}, {lr: why it failed})`` of one prepared ``model`` trained from its initial state
    at every learning rate.

    ``train_one(model, cfg)`` trains and returns the run's dict, or raises
    :class:`MethodFailed`; each learning rate but the last trains a copy, so every run starts
    from the same initialization.  A learning rate that diverges is left out of the choice;
    the method fails only when every one does (with one learning rate: its own message).
    """
    runs, failed = {}, {}
    for i, lr in enumerate(lrs):
        trial = model if i == len(lrs) - 1 else copy.deepcopy(model)
        try:
            runs[lr] = train_one(trial, dataclasses.replace(cfg, learning_rate=lr))
            runs[lr]["learning_rate"] = lr
        except MethodFailed as e:
            if len(lrs) == 1:
                raise
            failed[lr] = str(e)
        del trial
    if not runs:
        raise MethodFailed("every learning rate failed: " + "; ".join(f"lr {lr:g}: {why}" for lr, why in failed.items()))
    return runs, failed


def run_compare(config: CompareConfig) -> CompareResult:
    """Train every method of ``config`` with one budget, record their trajectories, write the report.

    Writes ``compare.json``, ``compare.md`` and (with matplotlib) ``compare_loss.png``,
    ``compare_drift.png`` and ``compare_drift_layers.png`` under ``finetune.output_dir``
    (default ``./sorsa-compare-<time>``).  Every input is checked before anything is trained.
    """
    cfg = config.finetune.resolved()
    cfg.check_environment()
    check_compare_environment(config)
    out = Path(cfg.output_dir or time.strftime("sorsa-compare-%Y%m%d-%H%M%S"))
    check_output_dir(out, hint=" --output-dir")
    with library_bars(cfg.progress):  # progress=False: transformers' own bars off too
        if not cfg.embedded:
            return _run(config, cfg, out)
        # As in the finetune job: one thread for the tiny model (faster, and bit-reproducible).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run(config, cfg, out)
        finally:
            torch.set_num_threads(threads)


def _run(config: CompareConfig, cfg: FinetuneConfig, out: Path) -> CompareResult:
    from ...training.drift_callback import TrajectoryCallback
    from .report import build_report, write_report

    t_start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    train_rows, held_rows = load_splits(cfg)
    base, tokenizer = load_base(cfg.model, pretrain_steps=cfg.pretrain_steps, progress=cfg.progress,
                                cache=cfg.pretrain_cache)
    if config.full and sum(p.numel() for p in base.parameters()) > FULL_MAX_PARAMS:
        raise ConfigError("{full:flag} is for small models (up to {most:,} parameters); {model_name} has {n:,}",
                          most=FULL_MAX_PARAMS, model_name=cfg.model, n=sum(p.numel() for p in base.parameters()))
    targets = find_targets(base, target_spec(cfg))  # --target-modules read exactly as finetune reads it
    for name in targets:  # PEFT does not check the rank; fail as apply_sorsa would, for every method
        w = base.get_submodule(name).weight
        validate_rank(cfg.rank, w.shape[1], w.shape[0], name)
    pretrained = {n: base.get_submodule(n).weight.detach().to("cpu", copy=True) for n in targets}
    use_chat = (not cfg.embedded) and getattr(tokenizer, "chat_template", None) is not None
    train_ex = encode_all(tokenizer, train_rows, cfg, use_chat, "training")
    held_ex = encode_all(tokenizer, held_rows, cfg, use_chat, "held-out")
    em_rows = held_rows[: cfg.eval_samples]
    max_new = cfg.max_new_tokens or default_max_new_tokens(tokenizer, em_rows)
    steps = _planned_steps(cfg, len(train_ex))
    record_every = config.record_every or max(1, steps // DEFAULT_RECORDS)
    check_eval_every(cfg.eval_steps, record_every)
    evaluate_every = (cfg.eval_steps or record_every) // record_every
    evaluate = _evaluator(tokenizer, ListDataset(held_ex), em_rows, cfg, use_chat, max_new)
    setup_s = time.perf_counter() - t_start

    runs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    sweep: dict[str, dict[float, dict[str, Any]]] = {}
    sweep_failed: dict[str, dict[float, str]] = {}
    lrs = tuple(config.lr_sweep) if config.lr_sweep else (cfg.learning_rate,)
    with tempfile.TemporaryDirectory(prefix="sorsa-compare-") as scratch, _quiet_transformers():
        for method in config.method_list:
            t0 = time.perf_counter()
            if cfg.embedded:
                model = copy.deepcopy(base)
            else:
                model, _ = load_base(cfg.model, progress=False)
            torch.manual_seed(cfg.seed)  # LoRA's A init; the data order has its own seeded sampler
            try:  # one method diverging must not lose the others' results
                model = _prepare(method, model, cfg, targets)
                prepare_s = time.perf_counter() - t0

                def train_one(trial, trial_cfg, method=method, prepare_s=prepare_s):
                    recorder = TrajectoryCallback(record_every, pretrained=pretrained, target_modules=targets,
                                                  evaluate=evaluate, evaluate_every=evaluate_every)
                    run = _train(method, trial, tokenizer, trial_cfg, train_ex,
                                 Path(scratch) / method / f"lr{trial_cfg.learning_rate:g}", recorder,
                                 time.perf_counter() - prepare_s)
                    _check_diverged(run)
                    return run

                sweep[method], sweep_failed[method] = _train_sweep(model, lrs, cfg, train_one)
                runs[method] = sweep[method][best_learning_rate(sweep[method])]
            except MethodFailed as e:
                runs.pop(method, None)
                sweep.pop(method, None)
                failed[method] = str(e)
            del model
    if not cfg.embedded:
        del base
    if not runs:
        raise ValueError("every method failed: " + "; ".join(f"{m}: {why}" for m, why in failed.items()))
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = build_report(config, cfg, runs, record_every=record_every, evaluate_every=evaluate_every,
                          sweep=sweep if config.lr_sweep else None, sweep_failed=sweep_failed,
                          timing={"setup_s": setup_s, "total_s": time.perf_counter() - t_start},
                          machine={"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                   "load_avg_start": load_start, "load_avg_end": load_end})
    if failed:
        report["failed"] = failed
    files, note = write_report(report, out, plots=config.plots)
    return CompareResult(output_dir=out, report=report, files=files, plot_note=note, failed=failed)


class MethodFailed(Exception):
    """One method of a comparison diverged or failed; the message says at which step and why."""


def _check_diverged(run: dict[str, Any]) -> None:
    """A method whose recorded training loss is NaN/Inf diverged, even if nothing raised."""
    for r in run["records"]:
        loss = r.get("train_loss")
        if loss is not None and not math.isfinite(loss):
            raise MethodFailed(f"diverged: training loss {loss} at step {r['step']}")


def _train(method, model, tokenizer, cfg, train_ex, scratch: Path, recorder, t0: float) -> dict[str, Any]:
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ...training.callbacks import SORSACallback

    args = training_arguments(
        dataclasses.replace(cfg, progress=False, logging_steps=recorder.every, eval_steps=None, save_steps=None),
        scratch, has_eval=False,
    )
    collator = _FingerprintCollator(tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(train_ex), data_collator=collator)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if method == "sorsa":
        SORSACallback(gamma=cfg.gamma, lr_max=cfg.learning_rate).install(trainer)
    trainer.add_callback(recorder)
    trainer.add_callback(_ProgressBar(f"{method:>5}", cfg.progress))
    t_train = time.perf_counter()
    try:
        trainer.train()
    except Exception as e:  # e.g. the recorder's SVD of NaN weights (torch.linalg.LinAlgError)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise MethodFailed(f"failed at step {trainer.state.global_step}: {type(e).__name__}: {reason}") from e
    train_s = time.perf_counter() - t_train
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "records": recorder.records,
        "steps": trainer.state.global_step,
        "tokens": collator.tokens,
        "data_fingerprint": collator.hash.hexdigest()[:16],
        "train_s": train_s,
        "record_s": recorder.record_seconds,
        "wall_s": time.perf_counter() - t0,
    }
