"""Checkpoints: payload layout, plain-PyTorch interop, untrusted and damaged files, mismatches,
atomic writes under SIGKILL, inspect."""

from __future__ import annotations

import os
import pickle
import random
import struct
import subprocess
import sys
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, make_batches
from torch import nn

import medfunc as mf
from medfunc.checkpoint import (
    FORMAT_VERSION,
    inspect_checkpoint,
    read_checkpoint,
    restore_state,
    save_state,
)
from medfunc.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    ConfigError,
    UnsafeCheckpointError,
)
from medfunc.testing import assert_trees_equal

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
FP16 = mf.get_policy("fp16", init_scale=2.0**19, growth_interval=2)


def _model(**kwargs) -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(**kwargs)


def _train(state: mf.TrainState, batches: list) -> mf.TrainState:
    for batch in batches:
        state, _ = mf.train_step(state, batch)
    return state


def _adamw(lr=1e-2) -> mf.optim.GradientTransformation:
    return mf.optim.adamw(lr, weight_decay=0.05, kernel="foreach")


def _torch_adamw(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """Plain PyTorch AdamW with medfunc's default grouping: decay first, biases without decay."""
    decay = [p for n, p in model.named_parameters() if "bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n]
    return torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        weight_decay=0.05,
        foreach=True,
    )


def _torch_step(model, opt, batch, scaler=None, sched=None) -> None:
    model.train()
    opt.zero_grad()
    if scaler is None:
        model(**batch)["loss"].backward()
        opt.step()
    else:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch)["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if sched is not None:
        sched.step()


def _assert_matches_torch(state: mf.TrainState, model: nn.Module, opt) -> None:
    """medfunc params and AdamW moments bitwise equal to the torch model/optimizer's."""
    params = dict(model.named_parameters())
    for name, value in state.params.items():
        assert torch.equal(value, params[name].detach()), name
    adam = state.opt_state
    for name, param in params.items():
        torch_state = opt.state[param]
        assert torch.equal(adam.exp_avg[name], torch_state["exp_avg"]), name
        assert torch.equal(adam.exp_avg_sq[name], torch_state["exp_avg_sq"]), name
        assert torch.equal(adam.step[name], torch_state["step"]), name


# ------------------------------------------------------------------------------------------------
# payload


def test_payload_is_the_seed_layout_with_the_states_values(tmp_path):
    batches = make_batches(4)
    state = _train(mf.init_state(_model(batchnorm=True), _adamw(), precision=FP16), batches)
    # a pure step leaves the module at its initial values: the file must hold the state's
    module_values = {k: v.clone() for k, v in state.module.state_dict().items()}
    path = save_state(state, tmp_path / "run" / "ckpt.pt", extra={"epoch": 2, "position": 4})

    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format_version"] == FORMAT_VERSION == 1
    assert list(ckpt["model_state"]) == list(state.module.state_dict())
    for key, value in ckpt["model_state"].items():
        expected = state.params[key] if key in state.params else state.buffers[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(ckpt["model_state"]["fc1.weight"], module_values["fc1.weight"])
    assert ckpt["trainer_state"]["global_step"] == int(state.step) > 0
    assert ckpt["trainer_state"]["epoch"] == 2 and ckpt["trainer_state"]["position"] == 4
    assert ckpt["trainer_state"]["rng"] == state.rng.tolist()
    assert ckpt["scaler_state"] == {
        "scale": float(state.loss_scale.scale),
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2,
        "_growth_tracker": int(state.loss_scale.growth_tracker),
    }
    sched = ckpt["scheduler_state"]
    assert sched["last_epoch"] == int(state.step) and sched["_last_lr"] == [1e-2, 1e-2]
    assert [g["lr"] for g in ckpt["optimizer_state"]["param_groups"]] == [1e-2, 1e-2]
    assert not list(tmp_path.joinpath("run").glob(".*tmp*"))


def test_fp32_checkpoint_has_an_empty_scaler_state_and_optional_parts_can_be_left_out(tmp_path):
    state = _train(mf.init_state(_model(), _adamw()), make_batches(2))
    full = torch.load(save_state(state, tmp_path / "a.pt"), weights_only=True)
    assert full["scaler_state"] == {}
    slim = torch.load(
        save_state(state, tmp_path / "b.pt", save_optimizer=False, save_scheduler=False),
        weights_only=True,
    )
    assert "optimizer_state" not in slim and "scheduler_state" not in slim
    assert "opt_state" not in slim["medfunc_state"]

    like = mf.init_state(_model(), _adamw())
    restored = restore_state(tmp_path / "b.pt", like)
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, like.opt_state)  # documented: like's (fresh) state
    assert int(restored.step) == int(state.step)


def test_extra_values_round_trip_and_bad_extra_is_refused(tmp_path):
    state = mf.init_state(_model(), _adamw())
    extra = {"epoch": 3, "order": torch.arange(5), "done": [1, 2], "name": "fold-1"}
    payload = read_checkpoint(save_state(state, tmp_path / "c.pt", extra=extra))
    assert payload["trainer_state"]["epoch"] == 3
    assert torch.equal(payload["trainer_state"]["order"], torch.arange(5))
    assert payload["trainer_state"]["done"] == [1, 2]

    with pytest.raises(ConfigError, match=r"extra\['global_step'\] would overwrite"):
        save_state(state, tmp_path / "d.pt", extra={"global_step": 1})
    with pytest.raises(ConfigError, match=r"\['trainer_state'\]\['sampler'\] is a Random"):
        save_state(state, tmp_path / "d.pt", extra={"sampler": random.Random(0)})
    assert not (tmp_path / "d.pt").exists()


class _Counter(nn.Module):
    """A model with a non-persistent buffer that its forward pass updates."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x, labels):
        self.calls.add_(1)
        return nn.functional.cross_entropy(self.fc(x), labels)


def test_non_persistent_buffers_are_kept_outside_model_state(tmp_path):
    state = _train(mf.init_state(_Counter(), _adamw()), make_batches(3))
    assert float(state.buffers["calls"]) == 3
    path = save_state(state, tmp_path / "c.pt")
    ckpt = torch.load(path, weights_only=True)
    assert "calls" not in ckpt["model_state"]
    _Counter().load_state_dict(ckpt["model_state"])  # strict load works in plain PyTorch
    restored = restore_state(path, mf.init_state(_Counter(), _adamw()))
    assert float(restored.buffers["calls"]) == 3


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x, labels):
        return nn.functional.cross_entropy(self.head(torch.tanh(self.embed(x))), labels)


def test_tied_weights_are_saved_under_both_keys_once(tmp_path):
    state = _train(mf.init_state(_Tied(), _adamw()), make_batches(2))
    path = save_state(state, tmp_path / "t.pt")
    ckpt = torch.load(path, weights_only=True)
    assert list(ckpt["model_state"]) == ["embed.weight", "head.weight"]
    assert ckpt["model_state"]["embed.weight"] is ckpt["model_state"]["head.weight"]
    model = _Tied()
    model.load_state_dict(ckpt["model_state"])
    assert torch.equal(model.head.weight, state.params["embed.weight"])
    restored = restore_state(path, mf.init_state(_Tied(), _adamw()))
    assert_trees_equal(restored.params, state.params)


def _counting() -> mf.optim.GradientTransformation:
    """A stateful transformation no torch optimizer knows: counts updates, sums gradients."""

    def init(params):
        return OrderedDict(
            count=torch.zeros((), dtype=torch.int64),
            grad_sum=OrderedDict((n, torch.zeros_like(p)) for n, p in params.items()),
        )

    def update(grads, state, params, ctx):
        state["count"].add_(1)
        torch._foreach_add_(list(state["grad_sum"].values()), list(grads.values()))
        return grads, params, state

    return mf.optim.GradientTransformation(init, update)


def test_state_of_other_chain_members_is_kept_in_medfunc_state(tmp_path):
    tx = mf.optim.chain(_counting(), _adamw())
    state = _train(mf.init_state(_model(), tx), make_batches(3))
    path = save_state(state, tmp_path / "c.pt")
    ckpt = torch.load(path, weights_only=True)
    rest = ckpt["medfunc_state"]["opt_state"]
    assert list(rest) == ["0/count"] + [f"0/grad_sum/{n}" for n in state.params]
    assert int(rest["0/count"]) == 3 and "optimizer_state" in ckpt
    restored = restore_state(path, mf.init_state(_model(), tx))
    assert_trees_equal(restored, state)


def test_a_transformation_without_torch_optimizer_is_saved_natively(tmp_path):
    state = _train(mf.init_state(_model(), _counting()), make_batches(2))
    path = save_state(state, tmp_path / "c.pt")
    ckpt = torch.load(path, weights_only=True)
    assert "optimizer_state" not in ckpt and "scheduler_state" not in ckpt
    assert int(ckpt["medfunc_state"]["opt_state"]["count"]) == 2
    assert_trees_equal(restore_state(path, mf.init_state(_model(), _counting())), state)
    with pytest.raises(CheckpointMismatchError, match=r"medfunc_state\['opt_state'\]"):
        restore_state(path, mf.init_state(_model(), mf.optim.chain(_counting(), _adamw())))


# ------------------------------------------------------------------------------------------------
# restoring


def test_restore_with_like_gives_fresh_tensors_and_leaves_like_and_module_alone(tmp_path):
    state = _train(mf.init_state(_model(), _adamw()), make_batches(3))
    path = save_state(state, tmp_path / "c.pt")
    model = _model()
    like = mf.init_state(model, _adamw())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    restored = restore_state(path, like)

    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, state.opt_state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for name in restored.params:
        assert restored.params[name].data_ptr() != like.params[name].data_ptr()
    mf.bind_module(restored)
    assert torch.equal(model.fc1.weight, state.params["fc1.weight"])


def test_restore_without_like_builds_the_state_into_the_model(tmp_path):
    state = _train(
        mf.init_state(_model(), _adamw(), precision=FP16, accumulate_steps=2), make_batches(5)
    )
    path = save_state(state, tmp_path / "c.pt")
    model = TinyClassifier()
    restored = restore_state(path, model=model, tx=_adamw())
    assert restored.policy.name == "fp16" and restored.accumulate_steps == 2
    assert restored.policy.growth_interval == 2
    assert_trees_equal(restored, state)
    assert restored.params["fc1.weight"].data_ptr() == model.fc1.weight.data_ptr()
    assert torch.equal(model.fc1.weight, state.params["fc1.weight"])


def test_restore_refuses_ambiguous_or_missing_targets(tmp_path):
    state = mf.init_state(_model(), _adamw())
    path = save_state(state, tmp_path / "c.pt")
    with pytest.raises(ConfigError, match="needs like=state, or model= and tx="):
        restore_state(path)
    with pytest.raises(ConfigError, match=r"got like= and \['model'\]"):
        restore_state(path, state, model=_model())


# ------------------------------------------------------------------------------------------------
# interop with plain PyTorch


def test_plain_pytorch_continues_bitwise_like_medfunc_fp32_constant_lr(tmp_path):
    batches = make_batches(10)
    state = _train(mf.init_state(_model(), _adamw()), batches[:5])
    ckpt = torch.load(save_state(state, tmp_path / "c.pt"), weights_only=True)

    torch.manual_seed(123)
    model = TinyClassifier()  # other initial values: everything must come from the file
    model.load_state_dict(ckpt["model_state"])
    opt = _torch_adamw(model, lr=0.5)  # the saved param_groups carry the LR
    opt.load_state_dict(ckpt["optimizer_state"])
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-2]
    _assert_matches_torch(state, model, opt)

    resumed = restore_state(tmp_path / "c.pt", mf.init_state(TinyClassifier(), _adamw()))
    for batch in batches[5:]:
        _torch_step(model, opt, batch)
        state, _ = mf.train_step(state, batch)
        resumed, _ = mf.train_step(resumed, batch)
    _assert_matches_torch(state, model, opt)
    assert_trees_equal(resumed, state)


def test_plain_pytorch_lambdalr_continues_the_schedule(tmp_path):
    schedule = mf.schedules.linear_warmup(1e-2, 3, 12)
    batches = make_batches(12)
    state = _train(mf.init_state(_model(), _adamw(schedule)), batches[:5])
    ckpt = torch.load(save_state(state, tmp_path / "c.pt"), weights_only=True)

    model = TinyClassifier()
    opt = _torch_adamw(model, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)))
    model.load_state_dict(ckpt["model_state"])
    opt.load_state_dict(ckpt["optimizer_state"])
    sched.load_state_dict(ckpt["scheduler_state"])
    assert sched.get_last_lr() == [float(schedule(5))] * 2
    for batch in batches[5:]:
        lr = opt.param_groups[0]["lr"]
        _torch_step(model, opt, batch, sched=sched)
        state, metrics = mf.train_step(state, batch)
        assert lr == float(metrics["lr"])
    assert sched.last_epoch == int(state.step) == 12
    _assert_matches_torch(state, model, opt)


def test_plain_pytorch_gradscaler_continues_fp16_loss_scaling(tmp_path):
    batches = make_batches(14)
    state = _train(mf.init_state(_model(), _adamw(), precision=FP16), batches[:6])
    ckpt = torch.load(save_state(state, tmp_path / "c.pt"), weights_only=True)

    model = TinyClassifier()
    model.load_state_dict(ckpt["model_state"])
    opt = _torch_adamw(model, lr=1e-2)
    opt.load_state_dict(ckpt["optimizer_state"])
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(ckpt["scaler_state"])
    assert scaler.get_scale() == float(state.loss_scale.scale)
    scales, skipped = [], []
    for batch in batches[6:]:
        _torch_step(model, opt, batch, scaler=scaler)
        state, metrics = mf.train_step(state, batch)
        scales.append((scaler.get_scale(), float(metrics["loss_scale"])))
        skipped.append(bool(metrics["skipped"]))
    assert all(a == b for a, b in scales)
    assert any(skipped) and not all(skipped)  # both branches of the scaler ran
    assert scaler.state_dict()["_growth_tracker"] == int(state.loss_scale.growth_tracker)
    _assert_matches_torch(state, model, opt)


# ------------------------------------------------------------------------------------------------
# untrusted and damaged files


class _OpensFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _RunsShell:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _crafted_payload(evil) -> dict:
    return {
        "format_version": 1,
        "model_state": {"fc.weight": torch.zeros(2)},
        "trainer_state": {"global_step": 0, "rng": [0, 0], "hook": evil},
    }


@pytest.mark.parametrize("gadget", [_OpensFile, _RunsShell])
@pytest.mark.parametrize("container", ["zip", "legacy", "raw-pickle"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, gadget, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = _crafted_payload(gadget(str(marker)))
    if container == "raw-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=container == "zip")
    like = mf.init_state(_model(), _adamw())
    for load in (read_checkpoint, inspect_checkpoint, lambda p: restore_state(p, like)):
        with pytest.raises(UnsafeCheckpointError, match=r"(io\.open|posix\.system)") as err:
            load(path)
        assert "nothing from it was executed" in str(err.value)
    assert not marker.exists()


def _saved(tmp_path: Path) -> tuple[Path, bytes, dict]:
    state = _train(mf.init_state(_model(), _adamw(), precision=FP16), make_batches(3))
    path = save_state(state, tmp_path / "good.pt", extra={"epoch": 1})
    return path, path.read_bytes(), read_checkpoint(path)


def test_truncated_files_are_reported_as_corrupt_naming_the_file(tmp_path):
    _, data, _ = _saved(tmp_path)
    n = len(data)
    for length in sorted({0, 1, 3, 30, 100, n // 8, n // 4, n // 2, 3 * n // 4, n - 30, n - 1}):
        path = tmp_path / f"cut-{length}.pt"
        path.write_bytes(data[:length])
        with pytest.raises(CheckpointCorruptError) as err:
            read_checkpoint(path)
        message = str(err.value)
        assert str(path) in message and "corrupt or incomplete" in message, message
        assert length < 4 or err.value.__cause__ is not None


def _record_data(path: Path, data: bytes) -> dict[str, tuple[int, int]]:
    """Where each zip record's data starts (after its local header), and its size."""
    offsets = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 :][:4])
            if info.file_size:
                start = info.header_offset + 30 + name_len + extra_len
                offsets[info.filename] = (start, info.file_size)
    return offsets


def test_flipped_bytes_are_detected_or_harmless_never_silently_loaded(tmp_path):
    good, data, original = _saved(tmp_path)
    rng = random.Random(7)
    positions = {rng.randrange(len(data)) for _ in range(80)}
    records = list(_record_data(good, data).values())
    targets = records + [rng.choice(records) for _ in range(100 - len(records))]
    in_records = {start + rng.randrange(size) for start, size in targets}  # every record, then more
    detected = 0
    for position in sorted(positions | in_records):
        damaged = bytearray(data)
        damaged[position] ^= 1 << rng.randrange(8)
        path = tmp_path / "flipped.pt"
        path.write_bytes(bytes(damaged))
        try:
            payload = read_checkpoint(path)
        except CheckpointCorruptError as error:
            assert str(path) in str(error)
            detected += 1
            continue
        # a flip in bytes the format ignores (timestamps, padding) must leave the content as is
        assert position not in in_records, f"flip at {position} inside record data went unseen"
        assert_trees_equal(payload, original)
    assert detected >= len(in_records)


def test_not_a_medfunc_checkpoint_and_missing_files(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(_model().state_dict(), bare)
    with pytest.raises(CheckpointCorruptError, match="bare state_dict"):
        read_checkpoint(bare)
    partial = tmp_path / "partial.pt"
    torch.save({"format_version": 1, "model_state": {}}, partial)
    with pytest.raises(CheckpointCorruptError, match=r"lacks \['trainer_state'\]"):
        read_checkpoint(partial)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    (tmp_path / ".gone.pt.tmp-999999-0a1b2c3d").write_bytes(b"PK")
    with pytest.raises(CheckpointNotFoundError, match="interrupted save"):
        read_checkpoint(tmp_path / "gone.pt")
    with pytest.raises(CheckpointNotFoundError, match="is a folder"):
        read_checkpoint(tmp_path)


def test_newer_format_version_asks_to_upgrade(tmp_path):
    _, _, payload = _saved(tmp_path)
    payload["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointVersionError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "format version 2" in message and "up to 1" in message and "upgrade" in message
    assert isinstance(err.value, CheckpointError)


# ------------------------------------------------------------------------------------------------
# mismatches


def test_wrong_shape_names_the_key(tmp_path):
    path = save_state(mf.init_state(_model(hidden=16), _adamw()), tmp_path / "c.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        restore_state(path, mf.init_state(TinyClassifier(hidden=32), _adamw()))
    assert str(err.value).startswith(
        "model_state['fc1.weight']: checkpoint shape (16, 6), state shape (32, 6)"
    )


def test_wrong_dtype_and_other_keys_are_named(tmp_path):
    path = save_state(mf.init_state(_model(), _adamw()), tmp_path / "c.pt")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"model_state\['fc1.weight'\]: checkpoint "
        r"dtype torch.float32, state dtype torch.float64",
    ):
        restore_state(path, mf.init_state(TinyClassifier().double(), _adamw()))
    with pytest.raises(CheckpointMismatchError, match=r"missing \['norm.weight', 'norm.bias'"):
        restore_state(path, mf.init_state(TinyClassifier(batchnorm=True), _adamw()))


def test_optimizer_and_scaler_and_accumulation_mismatches(tmp_path):
    batches = make_batches(4)
    sgd = _train(mf.init_state(_model(), mf.optim.sgd(0.1, momentum=0.9)), batches)
    with pytest.raises(CheckpointMismatchError, match="optimizer_state: .*SGD"):
        restore_state(save_state(sgd, tmp_path / "sgd.pt"), mf.init_state(_model(), _adamw()))

    fp16 = _train(mf.init_state(_model(), _adamw(), precision=FP16), batches)
    fp16_path = save_state(fp16, tmp_path / "fp16.pt")
    fp32_like = mf.init_state(_model(), _adamw())
    with pytest.raises(CheckpointMismatchError, match="scaler_state: .*precision='fp16'"):
        restore_state(fp16_path, fp32_like)
    payload = read_checkpoint(fp16_path)
    payload["scaler_state"] = {}
    assert_trees_equal(restore_state(payload, fp32_like).params, fp16.params)

    mid = _train(mf.init_state(_model(), _adamw(), accumulate_steps=3), batches[:2])
    mid_path = save_state(mid, tmp_path / "mid.pt")
    with pytest.raises(CheckpointMismatchError, match=r"after 2 of 3 micro-batches"):
        restore_state(mid_path, mf.init_state(_model(), _adamw()))
    boundary = _train(mf.init_state(_model(), _adamw(), accumulate_steps=2), batches)
    other_k = restore_state(
        save_state(boundary, tmp_path / "b.pt"),
        mf.init_state(_model(), _adamw(), accumulate_steps=4),
    )
    assert int(other_k.accum.count) == 0 and int(other_k.step) == 2


# ------------------------------------------------------------------------------------------------
# atomic writes


def test_stray_temporaries_of_dead_saves_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stray = tmp_path / f".ckpt.pt.tmp-{dead.pid}-0123abcd"
    ours = tmp_path / f".old.pt.tmp-{os.getpid()}-89abcdef"
    alive = tmp_path / f".ckpt.pt.tmp-{os.getppid()}-fedcba98"
    unrelated = tmp_path / ".notes.tmp"
    for file in (stray, ours, alive, unrelated):
        file.write_bytes(b"partial")
    save_state(mf.init_state(_model(), _adamw()), tmp_path / "ckpt.pt")
    assert not stray.exists() and not ours.exists()
    assert alive.exists() and unrelated.exists()
    assert (tmp_path / "ckpt.pt").exists()


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    path = tmp_path / "c.pt"
    first = mf.init_state(_model(), _adamw())
    save_state(first, path)
    second = _train(first, make_batches(2))
    save_state(second, path)
    assert read_checkpoint(path)["trainer_state"]["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_concurrent_saves_into_one_folder_do_not_remove_each_others_files(tmp_path):
    state = mf.init_state(_model(), _adamw())
    errors = []

    def save_many(name: str, folder: Path) -> None:
        try:
            for i in range(8):
                save_state(state, folder / name, extra={"i": i})
        except Exception as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    spellings = [tmp_path, Path(os.path.relpath(tmp_path))]  # one folder, two spellings
    threads = [
        threading.Thread(target=save_many, args=(f"c{k}.pt", spellings[k % 2])) for k in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"c{k}.pt" for k in range(4)]
    assert all(read_checkpoint(tmp_path / f"c{k}.pt")["trainer_state"]["i"] == 7 for k in range(4))


def test_every_record_has_its_crc_even_when_the_caller_turned_crcs_off(tmp_path):
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        path = save_state(mf.init_state(_model(), _adamw()), tmp_path / "c.pt")
        assert torch.serialization.get_crc32_options() is False  # nothing changed for the caller
    finally:
        torch.serialization.set_crc32_options(previous)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert all(info.CRC != 0 for info in archive.infolist() if info.file_size > 0)
        record = next(i for i in archive.infolist() if "/data/" in i.filename)
    damaged = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", damaged, record.header_offset + 26)
    data_start = record.header_offset + 30 + name_len + extra_len
    damaged[data_start + record.file_size // 2] ^= 0xFF  # a tensor byte: only the CRC tells
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointCorruptError):
        read_checkpoint(path)


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    trials = 40
    subprocess.run(
        [sys.executable, str(SCRIPTS / "crash_saver.py"), str(tmp_path), str(trials), "0"],
        check=True,
        timeout=240,
    )
    interrupted = 0
    for trial in range(trials):
        folder = tmp_path / f"trial-{trial}"
        payload = read_checkpoint(folder / "ckpt.pt")
        marker = payload["trainer_state"]["marker"]
        assert marker >= 1 and payload["trainer_state"]["global_step"] == marker
        for key, value in payload["model_state"].items():
            assert torch.all(value == marker), (trial, key)
        for entry in payload["optimizer_state"]["state"].values():
            assert all(torch.all(v == marker) for v in entry.values()), trial
        strays = list(folder.glob(".ckpt.pt.tmp-*"))
        interrupted += bool(strays)
        save_state(mf.init_state(_model(), _adamw()), folder / "next.pt")
        assert sorted(p.name for p in folder.iterdir()) == ["ckpt.pt", "next.pt"], trial
    assert interrupted > 0  # some kills landed mid-save (the loop spends most time saving)


def test_two_writers_and_a_reader_on_one_path_never_see_a_torn_checkpoint(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    from crash_saver import make_state, marked_state

    base = make_state()
    path = tmp_path / "ckpt.pt"
    save_state(marked_state(base, 1), path, extra={"marker": 1})
    rounds, errors, reads = 20, [], []

    def write(first: int) -> None:
        try:
            for marker in range(first, first + 2 * rounds, 2):
                save_state(marked_state(base, marker), path, extra={"marker": marker})
        except Exception as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    writers = [threading.Thread(target=write, args=(first,)) for first in (2, 3)]
    for thread in writers:
        thread.start()
    while any(thread.is_alive() for thread in writers) or len(reads) < rounds:
        payload = read_checkpoint(path)
        marker = payload["trainer_state"]["marker"]
        assert payload["trainer_state"]["global_step"] == marker
        for value in (*payload["model_state"].values(), *_moments(payload)):
            assert torch.all(value == marker), marker
        reads.append(marker)
    for thread in writers:
        thread.join()
    assert errors == []
    assert len(set(reads)) > 1  # the reader saw the writers' saves, not one file throughout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def _moments(payload: dict) -> list[torch.Tensor]:
    return [v for entry in payload["optimizer_state"]["state"].values() for v in entry.values()]


# ------------------------------------------------------------------------------------------------
# inspect


def test_inspect_summarises_the_checkpoint(tmp_path):
    state = _train(
        mf.init_state(_model(), _adamw(), precision=FP16, accumulate_steps=2), make_batches(5)
    )
    path = save_state(state, tmp_path / "c.pt", extra={"epoch": 4, "position": 5})
    text = inspect_checkpoint(path)
    values = 16 * 6 + 16 + 3 * 16 + 3
    lines = text.splitlines()
    assert lines[0].startswith(f"checkpoint {path} (")
    assert "format version: 1" in lines
    assert (
        f"global step: {int(state.step)}" in lines
        and "epoch: 4" in lines
        and "precision: fp16" in lines
    )
    assert f"model_state: 4 tensors, {values} values, {values * 4} B" in lines
    assert "dtypes: float32 (4)" in lines
    assert (
        "parts: model_state, optimizer_state, scheduler_state, scaler_state, "
        "trainer_state, medfunc_state"
    ) in lines
    assert f"loss scale: {float(state.loss_scale.scale)} " in text
    assert "gradient accumulation: 1 of 2 micro-batches accumulated" in lines
    assert "extra: position=5" in lines
    slim = save_state(state, tmp_path / "s.pt", save_optimizer=False)
    assert "optimizer_state: not saved" in inspect_checkpoint(slim)


def test_map_location_and_payload_dicts(tmp_path):
    state = _train(mf.init_state(_model(), _adamw()), make_batches(2))
    path = save_state(state, tmp_path / "c.pt")
    payload = read_checkpoint(path, map_location=torch.device("cpu"))
    restored = restore_state(payload, mf.init_state(_model(), _adamw()))
    assert_trees_equal(restored, state)
    payload["model_state"]["fc1.weight"].add_(1.0)  # the caller's payload is copied, not kept
    assert_trees_equal(restored.params, state.params)
    with pytest.raises(ConfigError, match="map_location"):
        read_checkpoint(path, map_location="not-a-device")
