"""Quick start: fine-tune a small classifier with MedicalModelTrainer.

Trains an MLP to tell malignant from benign tumours on the Wisconsin diagnostic breast cancer data
that ships with scikit-learn (nothing is downloaded). A validation split chooses the model
(AUROC-based early stopping, the best epoch loaded at the end); a test split that training never
sees reports it. TensorBoard logs, epoch checkpoints and a TorchScript export.

Run:
    python examples/quickstart.py --output-dir runs/quickstart
    tensorboard --logdir runs/quickstart/tb_logs
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

from medfunc.recipes import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig


class Classifier(nn.Module):
    """MLP returning ``{"logits"}`` and, given ``labels``, the cross-entropy ``"loss"``."""

    def __init__(self, features: int = 30, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 2)
        )

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(features)
        if labels is None:
            return {"logits": logits}
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def datasets(seed: int = 0) -> tuple[TensorDictDataset, TensorDictDataset, TensorDictDataset]:
    """A shuffled 60/20/20 train/validation/test split, standardised with the training
    statistics; 1 = malignant."""
    raw = load_breast_cancer()
    x = torch.tensor(raw.data, dtype=torch.float32)
    y = torch.tensor(1 - raw.target)  # scikit-learn codes malignant as 0
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    first, second = int(0.6 * len(y)), int(0.8 * len(y))
    parts = order[:first], order[first:second], order[second:]
    mean, std = x[parts[0]].mean(0), x[parts[0]].std(0)
    x = (x - mean) / std
    return tuple(TensorDictDataset({"features": x[p], "labels": y[p]}) for p in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/quickstart")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    train_ds, val_ds, test_ds = datasets()
    torch.manual_seed(0)
    model = Classifier()
    config = TrainerConfig(
        num_epochs=args.epochs,
        batch_size=32,
        learning_rate=3e-3,
        weight_decay=0.01,
        scheduler="linear_warmup",
        warmup_steps=10,
        eval_metric="auroc",
        early_stopping_patience=5,
        save_every_epochs=5,
        log_every=10,
        enable_tensorboard=True,
        export_torchscript=True,
        export_input_example={"features": val_ds.tensors["features"][:1]},
    )
    trainer = MedicalModelTrainer(model, config)
    result = trainer.train(train_ds, val_ds, output_dir=args.output_dir)

    metrics = trainer.evaluate(test_ds)  # the best model (by validation AUROC) on unseen cases
    print(f"test AUROC {metrics['auroc']:.4f}, accuracy {metrics['accuracy']:.4f}")
    stopped = ", stopped early" if result.stopped_early else ""
    print(
        f"{result.global_step} optimizer steps{stopped}; checkpoints: "
        f"{[p.name for p in result.checkpoints]}"
    )
    print(f"weights: {result.weights_path}; exports: {result.exports}")
    malignant = trainer.predict(test_ds).softmax(dim=-1)[:, 1]
    print(f"predicted P(malignant) of the first 5 test cases: {malignant[:5].tolist()}")


if __name__ == "__main__":
    main()
