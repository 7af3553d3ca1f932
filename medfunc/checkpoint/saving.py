"""Saving a TrainState to one checkpoint file, atomically, with a CRC-32 on every record."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.utils.serialization import config as serialization_config

from medfunc.atomic import atomic_write, ensure_writable
from medfunc.checkpoint.frozen import trainable_only_payload
from medfunc.checkpoint.payload import build_payload, check_extra, check_loadable
from medfunc.state import TrainState

__all__ = ["save_state"]


@contextlib.contextmanager
def _crc32_records() -> Iterator[None]:
    """``torch.save`` writes each record's CRC-32 within the block, whatever the caller set.

    :func:`medfunc.read_checkpoint` verifies those CRCs before unpickling, so a checkpoint always
    carries them. The setting is only patched when the caller turned it off, and torch's own
    scoped patch restores it on exit: after a save nothing differs from before.
    """
    if serialization_config.save.compute_crc32:
        yield
        return
    with serialization_config.patch({"save.compute_crc32": True}):
        yield


def _write_payload(payload: dict, path: Path) -> None:
    def write(handle: BinaryIO) -> None:
        with _crc32_records():
            torch.save(payload, handle)

    atomic_write(path, write)


def save_state(
    state: TrainState,
    path: str | os.PathLike,
    *,
    extra: Mapping[str, Any] | None = None,
    save_optimizer: bool = True,
    save_scheduler: bool = True,
    trainable_only: bool = False,
) -> Path:
    """Write ``state`` to one ``.pt`` checkpoint, atomically.

    The file is written to a temporary ``.{name}.tmp-<pid>-<random>`` in the same folder,
    flushed and fsynced, renamed over ``path`` and the folder is fsynced: a reader sees the old
    file or the complete new one, never a partial one, even if the process is killed mid-save
    or the disk fills up.
    Temporaries left in the folder by saves whose process died are removed. In distributed runs
    call it on one rank only.

    Args:
        state: the state to save (not changed).
        path: the checkpoint file; missing folders are created.
        extra: plain values or tensors stored in ``trainer_state`` (e.g. ``epoch``, the data
            position); reserved names (``global_step``, ``rng``, ...) are refused.
        save_optimizer: include the optimizer state.
        save_scheduler: include ``scheduler_state`` (the LR position, for plain PyTorch).
        trainable_only: leave out the frozen parameters (e.g. a LoRA fine-tune's pretrained
            base): ``model_state`` keeps the trainable parameters and the buffers, and
            ``medfunc_state['frozen_base']`` records the frozen ones' SHA-256, which
            :func:`restore_state` checks against the model it restores into (see
            :mod:`medfunc.checkpoint.frozen`). Such a file loads into a model with
            ``load_state_dict(..., strict=False)`` only.

    Returns:
        The checkpoint's path.

    Raises:
        ConfigError: ``extra`` (or a module's extra state) holds values ``torch.load`` with
            ``weights_only=True`` could not read back.
        CheckpointWriteError: the file cannot be written (also an ``OSError``; its message names
            the path, the cause and what to do). A path that is a folder, or a folder that is
            read-only, not writable or cannot be created, fails before the state is serialised;
            a full disk fails while writing. Either way an existing checkpoint at ``path`` is
            unchanged and no partial file is left.

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.adamw(1e-3))
        >>> print(mf.save_state(state, "runs/exp1/step-100.pt", extra={"epoch": 2, "batch": 40}))
        runs/exp1/step-100.pt
    """
    state.check_alive()
    path = ensure_writable(path)
    payload = build_payload(state, check_extra(extra), save_optimizer, save_scheduler)
    if trainable_only:
        payload = trainable_only_payload(payload, state)
    check_loadable(payload, "checkpoint")
    _write_payload(payload, path)
    return path
