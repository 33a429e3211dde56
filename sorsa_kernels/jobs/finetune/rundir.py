"""The output folder of a finetune run: what state it is in, what a rerun or a resume may do
with it, and how a failed run leaves it.

A run folder holds only the run's own entries (:data:`RUN_ENTRIES`): ``adapter/``,
``base/``, ``merged/`` and ``metrics.json`` (each published whole, by one rename, with
:mod:`sorsa_kernels.adapters.atomic`), ``checkpoints/`` (the Trainer's), and hidden
``.NAME.tmp-*`` temporaries of an interrupted write.  :func:`inspect_output_dir` sorts a
folder into one of these states:

============  =====================================================  ===================================
state         what the folder holds                                  rerun / ``--resume-from-checkpoint``
============  =====================================================  ===================================
absent        nothing (the folder does not exist)                    starts / starts from the checkpoint
fresh         nothing of value: empty, or only an empty              starts / starts from the checkpoint
              ``checkpoints/``, incomplete checkpoints, temporaries
unfinished    some artifacts of a run (:data:`LOCK_FILE` marks it)   starts afresh (artifacts replaced)
              but no ``metrics.json`` and no complete checkpoint
              (a failed save, e.g. a full disk)
resumable     at least one complete checkpoint, no ``metrics.json``  refused, with the advice to pass
                                                                     ``--resume-from-checkpoint last`` /
                                                                     only from its own checkpoints
finished      ``metrics.json`` (a run that ended)                    refused / only from its own checkpoints
foreign       anything a run does not write: other names, a          refused / refused
              checkpoint with ``trainer_state.json`` but no
              :data:`RUN_FILE` (a plain Trainer's), run-named
              entries without :data:`LOCK_FILE` (``save_adapter``'s)
============  =====================================================  ===================================

A run entry of the wrong kind (a symbolic link, ``adapter`` as a file) is refused before
the model loads.  A run owns its folder: :func:`claim_run_folder` takes an exclusive lock
on :data:`LOCK_FILE` inside it (released by the kernel if the process dies), so a second
run into the same folder is refused in one line; the file stays while the folder holds an
unfinished run's artifacts (it marks them as a run's) and goes when the run finishes.

A checkpoint is *complete* when it holds ``trainer_state.json`` and :data:`RUN_FILE`, which
:func:`run_recorder` writes after the Trainer has saved everything else.  :data:`RUN_FILE`
records what the checkpoint's weights depend on (model, rank, targets, alpha, SVD, dtypes,
quantization, a fingerprint of the base weights); resuming with any of them changed is
refused by :func:`check_resume_matches`.  Resuming into the folder a checkpoint belongs
to replaces that run's results (the same run, continued); resuming into another run's
folder is refused.  A failed run's leftovers are tidied by :func:`cleanup_failed_run`:
incomplete checkpoints go, an emptied ``checkpoints/`` goes, and a folder the run
created goes when nothing is left in it — so a failed run leaves either nothing, a
resumable checkpoint, or whole artifacts of an unfinished run, never a folder that
blocks the rerun; it removes only checkpoints this run created, never older ones.  Default folder names (``sorsa-output-<time>``) are claimed with an
exclusive ``mkdir`` and a ``-2``, ``-3`` … suffix, so two runs never share one.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..models.paths import check_on_disk
from .config import FinetuneConfig, check_writable

__all__ = [
    "RUN_FILE", "METRICS_FILE", "CHECKPOINTS", "RUN_ENTRIES", "RESUME_KEYS", "OutputState",
    "inspect_output_dir", "check_run_folder", "resolve_resume", "check_resume_matches",
    "claim_default_output_dir", "cleanup_failed_run", "base_fingerprint", "run_recorder",
    "LOCK_FILE", "RunLock", "claim_run_folder", "checkpoint_names",
]

RUN_FILE = "sorsa_run.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
#: Everything a run writes directly under its output folder.
RUN_ENTRIES = ("adapter", "base", "merged", METRICS_FILE, CHECKPOINTS)
#: The run's lock (and the mark that the folder's artifacts are a run's), hidden in the folder.
LOCK_FILE = ".sorsa-run.lock"
_DIRS = ("adapter", "base", "merged", CHECKPOINTS)
#: The settings a checkpoint's weights depend on; resuming with any of them changed is refused.
RESUME_KEYS = ("model", "rank", "target_modules", "alpha", "svd", "residual_dtype", "adapter_dtype", "quantize")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY = re.compile(r"^\.(adapter|base|merged|metrics\.json)\.(tmp|old)-\d+-[0-9a-f]+$")


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint the Trainer finished writing (and this package recorded)."""
    return (path / "trainer_state.json").is_file() and (path / RUN_FILE).is_file()


@dataclass
class OutputState:
    """What :func:`inspect_output_dir` found: the state name, complete checkpoints (oldest
    first), and the entries no run writes."""

    path: Path
    kind: str
    checkpoints: list[Path] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def _checkpoint_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def inspect_output_dir(path: Path) -> OutputState:
    """Sort ``path`` into absent / fresh / unfinished / resumable / finished / foreign (see the module doc)."""
    path = Path(path)
    if not path.exists():
        return OutputState(path, "absent")
    if not path.is_dir():
        raise ValueError(f"output folder {path} exists and is not a folder")
    names = sorted(os.listdir(path))
    _check_entry_kinds(path, names)
    owned = LOCK_FILE in names
    foreign = [n for n in names if n not in RUN_ENTRIES and n != LOCK_FILE and not _TEMPORARY.match(n)]
    checkpoints = [p for p in _checkpoint_dirs(path / CHECKPOINTS) if is_complete_checkpoint(p)]
    foreign += [f"{CHECKPOINTS}/{p.name} (no {RUN_FILE})" for p in _checkpoint_dirs(path / CHECKPOINTS)
                if not is_complete_checkpoint(p) and _foreign_checkpoint(p, owned)]
    artifacts = [n for n in ("adapter", "base", "merged") if n in names]
    if artifacts and not owned and METRICS_FILE not in names and not checkpoints:
        foreign += [f"{n}/ (not written by a run)" for n in artifacts]
    if foreign:
        kind = "foreign"
    elif METRICS_FILE in names:
        kind = "finished"
    elif checkpoints:
        kind = "resumable"
    elif any(n in names for n in ("adapter", "base", "merged")):
        kind = "unfinished"
    else:
        kind = "fresh"
    return OutputState(path, kind, checkpoints, foreign)


def _check_entry_kinds(path: Path, names: list[str]) -> None:
    """A run entry that is a symbolic link or of the wrong kind would only fail when the run
    saves, after training: refuse it now."""
    for n in names:
        if n not in RUN_ENTRIES:
            continue
        p = path / n
        want_dir = n in _DIRS
        if p.is_symlink():
            problem = "a symbolic link"
        elif want_dir and not p.is_dir():
            problem = "not a folder"
        elif not want_dir and not p.is_file():
            problem = "not a regular file"
        else:
            continue
        raise ValueError(f"output folder {path}: {n} is {problem}; a run writes {n}{'/' if want_dir else ''} "
                         "itself: remove it or choose another --output-dir")


def _foreign_checkpoint(ckpt: Path, owned: bool) -> bool:
    """An incomplete checkpoint that is someone else's: a plain Trainer's (``trainer_state.json``
    without :data:`RUN_FILE`), or any non-empty one in a folder no run has owned."""
    if (ckpt / "trainer_state.json").is_file():
        return True
    return not owned and any(ckpt.iterdir())


def resolve_resume(resume: str, out: Path, state: OutputState) -> Path:
    """The checkpoint folder ``--resume-from-checkpoint`` names (``last``: the newest complete one
    under ``out/checkpoints``), checked to be complete."""
    if resume == "last":
        if not state.checkpoints:
            raise ValueError(
                f"no complete checkpoint under {out / CHECKPOINTS} to resume from; "
                "run without --resume-from-checkpoint to start afresh"
            )
        return state.checkpoints[-1]
    ckpt = Path(resume)
    if not ckpt.is_dir():
        raise ValueError(f"checkpoint folder {ckpt} does not exist")
    if not (ckpt / "trainer_state.json").is_file():
        raise ValueError(f"{ckpt} is not a complete checkpoint (no trainer_state.json); "
                         f"pass a checkpoint-N folder under OUTPUT/{CHECKPOINTS}, or 'last'")
    if not (ckpt / RUN_FILE).is_file():
        raise ValueError(f"{ckpt} is not a complete sorsa-kernels checkpoint (no {RUN_FILE}); "
                         "it was cut off while saving or written by another program")
    return ckpt


def check_run_folder(out: Path, resume: Optional[str]) -> Optional[Path]:
    """Check that a run may write into ``out`` (see the module doc); returns the checkpoint to resume from."""
    out = Path(out)
    state = inspect_output_dir(out)
    check_writable(out)
    check_on_disk(out)
    if state.kind == "foreign":
        shown = ", ".join(state.foreign[:3]) + (" …" if len(state.foreign) > 3 else "")
        raise ValueError(f"output folder {out} already exists and is not empty (it holds {shown}, which a "
                         "finetune run does not write); choose another --output-dir")
    if resume is None:
        if state.kind == "resumable":
            raise ValueError(
                f"output folder {out} holds an unfinished run with checkpoint {state.checkpoints[-1].name}; "
                "continue it with --resume-from-checkpoint last, or choose another --output-dir"
            )
        if state.kind == "finished":
            raise ValueError(f"output folder {out} holds a finished run ({METRICS_FILE}); choose another --output-dir")
        return None
    ckpt = resolve_resume(resume, out, state)
    own = ckpt.resolve().parent == (out / CHECKPOINTS).resolve()
    if state.kind in ("finished", "resumable") and not own:
        what = "a finished run" if state.kind == "finished" else "another run's checkpoints"
        raise ValueError(f"output folder {out} holds {what}; resuming from {ckpt} writes only into that "
                         "checkpoint's own run folder or a new one: choose another --output-dir")
    return ckpt


def recorded_run(ckpt: Path) -> dict[str, Any]:
    """The :data:`RUN_FILE` of a checkpoint, or a ValueError naming it."""
    path = Path(ckpt) / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def run_settings(cfg: FinetuneConfig) -> dict[str, Any]:
    """The :data:`RESUME_KEYS` of a config, JSON-ready."""
    out = {k: getattr(cfg, k) for k in RESUME_KEYS}
    if out["target_modules"] is not None:
        out["target_modules"] = list(out["target_modules"])
    return out


def check_resume_matches(ckpt: Path, cfg: FinetuneConfig, fingerprint: Optional[str] = None) -> None:
    """Refuse to resume ``ckpt`` with settings (or, given ``fingerprint``, a base model) other than its own."""
    recorded = recorded_run(ckpt)
    saved = recorded.get("settings", {})
    now = run_settings(cfg)
    for key in RESUME_KEYS:
        if saved.get(key) != now[key]:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"cannot resume from {ckpt}: it was trained with {flag} {saved.get(key)!r}, "
                             f"this run has {flag} {now[key]!r}")
    if fingerprint is not None and recorded.get("base_fingerprint") not in (None, fingerprint):
        raise ValueError(f"cannot resume from {ckpt}: the base model's weights differ from those it was "
                         f"trained on ({cfg.model}); resume onto the same base")


def claim_default_output_dir(stem: Optional[str] = None) -> Path:
    """Create and return ``sorsa-output-<time>`` (``-2``, ``-3`` … if taken) with an exclusive ``mkdir``."""
    stem = stem or time.strftime("sorsa-output-%Y%m%d-%H%M%S")
    for i in itertools.count(1):
        path = Path(stem if i == 1 else f"{stem}-{i}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def checkpoint_names(out: Path) -> frozenset[str]:
    """The ``checkpoint-N`` folders under ``out/checkpoints`` now (taken before a run, so that
    :func:`cleanup_failed_run` never removes one the run did not create)."""
    return frozenset(p.name for p in _checkpoint_dirs(Path(out) / CHECKPOINTS))


def cleanup_failed_run(out: Path, created: bool, existing: frozenset[str] = frozenset()) -> None:
    """Tidy ``out`` after a failed run: drop the incomplete checkpoints it created (never one in
    ``existing``, the folders there before it started), an emptied ``checkpoints/``, its lock
    file when nothing of the run is left, and ``out`` itself when the run created it and
    nothing is left."""
    out = Path(out)
    ckpts = out / CHECKPOINTS
    try:
        for p in _checkpoint_dirs(ckpts):
            if not is_complete_checkpoint(p) and p.name not in existing:
                shutil.rmtree(p, ignore_errors=True)
        if ckpts.is_dir() and not any(ckpts.iterdir()):
            ckpts.rmdir()
        if out.is_dir() and [n for n in os.listdir(out) if n != LOCK_FILE] == []:
            (out / LOCK_FILE).unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    except OSError:
        pass  # best effort: never hide the error that ended the run


class RunLock:
    """An exclusive ``flock`` on ``out/LOCK_FILE`` held by this process (see :func:`claim_run_folder`)."""

    def __init__(self, out: Path, fd: int, created: bool) -> None:
        self.out, self.fd, self.created = Path(out), fd, created

    def release(self, finished: bool = False) -> None:
        """Let go of the folder; ``finished``: the run ended, so the mark goes too."""
        if self.fd < 0:
            return
        try:
            if finished:
                (self.out / LOCK_FILE).unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = -1


def claim_run_folder(out: Path) -> RunLock:
    """Create ``out`` if needed and lock it for this process, or raise a one-line ValueError
    when another run holds it.  The lock is the kernel's (``flock``): a killed run frees it.
    ``RunLock.created`` says whether this call made the folder."""
    import fcntl

    out = Path(out)
    try:
        out.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:  # a bare "[Errno 1] Operation not permitted: '/sys/x'" names neither side
        raise ValueError(f"output folder {out} cannot be created: {e.strerror or e}") from None
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ValueError(f"output folder {out} is in use by another run (pid {holder}); wait for it to "
                             "finish or choose another --output-dir") from None
        try:  # the holder before us may have removed the file as we opened it: lock the one in place
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return RunLock(out, fd, created)
        os.close(fd)


def base_fingerprint(model) -> str:
    """A short hash of a base model's weights: names, shapes, dtypes, each tensor's float64 sum
    (one read of every weight, no copy) and a strided sample of its values.  Equal bases give
    equal fingerprints; a base changed anywhere (another fine-tune, other pretraining) differs."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            if p.device.type == "meta" or p.numel() == 0:
                continue
            h.update(repr(float(torch.sum(p.detach(), dtype=torch.float64))).encode())
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            h.update(flat[::step][:1024].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def run_recorder(cfg: FinetuneConfig, fingerprint: str):
    """A Trainer callback that writes :data:`RUN_FILE` into each checkpoint once the Trainer
    has saved everything else (so its presence marks a complete checkpoint)."""
    from transformers import TrainerCallback

    from ...adapters.atomic import atomic_write_text

    record = {"settings": run_settings(cfg), "base_fingerprint": fingerprint}

    class RunRecorder(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    atomic_write_text(ckpt / RUN_FILE, json.dumps(dict(record, step=state.global_step), indent=2))
            return control

    return RunRecorder()
