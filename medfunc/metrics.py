"""Evaluation metrics over a whole evaluation set, computed with torchmetrics.

Metrics are computed once over every example (never averaged per batch). Classification
(:func:`classification_metrics`): accuracy, precision, recall (= sensitivity), specificity and F1
(binary: of class 1; multi-class: macro average over the classes present), and for binary tasks
AUROC and AUPRC, ties included. Segmentation (image-shaped logits and labels): Dice, IoU and the
Hausdorff distance (:mod:`medfunc.segmentation_metrics`).

:class:`EvalAccumulator` collects an evaluation batch by batch (on every rank under torchrun) and
computes these metrics once over all examples, plus a user's per-batch function
(:class:`BatchMetricMeans`) or whole-set function; :func:`evaluate_batches` runs ``mf.eval_step``
over a whole evaluation set through it. ``torchmetrics`` (the ``demo`` extra) is imported when a
metric is first computed.

Example:
    >>> logits = torch.tensor([[2.0, -1.0], [0.1, 0.3], [-0.5, 0.5]])
    >>> classification_metrics(logits, torch.tensor([1, 1, 0]))
    {'accuracy': 0.333..., 'precision': 0.5, 'recall': 0.5, 'sensitivity': 0.5,
     'specificity': 0.0, 'f1': 0.5, 'auroc': 0.0, 'auprc': 0.583...}
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from medfunc import distributed
from medfunc.data import to_device
from medfunc.errors import ConfigError
from medfunc.segmentation_metrics import SegmentationStats, segmentation_maps
from medfunc.state import TrainState
from medfunc.step import eval_step

LABEL_KEYS = ("labels", "label", "targets", "target", "y")
IGNORE_INDEX = -100


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _dense_ranks(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` mapped to [0, 1] keeping their order and ties exactly.

    torchmetrics reads scores outside [0, 1] as logits and applies a sigmoid, which in floating
    point can tie scores that differ (``sigmoid(40.0) == sigmoid(41.0)``); ranks never do.
    """
    _, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    top = inverse.max().clamp(min=1) if inverse.numel() else 1
    return inverse.double() / top


def _ranking_metric(scores: torch.Tensor, labels: torch.Tensor, name: str) -> float:
    """AUROC or AUPRC from torchmetrics; NaN when a class is missing or a score not finite."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    scores = scores.detach().reshape(-1).double().cpu()
    labels = labels.detach().reshape(-1).cpu().long()
    positives = int((labels == 1).sum())
    if positives in (0, labels.numel()) or not bool(torch.isfinite(scores).all()):
        return float("nan")
    ranked = _dense_ranks(scores)
    metric = binary_auroc if name == "auroc" else binary_average_precision
    return float(metric(ranked, labels, validate_args=False))


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the positives ``labels == 1``.

    Computed by ``torchmetrics`` (``binary_auroc``, exact: every distinct score is a
    threshold) on the scores' ranks, so tied scores stay tied and the result equals
    ``sklearn.metrics.roc_auc_score``.

    Args:
        scores: 1-d scores, higher meaning more likely positive.
        labels: 1-d labels of the same length, 1 for positive and 0 for negative.

    Returns:
        The AUROC in [0, 1], or NaN when only one class is present or a score is not finite.

    Example:
        >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    return _ranking_metric(scores, labels, "auroc")


def auprc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the precision-recall curve (average precision) of ``scores``.

    ``torchmetrics``' ``binary_average_precision`` (the step-wise sum that
    ``sklearn.metrics.average_precision_score`` computes), ties kept as in :func:`auroc`.

    Args:
        scores: 1-d scores, higher meaning more likely positive.
        labels: 1-d 0/1 labels of the same length.

    Returns:
        The AUPRC in [0, 1], or NaN when only one class is present or a score is not finite.

    Example:
        >>> auprc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.833...
    """
    return _ranking_metric(scores, labels, "auprc")


def _flatten(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int] | None:
    """``(predictions, labels, binary scores or None, classes)`` of a classification, or None."""
    if logits.dim() >= 1 and logits.shape[-1] == 1 and logits.shape[:-1] == labels.shape:
        logits = logits[..., 0]
    if logits.shape == labels.shape:
        scores = logits.reshape(-1).double()
        labels = labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        scores, labels = scores[keep], labels[keep]
        if labels.is_floating_point() and not bool(((labels == 0) | (labels == 1)).all()):
            return None
        return (scores > 0).long(), labels.long(), scores, 2
    if logits.dim() == labels.dim() + 1 and logits.shape[:-1] == labels.shape:
        classes = logits.shape[-1]
        flat = logits.reshape(-1, classes).double()
        labels = labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        flat, labels = flat[keep], labels[keep]
        if labels.is_floating_point():
            return None
        scores = flat[:, 1] - flat[:, 0] if classes == 2 else None
        return flat.argmax(dim=-1), labels.long(), scores, classes
    return None


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, precision, recall (= sensitivity), specificity, F1, AUROC and AUPRC.

    Computed once over every example with ``torchmetrics``. Shapes: ``(N, C)`` logits with
    ``(N,)`` integer labels (C = 2 is binary, class 1 positive, its score the logit
    difference; C > 2 is multi-class), or ``(N,)`` / ``(N, 1)`` logits of a sigmoid classifier
    with 0/1 labels. Extra leading dimensions (tokens) are flattened; labels equal to -100 are
    ignored.

    Binary tasks report the positive class's precision, recall, sensitivity (the recall),
    specificity and F1, and ``auroc``/``auprc`` (NaN, with a warning, when the labels hold one
    class only or a logit is not finite). Multi-class tasks report macro averages over the
    classes that occur in the labels or the predictions (as scikit-learn's ``average="macro"``)
    and no AUROC/AUPRC. An undefined ratio (e.g. no predicted positive) counts as 0, as
    scikit-learn's ``zero_division=0``.

    Args:
        logits: the model's logits for the whole evaluation set.
        labels: the matching labels.

    Returns:
        ``{"accuracy", "precision", "recall", "sensitivity", "specificity", "f1"}`` plus
        ``"auroc"`` and ``"auprc"`` for binary tasks; ``{}`` when the shapes are not a
        classification.

    Example:
        >>> classification_metrics(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 0]))
        {'accuracy': 1.0, 'precision': 1.0, 'recall': 1.0, 'sensitivity': 1.0,
         'specificity': 1.0, 'f1': 1.0, 'auroc': 1.0, 'auprc': 1.0}
    """
    from torchmetrics.functional import classification as tmc

    flat = _flatten(logits.detach().cpu(), labels.detach().cpu())
    if flat is None or flat[1].numel() == 0:
        return {}
    predictions, labels, scores, classes = flat

    def score(name: str, average: str = "macro") -> float:
        if classes == 2:
            fn = getattr(tmc, f"binary_{name}")
            return float(fn(predictions, labels, validate_args=False))
        fn = getattr(tmc, f"multiclass_{name}")
        return float(
            fn(predictions, labels, num_classes=classes, average=average, validate_args=False)
        )

    recall = score("recall")
    out = {
        "accuracy": score("accuracy", average="micro"),
        "precision": score("precision"),
        "recall": recall,
        "sensitivity": recall,
        "specificity": score("specificity"),
        "f1": score("f1_score"),
    }
    if scores is not None:
        out["auroc"], out["auprc"] = auroc(scores, labels), auprc(scores, labels)
        if out["auroc"] != out["auroc"]:
            finite = bool(torch.isfinite(scores).all())
            why = "the labels hold one class only" if finite else "a logit is not finite"
            _warn(f"auroc and auprc are undefined (NaN) for this evaluation: {why}")
    return out


def find_logits(outputs: Any) -> torch.Tensor | None:
    """The logits in a model's outputs: ``outputs["logits"]``, ``outputs.logits``, or None.

    Args:
        outputs: what the model returned.

    Returns:
        The logits tensor, or None when the outputs hold none.

    Example:
        >>> logits = torch.randn(4, 2)
        >>> find_logits({"loss": torch.tensor(0.7), "logits": logits}) is logits
        True
        >>> find_logits(torch.randn(4, 2)) is None
        True
    """
    if isinstance(outputs, Mapping):
        value = outputs.get("logits")
    else:
        value = getattr(outputs, "logits", None)
    return value if isinstance(value, torch.Tensor) else None


def find_labels(batch: Any) -> torch.Tensor | None:
    """The labels of a dict batch (key ``labels``, ``label``, ``targets``, ``target`` or ``y``).

    Args:
        batch: a batch as given to the model.

    Returns:
        The labels tensor, or None.

    Example:
        >>> y = torch.tensor([0, 1, 1])
        >>> find_labels({"x": torch.randn(3, 4), "labels": y}) is y
        True
        >>> find_labels({"x": torch.randn(3, 4)}) is None
        True
    """
    if not isinstance(batch, Mapping):
        return None
    for key in LABEL_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return value
    return None


def batch_size_of(batch: Any) -> int:
    """The number of examples in a batch: the first dimension of its first tensor (1 if none).

    Args:
        batch: a dict, tuple/list or tensor batch.

    Returns:
        The batch size.

    Example:
        >>> batch_size_of({"x": torch.zeros(5, 3)})
        5
    """
    values = (
        batch.values()
        if isinstance(batch, Mapping)
        else (batch if isinstance(batch, (tuple, list)) else [batch])
    )
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _gather_cat(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """This rank's tensors and every other rank's, concatenated in rank order on the CPU."""
    local = torch.cat([t.cpu() for t in tensors]) if tensors else None
    parts = [p for p in distributed.all_gather_object(local) if p is not None]
    return torch.cat(parts) if parts else None


BatchMetricFn = Callable[[Any, Any], Mapping[str, Any]]
"""The original trainer's ``eval_compute_metrics``: ``fn(batch, model_output) -> {name: number}``,
called once per evaluation batch."""

SetMetricFn = Callable[[list, "torch.Tensor | None"], Mapping[str, Any]]
"""A whole-set metric function: ``fn(outputs_list, labels) -> {name: number}``, called once per
evaluation with every batch's outputs (on the CPU) and all labels concatenated."""


def _numbers(extra: Any, who: str) -> dict[str, float]:
    if not isinstance(extra, Mapping):
        raise ConfigError(
            f"{who} must return a dict of name -> number, returned {type(extra).__name__}"
        )
    out = {}
    for key, value in extra.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(
                f"{who} returned {key!r}: {type(value).__name__}; every value must be a number "
                "or a one-element tensor"
            ) from None
    return out


class BatchMetricMeans:
    """Example-weighted means of a per-batch metric function over a whole evaluation.

    Each batch's ``fn(batch, outputs)`` values are weighted by the batch's size; a name's result
    is ``sum(value * batch_size) / sum(batch_size)`` over the batches (of every rank) that
    returned it, which is the mean over all examples when the value is a per-example mean.

    Args:
        fn: ``fn(batch, model_output) -> {name: number}``.

    Example:
        >>> means = BatchMetricMeans(lambda batch, out: {"mean_x": batch["x"].mean()})
        >>> means.add({"x": torch.ones(3)}, None)
        >>> means.add({"x": torch.zeros(1)}, None)
        >>> means.compute([means.sums()])
        {'mean_x': 0.75}
    """

    def __init__(self, fn: BatchMetricFn) -> None:
        self.fn = fn
        self.totals: dict[str, list[float]] = {}

    def add(self, batch: Any, outputs: Any) -> None:
        """Call the function on one batch and add its values, weighted by the batch size."""
        values = _numbers(self.fn(batch, outputs), "TrainerConfig.eval_compute_metrics")
        n = batch_size_of(batch)
        for key, value in values.items():
            total = self.totals.setdefault(key, [0.0, 0.0])
            total[0] += value * n
            total[1] += n

    def sums(self) -> dict[str, list[float]]:
        """This rank's weighted sums and weights, to be gathered over ranks."""
        return self.totals

    def compute(self, parts: Iterable[Mapping[str, list[float]]]) -> dict[str, float]:
        """The means over every rank's :meth:`sums`."""
        merged: dict[str, list[float]] = {}
        for part in parts:
            for key, (total, weight) in part.items():
                into = merged.setdefault(key, [0.0, 0.0])
                into[0] += total
                into[1] += weight
        return {key: total / weight for key, (total, weight) in merged.items() if weight}


class EvalAccumulator:
    """Collects an evaluation batch by batch and computes its metrics once over every example.

    The loss is summed on the device weighted by batch size (one transfer at the end). Logits
    and labels of a classification are kept for the whole-set :func:`classification_metrics`;
    image-shaped ones (segmentation) are reduced per batch to the whole-set sums of
    :class:`~medfunc.segmentation_metrics.SegmentationStats`. Under torchrun, :meth:`compute`
    sums the losses and gathers the logits, labels, segmentation sums (and outputs) of all
    ranks, so every rank returns the metrics of the whole evaluation set.

    Args:
        device: where the loss total lives.
        keep_outputs: keep every batch's outputs (on the CPU) for a whole-set metric function.
        batch_metric_fn: the original trainer's per-batch ``fn(batch, model_output) -> dict``,
            aggregated by :class:`BatchMetricMeans`.

    Example:
        >>> from medfunc.recipes.breast_cancer import MLPClassifier  # returns {"logits", "loss"}
        >>> state = mf.init_state(MLPClassifier(in_features=4), mf.optim.adamw(1e-3))
        >>> batches = [
        ...     {"features": torch.randn(8, 4), "labels": torch.randint(0, 2, (8,))}
        ...     for _ in range(3)
        ... ]
        >>> acc = EvalAccumulator(torch.device("cpu"))
        >>> for batch in batches:
        ...     result = mf.eval_step(state, batch)
        ...     acc.add(batch, result["outputs"], result["loss"])
        >>> acc.compute()
        {'loss': 0.69..., 'accuracy': 0.5, 'precision': 0.5, 'recall': 0.333...,
         'sensitivity': 0.333..., 'specificity': 0.666..., 'f1': 0.4..., 'auroc': 0.458...,
         'auprc': 0.530...}
    """

    def __init__(
        self,
        device: torch.device,
        *,
        keep_outputs: bool = False,
        batch_metric_fn: BatchMetricFn | None = None,
    ) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.keep_outputs = keep_outputs
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.outputs: list[Any] = []
        self.segmentation = SegmentationStats()
        self.batch_metrics = BatchMetricMeans(batch_metric_fn) if batch_metric_fn else None

    def add(self, batch: Any, outputs: Any, loss: torch.Tensor) -> None:
        """Record one batch: its inputs (for labels and size), the model outputs and mean loss."""
        n = batch_size_of(batch)
        self.loss_sum += loss.detach().double() * n
        self.count += n
        logits, labels = find_logits(outputs), find_labels(batch)
        if self.batch_metrics is not None:
            self.batch_metrics.add(batch, outputs)
        maps = None
        if logits is not None and labels is not None:
            maps = segmentation_maps(logits.detach(), labels.detach())
        if maps is not None:
            self.segmentation.add(*maps)
        if labels is not None and (self.keep_outputs or (logits is not None and maps is None)):
            self.labels.append(labels.detach())
        if logits is not None and labels is not None and maps is None:
            self.logits.append(logits.detach().float())
        if self.keep_outputs:
            self.outputs.append(to_device(outputs, "cpu"))

    def compute(self, metric_fn: SetMetricFn | None = None) -> dict[str, float]:
        """The metrics of everything added (on all ranks).

        Args:
            metric_fn: optional whole-set ``metric_fn(outputs_list, labels) -> {name: number}``
                over all batches' outputs (rank 0's batches first under torchrun) and all
                labels.

        Returns:
            ``loss`` (example-weighted mean), the :func:`classification_metrics` when the
            outputs hold logits and the batches labels, or the segmentation metrics (``dice``,
            ``iou``, ``hausdorff``) when they are image-shaped, then the per-batch function's
            means and ``metric_fn``'s entries.

        Raises:
            ConfigError: nothing was evaluated, or a metric function returned no mapping of
                numbers.
        """
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.loss_sum.device)
        total_loss, total_count = distributed.all_reduce_sum(
            torch.stack([self.loss_sum, count])
        ).tolist()
        if total_count == 0:
            raise ConfigError(
                "the evaluation dataset is empty; pass a dataset with examples or eval_dataset=None"
            )
        metrics = {"loss": total_loss / total_count}
        logits, labels = _gather_cat(self.logits), _gather_cat(self.labels)
        if logits is not None and labels is not None and len(logits) == len(labels):
            metrics.update(classification_metrics(logits, labels))
        metrics.update(
            self.segmentation.compute(distributed.all_gather_object(self.segmentation.sums()))
        )
        if self.batch_metrics is not None:
            parts = distributed.all_gather_object(self.batch_metrics.sums())
            metrics.update(self.batch_metrics.compute(parts))
        if metric_fn is not None:
            outputs = [out for part in distributed.all_gather_object(self.outputs) for out in part]
            metrics.update(_numbers(metric_fn(outputs, labels), "TrainerConfig.eval_set_metrics"))
        return metrics


def evaluate_batches(
    state: TrainState,
    batches: Iterable[Any],
    metric_fn: SetMetricFn | None = None,
    *,
    batch_metric_fn: BatchMetricFn | None = None,
) -> dict[str, float]:
    """Evaluate ``state`` on every batch with ``mf.eval_step``; metrics over the whole set.

    Under torchrun each rank passes its share of the batches and every rank gets the metrics of
    all of them (see :meth:`EvalAccumulator.compute`).

    Args:
        state: the state to evaluate (eval mode, no gradients).
        batches: the evaluation batches, already on the state's device.
        metric_fn: optional whole-set ``metric_fn(outputs_list, labels) -> {name: number}``.
        batch_metric_fn: optional per-batch ``fn(batch, model_output) -> {name: number}``,
            example-weighted means over the set (see :class:`BatchMetricMeans`).

    Returns:
        metric name -> float (see :meth:`EvalAccumulator.compute`).

    Example:
        >>> from medfunc.recipes.breast_cancer import MLPClassifier  # returns {"logits", "loss"}
        >>> state = mf.init_state(MLPClassifier(in_features=4), mf.optim.adamw(1e-3))
        >>> batch = {"features": torch.randn(8, 4), "labels": torch.tensor([0, 1] * 4)}
        >>> metrics = evaluate_batches(state, [batch], lambda outputs, labels: {"n": len(labels)})
        >>> sorted(metrics)
        ['accuracy', 'auprc', 'auroc', 'f1', 'loss', 'n', 'precision', 'recall', 'sensitivity',
         'specificity']
        >>> metrics["loss"], metrics["n"]
        (0.68..., 8.0)
    """
    accumulator = EvalAccumulator(
        state.device, keep_outputs=metric_fn is not None, batch_metric_fn=batch_metric_fn
    )
    for batch in batches:
        result = eval_step(state, batch)
        accumulator.add(batch, result["outputs"], result["loss"])
    return accumulator.compute(metric_fn)
