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

    >>> from sorsa_kernels.jobs.finetune import FinetuneConfig, run_finetune
    >>> result = run_finetune(FinetuneConfig(output_dir="out"))      # the embedded default
    >>> result.after["exact_match"] > result.before["exact_match"]
    True

The job is split by what changes together: :mod:`.config` (the options, each declared
once, and their checks), :mod:`.encoding` (tokenization and batching), :mod:`.model`
(loading the base and applying SORSA), :mod:`.evaluation` (held-out loss, exact match), :mod:`.training`
(the Trainer run), :mod:`.outputs` (adapter, merged model, metrics.json, each published
whole), :mod:`.rundir` (the output folder's states: what a rerun or a resume may do with
it, checkpoint records, default names, tidying after a failure) and :mod:`.jobs` (merge,
export-lora, analyze).  This module re-exports their public names.
"""
from __future__ import annotations

from .config import (
    DEFAULT_PROMPT_TEMPLATE,
    EMBEDDED_DEFAULTS,
    PAPER_DEFAULTS,
    FinetuneConfig,
    check_output_dir,
)
from ..options import ConfigError
from .encoding import ResponseOnlyCollator, encode_example
from .evaluation import exact_match
from .jobs import analyze_job, default_plot_path, export_lora_job, merge_job, plot_drift, shutdown_distributed
from .model import load_base
from .outputs import FinetuneResult
from .training import run_finetune

__all__ = [
    "FinetuneConfig",
    "ConfigError",
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
    "default_plot_path",
    "shutdown_distributed",
]
