"""The Trainer's data rule: lists and Datasets hold examples, DataLoaders and generators yield
batches; data that contradicts the rule is refused with a ConfigError, never trained on."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier
from torch.utils.data import DataLoader, default_collate

from medfunc.errors import ConfigError
from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig
from medfunc.trainer_data import looks_batched


def _tensors(n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(n, 6, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def _examples(n: int = 64) -> list[dict]:
    t = _tensors(n)
    return [{"x": t["x"][i], "labels": t["labels"][i]} for i in range(n)]


def _trainer(**options) -> MedicalModelTrainer:
    torch.manual_seed(0)
    base = dict(
        device="cpu", save_every_epochs=None, progress_bar=False, learning_rate=1e-2, log_every=1
    )
    return MedicalModelTrainer(TinyClassifier(), TrainerConfig(**{**base, **options}))


def test_a_list_of_examples_is_batched_and_shuffled_like_a_dataset(tmp_path):
    listed = _trainer(num_epochs=2, batch_size=8)
    result = listed.train(_examples(), output_dir=tmp_path / "list")
    assert result.global_step == 16  # 64 examples / 8 per batch x 2 epochs, not 128 steps of 1
    dataset = _trainer(num_epochs=2, batch_size=8)
    dataset.train(TensorDictDataset(_tensors()), output_dir=tmp_path / "dataset")
    for name, value in dataset.state.params.items():
        assert torch.equal(listed.state.params[name], value), name
    unshuffled = _trainer(num_epochs=2, batch_size=8, shuffle=False)
    unshuffled.train(_examples(), output_dir=tmp_path / "in-order")
    assert not torch.equal(unshuffled.state.params["fc1.weight"], listed.state.params["fc1.weight"])


def test_a_list_of_ready_batches_is_refused_and_a_dataloader_of_them_accepted(tmp_path):
    loader = DataLoader(TensorDictDataset(_tensors()), batch_size=8, shuffle=False)
    batches = list(loader)
    with pytest.raises(ConfigError) as caught:
        _trainer(batch_size=8).train(batches, output_dir=tmp_path / "refused")
    message = str(caught.value)
    assert "train_dataset is a list, so its items are taken as single examples" in message
    assert "DataLoader(data, batch_size=None)" in message
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="eval_dataset is a list"):
        _trainer().train(_examples(16), eval_dataset=batches, output_dir=tmp_path / "eval")

    a = _trainer(num_epochs=2)
    a.train(loader, eval_dataset=loader, output_dir=tmp_path / "loader")
    ready = DataLoader(batches, batch_size=None)
    b = _trainer(num_epochs=2)
    result = b.train(ready, eval_dataset=ready, output_dir=tmp_path / "ready")
    assert result.global_step == 16
    for name, value in a.state.params.items():
        assert torch.equal(value, b.state.params[name]), name
    with pytest.raises(ConfigError, match="one-shot iterator"):
        _trainer(num_epochs=2).train(iter(batches), output_dir=tmp_path / "it")


def test_a_dataloader_of_single_examples_is_refused(tmp_path):
    single = DataLoader(TensorDictDataset(_tensors()), batch_size=None)
    with pytest.raises(ConfigError) as caught:
        _trainer(batch_size=8).train(single, output_dir=tmp_path / "a")
    message = str(caught.value)
    assert "train_dataset is a DataLoader, so each item it yields is used as a ready batch" in (
        message
    )
    assert "Give the DataLoader a batch_size" in message and "batch_size=8" in message
    generator = ({"x": t, "labels": 0} for t in _tensors()["x"])
    with pytest.raises(ConfigError, match="is an iterable of batches"):
        _trainer(scheduler="none").train(generator, output_dir=tmp_path / "b")
    tuples = DataLoader(list(zip(_tensors()["x"], _tensors()["labels"])), batch_size=None)
    with pytest.raises(ConfigError, match="scalar labels"):
        _trainer().predict(tuples)


def test_a_collate_fn_batches_the_examples(tmp_path):
    calls = []

    def collate(items):
        calls.append(len(items))
        return default_collate(items)

    # in this process (num_workers=0), so that the calls are recorded here
    trainer = _trainer(batch_size=16, collate_fn=collate, num_workers=0)
    result = trainer.train(_examples(40), output_dir=tmp_path)
    assert result.global_step == 3 and calls == [16, 16, 8]
    with pytest.raises(ConfigError, match="collate_fn must be a callable"):
        TrainerConfig(collate_fn="stack")


def test_the_batch_heuristic_keeps_common_examples_apart_from_batches():
    t = _tensors(10)
    batches = [{"x": t["x"][i : i + 4], "labels": t["labels"][i : i + 4]} for i in (0, 4, 8)]
    assert looks_batched(batches)  # the last, partial batch may be smaller
    assert looks_batched([(b["x"], b["labels"]) for b in batches])
    assert not looks_batched(batches[::-1])  # a smaller batch that is not the last
    tokens = [{"input_ids": torch.arange(8), "labels": torch.arange(8)} for _ in range(4)]
    images = [{"pixels": torch.zeros(3, 5, 5), "labels": torch.tensor(1)} for _ in range(4)]
    one_by_one = [{"x": t["x"][i : i + 1], "labels": t["labels"][i : i + 1]} for i in range(4)]
    unlabelled = [{"x": t["x"][:4]}, {"x": t["x"][4:8]}]
    for examples in (tokens, images, one_by_one, unlabelled, _examples(4), []):
        assert not looks_batched(examples)
