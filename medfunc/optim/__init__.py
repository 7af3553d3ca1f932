"""medfunc.optim: optax-style gradient transformations running PyTorch's optimizer kernels.

Example:
    >>> import medfunc as mf
    >>> from collections import OrderedDict
    >>> tx = mf.optim.chain(
    ...     mf.optim.clip_by_global_norm(1.0),
    ...     mf.optim.adamw(mf.schedules.linear_warmup(3e-4, 100, 1000), weight_decay=0.05),
    ... )
    >>> trainable_params = OrderedDict(torch.nn.Linear(4, 2).named_parameters())
    >>> opt_state = tx.init(trainable_params)
    >>> [type(part).__name__ for part in opt_state]   # one state per part of the chain
    ['tuple', 'AdamState']
"""

from medfunc.optim.base import (
    GradientTransformation,
    Grads,
    OptState,
    Params,
    UpdateContext,
    chain,
    find_optimizer,
)
from medfunc.optim.clipping import clip_by_global_norm, clip_by_value, global_norm
from medfunc.optim.interop import (
    from_torch_state_dict,
    to_torch_state_dict,
    torch_kernel_flags,
    torch_optimizer,
    torch_param_groups,
)
from medfunc.optim.kernels import KERNELS
from medfunc.optim.masks import ParamGroup, default_decay_mask, param_groups
from medfunc.optim.optimizers import (
    OPTIMIZER_NAMES,
    OPTIMIZERS,
    AdamState,
    OptimizerSpec,
    SGDState,
    adam,
    adamw,
    get_optimizer,
    sgd,
)
from medfunc.optim.torch_adapter import from_torch

__all__ = [
    "KERNELS",
    "OPTIMIZERS",
    "OPTIMIZER_NAMES",
    "AdamState",
    "GradientTransformation",
    "Grads",
    "OptState",
    "OptimizerSpec",
    "ParamGroup",
    "Params",
    "SGDState",
    "UpdateContext",
    "adam",
    "adamw",
    "chain",
    "clip_by_global_norm",
    "clip_by_value",
    "default_decay_mask",
    "find_optimizer",
    "from_torch",
    "from_torch_state_dict",
    "get_optimizer",
    "global_norm",
    "param_groups",
    "sgd",
    "to_torch_state_dict",
    "torch_kernel_flags",
    "torch_optimizer",
    "torch_param_groups",
]
