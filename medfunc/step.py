"""train_step and eval_step: one training step as a function of (state, batch).

``train_step`` runs the forward pass through ``torch.func.functional_call`` with the state's
params and buffers, takes gradients with ``torch.autograd.grad``, then (every
``accumulate_steps``-th call) unscales, measures, clips and applies them with the state's
gradient transformation. Nothing in it waits for the device: the non-finite guard, the loss
scale and the LR are device tensors.

Example:
    >>> state = mf.init_state(model, mf.optim.adamw(1e-3))
    >>> for batch in loader:
    ...     state, metrics = mf.train_step(state, batch, donate=True)
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.func import functional_call

from medfunc.errors import BatchError, LossError
from medfunc.optim import UpdateContext
from medfunc.precision import autocast, unscale_and_check, update_scale
from medfunc.state import AccumState, TrainState, tree_map

_MASK64 = (1 << 64) - 1


def step_seed(rng: torch.Tensor) -> int:
    """The seed a step uses: a splitmix64 mix of the state's ``[key, counter]``.

    Args:
        rng: ``state.rng``, a CPU int64 tensor ``[key, counter]``.

    Returns:
        A non-negative 63-bit integer seed.
    """
    key, counter = (int(v) for v in rng.tolist())
    z = (key * 0x9E3779B97F4A7C15 + counter + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@contextlib.contextmanager
def seeded_rng(rng: torch.Tensor, device: torch.device) -> Iterator[None]:
    """Run the block with the CPU (and ``device``'s) RNG seeded from ``rng``; restore it after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    seed = step_seed(rng)
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def module_mode(module: torch.nn.Module, training: bool) -> Iterator[None]:
    """Put ``module`` in train/eval mode for the block, then restore every submodule's own mode
    (so e.g. a BatchNorm a user froze with ``.eval()`` stays frozen)."""
    if module.training == training:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def split_batch(batch: Any) -> tuple[tuple, dict]:
    """Map a batch to call arguments: dict -> ``model(**batch)``, tuple/list -> ``model(*batch)``,
    tensor -> ``model(batch)``.

    Args:
        batch: the batch.

    Returns:
        ``(args, kwargs)``.

    Example:
        >>> split_batch({"x": t})
        ((), {'x': t})
    """
    if isinstance(batch, Mapping):
        if not batch:
            raise BatchError(
                "the batch is an empty mapping; expected model inputs such as "
                "{'input_ids': ..., 'labels': ...}"
            )
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    raise BatchError(
        f"a batch must be a dict (called as model(**batch)), a tuple/list (model(*batch)) or a "
        f"tensor (model(batch)); got {type(batch).__name__}"
    )


def _check_devices(batch: Any, device: torch.device) -> None:
    items = (
        batch.items()
        if isinstance(batch, Mapping)
        else enumerate(batch if isinstance(batch, (tuple, list)) else [batch])
    )
    for key, value in items:
        if isinstance(value, torch.Tensor) and value.device.type != device.type:
            raise BatchError(
                f"batch[{key!r}] is on {value.device} but the state is on {device}; move the "
                "batch first, e.g. mf.data.to_device(batch, state.device)"
            )


def extract_loss(outputs: Any, batch: Any, loss_fn: Any = None) -> torch.Tensor:
    """The scalar loss of a forward pass, by the seed's contract.

    Args:
        outputs: the model's outputs: a loss tensor, a mapping / ModelOutput with ``"loss"``,
            or anything ``loss_fn`` understands.
        batch: the batch (passed to ``loss_fn``).
        loss_fn: optional ``loss_fn(outputs, batch) -> loss``.

    Returns:
        The 0-d floating-point loss tensor.

    Example:
        >>> extract_loss({"loss": torch.tensor(0.5)}, batch)
        tensor(0.5000)
    """
    if loss_fn is not None:
        loss, source = loss_fn(outputs, batch), "loss_fn(outputs, batch)"
    elif isinstance(outputs, torch.Tensor):
        loss, source = outputs, "the model's output"
    elif isinstance(outputs, Mapping) and outputs.get("loss") is not None:
        loss, source = outputs["loss"], "outputs['loss']"
    elif getattr(outputs, "loss", None) is not None:
        loss, source = outputs.loss, "outputs.loss"
    else:
        found = (
            f"a mapping with keys {sorted(outputs)}"
            if isinstance(outputs, Mapping)
            else type(outputs).__name__
        )
        raise LossError(
            f"the model's output holds no loss: expected a loss tensor or a mapping/ModelOutput "
            f"with a 'loss' entry, found {found}. Return the loss from the model or pass "
            "loss_fn=lambda outputs, batch: ... to init_state"
        )
    if not isinstance(loss, torch.Tensor):
        raise LossError(f"{source} must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise LossError(
            f"{source} must be a scalar (0-d) tensor, got shape {tuple(loss.shape)}; reduce it "
            "(e.g. .mean()) in the model or loss_fn"
        )
    if not loss.is_floating_point():
        raise LossError(f"{source} must be floating point, got dtype {loss.dtype}")
    return loss.reshape(())


def _forward(state: TrainState, batch: Any, bindings: tuple | None = None) -> Any:
    """Run the model under the policy's autocast: with ``bindings = (params, buffers)`` through
    ``functional_call``, else the module as it is (its own tensors are the state's)."""
    args, kwargs = split_batch(batch)
    _check_devices(batch, state.device)
    with autocast(state.policy, state.device):
        if bindings is None:
            return state.module(*args, **kwargs)
        return functional_call(state.module, bindings, args, kwargs)


def _own_parameters(state: TrainState, names: tuple[str, ...]) -> list[torch.Tensor] | None:
    """The module's own Parameters for ``names`` when the state's params and buffers are the
    module's tensors (a state from ``init_state`` that was only ever donated), else None.

    Then the forward can call the module directly, skipping ``functional_call``'s re-binding.
    """
    module_params = dict(state.module.named_parameters())
    module_buffers = dict(state.module.named_buffers())
    for own, values in ((module_params, state.params), (module_buffers, state.buffers)):
        if len(own) != len(values):
            return None
        for name, value in values.items():
            tensor = own.get(name)
            if tensor is None or tensor.data_ptr() != value.data_ptr():
                return None
            if tensor.shape != value.shape:
                return None
    return [module_params[n] for n in names]


def _clone_tree(tree: Any) -> Any:
    return tree_map(torch.clone, tree)


def value_and_grad(
    state: TrainState,
    buffers: Mapping,
    batch: Any,
    objective: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The default gradient path: ``functional_call`` and ``torch.autograd.grad``.

    Args:
        state: the state (its params are read, never written).
        buffers: the buffers the forward uses and updates in place (owned by the step).
        batch: the batch.
        objective: maps the loss to what is differentiated (accumulation and loss scaling).

    Returns:
        ``(loss, grads)``: the detached float32 loss and one gradient per trainable param.

    Example:
        >>> loss, grads = value_and_grad(state, state.buffers, batch, lambda loss: loss)
    """
    names = state.trainable
    bound = _own_parameters(state, names) if buffers is state.buffers else None
    if bound is None:
        leaves = [state.params[n].detach().requires_grad_(True) for n in names]
        call_params = OrderedDict(state.params)
        call_params.update(zip(names, leaves))
    else:
        leaves = bound
    with seeded_rng(state.rng, state.device), module_mode(state.module, True), torch.enable_grad():
        outputs = _forward(state, batch, None if bound is not None else (call_params, buffers))
        loss = extract_loss(outputs, batch, state.loss_fn)
        del outputs  # the outputs (e.g. logits) need not live through the backward pass
        grads = torch.autograd.grad(
            objective(loss), leaves, allow_unused=True, materialize_grads=True
        )
    return loss.detach().float(), list(grads)


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm; for sharded (DTensor) gradients the full norm as a plain tensor."""
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_step(
    state: TrainState, batch: Any, *, donate: bool = False
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """One training step (one micro-batch under gradient accumulation).

    Args:
        state: the current state; unchanged by the call unless ``donate``.
        batch: a dict (``model(**batch)``), tuple/list (``model(*batch)``) or tensor.
        donate: reuse the state's storage for the result; the given state is then consumed and
            any later use of it raises :class:`~medfunc.errors.ConsumedStateError`.

    Returns:
        ``(new_state, metrics)``; metrics are 0-d device tensors: ``loss`` (mean over the
        accumulation window so far), ``grad_norm`` (pre-clip; NaN when nothing was applied),
        ``lr`` (NaN when nothing was applied), ``skipped`` (non-finite gradients: the update was
        not applied), ``applied`` (this call applied an optimizer update) and, under fp16,
        ``loss_scale``.

    Example:
        >>> state, metrics = mf.train_step(state, {"x": x, "labels": y})
        >>> float(metrics["loss"])
    """
    state.check_alive()
    if state.step_fn is not None:
        return state.step_fn(state, batch, donate=donate)
    owned = (lambda tree: tree) if donate else _clone_tree
    names = state.trainable
    device = state.device
    k = state.accumulate_steps
    accum = owned(state.accum)
    buffers = owned(state.buffers)
    loss_scale = owned(state.loss_scale)
    count = int(accum.count) if k > 1 else 0
    apply_update = count + 1 == k or k == 1

    def objective(loss: torch.Tensor) -> torch.Tensor:
        scaled = loss / k if k > 1 else loss
        return scaled * loss_scale.scale if loss_scale else scaled

    loss, grads = (state.grad_fn or value_and_grad)(state, buffers, batch, objective)

    params = OrderedDict(state.params)
    params.update((n, owned(state.params[n])) for n in names)
    opt_state = owned(state.opt_state)
    step = state.step
    nan = torch.full((), float("nan"), device=device)
    metrics: dict[str, torch.Tensor] = {}
    if k > 1:
        torch._foreach_add_(list(accum.grads.values()), grads)
        loss_sum = accum.loss_sum.add_(loss)
        metrics["loss"] = loss_sum / (count + 1)
        grads = list(accum.grads.values())
    else:
        metrics["loss"] = loss

    if apply_update:
        if state.grad_sync is not None:
            state.grad_sync(grads)
        if loss_scale:
            found_inf = unscale_and_check(grads, loss_scale)
        grad_norm = _total_norm(grads) if grads else nan.clone()
        if not loss_scale:
            found_inf = (~torch.isfinite(grad_norm)).float()
        ctx = UpdateContext(step=step, found_inf=found_inf, grad_norm=grad_norm, metrics={})
        grads_od = OrderedDict(zip(names, grads))
        trainable = OrderedDict((n, params[n]) for n in names)
        with torch.no_grad():
            _, trainable, opt_state = state.tx.update(grads_od, opt_state, trainable, ctx)
        params.update(trainable)
        step = step + (found_inf == 0).to(step.dtype)
        if loss_scale:
            update_scale(state.policy, loss_scale, found_inf)
        if k > 1:
            torch._foreach_zero_(grads)
            accum.loss_sum.zero_()
        metrics.update(
            grad_norm=grad_norm,
            lr=ctx.metrics.get("lr", nan),
            skipped=found_inf > 0,
            applied=torch.ones((), dtype=torch.bool, device=device),
        )
    else:
        metrics.update(
            grad_norm=nan,
            lr=nan,
            skipped=torch.zeros((), dtype=torch.bool, device=device),
            applied=torch.zeros((), dtype=torch.bool, device=device),
        )
    if loss_scale:
        metrics["loss_scale"] = loss_scale.scale.clone()
    if k > 1:
        accum = AccumState(
            accum.grads, torch.tensor((count + 1) % k, dtype=torch.int64), accum.loss_sum
        )

    key, counter = (int(v) for v in state.rng.tolist())
    new_state = state.replace(
        params=params,
        buffers=buffers,
        opt_state=opt_state,
        loss_scale=loss_scale,
        step=step,
        rng=torch.tensor([key, counter + 1], dtype=torch.int64),
        accum=accum,
    )
    if donate:
        state.mark_consumed()
    return new_state, metrics


def apply_model(state: TrainState, batch: Any, *, train: bool = False) -> Any:
    """Run the model on ``batch`` with the state's params and buffers, without gradients.

    Args:
        state: the state.
        batch: model inputs (dict, tuple/list or tensor), labels optional.
        train: run in train mode (default: eval mode, dropout off, BatchNorm running stats).

    Returns:
        The model's raw outputs.

    Example:
        >>> logits = mf.apply_model(state, {"x": x})["logits"]
    """
    state.check_alive()
    with torch.no_grad(), module_mode(state.module, train):
        return _forward(state, batch, (state.params, state.buffers))


def eval_step(state: TrainState, batch: Any) -> dict[str, Any]:
    """Evaluate one batch: eval mode, no gradients, the state's precision policy.

    Args:
        state: the state (unchanged).
        batch: a batch the model's forward accepts, including what it needs for a loss.

    Returns:
        ``{"loss": 0-d float32 tensor, "outputs": the model's outputs}``.

    Example:
        >>> metrics = mf.eval_step(state, batch)
        >>> metrics["loss"], metrics["outputs"]["logits"]
    """
    outputs = apply_model(state, batch)
    loss = extract_loss(outputs, batch, state.loss_fn)
    return {"loss": loss.detach().float(), "outputs": outputs}
