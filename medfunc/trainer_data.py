"""How the Trainer turns data into batches: one rule, seeded epoch order, resume offsets, shards.

The rule: a list, a tuple or a map-style dataset (an object with ``__getitem__`` and ``__len__``)
holds *examples*; the trainer batches them with ``batch_size`` and collates each batch with
``collate_fn`` (default: ``torch.utils.data.default_collate``). A ``DataLoader``, or an iterable
that is not a sized dataset (a generator, an ``IterableDataset``), yields *ready batches*, used
as they are. Data that contradicts the rule raises :class:`~medfunc.errors.ConfigError` naming
the rule and how to choose the other (see :func:`looks_batched` and :func:`check_ready_batch`).

For training, epoch ``e`` visits the examples in the order of ``DistributedSampler(dataset,
num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)`` after ``set_epoch(e)`` - in a single
process simply ``torch.randperm(len(dataset))`` drawn from a generator seeded with ``seed + e`` -
so a resumed epoch replays the same order and can skip the batches it already consumed without
reading them. Evaluation visits the examples ``rank, rank + world, ...`` in order, so every
example is seen exactly once across ranks. Ready batches are used as given (a DataLoader's
sampler gets ``set_epoch`` every epoch); for evaluation under torchrun they are split by batch
index unless their sampler already is a ``DistributedSampler``.

The helpers at the end build the Trainer's batches from a :class:`TrainerConfig`
(:func:`training_batches`, :func:`evaluation_batches`, :func:`steps_per_epoch`), name the
training device (:func:`resolve_device`) and move each batch there (:func:`to_training_device`).

Example:
    >>> examples = [{"x": torch.randn(6), "labels": torch.tensor(i % 2)} for i in range(10)]
    >>> batches = DatasetBatches(examples, role="train_dataset", batch_size=4, shuffle=True,
    ...                          seed=0, rank=0, world=1, train=True)
    >>> [len(window[0]["labels"]) for window in batches.windows(epoch=0, start=0, size=1)]
    [4, 4, 2]
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Sampler,
    default_collate,
)

from medfunc.data import to_device
from medfunc.device_options import resolve as resolve_device_options
from medfunc.errors import BatchError, ConfigError
from medfunc.trainer_config import TrainerConfig

log = logging.getLogger("medfunc.trainer")


#: Batch keys that hold labels (as :data:`medfunc.metrics.LABEL_KEYS`).
LABEL_KEYS = ("labels", "label", "targets", "target", "y")
#: How many items of a list :func:`looks_batched` inspects.
INSPECTED_ITEMS = 16


def is_map_style(data: Any) -> bool:
    """Whether ``data`` holds examples (batched by the trainer) rather than ready batches.

    Args:
        data: a ``Dataset``, a list, a ``DataLoader``, a generator, ...

    Returns:
        True for lists, tuples, ``torch.utils.data.Dataset`` objects (not iterable datasets) and
        other objects with ``__getitem__`` and ``__len__``; False for DataLoaders, iterable
        datasets, iterators, mappings and strings.

    Example:
        >>> x = torch.zeros(4, 6)
        >>> is_map_style([{"x": x[0]}]), is_map_style(DataLoader([{"x": x[0]}], batch_size=2))
        (True, False)
    """
    if isinstance(data, (DataLoader, IterableDataset, Mapping, str, bytes)):
        return False
    if isinstance(data, (Dataset, list, tuple)):
        return True
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _label_of(item: Any) -> Any:
    """The labels of a dict or tuple example/batch (a tuple's last element), or None."""
    if isinstance(item, Mapping):
        return next((item[k] for k in LABEL_KEYS if k in item), None)
    if isinstance(item, (list, tuple)) and len(item) > 1:
        return item[-1]
    return None


def _leading_size(item: Any) -> int | None:
    """``n`` when ``item`` looks like one batch of ``n > 1`` examples, else None.

    That is: a dict or tuple whose values are all tensors with at least one dimension, sharing
    one leading size ``n > 1``, one of them with two or more dimensions, with a label (see
    :func:`_label_of`) that has that leading dimension (not a scalar per example).
    """
    values = list(item.values()) if isinstance(item, Mapping) else item
    if not isinstance(values, (list, tuple)) or not values:
        return None
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in values):
        return None
    sizes = {v.shape[0] for v in values}
    label = _label_of(item)
    if len(sizes) != 1 or label is None or not any(v.dim() >= 2 for v in values):
        return None
    n = sizes.pop()
    return n if n > 1 else None


def looks_batched(items: list | tuple) -> bool:
    """Whether a list's items already carry a batch dimension that collation would stack again.

    The heuristic: each of the first :data:`INSPECTED_ITEMS` items (all of them when fewer) is a
    dict or tuple whose values are all tensors with at least one dimension, share one leading
    size ``n > 1``, include a tensor with two or more dimensions, and include labels
    (``labels``, ``label``, ``targets``, ``target``, ``y``, or a tuple's last element) that are
    not a scalar per example; and ``n`` is the same for all of them (the list's last item may
    be smaller, as a last partial batch). Examples of token-level tasks (``input_ids`` and
    ``labels`` of shape ``(T,)``) and of image classification (``(C, H, W)`` and a scalar label)
    are not taken for batches.

    Args:
        items: the list (or tuple) given as a dataset.

    Returns:
        True when the items look like ready batches.

    Example:
        >>> batch = {"x": torch.zeros(8, 6), "labels": torch.zeros(8, dtype=torch.long)}
        >>> example = {"x": torch.zeros(6), "labels": torch.tensor(0)}
        >>> looks_batched([batch, batch]), looks_batched([example, example])
        (True, False)
    """
    inspected = items[:INSPECTED_ITEMS]
    sizes = [_leading_size(item) for item in inspected]
    if not sizes or any(size is None for size in sizes):
        return False
    full = sizes[:-1] if len(inspected) == len(items) and len(sizes) > 1 else sizes
    return len(set(full)) == 1 and sizes[-1] <= full[0]


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_ready_batch(batch: Any, role: str, kind: str, batch_size: int) -> None:
    """Refuse a "ready batch" that is a single example: its labels are a scalar (0-d).

    Args:
        batch: the first batch the data yielded.
        role: the argument's name for messages, e.g. ``"train_dataset"``.
        kind: what the data is, e.g. ``"a DataLoader"``.
        batch_size: the configured batch size, for the message.

    Raises:
        ConfigError: the batch's labels are a scalar.

    Example:
        >>> check_ready_batch({"x": torch.zeros(4, 6), "labels": torch.zeros(4)}, "data",
        ...                   "a DataLoader", 8)
    """
    if not _is_scalar(_label_of(batch)):
        return
    raise ConfigError(
        f"{role} is {kind}, so each item it yields is used as a ready batch (the rule: a "
        "DataLoader or a generator yields batches; a list or a Dataset holds examples), but "
        "its first item has scalar labels: it is a single example, not a batch. Give the "
        "DataLoader a batch_size, or pass the examples themselves (a list or a map-style "
        f"Dataset) to have the trainer batch them with batch_size={batch_size}"
    )


def pin_memory(tree: Any) -> Any:
    """Page-lock the CPU tensors of a (nested) batch, for asynchronous copies to CUDA.

    Args:
        tree: a tensor or a nest of mappings, lists and tuples (other leaves pass through).

    Returns:
        The same structure with pinned CPU tensors (tensors already pinned or not on the CPU
        are returned as they are).

    Example::

        batch = pin_memory({"x": torch.zeros(2)})   # needs a CUDA machine
        assert batch["x"].is_pinned()
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


class LoaderOptions(NamedTuple):
    """How a map-style dataset's examples are loaded: ``torch.utils.data.DataLoader`` options.

    Attributes:
        num_workers: worker processes reading and collating batches (0: in this process).
        pin_memory: the loader page-locks the batches (meaningful on CUDA only).
        persistent_workers: the workers live from one epoch to the next (with workers > 0).
        prefetch_factor: batches each worker loads in advance (with workers > 0).
        loader: the DataLoader class. ``torch.utils.data.DataLoader`` gets medfunc's seeded
            per-epoch batch order; any other callable is called as the original trainer calls
            it, ``loader(dataset, batch_size=, shuffle=, collate_fn=, num_workers=,
            pin_memory=, ...)``, and what it returns is used as ready batches.
    """

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int = 2
    loader: Callable[..., Any] = DataLoader

    def worker_kwargs(self) -> dict[str, Any]:
        """The DataLoader keyword arguments of these options (worker-only ones with workers)."""
        kwargs: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs


class _BatchReader(Dataset):
    """Item ``indices`` is the collated batch of those examples (read in a loader's worker)."""

    def __init__(self, data: Any, role: str, collate_fn: Callable[[list], Any]) -> None:
        self.data, self.role, self.collate_fn = data, role, collate_fn

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices: list[int]) -> Any:
        items = []
        for index in indices:
            try:
                items.append(self.data[index])
            except Exception as err:
                raise BatchError(
                    f"{self.role}[{index}] could not be read: {type(err).__name__}: {err}"
                ) from err
        try:
            return self.collate_fn(items)
        except Exception as err:
            raise BatchError(
                f"{self.role} items {indices[:4]}... could not be batched together "
                f"({type(err).__name__}: {err}); return tensors or numbers of equal "
                "shapes (or dicts of them) from the dataset, or set TrainerConfig.collate_fn"
            ) from err


class _EpochBatches(Sampler):
    """The index lists of one epoch's batches, from batch ``start`` on (set before iterating)."""

    def __init__(self, order: Callable[[int], list[int]], batch_size: int) -> None:
        self.order, self.batch_size = order, batch_size
        self.epoch, self.start = 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        indices, size = self.order(self.epoch), self.batch_size
        for begin in range(self.start * size, len(indices), size):
            yield indices[begin : begin + size]

    def __len__(self) -> int:
        return max(0, math.ceil(len(self.order(self.epoch)) / self.batch_size) - self.start)


def _epoch_order(
    sampler: DistributedSampler | None, size: int, epoch: int, *, rank: int, world: int
) -> list[int]:
    """The example indices of ``epoch`` on this rank, in visiting order."""
    if sampler is not None:
        sampler.set_epoch(epoch)
        return list(sampler)
    return list(range(rank, size, world))


def _as_is(batch: Any) -> Any:
    return batch


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A loader worker ignores SIGTERM and SIGINT: the training process stops the run.

    A signal sent to the whole process group (Ctrl-C, a scheduler's SIGTERM to every process of
    a job) would otherwise end the workers and fail the next batch instead of letting the
    Trainer checkpoint the step boundary (see :mod:`medfunc.preemption`). The workers end when
    the Trainer closes the loader, or by themselves when the training process is gone.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
        collate_fn: ``collate_fn(list_of_examples) -> batch`` (default ``default_collate``).

    Raises:
        ConfigError: ``data`` is none of the accepted kinds, or a list of ready batches (see
            :func:`looks_batched`).
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
        collate_fn: Callable[[list], Any] | None = None,
        loading: LoaderOptions | None = None,
    ) -> None:
        loading = loading or LoaderOptions()
        map_style = is_map_style(data)
        if not map_style and (
            isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable)
        ):
            raise ConfigError(
                f"{role} must be a list or map-style Dataset of examples, a DataLoader or an "
                f"iterable of batches; got {type(data).__name__}"
            )
        if isinstance(data, (list, tuple)) and looks_batched(data):
            raise ConfigError(
                f"{role} is a {type(data).__name__}, so its items are taken as single examples "
                f"and batched {batch_size} at a time (the rule: a list or a Dataset holds "
                "examples; a DataLoader or a generator yields batches), but its items already "
                "look like batches (tensors sharing a leading size > 1, labels not scalar per "
                "example), which batching would stack again. To train on them as ready "
                "batches pass DataLoader(data, batch_size=None); if they really are single "
                "examples, wrap them in a map-style Dataset (any object with __getitem__ and "
                "__len__ that is not a list), which is batched without this check"
            )
        self.collate_fn = collate_fn or default_collate
        if map_style and loading.loader is not DataLoader:
            data = loading.loader(
                data,
                batch_size=batch_size,
                shuffle=shuffle and train,
                collate_fn=self.collate_fn,
                **loading.worker_kwargs(),
            )
            map_style = False
        self.data, self.role, self.rank, self.world = data, role, rank, world
        self.map_style = map_style
        self.batch_size = batch_size
        self.seed = seed
        self.sampler = None
        if map_style and train:
            self.sampler = DistributedSampler(
                data, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
            )
        # no reference back to self: a cycle would leave the loader's workers to the garbage
        # collector, which may then run in a forked worker of another loader
        size = len(data) if map_style else 0
        order = functools.partial(_epoch_order, self.sampler, size, rank=rank, world=world)
        self._batches = _EpochBatches(order, batch_size)
        self._generator = torch.Generator()
        self._loader = (
            DataLoader(
                _BatchReader(data, role, self.collate_fn),
                batch_size=None,
                sampler=self._batches,
                collate_fn=_as_is,
                generator=self._generator,
                worker_init_fn=_leave_stop_signals_to_the_trainer,
                **loading.worker_kwargs(),
            )
            if map_style
            else None
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
            self._batches.epoch, self._batches.start = epoch, start
            self._generator.manual_seed(self.seed + epoch)
            yield from self._loader
            return
        sampler = _inner_sampler(self.data)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batches: Iterable[Any] = self.data
        if self._split_batches:
            batches = itertools.islice(batches, self.rank, None, self.world)
        kind = "a DataLoader" if isinstance(self.data, DataLoader) else "an iterable of batches"
        for count, batch in enumerate(itertools.islice(batches, start, None)):
            if count == 0:
                check_ready_batch(batch, self.role, kind, self.batch_size)
            yield batch

    def close(self) -> None:
        """End the loader's worker processes now.

        Persistent workers otherwise live until the loader is garbage-collected, which an
        exception's traceback (a reference cycle) can delay until a collection that may even
        run inside another loader's forked worker. Iterating again starts new workers.
        """
        # DataLoader keeps its persistent iterator in a private attribute and offers no public
        # way to end its workers; this is the one place that reaches for it
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            self._loader._iterator = None

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


def loader_options(
    config: TrainerConfig,
    device: torch.device | None = None,
    loader: Callable[..., Any] = DataLoader,
) -> LoaderOptions:
    """The DataLoader options of ``config`` on ``device`` (``pin_memory`` on CUDA only).

    Args:
        config: the options (``num_workers``, ``pin_memory``, ``persistent_workers``,
            ``prefetch_factor``).
        device: the training device (default: the CPU).
        loader: the DataLoader class to build loaders with (see :class:`LoaderOptions`).

    Returns:
        The options.

    Example:
        >>> loader_options(TrainerConfig(num_workers=4)).worker_kwargs()
        {'num_workers': 4, 'pin_memory': False, 'persistent_workers': True, 'prefetch_factor': 2}
    """
    resolved = resolve_device_options(config, device or torch.device("cpu"))
    return LoaderOptions(
        num_workers=config.num_workers,
        pin_memory=resolved.pin_memory,
        persistent_workers=config.persistent_workers,
        prefetch_factor=config.prefetch_factor,
        loader=loader,
    )


def training_batches(
    data: Any,
    config: TrainerConfig,
    *,
    rank: int,
    world: int,
    loading: LoaderOptions | None = None,
) -> DatasetBatches:
    """The training batches of ``data``: seeded shuffle per epoch, this rank's part.

    Args:
        data: a map-style Dataset, a DataLoader or an iterable of batches.
        config: the options (``batch_size``, ``shuffle``, ``seed``, ``num_epochs``).
        rank: this process's rank.
        world: the number of processes.
        loading: how map-style data is loaded (default: :func:`loader_options` of ``config``
            on the CPU).

    Returns:
        The batches.

    Raises:
        ConfigError: ``data`` is a one-shot iterator and ``num_epochs > 1``.

    Example:
        >>> examples = [{"x": torch.zeros(6), "labels": torch.tensor(0)}] * 40
        >>> len(training_batches(examples, TrainerConfig(batch_size=16), rank=0, world=1))
        3
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
        collate_fn=config.collate_fn,
        loading=loading or loader_options(config),
    )
    if batches.one_shot and config.num_epochs > 1:
        raise ConfigError(
            "train_dataset is a one-shot iterator but num_epochs > 1; pass a "
            "list, a Dataset or a DataLoader that can be iterated again"
        )
    return batches


def evaluation_batches(
    data: Any,
    config: TrainerConfig,
    *,
    rank: int,
    world: int,
    role: str = "eval_dataset",
    loading: LoaderOptions | None = None,
) -> DatasetBatches:
    """The evaluation batches of ``data``, in order (``rank=0, world=1`` for all of them).

    Args:
        data: a map-style Dataset, a DataLoader or an iterable of batches.
        config: the options (``eval_batch_size``, else ``batch_size``).
        rank: this process's rank.
        world: the number of processes sharing the evaluation.
        role: the argument's name for messages.
        loading: how map-style data is loaded (default: :func:`loader_options` of ``config``).

    Returns:
        The batches.

    Example:
        >>> examples = [{"x": torch.zeros(6), "labels": torch.tensor(0)}] * 40
        >>> len(evaluation_batches(examples, TrainerConfig(batch_size=16), rank=1, world=2))
        2
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
        collate_fn=config.collate_fn,
        loading=loading or loader_options(config),
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
        >>> examples = [{"x": torch.zeros(6), "labels": torch.tensor(0)}] * 40
        >>> batches = training_batches(examples, TrainerConfig(batch_size=1), rank=0, world=1)
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
