"""Shared fixtures: small real models and batches."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
from torch import nn


class TinyClassifier(nn.Module):
    """An MLP classifier taking ``x`` (and optional ``labels``), returning {"loss", "logits"}."""

    def __init__(
        self,
        features: int = 6,
        hidden: int = 16,
        classes: int = 3,
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def make_batches(
    n: int, batch_size: int = 8, features: int = 6, classes: int = 3, seed: int = 0
) -> list[dict]:
    """``n`` fixed random dict batches {"x", "labels"}."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randn(batch_size, features, generator=g),
            "labels": torch.randint(0, classes, (batch_size,), generator=g),
        }
        for _ in range(n)
    ]


def gradscaler_step(model: nn.Module, batch: dict, opt, scaler, device: str = "cpu") -> bool:
    """One step of the imperative fp16 reference: the loss under fp16 autocast on ``device``,
    ``scaler.scale(loss).backward()``, ``scaler.step``, ``scaler.update``, ``zero_grad``.
    Returns whether the scaler skipped the update (its scale dropped)."""
    with torch.autocast(device, dtype=torch.float16):
        loss = model(**batch)["loss"]
    scaler.scale(loss).backward()
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return scaler.get_scale() < scale_before


def make_dataset(n: int, seed: int = 0):
    """``n`` fixed random examples {"x": 6 features, "labels": 3 classes} as a
    :class:`~medfunc.recipes.base.TensorDictDataset` (the Trainer tests' data)."""
    from medfunc.recipes.base import TensorDictDataset

    g = torch.Generator().manual_seed(seed)
    return TensorDictDataset(
        {"x": torch.randn(n, 6, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}
    )


def tiny_bert(dropout: float = 0.1) -> nn.Module:
    """A tiny Hugging Face ``BertForSequenceClassification`` built from a config (no download)."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def end_worker(code: int = 0) -> None:
    """End a torchrun worker once its results are written, without interpreter teardown.

    Under load, a 2-process Gloo job whose every rank has finished and written its results
    sometimes aborts in torch's C++ teardown at exit ("terminate called without an active
    exception", SIGABRT, no Python frame on the stack; about 1 run in 4 on a busy 2-core
    machine, none in 30 runs of a bare all-reduce script). The tests check what the workers
    computed, so the workers flush and leave here, with exit status ``code``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, as in a resuming worker (CPU reductions depend on the
    thread count); the count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port free on this machine now (for a torchrun ``--master_port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(script: str | os.PathLike, *args: str) -> list[str]:
    """The command line running ``script`` with ``args`` on 2 local ranks under torchrun (on a
    free port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]


_ORIGINAL_CONFIG = """
import dataclasses
from typing import Any, Optional

import torch


@dataclasses.dataclass
class TrainerConfig:
    learning_rate: float = 5e-5
    betas: tuple = (0.9, 0.999)
    amp_dtype: torch.dtype = torch.float16
    deepspeed_config: Optional[Any] = None
    activation_recompute_patterns: list = dataclasses.field(
        default_factory=lambda: ["attention", "conv3d"]
    )
"""


def save_like_the_original(folder, path, payload: dict, **config_fields) -> None:
    """``torch.save`` ``payload`` plus ``config``: an instance of a stand-in class importable as
    ``medvllm.training.trainer.TrainerConfig`` (written under ``folder``), pickled as the
    original trainer does; afterwards the stand-in package is gone from sys.path and
    sys.modules, so reading the file cannot import it."""
    import importlib

    package = folder / "original_pkg"
    (package / "medvllm" / "training").mkdir(parents=True, exist_ok=True)
    (package / "medvllm" / "__init__.py").write_text("")
    (package / "medvllm" / "training" / "__init__.py").write_text("")
    (package / "medvllm" / "training" / "trainer.py").write_text(_ORIGINAL_CONFIG)
    sys.path.insert(0, str(package))
    try:
        module = importlib.import_module("medvllm.training.trainer")
        torch.save({**payload, "config": module.TrainerConfig(**config_fields)}, path)
    finally:
        sys.path.remove(str(package))
        for name in [n for n in sys.modules if n == "medvllm" or n.startswith("medvllm.")]:
            del sys.modules[name]
