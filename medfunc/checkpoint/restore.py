"""Checkpoint payload -> TrainState: every tensor checked against the state it restores into.

Keys, shapes and dtypes are compared with a ``like`` state (given, or built with
:func:`medfunc.init_state`); a difference raises :class:`CheckpointMismatchError` naming the key.

With ``donate=True`` the checkpoint is written into ``like``'s own tensors: everything is checked
first (the file's CRC-32 included, through a few small buffers, and every tensor against its
``like`` tensor), then the tensor records are read straight into ``like``'s storage, so a resume
holds one copy of the state.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optree
import torch
from torch import Tensor

from medfunc.accumulation import WindowGrads
from medfunc.checkpoint.ema import restore_ema, saved_ema_decay
from medfunc.checkpoint.frozen import fill_frozen_base
from medfunc.checkpoint.payload import opt_rest, optimizer_path, state_dict_layout
from medfunc.checkpoint.reading import (
    DeferredRecords,
    deferred_payload,
    read_payload,
    validate_payload,
)
from medfunc.errors import CheckpointCorruptError, CheckpointMismatchError, ConfigError
from medfunc.optim import from_torch_state_dict
from medfunc.optim.base import get_substate, replace_substate
from medfunc.precision import Policy, get_policy, scaler_from_state_dict
from medfunc.state import (
    LEAF_FIELDS,
    PYTREE_NAMESPACE,
    AccumState,
    TrainState,
    init_state,
    tree_flatten,
    tree_leaves_with_path,
)

__all__ = ["restore_state"]


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
    file straight onto that device): then they are the state's tensors themselves, the optimizer
    moments included. With ``into_like``, model values are instead copied into ``like``'s own
    tensors (the module's storage) and those are kept.
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

    def kept(self, tree: Any) -> Any:
        """``like``'s own values of a part the checkpoint lacks: a copy."""
        return optree.tree_map(torch.clone, tree, namespace=PYTREE_NAMESPACE)


class _Checking(_Taker):
    """Takes every checked checkpoint tensor as it is (no copy, no move): the restored state
    only pairs each one with its ``like`` tensor, which :func:`_donate` then fills."""

    def __init__(self) -> None:
        super().__init__(owned=True)

    def __call__(self, found: Tensor, expected: Tensor) -> Tensor:
        return found

    def model_value(self, found: Tensor, expected: Tensor) -> Tensor:
        return found

    def kept(self, tree: Any) -> Any:
        return tree


def _restore_model(
    payload: dict, like: TrainState, take: _Taker, source: str
) -> tuple[OrderedDict, OrderedDict]:
    model_state = payload["model_state"]
    layout = OrderedDict((k, owner) for k, (owner, _) in state_dict_layout(like.module).items())
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
            values["buffers"][name] = expected if take.into_like else take.kept(expected)
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
        return take.kept(like.opt_state)
    trainable = OrderedDict((n, params[n]) for n in like.trainable)
    path = optimizer_path(like.tx)
    if has_torch:
        if path is None:
            raise CheckpointMismatchError(
                f"optimizer_state: the checkpoint holds a torch.optim state but the state's "
                f"transformation has no adamw/adam/sgd (checkpoint {source})"
            )
        try:
            opt_state = from_torch_state_dict(
                like.tx, payload["optimizer_state"], trainable, copy=not take.owned
            )
        except ConfigError as error:
            raise CheckpointMismatchError(
                f"optimizer_state: {error} (checkpoint {source})"
            ) from error
    else:
        opt_state = like.tx.init(trainable)
    if rest is None:
        return opt_state
    template = opt_rest(like.tx, opt_state)
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


def _window_used(saved: Any, like: TrainState, source: str) -> list[str]:
    """The parameters the saved window differentiated, in model order (all of them for a
    checkpoint written before ``used`` was saved)."""
    if saved is None:
        return list(like.accum.grads)
    if not isinstance(saved, (list, tuple)) or not all(isinstance(n, str) for n in saved):
        raise CheckpointMismatchError(
            f"trainer_state['accumulation']['used'] must be a list of parameter names, got "
            f"{type(saved).__name__} (checkpoint {source})"
        )
    return [n for n in like.accum.grads if n in set(saved)]


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
    used = _window_used(acc.get("used"), like, source)
    return AccumState(
        grads=WindowGrads(restored, used),
        count=torch.tensor(count, dtype=torch.int64),
        loss_sum=take(loss_sum, like.accum.loss_sum),
    )


def _restore_into(payload: dict, like: TrainState, take: _Taker, source: str) -> TrainState:
    payload = fill_frozen_base(payload, like, source)
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
        ema=restore_ema(payload, like, params, take, source),
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


def _check_builder(like: TrainState | None, builder: Mapping[str, Any]) -> None:
    """Refuse ``like=`` together with builder arguments, or neither ``like`` nor model and tx."""
    if like is not None:
        given = [k for k, v in builder.items() if v is not None]
        if given:
            raise ConfigError(
                f"restore_state got like= and {given}; pass either like=state or model= and tx="
            )
        like.check_alive()
    elif builder["model"] is None or builder["tx"] is None:
        raise ConfigError("restore_state needs like=state, or model= and tx= to build one")


def _load(
    path_or_payload: str | os.PathLike | Mapping[str, Any], target: torch.device
) -> tuple[dict, bool, str]:
    """The validated payload, whether its tensors are ours to keep, and its name for messages.

    A file is read straight onto ``target``: its tensors are fresh and become the restored
    state's own (nothing is copied again). A given payload belongs to the caller and is copied.
    """
    if isinstance(path_or_payload, Mapping):
        payload = validate_payload(dict(path_or_payload), Path("<payload>"))
        return payload, False, "payload"
    payload = read_payload(path_or_payload, target, mmap=False)
    return payload, True, str(path_or_payload)


def _fresh_like(payload: dict, builder: Mapping[str, Any]) -> TrainState:
    """``init_state`` from the builder arguments; precision, seed and accumulation default to
    the checkpoint's."""
    trainer = payload["trainer_state"]
    precision = builder["precision"]
    accumulate_steps = builder["accumulate_steps"]
    return init_state(
        builder["model"],
        builder["tx"],
        loss_fn=builder["loss_fn"],
        precision=precision if precision is not None else _policy_from(payload),
        seed=int(trainer["rng"][0]),
        accumulate_steps=(
            accumulate_steps
            if accumulate_steps is not None
            else int(trainer.get("accumulate_steps", 1))
        ),
        ema_decay=saved_ema_decay(payload),
        device=builder["device"],
    )


def _pairs(restored: Any, like: Any) -> list[tuple[Tensor, Tensor]] | None:
    """``(restored leaf, like leaf)`` of one field in leaf order, or None where the two do not
    pair up leaf for leaf (count, shape, dtype)."""
    found, _ = tree_flatten(restored)
    expected, _ = tree_flatten(like)
    if len(found) != len(expected):
        return None
    for r, e in zip(found, expected):
        if not (isinstance(r, Tensor) and isinstance(e, Tensor)):
            return None
        if r.shape != e.shape or r.dtype != e.dtype:
            return None
    return list(zip(found, expected))


def _fill(pairs: list[tuple[Tensor, Tensor]], records: DeferredRecords | None) -> None:
    """Write every restored leaf's values into its ``like`` leaf.

    A value held in the storage of another ``like`` leaf (a payload dict built from ``like``'s
    own tensors) is copied aside first, so no write overwrites a value still to be read.
    """
    targets = {t.untyped_storage().data_ptr() for _, t in pairs if t.numel()}
    pairs = [(found, target) for found, target in pairs if found is not target]
    aside = [
        found.clone() if found.numel() and found.untyped_storage().data_ptr() in targets else found
        for found, _ in pairs
    ]
    with torch.no_grad():
        for found, (_, target) in zip(aside, pairs):
            if records is not None and records.holds(found):
                records.fill(target, found)
            else:
                target.copy_(found)


def restore_donated(path: str | os.PathLike, like: TrainState) -> tuple[TrainState, dict]:
    """``restore_state(path, like=like, donate=True)``, and the payload it restored.

    For a caller that also needs the checkpoint's other entries (the Trainer's loop position in
    ``trainer_state``): the payload's tensors are views of the file whose bytes were checked,
    not read; read nothing but its non-tensor entries.

    Args:
        path: the checkpoint file.
        like: the state to restore into (consumed, see :func:`restore_state`).

    Returns:
        ``(state, payload)``.
    """
    with deferred_payload(path) as (payload, records):
        return _donate(payload, like, records, str(path)), payload


def _donate(
    payload: dict, like: TrainState, records: DeferredRecords | None, source: str
) -> TrainState:
    """The checked restore of ``payload`` with ``like``'s tensors as its own (see
    :func:`restore_state`, ``donate``); ``like`` is consumed.

    Nothing is written into ``like`` until every check passed. A leaf that does not pair with a
    ``like`` leaf (a field whose structure the checkpoint changes) is read into memory of its own.
    """
    restored = _restore_into(payload, like, _Checking(), source)
    fields: dict[str, Any] = {}
    fills: list[tuple[Tensor, Tensor]] = []
    for name in LEAF_FIELDS:
        value = getattr(restored, name)
        pairs = _pairs(value, getattr(like, name))
        leaves, treedef = tree_flatten(value)
        if pairs is None:
            if records is not None:
                leaves = [records.materialize(x) if records.holds(x) else x for x in leaves]
        else:
            fills.extend(pairs)
            leaves = [target for _, target in pairs]
        fields[name] = optree.tree_unflatten(treedef, leaves)
    try:
        _fill(fills, records)
    except BaseException as error:
        like.mark_consumed()
        note = (
            f"like was partly overwritten while checkpoint {source} was written into it, and "
            "is consumed: build a fresh state and restore again"
        )
        if isinstance(error, CheckpointCorruptError):
            raise CheckpointCorruptError(f"{error}; {note}") from error
        error.add_note(note)
        raise
    result = restored.replace(**fields)
    like.mark_consumed()
    return result


def restore_state(
    path_or_payload: str | os.PathLike | Mapping[str, Any],
    like: TrainState | None = None,
    *,
    donate: bool = False,
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

    With ``like`` and ``donate=True``: the result's tensors are ``like``'s own (parameters,
    buffers, optimizer state, loss scale, EMA, accumulation sums), filled from the checkpoint,
    so a resume holds one copy of the state and ``like``'s module holds the checkpoint's
    weights. ``like`` is consumed (using it raises :class:`ConsumedStateError`, as after a
    donating step). Everything is checked before the first byte is written into ``like``
    (for a file: every record's CRC-32, read through a few 4 MiB buffers, then the tensor
    records are read straight into ``like``'s CPU storage); a check that fails leaves ``like``
    as it was and usable.

    Without ``like``: the state is built with ``init_state(model, tx, ...)`` (precision,
    accumulate_steps and ema_decay default to the checkpoint's) and, as ``init_state`` does,
    shares storage with ``model``, which then holds the checkpoint's values.

    Parts the checkpoint lacks: no ``optimizer_state`` (``save_optimizer=False``) keeps
    ``like``'s optimizer state (a copy; fresh for a fresh ``like``); an empty ``scaler_state``
    keeps ``like``'s loss scale; no ``medfunc_state['ema']`` starts ``like``'s EMA afresh from
    the restored parameters. The LR position is ``trainer_state['global_step']``.

    Args:
        path_or_payload: a checkpoint file, or a payload from :func:`read_checkpoint`.
        like: the state to restore into (e.g. the fresh ``init_state`` of the same model).
        donate: write the checkpoint into ``like``'s tensors and consume ``like`` (only with
            ``like``).
        model: build the state instead of ``like``, from this model (see
            :func:`medfunc.init_state`).
        tx: the gradient transformation of the built state.
        loss_fn: the built state's ``loss_fn``.
        precision: the built state's precision (default: the checkpoint's).
        accumulate_steps: the built state's accumulation (default: the checkpoint's).
        device: where the built state lives (default: the model's device).

    Returns:
        The restored state.

    Raises:
        CheckpointMismatchError: the checkpoint does not fit (the message names the key).
        ConfigError: neither ``like`` nor ``model`` and ``tx`` were given, or both were, or
            ``donate`` without ``like``.
        CheckpointNotFoundError: see :func:`read_checkpoint`.
        CheckpointCorruptError: see :func:`read_checkpoint`.
        UnsafeCheckpointError: see :func:`read_checkpoint`.
        CheckpointVersionError: see :func:`read_checkpoint`.

    Example:
        >>> model, tx = torch.nn.Linear(4, 2), mf.optim.adamw(1e-3)
        >>> path = mf.save_state(mf.init_state(model, tx, precision="fp16"), "step-100.pt")
        >>> state = mf.init_state(model, tx, precision="fp16")
        >>> state = mf.restore_state(path, like=state)
        >>> int(state.step), state.policy.name
        (0, 'fp16')
    """
    builder = {
        "model": model,
        "tx": tx,
        "loss_fn": loss_fn,
        "precision": precision,
        "accumulate_steps": accumulate_steps,
        "device": device,
    }
    _check_builder(like, builder)
    if donate and like is None:
        raise ConfigError(
            "restore_state(donate=True) writes into like=state; pass like=, or drop donate (a "
            "state built from model= already shares the model's storage)"
        )
    if donate:
        if not isinstance(path_or_payload, Mapping):
            return restore_donated(path_or_payload, like)[0]
        payload, _, source = _load(path_or_payload, like.device)
        return _donate(payload, like, None, source)
    if like is not None:
        payload, owned, source = _load(path_or_payload, like.device)
        return _restore_into(payload, like, _Taker(owned), source)
    target = torch.device(device) if device is not None else _model_device(model)
    payload, owned, source = _load(path_or_payload, target)
    fresh = _fresh_like(payload, builder)
    return _restore_into(payload, fresh, _Taker(owned, into_like=True), source)
