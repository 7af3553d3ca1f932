"""DeepSpeed ZeRO behind the same ``train_step``.

Example:
    >>> state = mf.distributed.deepspeed_state(model, mf.optim.adamw(1e-3), {"zero_optimization": {"stage": 2}})
"""

from __future__ import annotations

from typing import Any

import torch

from medfunc.state import TrainState


def deepspeed_available() -> bool:
    """True when the ``deepspeed`` package can be imported."""
    raise NotImplementedError


def deepspeed_state(model: torch.nn.Module, tx_or_config: Any, deepspeed_config: Any = None,
                    **init_state_kwargs: Any) -> TrainState:
    """Build a TrainState whose steps run through a DeepSpeed engine (falls back to DDP)."""
    raise NotImplementedError
