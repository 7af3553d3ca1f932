"""Checkpoints after every epoch and every N steps; resuming equals never stopping (bitwise)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyClassifier

from medfunc.checkpoint import read_checkpoint
from medfunc.errors import BatchError
from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

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
