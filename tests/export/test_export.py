"""TorchScript and ONNX export: real exports, reloaded and run, compared with the eager model."""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_bert
from torch import nn

import medfunc as mf
from medfunc.errors import ExportError
from medfunc.export import compare_outputs, flatten_outputs, to_onnx, to_torchscript

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class TextClassifier(nn.Module):
    """Embedding + 2-layer transformer encoder + masked mean pool + linear; returns a dict."""

    def __init__(self, vocab: int = 40, dim: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict:
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out = {"logits": self.head(pooled)}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(out["logits"], labels)
        return out


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a Python branch on a tensor's value
            return self.fc(x)
        return -self.fc(x)


def text_batch(batch: int, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def perturbed(state: mf.TrainState, scale: float = 0.3) -> mf.TrainState:
    """A copy of ``state`` whose params (and float buffers) differ from the module's weights."""
    g = torch.Generator().manual_seed(7)
    params = OrderedDict(
        (n, p + scale * torch.randn(p.shape, generator=g)) for n, p in state.params.items()
    )
    buffers = OrderedDict(
        (n, b + scale * torch.rand(b.shape, generator=g) if b.is_floating_point() else b)
        for n, b in state.buffers.items()
    )
    return state.replace(params=params, buffers=buffers)


def reference(state: mf.TrainState, fresh: nn.Module, *args, **kwargs):
    """Eager outputs of ``fresh`` (an architecture twin) holding the state's values, eval mode."""
    fresh.eval()
    with torch.no_grad():
        return torch.func.functional_call(fresh, (state.params, state.buffers), args, kwargs)


def leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if ".tmp-" in n]


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------


def test_onnx_transformer_dict_output_matches_eager_at_two_batch_sizes(tmp_path):
    torch.manual_seed(0)
    model = TextClassifier()
    model.train()
    model.head.eval()  # a mixed-mode model: every submodule's own mode must come back
    modes = [m.training for m in model.modules()]

    path = to_onnx(model, text_batch(2), tmp_path / "out" / "model.onnx")

    assert path == tmp_path / "out" / "model.onnx" and path.is_file()
    assert sorted(os.listdir(path.parent)) == ["model.onnx"]  # one self-contained file
    assert [m.training for m in model.modules()] == modes
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch dimension
    model.eval()
    for batch in (2, 5):
        inputs = text_batch(batch, seed=batch)
        (logits,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            expected = model(**inputs)["logits"]
        assert logits.shape == (batch, 3)
        assert max_diff(logits, expected) < 1e-4


def test_onnx_cnn_from_state_exports_the_states_weights(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    original = SmallCNN()
    original.load_state_dict(model.state_dict())
    state = perturbed(mf.init_state(model, mf.optim.sgd(0.1)))
    example = torch.randn(1, 3, 16, 16)  # batch 1, as the seed's examples

    path = to_onnx(state, example, tmp_path / "model.onnx")

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16)
        (out,) = session.run(None, {"input": x.numpy()})
        assert max_diff(out, reference(state, SmallCNN(), x)) < 1e-4
        with torch.no_grad():
            assert max_diff(out, original.eval()(x)) > 1e-2  # not the module's old weights
    assert leftovers(tmp_path) == []


def test_onnx_legacy_exporter_for_old_opsets(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    path = to_onnx(model, (torch.randn(1, 3, 16, 16),), tmp_path / "m17.onnx", opset=17)
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_0"]
    x = torch.randn(3, 3, 16, 16)
    (out,) = session.run(None, {"input_0": x.numpy()})
    with torch.no_grad():
        assert max_diff(out, model(x)) < 1e-4


def test_onnx_data_dependent_control_flow_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(ExportError) as info:
        to_onnx(DataDependent(), torch.randn(2, 4), path)
    message = str(info.value)
    assert "ONNX export" in message and "torch.export" in message
    assert "data-dependent" in message
    assert info.value.__cause__ is not None  # the exporter's own exception is chained
    assert path.read_bytes() == b"previous export"  # the old file is untouched
    assert leftovers(tmp_path) == []


def test_example_the_model_cannot_take_names_the_exporter(tmp_path):
    model = nn.Linear(4, 2)
    for export, name in ((to_torchscript, "TorchScript"), (to_onnx, "ONNX")):
        with pytest.raises(ExportError, match=name) as info:
            export(model, torch.randn(2, 3), tmp_path / f"bad.{name}")
        assert "mat1 and mat2" in str(info.value)
        assert isinstance(info.value.__cause__, RuntimeError)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ExportError, match="must be a tensor"):
        to_torchscript(model, {"x": [1.0, 2.0]}, tmp_path / "m.pt")


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ExportError, match=r"onnxruntime.*pip install 'medfunc\[onnx\]'"):
        to_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# TorchScript
# ----------------------------------------------------------------------------------------------


def test_torchscript_state_reloads_equal_to_eager(tmp_path):
    torch.manual_seed(0)
    model = TextClassifier()
    pristine = TextClassifier()
    pristine.load_state_dict(model.state_dict())
    state = perturbed(mf.init_state(model, mf.optim.sgd(0.1)), scale=0.1)
    example = text_batch(2)

    path = to_torchscript(state, example, tmp_path / "model.pt")

    loaded = torch.jit.load(str(path))
    assert model.training  # the module's mode is restored
    for batch in (2, 3):
        inputs = text_batch(batch, seed=batch)
        with torch.no_grad():
            out = loaded(**inputs)
            old = pristine.eval()(**inputs)["logits"]
        assert set(out) == {"logits"}
        expected = reference(state, TextClassifier(), **inputs)["logits"]
        assert (out["logits"] - expected).abs().max() <= 1e-6
        assert (out["logits"] - old).abs().max() > 1e-3  # the state's weights, not the old ones
    assert leftovers(tmp_path) == []


def test_torchscript_hf_model_output_becomes_dict(tmp_path):
    model = tiny_bert(dropout=0.1)
    example = text_batch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecations, the tracer note
        path = to_torchscript(model, example, tmp_path / "bert.pt")
    with torch.no_grad():
        out = torch.jit.load(str(path))(**example)
        expected = model.eval()(**example).logits
    assert list(out) == ["logits"]
    assert (out["logits"] - expected).abs().max() <= 1e-6


def test_torchscript_traces_one_branch_and_says_so(tmp_path):
    torch.manual_seed(0)
    model = DataDependent()
    x = torch.rand(2, 4) + 0.1  # sum > 0: the first branch
    with pytest.warns(UserWarning, match="path taken for export_input_example"):
        path = to_torchscript(model, x, tmp_path / "dd.pt")
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
        assert torch.allclose(loaded(-x), -model(-x), atol=1e-6)  # the frozen branch


def test_torchscript_tuple_outputs_and_positional_example(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 3)

        def forward(self, x, y):
            return self.a(x), self.b(y)

    model = TwoHeads()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean trace emits no warning at all
        path = to_torchscript(model, (x, y), tmp_path / "two.pt")
    out = torch.jit.load(str(path))(x, y)
    assert isinstance(out, tuple) and len(out) == 2
    assert torch.allclose(out[1], model(x, y)[1], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Output flattening and the comparison helper
# ----------------------------------------------------------------------------------------------


def test_flatten_outputs_names_and_order():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert [n for n, _ in flatten_outputs(a)] == ["output"]
    assert [n for n, _ in flatten_outputs((a, None, b))] == ["output_0", "output_2"]
    nested = {"logits": a, "aux": None, "hidden": (b, c)}
    assert [n for n, _ in flatten_outputs(nested)] == ["logits", "hidden.0", "hidden.1"]
    with pytest.raises(ExportError, match="'count' is a int"):
        flatten_outputs({"logits": a, "count": 3})
    with pytest.raises(ExportError, match="no tensor"):
        flatten_outputs({"aux": None})


def test_compare_outputs_reports_the_output_and_max_difference():
    logits = torch.zeros(2, 3)
    shifted = logits.clone()
    shifted[1, 2] = 0.25
    assert compare_outputs([("logits", logits)], [("logits", logits.numpy())], atol=1e-4) == 0.0
    with pytest.raises(ExportError, match=r"output 'logits'.*max \|difference\| = 0\.25"):
        compare_outputs([("logits", logits)], [("logits", shifted)], atol=1e-4, label="ONNX")
    with pytest.raises(ExportError, match="shape"):
        compare_outputs({"logits": logits}, {"logits": logits[:1]}, atol=1e-4)
    with pytest.raises(ExportError, match="returns 2 output"):
        compare_outputs({"logits": logits}, {"a": logits, "b": logits}, atol=1e-4)
    nan = logits.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ExportError, match="= inf"):
        compare_outputs({"logits": logits}, {"logits": nan}, atol=1e-4)
    assert compare_outputs({"logits": nan}, {"logits": nan.clone()}, atol=1e-4) == 0.0
    ids = torch.tensor([1, 2])
    with pytest.raises(ExportError, match="'ids'"):
        compare_outputs({"ids": ids}, {"ids": ids + 1}, atol=10.0)  # integers compare exactly


def test_round_trip_example_in_the_docs_runs(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "export.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "jit.load" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "docs/export.md", "exec"), namespace)
    assert float(namespace["torch_diff"]) <= 1e-6
    assert float(namespace["onnx_diff"]) <= 1e-4
    assert "TorchScript max diff" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "export_demo")) == ["model.onnx", "model.pt"]


def test_an_export_target_that_cannot_be_written_fails_before_tracing(tmp_path):
    from medfunc.errors import CheckpointWriteError
    from medfunc.export import to_torchscript

    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointWriteError, match="EISDIR"):
        to_torchscript(model, torch.zeros(1, 3), tmp_path)
    assert not list(tmp_path.iterdir())
