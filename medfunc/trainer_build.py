"""The optimizer and learning-rate schedule that a :class:`TrainerConfig` selects.

:func:`build_schedule` and :func:`build_optimizer` look the config's names up in the registries
(``schedules.SCHEDULES``, ``optim.OPTIMIZERS``) and pass each factory the option of the same name
for each of its arguments, so a new factory argument needs no code here.

Example:
    >>> config = TrainerConfig(optimizer="sgd", learning_rate=0.1, grad_clip_mode="value")
    >>> tx = build_optimizer(config, build_schedule(config, total_steps=100))
    >>> [child.spec.name if child.spec else "clip" for child in tx.children]
    ['clip', 'sgd']
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from medfunc import optim, schedules
from medfunc.errors import ConfigError
from medfunc.trainer_config import TrainerConfig

__all__ = ["build_optimizer", "build_schedule"]

log = logging.getLogger("medfunc.trainer")


_CLIPPING = {
    "norm": (optim.clip_by_global_norm, "max_grad_norm"),
    "value": (optim.clip_by_value, "grad_clip_value"),
}


def _options(config: TrainerConfig, **extra: Any) -> dict[str, Any]:
    """The config's values by field name, plus under the argument names the factories use."""
    options = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    return {
        **options,
        "momentum": config.sgd_momentum,
        "lr_multipliers": config.layer_wise_lrs,
        **extra,
    }


def _arguments(factory: Callable[..., Any], lr: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """``factory``'s arguments: ``lr`` for the first, ``options[name]`` for each other it takes."""
    first, *others = inspect.signature(factory).parameters
    return {first: lr, **{name: options[name] for name in others if name in options}}


def build_schedule(config: TrainerConfig, total_steps: int | None) -> schedules.Schedule:
    """The learning-rate schedule the config selects (counted in optimizer steps).

    The factory ``schedules.SCHEDULES[config.scheduler]`` gets ``learning_rate`` as its first
    argument and the option of the same name for each other one: ``total_steps`` is the run's
    length, ``t_max`` defaults to it and ``warmup_steps`` is capped at it (with a warning).

    Args:
        config: the options.
        total_steps: optimizer steps of the whole run (needed by linear_warmup, one_cycle and
            by cosine without ``t_max``).

    Returns:
        ``schedule(step) -> lr``.

    Raises:
        ConfigError: the schedule needs ``total_steps`` and it is unknown.

    Example:
        >>> float(build_schedule(TrainerConfig(scheduler="step", step_size=10), None)(10))
        5e-06
    """
    name = config.scheduler
    options = _options(config, total_steps=total_steps, t_max=config.t_max or total_steps)
    kwargs = _arguments(schedules.SCHEDULES[name], config.learning_rate, options)
    if any(n in kwargs and kwargs[n] is None for n in ("total_steps", "t_max")):
        raise ConfigError(
            f"TrainerConfig.scheduler={name!r} needs the run length, but the "
            "training data has no len(); set TrainerConfig.total_steps"
        )
    warmup = kwargs.get("warmup_steps")
    if warmup is not None and total_steps is not None and warmup > total_steps:
        log.warning(
            "warmup_steps=%d exceeds the run's %d optimizer steps; the learning "
            "rate warms up over all %d steps",
            warmup,
            total_steps,
            total_steps,
        )
        kwargs["warmup_steps"] = total_steps
    return schedules.get_schedule(name, **kwargs)


def build_optimizer(
    config: TrainerConfig, schedule: schedules.Schedule, *, clip: bool = True
) -> optim.GradientTransformation:
    """The gradient transformation the config selects: clipping, then the optimizer.

    The optimizer ``optim.OPTIMIZERS[config.optimizer]`` gets ``schedule`` as its learning rate
    and the option of the same name for each other argument (``momentum`` is ``sgd_momentum``,
    ``lr_multipliers`` is ``layer_wise_lrs``).

    Args:
        config: the options.
        schedule: the learning rate (see :func:`build_schedule`).
        clip: include the clipping of ``grad_clip_mode`` (DeepSpeed clips by itself).

    Returns:
        ``chain(clip, optimizer)`` (or the optimizer alone with ``grad_clip_mode="none"`` or
        ``clip=False``).

    Example:
        >>> tx = build_optimizer(TrainerConfig(), schedules.constant(1e-3))
        >>> [child.spec.name if child.spec else "clip" for child in tx.children]
        ['clip', 'adamw']
    """
    name = config.optimizer
    tx = optim.get_optimizer(name, **_arguments(optim.OPTIMIZERS[name], schedule, _options(config)))
    if not clip or config.grad_clip_mode not in _CLIPPING:
        return tx
    clip_by, option = _CLIPPING[config.grad_clip_mode]
    return optim.chain(clip_by(getattr(config, option)), tx)
