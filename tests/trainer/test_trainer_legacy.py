"""resume_from accepts the original trainer's checkpoint-epoch{N}.pt and pytorch_model.bin:
resuming equals continuing the original's torch.optim loop from that point."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import TinyClassifier, make_dataset, save_like_the_original
from safetensors.torch import load_file

import medfunc as mf
from medfunc.checkpoint import read_checkpoint
from medfunc.errors import ConfigError
from medfunc.legacy import read_resume_payload
from medfunc.optim.optimizers import AdamState
from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

N, BATCH, LR = 32, 8, 1e-2  # 4 optimizer steps per epoch


def _config(**options) -> TrainerConfig:
    base = dict(
        device="cpu",
        progress_bar=False,
        batch_size=BATCH,
        num_workers=0,
        shuffle=False,
        learning_rate=LR,
        scheduler="step",
        step_size=3,
        gamma=0.5,
        max_grad_norm=1.0,
    )
    return TrainerConfig(**{**base, **options})


class _Original:
    """The original trainer's loop: AdamW, clip_grad_norm_, StepLR stepped per optimizer step,
    batches in order."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = TinyClassifier()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.5)
        self.global_step = 0

    def epoch(self, data: TensorDictDataset) -> None:
        x, y = data.tensors["x"], data.tensors["labels"]
        for i in range(0, N, BATCH):
            loss = self.model(x[i : i + BATCH], labels=y[i : i + BATCH])["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.global_step += 1

    def save(self, folder, epoch: int):
        path = folder / f"checkpoint-epoch{epoch}.pt"
        payload = {
            "model_state": self.model.state_dict(),
            "optimizer_state": self.opt.state_dict(),
            "scheduler_state": self.sched.state_dict(),
            "trainer_state": {"epoch": epoch, "global_step": self.global_step},
            "version": "0.3.0",
        }
        save_like_the_original(folder, path, payload, learning_rate=LR)
        return path


def test_resuming_the_originals_checkpoint_equals_continuing_its_loop(tmp_path):
    data, original = make_dataset(N), _Original()
    for _ in range(2):
        original.epoch(data)
    checkpoint = original.save(tmp_path, epoch=2)
    assert "medvllm.training.trainer" not in sys.modules

    torch.manual_seed(1)  # different initial weights: all of them must come from the file
    trainer = MedicalModelTrainer(
        TinyClassifier(), _config(num_epochs=4, resume_from=str(checkpoint))
    )
    with pytest.warns(UserWarning, match="written by the original trainer") as caught:
        result = trainer.train(data, output_dir=tmp_path / "resumed")
    messages = [str(w.message) for w in caught if "original trainer" in str(w.message)]
    assert len(messages) == 1  # said once
    assert "the RNG state" in messages[0] and "the original's config" in messages[0]
    assert "medvllm.training.trainer" not in sys.modules  # the class was never imported

    for _ in range(2):  # the original, continued imperatively from the same point
        original.epoch(data)
    assert result.global_step == original.global_step == 16
    assert result.epochs_completed == 4
    # the LR schedule continued from step 8: StepLR's LR after 16 steps (5 halvings)
    last = read_checkpoint(tmp_path / "resumed" / "checkpoint-epoch4.pt")["scheduler_state"]
    assert last["_last_lr"][0] == pytest.approx(original.sched.get_last_lr()[0], rel=1e-12)
    assert original.sched.get_last_lr()[0] == pytest.approx(LR / 32)
    for name, want in original.model.state_dict().items():
        got = trainer.state.params.get(name, trainer.state.buffers.get(name))
        assert torch.equal(got, want), name
    weights = load_file(tmp_path / "resumed" / "model.safetensors")
    torch.testing.assert_close(weights["fc1.weight"], original.model.fc1.weight.detach())
    names = sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*.pt"))
    assert names == ["checkpoint-epoch3.pt", "checkpoint-epoch4.pt"]


def test_optimizer_moments_and_step_counts_are_carried_over(tmp_path):
    data, original = make_dataset(N), _Original()
    original.epoch(data)
    checkpoint = original.save(tmp_path, epoch=1)
    # num_epochs=1: the run is complete at the checkpoint, so the state is the restored one
    trainer = MedicalModelTrainer(
        TinyClassifier(), _config(num_epochs=1, resume_from=str(checkpoint))
    )
    with pytest.warns(UserWarning, match="original trainer"):
        result = trainer.train(data, output_dir=tmp_path / "resumed")
    assert (result.global_step, result.epochs_completed) == (4, 1)
    state = trainer.state
    assert int(state.step) == 4
    torch_state = original.opt.state_dict()["state"]
    adam = _adam_state(state.opt_state)
    for index, (name, param) in enumerate(original.model.named_parameters()):
        assert torch.equal(adam.exp_avg[name], torch_state[index]["exp_avg"]), name
        assert torch.equal(adam.exp_avg_sq[name], torch_state[index]["exp_avg_sq"]), name
        assert float(adam.step[name]) == float(torch_state[index]["step"]) == 4.0
        assert torch.equal(state.params[name], param.detach()), name


def test_the_originals_newest_weights_version_starts_a_fresh_run(tmp_path):
    original = _Original()
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save(original.model.state_dict(), folder / "pytorch_model.v1.bin")
    original.epoch(make_dataset(N))
    torch.save(original.model.state_dict(), folder / "pytorch_model.v2.bin")
    (folder / "manifest.json").write_text(
        '{"versions": [{"version": 1, "file": "pytorch_model.v1.bin"},'
        ' {"version": 2, "file": "pytorch_model.v2.bin"}]}'
    )
    torch.manual_seed(5)
    trainer = MedicalModelTrainer(TinyClassifier(), _config(num_epochs=1, resume_from=str(folder)))
    with pytest.warns(UserWarning, match="everything but the weights"):
        result = trainer.train(make_dataset(N), output_dir=tmp_path / "run")
    # the reference: the original's loop with a fresh optimizer from version 2's weights
    reference = _Original()
    reference.model.load_state_dict(torch.load(folder / "pytorch_model.v2.bin"))
    reference.opt = torch.optim.AdamW(reference.model.parameters(), lr=LR, weight_decay=0.0)
    reference.sched = torch.optim.lr_scheduler.StepLR(reference.opt, step_size=3, gamma=0.5)
    reference.epoch(make_dataset(N))
    assert result.global_step == 4
    for name, want in reference.model.state_dict().items():
        got = trainer.state.params.get(name, trainer.state.buffers.get(name))
        assert torch.equal(got, want), name


def test_resuming_in_the_originals_folder_keeps_its_files_and_version_list(tmp_path):
    data, original = make_dataset(N), _Original()
    original.epoch(data)
    checkpoint = original.save(tmp_path, epoch=1)
    torch.save(original.model.state_dict(), tmp_path / "pytorch_model.v1.bin")
    (tmp_path / "manifest.json").write_text(
        '{"versions": [{"version": 1, "file": "pytorch_model.v1.bin"}]}'
    )
    trainer = MedicalModelTrainer(
        TinyClassifier(), _config(num_epochs=2, resume_from=str(checkpoint))
    )
    with pytest.warns(UserWarning, match="original trainer"):
        result = trainer.train(data)  # the run folder defaults to the checkpoint's
    assert result.output_dir == tmp_path and result.global_step == 8
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [v["file"] for v in manifest["versions"]] == [
        "pytorch_model.v1.bin",
        "model.v2.safetensors",
    ]
    assert checkpoint.is_file() and (tmp_path / "pytorch_model.v1.bin").is_file()
    assert (tmp_path / "checkpoint-epoch2.pt").is_file()


def test_the_originals_checkpoint_is_refused_with_fsdp(tmp_path):
    original = _Original()
    checkpoint = original.save(tmp_path, epoch=0)
    like = mf.init_state(TinyClassifier(), mf.optim.adamw(LR))
    with pytest.raises(ConfigError, match="without fsdp/deepspeed"):
        read_resume_payload(checkpoint, like, sharded=True)


def _adam_state(opt_state) -> AdamState:
    stack = [opt_state]
    while stack:
        item = stack.pop()
        if isinstance(item, AdamState):
            return item
        if isinstance(item, tuple):
            stack.extend(item)
    raise AssertionError(f"no AdamState in {opt_state!r}")
