"""TrainState: the one immutable pytree a training run is made of.

Leaves (tensors): ``params`` and ``buffers`` (ordered dicts in the model's ``named_parameters()`` /
``named_buffers()`` order), ``opt_state``, ``loss_scale``, ``step``, ``rng``, ``accum`` and ``ema``.
Static metadata: the module, the gradient transformation ``tx``, ``loss_fn``, the precision policy,
``accumulate_steps`` and ``ema_decay``.

Example:
    >>> model = torch.nn.Linear(3, 1)
    >>> state = init_state(model, mf.optim.sgd(0.1))
    >>> list(state.params)
    ['weight', 'bias']
    >>> state2 = state.replace(step=torch.tensor(5))
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
import torch.utils._pytree as torch_pytree

from medfunc import validation
from medfunc.errors import ConfigError, ConsumedStateError
from medfunc.optim.torch_adapter import check_tx
from medfunc.precision import LossScaleState, Policy, get_policy, init_loss_scale

PYTREE_NAMESPACE = "medfunc"
LEAF_FIELDS = ("params", "buffers", "opt_state", "loss_scale", "step", "rng", "accum", "ema")
STATIC_FIELDS = (
    "module",
    "tx",
    "loss_fn",
    "policy",
    "accumulate_steps",
    "grad_path",
    "trainable_names",
    "apply_fn",
    "ema_decay",
)


class AccumState(NamedTuple):
    """Gradient-accumulation state.

    Attributes:
        grads: running sum of (scaled) micro-batch gradients, keyed like the trainable params.
        count: micro-batches accumulated in the current window (0-d int64 on the CPU).
        loss_sum: sum of the window's micro-batch losses (0-d float32 on the device).
    """

    grads: OrderedDict
    count: torch.Tensor
    loss_sum: torch.Tensor


class EmaState(NamedTuple):
    """The exponential moving average of the trainable parameters (``ema_decay`` set).

    Attributes:
        params: the averages, keyed like the trainable params (same shapes, dtypes, device).
        count: 0-d int64 on the params' device, the updates averaged so far (as
            ``AveragedModel.n_averaged``); the first update copies the parameters.
    """

    params: OrderedDict
    count: torch.Tensor


class GradPath(NamedTuple):
    """How a parallel back-end takes part in the step core (the one pluggable field of a state).

    Attributes:
        name: the back-end ("data_parallel", "fsdp", "deepspeed").
        value_and_grad: ``value_and_grad(static, trees, batch, objective) -> (loss, grads)``
            replacing the functional forward/backward (FSDP2 runs its sharded module itself), or
            None for the default path.
        reduce: an in-place reduction of the gradient list before it is used (the all-reduce of
            data parallelism), or None.
        always_donates: the back-end owns the one copy of the weights, so every step consumes
            the state it is given.
        engine: an engine that owns the whole step (DeepSpeed), else None.
    """

    name: str
    value_and_grad: Callable | None = None
    reduce: Callable[[list[torch.Tensor]], None] | None = None
    always_donates: bool = False
    engine: Any = None


class _Liveness:
    """Marks whether a state's storage was donated to a step (and is therefore gone)."""

    __slots__ = ("consumed",)

    def __init__(self) -> None:
        self.consumed = False


@dataclasses.dataclass(frozen=True, eq=False)
class TrainState:
    """Everything a training run is: parameters, buffers, optimizer and scaler state, counters.

    Attributes:
        params: trainable and frozen parameters, name -> tensor, in ``named_parameters()`` order.
        buffers: module buffers (e.g. BatchNorm running statistics), name -> tensor.
        opt_state: the state of ``tx`` (pytree of tensors).
        loss_scale: :class:`LossScaleState` under fp16, else ``()``.
        step: 0-d int64, optimizer updates applied so far (the LR schedule's count).
        rng: CPU int64 tensor ``[key, counter]``; step randomness comes from it alone.
        accum: :class:`AccumState` when ``accumulate_steps > 1``, else ``()``.
        module: the ``torch.nn.Module`` the params belong to (static).
        tx: the gradient transformation (static).
        loss_fn: optional ``loss_fn(outputs, batch) -> loss`` (static).
        policy: the precision :class:`Policy` (static).
        accumulate_steps: micro-batches per optimizer update (static).
        grad_path: how a parallel back-end takes part in the step (:class:`GradPath`; set by
            :mod:`medfunc.distributed`), or None for a single process.
        apply_fn: optional ``apply_fn(model, batch) -> outputs`` replacing the batch calling
            convention (static; as Flax's ``TrainState.apply_fn``).
        trainable_names: the parameters the optimizer updates, fixed by ``init_state`` (the
            optimizer state was built for exactly these).
        ema: :class:`EmaState` when ``ema_decay`` is set, else ``()``.
        ema_decay: the EMA's decay (static), or None for no EMA.
    """

    params: OrderedDict
    buffers: OrderedDict
    opt_state: Any
    loss_scale: Any
    step: torch.Tensor
    rng: torch.Tensor
    accum: Any
    module: torch.nn.Module
    tx: Any
    loss_fn: Callable | None
    policy: Policy
    accumulate_steps: int
    grad_path: GradPath | None = None
    trainable_names: tuple[str, ...] | None = None
    apply_fn: Callable | None = None
    ema: Any = ()
    ema_decay: float | None = None
    _liveness: _Liveness = dataclasses.field(
        default_factory=_Liveness, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        module = object.__getattribute__(self, "module")
        live = _LIVE_STATES.get(module)
        if live is None:
            live = _LIVE_STATES[module] = weakref.WeakSet()
        live.add(self)

    def __getattribute__(self, name: str) -> Any:
        if name in LEAF_FIELDS and object.__getattribute__(self, "_liveness").consumed:
            raise ConsumedStateError(
                f"this TrainState was donated to a step (donate=True) and its storage now belongs "
                f"to the state that step returned; reading .{name} would see overwritten values. "
                "Use the returned state, or call the step with donate=False to keep this one."
            )
        return object.__getattribute__(self, name)

    @property
    def consumed(self) -> bool:
        """True once the state was donated to a step."""
        return object.__getattribute__(self, "_liveness").consumed

    def check_alive(self) -> None:
        """Raise :class:`ConsumedStateError` if the state was donated."""
        self.step  # noqa: B018 - attribute access performs the check

    def mark_consumed(self) -> None:
        """Mark this state as donated; any later use raises :class:`ConsumedStateError`."""
        object.__getattribute__(self, "_liveness").consumed = True

    def replace(self, **changes: Any) -> TrainState:
        """Return a copy with ``changes`` applied (like ``flax.struct.PyTreeNode.replace``).

        Example:
            >>> state = init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1))
            >>> state = state.replace(step=torch.tensor(5))
            >>> int(state.step)
            5
        """
        self.check_alive()
        if not changes.keys() <= _INIT_FIELDS:
            return dataclasses.replace(self, **changes)  # raises its error for the unknown name
        # What dataclasses.replace does (every init field from self or ``changes``, a fresh
        # liveness flag, __post_init__), without its per-call field walk and frozen __init__: a
        # step builds one state per call.
        new = object.__new__(type(self))
        values = new.__dict__
        values.update(vars(self))
        values.update(changes)
        values["_liveness"] = _Liveness()
        new.__post_init__()
        return new

    @property
    def trainable(self) -> tuple[str, ...]:
        """Names of the parameters the optimizer updates (``requires_grad`` at ``init_state``),
        in model order."""
        if self.trainable_names is not None:
            return self.trainable_names
        return tuple(n for n, p in self.module.named_parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        """The device of the state's step counter (and of its parameters)."""
        return self.step.device


_INIT_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainState) if f.init)


def fields_of(state: TrainState) -> dict[str, Any]:
    """The state's fields by name after one liveness check (read-only use).

    Each attribute read of a state checks that it was not donated; a step reads many fields
    and checks once here instead.

    Args:
        state: the state.

    Returns:
        The state's own field dict (do not modify it).

    Raises:
        ConsumedStateError: the state was donated to a step.

    Example:
        >>> state = init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1))
        >>> fields_of(state)["accumulate_steps"]
        1
    """
    state.check_alive()
    return vars(state)


def _flatten(state: TrainState) -> tuple[tuple, tuple, tuple[str, ...]]:
    children = tuple(getattr(state, f) for f in LEAF_FIELDS)
    static = tuple(getattr(state, f) for f in STATIC_FIELDS)
    return children, static, LEAF_FIELDS


def _unflatten(static: tuple, children: tuple) -> TrainState:
    return TrainState(**dict(zip(LEAF_FIELDS, children)), **dict(zip(STATIC_FIELDS, static)))


optree.register_pytree_node(TrainState, _flatten, _unflatten, namespace=PYTREE_NAMESPACE)


def _torch_flatten(state: TrainState) -> tuple[list, tuple]:
    children, static, _ = _flatten(state)
    return list(children), static


def _torch_flatten_with_keys(state: TrainState) -> tuple[list, tuple]:
    children, static, names = _flatten(state)
    return [(torch_pytree.GetAttrKey(n), c) for n, c in zip(names, children)], static


torch_pytree.register_pytree_node(
    TrainState,
    _torch_flatten,
    lambda children, static: _unflatten(static, tuple(children)),
    serialized_type_name="medfunc.TrainState",
    flatten_with_keys_fn=_torch_flatten_with_keys,
)


def tree_flatten(tree: Any) -> tuple[list, Any]:
    """``optree.tree_flatten`` in medfunc's namespace (keeps TrainState's field order)."""
    return optree.tree_flatten(tree, namespace=PYTREE_NAMESPACE)


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """``optree.tree_map`` in medfunc's namespace."""
    return optree.tree_map(fn, tree, *rest, namespace=PYTREE_NAMESPACE)


def tree_leaves_with_path(tree: Any) -> list[tuple[str, Any]]:
    """Leaves of ``tree`` with readable paths such as ``params/fc.weight``."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=PYTREE_NAMESPACE)
    return [("/".join(str(k) for k in path), leaf) for path, leaf in zip(paths, leaves)]


# The states built over each module (weakly held), to find a live state that already uses the
# module's own tensors as its storage.
_LIVE_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _storage_in_use(model: torch.nn.Module) -> bool:
    """Whether a live (not consumed) state holds ``model``'s own parameters as its storage."""
    own = {p.data_ptr() for p in model.parameters() if p.numel()}
    own.update(b.data_ptr() for b in model.buffers() if b.numel())
    for state in list(_LIVE_STATES.get(model, ())):
        if state.consumed:
            continue
        tensors = (*state.params.values(), *state.buffers.values())
        if any(t.numel() and t.data_ptr() in own for t in tensors):
            return True
    return False


def _build_model(model: torch.nn.Module | Callable[[], torch.nn.Module], seed: int) -> Any:
    """``model`` itself, or the module a zero-argument constructor builds under ``seed``."""
    if isinstance(model, torch.nn.Module) or not callable(model):
        return model
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model()


def init_state(
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    tx: Any,
    *,
    loss_fn: Callable | None = None,
    apply_fn: Callable | None = None,
    precision: str | Policy = "fp32",
    seed: int = 0,
    accumulate_steps: int = 1,
    ema_decay: float | None = None,
    device: str | torch.device | None = None,
) -> TrainState:
    """Build the initial :class:`TrainState` of ``model`` trained with ``tx``.

    The state's params and buffers share storage with ``model`` (no copy): a pure step writes new
    tensors, a donating step updates them (and so the model) in place. Two live states never
    share storage: when a live state already uses ``model``'s tensors, the new state gets its
    own copy of them (the model keeps following the first state).

    Args:
        model: the module to train, or a zero-argument constructor of it, which is called with
            the global RNG seeded from ``seed`` (so ``seed`` also fixes the initial weights:
            the way to build differently initialised ensemble members). Parameters with
            ``requires_grad=False`` stay in the state but are not optimized.
        tx: a :class:`medfunc.optim.GradientTransformation`.
        loss_fn: optional ``loss_fn(outputs, batch) -> scalar loss``.
        apply_fn: optional ``apply_fn(model, batch) -> outputs``: how to call the model on a
            batch when the batch convention (dict -> ``model(**batch)``, tuple ->
            ``model(*batch)``, tensor -> ``model(batch)``) does not fit, e.g.
            ``lambda model, batch: model(batch[0])`` for a ``TensorDataset`` of ``(x, y)``.
            Steps, evaluation, ``compile_step`` and the parallel back-ends call it with the
            state's params and buffers bound.
        precision: "fp32", "bf16" or "fp16" (or a :class:`Policy`).
        seed: RNG key for dropout and any other randomness in the step (and, when ``model``
            is a constructor, the seed its weights are drawn with).
        accumulate_steps: micro-batches per optimizer update (>= 1).
        ema_decay: keep an exponential moving average of the trainable parameters in
            ``state.ema``, updated by every applied, finite optimizer step as
            ``torch.optim.swa_utils.AveragedModel(model,
            multi_avg_fn=get_ema_multi_avg_fn(ema_decay))`` (the first update copies the
            parameters). A float in [0, 1]; None (default) keeps none. Read it with
            :func:`ema_params`.
        device: move the model there first (default: where its parameters are).

    Returns:
        The initial state, ``step == 0``.

    Example:
        >>> state = init_state(torch.nn.Linear(4, 2), mf.optim.adamw(1e-3), precision="bf16")
    """
    model = _build_model(model, seed) if isinstance(seed, int) else model
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            "model must be a torch.nn.Module or a zero-argument function returning one, got "
            f"{type(model).__name__}"
        )
    check_tx(tx)
    if apply_fn is not None and not callable(apply_fn):
        raise ConfigError(
            f"apply_fn must be a function (model, batch) -> outputs, got {apply_fn!r}"
        )
    if not isinstance(accumulate_steps, int) or accumulate_steps < 1:
        raise ConfigError(f"accumulate_steps must be an integer >= 1, got {accumulate_steps!r}")
    if not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    ema_decay = validation.probability("ema_decay", ema_decay, optional=True)
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device={str(device)!r} but CUDA is not available here (torch "
                f"{torch.__version__}); use device='cpu' or install a CUDA build of torch"
            )
        model.to(device)
    policy = get_policy(precision)
    take = (lambda t: t.detach().clone()) if _storage_in_use(model) else torch.Tensor.detach
    params = OrderedDict((n, take(p)) for n, p in model.named_parameters())
    buffers = OrderedDict((n, take(b)) for n, b in model.named_buffers())
    first = next(iter(params.values()), None)
    dev = first.device if first is not None else torch.device("cpu")
    trainable = OrderedDict((n, params[n]) for n, p in model.named_parameters() if p.requires_grad)
    accum: AccumState | tuple = ()
    if accumulate_steps > 1:
        accum = AccumState(
            grads=OrderedDict((n, torch.zeros_like(p)) for n, p in trainable.items()),
            count=torch.zeros((), dtype=torch.int64),
            loss_sum=torch.zeros((), dtype=torch.float32, device=dev),
        )
    loss_scale: LossScaleState | tuple = init_loss_scale(policy, dev)
    return TrainState(
        params=params,
        buffers=buffers,
        opt_state=tx.init(trainable),
        loss_scale=loss_scale,
        step=torch.zeros((), dtype=torch.int64, device=dev),
        rng=torch.tensor([seed, 0], dtype=torch.int64),
        accum=accum,
        module=model,
        tx=tx,
        loss_fn=loss_fn,
        policy=policy,
        accumulate_steps=accumulate_steps,
        trainable_names=tuple(trainable),
        apply_fn=apply_fn,
        ema=init_ema(trainable) if ema_decay is not None else (),
        ema_decay=ema_decay,
    )


def init_ema(trainable: OrderedDict) -> EmaState:
    """A fresh :class:`EmaState`: copies of ``trainable`` and a zero count.

    Args:
        trainable: the trainable parameters, name -> tensor.

    Returns:
        The EMA state before its first update.
    """
    first = next(iter(trainable.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    return EmaState(
        params=OrderedDict((n, p.detach().clone()) for n, p in trainable.items()),
        count=torch.zeros((), dtype=torch.int64, device=device),
    )


def ema_params(state: TrainState) -> OrderedDict:
    """The state's parameters with the EMA in place of the trainable ones.

    Frozen parameters keep their values (an average of a constant is the constant). Evaluate or
    export with the averaged weights through ``state.replace(params=ema_params(state))``.

    Args:
        state: a state built with ``ema_decay``.

    Returns:
        name -> tensor in ``named_parameters()`` order (the EMA's own tensors, not copies).

    Raises:
        ConfigError: the state keeps no EMA.

    Example:
        >>> state = init_state(torch.nn.Linear(4, 1), mf.optim.sgd(0.1), ema_decay=0.9,
        ...                    loss_fn=lambda out, x: out.mean())
        >>> for _ in range(3):
        ...     state, _ = mf.train_step(state, torch.ones(2, 4))
        >>> averaged = state.replace(params=ema_params(state))
        >>> int(state.ema.count), averaged.params["bias"] > state.params["bias"]
        (3, tensor([True]))
    """
    if not state.ema:
        raise ConfigError(
            "this state keeps no EMA of its parameters; build it with "
            "init_state(..., ema_decay=0.999) (TrainerConfig.ema_decay for the Trainer)"
        )
    params = OrderedDict(state.params)
    params.update(state.ema.params)
    return params


def bind_module(state: TrainState) -> torch.nn.Module:
    """Write the state's params and buffers into ``state.module`` and return the module.

    Tensors that already share storage (a donated run) are left alone; others are copied in
    place, so references to the module's parameters stay valid.

    Args:
        state: the state whose values the module should hold.

    Returns:
        ``state.module``, holding the state's values.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> state = init_state(model, mf.optim.sgd(0.1), loss_fn=lambda out, x: out.mean())
        >>> state, _ = mf.train_step(state, torch.randn(8, 4))   # new tensors; model unchanged
        >>> torch.equal(model.weight, state.params["weight"])
        False
        >>> model = bind_module(state)   # then export, save or evaluate it imperatively
        >>> torch.equal(model.weight, state.params["weight"])
        True
    """
    named = dict(state.module.named_parameters())
    named.update(state.module.named_buffers())
    with torch.no_grad():
        for name, value in (*state.params.items(), *state.buffers.items()):
            target = named[name]
            if target.data_ptr() != value.data_ptr() or target.shape != value.shape:
                target.copy_(value)
    return state.module
