"""Checkpoints after every epoch and every N steps; resuming equals never stopping (bitwise)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import TinyClassifier, make_batches

import medfunc as mf
from medfunc.checkpoint import read_checkpoint
from medfunc.errors import BatchError
from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig
from medfunc.trainer_build import build_optimizer, build_schedule

N, BATCH = 40, 8  # 5 optimizer steps per epoch


class _CrashingDataset(TensorDictDataset):
    """A dataset whose reads fail once ``crash_after`` items were read: a run that dies."""

    def __init__(self, tensors, crash_after: int) -> None:
        super().__init__(tensors)
        self.reads = 0
        self.crash_after = crash_after

    def __getitem__(self, index: int) -> dict:
        self.reads += 1
        if self.reads > self.crash_after:
            raise RuntimeError("the machine went away")
        return super().__getitem__(index)


def _tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(N, 6, generator=g), "labels": torch.randint(0, 3, (N,), generator=g)}


def _model(seed: int) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier(dropout=0.3)


def _config(**options) -> TrainerConfig:
    base = dict(
        num_epochs=3,
        batch_size=BATCH,
        learning_rate=1e-2,
        warmup_steps=4,
        weight_decay=0.01,
        scheduler="linear_warmup",
        save_every_epochs=1,
        save_every_steps=3,
        log_every=1,
        eval_every_steps=4,
        device="cpu",
        early_stopping_patience=50,
        eval_metric="accuracy",
        load_best_model_at_end=False,  # the cadence alone (best checkpoints: test_checkpoints)
        progress_bar=False,
        num_workers=0,  # _CrashingDataset counts its reads in this process
    )
    base.update(options)
    return TrainerConfig(**base)


def _lrs(folder) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    trainer = MedicalModelTrainer(_model(0), _config())
    result = trainer.train(
        TensorDictDataset(_tensors()), TensorDictDataset(_tensors()), output_dir=folder
    )
    return trainer, result, folder


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """The same run, killed by a failing read in the middle of epoch 2 (after step 7)."""
    folder = tmp_path_factory.mktemp("crashed")
    data = _CrashingDataset(_tensors(), crash_after=7 * BATCH + 3)
    with pytest.raises(BatchError, match="the machine went away"):
        MedicalModelTrainer(_model(0), _config()).train(
            data, TensorDictDataset(_tensors()), output_dir=folder
        )
    return folder


def test_checkpoints_are_written_during_the_run(crashed, uninterrupted):
    assert sorted(p.name for p in crashed.glob("checkpoint-*.pt")) == [
        "checkpoint-epoch1.pt",
        "checkpoint-step3.pt",
        "checkpoint-step6.pt",
    ]
    _, result, folder = uninterrupted
    assert [p.name for p in result.checkpoints] == [
        "checkpoint-step3.pt",
        "checkpoint-epoch1.pt",
        "checkpoint-step6.pt",
        "checkpoint-step9.pt",
        "checkpoint-epoch2.pt",
        "checkpoint-step12.pt",
        "checkpoint-step15.pt",
        "checkpoint-epoch3.pt",
    ]
    saved = read_checkpoint(folder / "checkpoint-step6.pt")["trainer_state"]
    assert (saved["epoch"], saved["batch_index"], saved["loop_step"]) == (1, 1, 6)
    assert saved["global_step"] == 6
    assert saved["last_eval_step"] == 5 and saved["best_metric"] is not None
    epoch1 = read_checkpoint(folder / "checkpoint-epoch1.pt")["trainer_state"]
    assert (epoch1["epoch"], epoch1["batch_index"], epoch1["loop_step"]) == (1, 0, 5)


@pytest.mark.parametrize("checkpoint", ["checkpoint-epoch1.pt", "checkpoint-step6.pt"])
def test_resuming_equals_the_uninterrupted_run_bitwise(
    tmp_path, crashed, uninterrupted, checkpoint
):
    full, full_result, full_folder = uninterrupted
    resumed = MedicalModelTrainer(_model(123), _config(resume_from=str(crashed / checkpoint)))
    result = resumed.train(
        TensorDictDataset(_tensors()), TensorDictDataset(_tensors()), output_dir=tmp_path
    )
    assert result.global_step == full_result.global_step == 15
    for name, value in full.state.params.items():
        assert torch.equal(resumed.state.params[name], value), name
    assert int(resumed.state.step) == int(full.state.step)
    full_opt = torch.cat([t.reshape(-1) for t in _leaves(full.state.opt_state)])
    resumed_opt = torch.cat([t.reshape(-1) for t in _leaves(resumed.state.opt_state)])
    assert torch.equal(full_opt, resumed_opt)
    assert torch.equal(resumed.state.rng, full.state.rng)
    first = 6 if checkpoint.endswith("epoch1.pt") else 7
    assert result.best_metric == full_result.best_metric
    assert result.history == [h for h in full_result.history if h["step"] >= first]
    full_lrs, resumed_lrs = _lrs(full_folder), _lrs(tmp_path)
    assert sorted(resumed_lrs) == list(range(first, 16))
    assert resumed_lrs == {s: full_lrs[s] for s in resumed_lrs}


def _leaves(tree) -> list[torch.Tensor]:
    from medfunc.state import tree_flatten

    leaves, _ = tree_flatten(tree)
    return [t.float() for t in leaves if isinstance(t, torch.Tensor)]


def test_fp16_resume_restores_the_loss_scale_and_matches_bitwise(tmp_path):
    options = dict(
        use_amp=True,
        amp_dtype="float16",
        num_epochs=2,
        save_every_steps=None,
        eval_every_steps=None,
        early_stopping_patience=None,
        eval_metric="loss",
    )
    full = MedicalModelTrainer(_model(0), _config(**options))
    full.train(TensorDictDataset(_tensors()), output_dir=tmp_path / "full")
    resumed = MedicalModelTrainer(
        _model(5), _config(resume_from=str(tmp_path / "full" / "checkpoint-epoch1.pt"), **options)
    )
    resumed.train(TensorDictDataset(_tensors()), output_dir=tmp_path / "resumed")
    assert int(full.state.loss_scale.growth_tracker) == 2 * N // BATCH
    assert torch.equal(resumed.state.loss_scale.scale, full.state.loss_scale.scale)
    assert torch.equal(
        resumed.state.loss_scale.growth_tracker, full.state.loss_scale.growth_tracker
    )
    for name, value in full.state.params.items():
        assert torch.equal(resumed.state.params[name], value), name


def _one_epoch(folder, **options) -> tuple[MedicalModelTrainer, object]:
    config = _config(
        num_epochs=1,
        save_every_steps=None,
        eval_every_steps=None,
        load_best_model_at_end=False,
        **options,
    )
    trainer = MedicalModelTrainer(_model(0), config)
    data = TensorDictDataset(_tensors())
    return trainer, trainer.train(data, TensorDictDataset(_tensors()), output_dir=folder)


def test_a_resume_with_nothing_left_says_so_evaluates_and_keeps_the_weights(tmp_path, capsys):
    _, first = _one_epoch(tmp_path)
    weights = tmp_path / "model.safetensors"
    written = (weights.read_bytes(), weights.stat().st_mtime_ns)
    checkpoint = tmp_path / "checkpoint-epoch1.pt"
    capsys.readouterr()
    again = MedicalModelTrainer(
        _model(7),
        _config(
            num_epochs=1,
            save_every_steps=None,
            eval_every_steps=None,
            load_best_model_at_end=False,
            resume_from=str(checkpoint),
        ),
    )
    result = again.train(TensorDictDataset(_tensors()), TensorDictDataset(_tensors()))
    out = capsys.readouterr().out
    assert f"resumed from {checkpoint} at epoch 1, batch 0, step 5" in out
    assert "nothing left to train" in out and "num_epochs=1" in out
    assert result.global_step == 5 and result.output_dir == tmp_path
    assert result.eval_metrics == first.eval_metrics and "accuracy" in result.eval_metrics
    assert f"final model eval: loss={first.eval_metrics['loss']:.4f}" in out
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == written
    assert result.weights_path == weights


def test_a_resume_with_changed_settings_warns_naming_each(tmp_path, caplog):
    _one_epoch(tmp_path / "run")
    checkpoint = str(tmp_path / "run" / "checkpoint-epoch1.pt")
    same = _config(num_epochs=1, resume_from=checkpoint, save_every_steps=None)
    with caplog.at_level(logging.WARNING, logger="medfunc.trainer"):
        MedicalModelTrainer(_model(0), same).train(
            TensorDictDataset(_tensors()), output_dir=tmp_path / "same"
        )
    assert "differ from the checkpoint" not in caplog.text
    changed = _config(
        num_epochs=2,
        learning_rate=5e-3,
        batch_size=4,
        optimizer="adam",
        weight_decay=0.0,
        resume_from=checkpoint,
        save_every_steps=None,
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medfunc.trainer"):
        MedicalModelTrainer(_model(0), changed).train(
            TensorDictDataset(_tensors()), output_dir=tmp_path / "changed"
        )
    (warning,) = [
        r.getMessage() for r in caplog.records if "differ from the checkpoint" in r.message
    ]
    for difference in (
        "optimizer adamw -> adam",
        "learning_rate 0.01 -> 0.005",
        "weight_decay 0.01 -> 0.0",
        "batch_size 8 -> 4",
        "num_epochs 1 -> 2",
        "schedule length (optimizer steps) 5 -> 20",
    ):
        assert difference in warning, difference
    assert "warmup_steps" not in warning and "scheduler" not in warning


def test_a_plain_save_state_checkpoint_resumes_with_an_account(tmp_path, capsys):
    options = dict(num_epochs=1, save_every_steps=None, eval_every_steps=None)
    config = _config(**options)
    schedule = build_schedule(config, total_steps=N // BATCH)
    state = mf.init_state(_model(0), build_optimizer(config, schedule), seed=config.seed)
    for batch in make_batches(3, batch_size=BATCH):
        state, _ = mf.train_step(state, batch)
    path = mf.save_state(state, tmp_path / "plain.pt")
    capsys.readouterr()
    # learning_rate=0 leaves the restored weights as they are: they must be the checkpoint's
    resumed = _config(learning_rate=0.0, resume_from=str(path), **options)
    trainer = MedicalModelTrainer(_model(9), resumed)
    result = trainer.train(TensorDictDataset(_tensors()), output_dir=tmp_path / "resumed")
    out = capsys.readouterr().out
    assert f"resumed from {path}, a checkpoint written by mf.save_state, not by the Trainer" in out
    assert "restored the weights, the optimizer state, the step counter (step 3" in out
    assert "not restored: the data position (training starts at the first batch of epoch 1)" in out
    assert result.global_step == int(trainer.state.step) == 3 + N // BATCH
    assert sorted(_lrs(tmp_path / "resumed")) == list(range(4, 9))
    for name, value in state.params.items():
        assert torch.equal(trainer.state.params[name], value), name
    assert torch.equal(trainer.state.rng[0], state.rng[0])


def test_a_resume_restores_into_the_models_own_parameters(tmp_path):
    trained, _ = _one_epoch(tmp_path)
    model = _model(7)
    weight = model.fc1.weight
    again = MedicalModelTrainer(
        model,
        _config(
            num_epochs=1,
            save_every_steps=None,
            eval_every_steps=None,
            resume_from=str(tmp_path / "checkpoint-epoch1.pt"),
        ),
    )
    again.train(TensorDictDataset(_tensors()), TensorDictDataset(_tensors()))
    # the state built for the run was donated to the restore: one copy of the state, the model's
    assert again.state.params["fc1.weight"].data_ptr() == weight.data_ptr()
    assert torch.equal(weight, trained.state.params["fc1.weight"])
