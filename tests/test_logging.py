"""MetricLogger sinks against the real formats: JSON lines, TensorBoard event files, W&B offline
runs, and the PNG plot."""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medfunc.errors import ConfigError
from medfunc.logging import create_logger
from medfunc.plots import metric_series, plot_metrics, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_holds_each_log_call(tmp_path):
    with create_logger(tmp_path / "run", progress=False) as logger:
        logger.log({"train/loss": torch.tensor(0.75), "train/lr": 1e-3}, step=1)
        logger.log({"train/loss": 0.5, "train/grad_norm": torch.tensor([2.0])}, step=2)
        logger.log({"eval/loss": 0.4, "eval/auroc": 0.93, "eval/bad": math.nan}, step=2)
    records = _records(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[0]["train/loss"] == 0.75
    assert records[0]["train/lr"] == 1e-3
    assert records[1] == {
        "step": 2,
        "time": records[1]["time"],
        "train/loss": 0.5,
        "train/grad_norm": 2.0,
    }
    assert records[2]["eval/auroc"] == 0.93
    assert records[2]["eval/bad"] == "nan"
    assert records[0]["time"] <= records[1]["time"] <= records[2]["time"]
    assert math.isnan(read_metrics(tmp_path / "run" / "metrics.jsonl")[2]["eval/bad"])


def test_metrics_line_is_flushed_before_close(tmp_path):
    logger = create_logger(tmp_path, progress=False)
    logger.log({"train/loss": 1.25}, step=7)
    assert _records(tmp_path / "metrics.jsonl")[0]["train/loss"] == 1.25
    logger.close()
    logger.close()
    with pytest.raises(ConfigError, match="after close"):
        logger.log({"train/loss": 1.0}, step=8)


def test_non_numeric_metric_names_the_key(tmp_path):
    with create_logger(tmp_path, progress=False) as logger:
        with pytest.raises(ConfigError, match="train/loss"):
            logger.log({"train/loss": torch.ones(3)}, step=1)


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    losses = [0.9, 0.7, 0.55]
    lrs = [1e-4, 2e-4, 3e-4]
    with create_logger(tmp_path, enable_tensorboard=True, progress=False) as logger:
        for step, (loss, lr) in enumerate(zip(losses, lrs), start=1):
            logger.log({"train/loss": torch.tensor(loss), "train/lr": lr}, step=step)
    tb_dir = tmp_path / "tb_logs"
    assert list(tb_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    assert {"train/loss", "train/lr"} <= set(events.Tags()["scalars"])
    loss_events = events.Scalars("train/loss")
    assert [e.step for e in loss_events] == [1, 2, 3]
    assert [e.value for e in loss_events] == pytest.approx(losses, rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx(lrs, rel=1e-6)


def test_tensorboard_custom_dir(tmp_path):
    with create_logger(
        tmp_path / "run", enable_tensorboard=True, tb_log_dir=tmp_path / "tb", progress=False
    ) as logger:
        logger.log({"train/loss": 0.25}, step=3)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 0.25)]
    assert not (tmp_path / "run" / "tb_logs").exists()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    return tmp_path


def _files_under(path):
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def test_wandb_offline_run_starts_on_first_log(wandb_offline):
    run_dir = wandb_offline / "run"
    logger = create_logger(
        run_dir,
        enable_wandb=True,
        wandb_project="medfunc-test",
        wandb_run_name="unit",
        run_config={"learning_rate": 1e-3},
        progress=False,
    )
    assert logger.wandb_run is None
    assert not (run_dir / "wandb").exists()
    logger.log({"train/loss": 0.5}, step=1)
    run = logger.wandb_run
    assert run is not None
    assert run.name == "unit"
    assert run.project == "medfunc-test"
    assert run.config["learning_rate"] == 1e-3
    logger.log({"train/loss": 0.25}, step=2)
    logger.close()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb"))


def test_non_main_process_writes_nothing(wandb_offline):
    run_dir = wandb_offline / "rank1"
    logger = create_logger(
        run_dir,
        enable_tensorboard=True,
        enable_wandb=True,
        wandb_project="medfunc-test",
        is_main_process=False,
        progress=True,
        total_steps=10,
    )
    logger.log({"train/loss": 0.5, "train/lr": 1e-3}, step=1)
    logger.progress_update(1, loss=0.5)
    logger.close()
    assert logger.wandb_run is None
    assert not run_dir.exists()
    assert _files_under(wandb_offline) == []


def test_progress_bar_shows_postfix(tmp_path, capsys):
    with create_logger(tmp_path, progress=True, total_steps=4) as logger:
        logger.progress_update(2, loss=torch.tensor(0.123456), lr=1e-3)
        logger.progress_update(2, throughput=812.5)
    final = capsys.readouterr().err.strip().split("\r")[-1]
    assert "4/4" in final
    assert "loss=0.1235" in final
    assert "lr=0.001" in final
    assert "throughput=812.5" in final


def test_progress_off_by_default_without_tty(tmp_path, capsys):
    with create_logger(tmp_path) as logger:
        logger.progress_update(3, loss=0.5)
    assert capsys.readouterr().err == ""


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_plot_writes_a_png_with_train_and_eval_panels(tmp_path):
    with create_logger(tmp_path, progress=False) as logger:
        for step in range(1, 41):
            logger.log({"train/loss": 1.0 / step, "train/lr": 1e-3}, step=step)
            if step % 10 == 0:
                logger.log({"eval/loss": 0.5 / step, "eval/auroc": 0.9 + step / 1000}, step=step)
    one_panel = plot_metrics(
        tmp_path / "metrics.jsonl", tmp_path / "a" / "train.png", keys=["train/loss"]
    )
    both = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "b" / "metrics.png")
    assert both == tmp_path / "b" / "metrics.png"
    (width, height), size = _png_size(both)
    (width1, height1), _ = _png_size(one_panel)
    assert size > 10_000
    assert width == width1 == 800
    assert height == 2 * height1


def test_plot_rejects_unknown_keys_and_missing_file(tmp_path):
    with create_logger(tmp_path, progress=False) as logger:
        logger.log({"train/loss": 1.0}, step=1)
    with pytest.raises(ConfigError, match="eval/auroc.*available"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "x.png", keys=["eval/auroc"])
    with pytest.raises(ConfigError, match="does not exist"):
        plot_metrics(tmp_path / "missing.jsonl", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_resumed_run_records_replace_earlier_ones_at_the_same_step(tmp_path):
    with create_logger(tmp_path, progress=False) as logger:
        for step in (10, 20, 30):
            logger.log({"train/loss": 1.0 / step}, step=step)
    with create_logger(tmp_path, progress=False) as resumed:
        for step in (20, 30, 40):
            resumed.log({"train/loss": 2.0 / step}, step=step)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 6
    assert metric_series(records, "train/loss") == (
        [10, 20, 30, 40],
        [0.1, 2.0 / 20, 2.0 / 30, 2.0 / 40],
    )


def test_logging_guide_example_runs():
    text = (Path(__file__).resolve().parents[1] / "docs" / "logging.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, "docs/logging.md", "exec"), namespace)
    run_dir = Path(namespace["run_dir"])
    records = _records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30, 30]
    assert records[2]["train/loss"] == pytest.approx(1 / 30)
    assert records[3]["eval/auroc"] == 0.98
    assert _png_size(namespace["png"])[1] > 10_000
    events = EventAccumulator(str(run_dir / "tb_logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/lr")] == [10, 20, 30]


def test_without_a_terminal_progress_lines_show_step_loss_lr_and_rate(tmp_path, capsys):
    with create_logger(tmp_path, total_steps=30) as logger:
        logger.progress_start(10)  # a resumed run: its first 10 steps are not part of the rate
        for _ in range(10):
            logger.progress_update(1)
        logger.progress_update(0, loss=torch.tensor(0.123456), lr=1e-3)
        logger.progress_update(5)
        logger.progress_update(0, lr=2e-4)  # no loss: not a log point, no line
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()
    match = re.fullmatch(r"step 20/30 loss=0\.1235 lr=0\.001 ([0-9.]+) steps/s", line)
    assert match and float(match.group(1)) > 0
    assert captured.err == ""


def test_console_lines_are_records_when_logging_shows_them(tmp_path, capsys, caplog):
    with create_logger(tmp_path, progress=False) as logger:
        logger.info("printed")
        with caplog.at_level(logging.INFO, logger="medfunc.trainer"):
            logger.info("recorded")
            logger.warning("a warning")
    quiet = create_logger(tmp_path / "quiet", progress=False, log_level="error")
    quiet.info("hidden")
    quiet.warning("hidden too")
    quiet.close()
    assert capsys.readouterr().out == "printed\n"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "recorded"),
        ("WARNING", "a warning"),
    ]
