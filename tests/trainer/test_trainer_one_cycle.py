"""scheduler="one_cycle" in the Trainer: bitwise equal to torch.optim driven by OneCycleLR with its
defaults (beta1 / momentum cycled 0.95 -> 0.85 -> 0.95), cycle_momentum=False, and resuming."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyClassifier

from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

EPOCHS, BATCH, N, LR = 3, 8, 40, 0.02
TOTAL = EPOCHS * N // BATCH


def _data() -> TensorDictDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 6, generator=g)
    return TensorDictDataset({"x": x, "labels": torch.randint(0, 3, (N,), generator=g)})


def _model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier()


def _config(optimizer: str, **options) -> TrainerConfig:
    base = {
        "optimizer": optimizer,
        "scheduler": "one_cycle",
        "learning_rate": LR,
        "num_epochs": EPOCHS,
        "batch_size": BATCH,
        "shuffle": False,
        "grad_clip_mode": "none",
        "device": "cpu",
        "num_workers": 0,
        "progress_bar": False,
        "save_every_epochs": None,
    }
    return TrainerConfig(**{**base, **options})


def _torch_loop(optimizer: str, cycle_momentum: bool = True) -> torch.nn.Module:
    """The original trainer's setup: the torch optimizer, then OneCycleLR(max_lr, total)."""
    model = _model()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, foreach=True)
    else:
        cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        opt = cls(model.parameters(), lr=LR, weight_decay=0.0, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, total_steps=TOTAL, cycle_momentum=cycle_momentum
    )
    data = _data()
    for _ in range(EPOCHS):
        for i in range(0, N, BATCH):
            opt.zero_grad()
            model(data.tensors["x"][i : i + BATCH], data.tensors["labels"][i : i + BATCH])[
                "loss"
            ].backward()
            opt.step()
            sched.step()
    return model


def _assert_same(trainer: MedicalModelTrainer, reference: torch.nn.Module) -> None:
    for name, param in reference.named_parameters():
        assert torch.equal(trainer.state.params[name], param), name


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_one_cycle_equals_one_cycle_lr_with_momentum_cycling_bitwise(optimizer, tmp_path):
    trainer = MedicalModelTrainer(_model(), _config(optimizer))
    result = trainer.train(_data(), output_dir=tmp_path)
    assert result.global_step == TOTAL
    _assert_same(trainer, _torch_loop(optimizer))


def test_cycle_momentum_false_keeps_beta1_fixed_as_one_cycle_lr_does(tmp_path):
    trainer = MedicalModelTrainer(_model(), _config("adamw", cycle_momentum=False))
    trainer.train(_data(), output_dir=tmp_path)
    _assert_same(trainer, _torch_loop("adamw", cycle_momentum=False))
    cycled = _torch_loop("adamw")
    assert any(not torch.equal(trainer.state.params[n], p) for n, p in cycled.named_parameters())


def test_the_optimizer_view_shows_the_cycled_beta1(tmp_path):
    trainer = MedicalModelTrainer(_model(), _config("adamw", num_epochs=1))
    trainer.prepare_for_training(total_steps=TOTAL)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.95, 0.999)
    reference = torch.optim.AdamW(copy.deepcopy(_model()).parameters(), lr=LR)
    torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=LR, total_steps=TOTAL)
    assert reference.param_groups[0]["betas"] == (0.95, 0.999)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resuming_a_one_cycle_run_is_bitwise_the_uninterrupted_run(optimizer, tmp_path):
    full = MedicalModelTrainer(_model(), _config(optimizer, save_every_epochs=1))
    full.train(_data(), output_dir=tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-epoch1.pt"
    resumed = MedicalModelTrainer(
        _model(), _config(optimizer, resume_from=str(checkpoint), save_every_epochs=None)
    )
    resumed.train(_data(), output_dir=tmp_path / "resumed")
    for name, value in full.state.params.items():
        assert torch.equal(resumed.state.params[name], value), name
    for a, b in zip(
        torch.utils._pytree.tree_leaves(full.state.opt_state),
        torch.utils._pytree.tree_leaves(resumed.state.opt_state),
    ):
        assert torch.equal(a, b)
