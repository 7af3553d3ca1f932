"""The one adapter around PyTorch's functional optimizer kernels.

``torch.optim.adam.adam`` (Adam and AdamW) and ``torch.optim.sgd.sgd`` are the exact code
``torch.optim.Adam/AdamW/SGD.step()`` runs, so calling them on the same tensors gives bitwise the
same numbers. This module is the only place medfunc touches that (semi-private) API, PyTorch's
private optimizer helpers, and the skip-on-overflow logic around it.

Kernel paths (``KernelConfig``):

* **fused** (``kernel="fused"``, and ``"auto"`` on CUDA): ``fused=True``. The kernel takes
  ``found_inf`` natively and leaves params and moments untouched when it is 1; Adam's step
  counters are incremented and then decremented by ``found_inf`` by PyTorch, so they end
  unchanged. Step counters live on the params' device (float32). A tensor LR is handed to the
  kernel as a float32 device tensor on accelerators (the CUDA kernel reads it as ``float*``).
* **foreach** (``kernel="foreach"``, and ``"auto"`` off CUDA): ``foreach=True``. On the CPU this is
  the non-capturable path torch.optim uses by default (step counters on the CPU, LR as a Python
  float: reading a CPU tensor is not a device sync). On accelerators Adam runs with
  ``capturable=True`` (counters on the device, LR a device tensor) so the step never syncs. The
  foreach kernels have no ``found_inf`` input. With the flag on the CPU (outside torch.compile)
  reading it costs no device sync, so the adapter simply skips the kernel. Elsewhere it keeps a
  copy of the params and state of the group, runs the kernel, and writes back
  ``torch.where(found_inf > 0, old, new)``: the extra memory is one copy of the params plus one
  copy of the optimizer state of the largest group, while the update runs.

SGD's momentum buffer is created lazily by torch on a parameter's first update (a copy of the
gradient, not dampened). medfunc allocates the buffers up front (zeros) so the state has a fixed
structure, and keeps a per-parameter "initialized" flag; ``0 * momentum + 1 * g`` equals the copy
bitwise, so with ``dampening == 0`` the ordinary kernel reproduces the first step. With
``dampening != 0`` the adapter also runs the kernel with ``dampening=0`` on copies and selects,
parameter by parameter, that result while the parameter's buffer is not yet initialized
(``torch.where``, no host sync): one extra copy of params and buffers and twice the kernel work.

The callers hand these adapters only the parameters that have a gradient (torch.optim skips a
parameter whose ``.grad`` is None), so every list here holds tensors.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.sgd import sgd as _torch_sgd

from medfunc.errors import ConfigError
from medfunc.validation import one_of

KERNELS = ("auto", "foreach", "fused")


class KernelConfig(NamedTuple):
    """How the torch kernel is called for parameters on one device.

    Attributes:
        fused: ``fused=True`` (else ``foreach=True``).
        capturable: ``capturable=True`` (foreach Adam on accelerators).
        device_type: the params' device type.
    """

    fused: bool
    capturable: bool
    device_type: str

    @property
    def host_lr(self) -> bool:
        """Whether the kernel gets the LR as a Python float (the params live on the CPU)."""
        return self.device_type == "cpu"


def _fused_devices() -> list[str]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return ["cpu", "cuda", "mps"]


def _capturable_devices() -> list[str]:
    try:
        from torch.optim.optimizer import _get_capturable_supported_devices

        return list(_get_capturable_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return ["cuda", "xpu"]


@functools.lru_cache(maxsize=64)
def resolve_kernel(
    kernel: str, device: torch.device, *, adam: bool = True, tensor_beta1: bool = False
) -> KernelConfig:
    """Pick the kernel path for parameters on ``device``.

    Args:
        kernel: "auto" (fused on CUDA, foreach elsewhere), "foreach" or "fused".
        device: the parameters' device.
        adam: True for Adam/AdamW (foreach is capturable on accelerators), False for SGD.
        tensor_beta1: Adam's ``beta1`` follows a schedule. The fused kernels take ``beta1`` as
            a float only, which on an accelerator would be read back every step; "auto" then
            picks the capturable foreach kernel there, which takes it as a device tensor.

    Returns:
        The :class:`KernelConfig`.

    Example:
        >>> resolve_kernel("auto", torch.device("cpu"))
        KernelConfig(fused=False, capturable=False, device_type='cpu')
    """
    one_of("kernel", kernel, KERNELS)
    dtype = device.type
    fused = kernel == "fused" or (kernel == "auto" and dtype == "cuda" and not tensor_beta1)
    if fused and tensor_beta1 and dtype != "cpu":
        raise ConfigError(
            f"kernel='fused' on {dtype} takes Adam's beta1 as a Python float, so a beta1 "
            "schedule (momentum cycling) would be read back from the device every step; use "
            "kernel='auto' or 'foreach' (the capturable foreach kernel takes it as a tensor), or "
            "a constant beta1 (TrainerConfig.cycle_momentum=False)"
        )
    if fused and dtype not in _fused_devices():
        raise ConfigError(
            f"kernel='fused' is not available for parameters on {dtype}: PyTorch has fused "
            f"optimizer kernels for {_fused_devices()}. Use kernel='foreach'."
        )
    capturable = (not fused) and adam and dtype != "cpu" and dtype in _capturable_devices()
    return KernelConfig(fused=fused, capturable=capturable, device_type=dtype)


def check_params_for_kernel(params: Sequence[Tensor], cfg: KernelConfig) -> None:
    """Raise :class:`ConfigError` if a fused kernel cannot take ``params`` (dtype/device)."""
    if not cfg.fused:
        return
    for p in params:
        if not torch.is_floating_point(p):
            raise ConfigError(
                f"kernel='fused' needs floating-point parameters, got one of dtype {p.dtype}; "
                "use kernel='foreach'"
            )


def step_dtype(cfg: KernelConfig) -> torch.dtype:
    """The dtype torch.optim keeps Adam's ``state['step']`` in for this kernel path."""
    if cfg.fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def step_device(cfg: KernelConfig, param_device: torch.device) -> torch.device:
    """Where torch.optim keeps Adam's ``state['step']`` for this kernel path."""
    return param_device if (cfg.fused or cfg.capturable) else torch.device("cpu")


def _lr_arg(lr: float | Tensor, cfg: KernelConfig, what: str = "the LR") -> float | Tensor:
    """The LR (or Adam's beta1) in the form the kernel path takes (never a device sync).

    A CPU tensor is read on the host (no device sync), which gives the kernel exactly the
    Python float a ``torch.optim`` scheduler sets; while compiling, and on the capturable or
    fused accelerator paths, it stays a tensor.
    """
    if not isinstance(lr, Tensor):
        return lr
    if torch.compiler.is_compiling():
        return lr  # a graph tensor: torch.optim's compiled path takes tensor LRs
    if lr.is_cpu and cfg.host_lr:
        return float(lr)  # a host op on a CPU tensor: no device sync
    if cfg.fused or cfg.capturable:
        return lr.to(dtype=torch.float32)
    raise ConfigError(
        f"the {'fused' if cfg.fused else 'foreach'} kernel on {cfg.device_type} needs {what} "
        "as a Python float, which would read the schedule's device tensor on the host (a sync); "
        "use kernel='fused' or a constant value"
    )


def check_momentum_schedule(cfg: KernelConfig, *, adam: bool, scheduled: Any) -> None:
    """Warn at ``init`` when a momentum schedule costs a device sync per update.

    torch's SGD kernels (foreach and fused) take the momentum as a Python float only: on the
    CPU reading the schedule's CPU tensor is free, on an accelerator it is one device sync per
    update (the update still equals ``torch.optim.SGD`` driven by ``OneCycleLR``, which sets a
    float too), and such a step cannot be compiled as one graph or captured in a CUDA graph.
    Adam's ``beta1`` has a tensor path (see :func:`resolve_kernel`).
    """
    if scheduled is None or adam or cfg.device_type == "cpu":
        return
    warnings.warn(
        f"sgd with a momentum schedule on {cfg.device_type}: torch's SGD kernels take the "
        "momentum as a Python float, so it is read from the device every update (one sync "
        "per step; no CUDA graph). Set TrainerConfig.cycle_momentum=False or use adamw to "
        "keep the step sync-free.",
        RuntimeWarning,
        stacklevel=3,
    )


def _momentum_arg(momentum: float | Tensor) -> float:
    """SGD's momentum as the Python float torch's kernels take (see check_momentum_schedule)."""
    if not isinstance(momentum, Tensor):
        return momentum
    capturing = momentum.is_cuda and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling() or capturing:
        raise ConfigError(
            "sgd with a momentum schedule cannot be compiled or captured in a CUDA graph: "
            "torch's SGD kernels take the momentum as a Python float. Use a constant momentum "
            "(TrainerConfig.cycle_momentum=False), adamw, or run the step uncompiled"
        )
    return float(momentum)


def _host_skip(found_inf: Tensor) -> bool | None:
    """Whether to skip, decided on the host when that costs no device sync; else None.

    A flag on the CPU is host memory: outside ``torch.compile`` reading it is free and saves the
    copy-and-select of the foreach path. On accelerators (or while compiling) the decision stays
    on the device (None).
    """
    if found_inf.is_cpu and not torch.compiler.is_compiling():
        return bool(found_inf)
    return None


def _select_(cond: Tensor, olds: list[Tensor], news: list[Tensor]) -> None:
    """In place: ``new = where(cond, old, new)`` for each pair (``cond`` a 0-d bool tensor).

    A device-side select: no host sync, and bitwise ``old`` or ``new`` (NaN/inf included).
    """
    _select_each_([cond] * len(news), olds, news)


def _select_each_(conds: list[Tensor], olds: list[Tensor], news: list[Tensor]) -> None:
    """In place: ``new = where(cond, old, new)`` for each triple (each ``cond`` a 0-d bool)."""
    for cond, old, new in zip(conds, olds, news):
        new.copy_(torch.where(cond.to(new.device), old, new))


def _kernel_flags(cfg: KernelConfig, found_inf: Tensor | None) -> dict[str, Any]:
    """The keyword arguments both torch kernels take the same way (path, skip flag, no scale)."""
    return {
        "foreach": not cfg.fused,
        "fused": cfg.fused,
        "grad_scale": None,
        "found_inf": found_inf,
        "maximize": False,
    }


def _laid_out_like(params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """``grads``, each copied into its param's memory layout where the strides differ.

    The fused kernels assume a gradient laid out like its parameter: on CUDA they refuse
    another layout, on the CPU they read it element by element in the parameter's order and
    silently apply the wrong values. Compiled backward passes and channels_last models can
    return such gradients.
    """
    return [
        g if g.stride() == p.stride() else torch.empty_like(p, dtype=g.dtype).copy_(g)
        for p, g in zip(params, grads)
    ]


def _run_skippable(
    run: Callable[..., None],
    cfg: KernelConfig,
    found_inf: Tensor | None,
    state: list[Tensor],
) -> None:
    """Run one in-place update so that ``found_inf == 1`` leaves ``state`` bitwise unchanged.

    ``run(**flags)`` performs the update with the kernel flags of :func:`_kernel_flags` (torch's
    own kernel, bound to its tensors, or a function of the same keywords). A fused kernel takes
    the skip flag natively; the foreach kernels get None, and the skip is either decided on the
    host (:func:`_host_skip`) or done by copying ``state`` first and selecting it back on the
    device.

    Args:
        run: the update, called at most once.
        cfg: the kernel path.
        found_inf: None, or a 0-d float32 flag.
        state: every tensor ``run`` writes (params and optimizer state).
    """
    if cfg.fused or found_inf is None:
        run(**_kernel_flags(cfg, found_inf if cfg.fused else None))
        return
    skip = _host_skip(found_inf)
    if skip is not None:
        if not skip:
            run(**_kernel_flags(cfg, None))
        return
    olds = [t.clone() for t in state]
    run(**_kernel_flags(cfg, None))
    _select_(found_inf > 0, olds, state)


WeightDecay = float | Sequence[float]
"""A kernel call's weight decay: one value for every parameter, or one per parameter."""


def _per_parameter(weight_decay: WeightDecay, n: int) -> list[float]:
    if isinstance(weight_decay, (int, float)):
        return [float(weight_decay)] * n
    decays = list(weight_decay)
    if len(decays) != n:
        raise ConfigError(f"{len(decays)} weight decay values for {n} parameters")
    return decays


def _by_value(decays: list[float]) -> dict[float, list[int]]:
    """The positions of each distinct weight decay value, values in order of first appearance."""
    positions: dict[float, list[int]] = {}
    for i, d in enumerate(decays):
        positions.setdefault(d, []).append(i)
    return positions


def _pick(items: Sequence[Any], positions: list[int]) -> list[Any]:
    return [items[i] for i in positions]


def _decay_as_torch(
    params: list[Tensor],
    grads: list[Tensor],
    positions: dict[float, list[int]],
    lr: float,
    decoupled: bool,
) -> list[Tensor]:
    """Apply weight decay as torch's foreach Adam kernel does with ``weight_decay != 0``, one
    value at a time: decoupled (AdamW) ``params *= 1 - lr * wd`` in place; L2 (Adam) new
    gradient tensors ``grads + wd * params``. Returns the gradients to hand the kernel, which
    then runs with ``weight_decay=0``: the same operations on the same tensors as one kernel
    call per value (the kernel's other work does not read the decay), in one call.
    """
    grads = list(grads)
    for value, where in positions.items():
        if value == 0:
            continue
        ps = _pick(params, where)
        if decoupled:
            torch._foreach_mul_(ps, 1 - lr * value)
        else:
            for i, g in zip(where, torch._foreach_add(_pick(grads, where), ps, alpha=value)):
                grads[i] = g
    return grads


def adam_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    cfg: KernelConfig,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float,
    eps: float,
    weight_decay: WeightDecay,
    amsgrad: bool,
    decoupled_weight_decay: bool,
    found_inf: Tensor | None,
) -> None:
    """One Adam/AdamW update of the given parameters, in place, via ``torch.optim.adam.adam``.

    With one weight decay per parameter (the decay and no-decay param groups of one LR), the
    host foreach path (CPU, outside ``torch.compile``, LR a float) makes one kernel call for
    all of them, the decay applied first exactly as the kernel applies it
    (:func:`_decay_as_torch`); the fused and capturable kernels take the decay inside the
    kernel, so there each value gets its own call, as ``torch.optim`` makes one per group.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: per-parameter tensors (same order).
        max_exp_avg_sqs: per-parameter AMSGrad maxima, or ``[]`` without amsgrad.
        steps: per-parameter step counters (0-d float tensors, see :func:`step_device`).
        cfg: the kernel path.
        lr: the LR (float, or a 0-d tensor).
        beta1: a float, or a 0-d tensor (a schedule's value; see :func:`_lr_arg`).
        beta2, eps, amsgrad: hyperparameters.
        weight_decay: one value, or one per parameter.
        decoupled_weight_decay: True for AdamW, False for Adam's L2 penalty.
        found_inf: None, or a 0-d float32 flag; 1.0 leaves everything bitwise unchanged.
    """
    if not params:
        return
    compiling = torch.compiler.is_compiling()
    if compiling and not cfg.fused:
        # torch.optim's own choice under torch.compile: the non-capturable foreach path cannot
        # be traced on the CPU, the capturable one can (same math, counters on the device).
        cfg = cfg._replace(capturable=True)
    lr_arg = _lr_arg(lr, cfg)
    beta1 = _lr_arg(beta1, cfg, "beta1")
    has_complex = any(map(torch.is_complex, params))
    positions = _by_value(_per_parameter(weight_decay, len(params)))
    merge = len(positions) > 1
    if merge and (cfg.fused or cfg.capturable or compiling or has_complex):
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        for value, where in positions.items():
            adam_step(
                *(_pick(items, where) if items else [] for items in lists),
                cfg=cfg,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=value,
                amsgrad=amsgrad,
                decoupled_weight_decay=decoupled_weight_decay,
                found_inf=found_inf,
            )
        return
    if cfg.fused:
        grads = _laid_out_like(params, grads)

    def run(**flags: Any) -> None:
        if merge:
            kernel_grads = _decay_as_torch(params, grads, positions, lr_arg, decoupled_weight_decay)
            decay = 0.0
        else:
            kernel_grads, decay = grads, next(iter(positions))
        _torch_adam(
            params,
            kernel_grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            capturable=cfg.capturable,
            differentiable=False,
            has_complex=has_complex,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            beta1=beta1,
            beta2=beta2,
            lr=lr_arg,
            weight_decay=decay,
            eps=eps,
            **flags,
        )

    _run_skippable(
        run, cfg, found_inf, [*params, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs, *steps]
    )


def sgd_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    cfg: KernelConfig,
    lr: float | Tensor,
    momentum: float | Tensor,
    dampening: float,
    weight_decay: WeightDecay,
    nesterov: bool,
    found_inf: Tensor | None,
    initialized: list[Tensor] | None,
) -> None:
    """One SGD update of one param group, in place, via ``torch.optim.sgd.sgd``.

    Args:
        params, grads: per-parameter tensors.
        momentum_buffers: pre-allocated buffers (zeros before the first update), or ``[]`` when
            ``momentum == 0``.
        cfg: the kernel path.
        lr: the group's LR (float, or a 0-d tensor).
        momentum: a float, or a 0-d tensor (a schedule's value, read on the host).
        dampening, nesterov: hyperparameters.
        weight_decay: one value, or one per parameter (one kernel call per value).
        found_inf: None, or a 0-d float32 flag; 1.0 leaves everything bitwise unchanged.
        initialized: one 0-d flag per parameter, 1.0 once its buffer holds a momentum (only
            read when ``momentum != 0`` and ``dampening != 0``: torch does not dampen a
            parameter's first update).
    """
    if not params:
        return
    positions = _by_value(_per_parameter(weight_decay, len(params)))
    if len(positions) > 1:
        for value, where in positions.items():
            sgd_step(
                _pick(params, where),
                _pick(grads, where),
                _pick(momentum_buffers, where) if momentum_buffers else [],
                cfg=cfg,
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=value,
                nesterov=nesterov,
                found_inf=found_inf,
                initialized=_pick(initialized, where) if initialized is not None else None,
            )
        return
    weight_decay = next(iter(positions))
    lr_arg = _lr_arg(lr, cfg)
    momentum = _momentum_arg(momentum)
    if cfg.fused:
        grads = _laid_out_like(params, grads)
    state = [*params, *momentum_buffers]

    options = {
        "has_sparse_grad": False,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "lr": lr_arg,
        "nesterov": nesterov,
    }

    def run_sgd(ps: list[Tensor], bufs: list[Tensor], damp: float, **flags: Any) -> None:
        _torch_sgd(ps, grads, list(bufs), dampening=damp, **options, **flags)

    def run_dampened(**flags: Any) -> None:
        # torch does not dampen a parameter's first update: run both and select per parameter
        if initialized is None:
            raise ConfigError("sgd with dampening needs the 'initialized' flag of its state")
        first_params = [p.clone() for p in params]
        first_bufs = [b.clone() for b in momentum_buffers]
        run_sgd(first_params, first_bufs, 0.0, **flags)
        run_sgd(params, momentum_buffers, dampening, **flags)
        fresh = [flag == 0 for flag in initialized]
        _select_each_(fresh * 2, [*first_params, *first_bufs], state)

    if momentum != 0 and dampening != 0:
        run = run_dampened
    else:
        run = functools.partial(
            _torch_sgd, params, grads, list(momentum_buffers), dampening=dampening, **options
        )
    _run_skippable(run, cfg, found_inf, state)
