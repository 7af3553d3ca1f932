"""The recipe contract: what a recipe builds, and a dataset of dict examples over tensors.

Example:
    >>> from medfunc.recipes import get_recipe
    >>> parts = get_recipe("breast_cancer").build(seed=0)
    >>> parts.train_dataset[0]
    {'features': tensor([...]), 'labels': tensor(1)}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from medfunc.errors import ConfigError


def stratified_split(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split row numbers in two keeping each class's share in both parts.

    Args:
        labels: int64 class labels.
        fraction: share of each class in the second part, in (0, 1).
        seed: the shuffle seed (the global RNG is not touched).

    Returns:
        ``(rest_index, part_index)``, each sorted.

    Example:
        >>> stratified_split(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 0.25, seed=0)[1].numel()
        2
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"a split fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    rest_parts, parts = [], []
    for cls in torch.unique(labels):
        rows = torch.nonzero(labels == cls).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        n_part = round(rows.numel() * fraction)
        parts.append(rows[:n_part])
        rest_parts.append(rows[n_part:])
    return torch.cat(rest_parts).sort().values, torch.cat(parts).sort().values


def split_three_ways(
    labels: torch.Tensor, eval_fraction: float, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified, seeded train/validation/test row numbers.

    Args:
        labels: int64 class labels.
        eval_fraction: share of the whole data in the validation split.
        test_fraction: share of the whole data in the test split.
        seed: the split seed.

    Returns:
        ``(train_index, eval_index, test_index)``: disjoint, sorted, covering every row.

    Raises:
        ConfigError: a fraction is outside (0, 1) or the two leave no training rows.

    Example:
        >>> parts = split_three_ways(torch.arange(100) % 2, 0.2, 0.2, seed=0)
        >>> [p.numel() for p in parts]
        [60, 20, 20]
    """
    if not (0.0 < eval_fraction < 1.0 and 0.0 < test_fraction < 1.0) or (
        eval_fraction + test_fraction >= 1.0
    ):
        raise ConfigError(
            f"eval_fraction ({eval_fraction}) and test_fraction ({test_fraction}) must each be "
            "in (0, 1) and leave rows for training (their sum below 1)"
        )
    rest, test_index = stratified_split(labels, test_fraction, seed)
    train_pos, eval_pos = stratified_split(
        labels[rest], eval_fraction / (1.0 - test_fraction), seed + 1
    )
    return rest[train_pos], rest[eval_pos], test_index


@dataclass(frozen=True)
class RecipeParts:
    """Everything a recipe provides for one training run.

    Attributes:
        model: a ``torch.nn.Module`` called as ``model(**batch)``; returns
            ``{"logits": (B, 2) float, "loss": scalar}`` (``loss`` only when ``labels`` is given).
            Class 1 is the positive class; its probability is ``softmax(logits)[:, 1]``.
        train_dataset: a map-style dataset of dict examples (``labels``: 0-d int64).
        eval_dataset: the validation split, same structure: evaluated during training, it
            chooses the best model and stops training early.
        test_dataset: the test split, same structure, or ``None``: never seen during training,
            evaluated once with the final model (``medfunc train``'s last line).
        config: ``TrainerConfig`` field values tuned for this recipe.
        export_example: a batch-of-one dict of model inputs for TorchScript/ONNX export, or
            ``None`` when the model cannot be exported.
        positive_label: the human name of class 1 (e.g. ``"malignant"``).
        notes: a short description of the data, split and expected result.
    """

    model: torch.nn.Module
    train_dataset: Any
    eval_dataset: Any
    config: dict[str, Any]
    export_example: dict[str, torch.Tensor] | None
    positive_label: str
    notes: str
    test_dataset: Any = None


@dataclass(frozen=True)
class Recipe:
    """A named, runnable recipe.

    Attributes:
        name: the registry key (``medfunc train --recipe NAME``).
        description: one line for listings.
        build: ``build(**options) -> RecipeParts``; options are recipe specific and all have
            defaults.
    """

    name: str
    description: str
    build: Callable[..., RecipeParts] = field(repr=False)


class TensorDictDataset(torch.utils.data.Dataset):
    """A map-style dataset over a dict of equally long tensors; item ``i`` is ``{k: v[i]}``.

    Args:
        tensors: name -> tensor, all with the same first dimension.

    Example:
        >>> ds = TensorDictDataset({"features": torch.zeros(4, 3), "labels": torch.ones(4)})
        >>> len(ds), ds[0]["features"].shape
        (4, torch.Size([3]))
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        lengths = {name: len(t) for name, t in tensors.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ConfigError(f"TensorDictDataset needs equally long tensors, got {lengths}")
        self.tensors = dict(tensors)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}
