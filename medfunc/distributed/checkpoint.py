"""Checkpoints of distributed states: one full file, or a sharded folder.

- :func:`save_full` gathers a sharded state (FSDP DTensors, DeepSpeed's partitioned optimizer)
  into full tensors and writes one ordinary medfunc checkpoint from rank 0
  (:func:`medfunc.checkpoint.save_state`), so a single process, plain PyTorch or another world
  size can read it. Every rank must call it: the gather is a collective.
  :func:`load_full` reads such a file into a (sharded) state on every rank.
- :func:`save_sharded` writes each rank's shards in parallel with
  ``torch.distributed.checkpoint`` (DeepSpeed states: DeepSpeed's own checkpoint).
  :func:`load_sharded` reads it back into any layout: a different world size, or a single
  process with full tensors.

Loading writes into ``like``'s tensors in place (a sharded model has one copy of its weights)
and returns a new state over them; ``like`` is consumed.

Example (a single process here; under ``torchrun`` the same calls run on every rank):
    >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.adamw(1e-3))
    >>> print(mf.distributed.save_full(state, "run/last.pt", extra={"epoch": 3}))
    run/last.pt
    >>> print(mf.distributed.save_sharded(state, "run/step-100"))
    run/step-100
    >>> state = mf.distributed.load_sharded("run/step-100", like=state)
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from medfunc.checkpoint import restore_state, save_state
from medfunc.distributed.deepspeed import deepspeed_engine_of, schedule_of
from medfunc.distributed.env import barrier, collective_guard, is_main_process
from medfunc.errors import CheckpointNotFoundError, ConfigError
from medfunc.optim import find_optimizer
from medfunc.optim.base import get_substate, replace_substate
from medfunc.state import TrainState, tree_leaves_with_path, tree_map

_DS_TAG = "medfunc"


def _full_tensor(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, DTensor) else value


def _trainable_of(state: TrainState, params: OrderedDict) -> OrderedDict:
    return OrderedDict((n, params[n]) for n in state.trainable)


# ------------------------------------------------------------------------------------------------
# DeepSpeed: full optimizer state from the ZeRO partitions and back


def _ds_groups(engine: Any) -> tuple[Any, dict[int, int]]:
    """The ZeRO optimizer and ``id(module param) -> param group index``."""
    zero = engine.optimizer
    index = {id(p): i for i, group in enumerate(zero.bit16_groups) for p in group}
    return zero, index


def _link_optimizer_state(zero: Any) -> None:
    """Point every parameter's fragment mapping at its group's torch optimizer state.

    DeepSpeed links the mappings once, right after the first group's first update, so the
    mappings of later param groups (e.g. the no-weight-decay group) miss their state.
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        if zero.optimizer.state.get(flat):
            lazy_init_hp_params_optimizer_state(group, flat, zero.optimizer.state)


def _ds_keys(spec: Any) -> dict[str, str]:
    if spec.is_adam:
        keys = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
        if spec.amsgrad:
            keys["max_exp_avg_sq"] = "max_exp_avg_sq"
        return keys
    return {"momentum_buffer": "momentum_buffer"} if spec.momentum else {}


def _ds_gather(state: TrainState, engine: Any) -> TrainState:
    """A plain state with DeepSpeed's fp32 weights and optimizer state gathered in full."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if state.tx is None:
        raise ConfigError(
            "save_full of a DeepSpeed state needs the medfunc optimizer it was "
            "built with; use save_sharded for a config-defined optimizer"
        )
    zero, group_of = _ds_groups(engine)
    named = dict(engine.module.named_parameters())
    params = OrderedDict(state.params)
    with collective_guard("gathering DeepSpeed's partitioned weights"):
        for name in state.trainable:
            full = safe_get_full_fp32_param(named[name])
            if full is not None:
                params[name] = full.to(state.params[name].dtype)
    trainable = _trainable_of(state, params)
    opt_state = state.tx.init(OrderedDict((n, p.clone()) for n, p in trainable.items()))
    spec, path = find_optimizer(state.tx)
    sub = get_substate(opt_state, path)
    torch_state = zero.optimizer.state
    started = bool(torch_state) and any(torch_state.values())
    _link_optimizer_state(zero)
    with collective_guard("gathering DeepSpeed's partitioned optimizer state"):
        for field, key in _ds_keys(spec).items():
            for name in trainable:
                if started:
                    getattr(sub, field)[name].copy_(safe_get_full_optimizer_state(named[name], key))
    if spec.is_adam and started:
        flats = zero.single_partition_of_fp32_groups
        for name in trainable:
            step = torch_state[flats[group_of[id(named[name])]]]["step"]
            sub.step[name].copy_(step)
    if not spec.is_adam and started:
        sub.initialized.fill_(1.0)
    return state.replace(params=params, opt_state=replace_substate(opt_state, path, sub))


def _ds_restore(restored: TrainState, engine: Any) -> None:
    """Write a plain state's weights and optimizer state into the DeepSpeed engine."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero, group_of = _ds_groups(engine)
    named = dict(engine.module.named_parameters())
    spec, path = find_optimizer(restored.tx)
    sub = get_substate(restored.opt_state, path)
    base = zero.optimizer
    flats = zero.single_partition_of_fp32_groups
    step_count = int(restored.step)
    for i, flat in enumerate(flats):
        slot = base.state[flat]
        if spec.is_adam:
            slot.setdefault("step", torch.zeros((), dtype=torch.float32))
        for key in _ds_keys(spec).values():
            slot.setdefault(key, torch.zeros_like(flat))
        if spec.is_adam:
            names = [n for n in restored.trainable if group_of[id(named[n])] == i]
            if names:
                slot["step"].copy_(sub.step[names[0]])
    _link_optimizer_state(zero)
    with torch.no_grad():
        for name in restored.trainable:
            param = named[name]
            param.copy_(restored.params[name])
            safe_set_full_fp32_param(param, restored.params[name])
            for field, key in _ds_keys(spec).items():
                safe_set_full_optimizer_state(param, getattr(sub, field)[name], key)
    engine.global_steps = step_count
    engine.global_samples = step_count * engine.train_batch_size()
    scheduler = schedule_of(engine)
    if scheduler is not None:
        scheduler.last_epoch = step_count
        for group, lr in zip(base.param_groups, scheduler.get_lr()):
            group["lr"] = lr


# ------------------------------------------------------------------------------------------------
# full checkpoints


def gather_full_state(state: TrainState) -> TrainState:
    """A copy of ``state`` whose tensors are full (unsharded); a collective on sharded states.

    FSDP DTensors are all-gathered; a DeepSpeed state gets DeepSpeed's fp32 weights and its
    partitioned optimizer state in medfunc's layout. Other states are returned as they are.

    Args:
        state: any state (call on every rank).

    Returns:
        A state that :func:`medfunc.save_state` can write (static parts unchanged).

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.adamw(1e-3))
        >>> full = mf.distributed.gather_full_state(state)
        >>> full is state   # a single-process state is already full
        True
    """
    state.check_alive()
    engine = deepspeed_engine_of(state)
    if engine is not None:
        return _ds_gather(state, engine)
    if not any(isinstance(v, DTensor) for _, v in tree_leaves_with_path(state)):
        return state
    with collective_guard("gathering the sharded state"):
        return tree_map(_full_tensor, state)


def save_full(
    state: TrainState, path: str | Path, *, extra: dict | None = None, **save_options: Any
) -> Path:
    """Write ``state`` as one ordinary checkpoint from rank 0 (every rank must call it).

    Args:
        state: a DDP, FSDP, DeepSpeed or single-process state.
        path: the checkpoint file.
        extra: plain values stored in ``trainer_state`` (see :func:`medfunc.save_state`).
        **save_options: ``save_optimizer`` / ``save_scheduler`` of :func:`medfunc.save_state`.

    Returns:
        The path (on every rank, once the file is complete).

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.adamw(1e-3))
        >>> print(mf.distributed.save_full(state, "run/epoch-3.pt", extra={"epoch": 3}))
        run/epoch-3.pt
    """
    full = gather_full_state(state)
    path = Path(path)
    if is_main_process():
        save_state(full, path, extra=extra, **save_options)
    barrier()
    return path


def _full_template(like: TrainState) -> TrainState:
    """``like`` with every DTensor replaced by an empty full-size tensor (no communication)."""
    engine = deepspeed_engine_of(like)
    if engine is not None:
        trainable = _trainable_of(like, like.params)
        return like.replace(
            opt_state=like.tx.init(
                OrderedDict((n, torch.empty_like(p)) for n, p in trainable.items())
            )
        )

    def empty(value: Any) -> Any:
        if isinstance(value, DTensor):
            return torch.empty(value.shape, dtype=value.dtype, device=value.to_local().device)
        return value

    return tree_map(empty, like)


def _copy_into_(like: TrainState, restored: TrainState) -> None:
    """Copy ``restored``'s full tensors into ``like``'s (sharded) tensors, in place."""
    targets = tree_leaves_with_path(like)
    sources = dict(tree_leaves_with_path(restored))
    with torch.no_grad():
        for name, target in targets:
            source = sources[name]
            if isinstance(target, DTensor):
                local = distribute_tensor(
                    source.to(target.dtype),
                    target.device_mesh,
                    target.placements,
                    src_data_rank=None,
                ).to_local()
                target.to_local().copy_(local)
            elif isinstance(target, torch.Tensor):
                target.copy_(source)


def load_full(path: str | Path, like: TrainState) -> TrainState:
    """Read a full checkpoint (e.g. from :func:`save_full`) into ``like``'s layout, on every rank.

    Every rank reads the file. A sharded ``like`` keeps its sharding: each rank takes its
    slice. ``like`` is consumed (its tensors are overwritten in place).

    Args:
        path: the checkpoint file.
        like: the state to restore into (same model and optimizer; any sharding).

    Returns:
        The restored state.

    Raises:
        CheckpointMismatchError etc.: as :func:`medfunc.restore_state`.

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.adamw(1e-3))
        >>> path = mf.distributed.save_full(state, "run/epoch-3.pt", extra={"epoch": 3})
        >>> state = mf.distributed.load_full("run/epoch-3.pt", like=state)
    """
    like.check_alive()
    engine = deepspeed_engine_of(like)
    sharded = engine is not None or any(isinstance(p, DTensor) for p in like.params.values())
    if not sharded:
        return restore_state(path, like=like)
    restored = restore_state(path, like=_full_template(like))
    if engine is not None:
        with collective_guard("loading a full checkpoint into DeepSpeed"):
            _ds_restore(restored, engine)
        new_state = like.replace(step=restored.step.clone(), rng=restored.rng.clone())
    else:
        _copy_into_(like, restored)
        new_state = like.replace()
    like.mark_consumed()
    return new_state


# ------------------------------------------------------------------------------------------------
# sharded checkpoints


def _group_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _flat(state: TrainState) -> dict[str, Any]:
    return {
        name: leaf for name, leaf in tree_leaves_with_path(state) if isinstance(leaf, torch.Tensor)
    }


def save_sharded(state: TrainState, directory: str | Path) -> Path:
    """Write a sharded checkpoint: every rank writes its own shards, in parallel.

    FSDP, DDP and single-process states use ``torch.distributed.checkpoint`` (replicated
    tensors are written once); DeepSpeed states use ``engine.save_checkpoint``.

    Args:
        state: the state (call on every rank).
        directory: the checkpoint folder (created).

    Returns:
        The folder.

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.adamw(1e-3))
        >>> print(mf.distributed.save_sharded(state, "run/step-500"))
        run/step-500
    """
    state.check_alive()
    directory = Path(directory)
    engine = deepspeed_engine_of(state)
    if engine is not None:
        key, counter = (int(v) for v in state.rng.tolist())
        with collective_guard("DeepSpeed save_checkpoint"):
            engine.save_checkpoint(
                str(directory),
                tag=_DS_TAG,
                client_state={"medfunc_rng": [key, counter], "medfunc_step": int(state.step)},
            )
        return directory
    import torch.distributed.checkpoint as dcp

    with collective_guard("torch.distributed.checkpoint save"):
        dcp.save(_flat(state), checkpoint_id=str(directory), no_dist=not _group_active())
    return directory


def load_sharded(directory: str | Path, like: TrainState) -> TrainState:
    """Read a checkpoint from :func:`save_sharded` into ``like``'s layout.

    A ``torch.distributed.checkpoint`` folder loads on any world size (FSDP shards are
    resliced) and into a single-process state with full tensors. A DeepSpeed checkpoint loads
    into a DeepSpeed state of the same configuration.

    Args:
        directory: the checkpoint folder.
        like: a state of the same model and optimizer (e.g. freshly built); it is consumed.

    Returns:
        The restored state.

    Raises:
        CheckpointNotFoundError: the folder does not exist.

    Example:
        >>> model, tx = torch.nn.Linear(4, 2), mf.optim.adamw(1e-3)
        >>> path = mf.distributed.save_sharded(mf.init_state(model, tx), "run/step-500")
        >>> fresh_state = mf.init_state(torch.nn.Linear(4, 2), tx)
        >>> state = mf.distributed.load_sharded("run/step-500", like=fresh_state)
        >>> torch.equal(state.params["weight"], model.weight)
        True
    """
    like.check_alive()
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointNotFoundError(
            f"sharded checkpoint folder {str(directory)!r} does not "
            "exist; pass the folder save_sharded wrote"
        )
    engine = deepspeed_engine_of(like)
    if engine is not None:
        with collective_guard("DeepSpeed load_checkpoint"):
            loaded, client = engine.load_checkpoint(str(directory), tag=_DS_TAG)
        if loaded is None:
            raise CheckpointNotFoundError(
                f"no DeepSpeed checkpoint with tag {_DS_TAG!r} in {str(directory)!r}"
            )
        new_state = like.replace(
            step=torch.tensor(client["medfunc_step"], dtype=torch.int64, device=like.device),
            rng=torch.tensor(client["medfunc_rng"], dtype=torch.int64),
        )
        like.mark_consumed()
        return new_state
    import torch.distributed.checkpoint as dcp

    with collective_guard("torch.distributed.checkpoint load"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(_flat(like), checkpoint_id=str(directory), no_dist=not _group_active())
    new_state = like.replace()
    like.mark_consumed()
    return new_state
