"""Reading a checkpoint safely: integrity (CRC-32; the pickle's records before unpickling, the
tensors' bytes as they are read), ``weights_only`` loading, and the payload's layout checked
before anything uses it.

A damaged file raises :class:`CheckpointCorruptError` (never another error from deep inside
torch), a file whose pickle names arbitrary objects raises :class:`UnsafeCheckpointError` and
nothing from it is executed.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from torch import Tensor

from medfunc.atomic import pending_temporaries
from medfunc.checkpoint.payload import FORMAT_VERSION
from medfunc.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    ConfigError,
    UnsafeCheckpointError,
)

__all__ = [
    "DeferredRecords",
    "deferred_payload",
    "load_verified",
    "read_checkpoint",
    "read_payload",
    "validate_payload",
]

_REQUIRED = ("format_version", "model_state", "trainer_state")
_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_GLOBALS = ("torch.", "collections.OrderedDict")
_READ_CHUNK = 1 << 22
# A zip local file header; its last two fields are the lengths of the name and extra field.
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
# A tensor's bytes: "<archive>/data/<key>". Every other record (data.pkl, version, byteorder...)
# is small and checked before torch.load; tensor records are checked while torch.load reads them.
_TENSOR_RECORD = re.compile(r"[^/]+/data/[^/]+")
# Storages read but not yet checksummed: a bound on the host memory held back for the check
# when the tensors go to another device (on the CPU the storages are the result anyway).
_PENDING_BYTES = 1 << 28
# The checking pass of a deferred read (:func:`deferred_payload`) reads through this many
# buffers of ``_READ_CHUNK`` bytes in turn, so reading and checksumming overlap.
_CHECK_BUFFERS = 4


def _corrupt(path: Path, reason: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"checkpoint {path} is corrupt or incomplete: {reason}. The file was damaged or not "
        "fully written; use an earlier checkpoint or write it again"
    )


def _not_medfunc(path: Path, reason: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{path} is not a medfunc checkpoint: {reason}. Write checkpoints with "
        "medfunc.save_state (a bare state_dict loads with model.load_state_dict)"
    )


def _check_exists(path: Path) -> None:
    if path.is_dir():
        raise CheckpointNotFoundError(f"{path} is a folder; pass the checkpoint file inside it")
    if path.exists():
        return
    hint = ""
    if pending_temporaries(path):
        hint = " (only the temporary of an interrupted save is there; that save never completed)"
    raise CheckpointNotFoundError(f"checkpoint {path} does not exist{hint}")


def _open_archive(handle: BinaryIO, path: Path) -> zipfile.ZipFile:
    handle.seek(0)
    try:
        return zipfile.ZipFile(handle)
    except zipfile.BadZipFile as error:
        raise _corrupt(path, f"the zip archive fails its integrity check ({error})") from error
    except (OSError, EOFError, ValueError, RuntimeError) as error:
        raise _corrupt(path, f"the zip archive cannot be read ({error})") from error


def _verify_archive(handle: BinaryIO, path: Path) -> None:
    """Check the zip archive and the CRC-32 of every record but the tensors' bytes (the pickle,
    the version records) before anything is unpickled.

    The tensor records are checked while ``torch.load`` reads them (:class:`_TensorChecksums`),
    so the file is read once.
    """
    try:
        with _open_archive(handle, path) as archive:
            infos = archive.infolist()
            if not any(i.filename.endswith("/data.pkl") or i.filename == "data.pkl" for i in infos):
                raise _corrupt(path, "the archive holds no data.pkl record")
            for info in infos:
                if _TENSOR_RECORD.fullmatch(info.filename):
                    continue
                with archive.open(info) as record:
                    while record.read(_READ_CHUNK):
                        pass
    except CheckpointCorruptError:
        raise
    except zipfile.BadZipFile as error:
        raise _corrupt(path, f"the zip archive fails its integrity check ({error})") from error
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as error:
        raise _corrupt(path, f"the zip archive cannot be read ({error})") from error


class _Record(NamedTuple):
    name: str
    size: int
    crc: int


def _tensor_records(handle: BinaryIO, path: Path) -> dict[int, _Record]:
    """The archive's tensor records by the file offset of their bytes, with the size and CRC-32
    its central directory states (the offset is found as zip readers and torch find it: after the
    record's local header, whose name and extra field lengths it reads)."""
    records: dict[int, _Record] = {}
    with _open_archive(handle, path) as archive:
        infos = [i for i in archive.infolist() if _TENSOR_RECORD.fullmatch(i.filename)]
    for info in infos:
        header = os.pread(handle.fileno(), _LOCAL_HEADER.size, info.header_offset)
        if len(header) < _LOCAL_HEADER.size or not header.startswith(_ZIP_MAGIC):
            raise _corrupt(path, f"the local header of record {info.filename} is damaged")
        name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
        offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        records[offset] = _Record(info.filename, info.file_size, info.CRC)
    return records


class _DamagedTensorData(Exception):
    """A tensor record's bytes do not have the CRC-32 the archive states for them."""


def _as_bytes(storage: torch.UntypedStorage) -> memoryview:
    """A CPU storage's bytes, without copying."""
    return memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())


def _mapping_of(address: int, file: os.stat_result) -> tuple[int, int, int] | None:
    """``(start, end, file offset of start)`` of this process's memory mapping of ``file`` that
    holds ``address`` (None: no such mapping, or /proc/self/maps cannot tell)."""
    device = f"{os.major(file.st_dev):02x}:{os.minor(file.st_dev):02x}"
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                start, _, end = fields[0].partition("-")
                if int(start, 16) <= address < int(end, 16):
                    if fields[3] != device or int(fields[4]) != file.st_ino:
                        return None
                    return int(start, 16), int(end, 16), int(fields[2], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


class _TensorReader:
    """``torch.load``'s ``map_location``: reads every storage's bytes into place, checking their
    CRC-32 on the way.

    ``torch.load(mmap=True)`` hands each storage over as a slice of its mapping of the file,
    without reading anything; the slice's address gives the tensor record it belongs to. With
    ``copy`` its bytes are then read with ``pread`` straight into a fresh storage (the mapping
    is never touched, so none of its pages becomes resident) in chunks, while a background
    thread computes the CRC-32 of the chunk just read (both release the GIL): the file is read
    once, and checking it costs no second pass. Without ``copy`` the mapped storage is kept and
    its bytes are checksummed through the mapping.

    A storage torch did not take from its mapping of the file (another torch version, or no
    mapping) is checksummed as torch read it and must match a record of its size and CRC-32.
    A mismatch raises :class:`_DamagedTensorData` (at the latest from :meth:`check`, which
    the reader calls before it returns anything).

    With ``defer`` a mapped storage is kept untouched (none of its pages is read) and noted in
    :attr:`deferred`; :meth:`check_deferred` then checks those records' bytes through a few
    small buffers, and :class:`DeferredRecords` reads them wherever the caller wants them.

    Args:
        handle: the open checkpoint file.
        records: :func:`_tensor_records` of it.
        device: where the storages go.
        copy: read into fresh storages rather than keep the mapped ones.
        defer: keep the mapped storages unread, to be checked by :meth:`check_deferred`.
    """

    def __init__(
        self,
        handle: BinaryIO,
        records: dict[int, _Record],
        device: torch.device,
        copy: bool,
        defer: bool = False,
    ) -> None:
        self.fd = handle.fileno()
        self.file = os.fstat(self.fd)
        self.records = records
        self.unmatched = Counter((r.size, r.crc) for r in records.values())
        self.location = str(device)
        self.copy = copy
        self.mapping: tuple[int, int, int] | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-crc32")
        self.pending: deque[tuple[int, Future]] = deque()
        self.pending_bytes = 0
        self.defer = defer
        self.deferred: dict[int, tuple[int, _Record]] = {}

    def __call__(self, storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        found = self._record_of(storage)
        if found is not None and self.defer:
            self.deferred[storage.data_ptr()] = found
            return storage
        if found is not None and self.copy:
            storage = torch.UntypedStorage(found[1].size)
            self._read_into(_as_bytes(storage), *found)
        else:
            crc = _RunningCrc(storage.nbytes(), found[1] if found else None, self.unmatched)
            self._submit(storage.nbytes(), crc.update, _as_bytes(storage))
            self._submit(0, crc.finish)
        return torch.serialization.default_restore_location(storage, self.location)

    def _record_of(self, storage: torch.UntypedStorage) -> tuple[int, _Record] | None:
        """The record whose bytes ``storage`` maps, with their file offset (None: not mapped)."""
        address, nbytes = storage.data_ptr(), storage.nbytes()
        if storage.device.type != "cpu" or nbytes == 0:
            return None
        if self.mapping is None or not self.mapping[0] <= address < self.mapping[1]:
            self.mapping = _mapping_of(address, self.file)
            if self.mapping is None:
                return None
        start, _, file_offset = self.mapping
        offset = address - start + file_offset
        record = self.records.get(offset)
        if record is None or record.size != nbytes:
            return None
        return offset, record

    def _read_into(self, target: memoryview, offset: int, record: _Record) -> None:
        crc = _RunningCrc(record.size, record, self.unmatched)
        for begin in range(0, record.size, _READ_CHUNK):
            chunk = target[begin : begin + _READ_CHUNK]
            if os.preadv(self.fd, [chunk], offset + begin) != len(chunk):
                raise _DamagedTensorData(f"record {record.name} ends before its stated size")
            self._submit(len(chunk), crc.update, chunk)
        self._submit(0, crc.finish)

    def _submit(self, nbytes: int, fn: Callable[..., None], *args: Any) -> None:
        self.pending.append((nbytes, self.pool.submit(fn, *args)))
        self.pending_bytes += nbytes
        while self.pending_bytes > _PENDING_BYTES:
            self._settle()

    def _settle(self) -> None:
        nbytes, future = self.pending.popleft()
        self.pending_bytes -= nbytes
        future.result()

    def check(self) -> None:
        """Wait for every checksum; raise :class:`_DamagedTensorData` at the first mismatch."""
        while self.pending:
            self._settle()

    def check_deferred(self) -> None:
        """Check the CRC-32 of every deferred record, reading it through :data:`_CHECK_BUFFERS`
        buffers in turn (the checksum of one runs while the next is read); raise
        :class:`_DamagedTensorData` at the first mismatch or short record."""
        buffers = [memoryview(bytearray(_READ_CHUNK)) for _ in range(_CHECK_BUFFERS)]
        in_flight: deque[Future] = deque()
        used = 0
        for offset, record in sorted(set(self.deferred.values())):
            crc = _RunningCrc(record.size, record, self.unmatched)
            for begin in range(0, record.size, _READ_CHUNK):
                # The pool runs in order: once at most _CHECK_BUFFERS - 1 tasks are left, the
                # buffer used _CHECK_BUFFERS reads ago is no longer being checksummed.
                while len(in_flight) >= _CHECK_BUFFERS:
                    in_flight.popleft().result()
                chunk = buffers[used % _CHECK_BUFFERS][: min(_READ_CHUNK, record.size - begin)]
                used += 1
                if os.preadv(self.fd, [chunk], offset + begin) != len(chunk):
                    raise _DamagedTensorData(f"record {record.name} ends before its stated size")
                in_flight.append(self.pool.submit(crc.update, chunk))
            in_flight.append(self.pool.submit(crc.finish))
        while in_flight:
            in_flight.popleft().result()

    def close(self) -> None:
        """Stop the background thread (checksums still queued are dropped)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


class _RunningCrc:
    """The CRC-32 of one storage's bytes, updated chunk by chunk in the checking thread.

    Args:
        size: the storage's size in bytes.
        record: the record the bytes were read from (None: not known).
        unmatched: ``(size, CRC-32)`` of the records no storage of unknown record matched yet.
    """

    def __init__(self, size: int, record: _Record | None, unmatched: Counter) -> None:
        self.size = size
        self.record = record
        self.unmatched = unmatched
        self.value = 0

    def update(self, chunk: memoryview) -> None:
        """Add ``chunk``, the next bytes of the storage."""
        self.value = zlib.crc32(chunk, self.value)

    def finish(self) -> None:
        """Raise unless the bytes have their record's CRC-32, or (record unknown) the size and
        CRC-32 of a record not matched yet, which is then matched."""
        if self.record is not None:
            if self.value != self.record.crc:
                raise _DamagedTensorData(
                    f"record {self.record.name} has CRC-32 {self.value:#010x}, the archive "
                    f"states {self.record.crc:#010x}"
                )
            return
        key = (self.size, self.value)
        if self.unmatched[key] <= 0:
            raise _DamagedTensorData(
                f"a tensor of {self.size} bytes has CRC-32 {self.value:#010x}, which the "
                "archive states for none of its records"
            )
        self.unmatched[key] -= 1


def _unsafe_globals(handle: BinaryIO) -> list[str]:
    try:
        handle.seek(0)
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(handle))
    except Exception:  # noqa: BLE001 - the names only enrich the message
        return []


def _unsafe(path: Path, error: BaseException, names: list[str]) -> UnsafeCheckpointError:
    what = f"references {', '.join(names)}" if names else f"was refused ({error})"
    return UnsafeCheckpointError(
        f"refused to load {path}: its pickle {what}, not only tensors and plain containers; "
        "nothing from it was executed. medfunc never unpickles arbitrary objects; only use "
        "checkpoints written by medfunc.save_state or torch.save of tensors and containers"
    )


def _pickled_globals(handle: BinaryIO) -> list[str]:
    """The globals named by the pickles at the start of a file, read from their opcodes only
    (nothing is unpickled); scanning stops at the first thing that is not a pickle."""
    names: list[str] = []
    strings: list[str] = []
    handle.seek(0)
    while True:
        try:
            for opcode, arg, _ in pickletools.genops(handle):
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # noqa: BLE001 - not (or no longer) pickle data: stop scanning
            break
    return [n for n in dict.fromkeys(names) if not n.startswith(_TORCH_GLOBALS)]


def _classify_non_zip(
    handle: BinaryIO, path: Path
) -> CheckpointCorruptError | UnsafeCheckpointError:
    """The error for a file that is not a zip archive (medfunc only writes zip archives)."""
    handle.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickles are noise here
            torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure is classified below
        names = _pickled_globals(handle)
        if isinstance(error, pickle.UnpicklingError) and names:
            failure: CheckpointCorruptError | UnsafeCheckpointError = _unsafe(path, error, names)
        else:
            failure = _not_medfunc(path, "it is not a PyTorch zip archive")
        failure.__cause__ = error
        return failure
    return _not_medfunc(path, "it uses PyTorch's legacy (pre-zip) format")


def _check_magic(handle: BinaryIO, path: Path) -> None:
    """A medfunc checkpoint is a zip archive: anything else is classified and refused."""
    handle.seek(0)
    head = handle.read(len(_ZIP_MAGIC))
    if not _ZIP_MAGIC.startswith(head):
        raise _classify_non_zip(handle, path)
    if len(head) < len(_ZIP_MAGIC):
        raise _corrupt(path, f"the file is truncated to {len(head)} bytes")


def _load_source(handle: BinaryIO) -> tuple[BinaryIO | str, bool]:
    """What ``torch.load`` reads: the handle's ``/proc/self/fd`` entry, memory-mapped (torch
    maps only by file name; the entry names the file the handle holds open even if the path was
    renamed over meanwhile), so :class:`_TensorReader` reads the bytes itself. Where that entry
    does not exist (outside Linux) torch reads the open handle."""
    handle.seek(0)
    by_descriptor = f"/proc/self/fd/{handle.fileno()}"
    if os.path.exists(by_descriptor):
        return by_descriptor, True
    return handle, False


def _open_verified(path: Path) -> BinaryIO:
    """The file at ``path``, open, its magic and every record but the tensors' bytes checked.

    A checkpoint is often replaced (renamed over) while another process reads it; opening the
    path once for the magic check, the CRC-32 checks and the load makes all of them see one file.
    """
    try:
        handle = path.open("rb")
    except (FileNotFoundError, IsADirectoryError):
        _check_exists(path)
        raise
    try:
        _check_magic(handle, path)
        _verify_archive(handle, path)
    except BaseException:
        handle.close()
        raise
    return handle


def _load_checked(handle: BinaryIO, path: Path, reader: _TensorReader) -> Any:
    """``torch.load`` of the open file through ``reader``, every checksum awaited (the deferred
    records' included); any failure raised as a medfunc error."""
    source, use_mmap = _load_source(handle)
    try:
        payload = torch.load(source, map_location=reader, weights_only=True, mmap=use_mmap)
        reader.check()
        reader.check_deferred()
    except _DamagedTensorData as error:
        raise _corrupt(path, f"its tensor data fails the CRC-32 check ({error})") from error
    except pickle.UnpicklingError as error:
        raise _unsafe(path, error, _unsafe_globals(handle)) from error
    except Exception as error:  # noqa: BLE001 - anything else in an intact archive is damage
        raise _corrupt(path, f"its records are inconsistent ({type(error).__name__})") from error
    finally:
        reader.close()
    return payload


def _torch_load(path: Path, map_location: torch.device, mmap: bool) -> Any:
    """Check, verify and load the file at ``path`` through one open handle."""
    with _open_verified(path) as handle:
        reader = _TensorReader(handle, _tensor_records(handle, path), map_location, not mmap)
        return _load_checked(handle, path, reader)


class DeferredRecords:
    """The tensors of a payload from :func:`deferred_payload` whose bytes are still in the file
    (checked, not read), and the reads that put them where the caller wants them.

    Args:
        fd: the open checkpoint's descriptor (kept open by :func:`deferred_payload`).
        records: storage address -> (file offset, record) of every deferred storage.
        path: the file, for messages.
    """

    def __init__(self, fd: int, records: dict[int, tuple[int, _Record]], path: Path) -> None:
        self.fd = fd
        self.records = records
        self.path = path

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is a payload tensor whose bytes were not read yet."""
        return tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in self.records

    def fill(self, target: Tensor, source: Tensor) -> None:
        """Write the values of ``source`` (a deferred payload tensor) into ``target``.

        A contiguous CPU ``target`` that is its whole storage, for a ``source`` that is its
        whole record, gets the record's bytes read straight into its memory; any other target
        gets them through a fresh CPU storage of one record and ``copy_``.

        Args:
            target: a tensor of the source's shape and dtype (any device).
            source: a tensor :meth:`holds`.
        """
        offset, record = self.records[source.untyped_storage().data_ptr()]
        if _is_whole(source, record.size) and _is_whole(target, record.size):
            self._read(_as_bytes(target.untyped_storage()), offset, record)
            return
        with torch.no_grad():
            target.copy_(self.materialize(source))

    def materialize(self, source: Tensor) -> Tensor:
        """``source`` (a deferred payload tensor) read into fresh CPU memory.

        Args:
            source: a tensor :meth:`holds`.

        Returns:
            A tensor of the same shape, strides and values that owns its storage.
        """
        offset, record = self.records[source.untyped_storage().data_ptr()]
        storage = torch.UntypedStorage(record.size)
        self._read(_as_bytes(storage), offset, record)
        view = torch.empty(0, dtype=source.dtype)
        return view.set_(storage, source.storage_offset(), source.size(), source.stride())

    def _read(self, target: memoryview, offset: int, record: _Record) -> None:
        for begin in range(0, record.size, _READ_CHUNK):
            chunk = target[begin : begin + _READ_CHUNK]
            if os.preadv(self.fd, [chunk], offset + begin) != len(chunk):
                raise _corrupt(
                    self.path,
                    f"record {record.name} ended before its stated size while it was read, "
                    "after it had been checked: the file was changed meanwhile",
                )


def _is_whole(tensor: Tensor, nbytes: int) -> bool:
    """Whether ``tensor`` is a contiguous CPU tensor covering its whole storage of ``nbytes``."""
    return (
        tensor.device.type == "cpu"
        and tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == nbytes
        and tensor.numel() * tensor.element_size() == nbytes
    )


@contextmanager
def deferred_payload(path: str | os.PathLike) -> Iterator[tuple[dict, DeferredRecords]]:
    """A checkpoint's validated payload whose tensors' bytes are checked but not yet read.

    The file is memory-mapped by ``torch.load`` and its tensor records are checked (CRC-32)
    through a few small buffers, so nothing of the size of the state is allocated; the payload's
    tensors are views of the mapping, to be put in place with :class:`DeferredRecords` (or read
    through, which makes their pages resident) while the context is open. Every check
    :func:`read_checkpoint` makes is made before the payload is handed out.

    Args:
        path: the checkpoint file.

    Yields:
        The payload and the reader of its deferred tensors.

    Raises:
        CheckpointNotFoundError, CheckpointCorruptError, UnsafeCheckpointError,
        CheckpointVersionError: as :func:`read_checkpoint`.

    Example::

        with deferred_payload("step-100.pt") as (payload, records):
            weight = payload["model_state"]["weight"]
            records.fill(target, weight)  # target: a tensor of weight's shape and dtype
    """
    path = Path(path)
    _check_exists(path)
    with _open_verified(path) as handle:
        device = torch.device("cpu")
        reader = _TensorReader(handle, _tensor_records(handle, path), device, True, defer=True)
        payload = validate_payload(_load_checked(handle, path, reader), path)
        yield payload, DeferredRecords(handle.fileno(), reader.deferred, path)


def _check_int(value: Any, where: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _not_medfunc(path, f"{where} must be an int, found {type(value).__name__}")
    return value


def validate_payload(payload: Any, path: Path) -> dict:
    """Check the payload's layout (not against a state).

    Args:
        payload: what was unpickled, or a payload a caller passed in.
        path: its file, for messages.

    Returns:
        ``payload``, unchanged.
    """
    if not isinstance(payload, dict):
        raise _not_medfunc(path, f"it holds a {type(payload).__name__}, expected a dict")
    if "format_version" not in payload:
        if payload and all(isinstance(v, Tensor) for v in payload.values()):
            raise _not_medfunc(path, "it looks like a bare state_dict (no 'format_version')")
        raise _not_medfunc(path, f"it has no 'format_version' (keys: {sorted(map(str, payload))})")
    version = _check_int(payload["format_version"], "format_version", path)
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"checkpoint {path} has format version {version}, but this medfunc reads format "
            f"versions up to {FORMAT_VERSION}; upgrade medfunc to read it"
        )
    if version < 1:
        raise _not_medfunc(path, f"format_version {version} is not a valid version")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise _not_medfunc(path, f"it lacks {missing}")
    for key in (
        "model_state",
        "trainer_state",
        "scaler_state",
        "medfunc_state",
        "optimizer_state",
        "scheduler_state",
    ):
        if key in payload and not isinstance(payload[key], Mapping):
            raise _not_medfunc(path, f"{key} is a {type(payload[key]).__name__}, not a dict")
    for key, value in payload["model_state"].items():
        if not isinstance(key, str):
            raise _not_medfunc(path, f"model_state has a key of type {type(key).__name__}")
        if not isinstance(value, Tensor) and not key.endswith("_extra_state"):
            raise _not_medfunc(path, f"model_state[{key!r}] is a {type(value).__name__}")
    trainer = payload["trainer_state"]
    _check_int(trainer.get("global_step"), "trainer_state['global_step']", path)
    rng = trainer.get("rng")
    if not isinstance(rng, (list, tuple)) or len(rng) != 2:
        raise _not_medfunc(path, "trainer_state['rng'] must be a pair [key, counter]")
    for i, v in enumerate(rng):
        _check_int(v, f"trainer_state['rng'][{i}]", path)
    if "accumulation" in trainer:
        acc = trainer["accumulation"]
        if not isinstance(acc, Mapping) or not {"grads", "count", "loss_sum"} <= set(acc):
            raise _not_medfunc(path, "trainer_state['accumulation'] lacks grads/count/loss_sum")
        _check_int(acc["count"], "trainer_state['accumulation']['count']", path)
    optimizer = payload.get("optimizer_state")
    if optimizer is not None and not {"state", "param_groups"} <= set(optimizer):
        raise _not_medfunc(path, "optimizer_state lacks 'state' / 'param_groups'")
    scaler = payload.get("scaler_state", {})
    if scaler and not {"scale", "_growth_tracker"} <= set(scaler):
        raise _not_medfunc(path, "scaler_state lacks 'scale' / '_growth_tracker'")
    return payload


def _as_device(map_location: str | torch.device) -> torch.device:
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"map_location must name a device, got {map_location!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"map_location={map_location!r} but CUDA is not available; use 'cpu'")
    return device


def read_payload(path: str | os.PathLike, map_location: str | torch.device, mmap: bool) -> dict:
    """:func:`read_checkpoint` with the choice to memory-map the file (for CPU targets).

    Args:
        path: the checkpoint file.
        map_location: where the tensors go.
        mmap: map the file instead of reading it (the tensors then share the file's pages).

    Returns:
        The validated payload.
    """
    path = Path(path)
    device = _as_device(map_location)
    _check_exists(path)
    return validate_payload(_torch_load(path, device, mmap), path)


def load_verified(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """What a PyTorch zip file holds, integrity-checked and loaded with ``weights_only=True``,
    without the medfunc layout check (for files other programs wrote, e.g. the original
    trainer's; see :mod:`medfunc.legacy`).

    Args:
        path: the file.
        map_location: where the tensors go.

    Returns:
        The unpickled object (plain containers, tensors and the globals allowed at the call).

    Raises:
        CheckpointNotFoundError, CheckpointCorruptError, UnsafeCheckpointError: as
        :func:`read_checkpoint`.
    """
    path = Path(path)
    device = _as_device(map_location)
    _check_exists(path)
    return _torch_load(path, device, mmap=False)


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint's payload, never unpickling anything but plain data.

    The pickle's records are checked against their CRC-32 before anything is unpickled, then
    the file is loaded with ``torch.load(weights_only=True)``, every tensor's bytes read once
    and checked against their CRC-32 on the way; nothing is returned unless all match.

    Args:
        path: the checkpoint file.
        map_location: where the tensors go.

    Returns:
        The payload dict (see the module docstring).

    Raises:
        CheckpointNotFoundError: there is no such file.
        CheckpointCorruptError: the file is truncated or damaged, or is not a medfunc checkpoint.
        UnsafeCheckpointError: an intact file whose pickle holds objects other than tensors and
            plain containers (refused by ``weights_only``; nothing is executed).
        CheckpointVersionError: the file was written by a newer checkpoint format.

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.adamw(1e-3))
        >>> path = mf.save_state(state, "runs/exp1/step-100.pt", extra={"epoch": 2})
        >>> payload = mf.read_checkpoint(path)
        >>> payload["trainer_state"]["epoch"]
        2
    """
    return read_payload(path, map_location, mmap=False)
