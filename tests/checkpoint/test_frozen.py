"""Trainable-only checkpoints with the functional API: ``save_state(trainable_only=True)`` leaves
the frozen parameters out, ``restore_state`` takes them from ``like`` once their SHA-256 matches,
and the restored state trains on bitwise like the original."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier, make_batches

import medfunc as mf
from medfunc.checkpoint.frozen import base_checksum
from medfunc.errors import CheckpointMismatchError


def _state(seed: int = 0) -> mf.TrainState:
    torch.manual_seed(seed)
    model = TinyClassifier(batchnorm=True)
    model.fc1.requires_grad_(False)
    return mf.init_state(model, mf.optim.adamw(1e-2))


def test_the_frozen_parameters_are_left_out_and_recorded(tmp_path):
    state = _state()
    path = mf.save_state(state, tmp_path / "ckpt.pt", trainable_only=True)
    payload = torch.load(path, weights_only=True)
    assert list(payload["model_state"]) == [
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
        "fc2.weight",
        "fc2.bias",
    ]
    frozen = {n: state.params[n] for n in ("fc1.weight", "fc1.bias")}
    assert payload["medfunc_state"]["frozen_base"] == {
        "sha256": base_checksum(frozen),
        "parameters": 2,
        "elements": 16 * 6 + 16,
    }


def test_restore_continues_bitwise(tmp_path):
    state = _state()
    batches = make_batches(6)
    for batch in batches[:3]:
        state, _ = mf.train_step(state, batch)
    path = mf.save_state(state, tmp_path / "ckpt.pt", trainable_only=True)
    restored = mf.restore_state(path, like=_state())
    for batch in batches[3:]:
        state, _ = mf.train_step(state, batch)
        restored, _ = mf.train_step(restored, batch)
    for name, value in state.params.items():
        assert torch.equal(restored.params[name], value), name
    for name, value in state.buffers.items():
        assert torch.equal(restored.buffers[name], value), name


def test_a_different_frozen_base_is_refused_naming_both_checksums(tmp_path):
    path = mf.save_state(_state(0), tmp_path / "ckpt.pt", trainable_only=True)
    other = _state(1)
    expected = torch.load(path, weights_only=True)["medfunc_state"]["frozen_base"]["sha256"]
    found = base_checksum({n: other.params[n] for n in ("fc1.weight", "fc1.bias")})
    with pytest.raises(CheckpointMismatchError) as caught:
        mf.restore_state(path, like=other)
    assert expected in str(caught.value) and found in str(caught.value)


def test_the_checksum_covers_names_dtypes_and_shapes():
    w = torch.zeros(2, 3)
    reference = base_checksum({"w": w})
    assert base_checksum({"v": w}) != reference
    assert base_checksum({"w": w.double()}) != reference
    assert base_checksum({"w": w.reshape(3, 2)}) != reference


def test_inspect_says_what_was_left_out(tmp_path):
    state = _state()
    path = mf.save_state(state, tmp_path / "ckpt.pt", trainable_only=True)
    sha = base_checksum({n: state.params[n] for n in ("fc1.weight", "fc1.bias")})
    expected = f"trainable only: 2 frozen parameters (112 values) not stored, base sha256 {sha}"
    assert expected in mf.inspect_checkpoint(path)
    full = mf.save_state(state, tmp_path / "full.pt")
    assert "trainable only" not in mf.inspect_checkpoint(full)
