"""TrainerConfig: validation, file loading, overrides, and the options table in docs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from medfunc.errors import ConfigError
from medfunc.trainer_config import TrainerConfig, apply_overrides, load_config_file

DOCS = Path(__file__).resolve().parents[2] / "docs" / "trainer.md"


@pytest.mark.parametrize(
    ("options", "field", "allowed"),
    [
        ({"optimizer": "adamx"}, "optimizer", "'adamw', 'adam', 'sgd'"),
        ({"scheduler": "poly"}, "scheduler", "'linear_warmup', 'step', 'cosine', 'one_cycle'"),
        ({"grad_clip_mode": "l2"}, "grad_clip_mode", "'norm', 'value', 'none'"),
        ({"anneal_strategy": "exp"}, "anneal_strategy", "'cos', 'linear'"),
        ({"eval_metric_mode": "up"}, "eval_metric_mode", "'auto', 'min', 'max'"),
        ({"amp_dtype": "int8"}, "amp_dtype", "torch.float16 or torch.bfloat16"),
        ({"device": "tpu"}, "device", "'auto', 'cpu', 'cuda', 'cuda:N' or 'xla'"),
        ({"batch_size": 0}, "batch_size", "an integer >= 1"),
        ({"num_epochs": 2.5}, "num_epochs", "an integer >= 1"),
        ({"learning_rate": -1.0}, "learning_rate", "a finite number >= 0"),
        ({"learning_rate": float("nan")}, "learning_rate", "a finite number >= 0"),
        ({"pct_start": 1.0}, "pct_start", "a finite number > 0 and < 1"),
        ({"dropout_prob": 1.5}, "dropout_prob", "a finite number >= 0 and <= 1 or None"),
        ({"betas": (0.9,)}, "betas", "a pair of numbers in [0, 1)"),
        ({"use_amp": "yes"}, "use_amp", "true or false"),
        ({"layer_wise_lrs": [("encoder",)]}, "layer_wise_lrs", "(name substring, LR multiplier)"),
        ({"compile": "fast"}, "compile", "'inductor', 'cudagraph', 'inductor+cudagraph'"),
        ({"eval_compute_metrics": 3}, "eval_compute_metrics", "a callable"),
        ({"save_every_steps": 0}, "save_every_steps", "an integer >= 1 or None"),
    ],
)
def test_a_wrong_value_names_the_field_and_the_allowed_values(options, field, allowed):
    with pytest.raises(ConfigError) as info:
        TrainerConfig(**options)
    message = str(info.value)
    assert f"TrainerConfig.{field} must be" in message
    assert allowed in message
    assert "\n" not in message


def test_values_are_normalised():
    config = TrainerConfig(
        optimizer="AdamW",
        amp_dtype="bf16",
        betas=[0.8, 0.99],
        layer_wise_lrs={"encoder": 0.5, "head": 2},
        device="CPU",
        eval_metric="eval_auroc",
        learning_rate=1,
    )
    assert config.optimizer == "adamw"
    assert config.amp_dtype is torch.bfloat16
    assert config.betas == (0.8, 0.99)
    assert config.layer_wise_lrs == [("encoder", 0.5), ("head", 2.0)]
    assert config.device == "cpu"
    assert config.eval_metric == "auroc"
    assert isinstance(config.learning_rate, float)
    for name in ("float16", "fp16", "torch.float16", torch.float16):
        assert TrainerConfig(amp_dtype=name).amp_dtype is torch.float16


def test_precision_and_metric_mode_follow_the_options():
    assert TrainerConfig().precision == "fp32"
    assert TrainerConfig(use_amp=True).precision == "fp16"
    assert TrainerConfig(use_amp=True, amp_dtype="bfloat16").precision == "bf16"
    assert TrainerConfig().metric_mode == "min"
    assert TrainerConfig(eval_metric="auroc").metric_mode == "max"
    assert TrainerConfig(eval_metric="auroc", eval_metric_mode="min").metric_mode == "min"


def test_inconsistent_combinations_are_refused():
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainerConfig(warmup_steps=20, total_steps=10)
    with pytest.raises(ConfigError, match="max_grad_norm"):
        TrainerConfig(grad_clip_mode="norm", max_grad_norm=None)
    with pytest.raises(ConfigError, match="fsdp"):
        TrainerConfig(fsdp=True, deepspeed=True)


def test_to_dict_is_json_serialisable():
    config = TrainerConfig(
        eval_compute_metrics=lambda outputs, labels: {},
        export_input_example={"x": torch.zeros(1, 3)},
        layer_wise_lrs=[("fc", 2.0)],
    )
    record = json.loads(json.dumps(config.to_dict()))
    assert record["amp_dtype"] == "float16"
    assert record["betas"] == [0.9, 0.999]
    assert record["layer_wise_lrs"] == [["fc", 2.0]]
    assert record["eval_compute_metrics"] == "function"
    assert set(record) == {f.name for f in dataclasses.fields(TrainerConfig)}


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_from_file_reads_each_format_and_applies_overrides(tmp_path, suffix):
    options = {
        "recipe": "breast_cancer",
        "num_epochs": 4,
        "learning_rate": 0.001,
        "betas": [0.8, 0.9],
        "deepspeed_config": {"zero_optimization": {"stage": 1}},
    }
    path = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        path.write_text(
            'recipe = "breast_cancer"\nnum_epochs = 4\nlearning_rate = 1e-3\n'
            "betas = [0.8, 0.9]\n[deepspeed_config.zero_optimization]\nstage = 1\n"
        )
    elif suffix == ".yaml":
        path.write_text(
            "recipe: breast_cancer\nnum_epochs: 4\nlearning_rate: 1e-3\n"
            "betas: [0.8, 0.9]\ndeepspeed_config:\n  zero_optimization:\n"
            "    stage: 1\n"
        )
    else:
        path.write_text(json.dumps(options))
    config = TrainerConfig.from_file(
        path, overrides={"num_epochs": 2, "deepspeed_config.zero_optimization.stage": 2}
    )
    assert config.num_epochs == 2
    assert config.learning_rate == 1e-3
    assert config.betas == (0.8, 0.9)
    assert config.deepspeed_config == {"zero_optimization": {"stage": 2}}


def test_unknown_key_gives_one_line_naming_key_and_suggestion(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("lerning_rate = 0.1\n")
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_file(path)
    message = str(info.value)
    assert message == f"{path}: unknown option 'lerning_rate'; did you mean 'learning_rate'?"
    good = tmp_path / "good.toml"
    good.write_text("num_epochs = 2\n")
    with pytest.raises(ConfigError, match="unknown option 'nonsense_key'"):
        TrainerConfig.from_file(good, overrides={"nonsense_key": 1})


@pytest.mark.parametrize(
    ("suffix", "text", "line"),
    [
        (".toml", "num_epochs = 3\nlearning_rate = = 2\n", 2),
        (".yaml", "num_epochs: 3\nbatch_size: [1, 2\nseed: 1\n", 3),
        (".json", '{\n  "num_epochs": 3,\n  "batch_size": 8,,\n}', 3),
    ],
)
def test_syntax_errors_name_the_file_and_line(tmp_path, suffix, text, line):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    message = str(info.value)
    assert str(path) in message
    assert f"line {line}" in message
    assert "\n" not in message


def test_file_values_are_validated_with_the_file_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: adagrad\n")
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_file(path)
    assert str(info.value).startswith(f"{path}: TrainerConfig.optimizer must be one of")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "absent.toml")
    (tmp_path / "run.ini").write_text("[x]\n")
    with pytest.raises(ConfigError, match="unsupported config format '.ini'"):
        load_config_file(tmp_path / "run.ini")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config_file(tmp_path / "list.json")


def test_apply_overrides_is_pure_and_checks_the_path():
    original = {"a": {"b": 1}, "c": 2}
    assert apply_overrides(original, {"a.b": 5, "d.e": 3}) == {"a": {"b": 5}, "c": 2, "d": {"e": 3}}
    assert original == {"a": {"b": 1}, "c": 2}
    with pytest.raises(ConfigError, match="'c' holds int"):
        apply_overrides(original, {"c.x": 1})


def _documented_options() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", DOCS.read_text(), flags=re.M)
    return dict(rows)


def test_docs_table_lists_every_option_with_its_default():
    documented = _documented_options()
    fields = dataclasses.fields(TrainerConfig)
    assert set(documented) == {f.name for f in fields}
    defaults = TrainerConfig().to_dict()
    for name, shown in documented.items():
        value = defaults[name]
        expected = (
            {None: "None", True: "True", False: "False"}.get(value, None)
            if isinstance(value, (bool, type(None)))
            else repr(value)
        )
        if isinstance(value, str):
            expected = f'"{value}"'
        if isinstance(value, list):
            expected = repr(tuple(value))
        if name == "amp_dtype":
            expected = "torch.float16"
        assert shown == expected, name
