"""A human-readable summary of a checkpoint, for people and the ``medfunc inspect`` command."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from medfunc.checkpoint.payload import RESERVED_TRAINER_KEYS
from medfunc.checkpoint.reading import read_payload
from medfunc.errors import CheckpointCorruptError, UnsafeCheckpointError

__all__ = ["inspect_checkpoint"]

_PARTS = (
    "model_state",
    "optimizer_state",
    "scheduler_state",
    "scaler_state",
    "trainer_state",
    "medfunc_state",
)


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"


def _model_lines(payload: dict) -> list[str]:
    """The model_state's tensor count, size and dtypes."""
    tensors = [v for v in payload["model_state"].values() if isinstance(v, Tensor)]
    dtypes: dict[str, int] = {}
    for t in tensors:
        key = str(t.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + 1
    numel = sum(t.numel() for t in tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    lines = [
        f"model_state: {len(tensors)} tensors, {numel:,} values, {_size(nbytes)}",
        "dtypes: " + ", ".join(f"{k} ({n})" for k, n in sorted(dtypes.items())),
    ]
    frozen = payload.get("medfunc_state", {}).get("frozen_base")
    if frozen is not None:
        lines.append(
            f"trainable only: {frozen['parameters']} frozen parameters ({frozen['elements']:,} "
            f"values) not stored, base sha256 {frozen['sha256']}"
        )
    return lines


def _optimizer_lines(payload: dict) -> list[str]:
    """The optimizer's param groups and the LR position."""
    lines = []
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
    return lines


def _trainer_lines(payload: dict) -> list[str]:
    """The loss scale, the accumulation window, the RNG and the caller's extra entries."""
    trainer = payload["trainer_state"]
    lines = []
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
    extra = {k: v for k, v in trainer.items() if k not in (*RESERVED_TRAINER_KEYS, "epoch")}
    if extra:
        shown = ", ".join(
            f"{k}={tuple(v.shape) if isinstance(v, Tensor) else v!r}" for k, v in extra.items()
        )
        lines.append(f"extra: {shown}")
    return lines


def inspect_checkpoint(path: str | os.PathLike) -> str:
    """A human-readable summary of a checkpoint (read on the CPU, validated as when restoring).

    Args:
        path: the checkpoint file.

    A checkpoint or ``pytorch_model.bin`` written by the original trainer
    (``medvllm.training.trainer``) is described too (see :mod:`medfunc.legacy`).

    Returns:
        Several lines: format version, global step, epoch, precision, parameter count, size and
        dtypes, the parts present, the loss scale and the caller's extra entries.

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.adamw(1e-3), precision="fp16")
        >>> path = mf.save_state(state, "runs/exp1/step-100.pt", extra={"epoch": 2, "batch": 40})
        >>> print(mf.inspect_checkpoint(path))
        checkpoint runs/exp1/step-100.pt (... KB)
        format version: 1
        global step: 0
        epoch: 2
        precision: fp16
        model_state: 2 tensors, 10 values, 40 B
        dtypes: float32 (2)
        parts: model_state, optimizer_state, scheduler_state, scaler_state, trainer_state, ...
        optimizer_state: 2 param group(s), state for 0 parameter(s)
        scheduler_state: last_epoch 0, lr [0.001, 0.001]
        loss scale: 65536.0 (growth tracker 0)
        rng: key 0, counter 0
        extra: batch=40
    """
    path = Path(path)
    try:
        payload = read_payload(path, "cpu", mmap=True)
    except (CheckpointCorruptError, UnsafeCheckpointError):
        from medfunc.legacy import describe_legacy_file  # the original trainer's files

        described = describe_legacy_file(path)
        if described is None:
            raise
        return described
    trainer = payload["trainer_state"]
    lines = [
        f"checkpoint {path} ({_size(path.stat().st_size)})",
        f"format version: {payload['format_version']}",
        f"global step: {trainer['global_step']}",
        f"epoch: {trainer.get('epoch', 0)}",
        f"precision: {trainer.get('precision', 'unknown')}",
        *_model_lines(payload),
        "parts: " + ", ".join(k for k in _PARTS if k in payload),
        *_optimizer_lines(payload),
        *_trainer_lines(payload),
    ]
    return "\n".join(lines)
