"""How checkpoints move bytes: one read of the file with the CRC-32 alongside, the read storages
kept as the restored state's tensors, no copy of the optimizer moments on save, and the peak
memory of saving and restoring (measured in a fresh process, not timed)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
from torch import nn

import medfunc as mf
from medfunc.checkpoint import reading
from medfunc.errors import CheckpointCorruptError
from medfunc.optim import from_torch_state_dict, to_torch_state_dict
from medfunc.state import tree_flatten
from medfunc.testing import assert_trees_equal


def _state(width: int = 16, layers: int = 2, **kwargs) -> mf.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    state = mf.init_state(model, mf.optim.adamw(1e-3), loss_fn=lambda out, b: out.pow(2).mean())
    state, _ = mf.train_step(state, torch.randn(4, width))
    return state


def _leaves(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _tensor_data_offset(path, index: int = 0) -> int:
    """The file offset of the first byte of the ``index``-th tensor record."""
    with open(path, "rb") as handle:
        records = reading._tensor_records(handle, path)
    return sorted(records)[index]


def test_to_torch_state_dict_without_copy_shares_the_moments():
    state = _state()
    trainable = OrderedDict(state.params)
    copied = to_torch_state_dict(state.tx, state.opt_state, trainable, state.step)
    shared = to_torch_state_dict(state.tx, state.opt_state, trainable, state.step, copy=False)
    assert_trees_equal(copied, shared)
    name = next(iter(trainable))
    index = shared["param_groups"][0]["param_names"].index(name)
    assert _storage(shared["state"][index]["exp_avg"]) == _storage(state.opt_state.exp_avg[name])
    assert _storage(copied["state"][index]["exp_avg"]) != _storage(state.opt_state.exp_avg[name])


@pytest.mark.parametrize(
    "tx", [mf.optim.adamw(1e-3, amsgrad=True), mf.optim.sgd(0.1, momentum=0.9)]
)
def test_from_torch_state_dict_without_copy_adopts_fitting_tensors(tx):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    params = OrderedDict(model.named_parameters())
    opt = mf.optim.torch_optimizer(tx, params)
    model(torch.randn(8, 4)).sum().backward()
    model[1].bias.grad = None  # a parameter without state: it gets zero buffers
    opt.step()
    sd = opt.state_dict()
    values = OrderedDict((n, p.detach().clone()) for n, p in params.items())
    copied = from_torch_state_dict(tx, sd, values)
    adopted = from_torch_state_dict(tx, sd, values, copy=False)
    assert_trees_equal(copied, adopted)
    given = {_storage(t) for entry in sd["state"].values() for t in entry.values() if t.dim()}
    buffers = [t for t in _leaves(adopted) if t.dim()]
    assert {_storage(t) for t in buffers} >= given
    assert not given & {_storage(t) for t in _leaves(copied)}


def test_from_torch_state_dict_without_copy_copies_what_does_not_fit():
    state = _state()
    trainable = OrderedDict(state.params)
    sd = to_torch_state_dict(state.tx, state.opt_state, trainable, state.step)
    for entry in sd["state"].values():
        entry["exp_avg"] = entry["exp_avg"].t().contiguous().t()  # other strides
    restored = from_torch_state_dict(state.tx, sd, trainable, copy=False)
    assert_trees_equal(restored, state.opt_state)
    for name, moment in restored.exp_avg.items():
        assert moment.is_contiguous() and moment.stride() == trainable[name].stride()


def test_restore_keeps_the_read_storages_as_the_states_tensors(tmp_path):
    state = _state()
    path = mf.save_state(state, tmp_path / "ckpt.pt")
    like = mf.init_state(state.module, state.tx, loss_fn=state.loss_fn)
    restored = mf.restore_state(path, like=like)
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, state.opt_state)
    like_storages = {_storage(t) for t in _leaves((like.params, like.opt_state))}
    for tensor in _leaves((restored.params, restored.opt_state)):
        if tensor.dim():
            storage = tensor.untyped_storage()
            assert storage.nbytes() == tensor.numel() * tensor.element_size()
            assert storage.data_ptr() not in like_storages


@pytest.mark.parametrize("mmap", [False, True])
def test_the_read_matches_torch_load_and_reads_the_bytes_itself(tmp_path, mmap, monkeypatch):
    path = mf.save_state(_state(), tmp_path / "ckpt.pt", extra={"epoch": 4})
    read_by_us = []
    original = reading._TensorReader._read_into
    monkeypatch.setattr(
        reading._TensorReader,
        "_read_into",
        lambda self, *args: read_by_us.append(args[-1].name) or original(self, *args),
    )
    payload = reading.read_payload(path, "cpu", mmap=mmap)
    assert_trees_equal(payload, torch.load(path, weights_only=True))
    with open(path, "rb") as handle:
        records = reading._tensor_records(handle, path)
    assert sorted(read_by_us) == ([] if mmap else sorted(r.name for r in records.values()))


def _unmapped(handle):
    """``torch.load`` reads the open handle itself, as outside Linux."""
    handle.seek(0)
    return handle, False


@pytest.mark.parametrize("pending", [0, reading._PENDING_BYTES])
@pytest.mark.parametrize("mapped", [True, False])
def test_damaged_tensor_bytes_are_reported_whoever_reads_them(
    tmp_path, monkeypatch, mapped, pending
):
    monkeypatch.setattr(reading, "_PENDING_BYTES", pending)  # 0: found while torch.load runs
    path = mf.save_state(_state(), tmp_path / "ckpt.pt")
    if not mapped:  # torch reads the bytes itself (no /proc/self/fd): checked as torch read them
        monkeypatch.setattr(reading, "_load_source", _unmapped)
        assert_trees_equal(reading.read_payload(path, "cpu", mmap=False), torch.load(path))
    data = bytearray(path.read_bytes())
    data[_tensor_data_offset(path, 1) + 3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="corrupt or incomplete.*CRC-32"):
        mf.read_checkpoint(path)


_MEASURE = textwrap.dedent(
    """
    import json, sys, torch, medfunc as mf
    from pathlib import Path
    from medfunc.state import tree_flatten

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def kept(value):
        storages = {}
        leaves = tree_flatten(value)[0] if isinstance(value, mf.TrainState) else []
        def visit(item):
            if isinstance(item, torch.Tensor):
                storages[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
            elif isinstance(item, dict):
                [visit(v) for v in item.values()]
            elif isinstance(item, (list, tuple)):
                [visit(v) for v in item]
        visit(leaves or value)
        return sum(storages.values())

    operation, path = sys.argv[1], Path(sys.argv[2])
    # one-off costs (the first torch.optim optimizer imports torch._dynamo) are paid up front
    tiny = mf.init_state(torch.nn.Linear(4, 4), mf.optim.adamw(1e-3))
    mf.restore_state(mf.save_state(tiny, path.with_name("tiny.pt")), like=tiny)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
    state = mf.init_state(model, mf.optim.adamw(1e-3), loss_fn=lambda out, b: out.pow(2).mean())
    state, _ = mf.train_step(state, torch.randn(4, 1024), donate=True)
    size = sum(t.numel() * t.element_size() for t in tree_flatten(state)[0])
    if operation == "save":
        run = lambda: mf.save_state(state, path)
    else:
        mf.save_state(state, path)
        like = mf.init_state(model, state.tx, loss_fn=state.loss_fn)
        del state
        run = {"read": lambda: mf.read_checkpoint(path),
               "restore": lambda: mf.restore_state(path, like=like)}[operation]
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    result = run()
    extra = status("VmHWM") - before - (0 if operation == "save" else kept(result))
    print(json.dumps({"extra": extra, "size": size}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("operation", ["save", "read", "restore"])
def test_peak_memory_of_a_save_or_restore_stays_under_a_tenth_of_the_state(tmp_path, operation):
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, operation, str(tmp_path / "ckpt.pt")],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["size"] > 90 * 2**20  # 8 x 1024^2 weights and their two moments
    assert measured["extra"] < 0.1 * measured["size"], measured
