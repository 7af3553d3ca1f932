"""The original trainer's seams and public surface, as a base class of the Trainer facade.

``medvllm.training.trainer.MedicalModelTrainer`` documents places where users replace parts of
the trainer (its "Testing Notes") and objects they read (``optimizer``, ``scheduler``,
``scaler``). :class:`OriginalTrainerSurface` gives :class:`~medfunc.trainer.MedicalModelTrainer`
each of them with the original's name and signature:

- seams, honoured when replaced in a subclass or on the instance: ``_move_to_device(batch)``,
  ``_build_param_groups()``, ``_optimizer_factory(param_groups)``,
  ``_scheduler_factory(optimizer, total_steps)`` (replacing any of the three trains with the
  returned torch optimizer through :func:`medfunc.optim.from_torch`, its LR driven by the
  returned torch scheduler), ``_maybe_enable_gradient_checkpointing()``, ``_log(metrics)``;
- views of the functional training state: ``optimizer``, ``scheduler``, ``scaler``;
- thin methods: ``prepare_for_training``, ``inference``, ``_forward_loss``,
  ``_save_checkpoint``, ``_load_checkpoint``, ``_export_artifacts``, ``_is_rank0``,
  ``_is_distributed``, ``_should_use_ddp``, ``_should_use_deepspeed``, ``_init_distributed``,
  ``_init_deepspeed``.

docs/migrating.md says how each differs from the original.

Example::

    class RMSpropTrainer(MedicalModelTrainer):
        def _optimizer_factory(self, param_groups):
            return torch.optim.RMSprop(param_groups, lr=1e-3, alpha=0.9)

    RMSpropTrainer(model, TrainerConfig(scheduler="none")).train(train_ds)
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medfunc import distributed, optim
from medfunc.calling import extract_loss
from medfunc.checkpoint import read_checkpoint, restore_state, save_state
from medfunc.early_stopping import EarlyStopping
from medfunc.errors import ConfigError
from medfunc.final_outputs import check_exports, export_state
from medfunc.modeling import enable_gradient_checkpointing
from medfunc.state import TrainState
from medfunc.step import apply_model
from medfunc.tracking import LoopPosition
from medfunc.trainer_build import (
    TorchSchedulerLRs,
    build_momentum,
    build_optimizer,
    build_schedule,
    clipped,
    from_torch_optimizer,
    torch_lr_scheduler,
)
from medfunc.trainer_data import to_training_device
from medfunc.trainer_views import ScalerView, SchedulerView, optimizer_view

__all__ = ["OriginalTrainerSurface"]

log = logging.getLogger("medfunc.trainer")

#: The optimizer factories of the original trainer; replacing one trains through it.
OPTIMIZER_SEAMS = ("_build_param_groups", "_optimizer_factory", "_scheduler_factory")


class OriginalTrainerSurface:
    """The original trainer's seams, views and thin methods (a base of MedicalModelTrainer).

    It relies on the facade's ``config``, ``model``, ``device``, ``state``, ``run_metadata``,
    ``is_main_process``, ``_join``, ``_prepare_model``, ``_build_state``, ``_inference_state``
    and ``_run``.
    """

    _scheduled: bool = False
    _run: Any = None

    # -- the original trainer's seams: replace them in a subclass or on the instance ----------

    def _move_to_device(self, batch: Any) -> Any:
        """Move one batch to the training device (CUDA: pinned memory, no wait).

        Args:
            batch: a tensor or a nest of mappings, lists and tuples.

        Returns:
            The batch on the device.
        """
        return to_training_device(batch, self.device)

    def _build_param_groups(self) -> list[dict[str, Any]]:
        """The torch param_groups the config selects (no weight decay on biases and norms).

        Used only when one of ``_build_param_groups``, ``_optimizer_factory`` or
        ``_scheduler_factory`` is overridden (otherwise medfunc's own optimizer runs).

        Returns:
            Groups of ``{"params": [(name, parameter), ...], "weight_decay"}`` over the
            trainable parameters; a group with a ``layer_wise_lrs`` multiplier also has its
            ``"lr"`` (the others take the optimizer's ``lr``).
        """
        model = self._prepare_model()
        trainable = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        base = self.config.learning_rate
        groups = optim.torch_param_groups(build_optimizer(self.config, base, clip=False), trainable)
        for group in groups:
            if group["lr"] == base:
                del group["lr"]
        return groups

    def _optimizer_factory(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The torch optimizer of ``optimizer`` over ``param_groups``, with the config's options.

        An override may return any ``torch.optim.Optimizer`` over the model's trainable
        parameters; training then runs that optimizer's ``step()`` through
        :func:`medfunc.optim.from_torch` (its class, defaults and groups; not the instance).

        Args:
            param_groups: from :meth:`_build_param_groups`.

        Returns:
            e.g. ``torch.optim.AdamW(param_groups, betas=..., eps=...)``.
        """
        tx = build_optimizer(self.config, self.config.learning_rate, clip=False)
        spec, _ = optim.find_optimizer(tx)
        return spec.torch_class(
            param_groups, **{"lr": self.config.learning_rate, **spec.hyperparameters()}
        )

    def _scheduler_factory(self, optimizer: torch.optim.Optimizer, total_steps: int | None) -> Any:
        """The torch LR scheduler of ``scheduler`` on ``optimizer`` (None for "none").

        An override may return any torch LR scheduler on ``optimizer`` (or None): it is
        stepped once per optimizer update and its LRs drive training.

        Args:
            optimizer: from :meth:`_optimizer_factory`.
            total_steps: optimizer updates of the whole run (None when unknown).

        Returns:
            The scheduler or None.
        """
        return torch_lr_scheduler(self.config, optimizer, total_steps)

    def _maybe_enable_gradient_checkpointing(self) -> list[str]:
        """Enable gradient checkpointing on ``self.model`` when ``gradient_checkpointing`` is set.

        Returns:
            The checkpointed submodules (see
            :func:`medfunc.modeling.enable_gradient_checkpointing`), empty when off.
        """
        wanted = self.config.gradient_checkpointing
        if wanted is False or wanted is None:
            return []
        return enable_gradient_checkpointing(self.model, None if wanted is True else wanted)

    def _torch_seams(self) -> bool:
        """Whether an optimizer or scheduler factory of the original trainer is replaced."""
        return any(
            name in vars(self) or getattr(type(self), name) is not _DEFAULT_SEAMS[name]
            for name in OPTIMIZER_SEAMS
        )

    def _transformation(
        self, total_steps: int | None, *, clip: bool = True
    ) -> optim.GradientTransformation:
        """The gradient transformation: the config's, or the replaced factories' torch one."""
        cfg = self.config
        if not self._torch_seams():
            self._scheduled = cfg.scheduler != "none"
            lr, momentum = build_schedule(cfg, total_steps), build_momentum(cfg, total_steps)
            return build_optimizer(cfg, lr, clip=clip, momentum=momentum)
        model = self._prepare_model()
        trainable = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        optimizer = self._optimizer_factory(self._build_param_groups())
        scheduler = self._scheduler_factory(optimizer, total_steps)
        self._scheduled = scheduler is not None
        lrs = TorchSchedulerLRs(optimizer, scheduler) if scheduler is not None else None
        tx = from_torch_optimizer(optimizer, trainable, lrs)
        return clipped(cfg, tx) if clip else tx

    # -- the original trainer's public surface, as views of the training state ---------------

    def prepare_for_training(self, total_steps: int | None = None) -> TrainState:
        """Prepare the model and build the training state (optimizer, schedule, loss scale).

        :meth:`train` calls it with the run's length; call it yourself to inspect
        :attr:`optimizer`, :attr:`scheduler` or :attr:`scaler` before training.

        Args:
            total_steps: optimizer updates of the run, needed by the schedules that decay
                to an end (default: ``TrainerConfig.total_steps``).

        Returns:
            The new state (also ``self.state``).

        Raises:
            ConfigError: the schedule needs ``total_steps`` and none is known.
        """
        self._join()
        self.state = self._build_state(total_steps or self.config.total_steps)
        return self.state

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer equal to the training state's, at its current step (a view).

        Its ``param_groups`` show the parameters and each group's current ``lr``, its
        ``state_dict()`` the moments; changing it changes nothing. None before
        :meth:`prepare_for_training` or :meth:`train`.
        """
        return optimizer_view(self.state) if self.state is not None else None

    @property
    def scheduler(self) -> SchedulerView | None:
        """The LR schedule as a view with ``get_last_lr()``; None for ``scheduler="none"``."""
        if self.state is None or not self._scheduled:
            return None
        return SchedulerView(self._live_state)

    @property
    def scaler(self) -> ScalerView | None:
        """The fp16 loss scale as a view with ``get_scale()`` and ``state_dict()``, else None."""
        if self.state is None or not self.state.loss_scale:
            return None
        return ScalerView(self._live_state)

    def _live_state(self) -> TrainState:
        if self.state is None:
            raise ConfigError("the trainer has no training state yet; call train() first")
        return self.state

    def inference(self, inputs: Any) -> Any:
        """Run the model on one batch of ``inputs`` (eval mode, no gradients).

        Args:
            inputs: what the model's forward takes (a dict, a tuple or a tensor), or what
                ``apply_fn`` takes.

        Returns:
            The model's outputs, on the training device.

        Example::

            logits = trainer.inference({"x": torch.randn(4, 6)})["logits"]
        """
        return apply_model(self._inference_state(), self._move_to_device(inputs))

    def _forward_loss(self, batch: Any) -> torch.Tensor:
        """The loss of ``batch`` under the current weights, in train mode, without gradients.

        Training itself runs :func:`medfunc.train_step`; overriding this method does not change
        it (give ``loss_fn`` or ``apply_fn`` instead).

        Args:
            batch: a training batch (inputs and labels).

        Returns:
            The 0-d loss.
        """
        state = self._inference_state()
        batch = self._move_to_device(batch)
        return extract_loss(apply_model(state, batch, train=True), batch, state.loss_fn)

    def _save_checkpoint(
        self, output_dir: str | os.PathLike, epoch: int | None = None, step: int | None = None
    ) -> Path:
        """Write the current state as ``checkpoint-epoch{epoch}.pt`` / ``-step{step}.pt``.

        Without ``epoch`` and ``step`` the file is ``checkpoint.pt``. The file resumes at the
        end of epoch ``epoch`` (at step ``step``, default the state's update count).

        Args:
            output_dir: the folder (created if missing).
            epoch: epochs completed.
            step: optimizer updates applied.

        Returns:
            The checkpoint's path (written on rank 0 only).
        """
        state = self._live_state()
        suffix = f"-epoch{epoch}" if epoch is not None else f"-step{step}" if step else ""
        path = Path(output_dir) / f"checkpoint{suffix}.pt"
        cfg = self.config
        position = LoopPosition(
            EarlyStopping(cfg.early_stopping_patience, cfg.metric_mode),
            epoch=epoch or 0,
            global_step=int(state.step) if step is None else step,
        )
        if self.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_state(
                state,
                path,
                extra=position.to_trainer_state(cfg.eval_metric, self.run_metadata),
                save_optimizer=cfg.save_optimizer,
                save_scheduler=cfg.save_scheduler,
            )
        distributed.barrier()
        return path

    def _load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Load a medfunc checkpoint into the training state (built first if needed).

        Args:
            path: a checkpoint written by this trainer or :func:`medfunc.save_state`.

        Returns:
            The checkpoint's ``trainer_state`` (``epoch``, ``global_step``, ...).
        """
        state = self.state if self.state is not None else self.prepare_for_training()
        payload = read_checkpoint(str(path))
        self.state = restore_state(payload, like=state)
        return dict(payload.get("trainer_state", {}))

    def _export_artifacts(self, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Make the configured TorchScript/ONNX exports of the current model now.

        Args:
            output_dir: the folder for ``model.pt`` / ``model.onnx``.

        Returns:
            format -> written file (failures are logged; a missing example skips, warned).
        """
        check_exports(self.config)
        return export_state(self._inference_state(), self.config, output_dir).exports

    def _is_rank0(self) -> bool:
        return self.is_main_process

    def _is_distributed(self) -> bool:
        return distributed.is_distributed()

    def _should_use_ddp(self) -> bool:
        """True when training is data-parallel DDP (several ranks, neither FSDP nor DeepSpeed)."""
        cfg = self.config
        several = self.config.use_ddp or int(os.environ.get("WORLD_SIZE", "1")) > 1
        return several and not cfg.fsdp and not cfg.deepspeed

    def _should_use_deepspeed(self) -> bool:
        return self.config.deepspeed

    def _init_distributed(self) -> None:
        """Join the torchrun process group (nothing in a single process)."""
        self._join()

    def _init_deepspeed(self) -> None:
        """Build the DeepSpeed-sharded training state when ``deepspeed=True``."""
        if self.config.deepspeed and self.state is None:
            self.prepare_for_training()

    def _log(self, metrics: Mapping[str, float]) -> None:
        """Log scalars at the current step to the run's sinks (console, TensorBoard, W&B).

        Outside :meth:`train` they are logged at INFO.

        Args:
            metrics: name -> number, e.g. ``{"train/loss": 0.3}``.
        """
        run = self._run
        if run is None:
            log.info("%s", " ".join(f"{k}={v}" for k, v in metrics.items()))
            return
        run.logger.log(dict(metrics), step=run.position.global_step)


_DEFAULT_SEAMS = {name: OriginalTrainerSurface.__dict__[name] for name in OPTIMIZER_SEAMS}
