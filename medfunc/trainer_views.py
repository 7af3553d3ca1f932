"""The original trainer's objects as read-only views of a :class:`~medfunc.state.TrainState`.

``MedicalModelTrainer.optimizer``, ``.scheduler`` and ``.scaler`` were live torch objects in the
original trainer. In medfunc the training state is one pytree, so these are views built from it
each time they are read: they show the current learning rates, optimizer moments and loss scale,
and changing them changes nothing in training (set options in the config, or replace the
factories; see docs/migrating.md). :class:`EvalResult` is what ``evaluate`` returns.

Example:
    >>> model = nn.Linear(4, 2)
    >>> state = mf.init_state(model, mf.optim.adamw(mf.schedules.step(0.1, 1, gamma=0.5)))
    >>> view = SchedulerView(lambda: state)
    >>> view.get_last_lr()
    [0.1, 0.1]
    >>> EvalResult({"loss": 0.5, "accuracy": 0.75}).metrics
    {'accuracy': 0.75}
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from medfunc import optim
from medfunc.precision import scaler_state_dict
from medfunc.state import TrainState

__all__ = ["EvalResult", "ScalerView", "SchedulerView", "optimizer_view"]


class EvalResult(dict):
    """The metrics of one evaluation: a dict of every metric, with ``.loss`` and ``.metrics``.

    A plain ``dict`` (``"loss"`` included) for code that treats the result as one (indexing,
    ``json.dumps``), with the original trainer's two attributes.

    Example:
        >>> result = EvalResult({"loss": 0.25, "f1": 0.9})
        >>> result.loss, result.metrics, result["f1"]
        (0.25, {'f1': 0.9}, 0.9)
    """

    @property
    def loss(self) -> float | None:
        """The evaluation loss (None when the evaluation had none)."""
        return self.get("loss")

    @property
    def metrics(self) -> dict[str, float]:
        """Every metric other than ``loss``."""
        return {k: v for k, v in self.items() if k != "loss"}


def _trainable(state: TrainState) -> OrderedDict:
    return OrderedDict((name, state.params[name]) for name in state.trainable)


def optimizer_view(state: TrainState) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer equal to the state's, at its current step.

    Its ``param_groups`` hold the state's parameters with each group's current ``lr`` (the
    schedule at ``state.step`` times the group's multiplier), and its ``state`` holds copies of
    the state's moments, so ``state_dict()`` is what a torch run would save.

    Args:
        state: a live training state.

    Returns:
        A new optimizer built from the state (stepping it does not change the state).

    Example:
        >>> state = mf.init_state(nn.Linear(4, 2), mf.optim.sgd(0.1, momentum=0.9))
        >>> [group["lr"] for group in optimizer_view(state).param_groups]
        [0.1]
    """
    trainable = _trainable(state)
    step = int(state.step)
    optimizer = optim.torch_optimizer(state.tx, trainable, step=step)
    saved = optim.to_torch_state_dict(state.tx, state.opt_state, trainable, step)
    lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return optimizer


class SchedulerView:
    """The LR schedule of a training state as a torch LR scheduler shows it.

    Args:
        current: returns the live training state.

    Example:
        >>> state = mf.init_state(nn.Linear(4, 2), mf.optim.sgd(mf.schedules.constant(0.1)))
        >>> SchedulerView(lambda: state).last_epoch
        0
    """

    def __init__(self, current: Callable[[], TrainState]) -> None:
        self._current = current

    @property
    def last_epoch(self) -> int:
        """Optimizer updates applied so far (a torch scheduler's count of its steps)."""
        return int(self._current().step)

    def get_last_lr(self) -> list[float]:
        """Each param group's LR for the next update."""
        return [group["lr"] for group in optimizer_view(self._current()).param_groups]

    def state_dict(self) -> dict[str, Any]:
        """``{"last_epoch", "_last_lr"}``: the schedule's position (the schedule is the config)."""
        return {"last_epoch": self.last_epoch, "_last_lr": self.get_last_lr()}


class ScalerView:
    """The fp16 dynamic loss scale of a training state as ``torch.amp.GradScaler`` shows it.

    Args:
        current: returns the live training state (trained with ``precision="fp16"``).

    Example:
        >>> state = mf.init_state(nn.Linear(4, 2), mf.optim.sgd(0.1), precision="fp16")
        >>> ScalerView(lambda: state).get_scale()
        65536.0
    """

    def __init__(self, current: Callable[[], TrainState]) -> None:
        self._current = current

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        """The current loss scale."""
        return float(self._current().loss_scale.scale)

    def state_dict(self) -> dict[str, Any]:
        """The ``GradScaler.state_dict()`` of the current scale and growth tracker."""
        state = self._current()
        return scaler_state_dict(state.policy, state.loss_scale)
