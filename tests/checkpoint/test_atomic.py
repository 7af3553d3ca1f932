"""Atomic files: content, permissions, failures that leave the old file, stray temporaries."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import torch

from medfunc.atomic import (
    atomic_replace,
    atomic_write,
    pending_temporaries,
    remove_stray_temporaries,
    temporary_path,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def strict_umask():
    """A umask that would hide group and other bits: the mode must not depend on it."""
    previous = os.umask(0o077)
    yield
    os.umask(previous)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_writes_the_content_with_mode_0o644_and_creates_folders(tmp_path, strict_umask):
    path = tmp_path / "a" / "b" / "weights.bin"
    atomic_write(path, lambda handle: handle.write(b"new"))
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["weights.bin"]


def test_mode_is_the_one_asked_for(tmp_path):
    path = tmp_path / "secret.bin"
    atomic_write(path, lambda handle: handle.write(b"x"), mode=0o600)
    assert _mode(path) == 0o600


def test_torch_save_writes_into_the_handle(tmp_path):
    path = tmp_path / "t.pt"
    atomic_write(path, lambda handle: torch.save({"w": torch.arange(4)}, handle))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4))


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)

    def half_then_fail(handle):
        handle.write(b"partial new content")
        raise ValueError("disk said no")

    with pytest.raises(ValueError, match="disk said no"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert _mode(path) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_failing_cleanup_never_hides_the_writers_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")

    def block_the_cleanup_then_fail(handle):
        os.unlink(handle.name)
        os.mkdir(handle.name)  # unlinking a folder fails, so removing the temporary fails
        raise KeyError("the writer's own error")

    with pytest.raises(KeyError, match="the writer's own error"):
        atomic_write(path, block_the_cleanup_then_fail)
    assert path.read_bytes() == b"old"


def test_stray_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = tmp_path / f".ckpt.pt.tmp-{_dead_pid()}-0123abcd"
    ours = tmp_path / f".old.pt.tmp-{os.getpid()}-89abcdef"  # no write of ours owns it
    alive = tmp_path / f".ckpt.pt.tmp-{os.getppid()}-fedcba98"
    unrelated = tmp_path / ".notes.tmp"
    for file in (dead, ours, alive, unrelated):
        file.write_bytes(b"partial")
    folder_like = tmp_path / f".export.onnx.tmp-{_dead_pid()}-00ff00ff"
    folder_like.mkdir()
    atomic_write(tmp_path / "ckpt.pt", lambda handle: handle.write(b"new"))
    assert not dead.exists() and not ours.exists()
    assert alive.exists() and unrelated.exists() and folder_like.is_dir()
    assert (tmp_path / "ckpt.pt").read_bytes() == b"new"


def test_remove_stray_temporaries_alone_and_pending_temporaries(tmp_path):
    path = tmp_path / "ckpt.pt"
    assert pending_temporaries(path) == []
    assert pending_temporaries(tmp_path / "missing" / "ckpt.pt") == []
    dead = tmp_path / f".ckpt.pt.tmp-{_dead_pid()}-0123abcd"
    alive = tmp_path / f".ckpt.pt.tmp-{os.getppid()}-fedcba98"
    other = tmp_path / f".other.pt.tmp-{os.getppid()}-fedcba98"
    for file in (dead, alive, other):
        file.write_bytes(b"partial")
    assert pending_temporaries(path) == sorted([dead, alive])
    remove_stray_temporaries(tmp_path)
    assert pending_temporaries(path) == [alive]


def test_temporary_path_is_beside_the_file_with_pid_and_random_suffix(tmp_path):
    first, second = temporary_path(tmp_path / "m.pt"), temporary_path(tmp_path / "m.pt")
    assert first.parent == tmp_path and first != second
    assert first.name.startswith(f".m.pt.tmp-{os.getpid()}-")


def test_atomic_replace_moves_a_finished_file_over_the_target(tmp_path, strict_umask):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    staged = temporary_path(target)
    staged.write_bytes(b"exported")
    atomic_replace(staged, target)
    assert target.read_bytes() == b"exported" and _mode(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
