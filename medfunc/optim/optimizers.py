"""The optimizers: :func:`adamw`, :func:`adam`, :func:`sgd`, and :func:`get_optimizer`.

Each is a :class:`~medfunc.optim.base.GradientTransformation` whose update runs PyTorch's own
optimizer kernels (see :mod:`medfunc.optim.kernels`), one kernel call per parameter group
(``(lr multiplier, weight decay)``, see :mod:`medfunc.optim.masks`), so the numbers equal
``torch.optim.AdamW/Adam/SGD`` with the same param_groups: bitwise for the same kernel path.

Example:
    >>> from medfunc.optim import UpdateContext
    >>> model = nn.Sequential(OrderedDict(body=nn.Linear(4, 4), classifier=nn.Linear(4, 2)))
    >>> params = OrderedDict((name, p.detach().clone()) for name, p in model.named_parameters())
    >>> grads = OrderedDict((name, torch.ones_like(p)) for name, p in params.items())
    >>> tx = adamw(3e-4, weight_decay=0.05, lr_multipliers=[("classifier", 10.0)])
    >>> opt_state = tx.init(params)                    # AdamState of OrderedDicts
    >>> ctx = UpdateContext(step=torch.zeros((), dtype=torch.int64))
    >>> grads, params, opt_state = tx.update(grads, opt_state, params, ctx)
    >>> type(opt_state).__name__, list(opt_state.exp_avg)
    ('AdamState', ['body.weight', 'body.bias', 'classifier.weight', 'classifier.bias'])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from medfunc import schedules, validation
from medfunc.errors import ConfigError
from medfunc.optim import kernels
from medfunc.optim.base import GradientTransformation, Grads, Params, UpdateContext
from medfunc.optim.masks import (
    DecayMask,
    LrMultipliers,
    ParamGroup,
    check_patterns,
    group_names,
    validate_decay_mask,
)

Schedule = Callable[[int | Tensor], Tensor]
LearningRate = float | Schedule
Momentum = float | Schedule
"""A momentum (SGD) or Adam ``beta1``: a float, or a schedule ``step -> 0-d float64 tensor``
such as :func:`medfunc.schedules.one_cycle_momentum`."""


class AdamState(NamedTuple):
    """State of :func:`adamw` / :func:`adam`, per parameter name (trainable params, model order).

    Attributes:
        step: per-parameter update counts, 0-d float tensors exactly as torch keeps
            ``state["step"]`` (float32; on the CPU for the CPU/foreach path, on the params'
            device for fused/capturable kernels).
        exp_avg: first moments.
        exp_avg_sq: second moments.
        max_exp_avg_sq: AMSGrad maxima (empty unless ``amsgrad=True``).
    """

    step: OrderedDict
    exp_avg: OrderedDict
    exp_avg_sq: OrderedDict
    max_exp_avg_sq: OrderedDict


class SGDState(NamedTuple):
    """State of :func:`sgd`.

    Attributes:
        momentum_buffer: per-parameter momentum buffers (empty when ``momentum == 0``); zeros
            until the parameter's first applied update with a gradient, as torch creates them
            lazily.
        initialized: float32 flags on the params' device, one per trainable parameter in model
            order: 1.0 once an update was applied to that parameter (torch's
            ``state[p]["momentum_buffer"] is not None``).
    """

    momentum_buffer: OrderedDict
    initialized: Tensor


class KernelCall(NamedTuple):
    """The parameters one optimizer kernel call updates (see :meth:`OptimizerSpec.kernel_calls`).

    Attributes:
        names: the parameter names, group by group.
        lr_multiplier: the factor applied to the base LR.
        weight_decay: each name's weight decay.
    """

    names: tuple[str, ...]
    lr_multiplier: float
    weight_decay: dict[str, float]


@dataclass(frozen=True, eq=False)
class OptimizerSpec:
    """An optimizer's configuration, attached to its transformation as ``tx.spec``.

    Torch interop (:mod:`medfunc.optim.interop`) reads it to build param_groups and state dicts.
    Equality is identity (a schedule need not be hashable).

    Attributes:
        name: "adamw", "adam" or "sgd".
        lr: base LR, a float or a schedule ``step -> 0-d float64 tensor``.
        weight_decay: weight decay of the parameters the mask selects.
        decay_mask: "default", None, a callable ``name -> bool`` or a tuple of substrings.
        lr_multipliers: ``((substring, multiplier), ...)``, first match wins.
        kernel: "auto", "foreach" or "fused".
        betas, eps, amsgrad: Adam hyperparameters (``betas[0]`` may be a schedule).
        momentum, dampening, nesterov: SGD hyperparameters (``momentum`` may be a schedule).
    """

    name: str
    lr: LearningRate
    weight_decay: float
    decay_mask: DecayMask
    lr_multipliers: tuple[tuple[str, float], ...]
    kernel: str
    betas: tuple[Momentum, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    momentum: Momentum = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    _groups_cache: dict = field(default_factory=dict, repr=False, compare=False)
    _kernel_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_adam(self) -> bool:
        """True for adam and adamw."""
        return self.name in ("adam", "adamw")

    @property
    def torch_class(self) -> type[torch.optim.Optimizer]:
        """The ``torch.optim`` class this optimizer equals."""
        return {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[
            self.name
        ]

    @property
    def momentum_schedule(self) -> Schedule | None:
        """The schedule of Adam's ``beta1`` or SGD's momentum; None when it is constant."""
        value = self.betas[0] if self.is_adam else self.momentum
        return value if callable(value) else None

    def hyperparameters(self, step: int | Tensor = 0) -> dict[str, Any]:
        """The constructor arguments of :attr:`torch_class` besides params, lr and kernel flags.

        Args:
            step: the update count at which a ``beta1`` / momentum schedule is read (a host
                function: it may read a device tensor).
        """
        if self.is_adam:
            return {
                "betas": (_value_at(self.betas[0], step), self.betas[1]),
                "eps": self.eps,
                "weight_decay": self.weight_decay,
                "amsgrad": self.amsgrad,
            }
        return {
            "momentum": _value_at(self.momentum, step),
            "dampening": self.dampening,
            "weight_decay": self.weight_decay,
            "nesterov": self.nesterov,
        }

    def groups(self, names: Sequence[str]) -> tuple[ParamGroup, ...]:
        """The parameter groups for these trainable names (cached per name tuple)."""
        key = tuple(names)
        groups = self._groups_cache.get(key)
        if groups is None:
            groups = group_names(key, self.weight_decay, self.decay_mask, self.lr_multipliers)
            self._groups_cache[key] = groups
        return groups

    def kernel_calls(self, names: Sequence[str]) -> tuple[KernelCall, ...]:
        """The kernel calls of an update: the parameter groups of one LR multiplier merged,
        each parameter with its group's weight decay (cached per name tuple; the kernels make
        one call per weight decay value where the kernel path needs it, see
        :func:`medfunc.optim.kernels.adam_step`)."""
        key = ("calls", tuple(names))
        calls = self._groups_cache.get(key)
        if calls is None:
            merged: dict[float, tuple[list[str], list[float]]] = {}
            for group in self.groups(key[1]):
                group_of, decays = merged.setdefault(group.lr_multiplier, ([], []))
                group_of.extend(group.names)
                decays.extend([group.weight_decay] * len(group.names))
            calls = tuple(
                KernelCall(tuple(ns), m, dict(zip(ns, decays)))
                for m, (ns, decays) in merged.items()
            )
            self._groups_cache[key] = calls
        return calls

    def kernel_config(self, device: torch.device) -> kernels.KernelConfig:
        """The kernel path for parameters on ``device`` (a plain dict cache: a traced step reads
        it without calling into ``resolve_kernel``'s ``lru_cache``, which dynamo warns about)."""
        config = self._kernel_cache.get(device)
        if config is None:
            config = kernels.resolve_kernel(
                self.kernel,
                device,
                adam=self.is_adam,
                tensor_beta1=self.is_adam and self.momentum_schedule is not None,
            )
            self._kernel_cache[device] = config
        return config

    def lr_at(self, step: int | Tensor) -> float:
        """The base LR at ``step`` as a Python float (host function: may read a device tensor)."""
        return _value_at(self.lr, step)


def _value_at(value: float | Schedule, step: int | Tensor) -> float:
    """A constant, or a schedule read at ``step``, as a Python float (a host function)."""
    if not callable(value):
        return float(value)
    if not isinstance(step, Tensor):
        step = torch.tensor(int(step), dtype=torch.int64)
    return float(value(step))


def _checked_momentum(field: str, value: Any) -> Momentum:
    """A momentum schedule as given, else checked as a number in [0, 1)."""
    if isinstance(value, Tensor):
        raise ConfigError(
            f"{field} must be a Python float or a schedule callable (step -> tensor); got a "
            "Tensor: wrap it, e.g. lambda step: my_tensor"
        )
    if callable(value):
        return value
    return validation.non_negative_float(field, value)


def _checked_betas(betas: Any) -> tuple[Momentum, float]:
    """``(beta1, beta2)``: beta1 a number in [0, 1) or a schedule, beta2 a number in [0, 1)."""
    if isinstance(betas, (tuple, list)) and len(betas) == 2 and callable(betas[0]):
        return betas[0], validation.betas("betas", (0.0, betas[1]))[1]
    return validation.betas("betas", betas)


def _checked_lr(lr: Any) -> LearningRate:
    """``lr`` as given if it is a schedule, else checked as a learning rate (a float >= 0)."""
    if isinstance(lr, Tensor):
        raise ConfigError(
            "lr must be a Python float or a schedule callable (step -> lr tensor); got a "
            "Tensor: wrap it, lr=lambda step: my_tensor"
        )
    if callable(lr):
        return lr
    return validation.non_negative_float("lr", lr)


# ---------------------------------------------------------------------------------------------
# shared update helpers


def _base_lr(spec: OptimizerSpec, step: Tensor) -> tuple[float | Tensor, Tensor]:
    """The base LR for the kernels (float or tensor) and its 0-d tensor for metrics."""
    lr = _now(spec.lr, step)
    if isinstance(lr, Tensor):
        return lr, lr
    return lr, torch.full((), lr, dtype=torch.float64, device=step.device)


def _now(value: Momentum, step: Tensor) -> float | Tensor:
    """A constant (an LR, momentum or beta1), or its schedule at ``step``: a Python float when
    reading it costs nothing (:func:`~medfunc.schedules.value_now`), else a 0-d tensor."""
    if not callable(value):
        return value
    return schedules.value_now(value, step)


def _group_lr(base: float | Tensor, mult: float) -> float | Tensor:
    if mult == 1.0:
        return base
    return base * mult


def _check_keys(grads: Grads, params: Params, state_keys: Sequence[str], who: str) -> None:
    names = list(params)
    for label, keys in (("grads", list(grads)), ("optimizer state", list(state_keys))):
        if keys != names:
            missing = [n for n in names if n not in set(keys)]
            extra = [n for n in keys if n not in set(names)]
            detail = (
                f"missing {missing[:5]}, unexpected {extra[:5]}"
                if missing or extra
                else "same names in a different order"
            )
            raise ConfigError(
                f"{who}.update: {label} keys differ from the params' keys ({detail}); pass the "
                "trainable params in model order and the state tx.init returned"
            )


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted positions as ``(start, stop)`` ranges of consecutive values."""
    runs: list[tuple[int, int]] = []
    for i in positions:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _mark_initialized(flags: Tensor, positions: Sequence[int], found_inf: Tensor | None) -> None:
    """Set ``flags[positions]`` to 1 unless ``found_inf`` says the update was skipped.

    In place and on the device (``max(flag, 1 - found_inf)``); one op per run of consecutive
    positions, so all parameters with a gradient (the usual case) cost one op.
    """
    applied = None if found_inf is None else 1.0 - found_inf.to(flags.device)
    for start, stop in _runs(positions):
        part = flags[start:stop]
        if applied is None:
            part.fill_(1.0)
        else:
            part.copy_(torch.maximum(part, applied))


def _first_device(params: Params) -> torch.device:
    first = next(iter(params.values()), None)
    return first.device if first is not None else torch.device("cpu")


def _init_common(spec: OptimizerSpec, params: Params) -> None:
    if not isinstance(params, OrderedDict):
        raise ConfigError(
            f"{spec.name}.init expects an OrderedDict name -> tensor of trainable params in "
            f"model order, got {type(params).__name__}"
        )
    names = list(params)
    check_patterns(names, spec.decay_mask, spec.lr_multipliers)
    spec.kernel_calls(names)  # cached before any update is traced (dynamo guards on the cache)
    for group in spec.groups(names):
        ps = [params[n] for n in group.names]
        cfg = spec.kernel_config(ps[0].device)
        kernels.check_params_for_kernel(ps, cfg)
        kernels.check_momentum_schedule(cfg, adam=spec.is_adam, scheduled=spec.momentum_schedule)
        if callable(spec.lr) and not cfg.host_lr and not (cfg.fused or cfg.capturable):
            raise ConfigError(
                f"{spec.name} with kernel={spec.kernel!r} on {cfg.device_type} runs torch's "
                "non-capturable foreach kernel, which needs the LR as a Python float: a schedule "
                "would be read back from the device every step. Use kernel='fused' (the default "
                "on CUDA) or a constant lr."
            )


def _make_spec(
    name: str,
    lr: Any,
    weight_decay: Any,
    decay_mask: Any,
    lr_multipliers: Any,
    kernel: Any,
    **hyper: Any,
) -> OptimizerSpec:
    return OptimizerSpec(
        name=name,
        lr=_checked_lr(lr),
        weight_decay=validation.non_negative_float("weight_decay", weight_decay),
        decay_mask=validate_decay_mask(decay_mask),
        lr_multipliers=validation.name_multipliers("lr_multipliers", lr_multipliers),
        kernel=validation.one_of("kernel", kernel, kernels.KERNELS),
        **hyper,
    )


def _calls_with_grads(
    spec: OptimizerSpec,
    grads: Grads,
    params: Params,
    state_keys: Sequence[str],
    ctx: UpdateContext,
) -> Iterator[tuple[list[str], list[Tensor], list[Tensor], dict[str, Any]]]:
    """Check the keys, log the LR, and yield each kernel call (the parameter groups of one LR
    multiplier, see :meth:`OptimizerSpec.kernel_calls`).

    A parameter whose gradient is None is left out of its kernel call, as ``torch.optim``
    leaves out a parameter whose ``.grad`` is None: no decay, no moment update, its step count
    does not advance. A call without any gradient is not yielded.

    Args:
        spec: the optimizer's configuration.
        grads, params: the update's gradients (None: no gradient) and trainable params (model
            order).
        state_keys: the parameter names the optimizer state holds.
        ctx: the update context (``step``, ``found_inf``; ``metrics["lr"]`` is set).

    Returns:
        An iterator of ``(names, params, grads, kernel_args)``: the names of the call's
        parameters that have a gradient, their tensors, and the call's ``cfg``, ``lr``,
        per-parameter ``weight_decay`` and ``found_inf`` for the kernel.
    """
    _check_keys(grads, params, state_keys, spec.name)
    base, lr_metric = _base_lr(spec, ctx.step)
    ctx.metrics["lr"] = lr_metric
    for call in spec.kernel_calls(list(params)):
        names = [n for n in call.names if grads[n] is not None]
        if not names:
            continue
        ps = [params[n] for n in names]
        yield (
            names,
            ps,
            [grads[n] for n in names],
            {
                "cfg": spec.kernel_config(ps[0].device),
                "lr": _group_lr(base, call.lr_multiplier),
                "weight_decay": [call.weight_decay[n] for n in names],
                "found_inf": ctx.found_inf,
            },
        )


# ---------------------------------------------------------------------------------------------
# Adam / AdamW


def _adam_family(
    name: str,
    lr: Any,
    betas: Any,
    eps: Any,
    weight_decay: Any,
    amsgrad: Any,
    decay_mask: Any,
    lr_multipliers: Any,
    kernel: Any,
) -> GradientTransformation:
    """Validate the arguments of :func:`adamw` (``name="adamw"``) or :func:`adam` and build it."""
    spec = _make_spec(
        name,
        lr,
        weight_decay,
        decay_mask,
        lr_multipliers,
        kernel,
        betas=_checked_betas(betas),
        eps=validation.non_negative_float("eps", eps),
        amsgrad=validation.boolean("amsgrad", amsgrad),
    )
    decoupled = spec.name == "adamw"

    def init(params: Params) -> AdamState:
        _init_common(spec, params)
        steps, exp_avg, exp_avg_sq, max_sq = (OrderedDict() for _ in range(4))
        for name, p in params.items():
            cfg = spec.kernel_config(p.device)
            steps[name] = torch.zeros(
                (), dtype=kernels.step_dtype(cfg), device=kernels.step_device(cfg, p.device)
            )
            exp_avg[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avg_sq[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if spec.amsgrad:
                max_sq[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return AdamState(steps, exp_avg, exp_avg_sq, max_sq)

    def update(
        grads: Grads, state: AdamState, params: Params, ctx: UpdateContext
    ) -> tuple[Grads, Params, AdamState]:
        beta1, beta2 = _now(spec.betas[0], ctx.step), spec.betas[1]

        for names, ps, gs, group in _calls_with_grads(spec, grads, params, state.exp_avg, ctx):
            kernels.adam_step(
                ps,
                gs,
                [state.exp_avg[n] for n in names],
                [state.exp_avg_sq[n] for n in names],
                [state.max_exp_avg_sq[n] for n in names] if spec.amsgrad else [],
                [state.step[n] for n in names],
                beta1=beta1,
                beta2=beta2,
                eps=spec.eps,
                amsgrad=spec.amsgrad,
                decoupled_weight_decay=decoupled,
                **group,
            )
        return grads, params, state

    return GradientTransformation(init, update, spec=spec)


def adamw(
    lr: LearningRate,
    betas: tuple[Momentum, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    amsgrad: bool = False,
    *,
    decay_mask: DecayMask = "default",
    lr_multipliers: LrMultipliers = None,
    kernel: str = "auto",
) -> GradientTransformation:
    """AdamW (decoupled weight decay), equal to ``torch.optim.AdamW``.

    Args:
        lr: learning rate: a float, or a schedule ``step -> 0-d float64 tensor``
            (see :mod:`medfunc.schedules`), evaluated at ``ctx.step``.
        betas: ``(beta1, beta2)``, each in [0, 1); ``beta1`` may be a schedule like ``lr``
            (e.g. :func:`~medfunc.schedules.one_cycle_momentum`, as ``OneCycleLR`` cycles it).
        eps: term added to the denominator (>= 0).
        weight_decay: decoupled weight decay (>= 0) of the parameters ``decay_mask`` selects.
        amsgrad: use the AMSGrad variant.
        decay_mask: which parameters are decayed: "default" (all but biases and norm weights,
            see :func:`~medfunc.optim.masks.default_decay_mask`), None (all), a callable
            ``name -> bool`` (True = decay) or a list of substrings whose parameters are not
            decayed.
        lr_multipliers: ``[(substring, multiplier), ...]`` (or a dict in that order): a
            parameter whose name contains ``substring`` trains with ``lr * multiplier`` (first
            match wins; the seed's ``layer_wise_lrs``).
        kernel: "auto" (fused on CUDA, foreach elsewhere), "foreach" or "fused".

    Returns:
        The transformation; its state is an :class:`AdamState`; ``tx.spec`` its config.

    Raises:
        ConfigError: an invalid value (names it). Patterns that match no parameter raise at
            ``init``.

    Example:
        >>> tx = adamw(2e-5, weight_decay=0.01, lr_multipliers=[("classifier", 10.0)])
    """
    return _adam_family(
        "adamw", lr, betas, eps, weight_decay, amsgrad, decay_mask, lr_multipliers, kernel
    )


def adam(
    lr: LearningRate,
    betas: tuple[Momentum, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    decay_mask: DecayMask = "default",
    lr_multipliers: LrMultipliers = None,
    kernel: str = "auto",
) -> GradientTransformation:
    """Adam with L2 weight decay (added to the gradient), equal to ``torch.optim.Adam``.

    Args:
        lr: learning rate, a float or a schedule (as :func:`adamw`).
        betas: as :func:`adamw`.
        eps: as :func:`adamw`.
        weight_decay: L2 penalty coefficient (>= 0) of the parameters ``decay_mask`` selects.
        amsgrad: as :func:`adamw`.
        decay_mask: as :func:`adamw`.
        lr_multipliers: as :func:`adamw`.
        kernel: as :func:`adamw`.

    Returns:
        The transformation; its state is an :class:`AdamState`.

    Example:
        >>> tx = adam(1e-3)
    """
    return _adam_family(
        "adam", lr, betas, eps, weight_decay, amsgrad, decay_mask, lr_multipliers, kernel
    )


# ---------------------------------------------------------------------------------------------
# SGD


def sgd(
    lr: LearningRate,
    momentum: Momentum = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    decay_mask: DecayMask = "default",
    lr_multipliers: LrMultipliers = None,
    kernel: str = "auto",
) -> GradientTransformation:
    """SGD with optional (Nesterov) momentum and L2 weight decay, equal to ``torch.optim.SGD``.

    Args:
        lr: learning rate, a float or a schedule (as :func:`adamw`).
        momentum: momentum factor (>= 0), or a schedule like ``lr`` (e.g.
            :func:`~medfunc.schedules.one_cycle_momentum`, as ``OneCycleLR`` cycles it).
        dampening: dampening of the momentum (not applied on the first update, as torch).
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 penalty (>= 0) of the parameters ``decay_mask`` selects.
        decay_mask: as :func:`adamw`.
        lr_multipliers: as :func:`adamw`.
        kernel: as :func:`adamw`.

    Returns:
        The transformation; its state is an :class:`SGDState`.

    Example:
        >>> tx = sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    """
    momentum = _checked_momentum("momentum", momentum)
    dampening = validation.number("dampening", dampening)
    nesterov = validation.boolean("nesterov", nesterov)
    if nesterov and ((not callable(momentum) and momentum <= 0) or dampening != 0):
        raise ConfigError(
            f"nesterov=True needs momentum > 0 and dampening == 0; got momentum={momentum!r} "
            f"and dampening={dampening!r}"
        )
    spec = _make_spec(
        "sgd",
        lr,
        weight_decay,
        decay_mask,
        lr_multipliers,
        kernel,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
    )

    def init(params: Params) -> SGDState:
        _init_common(spec, params)
        bufs = OrderedDict()
        if spec.momentum != 0:
            for name, p in params.items():
                bufs[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        flags = torch.zeros(len(params), dtype=torch.float32, device=_first_device(params))
        return SGDState(bufs, flags)

    def update(
        grads: Grads, state: SGDState, params: Params, ctx: UpdateContext
    ) -> tuple[Grads, Params, SGDState]:
        position = {n: i for i, n in enumerate(params)}
        momentum = _now(spec.momentum, ctx.step)

        state_keys = state.momentum_buffer if spec.momentum else params
        for names, ps, gs, group in _calls_with_grads(spec, grads, params, state_keys, ctx):
            kernels.sgd_step(
                ps,
                gs,
                [state.momentum_buffer[n] for n in names] if spec.momentum else [],
                momentum=momentum,
                dampening=spec.dampening,
                nesterov=spec.nesterov,
                initialized=[state.initialized[position[n]] for n in names],
                **group,
            )
        with_grad = [i for i, g in enumerate(grads.values()) if g is not None]
        _mark_initialized(state.initialized, with_grad, ctx.found_inf)
        return grads, params, state

    return GradientTransformation(init, update, spec=spec)


# ---------------------------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[..., GradientTransformation]] = {
    "adamw": adamw,
    "adam": adam,
    "sgd": sgd,
}
"""The optimizers by name: the one table that config files (and
:class:`~medfunc.trainer_config.TrainerConfig`) choose from. Adding an optimizer is one entry
here."""

OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)
"""The names :func:`get_optimizer` accepts, in :data:`OPTIMIZERS` order."""


def get_optimizer(name: str, **kwargs: Any) -> GradientTransformation:
    """Build an optimizer by name (the seed's ``optimizer_name`` option).

    The name is looked up in :data:`OPTIMIZERS`; the keyword arguments are checked against the
    factory's signature before it is called, so an error raised inside the factory (an invalid
    value) reaches the caller as it is.

    Args:
        name: one of :data:`OPTIMIZER_NAMES` (case-insensitive, surrounding spaces ignored).
        **kwargs: the optimizer's arguments (``lr`` is required).

    Returns:
        The optimizer transformation.

    Raises:
        ConfigError: an unknown name (with the closest known one), an argument the optimizer
            does not take (with the closest one it does) or lacks, or an invalid value.

    Example:
        >>> tx = get_optimizer("sgd", lr=0.01, momentum=0.9)
    """
    key = validation.one_of("optimizer", name, tuple(OPTIMIZERS), normalize=True)
    factory = OPTIMIZERS[key]
    validation.check_kwargs(factory, kwargs, f"optimizer {key!r}")
    return factory(**kwargs)
