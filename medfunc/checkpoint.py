"""Checkpoints: save a TrainState atomically, read it back safely, restore it validated.

A checkpoint is one ``.pt`` file that ``torch.load(path, weights_only=True)`` reads. Its payload
is laid out like the seed trainer's, so plain PyTorch can continue from it:

- ``format_version``: ``1``.
- ``model_state``: ``module.state_dict()``'s keys with the state's values.
- ``optimizer_state``: the equal ``torch.optim`` optimizer's ``state_dict()`` (optional).
- ``scheduler_state``: a ``LambdaLR``-style ``state_dict()`` of the LR position (optional).
- ``scaler_state``: a ``torch.amp.GradScaler`` ``state_dict()`` (``{}`` unless fp16).
- ``trainer_state``: ``global_step``, ``epoch``, ``rng``, ``precision``, ``accumulate_steps``,
  the gradient-accumulation window (``accumulation``) and the caller's ``extra`` entries.
- ``medfunc_state``: what the torch formats lack: non-persistent buffers and the optimizer state
  of chain members other than the optimizer.

Example:
    >>> mf.save_state(state, "run/ckpt.pt", extra={"epoch": 3})
    >>> state = mf.restore_state("run/ckpt.pt", like=state)
    >>> print(mf.inspect_checkpoint("run/ckpt.pt"))
"""

from __future__ import annotations

import math
import os
import pickle
import pickletools
import re
import secrets
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optree
import torch
from torch import Tensor

from medfunc.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    ConfigError,
    UnsafeCheckpointError,
)
from medfunc.optim import find_optimizer, from_torch_state_dict, to_torch_state_dict
from medfunc.optim.base import get_substate, replace_substate
from medfunc.precision import Policy, get_policy, scaler_from_state_dict, scaler_state_dict
from medfunc.state import (
    PYTREE_NAMESPACE,
    AccumState,
    TrainState,
    init_state,
    tree_flatten,
    tree_leaves_with_path,
)

__all__ = [
    "FORMAT_VERSION",
    "inspect_checkpoint",
    "read_checkpoint",
    "restore_state",
    "save_state",
]

#: The payload layout this medfunc writes and the newest one it reads.
FORMAT_VERSION = 1

_REQUIRED = ("format_version", "model_state", "trainer_state")
_RESERVED_TRAINER_KEYS = ("global_step", "rng", "precision", "accumulate_steps", "accumulation")
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")
_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_GLOBALS = ("torch.", "collections.OrderedDict")
_READ_CHUNK = 1 << 24

_active_temporaries: set[str] = set()
_temporaries_lock = threading.Lock()


# ------------------------------------------------------------------------------------------------
# building the payload


def _module_owners(module: torch.nn.Module) -> dict[int, tuple[str, str]]:
    """id(tensor) -> ("params" | "buffers", name) for the module's parameters and buffers."""
    owners: dict[int, tuple[str, str]] = {}
    for name, param in module.named_parameters():
        owners.setdefault(id(param), ("params", name))
    for name, buf in module.named_buffers():
        owners.setdefault(id(buf), ("buffers", name))
    return owners


def _state_dict_layout(module: torch.nn.Module) -> OrderedDict:
    """state_dict key -> (("params" | "buffers", state name) or None, the module's value)."""
    owners = _module_owners(module)
    return OrderedDict(
        (key, (owners.get(id(value)), value))
        for key, value in module.state_dict(keep_vars=True).items()
    )


def _model_state(state: TrainState) -> tuple[OrderedDict, OrderedDict]:
    """The state's values under ``state_dict()`` keys, and the buffers state_dict leaves out.

    Entries that are not parameters or buffers (a module's ``get_extra_state()``) keep the
    module's value.
    """
    model_state = OrderedDict()
    covered: set[str] = set()
    for key, (owner, value) in _state_dict_layout(state.module).items():
        if owner is None:
            model_state[key] = value
            continue
        kind, name = owner
        model_state[key] = getattr(state, kind)[name]
        if kind == "buffers":
            covered.add(name)
    others = OrderedDict((n, b) for n, b in state.buffers.items() if n not in covered)
    return model_state, others


def _trainable(state: TrainState) -> OrderedDict:
    return OrderedDict((n, state.params[n]) for n in state.trainable)


def _optimizer_path(tx: Any) -> tuple[int, ...] | None:
    """Where the torch-equivalent optimizer's state sits in ``tx``'s state (None: no such)."""
    try:
        return find_optimizer(tx)[1]
    except ConfigError:
        return None


def _opt_rest(tx: Any, opt_state: Any) -> Any:
    """The part of ``opt_state`` a ``torch.optim`` state_dict does not hold."""
    path = _optimizer_path(tx)
    return opt_state if path is None else replace_substate(opt_state, path, None)


def _scheduler_state(state: TrainState) -> dict | None:
    """A ``LambdaLR.state_dict()`` whose lambda is the tx's learning rate (None: no optimizer)."""
    if _optimizer_path(state.tx) is None:
        return None
    spec, _ = find_optimizer(state.tx)
    step = int(state.step)
    base = spec.lr_at(step)
    groups = spec.groups(list(state.trainable))
    return {
        "base_lrs": [g.lr_multiplier for g in groups],
        "last_epoch": step,
        "_step_count": step + 1,
        "_is_initial": False,
        "_get_lr_called_within_step": False,
        "_last_lr": [base * g.lr_multiplier if g.lr_multiplier != 1.0 else base for g in groups],
        "lr_lambdas": [None] * len(groups),
    }


def _trainer_state(state: TrainState, extra: Mapping[str, Any]) -> dict:
    key, counter = (int(v) for v in state.rng.tolist())
    trainer: dict[str, Any] = {
        "global_step": int(state.step),
        "epoch": 0,
        "rng": [key, counter],
        "precision": state.policy.name,
        "accumulate_steps": state.accumulate_steps,
    }
    if state.accumulate_steps > 1:
        trainer["accumulation"] = {
            "grads": OrderedDict(state.accum.grads),
            "count": int(state.accum.count),
            "loss_sum": state.accum.loss_sum,
        }
    trainer.update(extra)
    return trainer


_PLAIN_LEAVES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.dtype,
    torch.device,
    torch.Size,
)


def _check_loadable(value: Any, where: str) -> None:
    """Raise ConfigError unless ``torch.load(weights_only=True)`` can read ``value`` back."""
    if isinstance(value, Tensor):
        if type(value) not in (Tensor, torch.nn.Parameter):
            raise ConfigError(
                f"{where} is a {type(value).__name__} (a tensor subclass), which a checkpoint "
                "cannot hold; store a plain tensor (e.g. value.as_subclass(torch.Tensor))"
            )
        return
    if type(value) in _PLAIN_LEAVES:
        return
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise ConfigError(f"{where} has a key of type {type(k).__name__}; use str or int")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise ConfigError(
        f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) cannot read; "
        "a checkpoint holds tensors, numbers, strings, None and lists/tuples/dicts of them"
    )


def _build_payload(
    state: TrainState, extra: Mapping[str, Any], save_optimizer: bool, save_scheduler: bool
) -> dict:
    model_state, other_buffers = _model_state(state)
    medfunc_state: dict[str, Any] = {"buffers": other_buffers}
    payload: dict[str, Any] = {"format_version": FORMAT_VERSION, "model_state": model_state}
    if save_optimizer:
        if _optimizer_path(state.tx) is not None:
            payload["optimizer_state"] = to_torch_state_dict(
                state.tx, state.opt_state, _trainable(state), state.step
            )
        medfunc_state["opt_state"] = OrderedDict(
            tree_leaves_with_path(_opt_rest(state.tx, state.opt_state))
        )
    if save_scheduler:
        scheduler = _scheduler_state(state)
        if scheduler is not None:
            payload["scheduler_state"] = scheduler
    payload["scaler_state"] = scaler_state_dict(state.policy, state.loss_scale)
    payload["trainer_state"] = _trainer_state(state, extra)
    payload["medfunc_state"] = medfunc_state
    return payload


def _check_extra(extra: Any) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"extra must be a dict of plain values, got {type(extra).__name__}")
    for key in extra:
        if not isinstance(key, str):
            raise ConfigError(f"extra keys must be strings, got {key!r}")
        if key in _RESERVED_TRAINER_KEYS:
            raise ConfigError(
                f"extra[{key!r}] would overwrite trainer_state[{key!r}], which save_state "
                f"fills from the state; reserved names: {list(_RESERVED_TRAINER_KEYS)}"
            )
    return dict(extra)


# ------------------------------------------------------------------------------------------------
# atomic writing


def _temporary_path(path: Path) -> Path:
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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_stray_temporaries(folder: Path) -> None:
    """Delete temporaries of saves that died, i.e. whose process no longer runs, and those of
    this process that no save is writing (a save registers its temporary before creating it)."""
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


def _fsync_folder(folder: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return  # platforms that cannot open a folder (Windows) persist the rename themselves
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(payload: dict, path: Path) -> None:
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stray_temporaries(folder)
    temporary = _temporary_path(path)
    key = os.path.realpath(temporary)
    with _temporaries_lock:
        _active_temporaries.add(key)
    crc_was_on = torch.serialization.get_crc32_options()
    try:
        if not crc_was_on:
            torch.serialization.set_crc32_options(True)
        with open(temporary, "xb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        if not crc_was_on:
            torch.serialization.set_crc32_options(False)
        with _temporaries_lock:
            _active_temporaries.discard(key)
    _fsync_folder(folder)


def save_state(
    state: TrainState,
    path: str | os.PathLike,
    *,
    extra: Mapping[str, Any] | None = None,
    save_optimizer: bool = True,
    save_scheduler: bool = True,
) -> Path:
    """Write ``state`` to one ``.pt`` checkpoint, atomically.

    The file is written to a temporary ``.{name}.tmp-<pid>-<random>`` in the same folder,
    flushed and fsynced, renamed over ``path`` and the folder is fsynced: a reader sees the old
    file or the complete new one, never a partial one, even if the process is killed mid-save.
    Temporaries left in the folder by saves whose process died are removed. In distributed runs
    call it on one rank only.

    Args:
        state: the state to save (not changed).
        path: the checkpoint file; missing folders are created.
        extra: plain values or tensors stored in ``trainer_state`` (e.g. ``epoch``, the data
            position); reserved names (``global_step``, ``rng``, ...) are refused.
        save_optimizer: include the optimizer state.
        save_scheduler: include ``scheduler_state`` (the LR position, for plain PyTorch).

    Returns:
        The checkpoint's path.

    Raises:
        ConfigError: ``extra`` (or a module's extra state) holds values ``torch.load`` with
            ``weights_only=True`` could not read back.

    Example:
        >>> mf.save_state(state, "runs/exp1/step-100.pt", extra={"epoch": 2, "batch": 40})
    """
    state.check_alive()
    payload = _build_payload(state, _check_extra(extra), save_optimizer, save_scheduler)
    _check_loadable(payload, "checkpoint")
    path = Path(path)
    _write_atomic(payload, path)
    return path


# ------------------------------------------------------------------------------------------------
# reading


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
    if path.parent.is_dir() and any(
        _TEMPORARY.match(n) and n.startswith(f".{path.name}.tmp-") for n in os.listdir(path.parent)
    ):
        hint = " (only the temporary of an interrupted save is there; that save never completed)"
    raise CheckpointNotFoundError(f"checkpoint {path} does not exist{hint}")


def _verify_archive(path: Path) -> None:
    """Read every record of the zip archive, checking its CRC-32, before anything is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if not any(i.filename.endswith("/data.pkl") or i.filename == "data.pkl" for i in infos):
                raise _corrupt(path, "the archive holds no data.pkl record")
            for info in infos:
                with archive.open(info) as record:
                    while record.read(_READ_CHUNK):
                        pass
    except CheckpointCorruptError:
        raise
    except zipfile.BadZipFile as error:
        raise _corrupt(path, f"the zip archive fails its integrity check ({error})") from error
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as error:
        raise _corrupt(path, f"the zip archive cannot be read ({error})") from error


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - the names only enrich the message
        return []


def _unsafe(path: Path, error: BaseException, names: list[str]) -> UnsafeCheckpointError:
    what = f"references {', '.join(names)}" if names else f"was refused ({error})"
    return UnsafeCheckpointError(
        f"refused to load {path}: its pickle {what}, not only tensors and plain containers; "
        "nothing from it was executed. medfunc never unpickles arbitrary objects; only use "
        "checkpoints written by medfunc.save_state or torch.save of tensors and containers"
    )


def _pickled_globals(path: Path) -> list[str]:
    """The globals named by the pickles at the start of a file, read from their opcodes only
    (nothing is unpickled); scanning stops at the first thing that is not a pickle."""
    names: list[str] = []
    strings: list[str] = []
    with path.open("rb") as handle:
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


def _classify_non_zip(path: Path) -> CheckpointCorruptError | UnsafeCheckpointError:
    """The error for a file that is not a zip archive (medfunc only writes zip archives)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickles are noise here
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure is classified below
        names = _pickled_globals(path)
        if isinstance(error, pickle.UnpicklingError) and names:
            failure: CheckpointCorruptError | UnsafeCheckpointError = _unsafe(path, error, names)
        else:
            failure = _not_medfunc(path, "it is not a PyTorch zip archive")
        failure.__cause__ = error
        return failure
    return _not_medfunc(path, "it uses PyTorch's legacy (pre-zip) format")


def _torch_load(path: Path, map_location: torch.device, mmap: bool) -> Any:
    with path.open("rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
    if _ZIP_MAGIC.startswith(head):
        if len(head) < len(_ZIP_MAGIC):
            raise _corrupt(path, f"the file is truncated to {len(head)} bytes")
    else:
        raise _classify_non_zip(path)
    _verify_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise _unsafe(path, error, _unsafe_globals(path)) from error
    except Exception as error:  # noqa: BLE001 - anything else in an intact archive is damage
        raise _corrupt(path, f"its records are inconsistent ({type(error).__name__})") from error


def _check_int(value: Any, where: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _not_medfunc(path, f"{where} must be an int, found {type(value).__name__}")
    return value


def _validate_payload(payload: Any, path: Path) -> dict:
    """Check the payload's layout (not against a state); return it."""
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


def _read(path: str | os.PathLike, map_location: str | torch.device, mmap: bool) -> dict:
    path = Path(path)
    device = _as_device(map_location)
    _check_exists(path)
    return _validate_payload(_torch_load(path, device, mmap), path)


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint's payload, never unpickling anything but plain data.

    Every record's CRC-32 is checked before anything is unpickled, then the file is loaded with
    ``torch.load(weights_only=True)``.

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
        >>> payload = mf.read_checkpoint("runs/exp1/step-100.pt")
        >>> payload["trainer_state"]["epoch"]
        2
    """
    return _read(path, map_location, mmap=False)


# ------------------------------------------------------------------------------------------------
# restoring


def _mismatch(where: str, found: str, expected: str, source: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{where}: checkpoint {found}, state {expected} (checkpoint {source}); the checkpoint "
        "was saved from a different model or configuration than the state it is restored into"
    )


def _check_tensor(where: str, found: Any, expected: Tensor, source: str) -> Tensor:
    if not isinstance(found, Tensor):
        raise _mismatch(where, f"holds a {type(found).__name__}", "holds a tensor", source)
    if found.shape != expected.shape:
        raise _mismatch(
            where, f"shape {tuple(found.shape)}", f"shape {tuple(expected.shape)}", source
        )
    if found.dtype != expected.dtype:
        raise _mismatch(where, f"dtype {found.dtype}", f"dtype {expected.dtype}", source)
    return found


class _Taker:
    """Places checkpoint tensors in the restored state.

    Tensors are copied to the state's device unless the payload is ours to keep (read from a
    file straight onto that device). With ``into_like``, model values are instead copied into
    ``like``'s own tensors (the module's storage) and those are kept.
    """

    def __init__(self, owned: bool, into_like: bool = False) -> None:
        self.owned = owned
        self.into_like = into_like

    def __call__(self, found: Tensor, expected: Tensor) -> Tensor:
        if self.owned and found.device == expected.device:
            return found
        return found.to(expected.device, copy=True)

    def model_value(self, found: Tensor, expected: Tensor) -> Tensor:
        if not self.into_like:
            return self(found, expected)
        with torch.no_grad():
            expected.copy_(found)
        return expected


def _restore_model(
    payload: dict, like: TrainState, take: _Taker, source: str
) -> tuple[OrderedDict, OrderedDict]:
    model_state = payload["model_state"]
    layout = OrderedDict((k, owner) for k, (owner, _) in _state_dict_layout(like.module).items())
    missing = [k for k, owner in layout.items() if owner is not None and k not in model_state]
    unexpected = [k for k in model_state if k not in layout]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"model_state: the checkpoint's keys differ from the state's model (checkpoint "
            f"{source}): missing {missing[:8]}, unexpected {unexpected[:8]}; it was saved from "
            "a different model"
        )
    values: dict[str, dict[str, Tensor]] = {"params": {}, "buffers": {}}
    for key, owner in layout.items():
        if owner is None:
            continue
        kind, name = owner
        if name in values[kind]:
            continue
        expected = getattr(like, kind)[name]
        found = _check_tensor(f"model_state[{key!r}]", model_state[key], expected, source)
        values[kind][name] = take.model_value(found, expected)
    others = payload.get("medfunc_state", {}).get("buffers", {})
    for name, expected in like.buffers.items():
        if name in values["buffers"]:
            continue
        if name in others:
            found = _check_tensor(
                f"medfunc_state['buffers'][{name!r}]", others[name], expected, source
            )
            values["buffers"][name] = take.model_value(found, expected)
        else:
            values["buffers"][name] = expected if take.into_like else expected.clone()
    for name in like.params:
        if name not in values["params"]:
            raise CheckpointMismatchError(
                f"model_state: no entry holds parameter {name!r} of the state's model "
                f"(checkpoint {source})"
            )
    params = OrderedDict((n, values["params"][n]) for n in like.params)
    buffers = OrderedDict((n, values["buffers"][n]) for n in like.buffers)
    return params, buffers


def _restore_opt_state(
    payload: dict, like: TrainState, params: OrderedDict, take: _Taker, source: str
) -> Any:
    rest = payload.get("medfunc_state", {}).get("opt_state")
    has_torch = "optimizer_state" in payload
    if not has_torch and rest is None:
        return optree.tree_map(torch.clone, like.opt_state, namespace=PYTREE_NAMESPACE)
    trainable = OrderedDict((n, params[n]) for n in like.trainable)
    path = _optimizer_path(like.tx)
    if has_torch:
        if path is None:
            raise CheckpointMismatchError(
                f"optimizer_state: the checkpoint holds a torch.optim state but the state's "
                f"transformation has no adamw/adam/sgd (checkpoint {source})"
            )
        try:
            opt_state = from_torch_state_dict(like.tx, payload["optimizer_state"], trainable)
        except ConfigError as error:
            raise CheckpointMismatchError(
                f"optimizer_state: {error} (checkpoint {source})"
            ) from error
    else:
        opt_state = like.tx.init(trainable)
    if rest is None:
        return opt_state
    template = _opt_rest(like.tx, opt_state)
    expected = tree_leaves_with_path(template)
    names = [p for p, _ in expected]
    if list(rest) != names:
        raise CheckpointMismatchError(
            f"medfunc_state['opt_state']: the checkpoint's optimizer-state entries "
            f"{list(rest)[:8]} differ from the state's {names[:8]} (checkpoint {source}); the "
            "gradient transformation changed"
        )
    leaves = [
        take(_check_tensor(f"medfunc_state['opt_state'][{p!r}]", rest[p], leaf, source), leaf)
        for p, leaf in expected
    ]
    _, treedef = tree_flatten(template)
    restored_rest = optree.tree_unflatten(treedef, leaves)
    if path is None:
        return restored_rest
    return replace_substate(restored_rest, path, get_substate(opt_state, path))


def _restore_loss_scale(payload: dict, like: TrainState, source: str) -> Any:
    scaler = payload.get("scaler_state") or {}
    if not like.loss_scale:
        if scaler:
            raise CheckpointMismatchError(
                f"scaler_state: the checkpoint was trained with fp16 loss scaling (scale "
                f"{scaler['scale']}) but the state's precision is {like.policy.name!r} "
                f"(checkpoint {source}); create the state with precision='fp16' to resume "
                "exactly, or drop the scaler: payload = read_checkpoint(path); "
                "payload['scaler_state'] = {}; restore_state(payload, like=state)"
            )
        return ()
    if not scaler:
        return optree.tree_map(torch.clone, like.loss_scale, namespace=PYTREE_NAMESPACE)
    scale = scaler["scale"]
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise CheckpointCorruptError(
            f"scaler_state['scale'] of checkpoint {source} is {scale!r}, not a positive number"
        )
    return scaler_from_state_dict(scaler, like.loss_scale)


def _restore_accum(payload: dict, like: TrainState, take: _Taker, source: str) -> Any:
    trainer = payload["trainer_state"]
    saved_k = trainer.get("accumulate_steps", 1)
    acc = trainer.get("accumulation")
    count = int(acc["count"]) if acc is not None else 0
    k = like.accumulate_steps
    if count > 0 and saved_k != k:
        raise CheckpointMismatchError(
            f"trainer_state['accumulation']: the checkpoint was saved after {count} of "
            f"{saved_k} micro-batches of an accumulation window, but the state has "
            f"accumulate_steps={k} (checkpoint {source}); restore with accumulate_steps="
            f"{saved_k}, or resume from a checkpoint saved at a window boundary"
        )
    if k == 1:
        return ()
    if count == 0:
        return AccumState(
            grads=OrderedDict((n, torch.zeros_like(g)) for n, g in like.accum.grads.items()),
            count=torch.zeros((), dtype=torch.int64),
            loss_sum=torch.zeros_like(like.accum.loss_sum),
        )
    grads = acc["grads"]
    if not isinstance(grads, Mapping) or list(grads) != list(like.accum.grads):
        found = list(grads) if isinstance(grads, Mapping) else type(grads).__name__
        raise CheckpointMismatchError(
            f"trainer_state['accumulation']['grads']: checkpoint entries {found}, state "
            f"entries {list(like.accum.grads)} (checkpoint {source})"
        )
    restored = OrderedDict(
        (
            n,
            take(
                _check_tensor(
                    f"trainer_state['accumulation']['grads'][{n!r}]", grads[n], g, source
                ),
                g,
            ),
        )
        for n, g in like.accum.grads.items()
    )
    loss_sum = _check_tensor(
        "trainer_state['accumulation']['loss_sum']", acc["loss_sum"], like.accum.loss_sum, source
    )
    return AccumState(
        grads=restored,
        count=torch.tensor(count, dtype=torch.int64),
        loss_sum=take(loss_sum, like.accum.loss_sum),
    )


def _restore_into(payload: dict, like: TrainState, take: _Taker, source: str) -> TrainState:
    params, buffers = _restore_model(payload, like, take, source)
    opt_state = _restore_opt_state(payload, like, params, take, source)
    loss_scale = _restore_loss_scale(payload, like, source)
    accum = _restore_accum(payload, like, take, source)
    trainer = payload["trainer_state"]
    return like.replace(
        params=params,
        buffers=buffers,
        opt_state=opt_state,
        loss_scale=loss_scale,
        step=torch.tensor(trainer["global_step"], dtype=torch.int64, device=like.device),
        rng=torch.tensor(list(trainer["rng"]), dtype=torch.int64),
        accum=accum,
    )


def _policy_from(payload: dict) -> Policy:
    trainer = payload["trainer_state"]
    scaler = payload.get("scaler_state") or {}
    name = trainer.get("precision", "fp16" if scaler else "fp32")
    if name != "fp16" or not scaler:
        return get_policy(name)
    options = {
        k: scaler[k] for k in ("growth_factor", "backoff_factor", "growth_interval") if k in scaler
    }
    return get_policy("fp16", **options)


def _model_device(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def restore_state(
    path_or_payload: str | os.PathLike | Mapping[str, Any],
    like: TrainState | None = None,
    *,
    model: torch.nn.Module | None = None,
    tx: Any = None,
    loss_fn: Callable | None = None,
    precision: str | Policy | None = None,
    accumulate_steps: int | None = None,
    device: str | torch.device | None = None,
) -> TrainState:
    """Restore a checkpoint into a :class:`TrainState`, validated against its structure.

    With ``like``: every tensor is checked (keys, shapes, dtypes) against ``like`` and the
    result is a new state on ``like``'s device with ``like``'s static parts (module, tx,
    loss_fn, policy). Its tensors are new: ``like`` and its module are not changed; call
    :func:`medfunc.bind_module` to write the restored values into the module.

    Without ``like``: the state is built with ``init_state(model, tx, ...)`` (precision and
    accumulate_steps default to the checkpoint's) and, as ``init_state`` does, shares storage
    with ``model``, which then holds the checkpoint's values.

    Parts the checkpoint lacks: no ``optimizer_state`` (``save_optimizer=False``) keeps
    ``like``'s optimizer state (a copy; fresh for a fresh ``like``); an empty ``scaler_state``
    keeps ``like``'s loss scale. The LR position is ``trainer_state['global_step']``.

    Args:
        path_or_payload: a checkpoint file, or a payload from :func:`read_checkpoint`.
        like: the state to restore into (e.g. the fresh ``init_state`` of the same model).
        model, tx, loss_fn, precision, accumulate_steps, device: build the state instead of
            ``like`` (see :func:`medfunc.init_state`).

    Returns:
        The restored state.

    Raises:
        CheckpointMismatchError: the checkpoint does not fit (the message names the key).
        ConfigError: neither ``like`` nor ``model`` and ``tx`` were given, or both were.
        CheckpointNotFoundError, CheckpointCorruptError, UnsafeCheckpointError,
        CheckpointVersionError: see :func:`read_checkpoint`.

    Example:
        >>> state = mf.init_state(model, tx, precision="fp16")
        >>> state = mf.restore_state("runs/exp1/step-100.pt", like=state)
    """
    builder = {
        "model": model,
        "tx": tx,
        "loss_fn": loss_fn,
        "precision": precision,
        "accumulate_steps": accumulate_steps,
        "device": device,
    }
    if like is not None:
        given = [k for k, v in builder.items() if v is not None]
        if given:
            raise ConfigError(
                f"restore_state got like= and {given}; pass either like=state or model= and tx="
            )
        like.check_alive()
        target = like.device
    else:
        if model is None or tx is None:
            raise ConfigError("restore_state needs like=state, or model= and tx= to build one")
        target = torch.device(device) if device is not None else _model_device(model)

    if isinstance(path_or_payload, Mapping):
        source = "payload"
        payload = _validate_payload(dict(path_or_payload), Path("<payload>"))
        owned = False
    else:
        source = str(path_or_payload)
        payload = _read(path_or_payload, target, mmap=target.type == "cpu")
        owned = target.type != "cpu"

    if like is not None:
        return _restore_into(payload, like, _Taker(owned), source)

    trainer = payload["trainer_state"]
    fresh = init_state(
        model,
        tx,
        loss_fn=loss_fn,
        precision=precision if precision is not None else _policy_from(payload),
        seed=int(trainer["rng"][0]),
        accumulate_steps=(
            accumulate_steps
            if accumulate_steps is not None
            else int(trainer.get("accumulate_steps", 1))
        ),
        device=device,
    )
    return _restore_into(payload, fresh, _Taker(owned, into_like=True), source)


# ------------------------------------------------------------------------------------------------
# inspecting


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"


def inspect_checkpoint(path: str | os.PathLike) -> str:
    """A human-readable summary of a checkpoint (read on the CPU, validated as when restoring).

    Args:
        path: the checkpoint file.

    Returns:
        Several lines: format version, global step, epoch, precision, parameter count, size and
        dtypes, the parts present, the loss scale and the caller's extra entries.

    Example:
        >>> print(mf.inspect_checkpoint("runs/exp1/step-100.pt"))
        checkpoint runs/exp1/step-100.pt (1.2 MB)
        format version: 1
        ...
    """
    path = Path(path)
    payload = _read(path, "cpu", mmap=True)
    trainer = payload["trainer_state"]
    tensors = [v for v in payload["model_state"].values() if isinstance(v, Tensor)]
    dtypes: dict[str, int] = {}
    for t in tensors:
        key = str(t.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + 1
    numel = sum(t.numel() for t in tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    lines = [
        f"checkpoint {path} ({_size(path.stat().st_size)})",
        f"format version: {payload['format_version']}",
        f"global step: {trainer['global_step']}",
        f"epoch: {trainer.get('epoch', 0)}",
        f"precision: {trainer.get('precision', 'unknown')}",
        f"model_state: {len(tensors)} tensors, {numel:,} values, {_size(nbytes)}",
        "dtypes: " + ", ".join(f"{k} ({n})" for k, n in sorted(dtypes.items())),
    ]
    parts = [
        k
        for k in (
            "model_state",
            "optimizer_state",
            "scheduler_state",
            "scaler_state",
            "trainer_state",
            "medfunc_state",
        )
        if k in payload
    ]
    lines.append("parts: " + ", ".join(parts))
    optimizer = payload.get("optimizer_state")
    if optimizer is not None:
        lines.append(
            f"optimizer_state: {len(optimizer['param_groups'])} param group(s), state for "
            f"{len(optimizer['state'])} parameter(s)"
        )
    else:
        lines.append("optimizer_state: not saved")
    scheduler = payload.get("scheduler_state")
    if scheduler is not None:
        lrs = ", ".join(f"{lr:.6g}" for lr in scheduler.get("_last_lr", []))
        lines.append(f"scheduler_state: last_epoch {scheduler.get('last_epoch')}, lr [{lrs}]")
    scaler = payload.get("scaler_state") or {}
    if scaler:
        lines.append(f"loss scale: {scaler['scale']} (growth tracker {scaler['_growth_tracker']})")
    else:
        lines.append("loss scale: none (no fp16 loss scaling)")
    k = trainer.get("accumulate_steps", 1)
    if k > 1:
        count = trainer.get("accumulation", {}).get("count", 0)
        lines.append(f"gradient accumulation: {count} of {k} micro-batches accumulated")
    lines.append(f"rng: key {trainer['rng'][0]}, counter {trainer['rng'][1]}")
    extra = {k: v for k, v in trainer.items() if k not in (*_RESERVED_TRAINER_KEYS, "epoch")}
    if extra:
        shown = ", ".join(
            f"{k}={tuple(v.shape) if isinstance(v, Tensor) else v!r}" for k, v in extra.items()
        )
        lines.append(f"extra: {shown}")
    return "\n".join(lines)
