"""The best checkpoint of a run: which checkpoint holds the best evaluation, and the final model.

With ``load_best_model_at_end`` every evaluation that improves ``eval_metric`` is checkpointed
(at once, off the saving cadence if need be). :class:`BestCheckpoint` keeps the bookkeeping:
:meth:`~BestCheckpoint.claim` marks the checkpoint being written as the best,
:meth:`~BestCheckpoint.written` records it in ``best.json`` and deletes the previous best when it
was written only for being the best, and :meth:`~BestCheckpoint.final_state` gives the state the
run ends with (the best checkpoint's, or the last step's).

Example::

    best = BestCheckpoint(Path("runs/demo"), "auroc", keep=True)
    if best.wanted(position):               # the evaluation just made is the best so far
        is_best = best.claim(position, "checkpoint-step40.pt")
        ...                                 # write the checkpoint
        best.written(position, path, forced=True, saved=saved)
    state = best.final_state(state, position, result, sharded=False)
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from medfunc import distributed
from medfunc.checkpoint import read_checkpoint, restore_state
from medfunc.run_folder import best_record, write_best
from medfunc.state import TrainState
from medfunc.tracking import LoopPosition, TrainResult

__all__ = ["BestCheckpoint"]

log = logging.getLogger("medfunc.trainer")


@dataclasses.dataclass
class BestCheckpoint:
    """The best-checkpoint bookkeeping of one run.

    Attributes:
        output_dir: the run folder.
        eval_metric: the metric that defines "best".
        keep: ``load_best_model_at_end`` is in effect (an evaluation set is given).
        resume_from: the checkpoint the run resumed from (its folder may hold the best one).
        forced: the best checkpoint when it was written only because it was the best.
    """

    output_dir: Path
    eval_metric: str
    keep: bool = False
    resume_from: str | None = None
    forced: Path | None = None

    def wanted(self, position: LoopPosition) -> bool:
        """True when the evaluation just made is the best and must be checkpointed now."""
        return self.keep and position.best_pending

    def claim(self, position: LoopPosition, name: str) -> bool:
        """Note, before checkpoint ``name`` is written, whether it holds the best evaluation.

        Args:
            position: the loop position (its ``best_checkpoint`` becomes ``name``).
            name: the checkpoint's file name.

        Returns:
            True when the checkpoint holds the best evaluation's state.
        """
        if not position.best_pending:
            return False
        position.best_checkpoint, position.best_pending = name, False
        return True

    def written(
        self, position: LoopPosition, path: Path, *, forced: bool, saved: list[Path]
    ) -> None:
        """Record the best checkpoint just written (main process): ``best.json``, superseded files.

        Args:
            position: the loop position holding the best evaluation.
            path: the checkpoint written.
            forced: it was written only because it holds the best evaluation.
            saved: the run folder's checkpoints (a superseded forced best is removed from it).
        """
        write_best(self.output_dir, best_record(position, self.eval_metric))
        previous, self.forced = self.forced, path if forced else None
        if previous is not None and previous != path and previous in saved:
            previous.unlink(missing_ok=True)
            saved.remove(previous)

    def path(self, position: LoopPosition) -> Path | None:
        """The best checkpoint's file (in the resumed run's folder if it is not in this one)."""
        if position.best_checkpoint is None:
            return None
        path = self.output_dir / position.best_checkpoint
        if not path.is_file() and self.resume_from:
            path = Path(self.resume_from).parent / position.best_checkpoint
        return path

    def final_state(
        self, state: TrainState, position: LoopPosition, result: TrainResult, *, sharded: bool
    ) -> TrainState:
        """The state the run ends with: the best checkpoint's when ``keep``, else ``state``.

        Fills in ``result``'s ``best_step``, ``best_epoch``, ``best_checkpoint`` and, when the
        best model is loaded, ``loaded_best`` and ``eval_metrics``.

        Args:
            state: the last step's state.
            position: the loop position at the end.
            result: the run's result.
            sharded: the state is FSDP/DeepSpeed-sharded (loaded with ``distributed.load_full``).

        Returns:
            The final state.
        """
        result.best_step, result.best_epoch = position.best_step, position.best_epoch
        path = result.best_checkpoint = self.path(position)
        if path is None or not self.keep:
            return state
        result.loaded_best, result.eval_metrics = True, dict(position.best_metrics)
        if distributed.is_main_process():
            log.info(
                "the final model is the best evaluation's (epoch %d, step %d): %s",
                position.best_epoch,
                position.best_step,
                path,
            )
        if position.best_step == position.global_step:
            return state
        if sharded:
            return distributed.load_full(path, like=state)
        return restore_state(read_checkpoint(path), like=state)
