"""Training configurations for the exact-resume test, and the fresh process that resumes them.

The test imports this file to train each configuration straight through and up to its split
point (saving a checkpoint there); run as a script, it restores every checkpoint of a folder in
this new process, trains the remaining steps and writes each final state's leaves to a file.

Usage:
    python resume_worker.py CHECKPOINT_DIR OUTPUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import TinyClassifier  # noqa: E402

import medfunc as mf  # noqa: E402
from medfunc.checkpoint import read_checkpoint, restore_state  # noqa: E402
from medfunc.state import tree_leaves_with_path  # noqa: E402

TOTAL = 20
SCHEDULES = {
    "constant": lambda: mf.schedules.constant(5e-3),
    "linear_warmup": lambda: mf.schedules.linear_warmup(5e-3, 3, TOTAL),
    "step": lambda: mf.schedules.step(5e-3, 2, 0.5),
    "cosine": lambda: mf.schedules.cosine(5e-3, 7),
    "one_cycle": lambda: mf.schedules.one_cycle(5e-3, TOTAL),
}
# fp16 starts with a scale that overflows and grows fast: both halves skip some updates (backing
# off) and apply others (growing), so the resumed part depends on the restored scaler state.
FP16 = mf.get_policy("fp16", init_scale=2.0**19, growth_interval=2)


class Config(NamedTuple):
    """One resume scenario: precision, accumulation, schedule, split point and restore path."""

    precision: str
    accumulate: int
    schedule: str
    split: int
    with_like: bool
    optimizer: str = "adamw"
    ema: float | None = None

    @property
    def name(self) -> str:
        like = "like" if self.with_like else "model"
        ema = f"-ema{self.ema}" if self.ema is not None else ""
        return (
            f"{self.optimizer}-{self.precision}-k{self.accumulate}-{self.schedule}-"
            f"at{self.split}-{like}{ema}"
        )


CONFIGS = [
    Config(precision, accumulate, schedule, 8, (i + j) % 2 == 0)
    for i, schedule in enumerate(SCHEDULES)
    for j, (precision, accumulate) in enumerate(
        [("fp32", 1), ("fp16", 1), ("fp32", 3), ("fp16", 3)]
    )
] + [
    Config("fp16", 3, "cosine", 9, True),  # at an accumulation-window boundary
    Config("fp32", 3, "one_cycle", 7, False),  # after the first micro-batch of a window
    Config("fp16", 1, "step", 8, True, optimizer="sgd"),
    Config("fp16", 3, "cosine", 8, True, ema=0.9),  # EMA through skips and accumulation
    Config("fp32", 1, "one_cycle", 8, False, ema=0.99),  # decay taken from the checkpoint
]


def make_model() -> TinyClassifier:
    """The tiny MLP with dropout, initialised from a fixed seed."""
    torch.manual_seed(0)
    return TinyClassifier(dropout=0.25)


def make_tx(config: Config) -> mf.optim.GradientTransformation:
    """Global-norm clipping then AdamW (or Nesterov SGD) on the configuration's schedule."""
    lr = SCHEDULES[config.schedule]()
    if config.optimizer == "sgd":
        optimizer = mf.optim.sgd(lr, momentum=0.9, nesterov=True, weight_decay=0.01)
    else:
        optimizer = mf.optim.adamw(lr, weight_decay=0.05)
    return mf.optim.chain(mf.optim.clip_by_global_norm(0.5), optimizer)


def make_state(config: Config) -> mf.TrainState:
    """The fresh state of a configuration."""
    precision = FP16 if config.precision == "fp16" else config.precision
    return mf.init_state(
        make_model(),
        make_tx(config),
        precision=precision,
        seed=1234,
        accumulate_steps=config.accumulate,
        ema_decay=config.ema,
    )


def batch(index: int) -> dict[str, torch.Tensor]:
    """The batch of call ``index`` (a pure function of the index, as a resumable loader is)."""
    g = torch.Generator().manual_seed(10_000 + index)
    return {"x": torch.randn(8, 6, generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}


def train(state: mf.TrainState, start: int, stop: int, log: list | None = None) -> mf.TrainState:
    """Run ``train_step`` on batches ``start .. stop - 1``, appending each call's metrics to
    ``log`` if given."""
    for index in range(start, stop):
        state, metrics = mf.train_step(state, batch(index), donate=True)
        if log is not None:
            log.append(metrics)
    return state


def leaves(state: mf.TrainState) -> dict[str, torch.Tensor]:
    """Every tensor of the state by path (params, buffers, opt_state, loss_scale, step, rng...)."""
    return {path: leaf.clone() for path, leaf in tree_leaves_with_path(state)}


def resume(checkpoint: Path, config: Config) -> mf.TrainState:
    """Restore ``checkpoint`` (with ``like`` or from model and tx) and train to the end."""
    payload = read_checkpoint(checkpoint)
    if config.with_like:
        state = restore_state(payload, make_state(config))
    else:
        state = restore_state(payload, model=make_model(), tx=make_tx(config))
    return train(state, payload["trainer_state"]["data_position"], TOTAL)


def main(checkpoints: Path, output: Path) -> None:
    torch.set_num_threads(1)  # as the test process: CPU reductions depend on the thread count
    output.mkdir(parents=True, exist_ok=True)
    for config in CONFIGS:
        final = resume(checkpoints / f"{config.name}.pt", config)
        torch.save(leaves(final), output / f"{config.name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
