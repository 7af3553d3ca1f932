"""MedicalModelTrainer: the seed-compatible training facade over medfunc's functional core.

The loop is ``state, metrics = mf.train_step(state, batch, donate=True)`` (or the compiled step)
over a :class:`~medfunc.state.TrainState`; evaluation is ``mf.eval_step``. Around it the trainer
batches datasets (a seeded shuffle per epoch, sharded under torchrun), logs averages every
``log_every`` optimizer steps, evaluates over the whole evaluation set, stops early, writes
atomic checkpoints that resume at the exact step and data position, and saves and exports the
final model. All options are in :class:`~medfunc.trainer_config.TrainerConfig`.

Example:
    >>> from medfunc.trainer import MedicalModelTrainer, TrainerConfig
    >>> config = TrainerConfig(num_epochs=3, batch_size=32, learning_rate=1e-3)
    >>> result = MedicalModelTrainer(model, config).train(train_ds, eval_ds, output_dir="run")
    >>> result.eval_metrics["auroc"]
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from medfunc import distributed, optim, schedules
from medfunc.checkpoint import read_checkpoint, restore_state, save_state
from medfunc.data import to_device
from medfunc.distributed.checkpoint import gather_full_state
from medfunc.errors import ConfigError, NonFiniteError
from medfunc.logging import create_logger
from medfunc.metrics import EvalAccumulator, find_logits
from medfunc.modeling import prepare_model
from medfunc.state import TrainState, bind_module, init_state
from medfunc.step import apply_model, eval_step, train_step
from medfunc.trainer_config import TrainerConfig
from medfunc.trainer_data import DatasetBatches, pin_memory

__all__ = ["MedicalModelTrainer", "TrainResult", "TrainerConfig", "resolve_device"]

log = logging.getLogger("medfunc.trainer")
WEIGHTS_FILE = "model.safetensors"
EXPORT_FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}


@dataclasses.dataclass
class TrainResult:
    """What :meth:`MedicalModelTrainer.train` produced.

    Attributes:
        output_dir: the run folder.
        global_step: optimizer steps taken (skipped non-finite steps included).
        epochs_completed: epochs run to their end.
        stopped_early: early stopping ended the run.
        best_metric: the best value of ``eval_metric`` seen, or None without evaluation.
        eval_metrics: the last evaluation's metrics (``{}`` without evaluation).
        history: every evaluation as ``{"epoch", "step", **metrics}``.
        checkpoints: checkpoint files written, in order.
        weights_path: ``{output_dir}/model.safetensors`` (None on ranks other than 0).
        exports: export format -> written file.
        export_errors: export format -> why it failed (the run's other outputs are kept).
    """

    output_dir: Path
    global_step: int = 0
    epochs_completed: int = 0
    stopped_early: bool = False
    best_metric: float | None = None
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    checkpoints: list[Path] = dataclasses.field(default_factory=list)
    weights_path: Path | None = None
    exports: dict[str, Path] = dataclasses.field(default_factory=dict)
    export_errors: dict[str, str] = dataclasses.field(default_factory=dict)


def resolve_device(spec: str) -> torch.device:
    """The device a ``TrainerConfig.device`` value names.

    Args:
        spec: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N" or "xla".

    Returns:
        The device.

    Raises:
        ConfigError: CUDA or torch_xla was asked for but is not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"TrainerConfig.device={spec!r} but CUDA is not available in this "
            "PyTorch build or machine; use device='auto' or 'cpu'"
        )
    if spec == "xla":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError:
            raise ConfigError(
                "TrainerConfig.device='xla' needs the torch_xla package, which is "
                "not installed; install torch-xla on a TPU host or use "
                "device='auto'"
            ) from None
        return xm.xla_device()
    return torch.device(spec)


# ----------------------------------------------------------------------------------------------
# optimizer and schedule
# ----------------------------------------------------------------------------------------------


def build_schedule(config: TrainerConfig, total_steps: int | None) -> schedules.Schedule:
    """The learning-rate schedule the config selects (counted in optimizer steps).

    Args:
        config: the options.
        total_steps: optimizer steps of the whole run (needed by linear_warmup, one_cycle and
            by cosine without ``t_max``).

    Returns:
        ``schedule(step) -> lr``.

    Raises:
        ConfigError: the schedule needs ``total_steps`` and it is unknown.

    Example:
        >>> build_schedule(TrainerConfig(scheduler="step", step_size=10), None)(10)
    """
    lr, name = config.learning_rate, config.scheduler
    needs_total = name in ("linear_warmup", "one_cycle") or (name == "cosine" and not config.t_max)
    if needs_total and total_steps is None:
        raise ConfigError(
            f"TrainerConfig.scheduler={name!r} needs the run length, but the "
            "training data has no len(); set TrainerConfig.total_steps"
        )
    if name == "none":
        return schedules.constant(lr)
    if name == "linear_warmup":
        warmup = config.warmup_steps
        if warmup > total_steps:
            log.warning(
                "warmup_steps=%d exceeds the run's %d optimizer steps; the learning "
                "rate warms up over all %d steps",
                warmup,
                total_steps,
                total_steps,
            )
            warmup = total_steps
        return schedules.linear_warmup(lr, warmup, total_steps)
    if name == "step":
        return schedules.step(lr, config.step_size, config.gamma)
    if name == "cosine":
        return schedules.cosine(lr, config.t_max or total_steps, config.eta_min)
    return schedules.one_cycle(
        lr,
        total_steps,
        pct_start=config.pct_start,
        anneal_strategy=config.anneal_strategy,
        div_factor=config.div_factor,
        final_div_factor=config.final_div_factor,
    )


def build_optimizer(
    config: TrainerConfig, schedule: schedules.Schedule, *, clip: bool = True
) -> optim.GradientTransformation:
    """The gradient transformation the config selects: clipping, then the optimizer.

    Args:
        config: the options.
        schedule: the learning rate (see :func:`build_schedule`).
        clip: include the clipping of ``grad_clip_mode`` (DeepSpeed clips by itself).

    Returns:
        ``chain(clip, optimizer)`` (or the optimizer alone with ``grad_clip_mode="none"`` or
        ``clip=False``).

    Example:
        >>> tx = build_optimizer(TrainerConfig(), schedules.constant(1e-3))
    """
    kwargs: dict[str, Any] = {
        "lr": schedule,
        "weight_decay": config.weight_decay,
        "lr_multipliers": config.layer_wise_lrs,
    }
    if config.optimizer == "sgd":
        kwargs["momentum"] = config.sgd_momentum
    else:
        kwargs.update(betas=config.betas, eps=config.eps)
    tx = optim.get_optimizer(config.optimizer, **kwargs)
    if not clip:
        return tx
    if config.grad_clip_mode == "norm":
        return optim.chain(optim.clip_by_global_norm(config.max_grad_norm), tx)
    if config.grad_clip_mode == "value":
        return optim.chain(optim.clip_by_value(config.grad_clip_value), tx)
    return tx


# ----------------------------------------------------------------------------------------------
# training metrics, accumulated on the device between log points
# ----------------------------------------------------------------------------------------------


class _TrainTracker:
    """Sums of the step metrics on the device; one host transfer per log point."""

    def __init__(self, device: torch.device) -> None:
        zeros = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        self.loss_sum = zeros(torch.float64)
        self.norm_sum = zeros(torch.float64)
        self.good = zeros(torch.float64)
        self.skipped = zeros(torch.float64)
        self.run = zeros(torch.float64)
        self.max_run = zeros(torch.float64)
        self.lr = zeros(torch.float64)
        self.loss_scale: torch.Tensor | None = None
        self.steps = 0

    def record(self, metrics: Mapping[str, torch.Tensor]) -> None:
        skipped = metrics["skipped"].to(torch.float64)
        self.loss_sum.add_(metrics["loss"].to(torch.float64))
        self.norm_sum.add_(torch.where(skipped > 0, 0.0, metrics["grad_norm"].double()))
        self.good.add_(1.0 - skipped)
        self.skipped.add_(skipped)
        self.run.add_(1.0).mul_(skipped)
        torch.maximum(self.max_run, self.run, out=self.max_run)
        self.lr.copy_(metrics["lr"])
        if "loss_scale" in metrics:
            self.loss_scale = metrics["loss_scale"].detach().clone()
        self.steps += 1

    def flush(self) -> dict[str, float]:
        """Interval averages as floats (one device sync); resets the sums."""
        values = [self.loss_sum, self.norm_sum, self.good, self.skipped, self.max_run, self.lr]
        if self.loss_scale is not None:
            values.append(self.loss_scale.to(self.lr.device, torch.float64))
        numbers = torch.stack(values).tolist()
        loss_sum, norm_sum, good, skipped, max_run, lr = numbers[:6]
        out = {
            "train/loss": loss_sum / max(self.steps, 1),
            "train/lr": lr,
            "train/grad_norm": norm_sum / good if good else float("nan"),
            "train/skipped_steps": skipped,
            "_max_run": max_run,
        }
        if self.loss_scale is not None:
            out["train/loss_scale"] = numbers[6]
        for t in (self.loss_sum, self.norm_sum, self.good, self.skipped, self.max_run):
            t.zero_()
        self.steps = 0
        return out


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Progress:
    """Loop position and early-stopping state (saved as the checkpoint's trainer_state)."""

    epoch: int = 0
    batch_index: int = 0
    global_step: int = 0
    best_metric: float | None = None
    patience_counter: int = 0
    last_eval_step: int = -1

    def as_extra(self, metric: str, run: Mapping[str, Any] | None) -> dict[str, Any]:
        extra = {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "loop_step": self.global_step,
            "best_metric": self.best_metric,
            "patience_counter": self.patience_counter,
            "last_eval_step": self.last_eval_step,
            "eval_metric": metric,
        }
        if run:
            extra["run"] = dict(run)
        return extra


class MedicalModelTrainer:
    """Fine-tune ``model`` with the options of ``config`` (see docs/trainer.md).

    Args:
        model: a ``torch.nn.Module`` returning a loss tensor or a mapping/ModelOutput with
            ``"loss"`` (and ``"logits"`` for classification metrics), called as
            ``model(**batch)`` for dict batches.
        config: the options (default: ``TrainerConfig()``).
        loss_fn: optional ``loss_fn(outputs, batch) -> loss`` for models that return no loss.
        run_metadata: JSON-able facts about the run (e.g. the recipe) stored in checkpoints.

    Example:
        >>> trainer = MedicalModelTrainer(model, TrainerConfig(num_epochs=2))
        >>> result = trainer.train(train_ds, eval_ds, output_dir="runs/demo")
        >>> trainer.evaluate(eval_ds)["accuracy"]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainerConfig | None = None,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        run_metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config is None:
            config = TrainerConfig()
        if not isinstance(config, TrainerConfig):
            raise ConfigError(f"config must be a TrainerConfig, got {type(config).__name__}")
        self.config = config
        self.loss_fn = loss_fn
        self.run_metadata = dict(run_metadata or {})
        self.dist = distributed.init()
        if config.device == "auto" and self.dist.world_size > 1:
            self.device = self.dist.device
        else:
            self.device = resolve_device(config.device)
        self.model = model
        self.state: TrainState | None = None
        self._prepared = False

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def is_main_process(self) -> bool:
        """True on rank 0 (and in a single process): the rank that writes files."""
        return self.dist.rank == 0

    def _prepare_model(self) -> torch.nn.Module:
        if not self._prepared:
            cfg = self.config
            self.model = prepare_model(
                self.model,
                gradient_checkpointing=cfg.gradient_checkpointing,
                channels_last=cfg.channels_last,
                dropout_prob=cfg.dropout_prob,
                device=self.device,
            )
            self._prepared = True
        return self.model

    def _to_device(self, batch: Any) -> Any:
        """Move a batch to the training device; to CUDA through pinned memory, without
        waiting for the copy (no host sync per step)."""
        if self.device.type != "cuda":
            return to_device(batch, self.device)
        return to_device(pin_memory(batch), self.device, non_blocking=True)

    def _init_kwargs(self) -> dict[str, Any]:
        return {
            "loss_fn": self.loss_fn,
            "precision": self.config.precision,
            "seed": self.config.seed,
            "accumulate_steps": self.config.gradient_accumulation_steps,
        }

    def _build_state(self, schedule: schedules.Schedule) -> TrainState:
        cfg = self.config
        model = self._prepare_model()
        tx = build_optimizer(cfg, schedule)
        if cfg.fsdp:
            return distributed.fully_shard_state(model, tx, **self._init_kwargs())
        if cfg.deepspeed:
            if cfg.grad_clip_mode == "value":
                raise ConfigError(
                    "TrainerConfig.grad_clip_mode='value' is not available with deepspeed=True "
                    "(DeepSpeed clips by global norm); use 'norm' or 'none'"
                )
            clip = cfg.max_grad_norm if cfg.grad_clip_mode == "norm" else None
            return distributed.deepspeed_state(
                model,
                build_optimizer(cfg, schedule, clip=False),
                cfg.deepspeed_config,
                max_grad_norm=clip,
                micro_batch_size=cfg.batch_size,
                **self._init_kwargs(),
            )
        state = init_state(model, tx, device=self.device, **self._init_kwargs())
        if distributed.is_distributed():
            state = distributed.data_parallel(state)
        return state

    def _sharded(self) -> bool:
        return self.config.fsdp or self.config.deepspeed

    def _step_fn(self) -> Callable[..., tuple[TrainState, dict[str, torch.Tensor]]]:
        mode = self.config.compile
        if not mode:
            return train_step
        from medfunc.compile import compile_step, default_mode

        return compile_step(train_step, mode=default_mode(self.device) if mode is True else mode)

    def _inference_state(self) -> TrainState:
        if self.state is not None:
            return self.state
        model = self._prepare_model()
        return init_state(
            model,
            optim.chain(),
            device=self.device,
            loss_fn=self.loss_fn,
            precision=self.config.precision,
            seed=self.config.seed,
        )

    # -- checkpoints ----------------------------------------------------------------------------

    def _save_checkpoint(self, state: TrainState, path: Path, progress: _Progress) -> None:
        cfg = self.config
        extra = progress.as_extra(cfg.eval_metric, self.run_metadata)
        if self._sharded():
            distributed.save_full(
                state,
                path,
                extra=extra,
                save_optimizer=cfg.save_optimizer,
                save_scheduler=cfg.save_scheduler,
            )
        elif self.is_main_process:
            save_state(
                state,
                path,
                extra=extra,
                save_optimizer=cfg.save_optimizer,
                save_scheduler=cfg.save_scheduler,
            )
        distributed.barrier()

    def _resume(self, state: TrainState, path: str) -> tuple[TrainState, _Progress]:
        payload = read_checkpoint(path)
        if self._sharded():
            state = distributed.load_full(path, like=state)
        else:
            state = restore_state(payload, like=state)
        saved = payload.get("trainer_state", {})
        progress = _Progress(
            epoch=int(saved.get("epoch", 0)),
            batch_index=int(saved.get("batch_index", 0)),
            global_step=int(saved.get("loop_step", saved.get("global_step", 0))),
            best_metric=saved.get("best_metric"),
            patience_counter=int(saved.get("patience_counter", 0)),
            last_eval_step=int(saved.get("last_eval_step", -1)),
        )
        log.info(
            "resumed from %s at epoch %d, batch %d, step %d",
            path,
            progress.epoch,
            progress.batch_index,
            progress.global_step,
        )
        return state, progress

    # -- evaluation -----------------------------------------------------------------------------

    def _eval_batches(
        self, dataset: Any, *, role: str = "eval_dataset", sharded: bool = True
    ) -> DatasetBatches:
        """In-order batches of ``dataset``; ``sharded`` splits them over the ranks."""
        cfg = self.config
        return DatasetBatches(
            dataset,
            role=role,
            train=False,
            batch_size=cfg.eval_batch_size or cfg.batch_size,
            shuffle=False,
            seed=cfg.seed,
            rank=self.dist.rank if sharded else 0,
            world=self.dist.world_size if sharded else 1,
        )

    def _run_eval(self, state: TrainState, batches: DatasetBatches) -> dict[str, float]:
        user_fn = self.config.eval_compute_metrics
        accumulator = EvalAccumulator(state.device, keep_outputs=user_fn is not None)
        for batch in batches.epoch(0):
            batch = self._to_device(batch)
            result = eval_step(state, batch)
            accumulator.add(batch, result["outputs"], result["loss"])
        return accumulator.compute(user_fn)

    def evaluate(self, eval_dataset: Any) -> dict[str, float]:
        """Evaluate the current model on the whole of ``eval_dataset``.

        Metrics are computed once over every example (all ranks' examples under torchrun):
        ``loss`` (the example-weighted mean of the batch losses), and for classifiers
        ``accuracy``, ``precision``, ``recall``, ``f1`` and (binary) ``auroc``, plus whatever
        ``eval_compute_metrics(outputs_list, labels)`` returns.

        Args:
            eval_dataset: a map-style Dataset, a DataLoader or an iterable of dict batches.

        Returns:
            metric name -> float.

        Example:
            >>> trainer.evaluate(eval_ds)
            {'loss': 0.08, 'accuracy': 0.97, 'precision': 0.98, 'recall': 0.95, 'f1': 0.96,
             'auroc': 0.995}
        """
        return self._run_eval(self._inference_state(), self._eval_batches(eval_dataset))

    def predict(self, dataset: Any) -> torch.Tensor | list[Any]:
        """Run the model (eval mode, no gradients) over ``dataset`` in order.

        Args:
            dataset: a map-style Dataset, a DataLoader or an iterable of batches (labels are
                not needed).

        Returns:
            The concatenated logits (or tensor outputs) on the CPU, or the list of per-batch
            outputs when the model returns neither.

        Example:
            >>> probabilities = trainer.predict(eval_ds).softmax(-1)[:, 1]
        """
        state = self._inference_state()
        batches = self._eval_batches(dataset, role="dataset", sharded=False)
        outputs = [apply_model(state, self._to_device(b)) for b in batches.epoch(0)]
        tensors = [o if isinstance(o, torch.Tensor) else find_logits(o) for o in outputs]
        if tensors and all(t is not None for t in tensors):
            return torch.cat([t.detach().cpu() for t in tensors])
        return [to_device(o, "cpu") for o in outputs]

    # -- training -------------------------------------------------------------------------------

    def train(
        self,
        train_dataset: Any,
        eval_dataset: Any = None,
        output_dir: str | os.PathLike = "./fine_tuned_model",
    ) -> TrainResult:
        """Train for ``num_epochs`` epochs, evaluating, checkpointing and exporting as configured.

        Args:
            train_dataset: a map-style Dataset (batched with a seeded shuffle per epoch), a
                DataLoader, or an iterable of dict batches.
            eval_dataset: optional evaluation data of the same kinds.
            output_dir: the run folder: ``checkpoint-epoch{N}.pt``, ``checkpoint-step{S}.pt``,
                ``metrics.jsonl``, ``tb_logs/``, ``model.safetensors`` and exports.

        Returns:
            The :class:`TrainResult`.

        Raises:
            ConfigError: inconsistent options or data; BatchError: unreadable data;
            NonFiniteError: too many consecutive non-finite steps.

        Example:
            >>> result = trainer.train(train_ds, eval_ds, output_dir="runs/demo")
            >>> result.checkpoints[-1].name
            'checkpoint-epoch3.pt'
        """
        cfg = self.config
        out = Path(output_dir)
        k = cfg.gradient_accumulation_steps
        self._check_exports()
        train_batches = DatasetBatches(
            train_dataset,
            role="train_dataset",
            train=True,
            batch_size=cfg.batch_size,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            rank=self.dist.rank,
            world=self.dist.world_size,
        )
        if train_batches.one_shot and cfg.num_epochs > 1:
            raise ConfigError(
                "train_dataset is a one-shot iterator but num_epochs > 1; pass a "
                "list, a Dataset or a DataLoader that can be iterated again"
            )
        eval_batches = self._eval_batches(eval_dataset) if eval_dataset is not None else None
        steps_per_epoch = len(train_batches) // k if train_batches.has_length else None
        if steps_per_epoch == 0:
            raise ConfigError(
                f"train_dataset gives {len(train_batches)} batch(es) per epoch, "
                f"fewer than gradient_accumulation_steps={k}: no optimizer step "
                "would run; lower batch_size or gradient_accumulation_steps"
            )
        total_steps = cfg.total_steps or (
            steps_per_epoch * cfg.num_epochs if steps_per_epoch else None
        )
        state = self._build_state(build_schedule(cfg, total_steps))
        progress = _Progress()
        if cfg.resume_from:
            state, progress = self._resume(state, cfg.resume_from)
        result = TrainResult(
            output_dir=out,
            global_step=progress.global_step,
            epochs_completed=progress.epoch,
            best_metric=progress.best_metric,
        )
        if self.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        logger = create_logger(
            out,
            enable_tensorboard=cfg.enable_tensorboard,
            tb_log_dir=cfg.tb_log_dir,
            enable_wandb=cfg.enable_wandb,
            wandb_project=cfg.wandb_project,
            wandb_run_name=cfg.wandb_run_name,
            run_config=cfg.to_dict(),
            is_main_process=self.is_main_process,
            progress=cfg.progress_bar,
            total_steps=total_steps,
        )
        try:
            if progress.global_step:
                logger.progress_update(progress.global_step)
            state = self._loop(
                state, progress, train_batches, eval_batches, logger, result, steps_per_epoch
            )
            self.state = state
            self._finish(state, result)
        finally:
            logger.close()
        return result

    def _loop(
        self,
        state: TrainState,
        progress: _Progress,
        train_batches: DatasetBatches,
        eval_batches: DatasetBatches | None,
        logger: Any,
        result: TrainResult,
        steps_per_epoch: int | None,
    ) -> TrainState:
        cfg = self.config
        out = result.output_dir
        step_fn = self._step_fn()
        tracker = _TrainTracker(state.device)
        k = cfg.gradient_accumulation_steps
        start_epoch, start_batch = progress.epoch, progress.batch_index
        for epoch in range(start_epoch, cfg.num_epochs):
            progress.epoch = epoch
            progress.batch_index = start_batch if epoch == start_epoch else 0
            stop = False
            for window in train_batches.windows(epoch, progress.batch_index, k):
                for batch in window:
                    state, metrics = step_fn(state, self._to_device(batch), donate=True)
                progress.batch_index += k
                progress.global_step += 1
                tracker.record(metrics)
                logger.progress_update(1)
                step = progress.global_step
                if step % cfg.log_every == 0:
                    self._log_train(tracker, logger, step, epoch, progress, steps_per_epoch)
                if (
                    eval_batches is not None
                    and cfg.eval_every_steps
                    and (step % cfg.eval_every_steps == 0)
                ):
                    stop = self._evaluate_and_track(
                        state, eval_batches, logger, progress, result, epoch + 1
                    )
                if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    path = out / f"checkpoint-step{step}.pt"
                    self._save_checkpoint(state, path, progress)
                    result.checkpoints.append(path)
                if stop:
                    break
            result.global_step = progress.global_step
            if stop:
                result.stopped_early = True
                break
            progress.epoch, progress.batch_index = epoch + 1, 0
            result.epochs_completed = epoch + 1
            if (
                eval_batches is not None
                and cfg.eval_at_epoch_end
                and (progress.last_eval_step != progress.global_step)
            ):
                stop = self._evaluate_and_track(
                    state, eval_batches, logger, progress, result, epoch + 1
                )
            if cfg.save_every_epochs and (epoch + 1) % cfg.save_every_epochs == 0:
                path = out / f"checkpoint-epoch{epoch + 1}.pt"
                self._save_checkpoint(state, path, progress)
                result.checkpoints.append(path)
            if stop:
                result.stopped_early = True
                break
        if tracker.steps:
            self._log_train(tracker, logger, progress.global_step, progress.epoch, progress, None)
        result.best_metric = progress.best_metric
        return state

    def _log_train(
        self,
        tracker: _TrainTracker,
        logger: Any,
        step: int,
        epoch: int,
        progress: _Progress,
        steps_per_epoch: int | None,
    ) -> None:
        scalars = tracker.flush()
        max_run = scalars.pop("_max_run")
        if self.dist.world_size > 1:
            mean = distributed.all_reduce_mean(torch.tensor(scalars["train/loss"]))
            scalars["train/loss"] = float(mean)
        limit = self.config.max_consecutive_skipped_steps
        if limit is not None and max_run >= limit:
            raise NonFiniteError(
                f"{int(max_run)} consecutive optimizer steps (up to step {step}) had non-finite "
                "gradients and were skipped (max_consecutive_skipped_steps="
                f"{limit}); lower the learning rate, check the data for NaN/inf values, or use "
                "amp_dtype=bfloat16"
            )
        if steps_per_epoch:
            scalars["train/epoch"] = epoch + progress.batch_index / (
                steps_per_epoch * self.config.gradient_accumulation_steps
            )
        logger.log(scalars, step=step)
        logger.progress_update(0, loss=scalars["train/loss"], lr=scalars["train/lr"])

    def _evaluate_and_track(
        self,
        state: TrainState,
        eval_batches: DatasetBatches,
        logger: Any,
        progress: _Progress,
        result: TrainResult,
        epoch: int,
    ) -> bool:
        """Evaluate, log, update the best metric and patience; True when training should stop."""
        cfg = self.config
        metrics = self._run_eval(state, eval_batches)
        step = progress.last_eval_step = progress.global_step
        logger.log({f"eval/{name}": value for name, value in metrics.items()}, step=step)
        result.eval_metrics = metrics
        result.history.append({"epoch": epoch, "step": step, **metrics})
        if self.is_main_process:
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            log.info("epoch %d step %d eval: %s", epoch, step, shown)
        if cfg.eval_metric not in metrics:
            raise ConfigError(
                f"TrainerConfig.eval_metric={cfg.eval_metric!r} is not among the "
                f"evaluation results {sorted(metrics)}; pick one of them"
            )
        value = metrics[cfg.eval_metric]
        best = progress.best_metric
        delta = cfg.early_stopping_min_delta
        if cfg.metric_mode == "min":
            improved = best is None or value < best - delta
        else:
            improved = best is None or value > best + delta
        if improved:
            progress.best_metric, progress.patience_counter = value, 0
        else:
            progress.patience_counter += 1
        patience = cfg.early_stopping_patience
        stop = patience is not None and progress.patience_counter >= patience
        stop = distributed.agree(stop, op="any")
        if stop and self.is_main_process:
            log.info(
                "early stopping at step %d: %s did not improve for %d evaluation(s) (best %.6g)",
                step,
                cfg.eval_metric,
                progress.patience_counter,
                progress.best_metric,
            )
        return stop

    # -- final outputs --------------------------------------------------------------------------

    def _check_exports(self) -> None:
        cfg = self.config
        for flag in ("export_torchscript", "export_onnx"):
            if getattr(cfg, flag) and cfg.export_input_example is None:
                raise ConfigError(
                    f"TrainerConfig.{flag}=True needs export_input_example, a dict "
                    "of example model inputs such as {'input_ids': "
                    "torch.zeros(1, 8, dtype=torch.long)}"
                )

    def _finish(self, state: TrainState, result: TrainResult) -> None:
        if self._sharded():
            full = gather_full_state(state)
        else:
            full = state
            bind_module(state)
        if self.is_main_process:
            result.weights_path = save_weights(full, result.output_dir / WEIGHTS_FILE)
            self._export(state, result)
        distributed.barrier()

    def _export(self, state: TrainState, result: TrainResult) -> None:
        cfg = self.config
        wanted = [
            name
            for name, flag in (("torchscript", cfg.export_torchscript), ("onnx", cfg.export_onnx))
            if flag
        ]
        if not wanted:
            return
        if self._sharded():
            for name in wanted:
                result.export_errors[name] = (
                    "exports are not made from fsdp/deepspeed runs; load model.safetensors into "
                    "the unsharded model and call medfunc.export, or run `medfunc export` on "
                    "a checkpoint"
                )
                log.warning("%s export skipped: %s", name, result.export_errors[name])
            return
        from medfunc import export

        example = to_device(cfg.export_input_example, state.device)
        for name in wanted:
            path = result.output_dir / EXPORT_FILES[name]
            try:
                if name == "torchscript":
                    export.to_torchscript(state, example, path)
                else:
                    export.to_onnx(state, example, path, opset=cfg.onnx_opset)
            except Exception as err:
                reason = f"{type(err).__name__}: {err}"
                result.export_errors[name] = reason
                log.warning("%s export failed (training outputs are kept): %s", name, reason)
            else:
                result.exports[name] = path


def save_weights(state: TrainState, path: str | os.PathLike) -> Path:
    """Write the state's parameters and buffers to a safetensors file, atomically.

    Args:
        state: the trained state.
        path: the target, e.g. ``run/model.safetensors``.

    Returns:
        The path written.

    Example:
        >>> save_weights(trainer.state, "run/model.safetensors")
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        name: t.detach().to("cpu").clone().contiguous()
        for name, t in (*state.params.items(), *state.buffers.items())
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
