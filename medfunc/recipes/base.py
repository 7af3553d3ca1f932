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


@dataclass(frozen=True)
class RecipeParts:
    """Everything a recipe provides for one training run.

    Attributes:
        model: a ``torch.nn.Module`` called as ``model(**batch)``; returns
            ``{"logits": (B, 2) float, "loss": scalar}`` (``loss`` only when ``labels`` is given).
            Class 1 is the positive class; its probability is ``softmax(logits)[:, 1]``.
        train_dataset: a map-style dataset of dict examples (``labels``: 0-d int64).
        eval_dataset: the held-out dataset, same structure.
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
