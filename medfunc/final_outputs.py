"""What a training run leaves behind after its last step: the weights file and the exports.

:func:`write_final_outputs` writes ``model.safetensors`` (and a Hugging Face model's
``save_pretrained`` files; for a ``peft.PeftModel`` only its adapter, ``adapter_config.json``
and ``adapter_model.safetensors``) and the TorchScript/ONNX exports the config asks for, on
rank 0. An export that fails is logged and recorded in ``TrainResult.export_errors``; the
other outputs are kept. Before training, :func:`check_exports` warns about an export without
example inputs (it is skipped) and :func:`check_export_example` runs the example through the model.

Example::

    check_exports(config)                                 # before training
    check_export_example(state, config)
    ...
    write_final_outputs(state, result, config, sharded=False)
    result.weights_path                                   # runs/demo/model.safetensors
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medfunc import distributed, export
from medfunc.data import to_device
from medfunc.distributed.checkpoint import gather_full_state
from medfunc.errors import ConfigError
from medfunc.peft_models import is_peft_model
from medfunc.state import TrainState, bind_module
from medfunc.step import apply_model
from medfunc.tracking import TrainResult
from medfunc.trainer_config import TrainerConfig
from medfunc.versioning import record_version
from medfunc.weights import is_pretrained_model, save_adapter, save_pretrained, save_weights

__all__ = [
    "EXPORT_FILES",
    "WEIGHTS_FILE",
    "check_export_example",
    "check_exports",
    "export_state",
    "write_final_outputs",
]

log = logging.getLogger("medfunc.trainer")
WEIGHTS_FILE = "model.safetensors"
EXPORT_FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}


def check_exports(config: TrainerConfig) -> list[str]:
    """Warn (once, before training) about exports requested without ``export_input_example``.

    As the original trainer, such an export is skipped rather than refused.

    Args:
        config: the options.

    Returns:
        The export flags that will be skipped, e.g. ``["export_onnx"]``.

    Example:
        >>> check_exports(TrainerConfig(export_onnx=True))
        ['export_onnx']
    """
    skipped = [
        flag
        for flag in ("export_torchscript", "export_onnx")
        if getattr(config, flag) and config.export_input_example is None
    ]
    for flag in skipped:
        log.warning(
            "TrainerConfig.%s=True without export_input_example: the export will be skipped. "
            "Give a dict of example model inputs such as {'input_ids': "
            "torch.zeros(1, 8, dtype=torch.long)} to export",
            flag,
        )
    return skipped


def check_export_example(state: TrainState, config: TrainerConfig) -> None:
    """Run ``export_input_example`` through the model once, before training, when exporting.

    A wrong key or shape then fails in the first second of a run, not after its last epoch.

    Args:
        state: the initial state (unchanged; the model runs in eval mode without gradients).
        config: the options.

    Raises:
        ConfigError: the model cannot take the example (the message gives the model's error).

    Example::

        check_export_example(state, TrainerConfig(export_onnx=True,
                                                  export_input_example={"x": torch.zeros(1, 6)}))
    """
    exporting = config.export_torchscript or config.export_onnx
    if not exporting or config.export_input_example is None:
        return
    example = to_device(config.export_input_example, state.device)
    try:
        apply_model(state, example)
    except Exception as err:
        raise ConfigError(
            "TrainerConfig.export_input_example does not run through the model "
            f"({type(err).__name__}: {err}); give the inputs the model's forward takes, e.g. "
            "the keys of a training batch without the labels"
        ) from err


def write_final_outputs(
    state: TrainState, result: TrainResult, config: TrainerConfig, *, sharded: bool
) -> None:
    """Write the weights and exports of ``state`` into ``result.output_dir`` (rank 0).

    Every rank must call this (a sharded state is gathered collectively).

    Args:
        state: the final state.
        result: the run's result; ``weights_path``, ``exports`` and ``export_errors`` are set.
        config: the options (which exports, their example inputs and ONNX opset).
        sharded: the state is FSDP/DeepSpeed-sharded.
    """
    if sharded:
        full = gather_full_state(state)
    else:
        full = state
        bind_module(state)
    if distributed.is_main_process():
        if not sharded and is_peft_model(state.module):
            result.weights_path = save_adapter(state.module, result.output_dir)
        else:
            result.weights_path = save_weights(full, result.output_dir / WEIGHTS_FILE)
            if config.model_versioning:
                record_version(
                    result.weights_path, epoch=result.epochs_completed, step=result.global_step
                )
            if not sharded and is_pretrained_model(state.module):
                save_pretrained(state.module, result.output_dir)
        _export(state, result, config, sharded=sharded)
    distributed.barrier()


def _export(
    state: TrainState, result: TrainResult, config: TrainerConfig, *, sharded: bool
) -> None:
    """Make the configured exports, recording each success or failure in ``result``."""
    flags = {"torchscript": config.export_torchscript, "onnx": config.export_onnx}
    if config.export_input_example is None:  # skipped, as warned by check_exports
        return
    wanted = [name for name, flag in flags.items() if flag]
    if wanted and sharded:
        for name in wanted:
            result.export_errors[name] = (
                "exports are not made from fsdp/deepspeed runs; load model.safetensors into "
                "the unsharded model and call medfunc.export, or run `medfunc export` on "
                "a checkpoint"
            )
            log.warning("%s export skipped: %s", name, result.export_errors[name])
        return
    example = to_device(config.export_input_example, state.device) if wanted else None
    for name in wanted:
        path = result.output_dir / EXPORT_FILES[name]
        try:
            if name == "torchscript":
                export.to_torchscript(state, example, path)
            else:
                export.to_onnx(state, example, path, opset=config.onnx_opset)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            result.export_errors[name] = reason
            log.warning("%s export failed (training outputs are kept): %s", name, reason)
        else:
            result.exports[name] = path


def export_state(
    state: TrainState, config: TrainerConfig, output_dir: str | os.PathLike
) -> TrainResult:
    """Make the configured exports of ``state`` into ``output_dir`` now (this process).

    Args:
        state: the (unsharded) state to export.
        config: the options (which exports, their example inputs and ONNX opset).
        output_dir: the folder for ``model.pt`` / ``model.onnx`` (created if missing).

    Returns:
        A :class:`TrainResult` whose ``exports`` and ``export_errors`` say what was written.

    Example::

        export_state(trainer.state, config, "exports").exports   # {'onnx': .../model.onnx}
    """
    result = TrainResult(output_dir=Path(output_dir))
    result.output_dir.mkdir(parents=True, exist_ok=True)
    bind_module(state)
    _export(state, result, config, sharded=False)
    return result
