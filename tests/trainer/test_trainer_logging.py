"""Trainer logging: TensorBoard event files and an offline W&B run hold the right values."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyClassifier
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig


def _data(n: int, seed: int = 0) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDictDataset(
        {"x": torch.randn(n, 6, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}
    )


def test_tensorboard_events_hold_loss_and_the_scheduled_lr(tmp_path):
    torch.manual_seed(0)
    config = TrainerConfig(
        num_epochs=2,
        batch_size=8,
        learning_rate=0.05,
        scheduler="cosine",
        eta_min=0.001,
        log_every=2,
        enable_tensorboard=True,
        device="cpu",
        save_every_epochs=None,
        progress_bar=False,
    )
    MedicalModelTrainer(TinyClassifier(), config).train(
        _data(48), _data(16, 1), output_dir=tmp_path
    )
    events = EventAccumulator(str(tmp_path / "tb_logs"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/accuracy"} <= set(
        events.Tags()["scalars"]
    )

    # the reference: CosineAnnealingLR over the run's 12 optimizer steps; the LR logged at
    # step s is the one the s-th update used
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=0.001)
    used = []
    for _ in range(12):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    lr_events = events.Scalars("train/lr")
    assert [e.step for e in lr_events] == [2, 4, 6, 8, 10, 12]
    assert [e.value for e in lr_events] == pytest.approx(
        [used[s - 1] for s in range(2, 13, 2)], rel=1e-6
    )

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    loss_events = events.Scalars("train/loss")
    assert [e.step for e in loss_events] == sorted(losses)
    assert [e.value for e in loss_events] == pytest.approx(
        [losses[e.step] for e in loss_events], rel=1e-6
    )
    assert [e.step for e in events.Scalars("eval/loss")] == [6, 12]


def test_wandb_offline_run_is_created_in_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)
    config = TrainerConfig(
        num_epochs=1,
        batch_size=8,
        log_every=1,
        enable_wandb=True,
        wandb_project="medfunc-tests",
        wandb_run_name="tiny",
        device="cpu",
        save_every_epochs=None,
        progress_bar=False,
    )
    MedicalModelTrainer(TinyClassifier(), config).train(_data(16), output_dir=tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
