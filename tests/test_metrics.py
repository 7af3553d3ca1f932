"""Whole-set classification metrics (torchmetrics) against scikit-learn and direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyClassifier
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

import medfunc as mf
from medfunc.errors import ConfigError
from medfunc.metrics import (
    BatchMetricMeans,
    auprc,
    auroc,
    batch_size_of,
    classification_metrics,
    evaluate_batches,
    find_labels,
    find_logits,
)

# torchmetrics returns float32 ratios
TOL = 1e-6


def _specificity(labels, predictions, classes):
    """Macro specificity TN / (TN + FP) over the classes in labels or predictions (0 if 0/0)."""
    scores = []
    for c in sorted(set(labels.tolist()) | set(predictions.tolist())):
        negatives = labels != c
        tn = int((negatives & (predictions != c)).sum())
        fp = int((negatives & (predictions == c)).sum())
        scores.append(tn / (tn + fp) if tn + fp else 0.0)
    return sum(scores) / len(scores)


def _sklearn(labels, predictions, average, classes=2):
    recall = recall_score(labels, predictions, average=average, zero_division=0)
    if average == "binary":
        negatives = labels != 1
        tn = int((negatives & (predictions != 1)).sum())
        fp = int((negatives & (predictions == 1)).sum())
        specificity = tn / (tn + fp) if tn + fp else 0.0
    else:
        specificity = _specificity(labels, predictions, classes)
    return {
        "accuracy": accuracy_score(labels, predictions),
        "precision": precision_score(labels, predictions, average=average, zero_division=0),
        "recall": recall,
        "sensitivity": recall,
        "specificity": specificity,
        "f1": f1_score(labels, predictions, average=average, zero_division=0),
    }


def _check(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=TOL), key


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=80))
def test_auroc_and_auprc_equal_sklearn_with_ties(pairs):
    scores = torch.tensor([float(s) for s, _ in pairs])
    labels = torch.tensor([int(y) for _, y in pairs])
    if labels.min() == labels.max():
        assert math.isnan(auroc(scores, labels)) and math.isnan(auprc(scores, labels))
        return
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert auprc(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=TOL)


def test_auroc_keeps_logits_apart_that_a_sigmoid_would_tie():
    # sigmoid(40) == sigmoid(41) == 1.0 in float64: ranking by sigmoid would tie these
    scores = torch.tensor([40.0, 41.0, 42.0, -3.0])
    labels = torch.tensor([0, 1, 1, 0])
    assert auroc(scores, labels) == 1.0
    assert auprc(scores, labels) == 1.0


def test_ranking_metrics_of_continuous_scores_equal_sklearn():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5000, generator=g, dtype=torch.float64)
    labels = (scores + torch.randn(5000, generator=g, dtype=torch.float64) > 0).long()
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert auprc(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=TOL)


def test_ranking_metrics_are_nan_for_non_finite_scores():
    assert math.isnan(auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1])))
    assert math.isnan(auprc(torch.tensor([0.1, float("inf")]), torch.tensor([0, 1])))


def test_binary_two_logit_metrics_equal_sklearn():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 2, generator=g)
    labels = torch.randint(0, 2, (300,), generator=g)
    got = classification_metrics(logits, labels)
    want = _sklearn(labels, logits.argmax(-1), "binary")
    scores = (logits[:, 1] - logits[:, 0]).double()
    want["auroc"] = roc_auc_score(labels, scores)
    want["auprc"] = average_precision_score(labels, scores)
    _check(got, want)


def test_single_logit_binary_metrics_equal_sklearn():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 1, generator=g)
    labels = torch.randint(0, 2, (200,), generator=g).float()
    got = classification_metrics(logits, labels)
    want = _sklearn(labels.long(), (logits[:, 0] > 0).long(), "binary")
    want["auroc"] = roc_auc_score(labels, logits[:, 0])
    want["auprc"] = average_precision_score(labels, logits[:, 0])
    _check(got, want)


def test_binary_metrics_with_tied_logits_equal_sklearn():
    g = torch.Generator().manual_seed(7)
    logits = torch.randint(-2, 3, (120, 1), generator=g).float()  # many exact ties, zeros too
    labels = torch.randint(0, 2, (120,), generator=g)
    got = classification_metrics(logits, labels)
    want = _sklearn(labels, (logits[:, 0] > 0).long(), "binary")
    want["auroc"] = roc_auc_score(labels, logits[:, 0])
    want["auprc"] = average_precision_score(labels, logits[:, 0])
    _check(got, want)


def test_single_class_labels_give_nan_auroc_with_a_warning_and_the_rest():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(50, 2, generator=g)
    labels = torch.zeros(50, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="auroc and auprc are undefined.*one class only"):
        got = classification_metrics(logits, labels)
    assert math.isnan(got["auroc"]) and math.isnan(got["auprc"])
    predictions = logits.argmax(-1)
    assert got["accuracy"] == pytest.approx(float((predictions == 0).double().mean()), abs=TOL)
    assert got["specificity"] == pytest.approx(got["accuracy"], abs=TOL)  # TN / (TN + FP)
    assert got["recall"] == 0.0 and got["precision"] == 0.0 and got["f1"] == 0.0


def test_nan_logits_give_nan_auroc_with_a_warning():
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 0.0]])
    with pytest.warns(RuntimeWarning, match="a logit is not finite"):
        got = classification_metrics(logits, torch.tensor([1, 0, 0]))
    assert math.isnan(got["auroc"]) and math.isnan(got["auprc"])


def test_multiclass_macro_metrics_equal_sklearn_and_have_no_auroc():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(400, 5, generator=g)
    labels = torch.randint(0, 4, (400,), generator=g)  # class 4 is only ever predicted
    got = classification_metrics(logits, labels)
    _check(got, _sklearn(labels, logits.argmax(-1), "macro", classes=5))


def test_multiclass_specificity_is_the_macro_of_tn_over_negatives():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 0, 2]), 4).float()
    got = classification_metrics(logits, labels)
    # class 0: TN 3 of 4 negatives; class 1: 3 of 4; class 2: 4 of 4; class 3 absent
    assert got["specificity"] == pytest.approx((3 / 4 + 3 / 4 + 1) / 3, abs=TOL)


def test_token_level_labels_skip_ignore_index():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 7, 3, generator=g)
    labels = torch.randint(0, 3, (6, 7), generator=g)
    labels[:, -2:] = -100
    got = classification_metrics(logits, labels)
    keep = labels.reshape(-1) != -100
    predictions = logits.reshape(-1, 3).argmax(-1)[keep]
    _check(got, _sklearn(labels.reshape(-1)[keep], predictions, "macro", classes=3))


def test_non_classification_shapes_give_no_metrics():
    assert classification_metrics(torch.randn(8, 3), torch.randn(8, 5)) == {}
    assert classification_metrics(torch.randn(8), torch.rand(8)) == {}  # regression targets


def test_output_and_batch_helpers():
    logits, labels = torch.zeros(3, 2), torch.zeros(3)
    assert find_logits({"logits": logits, "loss": torch.tensor(0.0)}) is logits
    assert find_logits(torch.zeros(3)) is None
    assert find_labels({"x": torch.zeros(3, 1), "label": labels}) is labels
    assert find_labels((torch.zeros(3),)) is None
    assert batch_size_of({"x": torch.zeros(5, 2)}) == 5
    assert batch_size_of((torch.zeros(()), torch.zeros(4))) == 4


def _evaluation_set():
    torch.manual_seed(0)
    model = TinyClassifier(classes=2)
    state = mf.init_state(model, mf.optim.chain())
    g = torch.Generator().manual_seed(6)
    x, labels = torch.randn(23, 6, generator=g), torch.randint(0, 2, (23,), generator=g)
    batches = [{"x": x[i : i + 5], "labels": labels[i : i + 5]} for i in range(0, 23, 5)]
    return model, state, x, labels, batches


def test_evaluate_batches_computes_metrics_over_the_whole_set():
    model, state, x, labels, batches = _evaluation_set()
    seen = []
    got = evaluate_batches(state, batches, lambda outputs, y: seen.append(len(outputs)) or {"n": 1})
    with torch.no_grad():
        out = model.eval()(x, labels)
    want = classification_metrics(out["logits"], labels)
    assert "auroc" in want and "auprc" in want
    assert got["loss"] == pytest.approx(out["loss"].item(), rel=1e-6)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=TOL), key
    assert got["n"] == 1.0 and seen == [5]


def test_per_batch_metric_function_is_an_example_weighted_mean():
    model, state, x, labels, batches = _evaluation_set()
    calls = []

    def positives(batch, outputs):  # the original trainer's (batch, model_output) -> dict
        calls.append(len(batch["labels"]))
        hits = (outputs["logits"].argmax(-1) == batch["labels"]).float().mean()
        return {"hit_rate": hits, "batch_mean_label": float(batch["labels"].float().mean())}

    got = evaluate_batches(state, batches, batch_metric_fn=positives)
    assert calls == [5, 5, 5, 5, 3]
    with torch.no_grad():
        predictions = model.eval()(x)["logits"].argmax(-1)
    # weighted by batch size, the batch means are the means over all 23 examples
    assert got["hit_rate"] == pytest.approx(float((predictions == labels).double().mean()))
    assert got["batch_mean_label"] == pytest.approx(float(labels.double().mean()))
    assert got["hit_rate"] == pytest.approx(got["accuracy"], abs=TOL)


def test_batch_metric_means_keep_names_reported_by_some_batches_only():
    means = BatchMetricMeans(
        lambda batch, out: {"a": 1.0} if len(batch) == 2 else {"a": 4.0, "b": 2.0}
    )
    means.add([torch.zeros(2), torch.zeros(2)], None)  # a tuple batch of 2 examples
    means.add([torch.zeros(1)], None)
    assert means.compute([means.sums()]) == {"a": (1.0 * 2 + 4.0 * 1) / 3, "b": 2.0}


def test_metric_functions_must_return_numbers():
    _, state, _, _, batches = _evaluation_set()
    with pytest.raises(ConfigError, match="eval_compute_metrics must return a dict"):
        evaluate_batches(state, batches, batch_metric_fn=lambda batch, out: 0.5)
    with pytest.raises(ConfigError, match="returned 'x': str; every value must be a number"):
        evaluate_batches(state, batches, batch_metric_fn=lambda batch, out: {"x": "high"})
    with pytest.raises(ConfigError, match="eval_set_metrics must return a dict"):
        evaluate_batches(state, batches, lambda outputs, labels: [1.0])
