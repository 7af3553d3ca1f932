"""restore_state(..., donate=True): the checkpoint written into the like state's own tensors,
everything checked before a byte is written, one copy of the state in memory."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, make_batches
from torch import nn

import medfunc as mf
import medfunc.checkpoint.reading as reading
from medfunc.checkpoint import read_checkpoint, restore_state, save_state
from medfunc.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    ConfigError,
    ConsumedStateError,
)
from medfunc.state import tree_leaves_with_path
from medfunc.testing import assert_trees_equal

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
_spec = importlib.util.spec_from_file_location("resume_worker", SCRIPTS / "resume_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

# AdamW moments and steps, fp16 loss scale, accumulation sums mid-window, SGD momentum, EMA
KINDS = [
    worker.Config("fp32", 1, "cosine", 8, True),
    worker.Config("fp16", 3, "one_cycle", 7, True),
    worker.Config("fp16", 1, "step", 8, True, optimizer="sgd"),
    worker.Config("fp16", 3, "cosine", 8, True, ema=0.9),
]


def _model(**kwargs) -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(**kwargs)


def _adamw() -> mf.optim.GradientTransformation:
    return mf.optim.adamw(1e-2, weight_decay=0.05)


def _trained(tmp_path: Path) -> tuple[mf.TrainState, Path]:
    state = mf.init_state(_model(), _adamw(), precision=worker.FP16)
    for batch in make_batches(3):
        state, _ = mf.train_step(state, batch)
    return state, save_state(state, tmp_path / "good.pt")


def _snapshot(state: mf.TrainState) -> dict[str, torch.Tensor]:
    return {path: leaf.clone() for path, leaf in tree_leaves_with_path(state)}


def _assert_is_like(restored: mf.TrainState, leaves: dict[str, torch.Tensor]) -> None:
    """Every tensor leaf of ``restored`` is the like state's tensor at the same path."""
    got = dict(tree_leaves_with_path(restored))
    assert list(got) == list(leaves)
    for path, leaf in got.items():
        assert leaf is leaves[path], f"{path} is not like's tensor"


# ------------------------------------------------------------------------------------------------
# the restored state is like's tensors, with the checkpoint's values


def test_donated_restore_fills_like_and_its_module_with_the_copying_restores_values(tmp_path):
    _, path = _trained(tmp_path)
    copied = restore_state(path, like=mf.init_state(_model(), _adamw(), precision=worker.FP16))
    model = _model()
    like = mf.init_state(model, _adamw(), precision=worker.FP16)
    leaves = dict(tree_leaves_with_path(like))

    restored = restore_state(path, like=like, donate=True)

    assert_trees_equal(restored, copied)
    _assert_is_like(restored, leaves)
    assert restored.params["fc1.weight"].data_ptr() == model.fc1.weight.data_ptr()
    for name, value in model.state_dict().items():
        assert torch.equal(value, copied.params[name]), name
    assert like.consumed
    with pytest.raises(ConsumedStateError):
        like.params  # noqa: B018 - the access is what raises
    state, _ = mf.train_step(restored, make_batches(1)[0])
    assert int(state.step) == int(copied.step) + 1


def test_a_payload_dict_is_copied_into_like(tmp_path):
    trained, path = _trained(tmp_path)
    payload = read_checkpoint(path)
    like = mf.init_state(_model(), _adamw(), precision=worker.FP16)
    leaves = dict(tree_leaves_with_path(like))

    restored = restore_state(payload, like=like, donate=True)

    assert_trees_equal(restored, trained)
    _assert_is_like(restored, leaves)
    assert like.consumed
    # the caller's payload is not taken over
    weight = payload["model_state"]["fc1.weight"]
    assert weight.data_ptr() != restored.params["fc1.weight"].data_ptr()


@pytest.mark.parametrize("config", KINDS, ids=lambda c: c.name)
def test_a_donated_resume_continues_bitwise_like_the_straight_run(tmp_path, one_thread, config):
    straight = worker.leaves(worker.train(worker.make_state(config), 0, worker.TOTAL))
    part = worker.train(worker.make_state(config), 0, config.split)
    path = save_state(part, tmp_path / "split.pt")
    like = worker.make_state(config)
    leaves = dict(tree_leaves_with_path(like))

    restored = restore_state(path, like=like, donate=True)

    _assert_is_like(restored, leaves)
    assert_trees_equal(restored, part)
    resumed = worker.leaves(worker.train(restored, config.split, worker.TOTAL))
    assert list(resumed) == list(straight)
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), f"{name} differs after the donated resume"


def test_a_non_contiguous_parameter_is_filled_through_a_copy(tmp_path):
    def model() -> nn.Module:
        torch.manual_seed(0)
        net = TinyClassifier()
        net.fc1.weight = nn.Parameter(torch.randn(6, 16).t())  # a transposed view
        return net

    trained = mf.init_state(model(), _adamw())
    for batch in make_batches(2):
        trained, _ = mf.train_step(trained, batch)
    path = save_state(trained, tmp_path / "c.pt")
    like = mf.init_state(model(), _adamw())
    weight = like.params["fc1.weight"]
    assert not weight.is_contiguous()

    restored = restore_state(path, like=like, donate=True)

    assert restored.params["fc1.weight"] is weight
    assert_trees_equal(restored, trained)


def test_donate_needs_like(tmp_path):
    _, path = _trained(tmp_path)
    with pytest.raises(ConfigError, match=r"donate=True\) writes into like=state"):
        restore_state(path, model=_model(), tx=_adamw(), donate=True)


# ------------------------------------------------------------------------------------------------
# bad input loses nothing


def _tensor_records(path: Path) -> list[tuple[int, int]]:
    """(start, size) of every tensor record's bytes, in file order."""
    data = path.read_bytes()
    spans = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size:
                name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 :][:4])
                spans.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    return sorted(spans)


def _flipped(path: Path, which: int) -> Path:
    data = bytearray(path.read_bytes())
    start, size = _tensor_records(path)[which]
    data[start + size // 2] ^= 0x10
    damaged = path.with_name(f"flipped{which}.pt")
    damaged.write_bytes(bytes(data))
    return damaged


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    cut = path.with_name("cut.pt")
    cut.write_bytes(data[: len(data) * 2 // 3])
    return cut


BAD = {
    "flipped byte in the first tensor record": (lambda p: _flipped(p, 0), {}),
    "flipped byte in the last tensor record": (lambda p: _flipped(p, -1), {}),
    "truncated file": (_truncated, {}),
    "shape mismatch": (lambda p: p, {"hidden": 32}),
    "missing key": (lambda p: p, {"batchnorm": True}),
}
ERRORS = {
    "shape mismatch": (CheckpointMismatchError, r"model_state\['fc1.weight'\]: checkpoint shape"),
    "missing key": (CheckpointMismatchError, r"missing \['norm.weight', 'norm.bias'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_and_leaves_like_intact_and_usable(tmp_path, case):
    _, good = _trained(tmp_path)
    damage, model_kwargs = BAD[case]
    path = damage(good)
    model = TinyClassifier(**model_kwargs)
    like = mf.init_state(model, _adamw(), precision=worker.FP16)
    before = _snapshot(like)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    error, message = ERRORS.get(case, (CheckpointCorruptError, "corrupt or incomplete"))

    with pytest.raises(error, match=message):
        restore_state(path, like=like, donate=True)

    assert not like.consumed
    after = _snapshot(like)
    assert list(after) == list(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    mf.train_step(like, make_batches(1)[0])  # like is still a live state


def test_a_record_cut_short_after_its_check_consumes_like_and_says_so(tmp_path, monkeypatch):
    _, path = _trained(tmp_path)
    last_start, _ = _tensor_records(path)[-1]
    checked = reading._TensorReader.check_deferred

    def check_then_truncate(self):
        checked(self)
        with open(path, "r+b") as handle:  # the file changes after it was checked
            handle.truncate(last_start + 1)

    monkeypatch.setattr(reading._TensorReader, "check_deferred", check_then_truncate)
    like = mf.init_state(_model(), _adamw(), precision=worker.FP16)
    with pytest.raises(CheckpointCorruptError, match="like was partly overwritten"):
        restore_state(path, like=like, donate=True)
    assert like.consumed


# ------------------------------------------------------------------------------------------------
# one copy of the state


_MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    import medfunc as mf

    torch.set_num_threads(1)

    def like():
        torch.manual_seed(0)
        net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
        return mf.init_state(net, mf.optim.adamw(1e-3), loss_fn=lambda out, b: out.pow(2).mean())

    def status(name):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(name + ":"))

    path, mode = sys.argv[1], sys.argv[2]
    state, _ = mf.train_step(like(), torch.randn(2, 1024))
    mf.save_state(state, path, save_optimizer=mode != "donate-without-optimizer")
    target = like()
    size = sum(t.untyped_storage().nbytes() for t in mf.state.tree_flatten(target)[0])
    del state
    open(path, "rb").read()  # into the page cache
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    if mode == "resume":  # what the Trainer's resume_from calls
        from medfunc.legacy import resume_into

        restored, _ = resume_into(path, target)
    else:
        restored = mf.restore_state(path, like=target, donate=mode != "copy")
    print(json.dumps({"growth": status("VmHWM") - before, "state": size}))
    """
)


def _peak_growth(tmp_path: Path, mode: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / f"{mode}.pt"), mode],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_donated_restore_holds_one_copy_of_the_state(tmp_path):
    copied = _peak_growth(tmp_path, "copy")
    # the copying restore allocates the state again: the measure sees a whole copy
    assert copied["growth"] > 0.9 * copied["state"]
    # the donated one only its few check buffers (4 x 4 MiB of a ~96 MiB state), also when the
    # checkpoint has no optimizer state (like's moments are kept, not copied)
    for mode in ("donate", "donate-without-optimizer", "resume"):
        donated = _peak_growth(tmp_path, mode)
        assert donated["growth"] < 0.3 * donated["state"], (mode, donated)


# ------------------------------------------------------------------------------------------------
# accelerators: the records go through host memory of one record, then copy_


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_like_is_filled_in_place(tmp_path):
    trained, path = _trained(tmp_path)
    model = _model().cuda()
    like = mf.init_state(model, _adamw(), precision=worker.FP16)
    leaves = dict(tree_leaves_with_path(like))

    restored = restore_state(path, like=like, donate=True)

    _assert_is_like(restored, leaves)
    assert restored.params["fc1.weight"].device.type == "cuda"
    assert restored.params["fc1.weight"].data_ptr() == model.fc1.weight.data_ptr()
    for name, value in dict(tree_leaves_with_path(trained)).items():
        got = dict(tree_leaves_with_path(restored))[name]
        assert torch.equal(got.cpu(), value.cpu()), name


def test_a_payload_holding_likes_own_tensors_is_read_before_like_is_written(tmp_path):
    _, path = _trained(tmp_path)
    like = mf.init_state(_model(), _adamw(), precision=worker.FP16)
    payload = read_checkpoint(path)
    moments = payload["optimizer_state"]["state"]
    first = next(iter(moments))
    # the first moment of fc1.weight is like's own fc1.weight, which the restore overwrites
    moments[first]["exp_avg"] = like.params["fc1.weight"]
    expected = restore_state(payload, like=like)  # copies: like is not changed

    restored = restore_state(payload, like=like, donate=True)

    assert_trees_equal(restored, expected)
