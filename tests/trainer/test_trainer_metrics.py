"""The training loop's metric tracking: step metric sums, loop position, early stopping."""

from __future__ import annotations

import math

import pytest
import torch

from medfunc.early_stopping import EarlyStopping
from medfunc.errors import NonFiniteError
from medfunc.tracking import LoopPosition, StepMetricSums, check_skipped_run


def _step_metrics(loss, grad_norm, lr, skipped, loss_scale=None):
    metrics = {
        "loss": torch.tensor(loss, dtype=torch.float32),
        "grad_norm": torch.tensor(grad_norm, dtype=torch.float32),
        "lr": torch.tensor(lr, dtype=torch.float64),
        "skipped": torch.tensor(skipped),
    }
    if loss_scale is not None:
        metrics["loss_scale"] = torch.tensor(loss_scale)
    return metrics


def test_step_metric_sums_average_each_interval_like_a_plain_loop():
    g = torch.Generator().manual_seed(5)
    steps = [
        (float(torch.rand((), generator=g)), float(torch.rand((), generator=g)), 0.1 / (i + 1), s)
        for i, s in enumerate([0, 1, 1, 0, 0, 1, 1, 1, 0, 0])
    ]
    sums = StepMetricSums(torch.device("cpu"))
    run = 0
    for interval in (steps[:4], steps[4:9], steps[9:]):
        longest = 0
        for loss, norm, lr, skipped in interval:
            sums.record(_step_metrics(loss, norm, lr, skipped, loss_scale=2.0**16))
            run = run + 1 if skipped else 0
            longest = max(longest, run)
        scalars, skipped_run = sums.flush()
        applied = [norm for _, norm, _, skipped in interval if not skipped]
        loss_mean = sum(torch.tensor(x[0]).double().item() for x in interval) / len(interval)
        assert scalars["train/loss"] == pytest.approx(loss_mean, rel=1e-12)
        norm_mean = sum(torch.tensor(n).double().item() for n in applied) / len(applied)
        assert scalars["train/grad_norm"] == pytest.approx(norm_mean, rel=1e-12)
        assert scalars["train/lr"] == interval[-1][2]
        assert scalars["train/skipped_steps"] == sum(s for *_, s in interval)
        assert scalars["train/loss_scale"] == 2.0**16
        assert skipped_run == longest
        assert sums.steps == 0


def test_a_run_of_skipped_steps_is_counted_across_intervals_and_stops_training():
    sums = StepMetricSums(torch.device("cpu"))
    for _ in range(3):
        sums.record(_step_metrics(float("nan"), float("nan"), 0.1, 1))
    scalars, first = sums.flush()
    assert math.isnan(scalars["train/grad_norm"]) and "train/loss_scale" not in scalars
    sums.record(_step_metrics(float("nan"), float("nan"), 0.1, 1))
    _, second = sums.flush()
    assert (first, second) == (3, 4)
    check_skipped_run(second, limit=5, step=4)
    check_skipped_run(second, limit=None, step=4)
    with pytest.raises(NonFiniteError, match=r"4 consecutive optimizer steps \(up to step 4\)"):
        check_skipped_run(second, limit=4, step=4)


def test_loop_position_round_trips_through_a_checkpoints_trainer_state():
    stopping = EarlyStopping(patience=3, mode="max", min_delta=0.01)
    position = LoopPosition(stopping, epoch=2, batch_index=6, global_step=12, last_eval_step=12)
    position.stopping.update(0.8)
    position.record_best(2, {"auroc": 0.8})
    position.best_checkpoint = "checkpoint-epoch2.pt"
    position.global_step = 13
    position.stopping.update(0.7)
    saved = position.to_trainer_state("auroc", run={"recipe": "breast_cancer"})
    assert saved == {
        "epoch": 2,
        "batch_index": 6,
        "loop_step": 13,
        "best_metric": 0.8,
        "patience_counter": 1,
        "last_eval_step": 12,
        "eval_metric": "auroc",
        "best_checkpoint": "checkpoint-epoch2.pt",
        "best_step": 12,
        "best_epoch": 2,
        "best_metrics": {"auroc": 0.8},
        "run": {"recipe": "breast_cancer"},
    }
    restored = LoopPosition.from_trainer_state(saved, EarlyStopping(patience=3, mode="max"))
    assert (restored.stopping.best, restored.stopping.wait) == (0.8, 1)
    assert (restored.best_checkpoint, restored.best_step, restored.best_epoch) == (
        "checkpoint-epoch2.pt",
        12,
        2,
    )
    assert restored.best_metrics == {"auroc": 0.8} and not restored.best_pending
    assert (restored.epoch, restored.batch_index, restored.global_step) == (2, 6, 13)
    assert restored.last_eval_step == 12
    # an older checkpoint without the loop entries resumes from its step counter
    legacy = LoopPosition.from_trainer_state({"global_step": 7}, EarlyStopping())
    assert (legacy.global_step, legacy.epoch, legacy.stopping.best) == (7, 0, None)
