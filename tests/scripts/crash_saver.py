"""Kill processes that save checkpoints in a loop with SIGKILL at random moments.

For each trial a child process (forked from this one, so it starts at once) saves a different
state every iteration to ``FOLDER/trial-<n>/ckpt.pt``: every parameter, every optimizer moment
and the global step hold the iteration number, and ``trainer_state['marker']`` repeats it. Once
its first save is complete the child tells this process, which waits a seeded random delay and
kills it with SIGKILL. The test then checks each folder.

Usage:
    python crash_saver.py FOLDER TRIALS SEED
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

import medfunc as mf
from medfunc.checkpoint import save_state

MAX_DELAY_S = 0.4


def marked_state(state: mf.TrainState, marker: int) -> mf.TrainState:
    """``state`` with every params/opt_state value and the step set to ``marker``."""
    return state.replace(
        params=mf.tree_map(lambda t: torch.full_like(t, marker), state.params),
        opt_state=mf.tree_map(lambda t: torch.full_like(t, marker), state.opt_state),
        step=torch.tensor(marker, dtype=torch.int64),
    )


def make_state() -> mf.TrainState:
    """An MLP state of about 6 MB (params and AdamW moments)."""
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 8))
    return mf.init_state(model, mf.optim.adamw(1e-3))


def save_forever(path: Path, ready: int) -> None:
    """The child: save marked states until killed."""
    state = make_state()
    marker = 1
    while True:
        save_state(marked_state(state, marker), path, extra={"marker": marker})
        if marker == 1:
            os.write(ready, b"1")
            os.close(ready)
        marker += 1


def main(folder: Path, trials: int, seed: int) -> None:
    # One thread (no OpenMP pool to inherit across fork), and one save here first so that the
    # children do not each pay torch's lazy imports before their first save.
    torch.set_num_threads(1)
    warm_up = folder / "warm-up"
    save_state(make_state(), warm_up / "ckpt.pt")
    shutil.rmtree(warm_up)
    rng = random.Random(seed)
    for trial in range(trials):
        path = folder / f"trial-{trial}" / "ckpt.pt"
        path.parent.mkdir(parents=True)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                save_forever(path, write_end)
            finally:
                os._exit(1)
        os.close(write_end)
        if os.read(read_end, 1) != b"1":
            raise RuntimeError(f"trial {trial}: the saving process died before its first save")
        os.close(read_end)
        time.sleep(rng.uniform(0.0, MAX_DELAY_S))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
