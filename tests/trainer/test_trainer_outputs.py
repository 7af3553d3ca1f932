"""The final files load where users load them: model.safetensors with a strict load into a fresh
model (non-persistent buffers left out, tied weights stored once), and a Hugging Face model's
folder with from_pretrained."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier, tiny_bert
from safetensors.torch import load_file, load_model

from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

transformers = pytest.importorskip("transformers")


def _config(**options) -> TrainerConfig:
    base = dict(device="cpu", progress_bar=False, batch_size=8, learning_rate=1e-2)
    return TrainerConfig(**{**base, **options})


def _tokens(n: int = 32) -> TensorDictDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (n, 8), generator=g)
    return TensorDictDataset({"input_ids": ids, "labels": (ids[:, 0] % 3).long()})


class _WithCache(TinyClassifier):
    """A model with a non-persistent buffer (not part of its state_dict)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.register_buffer("scale", torch.ones(6), persistent=False)


def test_weights_hold_exactly_the_state_dict(tmp_path):
    trainer = MedicalModelTrainer(_WithCache(), _config())
    g = torch.Generator().manual_seed(0)
    data = TensorDictDataset(
        {"x": torch.randn(16, 6, generator=g), "labels": torch.randint(0, 3, (16,), generator=g)}
    )
    result = trainer.train(data, output_dir=tmp_path)
    saved = load_file(result.weights_path)
    assert "scale" not in saved
    fresh = _WithCache()
    fresh.load_state_dict(saved, strict=True)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_a_hugging_face_model_loads_strictly_and_with_from_pretrained(tmp_path):
    model = tiny_bert(dropout=0.0)
    trainer = MedicalModelTrainer(model, _config())
    result = trainer.train(_tokens(), output_dir=tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert not list(tmp_path.glob(".save_pretrained*"))
    fresh = tiny_bert(dropout=0.0)
    assert load_model(fresh, result.weights_path, strict=True) == (set(), [])
    fresh.load_state_dict(load_file(result.weights_path), strict=True)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    example = _tokens(4).tensors["input_ids"]
    model.eval(), reloaded.eval(), fresh.eval()
    with torch.no_grad():
        want = model(input_ids=example).logits
        torch.testing.assert_close(reloaded(input_ids=example).logits, want)
        torch.testing.assert_close(fresh(input_ids=example).logits, want)


def test_tied_weights_are_stored_once_and_load_strictly(tmp_path):
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    trainer = MedicalModelTrainer(model, _config())
    ids = _tokens().tensors["input_ids"]
    result = trainer.train(
        TensorDictDataset({"input_ids": ids, "labels": ids.clone()}), output_dir=tmp_path
    )
    torch.manual_seed(1)
    fresh = transformers.BertForMaskedLM(config)
    assert load_model(fresh, result.weights_path, strict=True) == (set(), [])
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    torch.testing.assert_close(
        reloaded.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight
    )
