"""MedicalModelTrainer: the seed-compatible training facade over medfunc's functional core.

The loop is ``state, metrics = mf.train_step(state, batch, donate=True)`` (or the compiled step)
over a :class:`~medfunc.state.TrainState`; evaluation is ``mf.eval_step``. Around it the trainer
batches datasets (a seeded shuffle per epoch, sharded under torchrun), logs averages every
``log_every`` optimizer steps, evaluates over the whole evaluation set, stops early, writes
atomic checkpoints that resume at the exact step and data position, and saves and exports the
final model. All options are in :class:`~medfunc.trainer_config.TrainerConfig`.

Example (the bundled breast-cancer recipe: an MLP on 342 training and 114 validation examples):
    >>> from medfunc.recipes import get_recipe
    >>> from medfunc.trainer import MedicalModelTrainer, TrainerConfig
    >>> parts = get_recipe("breast_cancer").build()
    >>> config = TrainerConfig(
    ...     num_epochs=2, batch_size=32, learning_rate=1e-3, progress_bar=False, log_level="warning"
    ... )
    >>> trainer = MedicalModelTrainer(parts.model, config)
    >>> result = trainer.train(parts.train_dataset, parts.eval_dataset, output_dir="run")
    >>> result.global_step, [path.name for path in result.checkpoints]
    (22, ['checkpoint-epoch1.pt', 'checkpoint-epoch2.pt'])
    >>> sorted(result.eval_metrics)
    ['accuracy', 'auprc', 'auroc', 'f1', 'loss', 'precision', 'recall', 'sensitivity',
     'specificity']
    >>> trainer.evaluate(parts.eval_dataset)["auroc"] > 0.9
    True
    >>> trainer.predict(parts.eval_dataset).shape
    torch.Size([114, 2])
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils.data import DataLoader

from medfunc import distributed, optim
from medfunc.best_model import BestCheckpoint
from medfunc.checkpoint import save_state
from medfunc.compile import compile_step, resolve_mode
from medfunc.data import to_device
from medfunc.dataset_columns import select_model_inputs
from medfunc.device_options import apply_cudnn_benchmark
from medfunc.device_options import resolve as resolve_device_options
from medfunc.early_stopping import EarlyStopping
from medfunc.errors import ConfigError
from medfunc.final_outputs import (
    WEIGHTS_FILE,
    check_export_example,
    check_exports,
    write_final_outputs,
)
from medfunc.legacy import read_resume_payload, resume_into
from medfunc.logging import MetricLogger, create_logger
from medfunc.metrics import evaluate_batches, find_logits
from medfunc.modeling import prepare_model
from medfunc.peft_models import trainable_only
from medfunc.preemption import PreemptionGuard
from medfunc.run_folder import (
    checkpoint_files,
    prune_checkpoints,
    resolve_run_dir,
)
from medfunc.run_report import SETTINGS_KEY, announce_start, current_weights, run_settings
from medfunc.skipped_steps import EpochUpdates, LossScaleWatch, check_epoch_updates
from medfunc.state import TrainState, bind_module, ema_params, init_state
from medfunc.step import apply_model
from medfunc.tracking import LoopPosition, StepMetricSums, TrainResult, check_skipped_run
from medfunc.trainer_build import build_optimizer, build_schedule  # noqa: F401 - re-exported
from medfunc.trainer_config import TrainerConfig
from medfunc.trainer_data import (
    DatasetBatches,
    LoaderOptions,
    evaluation_batches,
    loader_options,
    resolve_device,
    steps_per_epoch,
    training_batches,
)
from medfunc.trainer_surface import OriginalTrainerSurface
from medfunc.trainer_views import EvalResult
from medfunc.visualize import Visualizer
from medfunc.weights import save_weights

__all__ = [
    "EvalResult",
    "MedicalModelTrainer",
    "TrainResult",
    "TrainerConfig",
    "resolve_device",
    "save_weights",
]

log = logging.getLogger("medfunc.trainer")


@dataclasses.dataclass
class _Run:
    """The moving parts of one :meth:`MedicalModelTrainer.train` call."""

    train: DatasetBatches
    eval: DatasetBatches | None
    logger: MetricLogger
    result: TrainResult
    position: LoopPosition
    sums: StepMetricSums
    updates: EpochUpdates
    best: BestCheckpoint
    steps_per_epoch: int | None
    #: the run folder's checkpoints, oldest first (a resumed run's earlier ones included)
    saved: list[Path] = dataclasses.field(default_factory=list)
    #: the global step of the last checkpoint written (or resumed from)
    last_saved_step: int = 0
    #: the checkpoint written last (or resumed from): what an interrupted run resumes from
    last_checkpoint: Path | None = None
    #: records SIGTERM / SIGINT during the loop (see :mod:`medfunc.preemption`)
    guard: PreemptionGuard = dataclasses.field(default_factory=PreemptionGuard)
    #: warns once when the fp16 loss scale collapses
    scale_watch: LossScaleWatch = dataclasses.field(default_factory=LossScaleWatch)
    #: skipped optimizer steps logged so far (shown beside the progress bar)
    skipped_total: int = 0


def _shown(metrics: Mapping[str, float]) -> str:
    """``metrics`` as ``name=value`` pairs for a console line."""
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _boundary_name(position: LoopPosition) -> str:
    """The checkpoint name at ``position``: ``checkpoint-epoch{N}.pt`` at an epoch's end."""
    at_epoch_end = position.batch_index == 0
    name = f"epoch{position.epoch}" if at_epoch_end else f"step{position.global_step}"
    return f"checkpoint-{name}.pt"


class _EarlyStopSignal(Exception):  # noqa: N818 - the original trainer's name
    """Raise from a trainer hook (e.g. an overridden ``_log``) to stop training after this step.

    The run ends as an early-stopped one: the last checkpoint and final outputs are written.
    """


class MedicalModelTrainer(OriginalTrainerSurface):
    """Fine-tune ``model`` with the options of ``config`` (see docs/trainer.md).

    Constructing a trainer does not touch ``torch.distributed``: under torchrun the process
    group is joined when :meth:`train`, :meth:`evaluate` or :meth:`predict` first runs.

    Args:
        model: a ``torch.nn.Module`` returning a loss tensor or a mapping/ModelOutput with
            ``"loss"`` (and ``"logits"`` for classification metrics), called as
            ``model(**batch)`` for dict batches.
        config: the options (default: ``TrainerConfig()``).
        loss_fn: optional ``loss_fn(outputs, batch) -> loss`` for models that return no loss.
        apply_fn: optional ``apply_fn(model, batch) -> outputs``, how to call the model on a
            batch when the batch convention does not fit (e.g. ``lambda m, b: m(b[0])`` for
            a ``TensorDataset(x, y)``); used in training, evaluation and prediction.
        run_metadata: JSON-able facts about the run (e.g. the recipe) stored in checkpoints.

    Raises:
        ConfigError: ``model`` is no module, ``config`` no TrainerConfig, or the device is not
            available.

    Example (a runnable version is in the module's docstring)::

        trainer = MedicalModelTrainer(model, TrainerConfig(num_epochs=2))
        result = trainer.train(train_ds, eval_ds, output_dir="runs/demo")
        trainer.evaluate(eval_ds)["accuracy"]       # 0.97
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainerConfig | None = None,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        apply_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
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
        self.apply_fn = apply_fn
        self.run_metadata = dict(run_metadata or {})
        self.device = resolve_device(config.device)
        self.model = model
        self.state: TrainState | None = None
        self._prepared = False
        self._scheduled = False
        self._run: _Run | None = None

    @property
    def is_main_process(self) -> bool:
        """True on rank 0 (and in a single process): the rank that writes files."""
        return distributed.is_main_process()

    def _join(self) -> None:
        """Join the torchrun process group (idempotent; nothing in a single process).

        With ``device="auto"`` a multi-process job trains on each rank's own device.
        """
        cfg = self.config
        if cfg.use_ddp and "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "TrainerConfig.use_ddp=True but this process was not started by torchrun (no "
                "WORLD_SIZE); launch with `torchrun --nproc-per-node N script.py`, or leave "
                "use_ddp=False (under torchrun medfunc trains data-parallel by itself)"
            )
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        options = resolve_device_options(cfg, self.device, multi_process=several)
        info = distributed.init(backend=options.ddp_backend)
        if self.config.device == "auto" and info.world_size > 1:
            self.device = info.device

    def _prepare_model(self) -> torch.nn.Module:
        if not self._prepared:
            cfg = self.config
            self._maybe_enable_gradient_checkpointing()
            self.model = prepare_model(
                self.model,
                gradient_checkpointing=False,
                activation_recompute=cfg.activation_recompute and cfg.activation_recompute_patterns,
                channels_last=cfg.channels_last,
                dropout_prob=cfg.dropout_prob,
                device=self.device,
            )
            self._prepared = True
        return self.model

    def _init_kwargs(self) -> dict[str, Any]:
        kwargs = {
            "loss_fn": self.loss_fn,
            "precision": self.config.precision,
            "seed": self.config.seed,
            "accumulate_steps": self.config.gradient_accumulation_steps,
        }
        if self.apply_fn is not None:
            kwargs["apply_fn"] = self.apply_fn
        return kwargs

    def _loading(self) -> LoaderOptions:
        """The DataLoader options, built with this module's ``DataLoader`` (replaceable)."""
        return loader_options(self.config, self.device, DataLoader)

    def _build_state(self, total_steps: int | None) -> TrainState:
        cfg = self.config
        model = self._prepare_model()
        if cfg.fsdp:
            return distributed.fully_shard_state(
                model, self._transformation(total_steps), **self._init_kwargs()
            )
        if cfg.deepspeed:
            if cfg.grad_clip_mode == "value":
                raise ConfigError(
                    "TrainerConfig.grad_clip_mode='value' is not available with deepspeed=True "
                    "(DeepSpeed clips by global norm); use 'norm' or 'none'"
                )
            return distributed.deepspeed_state(
                model,
                self._transformation(total_steps, clip=False),
                cfg.deepspeed_config,
                max_grad_norm=cfg.max_grad_norm if cfg.grad_clip_mode == "norm" else None,
                micro_batch_size=cfg.batch_size,
                **self._init_kwargs(),
            )
        tx = self._transformation(total_steps)
        kwargs = self._init_kwargs()
        state = init_state(model, tx, device=self.device, ema_decay=cfg.ema_decay, **kwargs)
        return distributed.data_parallel(state) if distributed.is_distributed() else state

    def _sharded(self) -> bool:
        return self.config.fsdp or self.config.deepspeed

    def _step_fn(self, state: TrainState) -> Callable[..., tuple[TrainState, dict]]:
        """The state's step function (``distributed.step_for``), compiled as configured."""
        step = distributed.step_for(state)
        mode = resolve_mode(self.config.compile, self.device)
        return step if mode is None else compile_step(step, mode=mode)

    def _inference_state(self) -> TrainState:
        self._join()
        if self.state is not None:
            return self.state
        return init_state(
            self._prepare_model(),
            optim.chain(),
            device=self.device,
            loss_fn=self.loss_fn,
            apply_fn=self.apply_fn,
            precision=self.config.precision,
            seed=self.config.seed,
        )

    def _write_checkpoint(
        self, state: TrainState, run: _Run, name: str, *, forced: bool = False
    ) -> None:
        """Write checkpoint ``name`` (marked best when it holds the best evaluation's state).

        ``forced``: written only because it holds the best evaluation; removed once a newer
        best checkpoint is written.
        """
        cfg, position = self.config, run.position
        path = run.result.output_dir / name
        is_best = run.best.claim(position, name)
        options = {
            "extra": {
                **position.to_trainer_state(cfg.eval_metric, self.run_metadata),
                "epoch_updates": run.updates.to_list(),
                SETTINGS_KEY: run_settings(cfg, run.steps_per_epoch),
            },
            "save_optimizer": cfg.save_optimizer,
            "save_scheduler": cfg.save_scheduler,
            "trainable_only": trainable_only(
                cfg.save_trainable_only, self.model, sharded=self._sharded()
            ),
        }
        if self._sharded():
            distributed.save_full(state, path, **options)
        elif self.is_main_process:
            save_state(state, path, **options)
        run.result.checkpoints.append(path)
        run.saved.append(path)
        run.last_saved_step, run.last_checkpoint = position.global_step, path
        if self.is_main_process:
            if is_best:
                run.best.written(position, path, forced=forced, saved=run.saved)
            self._prune(run)
        distributed.barrier()

    def _prune(self, run: _Run) -> None:
        """Apply ``save_total_limit``: never to the best checkpoint or the one resumed from."""
        best = run.position.best_checkpoint
        protected = [Path(self.config.resume_from or "")] if self.config.resume_from else []
        if best is not None:
            protected.append(run.result.output_dir / best)
        for path in prune_checkpoints(run.saved, self.config.save_total_limit, protected):
            run.saved.remove(path)
            log.info("removed %s (save_total_limit=%d)", path, self.config.save_total_limit)

    def _resume(
        self, state: TrainState, path: str, stopping: EarlyStopping
    ) -> tuple[TrainState, LoopPosition, dict[str, Any], list[str]]:
        """The state, loop position, ``trainer_state`` and payload entries of ``path``."""
        if self._sharded():
            payload = read_resume_payload(path, like=state, sharded=True)
            state = distributed.load_full(path, like=state)
        else:
            # the state was built only to restore into: the checkpoint goes into its (and the
            # model's) storage, with no second copy of the state
            state, payload = resume_into(path, like=state)
            self.state = state
        saved = payload.get("trainer_state", {})
        position = LoopPosition.from_trainer_state(saved, stopping)
        parts = [key for key, value in payload.items() if not isinstance(value, Mapping) or value]
        return state, position, saved, parts

    def _eval_batches(self, dataset: Any) -> DatasetBatches:
        """In-order batches of ``dataset``, split over the ranks."""
        rank, world = distributed.rank(), distributed.world_size()
        loading = self._loading()
        dataset = select_model_inputs(dataset, self.model, "eval_dataset")
        return evaluation_batches(dataset, self.config, rank=rank, world=world, loading=loading)

    def _run_eval(self, state: TrainState, batches: DatasetBatches) -> dict[str, float]:
        on_device = (self._move_to_device(b) for b in batches.epoch(0))
        if self.config.eval_with_ema and state.ema:
            state = state.replace(params=ema_params(state))
        cfg = self.config
        return evaluate_batches(
            state, on_device, cfg.eval_set_metrics, batch_metric_fn=cfg.eval_compute_metrics
        )

    def evaluate(self, eval_dataset: Any) -> EvalResult:
        """Evaluate the current model on the whole of ``eval_dataset``.

        Metrics are computed once over every example (all ranks' examples under torchrun):
        ``loss`` (the example-weighted mean of the batch losses); for classifiers
        ``accuracy``, ``precision``, ``recall``, ``sensitivity``, ``specificity``, ``f1`` and
        (binary) ``auroc`` and ``auprc``; for segmentation ``dice``, ``iou`` and ``hausdorff``
        (see docs/metrics.md); the example-weighted means of ``eval_compute_metrics(batch,
        model_output)``; and whatever ``eval_set_metrics(outputs_list, labels)`` returns.

        Args:
            eval_dataset: a map-style Dataset, a DataLoader or an iterable of dict batches.

        Returns:
            An :class:`EvalResult`: a dict metric name -> float (``"loss"`` included), with
            ``.loss`` and ``.metrics`` (the others) as in the original trainer.

        Example::

            trainer.evaluate(eval_ds)
            # {'loss': 0.08, 'accuracy': 0.97, 'precision': 0.98, 'recall': 0.95, 'f1': 0.96,
            #  'auroc': 0.995}
        """
        state = self._inference_state()
        batches = self._eval_batches(eval_dataset)
        try:
            return EvalResult(self._run_eval(state, batches))
        finally:
            batches.close()

    def predict(self, dataset: Any) -> torch.Tensor | list[Any]:
        """Run the model (eval mode, no gradients) over ``dataset`` in order.

        Args:
            dataset: a map-style Dataset, a DataLoader or an iterable of batches (labels are
                not needed).

        Returns:
            The concatenated logits (or tensor outputs) on the CPU, or the list of per-batch
            outputs when the model returns neither.

        Example::

            probabilities = trainer.predict(eval_ds).softmax(-1)[:, 1]
        """
        state = self._inference_state()
        dataset = select_model_inputs(dataset, self.model, "dataset")
        batches = evaluation_batches(
            dataset, self.config, rank=0, world=1, role="dataset", loading=self._loading()
        )
        try:
            outputs = [apply_model(state, self._move_to_device(b)) for b in batches.epoch(0)]
        finally:
            batches.close()
        tensors = [o if isinstance(o, torch.Tensor) else find_logits(o) for o in outputs]
        if tensors and all(t is not None for t in tensors):
            return torch.cat([t.detach().cpu() for t in tensors])
        return [to_device(o, "cpu") for o in outputs]

    def train(
        self,
        train_dataset: Any,
        eval_dataset: Any = None,
        output_dir: str | os.PathLike | None = None,
    ) -> TrainResult:
        """Train for ``num_epochs`` epochs, evaluating, checkpointing and exporting as configured.

        Under torchrun this is where the process group is joined (see :mod:`medfunc.distributed`).

        Args:
            train_dataset: a list or map-style Dataset of examples (batched with a seeded
                shuffle per epoch), a DataLoader, or a generator of batches.
            eval_dataset: optional evaluation data of the same kinds.
            output_dir: the run folder: ``checkpoint-epoch{N}.pt``, ``checkpoint-step{S}.pt``,
                ``metrics.jsonl``, ``tb_logs/``, ``model.safetensors`` and exports. It must be
                new or empty, or the folder of the checkpoint being resumed, or
                ``overwrite_output_dir`` must be set. Default: the resumed checkpoint's folder,
                else a new ``runs/run-{timestamp}-{pid}``.

        Returns:
            The :class:`TrainResult`.

        Raises:
            ConfigError: inconsistent options or data, or an ``output_dir`` holding another
            run; BatchError: unreadable data; NonFiniteError: too many consecutive non-finite
            steps; TrainingInterrupted: SIGTERM or SIGINT arrived (after the checkpoint at the
            step boundary was written; see :mod:`medfunc.preemption`).

        Example::

            result = trainer.train(train_ds, eval_ds, output_dir="runs/demo")
            result.checkpoints[-1].name         # 'checkpoint-epoch3.pt' after 3 epochs
        """
        cfg = self.config
        check_exports(cfg)
        self._join()
        apply_cudnn_benchmark(cfg, self.device)
        batches = training_batches(
            select_model_inputs(train_dataset, self.model, "train_dataset"),
            cfg,
            rank=distributed.rank(),
            world=distributed.world_size(),
            loading=self._loading(),
        )
        evals = self._eval_batches(eval_dataset) if eval_dataset is not None else None
        per_epoch = steps_per_epoch(batches, cfg.gradient_accumulation_steps)
        total_steps = cfg.total_steps or (per_epoch * cfg.num_epochs if per_epoch else None)
        state = self.prepare_for_training(total_steps)
        check_export_example(state, cfg)
        stopping = EarlyStopping(
            cfg.early_stopping_patience, cfg.metric_mode, cfg.early_stopping_min_delta
        )
        position, saved_loop, parts = LoopPosition(stopping), {}, []
        if cfg.resume_from:
            state, position, saved_loop, parts = self._resume(state, cfg.resume_from, stopping)
        result = TrainResult(
            output_dir=resolve_run_dir(
                output_dir, resume_from=cfg.resume_from, overwrite=cfg.overwrite_output_dir
            ),
            global_step=position.global_step,
            epochs_completed=position.epoch,
            best_metric=position.stopping.best,
        )
        logger = self._create_logger(result.output_dir, total_steps)
        idle = announce_start(logger, cfg, position, saved_loop, parts, per_epoch, total_steps)
        sums, saved = StepMetricSums(state.device), checkpoint_files(result.output_dir)
        updates = EpochUpdates(state.device)
        updates.restore(saved_loop.get("epoch_updates"))
        keep = evals is not None and cfg.load_best_model_at_end is not False
        best = BestCheckpoint(result.output_dir, cfg.eval_metric, keep, cfg.resume_from)
        run = _Run(batches, evals, logger, result, position, sums, updates, best, per_epoch, saved)
        self._run = run
        run.last_saved_step = position.global_step
        run.last_checkpoint = Path(cfg.resume_from) if cfg.resume_from else None
        try:
            logger.progress_start(position.global_step)
            with run.guard:
                state = self._loop(state, run)
            self.state = best.final_state(state, position, result, sharded=self._sharded())
            if cfg.eval_with_ema:  # the run ends with the averaged weights
                self.state = self.state.replace(params=ema_params(self.state))
            if idle and evals is not None:  # nothing trained: report the model as it is
                result.eval_metrics = self._run_eval(self.state, evals)
                logger.info("final model eval: " + _shown(result.eval_metrics))
            result.weights_path = (
                current_weights(self.state, result.output_dir, WEIGHTS_FILE) if idle else None
            )
            if result.weights_path is None:  # an unchanged model.safetensors is kept as it is
                write_final_outputs(self.state, result, cfg, sharded=self._sharded())
            elif not self._sharded():  # the model holds the final weights, as after any run
                bind_module(self.state)
        finally:
            self._run = None
            for data in (batches, evals):
                if data is not None:
                    data.close()
            logger.close()
        return result

    def _create_logger(self, out: Path, total_steps: int | None) -> MetricLogger:
        cfg = self.config
        if self.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        return create_logger(
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
            log_level=cfg.log_level,
        )

    def _loop(self, state: TrainState, run: _Run) -> TrainState:
        """The epochs from ``run.position`` on; the training state at the end."""
        cfg, position = self.config, run.position
        step_fn = self._step_fn(state)
        k = cfg.gradient_accumulation_steps
        start_epoch, start_batch = position.epoch, position.batch_index
        draw = Visualizer(cfg.visualize_every_steps, cfg.visualize_fn, main=self.is_main_process)
        for epoch in range(start_epoch, cfg.num_epochs):
            position.epoch = epoch
            position.batch_index = start_batch if epoch == start_epoch else 0
            stop = False
            for window in run.train.windows(epoch, position.batch_index, k):
                with torch.autograd.profiler.record_function("medfunc.train_step"):
                    for batch in window:
                        batch = self._move_to_device(batch)
                        state, metrics = step_fn(state, batch, donate=True)
                self.state = state
                position.batch_index += k
                position.global_step += 1
                run.sums.record(metrics)
                run.updates.record(metrics)
                draw.after_step(state, batch, position.global_step, run.result.output_dir)
                try:
                    stop = self._after_step(state, run)
                except _EarlyStopSignal:
                    stop = True
                if run.guard.should_stop():
                    self._interrupt(state, run)
                if stop:
                    break
            run.result.global_step = position.global_step
            try:
                stop = stop or self._end_epoch(state, run, epoch)
            except _EarlyStopSignal:
                stop = True
            if run.guard.should_stop():
                self._interrupt(state, run)
            if stop:
                run.result.stopped_early = True
                break
        if run.sums.steps:
            self._log_train(run, with_epoch=False)
        saving = cfg.save_every_epochs or cfg.save_every_steps
        if saving and run.last_saved_step != position.global_step:
            self._write_checkpoint(state, run, _boundary_name(position))
        if run.guard.should_stop():
            self._interrupt(state, run)
        run.result.best_metric = position.stopping.best
        return state

    def _interrupt(self, state: TrainState, run: _Run) -> NoReturn:
        """Checkpoint the step boundary (unless just done) and raise ``TrainingInterrupted``."""
        position = run.position
        if run.sums.steps:
            self._log_train(run, with_epoch=False)
        if run.last_checkpoint is None or run.last_saved_step != position.global_step:
            self._write_checkpoint(state, run, _boundary_name(position))
        run.result.global_step = position.global_step
        interrupted = run.guard.interrupted(run.last_checkpoint, position)
        if self.is_main_process:
            log.warning("%s", interrupted)
        raise interrupted

    def _after_step(self, state: TrainState, run: _Run) -> bool:
        """Log, evaluate and checkpoint as due after an optimizer step; True to stop."""
        cfg, step = self.config, run.position.global_step
        run.logger.progress_update(1)
        if step % cfg.log_every == 0:
            self._log_train(run)
        stop = False
        if run.eval is not None and cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
            stop = self._evaluate_and_track(state, run, epoch=run.position.epoch + 1)
        due = bool(cfg.save_every_steps) and step % cfg.save_every_steps == 0
        if due or run.best.wanted(run.position):
            self._write_checkpoint(state, run, f"checkpoint-step{step}.pt", forced=not due)
        run.position.best_pending = False
        return stop

    def _end_epoch(self, state: TrainState, run: _Run, epoch: int) -> bool:
        """Close epoch ``epoch``: evaluate and checkpoint as due; True to stop."""
        cfg, position = self.config, run.position
        steps, skipped = run.updates.take()
        check_epoch_updates(
            epoch + 1,
            steps=steps,
            skipped=skipped,
            allow_no_update=cfg.allow_no_update_epochs,
            precision=cfg.precision,
        )
        position.epoch, position.batch_index = epoch + 1, 0
        run.result.epochs_completed = epoch + 1
        run.logger.epoch_done(epoch + 1, cfg.num_epochs, position.global_step)
        stop = False
        if (
            run.eval is not None
            and cfg.eval_at_epoch_end
            and position.last_eval_step != position.global_step
        ):
            stop = self._evaluate_and_track(state, run, epoch=epoch + 1)
        due = bool(cfg.save_every_epochs) and (epoch + 1) % cfg.save_every_epochs == 0
        if due or run.best.wanted(position):
            self._write_checkpoint(state, run, f"checkpoint-epoch{epoch + 1}.pt", forced=not due)
        position.best_pending = False
        return stop

    def _log_train(self, run: _Run, *, with_epoch: bool = True) -> None:
        position = run.position
        scalars, skipped_run = run.sums.flush()
        if distributed.world_size() > 1:
            mean = distributed.all_reduce_mean(torch.tensor(scalars["train/loss"]))
            scalars["train/loss"] = float(mean)
        limit = self.config.max_consecutive_skipped_steps
        check_skipped_run(skipped_run, limit, position.global_step)
        if with_epoch and run.steps_per_epoch:
            micro_batches = run.steps_per_epoch * self.config.gradient_accumulation_steps
            scalars["train/epoch"] = position.epoch + position.batch_index / micro_batches
        self._log(scalars)
        run.scale_watch.check(scalars.get("train/loss_scale"), position.global_step)
        run.skipped_total += int(scalars["train/skipped_steps"])
        shown = {"skipped": run.skipped_total} if run.skipped_total else {}
        run.logger.progress_update(0, loss=scalars["train/loss"], lr=scalars["train/lr"], **shown)

    def _evaluate_and_track(self, state: TrainState, run: _Run, epoch: int) -> bool:
        """Evaluate, log, update the best metric and patience; True when training should stop."""
        cfg, position = self.config, run.position
        metrics = self._run_eval(state, run.eval)
        step = position.last_eval_step = position.global_step
        self._log({f"eval/{name}": value for name, value in metrics.items()})
        run.result.eval_metrics = metrics
        run.result.history.append({"epoch": epoch, "step": step, **metrics})
        run.logger.info(f"epoch {epoch} step {step} eval: {_shown(metrics)}")
        if cfg.eval_metric not in metrics:
            raise ConfigError(
                f"TrainerConfig.eval_metric={cfg.eval_metric!r} is not among the "
                f"evaluation results {sorted(metrics)}; pick one of them"
            )
        stopping = position.stopping
        stop = distributed.agree(stopping.update(metrics[cfg.eval_metric]), op="any")
        if stopping.wait == 0:
            position.record_best(epoch, metrics)
        if stop:
            run.logger.info(
                f"early stopping at step {step}: {cfg.eval_metric} did not improve for "
                f"{stopping.wait} evaluation(s) (best {stopping.best:.6g})"
            )
        return stop
