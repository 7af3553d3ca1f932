"""What a training run tells its user before it starts: the resume account and the warnings.

A checkpoint written by :class:`~medfunc.trainer.MedicalModelTrainer` records the settings that
shape the rest of a run (:func:`run_settings`: optimizer, learning rate, batch size, schedule and
its length). On resume, :func:`resume_messages` says where the run continues, names each setting
that differs from the checkpoint's, gives an account of what a checkpoint written by plain
``mf.save_state`` did and did not restore, and says when nothing is left to train.
:func:`cadence_warning` catches a checkpoint cadence that never fires. :func:`current_weights`
tells whether the run folder's ``model.safetensors`` already holds a state's weights, so a run
that trained nothing does not rewrite it.

Example:
    >>> config = TrainerConfig(num_epochs=3, learning_rate=1e-3)
    >>> saved = {"loop_step": 30, "run_settings": run_settings(config, steps_per_epoch=10)}
    >>> resume_differences(saved["run_settings"], run_settings(
    ...     TrainerConfig(num_epochs=6, learning_rate=1e-3), steps_per_epoch=10))
    ['num_epochs 3 -> 6', 'schedule length (optimizer steps) 30 -> 60']
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from medfunc import distributed
from medfunc.logging import MetricLogger
from medfunc.state import TrainState
from medfunc.tracking import LoopPosition
from medfunc.trainer_config import TrainerConfig
from medfunc.weights import weights_state_dict

__all__ = [
    "SETTINGS_KEY",
    "announce_start",
    "cadence_warning",
    "current_weights",
    "nothing_left",
    "resume_differences",
    "resume_messages",
    "run_settings",
    "schedule_length",
]

#: The ``trainer_state`` entry holding :func:`run_settings`.
SETTINGS_KEY = "run_settings"
#: Setting -> how a message names it.
_LABELS = {
    "optimizer": "optimizer",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "scheduler": "scheduler",
    "warmup_steps": "warmup_steps",
    "num_epochs": "num_epochs",
    "schedule_steps": "schedule length (optimizer steps)",
}


def schedule_length(config: TrainerConfig, steps_per_epoch: int | None) -> int | None:
    """The run's length in optimizer steps: ``total_steps``, else epochs times steps per epoch.

    Args:
        config: the options.
        steps_per_epoch: optimizer steps per epoch (None: the data has no length).

    Returns:
        The number of optimizer steps, or None when unknown.

    Example:
        >>> schedule_length(TrainerConfig(num_epochs=4), steps_per_epoch=15)
        60
    """
    if config.total_steps:
        return config.total_steps
    return steps_per_epoch * config.num_epochs if steps_per_epoch else None


def run_settings(config: TrainerConfig, steps_per_epoch: int | None) -> dict[str, Any]:
    """The settings a checkpoint records so that a resume can name what changed.

    Args:
        config: the options.
        steps_per_epoch: optimizer steps per epoch (None: unknown).

    Returns:
        JSON-able values: optimizer, learning_rate, weight_decay, batch_size,
        gradient_accumulation_steps, scheduler, warmup_steps, num_epochs, schedule_steps.

    Example:
        >>> run_settings(TrainerConfig(), steps_per_epoch=5)["schedule_steps"]
        5
    """
    settings = {name: getattr(config, name) for name in _LABELS if name != "schedule_steps"}
    settings["schedule_steps"] = schedule_length(config, steps_per_epoch)
    return settings


def resume_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The settings of ``current`` that differ from the checkpoint's ``saved`` ones.

    Args:
        saved: the checkpoint's :func:`run_settings`.
        current: this run's :func:`run_settings`.

    Returns:
        One ``"name old -> new"`` entry per difference, in a fixed order.

    Example:
        >>> resume_differences({"batch_size": 8, "optimizer": "adamw"},
        ...                    {"batch_size": 16, "optimizer": "sgd"})
        ['optimizer adamw -> sgd', 'batch_size 8 -> 16']
    """
    return [
        f"{label} {saved[name]} -> {current.get(name)}"
        for name, label in _LABELS.items()
        if name in saved and saved[name] != current.get(name)
    ]


def nothing_left(position: LoopPosition, config: TrainerConfig) -> bool:
    """True when a resumed run's position is already at the end of its ``num_epochs``.

    Example:
        >>> from medfunc.early_stopping import EarlyStopping
        >>> nothing_left(LoopPosition(EarlyStopping(), epoch=3), TrainerConfig(num_epochs=3))
        True
    """
    return position.epoch >= config.num_epochs


def _plain_account(path: str, parts: Collection[str], position: LoopPosition) -> str:
    restored = ["the weights"]
    if "optimizer_state" in parts:
        restored.append("the optimizer state")
    if "scaler_state" in parts:
        restored.append("the fp16 loss scale")
    restored.append(
        f"the step counter (step {position.global_step}: the LR schedule continues from it)"
    )
    restored.append("the RNG key")
    missing = (
        "the data position (training starts at the first batch of epoch 1), the early-stopping "
        "and best-model record, and the run settings (no differences can be checked)"
    )
    if "optimizer_state" not in parts:
        missing = "the optimizer state (its moments start from zero), " + missing
    return (
        f"resumed from {path}, a checkpoint written by mf.save_state, not by the Trainer: "
        f"restored {', '.join(restored)}; not restored: {missing}"
    )


def resume_messages(
    path: str,
    trainer_state: Mapping[str, Any],
    parts: Collection[str],
    position: LoopPosition,
    config: TrainerConfig,
    steps_per_epoch: int | None,
) -> tuple[list[str], list[str]]:
    """The lines that tell the user what a resume does.

    Args:
        path: the checkpoint resumed from.
        trainer_state: its ``trainer_state``.
        parts: the payload entries it holds (``"optimizer_state"``, ``"scaler_state"``, ...).
        position: the loop position restored from it.
        config: this run's options.
        steps_per_epoch: this run's optimizer steps per epoch.

    Returns:
        ``(info, warnings)``: the "resumed from ..." account (and "nothing left to train" when
        so), and one warning naming every setting that differs from the checkpoint's.

    Example:
        >>> from medfunc.early_stopping import EarlyStopping
        >>> position = LoopPosition(EarlyStopping(), epoch=1, global_step=5)
        >>> info, warnings = resume_messages(
        ...     "run/checkpoint-epoch1.pt", {"loop_step": 5}, ["optimizer_state"], position,
        ...     TrainerConfig(num_epochs=1), steps_per_epoch=5)
        >>> print("\\n".join(info))
        resumed from run/checkpoint-epoch1.pt at epoch 1, batch 0, step 5
        nothing left to train: the checkpoint is at the end of epoch 1 (step 5) and ...
    """
    if "loop_step" in trainer_state:
        info = [
            f"resumed from {path} at epoch {position.epoch}, batch {position.batch_index}, "
            f"step {position.global_step}"
        ]
    else:
        info = [_plain_account(path, parts, position)]
    if nothing_left(position, config):
        info.append(
            f"nothing left to train: the checkpoint is at the end of epoch {position.epoch} "
            f"(step {position.global_step}) and num_epochs={config.num_epochs}; the model is "
            "evaluated as it is (raise num_epochs to train further)"
        )
    warnings = []
    saved = trainer_state.get(SETTINGS_KEY)
    if isinstance(saved, Mapping):
        changed = resume_differences(saved, run_settings(config, steps_per_epoch))
        if changed:
            warnings.append(
                f"resuming {path} with settings that differ from the checkpoint's: "
                + "; ".join(changed)
                + ". The run continues from the checkpoint's step and optimizer state under "
                "the new settings; use the checkpoint's values to continue it unchanged"
            )
    return info, warnings


def cadence_warning(
    config: TrainerConfig, total_steps: int | None, start: LoopPosition
) -> str | None:
    """A warning when no checkpoint of the saving cadence falls within the run.

    Args:
        config: the options (``save_every_epochs``, ``save_every_steps``, ``num_epochs``).
        total_steps: the run's optimizer steps (None: unknown, the step cadence is not judged).
        start: where the run starts (a resumed run's position).

    Returns:
        The warning, or None when a cadence checkpoint will be written (or saving is off).

    Example:
        >>> from medfunc.early_stopping import EarlyStopping
        >>> cadence_warning(TrainerConfig(num_epochs=3, save_every_epochs=5), 30,
        ...                 LoopPosition(EarlyStopping()))
        'no checkpoint falls on the saving cadence: save_every_epochs=5 but num_epochs=3; ...'
    """
    epochs, steps = config.save_every_epochs, config.save_every_steps
    if not (epochs or steps):
        return None
    if epochs and config.num_epochs // epochs > start.epoch // epochs:
        return None
    if steps and (total_steps is None or total_steps // steps > start.global_step // steps):
        return None
    reasons = []
    if epochs:
        reasons.append(f"save_every_epochs={epochs} but num_epochs={config.num_epochs}")
    if steps:
        reasons.append(f"save_every_steps={steps} but the run has {total_steps} optimizer steps")
    return (
        "no checkpoint falls on the saving cadence: "
        + " and ".join(reasons)
        + "; the only checkpoint is the one written when training stops, so a run that dies "
        "before then cannot be resumed (lower the cadence)"
    )


def current_weights(state: TrainState, output_dir: Path, name: str) -> Path | None:
    """``output_dir / name`` when that weights file already holds exactly ``state``'s weights.

    Args:
        state: the final state (a single-process one; sharded states are never compared).
        output_dir: the run folder.
        name: the weights file's name (``model.safetensors``).

    Returns:
        The file, or None when it is missing, differs, or the state is distributed.
    """
    path = output_dir / name
    if distributed.world_size() > 1 or not path.is_file():
        return None
    from safetensors.torch import load_file

    written = load_file(str(path))
    expected = weights_state_dict(state)
    if written.keys() != expected.keys():
        return None
    for key, value in expected.items():
        if not torch.equal(written[key], value.detach().cpu()):
            return None
    return path


def announce_start(
    logger: MetricLogger,
    config: TrainerConfig,
    position: LoopPosition,
    trainer_state: Mapping[str, Any],
    parts: Collection[str],
    steps_per_epoch: int | None,
    total_steps: int | None,
) -> bool:
    """Show the resume account (:func:`resume_messages`) and the cadence warning of a run.

    Args:
        logger: the run's logger (its console lines).
        config: the options (``resume_from`` set for a resumed run).
        position: where the run starts.
        trainer_state: the resumed checkpoint's ``trainer_state`` (``{}`` for a new run).
        parts: the resumed checkpoint's payload entries.
        steps_per_epoch: optimizer steps per epoch (None: unknown).
        total_steps: the run's optimizer steps (None: unknown).

    Returns:
        True when the run resumed at the end of its ``num_epochs``: nothing left to train.
    """
    idle = bool(config.resume_from) and nothing_left(position, config)
    if config.resume_from:
        info, warnings = resume_messages(
            config.resume_from, trainer_state, parts, position, config, steps_per_epoch
        )
        for line in info:
            logger.info(line)
        for line in warnings:
            logger.warning(line)
    cadence = None if idle else cadence_warning(config, total_steps, position)
    if cadence:
        logger.warning(cadence)
    return idle
