"""Segmentation metrics over the whole set: Dice and IoU against scikit-learn, Hausdorff against
scipy, through the evaluation accumulator batch by batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import directed_hausdorff
from sklearn.metrics import f1_score, jaccard_score
from torch import nn

import medfunc as mf
from medfunc.metrics import evaluate_batches
from medfunc.segmentation_metrics import SegmentationStats, segmentation_maps

TOL = 1e-6


def _blobs(n, classes, size=12, seed=0):
    """Class maps made of random rectangles (realistic regions, some images without a class)."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for c in range(1, classes):
            if torch.rand((), generator=g) < 0.2:
                continue
            top, left = torch.randint(0, size - 3, (2,), generator=g).tolist()
            h, w = torch.randint(2, 6, (2,), generator=g).tolist()
            maps[i, top : top + h, left : left + w] = c
    return maps


def _noisy_logits(targets, classes, seed):
    """Logits whose argmax is mostly the target, with random errors."""
    g = torch.Generator().manual_seed(seed)
    onehot = nn.functional.one_hot(targets, classes).permute(0, 3, 1, 2).float()
    return 2.0 * onehot + 1.5 * torch.randn(onehot.shape, generator=g)


def _hausdorff(pred, true):
    a, b = np.argwhere(pred), np.argwhere(true)
    return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])


def _reference(predictions, targets, classes):
    flat_p, flat_t = predictions.reshape(-1).numpy(), targets.reshape(-1).numpy()
    keep = flat_t != -100
    flat_p, flat_t = flat_p[keep], flat_t[keep]
    present = [c for c in range(1, classes) if (flat_p == c).any() or (flat_t == c).any()]
    dice = f1_score(flat_t, flat_p, labels=present, average="macro", zero_division=0)
    iou = jaccard_score(flat_t, flat_p, labels=present, average="macro", zero_division=0)
    distances = []
    for p, t in zip(predictions, targets):
        p, t = p.masked_fill(t == -100, 0), t.masked_fill(t == -100, 0)
        for c in range(1, classes):
            if (p == c).any() and (t == c).any():
                distances.append(_hausdorff((p == c).numpy(), (t == c).numpy()))
    return {"dice": dice, "iou": iou, "hausdorff": float(np.mean(distances))}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_dice_iou_hausdorff_over_the_whole_set_equal_the_references(seed):
    classes = 4
    targets = _blobs(10, classes, seed=seed)
    logits = _noisy_logits(targets, classes, seed=seed + 10)
    stats = SegmentationStats()
    for i in range(0, 10, 3):  # batches of 3, 3, 3, 1
        stats.add(*segmentation_maps(logits[i : i + 3], targets[i : i + 3]))
    got = stats.compute()
    want = _reference(logits.argmax(1), targets, classes)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=TOL), key


def test_whole_set_dice_is_not_the_mean_of_batch_dice():
    classes = 2
    targets = _blobs(6, classes, seed=3)
    logits = _noisy_logits(targets, classes, seed=4)
    whole = SegmentationStats()
    per_batch = []
    for i in range(0, 6, 2):
        maps = segmentation_maps(logits[i : i + 2], targets[i : i + 2])
        whole.add(*maps)
        one = SegmentationStats()
        one.add(*maps)
        per_batch.append(one.compute()["dice"])
    want = _reference(logits.argmax(1), targets, classes)["dice"]
    assert whole.compute()["dice"] == pytest.approx(want, abs=TOL)
    assert abs(sum(per_batch) / len(per_batch) - want) > 1e-3


@pytest.mark.parametrize("channel", [True, False])
def test_binary_sigmoid_masks_with_or_without_channel_dimension_and_ignored_pixels(channel):
    targets = _blobs(5, 2, seed=5)
    logits = _noisy_logits(targets, 2, seed=6)
    binary_logits = (logits[:, 1] - logits[:, 0]).unsqueeze(1)  # (N, 1, H, W)
    labels = targets.float()  # float 0/1 masks, (N, H, W)
    labels[:, :, :2] = -100
    if channel:
        labels = labels.unsqueeze(1)  # (N, 1, H, W)
    stats = SegmentationStats()
    stats.add(*segmentation_maps(binary_logits, labels))
    want = _reference((binary_logits[:, 0] > 0).long(), labels.reshape(5, 12, 12).long(), 2)
    got = stats.compute()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=TOL), key


def test_no_foreground_anywhere_gives_nan_with_warnings():
    stats = SegmentationStats()
    stats.add(*segmentation_maps(-torch.ones(2, 1, 5, 5), torch.zeros(2, 1, 5, 5)))
    with pytest.warns(RuntimeWarning, match="dice and iou are undefined"):
        got = stats.compute()
    assert all(math.isnan(v) for v in got.values())


def test_shapes_that_are_not_segmentation():
    assert segmentation_maps(torch.randn(4, 3), torch.tensor([0, 1, 2, 0])) is None
    assert segmentation_maps(torch.randn(4, 7, 3), torch.randint(0, 3, (4, 7))) is None  # tokens
    assert segmentation_maps(torch.randn(2, 3, 5, 5), torch.rand(2, 5, 5)) is None  # soft labels
    assert segmentation_maps(torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 4, 5))) is None


class TinySegmenter(nn.Module):
    """A 1x1-conv segmenter returning {"loss", "logits"} with (N, C, H, W) logits."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, classes, kernel_size=3, padding=1)

    def forward(self, image, labels):
        logits = self.conv(image)
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def test_evaluate_batches_reports_segmentation_metrics_of_the_whole_set():
    torch.manual_seed(0)
    model = TinySegmenter()
    state = mf.init_state(model, mf.optim.chain())
    targets = _blobs(7, 3, seed=8)
    images = torch.randn(7, 2, 12, 12, generator=torch.Generator().manual_seed(9))
    images[:, 0] += targets.float()
    batches = [{"image": images[i : i + 3], "labels": targets[i : i + 3]} for i in range(0, 7, 3)]
    got = evaluate_batches(state, batches)
    with torch.no_grad():
        out = model.eval()(images, targets)
    want = _reference(out["logits"].argmax(1), targets, 3)
    assert set(got) == {"loss", "dice", "iou", "hausdorff"}
    assert got["loss"] == pytest.approx(float(out["loss"]), rel=1e-6)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=TOL), key


def test_a_whole_set_metric_function_gets_the_segmentation_labels():
    torch.manual_seed(0)
    state = mf.init_state(TinySegmenter(), mf.optim.chain())
    targets = _blobs(5, 3, seed=12)
    images = torch.randn(5, 2, 12, 12, generator=torch.Generator().manual_seed(13))
    batches = [{"image": images[i : i + 2], "labels": targets[i : i + 2]} for i in range(0, 5, 2)]
    seen = []
    got = evaluate_batches(
        state, batches, lambda outputs, labels: seen.append(labels) or {"pixels": labels.numel()}
    )
    assert torch.equal(seen[0], targets) and got["pixels"] == targets.numel()
    assert {"dice", "iou", "hausdorff"} <= set(got)


def test_volumes_get_the_three_dimensional_hausdorff_distance():
    g = torch.Generator().manual_seed(14)
    targets = torch.zeros(3, 6, 9, 9, dtype=torch.long)
    targets[0, 1:4, 2:6, 3:7] = 1
    targets[1, 2:5, 1:4, 1:8] = 1
    targets[2, 0:2, 5:9, 0:3] = 1
    logits = 2.0 * nn.functional.one_hot(targets, 2).permute(0, 4, 1, 2, 3).float()
    logits += 1.2 * torch.randn(logits.shape, generator=g)
    stats = SegmentationStats()
    stats.add(*segmentation_maps(logits, targets))
    predictions = logits.argmax(1)
    distances = [
        _hausdorff((p == 1).numpy(), (t == 1).numpy())
        for p, t in zip(predictions, targets)
        if (p == 1).any() and (t == 1).any()
    ]
    assert len(distances) == 3
    assert stats.compute()["hausdorff"] == pytest.approx(float(np.mean(distances)), abs=TOL)
