"""The gradient-transformation contract: :class:`GradientTransformation`, :class:`UpdateContext`,
:func:`chain`.

medfunc follows optax's shape with one difference forced by exactness: PyTorch's optimizer kernels
update parameters in place, so a transformation receives the parameters too and returns them.
``grads``, ``params`` and the optimizer state given to ``update`` are owned by the caller (clones
in a pure step, donated storage otherwise); transformations modify them in place and return them.

A gradient may be None: the parameter got no gradient in this update (it took no part in the
loss). Every transformation then treats it as ``torch.optim`` treats ``p.grad is None``: it is
left out of norms and clipping, and the optimizers neither decay nor move it, nor advance its step
count or create its state. Which gradients are None is a host-side fact known before the update
runs (while tracing, too), so transformations branch on it in Python.

Example:
    >>> from medfunc.optim import adamw, clip_by_global_norm
    >>> params = OrderedDict(w=torch.ones(3))
    >>> grads = OrderedDict(w=torch.full((3,), 2.0))
    >>> tx = chain(clip_by_global_norm(1.0), adamw(1e-3))
    >>> opt_state = tx.init(params)
    >>> ctx = UpdateContext(step=torch.zeros((), dtype=torch.int64))
    >>> grads, params, opt_state = tx.update(grads, opt_state, params, ctx)
    >>> ctx.metrics["lr"]
    tensor(0.0010, dtype=torch.float64)
    >>> params["w"]
    tensor([0.9990, 0.9990, 0.9990])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from medfunc import validation
from medfunc.errors import ConfigError

Params = OrderedDict  # OrderedDict[str, Tensor]: trainable params, model order
Grads = OrderedDict  # OrderedDict[str, Tensor | None]: same keys as Params; None: no gradient
OptState = Any  # a pytree of tensors built from NamedTuples / OrderedDicts / tuples


@dataclass
class UpdateContext:
    """Per-update information shared by the transformations of one step.

    Attributes:
        step: 0-d int64 tensor, updates applied so far (the LR schedule's count).
        found_inf: 0-d float32 tensor on the params' device, or None. When it holds 1.0 the
            optimizers leave params and optimizer state bitwise unchanged (a skipped step).
        grad_norm: the pre-clip global L2 gradient norm if the caller already computed it;
            :func:`clip_by_global_norm` reuses it instead of computing it again.
        metrics: transformations add 0-d tensor entries here (the optimizers add ``"lr"``).
    """

    step: torch.Tensor
    found_inf: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``(init, update)``, as in optax.

    Attributes:
        init: ``init(params) -> opt_state`` for the trainable params (an OrderedDict in model
            order). May raise :class:`~medfunc.errors.ConfigError` when the configuration does
            not fit the params (e.g. a mask pattern that names no parameter).
        update: ``update(grads, opt_state, params, ctx) -> (grads, params, opt_state)``; may
            modify its arguments in place and returns them. A gradient of None means the
            parameter has none in this update (see the module docstring).
        spec: the optimizer's configuration (an :class:`~medfunc.optim.optimizers.OptimizerSpec`)
            when this is ``adamw``/``adam``/``sgd``; None otherwise. Torch interop reads it.
        children: the transformations of a :func:`chain`, in order; ``()`` otherwise.
    """

    init: Callable[[Params], OptState]
    update: Callable[[Grads, OptState, Params, UpdateContext], tuple[Grads, Params, OptState]]
    spec: Any = None
    children: tuple[GradientTransformation, ...] = ()


_TX_ALLOWED = (
    "a medfunc.optim.GradientTransformation (build one with medfunc.optim.adamw(...), "
    "clip_by_global_norm(...), etc.)"
)


def chain(*txs: GradientTransformation) -> GradientTransformation:
    """Apply transformations one after the other (optax's ``chain``).

    ``init`` returns a tuple with one state per transformation; ``update`` threads grads and
    params through each in order, sharing one :class:`UpdateContext`.

    Args:
        *txs: the transformations, applied first to last.

    Returns:
        The chained :class:`GradientTransformation` (its ``children`` are ``txs``).

    Example:
        >>> from medfunc.optim import adamw, clip_by_global_norm
        >>> tx = chain(clip_by_global_norm(1.0), adamw(3e-4, weight_decay=0.05))
        >>> len(tx.children)
        2
    """
    for tx in txs:
        validation.instance_of("each argument of chain()", tx, GradientTransformation, _TX_ALLOWED)

    def init(params: Params) -> tuple:
        return tuple(tx.init(params) for tx in txs)

    def update(
        grads: Grads, state: tuple, params: Params, ctx: UpdateContext
    ) -> tuple[Grads, Params, tuple]:
        if not isinstance(state, tuple) or len(state) != len(txs):
            raise ConfigError(
                f"chain of {len(txs)} transformations got an optimizer state that is not a "
                f"{len(txs)}-tuple ({type(state).__name__}); pass the state tx.init returned"
            )
        new_states = []
        for tx, sub in zip(txs, state):
            grads, params, sub = tx.update(grads, sub, params, ctx)
            new_states.append(sub)
        return grads, params, tuple(new_states)

    return GradientTransformation(init, update, children=tuple(txs))


def find_optimizer(tx: GradientTransformation) -> tuple[Any, tuple[int, ...]]:
    """Find the one optimizer (``adamw``/``adam``/``sgd``) inside ``tx``.

    Args:
        tx: an optimizer, or a (nested) :func:`chain` holding exactly one.

    Returns:
        ``(spec, path)``: the optimizer's spec and the indices leading to its state inside the
        chain's (nested) state tuple (``()`` when ``tx`` is the optimizer itself).

    Raises:
        ConfigError: ``tx`` holds no optimizer or more than one.

    Example:
        >>> from medfunc.optim import adamw, clip_by_global_norm
        >>> spec, path = find_optimizer(chain(clip_by_global_norm(1.0), adamw(1e-3)))
        >>> spec.name, path
        ('adamw', (1,))
    """
    validation.instance_of("find_optimizer()'s tx", tx, GradientTransformation, _TX_ALLOWED)
    found: list[tuple[Any, tuple[int, ...]]] = []

    def visit(t: GradientTransformation, path: tuple[int, ...]) -> None:
        if t.spec is not None:
            found.append((t.spec, path))
        for i, child in enumerate(t.children):
            visit(child, (*path, i))

    visit(tx, ())
    if len(found) != 1:
        raise ConfigError(
            f"expected exactly one optimizer (adamw/adam/sgd) in the transformation, found "
            f"{len(found)}{': ' + ', '.join(s.name for s, _ in found) if found else ''}"
        )
    return found[0]


def get_substate(opt_state: OptState, path: tuple[int, ...]) -> OptState:
    """Return the part of a (nested) chain state at ``path`` (see :func:`find_optimizer`)."""
    for i in path:
        opt_state = opt_state[i]
    return opt_state


def replace_substate(opt_state: OptState, path: tuple[int, ...], new: OptState) -> OptState:
    """Return ``opt_state`` with the part at ``path`` replaced by ``new`` (no mutation)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    items = list(opt_state)
    items[head] = replace_substate(items[head], rest, new)
    return tuple(items)
