"""Worker for tests/distributed/test_distributed.py: rank 1 fails mid-run and rank 0 must raise a
DistributedError instead of hanging. Usage: kill_worker.py exit|sigkill|hang

exit / sigkill: rank 1 dies (``os._exit`` / SIGKILL); hang: rank 1 stops answering (sleeps), so
rank 0 fails only when the collective timeout ($MEDFUNC_DIST_TIMEOUT_S) runs out. Rank 0 writes
how long its failing step took to $MEDFUNC_TEST_OUT/failed_after.txt."""

from __future__ import annotations

import os
import signal
import sys
import time

from dist_common import batches, make_model, make_tx, out_dir, shard

import medfunc as mf
from medfunc import distributed as dist
from medfunc.errors import DistributedError

FAIL_AT = 3


def main() -> None:
    how = sys.argv[1]
    info = dist.init(timeout_s=float(os.environ["MEDFUNC_DIST_TIMEOUT_S"]))
    state = dist.data_parallel(mf.init_state(make_model(), make_tx()))
    for i, batch in enumerate(batches()):
        if info.rank == 1 and i == FAIL_AT:
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "hang":
                (out_dir() / "hung.pid").write_text(str(os.getpid()))
                time.sleep(5 * info.timeout_s)  # long past rank 0's timeout, yet bounded
            os._exit(7)
        started = time.monotonic()
        try:
            state, _ = mf.train_step(state, shard(batch, info.rank, info.world_size), donate=True)
        except DistributedError:
            (out_dir() / "failed_after.txt").write_text(f"{time.monotonic() - started:.3f}")
            raise
    dist.shutdown()


if __name__ == "__main__":
    main()
