"""The finetune job's configuration: every option declared once, checked on construction.

:class:`FinetuneConfig` is everything ``sorsa-kernels finetune`` accepts.  Each field is
the option (:func:`~sorsa_kernels.jobs.options.option`): its default,
help text, flags, ``--help`` section, allowed values and, where ``None`` means "the
default for this model", the paper's and the embedded model's values
(:data:`PAPER_DEFAULTS` and :data:`EMBEDDED_DEFAULTS` are read off the fields).  The
command line generates its flags, help and the defaults it shows from the fields, and
translates field names in messages into its flags, in one place (``jobs.flags.cli_name``).

**Adding an option is one change, here**: add the field, e.g.
``verbose: bool = option(False, "print every log line", group=_LOGGING)``.  A number gets
its rule by ``rule=`` (``POSITIVE``, ``COUNT``, … from :mod:`sorsa_kernels.nn.knobs`; the adapter's
own knobs by their name in :data:`~sorsa_kernels.nn.knobs.KNOBS`), a closed set of values by
``choices=``, a check across fields by a line in :meth:`FinetuneConfig.__post_init__` (a
:class:`~sorsa_kernels.jobs.options.ConfigError` naming fields as
``{field}``).  The flag (``--verbose``), its help and its default then exist on ``finetune``
and ``compare``; ``tests/test_cli.py`` fails if a flag and a field disagree.  A field
without a flag says ``internal=True``.  ``compare``'s own options are declared the same way
(:class:`~sorsa_kernels.jobs.compare.config.CompareConfig`).

Checks: construction rejects bad values (the numeric rule table, choices, the prompt
template, the target regex, a model without data) with one-line ``ConfigError``\\ s naming
fields; :meth:`FinetuneConfig.check_environment` checks what depends on this machine
(processes, GPUs, folders) before a job loads anything; :func:`check_output_dir` checks
the output folder.  :func:`distributed` and :func:`is_main_process` read the torchrun
environment.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ...nn.checks import SVD_MODES
from ...nn.knobs import (COUNT, FRACTION, NON_NEGATIVE, NON_NEGATIVE_COUNT, POSITIVE, Rule, check_gamma_rate,
                         check_scale)
from ...training.optim import OPTIMIZERS
from ..models.embedded import EMBEDDED_NAME, EMBEDDED_PROMPT_TEMPLATE, PRETRAIN_STEPS
from ..options import ConfigError, check_fields, option

#: Prompt layout for models without a chat template (Alpaca-style).
DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
EMBEDDED_EXAMPLES = 700
EMBEDDED_HELD_OUT = 100

#: The dtype names ``residual_dtype`` / ``adapter_dtype`` accept.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# accelerate (1.15) builds its FSDP plugin only for GPU-like devices; for a CPU (gloo) launch it
# drops the plugin silently, and it refuses to wrap an already-sharded (DTensor) model in DDP.
#: The refusal of FSDP without GPUs (a ConfigError template), checked before and after the Trainer is built.
FSDP_CPU_MESSAGE = ("{fsdp:flag} needs GPUs: accelerate does not enable FSDP for CPU (gloo) processes; "
                    "drop {fsdp:flag} to train with DDP")
#: Characters that make a single ``target_modules`` argument a regular expression.
REGEX_CHARS = "*()[]|\\^$+?{}"

_DATA, _SORSA, _TRAINING, _LOGGING = "model and data", "SORSA", "training", "logging, evaluation, saving"


def _schedulers() -> tuple[str, ...]:
    from transformers import SchedulerType

    return tuple(s.value for s in SchedulerType)


# The embedded default's values (``embedded=``) and why they differ from the paper's: the model
# is tiny (0.6 M parameters, hidden size 128) and the run must end in well under two minutes
# on a CPU, so it takes a larger rank fraction (16 of 128), a 100x larger learning rate
# (3e-3; at 3e-5 nothing visible happens in a few hundred steps), small batches and a fixed
# number of steps.  gamma, warm-up, schedule and weight decay are the paper's.
@dataclass
class FinetuneConfig:
    """Everything ``sorsa-kernels finetune`` accepts, checked on construction.  ``None`` means
    "the default for this model": :data:`PAPER_DEFAULTS` for a real model,
    :data:`EMBEDDED_DEFAULTS` for the embedded one (:meth:`resolved` fills them in).

    Example::

        >>> FinetuneConfig(model="meta-llama/Llama-2-7b-hf")
        Traceback (most recent call last):
        ConfigError: model='meta-llama/Llama-2-7b-hf' needs data FILE (.jsonl, .json or .parquet)
    """

    # ---- model and data
    model: str = option(EMBEDDED_NAME, "local path or Hub id of a causal LM, or a .gguf file (dequantized; its "
                        "tokenizer and chat template come from the same file)", group=_DATA)
    data: Optional[str] = option(None, "training data: .jsonl, .json or .parquet with prompt/response fields",
                                 group=_DATA, shown="the embedded arithmetic problems; required with {model:flag}")
    eval_data: Optional[str] = option(None, "held-out data", group=_DATA,
                                      shown="{eval_fraction:flag} of {data:flag}")
    prompt_field: str = option("prompt", "name of the prompt field", group=_DATA)
    response_field: str = option("response", "name of the response field", group=_DATA)
    prompt_template: Optional[str] = option(
        None, "layout for tokenizers without a chat template; must contain {{prompt}}", group=_DATA,
        shown="Alpaca-style '### Instruction:' … '### Response:'")
    output_dir: Optional[str] = option(
        None, "where to write adapter/, merged/ …; refused if it holds anything but an unfinished run's leftovers",
        group=_DATA, shown="a new ./sorsa-output-<time>[-N]")
    # ---- SORSA
    rank: Optional[int] = option(None, "adapter rank r", group=_SORSA, paper=128, embedded=16)
    target_modules: Optional[Sequence[str]] = option(
        None, "module names to adapt, one regular expression, or all-linear (every linear layer but the output "
        "head)", group=_SORSA, nargs="+", metavar="NAME",
        shown="every attention and MLP projection of the model's architecture: Llama, Mistral, Mixtral, "
        "Qwen2/3 (+MoE), Gemma 1-3, Phi, Phi-3, GPT-2, GPT-NeoX, GPT-J, Falcon, OPT, Bloom, OLMo, OLMoE, "
        "StarCoder2, T5, BERT, RoBERTa, ViT; others need NAMEs or all-linear")
    alpha: Optional[float] = option(None, "scale = alpha / rank", group=_SORSA, shown="scale 1")
    gamma: float = option(4e-4, "orthonormal regularizer strength", group=_SORSA)
    svd: str = option("full", "SVD used at initialization", group=_SORSA, choices=SVD_MODES)
    residual_dtype: Optional[str] = option(None, "dtype of the frozen residual", group=_SORSA,
                                           choices=tuple(DTYPES), shown="the weight's")
    adapter_dtype: Optional[str] = option(None, "dtype of U, S, V (bfloat16: each step is taken in fp32 and "
                                          "rounded back stochastically, so steps under half a bf16 ulp count)",
                                          group=_SORSA, choices=tuple(DTYPES),
                                          shown="float32")
    quantize: Optional[str] = option(None, "store residuals in NF4 (QSORSA)", group=_SORSA, choices=("nf4",),
                                     shown="none: dense residuals")
    # ---- training
    learning_rate: Optional[float] = option(None, "peak learning rate", group=_TRAINING,
                                            flags=("--learning-rate", "--lr"), paper=3e-5, embedded=3e-3, rule=POSITIVE)
    num_train_epochs: Optional[float] = option(None, "epochs", group=_TRAINING, flags=("--epochs",),
                                               paper=1.0, embedded=1.0, rule=POSITIVE)
    max_steps: Optional[int] = option(
        None, "optimizer steps; overrides {num_train_epochs:flag}", group=_TRAINING, paper=-1, embedded=250,
        shown="{num_train_epochs:flag} decides; embedded {embedded}",
        rule=Rule("positive (or -1 for epochs)", integer=True, low=1, also=(-1,)))
    per_device_train_batch_size: Optional[int] = option(None, "per-device batch size", group=_TRAINING,
                                                        flags=("--batch-size",), paper=8, embedded=16, rule=COUNT)
    gradient_accumulation_steps: Optional[int] = option(  # the paper's global batch: 128 on one device
        None, "gradient accumulation steps", group=_TRAINING,
        flags=("--grad-accum", "--gradient-accumulation-steps"), paper=16, embedded=1, rule=COUNT)
    max_length: int = option(512, "max tokens per example", group=_TRAINING, rule=COUNT)
    warmup_ratio: float = option(0.03, "warm-up fraction of the steps", group=_TRAINING, rule=FRACTION)
    lr_scheduler_type: str = option("cosine", "learning-rate schedule", group=_TRAINING, flags=("--scheduler",),
                                    choices=_schedulers)
    weight_decay: float = option(0.0, "AdamW weight decay", group=_TRAINING, rule=NON_NEGATIVE)
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 turns clipping off", group=_TRAINING,
                                  rule=Rule("a non-negative finite number (0: no clipping)", low=0.0))
    bf16: bool = option(False, "bf16 mixed precision", group=_TRAINING)
    gradient_checkpointing: bool = option(False, "recompute activations in backward", group=_TRAINING)
    fsdp: bool = option(False, "shard with FSDP2 (under torchrun)", group=_TRAINING)
    # ---- memory levers (sorsa_kernels.training: optim, gradient_release, loss)
    optim: str = option("adamw", "optimizer: AdamW with fp32 state, or bitsandbytes' 8-bit AdamW (U and V in "
                        "8-bit state, S in fp32; paged keeps the state in unified memory, non-paged on CPU)",
                        group=_TRAINING, choices=OPTIMIZERS)
    gradient_release: bool = option(False, "step each adapter in its backward hook, freeing its gradient at once; "
                                    "gradient accumulation becomes 1 and {max_grad_norm:flag} clips each parameter "
                                    "on its own", group=_TRAINING)
    loss_chunk_size: int = option(0, "compute the loss N positions at a time, so the full fp32 logits never exist "
                                  "(0: all at once)", group=_TRAINING, metavar="N",
                                  rule=Rule("a non-negative integer (0: the whole sequence at once)", integer=True, low=0))
    force: bool = option(False, "train even when the memory plan's peak exceeds the GPU's memory", group=_TRAINING)
    seed: int = option(42, "random seed", group=_TRAINING,
                       rule=Rule("an integer in [0, 2**32)", integer=True, low=0, high=2**32, high_open=True))
    resume_from_checkpoint: Optional[str] = option(
        None, "continue from a complete checkpoint folder (or 'last': the newest under OUTPUT/checkpoints) with "
        "the same model, rank, targets, alpha and dtypes; writes into a new {output_dir:flag} or the checkpoint's "
        "own run folder, never another run's", group=_TRAINING, metavar="DIR", shown="none: a fresh start")
    # ---- logging, evaluation, saving
    logging_steps: Optional[int] = option(None, "log every N steps", group=_LOGGING, paper=10, embedded=25,
                                          rule=COUNT)
    eval_steps: Optional[int] = option(None, "held-out loss every N steps", group=_LOGGING,
                                       shown="only before and after", rule=COUNT)
    save_steps: Optional[int] = option(None, "checkpoint every N steps", group=_LOGGING, shown="no checkpoints",
                                       rule=COUNT)
    save_total_limit: Optional[int] = option(None, "keep at most N checkpoints", group=_LOGGING, shown="all",
                                             rule=COUNT)
    eval_fraction: float = option(0.05, "held-out fraction of {data:flag}", group=_LOGGING, rule=FRACTION)
    eval_samples: int = option(200, "held-out examples for exact match", group=_LOGGING, rule=NON_NEGATIVE_COUNT)
    max_new_tokens: Optional[int] = option(None, "generation length for exact match; must fit beside the longest "
                                           "held-out prompt within {max_length:flag} (prompts are never cut)",
                                           group=_LOGGING, shown="longest response + 4, within what fits",
                                           rule=COUNT)
    answer_pattern: Optional[str] = option(
        None, "exact match compares the answer this regular expression extracts (its group, e.g. '#### (\\S+)'), "
        "or 'last-number', from completion and response: for chain-of-thought data", group=_LOGGING,
        metavar="REGEX", shown="the whole response")
    evaluate: bool = option(True, "skip the before/after evaluation", group=_LOGGING, flags=("--no-eval",))
    report_to: str = option("none", "Trainer loggers: none, tensorboard, wandb …", group=_LOGGING)
    pretrain_steps: Optional[int] = option(None, "embedded model only: in-process pretraining steps",
                                           group=_LOGGING, paper=0, embedded=PRETRAIN_STEPS, shown="{embedded}",
                                           rule=NON_NEGATIVE_COUNT)
    pretrain_cache: bool = option(True, "embedded model only: pretrain again instead of reading the pretrained "
                                  "weights cached by an earlier run (and leave the cache as it is)", group=_LOGGING,
                                  flags=("--no-cache",))
    progress: bool = option(True, "no progress bars, transformers' own included (the command line draws "
                                    "none when its output is not a terminal)", group=_LOGGING, flags=("--quiet",))
    verbose: bool = option(False, "after the one-line adaptation summary, list every linear layer and fused "
                           "expert weight left unadapted", group=_LOGGING)
    # ---- Python only
    eval_batch_size: int = option(32, "batch size of the held-out evaluation", internal=True, rule=COUNT)
    extra_training_args: dict = option(default_factory=dict, help="more transformers.TrainingArguments",
                                       internal=True)

    def __post_init__(self) -> None:
        check_fields(self)
        self._check_arithmetic()
        if self.prompt_template is not None:
            check_prompt_template(self.prompt_template)
        check_answer_pattern(self.answer_pattern, self)
        target_spec(self)
        if self.embedded and self.data is None and self.eval_data is not None:
            raise ConfigError("{eval_data:flag} needs {data:flag} (the embedded data set brings its own "
                              "held-out split)", self)
        if not self.embedded and self.data is None:
            raise ConfigError("{model:given} needs {data:flag} FILE (.jsonl, .json or .parquet)", self)
        if self.gradient_release and (self.gradient_accumulation_steps or 1) > 1:
            raise ConfigError("{gradient_release:flag} steps every backward: it cannot accumulate gradients; drop "
                              "{gradient_accumulation_steps:given}", self)
        if self.gradient_release and self.fsdp:
            raise ConfigError("{gradient_release:flag} cannot run with {fsdp:flag}: its hooks see unsharded gradients "
                              "before the reduce-scatter", self)

    def _check_arithmetic(self) -> None:
        """alpha and gamma whose finite values the computation still cannot hold, bounded by the
        adapter dtype (:func:`~sorsa_kernels.nn.knobs.check_scale`, ``check_gamma_rate``); checked
        once rank and learning rate are known (always, after :meth:`resolved`)."""
        dtype = DTYPES.get(self.adapter_dtype or "float32", torch.float32)
        for name, ready, check in (
                ("alpha", self.rank is not None, lambda: check_scale(self.alpha, self.rank, dtype)),
                ("gamma", self.learning_rate is not None,
                 lambda: check_gamma_rate(self.gamma, self.learning_rate, dtype))):
            try:
                if ready:
                    check()
            except ValueError as e:
                raise ConfigError("{" + name + "} {problem}", self, problem=str(e)[len(name) + 1:]) from None

    @property
    def embedded(self) -> bool:
        return self.model == EMBEDDED_NAME

    def resolved(self) -> "FinetuneConfig":
        """A copy with every ``None`` default filled in for this model."""
        defaults = EMBEDDED_DEFAULTS if self.embedded else PAPER_DEFAULTS
        changes = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.gradient_release:  # each backward steps: nothing to accumulate
            changes["gradient_accumulation_steps"] = 1
        if self.num_train_epochs is not None and self.max_steps is None:
            changes["max_steps"] = -1  # epochs given explicitly: they decide the length
        if self.prompt_template is None:
            changes["prompt_template"] = EMBEDDED_PROMPT_TEMPLATE if self.embedded else DEFAULT_PROMPT_TEMPLATE
        return dataclasses.replace(self, **changes)

    def check_environment(self) -> None:
        """Raise a one-line error for what this machine cannot do with the config: FSDP without
        several processes or GPUs, a streamed NF4 model that is not a local folder, a missing
        checkpoint or model folder.  Jobs call it before loading anything."""
        if self.fsdp and self.quantize and not self.embedded and not Path(self.model).is_dir():
            raise ConfigError(
                "{fsdp:given} {quantize:given} streams the checkpoint from a local folder; download {name} first "
                "(huggingface-cli download {name} --local-dir DIR) and pass {model:flag} DIR", self, name=self.model)
        if self.fsdp and not distributed():
            raise ConfigError("{fsdp:flag} needs several processes: launch with torchrun --nproc_per_node N "
                              "-m sorsa_kernels.cli", self)
        if self.fsdp and not torch.cuda.is_available():
            raise ConfigError(FSDP_CPU_MESSAGE, self)
        if self.gradient_release and distributed():
            raise ConfigError("{gradient_release:flag} runs in one process: its hooks would step each parameter "
                              "before the processes average its gradient", self)
        if self.resume_from_checkpoint not in (None, "last") and not Path(self.resume_from_checkpoint).is_dir():
            raise ValueError(f"checkpoint folder {self.resume_from_checkpoint} does not exist")
        check_model_path(self.model)


def _per_model(key: str) -> dict[str, Any]:
    return {f.name: f.metadata[key] for f in dataclasses.fields(FinetuneConfig) if key in f.metadata}


#: The paper's settings (Table 3), used for real models: the fields' ``paper=`` values.
PAPER_DEFAULTS: dict[str, Any] = _per_model("paper")
#: The embedded default's settings (why they differ: the comment above :class:`FinetuneConfig`).
EMBEDDED_DEFAULTS: dict[str, Any] = _per_model("embedded")


def target_spec(cfg: FinetuneConfig):
    """``target_modules`` as :func:`sorsa_kernels.apply_sorsa` takes it: None, a list of names,
    or (one argument holding regex characters) a regular expression, checked to compile;
    ``all-linear`` beside other names is refused on construction (issue 29 item 2)."""
    targets = list(cfg.target_modules) if cfg.target_modules else None
    if targets is not None and len(targets) == 1 and any(c in targets[0] for c in REGEX_CHARS):
        from ...adapters.surgery import compile_target_regex

        try:
            compile_target_regex(targets[0])
        except ValueError as e:
            raise ConfigError("{target_modules:flag}{problem}", cfg, problem=str(e)[len("target_modules"):]) from None
        return targets[0]
    if targets is not None and len(targets) > 1 and "all-linear" in targets:
        raise ConfigError("{target_modules:given}: all-linear must stand alone (it already names every linear layer "
                          "but the output head); pass it alone or list names", cfg)
    return targets


#: ``answer_pattern`` value that compares the last number of each text.
LAST_NUMBER = "last-number"


def check_answer_pattern(pattern: Optional[str], config: Any = None) -> None:
    """Raise a one-line ConfigError unless ``pattern`` is None, ``last-number`` or a regex with at most one group."""
    if pattern is None or pattern == LAST_NUMBER:
        return
    try:
        groups = re.compile(pattern).groups
    except re.error as e:
        raise ConfigError("{answer_pattern} {p!r} is not a valid regular expression ({e}); pass one such as "
                          "'#### (\\S+)' or {last}", config, p=pattern, e=e, last=LAST_NUMBER) from None
    if groups > 1:
        raise ConfigError("{answer_pattern} {p!r} has {n} groups; it may have at most one (the answer), "
                          "e.g. '#### (\\S+)'", config, p=pattern, n=groups)


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


def check_model_path(name: str) -> None:
    """Raise at once for a model value that names nothing loadable: a missing local path (naming the
    nearest existing names), a folder without a model, a file other than ``.gguf``; an ambiguous
    ``org/model`` beside a local ``org/`` is looked up on the Hub once
    (:func:`sorsa_kernels.jobs.models.paths.check_model_name`)."""
    from ..models.paths import check_model_name

    check_model_name(name, EMBEDDED_NAME)


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
