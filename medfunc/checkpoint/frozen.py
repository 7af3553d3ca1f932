"""Trainable-only checkpoints: the frozen base is identified by a checksum, not stored.

A checkpoint saved with ``save_state(..., trainable_only=True)`` holds the trainable parameters,
every buffer and the optimizer state, but not the frozen parameters (for a LoRA fine-tune: the
whole pretrained model). In their place ``medfunc_state['frozen_base']`` records what they were:
the SHA-256 of their names, dtypes, shapes and bytes (:func:`base_checksum`), their number and
their element count. Restoring takes the frozen parameters from the state restored into, after
checking that their checksum is the recorded one: a different base model (other pretrained
weights, another trainable/frozen split) is refused with both checksums named.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> _ = model[0].requires_grad_(False)
    >>> record = frozen_base_record(mf.init_state(model, mf.optim.sgd(0.1)))
    >>> record["parameters"], record["elements"], len(record["sha256"])
    (2, 20, 64)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from medfunc.checkpoint.payload import state_dict_layout
from medfunc.errors import CheckpointMismatchError
from medfunc.state import TrainState

__all__ = [
    "base_checksum",
    "fill_frozen_base",
    "frozen_base_record",
    "frozen_params",
    "trainable_only_payload",
]

#: Bytes hashed per call, so a tensor on an accelerator is copied to the host in pieces.
_CHUNK_BYTES = 64 << 20


def frozen_params(state: TrainState) -> OrderedDict[str, Tensor]:
    """The state's parameters the optimizer does not update, in ``named_parameters()`` order.

    Args:
        state: a state.

    Returns:
        name -> tensor of every parameter not in ``state.trainable``.
    """
    trainable = set(state.trainable)
    return OrderedDict((n, p) for n, p in state.params.items() if n not in trainable)


def _tensor_bytes(tensor: Tensor) -> Any:
    """``tensor``'s bytes in memory order, in pieces of at most :data:`_CHUNK_BYTES`."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    for begin in range(0, flat.numel(), _CHUNK_BYTES):
        yield flat[begin : begin + _CHUNK_BYTES].cpu().numpy().tobytes()


def base_checksum(tensors: Mapping[str, Tensor]) -> str:
    """The SHA-256 (hex) of named tensors: each name, dtype, shape and its bytes, in order.

    Args:
        tensors: name -> tensor (e.g. :func:`frozen_params`).

    Returns:
        64 hex digits; equal for equal names, dtypes, shapes and values, whatever the device.

    Example:
        >>> a = base_checksum({"w": torch.zeros(2, 3)})
        >>> b = base_checksum({"w": torch.ones(2, 3)})
        >>> a == base_checksum({"w": torch.zeros(2, 3)}), a == b
        (True, False)
    """
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        for piece in _tensor_bytes(tensor):
            digest.update(piece)
    return digest.hexdigest()


def frozen_base_record(state: TrainState) -> dict[str, Any]:
    """What a trainable-only checkpoint stores about the parameters it leaves out.

    Args:
        state: the state being saved.

    Returns:
        ``{"sha256": hex, "parameters": count, "elements": total numel}`` of
        :func:`frozen_params`.
    """
    frozen = frozen_params(state)
    return {
        "sha256": base_checksum(frozen),
        "parameters": len(frozen),
        "elements": sum(t.numel() for t in frozen.values()),
    }


def _frozen_keys(state: TrainState) -> list[str]:
    """The ``state_dict()`` keys whose values are frozen parameters (tied names included)."""
    frozen = frozen_params(state)
    return [
        key
        for key, (owner, _) in state_dict_layout(state.module).items()
        if owner is not None and owner[0] == "params" and owner[1] in frozen
    ]


def trainable_only_payload(payload: dict, state: TrainState) -> dict:
    """A full payload of ``state`` (``build_payload``) less its frozen parameters.

    ``model_state`` keeps the trainable parameters and the buffers; the frozen parameters are
    replaced by ``medfunc_state['frozen_base']`` (:func:`frozen_base_record`). The optimizer
    state already covers only the trainable parameters.

    Args:
        payload: the payload of ``state``.
        state: the state being saved.

    Returns:
        The new payload (``payload`` is not changed).
    """
    dropped = set(_frozen_keys(state))
    model_state = OrderedDict((k, v) for k, v in payload["model_state"].items() if k not in dropped)
    medfunc_state = {**payload["medfunc_state"], "frozen_base": frozen_base_record(state)}
    return {**payload, "model_state": model_state, "medfunc_state": medfunc_state}


def _describe(record: Mapping[str, Any]) -> str:
    return (
        f"sha256 {record['sha256']} ({record['parameters']} frozen parameters, "
        f"{record['elements']} elements)"
    )


def fill_frozen_base(payload: dict, like: TrainState, source: str) -> dict:
    """Complete a trainable-only payload with ``like``'s frozen parameters, once checked.

    A payload without ``medfunc_state['frozen_base']`` (a full checkpoint) is returned as it is.
    Otherwise ``like``'s frozen parameters are checksummed and, when they are the recorded base,
    returned in a copy of the payload whose ``model_state`` holds them under their
    ``state_dict()`` keys (the tensors are ``like``'s own: frozen values are never written).

    Args:
        payload: a validated checkpoint payload.
        like: the state restored into.
        source: the checkpoint's name for messages.

    Returns:
        The payload to restore from.

    Raises:
        CheckpointMismatchError: ``like``'s frozen parameters are not the recorded base.
    """
    record = payload.get("medfunc_state", {}).get("frozen_base")
    if record is None:
        return payload
    found = frozen_base_record(like)
    if found["sha256"] != record.get("sha256"):
        raise CheckpointMismatchError(
            f"checkpoint {source} holds only the trainable parameters (save_trainable_only); "
            f"its frozen base model is {_describe(record)}, but the model restored into has "
            f"{_describe(found)}. Build the model from the same pretrained weights, with the "
            "same parameters frozen (e.g. the same LoRA configuration), before resuming; or "
            "resume from a checkpoint saved with save_trainable_only=False"
        )
    layout = state_dict_layout(like.module)
    model_state = OrderedDict(payload["model_state"])
    for key in _frozen_keys(like):
        model_state.setdefault(key, like.params[layout[key][0][1]])
    return {**payload, "model_state": model_state}
