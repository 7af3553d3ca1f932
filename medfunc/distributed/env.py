"""The torchrun environment, process-group set-up and small collective helpers.

``init()`` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set
by ``torchrun``), picks NCCL on CUDA and Gloo on CPU, and joins the process group with a finite
timeout. Without those variables (or with ``WORLD_SIZE=1``) it is a no-op that reports rank 0 of 1,
so the same script runs unchanged under ``python`` and under ``torchrun``. Every helper below
works in both cases.

Collectives run inside :func:`collective_guard`: a peer that died or stopped answering turns into
a :class:`~medfunc.errors.DistributedError` saying which rank probably failed and what to do,
rather than a bare backend error or a hang.

Example:
    >>> info = init()
    >>> info.rank, info.world_size
    (0, 1)
    >>> val_loss_stalled = True
    >>> agree(val_loss_stalled, op="any")   # the same answer on every rank
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from medfunc.errors import ConfigError, DistributedError

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "MEDFUNC_DIST_TIMEOUT_S"
_BACKENDS = ("gloo", "nccl")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes (1 in a single process).
        local_rank: rank on this machine (selects the CUDA device).
        device: the device this process trains on (``cuda:<local_rank>`` or ``cpu``).
        backend: the process-group backend, or ``None`` in a single process.
        timeout_s: the collective timeout in seconds, or ``None`` in a single process.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None
    timeout_s: float | None = None

    @property
    def is_main_process(self) -> bool:
        """True on rank 0."""
        return self.rank == 0


_info: DistInfo | None = None
# torch's own default timeouts for new groups, while :func:`init` has replaced them.
_torch_defaults: dict[str, datetime.timedelta] = {}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(
            f"environment variable {name}={raw!r} is not an integer; launch with torchrun, "
            "which sets RANK, WORLD_SIZE and LOCAL_RANK"
        ) from None


def _default_device(local: int, backend: str | None) -> torch.device:
    if torch.cuda.is_available() and backend != "gloo":
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _resolve_timeout(timeout_s: float | None) -> float:
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw:
            try:
                timeout_s = float(raw)
            except ValueError:
                raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds") from None
        else:
            timeout_s = DEFAULT_TIMEOUT_S
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def init(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the torchrun process group (idempotent); a no-op in a single process.

    Args:
        backend: "nccl" or "gloo"; default NCCL when CUDA is available, else Gloo.
        timeout_s: how long a collective may wait for a peer before it fails with
            :class:`DistributedError` (default: env ``MEDFUNC_DIST_TIMEOUT_S`` or 600 s).

    Returns:
        The :class:`DistInfo` of this process. Later calls return the same object.

    Raises:
        DistributedError: the torchrun variables are inconsistent or the group cannot be formed.

    Example:
        >>> info = mf.distributed.init(timeout_s=120)
        >>> batch = mf.data.to_device({"x": torch.ones(2, 4)}, info.device)
        >>> batch["x"].device.type == info.device.type
        True
    """
    global _info
    if _info is not None:
        return _info
    if backend is not None and backend not in _BACKENDS:
        raise ConfigError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    world = _env_int("WORLD_SIZE", 1)
    rank_ = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank_)
    if dist.is_available() and dist.is_initialized():
        timeout = _joined_timeout(timeout_s)
        _default_new_groups_to(timeout)
        _info = DistInfo(
            dist.get_rank(),
            dist.get_world_size(),
            local,
            _default_device(local, dist.get_backend()),
            dist.get_backend(),
            timeout,
        )
        return _info
    if world <= 1:
        _info = DistInfo(0, 1, 0, _default_device(0, backend))
        return _info
    if not 0 <= rank_ < world:
        raise DistributedError(f"RANK={rank_} is outside [0, WORLD_SIZE={world})")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with "
            "`torchrun --nproc_per_node=N script.py`, which sets the rendezvous variables"
        )
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed support")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend='nccl' needs CUDA; use backend='gloo' (or None) on CPU")
    timeout = _resolve_timeout(timeout_s)
    device = _default_device(local, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=timeout), rank=rank_, world_size=world
        )
    except (RuntimeError, ValueError) as err:
        raise DistributedError(
            f"rank {rank_} of {world} could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout:g} s: "
            f"{err}. Check that every rank was started and the port is free."
        ) from err
    _default_new_groups_to(timeout)
    _info = DistInfo(rank_, world, local, device, backend, timeout)
    return _info


def _joined_timeout(timeout_s: float | None) -> float:
    """The collective timeout of a process group someone else joined before :func:`init`.

    A timeout given to :func:`init` (or in ``MEDFUNC_DIST_TIMEOUT_S``) is applied to every
    existing group; otherwise the world group keeps the timeout it was created with, and that is
    the job's timeout (torch's default when it cannot be read).
    """
    from torch.distributed import distributed_c10d

    if timeout_s is not None or os.environ.get(TIMEOUT_ENV):
        timeout = _resolve_timeout(timeout_s)
        for group in list(distributed_c10d._world.pg_map):
            if not distributed_c10d._rank_not_in_group(group):
                distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout), group)
        return timeout
    world_group = distributed_c10d._get_default_group()
    for device_type in world_group._device_types:
        with contextlib.suppress(AttributeError, RuntimeError):
            return world_group._get_backend(device_type).options._timeout.total_seconds()
    return distributed_c10d._get_default_timeout(dist.get_backend()).total_seconds()


def _default_new_groups_to(timeout: float) -> None:
    """Give every process group created later without a timeout the job's ``timeout``.

    ``torch.distributed.new_group(ranks)`` gives such a group torch's default timeout (30 min for
    Gloo, 10 min for NCCL), not the world group's, and DeepSpeed creates all of its groups that
    way (``deepspeed.comm.new_group`` has no timeout argument): with ``timeout=15`` a hung peer
    held the others for 1800 s in DeepSpeed's gradient all-reduce. torch reads these module
    defaults each time it creates a group, so setting them here covers DeepSpeed, device meshes
    and user groups alike; :func:`shutdown` restores torch's values.
    """
    from torch.distributed import distributed_c10d

    delta = datetime.timedelta(seconds=timeout)
    _torch_defaults.setdefault("default_pg_timeout", distributed_c10d.default_pg_timeout)
    distributed_c10d.default_pg_timeout = delta
    if distributed_c10d.default_pg_nccl_timeout is not None:  # None: built without NCCL
        _torch_defaults.setdefault(
            "default_pg_nccl_timeout", distributed_c10d.default_pg_nccl_timeout
        )
        distributed_c10d.default_pg_nccl_timeout = delta


def ensure_process_group() -> None:
    """Make sure a process group exists: in a single process, a one-rank group on a HashStore.

    Libraries such as DeepSpeed need ``torch.distributed`` initialized even on one device; this
    needs no network port. After :func:`init` in a multi-process job it does nothing.
    """
    info = get_info()
    if dist.is_initialized():
        return
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def get_info() -> DistInfo:
    """The current :class:`DistInfo` (calls :func:`init` if nobody has yet).

    Example:
        >>> mf.distributed.get_info().world_size
        1
    """
    return _info if _info is not None else init()


def is_distributed() -> bool:
    """True when a process group with more than one rank is active.

    Example:
        >>> mf.distributed.is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 when not distributed)."""
    return _info.local_rank if _info is not None else _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files.

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1))
        >>> if mf.distributed.is_main_process():
        ...     path = mf.save_state(state, "best.pt")
    """
    return rank() == 0


def shard_indices(
    n: int, *, drop_last: bool = True, rank_: int | None = None, world: int | None = None
) -> range:
    """The contiguous slice of ``range(n)`` this rank should take.

    Args:
        n: number of examples.
        drop_last: equal slices of ``n // world`` (the tail is dropped), as training needs for
            an exact mean over ranks; False: slices differing by at most one that cover all
            ``n`` (for evaluation with summed metrics).
        rank_: the rank (default: this process's).
        world: the world size (default: this job's).

    Returns:
        A ``range`` of indices.

    Example:
        >>> shard_indices(11, rank_=1, world=2)
        range(5, 10)
        >>> shard_indices(11, drop_last=False, rank_=1, world=2)
        range(5, 11)
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if drop_last:
        per_rank = n // world
        return range(rank_ * per_rank, (rank_ + 1) * per_rank)
    return range(rank_ * n // world, (rank_ + 1) * n // world)


def _likely_failed_ranks() -> str:
    me, world = rank(), world_size()
    others = [r for r in range(world) if r != me]
    if len(others) == 1:
        return f"rank {others[0]}"
    return f"one of ranks {others}"


@contextlib.contextmanager
def collective_guard(what: str) -> Iterator[None]:
    """Turn a backend failure inside the block into a :class:`DistributedError`.

    Args:
        what: the collective's name, for the message (e.g. "gradient all-reduce").

    Example (in a ``torchrun`` job)::

        with collective_guard("all_reduce of the loss"):
            torch.distributed.all_reduce(loss)
    """
    started = time.monotonic()
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:
        timeout = _info.timeout_s if _info is not None and _info.timeout_s else None
        waited = f" after {time.monotonic() - started:.1f} s"
        if timeout:
            waited += f" (timeout {timeout:g} s)"
        raise DistributedError(
            f"{what} failed on rank {rank()} of {world_size()}{waited}: a peer process probably "
            f"died or stopped responding, most likely {_likely_failed_ranks()}. Check that "
            "rank's log for its first error (out of memory, an exception, a kill), fix it and "
            f"restart from the last checkpoint. Backend error: {str(err).strip()[:500]}"
        ) from err


def _flat_groups(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def reduce_tensors_(tensors: list[torch.Tensor], what: str = "all_reduce") -> None:
    """Sum ``tensors`` across ranks in place: one flat all-reduce per (device, dtype) group.

    Args:
        tensors: tensors to reduce (same shapes and order on every rank).
        what: name for error messages.
    """
    if not is_distributed() or not tensors:
        return
    device = get_info().device
    with collective_guard(what):
        for indices in _flat_groups(tensors).values():
            group = [tensors[i] for i in indices]
            flat = torch.cat([t.reshape(-1) for t in group]).to(device)
            dist.all_reduce(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def _reduce(value: Any, mean: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return _reduce({"v": value}, mean)["v"]
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a tensor or a mapping of tensors, got {type(value).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, t in value.items():
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"value {key!r} must be a tensor, got {type(t).__name__}")
        t = t.detach().clone()
        if mean and not (t.is_floating_point() or t.is_complex()):
            t = t.double()
        out[key] = t
    reduce_tensors_(list(out.values()), "all_reduce_mean" if mean else "all_reduce_sum")
    if mean:
        n = world_size()
        out = {k: t / n for k, t in out.items()}
    return type(value)(out) if type(value) is not dict else out


def all_reduce_sum(value: torch.Tensor | Mapping[str, torch.Tensor]) -> Any:
    """The sum over ranks of a tensor or a dict of tensors (new tensors; inputs untouched).

    Args:
        value: a tensor or a mapping name -> tensor (e.g. a metrics dict).

    Returns:
        The same structure holding the sums (a copy in a single process).

    Example:
        >>> correct, seen = torch.tensor(45), torch.tensor(50)   # this rank's counts
        >>> mf.distributed.all_reduce_sum({"correct": correct, "seen": seen})
        {'correct': tensor(45), 'seen': tensor(50)}
    """
    return _reduce(value, mean=False)


def all_reduce_mean(value: torch.Tensor | Mapping[str, torch.Tensor]) -> Any:
    """The mean over ranks of a tensor or a dict of tensors (SUM, then divide by world size).

    Integer tensors are averaged in float64.

    Args:
        value: a tensor or a mapping name -> tensor.

    Returns:
        The same structure holding the means (a copy in a single process).

    Example:
        >>> metrics = {"loss": torch.tensor(0.25), "correct": torch.tensor(3)}
        >>> mf.distributed.all_reduce_mean(metrics)   # e.g. before logging on rank 0
        {'loss': tensor(0.2500), 'correct': tensor(3., dtype=torch.float64)}
    """
    return _reduce(value, mean=True)


def agree(flag: bool, op: str = "any") -> bool:
    """Agree on a loop decision across ranks, so that no rank leaves a loop the others stay in.

    Args:
        flag: this rank's vote.
        op: "any" (True if any rank votes True) or "all" (True only if every rank does).

    Returns:
        The agreed decision, the same on every rank.

    Example:
        >>> for epoch in range(100):
        ...     patience_exhausted = epoch == 3
        ...     if mf.distributed.agree(patience_exhausted, op="any"):
        ...         break   # every rank breaks at the same epoch
        >>> epoch
        3
    """
    if op not in ("any", "all"):
        raise ConfigError(f"op must be 'any' or 'all', got {op!r}")
    if not is_distributed():
        return bool(flag)
    vote = torch.tensor([1 if flag else 0], dtype=torch.int32, device=get_info().device)
    reduce_op = dist.ReduceOp.MAX if op == "any" else dist.ReduceOp.MIN
    with collective_guard(f"agree(op={op!r})"):
        dist.all_reduce(vote, op=reduce_op)
    return bool(vote.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank.

    Args:
        obj: the object (ignored on ranks other than ``src``).
        src: the sending rank.

    Returns:
        ``src``'s object, on every rank.

    Example:
        >>> mf.distributed.broadcast_object("run-42")   # rank 0's name on every rank
        'run-42'
    """
    if not is_distributed():
        return obj
    holder = [obj if rank() == src else None]
    with collective_guard("broadcast_object"):
        dist.broadcast_object_list(holder, src=src, device=_object_device())
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order.

    Example:
        >>> my_shard = shard_indices(11)
        >>> mf.distributed.all_gather_object(len(my_shard))
        [11]
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    with collective_guard("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def _object_device() -> torch.device | None:
    return get_info().device if dist.get_backend() == "nccl" else None


def barrier() -> None:
    """Wait until every rank arrives (a no-op in a single process).

    Example:
        >>> mf.distributed.barrier()
    """
    if not is_distributed():
        return
    with collective_guard("barrier"):
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[get_info().device.index or 0])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (e.g. preparing a data cache).

    Example:
        >>> with mf.distributed.main_process_first():   # rank 0 builds, the others reuse
        ...     os.makedirs("cache", exist_ok=True)
    """
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def shutdown() -> None:
    """Leave the process group (idempotent; a no-op in a single process).

    Example:
        >>> mf.distributed.shutdown()
    """
    global _info
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _torch_defaults:
        from torch.distributed import distributed_c10d

        for name, value in _torch_defaults.items():
            setattr(distributed_c10d, name, value)
    _torch_defaults.clear()
    _info = None
