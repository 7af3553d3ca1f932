"""Metric sinks: a JSON-lines file, TensorBoard, Weights & Biases, a progress bar and the console.

One :class:`MetricLogger` fans each ``log(scalars, step)`` call out to every enabled sink. Only
the main process (rank 0) writes anything; on the other ranks every method is a no-op, so a
training loop can call the logger unconditionally. TensorBoard and W&B are optional packages,
imported only when enabled; W&B starts its run on the first ``log`` call, so a run that fails
before its first metric leaves no empty W&B run behind.

The console lines of a run (epoch summaries, evaluation results, "resumed from ...", progress
lines without a terminal) go through :meth:`MetricLogger.info` and :meth:`MetricLogger.warning`:
they are ``medfunc.trainer`` log records when the program has configured logging to show them,
and printed otherwise (above a progress bar, with ``tqdm.write``), so a script or notebook that
never configured logging still sees them. ``log_level="warning"`` keeps only the warnings.

Example:
    >>> with create_logger("runs/demo", enable_tensorboard=True, progress=False) as logger:
    ...     for step in range(1, 101):
    ...         logger.log({"train/loss": 1.0 / step, "train/lr": 1e-3}, step=step)
    ...         logger.progress_update(1, loss=1.0 / step)
    >>> sorted(path.name for path in logger.output_dir.iterdir())
    ['metrics.jsonl', 'tb_logs']
    >>> print(logger.metrics_path.read_text().splitlines()[-1])
    {"step": 100, "time": ..., "train/loss": 0.01, "train/lr": 0.001}
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medfunc.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
TB_SUBDIR = "tb_logs"
#: ``log_level`` names: the least severe console line still shown.
LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_log = logging.getLogger("medfunc.trainer")


def write_line(message: str, file: Any = None) -> None:
    """Write one line to ``file`` (default stdout) without breaking an open progress bar.

    With tqdm installed the line goes through ``tqdm.write``, which clears the bars on the
    terminal, writes the line and redraws them, so neither overwrites the other.

    Args:
        message: the line (no trailing newline).
        file: a text stream; default ``sys.stdout``.

    Example:
        >>> write_line("epoch 1/3 done")
        epoch 1/3 done
    """
    file = sys.stdout if file is None else file
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, file=file, flush=True)
        return
    tqdm.write(message, file=file)
    file.flush()


def console(level: int, message: str) -> None:
    """Show ``message``: a ``medfunc.trainer`` record when logging shows it, else printed.

    A record is emitted when the ``medfunc.trainer`` logger has a handler (the program's own,
    the ``medfunc`` command's, pytest's) and is enabled for ``level``; otherwise the line is
    printed (INFO to stdout, WARNING and above to stderr) with :func:`write_line`.

    Args:
        level: a ``logging`` level.
        message: the line.

    Example:
        >>> console(logging.INFO, "resumed from run/checkpoint-epoch1.pt")
        resumed from run/checkpoint-epoch1.pt
    """
    if _log.hasHandlers() and _log.isEnabledFor(level):
        _log.log(level, "%s", message)
    else:
        write_line(message, sys.stdout if level < logging.WARNING else sys.stderr)


class ConsoleHandler(logging.Handler):
    """A logging handler writing each record as one line with :func:`write_line` (stderr).

    Lines do not overwrite a tqdm progress bar on the same terminal. The ``medfunc`` command
    installs one on the ``medfunc`` logger.

    Example:
        >>> handler = ConsoleHandler()
        >>> handler.setFormatter(logging.Formatter("%(message)s"))
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record), sys.stderr)
        except Exception:
            self.handleError(record)


def _to_float(name: str, value: Any) -> float:
    """Convert a Python number or a one-element tensor to ``float``; name the key when it fails."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"metric {name!r} must be a number or a one-element tensor, got "
            f"{type(value).__name__}: {err}"
        ) from err


def _json_number(value: float) -> float | str:
    """JSON has no NaN/Infinity literals; write them as the strings ``"nan"``, ``"inf"``."""
    return value if math.isfinite(value) else str(value)


class MetricLogger:
    """Fan scalar metrics out to the enabled sinks (use :func:`create_logger` to build one).

    Args:
        output_dir: folder of ``metrics.jsonl`` (and the default TensorBoard/W&B folders).
        tb_writer: a ``SummaryWriter`` or ``None``.
        wandb_module: the imported ``wandb`` module when W&B is enabled, else ``None``.
        wandb_init_kwargs: keyword arguments for ``wandb.init`` on the first ``log`` call.
        progress_bar: a ``tqdm`` bar or ``None``.
        is_main_process: ``False`` makes every method a no-op.
        log_level: ``"info"`` shows every console line, ``"warning"`` only warnings,
            ``"error"`` none (see :data:`LOG_LEVELS`).
        progress_lines: without a bar, print a progress line (step, loss, LR, steps/s) each
            time :meth:`progress_update` is given a loss: for logs without a terminal.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        tb_writer: Any = None,
        wandb_module: Any = None,
        wandb_init_kwargs: Mapping[str, Any] | None = None,
        progress_bar: Any = None,
        is_main_process: bool = True,
        log_level: str = "info",
        progress_lines: bool = False,
        total_steps: int | None = None,
    ) -> None:
        if log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {sorted(LOG_LEVELS)}, got {log_level!r}")
        self.output_dir = Path(output_dir)
        self.is_main_process = is_main_process
        self.level = LOG_LEVELS[log_level]
        self._lines = progress_lines and progress_bar is None
        self._total = total_steps
        self._done = 0
        self._mark = (0, time.perf_counter())
        self._epoch_started = time.perf_counter()
        self._last_loss: tuple[float, int] | None = None
        self.metrics_path = self.output_dir / METRICS_FILE
        self._tb = tb_writer
        self._wandb = wandb_module
        self._wandb_kwargs = dict(wandb_init_kwargs or {})
        self._wandb_run: Any = None
        self._bar = progress_bar
        self._postfix: dict[str, str] = {}
        self._file = None
        self._closed = False
        if is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.metrics_path, "a", encoding="utf-8")

    @property
    def wandb_run(self) -> Any:
        """The W&B run once the first ``log`` call started it, else ``None``."""
        return self._wandb_run

    def log(self, scalars: Mapping[str, Any], step: int) -> None:
        """Record scalar metrics at ``step`` in every sink.

        Args:
            scalars: name -> value, names like ``"train/loss"``, ``"eval/auroc"``; values are
                Python numbers or one-element tensors (converted with ``float``, which waits for
                the device: call this every ``log_every`` steps, not every step).
            step: the global step the values belong to.

        Example:
            >>> logger = create_logger("runs/demo", progress=False)
            >>> logger.log({"train/loss": torch.tensor(0.25), "train/lr": 3e-4}, step=50)
            >>> logger.log({"train/loss": float("nan")}, step=60)
            >>> logger.close()
            >>> print(logger.metrics_path.read_text(), end="")
            {"step": 50, "time": ..., "train/loss": 0.25, "train/lr": 0.0003}
            {"step": 60, "time": ..., "train/loss": "nan"}
        """
        if not self.is_main_process:
            return
        if self._closed:
            raise ConfigError("MetricLogger.log() called after close(); create a new logger")
        values = {str(k): _to_float(str(k), v) for k, v in scalars.items()}
        step = int(step)
        if "train/loss" in values:
            self._last_loss = (values["train/loss"], step)
        record = {"step": step, "time": time.time()}
        record.update({k: _json_number(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            if self._wandb_run is None:
                self._wandb_run = self._wandb.init(**self._wandb_kwargs)
            self._wandb_run.log(values, step=step)

    def progress_update(self, n: int = 1, **postfix: Any) -> None:
        """Advance the progress bar by ``n`` steps and show ``postfix`` values beside it.

        A key keeps its last shown value until a later call passes it again.

        Args:
            n: steps done since the last call.
            **postfix: values to display, e.g. ``loss=0.31, lr=1e-3, throughput=812.0``
                (numbers and one-element tensors are shown with 4 significant digits).

        Example:
            >>> with create_logger("runs/demo", progress=True, total_steps=100) as logger:
            ...     logger.progress_update(10, loss=torch.tensor(0.4213), lr=1e-3)
        """
        self._done += n
        if postfix:
            for key, value in postfix.items():
                try:
                    self._postfix[key] = f"{float(value):.4g}"
                except (TypeError, ValueError, RuntimeError):
                    self._postfix[key] = str(value)
            if self._bar is not None:
                self._bar.set_postfix(self._postfix, refresh=False)
            elif self._lines and "loss" in postfix:
                self._progress_line()
        if self._bar is not None:
            self._bar.update(n)

    def progress_start(self, step: int) -> None:
        """Start the progress display at ``step`` (a resumed run): the bar and the step count.

        The steps before ``step`` do not count towards the steps/s of the progress lines.

        Args:
            step: optimizer steps already done.
        """
        self._done = step
        self._mark = (step, time.perf_counter())
        if self._bar is not None:
            self._bar.update(step)

    def _progress_line(self) -> None:
        now = time.perf_counter()
        steps, since = self._done - self._mark[0], now - self._mark[1]
        self._mark = (self._done, now)
        total = f"/{self._total}" if self._total else ""
        shown = " ".join(f"{k}={v}" for k, v in self._postfix.items())
        rate = f" {steps / since:.2f} steps/s" if since > 0 and steps else ""
        self.info(f"step {self._done}{total} {shown}{rate}")

    def info(self, message: str) -> None:
        """Show a console line of the run (see the module docstring), at INFO level.

        Args:
            message: the line, e.g. ``"epoch 2/5 done: step 30, train loss 0.3121, 1.2 s"``.

        Example:
            >>> with create_logger("runs/demo", progress=False) as logger:
            ...     logger.info("resumed from runs/demo/checkpoint-epoch1.pt")
            resumed from runs/demo/checkpoint-epoch1.pt
        """
        if self.is_main_process and self.level <= logging.INFO:
            console(logging.INFO, message)

    def warning(self, message: str) -> None:
        """Show a warning of the run (``log_level="error"`` hides it).

        Args:
            message: the warning.
        """
        if self.is_main_process and self.level <= logging.WARNING:
            console(logging.WARNING, message)

    def epoch_done(self, epoch: int, num_epochs: int, step: int) -> None:
        """Show the summary line of epoch ``epoch`` (1-based): step, last logged loss, time.

        Args:
            epoch: the epoch just finished.
            num_epochs: the run's epochs.
            step: the global optimizer step.

        Example:
            >>> with create_logger("runs/demo", progress=False) as logger:
            ...     logger.log({"train/loss": 0.25}, step=10)
            ...     logger.epoch_done(1, 3, step=10)
            epoch 1/3 done: step 10, train loss 0.2500 (logged at step 10), ... s
        """
        now = time.perf_counter()
        loss = ""
        if self._last_loss is not None:
            loss = f", train loss {self._last_loss[0]:.4f} (logged at step {self._last_loss[1]})"
        self.info(
            f"epoch {epoch}/{num_epochs} done: step {step}{loss}, {now - self._epoch_started:.1f} s"
        )
        self._epoch_started = now

    def close(self) -> None:
        """Flush and close every sink (safe to call more than once)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _tensorboard_writer(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            "enable_tensorboard=True needs the tensorboard package, which is not installed: "
            "run `pip install medfunc[tensorboard]` or set enable_tensorboard=False"
        ) from err
    return SummaryWriter(log_dir=str(log_dir))


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(
            "enable_wandb=True needs the wandb package, which is not installed: "
            "run `pip install medfunc[wandb]` or set enable_wandb=False"
        ) from err
    return wandb


def _progress_bar(progress: bool | None, total_steps: int | None) -> Any:
    enabled = sys.stderr.isatty() if progress is None else progress
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        if progress is None:
            return None
        raise ConfigError(
            "progress=True needs the tqdm package, which is not installed: "
            "run `pip install medfunc[demo]` or pass progress=False"
        ) from err
    return tqdm(total=total_steps, unit="step", dynamic_ncols=True)


def create_logger(
    output_dir: str | Path,
    *,
    enable_tensorboard: bool = False,
    tb_log_dir: str | Path | None = None,
    enable_wandb: bool = False,
    wandb_project: str | None = None,
    wandb_run_name: str | None = None,
    run_config: Mapping[str, Any] | None = None,
    is_main_process: bool = True,
    progress: bool | None = None,
    total_steps: int | None = None,
    log_level: str = "info",
) -> MetricLogger:
    """Build a :class:`MetricLogger` with the requested sinks.

    ``{output_dir}/metrics.jsonl`` is always written (appended to, so a resumed run continues
    the same file), one JSON object per ``log`` call: ``{"step", "time", **scalars}``.

    Args:
        output_dir: the run folder.
        enable_tensorboard: write TensorBoard scalars (needs ``medfunc[tensorboard]``).
        tb_log_dir: TensorBoard folder; default ``{output_dir}/tb_logs``.
        enable_wandb: log to Weights & Biases (needs ``medfunc[wandb]``); the run starts on the
            first ``log`` call; ``WANDB_MODE=offline`` keeps it on disk.
        wandb_project: the W&B project.
        wandb_run_name: the W&B run name.
        run_config: the run's configuration, stored as the W&B run config.
        is_main_process: ``False`` on ranks other than 0: the logger writes nothing and does not
            even import the optional packages.
        progress: show a progress bar; ``None`` shows it only when stderr is a terminal, and
            prints a progress line (step, loss, LR, steps/s) at each logged loss otherwise
            (nohup, Slurm); ``False`` shows neither.
        total_steps: the bar's total, if known.
        log_level: the console lines shown: ``"info"`` (all), ``"warning"`` or ``"error"``.

    Returns:
        The logger; close it (or use it as a context manager) to flush the sinks.

    Raises:
        ConfigError: a requested sink's package is not installed.

    Example:
        >>> logger = create_logger("runs/demo", enable_wandb=True, wandb_project="medfunc")
        >>> logger.wandb_run is None  # W&B starts on the first log() call
        True
        >>> logger.close()
    """
    output_dir = Path(output_dir)
    if not is_main_process:
        return MetricLogger(output_dir, is_main_process=False, log_level=log_level)
    wandb_module = None
    wandb_kwargs: dict[str, Any] = {}
    if enable_wandb:
        wandb_module = _import_wandb()
        wandb_kwargs = {
            "project": wandb_project,
            "name": wandb_run_name,
            "config": dict(run_config) if run_config is not None else None,
            "dir": str(output_dir),
        }
    tb_writer = None
    if enable_tensorboard:
        tb_writer = _tensorboard_writer(Path(tb_log_dir) if tb_log_dir else output_dir / TB_SUBDIR)
    return MetricLogger(
        output_dir,
        tb_writer=tb_writer,
        wandb_module=wandb_module,
        wandb_init_kwargs=wandb_kwargs,
        progress_bar=_progress_bar(progress, total_steps),
        is_main_process=True,
        log_level=log_level,
        progress_lines=progress is None and not sys.stderr.isatty(),
        total_steps=total_steps,
    )
