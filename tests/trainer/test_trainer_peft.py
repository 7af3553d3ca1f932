"""PEFT models in the Trainer: the adapter is the final output (reloaded with
``PeftModel.from_pretrained``), checkpoints hold only the trainable parameters and their
optimizer state, resume from them is bitwise exact, and a different frozen base is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from medfunc.checkpoint.frozen import base_checksum
from medfunc.errors import CheckpointMismatchError, ConfigError
from medfunc.peft_models import trainable_only
from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

peft = pytest.importorskip("peft")


def _lora(shift: float = 0.0) -> torch.nn.Module:
    """A tiny BERT classifier with LoRA r=4 on query/value; ``shift`` alters the frozen base."""
    base = tiny_bert(dropout=0.1)
    with torch.no_grad():
        base.bert.embeddings.word_embeddings.weight.add_(shift)
    torch.manual_seed(1)
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"]
    )
    return peft.get_peft_model(base, config)


def _tokens(n: int = 48) -> TensorDictDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (n, 8), generator=g)
    return TensorDictDataset({"input_ids": ids, "labels": (ids[:, 0] % 3).long()})


def _config(**options) -> TrainerConfig:
    base = dict(device="cpu", progress_bar=False, batch_size=8, learning_rate=1e-2, num_epochs=3)
    return TrainerConfig(**{**base, **options})


def _trainable(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_the_adapter_is_saved_and_reloads_with_peft(tmp_path):
    trainer = MedicalModelTrainer(_lora(), _config(num_epochs=2))
    result = trainer.train(_tokens(), output_dir=tmp_path)
    assert result.weights_path == tmp_path / "adapter_model.safetensors"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert not (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob(".save_pretrained*"))
    reloaded = peft.PeftModel.from_pretrained(tiny_bert(dropout=0.1), tmp_path).eval()
    data = _tokens()
    with torch.no_grad():
        logits = reloaded(input_ids=data.tensors["input_ids"]).logits
    assert torch.equal(logits, trainer.predict(data))


def test_checkpoints_hold_only_the_trainable_parameters_by_default(tmp_path):
    model = _lora()
    trainable = _trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    MedicalModelTrainer(model, _config(num_epochs=1)).train(_tokens(), output_dir=tmp_path / "a")
    path = tmp_path / "a" / "checkpoint-epoch1.pt"
    payload = torch.load(path, weights_only=True)
    params = [k for k in payload["model_state"] if k in dict(model.named_parameters())]
    assert params == trainable
    assert len(payload["optimizer_state"]["state"]) == len(trainable)
    record = payload["medfunc_state"]["frozen_base"]
    assert record["sha256"] == base_checksum(frozen)
    assert record["parameters"] == len(frozen)

    full = _config(num_epochs=1, save_trainable_only=False)
    MedicalModelTrainer(_lora(), full).train(_tokens(), output_dir=tmp_path / "b")
    full_payload = torch.load(tmp_path / "b" / "checkpoint-epoch1.pt", weights_only=True)
    assert set(frozen) <= set(full_payload["model_state"])
    assert "frozen_base" not in full_payload["medfunc_state"]
    assert path.stat().st_size < (tmp_path / "b" / "checkpoint-epoch1.pt").stat().st_size


def test_a_plain_model_keeps_full_checkpoints_unless_asked(tmp_path):
    model = tiny_bert(dropout=0.0)
    model.bert.embeddings.requires_grad_(False)
    MedicalModelTrainer(model, _config(num_epochs=1)).train(_tokens(), output_dir=tmp_path / "a")
    payload = torch.load(tmp_path / "a" / "checkpoint-epoch1.pt", weights_only=True)
    assert "bert.embeddings.word_embeddings.weight" in payload["model_state"]

    model = tiny_bert(dropout=0.0)
    model.bert.embeddings.requires_grad_(False)
    config = _config(num_epochs=1, save_trainable_only=True)
    MedicalModelTrainer(model, config).train(_tokens(), output_dir=tmp_path / "b")
    payload = torch.load(tmp_path / "b" / "checkpoint-epoch1.pt", weights_only=True)
    assert "bert.embeddings.word_embeddings.weight" not in payload["model_state"]
    assert "classifier.weight" in payload["model_state"]


def test_resume_from_a_trainable_only_checkpoint_equals_the_uninterrupted_run(tmp_path):
    uninterrupted = MedicalModelTrainer(_lora(), _config())
    uninterrupted.train(_tokens(), output_dir=tmp_path / "a")
    resume_from = str(tmp_path / "a" / "checkpoint-epoch1.pt")
    resumed = MedicalModelTrainer(_lora(), _config(resume_from=resume_from))
    resumed.train(_tokens(), output_dir=tmp_path / "b")
    expected, found = uninterrupted.state, resumed.state
    assert int(found.step) == int(expected.step) == 18
    for name in expected.params:
        assert torch.equal(found.params[name], expected.params[name]), name
    for a, b in zip(
        torch.utils._pytree.tree_leaves(expected.opt_state),
        torch.utils._pytree.tree_leaves(found.opt_state),
    ):
        assert torch.equal(a, b)


def test_resume_refuses_a_different_frozen_base(tmp_path):
    MedicalModelTrainer(_lora(), _config(num_epochs=1)).train(_tokens(), output_dir=tmp_path / "a")
    path = tmp_path / "a" / "checkpoint-epoch1.pt"
    saved = torch.load(path, weights_only=True)["medfunc_state"]["frozen_base"]["sha256"]
    other = _lora(shift=0.01)
    other_sum = base_checksum({n: p for n, p in other.named_parameters() if not p.requires_grad})
    trainer = MedicalModelTrainer(other, _config(resume_from=str(path)))
    with pytest.raises(CheckpointMismatchError) as caught:
        trainer.train(_tokens(), output_dir=tmp_path / "b")
    message = str(caught.value)
    assert saved in message and other_sum in message and saved != other_sum
    assert "save_trainable_only=False" in message


def test_overwriting_a_peft_run_folder_removes_its_adapter_first(tmp_path):
    MedicalModelTrainer(_lora(), _config(num_epochs=1)).train(_tokens(), output_dir=tmp_path)
    first = (tmp_path / "adapter_model.safetensors").read_bytes()
    config = _config(num_epochs=1, learning_rate=1e-1, overwrite_output_dir=True)
    MedicalModelTrainer(_lora(), config).train(_tokens(), output_dir=tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-epoch1.pt"]


def test_sharded_runs_keep_full_checkpoints():
    with pytest.raises(ConfigError, match="save_trainable_only=True is not available with fsdp"):
        TrainerConfig(save_trainable_only=True, fsdp=True)
    model = _lora()
    assert trainable_only(None, model) and not trainable_only(None, model, sharded=True)
