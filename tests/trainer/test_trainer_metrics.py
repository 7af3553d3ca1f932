"""Whole-set classification metrics against scikit-learn; the training loop's metric tracking."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyClassifier
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

import medfunc as mf
from medfunc.early_stopping import EarlyStopping
from medfunc.errors import NonFiniteError
from medfunc.metrics import (
    auroc,
    batch_size_of,
    classification_metrics,
    evaluate_batches,
    find_labels,
    find_logits,
)
from medfunc.tracking import LoopPosition, StepMetricSums, check_skipped_run


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=80))
def test_auroc_equals_sklearn_with_ties(pairs):
    scores = torch.tensor([float(s) for s, _ in pairs])
    labels = torch.tensor([int(y) for _, y in pairs])
    if labels.min() == labels.max():
        assert math.isnan(auroc(scores, labels))
        return
    assert auroc(scores, labels) == pytest.approx(
        roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12
    )


def test_auroc_of_continuous_scores_equals_sklearn():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5000, generator=g, dtype=torch.float64)
    labels = (scores + torch.randn(5000, generator=g, dtype=torch.float64) > 0).long()
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_is_nan_for_non_finite_scores():
    assert math.isnan(auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1])))


def _sklearn(labels, predictions, average):
    return {
        "accuracy": accuracy_score(labels, predictions),
        "precision": precision_score(labels, predictions, average=average, zero_division=0),
        "recall": recall_score(labels, predictions, average=average, zero_division=0),
        "f1": f1_score(labels, predictions, average=average, zero_division=0),
    }


def test_binary_two_logit_metrics_equal_sklearn():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 2, generator=g)
    labels = torch.randint(0, 2, (300,), generator=g)
    got = classification_metrics(logits, labels)
    want = _sklearn(labels, logits.argmax(-1), "binary")
    want["auroc"] = roc_auc_score(labels, (logits[:, 1] - logits[:, 0]).double())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_single_logit_binary_metrics_equal_sklearn():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 1, generator=g)
    labels = torch.randint(0, 2, (200,), generator=g).float()
    got = classification_metrics(logits, labels)
    predictions = (logits[:, 0] > 0).long()
    want = _sklearn(labels.long(), predictions, "binary")
    want["auroc"] = roc_auc_score(labels, logits[:, 0])
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_multiclass_macro_metrics_equal_sklearn_and_have_no_auroc():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(400, 5, generator=g)
    labels = torch.randint(0, 4, (400,), generator=g)  # class 4 is only ever predicted
    got = classification_metrics(logits, labels)
    want = _sklearn(labels, logits.argmax(-1), "macro")
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_token_level_labels_skip_ignore_index():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 7, 3, generator=g)
    labels = torch.randint(0, 3, (6, 7), generator=g)
    labels[:, -2:] = -100
    got = classification_metrics(logits, labels)
    keep = labels.reshape(-1) != -100
    want = _sklearn(labels.reshape(-1)[keep], logits.reshape(-1, 3).argmax(-1)[keep], "macro")
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_non_classification_shapes_give_no_metrics():
    assert classification_metrics(torch.randn(8, 3), torch.randn(8, 5)) == {}


def test_output_and_batch_helpers():
    logits, labels = torch.zeros(3, 2), torch.zeros(3)
    assert find_logits({"logits": logits, "loss": torch.tensor(0.0)}) is logits
    assert find_logits(torch.zeros(3)) is None
    assert find_labels({"x": torch.zeros(3, 1), "label": labels}) is labels
    assert find_labels((torch.zeros(3),)) is None
    assert batch_size_of({"x": torch.zeros(5, 2)}) == 5
    assert batch_size_of((torch.zeros(()), torch.zeros(4))) == 4


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


def test_evaluate_batches_computes_metrics_over_the_whole_set():
    torch.manual_seed(0)
    model = TinyClassifier(classes=2)
    state = mf.init_state(model, mf.optim.chain())
    g = torch.Generator().manual_seed(6)
    x, labels = torch.randn(23, 6, generator=g), torch.randint(0, 2, (23,), generator=g)
    batches = [{"x": x[i : i + 5], "labels": labels[i : i + 5]} for i in range(0, 23, 5)]
    seen = []
    got = evaluate_batches(state, batches, lambda outputs, y: seen.append(len(outputs)) or {"n": 1})
    with torch.no_grad():
        out = model.eval()(x, labels)
    want = classification_metrics(out["logits"], labels)
    assert "auroc" in want
    assert got["loss"] == pytest.approx(out["loss"].item(), rel=1e-6)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["n"] == 1.0 and seen == [5]
