"""The default recipe: a small MLP on the Wisconsin diagnostic breast cancer data.

The data (569 fine-needle-aspirate cases, 30 nuclear features, 212 malignant / 357 benign)
ship with scikit-learn, so nothing is downloaded. The split is stratified and seeded, the
standardisation is fitted on the training split only, and class 1 is *malignant*.

Example:
    >>> parts = build(seed=0)
    >>> out = parts.model(**mf.data.collate([parts.eval_dataset[0]]))
    >>> out["logits"].shape
    torch.Size([1, 2])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medfunc.errors import ConfigError
from medfunc.recipes.base import RecipeParts, TensorDictDataset

NUM_FEATURES = 30
POSITIVE_LABEL = "malignant"


@dataclass(frozen=True)
class Splits:
    """A standardised train/eval split.

    Attributes:
        x_train, x_eval: float32 features, standardised with the train split's statistics.
        y_train, y_eval: int64 labels, 1 = malignant, 0 = benign.
        train_index, eval_index: row numbers of each split in the original data.
        mean, std: the per-feature statistics of the raw training features.
    """

    x_train: torch.Tensor
    x_eval: torch.Tensor
    y_train: torch.Tensor
    y_eval: torch.Tensor
    train_index: torch.Tensor
    eval_index: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def load_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """Load the raw data from scikit-learn.

    Returns:
        ``(features, labels)``: float64 ``(569, 30)`` and int64 ``(569,)`` with 1 = malignant
        (scikit-learn codes malignant as 0; this flips it so the positive class is the disease).

    Raises:
        ConfigError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as err:
        raise ConfigError(
            "the breast_cancer recipe needs scikit-learn: run `pip install medfunc[demo]`"
        ) from err
    data = load_breast_cancer()
    features = torch.as_tensor(data.data, dtype=torch.float64)
    labels = 1 - torch.as_tensor(data.target, dtype=torch.int64)
    return features, labels


def stratified_split(
    labels: torch.Tensor, eval_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split row numbers into train/eval sets keeping each class's share in both.

    Args:
        labels: int64 class labels.
        eval_fraction: share of each class held out, in (0, 1).
        seed: the shuffle seed (the global RNG is not touched).

    Returns:
        ``(train_index, eval_index)``, each sorted.

    Example:
        >>> stratified_split(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 0.25, seed=0)[1].numel()
        2
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train_parts, eval_parts = [], []
    for cls in torch.unique(labels):
        rows = torch.nonzero(labels == cls).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        n_eval = round(rows.numel() * eval_fraction)
        eval_parts.append(rows[:n_eval])
        train_parts.append(rows[n_eval:])
    return torch.cat(train_parts).sort().values, torch.cat(eval_parts).sort().values


def make_splits(eval_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Load, split (stratified, seeded) and standardise the data.

    Args:
        eval_fraction: share of each class held out for evaluation.
        seed: the split seed.

    Returns:
        The :class:`Splits`; the mean/std come from the training rows only.
    """
    features, labels = load_raw()
    train_index, eval_index = stratified_split(labels, eval_fraction, seed)
    x_train, x_eval = features[train_index], features[eval_index]
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False).clamp_min(1e-12)
    return Splits(
        x_train=((x_train - mean) / std).float(),
        x_eval=((x_eval - mean) / std).float(),
        y_train=labels[train_index],
        y_eval=labels[eval_index],
        train_index=train_index,
        eval_index=eval_index,
        mean=mean,
        std=std,
    )


class MLPClassifier(nn.Module):
    """A two-hidden-layer MLP with dropout for binary classification.

    Args:
        in_features: input width.
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden layer.

    Example:
        >>> MLPClassifier()(features=torch.zeros(4, 30), labels=torch.zeros(4, dtype=torch.long))
        {'logits': ..., 'loss': ...}
    """

    def __init__(
        self,
        in_features: int = NUM_FEATURES,
        hidden: tuple[int, ...] = (64, 32),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Return ``{"logits": (B, 2)}`` and, given ``labels``, the mean cross-entropy ``loss``."""
        logits = self.net(features)
        if labels is None:
            return {"logits": logits}
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def build(
    *,
    seed: int = 0,
    eval_fraction: float = 0.2,
    hidden: tuple[int, ...] = (64, 32),
    dropout: float = 0.2,
    **unknown: Any,
) -> RecipeParts:
    """Build the breast cancer recipe.

    Args:
        seed: seeds both the split and the model's initial weights.
        eval_fraction: share held out for evaluation (stratified).
        hidden: the MLP's hidden widths.
        dropout: the MLP's dropout probability.

    Returns:
        The :class:`~medfunc.recipes.base.RecipeParts`.

    Raises:
        ConfigError: an unknown option was given, or scikit-learn is missing.

    Example:
        >>> parts = build(seed=1)
        >>> len(parts.train_dataset), len(parts.eval_dataset)
        (456, 113)
    """
    if unknown:
        raise ConfigError(
            f"unknown breast_cancer option(s) {sorted(unknown)}; "
            "known: seed, eval_fraction, hidden, dropout"
        )
    splits = make_splits(eval_fraction=eval_fraction, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLPClassifier(hidden=tuple(hidden), dropout=dropout)
    config = {
        "num_epochs": 20,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "scheduler": "linear_warmup",
        "warmup_steps": 20,
        "seed": seed,
        "log_every": 15,
        "eval_metric": "auroc",
        "eval_metric_mode": "max",
    }
    n_train, n_eval = len(splits.y_train), len(splits.y_eval)
    notes = (
        f"Wisconsin diagnostic breast cancer data (scikit-learn): {n_train} train / {n_eval} "
        f"held-out cases, stratified split (seed {seed}), features standardised with training "
        "statistics; class 1 = malignant. Expect held-out AUROC >= 0.97 in well under a minute."
    )
    return RecipeParts(
        model=model,
        train_dataset=TensorDictDataset({"features": splits.x_train, "labels": splits.y_train}),
        eval_dataset=TensorDictDataset({"features": splits.x_eval, "labels": splits.y_eval}),
        config=config,
        export_example={"features": splits.x_eval[:1].clone()},
        positive_label=POSITIVE_LABEL,
        notes=notes,
    )
