"""DeepSpeed ZeRO (stages 1 and 2) behind the same ``train_step``.

:func:`deepspeed_state` wraps the model in a DeepSpeed engine and returns a TrainState;
:func:`deepspeed_step` (the step function for such a state, as ``compile_step`` returns one for
a compiled step) runs ``engine(batch)``, ``engine.backward(loss)`` and ``engine.step()``: DeepSpeed
partitions the optimizer state (ZeRO-1) and the gradients (ZeRO-2), reduces the gradients,
clips and updates. The medfunc optimizer is handed to DeepSpeed as a client ``torch.optim``
optimizer with the same param groups (weight-decay mask, LR multipliers) and the medfunc LR
schedule as a client LR scheduler, so no DeepSpeed C++ op has to be compiled.

The engine owns the weights and optimizer state, so a DeepSpeed step always donates: the state
it is given is consumed. The state's ``opt_state`` is empty (the optimizer state lives in the
engine); :func:`~medfunc.distributed.save_sharded` / :func:`~medfunc.distributed.load_sharded`
write and read DeepSpeed's own checkpoints.

Without DeepSpeed installed, :func:`deepspeed_state` warns and returns a DDP state
(:func:`~medfunc.distributed.data_parallel`) instead.

Example (on every rank of a ``torchrun`` job)::

    mf.distributed.init()
    state = mf.distributed.deepspeed_state(model, mf.optim.adamw(1e-3), {"zero_optimization":
                                           {"stage": 1}}, max_grad_norm=1.0)
    state, metrics = mf.distributed.deepspeed_step(state, batch)
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from medfunc.calling import call_model, extract_loss, module_mode
from medfunc.distributed.ddp import data_parallel
from medfunc.distributed.env import collective_guard, ensure_process_group, get_info
from medfunc.errors import ConfigError
from medfunc.optim import GradientTransformation, chain, find_optimizer, torch_optimizer
from medfunc.precision import get_policy
from medfunc.rng import next_rng, seeded_rng
from medfunc.state import AccumState, GradPath, TrainState, init_state
from medfunc.step import train_step

_SHM_OP = "deepspeed_shm_comm"


def deepspeed_available() -> bool:
    """True when the ``deepspeed`` package can be imported.

    Example:
        >>> mf.distributed.deepspeed_available()
        True
    """
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"] is not None
    return importlib.util.find_spec("deepspeed") is not None


class ScheduleLR(torch.optim.lr_scheduler.LRScheduler):
    """A ``torch`` LR scheduler that follows a medfunc optimizer's LR (float or schedule).

    Group ``i`` gets ``base_lr(step) * multiplier_i``, where the multipliers are the group LRs
    at step 0 divided by the base LR there (the groups of
    :func:`medfunc.optim.torch_param_groups`).

    Args:
        optimizer: the torch optimizer built from ``spec``.
        spec: the medfunc :class:`~medfunc.optim.OptimizerSpec`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, spec: Any) -> None:
        self.spec = spec
        names = [name for group in optimizer.param_groups for name in group["param_names"]]
        self.multipliers = [g.lr_multiplier for g in spec.groups(names)]
        super().__init__(optimizer)

    def base_lr(self) -> float:
        """The base LR at the current step."""
        return self.spec.lr_at(self.last_epoch)

    def get_lr(self) -> list[float]:
        """The group LRs at the current step (torch's scheduler API).

        A ``beta1`` / momentum schedule of the spec is set on the groups here too, as
        ``OneCycleLR`` sets its momentum.
        """
        if self.spec.momentum_schedule is not None:
            value = self.spec.hyperparameters(self.last_epoch)
            for group in self.optimizer.param_groups:
                key = "betas" if "betas" in group else "momentum"
                group[key] = value[key]
        base = self.base_lr()
        return [base * m if m != 1.0 else base for m in self.multipliers]

    def state_dict(self) -> dict[str, Any]:
        """The position only (the schedule itself is code, rebuilt from the optimizer)."""
        return {
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "_last_lr": list(self._last_lr),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position and set the group LRs for it."""
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict["_step_count"])
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def load_config(deepspeed_config: Mapping | str | Path | None) -> dict:
    """Read a DeepSpeed config given as a dict or a path to a JSON file (a deep copy).

    Args:
        deepspeed_config: the config, a JSON path, or None (an empty dict).

    Returns:
        A new dict.

    Raises:
        ConfigError: the file is missing or is not a JSON object.
    """
    if deepspeed_config is None:
        return {}
    if isinstance(deepspeed_config, Mapping):
        return copy.deepcopy(dict(deepspeed_config))
    path = Path(deepspeed_config)
    if not path.is_file():
        raise ConfigError(
            f"deepspeed_config file {str(path)!r} does not exist; pass a dict or "
            "the path of a DeepSpeed JSON config"
        )
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed_config file {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"deepspeed_config file {str(path)!r} must hold a JSON object")
    return loaded


def default_config(
    *,
    stage: int = 2,
    micro_batch_size: int = 1,
    accumulate_steps: int = 1,
    max_grad_norm: float | None = None,
    precision: str = "fp32",
) -> dict:
    """The DeepSpeed config used when none is given: ZeRO-2, medfunc's clipping and precision.

    Args:
        stage: the ZeRO stage (1 or 2).
        micro_batch_size: examples per rank per micro-batch (DeepSpeed's bookkeeping only).
        accumulate_steps: micro-batches per optimizer update.
        max_grad_norm: global-norm clipping threshold (None: no clipping).
        precision: "fp32", "bf16" or "fp16" (DeepSpeed's own mixed precision; fp16 uses dynamic
            loss scaling with GradScaler's initial scale 2**16).

    Returns:
        A DeepSpeed config dict.

    Example:
        >>> default_config(stage=1, max_grad_norm=1.0)["gradient_clipping"]
        1.0
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulate_steps,
        "gradient_clipping": float(max_grad_norm) if max_grad_norm else 0.0,
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _merge_defaults(config: dict, defaults: dict) -> dict:
    merged = copy.deepcopy(defaults)
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    if "train_batch_size" in config and "train_micro_batch_size_per_gpu" not in config:
        merged.pop("train_micro_batch_size_per_gpu")
    stage = merged.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(
            f"zero_optimization.stage={stage!r}: medfunc drives DeepSpeed ZeRO stages 0, 1 and 2 "
            "(stage 3 partitions parameters; use mf.distributed.fully_shard_state for that)"
        )
    return merged


def deepspeed_step(
    state: TrainState, batch: Any, *, donate: bool = True
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """One micro-batch of a DeepSpeed state through its engine: the step function of
    :func:`deepspeed_state` (the engine owns the forward, backward, reduction and update).

    The engine updates the weights and its optimizer state in place, so the given state is
    always consumed (``donate`` is accepted for the common step signature).

    Args:
        state: a state from :func:`deepspeed_state`.
        batch: a batch on the state's device.
        donate: ignored (always True).

    Returns:
        ``(new_state, metrics)`` with :func:`medfunc.train_step`'s metrics.

    Raises:
        ConfigError: ``state`` is not a DeepSpeed state.

    Example::

        state = mf.distributed.deepspeed_state(model, mf.optim.adamw(1e-3), "ds_zero1.json")
        state, metrics = mf.distributed.deepspeed_step(state, batch)
    """
    state.check_alive()
    engine = deepspeed_engine_of(state)
    if engine is None:
        raise ConfigError("deepspeed_step runs states of deepspeed_state; use mf.train_step")
    device = state.device
    boundary = bool(engine.is_gradient_accumulation_boundary())
    lr_before = _lr(engine)
    with seeded_rng(state.rng, device), module_mode(engine.module, True):
        with collective_guard("DeepSpeed forward/backward/step"):
            outputs = call_model(engine, state.apply_fn, batch, None)
            loss = extract_loss(outputs, batch, state.loss_fn)
            engine.backward(loss)
            engine.step()
    loss = loss.detach().float().to(device)
    accum = state.accum
    count = int(accum.count) + 1
    loss_sum = accum.loss_sum + loss
    nan = torch.full((), float("nan"), device=device)
    metrics = {"loss": loss_sum / count}
    applied = boundary and bool(getattr(engine, "_step_applied", True))
    if boundary:
        norm = engine.get_global_grad_norm()
        metrics["grad_norm"] = (
            nan if norm is None else torch.as_tensor(norm, dtype=torch.float32).to(device)
        )
        metrics["lr"] = torch.tensor(lr_before, dtype=torch.float64, device=device)
        count, loss_sum = 0, torch.zeros_like(loss_sum)
    else:
        metrics.update(grad_norm=nan, lr=nan)
    metrics["skipped"] = torch.tensor(boundary and not applied, device=device)
    metrics["applied"] = torch.tensor(boundary, device=device)
    if engine.fp16_enabled():
        metrics["loss_scale"] = torch.tensor(float(engine.optimizer.cur_scale), device=device)
    new_state = state.replace(
        step=state.step + int(applied),
        rng=next_rng(state.rng),
        accum=AccumState(OrderedDict(), torch.tensor(count, dtype=torch.int64), loss_sum),
    )
    state.mark_consumed()
    return new_state, metrics


def schedule_of(engine: Any) -> ScheduleLR | None:
    """The :class:`ScheduleLR` driving ``engine`` when a medfunc optimizer was given, else None."""
    scheduler = getattr(engine, "lr_scheduler", None)
    return scheduler if isinstance(scheduler, ScheduleLR) else None


def _lr(engine: Any) -> float:
    scheduler = schedule_of(engine)
    if scheduler is not None:
        return scheduler.base_lr()
    return float(engine.get_lr()[0])


def step_for(state: TrainState) -> Callable[..., tuple[TrainState, dict[str, torch.Tensor]]]:
    """The step function for ``state``: :func:`deepspeed_step` for a DeepSpeed state, else
    :func:`medfunc.train_step` (which runs single-process, DDP and FSDP2 states).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> state = mf.init_state(model, mf.optim.sgd(0.1), loss_fn=lambda out, x: out.mean())
        >>> step = mf.distributed.step_for(state)
        >>> step is mf.train_step   # not a DeepSpeed state
        True
        >>> state, metrics = step(state, torch.randn(8, 4), donate=True)
    """
    return deepspeed_step if deepspeed_engine_of(state) is not None else train_step


def _disable_shm_op_on_cpu(deepspeed: Any) -> None:
    """On the CPU, keep DeepSpeed from JIT-compiling its shared-memory inference all-reduce.

    DeepSpeed's torch backend builds that C++ op whenever it is constructed on the CPU
    accelerator (minutes of compiling on a small machine); training never calls it, and Gloo
    carries every training collective.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[_SHM_OP] = False


def deepspeed_engine_of(state: TrainState) -> Any | None:
    """The DeepSpeed engine behind ``state``, or None for other states.

    Example:
        >>> engine = deepspeed_engine_of(mf.init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1)))
        >>> engine is None   # not a DeepSpeed state
        True
    """
    path = state.grad_path
    return path.engine if path is not None and path.name == "deepspeed" else None


def _split_optimizer(
    tx_or_config: GradientTransformation | Mapping | str | Path,
    deepspeed_config: Mapping | str | Path | None,
) -> tuple[GradientTransformation | None, dict]:
    """``(tx, user_config)`` from :func:`deepspeed_state`'s two ways of naming the optimizer."""
    tx: GradientTransformation | None = None
    if isinstance(tx_or_config, GradientTransformation):
        tx = tx_or_config
        user_config = load_config(deepspeed_config)
    else:
        if deepspeed_config is not None:
            raise ConfigError(
                "pass the DeepSpeed config once: either as tx_or_config (with an "
                "'optimizer' section) or as deepspeed_config with a medfunc tx"
            )
        user_config = load_config(tx_or_config)
    if tx is not None and "optimizer" in user_config:
        raise ConfigError(
            "the DeepSpeed config has an 'optimizer' section and a medfunc "
            "optimizer was given too; remove one of them"
        )
    if tx is None and "optimizer" not in user_config:
        raise ConfigError(
            "no optimizer: pass a medfunc optimizer as tx_or_config or an "
            "'optimizer' section in the DeepSpeed config"
        )
    return tx, user_config


def _fallback_state(
    model: torch.nn.Module,
    tx: GradientTransformation | None,
    loss_fn: Any,
    apply_fn: Any,
    policy: Any,
    seed: int,
    accumulate_steps: int,
) -> TrainState:
    """The data-parallel state used when DeepSpeed is not installed (with a warning)."""
    warnings.warn(
        "deepspeed is not installed (pip install 'medfunc[deepspeed]'); training with "
        "DistributedDataParallel-style gradient averaging (mf.distributed.data_parallel) "
        "instead, without ZeRO partitioning",
        RuntimeWarning,
        stacklevel=3,
    )
    if tx is None:
        raise ConfigError(
            "cannot fall back to data parallelism: the optimizer is defined "
            "in the DeepSpeed config; pass a medfunc optimizer instead"
        )
    state = init_state(
        model,
        tx,
        loss_fn=loss_fn,
        apply_fn=apply_fn,
        precision=policy,
        seed=seed,
        accumulate_steps=accumulate_steps,
        device=get_info().device,
    )
    return data_parallel(state)


def _initialize(model: torch.nn.Module, tx: GradientTransformation | None, config: dict) -> Any:
    """``deepspeed.initialize`` with medfunc's optimizer and schedule as client objects."""
    import deepspeed

    info = get_info()
    model.to(info.device)
    optimizer = scheduler = None
    if tx is not None:
        spec, _ = find_optimizer(tx)
        trainable = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        optimizer = torch_optimizer(tx, trainable)
        scheduler = ScheduleLR(optimizer, spec)
    _disable_shm_op_on_cpu(deepspeed)
    # get_info() joined the job through init(), which made the job's collective timeout torch's
    # default for new groups: the groups DeepSpeed creates (all without a timeout) get it too.
    ensure_process_group()
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))  # DeepSpeed asserts it is set
    with collective_guard("deepspeed.initialize"):
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=config,
            dist_init_required=False,
        )
    return engine


def deepspeed_state(
    model: torch.nn.Module,
    tx_or_config: GradientTransformation | Mapping | str | Path,
    deepspeed_config: Mapping | str | Path | None = None,
    *,
    max_grad_norm: float | None = None,
    micro_batch_size: int | None = None,
    loss_fn: Any = None,
    apply_fn: Any = None,
    precision: str = "fp32",
    seed: int = 0,
    accumulate_steps: int = 1,
) -> TrainState:
    """Wrap ``model`` in a DeepSpeed ZeRO engine and return a TrainState that steps through it.

    Call it on every rank after :func:`~medfunc.distributed.init`.

    Args:
        model: the module (built the same way on every rank).
        tx_or_config: a medfunc optimizer (``adamw``/``adam``/``sgd``, or a chain holding one; it
            becomes a client ``torch.optim`` optimizer with the same groups, and its LR schedule a
            client scheduler), or a DeepSpeed config whose ``"optimizer"`` section defines the
            optimizer (then ``deepspeed_config`` must be None). On the CPU such an Adam section
            needs ``"torch_adam": true`` in its params, or DeepSpeed compiles its own kernel.
        deepspeed_config: a DeepSpeed config dict or JSON path. Missing keys are filled from
            :func:`default_config` (ZeRO-2, ``max_grad_norm`` as ``gradient_clipping``,
            ``precision``, ``accumulate_steps``).
        max_grad_norm: global-norm clipping (a chain's ``clip_by_global_norm`` is not visible to
            DeepSpeed; pass its threshold here).
        micro_batch_size: per-rank examples per micro-batch, for DeepSpeed's bookkeeping.
        loss_fn: optional ``loss_fn(outputs, batch) -> loss``.
        apply_fn: optional ``apply_fn(model, batch) -> outputs``, how to call the model; it
            receives the DeepSpeed engine as ``model`` (calling it runs the module's forward).
        precision: "fp32", "bf16" or "fp16" (DeepSpeed's own mixed-precision modes).
        seed: the state's RNG key.
        accumulate_steps: micro-batches per optimizer update.

    Returns:
        A TrainState driven by the engine (:func:`deepspeed_step` runs it); with DeepSpeed
        missing, a :func:`data_parallel` state (with a warning; :func:`step_for` picks the
        right step for either).

    Raises:
        ConfigError: an optimizer given twice or not at all, ZeRO-3, or an unreadable config.

    Example (on every rank of a ``torchrun`` job, or in one process)::

        state = mf.distributed.deepspeed_state(
            model, mf.optim.adamw(3e-4), "ds_zero1.json", max_grad_norm=1.0)
    """
    tx, user_config = _split_optimizer(tx_or_config, deepspeed_config)
    policy = get_policy(precision)
    config = _merge_defaults(
        user_config,
        default_config(
            micro_batch_size=micro_batch_size or 1,
            accumulate_steps=accumulate_steps,
            max_grad_norm=max_grad_norm,
            precision=policy.name,
        ),
    )
    if not deepspeed_available():
        return _fallback_state(model, tx, loss_fn, apply_fn, policy, seed, accumulate_steps)
    if (
        tx is not None
        and len(tx.children) > 1
        and max_grad_norm is None
        and "gradient_clipping" not in user_config
    ):
        warnings.warn(
            "under DeepSpeed only the optimizer of the chain runs; its other transformations "
            "(e.g. clip_by_global_norm) are not applied. Pass max_grad_norm=... to "
            "deepspeed_state (or 'gradient_clipping' in the DeepSpeed config) to clip",
            UserWarning,
            stacklevel=2,
        )
    engine = _initialize(model, tx, config)
    module = engine.module
    state = init_state(
        module, chain(), loss_fn=loss_fn, apply_fn=apply_fn, precision=policy, seed=seed
    )
    device = state.device
    return state.replace(
        tx=tx,
        loss_scale=(),  # DeepSpeed scales the loss itself
        step=torch.tensor(
            int(engine.global_steps - engine.skipped_steps), dtype=torch.int64, device=device
        ),
        accum=AccumState(
            OrderedDict(),
            torch.zeros((), dtype=torch.int64),
            torch.zeros((), dtype=torch.float32, device=device),
        ),
        accumulate_steps=accumulate_steps,
        grad_path=GradPath("deepspeed", engine=engine),
    )
