"""A slow Trainer run for the preemption tests: the test signals it while it trains.

Each forward pass sleeps ``--sleep`` seconds so that a run lasts long enough to be signalled, and
after ``--marker-after`` forward passes the model creates the ``--marker`` file: training has
started. On ``TrainingInterrupted`` the script exits with the exception's code (143 for SIGTERM,
130 for SIGINT); a run that completes writes its final parameters to ``OUTPUT_DIR/params.pt``
(rank 0). The test imports this file to train the same configuration in its own process.

Usage:
    python preempt_worker.py OUTPUT_DIR [--sleep S] [--marker PATH] [--resume CHECKPOINT]
    torchrun --nproc_per_node=2 preempt_worker.py OUTPUT_DIR ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import TinyClassifier, end_worker  # noqa: E402

from medfunc import distributed  # noqa: E402
from medfunc.errors import TrainingInterrupted  # noqa: E402
from medfunc.recipes.base import TensorDictDataset  # noqa: E402
from medfunc.trainer import MedicalModelTrainer, TrainerConfig  # noqa: E402

EXAMPLES, BATCH, EPOCHS = 48, 4, 2  # 12 optimizer steps per epoch in one process


class SlowClassifier(TinyClassifier):
    """The tiny MLP with dropout, sleeping in every forward pass; it marks that training began.

    Args:
        sleep: seconds each forward pass sleeps.
        marker: a file to create after ``marker_after`` forward passes (None: none).
        marker_after: forward passes before the marker is written.
    """

    def __init__(self, sleep: float = 0.0, marker: Path | None = None, marker_after: int = 3):
        super().__init__(dropout=0.25)
        self.sleep, self.marker, self.marker_after, self.calls = sleep, marker, marker_after, 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """The MLP's outputs, after the sleep."""
        self.calls += 1
        if self.marker is not None and self.calls == self.marker_after:
            self.marker.write_text("training\n")
        if self.sleep:
            time.sleep(self.sleep)
        return super().forward(x, labels)


def make_model(sleep: float = 0.0, marker: Path | None = None) -> SlowClassifier:
    """The model, initialised from a fixed seed."""
    torch.manual_seed(0)
    return SlowClassifier(sleep, marker)


def make_data() -> TensorDictDataset:
    """The fixed training examples."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(EXAMPLES, 6, generator=g)
    return TensorDictDataset({"x": x, "labels": torch.randint(0, 3, (EXAMPLES,), generator=g)})


def make_config(**options: object) -> TrainerConfig:
    """The run's options; no regular checkpoints, so only an interruption writes one."""
    base = dict(
        num_epochs=EPOCHS,
        batch_size=BATCH,
        learning_rate=1e-2,
        warmup_steps=3,
        weight_decay=0.01,
        save_every_epochs=0,
        log_every=5,
        device="cpu",
        progress_bar=False,
        seed=5,
    )
    return TrainerConfig(**{**base, **options})


def main() -> int:
    """Train (or resume) once; the exit status is the interruption's code, else 0."""
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--resume")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = MedicalModelTrainer(
        make_model(args.sleep, args.marker), make_config(resume_from=args.resume)
    )
    try:
        trainer.train(make_data(), output_dir=args.output_dir)
    except TrainingInterrupted as interrupted:
        return interrupted.exit_code
    if distributed.is_main_process():
        torch.save(dict(trainer.state.params), args.output_dir / "params.pt")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    end_worker(main())
