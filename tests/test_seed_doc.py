"""The seed document's snippets run as written, with ``medfunc.trainer`` as the import path.

Only the snippets' placeholders (``model = ...``, ``train_ds = ...``) are filled in with a small
real model and dataset; every other line is the seed's text.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from medfunc.checkpoint import read_checkpoint
from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

QUICK_START = """
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

model = ...  # a torch.nn.Module that returns {"loss": loss} or a loss tensor
train_ds = ...  # PyTorch Dataset or iterable of dict batches

config = TrainerConfig(
    num_epochs=1,
    batch_size=8,
    learning_rate=5e-5,
    optimizer="adamw",
    scheduler="linear_warmup",
    warmup_steps=10,
    use_amp=False,  # set True on CUDA for mixed precision
    save_every_epochs=1,
    enable_tensorboard=False,
)

trainer = MedicalModelTrainer(model, config)
trainer.train(train_ds, eval_dataset=None, output_dir="./fine_tuned_model")
"""

RESUME = """
config = TrainerConfig(resume_from="./fine_tuned_model/checkpoint-epoch1.pt")
trainer = MedicalModelTrainer(model, config)
trainer.train(train_ds, eval_dataset)
"""

EXPORT = """
config = TrainerConfig(
    export_torchscript=True,
    export_onnx=False,
    export_input_example={"input_ids": torch.zeros(1, 8, dtype=torch.long)},
)
"""


class TokenClassifier(nn.Module):
    """Mean-pooled token embeddings and a linear head; returns {"loss", "logits"}."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(self.embed(input_ids).mean(dim=1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _token_data(n: int, seed: int = 0) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (n, 8), generator=g)
    return TensorDictDataset({"input_ids": ids, "labels": (ids[:, 0] < 16).long()})


def _fill(snippet: str, **values: str) -> str:
    """Replace the snippet's ``name = ...`` placeholder lines; keep every other line."""
    for name, expression in values.items():
        snippet, count = re.subn(
            rf"^{name} = \.\.\..*$", f"{name} = {expression}", snippet, flags=re.M
        )
        assert count == 1, name
    return snippet


def _model(seed: int) -> TokenClassifier:
    torch.manual_seed(seed)
    return TokenClassifier()


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = {"torch": torch, "_model": _model, "_token_data": _token_data}
    exec(QUICK_START.splitlines()[1], names)  # the seed's import line
    return names


def test_quick_start_then_resume_from_the_epoch_checkpoint(namespace, tmp_path):
    exec(_fill(QUICK_START, model="_model(0)", train_ds="_token_data(96)"), namespace)
    folder = tmp_path / "fine_tuned_model"
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint-epoch1.pt",
        "manifest.json",  # model_versioning=True, the original's default
        "metrics.jsonl",
        "model.safetensors",
        "model.v1.safetensors",
    ]
    saved = read_checkpoint(folder / "checkpoint-epoch1.pt")
    assert saved["trainer_state"]["epoch"] == 1 and saved["trainer_state"]["global_step"] == 12
    trained = namespace["model"]
    for name, value in trained.state_dict().items():
        assert torch.equal(saved["model_state"][name], value), name

    namespace.update(model=_model(1), eval_dataset=_token_data(24, seed=1))
    exec(RESUME, namespace)
    for name, value in namespace["model"].state_dict().items():
        assert torch.equal(value, saved["model_state"][name]), name
    assert int(namespace["trainer"].state.step) == 12


def test_export_snippet_writes_a_verified_torchscript_file(namespace, tmp_path):
    exec(EXPORT, namespace)
    config = namespace["config"]
    model = _model(0)
    result = MedicalModelTrainer(model, config).train(_token_data(32), output_dir=tmp_path / "out")
    assert result.exports == {"torchscript": tmp_path / "out" / "model.pt"}
    example = {"input_ids": torch.randint(0, 32, (3, 8))}
    loaded = torch.jit.load(str(result.exports["torchscript"]))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**example)["logits"], model(**example)["logits"])


def test_logging_section_tensorboard_under_tb_logs(tmp_path):
    """``enable_tensorboard=True`` writes scalars under ``{output_dir}/tb_logs/``."""
    config = TrainerConfig(enable_tensorboard=True, log_every=2, progress_bar=False)
    MedicalModelTrainer(_model(0), config).train(_token_data(32), output_dir=tmp_path)
    assert len(list((tmp_path / "tb_logs").glob("events.out.tfevents.*"))) == 1
