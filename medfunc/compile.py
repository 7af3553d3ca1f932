"""compile_step: the training step under ``torch.compile`` and whole-step CUDA-graph capture.

``compile_step(train_step, mode=...)`` returns a callable with ``train_step``'s signature,
``fast_step(state, batch, *, donate=True) -> (state, metrics)``, that computes the same step:

* ``"inductor"``: the step's tensor work (forward, backward, loss scaling, clipping, LR schedule,
  optimizer) runs as one ``torch.compile(fullgraph=True)`` graph when the optimizer kernels can
  be traced, else as a compiled forward/backward followed by the eager update (see
  :attr:`CompileStats.whole_step_compiled`). Works on any device.
* ``"cudagraph"``: the whole donated step is captured in one ``torch.cuda.CUDAGraph`` per batch
  signature and accumulation phase, and replayed on every call (CUDA only).
* ``"inductor+cudagraph"``: the compiled step, captured in a CUDA graph (CUDA only).

The host-side parts of a step stay outside the compiled/captured region: the liveness check,
batch validation, train mode, seeding the RNG from ``state.rng``, and the ``[key, counter]``
and accumulation counters (CPU tensors). See ``docs/performance.md`` for when to use which mode.

The compiling modes run the model's forward once on the host (eval mode, no gradients, the
generators forked) before the first trace of each kind of batch, so that what a model sets on
its first call (Hugging Face's ``config.problem_type``) is set before torch.compile guards on
it: one compile per model and batch shape, not two.

Which parameters get a gradient is part of what a graph is specialised on. A compiled graph
finds it while tracing (None gradients are Python facts) and torch.compile's guards on the
forward's Python control flow (a batch constant, a module attribute) compile another graph when
it changes; an update that ends an accumulation window has one graph per set of parameters the
window differentiated.

Example::

    from medfunc.compile import compile_step, default_mode

    fast_step = compile_step(mf.train_step, mode=default_mode(state.device))
    for batch in loader:
        state, metrics = fast_step(state, batch)
    fast_step.stats.replays  # CUDA-graph modes: one replay per call
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import optree
import torch

from medfunc.accumulation import next_window, window_grads, window_of, window_position
from medfunc.calling import check_batch, check_devices, module_mode
from medfunc.errors import ConfigError
from medfunc.graphs import GraphCache
from medfunc.optim import find_optimizer
from medfunc.optim.torch_adapter import find_adapter
from medfunc.rng import seeded_rng
from medfunc.state import TrainState
from medfunc.step import (
    StepStatic,
    StepTrees,
    apply_model,
    apply_update,
    finish_step,
    forward_backward,
    grad_leaves,
    not_applied,
    static_of,
    step_core,
    train_step,
    trees_of,
    without_grad_leaves,
)

__all__ = [
    "MODES",
    "CompileStats",
    "CompiledStep",
    "compile_step",
    "default_mode",
    "resolve_mode",
]

MODES = ("inductor", "cudagraph", "inductor+cudagraph")
_GRAPH_MODES = ("cudagraph", "inductor+cudagraph")
_DEFAULT_INDUCTOR_OPTIONS = {"fallback_random": True}


def default_mode(device: str | torch.device) -> str:
    """The fastest mode for a device: ``"inductor+cudagraph"`` on CUDA, ``"inductor"`` elsewhere.

    Args:
        device: the device the state lives on (``"cuda"``, ``"cuda:1"``, ``"cpu"``, ...).

    Returns:
        A mode name from :data:`MODES`.

    Example:
        >>> default_mode("cpu")
        'inductor'
    """
    return "inductor+cudagraph" if torch.device(device).type == "cuda" else "inductor"


def resolve_mode(option: bool | str | None, device: str | torch.device) -> str | None:
    """Map a ``compile`` option (``False``/``None``, ``True`` or a mode name) to a mode.

    Args:
        option: ``False``/``None`` (no compilation), ``True`` (:func:`default_mode` of the
            device) or one of :data:`MODES`.
        device: the training device.

    Returns:
        The mode name, or ``None`` for the eager step.

    Raises:
        ConfigError: an unknown option.

    Example:
        >>> resolve_mode(True, "cuda")
        'inductor+cudagraph'
    """
    if option is None or option is False:
        return None
    if option is True:
        return default_mode(device)
    if option not in MODES:
        raise ConfigError(f"compile must be False, True or one of {list(MODES)}, got {option!r}")
    return option


@dataclasses.dataclass
class CompileStats:
    """What a compiled step did so far (to check that a graph is really used).

    Attributes:
        calls: steps run.
        compiles: graphs torch.compile produced for this step (recompiles included).
        whole_step_compiled: True when forward, backward and the optimizer update form one
            compiled graph; False when only the forward/backward is compiled and the update runs
            eagerly (the optimizer kernels could not be traced); None before the first call or
            without inductor.
        captures: CUDA graphs captured.
        replays: CUDA graph replays (one per call in the CUDA-graph modes).
        evictions: graphs dropped because more than ``max_graphs`` batch signatures were seen.
        copies_in: calls that copied a state into the graphs' static storage (a state the
            compiled step had not returned itself).
    """

    calls: int = 0
    compiles: int = 0
    whole_step_compiled: bool | None = None
    captures: int = 0
    replays: int = 0
    evictions: int = 0
    copies_in: int = 0


def _same_static(a: StepStatic, b: StepStatic) -> bool:
    return all(x is y or x == y for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# torch.compile


class _SkippedLogCall(str):
    """A ``logging.Logger`` method in dynamo's ignore set.

    It compares equal to the method itself (dynamo tests ``method in ignore_set``) and reads as
    the method's name: torch 2.11 sorts that set and writes it to JSON in its compile metrics,
    which fails for bare functions.
    """

    fn: Callable

    def __new__(cls, fn: Callable) -> _SkippedLogCall:
        self = super().__new__(cls, f"logging.Logger.{getattr(fn, '__name__', fn)}")
        self.fn = fn
        return self

    def __hash__(self) -> int:
        return hash(self.fn)

    def __eq__(self, other: object) -> bool:
        return other is self.fn or (isinstance(other, _SkippedLogCall) and other.fn is self.fn)


def _quiet_logging_methods() -> set[_SkippedLogCall]:
    """Logger methods that the compiled step skips instead of breaking the graph on.

    Models log from their forward (Hugging Face's ``logger.warning_once`` about a default loss,
    for one); dynamo cannot trace a logging call, so under ``fullgraph=True`` a single log line
    would make the whole step uncompilable. Inside the compiled step these calls do nothing;
    the eager step still logs them. Errors and criticals are not skipped.
    """
    names = ("debug", "info", "warning", "warning_once", "info_once", "warning_advice")
    return {
        _SkippedLogCall(getattr(logging.Logger, n)) for n in names if hasattr(logging.Logger, n)
    }


# Graphs one code object may hold. Every compiled step in a process shares the code of
# ``whole_step``, and each keeps a graph per accumulation phase and per set of parameters with
# gradients (a model with two task heads and an optional block needs four); dynamo's default
# of 8 made the second such model in a process fail under fullgraph=True.
_RECOMPILE_LIMIT = 64


def _dynamo_patch() -> Any:
    """The dynamo settings of a compiled step (autograd ops traced, logging calls skipped, room
    for a graph per set of parameters with gradients)."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    settings: dict[str, Any] = {"trace_autograd_ops": True, limit: _RECOMPILE_LIMIT}
    if hasattr(config, "ignore_logger_methods"):
        settings["ignore_logger_methods"] = _quiet_logging_methods()
    return config.patch(**settings)


def _dynamo_unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _uses_fused_kernels(static: StepStatic) -> bool:
    """Whether the state's optimizer runs outside a traced graph: PyTorch's fused kernels (which
    torch.compile leaves out of graphs) or a ``from_torch`` optimizer (which reads its skip flag
    on the host). The update then runs eagerly, after the compiled forward/backward."""
    if find_adapter(static.tx) is not None:
        return True
    try:
        spec, _ = find_optimizer(static.tx)
    except ConfigError:
        return False
    return bool(spec.kernel_config(static.device).fused)


def _load_inductor() -> None:
    """Import inductor's compiler ahead of the first compile, without the deprecation it emits.

    Importing ``torch._inductor.compile_fx`` loads ``torch.utils.mkldnn``, whose module body
    uses ``torch.jit.script_method`` and so warns (``DeprecationWarning``, torch >= 2.10) the
    first time any ``torch.compile`` backend runs: a warning about torch's own code that no
    caller can act on, and an error under ``-W error``. Loaded here, under a filter for that one
    message, a compiled step emits no warning.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*torch.jit.script_method", category=DeprecationWarning
        )
        import torch._inductor.compile_fx  # noqa: F401


class _Inductor:
    """The step core under ``torch.compile``: one whole-step graph, or a compiled
    forward/backward plus the eager update when the optimizer cannot be traced."""

    def __init__(
        self,
        static: StepStatic,
        stats: CompileStats,
        *,
        dynamic: bool | None,
        fullgraph: bool,
        options: dict[str, Any],
    ) -> None:
        import torch._dynamo  # noqa: F401 - loaded only by the compiling modes

        _load_inductor()
        self.static = static
        self.stats = stats
        self.dynamic = dynamic
        self.fullgraph = fullgraph
        self.options = options
        self.whole: dict[tuple[bool, tuple[str, ...]], Callable] = {}
        # one patch object for every call: each new one leaves a ContextVar behind (a leak)
        self.patch = _dynamo_patch()
        self.grads_part: Callable | None = None

    def _compile(self, fn: Callable, fullgraph: bool) -> Callable:
        return torch.compile(
            fn,
            fullgraph=fullgraph,
            dynamic=self.dynamic,
            backend="inductor",
            options=dict(self.options),
        )

    def _whole(self, apply: bool, window: tuple[str, ...]) -> Callable:
        # the window only matters to an update that ends an accumulation window
        key = (apply, window if apply and self.static.accumulate_steps > 1 else ())
        fn = self.whole.get(key)
        if fn is None:
            static = self.static
            used = key[1]

            def whole_step(trees: StepTrees, batch: Any) -> tuple[StepTrees, dict, tuple]:
                return step_core(static, apply, trees, batch, window=used)

            fn = self.whole[key] = self._compile(whole_step, fullgraph=True)
        return fn

    def _split(
        self, trees: StepTrees, batch: Any, apply: bool, window: tuple[str, ...]
    ) -> tuple[StepTrees, dict, tuple[str, ...]]:
        if self.grads_part is None:
            static = self.static

            def grads_part(trees: StepTrees, batch: Any) -> tuple[list, torch.Tensor, tuple]:
                return forward_backward(static, trees, batch)

            self.grads_part = self._compile(grads_part, fullgraph=self.fullgraph)
        try:
            grads, loss, present = self.grads_part(trees, batch)
        except torch._dynamo.exc.RecompileError:
            raise
        except torch._dynamo.exc.TorchDynamoException as e:
            raise ConfigError(
                "torch.compile could not capture the model's forward/backward as one graph "
                f"({str(e).splitlines()[0]}). Pass fullgraph=False to compile_step to allow "
                "graph breaks, or use the eager train_step / mode='cudagraph'."
            ) from e
        if not apply:
            return (*not_applied(self.static, trees, loss), present)
        if self.static.accumulate_steps > 1:
            grads = window_grads(self.static.names, grads, (*window, *present))
        return (*apply_update(self.static, trees, grads, loss), present)

    def __call__(
        self, trees: StepTrees, batch: Any, apply: bool, window: tuple[str, ...]
    ) -> tuple[StepTrees, dict, tuple[str, ...]]:
        before = _dynamo_unique_graphs()
        names = self.static.names
        try:
            with self.patch:
                out, metrics, present = self._run(grad_leaves(trees, names), batch, apply, window)
            return without_grad_leaves(out, trees, names), metrics, present
        finally:
            self.stats.compiles += _dynamo_unique_graphs() - before

    def _run(
        self, trees: StepTrees, batch: Any, apply: bool, window: tuple[str, ...]
    ) -> tuple[StepTrees, dict, tuple[str, ...]]:
        if self.stats.whole_step_compiled is None and _uses_fused_kernels(self.static):
            self.stats.whole_step_compiled = False
        if self.fullgraph and self.stats.whole_step_compiled is not False:
            try:
                out = self._whole(apply, window)(trees, batch)
            except torch._dynamo.exc.RecompileError:
                raise  # the user asked for an error on recompiles (error_on_recompile)
            except torch._dynamo.exc.TorchDynamoException as e:
                self.stats.whole_step_compiled = False
                warnings.warn(
                    "compile_step: torch.compile could not trace the whole step as one graph "
                    f"({str(e).splitlines()[0]}); compiling the forward/backward alone and "
                    "running the optimizer update eagerly",
                    stacklevel=4,
                )
            else:
                self.stats.whole_step_compiled = True
                return out
        return self._split(trees, batch, apply, window)


def _probe_key(batch: Any) -> Hashable:
    """What a model's first forward may specialise on: the batch's structure, each tensor's
    dtype, rank and device, and its constants (strings, flags and other hashable ones by
    value; numbers and unhashable ones by type). Not the sizes, nor a number that may change
    every step (a temperature, a step index), so such batches do not run the forward again."""
    if isinstance(batch, Mapping):
        batch = dict(batch)
    leaves, treedef = optree.tree_flatten(batch)
    parts: list[Hashable] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((leaf.dtype, leaf.dim(), leaf.device))
            continue
        try:
            hash(leaf)
        except TypeError:
            parts.append(type(leaf))
            continue
        numeric = isinstance(leaf, (int, float, complex)) and not isinstance(leaf, bool)
        parts.append(type(leaf) if numeric else (type(leaf), leaf))
    return treedef, tuple(parts)


def _settle_model(state: TrainState, batch: Any) -> None:
    """Run the model's forward once on the host so that what it sets on its first call is set
    before torch.compile traces it.

    Some models write Python attributes in their forward the first time they see a batch
    (Hugging Face classifiers set ``config.problem_type`` from the labels). Traced first, the
    graph would guard on the unset value and the second call would compile the step again.
    The forward runs as :func:`medfunc.apply_model` runs it (eval mode, ``torch.no_grad()``,
    the state's tensors and autocast), inside ``torch.random.fork_rng`` so that neither the
    global generators nor the state's RNG move: the compiled step draws the numbers it drew
    without this call.
    """
    device = state.device
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        forked = torch.random.fork_rng(devices=[index], device_type="cuda")
    else:
        forked = torch.random.fork_rng(devices=[])
    with forked:
        apply_model(state, batch)


class CompiledStep:
    """``train_step`` compiled and/or captured; call it like ``train_step``.

    Attributes:
        mode: the mode (one of :data:`MODES`).
        stats: a :class:`CompileStats` of what ran.
    """

    def __init__(
        self,
        mode: str,
        *,
        max_graphs: int,
        warmup_steps: int,
        dynamic: bool | None,
        fullgraph: bool,
        options: dict[str, Any],
    ) -> None:
        self.mode = mode
        self.stats = CompileStats()
        self._max_graphs = max_graphs
        self._warmup_steps = warmup_steps
        self._dynamic = dynamic
        self._fullgraph = fullgraph
        self._options = options
        self._static: StepStatic | None = None
        self._inductor: _Inductor | None = None
        self._graphs: GraphCache | None = None
        self._settled: set[Hashable] = set()

    def __repr__(self) -> str:
        return f"CompiledStep(mode={self.mode!r}, stats={self.stats})"

    def _bind(self, state: TrainState) -> StepStatic:
        path = state.grad_path
        if path is not None and (path.value_and_grad is not None or path.engine is not None):
            raise ConfigError(
                f"compile_step compiles the functional step, but this state's gradients come "
                f"from its {path.name} back-end; use mf.train_step (or "
                "mf.distributed.step_for(state)) for it"
            )
        static = static_of(state)
        if self._static is None:
            if self.mode in _GRAPH_MODES and static.device.type != "cuda":
                raise ConfigError(
                    f"mode={self.mode!r} needs CUDA, but the state is on {static.device}; "
                    "use mode='inductor' (or mf.compile.default_mode(device))"
                )
            if self.mode in _GRAPH_MODES and find_adapter(static.tx) is not None:
                raise ConfigError(
                    f"mode={self.mode!r} cannot capture a mf.optim.from_torch optimizer: it reads "
                    "the skip flag and the LR on the host; use mode='inductor' or the eager step"
                )
            self._static = static
            if "inductor" in self.mode:
                self._inductor = _Inductor(
                    static,
                    self.stats,
                    dynamic=self._dynamic,
                    fullgraph=self._fullgraph,
                    options=self._options,
                )
            if self.mode in _GRAPH_MODES:
                run = self._inductor if self._inductor is not None else self._eager_core
                self._graphs = GraphCache(
                    run, self.stats, max_graphs=self._max_graphs, warmup_steps=self._warmup_steps
                )
        elif not _same_static(static, self._static):
            raise ConfigError(
                "this compiled step was built for another model, optimizer, loss_fn, precision "
                "or accumulate_steps; call mf.compile_step(...) once per training setup"
            )
        return static

    def _eager_core(
        self, trees: StepTrees, batch: Any, apply: bool, window: tuple[str, ...]
    ) -> tuple[StepTrees, dict, tuple[str, ...]]:
        static = self._static
        leaves = grad_leaves(trees, static.names)
        return step_core(static, apply, leaves, batch, window=window)

    def __call__(
        self, state: TrainState, batch: Any, *, donate: bool = True
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """Run one step; same contract as :func:`medfunc.train_step`.

        Args:
            state: the current state. With ``donate=True`` (the default) it is consumed.
            batch: a dict, tuple/list or tensor batch on the state's device.
            donate: reuse the state's storage. In the CUDA-graph modes the returned state
                always lives in the graphs' static storage; ``donate=False`` then copies the
                given state in (it stays valid) and is refused for a state that already lives
                there.

        Returns:
            ``(new_state, metrics)`` as :func:`medfunc.train_step`.
        """
        state.check_alive()
        static = self._bind(state)
        check_batch(static.module, static.apply_fn, batch)
        check_devices(batch, static.device)
        if self._inductor is not None:
            key = _probe_key(batch)
            if key not in self._settled:
                _settle_model(state, batch)
                self._settled.add(key)
        count, apply = window_position(state)
        window = window_of(state, count)
        with module_mode(static.module, True):
            if self._graphs is not None:
                trees = self._graphs.bind(state, static, donate)
                metrics, present = self._graphs.step(
                    state, trees, batch, apply, static.device, window
                )
            else:
                trees = trees_of(state, copy=not donate)
                with seeded_rng(state.rng, static.device):
                    trees, metrics, present = self._inductor(trees, batch, apply, window)
        window = next_window(static.names, window, present, apply)
        new_state, metrics = finish_step(
            state, trees, metrics, count=count, donate=donate, window=window
        )
        if self._graphs is not None:
            self._graphs.adopt(new_state)
        self.stats.calls += 1
        return new_state, metrics

    def clear(self) -> None:
        """Drop compiled graphs and captured CUDA graphs (the next call compiles again)."""
        self._static = None
        self._inductor = None
        self._graphs = None
        self._settled = set()


def compile_step(
    step_fn: Callable = train_step,
    *,
    mode: str = "inductor",
    max_graphs: int = 8,
    warmup_steps: int = 3,
    dynamic: bool | None = None,
    fullgraph: bool = True,
    inductor_options: Mapping[str, Any] | None = None,
) -> CompiledStep:
    """Compile ``train_step`` with torch.compile and/or capture it as CUDA graphs.

    Args:
        step_fn: :func:`medfunc.train_step` (the only step this compiles).
        mode: "inductor", "cudagraph" or "inductor+cudagraph" (see the module docstring);
            :func:`default_mode` picks the fastest for a device.
        max_graphs: CUDA-graph modes: the most graphs kept (one per batch signature and
            accumulation phase); beyond it the least recently used graph is evicted (warned once).
        warmup_steps: CUDA-graph modes: eager (or compiling) runs on a side stream, on a copy of
            the state, before each capture.
        dynamic: passed to ``torch.compile``; default None for "inductor" (recompile once with
            dynamic shapes when a second shape arrives) and False for "inductor+cudagraph" (one
            static graph per shape, as CUDA graphs need anyway).
        fullgraph: compile the forward/backward as one graph (error on graph breaks); False
            allows graph breaks in the model.
        inductor_options: inductor config overrides. The default ``{"fallback_random": True}``
            makes dropout draw exactly the eager masks; ``{"fallback_random": False}`` is faster
            but draws different (still ``state.rng``-determined) masks.

    Returns:
        A :class:`CompiledStep`: ``fast_step(state, batch, *, donate=True) -> (state, metrics)``.

    Raises:
        ConfigError: an unknown mode, a step function other than ``train_step``, a CUDA-graph
            mode without CUDA, or invalid ``max_graphs`` / ``warmup_steps``.

    Example::

        fast_step = compile_step(mf.train_step, mode="inductor")
        state, metrics = fast_step(state, batch)  # the first call compiles (seconds)
        fast_step.stats.compiles  # 1
    """
    if step_fn is not train_step:
        raise ConfigError(
            "compile_step compiles medfunc.train_step (its tensor work is rebuilt here without "
            f"the host-side prelude); got {getattr(step_fn, '__qualname__', step_fn)!r}"
        )
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if mode in _GRAPH_MODES and not torch.cuda.is_available():
        raise ConfigError(
            f"mode={mode!r} captures CUDA graphs and needs CUDA, which is not available here; "
            f"use mode='inductor' (mf.compile.default_mode('cpu'))"
        )
    for name, value, minimum in (("max_graphs", max_graphs, 1), ("warmup_steps", warmup_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if dynamic is None and mode == "inductor+cudagraph":
        dynamic = False
    options = dict(_DEFAULT_INDUCTOR_OPTIONS)
    options.update(inductor_options or {})
    return CompiledStep(
        mode,
        max_graphs=max_graphs,
        warmup_steps=warmup_steps,
        dynamic=dynamic,
        fullgraph=fullgraph,
        options=options,
    )
