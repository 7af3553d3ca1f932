"""Worker for tests/distributed/test_dist_timeout.py: under DeepSpeed, rank 1 stops answering in
its forward and rank 0 must raise a DistributedError when $MEDFUNC_DIST_TIMEOUT_S runs out.

Rank 0 writes to $MEDFUNC_TEST_OUT: ``groups.json`` (the timeout, in seconds, of every process
group that exists after DeepSpeed initialised), ``step_started.txt`` (the wall-clock time its
failing step began) and ``failed_after.txt`` (how long that step took). Rank 1 writes its pid to
``hung.pid`` before it sleeps, so the test can end it."""

from __future__ import annotations

import json
import os
import time

import torch
from dist_common import Net, batches, make_tx, out_dir, shard
from torch.distributed import distributed_c10d

from medfunc import distributed as dist
from medfunc.errors import DistributedError

HANG_AT = 2


class SleepyNet(Net):
    """:class:`Net` whose forward sleeps on rank 1 once ``hang`` is set."""

    hang = False

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        if self.hang:
            (out_dir() / "hung.pid").write_text(str(os.getpid()))
            time.sleep(20 * dist.get_info().timeout_s)  # long past rank 0's timeout, yet bounded
        return super().forward(x, labels)


def group_timeouts() -> dict[str, float]:
    """The timeout of every live process group's CPU backend, by group name."""
    cpu = torch.device("cpu")
    return {
        distributed_c10d._get_process_group_name(group): group._get_backend(
            cpu
        ).options._timeout.total_seconds()
        for group in distributed_c10d._world.pg_map
    }


def main() -> None:
    info = dist.init()
    torch.manual_seed(0)
    model = SleepyNet()
    state = dist.deepspeed_state(
        model, make_tx(), {"zero_optimization": {"stage": 2}}, micro_batch_size=4
    )
    if info.rank == 0:
        (out_dir() / "groups.json").write_text(json.dumps(group_timeouts()))
    for i, batch in enumerate(batches()):
        model.hang = info.rank == 1 and i == HANG_AT
        if info.rank == 0 and i == HANG_AT:
            (out_dir() / "step_started.txt").write_text(f"{time.time():.3f}")
        started = time.monotonic()
        try:
            state, _ = dist.deepspeed_step(state, shard(batch, info.rank, info.world_size))
        except DistributedError:
            (out_dir() / "failed_after.txt").write_text(f"{time.monotonic() - started:.3f}")
            raise
    dist.shutdown()


if __name__ == "__main__":
    main()
