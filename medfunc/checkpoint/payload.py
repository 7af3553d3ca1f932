"""TrainState -> checkpoint payload: the layout of a medfunc checkpoint and how a state fills it.

The payload is laid out like the seed trainer's, so plain PyTorch can continue from it:

- ``format_version``: ``1``.
- ``model_state``: ``module.state_dict()``'s keys with the state's values.
- ``optimizer_state``: the equal ``torch.optim`` optimizer's ``state_dict()`` (optional).
- ``scheduler_state``: a ``LambdaLR``-style ``state_dict()`` of the LR position (optional).
- ``scaler_state``: a ``torch.amp.GradScaler`` ``state_dict()`` (``{}`` unless fp16).
- ``trainer_state``: ``global_step``, ``epoch``, ``rng``, ``precision``, ``accumulate_steps``,
  the gradient-accumulation window (``accumulation``: running sums, count, loss sum and ``used``,
  the names of the parameters the window differentiated so far) and the caller's ``extra``
  entries.
- ``medfunc_state``: what the torch formats lack: non-persistent buffers, the optimizer state
  of chain members other than the optimizer and, with ``ema_decay``, the parameters' moving
  average (``ema``, see :mod:`medfunc.checkpoint.ema`).

The layout helpers here (:func:`state_dict_layout`, :func:`optimizer_path`, :func:`opt_rest`)
are shared with :mod:`medfunc.checkpoint.restore`, which reads the payload back into a state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from medfunc.accumulation import window_of
from medfunc.checkpoint.ema import ema_entry
from medfunc.errors import ConfigError
from medfunc.optim import find_optimizer, to_torch_state_dict
from medfunc.optim.base import replace_substate
from medfunc.precision import scaler_state_dict
from medfunc.state import TrainState, tree_leaves_with_path

__all__ = [
    "FORMAT_VERSION",
    "RESERVED_TRAINER_KEYS",
    "build_payload",
    "check_extra",
    "check_loadable",
    "opt_rest",
    "optimizer_path",
    "state_dict_layout",
]

#: The payload layout this medfunc writes and the newest one it reads.
FORMAT_VERSION = 1

#: ``trainer_state`` entries filled from the state; ``extra`` may not use these names.
RESERVED_TRAINER_KEYS = ("global_step", "rng", "precision", "accumulate_steps", "accumulation")


def _module_owners(module: torch.nn.Module) -> dict[int, tuple[str, str]]:
    """id(tensor) -> ("params" | "buffers", name) for the module's parameters and buffers."""
    owners: dict[int, tuple[str, str]] = {}
    for name, param in module.named_parameters():
        owners.setdefault(id(param), ("params", name))
    for name, buf in module.named_buffers():
        owners.setdefault(id(buf), ("buffers", name))
    return owners


def state_dict_layout(module: torch.nn.Module) -> OrderedDict:
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
    for key, (owner, value) in state_dict_layout(state.module).items():
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


def optimizer_path(tx: Any) -> tuple[int, ...] | None:
    """Where the torch-equivalent optimizer's state sits in ``tx``'s state (None: no such)."""
    try:
        return find_optimizer(tx)[1]
    except ConfigError:
        return None


def opt_rest(tx: Any, opt_state: Any) -> Any:
    """The part of ``opt_state`` a ``torch.optim`` state_dict does not hold."""
    path = optimizer_path(tx)
    return opt_state if path is None else replace_substate(opt_state, path, None)


def _scheduler_state(state: TrainState) -> dict | None:
    """A ``LambdaLR.state_dict()`` whose lambda is the tx's learning rate (None: no optimizer)."""
    if optimizer_path(state.tx) is None:
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
        count = int(state.accum.count)
        trainer["accumulation"] = {
            "grads": OrderedDict(state.accum.grads),
            "count": count,
            "loss_sum": state.accum.loss_sum,
            "used": list(window_of(state, count)),
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


def check_loadable(value: Any, where: str) -> None:
    """Raise ConfigError unless ``torch.load(weights_only=True)`` can read ``value`` back.

    Args:
        value: a payload or a part of one.
        where: its name in error messages.
    """
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
            check_loadable(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            check_loadable(v, f"{where}[{i}]")
        return
    raise ConfigError(
        f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) cannot read; "
        "a checkpoint holds tensors, numbers, strings, None and lists/tuples/dicts of them"
    )


def build_payload(
    state: TrainState, extra: Mapping[str, Any], save_optimizer: bool, save_scheduler: bool
) -> dict:
    """The checkpoint payload of ``state`` (see the module docstring for its layout).

    Args:
        state: the state to save (not changed; the payload shares its tensors).
        extra: checked ``trainer_state`` entries of the caller (see :func:`check_extra`).
        save_optimizer: include ``optimizer_state`` and the rest of the optimizer state.
        save_scheduler: include ``scheduler_state``.

    Returns:
        The payload dict, ready for ``torch.save``.
    """
    model_state, other_buffers = _model_state(state)
    medfunc_state: dict[str, Any] = {"buffers": other_buffers}
    payload: dict[str, Any] = {"format_version": FORMAT_VERSION, "model_state": model_state}
    if save_optimizer:
        if optimizer_path(state.tx) is not None:
            payload["optimizer_state"] = to_torch_state_dict(
                state.tx, state.opt_state, _trainable(state), state.step, copy=False
            )
        medfunc_state["opt_state"] = OrderedDict(
            tree_leaves_with_path(opt_rest(state.tx, state.opt_state))
        )
    if save_scheduler:
        scheduler = _scheduler_state(state)
        if scheduler is not None:
            payload["scheduler_state"] = scheduler
    payload["scaler_state"] = scaler_state_dict(state.policy, state.loss_scale)
    payload["trainer_state"] = _trainer_state(state, extra)
    if state.ema:
        medfunc_state["ema"] = ema_entry(state)
    payload["medfunc_state"] = medfunc_state
    return payload


def check_extra(extra: Any) -> dict:
    """Refuse ``extra`` unless it is a mapping of string keys that are not reserved names.

    Args:
        extra: the caller's ``extra`` argument of ``save_state`` (``None``: nothing).

    Returns:
        A copy of ``extra`` as a dict.
    """
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"extra must be a dict of plain values, got {type(extra).__name__}")
    for key in extra:
        if not isinstance(key, str):
            raise ConfigError(f"extra keys must be strings, got {key!r}")
        if key in RESERVED_TRAINER_KEYS:
            raise ConfigError(
                f"extra[{key!r}] would overwrite trainer_state[{key!r}], which save_state "
                f"fills from the state; reserved names: {list(RESERVED_TRAINER_KEYS)}"
            )
    return dict(extra)
