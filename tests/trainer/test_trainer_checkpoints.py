"""Checkpoint retention (save_total_limit), the best checkpoint, and a checkpoint when training
stops."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyClassifier, make_dataset
from safetensors.torch import load_file

import medfunc.trainer
from medfunc.checkpoint import read_checkpoint
from medfunc.trainer import MedicalModelTrainer, TrainerConfig


def _trainer(**options) -> MedicalModelTrainer:
    torch.manual_seed(0)
    base = dict(device="cpu", progress_bar=False, batch_size=8, learning_rate=1e-2)
    return MedicalModelTrainer(TinyClassifier(), TrainerConfig(**{**base, **options}))


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint-*.pt"))


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path):
    result = _trainer(num_epochs=3, save_every_steps=3, save_total_limit=2).train(
        make_dataset(32), output_dir=tmp_path
    )
    assert [p.name for p in result.checkpoints] == [
        "checkpoint-step3.pt",
        "checkpoint-epoch1.pt",
        "checkpoint-step6.pt",
        "checkpoint-epoch2.pt",
        "checkpoint-step9.pt",
        "checkpoint-step12.pt",
        "checkpoint-epoch3.pt",
    ]
    assert _names(tmp_path) == ["checkpoint-epoch3.pt", "checkpoint-step12.pt"]


def test_save_total_limit_never_deletes_the_checkpoint_resumed_from(tmp_path):
    _trainer(num_epochs=2).train(make_dataset(32), output_dir=tmp_path)
    resume = tmp_path / "checkpoint-epoch1.pt"
    _trainer(num_epochs=4, resume_from=str(resume), save_total_limit=1).train(make_dataset(32))
    assert _names(tmp_path) == ["checkpoint-epoch1.pt", "checkpoint-epoch4.pt"]


def test_old_checkpoints_are_deleted_only_after_the_new_one_is_written(tmp_path, monkeypatch):
    real_save, calls = medfunc.trainer.save_state, []

    def failing_third_save(state, path, **options):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(state, path, **options)

    monkeypatch.setattr(medfunc.trainer, "save_state", failing_third_save)
    with pytest.raises(OSError, match="disk full"):
        _trainer(num_epochs=3, save_total_limit=2).train(make_dataset(32), output_dir=tmp_path)
    assert _names(tmp_path) == ["checkpoint-epoch1.pt", "checkpoint-epoch2.pt"]


SCORES = [0.5, 0.7, 0.9, 0.8, 0.85, 0.6, 0.95]  # best at epoch 3, patience 3 stops at epoch 6


def _scored(**options) -> TrainerConfig:
    calls = []

    def score(outputs_list, labels):
        calls.append(1)
        return {"score": SCORES[len(calls) - 1]}

    base = dict(
        num_epochs=10,
        eval_metric="score",
        eval_metric_mode="max",
        early_stopping_patience=3,
        eval_set_metrics=score,
        save_every_epochs=5,
    )
    return {**base, **options}


def test_early_stopping_loads_the_best_checkpoint_and_can_be_resumed(tmp_path):
    trainer = _trainer(**_scored())
    result = trainer.train(make_dataset(32), make_dataset(16, seed=1), output_dir=tmp_path)
    assert result.stopped_early and result.epochs_completed == 6 and result.global_step == 24
    # the best evaluation was checkpointed, the cadence's epoch 5, and the moment training stopped
    assert _names(tmp_path) == [
        "checkpoint-epoch3.pt",
        "checkpoint-epoch5.pt",
        "checkpoint-epoch6.pt",
    ]
    assert (result.best_epoch, result.best_step, result.loaded_best) == (3, 12, True)
    assert result.best_checkpoint == tmp_path / "checkpoint-epoch3.pt"
    assert result.eval_metrics["score"] == 0.9 and result.history[-1]["score"] == 0.6
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["checkpoint"] == "checkpoint-epoch3.pt" and (best["epoch"], best["step"]) == (3, 12)
    assert (best["metric"], best["value"], best["metrics"]["score"]) == ("score", 0.9, 0.9)
    best_state = read_checkpoint(tmp_path / "checkpoint-epoch3.pt")
    assert best_state["trainer_state"]["best_checkpoint"] == "checkpoint-epoch3.pt"
    last = read_checkpoint(tmp_path / "checkpoint-epoch6.pt")["trainer_state"]
    assert (last["loop_step"], last["best_checkpoint"], last["best_step"]) == (
        24,
        "checkpoint-epoch3.pt",
        12,
    )
    weights = load_file(tmp_path / "model.safetensors")
    for name, value in best_state["model_state"].items():
        assert torch.equal(weights[name], value), name
        assert torch.equal(trainer.model.state_dict()[name], value), name
    assert not torch.equal(
        weights["fc1.weight"],
        read_checkpoint(tmp_path / "checkpoint-epoch6.pt")["model_state"]["fc1.weight"],
    )


def test_the_last_weights_are_kept_when_asked(tmp_path):
    result = _trainer(**_scored(load_best_model_at_end=False)).train(
        make_dataset(32), make_dataset(16, seed=1), output_dir=tmp_path
    )
    assert not result.loaded_best and result.eval_metrics["score"] == 0.6
    assert (result.best_epoch, result.best_checkpoint) == (3, None)  # no checkpoint holds it
    assert not (tmp_path / "best.json").exists()
    last = read_checkpoint(tmp_path / "checkpoint-epoch6.pt")["model_state"]
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(weights[n], v) for n, v in last.items())


def test_save_total_limit_never_deletes_the_best_checkpoint(tmp_path):
    _trainer(**_scored(save_every_epochs=1, save_total_limit=1)).train(
        make_dataset(32), make_dataset(16, seed=1), output_dir=tmp_path
    )
    assert _names(tmp_path) == ["checkpoint-epoch3.pt", "checkpoint-epoch6.pt"]


def test_a_resumed_run_loads_the_best_checkpoint_of_its_first_part(tmp_path):
    first = _trainer(**_scored(num_epochs=5)).train(
        make_dataset(32), make_dataset(16, seed=1), output_dir=tmp_path
    )
    assert first.best_epoch == 3 and not first.stopped_early
    resume = str(tmp_path / "checkpoint-epoch5.pt")
    resumed = _trainer(**_scored(resume_from=resume)).train(
        make_dataset(32), make_dataset(16, seed=1)
    )
    # the restored patience (2 evaluations without improvement) runs out after one more epoch
    assert resumed.stopped_early and resumed.epochs_completed == 6
    assert (resumed.best_epoch, resumed.loaded_best) == (3, True)
    assert resumed.best_checkpoint == tmp_path / "checkpoint-epoch3.pt"
    best = read_checkpoint(tmp_path / "checkpoint-epoch3.pt")["model_state"]
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(weights[n], v) for n, v in best.items())
