"""EMA of the parameters: equal to torch's AveragedModel with get_ema_multi_avg_fn, kept in the
state by the one step core (skips and accumulation included), compiled, checkpointed, and used
by the Trainer for evaluation and the final weights."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from conftest import TinyClassifier, gradscaler_step, make_batches, make_dataset
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import medfunc as mf
from medfunc.checkpoint import read_checkpoint
from medfunc.compile import compile_step
from medfunc.errors import CheckpointMismatchError, ConfigError
from medfunc.testing import assert_trees_close, assert_trees_equal
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

DECAY = 0.9


def _model(seed: int = 0, **kwargs) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier(**kwargs)


def _frozen_first_layer(model: TinyClassifier) -> TinyClassifier:
    model.fc1.bias.requires_grad_(False)
    return model


def _assert_ema_equals(state: mf.TrainState, averaged: AveragedModel) -> None:
    expected = dict(averaged.module.named_parameters())
    ema = mf.ema_params(state)
    assert list(ema) == list(expected)
    for name, value in ema.items():
        assert torch.equal(value, expected[name].detach()), name


def _trainable(state: mf.TrainState) -> OrderedDict:
    return OrderedDict((n, state.params[n]) for n in state.trainable)


def _inject_nonfinite(batch: dict) -> dict:
    bad = dict(batch)
    bad["x"] = batch["x"].clone()
    bad["x"][0, 0] = float("nan")
    return bad


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ema_equals_averaged_model_after_every_optimizer_step(optimizer):
    model = _frozen_first_layer(_model())
    reference = copy.deepcopy(model)
    trainable = [p for p in reference.parameters() if p.requires_grad]
    if optimizer == "sgd":
        tx = mf.optim.sgd(0.05, momentum=0.9)
        opt = torch.optim.SGD(trainable, lr=0.05, momentum=0.9, foreach=True)
    else:
        tx = mf.optim.adamw(1e-2, kernel="foreach", decay_mask=None)
        opt = torch.optim.AdamW(trainable, lr=1e-2, foreach=True)
    state = mf.init_state(model, tx, ema_decay=DECAY)
    averaged = AveragedModel(reference, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    for batch in make_batches(6):
        state, _ = mf.train_step(state, batch, donate=True)
        opt.zero_grad()
        reference(**batch)["loss"].backward()
        opt.step()
        averaged.update_parameters(reference)
        _assert_ema_equals(state, averaged)
    assert int(state.ema.count) == int(averaged.n_averaged) == 6
    # the average lags the weights: it is not a copy of them
    assert not torch.equal(state.ema.params["fc2.weight"], state.params["fc2.weight"])
    # the frozen parameter is not kept twice
    assert "fc1.bias" not in state.ema.params


def test_first_update_copies_the_weights_and_the_initial_average_is_the_initial_weights():
    state = mf.init_state(_model(), mf.optim.sgd(0.1), ema_decay=0.999)
    assert_trees_equal(state.ema.params, _trainable(state))
    assert int(state.ema.count) == 0
    state, _ = mf.train_step(state, make_batches(1)[0])
    assert_trees_equal(state.ema.params, _trainable(state))
    assert int(state.ema.count) == 1


def test_fp16_skipped_steps_do_not_advance_the_average():
    model = _model()
    reference = copy.deepcopy(model)
    policy = mf.get_policy("fp16", growth_interval=3, init_scale=2.0**10)
    tx = mf.optim.adamw(1e-2, kernel="foreach", decay_mask=None)
    state = mf.init_state(model, tx, precision=policy, ema_decay=DECAY)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    averaged = AveragedModel(reference, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    batches = make_batches(9)
    for i in (0, 4, 5):  # the very first update is skipped too: the copy waits for a real one
        batches[i] = _inject_nonfinite(batches[i])
    skipped = []
    for batch in batches:
        state, metrics = mf.train_step(state, batch)
        if not gradscaler_step(reference, batch, opt, scaler):
            averaged.update_parameters(reference)
        skipped.append(bool(metrics["skipped"]))
        assert int(state.ema.count) == int(averaged.n_averaged)
    assert skipped == [i in (0, 4, 5) for i in range(9)]
    assert int(state.ema.count) == 6
    expected = dict(averaged.module.named_parameters())
    for name, value in mf.ema_params(state).items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_skip_leaves_the_average_bitwise_unchanged(precision):
    state = mf.init_state(_model(), mf.optim.adamw(1e-2), precision=precision, ema_decay=DECAY)
    good, bad = make_batches(2)
    state, _ = mf.train_step(state, good)
    state, _ = mf.train_step(state, good)
    before = mf.tree_map(torch.clone, state.ema)
    state, metrics = mf.train_step(state, _inject_nonfinite(bad))
    assert bool(metrics["skipped"]) and int(state.step) == 2
    assert_trees_equal(state.ema, before)


def test_accumulation_advances_the_average_once_per_window():
    k = 3
    model = _model()
    reference = copy.deepcopy(model)
    state = mf.init_state(
        model, mf.optim.sgd(0.05, momentum=0.9), accumulate_steps=k, ema_decay=DECAY
    )
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, foreach=True)
    averaged = AveragedModel(reference, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    counts = []
    for i, batch in enumerate(make_batches(3 * k)):
        state, _ = mf.train_step(state, batch)
        (reference(**batch)["loss"] / k).backward()
        if (i + 1) % k == 0:
            opt.step()
            opt.zero_grad()
            averaged.update_parameters(reference)
        counts.append(int(state.ema.count))
        _assert_ema_equals(state, averaged)
    assert counts == [0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_inductor_compiled_step_averages_its_weights_as_averaged_model_bitwise():
    """The compiled step's weights equal the eager step's to float rounding (inductor fuses the
    forward/backward differently); its average equals AveragedModel over those same weights
    bitwise, skipped step included."""
    batches = make_batches(5)
    batches[2] = _inject_nonfinite(batches[2])
    tx = mf.optim.chain(mf.optim.clip_by_global_norm(1.0), mf.optim.adamw(1e-2, kernel="foreach"))
    eager = mf.init_state(_model(), tx, ema_decay=DECAY)
    compiled = mf.init_state(_model(), tx, ema_decay=DECAY)
    reference = _model()
    averaged = AveragedModel(reference, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    fast = compile_step(mf.train_step, mode="inductor")
    for batch in batches:
        eager, _ = mf.train_step(eager, batch)
        compiled, metrics = fast(compiled, batch)
        if not bool(metrics["skipped"]):
            reference.load_state_dict(compiled.params)
            averaged.update_parameters(reference)
        _assert_ema_equals(compiled, averaged)
    assert fast.stats.whole_step_compiled
    assert int(compiled.ema.count) == int(eager.ema.count) == 4
    assert_trees_close(compiled.ema, eager.ema, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_and_restore_paths(tmp_path):
    tx = mf.optim.adamw(1e-2)
    state = mf.init_state(_model(), tx, ema_decay=DECAY)
    for batch in make_batches(3):
        state, _ = mf.train_step(state, batch)
    path = mf.save_state(state, tmp_path / "ema.pt")
    saved = read_checkpoint(path)["medfunc_state"]["ema"]
    assert saved["count"] == 3 and saved["decay"] == DECAY

    restored = mf.restore_state(path, like=mf.init_state(_model(), tx, ema_decay=DECAY))
    assert_trees_equal(restored.ema, state.ema)
    # without like, the decay comes from the checkpoint
    built = mf.restore_state(path, model=_model(), tx=tx)
    assert built.ema_decay == DECAY
    assert_trees_equal(built.ema, state.ema)
    # a checkpoint without an EMA starts a fresh one from the restored weights
    plain = mf.save_state(mf.init_state(_model(seed=3), tx), tmp_path / "plain.pt")
    fresh = mf.restore_state(plain, like=mf.init_state(_model(), tx, ema_decay=DECAY))
    assert int(fresh.ema.count) == 0
    assert_trees_equal(fresh.ema.params, _trainable(fresh))
    # a state without an EMA ignores the saved one
    assert mf.restore_state(path, like=mf.init_state(_model(), tx)).ema == ()


def test_a_saved_average_of_another_shape_is_refused(tmp_path):
    tx = mf.optim.adamw(1e-2)
    state = mf.init_state(_model(), tx, ema_decay=DECAY)
    payload = read_checkpoint(mf.save_state(state, tmp_path / "ema.pt"))
    payload["medfunc_state"]["ema"]["params"]["fc2.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointMismatchError, match=r"\['ema'\]\['params'\]\['fc2.bias'\]"):
        mf.restore_state(payload, like=state)


def test_evaluating_and_exporting_with_the_average():
    state = mf.init_state(_model(), mf.optim.sgd(0.5), ema_decay=DECAY)
    batches = make_batches(4)
    for batch in batches:
        state, _ = mf.train_step(state, batch)
    averaged = state.replace(params=mf.ema_params(state))
    raw_loss = mf.eval_step(state, batches[0])["loss"]
    ema_loss = mf.eval_step(averaged, batches[0])["loss"]
    by_hand = _model()
    by_hand.load_state_dict({**mf.ema_params(state), **state.buffers})
    by_hand.eval()
    with torch.no_grad():
        assert torch.equal(ema_loss, by_hand(**batches[0])["loss"])
    assert not torch.equal(raw_loss, ema_loss)


def test_bad_ema_options_are_config_errors():
    with pytest.raises(ConfigError, match="ema_decay"):
        mf.init_state(_model(), mf.optim.sgd(0.1), ema_decay=1.5)
    with pytest.raises(ConfigError, match="keeps no EMA"):
        mf.ema_params(mf.init_state(_model(), mf.optim.sgd(0.1)))
    with pytest.raises(ConfigError, match="eval_with_ema=True needs"):
        TrainerConfig(eval_with_ema=True)
    with pytest.raises(ConfigError, match="TrainerConfig.ema_decay"):
        TrainerConfig(ema_decay=-0.1)
    with pytest.raises(ConfigError, match="fsdp=True or deepspeed=True"):
        TrainerConfig(ema_decay=0.99, fsdp=True)
    with pytest.raises(ConfigError, match="keeps no EMA of the sharded weights"):
        mf.distributed.fully_shard_state(_model(), mf.optim.sgd(0.1), ema_decay=0.9)
    with pytest.raises(ConfigError, match="takes no ema_decay"):
        mf.ensemble.init_state(TinyClassifier, mf.optim.sgd(0.1), members=2, ema_decay=0.9)


@pytest.mark.parametrize("eval_with_ema", [True, False])
def test_trainer_evaluates_and_saves_the_average_with_eval_with_ema(tmp_path, eval_with_ema):
    config = TrainerConfig(
        device="cpu",
        progress_bar=False,
        num_epochs=2,
        batch_size=8,
        learning_rate=0.1,
        optimizer="sgd",
        scheduler="constant",
        shuffle=False,
        num_workers=0,
        ema_decay=DECAY,
        eval_with_ema=eval_with_ema,
        save_every_epochs=1,
        load_best_model_at_end=False,
    )
    trainer = MedicalModelTrainer(_model(), config)
    result = trainer.train(make_dataset(48), make_dataset(24), output_dir=tmp_path)
    checkpoint = read_checkpoint(sorted(tmp_path.glob("checkpoint*.pt"))[-1])
    averages = checkpoint["medfunc_state"]["ema"]["params"]
    assert checkpoint["medfunc_state"]["ema"]["count"] == 12
    weights = load_file(result.weights_path)
    raw = checkpoint["model_state"]
    expected = averages if eval_with_ema else raw
    for name in averages:
        assert torch.equal(weights[name], expected[name]), name
        assert not torch.equal(averages[name], raw[name]), name
    # the reported evaluation is that of the weights it says
    model = _model()
    model.load_state_dict({**raw, **(averages if eval_with_ema else {})})
    state = mf.init_state(model, mf.optim.sgd(0.1))
    losses = [mf.eval_step(state, b)["loss"] * len(b["x"]) for b in make_eval_batches()]
    torch.testing.assert_close(
        result.eval_metrics["loss"], float(sum(losses) / 24), rtol=1e-6, atol=0
    )


def make_eval_batches() -> list[dict]:
    data = make_dataset(24)
    return [{k: v[i : i + 8] for k, v in data.tensors.items()} for i in range(0, 24, 8)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_captures_the_average_update_bitwise_eager(precision):
    policy = (
        mf.get_policy("fp16", growth_interval=3, init_scale=2.0**10)
        if precision == "fp16"
        else precision
    )
    tx = mf.optim.adamw(1e-2)
    eager = mf.init_state(_model().cuda(), tx, precision=policy, ema_decay=DECAY)
    graphed = mf.init_state(_model().cuda(), tx, precision=policy, ema_decay=DECAY)
    fast = compile_step(mf.train_step, mode="cudagraph")
    batches = [mf.data.to_device(b, "cuda") for b in make_batches(8)]
    batches[4] = _inject_nonfinite(batches[4])
    for batch in batches:
        eager, _ = mf.train_step(eager, batch)
        graphed, _ = fast(graphed, batch)
        assert_trees_equal(graphed.ema, eager.ema)
    assert fast.stats.replays == len(batches) and fast.stats.captures >= 1
    assert int(graphed.ema.count) == int(eager.ema.count) < len(batches)


def test_trainer_resume_continues_the_average_bitwise(tmp_path):
    def config(**options) -> TrainerConfig:
        return TrainerConfig(
            device="cpu",
            progress_bar=False,
            batch_size=8,
            learning_rate=0.05,
            optimizer="adamw",
            scheduler="constant",
            num_workers=0,
            ema_decay=DECAY,
            eval_with_ema=True,
            save_every_epochs=1,
            load_best_model_at_end=False,
            **options,
        )

    straight = MedicalModelTrainer(_model(), config(num_epochs=3))
    straight.train(make_dataset(48), make_dataset(24), output_dir=tmp_path / "straight")
    first = MedicalModelTrainer(_model(), config(num_epochs=1))
    first.train(make_dataset(48), make_dataset(24), output_dir=tmp_path / "first")
    resumed = MedicalModelTrainer(
        _model(), config(num_epochs=3, resume_from=str(tmp_path / "first" / "checkpoint-epoch1.pt"))
    )
    result = resumed.train(make_dataset(48), make_dataset(24), output_dir=tmp_path / "resumed")
    want = read_checkpoint(tmp_path / "straight" / "checkpoint-epoch3.pt")["medfunc_state"]["ema"]
    got = read_checkpoint(tmp_path / "resumed" / "checkpoint-epoch3.pt")["medfunc_state"]["ema"]
    assert got["count"] == want["count"] == 18
    assert_trees_equal(got["params"], want["params"])
    weights = load_file(result.weights_path)  # eval_with_ema: the run ends with the average
    for name, value in want["params"].items():
        assert torch.equal(weights[name], value), name
