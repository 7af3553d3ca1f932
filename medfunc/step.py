"""train_step and eval_step: one training step as a function of (state, batch).

``train_step`` runs the forward pass through ``torch.func.functional_call`` with the state's
params and buffers, takes gradients with ``torch.autograd.grad``, then (every
``accumulate_steps``-th call) unscales, measures, clips and applies them with the state's
gradient transformation. Nothing in it waits for the device: the non-finite guard, the loss
scale and the LR are device tensors.

A trainable parameter that takes no part in the loss gets no gradient (None), as its ``.grad``
stays None in an imperative loop, and the update treats it as ``torch.optim`` does (see
:mod:`medfunc.optim.base`). Under accumulation a parameter has a gradient when some micro-batch
of the window differentiated it; the window's set lives in the state as host-side structure
(:class:`WindowGrads`). Which gradients are None is known in Python, while tracing too, so
a compiled step is specialised on it.

Example:
    >>> model = torch.nn.Linear(4, 1)
    >>> loader = [torch.randn(8, 4) for _ in range(3)]
    >>> state = mf.init_state(model, mf.optim.adamw(1e-3), loss_fn=lambda out, x: out.mean())
    >>> for batch in loader:
    ...     state, metrics = mf.train_step(state, batch, donate=True)
    >>> int(state.step)
    3
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from medfunc.accumulation import (
    WindowGrads,
    next_count,
    next_window,
    window_grads,
    window_of,
    window_position,
)
from medfunc.calling import call_model, check_batch, check_devices, extract_loss, module_mode
from medfunc.errors import ConfigError, LossError
from medfunc.optim import UpdateContext
from medfunc.precision import autocast, unscale_and_check, update_scale
from medfunc.rng import next_rng, seeded_rng
from medfunc.state import AccumState, GradPath, TrainState, fields_of, tree_map


class StepStatic(NamedTuple):
    """The non-tensor facts of a state that a step (and a compiled step) is specialised on."""

    module: torch.nn.Module
    tx: Any
    loss_fn: Callable | None
    policy: Any
    accumulate_steps: int
    grad_path: GradPath | None
    names: tuple[str, ...]
    device: torch.device
    apply_fn: Callable | None = None
    ema_decay: float | None = None


class StepTrees(NamedTuple):
    """The device tensors a step reads and writes (a state without its CPU counters)."""

    params: OrderedDict
    buffers: OrderedDict
    opt_state: Any
    loss_scale: Any
    step: torch.Tensor
    accum_grads: Any
    loss_sum: Any
    ema: Any = ()


def static_of(state: TrainState) -> StepStatic:
    """The static half of ``state`` (what a compiled step is specialised on)."""
    f = fields_of(state)
    names = f["trainable_names"]
    return StepStatic(
        f["module"],
        f["tx"],
        f["loss_fn"],
        f["policy"],
        f["accumulate_steps"],
        f["grad_path"],
        names if names is not None else state.trainable,
        f["step"].device,
        f["apply_fn"],
        f["ema_decay"],
    )


def trees_of(state: TrainState, *, copy: bool) -> StepTrees:
    """The state's device tensors; with ``copy`` every tensor a step writes is cloned first."""
    own = (lambda tree: tree_map(torch.clone, tree)) if copy else (lambda tree: tree)
    f = fields_of(state)
    params = OrderedDict(f["params"])
    if copy:
        with torch.no_grad():
            params.update((n, f["params"][n].clone()) for n in state.trainable)
    accum = f["accum"]
    return StepTrees(
        params=params,
        buffers=own(f["buffers"]),
        opt_state=own(f["opt_state"]),
        loss_scale=own(f["loss_scale"]),
        step=f["step"],
        accum_grads=OrderedDict(own(accum.grads)) if accum else (),
        loss_sum=own(accum.loss_sum) if accum else (),
        ema=own(f["ema"]),
    )


def grad_leaves(trees: StepTrees, names: tuple[str, ...]) -> StepTrees:
    """``trees`` with each trainable param a leaf that requires grad (the param itself when it
    already is one, else a detached alias of its storage, which the update writes through).

    Called before tracing: dynamo before torch 2.12 cannot trace ``requires_grad_``.
    """
    if all(trees.params[n].requires_grad and trees.params[n].is_leaf for n in names):
        return trees
    params = OrderedDict(trees.params)
    for n in names:
        p = params[n]
        if not (p.requires_grad and p.is_leaf):
            params[n] = p.detach().requires_grad_(True)
    return trees._replace(params=params)


def without_grad_leaves(out: StepTrees, plain: StepTrees, names: tuple[str, ...]) -> StepTrees:
    """``out`` with the trainable params that :func:`grad_leaves` aliased handed back as the
    ``plain`` tensors they alias (same storage, no autograd flag), so a returned state never
    holds tensors that require grad."""
    params = OrderedDict(out.params)
    for n in names:
        p, q = params[n], plain.params[n]
        if p is not q and p.requires_grad and not q.requires_grad and p.data_ptr() == q.data_ptr():
            params[n] = q
    return out._replace(params=params)


# Bumped whenever any module anywhere registers a parameter, buffer or submodule, so that a
# module's named tensors can be cached between steps instead of walked every step.
_STRUCTURE = [0]


def _structure_changed(*_: Any) -> None:
    _STRUCTURE[0] += 1


register_module_parameter_registration_hook(_structure_changed)
register_module_buffer_registration_hook(_structure_changed)
register_module_module_registration_hook(_structure_changed)
_NAMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _named_tensors(module: torch.nn.Module) -> tuple[dict, dict]:
    """``(named_parameters, named_buffers)`` of ``module`` as dicts, cached until a module
    registers a new parameter, buffer or submodule."""
    entry = _NAMED.get(module)
    if entry is None or entry[0] != _STRUCTURE[0]:
        entry = (_STRUCTURE[0], dict(module.named_parameters()), dict(module.named_buffers()))
        _NAMED[module] = entry
    return entry[1], entry[2]


def _own_parameters(static: StepStatic, trees: StepTrees) -> list[torch.Tensor] | None:
    """The module's own Parameters for the trainable names when ``trees`` hold exactly the
    module's tensors (a state from ``init_state`` that was only ever donated), else None.

    Then the forward calls the module directly, skipping ``functional_call``'s re-binding.
    """
    module_params, module_buffers = _named_tensors(static.module)
    for own, values in ((module_params, trees.params), (module_buffers, trees.buffers)):
        if len(own) != len(values):
            return None
        for name, value in values.items():
            tensor = own.get(name)
            if tensor is value:
                continue  # the module's own tensor (what a donated step hands back)
            if tensor is None or tensor.data_ptr() != value.data_ptr():
                return None
            if tensor.shape != value.shape:
                return None
    return [module_params[n] for n in static.names]


def _value_and_grad(
    static: StepStatic,
    trees: StepTrees,
    batch: Any,
    objective: Callable[[torch.Tensor], torch.Tensor],
    own: list[torch.Tensor] | None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The default gradient path: the forward (the module itself when ``own`` holds its
    Parameters, else ``functional_call`` over ``trees``) and ``torch.autograd.grad``; a
    parameter the loss does not depend on gets None."""
    leaves = own if own is not None else [trees.params[n] for n in static.names]
    bindings = None if own is not None else (trees.params, trees.buffers)
    with torch.enable_grad():
        with autocast(static.policy, static.device):
            outputs = call_model(static.module, static.apply_fn, batch, bindings)
        loss = extract_loss(outputs, batch, static.loss_fn)
        del outputs  # the outputs (e.g. an LM's logits) need not live through the backward pass
        if not loss.requires_grad:
            raise LossError(
                "the loss does not depend on any trainable parameter (it does not require "
                "grad): was it computed under torch.no_grad(), detached, or from frozen "
                "parameters only?"
            )
        grads = torch.autograd.grad(objective(loss), leaves, allow_unused=True)
    return loss.detach().float(), list(grads)


def forward_backward(
    static: StepStatic, trees: StepTrees, batch: Any, own: list[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor | None], torch.Tensor, tuple[str, ...]]:
    """Forward, loss, backward and (under accumulation) the running sums.

    Args:
        static: the step's static facts.
        trees: the step's tensors (trainable params are leaves that require grad, see
            :func:`grad_leaves`, unless ``own`` is given).
        batch: the batch.
        own: the module's own Parameters when the module may be called directly.

    Returns:
        ``(grads, loss, present)``: the gradients (None for a parameter the loss does not
        depend on; under accumulation the running sums of every trainable parameter, see
        :func:`window_grads`), the loss metric (the window's loss sum under accumulation) and
        the names of the parameters this call's backward pass reached, in model order.
    """
    k = static.accumulate_steps
    scale = trees.loss_scale.scale if trees.loss_scale else None

    def objective(loss: torch.Tensor) -> torch.Tensor:
        scaled = loss / k if k > 1 else loss
        return scaled * scale if scale is not None else scaled

    path = static.grad_path
    if path is not None and path.value_and_grad is not None:
        loss, grads = path.value_and_grad(static, trees, batch, objective)
    else:
        loss, grads = _value_and_grad(static, trees, batch, objective, own)
    present = tuple(n for n, g in zip(static.names, grads) if g is not None)
    if k == 1:
        return grads, loss, present
    accumulated = list(trees.accum_grads.values())
    pairs = [(a, g) for a, g in zip(accumulated, grads) if g is not None]
    if pairs:
        torch._foreach_add_([a for a, _ in pairs], [g for _, g in pairs])
    return accumulated, trees.loss_sum.add_(loss).clone(), present


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm; for sharded (DTensor) gradients the full norm as a plain tensor."""
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def not_applied(
    static: StepStatic, trees: StepTrees, loss: torch.Tensor
) -> tuple[StepTrees, dict[str, torch.Tensor]]:
    """The metrics of an accumulate-only call (no update; ``trees`` unchanged)."""
    device = static.device
    nan = torch.full((), float("nan"), device=device)
    metrics = {
        "loss": loss,
        "grad_norm": nan,
        "lr": torch.full((), float("nan"), dtype=torch.float64, device=device),
        "skipped": torch.zeros((), dtype=torch.bool, device=device),
        "applied": torch.zeros((), dtype=torch.bool, device=device),
    }
    if trees.loss_scale:
        metrics["loss_scale"] = trees.loss_scale.scale.clone()
    return trees, metrics


def _lr_metric(ctx: UpdateContext, device: torch.device) -> torch.Tensor:
    """The update's LR as a float64 0-d tensor (NaN when no transformation reported one)."""
    lr = ctx.metrics.get("lr")
    if lr is None:
        return torch.full((), float("nan"), dtype=torch.float64, device=device)
    return lr if lr.dtype == torch.float64 else lr.to(torch.float64)


def _finite_check(
    grad_norm: torch.Tensor, step: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Whether an update without loss scaling is skipped: its gradients' norm is NaN or inf
    exactly when some gradient element is.

    Args:
        grad_norm: the gradients' global norm (0-d).
        step: the step counter before the update.

    Returns:
        ``(skipped, found_inf, next_step)``: the 0-d bool ``skipped`` metric, the optimizer's
        skip flag (see :class:`~medfunc.optim.UpdateContext`) and the counter after the
        update (advanced unless skipped). A CPU norm outside ``torch.compile`` is host memory,
        read for free: the outcome is then decided on the host and a finite update gets
        ``found_inf=None`` (nothing for the optimizer to skip). Elsewhere it stays on the device
        without a sync: ``x - x`` is exactly 0 for a finite x and NaN for inf or NaN (two ops
        where ``isfinite`` takes five).
    """
    if grad_norm.is_cpu and not torch.compiler.is_compiling():
        if math.isfinite(grad_norm.item()):
            return torch.zeros((), dtype=torch.bool), None, step + 1
        return torch.ones((), dtype=torch.bool), torch.ones(()), step.clone()
    applied = (grad_norm - grad_norm) == 0
    skipped = ~applied
    return skipped, skipped.float(), step + applied  # int64 + bool stays int64


def update_ema(ema: Any, params: OrderedDict, found_inf: torch.Tensor | None, decay: float) -> None:
    """Advance the parameters' moving average in place after an optimizer update, as
    ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)).update_parameters(model)``:
    the first update copies the parameters, later ones lerp towards them by ``1 - decay``; an
    update skipped for non-finite gradients leaves the average and its count alone.

    One ``torch._foreach_lerp_`` per dtype with the weight as a device tensor (1 on the first
    update, ``1 - decay`` after, 0 when skipped), so nothing waits for the device. Lerp returns
    its end point exactly at weight 1 and its start at weight 0, and a float32 (or float64)
    weight tensor equals the Python-float weight of the reference bitwise.

    Args:
        ema: the :class:`~medfunc.state.EmaState` (updated in place).
        params: the parameters after the update, keyed like ``ema.params``.
        found_inf: the step's non-finite flag (0-d float, nonzero: skipped), or None for an
            update known to be applied.
        decay: the EMA decay.
    """
    later = torch.full((), 1.0 - decay, dtype=torch.float64, device=ema.count.device)
    weight = later.masked_fill(ema.count == 0, 1.0)
    applied: torch.Tensor | int = 1
    if found_inf is not None:
        applied = found_inf == 0
        weight = weight * applied
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    for name, average in ema.params.items():
        averages, targets = by_dtype.setdefault(average.dtype, ([], []))
        averages.append(average)
        targets.append(params[name].detach())
    for dtype, (averages, targets) in by_dtype.items():
        w = weight.to(dtype)
        torch._foreach_lerp_(averages, targets, [w] * len(averages))
    ema.count.add_(applied)


def apply_update(
    static: StepStatic, trees: StepTrees, grads: list[torch.Tensor | None], loss: torch.Tensor
) -> tuple[StepTrees, dict[str, torch.Tensor]]:
    """Reduce, unscale, check, measure, clip and apply ``grads``; advance the step counter and
    the loss scale; reset the accumulation window. No host syncs.

    A None gradient (a parameter without one) is left out of the unscaling, the non-finite
    check and the norm, and the optimizer skips its parameter, as torch does. A data-parallel
    reduce may give it one (another rank's) or keep it None.

    Returns:
        ``(trees, metrics)`` with the updated tensors (the step counter is a new tensor).
    """
    names = static.names
    device = static.device
    loss_scale = trees.loss_scale
    path = static.grad_path
    grads = list(grads)
    if path is not None and path.reduce is not None:
        path.reduce(grads)
    if loss_scale:
        found_inf = unscale_and_check(grads, loss_scale)
    present = [g for g in grads if g is not None]
    grad_norm = _total_norm(present) if present else torch.zeros((), device=device)
    if loss_scale:
        applied, skipped = found_inf == 0, found_inf > 0
        step = trees.step + applied  # int64 + bool stays int64
    else:
        skipped, found_inf, step = _finite_check(grad_norm, trees.step)
    ctx = UpdateContext(step=trees.step, found_inf=found_inf, grad_norm=grad_norm, metrics={})
    trainable = OrderedDict((n, trees.params[n]) for n in names)
    with torch.no_grad():
        _, trainable, opt_state = static.tx.update(
            OrderedDict(zip(names, grads)), trees.opt_state, trainable, ctx
        )
    params = OrderedDict(trees.params)
    params.update(trainable)
    if trees.ema:
        update_ema(trees.ema, params, found_inf, static.ema_decay)
    if loss_scale:
        update_scale(static.policy, loss_scale, found_inf)
    if static.accumulate_steps > 1:
        torch._foreach_zero_(list(trees.accum_grads.values()))
        trees.loss_sum.zero_()
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": _lr_metric(ctx, device),
        "skipped": skipped,
        "applied": torch.ones((), dtype=torch.bool, device=device),
    }
    if loss_scale:
        metrics["loss_scale"] = loss_scale.scale.clone()
    # built field by field: dynamo before torch 2.12 traces NamedTuple._replace to an empty tuple
    new_trees = StepTrees(
        params=params,
        buffers=trees.buffers,
        opt_state=opt_state,
        loss_scale=trees.loss_scale,
        step=step,
        accum_grads=trees.accum_grads,
        loss_sum=trees.loss_sum,
        ema=trees.ema,
    )
    return new_trees, metrics


def step_core(
    static: StepStatic,
    apply: bool,
    trees: StepTrees,
    batch: Any,
    own: list[torch.Tensor] | None = None,
    window: tuple[str, ...] = (),
) -> tuple[StepTrees, dict[str, torch.Tensor], tuple[str, ...]]:
    """One step's tensor work: what ``train_step`` and ``compile_step`` both run.

    ``trees`` are owned by the call (donated or cloned) and updated in place where the kernels
    allow. The caller seeds the RNG and sets train mode (host work, outside any traced region).

    Args:
        static: the state's static facts (:func:`static_of`).
        apply: this call ends an accumulation window and applies the update.
        trees: the step's tensors (:func:`trees_of`, then :func:`grad_leaves`).
        batch: the batch.
        own: the module's own Parameters when the module may be called directly.
        window: under accumulation, the names earlier micro-batches of the window
            differentiated (:func:`window_of`); read only when ``apply``.

    Returns:
        ``(trees, metrics, present)``; under accumulation ``metrics["loss"]`` is the window's
        loss sum (:func:`finish_step` turns it into the mean); ``present`` names the parameters
        this call's backward pass reached (see :func:`next_window`).
    """
    grads, loss, present = forward_backward(static, trees, batch, own)
    if not apply:
        trees, metrics = not_applied(static, trees, loss)
        return trees, metrics, present
    if static.accumulate_steps > 1:
        grads = window_grads(static.names, grads, (*window, *present))
    trees, metrics = apply_update(static, trees, grads, loss)
    return trees, metrics, present


def finish_step(
    state: TrainState,
    trees: StepTrees,
    metrics: dict[str, torch.Tensor],
    *,
    count: int,
    donate: bool,
    window: tuple[str, ...] = (),
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """The host-side end of a step: the window's mean loss, the RNG counter, the accumulation
    counter and the window's used names (``window``, see :func:`next_window`), the new state;
    the given state is consumed when donated."""
    f = fields_of(state)
    k = f["accumulate_steps"]
    accum: AccumState | tuple = ()
    if k > 1:
        metrics["loss"] = metrics["loss"] / (count + 1)
        grads = WindowGrads(trees.accum_grads, window)
        accum = AccumState(grads, next_count(count, k), trees.loss_sum)
    new_state = state.replace(
        params=trees.params,
        buffers=trees.buffers,
        opt_state=trees.opt_state,
        loss_scale=trees.loss_scale,
        step=trees.step,
        rng=next_rng(f["rng"]),
        accum=accum,
        ema=trees.ema,
    )
    if donate:
        state.mark_consumed()
    return new_state, metrics


def train_step(
    state: TrainState, batch: Any, *, donate: bool = False
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """One training step (one micro-batch under gradient accumulation).

    Args:
        state: the current state; unchanged by the call unless ``donate``.
        batch: a dict (``model(**batch)``), tuple/list (``model(*batch)``) or tensor.
        donate: reuse the state's storage for the result; the given state is then consumed and
            any later use of it raises :class:`~medfunc.errors.ConsumedStateError`. States of
            back-ends that own the weights (FSDP2) always donate.

    Returns:
        ``(new_state, metrics)``; metrics are 0-d device tensors: ``loss`` (mean over the
        accumulation window so far), ``grad_norm`` (pre-clip; NaN when nothing was applied),
        ``lr`` (NaN when nothing was applied), ``skipped`` (non-finite gradients: the update was
        not applied), ``applied`` (this call applied an optimizer update) and, under fp16,
        ``loss_scale``.

    Example:
        >>> from medfunc.recipes.breast_cancer import MLPClassifier   # returns {"logits", "loss"}
        >>> state = mf.init_state(MLPClassifier(in_features=4), mf.optim.adamw(1e-3))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> state, metrics = mf.train_step(state, {"features": x, "labels": y})
        >>> float(metrics["loss"])
        0.73...
    """
    state.check_alive()
    static = static_of(state)
    if not static.names:
        raise ConfigError(
            "the state has no trainable parameters (every parameter had requires_grad=False "
            "when init_state ran); unfreeze some (param.requires_grad_(True)) and build the "
            "state again"
        )
    if static.grad_path is not None and static.grad_path.engine is not None:
        raise ConfigError(
            f"this state steps through its {static.grad_path.name} engine; call "
            "mf.distributed.deepspeed_step(state, batch) (or mf.distributed.step_for(state))"
        )
    path = static.grad_path
    donate = donate or (path is not None and path.always_donates)
    check_batch(static.module, static.apply_fn, batch)
    check_devices(batch, static.device)
    count, apply = window_position(state)
    window = window_of(state, count)
    trees = trees_of(state, copy=not donate)
    plain, own = trees, None
    if path is None or path.value_and_grad is None:
        own = _own_parameters(static, trees) if donate else None
        if own is None:
            trees = grad_leaves(trees, static.names)
    aliased = trees is not plain
    with seeded_rng(state.rng, static.device), module_mode(static.module, True):
        trees, metrics, present = step_core(static, apply, trees, batch, own, window)
    if aliased:
        trees = without_grad_leaves(trees, plain, static.names)
    window = next_window(static.names, window, present, apply)
    return finish_step(state, trees, metrics, count=count, donate=donate, window=window)


def _forward(state: TrainState, batch: Any) -> Any:
    """The model's outputs with the state's params and buffers bound, under its autocast."""
    check_batch(state.module, state.apply_fn, batch)
    check_devices(batch, state.device)
    with autocast(state.policy, state.device):
        return call_model(state.module, state.apply_fn, batch, (state.params, state.buffers))


def apply_model(state: TrainState, batch: Any, *, train: bool = False) -> Any:
    """Run the model on ``batch`` with the state's params and buffers, without gradients.

    Args:
        state: the state.
        batch: model inputs (dict, tuple/list or tensor), labels optional.
        train: run in train mode (default: eval mode, dropout off, BatchNorm running stats).

    Returns:
        The model's raw outputs.

    Example:
        >>> from medfunc.recipes.breast_cancer import MLPClassifier
        >>> state = mf.init_state(MLPClassifier(in_features=4), mf.optim.adamw(1e-3))
        >>> x = torch.randn(8, 4)
        >>> logits = mf.apply_model(state, {"features": x})["logits"]
        >>> logits.shape
        torch.Size([8, 2])
    """
    state.check_alive()
    with torch.no_grad(), module_mode(state.module, train):
        return _forward(state, batch)


def eval_step(state: TrainState, batch: Any) -> dict[str, Any]:
    """Evaluate one batch: eval mode, no gradients, the state's precision policy.

    Args:
        state: the state (unchanged).
        batch: a batch the model's forward accepts, including what it needs for a loss.

    Returns:
        ``{"loss": 0-d float32 tensor, "outputs": the model's outputs}``.

    Example:
        >>> from medfunc.recipes.breast_cancer import MLPClassifier
        >>> state = mf.init_state(MLPClassifier(in_features=4), mf.optim.adamw(1e-3))
        >>> batch = {"features": torch.randn(8, 4), "labels": torch.randint(0, 2, (8,))}
        >>> metrics = mf.eval_step(state, batch)
        >>> metrics["loss"], metrics["outputs"]["logits"].shape
        (tensor(0.69...), torch.Size([8, 2]))
    """
    outputs = apply_model(state, batch)
    loss = extract_loss(outputs, batch, state.loss_fn)
    return {"loss": loss.detach().float(), "outputs": outputs}
