"""The original trainer's options, objects and calling conventions on medfunc's Trainer."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfunc.errors import ConfigError
from medfunc.trainer import EvalResult, MedicalModelTrainer, TrainerConfig


def _config(**options) -> TrainerConfig:
    base = dict(
        device="cpu",
        num_epochs=1,
        batch_size=8,
        num_workers=0,
        save_every_epochs=None,
        progress_bar=False,
    )
    return TrainerConfig(**{**base, **options})


def _examples(n: int = 40) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"x": torch.randn(6, generator=g), "labels": torch.randint(0, 3, (), generator=g)}
        for _ in range(n)
    ]


def _model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier()


def test_a_misspelled_option_gets_a_config_error_with_the_closest_name():
    with pytest.raises(ConfigError) as info:
        TrainerConfig(lerning_rate=1e-3)
    assert str(info.value) == (
        "TrainerConfig: unknown option 'lerning_rate'; did you mean 'learning_rate'?"
    )
    with pytest.raises(
        ConfigError, match="unknown option 'num_worker'; did you mean 'num_workers'"
    ):
        TrainerConfig.from_dict({"num_worker": 4})
    with pytest.raises(ConfigError, match="unknown option 'zzz'; see docs/trainer.md"):
        TrainerConfig(zzz=1)


def test_the_new_options_are_validated():
    with pytest.raises(ConfigError, match="TrainerConfig.num_workers"):
        TrainerConfig(num_workers=-1)
    with pytest.raises(
        ConfigError, match="TrainerConfig.ddp_backend must be one of 'nccl', 'gloo'"
    ):
        TrainerConfig(ddp_backend="mpi")
    with pytest.raises(ConfigError, match="TrainerConfig.prefetch_factor"):
        TrainerConfig(prefetch_factor=0)
    assert TrainerConfig(ddp_backend="GLOO").ddp_backend == "gloo"


def test_the_surface_shows_the_training_state(tmp_path):
    config = _config(learning_rate=1e-2, scheduler="linear_warmup", warmup_steps=2, total_steps=10)
    trainer = MedicalModelTrainer(_model(), config)
    assert trainer.optimizer is None and trainer.scheduler is None and trainer.scaler is None
    trainer.prepare_for_training()
    assert type(trainer.optimizer) is torch.optim.AdamW
    assert trainer.scheduler.get_last_lr() == [0.0]
    result = trainer.train(_examples(), output_dir=tmp_path)
    assert result.global_step == 5  # one epoch of the 10-step schedule

    reference = torch.optim.AdamW(_model().parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        reference, lambda s: s / 2 if s < 2 else max(0.0, (10 - s) / 8)
    )
    for _ in range(5):
        reference.step()
        schedule.step()
    assert trainer.scheduler.last_epoch == schedule.last_epoch == 5
    assert trainer.scheduler.get_last_lr() == pytest.approx(schedule.get_last_lr(), rel=1e-12)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == trainer.scheduler.get_last_lr()
    moments = trainer.optimizer.state_dict()["state"]
    assert all(int(entry["step"]) == 5 for entry in moments.values())
    assert trainer.model is trainer.state.module


def test_scheduler_none_gives_no_scheduler_and_the_lr_is_constant(tmp_path):
    trainer = MedicalModelTrainer(_model(), _config(scheduler="none", learning_rate=3e-3))
    trainer.train(_examples(), output_dir=tmp_path)
    assert trainer.scheduler is None
    assert {group["lr"] for group in trainer.optimizer.param_groups} == {3e-3}


def test_fp16_has_a_scaler_like_gradscaler(tmp_path):
    trainer = MedicalModelTrainer(_model(), _config(use_amp=True, amp_dtype="float16"))
    trainer.prepare_for_training(total_steps=5)
    reference = torch.amp.GradScaler("cpu")
    assert trainer.scaler.get_scale() == 65536.0
    expected = {**reference.state_dict(), "scale": 65536.0, "_growth_tracker": 0}
    assert trainer.scaler.state_dict() == expected
    trainer.train(_examples(), output_dir=tmp_path)
    assert trainer.scaler.state_dict()["_growth_tracker"] == 5  # five finite steps


def test_evaluate_returns_an_eval_result_that_is_also_a_mapping(tmp_path):
    trainer = MedicalModelTrainer(_model(), _config())
    result = trainer.evaluate(_examples(16))
    assert isinstance(result, EvalResult) and isinstance(result, Mapping)
    assert result.loss == result["loss"] and "loss" not in result.metrics
    assert result.metrics["accuracy"] == result["accuracy"]
    assert json.loads(json.dumps(result)) == dict(result)
    batch = torch.stack([e["x"] for e in _examples(16)])
    labels = torch.stack([e["labels"] for e in _examples(16)])
    with torch.no_grad():
        expected = F.cross_entropy(trainer.model(batch)["logits"], labels)
    assert result.loss == pytest.approx(float(expected), rel=1e-6)


def test_inference_runs_the_model_in_eval_mode():
    model = TinyClassifier(dropout=0.5)
    trainer = MedicalModelTrainer(model, _config())
    x = torch.randn(4, 6)
    out = trainer.inference({"x": x})
    model.eval()
    assert torch.equal(out["logits"], model(x)["logits"])


def _sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def test_apply_fn_trains_evaluates_and_predicts_a_tensor_dataset(tmp_path):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
    data = TensorDataset(x, y)

    def apply_fn(model, batch):
        return model(batch[0])

    def loss_fn(outputs, batch):
        return F.cross_entropy(outputs, batch[1])

    config = _config(
        num_epochs=2,
        shuffle=False,
        optimizer="sgd",
        learning_rate=0.1,
        sgd_momentum=0.9,
        scheduler="none",
        grad_clip_mode="none",
        num_workers=2,
    )
    trainer = MedicalModelTrainer(_sequential(), config, apply_fn=apply_fn, loss_fn=loss_fn)
    result = trainer.train(data, data, output_dir=tmp_path)
    assert result.global_step == 12

    reference = _sequential()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for xb, yb in DataLoader(data, batch_size=8):
            optimizer.zero_grad()
            F.cross_entropy(reference(xb), yb).backward()
            optimizer.step()
    for name, value in reference.named_parameters():
        assert torch.equal(trainer.state.params[name], value.detach()), name

    with torch.no_grad():
        logits = reference(x)
    assert torch.equal(trainer.predict(data), logits)
    assert trainer.evaluate(data).loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert torch.equal(trainer.inference((x[:4], y[:4])), logits[:4])


def test_without_apply_fn_a_tuple_batch_that_does_not_fit_names_apply_fn(tmp_path):
    data = TensorDataset(torch.randn(16, 5), torch.randint(0, 3, (16,)))
    trainer = MedicalModelTrainer(
        _sequential(), _config(), loss_fn=lambda out, batch: F.cross_entropy(out, batch[1])
    )
    with pytest.raises(Exception, match="apply_fn"):
        trainer.train(data, output_dir=tmp_path)


def test_apply_fn_trains_under_deepspeed_equal_to_the_torch_loop(tmp_path):
    """A single-process DeepSpeed run (CPU accelerator, ZeRO-2) calls the engine through
    apply_fn; SGD with momentum in fp32 gives the torch loop's weights bitwise."""
    pytest.importorskip("deepspeed")
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 3
    data = TensorDataset(x, y)
    config = _config(
        deepspeed=True, num_epochs=1, shuffle=False, optimizer="sgd", learning_rate=0.1,
        scheduler="none", grad_clip_mode="none", num_workers=0,
    )  # fmt: skip
    trainer = MedicalModelTrainer(
        _sequential(),
        config,
        apply_fn=lambda model, batch: model(batch[0]),
        loss_fn=lambda outputs, batch: F.cross_entropy(outputs, batch[1]),
    )
    trainer.train(data, output_dir=tmp_path)
    reference = _sequential()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)  # the default
    for xb, yb in DataLoader(data, batch_size=8):
        optimizer.zero_grad()
        F.cross_entropy(reference(xb), yb).backward()
        optimizer.step()
    for name, value in reference.named_parameters():
        torch.testing.assert_close(trainer.model.get_parameter(name), value, rtol=0, atol=0)
