"""Whole-set metrics under torchrun: two Gloo ranks, each evaluating its share of the batches,
both get the metrics a single process computes over all of them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, torchrun_command
from torch import nn

import medfunc as mf
from medfunc.metrics import evaluate_batches

SCRIPT = Path(__file__).parent / "scripts" / "metrics_worker.py"


class _Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3, padding=1)

    def forward(self, image, labels):
        logits = self.conv(image)
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def _batches(kind: str) -> list[dict]:
    g = torch.Generator().manual_seed(11)
    if kind == "classification":
        x = torch.randn(29, 6, generator=g)
        labels = (x[:, 0] + 0.3 * torch.randn(29, generator=g) > 0).long()
        return [{"x": x[i : i + 4], "labels": labels[i : i + 4]} for i in range(0, 29, 4)]
    labels = torch.zeros(7, 10, 10, dtype=torch.long)
    for i in range(7):
        labels[i, i : i + 4, 2:6] = 1 + i % 2
    image = labels.float().unsqueeze(1) + torch.randn(7, 1, 10, 10, generator=g)
    return [{"image": image[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 7, 2)]


def _per_batch(batch, outputs):
    return {"mean_label": batch["labels"].float().mean()}


def evaluate_share(rank: int, world: int) -> dict:
    """The metrics of rank ``rank``'s share (every world-th batch) of both evaluation sets."""
    torch.manual_seed(0)
    states = {
        "classification": mf.init_state(TinyClassifier(classes=2), mf.optim.chain()),
        "segmentation": mf.init_state(_Segmenter(), mf.optim.chain()),
    }
    return {
        kind: evaluate_batches(
            state,
            _batches(kind)[rank::world],
            lambda outputs, labels: {"n": len(labels)},
            batch_metric_fn=_per_batch,
        )
        for kind, state in states.items()
    }


@pytest.mark.slow
def test_two_ranks_get_the_metrics_of_the_whole_set(tmp_path):
    command = torchrun_command(SCRIPT)
    env = dict(os.environ, MEDFUNC_TEST_OUT=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"metrics_rank{r}.json").read_text()) for r in (0, 1)]
    single = evaluate_share(0, 1)
    assert set(single["classification"]) >= {"auroc", "auprc", "specificity", "mean_label", "n"}
    assert set(single["segmentation"]) >= {"dice", "iou", "hausdorff", "mean_label", "n"}
    for got in ranks:
        for kind, want in single.items():
            assert got[kind].keys() == want.keys()
            for key, value in want.items():
                assert got[kind][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (kind, key)
