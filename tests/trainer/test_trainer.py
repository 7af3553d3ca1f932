"""MedicalModelTrainer: the loop against an imperative PyTorch reference, optimizers and schedules
from the registries, evaluation over the whole set, accumulation cadence, early stopping,
non-finite steps, data errors, the process group and final outputs."""

from __future__ import annotations

import copy
import json
import logging
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
from torch.utils.data import DataLoader

import medfunc.final_outputs
from medfunc import distributed, optim, schedules
from medfunc.errors import BatchError, ConfigError, NonFiniteError
from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import (
    MedicalModelTrainer,
    TrainerConfig,
    build_optimizer,
    build_schedule,
    save_weights,
)


def _data(n: int, classes: int = 3, seed: int = 0, features: int = 6) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    labels = (
        (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
        if classes == 2
        else torch.randint(0, classes, (n,), generator=g)
    )
    return TensorDictDataset({"x": x, "labels": labels})


def _records(path, prefix):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if any(k.startswith(prefix) for k in r)]


def _model(seed: int = 0, **kwargs) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier(**kwargs)


def _quiet(**options) -> TrainerConfig:
    base = {"device": "cpu", "save_every_epochs": None, "progress_bar": False}
    base.update(options)
    return TrainerConfig(**base)


def test_training_equals_an_imperative_pytorch_loop(tmp_path):
    """AdamW + clip_grad_norm_ + LambdaLR, accumulation 2, seeded shuffle: params within 1e-6."""
    model = _model()
    reference = copy.deepcopy(model)
    data = _data(70)
    epochs, k, bs, seed = 3, 2, 8, 7
    config = _quiet(
        num_epochs=epochs,
        batch_size=bs,
        learning_rate=1e-2,
        weight_decay=0.05,
        warmup_steps=3,
        max_grad_norm=0.5,
        gradient_accumulation_steps=k,
        log_every=1,
        seed=seed,
    )
    trainer = MedicalModelTrainer(model, config)
    result = trainer.train(data, output_dir=tmp_path)

    decay = [p for n, p in reference.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in reference.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
    )
    steps_per_epoch = (70 // bs + 1) // k  # 9 batches -> 4 windows, the 9th batch is dropped
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / 3 if s < 3 else max(0.0, (total - s) / (total - 3))
    )
    x, y = data.tensors["x"], data.tensors["labels"]
    lrs, losses = [], []
    for epoch in range(epochs):
        order = torch.randperm(70, generator=torch.Generator().manual_seed(seed + epoch))
        batches = [order[i : i + bs] for i in range(0, 70, bs)]
        for w in range(steps_per_epoch):
            window_loss = 0.0
            for index in batches[w * k : (w + 1) * k]:
                loss = reference(x[index], labels=y[index])["loss"]
                (loss / k).backward()
                window_loss += loss.item() / k
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            lrs.append(opt.param_groups[0]["lr"])
            losses.append(window_loss)
            opt.step()
            schedule.step()
            opt.zero_grad()

    assert result.global_step == total
    for (name, got), want in zip(trainer.state.params.items(), reference.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6, msg=name)
    logged = _records(tmp_path, "train/")
    assert [r["step"] for r in logged] == list(range(1, total + 1))
    assert [r["train/lr"] for r in logged] == pytest.approx(lrs, rel=1e-12)
    assert [r["train/loss"] for r in logged] == pytest.approx(losses, rel=1e-5)


def test_evaluate_computes_metrics_over_the_whole_set_like_sklearn(tmp_path):
    model = _model(classes=2)
    train, held_out = _data(64, classes=2), _data(53, classes=2, seed=1)
    trainer = MedicalModelTrainer(
        model, _quiet(num_epochs=2, batch_size=16, learning_rate=1e-2, eval_batch_size=10)
    )
    trainer.train(train, output_dir=tmp_path)
    metrics = trainer.evaluate(held_out)

    with torch.no_grad():
        model.eval()
        out = model(held_out.tensors["x"], labels=held_out.tensors["labels"])
    labels = held_out.tensors["labels"]
    predictions = out["logits"].argmax(-1)
    assert metrics["loss"] == pytest.approx(out["loss"].item(), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert metrics["precision"] == pytest.approx(precision_score(labels, predictions))
    assert metrics["recall"] == pytest.approx(recall_score(labels, predictions))
    assert metrics["f1"] == pytest.approx(f1_score(labels, predictions))
    assert metrics["auroc"] == pytest.approx(
        roc_auc_score(labels, out["logits"].softmax(-1)[:, 1]), abs=1e-6
    )
    torch.testing.assert_close(trainer.predict(held_out), out["logits"])


class _CountingModel(TinyClassifier):
    """Records (training mode, grad enabled) for every forward call."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(dropout=0.3)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x, labels=None):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return super().forward(x, labels)


def test_log_and_eval_fire_per_optimizer_step_and_training_stays_in_train_mode(tmp_path):
    model = _CountingModel()
    config = _quiet(
        num_epochs=1,
        batch_size=4,
        gradient_accumulation_steps=3,
        log_every=1,
        eval_every_steps=1,
        eval_at_epoch_end=True,
        eval_batch_size=5,
        learning_rate=1e-2,
    )
    result = MedicalModelTrainer(model, config).train(
        _data(48), _data(10, seed=3), output_dir=tmp_path
    )
    train_calls = [c for c in model.calls if c[1]]
    eval_calls = [c for c in model.calls if not c[1]]
    assert len(train_calls) == 12 and all(training for training, _ in train_calls)
    # 4 step evaluations of 2 batches; the epoch-end evaluation at step 4 is not repeated
    assert len(eval_calls) == 8 and not any(training for training, _ in eval_calls)
    assert [r["step"] for r in _records(tmp_path, "train/")] == [1, 2, 3, 4]
    assert [r["step"] for r in _records(tmp_path, "eval/")] == [1, 2, 3, 4]
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert model.training


def test_step_evaluation_does_not_change_training(tmp_path):
    config = dict(num_epochs=2, batch_size=8, learning_rate=1e-2, log_every=3)
    with_eval = MedicalModelTrainer(
        _model(dropout=0.5), _quiet(eval_every_steps=1, load_best_model_at_end=False, **config)
    )
    with_eval.train(_data(40), _data(12, seed=5), output_dir=tmp_path / "a")
    plain = MedicalModelTrainer(_model(dropout=0.5), _quiet(**config))
    plain.train(_data(40), output_dir=tmp_path / "b")
    for name, value in with_eval.state.params.items():
        assert torch.equal(value, plain.state.params[name]), name


def test_early_stopping_uses_patience_min_delta_and_mode(tmp_path):
    seen = []

    def slowly_improving(outputs_list, labels):
        seen.append((len(outputs_list), len(labels)))
        return {"score": 0.5 + 1e-4 * len(seen)}

    config = _quiet(
        num_epochs=10,
        batch_size=8,
        eval_metric="score",
        eval_metric_mode="max",
        early_stopping_patience=2,
        early_stopping_min_delta=1e-3,
        eval_set_metrics=slowly_improving,
        eval_batch_size=4,
        save_every_epochs=1,
    )
    result = MedicalModelTrainer(_model(), config).train(
        _data(16), _data(10, seed=2), output_dir=tmp_path
    )
    assert result.stopped_early and result.epochs_completed == 3
    assert seen == [(3, 10)] * 3
    assert result.best_metric == pytest.approx(0.5001)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == [
        "checkpoint-epoch1.pt",
        "checkpoint-epoch2.pt",
        "checkpoint-epoch3.pt",
    ]


def test_consecutive_non_finite_steps_stop_with_a_clear_error(tmp_path):
    data = _data(40)
    data.tensors["x"][:] = float("nan")
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = _quiet(num_epochs=3, batch_size=4, log_every=2, max_consecutive_skipped_steps=3)
    with pytest.raises(NonFiniteError, match=r"4 consecutive optimizer steps \(up to step 4\)"):
        MedicalModelTrainer(model, config).train(data, output_dir=tmp_path)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


class _BrokenDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 20

    def __getitem__(self, index: int) -> dict:
        if index == 13:
            raise OSError("image file truncated")
        return {"x": torch.zeros(6), "labels": torch.tensor(0)}


def test_an_unreadable_item_is_named_by_its_index(tmp_path):
    config = _quiet(num_epochs=1, batch_size=4, shuffle=False)
    with pytest.raises(
        BatchError,
        match=r"train_dataset\[13\] could not be read: OSError: "
        "image file truncated",
    ):
        MedicalModelTrainer(_model(), config).train(_BrokenDataset(), output_dir=tmp_path)


def test_dataloaders_and_lists_of_examples_are_accepted(tmp_path):
    """Lists of batches are refused and DataLoaders of them accepted (see
    tests/trainer/test_trainer_data.py)."""
    data = _data(32)
    loader = DataLoader(data, batch_size=8, shuffle=False)
    examples = [data[i] for i in range(32)]
    a = MedicalModelTrainer(_model(), _quiet(num_epochs=2, learning_rate=1e-2))
    a.train(loader, eval_dataset=loader, output_dir=tmp_path / "loader")
    b = MedicalModelTrainer(_model(), _quiet(num_epochs=2, learning_rate=1e-2, shuffle=False))
    b.train(examples, eval_dataset=examples, output_dir=tmp_path / "list")
    for name, value in a.state.params.items():
        assert torch.equal(value, b.state.params[name]), name
    with pytest.raises(ConfigError, match="one-shot iterator"):
        MedicalModelTrainer(_model(), _quiet(num_epochs=2)).train(
            iter(list(loader)), output_dir=tmp_path / "it"
        )


def test_final_weights_are_saved_as_safetensors(tmp_path):
    model = _model(batchnorm=True)
    trainer = MedicalModelTrainer(model, _quiet(num_epochs=1, batch_size=8, learning_rate=1e-2))
    result = trainer.train(_data(32), output_dir=tmp_path)
    assert result.weights_path == tmp_path / "model.safetensors"
    saved = load_file(result.weights_path)
    assert set(saved) == set(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(saved[name], value), name


def test_a_failed_export_is_recorded_and_keeps_the_training_outputs(tmp_path, caplog, monkeypatch):
    def failing_export(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(medfunc.final_outputs.export, "to_onnx", failing_export)
    config = _quiet(
        num_epochs=1,
        batch_size=8,
        save_every_epochs=1,
        export_onnx=True,
        export_input_example={"x": torch.zeros(1, 6)},
    )
    with caplog.at_level(logging.WARNING, logger="medfunc.trainer"):
        result = MedicalModelTrainer(_model(), config).train(_data(16), output_dir=tmp_path)
    assert result.export_errors == {"onnx": "RuntimeError: exporter failed"}
    assert "onnx" not in result.exports and "onnx export failed" in caplog.text
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "checkpoint-epoch1.pt").is_file()
    assert not (tmp_path / "model.onnx").exists()


def test_an_export_example_the_model_cannot_take_fails_before_training(tmp_path):
    config = _quiet(export_onnx=True, export_input_example={"x": torch.zeros(1, 5)})  # not 6
    with pytest.raises(ConfigError, match="export_input_example does not run through the model"):
        MedicalModelTrainer(_model(), config).train(_data(16), output_dir=tmp_path)
    assert not list(tmp_path.glob("checkpoint-*.pt"))


def test_export_without_an_example_is_warned_before_training_and_skipped(tmp_path, caplog):
    config = _quiet(num_epochs=1, export_torchscript=True)
    trainer = MedicalModelTrainer(_model(), config)
    with caplog.at_level(logging.WARNING, logger="medfunc.trainer"):
        with pytest.raises(ConfigError, match="train_dataset must be"):
            trainer.train(42, output_dir=tmp_path / "bad")  # warned before the data is read
    assert caplog.text.count("export_torchscript=True without export_input_example") == 1
    result = trainer.train(_data(16), output_dir=tmp_path / "run")
    assert result.exports == {} and result.export_errors == {}
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "model.pt").exists()


def test_missing_eval_metric_and_unavailable_devices_are_config_errors(tmp_path):
    config = _quiet(num_epochs=1, eval_metric="dice")
    with pytest.raises(ConfigError, match="eval_metric='dice' is not among the evaluation"):
        MedicalModelTrainer(_model(), config).train(_data(16), _data(8), output_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs the torch_xla package"):
        MedicalModelTrainer(_model(), TrainerConfig(device="xla"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            MedicalModelTrainer(_model(), TrainerConfig(device="cuda"))


def test_quickstart_example_runs(tmp_path, monkeypatch, capsys):
    example = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--output-dir", str(tmp_path), "--epochs", "3"])
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert float(out.split("test AUROC ")[1].split(",")[0]) > 0.95
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "model.safetensors").is_file()


def test_fp16_amp_equals_autocast_with_gradscaler(tmp_path):
    """use_amp with float16 (on the CPU) against autocast + torch.amp.GradScaler + AdamW."""
    model = _model(hidden=32)
    reference = copy.deepcopy(model)
    data = _data(48)
    config = _quiet(
        num_epochs=2,
        batch_size=8,
        learning_rate=1e-2,
        scheduler="none",
        grad_clip_mode="none",
        use_amp=True,
        amp_dtype="fp16",
        shuffle=False,
        log_every=1,
    )
    trainer = MedicalModelTrainer(model, config)
    trainer.train(data, output_dir=tmp_path)

    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu")
    x, y = data.tensors["x"], data.tensors["labels"]
    scales = []
    for _ in range(2):
        for start in range(0, 48, 8):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = reference(x[start : start + 8], labels=y[start : start + 8])["loss"]
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
            opt.zero_grad()
    for (name, got), want in zip(trainer.state.params.items(), reference.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6, msg=name)
    logged = [r["train/loss_scale"] for r in _records(tmp_path, "train/")]
    assert logged == scales


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_step(tmp_path):
    """compile="inductor" (torch.compile of the step, here on the CPU) against the eager loop."""
    params = {}
    for mode in (False, "inductor"):
        config = _quiet(num_epochs=2, batch_size=8, learning_rate=1e-2, compile=mode)
        trainer = MedicalModelTrainer(_model(dropout=0.2), config)
        trainer.train(_data(64), output_dir=tmp_path / str(mode))
        params[mode] = trainer.state.params
    for name, value in params[False].items():
        torch.testing.assert_close(params["inductor"][name], value, rtol=0, atol=1e-6, msg=name)


def _per_param_groups(model, lr, weight_decay, multipliers=()):
    """torch.optim param groups as medfunc builds them: no decay for biases, LR multipliers."""
    groups = []
    for name, param in model.named_parameters():
        factor = next((m for pattern, m in multipliers if pattern in name), 1.0)
        decay = 0.0 if name.endswith("bias") else weight_decay
        groups.append({"params": [param], "lr": lr * factor, "weight_decay": decay})
    return groups


REGISTRY_CASES = {
    "sgd-value-step": (
        dict(
            optimizer="sgd",
            sgd_momentum=0.8,
            weight_decay=0.01,
            layer_wise_lrs=[("fc1", 0.5)],
            grad_clip_mode="value",
            grad_clip_value=0.05,
            scheduler="step",
            step_size=3,
            gamma=0.5,
        ),
        lambda groups, c: torch.optim.SGD(groups, lr=c.learning_rate, momentum=0.8),
        lambda opt, c, total: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    ),
    "adam-cosine": (
        dict(
            optimizer="adam",
            betas=(0.8, 0.99),
            eps=1e-6,
            weight_decay=0.01,
            grad_clip_mode="none",
            scheduler="cosine",
            eta_min=1e-4,
        ),
        lambda groups, c: torch.optim.Adam(groups, lr=c.learning_rate, betas=(0.8, 0.99), eps=1e-6),
        lambda opt, c, total: torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=total, eta_min=1e-4
        ),
    ),
    "adamw-norm-one_cycle": (
        dict(
            optimizer="adamw",
            weight_decay=0.05,
            max_grad_norm=0.3,
            scheduler="one_cycle",
            pct_start=0.25,
            anneal_strategy="linear",
            div_factor=10.0,
            final_div_factor=100.0,
        ),
        lambda groups, c: torch.optim.AdamW(groups, lr=c.learning_rate),
        lambda opt, c, total: torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=c.learning_rate,
            total_steps=total,
            pct_start=0.25,
            anneal_strategy="linear",
            div_factor=10.0,
            final_div_factor=100.0,
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(REGISTRY_CASES))
def test_registry_optimizers_and_schedules_equal_torch(tmp_path, case):
    """Each config reaches the registries' factories: the run equals torch.optim + lr_scheduler."""
    options, make_optimizer, make_schedule = REGISTRY_CASES[case]
    model = _model()
    reference = copy.deepcopy(model)
    data = _data(48)
    config = _quiet(
        num_epochs=2, batch_size=8, learning_rate=0.05, shuffle=False, log_every=1, **options
    )
    trainer = MedicalModelTrainer(model, config)
    trainer.train(data, output_dir=tmp_path)

    total = 12
    groups = _per_param_groups(reference, 0.05, config.weight_decay, config.layer_wise_lrs or ())
    opt = make_optimizer(groups, config)
    schedule = make_schedule(opt, config, total)
    x, y = data.tensors["x"], data.tensors["labels"]
    lrs = []
    for _ in range(2):
        for start in range(0, 48, 8):
            reference(x[start : start + 8], labels=y[start : start + 8])["loss"].backward()
            if config.grad_clip_mode == "value":
                torch.nn.utils.clip_grad_value_(reference.parameters(), config.grad_clip_value)
            elif config.grad_clip_mode == "norm":
                torch.nn.utils.clip_grad_norm_(reference.parameters(), config.max_grad_norm)
            lrs.append(opt.param_groups[-1]["lr"])
            opt.step()
            schedule.step()
            opt.zero_grad()
    for (name, got), want in zip(trainer.state.params.items(), reference.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6, msg=name)
    logged = [r["train/lr"] for r in _records(tmp_path, "train/")]
    assert logged == pytest.approx(lrs, rel=1e-12, abs=1e-15)


def test_a_newly_registered_schedule_and_optimizer_need_no_trainer_change(monkeypatch):
    def halving(lr, step_size, floor=0.0):
        return lambda step: torch.tensor(
            max(lr * 0.5 ** (int(step) // step_size), floor), dtype=torch.float64
        )

    def sgd_nesterov(lr, momentum, weight_decay, *, lr_multipliers=None):
        return optim.sgd(lr, momentum, 0.0, True, weight_decay, lr_multipliers=lr_multipliers)

    monkeypatch.setitem(schedules.SCHEDULES, "halving", halving)
    monkeypatch.setitem(optim.OPTIMIZERS, "sgd_nesterov", sgd_nesterov)
    config = TrainerConfig(learning_rate=0.8, step_size=2, sgd_momentum=0.7, weight_decay=0.1)
    config.scheduler, config.optimizer = "halving", "sgd_nesterov"  # not yet in TrainerConfig
    schedule = build_schedule(config, total_steps=None)
    assert [float(schedule(s)) for s in range(6)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2]
    spec, path = optim.find_optimizer(build_optimizer(config, schedule))
    assert path == (1,)  # after the default clipping
    assert (spec.name, spec.momentum, spec.nesterov, spec.weight_decay) == ("sgd", 0.7, True, 0.1)


def test_schedules_that_need_the_run_length_say_so(caplog):
    with pytest.raises(ConfigError, match="scheduler='cosine' needs the run length"):
        build_schedule(TrainerConfig(scheduler="cosine"), total_steps=None)
    with pytest.raises(ConfigError, match="scheduler='one_cycle' needs the run length"):
        build_schedule(TrainerConfig(scheduler="one_cycle"), total_steps=None)
    cosine = build_schedule(TrainerConfig(scheduler="cosine", t_max=10, learning_rate=1.0), None)
    assert float(cosine(5)) == float(schedules.cosine(1.0, 10)(5))
    with caplog.at_level(logging.WARNING, logger="medfunc.trainer"):
        warm = build_schedule(TrainerConfig(learning_rate=1.0, warmup_steps=50), total_steps=20)
    assert "warmup_steps=50 exceeds the run's 20 optimizer steps" in caplog.text
    reference = schedules.linear_warmup(1.0, 20, 20)
    assert [float(warm(s)) for s in range(22)] == [float(reference(s)) for s in range(22)]


def test_constructing_a_trainer_does_not_join_the_process_group(tmp_path, monkeypatch):
    """Under torchrun the group is joined by train(), not by the constructor."""
    joined = []
    real_init = distributed.init

    def refusing_init(*args, **kwargs):
        raise AssertionError("the constructor joined the process group")

    monkeypatch.setattr(distributed, "init", refusing_init)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    trainer = MedicalModelTrainer(_model(), _quiet(num_epochs=1, batch_size=8))
    assert not torch.distributed.is_initialized()

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(distributed, "init", lambda *a, **k: joined.append(1) or real_init(*a, **k))
    trainer.train(_data(16), output_dir=tmp_path)
    assert joined


def test_the_weights_file_is_written_atomically(tmp_path):
    """save_weights replaces an existing file by a rename (a refused folder: run_folder tests)."""
    trainer = MedicalModelTrainer(_model(), _quiet(num_epochs=1, batch_size=8))
    trainer.train(_data(16), output_dir=tmp_path / "run")
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"an older run's weights")
    assert save_weights(trainer.state, target) == target
    assert set(load_file(target)) == set(trainer.state.params)
    assert (target.stat().st_mode & 0o777) == 0o644
    assert not list(tmp_path.glob(".model.safetensors.tmp*"))
