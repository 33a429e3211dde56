"""What a finetune run leaves behind: the adapter, the merged model, the base, metrics.json.

:class:`FinetuneResult` describes a finished run; :func:`save_outputs` writes
``adapter/``, ``base/`` (embedded default) and ``merged/`` — gathering FSDP2 shards
first, or rebuilding the model from the saved adapter when it is sharded; for sharded
QSORSA (``--fsdp --quantize nf4``) gathering one layer at a time — and
:func:`write_metrics` the JSON report, last, as the mark of a finished run.  Only the
main process writes.  Each artifact is written to a hidden temporary sibling and renamed
into place whole (:mod:`sorsa_kernels.adapters.atomic`); a failed write (a full disk,
a kill) leaves the earlier artifact, and is reported as one line naming the artifact.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .config import FinetuneConfig, distributed
from .model import load_base


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
    #: Per split: records, kept, dropped (prompt fills --max-length), truncated (response cut), longest.
    data: dict[str, Any] = field(default_factory=dict)


def fsdp_modules(model):
    """The FSDP2-sharded submodules of ``model`` (none without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class OutputError(OSError):
    """An artifact could not be written; the message names it and says why, in one line."""


@contextlib.contextmanager
def publishing(final: Path, file: bool = False):
    """``atomic_dir(final)`` (``atomic_file`` when ``file``) with any failure turned into one
    :class:`OutputError` line ``cannot write FINAL: reason``."""
    from ...adapters.atomic import atomic_dir, atomic_file

    final = Path(final)
    writer = atomic_file if file else atomic_dir
    try:
        with writer(final) as tmp:
            yield tmp
    except OutputError:
        raise
    except Exception as e:  # OSError (ENOSPC …), SafetensorError, RuntimeError from a writer
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split()) or type(e).__name__
        raise OutputError(f"cannot write {final}: {reason}; the previous {final.name} (if any) is unchanged") from e


def save_outputs(trainer, tokenizer, cfg: FinetuneConfig, result: FinetuneResult, base_copy, train_out) -> None:
    """Write ``adapter/``, ``base/`` (embedded default) and ``merged/``; only rank 0 writes."""
    from ...adapters.adapter_io import save_adapter

    model = trainer.model
    if sharded_quantized(model):
        _save_sharded(trainer, tokenizer, cfg, result, base_copy)
        return
    fsdp = fsdp_modules(model)
    for m in fsdp:  # all ranks gather the full parameters; they stay plain tensors until reshard
        m.unshard()
    try:
        if trainer.is_world_process_zero():
            base_name = None if cfg.embedded else cfg.model
            with publishing(result.adapter_dir) as tmp:
                save_adapter(model, tmp, base_model_name_or_path=base_name)
            if base_copy is not None:
                with publishing(result.base_dir) as tmp:
                    base_copy.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
    finally:
        for m in fsdp:
            m.reshard()
    if trainer.is_world_process_zero():
        _save_merged(trainer, tokenizer, result, fsdp)
    if distributed() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    ckpt = result.output_dir / "checkpoints"
    if trainer.is_world_process_zero() and ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()  # the Trainer makes it even when nothing is saved


def sharded_quantized(model) -> bool:
    """True if ``model`` has QSORSA layers whose NF4 storage FSDP2 has sharded."""
    from ...dtensor import is_sharded
    from ...adapters.surgery import sorsa_layers

    return any(layer.quantize is not None and is_sharded(layer.U) for layer in sorsa_layers(model).values())


def _save_sharded(trainer, tokenizer, cfg: FinetuneConfig, result: FinetuneResult, base_copy) -> None:
    """Every rank joins: the factors are gathered for ``adapter/`` and each layer in turn for
    ``merged/`` (no rank ever holds the whole model unsharded); rank 0 writes."""
    from ...adapters.adapter_io import save_adapter
    from ...distributed.fsdp import save_merged

    main = trainer.is_world_process_zero()
    save_adapter(trainer.model, result.adapter_dir, base_model_name_or_path=None if cfg.embedded else cfg.model)
    if main and base_copy is not None:
        base_copy.save_pretrained(result.base_dir)
        tokenizer.save_pretrained(result.base_dir)
    save_merged(trainer.model, result.merged_dir, tokenizer=tokenizer)
    if distributed() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    ckpt = result.output_dir / "checkpoints"
    if main and ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()


def _save_merged(trainer, tokenizer, result: FinetuneResult, fsdp) -> None:
    from ...adapters.surgery import merge_sorsa

    if fsdp:  # the trained model is sharded: rebuild it unsharded from the saved adapter
        model = _reload_for_merge(trainer, result)
    else:
        model = trainer.model
    merge_sorsa(model)
    with publishing(result.merged_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _reload_for_merge(trainer, result: FinetuneResult):
    from ...adapters.adapter_io import load_adapter

    if result.base_dir is not None:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(result.base_dir)
    else:
        base, _ = load_base(result.settings["model"], progress=False)
    return load_adapter(base, result.adapter_dir)


def write_metrics(result: FinetuneResult) -> None:
    """Write ``metrics.json`` (metrics before/after, losses, run times, settings)."""
    data = {
        "before": result.before,
        "after": result.after,
        "train_losses": result.train_losses,
        "train_runtime_s": result.train_runtime_s,
        "total_runtime_s": result.total_runtime_s,
        "settings": result.settings,
        "data": result.data,
    }
    with publishing(result.output_dir / "metrics.json", file=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
