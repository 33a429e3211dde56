"""The finetune job's configuration and its validation.

:class:`FinetuneConfig` is everything ``sorsa-kernels finetune`` accepts, with ``None``
meaning "the default for this model" (:data:`PAPER_DEFAULTS` for a real model,
:data:`EMBEDDED_DEFAULTS` for the embedded one).  :func:`check_config` (every numeric
knob against the rule table of :mod:`sorsa_kernels.nn.knobs`, names, dtypes, the prompt
template, the target regex, the model folder) and :func:`check_output_dir` reject bad
input with one-line ValueErrors before anything is loaded or written; :func:`distributed` and :func:`is_main_process` read the torchrun
environment.  A new knob starts here (field, default, check) and in the CLI's parser.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ....nn.knobs import check_knob
from ..embedded import EMBEDDED_NAME, EMBEDDED_PROMPT_TEMPLATE, PRETRAIN_STEPS

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

#: The dtype names ``--residual-dtype`` / ``--adapter-dtype`` accept.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
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
    answer_pattern: Optional[str] = None
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


#: How the checks name each numeric knob: its command-line option (without the dashes).
KNOB_LABELS = {
    "rank": "rank", "alpha": "alpha", "gamma": "gamma", "learning_rate": "learning-rate",
    "num_train_epochs": "epochs", "max_steps": "max-steps", "per_device_train_batch_size": "batch-size",
    "gradient_accumulation_steps": "grad-accum", "max_length": "max-length", "warmup_ratio": "warmup-ratio",
    "weight_decay": "weight-decay", "max_grad_norm": "max-grad-norm", "seed": "seed",
    "logging_steps": "logging-steps", "eval_steps": "eval-steps", "save_steps": "save-steps",
    "save_total_limit": "save-total-limit", "eval_fraction": "eval-fraction", "eval_samples": "eval-samples",
    "eval_batch_size": "eval-batch-size", "max_new_tokens": "max-new-tokens", "pretrain_steps": "pretrain-steps",
}
#: Characters that make a single ``--target-modules`` argument a regular expression.
REGEX_CHARS = "*()[]|\\^$+?{}"


def check_knobs(cfg: FinetuneConfig) -> None:
    """Every numeric setting against the one rule table (:mod:`sorsa_kernels.nn.knobs`): finite, in range."""
    for name, label in KNOB_LABELS.items():
        check_knob(name, getattr(cfg, name), label)


def target_spec(cfg: FinetuneConfig):
    """``--target-modules`` as :func:`sorsa_kernels.apply_sorsa` takes it: None, a list of names,
    or (one argument holding regex characters) a regular expression, checked to compile."""
    targets = list(cfg.target_modules) if cfg.target_modules else None
    if targets is not None and len(targets) == 1 and any(c in targets[0] for c in REGEX_CHARS):
        from ...adapters.surgery import compile_target_regex

        try:
            compile_target_regex(targets[0])
        except ValueError as e:
            raise ValueError("--target-modules" + str(e)[len("target_modules"):]) from None
        return targets[0]
    return targets


#: ``--answer-pattern`` value that compares the last number of each text.
LAST_NUMBER = "last-number"


def check_answer_pattern(pattern: Optional[str]) -> None:
    """Raise a one-line ValueError unless ``pattern`` is None, ``last-number`` or a regex with at most one group."""
    if pattern is None or pattern == LAST_NUMBER:
        return
    try:
        groups = re.compile(pattern).groups
    except re.error as e:
        raise ValueError(f"answer-pattern {pattern!r} is not a valid regular expression ({e}); pass one such "
                         f"as '#### (\\S+)' or {LAST_NUMBER}") from None
    if groups > 1:
        raise ValueError(f"answer-pattern {pattern!r} has {groups} groups; it may have at most one (the answer), "
                         "e.g. '#### (\\S+)'")


def check_prompt_template(template: str) -> None:
    """Raise a one-line ValueError unless ``template`` formats with ``prompt`` alone."""
    if "{prompt}" not in template:
        raise ValueError(f"prompt template must contain {{prompt}}, got {template!r}")
    try:
        template.format(prompt="")
    except KeyError as e:
        raise ValueError(
            f"prompt template {template!r} has the unknown placeholder {{{e.args[0]}}}; only {{prompt}} is "
            "filled in (write {{ and }} for literal braces)"
        ) from None
    except (IndexError, ValueError) as e:
        raise ValueError(
            f"prompt template {template!r} is not a valid format string ({e}); write {{{{ and }}}} for literal braces"
        ) from None


def looks_like_path(name: str) -> bool:
    """Whether a ``--model`` value is meant as a local folder rather than a Hub id ("org/name")."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or Path(name).exists())


def check_model_path(name: str) -> None:
    """Raise ``cannot load model: no such model folder: PATH`` for a local path that does not exist
    (``no such GGUF file`` for a missing ``.gguf`` file; a ``.gguf`` file is the one file accepted)."""
    if name != EMBEDDED_NAME and looks_like_path(name):
        path = Path(name).expanduser()
        gguf = str(name).lower().endswith(".gguf")
        if not path.exists():
            raise ValueError(f"cannot load model: no such {'GGUF file' if gguf else 'model folder'}: {name}")
        if not path.is_dir() and not (gguf and path.is_file()):
            raise ValueError(f"cannot load model: {name} is a file, not a model folder or a .gguf file")


def check_config(cfg: FinetuneConfig) -> None:
    """Raise a one-line ValueError for the first bad setting of a resolved config.

    Runs before any data or model is loaded: numbers (finite, in range), names, dtypes,
    the prompt template, the target-module regex, the model folder and the checkpoint.
    """
    from transformers import SchedulerType

    check_knobs(cfg)
    schedulers = [s.value for s in SchedulerType]
    if cfg.lr_scheduler_type not in schedulers:
        raise ValueError(f"unknown scheduler {cfg.lr_scheduler_type!r}; allowed: {', '.join(schedulers)}")
    if cfg.svd not in ("full", "randomized"):
        raise ValueError(f"svd must be 'full' or 'randomized', got {cfg.svd!r}")
    for name in ("residual_dtype", "adapter_dtype"):
        value = getattr(cfg, name)
        if value is not None and value not in DTYPES:
            raise ValueError(f"{name.replace('_', '-')} {value!r} is not one of {', '.join(DTYPES)}")
    if cfg.quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be 'nf4', got {cfg.quantize!r}")
    if cfg.fsdp and cfg.quantize and not cfg.embedded and not Path(cfg.model).is_dir():
        raise ValueError(
            f"--fsdp --quantize {cfg.quantize} streams the checkpoint from a local folder; download "
            f"{cfg.model} first (huggingface-cli download {cfg.model} --local-dir DIR) and pass --model DIR"
        )
    if cfg.embedded and cfg.data is None and cfg.eval_data is not None:
        raise ValueError("--eval-data needs --data (the embedded data set brings its own held-out split)")
    if not cfg.embedded and cfg.data is None:
        raise ValueError(f"--model {cfg.model} needs --data FILE (.jsonl, .json or .parquet)")
    check_prompt_template(cfg.prompt_template)
    check_answer_pattern(cfg.answer_pattern)
    target_spec(cfg)
    if cfg.fsdp and not distributed():
        raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node N -m sorsa_kernels.cli")
    if cfg.fsdp and not torch.cuda.is_available():
        raise ValueError(FSDP_CPU_MESSAGE)
    if cfg.resume_from_checkpoint not in (None, "last") and not Path(cfg.resume_from_checkpoint).is_dir():
        raise ValueError(f"checkpoint folder {cfg.resume_from_checkpoint} does not exist")
    check_model_path(cfg.model)


# accelerate (1.15) builds its FSDP plugin only for GPU-like devices; for a CPU (gloo) launch it
# drops the plugin silently, and it refuses to wrap an already-sharded (DTensor) model in DDP.
FSDP_CPU_MESSAGE = ("--fsdp needs GPUs: accelerate does not enable FSDP for CPU (gloo) processes; "
             "drop --fsdp to train with DDP")


def check_output_dir(path: Path, allow_existing: bool = False, hint: str = "") -> None:
    """Raise a ValueError unless ``path`` can be created (or is an empty, writable folder).

    Nothing is created here: the job only makes the folder once every input has been checked.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"output folder {path} exists and is not a folder")
        if any(path.iterdir()) and not allow_existing:
            raise ValueError(
                f"output folder {path} already exists and is not empty; choose another{hint}"
            )
    check_writable(path)


def check_writable(path: Path) -> None:
    """Raise a ValueError unless the folder ``path`` is writable, or could be created if absent."""
    if path.exists():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"output folder {path} is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"output folder {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {path} cannot be created: {parent} is not writable")


def distributed() -> bool:
    """Whether this process is one of several (torchrun sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Whether this is rank 0 (or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0
