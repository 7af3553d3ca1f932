"""A Hugging Face ``datasets.Dataset`` (``set_format("torch")``) as training and evaluation data:
batched with ``batch_size`` like a list of examples, with the columns the model's ``forward``
does not take (raw text) dropped, and clear errors where its columns cannot be used."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier

from medfunc.errors import ConfigError
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

datasets = pytest.importorskip("datasets")


def _tensors(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _examples() -> list[dict]:
    x, y = _tensors()
    return [{"x": x[i], "labels": y[i]} for i in range(len(y))]


def _hf(label_column: str = "labels", **extra_columns) -> datasets.Dataset:
    x, y = _tensors()
    columns = {
        "text": [f"case {i}" for i in range(len(y))],
        "x": x.tolist(),
        label_column: y.tolist(),
        **extra_columns,
    }
    return datasets.Dataset.from_dict(columns).with_format("torch")


def _model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(dropout=0.1)


def _config(**options) -> TrainerConfig:
    base = dict(device="cpu", progress_bar=False, batch_size=8, num_epochs=2, learning_rate=1e-2)
    return TrainerConfig(**{**base, **options})


def test_a_dataset_trains_and_evaluates_like_the_same_examples_in_a_list(tmp_path):
    hf = _hf()
    assert hf[0]["x"].dtype == torch.float32 and "text" in hf.column_names
    on_list = MedicalModelTrainer(_model(), _config())
    listed = on_list.train(_examples(), _examples(), output_dir=tmp_path / "list")
    on_hf = MedicalModelTrainer(_model(), _config())
    result = on_hf.train(hf, hf, output_dir=tmp_path / "hf")
    assert result.global_step == listed.global_step == 10
    for name, value in on_list.state.params.items():
        assert torch.equal(on_hf.state.params[name], value), name
    assert on_hf.evaluate(hf) == on_list.evaluate(_examples())
    assert torch.equal(on_hf.predict(hf), on_list.predict(_examples()))


def test_a_peft_model_is_looked_through_for_its_inputs(tmp_path):
    peft = pytest.importorskip("peft")

    def lora() -> torch.nn.Module:
        model = _model()
        torch.manual_seed(1)
        config = peft.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2"])
        return peft.get_peft_model(model, config)

    on_list = MedicalModelTrainer(lora(), _config())
    on_list.train(_examples(), output_dir=tmp_path / "list")
    on_hf = MedicalModelTrainer(lora(), _config())
    on_hf.train(_hf(), output_dir=tmp_path / "hf")
    for name, value in on_list.state.params.items():
        assert torch.equal(on_hf.state.params[name], value), name


def test_rows_without_a_tensor_format_are_refused(tmp_path):
    plain = _hf().with_format(None)
    with pytest.raises(ConfigError, match=r"set_format\('torch'\)"):
        MedicalModelTrainer(_model(), _config()).train(plain, output_dir=tmp_path)


def test_a_label_column_the_model_does_not_take_is_refused_not_dropped(tmp_path):
    with pytest.raises(ConfigError, match=r"rename_column\('label', 'labels'\)"):
        MedicalModelTrainer(_model(), _config()).train(_hf("label"), output_dir=tmp_path)


def test_a_dataset_without_any_model_input_is_refused(tmp_path):
    other = _hf().rename_column("x", "features")
    trainer = MedicalModelTrainer(_model(), _config())
    with pytest.raises(ConfigError, match=r"TinyClassifier.forward \(\['x', 'labels'\]\)"):
        trainer.evaluate(other.remove_columns(["labels"]))
