"""Reading the original trainer's files: its pickled config as data (never importing the
class), refusals of objects elsewhere and of ambiguous positions, the loss scale, DDP key
prefixes, `medfunc inspect`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, save_like_the_original

import medfunc as mf
from medfunc.checkpoint import inspect_checkpoint
from medfunc.errors import CheckpointMismatchError, UnsafeCheckpointError
from medfunc.legacy import read_legacy_checkpoint, to_resume_payload
from medfunc.precision import scaler_state_dict


def _trained(scaler: bool = False) -> dict:
    torch.manual_seed(0)
    model = TinyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for _ in range(3):
        model(torch.randn(4, 6), labels=torch.tensor([0, 1, 2, 0]))["loss"].backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    payload = {
        "model_state": model.state_dict(),
        "optimizer_state": opt.state_dict(),
        "scheduler_state": sched.state_dict(),
        "trainer_state": {"epoch": 1, "global_step": 3},
        "version": 2,
    }
    if scaler:
        payload["scaler_state"] = {
            "scale": 1024.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 7,
        }
    return payload


def test_the_config_is_read_as_data_without_importing_its_class(tmp_path):
    path = tmp_path / "checkpoint-epoch1.pt"
    save_like_the_original(tmp_path, path, _trained(), learning_rate=3e-4)
    # plain torch refuses the file: its pickle names the original's class
    with pytest.raises(Exception, match="medvllm.training.trainer.TrainerConfig"):
        torch.load(path, weights_only=True)
    raw = read_legacy_checkpoint(path)
    assert raw["config"] == {
        "learning_rate": 3e-4,
        "betas": [0.9, 0.999],
        "amp_dtype": "float16",
        "deepspeed_config": None,
        "activation_recompute_patterns": ["attention", "conv3d"],
    }
    assert raw["version"] == 2 and raw["trainer_state"] == {"epoch": 1, "global_step": 3}
    assert not any(name.startswith("medvllm") for name in sys.modules)


def test_a_pickled_object_outside_config_is_refused(tmp_path):
    path = tmp_path / "checkpoint-epoch1.pt"
    save_like_the_original(tmp_path, path, {**_trained(), "trainer_state": _ConfigObject()})
    with pytest.raises(UnsafeCheckpointError, match=r"trainer_state: medvllm\.training"):
        read_legacy_checkpoint(path)


class _ConfigObject:
    """Pickles as an instance of the original's TrainerConfig (while its module is loaded)."""

    def __reduce__(self):
        return (sys.modules["medvllm.training.trainer"].TrainerConfig, ())


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint-epoch1.pt"
    torch.save({**_trained(), "config": _RunsACommand(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="nothing from it was executed"):
        read_legacy_checkpoint(path)
    assert not marker.exists()


def _state(precision: str = "fp32"):
    return mf.init_state(TinyClassifier(), mf.optim.adamw(1e-2), precision=precision, seed=9)


def test_the_loss_scale_is_carried_into_fp16_and_dropped_otherwise(tmp_path):
    path = tmp_path / "checkpoint-epoch1.pt"
    save_like_the_original(tmp_path, path, _trained(scaler=True))
    raw = read_legacy_checkpoint(path)
    payload, dropped = to_resume_payload(raw, _state("fp16"), str(path))
    restored = mf.restore_state(payload, like=_state("fp16"))
    scaler = scaler_state_dict(restored.policy, restored.loss_scale)
    assert (scaler["scale"], scaler["_growth_tracker"]) == (1024.0, 7)
    assert not any("loss scale" in d for d in dropped)
    payload, dropped = to_resume_payload(raw, _state("fp32"), str(path))
    assert payload["scaler_state"] == {}
    assert any("fp16 loss scale 1024.0" in d for d in dropped)
    restored = mf.restore_state(payload, like=_state("fp32"))
    assert int(restored.step) == 3
    assert restored.rng.tolist() == _state().rng.tolist()  # the run's own seed


def test_ambiguous_positions_are_refused(tmp_path):
    path = tmp_path / "checkpoint-epoch2.pt"  # the name says 2, trainer_state says 1
    save_like_the_original(tmp_path, path, _trained())
    raw = read_legacy_checkpoint(path)
    with pytest.raises(CheckpointMismatchError, match="file name says epoch 2"):
        to_resume_payload(raw, _state(), str(path))
    raw["scheduler_state"] = {**raw["scheduler_state"], "last_epoch": 5}
    with pytest.raises(CheckpointMismatchError, match="LR schedule's position is ambiguous"):
        to_resume_payload(raw, _state(), str(tmp_path / "checkpoint-step3.pt"))


def test_a_ddp_wrapped_models_keys_lose_their_prefix(tmp_path):
    payload = _trained()
    payload["model_state"] = {f"module.{k}": v for k, v in payload["model_state"].items()}
    path = tmp_path / "checkpoint-epoch1.pt"
    save_like_the_original(tmp_path, path, payload)
    converted, _ = to_resume_payload(read_legacy_checkpoint(path), _state(), str(path))
    restored = mf.restore_state(converted, like=_state())
    assert torch.equal(restored.params["fc1.weight"], payload["model_state"]["module.fc1.weight"])


def test_inspect_describes_the_originals_files(tmp_path):
    path = tmp_path / "checkpoint-epoch1.pt"
    save_like_the_original(tmp_path, path, _trained(scaler=True), learning_rate=3e-4)
    text = inspect_checkpoint(path)
    assert text.splitlines()[0] == (
        f"checkpoint of the original trainer (medvllm.training.trainer): {path}"
    )
    assert "epoch: 1, global step: 3" in text and "version: 2" in text
    assert "loss scale: 1024.0" in text and "learning_rate=0.0003" in text
    weights = tmp_path / "pytorch_model.bin"
    torch.save(TinyClassifier().state_dict(), weights)
    cli = subprocess.run(
        [sys.executable, "-m", "medfunc.cli", "inspect", str(weights)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cli.stdout.startswith("weights file of the original trainer")
    assert "model_state: 4 tensors, 163 values" in cli.stdout
