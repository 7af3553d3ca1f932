"""Helpers for users' own deterministic single-step tests.

Example:
    >>> from medfunc.testing import check_step_deterministic, check_step_pure
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    >>> state = mf.init_state(model, mf.optim.adamw(1e-3), loss_fn=lambda out, x: out.mean())
    >>> batch = torch.randn(8, 4)
    >>> check_step_pure(state, batch)            # the input state is bitwise unchanged
    >>> check_step_deterministic(state, batch)   # two calls give bitwise equal results
"""

from __future__ import annotations

from typing import Any

import torch

from medfunc.state import tree_leaves_with_path


def _first_difference(actual: Any, expected: Any, rtol: float, atol: float) -> str | None:
    got = tree_leaves_with_path(actual)
    want = tree_leaves_with_path(expected)
    got_paths = [p for p, _ in got]
    want_paths = [p for p, _ in want]
    if got_paths != want_paths:
        missing = sorted(set(want_paths) - set(got_paths))
        extra = sorted(set(got_paths) - set(want_paths))
        return f"tree structures differ: missing {missing}, unexpected {extra}"
    for (path, a), (_, b) in zip(got, want):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if a != b:
                return f"leaf {path!r}: {a!r} != {b!r}"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return (
                f"leaf {path!r}: shape/dtype {tuple(a.shape)} {a.dtype} != "
                f"{tuple(b.shape)} {b.dtype}"
            )
        a_cpu, b_cpu = a.detach().cpu(), b.detach().cpu()
        floating = a_cpu.is_floating_point() or a_cpu.is_complex()
        same = (
            torch.allclose(a_cpu, b_cpu, rtol=rtol, atol=atol, equal_nan=True)
            if floating
            else torch.equal(a_cpu, b_cpu)
        )
        if not same:
            if floating:
                diff = (a_cpu.double() - b_cpu.double()).abs().nan_to_num(float("inf")).max()
            else:
                diff = (a_cpu.long() - b_cpu.long()).abs().max()
            return (
                f"leaf {path!r} differs: max abs difference {float(diff):.6g} "
                f"(dtype {a.dtype}, rtol={rtol}, atol={atol})"
            )
    return None


def assert_trees_equal(actual: Any, expected: Any) -> None:
    """Assert two pytrees (e.g. TrainStates or metric dicts) are bitwise equal.

    Args:
        actual: the tree under test.
        expected: the reference tree.

    Raises:
        AssertionError: naming the first differing leaf, its max difference and dtype.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> state = mf.init_state(model, mf.optim.sgd(0.1), loss_fn=lambda out, x: out.mean())
        >>> batch = torch.randn(8, 4)
        >>> state_a, _ = mf.train_step(state, batch)
        >>> state_b, _ = mf.train_step(state, batch)
        >>> assert_trees_equal(state_a.params, state_b.params)
        >>> assert_trees_equal(state_a.params, state.params)
        Traceback (most recent call last):
        AssertionError: leaf 'weight' differs: max abs difference ... (dtype torch.float32, ...)
    """
    message = _first_difference(actual, expected, 0.0, 0.0)
    if message:
        raise AssertionError(message)


def assert_trees_close(
    actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-8
) -> None:
    """Assert two pytrees are equal within ``torch.allclose`` tolerances.

    Args:
        actual: the tree under test.
        expected: the reference tree.
        rtol: relative tolerance.
        atol: absolute tolerance.

    Raises:
        AssertionError: naming the first differing leaf, its max difference and dtype.

    Example:
        >>> params = {"weight": torch.tensor([1.0, 2.0])}
        >>> assert_trees_close(params, {"weight": torch.tensor([1.0, 2.0 + 1e-7])}, rtol=1e-6)
    """
    message = _first_difference(actual, expected, rtol, atol)
    if message:
        raise AssertionError(message)


def _snapshot(state: Any) -> list[tuple[str, Any]]:
    return [
        (p, v.detach().clone() if isinstance(v, torch.Tensor) else v)
        for p, v in tree_leaves_with_path(state)
    ]


def check_step_pure(state: Any, batch: Any, step_fn: Any = None) -> None:
    """Assert a step leaves its input state bitwise unchanged.

    Args:
        state: the TrainState to test with.
        batch: a batch.
        step_fn: the step (default :func:`medfunc.train_step`), called as ``step_fn(state, batch)``.

    Raises:
        AssertionError: naming the first leaf the step changed.
    """
    from medfunc.step import train_step

    step_fn = step_fn or train_step
    before = _snapshot(state)
    step_fn(state, batch)
    after = _snapshot(state)
    for (path, a), (_, b) in zip(after, before):
        message = _first_difference({"v": a}, {"v": b}, 0.0, 0.0)
        if message:
            raise AssertionError(f"the step modified its input state at {path!r}: {message}")


def check_step_deterministic(state: Any, batch: Any, step_fn: Any = None) -> None:
    """Assert two calls of a step on the same state and batch are bitwise equal, and that the
    global RNG state is unchanged by them.

    Args:
        state: the TrainState to test with.
        batch: a batch.
        step_fn: the step (default :func:`medfunc.train_step`).

    Raises:
        AssertionError: naming the first differing leaf.
    """
    from medfunc.step import train_step

    step_fn = step_fn or train_step
    rng_before = torch.get_rng_state()
    first = step_fn(state, batch)
    second = step_fn(state, batch)
    if not torch.equal(rng_before, torch.get_rng_state()):
        raise AssertionError("the step changed the global torch RNG state")
    message = _first_difference(first, second, 0.0, 0.0)
    if message:
        raise AssertionError(f"two calls of the step differ: {message}")
