"""Pictures of the model's predictions during training: ``visualize_every_steps`` and
``visualize_fn(batch, outputs, global_step, output_dir)``.

Every ``visualize_every_steps`` optimizer steps the Trainer runs the model on the step's last
micro-batch in eval mode without gradients (:func:`medfunc.eval_step`; on every rank, since a
sharded model gathers its parameters collectively) and rank 0 copies the batch and the outputs
to the host and calls ``visualize_fn`` with them. This is the only host
work of that step; steps in between are untouched. Without a ``visualize_fn``,
:func:`default_visualize` writes ``{output_dir}/visualizations/step{N}.png``:

- classification (logits ``[batch, classes]``): each example's predicted class probabilities
  as a heat map, its label marked;
- image-shaped outputs (logits ``[batch, classes, H, W]``, ``[batch, H, W]`` or a 3-d volume):
  input, target and prediction panels of the first example (a volume's middle slice).

Example:
    >>> batch = {"x": torch.randn(8, 6), "labels": torch.randint(0, 3, (8,))}
    >>> outputs = {"logits": torch.randn(8, 3)}
    >>> default_visualize(batch, outputs, 20, "run").relative_to("run").as_posix()
    'visualizations/step20.png'
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medfunc.atomic import atomic_write
from medfunc.data import to_device
from medfunc.metrics import find_logits

__all__ = ["FOLDER", "LABEL_KEYS", "Visualizer", "default_visualize"]

#: The folder of the default pictures, inside the run folder.
FOLDER = "visualizations"
#: Batch keys read as the labels / targets, in this order.
LABEL_KEYS = ("labels", "label", "targets", "target", "masks", "mask", "y")


def _labels(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[-1], Tensor):
        return batch[-1]
    return None


def _inputs(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    values = batch.items() if isinstance(batch, Mapping) else enumerate(batch or ())
    for key, value in values:
        if key not in LABEL_KEYS and isinstance(value, Tensor) and value.is_floating_point():
            return value
    return None


def _image(t: Tensor) -> Tensor:
    """A 2-d picture of one example: channels averaged, a volume's middle slice."""
    t = t.detach().float()
    while t.dim() > 2:
        t = t[t.shape[0] // 2] if t.dim() > 3 or t.shape[0] > 4 else t.mean(0)
    return t if t.dim() == 2 else t.reshape(1, -1)


def _prediction_map(logits: Tensor) -> Tensor:
    """The predicted mask of the first example: argmax over classes, or sigmoid > 0.5."""
    first = logits[0].detach().float()
    if first.dim() >= 3 and first.shape[0] > 1:
        return first.argmax(0)
    if first.dim() >= 3:
        first = first[0]
    return (first.sigmoid() > 0.5).float()


def _classification(figure: Any, logits: Tensor, labels: Tensor | None, step: int) -> None:
    logits = logits.detach().float()[:64]
    if logits.shape[-1] == 1:
        probs = torch.cat([1 - logits.sigmoid(), logits.sigmoid()], dim=-1)
    else:
        probs = logits.softmax(-1)
    axis = figure.add_subplot(1, 1, 1)
    image = axis.imshow(probs.T.numpy(), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
    figure.colorbar(image, ax=axis, label="predicted probability")
    if labels is not None and labels.dim() == 1:
        shown = labels.detach()[: probs.shape[0]].long()
        axis.scatter(range(len(shown)), shown.numpy(), marker="x", color="red", label="label")
        axis.legend(loc="upper right")
    axis.set_xlabel("example")
    axis.set_ylabel("class")
    axis.set_title(f"step {step}: predicted probabilities (red x: label)")


def _segmentation(figure: Any, batch: Any, logits: Tensor, labels: Tensor | None) -> None:
    panels = []
    inputs = _inputs(batch)
    if inputs is not None and inputs.dim() >= 3:
        panels.append(("input", _image(inputs[0])))
    if labels is not None and labels.dim() >= 3:
        panels.append(("target", _image(labels[0].float())))
    panels.append(("prediction", _image(_prediction_map(logits))))
    for i, (title, picture) in enumerate(panels, start=1):
        axis = figure.add_subplot(1, len(panels), i)
        axis.imshow(picture.numpy(), cmap="gray")
        axis.set_title(title)
        axis.axis("off")


def default_visualize(
    batch: Any, outputs: Any, global_step: int, output_dir: str | os.PathLike
) -> Path | None:
    """Write a PNG of the batch's predictions: ``{output_dir}/visualizations/step{N}.png``.

    Args:
        batch: the micro-batch (host copy), e.g. ``{"x": ..., "labels": ...}``.
        outputs: the model's outputs on it (host copy), with ``"logits"`` or a tensor.
        global_step: optimizer steps taken.
        output_dir: the run folder.

    Returns:
        The PNG written (atomically), or None with a warning when the outputs hold no logits
        to draw.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logits = outputs if isinstance(outputs, Tensor) else find_logits(outputs)
    if logits is None or logits.dim() < 2:
        warnings.warn(
            f"visualize_every_steps: step {global_step}'s outputs hold no logits [batch, ...] to "
            "draw; pass TrainerConfig.visualize_fn(batch, outputs, global_step, output_dir) to "
            "draw them yourself",
            UserWarning,
            stacklevel=2,
        )
        return None
    labels = _labels(batch)
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    if logits.dim() == 2:
        _classification(figure, logits, labels, global_step)
    else:
        _segmentation(figure, batch, logits, labels)
        figure.suptitle(f"step {global_step}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    path = Path(output_dir) / FOLDER / f"step{global_step}.png"
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    return path


class Visualizer:
    """Calls ``visualize_fn`` every ``every`` optimizer steps on rank 0 (see the module doc).

    Args:
        every: the interval in optimizer steps (None: never).
        fn: ``fn(batch, outputs, global_step, output_dir)``; default :func:`default_visualize`.
        main: whether this process draws (rank 0).

    Example::

        visualizer = Visualizer(50, None, main=True)
        visualizer.after_step(state, batch, global_step, run_folder)
    """

    def __init__(
        self,
        every: int | None,
        fn: Callable[[Any, Any, int, Path], Any] | None,
        *,
        main: bool,
    ) -> None:
        self.every = every
        self.fn = fn if fn is not None else default_visualize
        self.main = main

    def due(self, global_step: int) -> bool:
        """Whether step ``global_step`` is drawn (on rank 0; every rank runs the forward)."""
        return bool(self.every) and global_step % self.every == 0

    def after_step(self, state: Any, batch: Any, global_step: int, output_dir: Path) -> None:
        """Draw ``batch`` with the model of ``state`` if ``global_step`` is due.

        Args:
            state: the TrainState after the step.
            batch: the step's last micro-batch (on the training device).
            global_step: optimizer steps taken.
            output_dir: the run folder.
        """
        if not self.due(global_step):
            return
        from medfunc.step import eval_step

        # Every rank runs the forward: a sharded (FSDP/DeepSpeed) model gathers its parameters
        # collectively. Only rank 0 copies to the host and draws.
        outputs = eval_step(state, batch)["outputs"]
        if self.main:
            self.fn(to_device(batch, "cpu"), to_device(outputs, "cpu"), global_step, output_dir)
