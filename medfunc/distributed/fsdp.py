"""FSDP2 (``torch.distributed.fsdp.fully_shard``) behind the same ``train_step``.

FSDP2 replaces a module's parameters with DTensor shards and gathers / frees the full weights
with hooks around the module's own forward and backward, so the functional path of
``train_step`` (``functional_call`` with swapped tensors and ``torch.autograd.grad``) never sees
the sharded parameters: FSDP's hooks substitute their own gathered weights. An FSDP state
therefore takes its gradients another way, through its ``grad_path`` (:data:`FSDP_PATH`):

- the state's params *are* the module's DTensor parameters (no copy);
- the forward runs through the module itself (buffers are still swapped in functionally);
- ``objective(loss).backward()`` lets FSDP reduce-scatter the gradients (averaged over ranks)
  into each sharded parameter's ``.grad``, which is read back as the gradient list.

A parameter whose ``.grad`` FSDP left None (no rank's backward reached it) has no gradient in
the step, exactly as a ``torch.optim`` optimizer over the sharded module sees it. FSDP2's
reduce-scatter runs over the parameters each rank has gradients for, so ranks that use different
parameters of one FSDP unit need FSDP2's own option for that (``set_reduce_scatter_unused_params``
where available), which gives the unused ones zeros instead.

Everything after that is the ordinary step: accumulation, loss scaling, the global norm
(``get_total_norm`` on DTensors reduces across ranks) and the optimizer, whose foreach kernels
run on the DTensor shards. Because the module holds the one copy of the weights, an FSDP step
always donates: the state it is given is consumed (``donate=False`` behaves like ``True``).

Example (on every rank of a ``torchrun`` job)::

    mf.distributed.init()
    state = mf.distributed.fully_shard_state(model, mf.optim.adamw(1e-3))
    state, metrics = mf.train_step(state, batch)   # the old state is consumed
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from medfunc.calling import call_model, extract_loss
from medfunc.distributed.env import collective_guard, get_info, is_distributed
from medfunc.errors import ConfigError
from medfunc.precision import autocast
from medfunc.state import GradPath, TrainState, init_state
from medfunc.step import StepStatic, StepTrees

ShardModules = Iterable[type] | Callable[[str, torch.nn.Module], bool] | None


def is_fsdp_state(state: TrainState) -> bool:
    """True when ``state``'s parameters are FSDP DTensor shards.

    Example:
        >>> mf.distributed.is_fsdp_state(mf.init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1)))
        False
    """
    return any(isinstance(p, DTensor) for p in state.params.values())


def _bind_params(module: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Make the module's sharded parameters hold ``params`` (a no-op when they alias)."""
    named = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            target = named[name]
            local_target = target.to_local() if isinstance(target, DTensor) else target
            local_value = value.to_local() if isinstance(value, DTensor) else value
            if local_target.data_ptr() != local_value.data_ptr():
                local_target.copy_(local_value)


def fsdp_value_and_grad(
    static: StepStatic,
    trees: StepTrees,
    batch: Any,
    objective: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The FSDP gradient path of the step core: the module's own forward, ``backward()``.

    Args:
        static: the step's static facts (the module is the FSDP-sharded root).
        trees: the step's tensors (params are the module's DTensor shards).
        batch: the batch.
        objective: maps the loss to what is differentiated (accumulation and loss scaling).

    Returns:
        ``(loss, grads)``: this rank's detached float32 loss and the rank-averaged sharded
        gradient (a DTensor) of each trainable parameter, None for one whose ``.grad`` FSDP
        left None.
    """
    module = static.module
    _bind_params(module, trees.params)
    trainable = dict(module.named_parameters())
    params = [trainable[n] for n in static.names]
    for p in params:
        p.grad = None
    bindings = dict(trees.buffers) if trees.buffers else None
    with torch.enable_grad():
        with autocast(static.policy, static.device), collective_guard("FSDP forward"):
            outputs = call_model(module, static.apply_fn, batch, bindings, strict=False)
        loss = extract_loss(outputs, batch, static.loss_fn)
        with collective_guard("FSDP backward (gradient reduce-scatter)"):
            objective(loss).backward()
    grads = []
    for p in params:
        grads.append(p.grad)
        p.grad = None
    return loss.detach().float(), grads


FSDP_PATH = GradPath("fsdp", value_and_grad=fsdp_value_and_grad, always_donates=True)


def _select(model: torch.nn.Module, shard_modules: ShardModules) -> list[torch.nn.Module]:
    if shard_modules is None:
        return []
    if callable(shard_modules) and not isinstance(shard_modules, type):
        chosen = [m for name, m in model.named_modules() if name and shard_modules(name, m)]
    else:
        types = tuple(shard_modules) if not isinstance(shard_modules, type) else (shard_modules,)
        if not all(isinstance(t, type) for t in types):
            raise ConfigError(
                "shard_modules must be module classes (e.g. [TransformerBlock]) or a predicate "
                f"(name, module) -> bool, got {shard_modules!r}"
            )
        chosen = [m for name, m in model.named_modules() if name and isinstance(m, types)]
    return chosen


def _broadcast_module_(model: torch.nn.Module) -> None:
    tensors = [*model.parameters(), *model.buffers()]
    with collective_guard("broadcast of rank 0's initial weights"), torch.no_grad():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)


def fully_shard_state(
    model: torch.nn.Module,
    tx: Any,
    *,
    shard_modules: ShardModules = None,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    **init_state_kwargs: Any,
) -> TrainState:
    """Shard ``model`` with FSDP2 and build its TrainState.

    Call it on every rank after :func:`~medfunc.distributed.init`. Rank 0's initial weights are
    broadcast first, so every rank starts from the same model. In a single process the model
    is not sharded and this equals :func:`medfunc.init_state`.

    Args:
        model: the module (built the same way on every rank).
        tx: the gradient transformation (its foreach kernels run on the shards).
        shard_modules: submodules to make their own FSDP units before the root, as module
            classes (e.g. ``[BertLayer]``) or a predicate ``(name, module) -> bool``. Default:
            only the root (the whole model is gathered at once).
        reshard_after_forward: free gathered weights after the forward and gather them again
            for the backward (less memory, more communication).
        mp_policy: an optional ``torch.distributed.fsdp.MixedPrecisionPolicy``.
        **init_state_kwargs: passed to :func:`medfunc.init_state` (``loss_fn``, ``precision``,
            ``seed``, ``accumulate_steps``).

    Returns:
        A TrainState whose params are the module's DTensor shards; ``mf.train_step`` runs it.

    Example (on every rank of a ``torchrun`` job)::

        state = mf.distributed.fully_shard_state(model, tx, shard_modules=[BertLayer],
                                                 precision="bf16")
    """
    if "device" in init_state_kwargs:
        raise ConfigError(
            "fully_shard_state places the model on DistInfo.device; do not pass device="
        )
    if init_state_kwargs.get("ema_decay") is not None:
        raise ConfigError(
            "fully_shard_state keeps no EMA of the sharded weights; drop ema_decay (or train "
            "with mf.distributed.data_parallel, which keeps one)"
        )
    info = get_info()
    if not is_distributed():
        return init_state(model, tx, device=info.device, **init_state_kwargs)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(info.device)
    _broadcast_module_(model)
    options: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        if not isinstance(mp_policy, MixedPrecisionPolicy):
            raise ConfigError(
                f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy, "
                f"got {type(mp_policy).__name__}"
            )
        options["mp_policy"] = mp_policy
    for sub in _select(model, shard_modules):
        fully_shard(sub, **options)
    fully_shard(model, **options)
    state = init_state(model, tx, **init_state_kwargs)
    return state.replace(grad_path=FSDP_PATH)
