"""medfunc: PyTorch training as pure functions over one immutable TrainState.

Example:
    >>> import medfunc as mf
    >>> model = torch.nn.Linear(4, 1)
    >>> tx = mf.optim.adamw(mf.schedules.linear_warmup(1e-3, 10, 100))
    >>> state = mf.init_state(model, tx, loss_fn=lambda outputs, x: outputs.square().mean())
    >>> batch = torch.randn(8, 4)
    >>> state, metrics = mf.train_step(state, batch, donate=True)
    >>> int(state.step), sorted(metrics)
    (1, ['applied', 'grad_norm', 'loss', 'lr', 'skipped'])
"""

from medfunc import data, export, modeling, optim, schedules, testing
from medfunc.checkpoint import inspect_checkpoint, read_checkpoint, restore_state, save_state
from medfunc.compile import compile_step
from medfunc.errors import (
    BatchError,
    CheckpointError,
    ConfigError,
    ConsumedStateError,
    ExportError,
    LossError,
    MedfuncError,
    TrainingInterrupted,
)
from medfunc.precision import Policy, get_policy
from medfunc.state import TrainState, bind_module, ema_params, init_state, tree_map
from medfunc.step import apply_model, eval_step, train_step

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """Import ``medfunc.distributed`` and the Trainer on first use (they pull in heavy modules)."""
    import importlib

    if name in ("distributed", "ensemble"):
        return importlib.import_module(f"medfunc.{name}")
    if name in ("MedicalModelTrainer", "TrainerConfig"):
        return getattr(importlib.import_module("medfunc.trainer"), name)
    raise AttributeError(f"module 'medfunc' has no attribute {name!r}")


__all__ = [
    "BatchError",
    "MedicalModelTrainer",
    "TrainerConfig",
    "CheckpointError",
    "ConfigError",
    "ConsumedStateError",
    "ExportError",
    "LossError",
    "MedfuncError",
    "TrainingInterrupted",
    "Policy",
    "TrainState",
    "apply_model",
    "compile_step",
    "distributed",
    "export",
    "inspect_checkpoint",
    "modeling",
    "read_checkpoint",
    "restore_state",
    "save_state",
    "bind_module",
    "data",
    "ema_params",
    "eval_step",
    "get_policy",
    "init_state",
    "optim",
    "schedules",
    "testing",
    "train_step",
    "tree_map",
]
