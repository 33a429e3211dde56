"""What a finetune run leaves behind: the adapter, the merged model, the base, metrics.json.

:class:`FinetuneResult` describes a finished run; :func:`save_outputs` writes
``adapter/``, ``base/`` (embedded default) and ``merged/`` — gathering FSDP2 shards
first, or rebuilding the model from the saved adapter when it is sharded; for sharded
QSORSA (``--fsdp --quantize nf4``) gathering one layer at a time — and
:func:`write_metrics` the JSON report.  Only the main process writes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
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


def fsdp_modules(model):
    """The FSDP2-sharded submodules of ``model`` (none without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def save_outputs(trainer, tokenizer, cfg: FinetuneConfig, result: FinetuneResult, base_copy, train_out) -> None:
    """Write ``adapter/``, ``base/`` (embedded default) and ``merged/``; only rank 0 writes."""
    from ..adapter_io import save_adapter

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
            save_adapter(model, result.adapter_dir, base_model_name_or_path=base_name)
            if base_copy is not None:
                base_copy.save_pretrained(result.base_dir)
                tokenizer.save_pretrained(result.base_dir)
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
    from ..fsdp import is_sharded
    from ..surgery import sorsa_layers

    return any(layer.quantize is not None and is_sharded(layer.U) for layer in sorsa_layers(model).values())


def _save_sharded(trainer, tokenizer, cfg: FinetuneConfig, result: FinetuneResult, base_copy) -> None:
    """Every rank joins: the factors are gathered for ``adapter/`` and each layer in turn for
    ``merged/`` (no rank ever holds the whole model unsharded); rank 0 writes."""
    from ..adapter_io import save_adapter
    from ..fsdp import save_merged

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
    from ..surgery import merge_sorsa

    if fsdp:  # the trained model is sharded: rebuild it unsharded from the saved adapter
        model = _reload_for_merge(trainer, result)
    else:
        model = trainer.model
    merge_sorsa(model)
    model.save_pretrained(result.merged_dir)
    tokenizer.save_pretrained(result.merged_dir)


def _reload_for_merge(trainer, result: FinetuneResult):
    from ..adapter_io import load_adapter

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
    }
    result.output_dir.mkdir(parents=True, exist_ok=True)
    (result.output_dir / "metrics.json").write_text(json.dumps(data, indent=2, default=str))
