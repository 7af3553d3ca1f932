"""The trained model's final files: ``model.safetensors`` and, for Hugging Face models, theirs.

``model.safetensors`` holds exactly the model's ``state_dict()`` (so non-persistent buffers such
as Hugging Face's ``position_ids`` are left out), with tied weights stored once under their first
name, as ``safetensors.torch.save_model`` does: ``safetensors.torch.load_model(model, path)``
loads it with ``strict=True``, and for a model without tied weights so does
``model.load_state_dict(safetensors.torch.load_file(path))``. A Hugging Face ``PreTrainedModel``
is also saved with its own ``save_pretrained`` (``config.json`` and its weights), so
``AutoModel...from_pretrained(output_dir)`` loads the run folder. A ``peft.PeftModel`` is saved
as its adapter instead (:func:`save_adapter`): ``PeftModel.from_pretrained(base, output_dir)``
loads it over the base model.

Example:
    >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1))
    >>> path = save_weights(state, "model.safetensors")
    >>> from safetensors.torch import load_model
    >>> load_model(torch.nn.Linear(4, 2), path, strict=True)
    (set(), [])
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections import OrderedDict
from pathlib import Path

import torch

from medfunc.atomic import atomic_replace, atomic_write
from medfunc.checkpoint.payload import state_dict_layout
from medfunc.peft_models import ADAPTER_FILES
from medfunc.state import TrainState

__all__ = ["save_adapter", "save_pretrained", "save_weights", "weights_state_dict"]


def weights_state_dict(state: TrainState) -> OrderedDict[str, torch.Tensor]:
    """The state's values under the module's ``state_dict()`` keys, each tied tensor once.

    Args:
        state: a (full, unsharded) state.

    Returns:
        key -> tensor: ``state_dict()``'s keys (no non-persistent buffers); of keys naming the
        same parameter (tied weights), only the first.

    Example:
        >>> state = mf.init_state(torch.nn.BatchNorm1d(3), mf.optim.sgd(0.1))
        >>> list(weights_state_dict(state))
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    """
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    seen = set()
    for key, (owner, value) in state_dict_layout(state.module).items():
        if owner is None:
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            continue
        if owner in seen:
            continue
        seen.add(owner)
        kind, name = owner
        tensors[key] = getattr(state, kind)[name]
    return tensors


def save_weights(state: TrainState, path: str | os.PathLike) -> Path:
    """Write the model's ``state_dict()`` to a safetensors file, atomically.

    Args:
        state: the trained (full) state.
        path: the target, e.g. ``run/model.safetensors``.

    Returns:
        The path written.

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1))
        >>> save_weights(state, "run/model.safetensors").name
        'model.safetensors'
    """
    from safetensors.torch import save

    tensors = {
        key: t.detach().to("cpu").clone().contiguous()
        for key, t in weights_state_dict(state).items()
    }
    atomic_write(path, lambda handle: handle.write(save(tensors, metadata={"format": "pt"})))
    return Path(path)


def is_pretrained_model(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``PreTrainedModel`` (without importing transformers).

    Example:
        >>> is_pretrained_model(torch.nn.Linear(2, 2))
        False
    """
    return callable(getattr(module, "save_pretrained", None)) and hasattr(module, "config")


def _save_staged(
    module: torch.nn.Module, folder: Path, keep: tuple[str, ...] | None = None
) -> list[Path]:
    """Run ``module.save_pretrained`` into a temporary folder inside ``folder``, then move each
    file (those named in ``keep``, when given) into place with :func:`atomic_replace`, so every
    file appears whole, fsynced, with the permissions of the other outputs (0644)."""
    staging = folder / f".save_pretrained.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        module.save_pretrained(staging, safe_serialization=True)
        written = []
        for item in sorted(staging.iterdir()):
            if keep is None or item.name in keep:
                atomic_replace(item, folder / item.name)
                written.append(folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def save_pretrained(module: torch.nn.Module, folder: Path) -> list[Path]:
    """Save a Hugging Face model with its own ``save_pretrained`` into ``folder``.

    The files are written to a temporary folder inside ``folder`` first, then each is renamed
    into place, so every file appears whole.

    Args:
        module: a ``PreTrainedModel`` holding the final values.
        folder: the run folder.

    Returns:
        The files written (``config.json``, the weights, ...).

    Example::

        save_pretrained(trainer.model, Path("runs/demo"))
        AutoModelForSequenceClassification.from_pretrained("runs/demo")
    """
    return _save_staged(module, folder)


def save_adapter(module: torch.nn.Module, folder: Path) -> Path:
    """Save a ``peft.PeftModel``'s adapter into ``folder`` with ``PeftModel.save_pretrained``.

    Only the adapter's files are kept (:data:`~medfunc.peft_models.ADAPTER_FILES`; not the
    generated model card), each renamed into place whole.

    Args:
        module: the ``PeftModel`` holding the final values.
        folder: the run folder.

    Returns:
        The adapter's weights, ``folder / "adapter_model.safetensors"``.

    Example::

        save_adapter(trainer.model, Path("runs/lora"))
        model = PeftModel.from_pretrained(build_base_model(), "runs/lora")
    """
    _save_staged(module, folder, keep=ADAPTER_FILES)
    return folder / ADAPTER_FILES[1]
