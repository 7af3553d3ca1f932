"""EarlyStopping: best value, patience, min_delta and mode; invalid settings are config errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfunc.early_stopping import EarlyStopping, improves
from medfunc.errors import ConfigError


def test_improves_compares_by_mode_and_margin():
    assert improves(1.0, None, mode="min") and improves(1.0, None, mode="max")
    assert improves(0.29, 0.30, mode="min") and not improves(0.30, 0.30, mode="min")
    assert improves(0.31, 0.30, mode="max") and not improves(0.29, 0.30, mode="max")
    assert not improves(0.295, 0.30, mode="min", min_delta=0.01)
    assert improves(0.285, 0.30, mode="min", min_delta=0.01)
    assert not improves(0.305, 0.30, mode="max", min_delta=0.01)
    assert improves(0.315, 0.30, mode="max", min_delta=0.01)


def test_stops_after_patience_evaluations_without_improvement():
    stopper = EarlyStopping(patience=2, mode="min", min_delta=0.01)
    decisions = [stopper.update(v) for v in (0.50, 0.45, 0.445, 0.46)]
    assert decisions == [False, False, False, True]
    assert (stopper.best, stopper.wait) == (0.45, 2)


def test_an_improvement_resets_the_wait():
    stopper = EarlyStopping(patience=3, mode="max")
    assert [stopper.update(v) for v in (0.7, 0.6, 0.65, 0.8, 0.8, 0.79)] == [False] * 6
    assert (stopper.best, stopper.wait) == (0.8, 2)
    assert stopper.update(0.5) and stopper.should_stop


def test_without_patience_it_only_tracks_the_best_value():
    stopper = EarlyStopping(patience=None, mode="max")
    assert not any(stopper.update(v) for v in [0.9] + [0.1] * 50)
    assert (stopper.best, stopper.wait) == (0.9, 50)


def test_a_nan_never_improves_on_a_number():
    stopper = EarlyStopping(patience=1, mode="min")
    stopper.update(0.4)
    with pytest.warns(RuntimeWarning, match="undefined.*no improvement"):
        assert stopper.update(math.nan) and stopper.best == 0.4


@pytest.mark.parametrize("undefined", [math.nan, math.inf, -math.inf, None])
def test_an_undefined_first_value_is_no_improvement_and_never_the_best(undefined):
    stopper = EarlyStopping(patience=3, mode="max")
    with pytest.warns(RuntimeWarning, match=r"undefined .*best so far: None, 1 evaluation"):
        assert not stopper.update(undefined)
    assert (stopper.best, stopper.wait) == (None, 1)
    assert not stopper.update(0.6)  # the first number is the best; the wait starts over
    assert (stopper.best, stopper.wait) == (0.6, 0)
    with pytest.warns(RuntimeWarning, match="best so far: 0.6, 1 evaluation"):
        stopper.update(undefined)
    assert (stopper.best, stopper.wait) == (0.6, 1)


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10), min_size=1, max_size=30),
    patience=st.integers(1, 5),
    mode=st.sampled_from(["min", "max"]),
    min_delta=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_agrees_with_a_plain_loop(values, patience, mode, min_delta):
    """The reference: the first value is best; a value counts only beyond best +- min_delta."""
    stopper = EarlyStopping(patience=patience, mode=mode, min_delta=min_delta)
    best, wait = None, 0
    for value in values:
        if best is None:
            better = True
        elif mode == "min":
            better = value < best - min_delta
        else:
            better = value > best + min_delta
        if better:
            best, wait = value, 0
        else:
            wait += 1
        assert stopper.update(value) == (wait >= patience)
        assert (stopper.best, stopper.wait) == (best, wait)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "auto"}, "mode must be one of 'min', 'max'"),
        ({"patience": 0}, "patience must be an integer >= 1 or None"),
        ({"patience": True}, "patience must be an integer >= 1 or None"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0"),
        ({"min_delta": math.inf}, "min_delta must be a finite number >= 0"),
    ],
)
def test_invalid_settings_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        EarlyStopping(**options)
