"""Atomic files: a reader sees the old file or the complete new one, never a partial one.

Every file medfunc writes for later reading (checkpoints, exported models, the Trainer's weights
file) goes through :func:`atomic_write` or :func:`atomic_replace`. The new content is written to a
temporary ``.{name}.tmp-<pid>-<random>`` in the target's folder, flushed and fsynced, renamed over
the target with ``os.replace`` and the folder is fsynced, so the rename survives a power loss.

The writer's pid in the temporary's name lets a later write remove the temporaries of processes
that died mid-write (:func:`remove_stray_temporaries`); temporaries of running processes are kept.

A write that cannot succeed raises :class:`~medfunc.errors.CheckpointWriteError` (also an
``OSError``) naming the file, the cause (``ENOSPC``, ``EACCES``, ``EROFS``, ``EISDIR``, ...) and
what to do. Causes that can be known up front (the target is a folder, its folder is read-only,
not writable or cannot be created) are checked before anything is written
(:func:`ensure_writable`); the others (a full disk) surface while writing, and the partly written
temporary is removed. Either way the file that was at the target stays as it was.

Example:
    >>> atomic_write("run/notes.txt", lambda handle: handle.write(b"step 100\\n"))
    >>> Path("run/notes.txt").read_bytes()
    b'step 100\\n'
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from medfunc.errors import CheckpointWriteError

__all__ = [
    "atomic_replace",
    "atomic_write",
    "ensure_writable",
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

_NOT_PERMITTED = (
    "This process may not write in {folder}: save to a folder you can write, or change the "
    "folder's permissions (e.g. chmod u+w)"
)
_NOT_A_FOLDER = "A part of the folder path {folder} is a file, not a folder: choose another folder"
# What to do about each cause a write can fail with, by errno name ({path}: the file, {folder}:
# its folder). Only these causes become a CheckpointWriteError; other errors propagate unchanged.
_ADVICE = {
    "ENOSPC": "The disk holding {folder} is full: free space on it, or save to a folder on "
    "another disk",
    "EDQUOT": "Your disk quota for {folder} is used up: free space, or save to a folder on "
    "another disk",
    "EFBIG": "The file is larger than the file system of {folder} allows: save to a folder on "
    "another file system",
    "EACCES": _NOT_PERMITTED,
    "EPERM": _NOT_PERMITTED,
    "EROFS": "{folder} is on a read-only file system: save to a folder on a writable disk",
    "EISDIR": "The path is a folder: pass the path of a file inside it, e.g. {path}/checkpoint.pt",
    "ENOTDIR": _NOT_A_FOLDER,
    "EEXIST": _NOT_A_FOLDER,
    "ENAMETOOLONG": "The file name is too long for the file system: choose a shorter one",
    "EIO": "The disk holding {folder} reported an I/O error: check the disk, or save to "
    "another one",
}


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


def _errno_name(code: int | None) -> str | None:
    return errno.errorcode.get(code) if code is not None else None


def _storage_cause(error: BaseException) -> OSError | None:
    """The OSError behind a failed write when it is one with advice in ``_ADVICE``.

    It may be ``error`` itself or sit in its chain: ``torch.save`` reports a full disk as a
    ``RuntimeError`` ("unexpected pos ...") whose context is the ``OSError(ENOSPC)``.
    """
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not a write failure
        return None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and _errno_name(current.errno) in _ADVICE:
            return current
        current = current.__cause__ or current.__context__
    return None


def _write_error(path: Path, cause: OSError, what_happened: str) -> CheckpointWriteError:
    """The error for a write to ``path`` that failed with ``cause`` (an errno in ``_ADVICE``)."""
    name = _errno_name(cause.errno)
    reason = cause.strerror or os.strerror(cause.errno)
    advice = _ADVICE[name].format(path=path, folder=path.parent)
    with contextlib.suppress(OSError):
        if path.is_file():
            what_happened += f"; the existing {path.name} is unchanged"
    message = f"cannot write {path}: {name} ({reason}). {advice}. {what_happened}."
    return CheckpointWriteError(cause.errno, message, str(path))


def _refuse(path: Path, code: int) -> CheckpointWriteError:
    return _write_error(path, OSError(code, os.strerror(code)), "Nothing was written")


def ensure_writable(path: str | os.PathLike) -> Path:
    """Check, before anything is written, that a file can be written at ``path``.

    Missing folders are created. This is what :func:`atomic_write` checks first; call it before
    expensive work whose result is to be saved (serialising, exporting), so that a path that
    cannot work fails at once.

    Args:
        path: the file to be written.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        CheckpointWriteError: ``path`` is a folder (``EISDIR``); its folder cannot be created
            (e.g. ``EACCES``, ``EROFS``, ``ENOTDIR``); or the folder is on a read-only file
            system (``EROFS``) or not writable by this process (``EACCES``).

    Example:
        >>> ensure_writable("run/ckpt.pt")
        PosixPath('run/ckpt.pt')
        >>> ensure_writable("run")
        Traceback (most recent call last):
        ...
        medfunc.errors.CheckpointWriteError: cannot write run: EISDIR (Is a directory). ...
    """
    path = Path(path)
    try:
        is_folder = stat.S_ISDIR(os.lstat(path).st_mode)  # a link to a folder is replaced
    except OSError:
        is_folder = False
    if is_folder:
        raise _refuse(path, errno.EISDIR)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if _errno_name(error.errno) not in _ADVICE:
            raise
        raise _write_error(path, error, "Nothing was written") from error
    if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise _refuse(path, errno.EROFS)
    if os.name == "posix" and not os.access(
        folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids
    ):
        raise _refuse(path, errno.EACCES)
    return path


def _discard(temporary: Path) -> None:
    """Remove a failed write's temporary; a failure to remove it must not hide the write's."""
    with contextlib.suppress(OSError):
        _unlink(temporary)


def atomic_write(
    path: str | os.PathLike, write: Callable[[BinaryIO], None], *, mode: int = 0o644
) -> None:
    """Write a file atomically: ``write`` fills a temporary that then replaces ``path``.

    First :func:`ensure_writable` checks the path (creating missing folders) and stray
    temporaries in the folder are removed (see :func:`remove_stray_temporaries`). The temporary
    is flushed, fsynced, given the permissions ``mode`` and renamed over ``path``; then the folder
    is fsynced. If anything fails, ``path`` keeps its old content and the temporary is removed;
    a storage failure raises :class:`~medfunc.errors.CheckpointWriteError`, any other error
    (e.g. one of ``write``'s own) propagates unchanged.

    Args:
        path: the file to write.
        write: called once with the temporary opened for binary writing; it must not close it.
        mode: the file's permission bits (not reduced by the umask).

    Returns:
        None.

    Raises:
        CheckpointWriteError: the file cannot be written: the path is a folder or its folder
            cannot be written (raised before ``write`` is called), or the disk filled up, the
            quota ran out or the disk failed while writing (also when ``write`` reports it
            wrapped in another error, as ``torch.save`` does). ``errno`` is the cause's.

    Example:
        >>> atomic_write("run/ckpt.pt", lambda handle: torch.save({"step": 3}, handle))
        >>> torch.load("run/ckpt.pt")
        {'step': 3}
    """
    path = ensure_writable(path)
    folder = path.parent
    with contextlib.suppress(OSError):  # a stray that cannot be removed must not stop the write
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
    except BaseException as error:
        _discard(temporary)
        cause = _storage_cause(error)
        if cause is None or isinstance(error, CheckpointWriteError):
            raise
        raise _write_error(path, cause, "The partly written temporary was removed") from error
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

    Raises:
        CheckpointWriteError: ``dst`` is a folder or its folder cannot be written; ``src`` is
            then left for the caller to remove.

    Example:
        >>> staged = temporary_path("model.pt")
        >>> torch.save(torch.nn.Linear(4, 2).state_dict(), str(staged))  # e.g. an exporter
        >>> atomic_replace(staged, "model.pt")
        >>> staged.exists(), sorted(torch.load("model.pt"))
        (False, ['bias', 'weight'])
    """
    src, dst = Path(src), ensure_writable(dst)
    try:
        _fsync_file(src)
        os.chmod(src, mode)
        os.replace(src, dst)
    except OSError as error:
        if _errno_name(error.errno) not in _ADVICE:
            raise
        raise _write_error(dst, error, f"{src.name} was not moved there") from error
    fsync_folder(dst.parent)
