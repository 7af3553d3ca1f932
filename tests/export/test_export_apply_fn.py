"""Exporting a state built with ``apply_fn``: the exported file runs the state's calling
convention, checked by reloading it (torch.jit.load, onnxruntime) and comparing with
``mf.apply_model`` on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import medfunc as mf
from medfunc.export import to_onnx, to_torchscript

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _trained_state(apply_fn, loss_fn, batch) -> mf.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    state = mf.init_state(model, mf.optim.adamw(1e-2), apply_fn=apply_fn, loss_fn=loss_fn)
    for _ in range(3):
        state, _ = mf.train_step(state, batch)
    return state


def _tuple_state() -> tuple[mf.TrainState, torch.Tensor]:
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    state = _trained_state(
        lambda model, batch: model(batch[0]).log_softmax(-1),
        lambda out, batch: nn.functional.nll_loss(out, batch[1]),
        (x, y),
    )
    return state, x


def test_torchscript_of_a_tuple_convention_takes_the_inputs_apply_fn_reads(tmp_path):
    state, x = _tuple_state()
    path = to_torchscript(state, (x,), tmp_path / "model.pt")
    loaded = torch.jit.load(str(path))
    x2 = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x2), mf.apply_model(state, (x2,)), rtol=0, atol=0)


def test_onnx_of_a_dict_convention_names_inputs_after_the_keys(tmp_path):
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    state = _trained_state(
        lambda model, batch: {"logits": model(batch["signal"] * 2.0)},
        lambda out, batch: nn.functional.cross_entropy(out["logits"], batch["target"]),
        {"signal": x, "target": y},
    )
    path = to_onnx(state, {"signal": x}, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["signal"]
    x2 = torch.randn(9, 4)
    (logits,) = session.run(None, {"signal": x2.numpy()})
    expected = mf.apply_model(state, {"signal": x2})["logits"]
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5, rtol=0)


def test_a_lone_tensor_example_reaches_apply_fn_as_the_tensor(tmp_path):
    x = torch.randn(6, 4)
    state = _trained_state(
        lambda model, batch: model(batch).softmax(-1),
        lambda out, batch: out[:, 0].mean(),
        x,
    )
    path = to_torchscript(state, x, tmp_path / "model.pt")
    torch.testing.assert_close(torch.jit.load(str(path))(x), mf.apply_model(state, x))
