"""Whole-set classification metrics against scikit-learn."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medfunc.metrics import auroc, batch_size_of, classification_metrics, find_labels, find_logits


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
