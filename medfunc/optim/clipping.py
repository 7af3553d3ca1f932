"""Gradient clipping: :func:`clip_by_global_norm`, :func:`clip_by_value`, :func:`global_norm`.

Both transformations call the functions ``torch.nn.utils.clip_grad_norm_`` /
``clip_grad_value_`` are made of (``get_total_norm``, ``clip_grads_with_norm_`` and the same
foreach clamps), so the clipped gradients are bitwise those of the torch utilities. Neither
reads a tensor on the host: the clip coefficient is a clamped device tensor. A parameter without
a gradient (None) is left out of the norm and of the clipping, as the torch utilities skip a
``.grad`` that is None.

Example:
    >>> tx = mf.optim.chain(clip_by_global_norm(1.0), mf.optim.adamw(1e-3))
"""

from __future__ import annotations

import torch
from torch import Tensor

from medfunc import validation
from medfunc.optim.base import GradientTransformation, Grads, Params, UpdateContext


class _GradHolder:
    """Adapts a bare gradient tensor to torch's clip utilities, which read ``p.grad``."""

    __slots__ = ("grad",)

    def __init__(self, grad: Tensor) -> None:
        self.grad = grad


def _present(grads: Grads) -> list[Tensor]:
    """The gradients that exist (a parameter without a gradient has None)."""
    return [g for g in grads.values() if g is not None]


def global_norm(grads: Grads, norm_type: float = 2.0) -> Tensor:
    """The global norm of all gradients, as ``torch.nn.utils.get_total_norm`` computes it.

    Args:
        grads: name -> gradient tensor, or None for a parameter without a gradient (left out).
        norm_type: the p of the p-norm (2.0 by default; ``math.inf`` for the max norm).

    Returns:
        A 0-d tensor on the first gradient's device (no host sync); ``tensor(0.)`` when there
        is no gradient, as torch.

    Example:
        >>> from collections import OrderedDict
        >>> global_norm(OrderedDict(w=torch.tensor([3.0, 4.0])))
        tensor(5.)
    """
    return torch.nn.utils.get_total_norm(_present(grads), norm_type)


def clip_by_global_norm(max_norm: float, norm_type: float = 2.0) -> GradientTransformation:
    """Scale gradients so their global norm is at most ``max_norm`` (``clip_grad_norm_``).

    The scale is ``min(max_norm / (norm + 1e-6), 1)``, applied unconditionally on the device.
    When the caller passes the pre-clip L2 norm as ``ctx.grad_norm`` it is reused instead of
    computed again (only for ``norm_type == 2``). The norm is also recorded as
    ``ctx.metrics["grad_norm"]`` unless an entry exists.

    Args:
        max_norm: the largest allowed global norm (> 0).
        norm_type: the p of the p-norm, as ``clip_grad_norm_``.

    Returns:
        A stateless transformation (state ``()``).

    Example:
        >>> from collections import OrderedDict
        >>> tx = mf.optim.chain(clip_by_global_norm(1.0), mf.optim.sgd(0.1))
        >>> params = OrderedDict(w=torch.zeros(2))
        >>> grads = OrderedDict(w=torch.tensor([3.0, 4.0]))
        >>> ctx = mf.optim.UpdateContext(step=torch.zeros((), dtype=torch.int64))
        >>> grads, params, _ = tx.update(grads, tx.init(params), params, ctx)
        >>> grads["w"], ctx.metrics["grad_norm"]   # clipped to norm 1; the pre-clip norm
        (tensor([0.6000, 0.8000]), tensor(5.))
    """
    max_norm = validation.positive_float("max_norm", max_norm)
    norm_type = validation.number(
        "norm_type", norm_type, minimum=0.0, exclusive_minimum=True, allow_inf=True
    )

    def init(params: Params) -> tuple:
        return ()

    def update(
        grads: Grads, state: tuple, params: Params, ctx: UpdateContext
    ) -> tuple[Grads, Params, tuple]:
        present = _present(grads)
        if not present:
            return grads, params, state
        if ctx.grad_norm is not None and norm_type == 2.0:
            norm = ctx.grad_norm
        else:
            norm = global_norm(grads, norm_type)
        ctx.metrics.setdefault("grad_norm", norm)
        holders = [_GradHolder(g) for g in present]
        torch.nn.utils.clip_grads_with_norm_(holders, max_norm, norm)
        return grads, params, state

    return GradientTransformation(init, update)


def clip_by_value(max_value: float) -> GradientTransformation:
    """Clamp every gradient element to ``[-max_value, max_value]`` (``clip_grad_value_``).

    Args:
        max_value: the bound (> 0).

    Returns:
        A stateless transformation (state ``()``).

    Example:
        >>> tx = mf.optim.chain(clip_by_value(0.5), mf.optim.adamw(1e-3))
    """
    max_value = validation.positive_float("max_value", max_value)

    def init(params: Params) -> tuple:
        return ()

    def update(
        grads: Grads, state: tuple, params: Params, ctx: UpdateContext
    ) -> tuple[Grads, Params, tuple]:
        present = _present(grads)
        if present:
            torch.nn.utils.clip_grad_value_([_GradHolder(g) for g in present], max_value)
        return grads, params, state

    return GradientTransformation(init, update)
