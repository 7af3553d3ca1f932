"""Any ``torch.optim.Optimizer`` as a :class:`~medfunc.optim.base.GradientTransformation`.

:func:`from_torch` wraps an optimizer class (RMSprop, Adagrad, NAdam, RAdam, Adafactor, a
third-party one) so that its per-parameter state lives in ``opt_state`` and ``train_step`` stays
pure. Each update runs the optimizer's own ``step()``, so the numbers are the optimizer's:

1. One torch optimizer instance per parameter layout (names, shapes, dtypes, devices) is built
   once and cached; it holds no tensors between updates.
2. Before ``step()`` its param_groups are bound to the tensors given to ``update``, its
   ``state[p]`` to the tensors of ``opt_state`` (the same objects: torch updates them in place, so
   a donated state is stepped without copies; a pure step clones the state before ``update``) and
   each ``p.grad`` to the gradient; group LRs given as medfunc schedules are set from ``ctx.step``.
3. After ``step()`` the state is read back (torch's own tensors wherever it replaced one), the
   parameters' previous ``.grad`` are put back and the instance is unbound again.

torch creates optimizer state lazily at the first update; a TrainState needs its structure from
the start. ``init`` therefore runs one step of a second instance on zero copies of the parameters
(on the meta device, which costs no memory, when the optimizer can run there; on the parameters'
own devices otherwise, e.g. for Adafactor or ``fused=True``) to learn the layout, and allocates it.
``has_state`` says which parameters torch already holds state for: until then the preallocated
tensors are ignored and torch creates the state itself, exactly as it does.

Unlike the built-in optimizers this adapter reads device values on the host: ``ctx.found_inf``
(a skipped update does not call ``step()``) and an LR schedule's value (torch optimizers take a
Python float LR). On the CPU that is free; on an accelerator it is one stream sync per update.
For the same reason the update cannot be captured in a CUDA graph, and ``compile_step`` compiles
the forward/backward only and runs this update eagerly.

Example:
    >>> tx = chain(clip_by_global_norm(1.0), from_torch(torch.optim.RMSprop, lr=1e-3))
    >>> state = mf.init_state(model, tx)
    >>> state, metrics = mf.train_step(state, batch, donate=True)
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from medfunc import validation
from medfunc.errors import ConfigError
from medfunc.optim.base import (
    GradientTransformation,
    Grads,
    OptState,
    Params,
    UpdateContext,
    get_substate,
    replace_substate,
)
from medfunc.optim.optimizers import LearningRate, _checked_lr

__all__ = [
    "TorchOptimizerAdapter",
    "TorchOptimizerState",
    "check_tx",
    "find_adapter",
    "from_state_dict",
    "from_torch",
    "to_state_dict",
    "torch_optimizer",
]

#: Optimizers that cannot be a gradient transformation, and why.
_UNSUPPORTED = {
    "LBFGS": "it re-evaluates the model through a closure inside step(), which a gradient "
    "transformation (given the gradients of one batch) cannot do",
    "SparseAdam": "it needs sparse gradients, and the step computes dense ones",
}

#: dtypes of the 0-d CPU tensors holding the Python numbers an optimizer keeps in its state.
_NUMBER_DTYPES = {bool: torch.bool, int: torch.int64, float: torch.float64}


class TorchOptimizerState(NamedTuple):
    """State of :func:`from_torch`.

    Attributes:
        state: per trainable parameter (model order), the torch optimizer's ``state[p]`` as an
            OrderedDict key -> tensor in torch's key order (e.g. RMSprop's ``step``,
            ``square_avg``). A Python number torch keeps there (an ``int`` step of some
            third-party optimizers) is a 0-d CPU tensor (int64, float64 or bool).
        has_state: 1-D bool CPU tensor, one flag per parameter: torch holds state for it. Until
            the first applied update the entries of ``state`` are zeros that torch never sees.
    """

    state: OrderedDict
    has_state: Tensor


class _Entry(NamedTuple):
    """The layout of one entry of a parameter's torch state."""

    number: type | None  # bool/int/float for a Python number, None for a tensor
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class _Group(NamedTuple):
    """One ``param_groups`` entry of :func:`from_torch`: which names, which option overrides."""

    select: Callable[[str], bool] | tuple[str, ...]
    options: dict[str, Any]


class _Built(NamedTuple):
    """The cached torch optimizer of one parameter layout, its groups and its state layout."""

    optimizer: torch.optim.Optimizer
    groups: list[tuple[dict[str, Any], tuple[str, ...]]]
    layout: OrderedDict


def _class_path(cls: type) -> str:
    """``torch.optim.SGD`` for torch's optimizers, ``module.QualName`` for others."""
    if getattr(torch.optim, cls.__name__, None) is cls:
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _matches(select: Callable[[str], bool] | tuple[str, ...], name: str) -> bool:
    if callable(select):
        result = select(name)
        if not isinstance(result, bool):
            raise ConfigError(
                f"a param_groups 'params' callable must return a bool, returned {result!r} for "
                f"{name!r}"
            )
        return result
    return any(s in name for s in select)


def _first_device(params: Params) -> torch.device:
    first = next(iter(params.values()), None)
    return first.device if first is not None else torch.device("cpu")


def _host_lr(lr: float | Tensor) -> float:
    """A group LR as torch optimizers take it: a Python float (reads a device tensor)."""
    return float(lr)


class TorchOptimizerAdapter:
    """The configuration behind a :func:`from_torch` transformation and its cached optimizer.

    ``init`` and ``update`` are the transformation's two functions; the other methods are host
    helpers shared with the state-dict conversion.

    Attributes:
        optimizer_cls: the wrapped ``torch.optim.Optimizer`` subclass.
        lr: the base LR (float or schedule), or None for the optimizer's own default.
        groups: the ``param_groups`` given to :func:`from_torch`, checked.
        kwargs: the other constructor arguments.
    """

    def __init__(
        self,
        optimizer_cls: type[torch.optim.Optimizer],
        lr: LearningRate | None,
        groups: tuple[_Group, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.optimizer_cls = optimizer_cls
        self.lr = lr
        self.groups = groups
        self.kwargs = kwargs
        self._built: dict[tuple, _Built] = {}

    def __repr__(self) -> str:
        return f"from_torch({_class_path(self.optimizer_cls)}, lr={self.lr!r}, ...)"

    def group_names(self, names: Sequence[str]) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
        """The torch param_groups for these trainable names: ``(options, names)`` pairs.

        The parameters no ``param_groups`` entry selects come first (the constructor's
        arguments alone), then one group per entry in the order given; the first entry that
        selects a name wins. A group that would be empty raises :class:`ConfigError`.
        """
        chosen: list[list[str]] = [[] for _ in self.groups]
        rest: list[str] = []
        for name in names:
            for i, group in enumerate(self.groups):
                if _matches(group.select, name):
                    chosen[i].append(name)
                    break
            else:
                rest.append(name)
        for group, got in zip(self.groups, chosen):
            if not got:
                raise ConfigError(
                    f"from_torch param_groups entry {group.select!r} selects no trainable "
                    f"parameter (or only ones an earlier entry took); parameter names look like "
                    f"{list(names[:4])}"
                )
        out = [({}, tuple(rest))] if rest else []
        return out + [(group.options, tuple(got)) for group, got in zip(self.groups, chosen)]

    def _lrs(
        self, groups: Sequence[tuple[dict[str, Any], tuple[str, ...]]], step: Tensor
    ) -> tuple[Any, list[Any]]:
        """The base LR and each group's LR at ``step``: a float, a schedule's value (each
        schedule called once), or None where the optimizer's own default applies."""
        values: dict[int, Any] = {}

        def at(lr: LearningRate | None) -> Any:
            if not callable(lr):
                return lr
            if id(lr) not in values:
                values[id(lr)] = lr(step)
            return values[id(lr)]

        return at(self.lr), [at(options.get("lr", self.lr)) for options, _ in groups]

    @staticmethod
    def _lr_metric(base: Any, built: _Built | None, device: torch.device) -> Tensor:
        """The base LR as a float64 0-d tensor on ``device`` (the optimizer's default LR when
        ``base`` is None; NaN when that is not a number)."""
        if isinstance(base, Tensor):
            return base.to(device=device, dtype=torch.float64)
        if base is None and built is not None:
            base = built.optimizer.defaults.get("lr")
        if not isinstance(base, (int, float)) or isinstance(base, bool):
            base = math.nan
        return torch.full((), float(base), dtype=torch.float64, device=device)

    def torch_optimizer(self, params: Params, step: int | Tensor = 0) -> torch.optim.Optimizer:
        """A new instance of the optimizer over ``params`` (named groups, LRs at ``step``).

        Args:
            params: name -> tensor, the trainable parameters in model order.
            step: the update count at which LR schedules are evaluated.

        Returns:
            The optimizer, without state.

        Raises:
            ConfigError: the optimizer refused its arguments (the message quotes it).
        """
        if not isinstance(step, Tensor):
            step = torch.tensor(int(step), dtype=torch.int64)
        groups = self.group_names(list(params))
        base, lrs = self._lrs(groups, step)
        torch_groups = []
        for (options, names), lr in zip(groups, lrs):
            group: dict[str, Any] = {"params": [(n, params[n]) for n in names]}
            group.update((k, v) for k, v in options.items() if k != "lr")
            if lr is not None:
                group["lr"] = _host_lr(lr)
            torch_groups.append(group)
        kwargs = dict(self.kwargs)
        if base is not None:
            kwargs["lr"] = _host_lr(base)
        try:
            return self.optimizer_cls(torch_groups, **kwargs)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ConfigError(
                f"{_class_path(self.optimizer_cls)} refused its arguments "
                f"({', '.join(sorted(kwargs))}; param_groups {[sorted(o) for o, _ in groups]}): "
                f"{error}"
            ) from error

    def _layout(self, params: Params) -> OrderedDict:
        """The state layout of ``params``: one optimizer step on zero copies of them (on the
        meta device when the optimizer runs there, else on their own devices)."""
        try:
            return self._layout_on(params, torch.device("meta"))
        except ConfigError:
            raise
        except Exception:  # any failure on meta tensors: .item(), fused kernels' device checks
            return self._layout_on(params, None)

    def _layout_on(self, params: Params, device: torch.device | None) -> OrderedDict:
        zeros = OrderedDict(
            (n, torch.zeros_like(p, device=device or p.device).requires_grad_(True))
            for n, p in params.items()
        )
        optimizer = self.torch_optimizer(zeros)
        for p in zeros.values():
            p.grad = torch.zeros_like(p)
        before = _group_options(optimizer)
        optimizer.step()
        _check_group_options(self.optimizer_cls, before, optimizer)
        layout = OrderedDict()
        for name, p in zeros.items():
            entries = OrderedDict()
            for key, value in optimizer.state.get(p, {}).items():
                entries[key] = _entry_of(self.optimizer_cls, name, key, value, params[name].device)
            layout[name] = entries
        return layout

    def _build(self, params: Params) -> _Built:
        """The cached optimizer, groups and layout of this parameter layout."""
        key = tuple((n, p.shape, p.dtype, p.device) for n, p in params.items())
        built = self._built.get(key)
        if built is None:
            layout = self._layout(params)
            optimizer = self.torch_optimizer(params)
            _unbind(optimizer)
            groups = self.group_names(list(params))
            built = self._built[key] = _Built(optimizer, groups, layout)
        return built

    def init(self, params: Params) -> TorchOptimizerState:
        """The initial state: the layout's tensors as zeros, no parameter started.

        Args:
            params: name -> tensor, the trainable parameters in model order.

        Returns:
            A :class:`TorchOptimizerState`.
        """
        if not isinstance(params, OrderedDict):
            raise ConfigError(
                f"from_torch's init expects an OrderedDict name -> tensor of trainable params "
                f"in model order, got {type(params).__name__}"
            )
        state = OrderedDict()
        if params:
            for name, entries in self._build(params).layout.items():
                state[name] = OrderedDict((k, _zeros(e)) for k, e in entries.items())
        return TorchOptimizerState(state, torch.zeros(len(params), dtype=torch.bool))

    def update(
        self, grads: Grads, state: TorchOptimizerState, params: Params, ctx: UpdateContext
    ) -> tuple[Grads, Params, TorchOptimizerState]:
        """One ``step()`` of the torch optimizer on ``params`` with ``grads`` and ``state``.

        Skipped (everything left as it is) when ``ctx.found_inf`` holds a non-zero value: that
        is read on the host. Sets ``ctx.metrics["lr"]`` to the base LR.

        Args:
            grads: name -> gradient (None: torch skips the parameter, as for ``grad is None``).
            state: the state ``init`` returned, owned by the caller.
            params: name -> parameter, owned by the caller; updated in place.
            ctx: the update context.

        Returns:
            ``(grads, params, state)``.
        """
        _check_state(grads, state, params)
        device = _first_device(params)
        built = self._build(params) if params else None
        base, lrs = self._lrs(built.groups if built else (), ctx.step)
        ctx.metrics["lr"] = self._lr_metric(base, built, device)
        if built is None:
            return grads, params, state
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ConfigError(
                f"from_torch({_class_path(self.optimizer_cls)}) reads the skip flag and the LR "
                "on the host, which a CUDA graph cannot capture; use mf.train_step or "
                "compile_step(mode='inductor'), or a medfunc optimizer (adamw/adam/sgd)"
            )
        if ctx.found_inf is not None and bool(ctx.found_inf > 0):  # host read: a device sync
            return grads, params, state
        return grads, params, self._step(built, grads, state, params, lrs)

    def _step(
        self,
        built: _Built,
        grads: Grads,
        state: TorchOptimizerState,
        params: Params,
        lrs: list[Any],
    ) -> TorchOptimizerState:
        """Bind, ``step()``, read the state back, unbind (see the module docstring)."""
        optimizer = built.optimizer
        started = state.has_state.tolist()
        for group, (_, names), lr in zip(optimizer.param_groups, built.groups, lrs):
            group["params"] = [params[n] for n in names]
            if lr is not None:
                group["lr"] = _host_lr(lr)
        for i, (name, p) in enumerate(params.items()):
            if started[i]:
                optimizer.state[p] = _to_torch(state.state[name], built.layout[name])
        saved = [(p, p.grad) for p in params.values()]
        before = _group_options(optimizer)
        try:
            for name, p in params.items():
                p.grad = grads[name]
            optimizer.step()
            _check_group_options(self.optimizer_cls, before, optimizer)
            new_state = OrderedDict()
            for i, (name, p) in enumerate(params.items()):
                entries = optimizer.state.get(p)
                if not entries:
                    new_state[name] = state.state[name]
                    continue
                new_state[name] = self._from_torch(name, entries, built.layout[name], state)
                started[i] = True
        finally:
            for p, grad in saved:
                p.grad = grad
            _unbind(optimizer)
        state.has_state.copy_(torch.tensor(started, dtype=torch.bool))
        return TorchOptimizerState(new_state, state.has_state)

    def _from_torch(
        self, name: str, entries: Mapping[str, Any], layout: OrderedDict, state: TorchOptimizerState
    ) -> OrderedDict:
        """A parameter's torch state after ``step()`` as the layout's tensors."""
        cls = self.optimizer_cls
        if set(entries) != set(layout):
            raise ConfigError(
                f"{_class_path(cls)} changed the structure of its state for {name!r}: keys "
                f"{sorted(entries)} after the step, {sorted(layout)} when the state was built; "
                "from_torch needs optimizers whose state keeps one structure"
            )
        ours = state.state[name]
        out = OrderedDict()
        for key, entry in layout.items():
            value = entries[key]
            if entry.number is not None:
                _check_number(cls, name, key, value, entry.number)
                out[key] = ours[key].fill_(value)
                continue
            if value is not ours[key]:
                found = _entry_of(cls, name, key, value, value.device)
                if found != entry:
                    raise ConfigError(
                        f"{_class_path(cls)}.state[{name!r}][{key!r}] is {found} after the step "
                        f"but {entry} when the state was built; from_torch needs optimizers "
                        "whose state keeps its shapes, dtypes and devices"
                    )
            out[key] = value
        return out


def _entry_of(cls: type, name: str, key: str, value: Any, device: torch.device) -> _Entry:
    """The layout entry of one state value (a tensor on the meta device maps to ``device``)."""
    if isinstance(value, Tensor):
        where = device if value.device.type == "meta" else value.device
        return _Entry(None, value.shape, value.dtype, where)
    for kind in (bool, int, float):
        if type(value) is kind:
            return _Entry(kind, torch.Size(()), _NUMBER_DTYPES[kind], torch.device("cpu"))
    raise ConfigError(
        f"{_class_path(cls)} keeps a {type(value).__name__} in its state "
        f"(state[{name!r}][{key!r}]); from_torch holds tensors and Python numbers only"
    )


def _check_number(cls: type, name: str, key: str, value: Any, kind: type) -> None:
    if type(value) is not kind:
        raise ConfigError(
            f"{_class_path(cls)}.state[{name!r}][{key!r}] is a {type(value).__name__} after the "
            f"step but was a {kind.__name__} when the state was built"
        )


def _zeros(entry: _Entry) -> Tensor:
    return torch.zeros(entry.shape, dtype=entry.dtype, device=entry.device)


def _to_torch(entries: Mapping[str, Tensor], layout: Mapping[str, _Entry]) -> dict[str, Any]:
    """A parameter's state as torch keeps it: the tensors themselves, numbers as numbers."""
    return {k: entries[k].item() if e.number is not None else entries[k] for k, e in layout.items()}


def _unbind(optimizer: torch.optim.Optimizer) -> None:
    """Drop every reference the optimizer holds to parameters and state tensors."""
    optimizer.state.clear()
    for group in optimizer.param_groups:
        group["params"] = []


def _group_options(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    numbers = (int, float, bool)
    return isinstance(a, numbers) and isinstance(b, numbers) and a == b


def _check_group_options(
    cls: type, before: list[dict[str, Any]], optimizer: torch.optim.Optimizer
) -> None:
    """Refuse optimizers that keep state in their param_groups (it would not be in opt_state)."""
    for i, (old, group) in enumerate(zip(before, optimizer.param_groups)):
        for key in set(old) | set(group):
            if key == "params" or _same(old.get(key), group.get(key)):
                continue
            raise ConfigError(
                f"{_class_path(cls)} changed param_groups[{i}][{key!r}] in step() "
                f"({old.get(key)!r} -> {group.get(key)!r}): it keeps state in its param_groups, "
                "which from_torch cannot hold in opt_state"
            )


def _check_state(grads: Grads, state: Any, params: Params) -> None:
    if not isinstance(state, TorchOptimizerState):
        raise ConfigError(
            f"from_torch's update got a {type(state).__name__} as its state; pass the state "
            "tx.init returned"
        )
    names = list(params)
    for label, keys in (("grads", list(grads)), ("optimizer state", list(state.state))):
        if keys != names:
            missing = [n for n in names if n not in set(keys)]
            extra = [n for n in keys if n not in set(names)]
            raise ConfigError(
                f"from_torch's update: {label} keys differ from the params' keys (missing "
                f"{missing[:5]}, unexpected {extra[:5]}); pass the trainable params in model "
                "order and the state tx.init returned"
            )


def _checked_groups(
    optimizer_cls: type, param_groups: Sequence[Mapping[str, Any]] | None, allowed: list[str]
) -> tuple[_Group, ...]:
    if param_groups is None:
        return ()
    if isinstance(param_groups, Mapping) or not isinstance(param_groups, Sequence):
        raise ConfigError(
            "param_groups must be a list of dicts such as "
            f"[{{'params': ['bias', 'norm'], 'weight_decay': 0.0}}]; got {param_groups!r}"
        )
    groups = []
    for i, group in enumerate(param_groups):
        where = f"param_groups[{i}]"
        if not isinstance(group, Mapping) or "params" not in group:
            raise ConfigError(
                f"{where} must be a dict with a 'params' entry (a list of name substrings or a "
                f"callable name -> bool) and option overrides; got {group!r}"
            )
        select = group["params"]
        if not callable(select):
            is_list = isinstance(select, Sequence) and not isinstance(select, str)
            if not is_list or not select or not all(isinstance(s, str) and s for s in select):
                raise ConfigError(
                    f"{where}['params'] must be a non-empty list of name substrings or a "
                    f"callable name -> bool; got {select!r}"
                )
            select = tuple(select)
        options = {k: v for k, v in group.items() if k != "params"}
        if allowed:
            validation.check_names(f"{_class_path(optimizer_cls)} {where}", list(options), allowed)
        if "lr" in options:
            options["lr"] = _checked_lr(options["lr"])
        groups.append(_Group(select, options))
    return tuple(groups)


def from_torch(
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: LearningRate | None = None,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> GradientTransformation:
    """Any ``torch.optim.Optimizer`` subclass as a gradient transformation.

    The optimizer's per-parameter state lives in ``opt_state`` (a
    :class:`TorchOptimizerState`), and each update runs the optimizer's own ``step()`` on it,
    so a run equals the torch optimizer run imperatively, bitwise. See the module docstring for
    how, and for its host reads (``found_inf`` and a schedule's LR).

    Args:
        optimizer_cls: the optimizer class, e.g. ``torch.optim.RMSprop`` (not an instance).
        lr: the LR: a float, a medfunc schedule ``step -> 0-d tensor`` evaluated at ``ctx.step``
            on every update, or None for the optimizer's default.
        param_groups: optional groups with their own options, as torch param_groups but naming
            parameters by substring: ``[{"params": ["bias", "norm"], "weight_decay": 0.0}]``
            (``"params"`` may also be a callable ``name -> bool``; ``"lr"`` may be a schedule).
            The first entry that selects a parameter wins; parameters no entry selects form the
            first group, with the constructor's arguments.
        **kwargs: the optimizer's other constructor arguments (``momentum=0.9``,
            ``foreach=True``, ...).

    Returns:
        The transformation. ``ctx.metrics["lr"]`` is the base LR (float64, NaN if the
        optimizer has no numeric LR).

    Raises:
        ConfigError: not an optimizer class, an argument it does not take, an invalid ``lr``,
            an optimizer that cannot be a transformation (LBFGS, SparseAdam). Arguments the
            optimizer itself refuses, and optimizers whose state is not tensors and numbers,
            raise at ``init``.

    Example:
        >>> tx = from_torch(torch.optim.RMSprop, lr=mf.schedules.cosine(1e-3, 1000), alpha=0.9)
        >>> state = mf.init_state(model, mf.optim.chain(mf.optim.clip_by_global_norm(1.0), tx))
    """
    if isinstance(optimizer_cls, torch.optim.Optimizer):
        raise ConfigError(
            f"from_torch takes the optimizer class, not an instance: "
            f"from_torch({_class_path(type(optimizer_cls))}{_arguments_of(optimizer_cls)})"
        )
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise ConfigError(
            f"from_torch needs a torch.optim.Optimizer subclass such as torch.optim.RMSprop; "
            f"got {optimizer_cls!r}"
        )
    reason = _UNSUPPORTED.get(optimizer_cls.__name__)
    if reason is not None and getattr(torch.optim, optimizer_cls.__name__, None) is optimizer_cls:
        raise ConfigError(f"from_torch cannot wrap {_class_path(optimizer_cls)}: {reason}")
    if "params" in kwargs:
        raise ConfigError(
            "from_torch builds the optimizer's params itself (the state's trainable "
            "parameters); select parameters with param_groups=[{'params': [...], ...}]"
        )
    if lr is not None:
        lr = _checked_lr(lr)
    signature = list(inspect.signature(optimizer_cls).parameters.values())
    first = signature[0].name if signature else "params"  # the parameters argument
    given = {first: (), **kwargs, **({"lr": 0.0} if lr is not None else {})}
    validation.check_kwargs(optimizer_cls, given, _class_path(optimizer_cls))
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature)
    allowed = [] if takes_any else [p.name for p in signature[1:]]
    groups = _checked_groups(optimizer_cls, param_groups, allowed)
    adapter = TorchOptimizerAdapter(optimizer_cls, lr, groups, dict(kwargs))
    return GradientTransformation(adapter.init, adapter.update)


def _arguments_of(optimizer: torch.optim.Optimizer) -> str:
    """``", lr=0.1, momentum=0.9"``: the instance's options that differ from the defaults."""
    signature = inspect.signature(type(optimizer)).parameters
    plain = (bool, int, float, str, tuple, type(None))
    parts = []
    for key, value in optimizer.defaults.items():
        param = signature.get(key)
        if param is None or not isinstance(value, plain):
            continue
        if key == "lr" or param.default is inspect.Parameter.empty or param.default != value:
            parts.append(f"{key}={value!r}")
    return "".join(f", {p}" for p in parts)


def check_tx(tx: Any) -> GradientTransformation:
    """Check that ``tx`` is a gradient transformation; name :func:`from_torch` for a torch one.

    Args:
        tx: the ``tx`` argument of ``init_state``.

    Returns:
        ``tx``.

    Raises:
        ConfigError: ``tx`` is a ``torch.optim`` optimizer instance or class (the message
            shows the :func:`from_torch` call to use), or anything else that is not a
            :class:`GradientTransformation`.

    Example:
        >>> check_tx(torch.optim.SGD(model.parameters(), lr=0.1))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        medfunc.errors.ConfigError: tx is a torch.optim.SGD instance; ... from_torch(...)
    """
    if isinstance(tx, GradientTransformation):
        return tx
    if isinstance(tx, torch.optim.Optimizer):
        path = _class_path(type(tx))
        raise ConfigError(
            f"tx is a {path} instance; medfunc needs a GradientTransformation, whose state "
            f"lives in the TrainState. Wrap the class instead: "
            f"mf.optim.from_torch({path}{_arguments_of(tx)}) (the instance's parameters and "
            "state are not used)"
        )
    if isinstance(tx, type) and issubclass(tx, torch.optim.Optimizer):
        path = _class_path(tx)
        raise ConfigError(
            f"tx is the optimizer class {path} itself; wrap it with its arguments: "
            f"mf.optim.from_torch({path}, lr=...)"
        )
    raise ConfigError(
        "tx must be a medfunc.optim.GradientTransformation (e.g. mf.optim.adamw(1e-3), or "
        "mf.optim.from_torch(torch.optim.RMSprop, lr=1e-3) for any torch optimizer); got a "
        f"{type(tx).__name__}"
    )


def find_adapter(
    tx: GradientTransformation,
) -> tuple[TorchOptimizerAdapter, tuple[int, ...]] | None:
    """Find the :func:`from_torch` optimizer inside ``tx``.

    Args:
        tx: a transformation, possibly a (nested) :func:`~medfunc.optim.base.chain`.

    Returns:
        ``(adapter, path)``: the adapter and the indices leading to its state inside the
        chain's state tuples (``()`` when ``tx`` is the adapter itself); None when ``tx`` holds
        none.

    Raises:
        ConfigError: ``tx`` holds more than one.

    Example:
        >>> adapter, path = find_adapter(chain(clip_by_global_norm(1.0), from_torch(RMSprop)))
        >>> path
        (1,)
    """
    validation.instance_of("tx", tx, GradientTransformation, "a GradientTransformation")
    found: list[tuple[TorchOptimizerAdapter, tuple[int, ...]]] = []

    def visit(t: GradientTransformation, path: tuple[int, ...]) -> None:
        owner = getattr(t.update, "__self__", None)
        if isinstance(owner, TorchOptimizerAdapter):
            found.append((owner, path))
        for i, child in enumerate(t.children):
            visit(child, (*path, i))

    visit(tx, ())
    if len(found) > 1:
        raise ConfigError(
            f"the transformation holds {len(found)} from_torch optimizers; a torch state_dict "
            "describes one"
        )
    return found[0] if found else None


def _adapter_of(tx: GradientTransformation, params: Any, who: str) -> tuple:
    if not isinstance(params, Mapping) or not all(isinstance(v, Tensor) for v in params.values()):
        raise ConfigError(
            f"{who} expects the trainable params as an OrderedDict name -> tensor in model "
            f"order, got {type(params).__name__}"
        )
    found = find_adapter(tx)
    if found is None:
        raise ConfigError(f"{who}: the transformation holds no from_torch optimizer")
    return found


def torch_optimizer(
    tx: GradientTransformation, params: Params, *, step: int | Tensor = 0
) -> torch.optim.Optimizer:
    """The plain torch optimizer equal to the :func:`from_torch` optimizer inside ``tx``.

    Args:
        tx: a :func:`from_torch` transformation or a chain holding one.
        params: name -> parameter (trainable, model order), e.g. the model's own parameters.
        step: the update count at which LR schedules are evaluated.

    Returns:
        The optimizer over ``params`` (named param_groups), without state.

    Example:
        >>> opt = torch_optimizer(tx, OrderedDict(model.named_parameters()), step=100)
        >>> opt.load_state_dict(to_state_dict(tx, state.opt_state, trainable, state.step))
    """
    adapter, _ = _adapter_of(tx, params, "torch_optimizer")
    return adapter.torch_optimizer(OrderedDict(params), step)


def to_state_dict(
    tx: GradientTransformation, opt_state: OptState, params: Params, step: int | Tensor
) -> dict[str, Any]:
    """The :func:`from_torch` optimizer's state as the torch optimizer's ``state_dict()``.

    ``state`` is keyed by parameter index in param_group order (model order for one group),
    with the optimizer's own entries (tensors copied, Python numbers as numbers); parameters
    without state yet are left out, as in torch. ``param_groups`` are what the optimizer writes
    (LRs at ``step``, ``param_names``). A host function.

    Args:
        tx: a :func:`from_torch` transformation or a chain holding one.
        opt_state: the state of ``tx``.
        params: the trainable params, name -> tensor in model order.
        step: updates applied so far (for the LRs).

    Returns:
        A dict that the torch optimizer's ``load_state_dict`` accepts.

    Example:
        >>> sd = to_state_dict(state.tx, state.opt_state, trainable, state.step)
    """
    adapter, path = _adapter_of(tx, params, "to_state_dict")
    sub = get_substate(opt_state, path)
    if not isinstance(sub, TorchOptimizerState):
        raise ConfigError(f"expected a TorchOptimizerState, got {type(sub).__name__}")
    params = OrderedDict(params)
    if not params:
        return {"state": {}, "param_groups": []}
    sd = adapter.torch_optimizer(params, step).state_dict()
    built = adapter._build(params)
    started = dict(zip(params, sub.has_state.tolist()))
    order = [n for _, names in built.groups for n in names]
    sd["state"] = {
        index: {
            key: sub.state[name][key].item()
            if entry.number is not None
            else sub.state[name][key].clone()
            for key, entry in built.layout[name].items()
        }
        for index, name in enumerate(order)
        if started[name]
    }
    return sd


def _index_to_name(
    groups_sd: Any, names: list[str], ours: list[tuple[dict[str, Any], tuple[str, ...]]]
) -> dict[int, str]:
    """Map a torch state dict's parameter indices to parameter names (see
    :func:`from_state_dict`)."""
    if not isinstance(groups_sd, Sequence) or not all(
        isinstance(g, Mapping) and "params" in g for g in groups_sd
    ):
        raise ConfigError("the state_dict's param_groups must be dicts with a 'params' list")
    indices = [int(i) for g in groups_sd for i in g["params"]]
    if len(indices) != len(names) or len(set(indices)) != len(indices):
        raise ConfigError(
            f"the torch state_dict numbers {len(set(indices))} distinct parameters but the "
            f"model has {len(names)} trainable parameters; it belongs to another model or "
            "another set of frozen parameters"
        )
    from medfunc.optim.interop import names_by_index  # interop imports this module

    by_name = names_by_index(list(groups_sd), indices, names)
    if by_name is not None:
        return by_name
    if [len(g["params"]) for g in groups_sd] != [len(n) for _, n in ours]:
        raise ConfigError(
            f"cannot match the torch state_dict's param_groups (sizes "
            f"{[len(g['params']) for g in groups_sd]}) to this optimizer's (sizes "
            f"{[len(n) for _, n in ours]}) without 'param_names'; build the torch optimizer "
            "with named parameters (model.named_parameters())"
        )
    return dict(zip(indices, [n for _, group in ours for n in group]))


def _load_entry(
    cls: type, name: str, entry: Any, layout: Mapping[str, _Entry], into: Mapping[str, Tensor]
) -> None:
    """Copy one parameter's torch state into its preallocated tensors."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"the state_dict's state for {name!r} is a {type(entry).__name__}")
    missing = [k for k in layout if k not in entry]
    unexpected = [k for k in entry if k not in layout]
    if missing or unexpected:
        raise ConfigError(
            f"the state_dict's state for {name!r} lacks {missing} and has unexpected "
            f"{unexpected}; it comes from another optimizer or configuration than "
            f"{_class_path(cls)} with these arguments"
        )
    for key, spec in layout.items():
        value, dst = entry[key], into[key]
        where = f"state[{name!r}][{key!r}]"
        if spec.number is not None:
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, (bool, int, float)):
                raise ConfigError(f"{where} must be a number, got {type(value).__name__}")
            dst.fill_(value)
            continue
        if not isinstance(value, Tensor):
            raise ConfigError(f"{where} must be a tensor, got {type(value).__name__}")
        if value.shape != dst.shape:
            raise ConfigError(
                f"{where} has shape {tuple(value.shape)} but {tuple(dst.shape)} is expected; "
                "the state_dict belongs to another model"
            )
        dst.copy_(value)


def from_state_dict(
    tx: GradientTransformation, state_dict: Mapping[str, Any], params: Params
) -> OptState:
    """The state of ``tx`` from the torch optimizer's ``state_dict()``.

    Parameters are matched by ``param_names`` when every group has them, otherwise by index in
    this optimizer's group order. Hyperparameters come from ``tx``. The other parts of a chain
    start from ``tx.init(params)``.

    Args:
        tx: a :func:`from_torch` transformation or a chain holding one.
        state_dict: the torch optimizer's ``state_dict()`` (possibly loaded from disk).
        params: the trainable params, name -> tensor in model order.

    Returns:
        The state of ``tx`` (dtypes and devices as ``tx.init(params)`` makes them).

    Raises:
        ConfigError: the state dict does not fit (another optimizer, other parameters, wrong
            shapes, missing entries; the message names them).

    Example:
        >>> opt_state = from_state_dict(tx, torch_opt.state_dict(), params)
    """
    adapter, path = _adapter_of(tx, params, "from_state_dict")
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ConfigError(
            "expected a torch.optim state_dict with 'state' and 'param_groups' entries, got "
            f"{sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict)}"
        )
    params = OrderedDict(params)
    full = tx.init(params)
    sub = get_substate(full, path)
    if not params:
        return full
    built = adapter._build(params)
    names = list(params)
    index_to_name = _index_to_name(state_dict["param_groups"], names, built.groups)
    torch_state = {int(k): v for k, v in state_dict["state"].items()}
    unknown = sorted(set(torch_state) - set(index_to_name))
    if unknown:
        raise ConfigError(f"the state_dict has state for unknown parameter indices {unknown}")
    started = [False] * len(names)
    for index, entry in torch_state.items():
        name = index_to_name[index]
        if not entry:
            continue
        _load_entry(adapter.optimizer_cls, name, entry, built.layout[name], sub.state[name])
        started[names.index(name)] = True
    sub.has_state.copy_(torch.tensor(started, dtype=torch.bool))
    return replace_substate(full, path, sub)
