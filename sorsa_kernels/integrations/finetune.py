"""The fine-tuning job behind ``sorsa-kernels finetune``: SORSA on a causal LM with transformers' Trainer.

The recipe is the paper's (Appendix A.2): loss on the response tokens only, AdamW,
cosine schedule with 3 % warm-up, no weight decay, ``γ = 4e-4``, ``lr = 3e-5``, rank 128,
one epoch, global batch 128, max length 512.  Those are the defaults whenever
``--model`` names a real model.  The embedded default (no ``--model``) is a tiny
character-level Llama whose whole run must fit in two minutes on a CPU, so it uses its
own settings — see :data:`EMBEDDED_DEFAULTS`.

Because the job is an ordinary ``transformers.Trainer`` run, it works unchanged under
``torchrun`` (DDP) and with FSDP2 (``fsdp=True``).

Example::

    >>> from sorsa_kernels.integrations.finetune import FinetuneConfig, run_finetune
    >>> result = run_finetune(FinetuneConfig(output_dir="out"))      # the embedded default
    >>> result.after["exact_match"] > result.before["exact_match"]
    True
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .data import DataError, arithmetic_problems, load_records, split_records
from .embedded import EMBEDDED_NAME, EMBEDDED_PROMPT_TEMPLATE, PRETRAIN_STEPS, build_embedded

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "PAPER_DEFAULTS",
    "EMBEDDED_DEFAULTS",
    "DEFAULT_PROMPT_TEMPLATE",
    "run_finetune",
    "encode_example",
    "ResponseOnlyCollator",
    "exact_match",
    "check_output_dir",
    "load_base",
    "merge_job",
    "export_lora_job",
    "analyze_job",
    "plot_drift",
]

#: Prompt layout for models without a chat template (Alpaca-style).
DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"

#: The paper's settings (Table 3), used for real models.
PAPER_DEFAULTS: dict[str, Any] = dict(
    rank=128, learning_rate=3e-5, num_train_epochs=1.0, max_steps=-1,
    per_device_train_batch_size=8, gradient_accumulation_steps=16,  # global batch 128 on one device
    logging_steps=10, pretrain_steps=0,
)
#: The embedded default's settings and why they differ from the paper's: the model is
#: tiny (0.6 M parameters, hidden size 128) and the run must end in well under two
#: minutes on a CPU, so it takes a larger rank fraction (16 of 128), a 100× larger
#: learning rate (3e-3; at 3e-5 nothing visible happens in a few hundred steps),
#: small batches and a fixed number of steps.  γ, warm-up, schedule and weight decay
#: are the paper's.
EMBEDDED_DEFAULTS: dict[str, Any] = dict(
    rank=16, learning_rate=3e-3, num_train_epochs=1.0, max_steps=250,
    per_device_train_batch_size=16, gradient_accumulation_steps=1,
    logging_steps=25, pretrain_steps=PRETRAIN_STEPS,
)
EMBEDDED_EXAMPLES = 700
EMBEDDED_HELD_OUT = 100

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class FinetuneConfig:
    """Everything ``sorsa-kernels finetune`` accepts.  ``None`` means "the default for this
    model": :data:`PAPER_DEFAULTS` for a real model, :data:`EMBEDDED_DEFAULTS` for the embedded one."""

    model: str = EMBEDDED_NAME
    data: Optional[str] = None
    eval_data: Optional[str] = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    prompt_template: Optional[str] = None
    output_dir: Optional[str] = None
    rank: Optional[int] = None
    target_modules: Optional[Sequence[str]] = None
    alpha: Optional[float] = None
    gamma: float = 4e-4
    learning_rate: Optional[float] = None
    num_train_epochs: Optional[float] = None
    max_steps: Optional[int] = None
    per_device_train_batch_size: Optional[int] = None
    gradient_accumulation_steps: Optional[int] = None
    max_length: int = 512
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    svd: str = "full"
    residual_dtype: Optional[str] = None
    adapter_dtype: Optional[str] = None
    quantize: Optional[str] = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: Optional[int] = None
    eval_steps: Optional[int] = None
    save_steps: Optional[int] = None
    save_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    eval_fraction: float = 0.05
    eval_samples: int = 200
    eval_batch_size: int = 32
    max_new_tokens: Optional[int] = None
    evaluate: bool = True
    fsdp: bool = False
    pretrain_steps: Optional[int] = None
    progress: bool = True
    report_to: str = "none"
    extra_training_args: dict = field(default_factory=dict)

    @property
    def embedded(self) -> bool:
        return self.model == EMBEDDED_NAME

    def resolved(self) -> "FinetuneConfig":
        """A copy with every ``None`` default filled in for this model."""
        defaults = EMBEDDED_DEFAULTS if self.embedded else PAPER_DEFAULTS
        changes = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.num_train_epochs is not None and self.max_steps is None:
            changes["max_steps"] = -1  # epochs given explicitly: they decide the length
        if self.prompt_template is None:
            changes["prompt_template"] = EMBEDDED_PROMPT_TEMPLATE if self.embedded else DEFAULT_PROMPT_TEMPLATE
        return dataclasses.replace(self, **changes)


@dataclass
class FinetuneResult:
    """What a run produced: folders, metrics before/after, logged training losses."""

    output_dir: Path
    adapter_dir: Optional[Path]
    merged_dir: Optional[Path]
    base_dir: Optional[Path]
    before: dict[str, float]
    after: dict[str, float]
    train_losses: list[tuple[int, float]]
    train_runtime_s: float
    total_runtime_s: float
    settings: dict[str, Any]


# ---------------------------------------------------------------------- validation
def _check_config(cfg: FinetuneConfig) -> None:
    from transformers import SchedulerType

    def positive(name, value, kind=int):
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{name} must be a positive {kind.__name__}, got {value}")

    for name in ("rank", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                 "logging_steps", "eval_steps", "save_steps", "eval_batch_size", "max_new_tokens"):
        positive(name.replace("_", "-"), getattr(cfg, name))
    positive("learning-rate", cfg.learning_rate, float)
    if cfg.max_steps is not None and (cfg.max_steps == 0 or cfg.max_steps < -1):
        raise ValueError(f"max-steps must be positive (or -1 for epochs), got {cfg.max_steps}")
    if cfg.pretrain_steps is not None and cfg.pretrain_steps < 0:
        raise ValueError(f"pretrain-steps must be non-negative, got {cfg.pretrain_steps}")
    positive("epochs", cfg.num_train_epochs, float)
    if cfg.gamma < 0:
        raise ValueError(f"gamma must be non-negative, got {cfg.gamma}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.eval_samples < 0:
        raise ValueError(f"eval-samples must be non-negative, got {cfg.eval_samples}")
    schedulers = [s.value for s in SchedulerType]
    if cfg.lr_scheduler_type not in schedulers:
        raise ValueError(f"unknown scheduler {cfg.lr_scheduler_type!r}; allowed: {', '.join(schedulers)}")
    if cfg.svd not in ("full", "randomized"):
        raise ValueError(f"svd must be 'full' or 'randomized', got {cfg.svd!r}")
    for name in ("residual_dtype", "adapter_dtype"):
        value = getattr(cfg, name)
        if value is not None and value not in _DTYPES:
            raise ValueError(f"{name.replace('_', '-')} {value!r} is not one of {', '.join(_DTYPES)}")
    if cfg.quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be 'nf4', got {cfg.quantize!r}")
    if cfg.embedded and cfg.data is None and cfg.eval_data is not None:
        raise ValueError("--eval-data needs --data (the embedded data set brings its own held-out split)")
    if not cfg.embedded and cfg.data is None:
        raise ValueError(f"--model {cfg.model} needs --data FILE (.jsonl, .json or .parquet)")
    if "{prompt}" not in cfg.prompt_template:
        raise ValueError(f"prompt template must contain {{prompt}}, got {cfg.prompt_template!r}")
    if cfg.fsdp and not _distributed():
        raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node N -m sorsa_kernels.cli")
    if cfg.fsdp and not torch.cuda.is_available():
        raise ValueError(_FSDP_CPU)
    if cfg.resume_from_checkpoint not in (None, "last") and not Path(cfg.resume_from_checkpoint).is_dir():
        raise ValueError(f"checkpoint folder {cfg.resume_from_checkpoint} does not exist")


# accelerate (1.15) builds its FSDP plugin only for GPU-like devices; for a CPU (gloo) launch it
# drops the plugin silently, and it refuses to wrap an already-sharded (DTensor) model in DDP.
_FSDP_CPU = ("--fsdp needs GPUs: accelerate does not enable FSDP for CPU (gloo) processes; "
             "drop --fsdp to train with DDP")


def check_output_dir(path: Path, allow_existing: bool = False, hint: str = "") -> None:
    """Raise a ValueError unless ``path`` can be created (or is an empty, writable folder).

    Nothing is created here: the job only makes the folder once every input has been checked.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"output folder {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"output folder {path} is not writable")
        if any(path.iterdir()) and not allow_existing:
            raise ValueError(
                f"output folder {path} already exists and is not empty; choose another{hint}"
            )
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"output folder {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {path} cannot be created: {parent} is not writable")


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------- data
def encode_example(
    tokenizer, prompt: str, response: str, template: str, max_length: int, use_chat_template: bool
) -> Optional[dict[str, list[int]]]:
    """Token ids and labels for one pair; prompt tokens get label -100 (loss on the response only).

    With ``use_chat_template`` the prompt is the tokenizer's chat template applied to one
    user turn (with the generation prompt); otherwise ``template.format(prompt=prompt)``
    tokenized with the tokenizer's special tokens (e.g. BOS).  The response is followed by
    EOS.  Sequences are cut to ``max_length``; returns None when no response token is left.

    Example::

        >>> ex = encode_example(tok, "2+2?", "4", "Q: {prompt}\\nA: ", 64, False)
        >>> ex["labels"][-2:] == ex["input_ids"][-2:]      # "4", EOS
        True
    """
    prompt_ids = _prompt_ids(tokenizer, prompt, template, use_chat_template)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def _prompt_ids(tokenizer, prompt: str, template: str, use_chat_template: bool) -> list[int]:
    if use_chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(template.format(prompt=prompt))["input_ids"]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class ResponseOnlyCollator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100) to the longest sequence of a batch.

    Example::

        >>> batch = ResponseOnlyCollator(pad_token_id=0)([{"input_ids": [5, 6], "labels": [-100, 6]}])
        >>> sorted(batch)
        ['attention_mask', 'input_ids', 'labels']
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _encode_all(tokenizer, rows, cfg: FinetuneConfig, use_chat: bool, what: str) -> list[dict]:
    out = [encode_example(tokenizer, r["prompt"], r["response"], cfg.prompt_template, cfg.max_length, use_chat)
           for r in rows]
    kept = [e for e in out if e is not None]
    if not kept:
        raise ValueError(
            f"every {what} example's prompt fills the max length {cfg.max_length}; raise --max-length"
        )
    return kept


# ---------------------------------------------------------------------- model
def load_base(name: str, *, pretrain_steps: Optional[int] = None, seed: int = 0, progress: bool = True,
              dtype: Optional[torch.dtype] = None):
    """``(model, tokenizer)`` for ``"embedded"`` or a local path / Hub id of a causal LM.

    Errors (no such model, not a causal LM) are raised as one-line ValueErrors.
    """
    if name == EMBEDDED_NAME:
        steps = PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
        return build_embedded(pretrain_steps=steps, seed=0, progress=progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto")
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load model {name!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _apply(model, cfg: FinetuneConfig):
    from .surgery import apply_sorsa

    kwargs = dict(
        svd=cfg.svd, alpha=cfg.alpha, progress=cfg.progress and _is_main(),
        residual_dtype=_DTYPES[cfg.residual_dtype] if cfg.residual_dtype else None,
        adapter_dtype=_DTYPES[cfg.adapter_dtype] if cfg.adapter_dtype else None,
    )
    if cfg.quantize:
        try:
            from ..nn import qlinear  # noqa: F401  (QSORSA)
        except ImportError:
            raise ValueError(
                f"--quantize {cfg.quantize} needs QSORSA (sorsa_kernels.nn.qlinear), which this installation lacks"
            ) from None
        kwargs["quantize"] = cfg.quantize
    targets = list(cfg.target_modules) if cfg.target_modules else None
    if targets is not None and len(targets) == 1 and any(c in targets[0] for c in "*()[]|\\^$"):
        targets = targets[0]  # one argument with regex characters: a regular expression
    return apply_sorsa(model, cfg.rank, targets, **kwargs)


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], template: str, use_chat_template: bool,
                max_new_tokens: int, batch_size: int = 32, synced: bool = False) -> float:
    """Fraction of ``rows`` whose greedy completion, stripped, equals the response, stripped.

    Example::

        >>> exact_match(model, tok, [{"prompt": "3+4?", "response": "7"}], "Q: {prompt}\\nA: ", False, 4)
        1.0
    """
    if not rows:
        return float("nan")
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(p for p in model.parameters()).device
    correct = 0
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [_prompt_ids(tokenizer, r["prompt"], template, use_chat_template) for r in chunk]
            n = max(map(len, prompts))
            ids = torch.full((len(chunk), n), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, n - len(p):] = torch.tensor(p)
                mask[i, n - len(p):] = 1
            gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            if synced:
                gen_kwargs["synced_gpus"] = True
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
            texts = tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)
            correct += sum(t.strip() == r["response"].strip() for t, r in zip(texts, chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / len(rows)


def _evaluate(trainer, model, tokenizer, eval_ds, em_rows, cfg, use_chat, max_new) -> dict[str, float]:
    out: dict[str, float] = {}
    if eval_ds is None or not cfg.evaluate:
        return out
    out["loss"] = float(trainer.evaluate(eval_ds, metric_key_prefix="heldout")["heldout_loss"])
    if em_rows:
        out["exact_match"] = exact_match(
            trainer.model, tokenizer, em_rows, cfg.prompt_template, use_chat, max_new,
            cfg.eval_batch_size, synced=cfg.fsdp and _distributed(),
        )
    return out


# ---------------------------------------------------------------------- FSDP2 helpers
def _fsdp_modules(model):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


# ---------------------------------------------------------------------- the job
def _training_arguments(cfg: FinetuneConfig, trainer_dir: Path, has_eval: bool):
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
        max_grad_norm=cfg.max_grad_norm,
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
        use_cpu=_distributed() and not torch.cuda.is_available(),
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


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Run the whole job: load, SORSA surgery, train, evaluate before/after, save.

    Writes under ``output_dir``: ``adapter/`` (:func:`sorsa_kernels.save_adapter`),
    ``merged/`` (the merged model and tokenizer, loadable with ``AutoModelForCausalLM``
    and ``AutoTokenizer``), ``base/`` (embedded default only: the pretrained base, so
    ``merge``/``analyze`` can use it), ``checkpoints/`` (when ``save_steps`` is set) and
    ``metrics.json``.  Every input is checked before anything is written.

    Example::

        >>> run_finetune(FinetuneConfig(model="meta-llama/Llama-2-7b-hf", data="train.jsonl",
        ...                             output_dir="out", bf16=True))
    """
    cfg = config.resolved()
    _check_config(cfg)
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
    if cfg.output_dir is None:
        if _distributed():
            raise ValueError("pass --output-dir when running under torchrun (every process must agree on it)")
        cfg.output_dir = time.strftime("sorsa-output-%Y%m%d-%H%M%S")
    out = Path(cfg.output_dir)
    check_output_dir(out, allow_existing=cfg.resume_from_checkpoint is not None or _distributed(),
                     hint=" --output-dir (or pass --resume-from-checkpoint to continue the run there)")

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
    model, tokenizer = load_base(cfg.model, pretrain_steps=cfg.pretrain_steps, progress=cfg.progress and _is_main())
    base_copy = None
    if cfg.embedded:
        import copy

        base_copy = copy.deepcopy(model)
    use_chat = (not cfg.embedded) and getattr(tokenizer, "chat_template", None) is not None
    train_ex = _encode_all(tokenizer, train_rows, cfg, use_chat, "training")
    eval_ex = _encode_all(tokenizer, held_rows, cfg, use_chat, "held-out") if held_rows else None
    _apply(model, cfg)
    if cfg.gradient_checkpointing:
        model.config.use_cache = False

    from transformers import Trainer

    from .trainer import SORSACallback

    trainer_dir = out / "checkpoints"
    args = _training_arguments(cfg, trainer_dir, eval_ex is not None)
    train_ds = _ListDataset(train_ex)
    eval_ds = _ListDataset(eval_ex) if eval_ex is not None else None
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=ResponseOnlyCollator(tokenizer.pad_token_id),
    )
    if cfg.fsdp and not getattr(trainer, "is_fsdp_enabled", False):
        # accelerate (1.15) enables its FSDP plugin only for GPU-like devices; on CPU (gloo) it
        # drops it silently and would run plain DDP.  Say so instead of pretending.
        raise ValueError(_FSDP_CPU)
    SORSACallback(gamma=cfg.gamma, lr_max=cfg.learning_rate).install(trainer)

    em_rows = held_rows[: cfg.eval_samples] if held_rows else []
    max_new = cfg.max_new_tokens or _max_new_tokens(tokenizer, em_rows)
    fsdp_pre_eval = cfg.fsdp and _distributed()
    before = {} if fsdp_pre_eval else _evaluate(trainer, model, tokenizer, eval_ds, em_rows, cfg, use_chat, max_new)
    if before and trainer.is_world_process_zero():
        print(_metrics_line("before fine-tuning", before), flush=True)

    t_train = time.perf_counter()
    resume = cfg.resume_from_checkpoint
    if resume == "last":
        resume = True
    train_out = trainer.train(resume_from_checkpoint=resume)
    train_runtime = time.perf_counter() - t_train
    after = _evaluate(trainer, trainer.model, tokenizer, eval_ds, em_rows, cfg, use_chat, max_new)
    if after and trainer.is_world_process_zero():
        print(_metrics_line("after fine-tuning", after), flush=True)

    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    result = FinetuneResult(
        output_dir=out, adapter_dir=out / "adapter", merged_dir=out / "merged",
        base_dir=(out / "base") if cfg.embedded else None, before=before, after=after,
        train_losses=losses, train_runtime_s=train_runtime, total_runtime_s=0.0,
        settings={k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra_training_args"},
    )
    _save(trainer, tokenizer, cfg, result, base_copy, train_out)
    result.total_runtime_s = time.perf_counter() - t_start
    if trainer.is_world_process_zero():
        _write_metrics(result)
    return result


def _max_new_tokens(tokenizer, rows: list[dict]) -> int:
    if not rows:
        return 1
    longest = max(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows)
    return min(512, longest + 4)


def _metrics_line(label: str, metrics: dict[str, float]) -> str:
    parts = [f"held-out loss {metrics['loss']:.4f}"] if "loss" in metrics else []
    if "exact_match" in metrics:
        parts.append(f"exact match {100 * metrics['exact_match']:.1f}%")
    return f"{label}: " + ", ".join(parts)


def _save(trainer, tokenizer, cfg: FinetuneConfig, result: FinetuneResult, base_copy, train_out) -> None:
    from .adapter_io import save_adapter

    model = trainer.model
    fsdp = _fsdp_modules(model)
    for m in fsdp:  # all ranks gather the full parameters; they stay plain tensors until reshard
        m.unshard()
    try:
        if trainer.is_world_process_zero():
            base_name = None if cfg.embedded else cfg.model
            save_adapter(model, result.adapter_dir, base_model_name_or_path=base_name)
            if base_copy is not None:
                base_copy.save_pretrained(result.base_dir)
                tokenizer.save_pretrained(result.base_dir)
    finally:
        for m in fsdp:
            m.reshard()
    if trainer.is_world_process_zero():
        _save_merged(trainer, tokenizer, result, fsdp)
    if _distributed() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    ckpt = result.output_dir / "checkpoints"
    if trainer.is_world_process_zero() and ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()  # the Trainer makes it even when nothing is saved


def _save_merged(trainer, tokenizer, result: FinetuneResult, fsdp) -> None:
    from .surgery import merge_sorsa

    if fsdp:  # the trained model is sharded: rebuild it unsharded from the saved adapter
        model = _reload_for_merge(trainer, result)
    else:
        model = trainer.model
    merge_sorsa(model)
    model.save_pretrained(result.merged_dir)
    tokenizer.save_pretrained(result.merged_dir)


def _reload_for_merge(trainer, result: FinetuneResult):
    from .adapter_io import load_adapter

    if result.base_dir is not None:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(result.base_dir)
    else:
        base, _ = load_base(result.settings["model"], progress=False)
    return load_adapter(base, result.adapter_dir)


def _write_metrics(result: FinetuneResult) -> None:
    data = {
        "before": result.before,
        "after": result.after,
        "train_losses": result.train_losses,
        "train_runtime_s": result.train_runtime_s,
        "total_runtime_s": result.total_runtime_s,
        "settings": result.settings,
    }
    result.output_dir.mkdir(parents=True, exist_ok=True)
    (result.output_dir / "metrics.json").write_text(json.dumps(data, indent=2, default=str))


# ---------------------------------------------------------------------- the other commands' jobs
def _load_with_adapter(base: str, adapter: str, progress: bool = False):
    from .adapter_io import load_adapter, read_adapter

    read_adapter(adapter)  # fail on a bad adapter before loading a (possibly large) base model
    model, tokenizer = load_base(base, progress=progress)
    return load_adapter(model, adapter), tokenizer


def merge_job(base: str, adapter: str, output: str, progress: bool = False) -> Path:
    """Load ``base`` + ``adapter``, merge, and ``save_pretrained`` model and tokenizer to ``output``.

    Example::

        >>> merge_job("out/base", "out/adapter", "merged")
    """
    from .surgery import merge_sorsa

    out = Path(output)
    check_output_dir(out)
    model, tokenizer = _load_with_adapter(base, adapter, progress)
    merge_sorsa(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_lora_job(base: str, adapter: str, output: str, progress: bool = False) -> Path:
    """Write ``adapter`` as a standard PEFT LoRA adapter for the original ``base`` to ``output``.

    Example::

        >>> export_lora_job("meta-llama/Llama-2-7b-hf", "out/adapter", "lora")
    """
    from .peft_export import export_peft_lora

    out = Path(output)
    check_output_dir(out)
    model, _ = _load_with_adapter(base, adapter, progress)
    export_peft_lora(model, out)
    return out


def analyze_job(base: str, adapters: Sequence[str], progress: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """ΔΣ and ΔD (the paper's Eq. 1–4) of every adapted layer, for each adapter in order.

    Returns ``[(adapter, {layer name: SingularDrift}), …]`` in the order given.

    Example::

        >>> drift = analyze_job("out/base", ["out/adapter"])
    """
    from ..analysis import model_singular_drift

    result = []
    for adapter in adapters:
        model, _ = _load_with_adapter(base, adapter, progress)
        result.append((str(adapter), model_singular_drift(model)))
        del model
    return result


def _layer_number(name: str) -> Optional[int]:
    import re

    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def plot_drift(drift: Sequence[tuple[str, dict[str, Any]]], path: str) -> Path:
    """A PNG in the style of the paper's Figure 2: ΔD (x) against ΔΣ (y), one point per layer
    labelled with its layer number and coloured by projection; with several adapters (e.g.
    saved at successive steps) each layer's points are joined in order and a black dot
    marks each adapter's mean."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the plot needs matplotlib (pip install matplotlib)") from None
    out = Path(path)
    if out.parent and not out.parent.exists():
        raise ValueError(f"cannot write {out}: folder {out.parent} does not exist")
    steps = [layers for _, layers in drift]
    names = list(steps[0])
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for name in names:
        kind = name.rsplit(".", 1)[-1]
        xs = [d[name].delta_d for d in steps if name in d]
        ys = [d[name].delta_sigma for d in steps if name in d]
        ax.plot(xs, ys, "-" if len(xs) > 1 else "", marker="o", ms=3, lw=0.8, color=colors[kind], alpha=0.8)
        number = _layer_number(name)
        if number is not None:
            ax.annotate(str(number), (xs[-1], ys[-1]), fontsize=7, color=colors[kind],
                        xytext=(2, 2), textcoords="offset points")
    means_x = [sum(v.delta_d for v in d.values()) / len(d) for d in steps]
    means_y = [sum(v.delta_sigma for v in d.values()) / len(d) for d in steps]
    ax.plot(means_x, means_y, "-" if len(steps) > 1 else "", color="k", marker="o", ms=6, label="mean")
    for k in kinds:
        ax.plot([], [], marker="o", ls="", color=colors[k], label=k)
    ax.set_xlabel("ΔD (singular vectors)")
    ax.set_ylabel("ΔΣ (singular values)")
    ax.set_title("SORSA: drift from the pretrained weights")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def shutdown_distributed() -> None:
    """Destroy the process group a distributed run created, so gloo workers exit cleanly.

    Without it a worker can abort at interpreter exit ("terminate called without an
    active exception") after its work is done.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
