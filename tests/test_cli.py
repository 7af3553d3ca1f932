"""The ``medfunc`` command, end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from medfunc.checkpoint import read_checkpoint
from medfunc.cli import build_parser, main, parse_override
from medfunc.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "medfunc.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _auroc(text: str, split: str = "test") -> float:
    return float(re.search(rf"^{split} \(.*auroc=([0-9.]+)", text, flags=re.M).group(1))


def test_train_without_arguments_runs_the_default_recipe(tmp_path):
    done = _run(["train"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "recipe: breast_cancer" in done.stdout
    assert _auroc(done.stdout) >= 0.97
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("test (best model: epoch ") and "113 examples" in last
    assert "validation (best model: epoch " in done.stdout and "114 examples" in done.stdout
    (run,) = (tmp_path / "runs").glob("breast_cancer-*")
    assert f"output: {Path('runs') / run.name}" in done.stdout
    checkpoint = Path(re.search(r"^checkpoint: (.+)$", done.stdout, flags=re.M).group(1))
    assert re.fullmatch(r"checkpoint-epoch\d+\.pt", checkpoint.name)
    assert (tmp_path / checkpoint).is_file()
    assert (run / "model.safetensors").is_file()
    assert list((run / "tb_logs").glob("events.out.tfevents.*"))
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """``medfunc train run.toml --set num_epochs=1`` (in process)."""
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "run.toml"
    config.write_text(
        'recipe = "breast_cancer"\nnum_epochs = 4\nlog_every = 5\n'
        "enable_tensorboard = false\n[recipe_options]\nseed = 1\n"
    )
    out = folder / "out"
    status = main(
        [
            "train",
            str(config),
            "--set",
            "num_epochs=1",
            "--set",
            "save_every_steps=10",
            "--output-dir",
            str(out),
        ]
    )
    return status, out


def test_train_with_a_config_file_and_overrides(one_epoch_run, capsys):
    status, out = one_epoch_run
    assert status == 0
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == [
        "checkpoint-epoch1.pt",
        "checkpoint-step10.pt",
    ]
    assert not (out / "tb_logs").exists()
    state = read_checkpoint(out / "checkpoint-epoch1.pt")["trainer_state"]
    assert state["run"] == {"recipe": "breast_cancer", "recipe_options": {"seed": 1}}
    assert state["loop_step"] == 11  # 342 training examples in batches of 32


def test_inspect_prints_the_checkpoint_summary(one_epoch_run, capsys):
    _, out = one_epoch_run
    assert main(["inspect", str(out / "checkpoint-epoch1.pt")]) == 0
    text = capsys.readouterr().out
    assert "checkpoint-epoch1.pt" in text
    assert "global step: 11" in text and "epoch: 1" in text


def test_export_writes_onnx_that_matches_the_checkpoint_model(one_epoch_run, tmp_path, capsys):
    _, out = one_epoch_run
    ckpt = out / "checkpoint-epoch1.pt"
    assert (
        main(["export", str(ckpt), "--onnx", "--torchscript", "--output-dir", str(tmp_path)]) == 0
    )
    assert f"onnx: {tmp_path / 'model.onnx'}" in capsys.readouterr().out
    parts = get_recipe("breast_cancer").build(seed=1)
    parts.model.load_state_dict(read_checkpoint(ckpt)["model_state"])
    parts.model.eval()
    features = parts.eval_dataset.tensors["features"][:1]
    with torch.no_grad():
        eager = parts.model(features=features)["logits"].numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    (onnx_logits, *_) = session.run(None, {session.get_inputs()[0].name: features.numpy()})
    np.testing.assert_allclose(onnx_logits, eager, rtol=1e-4, atol=1e-5)
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    torch.testing.assert_close(scripted(features=features)["logits"], torch.from_numpy(eager))


def test_recipes_lists_the_built_in_recipes(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("breast_cancer") and lines[0].endswith("(default)")
    assert any(line.startswith("drug_reviews") for line in lines)


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        (
            {"bad.toml": "num_epochs = 2\nlearning_rate = = 1\n"},
            ["bad.toml"],
            r"bad\.toml: invalid TOML: .*line 2",
        ),
        ({"bad.yaml": "num_epochs: [1\n"}, ["bad.yaml"], r"bad\.yaml, line 2: invalid YAML"),
        (
            {"typo.json": '{"lerning_rate": 0.1}'},
            ["typo.json"],
            r"typo\.json: unknown option 'lerning_rate'; did you mean 'learning_rate'\?",
        ),
        (
            {},
            ["--set", "optimizer=adagrad"],
            r"--set: TrainerConfig\.optimizer must be one of 'adamw', 'adam', 'sgd'; got 'adagrad'",
        ),
        ({}, ["--set", "batch_size=0"], r"TrainerConfig\.batch_size must be an integer >= 1"),
        ({}, ["--set", "num_epochs"], r"--set expects KEY=VALUE"),
        ({}, ["--recipe", "xray"], r"unknown recipe 'xray'; choose one of: breast_cancer"),
        ({}, ["missing.toml"], r"config file missing\.toml does not exist"),
        ({}, ["--set", "recipe_options.depth=3"], r"unknown breast_cancer option\(s\) \['depth'\]"),
    ],
)
def test_train_errors_are_one_line_with_status_2(
    tmp_path, monkeypatch, capsys, files, args, message
):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert main(["train", *args, "--output-dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medfunc: error: ")
    assert re.search(message, lines[0]), lines[0]


def test_checkpoint_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.pt")]) == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path / "junk.pt"), "--onnx"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "none.pt" in lines[0] and "junk.pt" in lines[1]


def test_an_error_in_a_real_process_prints_no_traceback(tmp_path):
    (tmp_path / "run.yaml").write_text("recipe: breast_cancer\ngrad_clip_mode: l3\n")
    done = _run(["train", "run.yaml"], cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "medfunc: error: run.yaml: TrainerConfig.grad_clip_mode must be one of 'norm', "
        "'value', 'none'; got 'l3'"
    ]


@pytest.mark.parametrize("command", [[], ["train"], ["recipes"], ["inspect"], ["export"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: medfunc")


def test_override_values_are_parsed_as_json_when_possible():
    assert parse_override("num_epochs=3") == ("num_epochs", 3)
    assert parse_override("betas=[0.9, 0.99]") == ("betas", [0.9, 0.99])
    assert parse_override("use_amp=true") == ("use_amp", True)
    assert parse_override("optimizer=sgd") == ("optimizer", "sgd")
    assert parse_override("wandb_run_name=a=b") == ("wandb_run_name", "a=b")


@pytest.mark.slow
def test_drug_reviews_recipe_end_to_end(tmp_path):
    """One epoch of MiniLM fine-tuning on a subsample (160 reviews of 64 tokens, 10 steps)."""
    options = ["max_train=160", "max_eval=96", "max_test=96", "max_length=64"]
    args = ["train", "--recipe", "drug_reviews", "--set", "learning_rate=3e-4"]
    args += ["--set", "num_epochs=1"]
    for option in options:
        args += ["--set", f"recipe_options.{option}"]
    done = _run([*args, "--output-dir", "out"], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert _auroc(done.stdout) >= 0.85
    assert (tmp_path / "out" / "checkpoint-epoch1.pt").is_file()


def test_version_prints_the_package_version(capsys):
    from medfunc import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"medfunc {__version__}"


def test_an_unknown_train_flag_shows_the_usage_of_train(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: medfunc train ")
    assert "medfunc train: error: unrecognized arguments: --epochs" in err
    assert "--set num_epochs=" in err


def test_a_file_system_error_is_one_line_with_status_2(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "run"
    assert main(["train", "--set", "num_epochs=1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("medfunc: error: ")]
    assert errors == [f"medfunc: error: {out}: Not a directory"]


def test_export_does_not_replace_an_existing_file_without_overwrite(
    one_epoch_run, tmp_path, capsys
):
    _, out = one_epoch_run
    ckpt = str(out / "checkpoint-epoch1.pt")
    target = tmp_path / "model.pt"
    target.write_bytes(b"the run's own export")
    assert main(["export", ckpt, "--torchscript", "--output-dir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"medfunc: error: {target} already exist")
    assert "--overwrite" in line
    assert target.read_bytes() == b"the run's own export"
    args = ["export", ckpt, "--torchscript", "--output-dir", str(tmp_path), "--overwrite"]
    assert main(args) == 0
    assert torch.jit.load(str(target))(**get_recipe("breast_cancer").build().export_example)
