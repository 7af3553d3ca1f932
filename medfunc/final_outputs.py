"""What a training run leaves behind after its last step: the weights file and the exports.

:func:`write_final_outputs` writes ``model.safetensors`` (and a Hugging Face model's
``save_pretrained`` files) and the TorchScript/ONNX exports the config asks for, on rank 0. An
export that fails is logged and recorded in ``TrainResult.export_errors``; the other outputs are
kept. :func:`check_exports` fails before training when an export lacks its example inputs.

Example::

    check_exports(config)                                 # before training
    ...
    write_final_outputs(state, result, config, sharded=False)
    result.weights_path                                   # runs/demo/model.safetensors
"""

from __future__ import annotations

import logging

from medfunc import distributed, export
from medfunc.data import to_device
from medfunc.distributed.checkpoint import gather_full_state
from medfunc.errors import ConfigError
from medfunc.state import TrainState, bind_module
from medfunc.tracking import TrainResult
from medfunc.trainer_config import TrainerConfig
from medfunc.weights import is_pretrained_model, save_pretrained, save_weights

__all__ = ["EXPORT_FILES", "WEIGHTS_FILE", "check_exports", "write_final_outputs"]

log = logging.getLogger("medfunc.trainer")
WEIGHTS_FILE = "model.safetensors"
EXPORT_FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}


def check_exports(config: TrainerConfig) -> None:
    """Fail early when an export is requested without ``export_input_example``.

    Args:
        config: the options.

    Raises:
        ConfigError: ``export_torchscript`` or ``export_onnx`` without example inputs.

    Example:
        >>> check_exports(TrainerConfig(export_onnx=True))
        Traceback (most recent call last):
        ...
        medfunc.errors.ConfigError: TrainerConfig.export_onnx=True needs export_input_example, ...
    """
    for flag in ("export_torchscript", "export_onnx"):
        if getattr(config, flag) and config.export_input_example is None:
            raise ConfigError(
                f"TrainerConfig.{flag}=True needs export_input_example, a dict "
                "of example model inputs such as {'input_ids': "
                "torch.zeros(1, 8, dtype=torch.long)}"
            )


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
        result.weights_path = save_weights(full, result.output_dir / WEIGHTS_FILE)
        if not sharded and is_pretrained_model(state.module):
            save_pretrained(state.module, result.output_dir)
        _export(state, result, config, sharded=sharded)
    distributed.barrier()


def _export(
    state: TrainState, result: TrainResult, config: TrainerConfig, *, sharded: bool
) -> None:
    """Make the configured exports, recording each success or failure in ``result``."""
    flags = {"torchscript": config.export_torchscript, "onnx": config.export_onnx}
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
