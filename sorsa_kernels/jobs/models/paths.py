"""What a ``--model`` / ``--base`` value names, checked before anything loads.

A value that starts with ``.``, ``/`` or ``~``, or has more than one ``/``, is a local path:
when it does not exist the error says so at once and names the nearest existing names
(``out/bsae`` → ``did you mean out/base?``), with no Hub lookup and its retry loop.  A value
that could be either (``org/model`` while a local ``org/`` exists) is looked up on the Hub
once, with a short timeout and no retries; if the Hub has no such model, or cannot be
reached, the error names the local near-misses.  An existing folder must hold a model:
``config.json`` and weights (:func:`check_model_folder`).  An output folder must be on a disk,
not on a kernel file system such as ``/proc`` (:func:`check_on_disk`).

Example::

    >>> check_model_name("out/bsae")
    Traceback (most recent call last):
    ValueError: cannot load model: out/bsae: no such folder (did you mean out/base?); ...
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Optional

__all__ = ["looks_like_local_path", "near_misses", "check_model_folder", "check_model_name", "check_on_disk",
           "HUB_TIMEOUT_S"]

#: Seconds the one Hub lookup of an ambiguous ``org/model`` may take.
HUB_TIMEOUT_S = 10.0
# File names (suffixes) that hold a model's weights in a save_pretrained folder.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
_SHOWN = 8  # entries of a folder listed in an error


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only be a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``), never a Hub id."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def near_misses(name: str) -> list[str]:
    """``name`` with its first missing component replaced by the closest existing names beside it.

    Example::

        >>> near_misses("out/bsae")   # out/ holds base/ and adapter/
        ['out/base']
    """
    path = Path(name)
    parts = path.parts
    for i, part in enumerate(parts):
        here = Path(*parts[: i + 1]).expanduser()
        if here.exists():
            continue
        parent = Path(*parts[:i]).expanduser() if i else Path(".")
        try:
            siblings = [p.name for p in parent.iterdir()]
        except OSError:
            return []
        rest = parts[i + 1:]
        return [str(Path(*parts[:i], hit, *rest)) for hit in difflib.get_close_matches(part, siblings, n=3, cutoff=0.6)]
    return []


def _did_you_mean(name: str) -> str:
    near = near_misses(name)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def _listing(folder: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return "it is empty"
    more = f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else ""
    return f"it holds {', '.join(entries[:_SHOWN])}{more}"


def check_model_folder(folder: Path, name: str) -> None:
    """Raise a ValueError unless ``folder`` holds ``config.json`` and a weights file, saying what it holds."""
    files = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    has_config = "config.json" in files
    has_weights = any(f.endswith(_WEIGHT_SUFFIXES) for f in files)
    if has_config and has_weights:
        return
    missing = " and ".join(w for w, ok in (("config.json", has_config), ("weights", has_weights)) if not ok)
    raise ValueError(
        f"cannot load model: {name} is not a model folder (no {missing}): a model folder holds config.json and "
        f"the weights (model.safetensors, pytorch_model.bin or their shards), as save_pretrained writes it; "
        f"{_listing(folder)}")


def _hub_has(name: str) -> str:
    """Ask the Hub once, without retries, whether model ``name`` exists: ``""`` when it does, else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set, so the Hub was not asked"
    try:
        from huggingface_hub import constants, get_session

        response = get_session().head(f"{constants.ENDPOINT}/api/models/{name}", timeout=HUB_TIMEOUT_S,
                                      follow_redirects=True)
    except Exception as e:  # DNS, connection, timeout: one try, then say so
        return f"the Hub could not be reached ({' '.join(str(e).split()) or type(e).__name__})"
    if response.status_code == 200:
        return ""
    return f"the Hub has no model {name} (HTTP {response.status_code})"


def check_model_name(name: str, embedded_name: str = "embedded") -> None:
    """Raise a one-line ValueError, at once, for a model value that names nothing loadable.

    Local paths that do not exist name their near-misses; an existing folder must hold a model
    (a ``.gguf`` file is the one file accepted); an ambiguous ``org/model`` with a local ``org/``
    is looked up on the Hub once.  A plain Hub id (no local ``org/``) is left to the loader.
    """
    if name == embedded_name:
        return
    path = Path(name).expanduser()
    gguf = name.lower().endswith(".gguf")
    if path.exists():
        if path.is_dir():
            check_model_folder(path, name)
        elif not (gguf and path.is_file()):
            raise ValueError(f"cannot load model: {name} is a file, not a model folder or a .gguf file")
        return
    what = "GGUF file" if gguf else "model folder"
    if looks_like_local_path(name) or gguf:
        raise ValueError(f"cannot load model: no such {what}: {name}{_did_you_mean(name)}")
    if path.parent != Path(".") and path.parent.is_dir():  # org/model beside a local org/: the Hub, once
        why = _hub_has(name)
        if why:
            raise ValueError(f"cannot load model: no such {what}: {name}{_did_you_mean(name)}, and {why}")


# File systems of the kernel (``/proc``, ``/sys``, …): they exist and may look writable, but hold no
# ordinary folders, so creating one fails with a bare errno line ("No such file or directory").
_VIRTUAL_FILE_SYSTEMS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                                   "securityfs", "configfs", "pstore", "bpf", "efivarfs", "mqueue", "hugetlbfs",
                                   "fusectl", "binfmt_misc", "autofs", "nsfs"})


def _file_system(path: Path) -> Optional[str]:
    """The type of the file system ``path`` (an existing path) is on, from ``/proc/self/mounts``; None if unknown."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    real = os.path.realpath(path)
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def check_on_disk(out: Path) -> None:
    """Raise a one-line ValueError when the output folder ``out`` would be on a kernel file system
    (``/proc/x``, ``/sys/x``), naming the folder and what is wrong there."""
    existing = Path(os.path.abspath(out))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    kind = _file_system(existing)
    if kind in _VIRTUAL_FILE_SYSTEMS:
        raise ValueError(f"output folder {out} cannot be created: {existing} is on {kind}, a virtual file system "
                         "of the kernel that holds no ordinary folders or files; choose a folder on a disk")
