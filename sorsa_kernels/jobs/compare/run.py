"""The job behind ``sorsa-kernels compare``: SORSA, PiSSA and LoRA (and optionally full
fine-tuning) trained side by side on the same data, with the paper's analysis recorded.

Every method gets the same budget and the same inputs: one :class:`FinetuneConfig` (the
``finetune`` flags) gives the steps, batch size, learning rate, schedule and warm-up,
clipping, seed and data; the Trainer's seeded sampler gives the same data order (checked:
each method's ``data_fingerprint`` hashes the batches it saw).  The methods:

* ``sorsa``: this package (:func:`~sorsa_kernels.apply_sorsa` + :class:`~sorsa_kernels.SORSACallback`, γ from ``--gamma``);
* ``pissa``: PEFT ``LoraConfig(init_lora_weights="pissa")`` (full SVD; with ``--svd randomized``
  ``pissa_niter_K``, the randomized SVD SORSA then uses too, so both inits cost the same);
* ``lora``: PEFT ``LoraConfig()`` with its default init (Kaiming A, ``B = 0``);
* ``full`` (``--full``): every weight of the target matrices trained in full — the
  paper's "partial fine-tuning" of Section 3; small models only.

Trainable parameters: all three adapters use the same rank ``r`` on the same target
matrices.  LoRA and PiSSA then train ``r(m+n)`` parameters per m×n matrix and SORSA
``r(m+n)+r`` (its ``S`` vector); integer ranks cannot match that exactly, and the
difference is ``1/(m+n)`` (0.4 % on the embedded model).  Scales match too: SORSA's scale
is ``alpha/r`` (1 without ``--alpha``) and LoRA/PiSSA get ``lora_alpha = alpha`` (``r``
without ``--alpha``), i.e. the same scaling — the PiSSA paper's ``lora_alpha = r``.  On an
MoE model SORSA also adapts the routed experts; LoRA gets the same fused expert weights through
PEFT's ``target_parameters``, PiSSA cannot (PEFT's PiSSA init reads a 2-D weight) and adapts the
linear matrices only — the report states each method's targets and trainable count
(:func:`.training.method_targets`).

With ``--lr-sweep LR[,LR...]`` every method is trained at every learning rate with the same
budget, and each is reported at its own best one — the lowest final held-out loss (papers
tune each method; one shared learning rate favours one of them); a best at the edge of the
sweep is flagged "not bracketed", and ``--lr-sweep auto`` extends the sweep until it is (see
:mod:`.sweep`).  With ``--seeds N`` every (method, learning rate) is trained N times and the
report gives the mean and the min–max range.  The sweep itself goes to ``compare.json``
(``lr_sweep``), ``compare.md`` and ``compare_lr_sweep.png``.

Memory: one pretrained copy is held for the whole run; each method's model is a copy of it,
prepared once per seed (each learning rate restores the initial trainable tensors in place)
and freed before the next; the recorders read ``W0`` from the pretrained copy and share one
SVD of it (:class:`~sorsa_kernels.adapters.analysis.Spectrum`).  The held-out evaluation of
the pretrained model (every method's step 0) runs once.  ``compare.json`` holds the peak
resident memory of the process (``machine.peak_rss_bytes``).

Every ``--record-every`` steps a :class:`~sorsa_kernels.TrajectoryCallback` records the
training loss, orthonormality, ΔΣ/ΔD against the pretrained weights, and (every
``--eval-steps``) the held-out loss — the mean token cross-entropy over all held-out
response tokens — and greedy exact match.  :mod:`.report` writes
``compare.json``, ``compare.md`` and the PNGs.

Example::

    >>> from sorsa_kernels.jobs.compare.run import CompareConfig, run_compare
    >>> result = run_compare(CompareConfig(FinetuneConfig(output_dir="cmp")))   # the embedded default
    >>> result.report["methods"]["sorsa"]["final"]["exact_match"]
    0.8
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ...adapters.experts import expert_weight_names
from ...adapters.plan import plan_sorsa
from ...adapters.analysis import spectrum
from ...training.data import arithmetic_problems, load_records, split_records
from ..finetune.config import EMBEDDED_EXAMPLES, EMBEDDED_HELD_OUT, FinetuneConfig, check_output_dir, target_spec
from ..finetune.encoding import ListDataset, encode_all
from ..finetune.evaluation import generation_budget
from ..finetune.model import load_base, targets_worded
from ..options import ConfigError
from ..progress import library_bars
from .config import AUTO, AUTO_EXTENSIONS, AUTO_START, METHODS, CompareConfig, check_compare_environment, \
    check_eval_every
from .sweep import best_learning_rate, next_auto_lr
from .training import (MethodFailed, evaluator, method_targets, prepare, quiet_transformers, restore, say, train_run,
                       trainable_state)

__all__ = ["METHODS", "CompareConfig", "CompareResult", "MethodFailed", "run_compare", "load_splits",
           "best_learning_rate", "peak_rss_bytes"]

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


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident memory so far (maximum RSS), or None where it cannot be read."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _planned_steps(cfg: FinetuneConfig, n_train: int) -> int:
    if cfg.max_steps is not None and cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = max(1, math.ceil(n_train / cfg.per_device_train_batch_size) // cfg.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * cfg.num_train_epochs))


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


@dataclass
class _Setup:
    """What every run of a comparison shares."""

    config: CompareConfig
    cfg: FinetuneConfig
    base: Any
    tokenizer: Any
    targets: list[str]
    expert_parameters: list[str]
    train_ex: list
    record_every: int
    evaluate_every: int
    evaluate: Any
    start_metrics: dict[str, float]
    scratch: Path
    svd_cache: dict = field(default_factory=dict)


def _run(config: CompareConfig, cfg: FinetuneConfig, out: Path) -> CompareResult:
    from .report import build_report, write_report

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = not cfg.progress  # no bars (not a terminal, or --quiet): one plain line per phase
    if lines:
        say(f"compare: loading {cfg.model}")
    train_rows, held_rows = load_splits(cfg)
    base, tokenizer = load_base(cfg.model, pretrain_steps=cfg.pretrain_steps, progress=cfg.progress,
                                cache=cfg.pretrain_cache)
    n_params = sum(p.numel() for p in base.parameters())
    if config.full and n_params > FULL_MAX_PARAMS:
        raise ConfigError("{full:flag} is for small models (up to {most:,} parameters); {model_name} has {n:,}",
                          most=FULL_MAX_PARAMS, model_name=cfg.model, n=n_params)
    # --target-modules read exactly as finetune reads it, ranks checked as apply_sorsa checks them, for every
    # method (PEFT does not check the rank): the linear layers and the routed experts SORSA adapts
    with targets_worded(cfg):
        plan = plan_sorsa(base, cfg.rank, target_spec(cfg), quant_report=None)
    targets, experts = plan.linear, plan.experts
    expert_parameters = [f"{n}.{p}" for n in experts for p in expert_weight_names(base.get_submodule(n))]
    use_chat = (not cfg.embedded) and getattr(tokenizer, "chat_template", None) is not None
    em_rows = held_rows[: cfg.eval_samples]
    budget = generation_budget(tokenizer, em_rows, cfg.prompt_template, use_chat, cfg.max_length, cfg.max_new_tokens)
    train_ex = encode_all(tokenizer, train_rows, cfg, use_chat, "training")
    held_ex = encode_all(tokenizer, held_rows, cfg, use_chat, "held-out")
    steps = _planned_steps(cfg, len(train_ex))
    record_every = config.record_every or max(1, steps // DEFAULT_RECORDS)
    check_eval_every(cfg.eval_steps, record_every)
    evaluate = evaluator(tokenizer, ListDataset(held_ex), em_rows, cfg, use_chat, budget.max_new_tokens)
    if lines:
        say(f"compare: evaluating the pretrained model on {len(held_ex)} held-out examples (once: every method "
            "starts from it)")
    t_eval = time.perf_counter()
    was_training = base.training
    base.eval()
    with torch.no_grad():
        start_metrics = evaluate(base)
    base.train(was_training)
    start_eval_s = time.perf_counter() - t_eval
    if lines:
        say(f"compare: SVD of the {len(targets)} pretrained target matrices (once: ΔΣ/ΔD of every run use it)")
    t_svd = time.perf_counter()
    svd_cache = {(n, tuple(base.get_submodule(n).weight.shape)): spectrum(base.get_submodule(n).weight)
                 for n in targets}
    w0_svd_s = time.perf_counter() - t_svd
    setup_s = time.perf_counter() - t_start

    sweep: dict[str, dict[float, list[dict[str, Any]]]] = {}
    sweep_failed: dict[str, dict[float, str]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sorsa-compare-") as scratch, quiet_transformers():
        setup = _Setup(config, cfg, base, tokenizer, targets, expert_parameters, train_ex, record_every,
                       (cfg.eval_steps or record_every) // record_every, evaluate, start_metrics, Path(scratch),
                       svd_cache)
        for method in config.method_list:
            try:  # one method diverging must not lose the others' results
                sweep[method], sweep_failed[method] = _method_cells(setup, method, lines)
            except MethodFailed as e:
                failed[method] = str(e)
            gc.collect()  # the method's model is gone before the next one is copied
    if not sweep:
        raise ValueError("every method failed: " + "; ".join(f"{m}: {why}" for m, why in failed.items()))
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = build_report(
        config, cfg, sweep, sweep_failed, record_every=record_every, evaluate_every=setup.evaluate_every,
        data={"model_parameters": n_params, "training_examples": len(train_ex), "heldout_examples": len(held_ex),
              "exact_match_examples": len(em_rows), "max_new_tokens": budget.max_new_tokens,
              "prompts_cut": budget.prompts_cut, "answers_cut": budget.answers_cut,
              "longest_prompt_tokens": budget.longest_prompt, "chat_template": use_chat},
        timing={"setup_s": setup_s, "start_evaluation_s": start_eval_s, "w0_svd_s": w0_svd_s, "total_s": time.perf_counter() - t_start,
                "cpu_s": time.process_time() - cpu_start},
        machine={"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "load_avg_start": load_start, "load_avg_end": load_end, "peak_rss_bytes": peak_rss_bytes()})
    if failed:
        report["failed"] = failed
    files, note = write_report(report, out, plots=config.plots)
    return CompareResult(output_dir=out, report=report, files=files, plot_note=note, failed=failed)


def _method_cells(setup: _Setup, method: str, lines: bool) -> tuple[dict[float, list[dict]], dict[float, str]]:
    """``({lr: [run per seed]}, {lr: why it failed})`` of one method over the sweep and the seeds.

    Each seed prepares one copy of the base; every learning rate of a round restores its
    initial trainable tensors.  With ``--lr-sweep auto`` a round adds one learning rate beyond
    an optimum at the edge, at most AUTO_EXTENSIONS times.
    """
    config, cfg = setup.config, setup.cfg
    auto = config.lr_sweep == AUTO
    lrs = AUTO_START if auto else (tuple(config.lr_sweep) if config.lr_sweep else (cfg.learning_rate,))
    cells: dict[float, list[dict]] = {}
    failed: dict[float, str] = {}
    pending, extensions = list(lrs), 0
    while pending:
        for seed in range(cfg.seed, cfg.seed + config.seeds):
            seed_cfg = dataclasses.replace(cfg, seed=seed)
            t0 = time.perf_counter()
            if lines:
                say(f"{method}: initializing (seed {seed}, {cfg.svd} SVD)" if method in ("sorsa", "pissa")
                    else f"{method}: initializing (seed {seed})")
            torch.manual_seed(seed)  # LoRA's A init; the data order has its own seeded sampler
            model = prepare(method, copy.deepcopy(setup.base), seed_cfg, setup.targets, setup.expert_parameters)
            prepare_s = time.perf_counter() - t0
            start = trainable_state(model)
            for lr in pending:
                if lr in failed:
                    continue
                restore(model, start)
                try:
                    run = _train_once(setup, method, model, dataclasses.replace(seed_cfg, learning_rate=lr))
                except MethodFailed as e:
                    failed[lr] = str(e)
                    cells.pop(lr, None)
                    continue
                run.update(learning_rate=lr, seed=seed, prepare_s=prepare_s,
                           targets=method_targets(method, setup.targets, setup.expert_parameters))
                cells.setdefault(lr, []).append(run)
            del model, start
            gc.collect()
        pending = []
        if auto and extensions < AUTO_EXTENSIONS and cells:
            nxt = next_auto_lr(sorted([*cells, *failed]), best_learning_rate(cells))
            if nxt is not None and nxt not in cells and nxt not in failed:
                pending, extensions = [nxt], extensions + 1
    if not cells:
        if len(failed) == 1:
            raise MethodFailed(next(iter(failed.values())))
        raise MethodFailed("every learning rate failed: " + "; ".join(f"lr {lr:g}: {why}" for lr, why in failed.items()))
    return cells, failed


def _train_once(setup: _Setup, method: str, model, cfg: FinetuneConfig) -> dict[str, Any]:
    from ...training.drift_callback import TrajectoryCallback

    pretrained = {n: setup.base.get_submodule(n).weight for n in setup.targets}  # references, not copies
    recorder = TrajectoryCallback(setup.record_every, pretrained=pretrained, target_modules=setup.targets,
                                  evaluate=setup.evaluate, evaluate_every=setup.evaluate_every,
                                  svd_cache=setup.svd_cache, start_metrics=setup.start_metrics)
    label = f"{method} lr {cfg.learning_rate:g} seed {cfg.seed}"
    scratch = setup.scratch / method / f"lr{cfg.learning_rate:g}-seed{cfg.seed}"
    return train_run(method, model, setup.tokenizer, cfg, setup.train_ex, scratch, recorder, label, cfg.progress)
