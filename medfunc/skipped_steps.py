"""Make skipped optimizer steps visible: per-epoch counts, the no-update check, a loss-scale floor.

A step whose gradients are non-finite applies no update (it is *skipped*, as
``torch.amp.GradScaler`` does). A few skips are normal while fp16 loss scaling calibrates; an epoch
in which every step was skipped trained nothing, and a loss scale driven far below 1 by a burst of
non-finite batches stalls training silently. This module counts the skips on the device (no host
sync in the step) and checks the counts at the host points the loop already has: the end of an
epoch (:class:`EpochUpdates`, :func:`check_epoch_updates`) and the logging points
(:class:`LossScaleWatch`).

Example:
    >>> counts = EpochUpdates(torch.device("cpu"))
    >>> for skipped in (1, 0, 0):
    ...     counts.record({"skipped": torch.tensor(skipped)})
    >>> counts.take()
    (3, 1)
    >>> check_epoch_updates(1, steps=3, skipped=1, allow_no_update=False, precision="fp32")
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from medfunc.errors import NonFiniteError

__all__ = ["LOSS_SCALE_FLOOR", "EpochUpdates", "LossScaleWatch", "check_epoch_updates"]

log = logging.getLogger("medfunc.trainer")

#: an fp16 loss scale below this means the gradients were non-finite many times in a row
#: (GradScaler starts at 65536 and halves the scale on each skipped step: 17 halvings reach 0.5)
LOSS_SCALE_FLOOR = 1.0
#: in fp16, skipping at most this fraction of an epoch's steps is loss-scale calibration
FP16_NORMAL_SKIP_FRACTION = 0.1


class EpochUpdates:
    """The number of optimizer steps of the current epoch and how many were skipped.

    The skip count is a device tensor added to after every step (no sync); :meth:`take` reads it
    once, at the epoch's end.

    Args:
        device: where the count lives (the state's device).
    """

    def __init__(self, device: torch.device) -> None:
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = 0

    def record(self, metrics: Mapping[str, torch.Tensor]) -> None:
        """Count one optimizer step (``metrics["skipped"]``: 1 when its update was skipped)."""
        self.skipped.add_(metrics["skipped"].to(torch.int64))
        self.steps += 1

    def take(self) -> tuple[int, int]:
        """The epoch's ``(steps, skipped)`` (one device sync); the counts restart at zero.

        Returns:
            Optimizer steps recorded and how many of them were skipped.
        """
        counts = (self.steps, int(self.skipped))
        self.skipped.zero_()
        self.steps = 0
        return counts

    def to_list(self) -> list[int]:
        """``[steps, skipped]`` so far, for a checkpoint (one device sync)."""
        return [self.steps, int(self.skipped)]

    def restore(self, saved: list[int] | None) -> None:
        """Continue the counts a checkpoint recorded (:meth:`to_list`); None: from zero."""
        steps, skipped = saved or (0, 0)
        self.steps = int(steps)
        self.skipped.fill_(int(skipped))


def check_epoch_updates(
    epoch: int, *, steps: int, skipped: int, allow_no_update: bool, precision: str
) -> None:
    """Report the skipped steps of an epoch; an epoch that applied no update is an error.

    Args:
        epoch: the epoch (1-based), for the messages.
        steps: its optimizer steps.
        skipped: how many of them were skipped (non-finite gradients).
        allow_no_update: ``TrainerConfig.allow_no_update_epochs``: only warn when nothing was
            applied.
        precision: ``"fp16"`` tolerates a few skips (loss-scale calibration: logged as info).

    Raises:
        NonFiniteError: every step of the epoch was skipped and ``allow_no_update`` is False.

    Example:
        >>> check_epoch_updates(2, steps=32, skipped=32, allow_no_update=False, precision="fp32")
        Traceback (most recent call last):
        ...
        medfunc.errors.NonFiniteError: epoch 2 applied no update: all 32 of its optimizer steps ...
    """
    if not skipped:
        return
    if skipped == steps:
        message = (
            f"epoch {epoch} applied no update: all {steps} of its optimizer steps had "
            "non-finite gradients and were skipped. Check the data for NaN/inf values, lower "
            "the learning rate, or use amp_dtype=bfloat16"
        )
        if not allow_no_update:
            raise NonFiniteError(message + " (allow_no_update_epochs=True continues anyway)")
        log.warning("%s", message)
        return
    calibrating = precision == "fp16" and skipped <= FP16_NORMAL_SKIP_FRACTION * steps
    log.log(
        logging.INFO if calibrating else logging.WARNING,
        "epoch %d: %d of %d optimizer steps were skipped (non-finite gradients)%s",
        epoch,
        skipped,
        steps,
        " while the fp16 loss scale calibrated" if calibrating else "",
    )


class LossScaleWatch:
    """Warn once when the fp16 loss scale falls below :data:`LOSS_SCALE_FLOOR`.

    Args:
        floor: the scale below which to warn.
    """

    def __init__(self, floor: float = LOSS_SCALE_FLOOR) -> None:
        self.floor = floor
        self.warned = False

    def check(self, scale: float | None, step: int) -> None:
        """Look at the loss scale logged at ``step`` (None without fp16 loss scaling).

        Args:
            scale: the current loss scale.
            step: the optimizer step, for the message.
        """
        if scale is None or self.warned or scale >= self.floor:
            return
        self.warned = True
        log.warning(
            "the fp16 loss scale fell to %.3g at step %d (below %g): the gradients were "
            "non-finite step after step, and each skipped step halved the scale. Most likely "
            "some batches hold NaN/inf values, the loss overflows float16, or the learning rate "
            "diverged; updates this small barely train. Check the data, lower the learning "
            "rate, or use amp_dtype=bfloat16",
            scale,
            step,
            self.floor,
        )
