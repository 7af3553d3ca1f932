"""Stop a training loop cleanly on SIGTERM or SIGINT: finish the step, checkpoint, then exit.

A cluster that preempts a job (Slurm, Kubernetes) sends SIGTERM and kills the job a grace period
later; a user stops a run with Ctrl-C (SIGINT). :class:`PreemptionGuard` replaces the handlers of
both signals for the duration of a training loop with one that only records the signal. The loop
asks :meth:`PreemptionGuard.should_stop` after every optimizer step, writes a checkpoint at that
step boundary and raises :class:`~medfunc.errors.TrainingInterrupted` (built by
:meth:`PreemptionGuard.interrupted`). Further signals are recorded and otherwise ignored, so a
second Ctrl-C cannot break off the checkpoint being written.

In a single process the check reads a Python attribute: no device sync, no collective. Under
torchrun the ranks agree on the step with one all-reduce (max) of the signal number per step, on
the CPU through Gloo (a Gloo side group when the job's backend is NCCL), so the GPU is never
synchronised; every rank then stops after the same step.

Handlers can only be installed from the main thread; elsewhere the guard installs nothing and
never asks to stop. The functional API (``mf.train_step``) installs nothing.

Example::

    with PreemptionGuard() as guard:
        for batch in batches:
            state, metrics = mf.train_step(state, batch, donate=True)
            if guard.should_stop():
                path = mf.save_state(state, "preempted.pt")
                raise guard.interrupted(path, LoopPosition(stopping, global_step=7))
"""

from __future__ import annotations

import os
import signal
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medfunc import distributed
from medfunc.distributed.env import collective_guard
from medfunc.errors import TrainingInterrupted
from medfunc.tracking import LoopPosition

__all__ = ["SIGNALS", "PreemptionGuard", "TrainingInterrupted"]

#: the signals that stop training at the next step boundary
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_Handler = Callable[[int, types.FrameType | None], Any] | int | None
_cpu_groups: dict[int, Any] = {}


class PreemptionGuard:
    """Record SIGTERM / SIGINT while active (a context manager); restore the old handlers after.

    Args:
        announce: write a line on stderr when a signal arrives (rank 0 only, by default).

    Attributes:
        signum: the first signal received, or None.
        received: how many signals arrived.
    """

    def __init__(self, announce: bool | None = None) -> None:
        self.signum: int | None = None
        self.received = 0
        self.announce = distributed.is_main_process() if announce is None else announce
        self._previous: dict[int, _Handler] = {}
        self._group: Any = None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        if distributed.world_size() > 1:
            self._group = _cpu_group()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    @property
    def active(self) -> bool:
        """True while the guard's handlers are installed."""
        return bool(self._previous)

    def _record(self, signum: int, frame: types.FrameType | None) -> None:
        """The signal handler: note the signal; the loop acts on it at the next step boundary."""
        self.received += 1
        if self.signum is None:
            self.signum = signum
        if self.announce:
            name = signal.Signals(signum).name
            text = (
                f"medfunc: {name} received; finishing the current step and saving a checkpoint"
                if self.received == 1
                else f"medfunc: {name} received again; still saving the checkpoint (SIGKILL "
                "stops at once, losing the steps since the last checkpoint)"
            )
            os.write(2, (text + "\n").encode())

    def should_stop(self) -> bool:
        """Whether training should stop after the step just taken (the same on every rank).

        Returns:
            True once a signal arrived (on any rank, under torchrun).
        """
        if self._group is None:
            return self.signum is not None
        vote = torch.tensor([self.signum or 0], dtype=torch.int32)
        with collective_guard("all_reduce of the preemption flag"):
            torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX, group=self._group)
        agreed = int(vote.item())
        if agreed and self.signum is None:
            self.signum = agreed
        return bool(agreed)

    def interrupted(self, checkpoint: Path, position: LoopPosition) -> TrainingInterrupted:
        """The exception to raise once the checkpoint at the step boundary is written.

        Args:
            checkpoint: the checkpoint to resume from.
            position: the loop position it holds.

        Returns:
            A :class:`~medfunc.errors.TrainingInterrupted` whose message says how to resume.
        """
        signum, step = self.signum or signal.SIGINT, position.global_step
        if position.batch_index:
            where = f"step {step}, batch {position.batch_index} of epoch {position.epoch + 1}"
        else:
            where = f"step {step}, the end of epoch {position.epoch}"
        name = signal.Signals(signum).name
        message = (
            f"training interrupted by {name} at {where}; checkpoint {checkpoint} holds it. "
            f"Resume with TrainerConfig(resume_from={str(checkpoint)!r}) "
            f"(medfunc train ... --set resume_from={checkpoint})"
        )
        return TrainingInterrupted(message, checkpoint=checkpoint, signum=signum, step=step)


def _cpu_group() -> Any:
    """A process group whose collectives run on the CPU: the world group itself under Gloo.

    Every rank must call this at the same point (creating a group is a collective).
    """
    dist = torch.distributed
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    key = id(dist.group.WORLD)
    if key not in _cpu_groups:
        _cpu_groups[key] = dist.new_group(backend="gloo")
    return _cpu_groups[key]
