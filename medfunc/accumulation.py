"""Gradient accumulation's host-side bookkeeping: the window's position and which parameters
some micro-batch of the window differentiated.

Example:
    >>> next_count(2, 3).item()
    0
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree

from medfunc.state import PYTREE_NAMESPACE, TrainState


class WindowGrads(OrderedDict):
    """The running gradient sums of an accumulation window (``AccumState.grads``), plus the
    names of the parameters some micro-batch of the window differentiated.

    ``used`` is host-side structure, not data: it is the pytree node's static metadata (as a
    Flax ``struct.field(pytree_node=False)``), so tree maps and donation keep it and a compiled
    step reads it without touching the device. A parameter not in ``used`` has no gradient when
    the window's update is applied, however its (zero) sum reads.

    Args:
        items: name -> running sum, keyed like the trainable params.
        used: the names of the parameters with a gradient so far in the window (model order).

    Example:
        >>> WindowGrads({"w": torch.zeros(2)}, used=("w",)).used
        ('w',)
    """

    def __init__(self, items: Any = (), used: tuple[str, ...] = ()) -> None:
        super().__init__(items)
        self.used = tuple(used)


def _flatten_window(grads: WindowGrads) -> tuple[list, tuple, tuple]:
    keys = tuple(grads)
    return [grads[k] for k in keys], (keys, grads.used), keys


def _unflatten_window(meta: tuple, children: Any) -> WindowGrads:
    keys, used = meta
    return WindowGrads(zip(keys, children), used)


optree.register_pytree_node(
    WindowGrads, _flatten_window, _unflatten_window, namespace=PYTREE_NAMESPACE
)
torch_pytree.register_pytree_node(
    WindowGrads,
    lambda grads: (list(grads.values()), (tuple(grads), grads.used)),
    lambda children, meta: _unflatten_window(meta, children),
    serialized_type_name="medfunc.WindowGrads",
    flatten_with_keys_fn=lambda grads: (
        [(torch_pytree.MappingKey(k), v) for k, v in grads.items()],
        (tuple(grads), grads.used),
    ),
)


def window_grads(
    names: tuple[str, ...], sums: list[torch.Tensor], used: tuple[str, ...]
) -> list[torch.Tensor | None]:
    """The gradients of a completed accumulation window: each parameter's running sum, or None
    for one that no micro-batch of the window differentiated (torch's accumulated ``.grad``
    stays None for it).

    Args:
        names: the trainable names (model order).
        sums: their running sums.
        used: the names some micro-batch of the window differentiated.

    Returns:
        The gradient list the update uses.
    """
    used_set = set(used)
    if len(used_set) == len(names):
        return list(sums)
    return [g if n in used_set else None for n, g in zip(names, sums)]


def next_window(
    names: tuple[str, ...], window: tuple[str, ...], present: tuple[str, ...], apply: bool
) -> tuple[str, ...]:
    """The names with a gradient in the accumulation window after a call: none once the call
    applied the update (a new window starts), else ``window`` and ``present`` (model order)."""
    if apply:
        return ()
    seen = set(window) | set(present)
    return tuple(n for n in names if n in seen)


def window_position(state: TrainState) -> tuple[int, bool]:
    """``(count, apply)``: micro-batches already in the accumulation window, and whether this
    call completes it (host read of the CPU counter)."""
    k = state.accumulate_steps
    count = int(state.accum.count) if k > 1 else 0
    return count, count + 1 == k


def window_of(state: TrainState, count: int) -> tuple[str, ...]:
    """The names of the parameters earlier micro-batches of the state's accumulation window
    differentiated (host-side; ``()`` without accumulation or at a window's start).

    Args:
        state: the state.
        count: micro-batches already in the window (:func:`window_position`).

    Returns:
        The names, in model order. A window the step did not build (accumulated gradients in a
        plain OrderedDict) counts every parameter as used.
    """
    if state.accumulate_steps == 1 or count == 0:
        return ()
    grads = state.accum.grads
    return grads.used if isinstance(grads, WindowGrads) else tuple(grads)


def next_count(count: int, k: int) -> torch.Tensor:
    """The accumulation counter after one micro-batch (0-d CPU int64)."""
    return torch.tensor((count + 1) % k, dtype=torch.int64)
