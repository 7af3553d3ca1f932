"""medfunc.optim optimizers against the real torch.optim, step by step, with real gradients.

Each test trains a small MLP (with biases and a LayerNorm) for up to 50 steps. Gradients come
from autograd on the torch reference model; both sides get the same gradients each step. With the
same kernel path the parameters and every state tensor must be bitwise equal (``torch.equal``).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from optim_helpers import make_model, params_of, real_grads
from optim_helpers import one_thread as one_thread  # autouse fixture of this module
from torch import nn

from medfunc.optim import UpdateContext, adam, adamw, sgd

STEPS = 50


def named(model: nn.Module, *names: str) -> list[tuple[str, nn.Parameter]]:
    d = dict(model.named_parameters())
    return [(n, d[n]) for n in names]


def train_pair(tx, make_opt, steps=STEPS, schedule=None, lr_for_torch=None):
    """Train the torch reference and medfunc side by side; return both."""
    ref = make_model()
    params = params_of(ref)
    opt = make_opt(ref)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    state = tx.init(params)
    metrics_lr = []
    for k in range(steps):
        grads = real_grads(ref)
        opt.step()
        if sched is not None:
            sched.step()
        ctx = UpdateContext(step=torch.tensor(k, dtype=torch.int64))
        grads = OrderedDict((n, g.clone()) for n, g in grads.items())
        _, params, state = tx.update(grads, state, params, ctx)
        metrics_lr.append(ctx.metrics["lr"])
    return ref, opt, params, state, metrics_lr


def compare(ref, opt, params, state, exact=True):
    def check(a, b, what):
        if exact:
            assert torch.equal(a, b), f"{what} differs: max {float((a - b).abs().max())}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=what)

    for n, p in ref.named_parameters():
        check(params[n], p.detach(), f"param {n}")
        st = opt.state.get(p, {})
        if hasattr(state, "exp_avg"):
            check(state.exp_avg[n], st["exp_avg"], f"exp_avg {n}")
            check(state.exp_avg_sq[n], st["exp_avg_sq"], f"exp_avg_sq {n}")
            assert float(state.step[n]) == float(st["step"])
            assert state.step[n].dtype == st["step"].dtype
            if "max_exp_avg_sq" in st:
                check(state.max_exp_avg_sq[n], st["max_exp_avg_sq"], f"max_exp_avg_sq {n}")
            else:
                assert not state.max_exp_avg_sq
        elif st.get("momentum_buffer") is not None:
            check(state.momentum_buffer[n], st["momentum_buffer"], f"momentum_buffer {n}")
        else:
            assert not state.momentum_buffer


LR = 1e-2
CASES = [
    # (id, medfunc factory(kernel), torch factory(model, **flags))
    (
        "adamw",
        lambda k: adamw(LR, decay_mask=None, kernel=k),
        lambda m, **f: torch.optim.AdamW(m.parameters(), lr=LR, **f),
    ),
    (
        "adamw-wd0.1-betas",
        lambda k: adamw(LR, (0.8, 0.99), 1e-6, 0.1, decay_mask=None, kernel=k),
        lambda m, **f: torch.optim.AdamW(m.parameters(), LR, (0.8, 0.99), 1e-6, 0.1, **f),
    ),
    (
        "adamw-nodecay",
        lambda k: adamw(LR, weight_decay=0.0, kernel=k),
        lambda m, **f: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0, **f),
    ),
    (
        "adamw-amsgrad",
        lambda k: adamw(LR, weight_decay=0.05, amsgrad=True, decay_mask=None, kernel=k),
        lambda m, **f: torch.optim.AdamW(
            m.parameters(), lr=LR, weight_decay=0.05, amsgrad=True, **f
        ),
    ),
    (
        "adam",
        lambda k: adam(LR, kernel=k),
        lambda m, **f: torch.optim.Adam(m.parameters(), lr=LR, **f),
    ),
    (
        "adam-l2",
        lambda k: adam(LR, weight_decay=0.1, decay_mask=None, kernel=k),
        lambda m, **f: torch.optim.Adam(m.parameters(), lr=LR, weight_decay=0.1, **f),
    ),
    (
        "adam-amsgrad",
        lambda k: adam(LR, amsgrad=True, kernel=k),
        lambda m, **f: torch.optim.Adam(m.parameters(), lr=LR, amsgrad=True, **f),
    ),
    (
        "sgd",
        lambda k: sgd(0.1, kernel=k),
        lambda m, **f: torch.optim.SGD(m.parameters(), lr=0.1, **f),
    ),
    (
        "sgd-wd",
        lambda k: sgd(0.1, weight_decay=0.01, decay_mask=None, kernel=k),
        lambda m, **f: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.01, **f),
    ),
    (
        "sgd-momentum",
        lambda k: sgd(0.1, momentum=0.9, kernel=k),
        lambda m, **f: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, **f),
    ),
    (
        "sgd-nesterov-wd",
        lambda k: sgd(0.1, 0.9, nesterov=True, weight_decay=0.01, decay_mask=None, kernel=k),
        lambda m, **f: torch.optim.SGD(
            m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, **f
        ),
    ),
    (
        "sgd-dampening",
        lambda k: sgd(0.1, momentum=0.9, dampening=0.3, kernel=k),
        lambda m, **f: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.3, **f),
    ),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_foreach_bitwise_equals_torch_foreach(case):
    _, make_tx, make_opt = case
    result = train_pair(make_tx("foreach"), lambda m: make_opt(m, foreach=True))
    compare(*result[:4], exact=True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fused_close_to_torch_foreach_and_bitwise_to_torch_fused(case):
    _, make_tx, make_opt = case
    ref, opt, params, state, _ = train_pair(make_tx("fused"), lambda m: make_opt(m, foreach=True))
    compare(ref, opt, params, state, exact=False)
    fused_pair = train_pair(make_tx("fused"), lambda m: make_opt(m, fused=True), steps=20)
    compare(*fused_pair[:4], exact=True)


def test_auto_kernel_on_cpu_is_foreach():
    result = train_pair(
        adamw(LR, decay_mask=None),
        lambda m: torch.optim.AdamW(m.parameters(), lr=LR, foreach=True),
        steps=10,
    )
    compare(*result[:4], exact=True)


def test_default_mask_and_multipliers_equal_torch_param_groups():
    tx = adamw(LR, weight_decay=0.1, lr_multipliers=[("fc2", 10.0)], kernel="foreach")

    def make_opt(m):
        # Built by hand: decay for weights only (bias and LayerNorm excluded); fc2 at 10x.
        return torch.optim.AdamW(
            [
                {"params": [m.fc1.weight]},
                {"params": [m.fc1.bias, m.ln.weight, m.ln.bias], "weight_decay": 0.0},
                {"params": [m.fc2.weight], "lr": LR * 10.0},
                {"params": [m.fc2.bias], "lr": LR * 10.0, "weight_decay": 0.0},
            ],
            lr=LR,
            weight_decay=0.1,
            foreach=True,
        )

    compare(*train_pair(tx, make_opt)[:4], exact=True)


def test_list_mask_and_callable_mask_sgd_equal_torch_param_groups():
    def make_opt(m):
        return torch.optim.SGD(
            [
                {"params": [m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias]},
                {"params": [m.ln.weight, m.ln.bias], "weight_decay": 0.0},
            ],
            lr=0.05,
            momentum=0.9,
            weight_decay=0.01,
            foreach=True,
        )

    for mask in (["ln."], lambda name: not name.startswith("ln")):
        tx = sgd(0.05, momentum=0.9, weight_decay=0.01, decay_mask=mask, kernel="foreach")
        compare(*train_pair(tx, make_opt, steps=20)[:4], exact=True)


def _warmup(k: int) -> float:
    return 1e-2 * min(1.0, (k + 1) / 10)


def _warmup_schedule(step: torch.Tensor) -> torch.Tensor:
    return 1e-2 * torch.clamp((step.to(torch.float64) + 1) / 10, max=1.0)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_schedule_equals_lambda_lr(kind):
    # torch: base lr 1.0 (2.0 for fc2) times the lambda; medfunc: the schedule times the
    # multiplier. A power-of-two multiplier keeps both orders of multiplication exact.
    if kind == "adamw":
        tx = adamw(
            _warmup_schedule, decay_mask=None, lr_multipliers=[("fc2", 2.0)], kernel="foreach"
        )
        cls, kw = torch.optim.AdamW, {}
    else:
        tx = sgd(_warmup_schedule, momentum=0.9, lr_multipliers=[("fc2", 2.0)], kernel="foreach")
        cls, kw = torch.optim.SGD, {"momentum": 0.9}

    def make_opt(m):
        return cls(
            [
                {"params": [p for n, p in m.named_parameters() if "fc2" not in n]},
                {"params": list(m.fc2.parameters()), "lr": 2.0},
            ],
            lr=1.0,
            foreach=True,
            **kw,
        )

    ref, opt, params, state, lrs = train_pair(tx, make_opt, steps=20, schedule=_warmup)
    compare(ref, opt, params, state, exact=True)
    assert [float(v) for v in lrs] == [_warmup(k) for k in range(20)]
    assert all(v.dtype == torch.float64 and v.ndim == 0 for v in lrs)


def test_lr_metric_for_constant_lr():
    *_, lrs = train_pair(adamw(3e-4), lambda m: torch.optim.AdamW(m.parameters()), steps=2)
    assert [float(v) for v in lrs] == [3e-4, 3e-4]


def test_skipped_first_step_keeps_sgd_dampening_first_update_semantics():
    """A skipped update must not count as torch's lazy first momentum step."""
    for kernel in ("foreach", "fused"):
        tx = sgd(0.1, momentum=0.9, dampening=0.5, kernel=kernel)
        ref = make_model()
        params = params_of(ref)
        state = tx.init(params)
        nan_grads = OrderedDict((n, torch.full_like(p, float("nan"))) for n, p in params.items())
        ctx = UpdateContext(step=torch.tensor(0), found_inf=torch.ones(()))
        _, params, state = tx.update(nan_grads, state, params, ctx)
        opt = torch.optim.SGD(
            ref.parameters(), lr=0.1, momentum=0.9, dampening=0.5, **{kernel: True}
        )
        for k in range(10):
            grads = real_grads(ref)
            opt.step()
            ctx = UpdateContext(step=torch.tensor(k), found_inf=torch.zeros(()))
            _, params, state = tx.update(grads, state, params, ctx)
        compare(ref, opt, params, state, exact=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda k: adamw(0.1, weight_decay=0.01, kernel=k),
        lambda k: adam(0.1, amsgrad=True, kernel=k),
        lambda k: sgd(0.1, momentum=0.9, nesterov=True, kernel=k),
    ],
    ids=["adamw", "adam-amsgrad", "sgd-nesterov"],
)
def test_fused_kernels_take_gradients_in_another_memory_layout(make):
    """A transposed gradient (as a compiled backward or a channels_last model can return):
    torch's fused CPU kernel alone misreads it; medfunc's fused path equals the foreach one."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=g)
    grads = [torch.randn(3, 4, generator=g).t() for _ in range(3)]
    results = {}
    for kernel in ("fused", "foreach"):
        tx = make(kernel)
        params = OrderedDict(w=weight.clone())
        state = tx.init(params)
        for i, grad in enumerate(grads):
            ctx = UpdateContext(step=torch.tensor(i), found_inf=torch.tensor(0.0))
            _, params, state = tx.update(OrderedDict(w=grad), state, params, ctx)
        results[kernel] = params["w"]
    torch.testing.assert_close(results["fused"], results["foreach"], rtol=1e-6, atol=1e-6)
    assert not torch.equal(results["fused"], weight)


def _decay_groups(m: nn.Module, weight_decay: float) -> list[dict]:
    """torch param groups of the default mask: weights decayed; biases and the norm not."""
    no_decay = [m.fc1.bias, m.ln.weight, m.ln.bias, m.fc2.bias]
    return [
        {"params": [m.fc1.weight, m.fc2.weight], "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


MERGED_CASES = [
    ("adamw", lambda k: adamw(LR, weight_decay=0.1, kernel=k), torch.optim.AdamW, {}),
    (
        "adamw-amsgrad",
        lambda k: adamw(LR, weight_decay=0.1, amsgrad=True, kernel=k),
        torch.optim.AdamW,
        {"amsgrad": True},
    ),
    ("adam-l2", lambda k: adam(LR, weight_decay=0.1, kernel=k), torch.optim.Adam, {}),
    (
        "sgd-momentum-wd",
        lambda k: sgd(0.1, momentum=0.9, weight_decay=0.01, kernel=k),
        torch.optim.SGD,
        {"momentum": 0.9},
    ),
]


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
@pytest.mark.parametrize("case", MERGED_CASES, ids=[c[0] for c in MERGED_CASES])
def test_decay_and_no_decay_groups_equal_torch_param_groups(case, kernel):
    """The decay and no-decay groups of one LR go to one kernel call (per-parameter weight
    decay, see kernels.adam_step); every number still equals torch's two param groups."""
    _, make_tx, torch_class, options = case
    wd = 0.01 if torch_class is torch.optim.SGD else 0.1
    lr = 0.1 if torch_class is torch.optim.SGD else LR

    def make_opt(m):
        return torch_class(_decay_groups(m, wd), lr=lr, **options, **{kernel: True})

    compare(*train_pair(make_tx(kernel), make_opt)[:4], exact=True)


def test_decay_and_no_decay_groups_make_one_foreach_adam_call():
    """Both groups of the default mask are updated by one foreach AdamW call (one
    ``_foreach_lerp_`` of the first moments per update; torch.optim makes one per group)."""
    tx = adamw(LR, weight_decay=0.1, kernel="foreach")
    ref = make_model()
    params = params_of(ref)
    state = tx.init(params)
    grads = real_grads(ref)
    ctx = UpdateContext(step=torch.tensor(0, dtype=torch.int64), found_inf=torch.zeros(()))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tx.update(grads, state, params, ctx)
    names = [e.name for e in prof.events()]
    assert names.count("aten::_foreach_lerp_") == 1
    assert names.count("aten::_foreach_mul_") == 2  # the weight decay and exp_avg_sq * beta2
