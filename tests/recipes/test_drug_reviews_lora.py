"""The drug_reviews_lora recipe: LoRA r=8 on MiniLM's query/value, trained end to end on a slice
of the bundled reviews; the saved adapter reloads with ``PeftModel.from_pretrained`` and predicts
what the trained model predicts."""

from __future__ import annotations

import pytest
import torch

from medfunc.errors import ConfigError
from medfunc.recipes import drug_reviews as dr
from medfunc.recipes import drug_reviews_lora as lora
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

peft = pytest.importorskip("peft")


def test_a_rank_below_one_is_refused():
    with pytest.raises(ConfigError, match="rank must be >= 1, got 0"):
        lora.build(rank=0)


@pytest.mark.slow
def test_the_recipe_trains_and_its_adapter_reloads_with_peft(tmp_path):
    parts = lora.build(max_train=48, max_eval=32, max_test=32, max_length=32)
    model = parts.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n or ".head." in n) for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_A" in n} == {"query", "value"}
    adapters = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert len(adapters) == 12 and all(p.shape[0] == 8 for p in adapters)

    config = {**parts.config, "num_epochs": 1, "device": "cpu", "progress_bar": False}
    trainer = MedicalModelTrainer(model, TrainerConfig(**config))
    result = trainer.train(parts.train_dataset, parts.eval_dataset, output_dir=tmp_path)
    assert result.global_step == 3
    saved = torch.load(result.checkpoints[0], weights_only=True)["model_state"]
    assert not [k for k in saved if "base_layer" in k or "word_embeddings" in k]
    assert result.weights_path == tmp_path / "adapter_model.safetensors"

    base = dr.MiniLMClassifier(dr.load_encoder())
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    test = parts.test_dataset
    with torch.no_grad():
        logits = reloaded(
            input_ids=test.tensors["input_ids"], attention_mask=test.tensors["attention_mask"]
        )["logits"]
    assert torch.equal(logits, trainer.predict(test))
    assert torch.equal(lora.load_adapter(tmp_path)(**test[:4])["logits"], logits[:4])
