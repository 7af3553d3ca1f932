"""Model, data and optimizer shared by the multi-process workers and the tests that check them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import medfunc as mf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for conftest
from conftest import end_worker, free_port, torchrun_command  # noqa: E402, F401 - re-exported

STEPS = 10
BATCH = 8


class Net(nn.Module):
    """A small MLP classifier without BatchNorm: ``model(x, labels) -> {"loss", "logits"}``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.fc2(torch.tanh(self.fc1(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def make_tx(max_norm: float = 0.5) -> mf.optim.GradientTransformation:
    """Clipping plus AdamW with a warm-up/decay schedule (so the LR path is exercised too)."""
    schedule = mf.schedules.linear_warmup(2e-2, 3, 2 * STEPS)
    return mf.optim.chain(mf.optim.clip_by_global_norm(max_norm), mf.optim.adamw(schedule))


def batches(n: int = 2 * STEPS) -> list[dict]:
    """Fixed batches whose labels are a learnable function of ``x`` (so the loss can fall)."""
    g = torch.Generator().manual_seed(1)
    projection = torch.randn(6, 3, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(BATCH, 6, generator=g)
        out.append({"x": x, "labels": (x @ projection).argmax(dim=1)})
    return out


def shard(batch: dict, rank: int, world: int) -> dict:
    """This rank's equal slice of a global batch."""
    size = BATCH // world
    return {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}


def full_params(state: mf.TrainState) -> dict:
    """Plain full copies of the state's params (gathers DTensor shards: call on every rank)."""
    out = {}
    for name, value in state.params.items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value.detach().clone()
    return out


def out_dir() -> Path:
    return Path(os.environ["MEDFUNC_TEST_OUT"])


def accumulate_run(
    state: mf.TrainState, rank: int = 0, world: int = 1, updates: int = 4
) -> mf.TrainState:
    """``updates`` optimizer updates, each over two micro-batches of this rank's slice."""
    data = batches()
    for i in range(updates):
        mine = shard(data[i], rank, world)
        for j in range(2):
            state, _ = mf.train_step(state, {k: v[j::2] for k, v in mine.items()})
    return state


def reference_run(
    start: int = 0, stop: int = STEPS, state: mf.TrainState | None = None
) -> mf.TrainState:
    """One process on the full batches ``start..stop`` (from a fresh state unless given)."""
    if state is None:
        state = mf.init_state(make_model(), make_tx())
    data = batches()
    for i in range(start, stop):
        state, _ = mf.train_step(state, data[i])
    return state


def stop_launch(processes: list[subprocess.Popen], folder: Path) -> None:
    """Kill what is left of torchrun launchers started with ``start_new_session=True`` (their
    whole process groups), and a hung worker that outlived them (its pid in ``hung.pid``)."""
    for proc in processes:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    hung = folder / "hung.pid"
    if hung.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(hung.read_text()), signal.SIGKILL)
