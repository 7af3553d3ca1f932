"""Atomic files: a reader sees the old file or the complete new one, never a partial one.

Every file medfunc writes for later reading (checkpoints, exported models, the Trainer's weights
file) goes through :func:`atomic_write` or :func:`atomic_replace`. The new content is written to a
temporary ``.{name}.tmp-<pid>-<random>`` in the target's folder, flushed and fsynced, renamed over
the target with ``os.replace`` and the folder is fsynced, so the rename survives a power loss.

The writer's pid in the temporary's name lets a later write remove the temporaries of processes
that died mid-write (:func:`remove_stray_temporaries`); temporaries of running processes are kept.

Example:
    >>> atomic_write("run/notes.txt", lambda handle: handle.write(b"step 100\\n"))
    >>> Path("run/notes.txt").read_bytes()
    b'step 100\\n'
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_replace",
    "atomic_write",
    "fsync_folder",
    "pending_temporaries",
    "remove_stray_temporaries",
    "temporary_path",
]

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")

# Temporaries this process is writing now, so a concurrent write's cleanup in another thread
# leaves them alone (a write registers its temporary before creating it).
_active_temporaries: set[str] = set()
_temporaries_lock = threading.Lock()


def temporary_path(path: str | os.PathLike) -> Path:
    """The name of a fresh temporary for ``path``: same folder, this process's pid, random suffix.

    Args:
        path: the file the temporary will replace.

    Returns:
        ``{folder}/.{name}.tmp-<pid>-<8 hex digits>``; nothing is created.

    Example:
        >>> temporary_path("run/ckpt.pt").name
        '.ckpt.pt.tmp-...-...'
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to someone else, or cannot be probed: keep its file
    return True


def _unlink(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove_stray_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files in ``folder`` that no write will finish.

    Those are the temporaries of processes that no longer run, and those of this process that no
    write in progress owns. Temporaries of other running processes are kept; folders are kept.

    Args:
        folder: the folder to clean.

    Returns:
        None.

    Example:
        >>> Path("run").mkdir()
        >>> stray = temporary_path("run/ckpt.pt")  # this process's, but no write owns it
        >>> _ = stray.write_bytes(b"half a checkpoint")
        >>> remove_stray_temporaries("run")
        >>> stray.exists()
        False
    """
    for entry in os.scandir(folder):
        match = _TEMPORARY.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        if pid != os.getpid():
            if not _pid_running(pid):
                _unlink(entry.path)
            continue
        with _temporaries_lock:
            if os.path.realpath(entry.path) not in _active_temporaries:
                _unlink(entry.path)


def pending_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporaries of writes to ``path`` that are in progress or never finished.

    Args:
        path: the file the writes target.

    Returns:
        The temporaries' paths, sorted; empty when the folder does not exist.

    Example:
        >>> pending_temporaries("run/ckpt.pt")
        []
        >>> Path("run").mkdir()
        >>> stray = temporary_path("run/ckpt.pt")
        >>> _ = stray.write_bytes(b"half a checkpoint")
        >>> pending_temporaries("run/ckpt.pt") == [stray]
        True
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}.tmp-"
    return sorted(
        path.parent / name
        for name in os.listdir(path.parent)
        if name.startswith(prefix) and _TEMPORARY.match(name)
    )


def fsync_folder(folder: str | os.PathLike) -> None:
    """Persist the folder's entries (a rename into it) to disk.

    Args:
        folder: the folder; platforms that cannot open a folder (Windows) persist renames
            themselves, and there this does nothing.

    Returns:
        None.

    Example:
        >>> fsync_folder(".")
    """
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush a file another library wrote (and closed) to disk, where the platform allows."""
    with contextlib.suppress(OSError):  # Windows cannot fsync a read-only descriptor
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard(temporary: Path) -> None:
    """Remove a failed write's temporary; a failure to remove it must not hide the write's."""
    with contextlib.suppress(OSError):
        _unlink(temporary)


def atomic_write(
    path: str | os.PathLike, write: Callable[[BinaryIO], None], *, mode: int = 0o644
) -> None:
    """Write a file atomically: ``write`` fills a temporary that then replaces ``path``.

    Missing folders are created and stray temporaries in the folder are removed first (see
    :func:`remove_stray_temporaries`). The temporary is flushed, fsynced, given the permissions
    ``mode`` and renamed over ``path``; then the folder is fsynced. If anything fails, ``path``
    keeps its old content, the temporary is removed and the original error propagates.

    Args:
        path: the file to write.
        write: called once with the temporary opened for binary writing; it must not close it.
        mode: the file's permission bits (not reduced by the umask).

    Returns:
        None.

    Example:
        >>> atomic_write("run/ckpt.pt", lambda handle: torch.save({"step": 3}, handle))
        >>> torch.load("run/ckpt.pt")
        {'step': 3}
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_stray_temporaries(folder)
    temporary = temporary_path(path)
    key = os.path.realpath(temporary)
    with _temporaries_lock:
        _active_temporaries.add(key)
    try:
        with open(temporary, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        _discard(temporary)
        raise
    finally:
        with _temporaries_lock:
            _active_temporaries.discard(key)
    fsync_folder(folder)


def atomic_replace(src: str | os.PathLike, dst: str | os.PathLike, *, mode: int = 0o644) -> None:
    """Move a finished file over ``dst`` atomically: fsync it, set ``mode``, rename, fsync folder.

    For files another library writes by name (an exporter); ``src`` should be a
    :func:`temporary_path` of ``dst`` or lie in ``dst``'s folder, so the rename is atomic.

    Args:
        src: the complete file; it is gone afterwards.
        dst: the file to replace.
        mode: the file's permission bits (not reduced by the umask).

    Returns:
        None.

    Example:
        >>> staged = temporary_path("model.pt")
        >>> torch.save(torch.nn.Linear(4, 2).state_dict(), str(staged))  # e.g. an exporter
        >>> atomic_replace(staged, "model.pt")
        >>> staged.exists(), sorted(torch.load("model.pt"))
        (False, ['bias', 'weight'])
    """
    src, dst = Path(src), Path(dst)
    _fsync_file(src)
    os.chmod(src, mode)
    os.replace(src, dst)
    fsync_folder(dst.parent)
