"""The training run: transformers' TrainingArguments and Trainer wired for SORSA.

:func:`run_finetune` is the whole job: check the config and output folder, load data
and model, apply SORSA, evaluate, train with :class:`sorsa_kernels.SORSACallback` (the
orthonormal regularizer after clipping), evaluate again and hand over to
:mod:`.outputs`.  :func:`training_arguments` maps a :class:`FinetuneConfig` onto
``TrainingArguments`` (AdamW, schedule, checkpointing, DDP on CPU, FSDP2).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ...training.data import arithmetic_problems, load_records, split_records
from ..options import ConfigError
from ..progress import LogLines, library_bars, phase_line
from .config import (
    DTYPES, EMBEDDED_EXAMPLES, EMBEDDED_HELD_OUT, FSDP_CPU_MESSAGE, FinetuneConfig, distributed, is_main_process,
)
from .encoding import ListDataset, ResponseOnlyCollator, encode_all
from .evaluation import evaluate, generation_budget, metrics_line
from .model import apply_config_sorsa, load_base, load_sharded_quantized
from .outputs import FinetuneResult, save_outputs, write_metrics
from .rundir import (
    CHECKPOINTS, METRICS_FILE, base_fingerprint, check_resume_matches, check_run_folder, checkpoint_names,
    claim_default_output_dir, claim_run_folder, OutputState, cleanup_failed_run, resolve_resume, run_recorder,
)


def training_arguments(cfg: FinetuneConfig, trainer_dir: Path, has_eval: bool):
    """``transformers.TrainingArguments`` for a resolved config (checkpoints under ``trainer_dir``)."""
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=str(trainer_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=0.0 if cfg.gradient_release else cfg.max_grad_norm,  # released: clipped per parameter
        optim="adamw_torch",
        bf16=cfg.bf16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if cfg.eval_steps and has_eval else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to,
        remove_unused_columns=False,
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # accelerate treats a torchrun launch without a GPU as distributed (gloo) only with use_cpu.
        use_cpu=distributed() and not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing.
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    kwargs[ckpt] = cfg.gradient_checkpointing
    if cfg.gradient_checkpointing:  # non-reentrant: the frozen base gives inputs no requires_grad
        kwargs[ckpt + "_kwargs"] = {"use_reentrant": False}
    if cfg.fsdp:
        # transformers ≥ 5: fsdp=True plus fsdp_config; version 2 is FSDP2 (fully_shard), which
        # wraps each decoder layer (the model's _no_split_modules) and then the root.
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {"version": 2, "reshard_after_forward": True}
    kwargs.update(cfg.extra_training_args)
    return TrainingArguments(**kwargs)


def optimizer_spec(cfg: FinetuneConfig, args) -> Optional[tuple]:
    """The Trainer's ``optimizer_cls_and_kwargs`` for the memory levers (``optim``, ``gradient_release``,
    bf16 adapters: :mod:`sorsa_kernels.training.optim`), or None for the Trainer's own AdamW.

    The factory builds the optimizer from the model the Trainer trains (after any wrapping)."""
    bf16 = DTYPES.get(cfg.adapter_dtype or "float32") == torch.bfloat16
    if cfg.optim == "adamw" and not cfg.gradient_release and not bf16:
        return None
    from ...training.gradient_release import enable_gradient_release
    from ...training.optim import adapter_scales, optimizer_for_params

    kw = dict(weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
              seed=cfg.seed)

    def build(model) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        scales = adapter_scales(model)
        if not cfg.gradient_release:
            return optimizer_for_params(params, cfg.optim, args.learning_rate, fp32_state=scales, **kw)
        index = {id(p): i for i, p in enumerate(params)}  # each parameter's own rounding seed
        return enable_gradient_release(
            model, lambda ps: optimizer_for_params(ps, cfg.optim, args.learning_rate, fp32_state=scales,
                                                   **{**kw, "seed": cfg.seed * len(params) + index[id(ps[0])]}),
            gamma=cfg.gamma, lr_max=args.learning_rate, max_grad_norm=cfg.max_grad_norm)

    return (lambda: build), {}


def make_trainer(cfg: FinetuneConfig, model, args, **kwargs):
    """The ``Trainer`` of a finetune (or compare) run: the chunked loss when ``loss_chunk_size`` is set,
    the levers' optimizer (:func:`optimizer_spec`); ``kwargs`` as ``Trainer``'s.

    Its ``evaluate`` (what ``--eval-steps`` calls) logs the job's one held-out loss,
    :func:`~.evaluation.heldout_loss` (the mean over every response token), not the Trainer's
    mean of per-batch means, so a mid-training ``eval_loss`` and the summary's held-out loss
    are the same quantity."""
    from ...training.loss import ChunkedLossTrainer
    from .evaluation import heldout_loss

    class FinetuneTrainer(ChunkedLossTrainer):
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            pad = getattr(self.data_collator, "pad_token_id", None)
            if dataset is None or pad is None:  # not a finetune set-up: the Trainer's own evaluation
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            metrics = {f"{metric_key_prefix}_loss": heldout_loss(self.model, dataset, pad,
                                                                 self.args.per_device_eval_batch_size)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return FinetuneTrainer(model=model, args=args, loss_chunk_size=cfg.loss_chunk_size,
                           optimizer_cls_and_kwargs=optimizer_spec(cfg, args), **kwargs)


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Run the whole job: load, SORSA surgery, train, evaluate before/after, save.

    Writes under ``output_dir``: ``adapter/`` (:func:`sorsa_kernels.save_adapter`),
    ``merged/`` (the merged model and tokenizer, loadable with ``AutoModelForCausalLM``
    and ``AutoTokenizer``), ``base/`` (embedded default only: the pretrained base, so
    ``merge``/``analyze`` can use it), ``checkpoints/`` (when ``save_steps`` is set) and
    ``metrics.json``.  Every input is checked before anything is written; each artifact
    is published whole (a temporary sibling renamed into place), ``metrics.json`` last;
    what a rerun or ``resume_from_checkpoint`` may do with an existing folder, and how a
    failed run leaves it, is in :mod:`.rundir`.

    Example::

        >>> run_finetune(FinetuneConfig(model="meta-llama/Llama-2-7b-hf", data="train.jsonl",
        ...                             output_dir="out", bf16=True))
    """
    cfg = config.resolved()
    cfg.check_environment()
    from ..plan import check_run_fits

    line = check_run_fits(cfg, force=cfg.force)  # the plan's peak; refused here when it cannot fit the GPU
    if is_main_process():
        print(line, flush=True)
    # progress=False: no bar at all, transformers' own ("Loading weights", "Writing model shards") included
    with library_bars(cfg.progress and is_main_process()):
        if not cfg.embedded:
            return _run(cfg)
        # The embedded model is so small that a second CPU thread only adds synchronization
        # (and, on a busy machine, oversubscription stalls); one thread is also bit-reproducible.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run(cfg)
        finally:
            torch.set_num_threads(threads)


def _run(cfg: FinetuneConfig) -> FinetuneResult:
    t_start = time.perf_counter()
    if cfg.output_dir is None and distributed():
        raise ConfigError("pass {output_dir:flag} when running under torchrun (every process must agree on it)")
    out = Path(cfg.output_dir) if cfg.output_dir is not None else None
    # Every rank checks before anything is written (rank 0 is the only one that writes).
    if out is not None:
        ckpt = check_run_folder(out, cfg.resume_from_checkpoint)
    elif cfg.resume_from_checkpoint == "last":
        raise ConfigError("{resume_from_checkpoint:given} needs the run's {output_dir:flag}", cfg)
    elif cfg.resume_from_checkpoint is not None:
        ckpt = resolve_resume(cfg.resume_from_checkpoint, Path("."), OutputState(Path("."), "absent"))
    else:
        ckpt = None
    if ckpt is not None:
        check_resume_matches(ckpt, cfg)  # settings first: cheap, before any model is loaded

    # ---- from here on the run owns its folder (another run into it is refused), and tidies it if it fails
    lock, existing = None, frozenset()
    if out is not None and is_main_process():
        lock = claim_run_folder(out)
        existing = checkpoint_names(out)  # a failed run removes only checkpoints it created
    try:
        if lock is not None:
            ckpt = check_run_folder(out, cfg.resume_from_checkpoint)  # again, now that no other run can write
        result = _load_train_and_save(cfg, out, ckpt, t_start, existing)
    except BaseException:
        if lock is not None:
            cleanup_failed_run(lock.out, lock.created, existing)
            lock.release()
        raise
    if lock is not None:
        lock.release(finished=True)
    return result


def _load_train_and_save(cfg: FinetuneConfig, out, ckpt, t_start: float, existing: frozenset) -> FinetuneResult:
    # ---- data (checked before the model is loaded: it is cheaper)
    if cfg.data is not None:
        rows = load_records(cfg.data, cfg.prompt_field, cfg.response_field)
        if cfg.eval_data is not None:
            train_rows, held_rows = rows, load_records(cfg.eval_data, cfg.prompt_field, cfg.response_field)
        else:
            train_rows, held_rows = split_records(rows, cfg.eval_fraction if cfg.evaluate else 0.0, seed=cfg.seed)
    else:
        rows = arithmetic_problems(EMBEDDED_EXAMPLES, seed=0)
        held_rows, train_rows = rows[:EMBEDDED_HELD_OUT], rows[EMBEDDED_HELD_OUT:]

    # ---- model, tokenizer, surgery (rank/target errors surface here, before any write)
    sharded_qsorsa = cfg.fsdp and cfg.quantize is not None
    if sharded_qsorsa:  # streamed, quantized and sharded as it loads; the Trainer keeps the FSDP2 model
        model, tokenizer, base_copy = load_sharded_quantized(cfg)
        # the dense base never exists on one rank, so there is no base to fingerprint: a resume
        # checks the run's settings (above) but not the base's weights
        fingerprint = None
    else:
        model, tokenizer = load_base(cfg.model, pretrain_steps=cfg.pretrain_steps,
                                     progress=cfg.progress and is_main_process(), cache=cfg.pretrain_cache)
        fingerprint = base_fingerprint(model)
        if ckpt is not None:
            check_resume_matches(ckpt, cfg, fingerprint)
        base_copy = None
        if cfg.embedded:
            import copy

            base_copy = copy.deepcopy(model)
    use_chat = (not cfg.embedded) and getattr(tokenizer, "chat_template", None) is not None
    data_counts: dict[str, dict] = {"training": {}, "held-out": {}}  # what --max-length dropped / cut
    train_ex = encode_all(tokenizer, train_rows, cfg, use_chat, "training", data_counts["training"])
    eval_ex = encode_all(tokenizer, held_rows, cfg, use_chat, "held-out", data_counts["held-out"]) if held_rows else None
    em_rows = held_rows[: cfg.eval_samples] if held_rows and cfg.evaluate else []  # exact match's problems
    max_new = _generation_budget(cfg, tokenizer, em_rows, use_chat)  # a prompt that cannot fit: refused here
    if not sharded_qsorsa:
        apply_config_sorsa(model, cfg)
    print_adaptation_summary(model, cfg)
    if cfg.gradient_checkpointing:
        model.config.use_cache = False

    # ---- from here on the run writes: claim a default folder (a given one is already claimed)
    own_default = out is None
    if own_default:
        out = claim_default_output_dir()
        cfg.output_dir = str(out)
        lock = claim_run_folder(out)
    try:
        result = _train_and_save(cfg, out, ckpt, model, tokenizer, base_copy, train_ex, eval_ex, em_rows,
                                 use_chat, fingerprint, t_start, data_counts, max_new)
    except BaseException:
        if own_default:
            cleanup_failed_run(out, True, existing)
            lock.release()
        raise
    if own_default:
        lock.release(finished=True)
    return result


def _generation_budget(cfg: FinetuneConfig, tokenizer, em_rows: list[dict], use_chat: bool) -> int:
    """Exact match's ``max_new_tokens``, fitted beside the longest held-out prompt within
    ``--max-length`` (:func:`~.evaluation.generation_budget`, as ``compare`` does): a prompt is
    never cut; one that leaves no room is a one-line error before the surgery."""
    if not em_rows:
        return cfg.max_new_tokens or 1
    budget = generation_budget(tokenizer, em_rows, cfg.prompt_template, use_chat, cfg.max_length, cfg.max_new_tokens)
    if budget.answers_cut and is_main_process():
        print(f"exact match: {budget.answers_cut} of {len(em_rows)} reference answers are longer than max_new_tokens "
              f"{budget.max_new_tokens} (what --max-length {cfg.max_length} leaves beside the longest prompt, "
              f"{budget.longest_prompt} tokens): they cannot match whole", flush=True)
    return budget.max_new_tokens


def print_adaptation_summary(model, cfg: FinetuneConfig) -> None:
    """Print what SORSA adapted as one line (main process), and with ``--verbose`` every layer left alone."""
    from ...adapters.summary import adaptation_summary

    if not is_main_process():
        return
    summary = adaptation_summary(model)
    print(summary.line(), flush=True)
    if cfg.verbose:
        for line in summary.details():
            print(f"  {line}", flush=True)


def _evaluation_phase(when: str, eval_ds, em_rows) -> str:
    exact = f", exact match on {len(em_rows)}" if em_rows else ""
    return f"evaluation {when}: held-out loss on {len(eval_ds)} examples{exact}"


def _check_finite(model, losses, step: int) -> None:
    """Refuse to publish a diverged adapter (NaN/Inf factors or loss)."""
    from ...adapters.surgery import sorsa_layers

    for name, layer in sorsa_layers(model).items():
        for label, p in zip("USV", layer.adapter_parameters()):
            if not bool(torch.isfinite(p).all()):
                raise ValueError(
                    f"training diverged: {name}.{label} holds NaN/Inf after step {step}; nothing was saved "
                    "(lower --lr, raise --warmup-ratio, or check --alpha/--gamma)"
                )
    bad = [(s, v) for s, v in losses if not math.isfinite(v)]
    if bad:
        raise ValueError(f"training diverged: the loss is {bad[0][1]} at step {bad[0][0]}; nothing was saved "
                         "(lower --lr, raise --warmup-ratio, or check --alpha/--gamma)")


def _train_and_save(cfg, out, ckpt, model, tokenizer, base_copy, train_ex, eval_ex, em_rows, use_chat,
                    fingerprint, t_start, data_counts, max_new: int) -> FinetuneResult:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ...training.callbacks import SORSACallback

    trainer_dir = out / CHECKPOINTS
    args = training_arguments(cfg, trainer_dir, eval_ex is not None)
    train_ds = ListDataset(train_ex)
    eval_ds = ListDataset(eval_ex) if eval_ex is not None else None
    trainer = make_trainer(cfg, model, args, train_dataset=train_ds, eval_dataset=eval_ds,
                           data_collator=ResponseOnlyCollator(tokenizer.pad_token_id))
    if cfg.fsdp and not getattr(trainer, "is_fsdp_enabled", False):
        # accelerate (1.15) enables its FSDP plugin only for GPU-like devices; on CPU (gloo) it
        # drops it silently and would run plain DDP.  Say so instead of pretending.
        raise ConfigError(FSDP_CPU_MESSAGE, cfg)
    SORSACallback(gamma=cfg.gamma, lr_max=cfg.learning_rate).install(trainer)
    if cfg.gradient_release and is_main_process():
        from ...training.gradient_release import GRADIENT_RELEASE_NOTE

        print(GRADIENT_RELEASE_NOTE, flush=True)
    trainer.add_callback(run_recorder(cfg, fingerprint))
    for printer in (PrinterCallback, ProgressCallback):  # dicts of strings → one compact line per log
        trainer.remove_callback(printer)
    trainer.add_callback(LogLines(bars=cfg.progress))

    fsdp_pre_eval = cfg.fsdp and distributed()
    bars = cfg.progress or not trainer.is_world_process_zero()  # phase lines: the main process, without bars
    if eval_ds is not None and cfg.evaluate and not fsdp_pre_eval:
        phase_line(_evaluation_phase("before fine-tuning", eval_ds, em_rows), bars)
    before = {} if fsdp_pre_eval else evaluate(trainer, model, tokenizer, eval_ds, em_rows, cfg, use_chat, max_new)
    if before and trainer.is_world_process_zero():
        print(metrics_line("before fine-tuning", before), flush=True)

    t_train = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    train_runtime = time.perf_counter() - t_train
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    _check_finite(trainer.model, losses, trainer.state.global_step)
    if eval_ds is not None and cfg.evaluate:
        phase_line(_evaluation_phase("after fine-tuning", eval_ds, em_rows), bars)
    after = evaluate(trainer, trainer.model, tokenizer, eval_ds, em_rows, cfg, use_chat, max_new)
    if after and trainer.is_world_process_zero():
        print(metrics_line("after fine-tuning", after), flush=True)

    result = FinetuneResult(
        output_dir=out, adapter_dir=out / "adapter", merged_dir=out / "merged",
        base_dir=(out / "base") if cfg.embedded else None, before=before, after=after,
        train_losses=losses, train_runtime_s=train_runtime, total_runtime_s=0.0,
        settings={**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra_training_args"},
                  # the template actually used: the tokenizer's chat template replaces prompt_template
                  "chat_template": use_chat, "prompt_template": None if use_chat else cfg.prompt_template},
        data={k: v for k, v in data_counts.items() if v},
    )
    if trainer.is_world_process_zero():
        # Resuming a finished run replaces its results: drop the finished mark first, so a
        # failure part-way leaves a resumable run, never old metrics beside new artifacts.
        (out / METRICS_FILE).unlink(missing_ok=True)
    # one line, bars or not, instead of a "Writing model shards" bar per saved model (merged/, base/)
    phase_line(f"saving the adapter and the merged model to {out}", not trainer.is_world_process_zero())
    with library_bars(False):
        save_outputs(trainer, tokenizer, cfg, result, base_copy, train_out)
    result.total_runtime_s = time.perf_counter() - t_start
    if trainer.is_world_process_zero():
        write_metrics(result)
    return result
