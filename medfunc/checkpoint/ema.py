"""The parameters' moving average in a checkpoint: ``medfunc_state['ema']``.

A state built with ``ema_decay`` saves ``{"params": name -> tensor, "count": int, "decay":
float}`` (the trainable parameters' averages, the updates averaged so far and the decay).
Restoring checks every tensor against the state restored into. A checkpoint without an EMA
restored into a state that keeps one starts the average afresh from the restored parameters
(count 0, as a new ``AveragedModel``); an EMA in the checkpoint of a state without one is left
out, as the optimizer state is for ``save_optimizer=False``.

Example:
    >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1), ema_decay=0.99)
    >>> entry = mf.read_checkpoint(mf.save_state(state, "ema.pt"))["medfunc_state"]["ema"]
    >>> list(entry["params"]), entry["count"], entry["decay"]
    (['weight', 'bias'], 0, 0.99)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from medfunc.errors import CheckpointMismatchError
from medfunc.state import EmaState, TrainState, init_ema

__all__ = ["ema_entry", "restore_ema", "saved_ema_decay"]


def ema_entry(state: TrainState) -> dict[str, Any]:
    """The ``medfunc_state['ema']`` entry of ``state`` (which keeps an EMA).

    Args:
        state: a state built with ``ema_decay``.

    Returns:
        ``{"params", "count", "decay"}``; the tensors are the state's own (not copies).
    """
    return {
        "params": OrderedDict(state.ema.params),
        "count": int(state.ema.count),
        "decay": state.ema_decay,
    }


def saved_ema_decay(payload: Mapping[str, Any]) -> float | None:
    """The EMA decay a checkpoint was saved with, or None when it holds no EMA.

    Args:
        payload: a validated checkpoint payload.

    Returns:
        The decay, or None.
    """
    entry = payload.get("medfunc_state", {}).get("ema")
    return float(entry["decay"]) if isinstance(entry, Mapping) and "decay" in entry else None


def restore_ema(
    payload: Mapping[str, Any],
    like: TrainState,
    params: Mapping[str, Tensor],
    take: Callable[[Tensor, Tensor], Tensor],
    source: str,
) -> EmaState | tuple:
    """The restored :class:`~medfunc.state.EmaState` of ``like`` (``()`` when it keeps none).

    Args:
        payload: the checkpoint payload.
        like: the state restored into.
        params: the restored parameters (the fresh average's start when the checkpoint has none).
        take: places a checked checkpoint tensor on ``like``'s device (``(found, expected)``).
        source: the checkpoint's name, for messages.

    Returns:
        The EMA state, or ``()``.

    Raises:
        CheckpointMismatchError: the saved averages differ in names, shapes or dtypes.
    """
    if not like.ema:
        return ()
    entry = payload.get("medfunc_state", {}).get("ema")
    if entry is None:
        return init_ema(OrderedDict((n, params[n]) for n in like.trainable))
    saved = entry.get("params") if isinstance(entry, Mapping) else None
    count = entry.get("count") if isinstance(entry, Mapping) else None
    expected = like.ema.params
    if not isinstance(saved, Mapping) or list(saved) != list(expected):
        found = list(saved) if isinstance(saved, Mapping) else type(saved).__name__
        raise CheckpointMismatchError(
            f"medfunc_state['ema']['params']: checkpoint entries {found}, state entries "
            f"{list(expected)} (checkpoint {source}); it was saved from a different model"
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise CheckpointMismatchError(
            f"medfunc_state['ema']['count'] must be an int >= 0, got {count!r} (checkpoint "
            f"{source})"
        )
    averages = OrderedDict()
    for name, want in expected.items():
        found = saved[name]
        where = f"medfunc_state['ema']['params'][{name!r}]"
        if not isinstance(found, Tensor) or found.shape != want.shape or found.dtype != want.dtype:
            what = (
                f"{tuple(found.shape)} {found.dtype}"
                if isinstance(found, Tensor)
                else type(found).__name__
            )
            raise CheckpointMismatchError(
                f"{where}: checkpoint {what}, state {tuple(want.shape)} {want.dtype} "
                f"(checkpoint {source}); it was saved from a different model"
            )
        averages[name] = take(found, want)
    device = like.ema.count.device
    return EmaState(averages, torch.tensor(count, dtype=torch.int64, device=device))
