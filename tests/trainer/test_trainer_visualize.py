"""visualize_every_steps / visualize_fn: the user's function gets host copies at the right
steps; the default writes a valid PNG of the predictions (classification and segmentation)."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier, make_dataset
from matplotlib.image import imread
from torch import nn

from medfunc.errors import ConfigError
from medfunc.trainer import MedicalModelTrainer, TrainerConfig
from medfunc.visualize import default_visualize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _config(**options) -> TrainerConfig:
    base = dict(
        device="cpu",
        progress_bar=False,
        batch_size=4,
        num_workers=0,
        shuffle=False,
        save_every_epochs=None,
        model_versioning=False,
    )
    return TrainerConfig(**{**base, **options})


def _assert_png(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    return pixels.shape[:2]


def test_a_user_function_gets_host_copies_every_n_steps(tmp_path):
    calls = []

    def record(batch, outputs, global_step, output_dir):
        calls.append((global_step, batch, outputs, output_dir))

    data = make_dataset(16)
    torch.manual_seed(0)
    model = TinyClassifier(dropout=0.5)
    config = _config(num_epochs=2, visualize_every_steps=3, visualize_fn=record)
    result = MedicalModelTrainer(model, config).train(data, output_dir=tmp_path)
    assert result.global_step == 8
    assert [c[0] for c in calls] == [3, 6]
    step, batch, outputs, output_dir = calls[0]
    assert output_dir == result.output_dir
    # the step's micro-batch (in order: rows 8..11 at step 3) and its eval-mode outputs
    assert torch.equal(batch["x"], data.tensors["x"][8:12])
    assert outputs["logits"].shape == (4, 3) and outputs["logits"].device.type == "cpu"
    assert not outputs["logits"].requires_grad
    _, batch, outputs, _ = calls[1]  # step 6 is the second batch of epoch 2: rows 4..7
    assert torch.equal(batch["x"], data.tensors["x"][4:8])


def test_the_default_writes_a_png_of_the_predictions_at_due_steps(tmp_path):
    config = _config(num_epochs=1, visualize_every_steps=2)
    MedicalModelTrainer(TinyClassifier(), config).train(make_dataset(16), output_dir=tmp_path)
    pictures = sorted(p.name for p in (tmp_path / "visualizations").iterdir())
    assert pictures == ["step2.png", "step4.png"]
    _assert_png(tmp_path / "visualizations" / "step2.png")


def test_no_visualisation_without_the_option(tmp_path):
    MedicalModelTrainer(TinyClassifier(), _config()).train(make_dataset(16), output_dir=tmp_path)
    assert not (tmp_path / "visualizations").exists()


def test_segmentation_outputs_get_input_target_prediction_panels(tmp_path):
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(2, 1, 16, 24, generator=g),
        "labels": torch.randint(0, 2, (2, 16, 24), generator=g),
    }
    outputs = {"logits": nn.Conv2d(1, 2, 3, padding=1)(batch["pixel_values"]).detach()}
    path = default_visualize(batch, outputs, 7, tmp_path)
    assert path == tmp_path / "visualizations" / "step7.png"
    height, width = _assert_png(path)
    assert width > 2 * height  # three panels side by side
    volume = {"x": torch.randn(1, 1, 5, 8, 8), "labels": torch.zeros(1, 5, 8, 8)}
    _assert_png(default_visualize(volume, torch.randn(1, 3, 5, 8, 8), 8, tmp_path))


def test_outputs_without_logits_warn_and_write_nothing(tmp_path):
    with pytest.warns(UserWarning, match="hold no logits"):
        path = default_visualize({"x": torch.ones(2)}, {"loss": torch.tensor(1.0)}, 1, tmp_path)
    assert path is None
    assert not (tmp_path / "visualizations").exists()


def test_visualize_options_are_validated():
    with pytest.raises(ConfigError, match="visualize_fn"):
        TrainerConfig(visualize_fn="plot.png")
    with pytest.raises(ConfigError, match="visualize_every_steps"):
        TrainerConfig(visualize_every_steps=0)
