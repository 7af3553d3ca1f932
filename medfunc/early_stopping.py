"""Early stopping: stop when a metric has not improved for ``patience`` evaluations.

:class:`EarlyStopping` keeps the best value of a metric seen so far and counts the evaluations
since it last improved; :meth:`EarlyStopping.update` says when to stop. With ``patience=None`` it
never stops and only tracks the best value. :func:`improves` is the comparison it uses. A value
that is not a finite number (an AUROC undefined for a single-class evaluation set, a loss of NaN
logits) is no improvement: it counts towards ``patience``, with a warning, and never becomes the
best value.

Example:
    >>> stopper = EarlyStopping(patience=2, mode="min", min_delta=0.01)
    >>> [stopper.update(loss) for loss in (0.50, 0.45, 0.445, 0.46)]
    [False, False, False, True]
    >>> stopper.best, stopper.wait
    (0.45, 2)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

from medfunc import validation

__all__ = ["MODES", "EarlyStopping", "improves"]

MODES = ("min", "max")


def improves(value: float, best: float | None, *, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` is an improvement over ``best`` by more than ``min_delta``.

    Args:
        value: the new metric value.
        best: the best value so far, or None (then any value improves).
        mode: "min" (lower is better, e.g. a loss) or "max" (higher is better, e.g. AUROC).
        min_delta: the margin an improvement must exceed.

    Returns:
        True when ``value`` is better than ``best`` by more than ``min_delta``.

    Example:
        >>> improves(0.91, 0.90, mode="max", min_delta=0.005)
        True
        >>> improves(0.30, 0.30, mode="min")
        False
    """
    if best is None:
        return True
    if mode == "min":
        return value < best - min_delta
    return value > best + min_delta


@dataclasses.dataclass
class EarlyStopping:
    """The best value of a metric and the evaluations since it improved.

    Attributes:
        patience: stop after this many evaluations without an improvement; None never stops.
        mode: "min" (lower is better) or "max" (higher is better).
        min_delta: an improvement must exceed this margin (>= 0).
        best: the best value seen so far, or None before the first evaluation.
        wait: evaluations since the last improvement.

    Raises:
        ConfigError: a mode other than "min"/"max", a patience below 1 or a negative min_delta.

    Example:
        >>> stopper = EarlyStopping(patience=3, mode="max")
        >>> stopper.update(0.8), stopper.update(0.7), stopper.best
        (False, False, 0.8)
    """

    patience: int | None = None
    mode: str = "min"
    min_delta: float = 0.0
    best: float | None = None
    wait: int = 0

    def __post_init__(self) -> None:
        self.patience = validation.positive_int("patience", self.patience, optional=True)
        self.mode = validation.one_of("mode", self.mode, MODES)
        self.min_delta = validation.non_negative_float("min_delta", self.min_delta)

    @property
    def should_stop(self) -> bool:
        """True once ``wait`` has reached ``patience``."""
        return self.patience is not None and self.wait >= self.patience

    def update(self, value: float) -> bool:
        """Record one evaluation's value.

        A value that is not a finite number counts as no improvement, with a warning.

        Args:
            value: the metric of this evaluation.

        Returns:
            True when training should stop: ``patience`` evaluations in a row did not improve.

        Example:
            >>> EarlyStopping(patience=1).update(0.3)
            False
        """
        finite = isinstance(value, numbers.Real) and math.isfinite(value)
        if not finite:
            warnings.warn(
                f"the evaluation metric is undefined ({value!r}); this evaluation counts as no "
                f"improvement (best so far: {self.best!r}, {self.wait + 1} evaluation(s) "
                "without improvement)",
                RuntimeWarning,
                stacklevel=2,
            )
        if finite and improves(value, self.best, mode=self.mode, min_delta=self.min_delta):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        return self.should_stop
