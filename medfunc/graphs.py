"""Whole-step CUDA graphs for ``compile_step``: capture one step per batch signature, replay it.

A :class:`GraphCache` holds the graphs of one compiled step, all captured against one set of
static state storages (the "slot") and one memory pool, in an LRU cache. Each replay copies
the batch into the graph's input buffers, seeds the CUDA generator from ``state.rng`` and
copies the metrics out through a :class:`MetricPack` (one device copy).

A graph is keyed by the batch signature, the accumulation phase and, for an update that ends an
accumulation window, the parameters the window differentiated; it remembers which parameters
its captured backward pass reached. A replay runs no Python, so a change of the forward's
control flow that the batch signature does not show (a module attribute) is not seen: call
:meth:`~medfunc.compile.CompiledStep.clear` after such a change.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import optree
import torch

from medfunc.errors import BatchError, ConfigError
from medfunc.rng import seeded_rng, step_seed
from medfunc.state import PYTREE_NAMESPACE, TrainState, tree_map
from medfunc.step import StepStatic, StepTrees, trees_of

if TYPE_CHECKING:
    from medfunc.compile import CompileStats


def _align(n: int, to: int = 8) -> int:
    return (n + to - 1) // to * to


class MetricPack:
    """One device byte buffer that a graph writes its metrics into, so a single copy after each
    replay hands the caller fresh metric tensors (graph outputs are overwritten by the next
    replay)."""

    def __init__(self, like: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.layout: list[tuple[str, int, int, torch.dtype, torch.Size]] = []
        offset = 0
        for name, value in like.items():
            nbytes = value.numel() * value.element_size()
            self.layout.append((name, offset, nbytes, value.dtype, value.shape))
            offset = _align(offset + nbytes)
        self.buffer = torch.zeros(max(offset, 8), dtype=torch.uint8, device=device)

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            name: buffer[offset : offset + nbytes].view(dtype).view(shape)
            for name, offset, nbytes, dtype, shape in self.layout
        }

    def write(self, metrics: Mapping[str, torch.Tensor]) -> None:
        """Copy ``metrics`` into the buffer (recorded into the graph during capture)."""
        views = self._views(self.buffer)
        for name, value in metrics.items():
            views[name].copy_(value)

    def read(self) -> dict[str, torch.Tensor]:
        """Fresh metric tensors: one device copy of the buffer, viewed per metric."""
        return self._views(self.buffer.clone())


def batch_signature(batch: Any) -> tuple[list, Any, Hashable]:
    """Flatten a batch: ``(leaves, treedef, key)``; the key names shapes, dtypes and constants."""
    if isinstance(batch, Mapping):
        batch = dict(batch)
    leaves, treedef = optree.tree_flatten(batch)
    parts: list[Hashable] = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            parts.append(("tensor", tuple(leaf.shape), leaf.dtype))
            continue
        try:
            hash(leaf)
        except TypeError as e:
            raise BatchError(
                f"batch leaf {i} is a {type(leaf).__name__}, which cannot be part of a CUDA "
                "graph: a batch may hold tensors and hashable constants (numbers, strings, "
                "None) only"
            ) from e
        parts.append(("const", type(leaf).__name__, leaf))
    return leaves, treedef, (treedef, tuple(parts))


class _Graph(NamedTuple):
    graph: Any
    inputs: list  # the static batch leaves (tensors are the buffers the batch is copied into)
    pack: MetricPack
    present: tuple[str, ...]  # the parameters the captured backward pass reached


class GraphCache:
    """The CUDA graphs of one compiled step, all captured against one set of static state
    storages (the "slot"), kept in an LRU cache of at most ``max_graphs`` entries."""

    def __init__(
        self, run: Callable, stats: CompileStats, *, max_graphs: int, warmup_steps: int
    ) -> None:
        self.run = run
        self.stats = stats
        self.max_graphs = max_graphs
        self.warmup_steps = warmup_steps
        self.graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self.slot: list[torch.Tensor] | None = None
        self.slot_trees: StepTrees | None = None
        self.treedef: Any = None
        self.owner: weakref.ref | None = None
        self.pool: Any = None
        self.warned_eviction = False

    # -- the state slot ------------------------------------------------------------------------

    def bind(self, state: TrainState, static: StepStatic, donate: bool) -> StepTrees:
        """Make the slot hold ``state``'s values and return the slot's trees."""
        if self.owner is not None and self.owner() is state:
            if not donate:
                raise ConfigError(
                    "this state lives in the compiled step's CUDA-graph storage, which the next "
                    "replay overwrites, so it cannot be kept (donate=False). Call with "
                    "donate=True, or use mode='inductor' / mf.train_step for a pure step."
                )
            return self.slot_trees
        trees = trees_of(state, copy=False)
        leaves, treedef = optree.tree_flatten(trees, namespace=PYTREE_NAMESPACE)
        if self.slot is None:
            self._check_leaves(leaves, static.device)
            self.slot = leaves if donate else [t.clone() for t in leaves]
            self.treedef = treedef
            self.slot_trees = optree.tree_unflatten(treedef, self.slot)
            return self.slot_trees
        if treedef != self.treedef or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(self.slot, leaves)
        ):
            raise ConfigError(
                "the state's tensors differ in structure, shape or dtype from the state this "
                "compiled step was captured for; build a new compile_step for another model or "
                "optimizer"
            )
        copied = False
        for dst, src in zip(self.slot, leaves):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
                copied = True
        if copied:
            self.stats.copies_in += 1
            previous = self.owner() if self.owner is not None else None
            if previous is not None and previous is not state and not previous.consumed:
                previous.mark_consumed()
        return self.slot_trees

    @staticmethod
    def _check_leaves(leaves: list, device: torch.device) -> None:
        seen: set[int] = set()
        for leaf in leaves:
            if leaf.device != device:
                raise ConfigError(
                    f"a state tensor of shape {tuple(leaf.shape)} is on {leaf.device}, but CUDA "
                    f"graphs need every state tensor on {device} (optimizer step counters "
                    "included: use the optimizer's default kernel='auto' or 'fused' on CUDA)"
                )
            if leaf.data_ptr() in seen and leaf.numel():
                raise ConfigError(
                    "two state tensors share storage; CUDA-graph modes need distinct tensors "
                    "(tied weights appear once in named_parameters())"
                )
            seen.add(leaf.data_ptr())

    def adopt(self, state: TrainState) -> None:
        """Record ``state`` (built on the slot) as the slot's current owner."""
        self.owner = weakref.ref(state)

    # -- capture and replay --------------------------------------------------------------------

    def step(
        self,
        state: TrainState,
        trees: StepTrees,
        batch: Any,
        apply: bool,
        device: torch.device,
        window: tuple[str, ...] = (),
    ) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
        """Replay (capturing first if needed) the graph of this batch signature and phase.

        Args:
            state: the state being stepped (its RNG seeds the replay).
            trees: the slot's trees (:meth:`bind`).
            batch: the batch.
            apply: this call ends an accumulation window.
            device: the CUDA device.
            window: the names earlier micro-batches of the window differentiated.

        Returns:
            ``(metrics, present)``: fresh metric tensors, and the parameters the graph's
            backward pass reaches (see :func:`medfunc.step.step_core`).
        """
        leaves, treedef, key = batch_signature(batch)
        key = (apply, window if apply else (), key)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(state, trees, leaves, treedef, apply, device, window)
            self._insert(key, entry)
        else:
            self.graphs.move_to_end(key)
        for dst, src in zip(entry.inputs, leaves):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src, non_blocking=True)
        generator = torch.cuda.default_generators[device.index or 0]
        saved = generator.get_state()
        generator.manual_seed(step_seed(state.rng))
        try:
            entry.graph.replay()
        finally:
            generator.set_state(saved)
        self.stats.replays += 1
        return entry.pack.read(), entry.present

    def _insert(self, key: Hashable, entry: _Graph) -> None:
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
            self.stats.evictions += 1
            if not self.warned_eviction:
                self.warned_eviction = True
                warnings.warn(
                    f"compile_step: more than max_graphs={self.max_graphs} batch shapes / "
                    "accumulation phases; evicting the least recently used CUDA graph. Each "
                    "new shape is captured again (slow): pad batches to a few fixed shapes or "
                    "raise max_graphs",
                    stacklevel=4,
                )
        self.graphs[key] = entry

    def _capture(
        self,
        state: TrainState,
        trees: StepTrees,
        leaves: list,
        treedef: Any,
        apply: bool,
        device: torch.device,
        window: tuple[str, ...],
    ) -> _Graph:
        inputs = [
            leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves
        ]
        static_batch = optree.tree_unflatten(treedef, inputs)
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        scratch = tree_map(torch.clone, trees)
        metrics = None
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                with seeded_rng(state.rng, device):
                    scratch, metrics, _ = self.run(scratch, static_batch, apply, window)
        current.wait_stream(side)
        del scratch
        if metrics is None:
            raise ConfigError("warmup_steps must be >= 1 for CUDA-graph capture")
        pack = MetricPack(metrics, device)
        del metrics
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(torch.cuda.default_generators[device.index or 0])
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            new_trees, metrics, present = self.run(trees, static_batch, apply, window)
            new_leaves, treedef = optree.tree_flatten(new_trees, namespace=PYTREE_NAMESPACE)
            if treedef != self.treedef:
                raise ConfigError(
                    "the optimizer returned a state of another structure than it was given; "
                    "CUDA graphs need transformations that keep their state's structure"
                )
            for dst, src in zip(self.slot, new_leaves):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            pack.write(metrics)
        self.stats.captures += 1
        return _Graph(graph, inputs, pack, present)


# ---------------------------------------------------------------------------------------------
# the public callable
