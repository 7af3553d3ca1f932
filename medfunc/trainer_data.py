"""How the Trainer turns a dataset into batches: seeded epoch order, resume offsets, rank shards.

Map-style datasets are batched here. For training, epoch ``e`` visits the examples in the order
of ``DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)``
after ``set_epoch(e)`` - in a single process simply ``torch.randperm(len(dataset))`` drawn from a
generator seeded with ``seed + e`` - so a resumed epoch replays the same order and can skip the
batches it already consumed without reading them. Evaluation visits the examples
``rank, rank + world, ...`` in order, so every example is seen exactly once across ranks.
DataLoaders and iterables of batches are used as given (their sampler's ``set_epoch`` is called
every epoch); for evaluation under torchrun they are split by batch index unless their sampler
already is a ``DistributedSampler``.

The helpers at the end build the Trainer's batches from a :class:`TrainerConfig`
(:func:`training_batches`, :func:`evaluation_batches`, :func:`steps_per_epoch`), name the
training device (:func:`resolve_device`) and move each batch there (:func:`to_training_device`).

Example:
    >>> batches = DatasetBatches(dataset, role="train_dataset", batch_size=32, shuffle=True,
    ...                          seed=0, rank=0, world=1, train=True)
    >>> for window in batches.windows(epoch=0, start=0, size=4):   # 4 micro-batches per step
    ...     ...
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    default_collate,
)

from medfunc.data import to_device
from medfunc.errors import BatchError, ConfigError
from medfunc.trainer_config import TrainerConfig

log = logging.getLogger("medfunc.trainer")


def is_map_style(data: Any) -> bool:
    """Whether ``data`` is a map-style dataset (indexed examples) rather than batches.

    Args:
        data: a ``Dataset``, a ``DataLoader``, a list of batches, ...

    Returns:
        True for ``torch.utils.data.Dataset`` objects (not iterable datasets) and other objects
        with ``__getitem__`` and ``__len__``; False for DataLoaders, lists, tuples, mappings.

    Example:
        >>> is_map_style(TensorDictDataset({"x": x})), is_map_style([{"x": x}])
        (True, False)
    """
    if isinstance(data, (DataLoader, IterableDataset, list, tuple, Mapping, str, bytes)):
        return False
    if isinstance(data, Dataset):
        return True
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def pin_memory(tree: Any) -> Any:
    """Page-lock the CPU tensors of a (nested) batch, for asynchronous copies to CUDA.

    Args:
        tree: a tensor or a nest of mappings, lists and tuples (other leaves pass through).

    Returns:
        The same structure with pinned CPU tensors (tensors already pinned or not on the CPU
        are returned as they are).

    Example:
        >>> batch = pin_memory({"x": torch.zeros(2)})
        >>> batch["x"].is_pinned()
        True
    """
    if isinstance(tree, torch.Tensor):
        return tree.pin_memory() if tree.device.type == "cpu" and not tree.is_pinned() else tree
    if isinstance(tree, Mapping):
        pinned = {k: pin_memory(v) for k, v in tree.items()}
        return pinned if type(tree) is dict else type(tree)(pinned)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(pin_memory(v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(pin_memory(v) for v in tree)
    return tree


def _inner_sampler(data: Any) -> Any:
    if isinstance(data, DataLoader):
        batch_sampler = getattr(data, "batch_sampler", None)
        return getattr(batch_sampler, "sampler", None) or getattr(data, "sampler", None)
    return None


class DatasetBatches:
    """The batches of one dataset, epoch by epoch (see the module docstring for the order).

    Args:
        data: a map-style dataset, a DataLoader or an iterable of batches.
        role: the argument's name for messages, e.g. ``"train_dataset"``.
        batch_size: examples per batch (map-style datasets only).
        shuffle: shuffle training epochs (map-style datasets only).
        seed: the shuffle seed.
        rank: this process's rank.
        world: the number of processes.
        train: training order (shuffled, every rank a ``DistributedSampler`` part) or
            evaluation order (in order, examples split by ``index % world``).

    Raises:
        ConfigError: ``data`` is none of the accepted kinds.
    """

    def __init__(
        self,
        data: Any,
        *,
        role: str,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int,
        world: int,
        train: bool,
    ) -> None:
        map_style = is_map_style(data)
        if not map_style and (
            isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable)
        ):
            raise ConfigError(
                f"{role} must be a map-style Dataset, a DataLoader or an iterable "
                f"of batches; got {type(data).__name__}"
            )
        self.data, self.role, self.rank, self.world = data, role, rank, world
        self.map_style = map_style
        self.batch_size = batch_size
        self.sampler = None
        if map_style and train:
            self.sampler = DistributedSampler(
                data, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
            )
        self.one_shot = isinstance(data, Iterator)
        self._split_batches = (
            not train
            and world > 1
            and not map_style
            and not isinstance(_inner_sampler(data), DistributedSampler)
        )
        self._warned_partial = False

    def __len__(self) -> int:
        """Batches per epoch on this rank (``TypeError`` when the data has no length)."""
        if self.map_style:
            n = (
                len(self.sampler)
                if self.sampler is not None
                else len(range(self.rank, len(self.data), self.world))
            )
            return math.ceil(n / self.batch_size)
        length = len(self.data)
        return len(range(self.rank, length, self.world)) if self._split_batches else length

    @property
    def has_length(self) -> bool:
        """Whether the number of batches per epoch is known in advance."""
        try:
            len(self)
        except TypeError:
            return False
        return True

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Yield the batches of ``epoch``, skipping its first ``start`` batches.

        Args:
            epoch: the epoch number (0-based), which selects the shuffle order.
            start: batches of this epoch already consumed (a resumed run).

        Returns:
            An iterator of batches.
        """
        if self.map_style:
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
                indices = list(self.sampler)
            else:
                indices = list(range(self.rank, len(self.data), self.world))
            size = self.batch_size
            for begin in range(start * size, len(indices), size):
                yield self._fetch(indices[begin : begin + size])
            return
        sampler = _inner_sampler(self.data)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batches: Iterable[Any] = self.data
        if self._split_batches:
            batches = itertools.islice(batches, self.rank, None, self.world)
        yield from itertools.islice(batches, start, None)

    def windows(self, epoch: int, start: int, size: int) -> Iterator[list[Any]]:
        """Yield the micro-batches of ``epoch`` in groups of ``size`` (one optimizer step each).

        A final group with fewer than ``size`` micro-batches is dropped (warned once).

        Args:
            epoch: the epoch number.
            start: micro-batches already consumed in this epoch.
            size: micro-batches per optimizer step (``gradient_accumulation_steps``).

        Returns:
            An iterator of lists of ``size`` batches.
        """
        batches = self.epoch(epoch, start)
        while True:
            window = list(itertools.islice(batches, size))
            if len(window) < size:
                if window and not self._warned_partial:
                    self._warned_partial = True
                    log.warning(
                        "the last %d micro-batch(es) of an epoch are not used: fewer "
                        "than gradient_accumulation_steps=%d remained (warned once)",
                        len(window),
                        size,
                    )
                return
            yield window

    def _fetch(self, indices: list[int]) -> Any:
        items = []
        for index in indices:
            try:
                items.append(self.data[index])
            except Exception as err:
                raise BatchError(
                    f"{self.role}[{index}] could not be read: {type(err).__name__}: {err}"
                ) from err
        try:
            return default_collate(items)
        except Exception as err:
            raise BatchError(
                f"{self.role} items {indices[:4]}... could not be batched together "
                f"({type(err).__name__}: {err}); return tensors or numbers of equal "
                "shapes (or dicts of them) from the dataset"
            ) from err


def training_batches(data: Any, config: TrainerConfig, *, rank: int, world: int) -> DatasetBatches:
    """The training batches of ``data``: seeded shuffle per epoch, this rank's part.

    Args:
        data: a map-style Dataset, a DataLoader or an iterable of batches.
        config: the options (``batch_size``, ``shuffle``, ``seed``, ``num_epochs``).
        rank: this process's rank.
        world: the number of processes.

    Returns:
        The batches.

    Raises:
        ConfigError: ``data`` is a one-shot iterator and ``num_epochs > 1``.

    Example:
        >>> batches = training_batches(dataset, TrainerConfig(batch_size=16), rank=0, world=1)
    """
    batches = DatasetBatches(
        data,
        role="train_dataset",
        train=True,
        batch_size=config.batch_size,
        shuffle=config.shuffle,
        seed=config.seed,
        rank=rank,
        world=world,
    )
    if batches.one_shot and config.num_epochs > 1:
        raise ConfigError(
            "train_dataset is a one-shot iterator but num_epochs > 1; pass a "
            "list, a Dataset or a DataLoader that can be iterated again"
        )
    return batches


def evaluation_batches(
    data: Any, config: TrainerConfig, *, rank: int, world: int, role: str = "eval_dataset"
) -> DatasetBatches:
    """The evaluation batches of ``data``, in order (``rank=0, world=1`` for all of them).

    Args:
        data: a map-style Dataset, a DataLoader or an iterable of batches.
        config: the options (``eval_batch_size``, else ``batch_size``).
        rank: this process's rank.
        world: the number of processes sharing the evaluation.
        role: the argument's name for messages.

    Returns:
        The batches.

    Example:
        >>> batches = evaluation_batches(dataset, TrainerConfig(), rank=0, world=1)
    """
    return DatasetBatches(
        data,
        role=role,
        train=False,
        batch_size=config.eval_batch_size or config.batch_size,
        shuffle=False,
        seed=config.seed,
        rank=rank,
        world=world,
    )


def steps_per_epoch(batches: DatasetBatches, accumulation: int) -> int | None:
    """Optimizer steps per epoch (None when the data has no length).

    Args:
        batches: the training batches.
        accumulation: micro-batches per optimizer step (``gradient_accumulation_steps``).

    Returns:
        ``len(batches) // accumulation``, or None.

    Raises:
        ConfigError: an epoch has fewer micro-batches than one optimizer step needs.

    Example:
        >>> steps_per_epoch(batches, accumulation=4)
        10
    """
    if not batches.has_length:
        return None
    steps = len(batches) // accumulation
    if steps == 0:
        raise ConfigError(
            f"{batches.role} gives {len(batches)} batch(es) per epoch, "
            f"fewer than gradient_accumulation_steps={accumulation}: no optimizer step "
            "would run; lower batch_size or gradient_accumulation_steps"
        )
    return steps


def to_training_device(batch: Any, device: torch.device) -> Any:
    """Move a batch to the training device; to CUDA through pinned memory, without waiting.

    Args:
        batch: a tensor or a nest of mappings, lists and tuples.
        device: the training device.

    Returns:
        The batch on ``device``; a CUDA copy is asynchronous (no host sync per step).

    Example:
        >>> to_training_device({"x": torch.zeros(2)}, torch.device("cpu"))["x"].device
        device(type='cpu')
    """
    if device.type != "cuda":
        return to_device(batch, device)
    return to_device(pin_memory(batch), device, non_blocking=True)


def resolve_device(spec: str) -> torch.device:
    """The device a ``TrainerConfig.device`` value names.

    Args:
        spec: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N" or "xla".

    Returns:
        The device.

    Raises:
        ConfigError: CUDA or torch_xla was asked for but is not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"TrainerConfig.device={spec!r} but CUDA is not available in this "
            "PyTorch build or machine; use device='auto' or 'cpu'"
        )
    if spec == "xla":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError:
            raise ConfigError(
                "TrainerConfig.device='xla' needs the torch_xla package, which is "
                "not installed; install torch-xla on a TPU host or use "
                "device='auto'"
            ) from None
        return xm.xla_device()
    return torch.device(spec)
