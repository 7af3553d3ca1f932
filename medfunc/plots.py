"""Plot a run's ``metrics.jsonl`` as a PNG: training curves on top, evaluation metrics below.

Uses matplotlib's object API with the Agg canvas, so it never opens a window and does not touch
pyplot's global state.

Example:
    >>> from medfunc.logging import create_logger
    >>> with create_logger("runs/demo", progress=False) as logger:
    ...     for step in range(1, 11):
    ...         logger.log({"train/loss": 1.0 / step, "eval/auroc": 0.5 + step / 40}, step=step)
    >>> png = plot_metrics("runs/demo/metrics.jsonl", "runs/demo/metrics.png")
    >>> png.name, png.is_file()
    ('metrics.png', True)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from medfunc.errors import ConfigError

DEFAULT_TRAIN_KEYS = ("train/loss",)
EVAL_PREFIX = "eval/"


def read_metrics(metrics_jsonl_path: str | Path) -> list[dict[str, float]]:
    """Read a ``metrics.jsonl`` file written by :class:`medfunc.logging.MetricLogger`.

    Args:
        metrics_jsonl_path: the file.

    Returns:
        One dict per line (``"nan"``/``"inf"`` strings become floats).

    Raises:
        ConfigError: the file is missing or a line is not a JSON object with a ``step``.
    """
    path = Path(metrics_jsonl_path)
    if not path.is_file():
        raise ConfigError(f"metrics file {path} does not exist; pass the metrics.jsonl of a run")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number} is not valid JSON ({err})") from err
            if not isinstance(record, dict) or "step" not in record:
                raise ConfigError(f"{path}:{number} is not a metrics record with a 'step' key")
            records.append({k: float(v) if isinstance(v, str) else v for k, v in record.items()})
    return records


def metric_series(records: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """One metric's values ordered by step.

    Args:
        records: records as :func:`read_metrics` returns them.
        key: the metric name.

    Returns:
        ``(steps, values)``; a later record for the same step (a resumed run appending to the
        same file) replaces the earlier one.

    Example:
        >>> records = [{"step": 2, "a": 1.0}, {"step": 1, "a": 3.0}, {"step": 2, "a": 0.5}]
        >>> metric_series(records, "a")
        ([1, 2], [3.0, 0.5])
    """
    by_step = {r["step"]: r[key] for r in records if key in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_metrics(
    metrics_jsonl_path: str | Path, png_path: str | Path, keys: Sequence[str] | None = None
) -> Path:
    """Draw metrics against the step and save the figure as a PNG.

    The top panel shows training keys (``train/...``), the bottom panel every other key
    (evaluation metrics); a panel with nothing to show is left out. Points are ordered by step;
    when the file holds several records of one key at the same step (a resumed run appends to
    the same file), the last one is drawn.

    Args:
        metrics_jsonl_path: a run's ``metrics.jsonl``.
        png_path: where to write the PNG (parent folders are created).
        keys: the metric names to draw; default ``train/loss`` plus every ``eval/...`` key found.

    Returns:
        ``png_path`` as a ``Path``.

    Raises:
        ConfigError: the file is unreadable, holds no records, or a requested key never occurs.

    Example:
        >>> from medfunc.logging import create_logger
        >>> with create_logger("runs/x", progress=False) as logger:
        ...     logger.log({"train/loss": 0.9, "train/lr": 1e-3}, step=1)
        ...     logger.log({"train/loss": 0.6, "train/lr": 1e-3}, step=2)
        >>> plot_metrics("runs/x/metrics.jsonl", "runs/x/plots/loss.png", keys=["train/loss"])
        PosixPath('runs/x/plots/loss.png')
        >>> plot_metrics("runs/x/metrics.jsonl", "runs/x/auroc.png", keys=["eval/auroc"])
        Traceback (most recent call last):
        ...
        medfunc.errors.ConfigError: metric(s) ['eval/auroc'] not found in runs/x/metrics.jsonl; ...
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl_path)
    if not records:
        raise ConfigError(f"metrics file {metrics_jsonl_path} holds no records to plot")
    present = {k for r in records for k in r} - {"step", "time"}
    if keys is None:
        chosen = [k for k in DEFAULT_TRAIN_KEYS if k in present]
        chosen += sorted(k for k in present if k.startswith(EVAL_PREFIX))
    else:
        missing = [k for k in keys if k not in present]
        if missing:
            raise ConfigError(
                f"metric(s) {missing} not found in {metrics_jsonl_path}; "
                f"available: {sorted(present)}"
            )
        chosen = list(keys)
    if not chosen:
        raise ConfigError(
            f"nothing to plot in {metrics_jsonl_path}: no train/loss or eval/ metrics; "
            f"pass keys= from {sorted(present)}"
        )
    panels = [
        ("training", [k for k in chosen if k.startswith("train/")]),
        ("evaluation", [k for k in chosen if not k.startswith("train/")]),
    ]
    panels = [(title, panel_keys) for title, panel_keys in panels if panel_keys]
    figure = Figure(figsize=(8, 3.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (title, panel_keys) in enumerate(panels, start=1):
        axes = figure.add_subplot(len(panels), 1, index)
        for key in panel_keys:
            steps, values = metric_series(records, key)
            marker = "o" if len(steps) < 30 else None
            axes.plot(steps, values, label=key, marker=marker, markersize=3)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best")
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=100)
    return out
