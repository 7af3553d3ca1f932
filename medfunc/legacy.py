"""Files written by the original trainer (``medvllm.training.trainer``): its checkpoints and
its weights, read without unpickling anything but data.

The original writes ``checkpoint-epoch{N}.pt`` holding ``model_state``, ``optimizer_state`` (a
``torch.optim`` state dict), ``scheduler_state``, ``scaler_state`` (a ``GradScaler`` state
dict), ``trainer_state`` (``epoch``, ``global_step``), ``config`` (a pickled instance of its
``TrainerConfig``) and ``version``; and its weights as ``pytorch_model.bin`` or
``pytorch_model.v{N}.bin`` with a ``manifest.json``.

The file is checked like a medfunc checkpoint (CRC-32 of every record) and loaded with
``torch.load(weights_only=True)``. A class the pickle names (the original's ``TrainerConfig``)
is never imported: each such name is allowed, for this one load, as a stand-in that records
what the pickle stores (its fields) as data, so nothing of the original's code runs. The config
is returned as a plain dict; a stand-in anywhere else than under ``config`` makes the file
refused (:class:`~medfunc.errors.UnsafeCheckpointError`).

:func:`to_resume_payload` turns such a checkpoint into a medfunc payload for
:func:`medfunc.restore_state`: model, optimizer moments (converted by
:func:`medfunc.optim.from_torch_state_dict`), LR position (``global_step``), loss scale and
epoch/step. What cannot be carried over is listed (the trainer warns once with the list).

Example::

    raw = read_legacy_checkpoint("old_run/checkpoint-epoch2.pt")
    raw["config"]["learning_rate"]          # 5e-05, read as data
    payload, dropped = to_resume_payload(raw, like=state, source="checkpoint-epoch2.pt")
    state = mf.restore_state(payload, like=state)
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medfunc.checkpoint.payload import FORMAT_VERSION
from medfunc.checkpoint.reading import load_verified, read_checkpoint
from medfunc.checkpoint.restore import restore_donated, restore_state
from medfunc.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    ConfigError,
    UnsafeCheckpointError,
)
from medfunc.state import TrainState

__all__ = [
    "LEGACY_KEYS",
    "describe_legacy_file",
    "is_legacy_payload",
    "legacy_weights_file",
    "read_legacy_checkpoint",
    "read_legacy_weights",
    "read_resume_payload",
    "to_resume_payload",
]

#: The entries of the original trainer's checkpoint.
LEGACY_KEYS = (
    "model_state",
    "optimizer_state",
    "scheduler_state",
    "scaler_state",
    "trainer_state",
    "config",
    "version",
)
_EPOCH_FILE = re.compile(r"^checkpoint-epoch(?P<n>\d+)\.pt$")
_WEIGHTS_VERSION = re.compile(r"^pytorch_model\.v(?P<n>\d+)\.bin$")


class _PickledObject:
    """Stand-in for an object of a class that is never imported: what the pickle stores for it
    (constructor arguments and state) kept as data."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _PickledObject:
        obj = object.__new__(cls)
        obj.__dict__["_pickled"] = {"args": args, "state": None}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: ``__new__`` recorded the arguments."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_pickled"]["state"] = state


def _stand_in(qualname: str) -> type[_PickledObject]:
    name = qualname.rsplit(".", 1)[-1] or "Object"
    return type(name, (_PickledObject,), {"qualname": qualname})


def _plain(value: Any) -> Any:
    """A stand-in tree as plain data: objects become their fields, dtypes their names, tensors
    a short description, a class or function reference its qualified name."""
    if isinstance(value, _PickledObject):
        stored = value.__dict__["_pickled"]
        state = stored["state"]
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = {**state[0], **(state[1] or {})}  # (dict, slots) as pickle stores it
        if isinstance(state, Mapping):
            return {str(k): _plain(v) for k, v in state.items()}
        return {"class": value.qualname, "args": _plain(list(stored["args"])), "state": state}
    if isinstance(value, type) and issubclass(value, _PickledObject):
        return value.qualname
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Tensor):
        return f"tensor(shape={list(value.shape)}, dtype={str(value.dtype).removeprefix('torch.')})"
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _stand_ins_in(value: Any, where: str) -> list[str]:
    """Where in ``value`` a stand-in sits (``where[key]...: qualified name``)."""
    if isinstance(value, _PickledObject) or (
        isinstance(value, type) and issubclass(value, _PickledObject)
    ):
        return [f"{where}: {value.qualname}"]
    if isinstance(value, Mapping):
        return [hit for k, v in value.items() for hit in _stand_ins_in(v, f"{where}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in _stand_ins_in(v, f"{where}[{i}]")]
    return []


def _pickled_class_names(path: Path) -> list[str]:
    """The globals the file's pickle names that ``weights_only`` does not allow (read from the
    pickle's opcodes; nothing is unpickled)."""
    try:
        with path.open("rb") as handle:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(handle))
    except Exception:  # noqa: BLE001 - not a zip archive: load_verified classifies it
        return []


def _load_with_stand_ins(path: Path, map_location: str | torch.device) -> Any:
    names = _pickled_class_names(path)
    allowed = [(_stand_in(name), name) for name in names]
    with torch.serialization.safe_globals(allowed):
        return load_verified(path, map_location)


def is_legacy_payload(payload: Any) -> bool:
    """Whether ``payload`` has the original trainer's checkpoint layout (not medfunc's).

    Args:
        payload: what a checkpoint file held.

    Returns:
        True for a dict without ``format_version`` whose ``model_state`` is a mapping and
        whose other entries are among :data:`LEGACY_KEYS`.

    Example:
        >>> is_legacy_payload({"model_state": {}, "trainer_state": {"epoch": 1}, "version": 1})
        True
        >>> is_legacy_payload({"format_version": 1, "model_state": {}})
        False
    """
    return (
        isinstance(payload, dict)
        and "format_version" not in payload
        and isinstance(payload.get("model_state"), Mapping)
        and set(payload) <= set(LEGACY_KEYS)
    )


def _not_legacy(path: Path, reason: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{path} is neither a medfunc checkpoint nor one of the original trainer's: {reason}"
    )


def read_legacy_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by the original trainer, its ``config`` as plain data.

    Args:
        path: the ``checkpoint-epoch{N}.pt`` (or ``-step{S}.pt``) file.
        map_location: where the tensors go.

    Returns:
        The file's entries (see :data:`LEGACY_KEYS`); ``config`` is a dict of the original
        TrainerConfig's fields (dtypes as names, tensors described, other objects as their
        fields or qualified names).

    Raises:
        CheckpointNotFoundError: there is no such file.
        CheckpointCorruptError: the file is damaged or not laid out as the original's.
        UnsafeCheckpointError: an object of a class other than plain data outside ``config``,
            or a global of a module that is never allowed (``os``, ``sys``).
    """
    path = Path(path)
    raw = _load_with_stand_ins(path, map_location)
    if not is_legacy_payload(raw):
        keys = sorted(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise _not_legacy(path, f"it holds {keys}")
    outside = [
        hit for key, value in raw.items() if key != "config" for hit in _stand_ins_in(value, key)
    ]
    if outside:
        raise UnsafeCheckpointError(
            f"refused to load {path}: its {', '.join(outside[:4])} is a pickled object, not "
            "tensors and plain containers; nothing from it was executed"
        )
    for key, value in raw["model_state"].items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise _not_legacy(path, f"model_state[{key!r}] is a {type(value).__name__}")
    raw = dict(raw)
    if "config" in raw:
        raw["config"] = _plain(raw["config"])
    return raw


def _strip_ddp_prefix(model_state: Mapping[str, Tensor], like: TrainState) -> Mapping:
    """The original saved a DDP-wrapped model's keys with a ``module.`` prefix; drop it when
    every key has it and the model's own keys do not."""
    keys = list(model_state)
    own = set(like.module.state_dict())
    if keys and all(k.startswith("module.") for k in keys) and not own & set(keys):
        return OrderedDict((k.removeprefix("module."), v) for k, v in model_state.items())
    return model_state


def _int_entry(trainer: Mapping[str, Any], key: str, source: str) -> int:
    value = trainer.get(key, 0)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointCorruptError(
            f"trainer_state[{key!r}] of {source} is {value!r}, not a non-negative int"
        )
    return value


def _position(raw: Mapping[str, Any], source: str) -> tuple[int, int]:
    """Epochs completed and optimizer steps taken, checked against the file name and the
    scheduler; a disagreement is refused rather than guessed."""
    trainer = raw.get("trainer_state") or {}
    if not isinstance(trainer, Mapping):
        raise CheckpointCorruptError(f"trainer_state of {source} is not a dict")
    epoch, step = _int_entry(trainer, "epoch", source), _int_entry(trainer, "global_step", source)
    named = _EPOCH_FILE.match(Path(source).name)
    if named and int(named["n"]) != epoch:
        raise CheckpointMismatchError(
            f"{source}: the file name says epoch {named['n']} but trainer_state['epoch'] is "
            f"{epoch}; it is unclear how many epochs were completed. Rename the file to "
            f"checkpoint-epoch{epoch}.pt if trainer_state is right"
        )
    scheduler = raw.get("scheduler_state")
    if isinstance(scheduler, Mapping) and "last_epoch" in scheduler:
        if int(scheduler["last_epoch"]) != step:
            raise CheckpointMismatchError(
                f"{source}: scheduler_state['last_epoch'] is {scheduler['last_epoch']} but "
                f"trainer_state['global_step'] is {step}; the LR schedule's position is "
                "ambiguous. medfunc continues the schedule at the optimizer step count; fix "
                "one of the two entries"
            )
    return epoch, step


def to_resume_payload(
    raw: Mapping[str, Any], like: TrainState, source: str
) -> tuple[dict[str, Any], list[str]]:
    """A medfunc checkpoint payload continuing the original trainer's checkpoint ``raw``.

    Model values and the optimizer state (a ``torch.optim`` state dict, converted when the
    payload is restored) are taken as they are; the LR schedule continues at
    ``trainer_state['global_step']``; the loss scale comes from ``scaler_state`` when ``like``
    uses fp16 loss scaling; the loop continues after epoch ``trainer_state['epoch']``. The RNG
    key and counter are ``like``'s (the original stored no RNG state).

    Args:
        raw: from :func:`read_legacy_checkpoint`.
        like: the state it will be restored into.
        source: the file, for messages.

    Returns:
        The payload (for :func:`medfunc.restore_state`) and what could not be carried over.

    Raises:
        CheckpointMismatchError: the epoch or LR position is ambiguous (see :func:`_position`).
    """
    epoch, step = _position(raw, source)
    key, counter = (int(v) for v in like.rng.tolist())
    dropped = [
        "the RNG state (the original stored none: dropout and shuffling continue from this "
        "run's seed)",
        "the data order within the epoch (the original's DataLoader shuffle is not "
        "reproducible; this run's seeded shuffle is used from the next epoch on)",
    ]
    scaler = raw.get("scaler_state") or {}
    if scaler and not like.loss_scale:
        dropped.append(
            f"the fp16 loss scale {scaler.get('scale')} (this run does not use fp16 scaling)"
        )
        scaler = {}
    elif like.loss_scale and not scaler:
        dropped.append("the fp16 loss scale (not in the file: it starts at its initial value)")
    if "optimizer_state" not in raw:
        dropped.append("the optimizer moments (not saved: the optimizer starts fresh)")
    if "config" in raw:
        dropped.append("the original's config (read as data; this run's TrainerConfig applies)")
    trainer_state: dict[str, Any] = {
        "global_step": step,
        "epoch": epoch,
        "batch_index": 0,
        "rng": [key, counter],
        "precision": like.policy.name,
        "accumulate_steps": like.accumulate_steps,
        "legacy_version": _plain(raw.get("version")),
    }
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_state": _strip_ddp_prefix(raw["model_state"], like),
        "scaler_state": dict(scaler),
        "trainer_state": trainer_state,
    }
    if "optimizer_state" in raw:
        payload["optimizer_state"] = raw["optimizer_state"]
    return payload, dropped


def _weights_payload(
    model_state: Mapping[str, Tensor], like: TrainState
) -> tuple[dict[str, Any], list[str]]:
    key, counter = (int(v) for v in like.rng.tolist())
    payload = {
        "format_version": FORMAT_VERSION,
        "model_state": _strip_ddp_prefix(model_state, like),
        "trainer_state": {
            "global_step": 0,
            "rng": [key, counter],
            "precision": like.policy.name,
            "accumulate_steps": like.accumulate_steps,
        },
    }
    dropped = ["everything but the weights (a weights file: training starts at step 0)"]
    return payload, dropped


def legacy_weights_file(path: str | os.PathLike) -> Path:
    """The weights file the original wrote at ``path``: the file itself, or in a folder the
    newest version ``manifest.json`` lists (else ``pytorch_model.bin``).

    Args:
        path: a ``pytorch_model.bin`` / ``pytorch_model.v{N}.bin`` file or the original's
            output folder.

    Returns:
        The file.

    Raises:
        ConfigError: a folder without such a file, or a manifest that does not name one.

    Example:
        >>> _ = Path("old").mkdir(); _ = Path("old/pytorch_model.v2.bin").write_bytes(b"")
        >>> _ = Path("old/manifest.json").write_text(
        ...     '{"versions": [{"version": 1, "file": "pytorch_model.v1.bin"},'
        ...     ' {"version": 2, "file": "pytorch_model.v2.bin"}]}')
        >>> legacy_weights_file("old").name
        'pytorch_model.v2.bin'
    """
    path = Path(path)
    if not path.is_dir():
        return path
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"{manifest} cannot be read as JSON ({error})") from error
        entries = data.get("versions") if isinstance(data, dict) else data
        files = []
        for entry in entries if isinstance(entries, list) else []:
            name = entry.get("file") or entry.get("path") if isinstance(entry, dict) else entry
            match = _WEIGHTS_VERSION.match(Path(str(name)).name)
            if match:
                files.append((int(match["n"]), path / Path(str(name)).name))
        if not files:
            raise ConfigError(
                f"{manifest} lists no pytorch_model.v{{N}}.bin file of the original trainer; "
                "pass a checkpoint file (checkpoint-*.pt) or a weights file, not the folder"
            )
        return max(files)[1]
    if (path / "pytorch_model.bin").is_file():
        return path / "pytorch_model.bin"
    raise ConfigError(
        f"{path} is a folder holding neither the original trainer's manifest.json nor "
        "pytorch_model.bin; pass a checkpoint file (checkpoint-*.pt) or a weights file"
    )


def read_legacy_weights(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> OrderedDict[str, Tensor]:
    """The state dict in an original trainer's weights file (see :func:`legacy_weights_file`).

    Args:
        path: a ``pytorch_model.bin`` / ``pytorch_model.v{N}.bin`` file or a folder.
        map_location: where the tensors go.

    Returns:
        key -> tensor, loadable with ``model.load_state_dict``.

    Raises:
        CheckpointCorruptError: the file holds something other than a state dict of tensors.
        UnsafeCheckpointError: its pickle names objects other than tensors and containers.
    """
    file = legacy_weights_file(path)
    state = load_verified(file, map_location)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        found = type(state).__name__
        raise CheckpointCorruptError(f"{file} is not a state dict of tensors (it holds a {found})")
    return OrderedDict(state)


def read_resume_payload(
    path: str | os.PathLike, like: TrainState, *, sharded: bool = False
) -> dict[str, Any]:
    """The payload to resume from ``path``: a medfunc checkpoint, the original trainer's
    checkpoint (converted, see :func:`to_resume_payload`), or its weights (initial weights).

    For the original's files a ``UserWarning`` says once what was not carried over.

    Args:
        path: the ``resume_from`` file (or the original's output folder for its weights).
        like: the state it will be restored into.
        sharded: the run is FSDP/DeepSpeed-sharded (the original's files are refused there).

    Returns:
        A medfunc payload for :func:`medfunc.restore_state`.

    Raises:
        ConfigError: the original's file with ``sharded``.
        CheckpointNotFoundError, CheckpointCorruptError, UnsafeCheckpointError,
        CheckpointVersionError, CheckpointMismatchError: as :func:`medfunc.read_checkpoint`.
    """
    source, file = str(path), Path(path)
    if file.is_dir():
        raw: dict[str, Any] | None = {"model_state": read_legacy_weights(file)}
    else:
        try:
            return read_checkpoint(file)
        except (CheckpointCorruptError, UnsafeCheckpointError) as error:
            raw = _legacy_or_none(file)
            if raw is None:
                raise error from None
    if sharded:
        raise ConfigError(
            f"resume_from={source} was written by the original trainer; resume it without "
            "fsdp/deepspeed once (it then writes medfunc checkpoints), or load its weights into "
            "the model before training"
        )
    if set(raw) == {"model_state"}:
        converted = _weights_payload(raw["model_state"], like)
    else:
        converted = to_resume_payload(raw, like, source)
    payload, dropped = converted
    warnings.warn(
        f"resume_from {source} was written by the original trainer (medvllm); not carried "
        f"over: {'; '.join(dropped)}",
        UserWarning,
        stacklevel=3,
    )
    return payload


def resume_into(path: str | os.PathLike, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Restore ``resume_from`` into ``like``'s own storage (``like`` is consumed).

    A medfunc checkpoint is read straight into ``like`` (one copy of the state in memory; the
    returned payload's tensors stay in the file: use its other entries only); the original's
    files are converted by :func:`read_resume_payload` and copied in.

    Args:
        path: the ``resume_from`` file (or the original's output folder for its weights).
        like: the state built to restore into.

    Returns:
        ``(state, payload)``.

    Raises:
        As :func:`read_resume_payload` and :func:`medfunc.restore_state`.
    """
    if not Path(path).is_dir():
        try:
            return restore_donated(path, like)
        except (CheckpointCorruptError, UnsafeCheckpointError):
            if like.consumed:
                raise
            # perhaps the original's file: read_resume_payload tells, or raises this error again
    payload = read_resume_payload(path, like)
    return restore_state(payload, like=like, donate=True), payload


def _legacy_or_none(path: Path) -> dict[str, Any] | None:
    """The original's checkpoint (or bare weights, as ``{"model_state": ...}``) at ``path``;
    None when the file is neither."""
    try:
        return read_legacy_checkpoint(path)
    except UnsafeCheckpointError:
        raise
    except CheckpointCorruptError:
        pass
    try:
        return {"model_state": read_legacy_weights(path)}
    except (CheckpointCorruptError, UnsafeCheckpointError):
        return None


def describe_legacy_file(path: str | os.PathLike) -> str | None:
    """A human-readable summary of an original trainer's checkpoint or weights file.

    Args:
        path: the file.

    Returns:
        Several lines (see ``medfunc inspect``), or None when the file is neither.
    """
    path = Path(path)
    raw = _legacy_or_none(path)
    if raw is None:
        return None
    tensors = list(raw["model_state"].values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    kind = "checkpoint" if len(raw) > 1 else "weights file"
    lines = [
        f"{kind} of the original trainer (medvllm.training.trainer): {path}",
        f"model_state: {len(tensors)} tensors, {sum(t.numel() for t in tensors):,} values, "
        f"{nbytes / 1024:.1f} KB",
    ]
    if len(raw) == 1:
        return "\n".join(lines)
    trainer = raw.get("trainer_state") or {}
    lines.append(f"version: {_plain(raw.get('version'))}")
    lines.append(f"epoch: {trainer.get('epoch')}, global step: {trainer.get('global_step')}")
    lines.append("parts: " + ", ".join(k for k in LEGACY_KEYS if k in raw))
    optimizer = raw.get("optimizer_state")
    if isinstance(optimizer, Mapping):
        groups = optimizer.get("param_groups", [])
        lrs = ", ".join(f"{g.get('lr', float('nan')):.6g}" for g in groups)
        lines.append(f"optimizer_state: {len(groups)} param group(s), lr [{lrs}]")
    scaler = raw.get("scaler_state") or {}
    if scaler:
        lines.append(f"loss scale: {scaler.get('scale')}")
    config = raw.get("config")
    if isinstance(config, Mapping):
        shown = ", ".join(f"{k}={v!r}" for k, v in list(config.items())[:12])
        more = f", ... ({len(config)} fields)" if len(config) > 12 else ""
        lines.append(f"config (read as data): {shown}{more}")
    lines.append("resume with TrainerConfig(resume_from=...) (RNG state is not carried over)")
    return "\n".join(lines)
