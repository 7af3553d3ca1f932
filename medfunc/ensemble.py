"""Deep ensembles in one vectorised step: K members stacked on a leading axis.

``init_state`` builds K ordinary states (each member's weights drawn under its own seed, as
:func:`medfunc.init_state` does for a constructor), then stacks their params, buffers and
optimizer state along a new leading member axis. ``train_step`` runs every member's forward
and backward as one ``torch.func.vmap`` over ``torch.func.grad_and_value`` of a
``functional_call`` loss, then the optimizer once over all members, with each member's own
gradient norm, clipping, non-finite skip, step count and LR. The result equals training each
member alone with :func:`medfunc.train_step` to float rounding (see docs/ensemble.md).

The stacked state is an ordinary :class:`~medfunc.state.TrainState` whose ``tx`` is the
ensemble transformation (:func:`ensemble_tx`): its optimizer state holds the members' update
counts next to the stacked state of the wrapped transformation, so checkpoints
(``mf.save_state`` / ``mf.restore_state``) store and validate it like any other state.

Example:
    >>> from medfunc.recipes.breast_cancer import MLPClassifier
    >>> state = mf.ensemble.init_state(lambda: MLPClassifier(in_features=4), mf.optim.adamw(1e-3),
    ...                                members=3)
    >>> batch = {"features": torch.randn(8, 4), "labels": torch.randint(0, 2, (8,))}
    >>> state, metrics = mf.ensemble.train_step(state, batch)
    >>> metrics["loss"].shape, state.params["net.0.weight"].shape[0]
    (torch.Size([3]), 3)
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value, stack_module_state, vmap
from torch.utils import _pytree as torch_pytree

from medfunc.calling import call_model, check_batch, check_devices, extract_loss, module_mode
from medfunc.errors import ConfigError
from medfunc.optim import GradientTransformation, UpdateContext, find_optimizer
from medfunc.optim.base import get_substate
from medfunc.optim.masks import group_names
from medfunc.optim.torch_adapter import find_adapter
from medfunc.precision import autocast
from medfunc.rng import next_rng, seeded_rng
from medfunc.state import GradPath, TrainState, tree_map
from medfunc.state import init_state as init_member

__all__ = [
    "EnsembleOptState",
    "ensemble_tx",
    "eval_step",
    "init_state",
    "members_of",
    "train_step",
    "unstack",
]


class EnsembleOptState(NamedTuple):
    """Optimizer state of an ensemble (the state of :func:`ensemble_tx`).

    Attributes:
        count: int64 ``[K]`` on the params' device: updates applied to each member (its
            ``TrainState.step`` when trained alone: the LR schedule's position).
        seeds: int64 ``[K]`` on the CPU: each member's seed (weights and step RNG key).
        inner: the wrapped transformation's state, every tensor stacked on a leading ``[K]``.
    """

    count: Tensor
    seeds: Tensor
    inner: Any


class _Leaf(NamedTuple):
    """One transformation of a (nested) chain, with the path of its state."""

    tx: GradientTransformation
    path: tuple[int, ...]


def _leaves(tx: GradientTransformation, path: tuple[int, ...] = ()) -> list[_Leaf]:
    """The transformations a chain applies, in order (a non-chain is its own only leaf)."""
    if not tx.children:
        return [_Leaf(tx, path)]
    return [leaf for i, child in enumerate(tx.children) for leaf in _leaves(child, (*path, i))]


def _check_inner(tx: Any) -> GradientTransformation:
    """``tx`` when the ensemble can run it: one adamw/adam/sgd, other parts stateless."""
    if not isinstance(tx, GradientTransformation):
        raise ConfigError(
            f"tx must be a medfunc.optim.GradientTransformation, got {type(tx).__name__}"
        )
    if find_adapter(tx) is not None:
        raise ConfigError(
            "mf.ensemble runs medfunc's own optimizers (adamw, adam, sgd) over the stacked "
            "members; an optimizer wrapped with mf.optim.from_torch is not supported"
        )
    find_optimizer(tx)  # exactly one optimizer, else a ConfigError naming what was found
    return tx


def _member_view(tree: OrderedDict, start: int, stop: int) -> OrderedDict:
    """``tree[name][k]`` for members ``start..stop-1`` (views: writes reach the stack), keyed
    by the name for one member and by ``m{k}.{name}`` for several."""
    if stop - start == 1:
        return OrderedDict((name, t[start]) for name, t in tree.items())
    return OrderedDict(
        (f"m{k}.{name}", t[k]) for k in range(start, stop) for name, t in tree.items()
    )


def _optimizer_view(sub: Any, start: int, stop: int) -> Any:
    """The optimizer state of members ``start..stop-1`` keyed like :func:`_member_view`.

    Per-name dicts become member-view dicts; a per-parameter tensor (SGD's ``initialized``,
    ``[K, P]``) becomes its rows flattened member-major. All are views of the stacked state.
    """
    fields = []
    for value in sub:
        if isinstance(value, OrderedDict):
            fields.append(_member_view(value, start, stop))
        else:
            fields.append(value[start:stop].reshape(-1))
    return type(sub)(*fields)


def _renaming_is_exact(spec: Any, names: Sequence[str]) -> bool:
    """Whether the optimizer groups member-view names as it groups the model's names (its
    decay mask and LR multipliers see ``m0.{name}``); else the update runs per member."""
    base = group_names(names, spec.weight_decay, spec.decay_mask, spec.lr_multipliers)
    view = group_names(
        [f"m0.{n}" for n in names], spec.weight_decay, spec.decay_mask, spec.lr_multipliers
    )
    renamed = [(tuple(f"m0.{n}" for n in g.names), g.lr_multiplier, g.weight_decay) for g in base]
    return renamed == [(g.names, g.lr_multiplier, g.weight_decay) for g in view]


def _member_norms(grads: list[Tensor], members: int) -> Tensor:
    """Each member's global L2 gradient norm, ``[K]`` (as ``get_total_norm`` over its slices)."""
    per_param = [torch.linalg.vector_norm(g.reshape(members, -1), dim=1) for g in grads]
    return torch.linalg.vector_norm(torch.stack(per_param), dim=0)


def _learning_rates(spec: Any, count: Tensor) -> Tensor:
    """The base LR of each member at its own update count, float64 ``[K]``."""
    if not callable(spec.lr):
        return torch.full(count.shape, spec.lr, dtype=torch.float64, device=count.device)
    lrs = spec.lr(count)
    if isinstance(lrs, Tensor) and lrs.shape == count.shape:
        return lrs.to(torch.float64)
    return torch.stack([torch.as_tensor(spec.lr(c), dtype=torch.float64) for c in count])


def _runs(count: Tensor, skipped: Tensor, same_lr: bool) -> list[tuple[int, int]] | None:
    """Runs ``(start, stop)`` of consecutive members that one optimizer call may update
    together: not skipped, and at the same update count unless the LR is constant. Read on
    the host only when the flags live on the CPU (no device sync); None elsewhere."""
    if count.device.type != "cpu":
        return None
    counts, skips = count.tolist(), skipped.tolist()
    runs: list[tuple[int, int]] = []
    for k, (c, skip) in enumerate(zip(counts, skips)):
        if skip:
            continue
        if runs and runs[-1][1] == k and (same_lr or counts[runs[-1][0]] == c):
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


def _per_member(
    leaf: GradientTransformation,
    grads: OrderedDict,
    params: OrderedDict,
    contexts: list[UpdateContext],
) -> None:
    """Run a stateless transformation (clipping) on each member's slices, in place."""
    for k, ctx in enumerate(contexts):
        member_grads = OrderedDict((n, g[k]) for n, g in grads.items())
        member_params = OrderedDict((n, p[k]) for n, p in params.items())
        leaf.update(member_grads, (), member_params, ctx)


def _optimizer_calls(
    leaf: GradientTransformation,
    sub: Any,
    grads: OrderedDict,
    params: OrderedDict,
    contexts: list[UpdateContext],
    runs: list[tuple[int, int]] | None,
) -> None:
    """Apply the optimizer to every member, in place: one call per run of members that share
    a step (all members, usually) on the CPU; one call per member, with its skip flag and
    step count on the device, elsewhere (no host sync)."""
    if runs is None:
        runs = [(k, k + 1) for k in range(len(contexts))]
        flags = [ctx.found_inf for ctx in contexts]
    else:
        flags = [None] * len(contexts)
    for start, stop in runs:
        ctx = UpdateContext(step=contexts[start].step, found_inf=flags[start])
        leaf.update(
            _member_view(grads, start, stop),
            _optimizer_view(sub, start, stop),
            _member_view(params, start, stop),
            ctx,
        )


class _EnsembleInit:
    """``init`` of :func:`ensemble_tx`: the wrapped state of each member's slice, stacked."""

    def __init__(self, tx: GradientTransformation, seeds: tuple[int, ...]) -> None:
        self.tx = tx
        self.seeds = seeds

    def __call__(self, params: OrderedDict) -> EnsembleOptState:
        states = [
            self.tx.init(OrderedDict((n, p[k]) for n, p in params.items()))
            for k in range(len(self.seeds))
        ]
        first = next(iter(params.values()))
        return EnsembleOptState(
            count=torch.zeros(len(self.seeds), dtype=torch.int64, device=first.device),
            seeds=torch.tensor(self.seeds, dtype=torch.int64),
            inner=tree_map(lambda *leaves: torch.stack(leaves), *states),
        )


class _EnsembleUpdate:
    """``update`` of :func:`ensemble_tx` (see there)."""

    def __init__(self, tx: GradientTransformation, members: int) -> None:
        self.tx = tx
        self.members = members
        self.spec, self.path = find_optimizer(tx)
        self._exact_names: dict[tuple[str, ...], bool] = {}

    def __call__(
        self, grads: OrderedDict, state: EnsembleOptState, params: OrderedDict, ctx: UpdateContext
    ) -> tuple[OrderedDict, OrderedDict, EnsembleOptState]:
        names = tuple(params)
        norms = _member_norms(list(grads.values()), self.members)
        skipped = ~torch.isfinite(norms)
        found_inf = skipped.float()
        contexts = [
            UpdateContext(step=state.count[k], found_inf=found_inf[k], grad_norm=norms[k])
            for k in range(self.members)
        ]
        exact = self._exact_names.get(names)
        if exact is None:
            exact = self._exact_names[names] = _renaming_is_exact(self.spec, names)
        runs = _runs(state.count, skipped, not callable(self.spec.lr)) if exact else None
        with torch.no_grad():
            for leaf in _leaves(self.tx):
                if leaf.path == self.path:
                    sub = get_substate(state.inner, self.path)
                    _optimizer_calls(leaf.tx, sub, grads, params, contexts, runs)
                else:
                    _per_member(leaf.tx, grads, params, contexts)
        ctx.metrics.update(
            grad_norm=norms, lr=_learning_rates(self.spec, state.count), skipped=skipped
        )
        count = state.count + (~skipped).to(state.count.dtype)
        return grads, params, state._replace(count=count)


def ensemble_tx(tx: GradientTransformation, seeds: Sequence[int]) -> GradientTransformation:
    """The transformation of a stacked ensemble: ``tx`` applied to each member on its own.

    ``update`` takes gradients and params stacked on a leading member axis of size
    ``len(seeds)``. Each member gets its own global gradient norm, clipping (the chain's
    stateless parts, e.g. ``clip_by_global_norm``, run on the member's slices), non-finite skip
    (a member whose gradients are not finite keeps its params and optimizer state bitwise), update
    count and LR. The optimizer itself runs once over all members' slices (its kernels are
    elementwise and keep a step counter per tensor) when the members share a step or the LR is
    constant and the state lives on the CPU; on other devices once per member, so the skip
    flags and counts never leave the device. ``ctx.metrics`` gets ``grad_norm``, ``lr`` and
    ``skipped``, each ``[K]``.

    Args:
        tx: one adamw/adam/sgd, or a chain holding one and stateless transformations.
        seeds: the members' seeds (kept in the state for :func:`unstack`).

    Returns:
        The transformation; its state is an :class:`EnsembleOptState`.

    Example:
        >>> tx = ensemble_tx(mf.optim.sgd(0.1), seeds=[0, 1])
        >>> opt_state = tx.init(OrderedDict(w=torch.zeros(2, 3)))
        >>> opt_state.count
        tensor([0, 0])
    """
    tx = _check_inner(tx)
    seeds = tuple(int(s) for s in seeds)
    return GradientTransformation(_EnsembleInit(tx, seeds), _EnsembleUpdate(tx, len(seeds)))


def _inner_tx(state: TrainState) -> GradientTransformation:
    """The wrapped transformation of an ensemble state; ConfigError for any other state."""
    update = getattr(state.tx, "update", None)
    if not isinstance(update, _EnsembleUpdate):
        raise ConfigError(
            "expected a stacked ensemble state from mf.ensemble.init_state, got an ordinary "
            "TrainState; train it with mf.train_step"
        )
    return update.tx


def members_of(state: TrainState) -> int:
    """The number of members K of an ensemble state.

    Example:
        >>> state = init_state(lambda: torch.nn.Linear(3, 1), mf.optim.sgd(0.1), members=2)
        >>> members_of(state)
        2
    """
    _inner_tx(state)
    return state.tx.update.members


def _refuse_single_step(*_: Any) -> Any:
    raise ConfigError(
        "this is a stacked ensemble state (every tensor has a leading member axis); step it with "
        "mf.ensemble.train_step, or split it with mf.ensemble.unstack"
    )


def init_state(
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    tx: GradientTransformation,
    *,
    members: int,
    seeds: Sequence[int] | None = None,
    **init_state_kwargs: Any,
) -> TrainState:
    """Build a stacked ensemble of ``members`` states, each initialised from its own seed.

    Args:
        model: a zero-argument constructor of the model (called under ``torch.manual_seed``
            of each member's seed, as :func:`medfunc.init_state` does), or a module (every
            member then starts from its weights).
        tx: the members' transformation: one adamw/adam/sgd, or a chain of one with
            stateless parts such as ``clip_by_global_norm``.
        members: K, the number of members (>= 1).
        seeds: one integer per member (default ``range(K)``): initial weights and RNG key.
        **init_state_kwargs: passed to :func:`medfunc.init_state` (``loss_fn``, ``apply_fn``,
            ``precision`` "fp32" or "bf16", ``device``); not ``seed`` nor ``accumulate_steps``.

    Returns:
        A :class:`~medfunc.state.TrainState` whose params, buffers and optimizer state carry a
        leading member axis of size K; ``step`` counts the steps in which some member was
        updated, the per-member counts are ``opt_state.count``.

    Raises:
        ConfigError: a bad ``members``/``seeds``, an unsupported ``tx``, fp16 or accumulation.

    Example:
        >>> state = init_state(lambda: torch.nn.Linear(3, 1), mf.optim.adamw(1e-3), members=4,
        ...                    loss_fn=lambda out, x: out.square().mean())
        >>> state.params["weight"].shape
        torch.Size([4, 1, 3])
    """
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise ConfigError(f"members must be an integer >= 1, got {members!r}")
    seeds = tuple(range(members)) if seeds is None else tuple(seeds)
    if len(seeds) != members or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds must be {members} integers (one per member), got {seeds!r}")
    for key in ("seed", "accumulate_steps"):
        if key in init_state_kwargs:
            raise ConfigError(
                f"mf.ensemble.init_state takes no {key!r}: each member's seed comes from seeds=, "
                "and the ensemble step does not accumulate gradients"
            )
    if init_state_kwargs.get("ema_decay") is not None:
        raise ConfigError(
            "mf.ensemble.init_state takes no ema_decay: the ensemble step keeps no moving "
            "average of the members' weights; average the unstacked states' weights yourself"
        )
    stacked_tx = ensemble_tx(tx, seeds)
    states = [init_member(model, tx, seed=s, **init_state_kwargs) for s in seeds]
    first = states[0]
    if first.policy.loss_scaling:
        raise ConfigError(
            "mf.ensemble supports precision 'fp32' and 'bf16'; fp16 loss scaling is per state "
            "and not vectorised: use bf16"
        )
    modules = [s.module for s in states]
    params, buffers = stack_module_state(modules) if members > 1 else _single(first)
    params = OrderedDict((n, params[n].detach()) for n in first.params)
    buffers = OrderedDict((n, buffers[n]) for n in first.buffers)
    trainable = OrderedDict((n, params[n]) for n in first.trainable)
    opt_state = stacked_tx.init(trainable)
    opt_state = opt_state._replace(
        inner=tree_map(lambda *leaves: torch.stack(leaves), *(s.opt_state for s in states))
    )
    return first.replace(
        params=params,
        buffers=buffers,
        opt_state=opt_state,
        rng=torch.tensor([seeds[0], 0], dtype=torch.int64),
        tx=stacked_tx,
        grad_path=GradPath("ensemble", value_and_grad=_refuse_single_step),
    )


def _single(state: TrainState) -> tuple[dict, dict]:
    """One member's params and buffers with a leading axis of 1 (copies)."""
    params = {n: p.detach().clone().unsqueeze(0) for n, p in state.params.items()}
    buffers = {n: b.clone().unsqueeze(0) for n, b in state.buffers.items()}
    return params, buffers


def _leading(value: Any) -> int | None:
    return value.shape[0] if isinstance(value, Tensor) and value.dim() > 0 else None


def batch_in_dims(batch: Any, members: int, per_member: bool | None) -> Any:
    """The ``vmap`` in_dims of a batch: None (shared by all members) or, per tensor, 0.

    The rule: a batch is shared unless ``per_member=True``, which needs every tensor in it to
    have a leading member axis of size K. With ``per_member=None`` (the default) a batch whose
    tensors all have a leading size of K is ambiguous (a shared batch of K examples, or one
    example per member?) and refused.

    Args:
        batch: the batch.
        members: K.
        per_member: True, False or None (decide; refuse ambiguous batches).

    Returns:
        None, or a pytree like ``batch`` with 0 at each tensor and None elsewhere.

    Raises:
        ConfigError: an ambiguous batch, or ``per_member=True`` with a tensor lacking the axis.

    Example:
        >>> batch_in_dims({"x": torch.zeros(8, 3)}, 4, None) is None
        True
        >>> batch_in_dims({"x": torch.zeros(4, 8, 3)}, 4, True)
        {'x': 0}
    """
    leaves = [v for v in torch_pytree.tree_leaves(batch) if isinstance(v, Tensor)]
    sizes = [_leading(v) for v in leaves]
    if per_member is None:
        if leaves and all(s == members for s in sizes):
            raise ConfigError(
                f"ambiguous batch: every tensor has a leading size of {members}, the number of "
                "members. Pass per_member=True (one slice per member) or per_member=False (one "
                "shared batch of that many examples)"
            )
        return None
    if not per_member:
        return None
    wrong = [tuple(v.shape) for v, s in zip(leaves, sizes) if s != members]
    if not leaves or wrong:
        raise ConfigError(
            f"per_member=True needs every batch tensor to have a leading member axis of size "
            f"{members}; found shapes {wrong[:4] or 'no tensors'}"
        )
    return torch_pytree.tree_map(lambda v: 0 if isinstance(v, Tensor) else None, batch)


def _vectorised(fn: Callable, batch: Any, in_dims: Any, *trees: Any) -> Any:
    """``fn(*member_trees, member_batch)`` vmapped over the members (own dropout masks each)."""
    dims = (*(0 for _ in trees), in_dims)
    return vmap(fn, in_dims=dims, randomness="different")(*trees, batch)


def train_step(
    state: TrainState, batch: Any, *, donate: bool = False, per_member: bool | None = None
) -> tuple[TrainState, dict[str, Tensor]]:
    """One training step of every member: one vectorised forward and backward, then the
    optimizer with each member's own norm, clipping, skip, update count and LR.

    Args:
        state: a stacked state from :func:`init_state` (unchanged unless ``donate``).
        batch: one batch for all members, or (``per_member=True``) tensors with a leading
            member axis of size K, slice k for member k. See :func:`batch_in_dims`.
        donate: reuse the state's storage for the result (the given state is then consumed).
        per_member: the batch carries a member axis (True), is shared (False), or decide
            (None: shared, refusing a batch whose tensors all lead with size K).

    Returns:
        ``(new_state, metrics)``; metrics are ``[K]`` device tensors: ``loss``, ``grad_norm``
        (pre-clip), ``lr``, ``skipped`` (that member's gradients were not finite: its params
        and optimizer state were kept) and ``applied``.

    Example:
        >>> state = init_state(lambda: torch.nn.Linear(3, 1), mf.optim.sgd(0.1), members=2,
        ...                    loss_fn=lambda out, x: out.square().mean())
        >>> state, metrics = train_step(state, torch.randn(5, 3))
        >>> metrics["skipped"]
        tensor([False, False])
    """
    state.check_alive()
    members = members_of(state)
    module, names = state.module, state.trainable
    check_batch(module, state.apply_fn, batch)
    check_devices(batch, state.device)
    in_dims = batch_in_dims(batch, members, per_member)
    copy_tree = (lambda tree: tree) if donate else (lambda tree: tree_map(torch.clone, tree))
    params = OrderedDict(state.params)
    trainable = OrderedDict((n, params[n] if donate else params[n].clone()) for n in names)
    frozen = OrderedDict((n, p) for n, p in params.items() if n not in trainable)
    buffers, opt_state = copy_tree(state.buffers), copy_tree(state.opt_state)

    def member_loss(train: dict, fixed: dict, bufs: dict, member_batch: Any) -> Tensor:
        bound = ({**train, **fixed}, bufs)
        outputs = call_model(module, state.apply_fn, member_batch, bound)
        return extract_loss(outputs, member_batch, state.loss_fn)

    with seeded_rng(state.rng, state.device), module_mode(module, True):
        with autocast(state.policy, state.device):
            grads, loss = _vectorised(
                grad_and_value(member_loss), batch, in_dims, trainable, frozen, buffers
            )
    ctx = UpdateContext(step=state.step)
    _, trainable, opt_state = state.tx.update(OrderedDict(grads), opt_state, trainable, ctx)
    params.update(trainable)
    skipped = ctx.metrics["skipped"]
    metrics = {
        "loss": loss.detach().float(),
        "grad_norm": ctx.metrics["grad_norm"],
        "lr": ctx.metrics["lr"],
        "skipped": skipped,
        "applied": torch.ones(members, dtype=torch.bool, device=state.device),
    }
    new_state = state.replace(
        params=params,
        buffers=buffers,
        opt_state=opt_state,
        step=state.step + (~skipped).any().to(state.step.dtype),
        rng=next_rng(state.rng),
    )
    if donate:
        state.mark_consumed()
    return new_state, metrics


def _main_output(outputs: Any) -> Tensor:
    """The output the ensemble summarises: a tensor output, or ``outputs["logits"]``."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
    if logits is None:
        logits = getattr(outputs, "logits", None)
    if not isinstance(logits, Tensor):
        raise ConfigError(
            "mf.ensemble.eval_step summarises a tensor output or outputs['logits']; the model "
            f"returned {type(outputs).__name__} without either"
        )
    return logits


def eval_step(state: TrainState, batch: Any, *, per_member: bool | None = None) -> dict[str, Any]:
    """Evaluate every member on one batch: eval mode, no gradients, one vectorised forward.

    Args:
        state: a stacked state (unchanged).
        batch: a batch the model accepts, with what its loss needs (as
            :func:`medfunc.eval_step`); shared or per member as in :func:`train_step`.
        per_member: as :func:`train_step`.

    Returns:
        ``{"loss": [K] float32, "outputs": each member's outputs (leading axis K), "mean": the
        members' mean of the main output (a tensor output or ``logits``), "spread": their
        standard deviation (population, ``correction=0``)}``.

    Example:
        >>> state = init_state(lambda: torch.nn.Linear(3, 2), mf.optim.sgd(0.1), members=3,
        ...                    loss_fn=lambda out, x: out.square().mean())
        >>> result = eval_step(state, torch.randn(5, 3))
        >>> result["outputs"].shape, result["mean"].shape, result["spread"].shape
        (torch.Size([3, 5, 2]), torch.Size([5, 2]), torch.Size([5, 2]))
    """
    state.check_alive()
    members = members_of(state)
    check_batch(state.module, state.apply_fn, batch)
    check_devices(batch, state.device)
    in_dims = batch_in_dims(batch, members, per_member)

    def member_eval(params: dict, bufs: dict, member_batch: Any) -> tuple[Any, Tensor]:
        outputs = call_model(state.module, state.apply_fn, member_batch, (params, bufs))
        return outputs, extract_loss(outputs, member_batch, state.loss_fn).float()

    with torch.no_grad(), module_mode(state.module, False):
        with autocast(state.policy, state.device):
            outputs, loss = _vectorised(
                member_eval, batch, in_dims, dict(state.params), dict(state.buffers)
            )
    main = _main_output(outputs).float()
    return {
        "loss": loss,
        "outputs": outputs,
        "mean": main.mean(dim=0),
        "spread": main.std(dim=0, correction=0),
    }


def unstack(state: TrainState) -> list[TrainState]:
    """Split a stacked state into K ordinary states, each continuing exactly with
    :func:`medfunc.train_step` (own copies of every tensor; a copy of the module each).

    Member k's ``step`` is its update count, its RNG key its seed (the step counter carries
    over), its transformation the wrapped ``tx``.

    Args:
        state: a stacked state (unchanged).

    Returns:
        The K member states.

    Example:
        >>> state = init_state(lambda: torch.nn.Linear(3, 1), mf.optim.adamw(1e-3), members=2)
        >>> [tuple(s.params["weight"].shape) for s in unstack(state)]
        [(1, 3), (1, 3)]
    """
    state.check_alive()
    tx = _inner_tx(state)
    opt: EnsembleOptState = state.opt_state
    counter = int(state.rng[1])
    result = []
    for k, seed in enumerate(opt.seeds.tolist()):
        module = copy.deepcopy(state.module)
        result.append(
            TrainState(
                params=OrderedDict((n, p[k].clone()) for n, p in state.params.items()),
                buffers=OrderedDict((n, b[k].clone()) for n, b in state.buffers.items()),
                opt_state=tree_map(lambda t, k=k: t[k].clone(), opt.inner),
                loss_scale=(),
                step=opt.count[k].clone(),
                rng=torch.tensor([seed, counter], dtype=torch.int64),
                accum=(),
                module=module,
                tx=tx,
                loss_fn=state.loss_fn,
                policy=state.policy,
                accumulate_steps=1,
                trainable_names=state.trainable,
                apply_fn=state.apply_fn,
            )
        )
    return result
