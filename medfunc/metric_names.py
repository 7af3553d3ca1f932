"""The names of the evaluation metrics medfunc computes, and which way each improves.

:data:`METRIC_NAMES` lists what an evaluation reports by itself (``loss``, the classification and
the segmentation metrics of :mod:`medfunc.metrics`); :func:`check_eval_metric` validates
``TrainerConfig.eval_metric`` against them when the config is built, so a misspelled name fails at
once with the closest known name rather than after the first epoch; :func:`default_mode` says
whether a metric improves downwards (losses, distances) or upwards.

Example:
    >>> check_eval_metric("auroc", custom=False)
    'auroc'
    >>> default_mode("hausdorff"), default_mode("dice")
    ('min', 'max')
"""

from __future__ import annotations

import difflib

from medfunc.errors import ConfigError

__all__ = ["LOWER_IS_BETTER", "METRIC_NAMES", "check_eval_metric", "default_mode"]

#: Metric names an evaluation reports without a user function.
METRIC_NAMES = (
    "loss",
    "accuracy",
    "precision",
    "recall",
    "sensitivity",
    "specificity",
    "f1",
    "auroc",
    "auprc",
    "dice",
    "iou",
    "hausdorff",
)

#: Substrings of metric names that improve by going down.
LOWER_IS_BETTER = ("loss", "hausdorff", "error", "distance")


def default_mode(name: str) -> str:
    """``"min"`` for a metric that improves downwards (a loss, a distance), else ``"max"``.

    Args:
        name: the metric name (without an ``eval_`` prefix).

    Returns:
        ``"min"`` or ``"max"``.

    Example:
        >>> default_mode("loss"), default_mode("f1")
        ('min', 'max')
    """
    return "min" if any(part in name for part in LOWER_IS_BETTER) else "max"


def check_eval_metric(name: str, *, custom: bool) -> str:
    """Check that evaluations will report ``name``.

    Args:
        name: ``eval_metric`` with its ``eval_`` / ``eval/`` prefix removed.
        custom: a user metric function is configured (its names are only known at run time,
            so any name is accepted).

    Returns:
        ``name``.

    Raises:
        ConfigError: ``name`` is none of :data:`METRIC_NAMES` and no user function can report
            it (with the closest known name).

    Example:
        >>> check_eval_metric("aucroc", custom=False)
        Traceback (most recent call last):
        ...
        medfunc.errors.ConfigError: TrainerConfig.eval_metric='aucroc' is not a metric ...
    """
    if custom or name in METRIC_NAMES:
        return name
    close = difflib.get_close_matches(name.lower(), METRIC_NAMES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"TrainerConfig.eval_metric={name!r} is not a metric an evaluation reports; {hint}"
        f"the metrics are {', '.join(METRIC_NAMES)} (classification or segmentation, as the "
        "model's outputs allow), or a name returned by eval_compute_metrics / eval_set_metrics"
    )
