"""The original trainer's seams (its "Testing Notes"), replaced as its users replace them."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from conftest import TinyClassifier
from torch.utils.data import default_collate

import medfunc.trainer
from medfunc.errors import ConfigError
from medfunc.modeling import is_checkpointed
from medfunc.trainer import MedicalModelTrainer, TrainerConfig, _EarlyStopSignal


def _examples(n: int = 40, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(6, generator=g), "labels": torch.randint(0, 3, (), generator=g)}
        for _ in range(n)
    ]


def _config(**options) -> TrainerConfig:
    base = dict(
        device="cpu",
        num_epochs=2,
        batch_size=8,
        shuffle=False,
        num_workers=0,
        save_every_epochs=None,
        progress_bar=False,
        grad_clip_mode="none",
        scheduler="none",
    )
    return TrainerConfig(**{**base, **options})


def _model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier()


def _torch_run(examples, epochs, make_optimizer, make_scheduler=None) -> tuple:
    """The imperative torch loop over the same batches (in order, batch size 8)."""
    model = _model()
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    for _ in range(epochs):
        for begin in range(0, len(examples), 8):
            batch = default_collate(examples[begin : begin + 8])
            optimizer.zero_grad()
            model(**batch)["loss"].backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return model, optimizer, scheduler


def _assert_params_equal(trainer: MedicalModelTrainer, model: torch.nn.Module) -> None:
    for name, value in model.named_parameters():
        assert torch.equal(trainer.state.params[name], value.detach()), name


class RMSpropTrainer(MedicalModelTrainer):
    def _optimizer_factory(self, param_groups):
        self.built = torch.optim.RMSprop(param_groups, lr=1e-2, alpha=0.9, momentum=0.5)
        return self.built


def test_an_optimizer_factory_override_trains_with_that_torch_optimizer(tmp_path):
    examples = _examples()
    trainer = RMSpropTrainer(_model(), _config())
    result = trainer.train(examples, output_dir=tmp_path)
    reference, optimizer, _ = _torch_run(
        examples,
        2,
        lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-2, alpha=0.9, momentum=0.5),
    )
    assert result.global_step == 10
    _assert_params_equal(trainer, reference)
    view = trainer.optimizer
    assert type(view) is torch.optim.RMSprop and trainer.scheduler is None
    assert len(view.param_groups) == len(trainer.built.param_groups)
    assert all(group["lr"] == 1e-2 and group["alpha"] == 0.9 for group in view.param_groups)
    reference_params = dict(reference.named_parameters())
    for group in view.param_groups:
        for name, param in zip(group["param_names"], group["params"]):
            for key in ("square_avg", "momentum_buffer"):
                theirs = optimizer.state[reference_params[name]][key]
                assert torch.equal(view.state[param][key], theirs), (name, key)


def test_a_scheduler_factory_override_drives_the_learning_rate(tmp_path):
    class StepLRTrainer(MedicalModelTrainer):
        def _optimizer_factory(self, param_groups):
            return torch.optim.SGD(param_groups, lr=0.1, momentum=0.9)

        def _scheduler_factory(self, optimizer, total_steps):
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)

    examples = _examples()
    trainer = StepLRTrainer(_model(), _config())
    trainer.train(examples, output_dir=tmp_path)
    reference, _, scheduler = _torch_run(
        examples,
        2,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    )
    _assert_params_equal(trainer, reference)
    assert set(trainer.scheduler.get_last_lr()) == {scheduler.get_last_lr()[0]} == {0.0125}
    assert trainer.scheduler.last_epoch == scheduler.last_epoch == 10


def test_a_scheduler_factory_alone_drives_the_configured_torch_optimizer(tmp_path):
    class ExponentialTrainer(MedicalModelTrainer):
        def _scheduler_factory(self, optimizer, total_steps):
            assert total_steps == 10
            return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)

    examples = _examples()
    trainer = ExponentialTrainer(_model(), _config(optimizer="adam", learning_rate=1e-2))
    trainer.train(examples, output_dir=tmp_path)
    reference, _, _ = _torch_run(
        examples,
        2,
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    )
    _assert_params_equal(trainer, reference)


def test_build_param_groups_override_sets_per_group_options(tmp_path):
    class Groups(MedicalModelTrainer):
        def _build_param_groups(self):
            return [
                {"params": list(self.model.fc1.parameters()), "lr": 0.05},
                {"params": list(self.model.fc2.parameters())},
            ]

        def _optimizer_factory(self, param_groups):
            return torch.optim.SGD(param_groups, lr=0.2)

    examples = _examples()
    trainer = Groups(_model(), _config())
    trainer.train(examples, output_dir=tmp_path)

    def reference_optimizer(m):
        groups = [{"params": m.fc1.parameters(), "lr": 0.05}, {"params": m.fc2.parameters()}]
        return torch.optim.SGD(groups, lr=0.2)

    reference, _, _ = _torch_run(examples, 2, reference_optimizer)
    _assert_params_equal(trainer, reference)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.05, 0.2]


def test_param_groups_that_leave_a_parameter_out_are_refused(tmp_path):
    class Partial(MedicalModelTrainer):
        def _build_param_groups(self):
            return [{"params": list(self.model.fc1.parameters())}]

    with pytest.raises(ConfigError, match="leave out the trainable parameters"):
        Partial(_model(), _config()).train(_examples(), output_dir=tmp_path)


def test_an_instance_override_of_move_to_device_is_used(tmp_path):
    trainer = MedicalModelTrainer(_model(), _config(num_epochs=1))
    moved = []
    trainer._move_to_device = lambda batch: moved.append(len(batch["x"])) or batch
    trainer.train(_examples(), _examples(16, seed=1), output_dir=tmp_path)
    assert moved == [8] * 5 + [8, 8]  # five training batches, then two evaluation batches


def test_a_replaced_module_dataloader_is_called_as_the_original_calls_it(tmp_path, monkeypatch):
    calls = []

    def minimal_loader(dataset, batch_size, shuffle=False, collate_fn=None, **options):
        calls.append({"batch_size": batch_size, "shuffle": shuffle, **options})
        return [
            default_collate([dataset[i] for i in range(b, min(b + batch_size, len(dataset)))])
            for b in range(0, len(dataset), batch_size)
        ]

    monkeypatch.setattr(medfunc.trainer, "DataLoader", minimal_loader)
    examples = _examples()
    trainer = MedicalModelTrainer(_model(), _config(shuffle=True, num_workers=2))
    result = trainer.train(examples, _examples(16, seed=1), output_dir=tmp_path)
    assert result.global_step == 10
    assert calls[0] == {
        "batch_size": 8,
        "shuffle": True,
        "num_workers": 2,
        "pin_memory": False,
        "persistent_workers": True,
        "prefetch_factor": 2,
    }
    assert calls[1]["shuffle"] is False  # the evaluation loader
    reference, _, _ = _torch_run(
        examples, 2, lambda m: torch.optim.AdamW(m.parameters(), lr=5e-5, weight_decay=0.0)
    )
    _assert_params_equal(trainer, reference)  # the loader's (unshuffled) batches were used


def test_record_function_is_looked_up_when_the_steps_run(tmp_path, monkeypatch):
    names = []

    @contextlib.contextmanager
    def recording(name):
        names.append(name)
        yield

    monkeypatch.setattr(torch.autograd.profiler, "record_function", recording)
    trainer = MedicalModelTrainer(_model(), _config(gradient_accumulation_steps=2))
    result = trainer.train(_examples(), output_dir=tmp_path)
    ours = [name for name in names if name.startswith("medfunc.")]
    assert result.global_step == 4 and ours == ["medfunc.train_step"] * 4


def test_maybe_enable_gradient_checkpointing_wraps_blocks_or_sets_the_flag():
    layer = torch.nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    trainer = MedicalModelTrainer(encoder, _config(gradient_checkpointing=True))
    assert trainer._maybe_enable_gradient_checkpointing() == ["layers.0", "layers.1"]
    assert is_checkpointed(encoder.layers[0]) and is_checkpointed(encoder.layers[1])

    model = _model()
    model.fc1.gradient_checkpointing = False  # the original's attribute toggle
    trainer = MedicalModelTrainer(model, _config(gradient_checkpointing=True))
    with pytest.warns(UserWarning):
        trainer._maybe_enable_gradient_checkpointing()
    assert model.fc1.gradient_checkpointing is True
    off = MedicalModelTrainer(_model(), _config())
    assert off._maybe_enable_gradient_checkpointing() == []


def test_an_overridden_maybe_enable_gradient_checkpointing_is_called_by_train(tmp_path):
    calls = []

    class Recording(MedicalModelTrainer):
        def _maybe_enable_gradient_checkpointing(self):
            calls.append(self.model)
            return []

    trainer = Recording(_model(), _config(num_epochs=1, gradient_checkpointing=True))
    trainer.train(_examples(), output_dir=tmp_path)
    assert calls == [trainer.model]


def test_log_receives_the_scalars_and_can_stop_training(tmp_path):
    seen = []

    class StopAtThree(MedicalModelTrainer):
        def _log(self, metrics):
            seen.append(dict(metrics))
            super()._log(metrics)
            if self.state is not None and int(self.state.step) == 3:
                raise _EarlyStopSignal

    trainer = StopAtThree(_model(), _config(log_every=1, save_every_epochs=1))
    result = trainer.train(_examples(), output_dir=tmp_path)
    assert result.global_step == 3 and result.stopped_early
    assert [round(m["train/lr"], 12) for m in seen] == [5e-5] * 3
    assert (tmp_path / "checkpoint-step3.pt").is_file()


def test_thin_methods_save_load_and_export(tmp_path, caplog):
    config = _config(num_epochs=1, export_torchscript=True)
    config.export_input_example = {"x": torch.zeros(2, 6)}
    trainer = MedicalModelTrainer(_model(), config)
    trainer.train(_examples(), output_dir=tmp_path / "run")
    path = trainer._save_checkpoint(tmp_path / "saved", epoch=1)
    assert path == tmp_path / "saved" / "checkpoint-epoch1.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["trainer_state"]["epoch"] == 1 and payload["trainer_state"]["global_step"] == 5
    assert trainer._save_checkpoint(tmp_path / "saved", step=7).name == "checkpoint-step7.pt"

    other = MedicalModelTrainer(TinyClassifier(), _config(num_epochs=1))
    assert other._load_checkpoint(path)["global_step"] == 5
    for name, value in trainer.state.params.items():
        assert torch.equal(other.state.params[name], value), name

    exports = trainer._export_artifacts(tmp_path / "exports")
    loaded = torch.jit.load(str(exports["torchscript"]))
    x = torch.randn(4, 6)
    assert torch.allclose(loaded(x=x)["logits"], trainer.inference({"x": x})["logits"])


def test_distribution_predicates_in_a_single_process(tmp_path):
    trainer = MedicalModelTrainer(_model(), _config())
    assert trainer._is_rank0() and not trainer._is_distributed()
    assert not trainer._should_use_ddp() and not trainer._should_use_deepspeed()
    trainer._init_distributed()
    trainer._init_deepspeed()
    assert trainer.state is None  # nothing to build without deepspeed=True
    forced = MedicalModelTrainer(_model(), _config(use_ddp=True))
    assert forced._should_use_ddp()
    with pytest.raises(ConfigError, match="use_ddp=True but this process was not started by"):
        forced.train(_examples(), output_dir=tmp_path)


def test_forward_loss_is_the_current_models_loss(caplog):
    trainer = MedicalModelTrainer(_model(), _config())
    batch = default_collate(_examples(8))
    expected = trainer.model(**batch)["loss"]
    assert torch.equal(trainer._forward_loss(batch), expected.detach())
    with caplog.at_level(logging.INFO, logger="medfunc.trainer"):
        trainer._log({"custom/value": 1.5})
    assert "custom/value=1.5" in caplog.text


def test_factories_monkeypatched_on_the_class_or_the_instance_are_used(tmp_path, monkeypatch):
    def sgd_factory(self, param_groups):
        return torch.optim.SGD(param_groups, lr=0.05, momentum=0.5)

    monkeypatch.setattr(MedicalModelTrainer, "_optimizer_factory", sgd_factory)
    trainer = MedicalModelTrainer(_model(), _config())
    trainer._scheduler_factory = lambda optimizer, total_steps: (
        torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    )
    examples = _examples()
    trainer.train(examples, output_dir=tmp_path)
    reference, _, scheduler = _torch_run(
        examples,
        2,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5),
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
    )
    _assert_params_equal(trainer, reference)
    assert set(trainer.scheduler.get_last_lr()) == set(scheduler.get_last_lr())
