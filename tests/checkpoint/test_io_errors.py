"""I/O failures of checkpoint writes and reads, under real file-system conditions.

A write that cannot succeed raises CheckpointWriteError (a CheckpointError and an OSError) naming
the file, the cause's errno name and what to do; causes known up front fail before anything is
written, and the previous file always survives. The conditions are real: a folder as the target,
a path through a file, a folder without write permission, a read-only bind mount and a full tmpfs
(in a user namespace), a file-size limit (RLIMIT_FSIZE), and a file-like object whose ``write``
raises ENOSPC. Reading opens the file once, so a rename over it mid-read changes nothing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import medfunc as mf
from medfunc.atomic import atomic_replace, atomic_write, pending_temporaries, temporary_path
from medfunc.checkpoint import reading, saving
from medfunc.errors import CheckpointError, CheckpointWriteError

ROOT = Path(__file__).resolve().parents[2]


def _state(width: int = 4) -> mf.TrainState:
    torch.manual_seed(width)
    return mf.init_state(torch.nn.Linear(width, 2), mf.optim.adamw(1e-3))


def _assert_write_error(error: CheckpointWriteError, path: Path, name: str, advice: str) -> None:
    assert isinstance(error, CheckpointError) and isinstance(error, OSError)
    assert error.errno == getattr(errno, name)
    assert error.filename == str(path)
    message = str(error)
    assert str(path) in message and name in message and advice in message


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------
# causes known up front: nothing is written, nothing is serialised


def test_a_folder_as_target_fails_before_the_writer_runs(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.mkdir()
    (target / "inside.txt").write_text("keep")
    calls = []
    with pytest.raises(CheckpointWriteError) as raised:
        atomic_write(target, lambda handle: calls.append(handle))
    _assert_write_error(raised.value, target, "EISDIR", "pass the path of a file inside it")
    assert calls == []
    assert _listing(tmp_path) == ["ckpt.pt"] and _listing(target) == ["inside.txt"]


def test_save_state_onto_a_folder_fails_before_the_state_is_serialised(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(saving, "build_payload", lambda *args: built.append(args))
    with pytest.raises(CheckpointWriteError) as raised:
        mf.save_state(_state(), tmp_path)
    _assert_write_error(raised.value, tmp_path, "EISDIR", "e.g. ")
    assert built == [] and _listing(tmp_path) == []


def test_a_folder_that_cannot_be_created_fails_before_anything_is_written(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where a folder is needed")
    target = blocker / "exp1" / "ckpt.pt"
    with pytest.raises(CheckpointWriteError) as raised:
        mf.save_state(_state(), target)
    _assert_write_error(raised.value, target, "ENOTDIR", "is a file, not a folder")
    assert "Nothing was written" in str(raised.value)
    assert (
        _listing(tmp_path) == ["runs"] and blocker.read_text() == "a file where a folder is needed"
    )


def test_moving_a_finished_file_onto_a_folder_names_the_folder_and_keeps_the_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.mkdir()
    staged = temporary_path(target)
    staged.write_bytes(b"exported")
    with pytest.raises(CheckpointWriteError) as raised:
        atomic_replace(staged, target)
    _assert_write_error(raised.value, target, "EISDIR", "pass the path of a file")
    assert staged.read_bytes() == b"exported" and target.is_dir()


# ------------------------------------------------------------------------------------------------
# a full disk while writing: the error names it, the old file survives, no temporary is left


class _DiskThatFillsUp:
    """A binary file-like object over ``handle`` that has ``room`` bytes, then fails as a full
    disk does (``OSError(ENOSPC)`` from ``write``)."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.handle.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def test_enospc_inside_torch_save_names_path_cause_and_advice_and_keeps_the_old_file(tmp_path):
    path = mf.save_state(_state(), tmp_path / "ckpt.pt")
    old = path.read_bytes()
    payload = {"w": torch.zeros(100_000)}

    def write(handle):
        torch.save(payload, _DiskThatFillsUp(handle, room=4096))

    with pytest.raises(CheckpointWriteError) as raised:
        atomic_write(path, write)
    _assert_write_error(raised.value, path, "ENOSPC", "free space on it")
    assert "the existing ckpt.pt is unchanged" in str(raised.value)
    assert "unexpected pos" in str(raised.value.__cause__)  # torch's own report stays chained
    assert path.read_bytes() == old
    assert pending_temporaries(path) == [] and _listing(tmp_path) == ["ckpt.pt"]
    assert int(mf.read_checkpoint(path)["trainer_state"]["global_step"]) == 0


def test_enospc_raised_by_the_writer_itself_is_reported_the_same_way(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")

    def write(handle):
        handle.write(b"half of the new content")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as raised:  # callers catching OSError keep working
        atomic_write(path, write)
    _assert_write_error(raised.value, path, "ENOSPC", "save to a folder on another disk")
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["weights.bin"]


def test_a_writers_unrelated_os_error_propagates_unchanged(tmp_path):
    def write(handle):
        Path(tmp_path / "missing-input.bin").read_bytes()

    with pytest.raises(FileNotFoundError) as raised:
        atomic_write(tmp_path / "out.bin", write)
    assert not isinstance(raised.value, CheckpointWriteError)
    assert _listing(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# real kernel conditions, in a child process: a file-size limit, no write permission, a
# read-only file system, a full tmpfs

_CHILD = """
import errno, json, resource, signal, sys
from pathlib import Path
import torch
import medfunc as mf
from medfunc.errors import CheckpointWriteError

path, small_first, fsize = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
def state(width):
    torch.manual_seed(width)
    return mf.init_state(torch.nn.Linear(width, 2), mf.optim.adamw(1e-3))
if small_first:
    mf.save_state(state(4), path)
if fsize:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
result = {"raised": None}
try:
    mf.save_state(state(4000), path)
except CheckpointWriteError as error:
    result = {"raised": type(error).__name__, "errno": errno.errorcode[error.errno],
              "message": str(error), "is_oserror": isinstance(error, OSError)}
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
result["left"] = sorted(p.name for p in path.parent.iterdir())
if path.exists():
    result["old_weight"] = mf.read_checkpoint(path)["model_state"]["weight"].tolist()
print(json.dumps(result))
"""


def _child(path: Path, *, small_first: bool, fsize: int = 0, prefix: tuple = ()) -> dict:
    command = [*prefix, sys.executable, "-c", _CHILD, str(path), str(int(small_first)), str(fsize)]
    done = subprocess.run(
        command,
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _in_namespace(setup: str) -> tuple:
    """A prefix running a command in a new user and mount namespace after shell ``setup``."""
    return (
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        f'{setup} && exec "$@"',
        "sh",
    )


@pytest.fixture(scope="module")
def namespaces() -> None:
    """Skip unless this machine lets an unprivileged user and mount namespace mount file systems
    (user namespaces disabled, no ``unshare``, a container without the permission)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs `unshare` (util-linux) to mount a read-only bind or a small tmpfs")
    probe = subprocess.run(
        [*_in_namespace("mount -t tmpfs -o size=4k tmpfs /mnt"), "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"user namespaces cannot mount here: {probe.stderr.strip()[:200]}")


def _old_weight() -> list:
    return _state(4).params["weight"].tolist()


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE is POSIX-only")
def test_a_file_size_limit_hit_mid_save_raises_efbig_and_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    # the small checkpoint takes about 3 KB, the large one about 35 KB: the limit falls between
    result = _child(path, small_first=True, fsize=16384)
    assert result["raised"] == "CheckpointWriteError" and result["is_oserror"]
    assert result["errno"] == "EFBIG"
    assert (
        str(path) in result["message"]
        and "save to a folder on another file system" in (result["message"])
    )
    assert result["left"] == ["ckpt.pt"] and result["old_weight"] == _old_weight()


def test_a_folder_without_write_permission_raises_eacces_before_anything_is_written(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    path = mf.save_state(_state(), folder / "ckpt.pt")
    old = path.read_bytes()
    folder.chmod(0o500)
    try:
        if os.geteuid() != 0:
            with pytest.raises(CheckpointWriteError) as raised:
                mf.save_state(_state(4000), path)
            _assert_write_error(raised.value, path, "EACCES", "save to a folder you can write")
            assert "Nothing was written" in str(raised.value)
        else:
            # root ignores permission bits: run the save as root without CAP_DAC_OVERRIDE
            if shutil.which("setpriv") is None:
                pytest.skip("running as root and `setpriv` is missing to drop CAP_DAC_OVERRIDE")
            caps = "-dac_override,-dac_read_search"
            prefix = ("setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}")
            result = _child(path, small_first=False, prefix=prefix)
            assert result["raised"] == "CheckpointWriteError" and result["errno"] == "EACCES"
            assert str(path) in result["message"]
            assert "save to a folder you can write" in result["message"]
            assert "Nothing was written" in result["message"]
    finally:
        folder.chmod(0o700)
    assert path.read_bytes() == old and _listing(folder) == ["ckpt.pt"]


def test_a_read_only_file_system_raises_erofs_and_a_stray_temporary_does_not_mask_it(
    tmp_path, namespaces
):
    folder = tmp_path / "archive"
    folder.mkdir()
    path = mf.save_state(_state(), folder / "ckpt.pt")
    old = path.read_bytes()
    stray = folder / ".ckpt.pt.tmp-999999999-0123abcd"  # a dead process's, removable if writable
    stray.write_bytes(b"partial")
    setup = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"
    result = _child(path, small_first=False, prefix=_in_namespace(setup))
    assert result["raised"] == "CheckpointWriteError" and result["errno"] == "EROFS"
    assert str(path) in result["message"] and "read-only file system" in result["message"]
    assert "Nothing was written" in result["message"]
    assert path.read_bytes() == old and _listing(folder) == sorted(["ckpt.pt", stray.name])


def test_a_full_tmpfs_raises_enospc_mid_save_and_keeps_the_old_checkpoint(tmp_path, namespaces):
    folder = tmp_path / "small-disk"
    folder.mkdir()
    path = folder / "ckpt.pt"
    # room for the small checkpoint (about 3 KB), not for the large one (about 35 KB)
    setup = f"mount -t tmpfs -o size=16k tmpfs {folder}"
    result = _child(path, small_first=True, prefix=_in_namespace(setup))
    assert result["raised"] == "CheckpointWriteError" and result["errno"] == "ENOSPC"
    assert str(path) in result["message"] and "free space on it" in result["message"]
    assert "the existing ckpt.pt is unchanged" in result["message"]
    assert result["left"] == ["ckpt.pt"] and result["old_weight"] == _old_weight()


# ------------------------------------------------------------------------------------------------
# reading opens the file once: a rename over it during the read changes nothing


@pytest.mark.parametrize("after", ["_check_magic", "_verify_archive"])
@pytest.mark.parametrize("mmap", [False, True])
def test_a_checkpoint_replaced_during_a_read_is_read_as_it_was_checked(
    tmp_path, monkeypatch, after, mmap
):
    path = mf.save_state(_state(), tmp_path / "ckpt.pt", extra={"epoch": 1})
    newer = mf.save_state(_state(), tmp_path / "newer.pt", extra={"epoch": 2})
    damaged = bytearray(newer.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # what a reader must never load unchecked
    newer.write_bytes(bytes(damaged))
    check = getattr(reading, after)

    def check_then_replace(*args):
        check(*args)
        os.replace(newer, path)  # a writer renames its file over the one being read

    monkeypatch.setattr(reading, after, check_then_replace)
    payload = reading.read_payload(path, "cpu", mmap=mmap)
    assert payload["trainer_state"]["epoch"] == 1
    assert not newer.exists() and path.read_bytes() == bytes(damaged)
