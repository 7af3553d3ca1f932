"""Skipped (non-finite) steps are reported; an epoch that trains nothing fails; fp16 scale floor."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TinyClassifier

from medfunc.checkpoint import read_checkpoint
from medfunc.errors import NonFiniteError
from medfunc.recipes.base import TensorDictDataset
from medfunc.skipped_steps import check_epoch_updates
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

BATCH = 4


def _data(n: int, nan_batches: range | list[int] = ()) -> TensorDictDataset:
    """``n`` examples in order; every example of the listed batches is NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    for b in nan_batches:
        x[b * BATCH : (b + 1) * BATCH] = float("nan")
    return TensorDictDataset({"x": x, "labels": torch.randint(0, 3, (n,), generator=g)})


def _train(data, out, model=None, **options):
    torch.manual_seed(0)
    base = dict(
        batch_size=BATCH,
        shuffle=False,
        device="cpu",
        save_every_epochs=None,
        progress_bar=False,
        learning_rate=1e-2,
        log_every=2,
    )
    config = TrainerConfig(**{**base, **options})
    trainer = MedicalModelTrainer(model or TinyClassifier(), config)
    return trainer, trainer.train(data, output_dir=out)


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_run_whose_every_step_was_skipped_fails_naming_the_epoch_and_count(tmp_path):
    # 32 steps, all non-finite: fewer than max_consecutive_skipped_steps (100), so only the
    # epoch check catches it
    data = _data(32 * BATCH, nan_batches=range(32))
    with pytest.raises(NonFiniteError, match=r"epoch 1 applied no update: all 32 of its"):
        _train(data, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_a_later_epoch_without_updates_fails_too(tmp_path):
    # a run resumed at the end of a good epoch 1, on data that is now all NaN
    data = _data(8 * BATCH, nan_batches=range(8))
    with pytest.raises(NonFiniteError, match=r"epoch 1 applied no update: all 8"):
        _train(data, tmp_path / "a", num_epochs=2)
    good = _data(8 * BATCH)
    _train(good, tmp_path / "b", num_epochs=1, save_every_epochs=1)
    with pytest.raises(NonFiniteError, match=r"epoch 2 applied no update: all 8"):
        _train(
            data, tmp_path / "b", num_epochs=2, resume_from=str(tmp_path / "b/checkpoint-epoch1.pt")
        )


def test_allow_no_update_epochs_only_warns(tmp_path, caplog):
    data = _data(8 * BATCH, nan_batches=range(8))
    with caplog.at_level(logging.WARNING, logger="medfunc"):
        _, result = _train(data, tmp_path, allow_no_update_epochs=True)
    assert result.global_step == 8
    assert _messages(caplog, "epoch 1 applied no update: all 8 of its optimizer steps")


def test_some_skipped_steps_are_reported_in_the_epoch_summary_and_the_progress_bar(
    tmp_path, caplog, capsys
):
    data = _data(10 * BATCH, nan_batches=[3, 7])
    with caplog.at_level(logging.INFO, logger="medfunc"):
        _, result = _train(data, tmp_path, progress_bar=True, num_epochs=1)
    assert result.global_step == 10
    [summary] = _messages(caplog, "optimizer steps were skipped")
    assert summary == "epoch 1: 2 of 10 optimizer steps were skipped (non-finite gradients)"
    assert any(r.levelno == logging.WARNING for r in caplog.records if r.getMessage() == summary)
    assert "skipped=2" in capsys.readouterr().err


def test_the_fp16_calibration_skips_are_info_not_warnings(caplog):
    with caplog.at_level(logging.INFO, logger="medfunc"):
        check_epoch_updates(1, steps=50, skipped=3, allow_no_update=False, precision="fp16")
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert "while the fp16 loss scale calibrated" in record.getMessage()


def test_an_fp16_loss_scale_driven_below_one_warns_once_with_the_likely_cause(tmp_path, caplog):
    # 20 NaN batches halve the scale 20 times: 65536 / 2**20 = 0.0625; then it trains again
    data = _data(30 * BATCH, nan_batches=range(20))
    with caplog.at_level(logging.WARNING, logger="medfunc"):
        _, result = _train(data, tmp_path, use_amp=True, amp_dtype="float16")
    [warning] = _messages(caplog, "loss scale fell to")
    assert "NaN/inf" in warning and "bfloat16" in warning
    assert "fell to 0.25 at step 18" in warning  # the first log point below 1 (log_every=2)
    assert result.global_step == 30


def test_a_resumed_epoch_keeps_the_updates_applied_before_the_checkpoint(tmp_path):
    # steps 1-4 train, 5-8 are NaN; the checkpoint at step 6 carries the epoch's counts, so
    # the resumed epoch is not mistaken for one that applied no update
    data = _data(8 * BATCH, nan_batches=range(4, 8))
    _train(data, tmp_path, save_every_steps=6)
    saved = read_checkpoint(tmp_path / "checkpoint-step6.pt")["trainer_state"]
    assert saved["epoch_updates"] == [6, 2]
    _, result = _train(
        data, tmp_path / "resumed", resume_from=str(tmp_path / "checkpoint-step6.pt")
    )
    assert result.global_step == 8
