"""Worker for tests/test_distributed.py: rank 1 dies mid-run (os._exit or SIGKILL); rank 0 must
fail with a DistributedError instead of hanging. Usage: kill_worker.py exit|sigkill"""

from __future__ import annotations

import os
import signal
import sys

from common import batches, make_model, make_tx, shard

import medfunc as mf
from medfunc import distributed as dist

DIE_AT = 3


def main() -> None:
    how = sys.argv[1]
    info = dist.init(timeout_s=float(os.environ["MEDFUNC_DIST_TIMEOUT_S"]))
    state = dist.data_parallel(mf.init_state(make_model(), make_tx()))
    for i, batch in enumerate(batches()):
        if info.rank == 1 and i == DIE_AT:
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(7)
        state, _ = mf.train_step(state, shard(batch, info.rank, info.world_size), donate=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
