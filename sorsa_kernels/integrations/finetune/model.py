"""Loading the base model and applying SORSA to it as the job's config says.

:func:`load_base` returns ``(model, tokenizer)`` for the embedded default or any local
path / Hub id of a causal LM, turning loader failures into one-line errors;
:func:`apply_config_sorsa` maps a :class:`FinetuneConfig` onto
:func:`sorsa_kernels.apply_sorsa` (dtypes, SVD, NF4, target modules or one regular expression).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..embedded import EMBEDDED_NAME, PRETRAIN_STEPS, build_embedded
from .config import DTYPES, FinetuneConfig, check_model_path, is_main_process, target_spec


def load_base(name: str, *, pretrain_steps: Optional[int] = None, seed: int = 0, progress: bool = True,
              dtype: Optional[torch.dtype] = None):
    """``(model, tokenizer)`` for ``"embedded"`` or a local path / Hub id of a causal LM.

    Errors (no such model, not a causal LM) are raised as one-line ValueErrors.
    """
    if name == EMBEDDED_NAME:
        steps = PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
        return build_embedded(pretrain_steps=steps, seed=0, progress=progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto")
    except Exception as e:  # OSError, ValueError, SafetensorError (truncated weights), …
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load model {name!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def apply_config_sorsa(model, cfg: FinetuneConfig):
    """SORSA surgery on ``model`` with the config's rank, targets, SVD, dtypes and quantization."""
    from ..surgery import apply_sorsa

    kwargs = dict(
        svd=cfg.svd, alpha=cfg.alpha, progress=cfg.progress and is_main_process(),
        residual_dtype=DTYPES[cfg.residual_dtype] if cfg.residual_dtype else None,
        adapter_dtype=DTYPES[cfg.adapter_dtype] if cfg.adapter_dtype else None,
    )
    if cfg.quantize:
        try:
            from ...nn import qlinear  # noqa: F401  (QSORSA)
        except ImportError:
            raise ValueError(
                f"--quantize {cfg.quantize} needs QSORSA (sorsa_kernels.nn.qlinear), which this installation lacks"
            ) from None
        kwargs["quantize"] = cfg.quantize
    return apply_sorsa(model, cfg.rank, target_spec(cfg), **kwargs)
