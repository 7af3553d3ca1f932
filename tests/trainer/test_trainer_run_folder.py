"""Run folders never mix two runs: unique default folders, a refused non-empty output_dir,
overwrite_output_dir that removes only the trainer's own files, resuming in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, make_dataset

from medfunc.cli import main
from medfunc.errors import ConfigError
from medfunc.run_folder import default_run_dir, is_run_file
from medfunc.trainer import MedicalModelTrainer, TrainerConfig


def _trainer(**options) -> MedicalModelTrainer:
    torch.manual_seed(0)
    base = dict(device="cpu", progress_bar=False, batch_size=8, learning_rate=1e-2)
    return MedicalModelTrainer(TinyClassifier(), TrainerConfig(**{**base, **options}))


def test_a_folder_holding_another_run_is_refused(tmp_path):
    _trainer(num_epochs=3).train(make_dataset(32), output_dir=tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError) as caught:
        _trainer(num_epochs=1).train(make_dataset(32), output_dir=tmp_path)
    message = str(caught.value)
    assert f"output_dir {tmp_path} already holds another run's files" in message
    assert "overwrite_output_dir=True" in message and "resume_from" in message
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_overwrite_removes_the_previous_run_first(tmp_path):
    _trainer(num_epochs=3).train(make_dataset(32), output_dir=tmp_path)
    assert (tmp_path / "checkpoint-epoch3.pt").is_file()
    result = _trainer(num_epochs=1, overwrite_output_dir=True).train(
        make_dataset(32), output_dir=tmp_path
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-epoch1.pt",
        "manifest.json",
        "metrics.jsonl",
        "model.safetensors",
        "model.v1.safetensors",
    ]
    steps = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 1 and result.global_step == 4


def test_overwrite_refuses_a_folder_with_files_the_trainer_does_not_write(tmp_path):
    _trainer(num_epochs=1).train(make_dataset(32), output_dir=tmp_path)
    (tmp_path / "notes.txt").write_text("patient cohort definitions")
    with pytest.raises(ConfigError, match=r"holds files this trainer does not write \(notes.txt\)"):
        _trainer(overwrite_output_dir=True).train(make_dataset(32), output_dir=tmp_path)
    assert (tmp_path / "notes.txt").is_file() and (tmp_path / "checkpoint-epoch1.pt").is_file()
    assert is_run_file(tmp_path / ".model.safetensors.tmp-12-0a1b2c3d")
    assert not is_run_file(tmp_path / ".notes.txt.tmp-12-0a1b2c3d")


def test_resuming_continues_in_the_checkpoint_folder(tmp_path, monkeypatch):
    _trainer(num_epochs=1).train(make_dataset(32), output_dir=tmp_path / "run")
    resume = str(tmp_path / "run" / "checkpoint-epoch1.pt")
    result = _trainer(num_epochs=2, resume_from=resume).train(make_dataset(32))
    assert result.output_dir == tmp_path / "run" and result.global_step == 8
    assert (tmp_path / "run" / "checkpoint-epoch2.pt").is_file()
    with pytest.raises(ConfigError, match="would delete .* the run being resumed from"):
        _trainer(num_epochs=3, resume_from=resume, overwrite_output_dir=True).train(
            make_dataset(32)
        )
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds another run's files"):
        _trainer(num_epochs=3, resume_from=resume).train(make_dataset(32), output_dir=other)


def test_the_default_run_folder_is_new_for_every_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = {default_run_dir("recipe") for _ in range(50)}
    assert len(names) == 50
    first = _trainer().train(make_dataset(32)).output_dir
    second = _trainer().train(make_dataset(32)).output_dir
    assert first != second and first.parent == second.parent == Path("runs")
    assert (first / "model.safetensors").is_file() and (second / "model.safetensors").is_file()


def test_cli_refuses_a_used_output_dir_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--set", "num_epochs=1", "--set", "enable_tensorboard=false"]
    assert main([*args, "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert main([*args, "--output-dir", str(out)]) == 2
    assert "already holds another run's files" in capsys.readouterr().err
    assert main([*args, "--output-dir", str(out), "--overwrite"]) == 0
    assert (out / "checkpoint-epoch1.pt").is_file()
