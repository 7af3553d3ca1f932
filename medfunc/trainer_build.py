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
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from medfunc import optim, schedules
from medfunc.errors import ConfigError
from medfunc.trainer_config import TrainerConfig

__all__ = [
    "TorchSchedulerLRs",
    "build_momentum",
    "build_optimizer",
    "build_schedule",
    "clipped",
    "from_torch_optimizer",
    "torch_lr_scheduler",
]

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
    if warmup and total_steps is not None and warmup >= total_steps:
        log.warning(
            "warmup_steps=%d %s the run's %d optimizer steps: the learning rate warms up over "
            "the whole run and never reaches learning_rate=%g (the first step uses LR 0); "
            "lower warmup_steps or train longer",
            warmup,
            "exceeds" if warmup > total_steps else "equals",
            total_steps,
            config.learning_rate,
        )
        kwargs["warmup_steps"] = total_steps
    return schedules.get_schedule(name, **kwargs)


def build_momentum(config: TrainerConfig, total_steps: int | None) -> schedules.Schedule | None:
    """The momentum schedule of ``scheduler="one_cycle"``, as ``OneCycleLR`` cycles it.

    ``OneCycleLR`` (``cycle_momentum=True``, its default) moves Adam's ``beta1`` or SGD's
    momentum from ``max_momentum`` down to ``base_momentum`` while the LR rises and back while it
    falls; ``TrainerConfig.cycle_momentum=False`` keeps ``betas[0]`` / ``sgd_momentum`` fixed.

    Args:
        config: the options (``scheduler``, ``cycle_momentum``, ``base_momentum``,
            ``max_momentum``, ``pct_start``, ``anneal_strategy``).
        total_steps: optimizer steps of the whole run.

    Returns:
        :func:`~medfunc.schedules.one_cycle_momentum`, or None for other schedules or with
        ``cycle_momentum=False``.

    Example:
        >>> mom = build_momentum(TrainerConfig(scheduler="one_cycle"), total_steps=100)
        >>> [round(float(mom(s)), 6) for s in (0, 29, 99)]
        [0.95, 0.85, 0.95]
    """
    if config.scheduler != "one_cycle" or not config.cycle_momentum:
        return None
    if total_steps is None:
        raise ConfigError(
            "TrainerConfig.scheduler='one_cycle' needs the run length, but the "
            "training data has no len(); set TrainerConfig.total_steps"
        )
    return schedules.one_cycle_momentum(
        total_steps,
        pct_start=config.pct_start,
        anneal_strategy=config.anneal_strategy,
        base_momentum=config.base_momentum,
        max_momentum=config.max_momentum,
    )


def build_optimizer(
    config: TrainerConfig,
    schedule: schedules.Schedule,
    *,
    clip: bool = True,
    momentum: schedules.Schedule | None = None,
) -> optim.GradientTransformation:
    """The gradient transformation the config selects: clipping, then the optimizer.

    The optimizer ``optim.OPTIMIZERS[config.optimizer]`` gets ``schedule`` as its learning rate
    and the option of the same name for each other argument (``momentum`` is ``sgd_momentum``,
    ``lr_multipliers`` is ``layer_wise_lrs``).

    Args:
        config: the options.
        schedule: the learning rate (see :func:`build_schedule`).
        clip: include the clipping of ``grad_clip_mode`` (DeepSpeed clips by itself).
        momentum: a schedule for Adam's ``beta1`` or SGD's momentum (see
            :func:`build_momentum`) in place of ``betas[0]`` / ``sgd_momentum``.

    Returns:
        ``chain(clip, optimizer)`` (or the optimizer alone with ``grad_clip_mode="none"`` or
        ``clip=False``).

    Example:
        >>> tx = build_optimizer(TrainerConfig(), schedules.constant(1e-3))
        >>> [child.spec.name if child.spec else "clip" for child in tx.children]
        ['clip', 'adamw']
    """
    name = config.optimizer
    options = _options(config)
    if momentum is not None:
        options.update(betas=(momentum, config.betas[1]), momentum=momentum)
    tx = optim.get_optimizer(name, **_arguments(optim.OPTIMIZERS[name], schedule, options))
    return clipped(config, tx) if clip else tx


def clipped(
    config: TrainerConfig, tx: optim.GradientTransformation
) -> optim.GradientTransformation:
    """``tx`` preceded by the clipping of ``grad_clip_mode`` (``tx`` alone for "none").

    Args:
        config: the options (``grad_clip_mode``, ``max_grad_norm``, ``grad_clip_value``).
        tx: the optimizer.

    Returns:
        ``chain(clip, tx)`` or ``tx``.

    Example:
        >>> tx = clipped(TrainerConfig(grad_clip_mode="none"), optim.sgd(0.1))
        >>> tx.spec.name
        'sgd'
    """
    if config.grad_clip_mode not in _CLIPPING:
        return tx
    clip_by, option = _CLIPPING[config.grad_clip_mode]
    return optim.chain(clip_by(getattr(config, option)), tx)


def torch_lr_scheduler(
    config: TrainerConfig, optimizer: torch.optim.Optimizer, total_steps: int | None
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A torch LR scheduler giving ``optimizer`` the LR of :func:`build_schedule` at each step.

    Each group's LR is its initial LR times ``schedule(step) / learning_rate``
    (a ``LambdaLR``); ``scheduler="none"`` gives None.

    Args:
        config: the options.
        optimizer: the torch optimizer whose groups' LRs are driven.
        total_steps: optimizer steps of the whole run.

    Returns:
        The scheduler, or None.

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
        >>> config = TrainerConfig(learning_rate=0.1, scheduler="step", step_size=2, gamma=0.5)
        >>> sched = torch_lr_scheduler(config, opt, total_steps=10)
        >>> [round(float(f(s)), 3) for f in sched.lr_lambdas for s in range(4)]
        [1.0, 1.0, 0.5, 0.5]
    """
    if config.scheduler == "none":
        return None
    schedule = build_schedule(config, total_steps)
    base = config.learning_rate

    def factor(step: int) -> float:
        return float(schedule(step)) / base if base else 0.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TorchSchedulerLRs:
    """The LRs a torch LR scheduler gives its optimizer's groups, update by update.

    The scheduler is stepped (without optimizer steps) only as far as asked, and each step's
    group LRs are kept, so ``at(k)`` is the LR list a torch loop uses for its ``k``-th update
    (0-based: ``optimizer.step()`` then ``scheduler.step()``).

    Args:
        optimizer: the optimizer the scheduler was built on (used only to read LRs).
        scheduler: the torch LR scheduler.

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
        >>> lrs = TorchSchedulerLRs(opt, torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5))
        >>> [lrs.at(k)[0] for k in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler
        self._lrs = [self._group_lrs()]

    def _group_lrs(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def at(self, step: int) -> list[float]:
        """The group LRs of update ``step``."""
        while len(self._lrs) <= step:
            with warnings.catch_warnings():
                # the scheduler is stepped ahead on an optimizer that never steps
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
                self.scheduler.step()
            self._lrs.append(self._group_lrs())
        return self._lrs[step]

    def group(self, index: int) -> Callable[[Any], torch.Tensor]:
        """Group ``index``'s LR as a medfunc schedule ``step -> 0-d float64 tensor``."""

        def lr(step: Any) -> torch.Tensor:
            return torch.tensor(self.at(int(step))[index], dtype=torch.float64)

        return lr


_NOT_OPTIONS = ("params", "param_names", "initial_lr")


def from_torch_optimizer(
    optimizer: torch.optim.Optimizer,
    trainable: Mapping[str, torch.Tensor],
    lrs: TorchSchedulerLRs | None = None,
) -> optim.GradientTransformation:
    """The :func:`~medfunc.optim.from_torch` transformation equal to a built torch optimizer.

    Its class, constructor defaults and param_groups (which parameters, which options) are
    taken from ``optimizer``; its own state and parameter tensors are not used.

    Args:
        optimizer: e.g. ``torch.optim.RMSprop(groups, lr=1e-3)`` over the model's parameters.
        trainable: the trainable parameters, name -> tensor (the ones ``optimizer`` holds).
        lrs: the LRs of a torch scheduler driving ``optimizer`` (default: the groups' LRs).

    Returns:
        The transformation.

    Raises:
        ConfigError: ``optimizer`` is no torch optimizer, holds a tensor that is not a
            trainable parameter of the model, or leaves a trainable parameter out.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> opt = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9)
        >>> tx = from_torch_optimizer(opt, dict(model.named_parameters()))
        >>> state = mf.init_state(model, tx)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "_optimizer_factory must return a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    names = {id(tensor): name for name, tensor in trainable.items()}
    defaults = {k: v for k, v in optimizer.defaults.items() if k != "lr"}
    groups, seen = [], set()
    for index, group in enumerate(optimizer.param_groups):
        members = []
        for param in group["params"]:
            if id(param) not in names:
                raise ConfigError(
                    f"the optimizer's param_groups[{index}] holds a tensor of shape "
                    f"{tuple(param.shape)} that is not a trainable parameter of the model; build "
                    "the groups from the model's parameters (see _build_param_groups)"
                )
            members.append(names[id(param)])
        seen.update(members)
        options = {
            k: v
            for k, v in group.items()
            if k not in _NOT_OPTIONS and (k == "lr" or k not in defaults or defaults[k] != v)
        }
        if lrs is not None:
            options["lr"] = lrs.group(index)
        groups.append({"params": frozenset(members).__contains__, **options})
    left_out = [name for name in trainable if name not in seen]
    if left_out:
        raise ConfigError(
            f"the optimizer's param_groups leave out the trainable parameters {left_out[:4]}; "
            "torch would never update them. Include them, or set requires_grad=False on them "
            "before training"
        )
    return optim.from_torch(
        type(optimizer), lr=optimizer.defaults.get("lr"), param_groups=groups, **defaults
    )
