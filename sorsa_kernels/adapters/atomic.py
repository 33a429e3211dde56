"""Transactional artifacts: write to a temporary sibling, publish with one rename.

Every output of the package (adapter, PEFT export, base/merged model, metrics) is
written with one of these, so a crash, a ``KeyboardInterrupt`` or a full disk leaves
either the previous artifact or the new one at the final path, never a half-written one:

* :func:`atomic_dir` yields a fresh empty folder ``.{name}.tmp-{pid}-XXXX`` beside the
  final path; when the block ends normally every file in it is fsynced and the folder is
  published by a rename.  An existing folder at the final path is swapped out atomically
  (``renameat2(RENAME_EXCHANGE)`` on Linux) and then deleted; where the exchange is not
  supported, it is renamed aside to ``.{name}.old-{pid}-XXXX`` first, the new folder
  renamed in, and the old one deleted (a crash in that short window leaves the old
  folder aside, which :func:`recover` puts back).
* :func:`atomic_file` does the same for one file, published with :func:`os.replace`.
* :func:`atomic_write_text` / :func:`atomic_write_bytes` are one-line conveniences.

On any exception inside the block (``BaseException`` included) the temporary is removed
and the final path is left untouched.  A process killed by SIGKILL cannot clean up: its
temporary stays behind as a hidden sibling, which :func:`recover` (called at the start of
every :func:`atomic_dir`/:func:`atomic_file`) removes once the process that made it is gone.

Published files and folders get the modes a plain ``open``/``mkdir`` would give:
``0666``/``0777`` masked by the process umask (``0644``/``0755`` under the common umask
022).  Modes are normalized at publication, because writers that go through a temporary
file of their own (safetensors' ``save_file`` does) leave :mod:`tempfile`'s ``0600``.

Example::

    >>> with atomic_dir(Path("out/merged")) as tmp:
    ...     model.save_pretrained(tmp)
    ...     tokenizer.save_pretrained(tmp)
    >>> atomic_write_text(Path("out/metrics.json"), json.dumps(metrics))
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_dir", "atomic_file", "atomic_write_bytes", "atomic_write_text", "recover", "default_mode"]

PathLike = Union[str, os.PathLike]

_TMP = "tmp"
_OLD = "old"


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # not thread-safe, hence only a fallback
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give: ``0o666``/``0o777`` minus the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a folder
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath), directory=True)


def _normalize_modes(root: Path) -> None:
    """Give every file ``0666 & ~umask`` and every folder ``0777 & ~umask`` (execute bits kept)."""
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    if root.is_dir():
        for dirpath, _, filenames in os.walk(root):
            os.chmod(dirpath, dir_mode)
            for name in filenames:
                p = Path(dirpath, name)
                if not p.is_symlink():
                    os.chmod(p, file_mode | (stat.S_IMODE(os.stat(p).st_mode) & 0o111 & dir_mode))
    else:
        os.chmod(root, file_mode)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
try:
    _renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
except OSError:  # no C library to load (not Linux/glibc)
    pass


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b`` (both must exist); False where the OS cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(final: PathLike) -> None:
    """Clean up after a process killed while writing ``final``.

    Removes ``.{name}.tmp-*`` siblings whose writing process is gone, and, if ``final``
    is missing, restores a ``.{name}.old-*`` sibling left by a kill between the two
    renames of the non-exchange fallback (otherwise such leftovers are removed).
    Temporaries of live processes (another writer) are never touched.
    """
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.({_TMP}|{_OLD})-(\d+)-[0-9a-f]+$")
    for entry in sorted(parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == _OLD and not os.path.lexists(final):
            os.rename(entry, final)
        else:
            _remove(entry)


def _publish(tmp: Path, final: Path, replace: bool, is_dir: bool) -> None:
    """Move the finished ``tmp`` to ``final`` in one step."""
    if not is_dir:
        if not replace and os.path.lexists(final):
            raise FileExistsError(f"{final} already exists; refusing to replace it")
        os.replace(tmp, final)
    elif not os.path.lexists(final):
        os.rename(tmp, final)  # fails with ENOTEMPTY/EEXIST if someone created it meanwhile
    elif not replace:
        raise FileExistsError(f"{final} already exists; refusing to replace it")
    elif not final.is_dir() or final.is_symlink():
        raise NotADirectoryError(f"{final} exists and is not a folder; cannot replace it with a folder")
    elif _exchange(tmp, final):
        _remove(tmp)  # now holds the previous folder
    else:
        aside = _sibling(final, _OLD)
        os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(aside, final)
            raise
        _remove(aside)
    _fsync_path(final.parent, directory=True)


@contextlib.contextmanager
def _staged(tmp: Path, final: Path, *, replace: bool, fsync: bool, is_dir: bool) -> Iterator[Path]:
    """Yield ``tmp``; when the block succeeds, normalize its modes, fsync it and publish it as
    ``final``; when anything fails, remove it and re-raise (``final`` untouched)."""
    try:
        yield tmp
        _normalize_modes(tmp)
        if fsync:
            (_fsync_tree if is_dir else _fsync_path)(tmp)
        _publish(tmp, final, replace, is_dir=is_dir)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: PathLike, *, replace: bool = True, fsync: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``final`` when the block succeeds.

    The temporary is a hidden sibling of ``final`` (same file system, so the publishing
    rename is atomic); the parent is created if needed.  On success every file is
    fsynced and the folder renamed to ``final``, atomically replacing an existing folder
    (``replace=False`` raises :class:`FileExistsError` instead).  On any exception,
    ``KeyboardInterrupt`` included, the temporary is deleted and ``final`` is untouched.

    Example::

        >>> with atomic_dir("out/adapter") as tmp:
        ...     save_file(tensors, tmp / "adapter.safetensors")
    """
    final = Path(os.path.abspath(final))  # "." and ".." have no name to put a sibling beside
    if final.is_symlink():
        raise NotADirectoryError(f"{final} is a symbolic link; pass the folder it points to")
    if os.path.lexists(final) and not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a folder; cannot replace it with a folder")
    cwd = Path.cwd()
    if final == cwd or final in cwd.parents:
        raise ValueError(f"{final} is (or contains) the current working folder; write to a subfolder instead")
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = _sibling(final, _TMP)
    os.mkdir(tmp, default_mode(directory=True))
    with _staged(tmp, final, replace=replace, fsync=fsync, is_dir=True) as path:
        yield path


@contextlib.contextmanager
def atomic_file(final: PathLike, *, replace: bool = True, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path; write the file there and it becomes ``final`` on success.

    The temporary file already exists (empty), so writers may open it for writing or
    replace it.  On success its mode is set to ``0666 & ~umask``, it is fsynced and moved over
    ``final`` with :func:`os.replace`; on any exception it is removed and ``final`` is
    untouched.

    Example::

        >>> with atomic_file("out/metrics.json") as tmp:
        ...     tmp.write_text(json.dumps(metrics))
    """
    final = Path(os.path.abspath(final))
    if final.is_dir():
        raise IsADirectoryError(f"{final} is a folder; cannot replace it with a file")
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = _sibling(final, _TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # open() applies the umask
    os.close(fd)
    with _staged(tmp, final, replace=replace, fsync=fsync, is_dir=False) as path:
        yield path


def atomic_write_bytes(final: PathLike, data: bytes, *, replace: bool = True) -> Path:
    """Write ``data`` to ``final`` atomically (see :func:`atomic_file`); returns ``final``."""
    with atomic_file(final, replace=replace) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(final)


def atomic_write_text(final: PathLike, text: str, *, replace: bool = True, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``final`` atomically (see :func:`atomic_file`); returns ``final``."""
    return atomic_write_bytes(final, text.encode(encoding), replace=replace)
