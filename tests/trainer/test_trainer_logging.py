"""Trainer logging: TensorBoard and W&B values, the console lines a user sees, start warnings."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medfunc.errors import ConfigError
from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig


def _data(n: int, seed: int = 0) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDictDataset(
        {"x": torch.randn(n, 6, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}
    )


def test_tensorboard_events_hold_loss_and_the_scheduled_lr(tmp_path):
    torch.manual_seed(0)
    config = TrainerConfig(
        num_epochs=2,
        batch_size=8,
        learning_rate=0.05,
        scheduler="cosine",
        eta_min=0.001,
        log_every=2,
        enable_tensorboard=True,
        device="cpu",
        save_every_epochs=None,
        progress_bar=False,
    )
    MedicalModelTrainer(TinyClassifier(), config).train(
        _data(48), _data(16, 1), output_dir=tmp_path
    )
    events = EventAccumulator(str(tmp_path / "tb_logs"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/accuracy"} <= set(
        events.Tags()["scalars"]
    )

    # the reference: CosineAnnealingLR over the run's 12 optimizer steps; the LR logged at
    # step s is the one the s-th update used
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=0.001)
    used = []
    for _ in range(12):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    lr_events = events.Scalars("train/lr")
    assert [e.step for e in lr_events] == [2, 4, 6, 8, 10, 12]
    assert [e.value for e in lr_events] == pytest.approx(
        [used[s - 1] for s in range(2, 13, 2)], rel=1e-6
    )

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    loss_events = events.Scalars("train/loss")
    assert [e.step for e in loss_events] == sorted(losses)
    assert [e.value for e in loss_events] == pytest.approx(
        [losses[e.step] for e in loss_events], rel=1e-6
    )
    assert [e.step for e in events.Scalars("eval/loss")] == [6, 12]


def test_wandb_offline_run_is_created_in_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)
    config = TrainerConfig(
        num_epochs=1,
        batch_size=8,
        log_every=1,
        enable_wandb=True,
        wandb_project="medfunc-tests",
        wandb_run_name="tiny",
        device="cpu",
        save_every_epochs=None,
        progress_bar=False,
    )
    MedicalModelTrainer(TinyClassifier(), config).train(_data(16), output_dir=tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))


_SCRIPT = """
import sys
import torch
from conftest import TinyClassifier
from medfunc.errors import ConfigError
from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

g = torch.Generator().manual_seed(0)
data = TensorDictDataset(
    {"x": torch.randn(40, 6, generator=g), "labels": torch.randint(0, 3, (40,), generator=g)}
)
config = TrainerConfig(
    num_epochs=2, batch_size=8, log_every=2, device="cpu", log_level=sys.argv[1],
    save_every_epochs=None, num_workers=0, pin_memory=False, cudnn_benchmark=False,
)
torch.manual_seed(0)
MedicalModelTrainer(TinyClassifier(), config).train(data, data, output_dir=sys.argv[2])
"""


def _script_env() -> dict:
    tests = Path(__file__).resolve().parents[1]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent)]))


def _run_script(tmp_path, level: str) -> subprocess.CompletedProcess:
    (tmp_path / "train.py").write_text(_SCRIPT)
    return subprocess.run(
        [sys.executable, "train.py", level, "out"],
        cwd=tmp_path,
        env=_script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_script_without_logging_config_prints_the_run_without_a_terminal(tmp_path):
    done = _run_script(tmp_path, "info")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/10", "4/10", "6/10", "8/10", "10/10"]
    for line in progress:
        assert re.fullmatch(r"step \d+/10 loss=[0-9.e-]+ lr=[0-9.e-]+ [0-9.]+ steps/s", line)
    assert any(
        re.match(r"epoch 1/2 done: step 5, train loss [0-9.]+ \(logged at step 4\)", line)
        for line in lines
    )
    assert any(line.startswith("epoch 2/2 done: step 10") for line in lines)
    evals = [line for line in lines if " eval: " in line]
    assert [line.split(" eval: ")[0] for line in evals] == ["epoch 1 step 5", "epoch 2 step 10"]
    assert "accuracy=" in evals[0] and "loss=" in evals[0]


def test_log_level_warning_turns_the_run_lines_off(tmp_path):
    done = _run_script(tmp_path, "warning")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count("eval/accuracy") == 2


def test_on_a_terminal_the_bar_and_the_eval_lines_do_not_overwrite_each_other(tmp_path):
    (tmp_path / "train.py").write_text(_SCRIPT)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    process = subprocess.Popen(
        [sys.executable, "train.py", "info", "out"],
        cwd=tmp_path,
        env=_script_env(),
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=300) == 0
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "10/10" in text and "step/s" in text  # the tqdm bar was drawn on the terminal
    lines = re.findall(r"epoch \d+ step \d+ eval: ", text)
    assert len(lines) == 2
    # each eval line starts a fresh terminal line: the bar was cleared (\r) before it
    assert not re.search(r"[^\r\n]epoch \d+ step \d+ eval: ", text)
    assert not re.search(r"[^\r\n]epoch \d/2 done", text)
    assert "step 2/10 loss=" not in text  # no progress lines beside a bar


def test_a_run_that_ends_with_its_warm_up_warns_with_numbers(tmp_path, caplog):
    config = TrainerConfig(
        num_epochs=1,
        batch_size=8,
        learning_rate=0.01,
        warmup_steps=2,
        device="cpu",
        save_every_epochs=None,
        progress_bar=False,
    )
    with caplog.at_level(logging.WARNING, logger="medfunc.trainer"):
        MedicalModelTrainer(TinyClassifier(), config).train(_data(16), output_dir=tmp_path)
    assert (
        "warmup_steps=2 equals the run's 2 optimizer steps: the learning rate warms up over "
        "the whole run and never reaches learning_rate=0.01 (the first step uses LR 0)"
    ) in caplog.text


@pytest.mark.parametrize(
    ("cadence", "message"),
    [
        ({"save_every_epochs": 3}, "save_every_epochs=3 but num_epochs=2"),
        (
            {"save_every_epochs": None, "save_every_steps": 5},
            "save_every_steps=5 but the run has 4 optimizer steps",
        ),
        ({"save_every_epochs": 2}, None),
        ({"save_every_epochs": None, "save_every_steps": 4}, None),
    ],
)
def test_a_save_cadence_that_never_fires_warns_at_the_start(tmp_path, caplog, cadence, message):
    config = TrainerConfig(
        num_epochs=2,
        batch_size=8,
        device="cpu",
        progress_bar=False,
        log_level="warning",
        **cadence,
    )
    with caplog.at_level(logging.WARNING, logger="medfunc.trainer"):
        MedicalModelTrainer(TinyClassifier(), config).train(_data(16), output_dir=tmp_path)
    warned = [r.getMessage() for r in caplog.records if "saving cadence" in r.getMessage()]
    if message is None:
        assert warned == []
    else:
        (warning,) = warned
        assert message in warning and "cannot be resumed" in warning
    assert list(tmp_path.glob("checkpoint-*.pt"))  # the checkpoint at the stop is written


def test_log_level_is_validated_with_its_choices():
    assert TrainerConfig(log_level="WARNING").log_level == "warning"
    with pytest.raises(ConfigError, match=r"TrainerConfig\.log_level must be one of .*'info'"):
        TrainerConfig(log_level="loud")
