"""What a training loop keeps track of: metric sums, its position and its result.

:class:`StepMetricSums` adds up the metrics of ``mf.train_step`` on the device between log points,
so logging costs one host transfer per interval, never one per step (no host sync in the loop).
:class:`LoopPosition` is where the loop stands (epoch, micro-batch, optimizer step) with its
:class:`~medfunc.early_stopping.EarlyStopping` state: what a checkpoint's ``trainer_state`` holds
so that a resumed run continues exactly. :func:`check_skipped_run` stops a run whose updates keep
being skipped for non-finite gradients. :class:`TrainResult` is what a run produced.

Example:
    >>> from medfunc.recipes.breast_cancer import MLPClassifier  # returns {"logits", "loss"}
    >>> state = mf.init_state(MLPClassifier(in_features=4), mf.optim.adamw(1e-3))
    >>> batch = {"features": torch.randn(8, 4), "labels": torch.randint(0, 2, (8,))}
    >>> sums = StepMetricSums(torch.device("cpu"))
    >>> for _ in range(4):
    ...     state, metrics = mf.train_step(state, batch, donate=True)
    ...     sums.record(metrics)
    >>> scalars, skipped_run = sums.flush()
    >>> scalars
    {'train/loss': 0.69..., 'train/lr': 0.001, 'train/grad_norm': 0.50...,
     'train/skipped_steps': 0.0}
    >>> skipped_run
    0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medfunc.early_stopping import EarlyStopping
from medfunc.errors import NonFiniteError

__all__ = ["LoopPosition", "StepMetricSums", "TrainResult", "check_skipped_run"]


class StepMetricSums:
    """Interval sums of the step metrics, kept on the device.

    Per interval: the mean ``train/loss`` of the steps, the mean ``train/grad_norm`` of the
    applied (not skipped) steps, the ``train/lr`` of the last step, the number of
    ``train/skipped_steps`` and, with fp16 loss scaling, the last ``train/loss_scale``. The run of
    consecutive skipped steps carries over from one interval to the next.

    Args:
        device: where the sums live (the state's device).

    Example:
        >>> sums = StepMetricSums(torch.device("cpu"))
        >>> sums.record({"loss": torch.tensor(2.0), "grad_norm": torch.tensor(1.0),
        ...              "lr": torch.tensor(0.1), "skipped": torch.tensor(0)})
        >>> sums.flush()[0]["train/loss"]
        2.0
    """

    def __init__(self, device: torch.device) -> None:
        zeros = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.loss_sum, self.norm_sum, self.good, self.skipped = zeros(), zeros(), zeros(), zeros()
        self.run, self.max_run, self.lr = zeros(), zeros(), zeros()
        self.loss_scale: torch.Tensor | None = None
        self.steps = 0

    def record(self, metrics: Mapping[str, torch.Tensor]) -> None:
        """Add one optimizer step's metrics (``loss``, ``grad_norm``, ``lr``, ``skipped``)."""
        skipped = metrics["skipped"].to(torch.float64)
        self.loss_sum.add_(metrics["loss"].to(torch.float64))
        self.norm_sum.add_(torch.where(skipped > 0, 0.0, metrics["grad_norm"].double()))
        self.good.add_(1.0 - skipped)
        self.skipped.add_(skipped)
        self.run.add_(1.0).mul_(skipped)
        torch.maximum(self.max_run, self.run, out=self.max_run)
        self.lr.copy_(metrics["lr"])
        if "loss_scale" in metrics:
            self.loss_scale = metrics["loss_scale"].detach().clone()
        self.steps += 1

    def flush(self) -> tuple[dict[str, float], int]:
        """The interval's scalars (one device sync), then a new interval.

        Returns:
            ``(scalars, skipped_run)``: ``"train/..."`` name -> float, and the longest run of
            consecutive skipped steps that reached into this interval.
        """
        values = [self.loss_sum, self.norm_sum, self.good, self.skipped, self.max_run, self.lr]
        if self.loss_scale is not None:
            values.append(self.loss_scale.to(self.lr.device, torch.float64))
        numbers = torch.stack(values).tolist()
        loss_sum, norm_sum, good, skipped, max_run, lr = numbers[:6]
        scalars = {
            "train/loss": loss_sum / max(self.steps, 1),
            "train/lr": lr,
            "train/grad_norm": norm_sum / good if good else float("nan"),
            "train/skipped_steps": skipped,
        }
        if self.loss_scale is not None:
            scalars["train/loss_scale"] = numbers[6]
        for total in (self.loss_sum, self.norm_sum, self.good, self.skipped, self.max_run):
            total.zero_()
        self.steps = 0
        return scalars, int(max_run)


def check_skipped_run(skipped_run: int, limit: int | None, step: int) -> None:
    """Raise when ``limit`` or more optimizer steps in a row were skipped.

    Args:
        skipped_run: the longest run of consecutive skipped steps (from
            :meth:`StepMetricSums.flush`).
        limit: ``TrainerConfig.max_consecutive_skipped_steps``; None never raises.
        step: the last optimizer step, for the message.

    Raises:
        NonFiniteError: ``skipped_run >= limit``.

    Example:
        >>> check_skipped_run(2, limit=100, step=50)  # fine
        >>> check_skipped_run(100, limit=100, step=250)
        Traceback (most recent call last):
        ...
        medfunc.errors.NonFiniteError: 100 consecutive optimizer steps (up to step 250) had ...
    """
    if limit is not None and skipped_run >= limit:
        raise NonFiniteError(
            f"{skipped_run} consecutive optimizer steps (up to step {step}) had non-finite "
            "gradients and were skipped (max_consecutive_skipped_steps="
            f"{limit}); lower the learning rate, check the data for NaN/inf values, or use "
            "amp_dtype=bfloat16"
        )


@dataclasses.dataclass
class LoopPosition:
    """Where the training loop stands, with its early-stopping state.

    Attributes:
        stopping: the best metric and the evaluations since it improved.
        epoch: the current epoch (0-based; the number of epochs completed at an epoch's end).
        batch_index: micro-batches consumed in the current epoch.
        global_step: optimizer steps taken (skipped non-finite steps included).
        last_eval_step: the ``global_step`` of the last evaluation (-1: none yet).
        best_checkpoint: the file name of the checkpoint holding the best evaluation's state
            (None while no checkpoint holds it).
        best_step: the ``global_step`` of the best evaluation (None before one).
        best_epoch: the epoch of the best evaluation (None before one).
        best_metrics: the best evaluation's metrics.
        best_pending: the best evaluation's state is not in a checkpoint yet (not saved).

    Example:
        >>> position = LoopPosition(EarlyStopping(patience=3))
        >>> saved = position.to_trainer_state("loss", run=None)
        >>> LoopPosition.from_trainer_state(saved, EarlyStopping(patience=3)) == position
        True
    """

    stopping: EarlyStopping
    epoch: int = 0
    batch_index: int = 0
    global_step: int = 0
    last_eval_step: int = -1
    best_checkpoint: str | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    best_pending: bool = False

    def record_best(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Note that the evaluation just made at ``global_step`` is the best so far.

        Args:
            epoch: the evaluation's epoch.
            metrics: its metrics.
        """
        self.best_step, self.best_epoch = self.global_step, epoch
        self.best_metrics = dict(metrics)
        self.best_checkpoint, self.best_pending = None, True

    def to_trainer_state(self, eval_metric: str, run: Mapping[str, Any] | None) -> dict[str, Any]:
        """The entries a checkpoint's ``trainer_state`` holds about the loop.

        Args:
            eval_metric: the metric early stopping follows.
            run: JSON-able facts about the run (stored under ``"run"`` when given).

        Returns:
            ``epoch``, ``batch_index``, ``loop_step``, ``best_metric``, ``patience_counter``,
            ``last_eval_step``, ``eval_metric``, ``best_checkpoint``, ``best_step``,
            ``best_epoch``, ``best_metrics`` (and ``run``).
        """
        extra = {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "loop_step": self.global_step,
            "best_metric": self.stopping.best,
            "patience_counter": self.stopping.wait,
            "last_eval_step": self.last_eval_step,
            "eval_metric": eval_metric,
            "best_checkpoint": self.best_checkpoint,
            "best_step": self.best_step,
            "best_epoch": self.best_epoch,
            "best_metrics": dict(self.best_metrics),
        }
        if run:
            extra["run"] = dict(run)
        return extra

    @classmethod
    def from_trainer_state(cls, saved: Mapping[str, Any], stopping: EarlyStopping) -> LoopPosition:
        """The position a checkpoint's ``trainer_state`` recorded.

        Args:
            saved: the ``trainer_state`` (missing entries mean the start of training).
            stopping: the configured early stopping; its best value and wait are restored.

        Returns:
            The restored position.
        """
        return cls(
            stopping=dataclasses.replace(
                stopping,
                best=saved.get("best_metric"),
                wait=int(saved.get("patience_counter", 0)),
            ),
            epoch=int(saved.get("epoch", 0)),
            batch_index=int(saved.get("batch_index", 0)),
            global_step=int(saved.get("loop_step", saved.get("global_step", 0))),
            last_eval_step=int(saved.get("last_eval_step", -1)),
            best_checkpoint=saved.get("best_checkpoint"),
            best_step=saved.get("best_step"),
            best_epoch=saved.get("best_epoch"),
            best_metrics=dict(saved.get("best_metrics") or {}),
        )


@dataclasses.dataclass
class TrainResult:
    """What :meth:`~medfunc.trainer.MedicalModelTrainer.train` produced.

    Attributes:
        output_dir: the run folder.
        global_step: optimizer steps taken (skipped non-finite steps included).
        epochs_completed: epochs run to their end.
        stopped_early: early stopping ended the run.
        best_metric: the best value of ``eval_metric`` seen, or None without evaluation.
        eval_metrics: the final model's metrics: the best evaluation's when the best model was
            loaded at the end (``loaded_best``), else the last evaluation's (``{}`` without
            evaluation).
        history: every evaluation as ``{"epoch", "step", **metrics}``.
        checkpoints: checkpoint files written, in order.
        weights_path: ``{output_dir}/model.safetensors`` (None on ranks other than 0).
        exports: export format -> written file.
        export_errors: export format -> why it failed (the run's other outputs are kept).
        best_checkpoint: the checkpoint holding the best evaluation's state, or None.
        best_step: the optimizer step of the best evaluation, or None.
        best_epoch: the epoch of the best evaluation, or None.
        loaded_best: the final weights, exports and ``eval_metrics`` are the best checkpoint's
            (``load_best_model_at_end``), not the last step's.
    """

    output_dir: Path
    global_step: int = 0
    epochs_completed: int = 0
    stopped_early: bool = False
    best_metric: float | None = None
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    checkpoints: list[Path] = dataclasses.field(default_factory=list)
    weights_path: Path | None = None
    exports: dict[str, Path] = dataclasses.field(default_factory=dict)
    export_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    best_checkpoint: Path | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    loaded_best: bool = False
