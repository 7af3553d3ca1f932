"""Precision policies and sync-free dynamic loss scaling.

A :class:`Policy` says which autocast dtype the forward pass uses and whether the loss is scaled.
Loss scaling follows ``torch.amp.GradScaler`` exactly (same defaults, same kernels:
``torch._amp_foreach_non_finite_check_and_unscale_`` and ``torch._amp_update_scale_``), but keeps
the decision to skip an update on the device, so no step ever waits for the host.

Example:
    >>> policy = get_policy("fp16")
    >>> scaler = init_loss_scale(policy, torch.device("cpu"))
    >>> float(scaler.scale)
    65536.0
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from medfunc import validation

PRECISIONS = ("fp32", "bf16", "fp16")
_SCALER_OPTIONS = ("init_scale", "growth_factor", "backoff_factor", "growth_interval")


@dataclass(frozen=True)
class Policy:
    """How a step computes: autocast dtype and loss-scaling settings (GradScaler's defaults).

    Args:
        name: "fp32", "bf16" or "fp16".
        compute_dtype: autocast dtype, or None for full precision.
        loss_scaling: whether the loss is scaled (fp16 only).
        init_scale: the first loss scale (as ``torch.amp.GradScaler``).
        growth_factor: the scale's factor after ``growth_interval`` finite steps.
        backoff_factor: the scale's factor after a step with non-finite gradients.
        growth_interval: finite steps between two growths.
    """

    name: str
    compute_dtype: torch.dtype | None
    loss_scaling: bool
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000


class LossScaleState(NamedTuple):
    """Device state of dynamic loss scaling, as ``GradScaler`` keeps it."""

    scale: torch.Tensor
    growth_tracker: torch.Tensor


PRECISION_ALIASES: dict = {
    "float32": "fp32",
    "fp32": "fp32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "fp16": "fp16",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}
"""Other spellings of the precisions (dtype names and the dtypes themselves)."""


def get_policy(precision: str | Policy, **scaler_options: float) -> Policy:
    """Return the :class:`Policy` for a precision name.

    Args:
        precision: "fp32", "bf16", "fp16", an alias of one (``"bfloat16"``, ``"float16"``,
            ``torch.bfloat16``, ...: :data:`PRECISION_ALIASES`), or a Policy (returned as is).
        **scaler_options: init_scale, growth_factor, backoff_factor, growth_interval (fp16).

    Returns:
        The policy.

    Raises:
        ConfigError: an unknown precision or loss-scaling option.

    Example:
        >>> get_policy("bf16").compute_dtype
        torch.bfloat16
    """
    if isinstance(precision, Policy):
        return precision
    precision = PRECISION_ALIASES.get(
        precision.lower() if isinstance(precision, str) else precision, precision
    )
    validation.one_of("precision", precision, PRECISIONS)
    validation.check_names("loss scaling", list(scaler_options), _SCALER_OPTIONS)
    if precision == "fp32":
        return Policy("fp32", None, False)
    if precision == "bf16":
        return Policy("bf16", torch.bfloat16, False)
    return Policy("fp16", torch.float16, True, **scaler_options)


def init_loss_scale(policy: Policy, device: torch.device) -> LossScaleState | tuple:
    """Initial loss-scale state for ``policy`` on ``device`` (an empty tuple when unscaled)."""
    if not policy.loss_scaling:
        return ()
    return LossScaleState(
        scale=torch.full((), policy.init_scale, dtype=torch.float32, device=device),
        growth_tracker=torch.zeros((), dtype=torch.int32, device=device),
    )


def autocast(policy: Policy, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``policy`` on ``device`` (a null context for fp32)."""
    if policy.compute_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=policy.compute_dtype)


def unscale_and_check(grads: list[torch.Tensor | None], scaler: LossScaleState) -> torch.Tensor:
    """Unscale ``grads`` in place by ``1/scale`` and return the found-inf flag (0-d float32).

    Uses the kernel ``GradScaler.unscale_`` uses, so the result is bitwise the same. A missing
    gradient (None) is neither unscaled nor checked, as ``GradScaler.unscale_`` skips a
    parameter whose ``.grad`` is None.
    """
    found_inf = torch.zeros((), dtype=torch.float32, device=scaler.scale.device)
    inv_scale = scaler.scale.double().reciprocal().float()
    present = [g for g in grads if g is not None]
    if present:
        torch._amp_foreach_non_finite_check_and_unscale_(present, found_inf, inv_scale)
    return found_inf


def update_scale(policy: Policy, scaler: LossScaleState, found_inf: torch.Tensor) -> None:
    """Back off or grow ``scaler`` in place, exactly as ``GradScaler.update`` does."""
    torch._amp_update_scale_(
        scaler.scale,
        scaler.growth_tracker,
        found_inf,
        policy.growth_factor,
        policy.backoff_factor,
        policy.growth_interval,
    )


def scaler_state_dict(policy: Policy, scaler: LossScaleState | tuple) -> dict:
    """Return ``scaler`` as a ``torch.amp.GradScaler.state_dict()`` (empty when unscaled)."""
    if not scaler:
        return {}
    return {
        "scale": float(scaler.scale),
        "growth_factor": policy.growth_factor,
        "backoff_factor": policy.backoff_factor,
        "growth_interval": policy.growth_interval,
        "_growth_tracker": int(scaler.growth_tracker),
    }


def scaler_from_state_dict(state_dict: dict, like: LossScaleState) -> LossScaleState:
    """Build a loss-scale state from a ``GradScaler.state_dict()``, on ``like``'s device."""
    device = like.scale.device
    return LossScaleState(
        scale=torch.full((), float(state_dict["scale"]), dtype=torch.float32, device=device),
        growth_tracker=torch.full(
            (), int(state_dict["_growth_tracker"]), dtype=torch.int32, device=device
        ),
    )
