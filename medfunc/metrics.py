"""Classification metrics over a whole evaluation set, from concatenated logits and labels.

Metrics are computed once over every example (never averaged per batch): accuracy, precision,
recall and F1 (binary: of class 1; multi-class: macro average over the classes present), and
for binary tasks the exact AUROC from ranks, ties given their average rank.

:class:`EvalAccumulator` collects an evaluation batch by batch (on every rank under torchrun) and
computes these metrics once over all examples; :func:`evaluate_batches` runs ``mf.eval_step``
over a whole evaluation set through it.

Example:
    >>> logits = torch.tensor([[2.0, -1.0], [0.1, 0.3], [-0.5, 0.5]])
    >>> classification_metrics(logits, torch.tensor([0, 1, 0]))
    {'accuracy': 0.666..., 'precision': 0.5, 'recall': 1.0, 'f1': 0.666..., 'auroc': 0.5}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from medfunc import distributed
from medfunc.data import to_device
from medfunc.errors import ConfigError
from medfunc.state import TrainState
from medfunc.step import eval_step

LABEL_KEYS = ("labels", "label", "targets", "target", "y")
IGNORE_INDEX = -100


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the positives ``labels == 1``.

    Computed from ranks (the Mann-Whitney U statistic); tied scores get their average rank, so
    the result equals ``sklearn.metrics.roc_auc_score`` exactly, ties included.

    Args:
        scores: 1-d scores, higher meaning more likely positive.
        labels: 1-d labels of the same length, 1 for positive and 0 for negative.

    Returns:
        The AUROC in [0, 1], or NaN when only one class is present or a score is not finite.

    Example:
        >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    scores = scores.detach().reshape(-1).double().cpu()
    positive = labels.detach().reshape(-1).cpu() == 1
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0 or not bool(torch.isfinite(scores).all()):
        return float("nan")
    order = torch.argsort(scores, stable=True)
    _, inverse, counts = torch.unique_consecutive(
        scores[order], return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    average_rank = ends - (counts.double() - 1) / 2
    ranks = average_rank[inverse]
    rank_sum = float(ranks[positive[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _prf(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> tuple[list, list, list]:
    precision, recall, f1 = [], [], []
    for t, p, n in zip(tp.tolist(), fp.tolist(), fn.tolist()):
        prec = t / (t + p) if t + p else 0.0
        rec = t / (t + n) if t + n else 0.0
        precision.append(prec)
        recall.append(rec)
        f1.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return precision, recall, f1


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and (binary) AUROC of ``logits`` against ``labels``.

    Shapes: ``(N, C)`` logits with ``(N,)`` integer labels (C = 2 is binary, class 1 positive;
    C > 2 is multi-class with macro averages over the classes in labels or predictions), or
    ``(N,)`` / ``(N, 1)`` logits of a sigmoid classifier with 0/1 labels. Extra leading
    dimensions (tokens) are flattened; labels equal to -100 are ignored.

    Args:
        logits: the model's logits for the whole evaluation set.
        labels: the matching labels.

    Returns:
        ``{"accuracy", "precision", "recall", "f1"}`` plus ``"auroc"`` for binary tasks with
        both classes present; ``{}`` when the shapes are not a classification.

    Example:
        >>> classification_metrics(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 0]))
        {'accuracy': 1.0, 'precision': 1.0, 'recall': 1.0, 'f1': 1.0, 'auroc': 1.0}
    """
    logits = logits.detach().cpu()
    labels = labels.detach().cpu()
    if logits.dim() >= 1 and logits.shape[-1] == 1 and logits.shape[:-1] == labels.shape:
        logits = logits[..., 0]
    if logits.shape == labels.shape:
        scores = logits.reshape(-1).double()
        labels = labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        scores, labels = scores[keep], labels[keep].long()
        predictions = (scores > 0).long()
        binary = True
    elif logits.dim() == labels.dim() + 1 and logits.shape[:-1] == labels.shape:
        classes = logits.shape[-1]
        flat = logits.reshape(-1, classes).double()
        labels = labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        flat, labels = flat[keep], labels[keep].long()
        predictions = flat.argmax(dim=-1)
        binary = classes == 2
        scores = flat[:, 1] - flat[:, 0] if binary else None
    else:
        return {}
    if labels.is_floating_point() or labels.numel() == 0:
        return {}
    out = {"accuracy": float((predictions == labels).double().mean())}
    if binary:
        tp = ((predictions == 1) & (labels == 1)).sum().reshape(1)
        fp = ((predictions == 1) & (labels != 1)).sum().reshape(1)
        fn = ((predictions != 1) & (labels == 1)).sum().reshape(1)
        precision, recall, f1 = _prf(tp, fp, fn)
        out.update(precision=precision[0], recall=recall[0], f1=f1[0])
        area = auroc(scores, labels)
        if area == area:
            out["auroc"] = area
        return out
    present = torch.unique(torch.cat([labels, predictions]))
    tp = torch.stack([((predictions == c) & (labels == c)).sum() for c in present])
    fp = torch.stack([((predictions == c) & (labels != c)).sum() for c in present])
    fn = torch.stack([((predictions != c) & (labels == c)).sum() for c in present])
    precision, recall, f1 = _prf(tp, fp, fn)
    k = len(precision)
    out.update(precision=sum(precision) / k, recall=sum(recall) / k, f1=sum(f1) / k)
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


class EvalAccumulator:
    """Collects an evaluation batch by batch and computes its metrics once over every example.

    The loss is summed on the device weighted by batch size (one transfer at the end); logits
    and labels are kept for the whole-set classification metrics. Under torchrun,
    :meth:`compute` sums the losses and gathers the logits, labels (and outputs) of all ranks,
    so every rank returns the metrics of the whole evaluation set.

    Args:
        device: where the loss total lives.
        keep_outputs: keep every batch's outputs (on the CPU) for a user metric function.

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
        {'loss': 0.69..., 'accuracy': 0.5, 'precision': 0.5, 'recall': 0.333..., 'f1': 0.4,
         'auroc': 0.458...}
    """

    def __init__(self, device: torch.device, *, keep_outputs: bool = False) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.keep_outputs = keep_outputs
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.outputs: list[Any] = []

    def add(self, batch: Any, outputs: Any, loss: torch.Tensor) -> None:
        """Record one batch: its inputs (for labels and size), the model outputs and mean loss."""
        n = batch_size_of(batch)
        self.loss_sum += loss.detach().double() * n
        self.count += n
        logits, labels = find_logits(outputs), find_labels(batch)
        if labels is not None and (logits is not None or self.keep_outputs):
            self.labels.append(labels.detach())
            if logits is not None:
                self.logits.append(logits.detach().float())
        if self.keep_outputs:
            self.outputs.append(to_device(outputs, "cpu"))

    def compute(
        self, metric_fn: Callable[[list, torch.Tensor | None], Mapping[str, float]] | None = None
    ) -> dict[str, float]:
        """The metrics of everything added (on all ranks).

        Args:
            metric_fn: optional ``metric_fn(outputs_list, labels) -> {name: number}`` over all
                batches' outputs (rank 0's batches first under torchrun) and all labels.

        Returns:
            ``loss`` (example-weighted mean), the :func:`classification_metrics` when the
            outputs hold logits and the batches labels, and ``metric_fn``'s entries.

        Raises:
            ConfigError: nothing was evaluated, or ``metric_fn`` returned no mapping.
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
        if metric_fn is not None:
            outputs = [out for part in distributed.all_gather_object(self.outputs) for out in part]
            extra = metric_fn(outputs, labels)
            if not isinstance(extra, Mapping):
                raise ConfigError(
                    "TrainerConfig.eval_compute_metrics must return a dict of "
                    f"name -> number, returned {type(extra).__name__}"
                )
            metrics.update({str(k): float(v) for k, v in extra.items()})
        return metrics


def evaluate_batches(
    state: TrainState,
    batches: Iterable[Any],
    metric_fn: Callable[[list, torch.Tensor | None], Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """Evaluate ``state`` on every batch with ``mf.eval_step``; metrics over the whole set.

    Under torchrun each rank passes its share of the batches and every rank gets the metrics of
    all of them (see :meth:`EvalAccumulator.compute`).

    Args:
        state: the state to evaluate (eval mode, no gradients).
        batches: the evaluation batches, already on the state's device.
        metric_fn: optional ``metric_fn(outputs_list, labels) -> {name: number}``.

    Returns:
        metric name -> float (see :meth:`EvalAccumulator.compute`).

    Example:
        >>> from medfunc.recipes.breast_cancer import MLPClassifier  # returns {"logits", "loss"}
        >>> state = mf.init_state(MLPClassifier(in_features=4), mf.optim.adamw(1e-3))
        >>> batch = {"features": torch.randn(8, 4), "labels": torch.tensor([0, 1] * 4)}
        >>> metrics = evaluate_batches(state, [batch], lambda outputs, labels: {"n": len(labels)})
        >>> sorted(metrics)
        ['accuracy', 'auroc', 'f1', 'loss', 'n', 'precision', 'recall']
        >>> metrics["loss"], metrics["n"]
        (0.68..., 8.0)
    """
    accumulator = EvalAccumulator(state.device, keep_outputs=metric_fn is not None)
    for batch in batches:
        result = eval_step(state, batch)
        accumulator.add(batch, result["outputs"], result["loss"])
    return accumulator.compute(metric_fn)
