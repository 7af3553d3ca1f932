"""Shared fixtures: small real models and batches."""

from __future__ import annotations

import os
import socket
import sys

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


def free_port() -> int:
    """A TCP port free on this machine now (for a torchrun ``--master_port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
