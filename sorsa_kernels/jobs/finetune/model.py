"""Loading the base model and applying SORSA to it as the job's config says.

:func:`load_base` returns ``(model, tokenizer)`` for the embedded default or any local
path / Hub id of a causal LM, turning loader failures into one-line errors;
:func:`apply_config_sorsa` maps a :class:`FinetuneConfig` onto
:func:`sorsa_kernels.apply_sorsa` (dtypes, SVD, NF4, target modules or one regular expression);
:func:`load_sharded_quantized` builds the ``--fsdp --quantize nf4`` model, sharded as it loads.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Iterator, Optional

import torch

from ...adapters.targets import ALL_LINEAR, NoDefaultTargetsError
from ..models.embedded import EMBEDDED_NAME, PRETRAIN_STEPS, build_embedded
from ..options import ConfigError
from ..models.gguf import gguf_folder, is_gguf
from .config import DTYPES, FinetuneConfig, check_model_path, is_main_process, target_spec


def load_base(name: str, *, pretrain_steps: Optional[int] = None, seed: int = 0, progress: bool = True,
              dtype: Optional[torch.dtype] = None):
    """``(model, tokenizer)`` for ``"embedded"``, a local path / Hub id of a causal LM, or a ``.gguf`` file.

    A GGUF file is dequantized (once, into a cached folder: see
    :func:`sorsa_kernels.jobs.models.gguf.gguf_folder`) and its tokenizer,
    chat template included, comes from the same file.

    Errors (no such model, not a causal LM) are raised as one-line ValueErrors.
    """
    if name == EMBEDDED_NAME:
        steps = PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
        return build_embedded(pretrain_steps=steps, seed=0, progress=progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(name)
    try:
        # a GGUF file is converted once to a cached folder (float32), then loaded in ``dtype`` like any other
        folder = str(gguf_folder(name)) if is_gguf(name) else name
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto")
    except Exception as e:  # OSError, ValueError, SafetensorError (truncated weights), …
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load model {name!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def sorsa_arguments(cfg: FinetuneConfig) -> tuple:
    """``(target_modules, init)`` of :func:`sorsa_kernels.apply_sorsa` for the config: the targets as
    :func:`target_spec` reads them and the one :class:`~sorsa_kernels.nn.init_spec.SORSAInit`
    (rank, alpha, SVD, dtypes, storage) that every layer is built with."""
    from ...nn.init_spec import SORSAInit

    if cfg.quantize:
        try:
            from ...nn import qlinear  # noqa: F401  (QSORSA)
        except ImportError:
            raise ConfigError("{quantize:given} needs QSORSA (sorsa_kernels.nn.qlinear), which this installation "
                              "lacks", cfg) from None
    init = SORSAInit(
        rank=cfg.rank, alpha=cfg.alpha, svd=cfg.svd, quantize=cfg.quantize or None,
        residual_dtype=DTYPES[cfg.residual_dtype] if cfg.residual_dtype else None,
        adapter_dtype=DTYPES[cfg.adapter_dtype] if cfg.adapter_dtype else None,
    )
    return target_spec(cfg), init


@contextlib.contextmanager
def targets_worded(cfg: FinetuneConfig) -> Iterator[None]:
    """Re-raise an unknown architecture's "no default target_modules" as a :class:`ConfigError`
    naming the option as the front end does (``--target-modules all-linear`` on the command line)."""
    try:
        yield
    except NoDefaultTargetsError as e:
        names = ", ".join(e.linear) if e.linear else "(it has none)"
        raise ConfigError("no default {target_modules:flag} for {what}; pass {target_modules:given} or names of its "
                          "linear layers: {names}", SimpleNamespace(target_modules=[ALL_LINEAR]), what=e.what,
                          names=names) from None


def apply_config_sorsa(model, cfg: FinetuneConfig):
    """SORSA surgery on ``model`` with the config's rank, targets, SVD, dtypes and quantization."""
    from ...adapters.surgery import apply_sorsa

    targets, init = sorsa_arguments(cfg)
    with targets_worded(cfg):
        return apply_sorsa(model, init, targets, progress=cfg.progress and is_main_process())


def _fsdp_mesh():
    """A 1-D mesh over every process (CUDA when available; the device of LOCAL_RANK)."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return init_device_mesh("cuda", (world,))
    return init_device_mesh("cpu", (world,))


def load_sharded_quantized(cfg: FinetuneConfig, mesh=None):
    """``(model, tokenizer, base_copy)`` for ``--fsdp --quantize nf4``: QSORSA already sharded by FSDP2.

    A real model is read from its local folder by
    :func:`sorsa_kernels.distributed.streaming.load_sorsa_streaming`: each weight is
    quantized as it arrives and each decoder layer sharded as soon as it is built, so no
    rank ever holds the dense model.  The embedded model (tiny) is built, adapted, then
    sharded; ``base_copy`` is its unadapted copy (None for a real model).  Every process
    must call it; ``mesh`` defaults to one over all processes.
    """
    from ...distributed.fsdp import shard_model

    mesh = mesh if mesh is not None else _fsdp_mesh()
    targets, init = sorsa_arguments(cfg)
    progress = cfg.progress and is_main_process()
    if cfg.embedded:
        import copy

        model, tokenizer = load_base(cfg.model, pretrain_steps=cfg.pretrain_steps, progress=progress)
        base_copy = copy.deepcopy(model)
        apply_config_sorsa(model, cfg)
        return shard_model(model, mesh), tokenizer, base_copy
    from transformers import AutoTokenizer

    from ...distributed.streaming import load_sorsa_streaming

    check_model_path(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load the tokenizer of {cfg.model!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with targets_worded(cfg):
        model = load_sorsa_streaming(cfg.model, init, targets, mesh=mesh, progress=progress)
    return model, tokenizer, None
