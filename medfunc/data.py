"""Batching dict batches and moving pytrees of tensors to a device.

Example:
    >>> x, y = torch.randn(100, 4), torch.randint(0, 2, (100,))
    >>> batches = list(iterate_batches({"x": x, "labels": y}, batch_size=32, shuffle=True, seed=0))
    >>> [len(batch["x"]) for batch in batches]
    [32, 32, 32, 4]
    >>> batch = to_device(batches[0], "cuda" if torch.cuda.is_available() else "cpu")
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from medfunc.errors import BatchError


def to_device(tree: Any, device: str | torch.device, *, non_blocking: bool = False) -> Any:
    """Move every tensor in a (nested) dict / list / tuple to ``device``.

    Args:
        tree: a tensor or a nest of mappings, lists and tuples holding tensors (other leaves
            pass through unchanged).
        device: the target device.
        non_blocking: passed to ``Tensor.to``.

    Returns:
        The same structure with tensors on ``device``.

    Example:
        >>> to_device({"x": torch.ones(2)}, "cpu")
        {'x': tensor([1., 1.])}
    """
    device = torch.device(device)
    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=non_blocking)
    if isinstance(tree, Mapping):
        moved = {k: to_device(v, device, non_blocking=non_blocking) for k, v in tree.items()}
        return moved if type(tree) is dict else type(tree)(moved)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(to_device(v, device, non_blocking=non_blocking) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device, non_blocking=non_blocking) for v in tree)
    return tree


def collate(items: list[Any]) -> Any:
    """Stack a list of examples (dicts, tuples or tensors of equal shapes) into one batch.

    Args:
        items: examples as a ``Dataset`` returns them.

    Returns:
        One batch of the same structure with a leading batch dimension.

    Example:
        >>> collate([{"x": torch.ones(3)}, {"x": torch.zeros(3)}])["x"].shape
        torch.Size([2, 3])
    """
    first = items[0]
    if isinstance(first, Mapping):
        return {k: collate([item[k] for item in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(collate(list(group)) for group in zip(*items))
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, (int, float, bool)):
        return torch.tensor(items)
    raise BatchError(
        f"cannot batch items of type {type(first).__name__}; return tensors, "
        "numbers, or dicts/tuples of them from the dataset"
    )


def iterate_batches(
    arrays: Mapping[str, torch.Tensor],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield dict batches from a dict of equally long tensors.

    Args:
        arrays: name -> tensor, all with the same first dimension.
        batch_size: examples per batch.
        shuffle: shuffle with a generator seeded by ``seed`` (global RNG untouched).
        seed: the shuffle seed.
        drop_last: drop a final incomplete batch.

    Returns:
        An iterator of dict batches.

    Example:
        >>> next(iterate_batches({"x": torch.arange(5)}, 2))
        {'x': tensor([0, 1])}
    """
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise BatchError(f"all arrays must have the same length, got {lengths}")
    n = next(iter(lengths.values()))
    order = (
        torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        if shuffle
        else torch.arange(n)
    )
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield {k: v[index] for k, v in arrays.items()}
