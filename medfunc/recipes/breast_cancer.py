"""The default recipe: a small MLP on the Wisconsin diagnostic breast cancer data.

The data (569 fine-needle-aspirate cases, 30 nuclear features, 212 malignant / 357 benign)
ship with scikit-learn, so nothing is downloaded. The train/validation/test split (60/20/20) is
stratified and seeded, the standardisation is fitted on the training split only, and class 1 is
*malignant*. The validation split chooses the best model; the test split is scored once.

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
from medfunc.recipes.base import RecipeParts, TensorDictDataset, split_three_ways

NUM_FEATURES = 30
POSITIVE_LABEL = "malignant"


@dataclass(frozen=True)
class Splits:
    """A standardised train/validation/test split.

    Attributes:
        x_train, x_eval, x_test: float32 features, standardised with the train split's
            statistics (``eval`` is the validation split).
        y_train, y_eval, y_test: int64 labels, 1 = malignant, 0 = benign.
        train_index, eval_index, test_index: row numbers of each split in the original data.
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
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_index: torch.Tensor


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


def make_splits(eval_fraction: float = 0.2, seed: int = 0, test_fraction: float = 0.2) -> Splits:
    """Load, split (stratified, seeded) and standardise the data.

    Args:
        eval_fraction: share of the data in the validation split.
        seed: the split seed.
        test_fraction: share of the data in the test split.

    Returns:
        The :class:`Splits`; the mean/std come from the training rows only.

    Example:
        >>> splits = make_splits(seed=0)
        >>> len(splits.y_train), len(splits.y_eval), len(splits.y_test)
        (342, 114, 113)
    """
    features, labels = load_raw()
    train_index, eval_index, test_index = split_three_ways(
        labels, eval_fraction, test_fraction, seed
    )
    x_train = features[train_index]
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False).clamp_min(1e-12)

    def standardised(index: torch.Tensor) -> torch.Tensor:
        return ((features[index] - mean) / std).float()

    return Splits(
        x_train=standardised(train_index),
        x_eval=standardised(eval_index),
        y_train=labels[train_index],
        y_eval=labels[eval_index],
        train_index=train_index,
        eval_index=eval_index,
        mean=mean,
        std=std,
        x_test=standardised(test_index),
        y_test=labels[test_index],
        test_index=test_index,
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
    test_fraction: float = 0.2,
    hidden: tuple[int, ...] = (64, 32),
    dropout: float = 0.2,
    **unknown: Any,
) -> RecipeParts:
    """Build the breast cancer recipe.

    Args:
        seed: seeds both the split and the model's initial weights.
        eval_fraction: share in the validation split (stratified), which chooses the model.
        test_fraction: share in the test split (stratified), scored once at the end.
        hidden: the MLP's hidden widths.
        dropout: the MLP's dropout probability.

    Returns:
        The :class:`~medfunc.recipes.base.RecipeParts`.

    Raises:
        ConfigError: an unknown option was given, or scikit-learn is missing.

    Example:
        >>> parts = build(seed=1)
        >>> len(parts.train_dataset), len(parts.eval_dataset), len(parts.test_dataset)
        (342, 114, 113)
    """
    if unknown:
        raise ConfigError(
            f"unknown breast_cancer option(s) {sorted(unknown)}; "
            "known: seed, eval_fraction, test_fraction, hidden, dropout"
        )
    splits = make_splits(eval_fraction=eval_fraction, seed=seed, test_fraction=test_fraction)
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
    n_train, n_eval, n_test = len(splits.y_train), len(splits.y_eval), len(splits.y_test)
    notes = (
        f"Wisconsin diagnostic breast cancer data (scikit-learn): {n_train} train / {n_eval} "
        f"validation / {n_test} test cases, stratified split (seed {seed}), features "
        "standardised with training statistics; class 1 = malignant. Expect test AUROC >= 0.97 "
        "in well under a minute."
    )
    return RecipeParts(
        model=model,
        train_dataset=TensorDictDataset({"features": splits.x_train, "labels": splits.y_train}),
        eval_dataset=TensorDictDataset({"features": splits.x_eval, "labels": splits.y_eval}),
        test_dataset=TensorDictDataset({"features": splits.x_test, "labels": splits.y_test}),
        config=config,
        export_example={"features": splits.x_eval[:1].clone()},
        positive_label=POSITIVE_LABEL,
        notes=notes,
    )
