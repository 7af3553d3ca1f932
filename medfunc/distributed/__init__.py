"""Multi-process training: torchrun environment, DDP, FSDP2 and DeepSpeed adapters.

Every adapter is one line of set-up around the same ``mf.train_step(state, batch)`` loop:

- :func:`init` reads the torchrun environment and joins the process group (a no-op returning
  rank 0 of 1 in a single process).
- :func:`data_parallel` makes a replicated state whose step all-reduces (averages) the gradients.
- :func:`fully_shard_state` builds a state over an FSDP2 ``fully_shard`` module (sharded
  parameters, gradients and optimizer state).
- :func:`deepspeed_state` wraps the model in a DeepSpeed ZeRO engine, and :func:`deepspeed_step`
  runs a step through it (falls back to DDP with a warning when DeepSpeed is not installed;
  :func:`step_for` returns the step function that fits a state).
- :func:`save_full` / :func:`load_full` write and read an ordinary single-file checkpoint from a
  sharded state (:func:`gather_full_state` gives the full state itself);
  :func:`save_sharded` / :func:`load_sharded` use ``torch.distributed.checkpoint`` and restore
  on any world size.
- Collective helpers (:func:`all_reduce_mean`, :func:`agree`, :func:`broadcast_object`, ...) raise
  :class:`~medfunc.errors.DistributedError` instead of hanging when a peer dies.

Example (``train.py``, run with ``torchrun --nproc_per_node=2 train.py``)::

    import medfunc as mf

    info = mf.distributed.init()
    state = mf.distributed.data_parallel(mf.init_state(model, mf.optim.adamw(1e-3)))
    for batch in my_shard_of_the_data:
        state, metrics = mf.train_step(state, batch, donate=True)
    if mf.distributed.is_main_process():
        mf.save_state(state, "last.pt")
    mf.distributed.shutdown()
"""

from medfunc.distributed.checkpoint import (
    gather_full_state,
    load_full,
    load_sharded,
    save_full,
    save_sharded,
)
from medfunc.distributed.ddp import check_in_sync, data_parallel
from medfunc.distributed.deepspeed import (
    deepspeed_available,
    deepspeed_engine_of,
    deepspeed_state,
    deepspeed_step,
    step_for,
)
from medfunc.distributed.env import (
    DistInfo,
    agree,
    all_gather_object,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    get_info,
    init,
    is_distributed,
    is_main_process,
    local_rank,
    main_process_first,
    rank,
    shard_indices,
    shutdown,
    world_size,
)
from medfunc.distributed.fsdp import fully_shard_state, is_fsdp_state

__all__ = [
    "DistInfo",
    "agree",
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "check_in_sync",
    "data_parallel",
    "deepspeed_available",
    "deepspeed_engine_of",
    "deepspeed_step",
    "deepspeed_state",
    "fully_shard_state",
    "gather_full_state",
    "get_info",
    "init",
    "is_distributed",
    "is_fsdp_state",
    "is_main_process",
    "load_full",
    "load_sharded",
    "local_rank",
    "main_process_first",
    "rank",
    "save_full",
    "save_sharded",
    "shard_indices",
    "shutdown",
    "step_for",
    "world_size",
]
