"""Full and sharded checkpoints of distributed states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfunc.state import TrainState


def save_full(state: TrainState, path: str | Path, *, extra: dict | None = None) -> Path | None:
    """Gather the full state on rank 0 and write one ordinary checkpoint (every rank calls it)."""
    raise NotImplementedError


def load_full(path: str | Path, like: TrainState, **kwargs: Any) -> TrainState:
    """Restore a full single-file checkpoint into a (sharded) state on every rank."""
    raise NotImplementedError


def save_sharded(state: TrainState, directory: str | Path) -> Path:
    """Write a sharded ``torch.distributed.checkpoint`` of ``state`` (every rank writes its part)."""
    raise NotImplementedError


def load_sharded(directory: str | Path, like: TrainState) -> TrainState:
    """Read a sharded checkpoint into ``like``'s layout, on any world size."""
    raise NotImplementedError
