"""Pure learning-rate schedules: ``step -> lr``.

Each factory here returns a callable ``schedule(step) -> torch.Tensor``. ``step`` is a Python
``int`` or an integer tensor (typically the 0-d ``int64`` step counter of a ``TrainState``, on any
device). The result is a ``float64`` tensor of the same shape and on the same device as ``step``
(a 0-d CPU tensor for an ``int``).

The schedules are written for the fast path: with a tensor step they never synchronise with the
host (no ``.item()``, no Python branch on a tensor value), so they run inside ``torch.compile``
(``fullgraph=True``) and CUDA graph capture, and a compiled step does not recompile as the step
changes. Every schedule reproduces the learning rates of its ``torch.optim.lr_scheduler``
counterpart (see ``docs/schedules.md``); the test-suite checks this against the real schedulers.

Each schedule here is one formula that runs on two kinds of numbers: float64 tensors (the
call above) and Python floats (:meth:`HostSchedule.at_host`), with the same IEEE operations in
the same order, so both give bitwise the same value. An eager step on the CPU reads its
counter for free and takes the host form (:func:`value_now`): a few float operations instead of
a dozen tensor ops per step.

Negative steps are treated as step 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal

import torch

from medfunc import validation
from medfunc.errors import ConfigError

__all__ = [
    "ANNEAL_STRATEGIES",
    "HostSchedule",
    "SCHEDULES",
    "SCHEDULE_NAMES",
    "Schedule",
    "constant",
    "cosine",
    "get_schedule",
    "linear_warmup",
    "one_cycle",
    "one_cycle_momentum",
    "step",
    "value_now",
]

Schedule = Callable[[int | torch.Tensor], torch.Tensor]
"""A learning-rate schedule: maps a step (``int`` or integer tensor) to a ``float64`` tensor."""

#: The ``anneal_strategy`` values of :func:`one_cycle` and :func:`one_cycle_momentum`.
ANNEAL_STRATEGIES = ("cos", "linear")


# --------------------------------------------------------------------------------------------
# step handling (traced: only static checks on dtype/type, no value-dependent branches)
# --------------------------------------------------------------------------------------------


def _as_step(step: int | torch.Tensor) -> torch.Tensor:
    """The step as an integer tensor, clamped at 0, on the step's device (CPU for an int)."""
    if isinstance(step, torch.Tensor):
        if step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise ConfigError(
                f"a schedule's step must be an int or an integer tensor; got a tensor of dtype "
                f"{step.dtype}: pass the state's step counter (0-d int64)"
            )
        return torch.clamp(step, min=0)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ConfigError(
            f"a schedule's step must be an int or an integer tensor; got {type(step).__name__} "
            f"{step!r}"
        )
    return torch.tensor(max(int(step), 0), dtype=torch.int64)


class _TensorMath:
    """The operations of a schedule's formula on a (float64 or integer) tensor step."""

    where = staticmethod(torch.where)
    cos = staticmethod(torch.cos)

    @staticmethod
    def f64(step: torch.Tensor) -> torch.Tensor:
        return step.to(torch.float64)

    @staticmethod
    def full(step: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full_like(step, value, dtype=torch.float64)

    @staticmethod
    def clamp(x: torch.Tensor, low: float | None = None, high: float | None = None) -> torch.Tensor:
        return torch.clamp(x, min=low, max=high)

    @staticmethod
    def floor_div(step: torch.Tensor, size: int) -> torch.Tensor:
        return torch.div(step, size, rounding_mode="floor")

    @staticmethod
    def pow(base: float, exponent: torch.Tensor) -> torch.Tensor:
        return torch.pow(base, exponent)


class _HostMath:
    """The same operations on a Python int step and Python floats (IEEE float64 alike)."""

    cos = staticmethod(math.cos)

    @staticmethod
    def where(cond: bool, a: float, b: float) -> float:
        return a if cond else b

    @staticmethod
    def f64(step: int) -> float:
        return float(step)

    @staticmethod
    def full(step: int, value: float) -> float:
        return value

    @staticmethod
    def clamp(x: float, low: float | None = None, high: float | None = None) -> float:
        if low is not None and x < low:
            x = low
        if high is not None and x > high:
            x = high
        return x

    @staticmethod
    def floor_div(step: int, size: int) -> int:
        return step // size

    @staticmethod
    def pow(base: float, exponent: float) -> float:
        return base**exponent


class HostSchedule:
    """A schedule whose formula also runs on the host: ``schedule(step) -> Tensor`` as every
    schedule, plus :meth:`at_host` (``int -> float``, bitwise the tensor's value).

    Args:
        formula: ``formula(step, m)`` with ``step`` a non-negative integer tensor or int and
            ``m`` the math of that kind of number (``where``, ``cos``, ``clamp``, ...).
        name: the factory's name (for ``repr``).

    Example:
        >>> sched = linear_warmup(1e-3, warmup_steps=10, total_steps=110)
        >>> sched.at_host(5) == sched(5).item()
        True
    """

    def __init__(self, formula: Callable[[Any, Any], Any], name: str) -> None:
        self._formula = formula
        self._name = name

    def __call__(self, step: int | torch.Tensor) -> torch.Tensor:
        return self._formula(_as_step(step), _TensorMath)

    def at_host(self, step: int) -> float:
        """The value at a Python int ``step`` as a Python float, without tensor ops."""
        return self._formula(max(step, 0), _HostMath)

    def __repr__(self) -> str:
        return f"<medfunc schedule {self._name}>"


def value_now(schedule: Callable, step: torch.Tensor) -> float | torch.Tensor:
    """``schedule`` at the state's ``step`` counter, as cheaply as exactness allows.

    A :class:`HostSchedule` at a CPU counter outside ``torch.compile`` is evaluated on the host
    (reading a CPU tensor is no device sync) and returns a Python float; anything else returns
    the schedule's tensor (on accelerators and while tracing nothing is read back).

    Args:
        schedule: a schedule ``step -> tensor`` (any callable of that kind).
        step: the 0-d integer step counter.

    Returns:
        A Python float, or the schedule's tensor (a float64 tensor for a non-tensor result).

    Example:
        >>> value_now(linear_warmup(1e-3, 10, 110), torch.tensor(5))
        0.0005
    """
    host = getattr(schedule, "at_host", None)
    if host is not None and step.is_cpu and not torch.compiler.is_compiling():
        return host(int(step))
    out = schedule(step)
    if not isinstance(out, torch.Tensor):
        out = torch.tensor(float(out), dtype=torch.float64, device=step.device)
    return out


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------


def constant(lr: float) -> Schedule:
    """A constant learning rate (no scheduler in ``torch.optim`` terms).

    Args:
        lr: The learning rate, a finite number >= 0.

    Returns:
        ``schedule(step) -> Tensor``: ``lr`` as a ``float64`` tensor on the step's device.

    Example:
        >>> sched = constant(1e-3)
        >>> sched(10)
        tensor(0.0010, dtype=torch.float64)
    """
    value = validation.non_negative_float("lr", lr)

    return HostSchedule(lambda step, m: m.full(step, value), "constant")


def linear_warmup(peak: float, warmup_steps: int, total_steps: int) -> Schedule:
    """Linear warm-up from 0 to ``peak``, then linear decay to 0 at ``total_steps``.

    The same values as ``transformers.get_linear_schedule_with_warmup`` (a ``LambdaLR``) with
    base learning rate ``peak``::

        factor = step / max(1, warmup_steps)                                  if step < warmup_steps
        factor = max(0, (total_steps - step) / max(1, total_steps - warmup_steps))  otherwise
        lr = peak * factor

    The learning rate stays 0 after ``total_steps``.

    Args:
        peak: The learning rate reached at ``warmup_steps``, a finite number >= 0.
        warmup_steps: Steps of linear warm-up, an integer in ``[0, total_steps]``.
        total_steps: The step at which the learning rate reaches 0, an integer > 0.

    Returns:
        ``schedule(step) -> Tensor``: the learning rate as a ``float64`` tensor.

    Example:
        >>> sched = linear_warmup(1e-3, warmup_steps=10, total_steps=110)
        >>> [round(float(sched(s)), 6) for s in (0, 5, 10, 60, 110)]
        [0.0, 0.0005, 0.001, 0.0005, 0.0]
    """
    peak_f = validation.non_negative_float("peak", peak)
    total = validation.positive_int("total_steps", total_steps)
    warmup = validation.non_negative_int("warmup_steps", warmup_steps)
    if warmup > total:
        raise ConfigError(
            f"warmup_steps ({warmup}) must not exceed total_steps ({total}); "
            f"lower warmup_steps or raise total_steps"
        )
    warm_div = float(max(1, warmup))
    decay_div = float(max(1, total - warmup))
    warm_f = float(warmup)
    total_f = float(total)

    def formula(step: Any, m: Any) -> Any:
        s = m.f64(step)
        warming = s / warm_div
        decaying = m.clamp((total_f - s) / decay_div, low=0.0)
        return peak_f * m.where(s < warm_f, warming, decaying)

    return HostSchedule(formula, "linear_warmup")


def step(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """Multiply the learning rate by ``gamma`` every ``step_size`` steps (``StepLR``).

    ``lr(step) = lr * gamma ** (step // step_size)``.

    Args:
        lr: The initial learning rate, a finite number >= 0.
        step_size: Steps between decays, an integer > 0.
        gamma: The decay factor, a finite number >= 0. Default 0.1.

    Returns:
        ``schedule(step) -> Tensor``: the learning rate as a ``float64`` tensor.

    Example:
        >>> sched = step(0.1, step_size=30, gamma=0.1)
        >>> [round(float(sched(s)), 6) for s in (0, 29, 30, 60)]
        [0.1, 0.1, 0.01, 0.001]
    """
    lr_f = validation.non_negative_float("lr", lr)
    size = validation.positive_int("step_size", step_size)
    gamma_f = validation.non_negative_float("gamma", gamma)

    def formula(step: Any, m: Any) -> Any:
        return lr_f * m.pow(gamma_f, m.f64(m.floor_div(step, size)))

    return HostSchedule(formula, "step")


def cosine(lr: float, t_max: int, eta_min: float = 0.0) -> Schedule:
    """Cosine annealing from ``lr`` to ``eta_min`` over ``t_max`` steps (``CosineAnnealingLR``).

    ``lr(step) = eta_min + (lr - eta_min) * (1 + cos(pi * step / t_max)) / 2``, the closed form of
    ``CosineAnnealingLR``. Past ``t_max`` the schedule is periodic with period ``2 * t_max``
    (it rises back to ``lr``), exactly as ``CosineAnnealingLR`` keeps going; it does not restart
    (for warm restarts, ``CosineAnnealingWarmRestarts``, build your own).

    Args:
        lr: The initial (maximum) learning rate, a finite number >= 0.
        t_max: Steps from ``lr`` down to ``eta_min``, an integer > 0.
        eta_min: The minimum learning rate, a finite number >= 0. Default 0.

    Returns:
        ``schedule(step) -> Tensor``: the learning rate as a ``float64`` tensor.

    Example:
        >>> sched = cosine(1.0, t_max=100)
        >>> [round(float(sched(s)), 6) for s in (0, 50, 100, 150, 200)]
        [1.0, 0.5, 0.0, 0.5, 1.0]
    """
    lr_f = validation.non_negative_float("lr", lr)
    t = validation.positive_int("t_max", t_max)
    eta = validation.non_negative_float("eta_min", eta_min)

    def formula(step: Any, m: Any) -> Any:
        return eta + (lr_f - eta) * (1 + m.cos(math.pi * m.f64(step) / t)) / 2

    return HostSchedule(formula, "cosine")


def _one_cycle_phases(
    total_steps: int, pct_start: float, three_phase: bool
) -> list[tuple[float, float, float]]:
    """``(start_step, end_step, denominator)`` of each phase, as ``OneCycleLR`` defines them."""
    if three_phase:
        ends = [
            float(pct_start * total_steps) - 1,
            float(2 * pct_start * total_steps) - 2,
            float(total_steps - 1),
        ]
    else:
        ends = [float(pct_start * total_steps) - 1, float(total_steps - 1)]
    phases = []
    start = 0.0
    for end in ends:
        phases.append((start, end, end - start))
        start = end
    return phases


def _one_cycle(
    values: list[tuple[float, float]],
    total_steps: int,
    pct_start: float,
    anneal_strategy: str,
    three_phase: bool,
) -> Schedule:
    """A piecewise OneCycle schedule; ``values[i]`` is the (start, end) value of phase ``i``."""
    phases = _one_cycle_phases(total_steps, pct_start, three_phase)
    last = float(total_steps - 1)
    cos = anneal_strategy == "cos"

    def anneal(s: Any, m: Any, phase: tuple[float, float, float], ends: tuple[float, float]):
        start_step, _, denom = phase
        begin, finish = ends
        if denom == 0:
            # A phase of zero length (e.g. pct_start * total_steps == 1): OneCycleLR divides by
            # zero there; the phase is over, so its end value applies.
            pct = m.full(s, 1.0)
        else:
            pct = (s - start_step) / denom
        if cos:
            return finish + (begin - finish) / 2.0 * (m.cos(math.pi * pct) + 1)
        return (finish - begin) * pct + begin

    def formula(step: Any, m: Any) -> Any:
        # Steps 0 .. total_steps - 1 are those an optimizer uses in a total_steps-long run; later
        # steps keep the final value (OneCycleLR extrapolates one more step, then raises).
        s = m.clamp(m.f64(step), high=last)
        out = anneal(s, m, phases[-1], values[-1])
        for i in range(len(phases) - 2, -1, -1):
            out = m.where(s <= phases[i][1], anneal(s, m, phases[i], values[i]), out)
        return out

    return HostSchedule(formula, "one_cycle")


def one_cycle(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: Literal["cos", "linear"] = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """The 1cycle learning-rate policy (``OneCycleLR``'s learning rates).

    The learning rate starts at ``initial_lr = max_lr / div_factor``, rises to ``max_lr`` over the
    first ``pct_start`` of the cycle, then anneals to ``min_lr = initial_lr / final_div_factor``
    at step ``total_steps - 1``. With ``three_phase=True`` it first returns symmetrically to
    ``initial_lr`` and only then anneals to ``min_lr``, as in ``OneCycleLR``.

    Steps ``0 .. total_steps - 1`` give exactly ``OneCycleLR``'s values. Later steps keep the
    final value ``min_lr`` (``OneCycleLR`` extrapolates the curve for step ``total_steps`` - which
    with ``anneal_strategy="linear"`` can be negative - and raises after it).

    ``OneCycleLR`` also cycles momentum by default; that is the separate schedule
    :func:`one_cycle_momentum`, which the optimizers take as ``betas=(momentum, beta2)``
    (``adamw``, ``adam``) or ``momentum=momentum`` (``sgd``).

    Args:
        max_lr: The peak learning rate, a finite number >= 0.
        total_steps: The length of the cycle in steps, an integer > 0.
        pct_start: The fraction of the cycle spent increasing the learning rate, in (0, 1).
        anneal_strategy: ``"cos"`` or ``"linear"`` annealing between phase end points.
        div_factor: ``initial_lr = max_lr / div_factor``; a number > 0.
        final_div_factor: ``min_lr = initial_lr / final_div_factor``; a number > 0.
        three_phase: Use the three-phase variant described above.

    Returns:
        ``schedule(step) -> Tensor``: the learning rate as a ``float64`` tensor.

    Example:
        >>> sched = one_cycle(0.1, total_steps=100)
        >>> [round(float(sched(s)), 6) for s in (0, 29, 99)]
        [0.004, 0.1, 0.0]
    """
    max_lr_f = validation.non_negative_float("max_lr", max_lr)
    total = validation.positive_int("total_steps", total_steps)
    pct = validation.fraction("pct_start", pct_start)
    strategy = validation.one_of("anneal_strategy", anneal_strategy, ANNEAL_STRATEGIES)
    div = validation.positive_float("div_factor", div_factor)
    final_div = validation.positive_float("final_div_factor", final_div_factor)
    initial_lr = max_lr_f / div
    min_lr = initial_lr / final_div
    if three_phase:
        values = [(initial_lr, max_lr_f), (max_lr_f, initial_lr), (initial_lr, min_lr)]
    else:
        values = [(initial_lr, max_lr_f), (max_lr_f, min_lr)]
    return _one_cycle(values, total, pct, strategy, bool(three_phase))


def one_cycle_momentum(
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: Literal["cos", "linear"] = "cos",
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    three_phase: bool = False,
) -> Schedule:
    """The momentum (or Adam ``beta1``) that ``OneCycleLR(cycle_momentum=True)`` sets.

    Momentum moves inversely to the learning rate of :func:`one_cycle` with the same
    ``total_steps``, ``pct_start``, ``anneal_strategy`` and ``three_phase``: from
    ``max_momentum`` down to ``base_momentum`` while the learning rate rises, and back up to
    ``max_momentum`` while it falls. Steps past ``total_steps - 1`` keep the final value.

    Args:
        total_steps: The length of the cycle in steps, an integer > 0.
        pct_start: The fraction of the cycle spent increasing the learning rate, in (0, 1).
        anneal_strategy: ``"cos"`` or ``"linear"``.
        base_momentum: The lowest momentum, reached at the learning-rate peak; in [0, 1].
        max_momentum: The highest momentum, at the start and end of the cycle; in [0, 1].
        three_phase: Use ``OneCycleLR``'s three-phase variant.

    Returns:
        ``schedule(step) -> Tensor``: the momentum as a ``float64`` tensor.

    Example:
        >>> mom = one_cycle_momentum(total_steps=100)
        >>> [round(float(mom(s)), 6) for s in (0, 29, 99)]
        [0.95, 0.85, 0.95]
    """
    total = validation.positive_int("total_steps", total_steps)
    pct = validation.fraction("pct_start", pct_start)
    strategy = validation.one_of("anneal_strategy", anneal_strategy, ANNEAL_STRATEGIES)
    base = validation.probability("base_momentum", base_momentum)
    top = validation.probability("max_momentum", max_momentum)
    if three_phase:
        values = [(top, base), (base, top), (top, top)]
    else:
        values = [(top, base), (base, top)]
    return _one_cycle(values, total, pct, strategy, bool(three_phase))


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear_warmup": linear_warmup,
    "step": step,
    "cosine": cosine,
    "one_cycle": one_cycle,
    "constant": constant,
    "none": constant,
}
"""The learning-rate schedules by name: the one table that config files (and
:class:`~medfunc.trainer_config.TrainerConfig`) choose from. Adding a schedule is one entry here.
``"none"`` is an alias of ``"constant"``. :func:`one_cycle_momentum` is not listed: it schedules
a momentum, not a learning rate."""

SCHEDULE_NAMES: tuple[str, ...] = tuple(SCHEDULES)
"""The names :func:`get_schedule` accepts, in :data:`SCHEDULES` order."""


def get_schedule(name: str, **kwargs: Any) -> Schedule:
    """Build a learning-rate schedule by name, e.g. from a config file.

    The name is looked up in :data:`SCHEDULES`; the keyword arguments are checked against the
    factory's signature before it is called, so an error raised inside the factory (an invalid
    value) reaches the caller as it is.

    Args:
        name: One of :data:`SCHEDULE_NAMES` (case-insensitive, surrounding spaces ignored).
        **kwargs: The factory's arguments, e.g. ``lr=1e-3, t_max=1000`` for ``"cosine"``.

    Returns:
        ``schedule(step) -> Tensor``.

    Raises:
        ConfigError: An unknown name (with the closest known one), an argument the factory does
            not take (with the closest one it does) or lacks, or an invalid value.

    Example:
        >>> sched = get_schedule("cosine", lr=1e-3, t_max=1000)
        >>> float(sched(0))
        0.001
    """
    key = validation.one_of("schedule", name, tuple(SCHEDULES), normalize=True)
    factory = SCHEDULES[key]
    validation.check_kwargs(factory, kwargs, f"schedule {key!r}")
    return factory(**kwargs)
