"""Map-style data through a real DataLoader with worker processes, and the device options."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import weakref

import pytest
import torch
from conftest import TinyClassifier
from torch.utils.data import Dataset, get_worker_info

from medfunc import device_options
from medfunc.trainer import MedicalModelTrainer, TrainerConfig
from medfunc.trainer_data import evaluation_batches, loader_options, training_batches


class WhoReads(Dataset):
    """Examples that say which process read them (and which loader worker)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        info = get_worker_info()
        return {
            "x": self.x[index],
            "labels": self.labels[index],
            "index": torch.tensor(index),
            "pid": torch.tensor(os.getpid()),
            "worker": torch.tensor(-1 if info is None else info.id),
        }


def _examples(n: int = 40) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {"x": torch.randn(6, generator=g), "labels": torch.randint(0, 3, (), generator=g)}
        for _ in range(n)
    ]


def test_the_original_defaults_of_the_loader_and_distribution_options():
    config = TrainerConfig()
    assert (config.num_workers, config.pin_memory, config.persistent_workers) == (2, True, True)
    assert config.prefetch_factor == 2 and config.cudnn_benchmark is True
    assert (config.use_ddp, config.ddp_backend, config.ddp_find_unused_parameters) == (
        False,
        "nccl",
        False,
    )


def test_workers_read_the_batches_in_the_seeded_order():
    config = TrainerConfig(batch_size=8, num_workers=2, prefetch_factor=3, seed=5)
    batches = training_batches(WhoReads(40), config, rank=0, world=1)
    loader = batches._loader
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (2, 3, True)
    for epoch in range(2):
        read = list(batches.epoch(epoch))
        assert {int(w) for b in read for w in b["worker"]} == {0, 1}
        assert all(int(pid) != os.getpid() for b in read for pid in b["pid"])
        order = torch.randperm(40, generator=torch.Generator().manual_seed(5 + epoch))
        assert torch.equal(torch.cat([b["index"] for b in read]), order)
    resumed = list(batches.epoch(1, start=3))
    assert torch.equal(torch.cat([b["index"] for b in resumed]), order[24:])


def test_batches_with_workers_are_freed_without_the_garbage_collector():
    # a reference cycle would leave the workers' shutdown to the cyclic collector, which can run
    # inside a worker forked later by another loader ("can only test a child process")
    config = TrainerConfig(batch_size=8, num_workers=2)
    gc.disable()
    try:
        batches = training_batches(WhoReads(16), config, rank=0, world=1)
        assert len(list(batches.epoch(0))) == 2
        workers = batches._loader._iterator._workers
        alive = weakref.ref(batches)
        del batches
        assert alive() is None
        for worker in workers:
            worker.join(timeout=30)
        assert not any(worker.is_alive() for worker in workers)
    finally:
        gc.enable()


def test_train_evaluate_and_predict_end_their_workers(tmp_path):
    before = set(multiprocessing.active_children())
    trainer = _trainer(num_epochs=1, save_every_steps=None)
    trainer.train(_examples(), _examples(16), output_dir=tmp_path / "run")
    trainer.evaluate(_examples(16))
    trainer.predict(_examples(16))
    assert set(multiprocessing.active_children()) == before

    calls = []

    def failing_loss(outputs, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the third batch fails")
        return outputs["loss"]

    failing = MedicalModelTrainer(TinyClassifier(), trainer.config, loss_fn=failing_loss)
    with pytest.raises(RuntimeError, match="the third batch fails"):
        failing.train(_examples(), output_dir=tmp_path / "failed")
    assert set(multiprocessing.active_children()) == before  # also when training fails


def test_evaluation_batches_with_workers_keep_the_data_order():
    config = TrainerConfig(batch_size=16, num_workers=2, persistent_workers=False)
    batches = evaluation_batches(WhoReads(40), config, rank=0, world=1)
    read = list(batches.epoch(0))
    assert torch.equal(torch.cat([b["index"] for b in read]), torch.arange(40))
    assert {int(w) for b in read for w in b["worker"]} == {0, 1}


def _trainer(**options) -> MedicalModelTrainer:
    torch.manual_seed(0)
    base = dict(
        device="cpu",
        num_epochs=2,
        batch_size=8,
        learning_rate=1e-2,
        progress_bar=False,
        save_every_steps=3,
        save_every_epochs=None,
        num_workers=2,
        scheduler="cosine",
    )
    return MedicalModelTrainer(TinyClassifier(dropout=0.2), TrainerConfig(**{**base, **options}))


def test_mid_epoch_resume_with_workers_equals_the_uninterrupted_run(tmp_path):
    examples = _examples()
    full = _trainer()
    full.train(examples, output_dir=tmp_path / "full")
    assert (tmp_path / "full" / "checkpoint-step3.pt").is_file()  # 5 steps per epoch: mid-epoch

    resumed = _trainer(resume_from=str(tmp_path / "full" / "checkpoint-step3.pt"))
    torch.manual_seed(123)  # the global RNG plays no part
    result = resumed.train(examples, output_dir=tmp_path / "full")
    assert result.global_step == 10
    for name, value in full.state.params.items():
        assert torch.equal(resumed.state.params[name], value), name
    full_moments = full.optimizer.state_dict()["state"]
    for index, entry in resumed.optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, full_moments[index][key]), (index, key)


def test_workers_give_the_same_run_as_the_main_process(tmp_path):
    examples = _examples()
    with_workers = _trainer(save_every_steps=None)
    with_workers.train(examples, output_dir=tmp_path / "workers")
    in_process = _trainer(save_every_steps=None, num_workers=0)
    in_process.train(examples, output_dir=tmp_path / "main")
    for name, value in with_workers.state.params.items():
        assert torch.equal(in_process.state.params[name], value), name


def test_cuda_only_options_say_once_what_they_did_on_the_cpu(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(device_options, "_logged", set())
    cudnn = torch.backends.cudnn.benchmark
    with caplog.at_level(logging.INFO, logger="medfunc.trainer"):
        for run in range(2):
            trainer = _trainer(num_epochs=1, save_every_steps=None)
            trainer.train(_examples(), output_dir=tmp_path / str(run))
    assert caplog.text.count("pin_memory=True has no effect on cpu") == 1
    assert caplog.text.count("cudnn_benchmark=True has no effect on cpu") == 1
    assert torch.backends.cudnn.benchmark == cudnn  # untouched off CUDA
    assert loader_options(TrainerConfig(), torch.device("cpu")).pin_memory is False


def test_the_distribution_options_resolve_for_the_device(caplog, monkeypatch):
    monkeypatch.setattr(device_options, "_logged", set())
    with caplog.at_level(logging.INFO, logger="medfunc.trainer"):
        cpu = device_options.resolve(TrainerConfig(), torch.device("cpu"), multi_process=True)
    assert cpu.ddp_backend == "gloo"
    assert "ddp_backend='nccl' needs CUDA; a multi-process run on cpu uses Gloo" in caplog.text
    assert "finds unused parameters by itself" in caplog.text
    cuda = device_options.resolve(TrainerConfig(), torch.device("cuda"))
    assert cuda == device_options.DeviceOptions(pin_memory=True, ddp_backend="nccl")
    gloo = TrainerConfig(ddp_backend="gloo", pin_memory=False)
    assert device_options.resolve(gloo, torch.device("cuda")).ddp_backend == "gloo"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_cudnn_benchmark_is_set_and_batches_are_pinned(tmp_path):
    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        trainer = _trainer(num_epochs=1, save_every_steps=None, device="cuda")
        trainer.train(_examples(), output_dir=tmp_path)
        assert torch.backends.cudnn.benchmark is True
        batches = training_batches(
            WhoReads(16), trainer.config, rank=0, world=1, loading=trainer._loading()
        )
        assert all(batch["x"].is_pinned() for batch in batches.epoch(0))
    finally:
        torch.backends.cudnn.benchmark = previous
