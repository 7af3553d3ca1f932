"""medfunc.validation: good values pass; errors name the field, the value and what is allowed."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from medfunc import optim, schedules, validation
from medfunc.errors import ConfigError

GOOD = [
    # (checker, value, expected result)
    (validation.number, -2, -2.0),
    (functools.partial(validation.number, minimum=0.0, maximum=1.0), 1, 1.0),
    (functools.partial(validation.number, minimum=0.0, allow_inf=True), math.inf, math.inf),
    (functools.partial(validation.number, optional=True), None, None),
    (validation.positive_float, 1e-8, 1e-8),
    (validation.non_negative_float, 0, 0.0),
    (validation.probability, 0.0, 0.0),
    (validation.probability, 1.0, 1.0),
    (validation.fraction, 0.5, 0.5),
    (functools.partial(validation.integer, minimum=7), 7, 7),
    (validation.positive_int, 3, 3),
    (validation.non_negative_int, 0, 0),
    (functools.partial(validation.positive_int, optional=True), None, None),
    (validation.boolean, True, True),
    (functools.partial(validation.boolean, optional=True), None, None),
    (validation.betas, [0.9, 0.999], (0.9, 0.999)),
    (validation.betas, (0, 0), (0.0, 0.0)),
    (validation.name_multipliers, None, ()),
    (validation.name_multipliers, {"head": 10, "encoder": 0.5}, (("head", 10.0), ("encoder", 0.5))),
    (validation.name_multipliers, [("head", 0)], (("head", 0.0),)),
]


@pytest.mark.parametrize(("check", "value", "expected"), GOOD)
def test_good_values_pass_in_canonical_form(check: Callable, value: Any, expected: Any) -> None:
    result = check("field_x", value)
    assert result == expected
    assert type(result) is type(expected)


BAD = [
    # (checker, bad value, what the message says is allowed)
    (validation.number, "1e-3", "a finite number"),
    (validation.number, True, "a finite number"),
    (validation.number, math.nan, "a finite number"),
    (validation.number, math.inf, "a finite number"),
    (functools.partial(validation.number, minimum=0.0, allow_inf=True), -math.inf, "a number >= 0"),
    (functools.partial(validation.number, minimum=0.0, allow_inf=True), math.nan, "a number >= 0"),
    (validation.positive_float, 0.0, "a finite number > 0"),
    (validation.positive_float, -1, "a finite number > 0"),
    (validation.positive_float, None, "a finite number > 0"),
    (validation.non_negative_float, -1, "a finite number >= 0"),
    (functools.partial(validation.non_negative_float, optional=True), -1, ">= 0 or None"),
    (validation.probability, 1.5, "a finite number >= 0 and <= 1"),
    (validation.probability, -0.1, "a finite number >= 0 and <= 1"),
    (validation.fraction, 0.0, "a finite number > 0 and < 1"),
    (validation.fraction, 1.0, "a finite number > 0 and < 1"),
    (validation.integer, 2.0, "an integer"),
    (validation.integer, True, "an integer"),
    (functools.partial(validation.integer, minimum=7), 6, "an integer >= 7"),
    (validation.positive_int, 0, "an integer >= 1"),
    (validation.positive_int, "3", "an integer >= 1"),
    (functools.partial(validation.positive_int, optional=True), 0, "an integer >= 1 or None"),
    (validation.non_negative_int, -1, "an integer >= 0"),
    (validation.boolean, 1, "true or false"),
    (validation.boolean, "yes", "true or false"),
    (validation.boolean, None, "true or false"),
    (validation.betas, (0.9,), "a pair of numbers in [0, 1)"),
    (validation.betas, (1.0, 0.999), "a pair of numbers in [0, 1)"),
    (validation.betas, (0.9, -0.1), "a pair of numbers in [0, 1)"),
    (validation.betas, (0.9, math.nan), "a pair of numbers in [0, 1)"),
    (validation.betas, 0.9, "a pair of numbers in [0, 1)"),
    (validation.betas, "ab", "a pair of numbers in [0, 1)"),
    (validation.name_multipliers, "head", "(name substring, LR multiplier) pairs"),
    (validation.name_multipliers, [("head",)], "(name substring, LR multiplier) pairs"),
    (validation.name_multipliers, [("", 1.0)], "(name substring, LR multiplier) pairs"),
    (validation.name_multipliers, [("head", -1)], "multipliers >= 0"),
    (validation.name_multipliers, {"head": math.inf}, "multipliers >= 0"),
]


@pytest.mark.parametrize(("check", "value", "allowed"), BAD)
def test_bad_values_raise_naming_field_value_and_what_is_allowed(
    check: Callable, value: Any, allowed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check("field_x", value)
    message = str(info.value)
    assert message.startswith("field_x must be ")
    assert allowed in message
    assert f"; got {value!r}" in message
    assert "\n" not in message


def test_the_message_reads_field_allowed_value() -> None:
    with pytest.raises(ConfigError) as info:
        validation.non_negative_float("learning_rate", -1)
    assert str(info.value) == "learning_rate must be a finite number >= 0; got -1"


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        validation.positive_int("batch_size", 0)


def test_fail_builds_the_error_without_raising_it() -> None:
    error = validation.fail("depth", "an integer >= 1", 0, "; try 1")
    assert isinstance(error, ConfigError)
    assert str(error) == "depth must be an integer >= 1; got 0; try 1"


def test_one_of() -> None:
    allowed = ("adamw", "adam", "sgd")
    assert validation.one_of("optimizer", "sgd", allowed) == "sgd"
    assert validation.one_of("optimizer", " SGD ", allowed, normalize=True) == "sgd"
    with pytest.raises(ConfigError) as info:
        validation.one_of("optimizer", "SGD", allowed)
    assert str(info.value) == (
        "optimizer must be one of 'adamw', 'adam', 'sgd'; got 'SGD'; did you mean 'sgd'?"
    )
    with pytest.raises(ConfigError) as info:
        validation.one_of("grad_clip_mode", "l3", ("norm", "value", "none"))
    assert str(info.value) == "grad_clip_mode must be one of 'norm', 'value', 'none'; got 'l3'"
    # values are compared by type too: 1 is not True, a tensor is not a name
    with pytest.raises(ConfigError, match="got 1"):
        validation.one_of("flag", 1, (True, False))
    with pytest.raises(ConfigError, match=r"got tensor\(\[1, 2\]\)"):
        validation.one_of("mode", torch.tensor([1, 2]), ("a", "b"))


def test_instance_of() -> None:
    assert validation.instance_of("seed", 3, int, "an int") == 3
    with pytest.raises(ConfigError) as info:
        validation.instance_of("seed", "3", int, "an int")
    assert str(info.value) == "seed must be an int; got a str"


def test_check_names_suggests_the_closest_name() -> None:
    validation.check_names("scaler", [], ())
    validation.check_names("scaler", ["init_scale"], ("init_scale", "growth_interval"))
    with pytest.raises(ConfigError) as info:
        validation.check_names("scaler", ["init_scal", "colour"], ("init_scale", "growth_interval"))
    assert str(info.value) == (
        "scaler got unexpected arguments 'init_scal' (did you mean 'init_scale'?), 'colour'; "
        "it accepts: init_scale, growth_interval"
    )


def _factory(lr: float, t_max: int, eta_min: float = 0.0, *, kernel: str = "auto") -> None:
    return None


def test_check_kwargs_accepts_the_factory_arguments() -> None:
    kwargs = {"lr": 0.1, "t_max": 3, "kernel": "fused"}
    checked = validation.check_kwargs(_factory, kwargs, "cosine")
    assert checked == kwargs and checked is not kwargs


def test_check_kwargs_did_you_mean() -> None:
    with pytest.raises(ConfigError) as info:
        validation.check_kwargs(_factory, {"lr": 0.1, "t_maks": 3}, "schedule 'cosine'")
    assert str(info.value) == (
        "schedule 'cosine' got an unexpected argument 't_maks' (did you mean 't_max'?); "
        "it accepts: lr, t_max, eta_min, kernel"
    )


def test_check_kwargs_names_missing_required_arguments() -> None:
    with pytest.raises(ConfigError) as info:
        validation.check_kwargs(_factory, {"eta_min": 0.0}, "schedule 'cosine'")
    assert str(info.value) == "schedule 'cosine' needs the arguments 'lr', 't_max'; got ['eta_min']"


def test_check_kwargs_lets_a_factory_with_var_keyword_take_any_name() -> None:
    def factory(lr: float, **options: Any) -> None:
        return None

    assert validation.check_kwargs(factory, {"lr": 1.0, "anything": 2}, "f") == {
        "lr": 1.0,
        "anything": 2,
    }


# ---------------------------------------------------------------------------------------------
# the registries check names and keywords through validation


def test_registries_list_their_names() -> None:
    assert optim.OPTIMIZER_NAMES == tuple(optim.OPTIMIZERS) == ("adamw", "adam", "sgd")
    assert schedules.SCHEDULE_NAMES == tuple(schedules.SCHEDULES)
    assert set(schedules.SCHEDULE_NAMES) == {
        "constant",
        "none",
        "linear_warmup",
        "step",
        "cosine",
        "one_cycle",
    }


def test_get_optimizer_misspelled_keyword_names_the_right_one() -> None:
    with pytest.raises(ConfigError) as info:
        optim.get_optimizer("adamw", lr=1e-3, weight_decy=0.1)
    message = str(info.value)
    assert "optimizer 'adamw' got an unexpected argument 'weight_decy'" in message
    assert "did you mean 'weight_decay'?" in message


def test_get_optimizer_misspelled_name_names_the_right_one() -> None:
    with pytest.raises(ConfigError, match=re.escape("got 'sdg'; did you mean 'sgd'?")):
        optim.get_optimizer("sdg", lr=0.1)


def test_get_optimizer_without_lr_says_it_is_needed() -> None:
    with pytest.raises(ConfigError, match="optimizer 'sgd' needs the argument 'lr'"):
        optim.get_optimizer("sgd", momentum=0.9)


def test_get_schedule_misspelled_keyword_names_the_right_one() -> None:
    with pytest.raises(ConfigError, match=re.escape("'eta_mn' (did you mean 'eta_min'?)")):
        schedules.get_schedule("cosine", lr=0.1, t_max=3, eta_mn=0.0)


def test_an_error_inside_an_optimizer_factory_is_not_masked(monkeypatch) -> None:
    def broken(lr: float) -> optim.GradientTransformation:
        raise TypeError("a bug inside the factory")

    monkeypatch.setitem(optim.OPTIMIZERS, "broken", broken)
    with pytest.raises(TypeError, match="a bug inside the factory") as info:
        optim.get_optimizer("broken", lr=0.1)
    assert not isinstance(info.value, ConfigError)


def test_an_error_inside_a_schedule_factory_is_not_masked(monkeypatch) -> None:
    def broken(lr: float) -> schedules.Schedule:
        raise TypeError("a bug inside the schedule")

    monkeypatch.setitem(schedules.SCHEDULES, "broken", broken)
    with pytest.raises(TypeError, match="a bug inside the schedule"):
        schedules.get_schedule("broken", lr=0.1)


def test_a_value_error_raised_by_the_factory_reaches_the_caller_unchanged() -> None:
    with pytest.raises(ConfigError) as info:
        optim.get_optimizer("adamw", lr=1e-3, betas=(0.9, 1.5))
    assert str(info.value) == (
        "betas must be a pair of numbers in [0, 1), e.g. (0.9, 0.999); got (0.9, 1.5)"
    )
