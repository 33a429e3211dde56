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
from ..progress import phase_line
from ..models.gguf import gguf_folder, is_gguf
from .config import DTYPES, FinetuneConfig, check_model_path, is_main_process, target_spec


def load_base(name: str, *, pretrain_steps: Optional[int] = None, seed: int = 0, progress: bool = True,
              dtype: Optional[torch.dtype] = None, cache: bool = True, model_class: Optional[str] = None,
              need_tokenizer: bool = True):
    """``(model, tokenizer)`` for ``"embedded"``, a local path / Hub id of a causal LM, or a ``.gguf`` file.

    A GGUF file is dequantized (once, into a cached folder: see
    :func:`sorsa_kernels.jobs.models.gguf.gguf_folder`) and its tokenizer,
    chat template included, comes from the same file.  ``model_class`` (a ``transformers`` class
    name, e.g. ``"BertForSequenceClassification"``) loads the base as that class instead of
    ``AutoModelForCausalLM``; without ``need_tokenizer`` a base without one gives ``tokenizer=None``.
    ``cache=False`` pretrains the embedded model again instead of reading its cached weights.

    Errors (no such model, not a causal LM) are raised as one-line ValueErrors.
    """
    from ...ops.dispatch import backend

    backend()  # a misspelt SORSA_KERNELS_BACKEND fails here, before a model is pretrained or loaded
    if name == EMBEDDED_NAME:
        steps = PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
        return build_embedded(pretrain_steps=steps, seed=0, progress=progress, cache=cache)
    check_model_path(name)
    from transformers import AutoTokenizer

    try:
        # a GGUF file is converted once to a cached folder (float32), then loaded in ``dtype`` like any other
        folder = str(gguf_folder(name)) if is_gguf(name) else name
    except ValueError:  # one line naming the file already (truncated, unwritable cache, …)
        raise
    except Exception as e:
        raise ValueError(f"cannot load model {name!r}: {_first_line(e)}") from None
    tokenizer = None
    if not has_tokenizer_files(folder):  # transformers would make up an empty tokenizer, or fail mid-sentence
        if need_tokenizer:
            raise ValueError(f"cannot load model {name!r}: the folder has no tokenizer (none of "
                             f"{', '.join(TOKENIZER_FILES)}); copy the tokenizer files of the model it came from "
                             "into it")
    else:
        try:  # the tokenizer first: it is cheap, and a broken one must not cost a model load
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            if need_tokenizer:
                raise ValueError(f"cannot load model {name!r}: no usable tokenizer: {_first_line(e)}") from None
    try:
        model = _model_class(model_class).from_pretrained(folder, dtype=dtype or "auto")
    except Exception as e:  # OSError, ValueError, SafetensorError (truncated weights), …
        raise ValueError(f"cannot load model {name!r}: {_first_line(e)}") from None
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


#: Files one of which a local model folder's tokenizer is read from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def has_tokenizer_files(folder: str) -> bool:
    """Whether ``folder`` (a local folder; a Hub id is taken to have them) holds a tokenizer."""
    from pathlib import Path

    path = Path(folder).expanduser()
    return not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(e).__name__


def _model_class(name: Optional[str]):
    """The ``transformers`` class a base loads as: ``AutoModelForCausalLM`` unless an adapter names its own."""
    import transformers

    if name is None:
        return transformers.AutoModelForCausalLM
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"the adapter was trained on a {name}, which this transformers "
                         f"{transformers.__version__} does not have")
    return cls


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
    import time

    from ...adapters.surgery import apply_sorsa

    targets, init = sorsa_arguments(cfg)
    bars = cfg.progress and is_main_process()
    what = f"NF4 residual, {cfg.svd} SVD" if cfg.quantize else f"{cfg.svd} SVD"
    phase_line(f"SORSA init: rank {cfg.rank}, {what}", bars)
    start = time.perf_counter()
    with targets_worded(cfg):
        model = apply_sorsa(model, init, targets, progress=bars)
    phase_line(f"SORSA init finished in {time.perf_counter() - start:.1f} s", bars)
    return model


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

        model, tokenizer = load_base(cfg.model, pretrain_steps=cfg.pretrain_steps, progress=progress,
                                     cache=cfg.pretrain_cache)
        base_copy = copy.deepcopy(model)
        apply_config_sorsa(model, cfg)
        return shard_model(model, mesh), tokenizer, base_copy
    from transformers import AutoTokenizer

    from ...distributed.streaming import load_sorsa_streaming

    from ...ops.dispatch import backend

    backend()  # before the streaming load
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
