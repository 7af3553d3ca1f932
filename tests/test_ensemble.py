"""mf.ensemble: stacked members trained in one vectorised step, checked against training each
member alone with mf.train_step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import medfunc as mf
from medfunc.errors import ConfigError
from tests.conftest import TinyClassifier

K = 4
# fp32 tolerance: a vmapped forward/backward uses batched matmuls, so its gradients differ from
# the single-member kernels in the last bits; measured max |difference| over 6 steps: 1.2e-7.
ATOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]


def _batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(8, 6, generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}
        for _ in range(n)
    ]


def _per_member(batch: dict) -> dict:
    """The batch for every member, member 1's features made non-finite."""
    bad = batch["x"].clone()
    bad[0, 0] = float("nan")
    xs = torch.stack([bad if k == 1 else batch["x"] for k in range(K)])
    return {"x": xs, "labels": torch.stack([batch["labels"]] * K)}


def _member_batch(batch: dict, k: int) -> dict:
    return {name: value[k] for name, value in batch.items()}


def _txs() -> dict:
    schedule = mf.schedules.linear_warmup(1e-2, 3, 20)
    return {
        "adamw": mf.optim.adamw(1e-2),
        "sgd-momentum": mf.optim.sgd(0.1, momentum=0.9, weight_decay=1e-3),
        "adamw-clip-schedule": mf.optim.chain(
            mf.optim.clip_by_global_norm(0.05), mf.optim.adamw(schedule)
        ),
        "sgd-clip": mf.optim.chain(
            mf.optim.clip_by_global_norm(0.05), mf.optim.sgd(0.05, momentum=0.9)
        ),
        "adamw-callable-mask": mf.optim.adamw(
            1e-2, decay_mask=lambda name: not name.startswith("fc2")
        ),
    }


def _assert_members_close(ensemble: mf.TrainState, solos: list[mf.TrainState]) -> None:
    for k, solo in enumerate(solos):
        for name, value in solo.params.items():
            torch.testing.assert_close(ensemble.params[name][k], value, atol=ATOL, rtol=0)
        for name, value in solo.buffers.items():
            torch.testing.assert_close(ensemble.buffers[name][k], value, atol=ATOL, rtol=0)
        assert int(ensemble.opt_state.count[k]) == int(solo.step)


@pytest.mark.parametrize("name", list(_txs()))
def test_each_member_equals_training_it_alone(name: str) -> None:
    tx = _txs()[name]
    ens = mf.ensemble.init_state(TinyClassifier, tx, members=K)
    solos = [mf.init_state(TinyClassifier, tx, seed=s) for s in range(K)]
    for step, batch in enumerate(_batches(6)):
        if step == 2:
            member_batches = _per_member(batch)
            ens, metrics = mf.ensemble.train_step(ens, member_batches, per_member=True)
            solos = [
                mf.train_step(s, _member_batch(member_batches, k))[0] for k, s in enumerate(solos)
            ]
            assert metrics["skipped"].tolist() == [k == 1 for k in range(K)]
        else:
            ens, metrics = mf.ensemble.train_step(ens, batch)
            solos = [mf.train_step(s, batch)[0] for s in solos]
    _assert_members_close(ens, solos)
    assert int(ens.step) == 6
    assert ens.opt_state.count.tolist() == [6, 5, 6, 6]
    assert {key: tuple(v.shape) for key, v in metrics.items()} == {
        key: (K,) for key in ("loss", "grad_norm", "lr", "skipped", "applied")
    }


def test_lr_and_norm_metrics_are_per_member() -> None:
    tx = _txs()["adamw-clip-schedule"]
    ens = mf.ensemble.init_state(TinyClassifier, tx, members=K)
    solos = [mf.init_state(TinyClassifier, tx, seed=s) for s in range(K)]
    batches = _batches(3)
    ens, _ = mf.ensemble.train_step(ens, _per_member(batches[0]), per_member=True)
    for batch in batches[1:]:
        ens, metrics = mf.ensemble.train_step(ens, batch)
    for k, solo in enumerate(solos):
        solo, _ = mf.train_step(solo, _member_batch(_per_member(batches[0]), k))
        for batch in batches[1:]:
            solo, solo_metrics = mf.train_step(solo, batch)
        assert float(metrics["lr"][k]) == float(solo_metrics["lr"])
        torch.testing.assert_close(metrics["grad_norm"][k], solo_metrics["grad_norm"])
        torch.testing.assert_close(metrics["loss"][k], solo_metrics["loss"])
    assert float(metrics["lr"][1]) != float(metrics["lr"][0])  # member 1 is one step behind


def test_batchnorm_buffers_follow_each_member() -> None:
    def model() -> TinyClassifier:
        return TinyClassifier(batchnorm=True)

    # SGD: fc1.bias feeds a BatchNorm, so its true gradient is 0 and what the backward gives is
    # rounding noise, which Adam would normalise into full-size (and different) steps.
    tx = mf.optim.sgd(0.1, momentum=0.9)
    ens = mf.ensemble.init_state(model, tx, members=K)
    solos = [mf.init_state(model, tx, seed=s) for s in range(K)]
    for batch in _batches(3):
        ens, _ = mf.ensemble.train_step(ens, batch)
        solos = [mf.train_step(s, batch)[0] for s in solos]
    _assert_members_close(ens, solos)


def test_members_differ_and_dropout_is_deterministic() -> None:
    def model() -> TinyClassifier:
        return TinyClassifier(dropout=0.5)

    ens = mf.ensemble.init_state(model, mf.optim.sgd(0.1), members=K, seeds=[3, 5, 7, 9])
    weights = ens.params["fc1.weight"]
    assert not torch.equal(weights[0], weights[1])
    torch.testing.assert_close(
        weights[1], mf.init_state(model, mf.optim.sgd(0.1), seed=5).params["fc1.weight"]
    )
    batch = _batches(1)[0]
    first, m1 = mf.ensemble.train_step(ens, batch)
    second, m2 = mf.ensemble.train_step(ens, batch)
    mf.testing.assert_trees_equal(first.params, second.params)
    assert torch.equal(m1["loss"], m2["loss"])
    # the same weights in two members still draw different dropout masks
    same = mf.ensemble.init_state(
        lambda: TinyClassifier(dropout=0.5), mf.optim.sgd(0.1), members=2, seeds=[1, 1]
    )
    _, metrics = mf.ensemble.train_step(same, batch)
    assert metrics["loss"][0] != metrics["loss"][1]


def test_step_is_pure_and_donation_consumes() -> None:
    ens = mf.ensemble.init_state(TinyClassifier, mf.optim.adamw(1e-2), members=K)
    before = mf.tree_map(torch.clone, (ens.params, ens.buffers, ens.opt_state))
    batch = _batches(1)[0]
    pure, _ = mf.ensemble.train_step(ens, batch)
    mf.testing.assert_trees_equal((ens.params, ens.buffers, ens.opt_state), before)
    donated, _ = mf.ensemble.train_step(ens, batch, donate=True)
    mf.testing.assert_trees_equal(pure.params, donated.params)
    with pytest.raises(mf.ConsumedStateError):
        mf.ensemble.train_step(ens, batch)


def test_batch_rule() -> None:
    ens = mf.ensemble.init_state(TinyClassifier, mf.optim.sgd(0.1), members=K)
    ambiguous = {"x": torch.randn(K, 6), "labels": torch.randint(0, 3, (K,))}
    with pytest.raises(ConfigError, match="ambiguous batch"):
        mf.ensemble.train_step(ens, ambiguous)
    shared, metrics = mf.ensemble.train_step(ens, ambiguous, per_member=False)
    assert metrics["loss"].shape == (K,)
    with pytest.raises(ConfigError, match="leading member axis"):
        mf.ensemble.train_step(ens, _batches(1)[0], per_member=True)


def test_unstack_continues_exactly() -> None:
    tx = mf.optim.chain(mf.optim.clip_by_global_norm(0.05), mf.optim.sgd(0.1, momentum=0.9))
    ens = mf.ensemble.init_state(TinyClassifier, tx, members=K)
    batches = _batches(4)
    ens, _ = mf.ensemble.train_step(ens, _per_member(batches[0]), per_member=True)
    ens, _ = mf.ensemble.train_step(ens, batches[1])
    members = mf.ensemble.unstack(ens)
    assert [int(m.step) for m in members] == [2, 1, 2, 2]
    for batch in batches[2:]:
        ens, _ = mf.ensemble.train_step(ens, batch)
        members = [mf.train_step(m, batch)[0] for m in members]
    _assert_members_close(ens, members)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    def model() -> TinyClassifier:
        return TinyClassifier(batchnorm=True)

    tx = mf.optim.chain(mf.optim.clip_by_global_norm(1.0), mf.optim.adamw(1e-2))
    ens = mf.ensemble.init_state(model, tx, members=K)
    batches = _batches(2)
    ens, _ = mf.ensemble.train_step(ens, _per_member(batches[0]), per_member=True)
    mf.save_state(ens, tmp_path / "ensemble.pt")
    like = mf.ensemble.init_state(model, tx, members=K)
    restored = mf.restore_state(tmp_path / "ensemble.pt", like=like)
    mf.testing.assert_trees_equal(restored, ens)
    a, _ = mf.ensemble.train_step(ens, batches[1])
    b, _ = mf.ensemble.train_step(restored, batches[1])
    mf.testing.assert_trees_equal(a, b)
    wrong = mf.ensemble.init_state(model, tx, members=K - 1)
    with pytest.raises(mf.CheckpointError):
        mf.restore_state(tmp_path / "ensemble.pt", like=wrong)


def test_eval_step_mean_and_spread() -> None:
    ens = mf.ensemble.init_state(TinyClassifier, mf.optim.sgd(0.1), members=K)
    batch = _batches(1)[0]
    result = mf.ensemble.eval_step(ens, batch)
    logits = result["outputs"]["logits"]
    assert logits.shape == (K, 8, 3) and result["loss"].shape == (K,)
    for k, member in enumerate(mf.ensemble.unstack(ens)):
        alone = mf.eval_step(member, batch)
        torch.testing.assert_close(logits[k], alone["outputs"]["logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(result["loss"][k], alone["loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(result["mean"], logits.mean(0))
    torch.testing.assert_close(result["spread"], logits.std(0, correction=0))


def test_refusals() -> None:
    ens = mf.ensemble.init_state(TinyClassifier, mf.optim.sgd(0.1), members=2)
    with pytest.raises(ConfigError, match="mf.ensemble.train_step"):
        mf.train_step(ens, _batches(1)[0])
    with pytest.raises(ConfigError, match="bf16"):
        mf.ensemble.init_state(TinyClassifier, mf.optim.sgd(0.1), members=2, precision="fp16")
    with pytest.raises(ConfigError, match="from_torch"):
        mf.ensemble.init_state(
            TinyClassifier, mf.optim.from_torch(torch.optim.SGD, lr=0.1), members=2
        )
    with pytest.raises(ConfigError, match="members"):
        mf.ensemble.init_state(TinyClassifier, mf.optim.sgd(0.1), members=0)
    with pytest.raises(ConfigError, match="seeds"):
        mf.ensemble.init_state(TinyClassifier, mf.optim.sgd(0.1), members=2, seeds=[1])
    with pytest.raises(ConfigError, match="ordinary TrainState"):
        mf.ensemble.unstack(mf.init_state(TinyClassifier(), mf.optim.sgd(0.1)))


def test_example_runs() -> None:
    pytest.importorskip("sklearn")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ensemble_uncertainty.py"), "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "ensemble AUROC" in done.stdout
