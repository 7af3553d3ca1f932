"""PEFT models (``peft.PeftModel``, e.g. LoRA) in the Trainer: detection, defaults, adapters.

A ``PeftModel`` trains a small set of adapter parameters over a frozen pretrained base. The
Trainer then saves checkpoints of the trainable parameters only (``save_trainable_only``, see
:mod:`medfunc.checkpoint.frozen`) and the final model as the adapter that
``PeftModel.save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors``), which ``PeftModel.from_pretrained(base_model, output_dir)``
loads. Nothing here imports ``peft``: a model can only be a ``PeftModel`` once the caller has
imported it.

Example:
    >>> is_peft_model(torch.nn.Linear(2, 2))
    False
    >>> trainable_only(None, torch.nn.Linear(2, 2))
    False
"""

from __future__ import annotations

import sys

import torch

__all__ = ["ADAPTER_FILES", "forward_module", "is_peft_model", "trainable_only"]

#: The files of an adapter saved by ``PeftModel.save_pretrained`` (safetensors).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_peft_model(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a ``peft.PeftModel`` (any task subclass).

    Args:
        module: a model.

    Returns:
        True for a ``PeftModel``; False otherwise, and always when ``peft`` was never imported.
    """
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(module, peft.PeftModel)


def trainable_only(flag: bool | None, module: torch.nn.Module, *, sharded: bool = False) -> bool:
    """``TrainerConfig.save_trainable_only`` resolved: ``None`` means on for PEFT models.

    Args:
        flag: the configured value (``True``, ``False`` or ``None`` for the default).
        module: the model being trained.
        sharded: the run is FSDP/DeepSpeed-sharded: the default is then off (its checkpoints
            are restored into a sharded template, whose frozen base cannot be checksummed;
            ``TrainerConfig`` refuses ``True`` there).

    Returns:
        Whether checkpoints leave out the frozen parameters.
    """
    if flag is None:
        return is_peft_model(module) and not sharded
    return flag


def forward_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``forward`` signature names the model's inputs.

    A ``PeftModel``'s own ``forward`` takes ``*args, **kwargs`` and passes them to the model it
    wraps, so that model's ``forward`` is the one that says which inputs are taken.

    Args:
        module: a model.

    Returns:
        ``module.get_base_model()`` for a ``PeftModel``, else ``module``.
    """
    return module.get_base_model() if is_peft_model(module) else module
