import errno
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from sorsa_kernels.adapters import atomic
from sorsa_kernels.adapters.atomic import (
    atomic_dir,
    atomic_file,
    atomic_write_text,
    default_mode,
    recover,
)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def _siblings(parent):
    return sorted(p.name for p in parent.iterdir())


def test_atomic_dir_publishes_new_folder(tmp_path):
    final = tmp_path / "sub" / "out"
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".out.tmp-") and not final.exists()
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new"
    assert _siblings(final.parent) == ["out"]


def test_atomic_dir_replaces_existing_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _siblings(final) == ["new.txt"]
    assert _siblings(tmp_path) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_atomic_dir_replace_works_with_and_without_exchange(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _siblings(final) == ["new.txt"] and _siblings(tmp_path) == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_atomic_dir_failure_keeps_previous_folder(tmp_path, exc):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("old")
    with pytest.raises(type(exc)):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("new")
            raise exc
    assert (final / "a.txt").read_text() == "old"
    assert _siblings(tmp_path) == ["out"]


def test_atomic_dir_full_disk_mid_write_keeps_previous_and_leaves_no_half_folder(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "weights.bin").write_bytes(b"old")

    def write_weights_full_disk(path):
        with open(path, "wb") as f:
            f.write(b"ne")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info:
        with atomic_dir(final) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            write_weights_full_disk(tmp / "weights.bin")
    assert info.value.errno == errno.ENOSPC
    assert (final / "config.json").read_text() == "{}" and (final / "weights.bin").read_bytes() == b"old"
    assert _siblings(tmp_path) == ["out"]


def test_atomic_dir_full_disk_on_fresh_path_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(OSError):
        with atomic_dir(final) as tmp:
            (tmp / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert _siblings(tmp_path) == []


def test_atomic_dir_replace_false_refuses_existing(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    with pytest.raises(FileExistsError, match="out already exists"):
        with atomic_dir(final, replace=False) as tmp:
            (tmp / "a").write_text("x")
    assert _siblings(final) == [] and _siblings(tmp_path) == ["out"]


def test_atomic_dir_refuses_to_replace_a_file(tmp_path):
    final = tmp_path / "out"
    final.write_text("file")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        with atomic_dir(final):
            pass
    assert final.read_text() == "file"


def test_atomic_file_publishes_and_replaces(tmp_path):
    final = tmp_path / "m.json"
    atomic_write_text(final, "old")
    with atomic_file(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new" and _siblings(tmp_path) == ["m.json"]


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["enospc", "ctrl-c"])
def test_atomic_file_failure_keeps_previous(tmp_path, exc):
    final = tmp_path / "m.json"
    atomic_write_text(final, "old")
    with pytest.raises(type(exc)):
        with atomic_file(final) as tmp:
            tmp.write_text("ne")
            raise exc
    assert final.read_text() == "old" and _siblings(tmp_path) == ["m.json"]


def test_modes_follow_umask_not_tempfile_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_file(tmp_path / "g.bin") as tmp:
            with open(tmp, "wb") as f:  # a writer that truncates keeps the mode
                f.write(b"x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner.txt").write_text("x")
        assert default_mode() == 0o644 and default_mode(directory=True) == 0o755
        assert _mode(tmp_path / "f.txt") == 0o644
        assert _mode(tmp_path / "g.bin") == 0o644
        assert _mode(tmp_path / "d") == 0o755
        assert _mode(tmp_path / "d" / "inner.txt") == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert _mode(tmp_path / "private.txt") == 0o600
    finally:
        os.umask(old)


def test_modes_are_normalized_for_writers_that_use_their_own_tempfile(tmp_path):
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(3)}, tmp)  # safetensors replaces the file with a 0600 one
        with atomic_dir(tmp_path / "d") as tmp:
            save_file({"a": torch.zeros(3)}, tmp / "w.safetensors")
        assert _mode(tmp_path / "w.safetensors") == 0o644
        assert _mode(tmp_path / "d" / "w.safetensors") == 0o644
    finally:
        os.umask(old)


def test_atomic_dir_refuses_the_working_folder_and_symlinks(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(NotADirectoryError, match="is a symbolic link"):
        with atomic_dir(tmp_path / "link"):
            pass
    monkeypatch.chdir(tmp_path / "real")
    for target in (".", tmp_path):
        with pytest.raises(ValueError, match="current working folder"):
            with atomic_dir(target):
                pass
    assert (tmp_path / "real").is_dir() and _siblings(tmp_path) == ["link", "real"]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_recover_removes_temporaries_of_dead_writers_only(tmp_path):
    final = tmp_path / "out"
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".out.tmp-{dead}-abcd1234").mkdir()
    (tmp_path / f".out.tmp-{alive}-abcd1234").mkdir()
    (tmp_path / ".other.tmp-1-abcd1234").mkdir()
    recover(final)
    assert _siblings(tmp_path) == [".other.tmp-1-abcd1234", f".out.tmp-{alive}-abcd1234"]


def test_recover_restores_folder_left_aside_by_a_kill(tmp_path):
    final = tmp_path / "out"
    aside = tmp_path / f".out.old-{_dead_pid()}-00ff00ff"
    aside.mkdir()
    (aside / "a.txt").write_text("old")
    recover(final)
    assert (final / "a.txt").read_text() == "old" and _siblings(tmp_path) == ["out"]


def test_sigkill_mid_write_leaves_previous_folder_and_next_write_cleans_up(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    script = textwrap.dedent(f"""
        import os, signal
        from sorsa_kernels.adapters.atomic import atomic_dir
        with atomic_dir({str(final)!r}) as tmp:
            (tmp / "a.txt").write_text("new")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=os.getcwd())
    assert proc.returncode == -9
    assert (final / "a.txt").read_text() == "old"
    assert len(_siblings(tmp_path)) == 2  # the killed writer's temporary is left behind ...
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("newer")
    assert _siblings(tmp_path) == ["out"]  # ... and removed by the next write
