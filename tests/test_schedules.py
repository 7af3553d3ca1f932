"""medfunc.schedules against the real torch.optim.lr_scheduler (never a copy of our formula)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from torch.optim import lr_scheduler

from medfunc import schedules
from medfunc.errors import ConfigError

RTOL = 1e-12


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _sgd(lr: float, momentum: float = 0.0) -> torch.optim.SGD:
    param = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    return torch.optim.SGD([param], lr=lr, momentum=momentum)


def _record(
    optimizer: torch.optim.Optimizer,
    scheduler: lr_scheduler.LRScheduler,
    n_steps: int,
    key: str = "lr",
) -> list[float]:
    """``param_groups[0][key]`` at steps 0..n_steps, stepping as a training loop does."""
    values = [float(optimizer.param_groups[0][key])]
    for _ in range(n_steps):
        optimizer.step()
        scheduler.step()
        values.append(float(optimizer.param_groups[0][key]))
    return values


def _assert_matches(
    schedule: Callable[[int | torch.Tensor], torch.Tensor],
    expected: list[float],
    atol: float = 0.0,
) -> None:
    for n, ref in enumerate(expected):
        for arg in (n, torch.tensor(n, dtype=torch.int64)):
            got = schedule(arg)
            assert got.dtype == torch.float64 and got.shape == ()
            tol = RTOL * abs(ref) + atol
            assert abs(got.item() - ref) <= tol, (n, type(arg).__name__, got.item(), ref)


# --------------------------------------------------------------------------------------------
# equality with torch.optim.lr_scheduler
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [0.0, 1e-3, 0.5])
def test_constant(lr: float) -> None:
    opt = _sgd(lr)
    # ConstantLR with factor 1.0 is the identity scheduler.
    sched = lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    expected = _record(opt, sched, 20)
    _assert_matches(schedules.constant(lr), expected)
    _assert_matches(schedules.get_schedule("none", lr=lr), expected)


def _hf_linear_lambda(warmup: int, total: int) -> Callable[[int], float]:
    # The lambda of transformers.get_linear_schedule_with_warmup, written as transformers does.
    def lr_lambda(current_step: int) -> float:
        if current_step < warmup:
            return float(current_step) / float(max(1, warmup))
        return max(0.0, float(total - current_step) / float(max(1, total - warmup)))

    return lr_lambda


LINEAR_CASES = [(1e-3, 10, 100), (5e-5, 0, 37), (0.3, 37, 37), (2e-4, 1, 2), (1.0, 7, 1000)]


@pytest.mark.parametrize(("peak", "warmup", "total"), LINEAR_CASES)
def test_linear_warmup_lambdalr(peak: float, warmup: int, total: int) -> None:
    opt = _sgd(peak)
    sched = lr_scheduler.LambdaLR(opt, _hf_linear_lambda(warmup, total))
    expected = _record(opt, sched, total + 15)  # past total_steps: stays 0
    _assert_matches(schedules.linear_warmup(peak, warmup, total), expected)


@pytest.mark.parametrize(("peak", "warmup", "total"), LINEAR_CASES)
def test_linear_warmup_transformers(peak: float, warmup: int, total: int) -> None:
    transformers = pytest.importorskip("transformers")
    opt = _sgd(peak)
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
    _assert_matches(schedules.linear_warmup(peak, warmup, total), _record(opt, sched, total + 15))


@pytest.mark.parametrize(
    ("lr", "step_size", "gamma"), [(0.1, 30, 0.1), (1.0, 1, 0.5), (3e-4, 7, 0.9)]
)
def test_step(lr: float, step_size: int, gamma: float) -> None:
    opt = _sgd(lr)
    sched = lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    _assert_matches(schedules.step(lr, step_size, gamma), _record(opt, sched, 100))


def test_step_default_gamma() -> None:
    opt = _sgd(0.2)
    sched = lr_scheduler.StepLR(opt, step_size=4)
    _assert_matches(schedules.step(0.2, 4), _record(opt, sched, 20))


@pytest.mark.parametrize(
    ("lr", "t_max", "eta_min"), [(0.1, 10, 0.0), (1e-3, 50, 1e-5), (1.0, 1, 0.0), (0.5, 7, 0.1)]
)
def test_cosine_including_past_t_max(lr: float, t_max: int, eta_min: float) -> None:
    opt = _sgd(lr)
    sched = lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
    expected = _record(opt, sched, 4 * t_max + 3)  # two full periods and a bit
    # CosineAnnealingLR steps recursively; at the troughs (lr ~ eta_min = 0) its value carries
    # rounding error of order ulp(lr), hence the tiny absolute tolerance.
    _assert_matches(schedules.cosine(lr, t_max, eta_min), expected, atol=1e-15 * lr)


def test_cosine_is_periodic_like_torch_closed_form() -> None:
    sched = schedules.cosine(1.0, 10)
    for n in (0, 3, 10, 17):
        assert sched(n).item() == pytest.approx(sched(n + 20).item(), rel=1e-12, abs=1e-15)
    assert sched(10).item() == pytest.approx(0.0, abs=1e-15)
    assert sched(20).item() == pytest.approx(1.0, rel=1e-12)


ONE_CYCLE_CASES = [
    # total_steps, pct_start, anneal_strategy, three_phase
    (100, 0.3, "cos", False),
    (100, 0.3, "linear", False),
    (100, 0.3, "cos", True),
    (100, 0.3, "linear", True),
    (57, 0.25, "cos", False),
    (57, 0.45, "linear", True),
    (10, 0.05, "cos", False),  # first phase shorter than one step
    (1, 0.3, "cos", False),
    (3, 0.4, "linear", True),
]


@pytest.mark.parametrize(("total", "pct_start", "strategy", "three_phase"), ONE_CYCLE_CASES)
def test_one_cycle_lr(total: int, pct_start: float, strategy: str, three_phase: bool) -> None:
    max_lr, div_factor, final_div_factor = 0.2, 20.0, 500.0
    opt = _sgd(max_lr)
    sched = lr_scheduler.OneCycleLR(
        opt,
        max_lr=max_lr,
        total_steps=total,
        pct_start=pct_start,
        anneal_strategy=strategy,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        three_phase=three_phase,
        cycle_momentum=False,
    )
    # Steps 0 .. total-1: every LR an optimizer uses in a total_steps-long run.
    expected = _record(opt, sched, total - 1)
    ours = schedules.one_cycle(
        max_lr, total, pct_start, strategy, div_factor, final_div_factor, three_phase
    )
    _assert_matches(ours, expected, atol=1e-15 * max_lr)


def test_one_cycle_defaults() -> None:
    opt = _sgd(1.0)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=50, cycle_momentum=False)
    _assert_matches(schedules.one_cycle(1.0, 50), _record(opt, sched, 49), atol=1e-16)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_one_cycle_holds_final_value_after_total_steps(strategy: str) -> None:
    sched = schedules.one_cycle(0.1, 20, anneal_strategy=strategy, final_div_factor=10.0)
    final = sched(19).item()
    assert final == pytest.approx(0.1 / 25.0 / 10.0, rel=1e-12)
    for n in (20, 21, 1000):
        assert sched(n).item() == final
        assert sched(torch.tensor(n)).item() == final


def test_one_cycle_zero_length_phase_is_finite() -> None:
    # pct_start * total_steps == 1 makes OneCycleLR divide by zero at step 0; we give max_lr.
    sched = schedules.one_cycle(0.1, 10, pct_start=0.1)
    values = sched(torch.arange(10))
    assert torch.isfinite(values).all()
    assert values[0].item() == 0.1


@pytest.mark.parametrize(("total", "pct_start", "strategy", "three_phase"), ONE_CYCLE_CASES)
def test_one_cycle_momentum_sgd(
    total: int, pct_start: float, strategy: str, three_phase: bool
) -> None:
    base_momentum, max_momentum = 0.8, 0.97
    opt = _sgd(0.1, momentum=0.9)
    sched = lr_scheduler.OneCycleLR(
        opt,
        max_lr=0.1,
        total_steps=total,
        pct_start=pct_start,
        anneal_strategy=strategy,
        three_phase=three_phase,
        cycle_momentum=True,
        base_momentum=base_momentum,
        max_momentum=max_momentum,
    )
    expected = _record(opt, sched, total - 1, key="momentum")
    ours = schedules.one_cycle_momentum(
        total, pct_start, strategy, base_momentum, max_momentum, three_phase
    )
    _assert_matches(ours, expected)


def test_one_cycle_momentum_adam_beta1_defaults() -> None:
    param = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = torch.optim.Adam([param], lr=0.01)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=40)
    expected = [opt.param_groups[0]["betas"][0]]
    for _ in range(39):
        opt.step()
        sched.step()
        expected.append(opt.param_groups[0]["betas"][0])
    _assert_matches(schedules.one_cycle_momentum(40), expected)


# --------------------------------------------------------------------------------------------
# dtype, device, vectorised input, step types
# --------------------------------------------------------------------------------------------


ALL_SCHEDULES = {
    "constant": schedules.constant(0.1),
    "linear_warmup": schedules.linear_warmup(0.1, 5, 50),
    "step": schedules.step(0.1, 5),
    "cosine": schedules.cosine(0.1, 20, 1e-4),
    "one_cycle": schedules.one_cycle(0.1, 50),
    "one_cycle_momentum": schedules.one_cycle_momentum(50),
}

DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_dtype_and_device_follow_input(name: str, device: str, dtype: torch.dtype) -> None:
    sched = ALL_SCHEDULES[name]
    out = sched(torch.tensor(7, dtype=dtype, device=device))
    assert out.dtype == torch.float64
    assert out.device.type == torch.device(device).type
    assert out.shape == ()
    if device != "meta":
        assert out.cpu().item() == sched(7).item()


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_int_input_gives_cpu_float64(name: str) -> None:
    out = ALL_SCHEDULES[name](3)
    assert out.dtype == torch.float64 and out.device.type == "cpu" and out.shape == ()


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_vector_of_steps(name: str) -> None:
    sched = ALL_SCHEDULES[name]
    steps = torch.arange(60)
    out = sched(steps)
    assert out.shape == (60,) and out.dtype == torch.float64
    assert out.tolist() == [sched(int(n)).item() for n in steps]


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_negative_step_is_step_zero(name: str) -> None:
    sched = ALL_SCHEDULES[name]
    assert sched(-3).item() == sched(0).item()
    assert sched(torch.tensor(-3)).item() == sched(0).item()


@pytest.mark.parametrize("bad", [1.5, "3", None, True, torch.tensor(1.0), torch.tensor(True)])
def test_bad_step_type(bad: object) -> None:
    with pytest.raises(ConfigError, match="int or an integer tensor"):
        schedules.cosine(0.1, 10)(bad)


def test_numpy_integer_step() -> None:
    np = pytest.importorskip("numpy")
    assert schedules.step(1.0, 2, 0.5)(np.int64(4)).item() == 0.25


# --------------------------------------------------------------------------------------------
# torch.compile: one graph, no recompiles across step values, no graph breaks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_compiles_fullgraph_without_recompiles(name: str) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    sched = ALL_SCHEDULES[name]
    counter = CompileCounter()
    compiled = torch.compile(sched, backend=counter, fullgraph=True)
    for n in (0, 1, 4, 5, 19, 20, 49, 50, 51, 10_000):
        step = torch.tensor(n, dtype=torch.int64)
        assert compiled(step).item() == sched(step).item(), n
    assert counter.frame_count == 1


# --------------------------------------------------------------------------------------------
# get_schedule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "factory"),
    [
        ("constant", {"lr": 0.1}, schedules.constant),
        ("none", {"lr": 0.1}, schedules.constant),
        ("linear_warmup", {"peak": 0.1, "warmup_steps": 3, "total_steps": 30}, None),
        ("step", {"lr": 0.1, "step_size": 3, "gamma": 0.5}, None),
        ("cosine", {"lr": 0.1, "t_max": 9, "eta_min": 0.01}, None),
        ("one_cycle", {"max_lr": 0.1, "total_steps": 30, "three_phase": True}, None),
        ("Cosine", {"lr": 0.1, "t_max": 9}, schedules.cosine),
    ],
)
def test_get_schedule(name: str, kwargs: dict, factory: Callable | None) -> None:
    factory = factory or getattr(schedules, name)
    built = schedules.get_schedule(name, **kwargs)
    direct = factory(**kwargs)
    steps = torch.arange(40)
    assert torch.equal(built(steps), direct(steps))


def test_get_schedule_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="'cosin'") as info:
        schedules.get_schedule("cosin", lr=0.1, t_max=3)
    for valid in ("constant", "linear_warmup", "step", "cosine", "one_cycle", "none"):
        assert valid in str(info.value)


def test_get_schedule_bad_kwargs() -> None:
    with pytest.raises(ConfigError, match="t_maks"):
        schedules.get_schedule("cosine", lr=0.1, t_maks=3)


def test_config_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        schedules.constant(-1.0)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


INVALID = [
    # (factory, kwargs, text that must appear in the message)
    (schedules.constant, {"lr": -0.1}, "-0.1"),
    (schedules.constant, {"lr": math.nan}, "nan"),
    (schedules.linear_warmup, {"peak": -1e-3, "warmup_steps": 1, "total_steps": 10}, "-0.001"),
    (schedules.linear_warmup, {"peak": 1e-3, "warmup_steps": 11, "total_steps": 10}, "11"),
    (schedules.linear_warmup, {"peak": 1e-3, "warmup_steps": 0, "total_steps": 0}, "0"),
    (schedules.linear_warmup, {"peak": 1e-3, "warmup_steps": 0, "total_steps": -5}, "-5"),
    (schedules.linear_warmup, {"peak": 1e-3, "warmup_steps": -2, "total_steps": 5}, "-2"),
    (schedules.linear_warmup, {"peak": 1e-3, "warmup_steps": 1, "total_steps": 10.0}, "10.0"),
    (schedules.step, {"lr": -0.5, "step_size": 3}, "-0.5"),
    (schedules.step, {"lr": 0.5, "step_size": 0}, "step_size"),
    (schedules.step, {"lr": 0.5, "step_size": -4}, "-4"),
    (schedules.step, {"lr": 0.5, "step_size": 2, "gamma": -0.1}, "-0.1"),
    (schedules.cosine, {"lr": -2.0, "t_max": 10}, "-2.0"),
    (schedules.cosine, {"lr": 2.0, "t_max": 0}, "t_max"),
    (schedules.cosine, {"lr": 2.0, "t_max": -7}, "-7"),
    (schedules.cosine, {"lr": 2.0, "t_max": 7, "eta_min": -0.25}, "-0.25"),
    (schedules.one_cycle, {"max_lr": -0.3, "total_steps": 10}, "-0.3"),
    (schedules.one_cycle, {"max_lr": 0.3, "total_steps": 0}, "total_steps"),
    (schedules.one_cycle, {"max_lr": 0.3, "total_steps": -3}, "-3"),
    (schedules.one_cycle, {"max_lr": 0.3, "total_steps": 10, "pct_start": 0.0}, "0.0"),
    (schedules.one_cycle, {"max_lr": 0.3, "total_steps": 10, "pct_start": 1.0}, "1.0"),
    (schedules.one_cycle, {"max_lr": 0.3, "total_steps": 10, "pct_start": 1.5}, "1.5"),
    (schedules.one_cycle, {"max_lr": 0.3, "total_steps": 10, "pct_start": -0.2}, "-0.2"),
    (schedules.one_cycle, {"max_lr": 0.3, "total_steps": 10, "anneal_strategy": "exp"}, "'exp'"),
    (schedules.one_cycle, {"max_lr": 0.3, "total_steps": 10, "div_factor": 0.0}, "div_factor"),
    (schedules.one_cycle, {"max_lr": 0.3, "total_steps": 9, "final_div_factor": -1.0}, "-1.0"),
    (schedules.one_cycle_momentum, {"total_steps": 0}, "total_steps"),
    (schedules.one_cycle_momentum, {"total_steps": 10, "pct_start": 1.2}, "1.2"),
    (schedules.one_cycle_momentum, {"total_steps": 10, "anneal_strategy": "Cos"}, "'Cos'"),
    (schedules.one_cycle_momentum, {"total_steps": 10, "base_momentum": -0.1}, "-0.1"),
    (schedules.one_cycle_momentum, {"total_steps": 10, "max_momentum": 1.5}, "1.5"),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "text"), INVALID, ids=[f"{f.__name__}-{t}" for f, _, t in INVALID]
)
def test_validation_errors(factory: Callable, kwargs: dict, text: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(text)):
        factory(**kwargs)


def test_get_schedule_validates_values() -> None:
    with pytest.raises(ConfigError, match=re.escape("-0.5")):
        schedules.get_schedule("one_cycle", max_lr=-0.5, total_steps=10)


# --------------------------------------------------------------------------------------------
# the host form: the same formula on Python floats, bitwise the tensor's value
# --------------------------------------------------------------------------------------------

HOST_CASES = {
    **ALL_SCHEDULES,
    "linear_warmup_no_warmup": schedules.linear_warmup(3e-4, 0, 7),
    "step_gamma": schedules.step(0.3, 3, 0.7),
    "cosine_no_floor": schedules.cosine(1.0, 7),
    "one_cycle_linear": schedules.one_cycle(0.1, 50, anneal_strategy="linear"),
    "one_cycle_three_phase": schedules.one_cycle(0.1, 57, three_phase=True),
    "one_cycle_zero_phase": schedules.one_cycle(0.5, 10, pct_start=0.1),
    "one_cycle_momentum_linear_three": schedules.one_cycle_momentum(
        33, three_phase=True, anneal_strategy="linear"
    ),
}


@pytest.mark.parametrize("name", sorted(HOST_CASES))
def test_host_form_is_bitwise_the_tensor_value(name: str) -> None:
    sched = HOST_CASES[name]
    for n in range(-2, 130):
        host = sched.at_host(n)
        assert isinstance(host, float)
        tensor = sched(torch.tensor(n)).item()
        assert host.hex() == tensor.hex(), (n, host, tensor)


def test_value_now_reads_a_cpu_counter_on_the_host() -> None:
    sched = schedules.cosine(0.1, 20, 1e-4)
    got = schedules.value_now(sched, torch.tensor(7))
    assert isinstance(got, float) and got == sched(7).item()


def test_value_now_keeps_tensors_off_the_cpu_and_for_plain_callables() -> None:
    sched = schedules.cosine(0.1, 20, 1e-4)
    meta = schedules.value_now(sched, torch.tensor(7, device="meta"))
    assert isinstance(meta, torch.Tensor) and meta.device.type == "meta"
    plain = schedules.value_now(lambda step: step * 0.5, torch.tensor(4))
    assert isinstance(plain, torch.Tensor) and plain.item() == 2.0
    number = schedules.value_now(lambda step: 0.25, torch.tensor(4))
    assert number.dtype == torch.float64 and number.item() == 0.25


def test_value_now_keeps_the_tensor_form_while_compiling() -> None:
    sched = schedules.linear_warmup(1e-3, 10, 110)

    def lr(step: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(schedules.value_now(sched, step)) * 2

    compiled = torch.compile(lr, backend="eager", fullgraph=True)
    for n in (0, 5, 60):
        assert compiled(torch.tensor(n)).item() == sched(n).item() * 2
