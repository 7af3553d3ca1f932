"""Checkpoints: save a TrainState atomically, read it back safely, restore it validated.

A checkpoint is one ``.pt`` file that ``torch.load(path, weights_only=True)`` reads, laid out
like the seed trainer's so plain PyTorch can continue from it (see
:mod:`medfunc.checkpoint.payload` for the layout). The package's modules, one concern each:

- :mod:`~medfunc.checkpoint.payload`: a TrainState to the payload (the layout).
- :mod:`~medfunc.checkpoint.saving`: :func:`save_state`, via :func:`medfunc.atomic.atomic_write`.
- :mod:`~medfunc.checkpoint.reading`: :func:`read_checkpoint`, CRC-32 and safety checks.
- :mod:`~medfunc.checkpoint.restore`: :func:`restore_state`, validated against a state.
- :mod:`~medfunc.checkpoint.inspect`: :func:`inspect_checkpoint`, a readable summary.

Example:
    >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.adamw(1e-3))
    >>> path = mf.save_state(state, "run/ckpt.pt", extra={"epoch": 3})
    >>> state = mf.restore_state(path, like=state)
    >>> print(mf.inspect_checkpoint(path))
    checkpoint run/ckpt.pt (... KB)
    format version: 1
    global step: 0
    epoch: 3
    ...
"""

from medfunc.checkpoint.inspect import inspect_checkpoint
from medfunc.checkpoint.payload import FORMAT_VERSION
from medfunc.checkpoint.reading import read_checkpoint
from medfunc.checkpoint.restore import restore_state
from medfunc.checkpoint.saving import save_state

__all__ = [
    "FORMAT_VERSION",
    "inspect_checkpoint",
    "read_checkpoint",
    "restore_state",
    "save_state",
]
