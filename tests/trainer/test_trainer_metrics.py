"""The training loop's metric tracking: step metric sums, loop position; eval_metric names and
modes, undefined metrics during training, the per-batch and whole-set metric functions."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyClassifier

from medfunc.early_stopping import EarlyStopping
from medfunc.errors import ConfigError, NonFiniteError
from medfunc.recipes.base import TensorDictDataset
from medfunc.tracking import LoopPosition, StepMetricSums, check_skipped_run
from medfunc.trainer import MedicalModelTrainer, TrainerConfig


def _step_metrics(loss, grad_norm, lr, skipped, loss_scale=None):
    metrics = {
        "loss": torch.tensor(loss, dtype=torch.float32),
        "grad_norm": torch.tensor(grad_norm, dtype=torch.float32),
        "lr": torch.tensor(lr, dtype=torch.float64),
        "skipped": torch.tensor(skipped),
    }
    if loss_scale is not None:
        metrics["loss_scale"] = torch.tensor(loss_scale)
    return metrics


def test_step_metric_sums_average_each_interval_like_a_plain_loop():
    g = torch.Generator().manual_seed(5)
    steps = [
        (float(torch.rand((), generator=g)), float(torch.rand((), generator=g)), 0.1 / (i + 1), s)
        for i, s in enumerate([0, 1, 1, 0, 0, 1, 1, 1, 0, 0])
    ]
    sums = StepMetricSums(torch.device("cpu"))
    run = 0
    for interval in (steps[:4], steps[4:9], steps[9:]):
        longest = 0
        for loss, norm, lr, skipped in interval:
            sums.record(_step_metrics(loss, norm, lr, skipped, loss_scale=2.0**16))
            run = run + 1 if skipped else 0
            longest = max(longest, run)
        scalars, skipped_run = sums.flush()
        applied = [norm for _, norm, _, skipped in interval if not skipped]
        loss_mean = sum(torch.tensor(x[0]).double().item() for x in interval) / len(interval)
        assert scalars["train/loss"] == pytest.approx(loss_mean, rel=1e-12)
        norm_mean = sum(torch.tensor(n).double().item() for n in applied) / len(applied)
        assert scalars["train/grad_norm"] == pytest.approx(norm_mean, rel=1e-12)
        assert scalars["train/lr"] == interval[-1][2]
        assert scalars["train/skipped_steps"] == sum(s for *_, s in interval)
        assert scalars["train/loss_scale"] == 2.0**16
        assert skipped_run == longest
        assert sums.steps == 0


def test_a_run_of_skipped_steps_is_counted_across_intervals_and_stops_training():
    sums = StepMetricSums(torch.device("cpu"))
    for _ in range(3):
        sums.record(_step_metrics(float("nan"), float("nan"), 0.1, 1))
    scalars, first = sums.flush()
    assert math.isnan(scalars["train/grad_norm"]) and "train/loss_scale" not in scalars
    sums.record(_step_metrics(float("nan"), float("nan"), 0.1, 1))
    _, second = sums.flush()
    assert (first, second) == (3, 4)
    check_skipped_run(second, limit=5, step=4)
    check_skipped_run(second, limit=None, step=4)
    with pytest.raises(NonFiniteError, match=r"4 consecutive optimizer steps \(up to step 4\)"):
        check_skipped_run(second, limit=4, step=4)


def test_loop_position_round_trips_through_a_checkpoints_trainer_state():
    stopping = EarlyStopping(patience=3, mode="max", min_delta=0.01)
    position = LoopPosition(stopping, epoch=2, batch_index=6, global_step=12, last_eval_step=12)
    position.stopping.update(0.8)
    position.record_best(2, {"auroc": 0.8})
    position.best_checkpoint = "checkpoint-epoch2.pt"
    position.global_step = 13
    position.stopping.update(0.7)
    saved = position.to_trainer_state("auroc", run={"recipe": "breast_cancer"})
    assert saved == {
        "epoch": 2,
        "batch_index": 6,
        "loop_step": 13,
        "best_metric": 0.8,
        "patience_counter": 1,
        "last_eval_step": 12,
        "eval_metric": "auroc",
        "best_checkpoint": "checkpoint-epoch2.pt",
        "best_step": 12,
        "best_epoch": 2,
        "best_metrics": {"auroc": 0.8},
        "run": {"recipe": "breast_cancer"},
    }
    restored = LoopPosition.from_trainer_state(saved, EarlyStopping(patience=3, mode="max"))
    assert (restored.stopping.best, restored.stopping.wait) == (0.8, 1)
    assert (restored.best_checkpoint, restored.best_step, restored.best_epoch) == (
        "checkpoint-epoch2.pt",
        12,
        2,
    )
    assert restored.best_metrics == {"auroc": 0.8} and not restored.best_pending
    assert (restored.epoch, restored.batch_index, restored.global_step) == (2, 6, 13)
    assert restored.last_eval_step == 12
    # an older checkpoint without the loop entries resumes from its step counter
    legacy = LoopPosition.from_trainer_state({"global_step": 7}, EarlyStopping())
    assert (legacy.global_step, legacy.epoch, legacy.stopping.best) == (7, 0, None)


def _dataset(n: int, seed: int = 0, single_class: bool = False) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    labels = torch.zeros(n, dtype=torch.long) if single_class else (x[:, 0] > 0).long()
    return TensorDictDataset({"x": x, "labels": labels})


def _config(**options) -> TrainerConfig:
    base = {"device": "cpu", "progress_bar": False, "batch_size": 8, "learning_rate": 1e-2}
    return TrainerConfig(**{**base, **options})


def _model(**kwargs) -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(classes=2, **kwargs)


@pytest.mark.parametrize(
    "name, key, mode",
    [
        ("eval_loss", "loss", "min"),
        ("f1", "f1", "max"),
        ("accuracy", "accuracy", "max"),
        ("dice", "dice", "max"),
        ("iou", "iou", "max"),
        ("eval_auprc", "auprc", "max"),
        ("hausdorff", "hausdorff", "min"),
    ],
)
def test_the_original_eval_metric_names_are_accepted_with_their_mode(name, key, mode):
    config = TrainerConfig(eval_metric=name)
    assert (config.eval_metric, config.metric_mode) == (key, mode)
    assert TrainerConfig(eval_metric=name, eval_metric_mode="min").metric_mode == "min"


def test_a_misspelled_eval_metric_is_a_config_error_at_construction():
    with pytest.raises(ConfigError, match=r"eval_metric='aucroc' .* did you mean 'auroc'\?"):
        TrainerConfig(eval_metric="aucroc")
    with pytest.raises(ConfigError, match="did you mean 'dice'"):
        TrainerConfig.from_dict({"eval_metric": "eval_dise"})
    # a metric function may report any name: it is only known at run time
    assert TrainerConfig(eval_metric="score", eval_set_metrics=lambda o, y: {}).eval_metric == (
        "score"
    )


def test_an_undefined_auroc_is_no_improvement_and_training_goes_on(tmp_path):
    config = _config(num_epochs=3, eval_metric="auroc", early_stopping_patience=5)
    trainer = MedicalModelTrainer(_model(), config)
    with pytest.warns(RuntimeWarning, match="undefined"):
        result = trainer.train(
            _dataset(32), _dataset(16, seed=1, single_class=True), output_dir=tmp_path
        )
    assert result.epochs_completed == 3 and not result.stopped_early
    assert [math.isnan(row["auroc"]) for row in result.history] == [True] * 3
    assert result.best_metric is None and result.best_checkpoint is None
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == [
        "checkpoint-epoch1.pt",
        "checkpoint-epoch2.pt",
        "checkpoint-epoch3.pt",
    ]


class _NanInEval(TinyClassifier):
    """Trains normally; its evaluation logits are NaN for the second evaluation only."""

    evaluations = 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if not self.training and x.shape[0] and _NanInEval.evaluations == 1:
            out["logits"] = torch.full_like(out["logits"], math.nan)
        return out


def test_nan_logits_in_one_evaluation_count_as_no_improvement(tmp_path):
    torch.manual_seed(0)
    model = _NanInEval(classes=2)
    calls = []

    def count_evaluations(outputs_list, labels):
        calls.append(1)
        _NanInEval.evaluations = len(calls)
        return {}

    config = _config(num_epochs=3, eval_metric="auroc", eval_set_metrics=count_evaluations)
    _NanInEval.evaluations = 0
    with pytest.warns(RuntimeWarning, match="a logit is not finite"):
        result = MedicalModelTrainer(model, config).train(
            _dataset(32), _dataset(16, seed=1), output_dir=tmp_path
        )
    aurocs = [row["auroc"] for row in result.history]
    assert not math.isnan(aurocs[0]) and math.isnan(aurocs[1]) and not math.isnan(aurocs[2])
    assert result.epochs_completed == 3
    assert len(list(tmp_path.glob("checkpoint-epoch*.pt"))) == 3
    assert result.best_metric == max(aurocs[0], aurocs[2])


def test_the_original_per_batch_eval_compute_metrics_and_the_whole_set_form(tmp_path):
    seen_batches, seen_sets = [], []

    def per_batch(batch, model_output):  # written for the original trainer
        seen_batches.append(len(batch["labels"]))
        correct = model_output["logits"].argmax(-1) == batch["labels"]
        return {"batch_accuracy": correct.float().mean().item()}

    def whole_set(outputs_list, labels):
        seen_sets.append((len(outputs_list), len(labels)))
        logits = torch.cat([out["logits"] for out in outputs_list])
        return {"set_accuracy": float((logits.argmax(-1) == labels).double().mean())}

    config = _config(
        num_epochs=1,
        eval_batch_size=6,
        eval_metric="batch_accuracy",
        eval_compute_metrics=per_batch,
        eval_set_metrics=whole_set,
    )
    trainer = MedicalModelTrainer(_model(), config)
    result = trainer.train(_dataset(16), _dataset(20, seed=1), output_dir=tmp_path)
    assert seen_batches == [6, 6, 6, 2] and seen_sets == [(4, 20)]
    metrics = result.eval_metrics
    # the example-weighted mean of per-batch means is the accuracy over all 20 examples
    assert metrics["batch_accuracy"] == pytest.approx(metrics["set_accuracy"], abs=1e-6)
    assert metrics["batch_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert result.best_metric == metrics["batch_accuracy"]
