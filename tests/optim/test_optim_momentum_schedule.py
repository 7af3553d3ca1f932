"""A schedule for Adam's beta1 and SGD's momentum: bitwise equal to torch.optim driven by
OneCycleLR (which cycles them), through the functional step, torch interop and skipped steps."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from optim_helpers import MLP, X, Y, ctx_at, make_model
from optim_helpers import one_thread as one_thread  # autouse fixture of this module
from torch import nn

import medfunc as mf
from medfunc.errors import ConfigError
from medfunc.optim import (
    UpdateContext,
    adam,
    adamw,
    sgd,
    to_torch_state_dict,
    torch_optimizer,
)
from medfunc.optim.kernels import KernelConfig, check_momentum_schedule, resolve_kernel

TOTAL = 14
MAX_LR = 0.05


class _Loss(nn.Module):
    """The MLP with a cross-entropy loss (a model the functional step can train)."""

    def __init__(self, model: MLP) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.model(x), y)


def _batches():
    return [(X[i : i + 8], Y[i : i + 8]) for i in range(0, 32, 8)] * 4


def _torch_run(name: str, **options):
    """torch.optim + OneCycleLR with its defaults (cycle_momentum=True), the original's setup."""
    model = _Loss(make_model())
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
    opt = cls(model.parameters(), lr=MAX_LR, foreach=True, **options)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=TOTAL)
    momenta = []
    for x, y in _batches()[:TOTAL]:
        group = opt.param_groups[0]
        momenta.append(group["betas"][0] if "betas" in group else group["momentum"])
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
        sched.step()
    return model, momenta


def _medfunc_tx(name: str, cycled: bool = True, **options):
    lr = mf.schedules.one_cycle(MAX_LR, TOTAL)
    momentum = mf.schedules.one_cycle_momentum(TOTAL) if cycled else 0.9
    if name == "sgd":
        return sgd(lr, momentum=momentum, decay_mask=None, **options)
    factory = adamw if name == "adamw" else adam
    return factory(lr, betas=(momentum, 0.999), decay_mask=None, **options)


def _medfunc_run(tx, steps=TOTAL):
    state = mf.init_state(_Loss(make_model()), tx)
    for batch in _batches()[:steps]:
        state, _ = mf.train_step(state, batch)
    return state


CASES = [
    ("adamw", {"weight_decay": 0.05}),
    ("adam", {"weight_decay": 0.01}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    ("sgd", {"momentum": 0.9, "dampening": 0.2}),
]


@pytest.mark.parametrize("name, options", CASES)
def test_a_one_cycle_momentum_schedule_equals_one_cycle_lr_bitwise(name, options):
    reference, momenta = _torch_run(name, **options)
    extra = {k: v for k, v in options.items() if k != "momentum"}
    state = _medfunc_run(_medfunc_tx(name, **extra))
    for param_name, param in reference.named_parameters():
        assert torch.equal(state.params[param_name], param), param_name
    # the torch reference really cycled: 0.95 -> 0.85 -> back up
    assert momenta[0] == 0.95 and min(momenta) < 0.86 and momenta[-1] > 0.94


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_fixed_momentum_does_not_equal_one_cycle_lr(name):
    reference, _ = _torch_run(name, **({"momentum": 0.9} if name == "sgd" else {}))
    state = _medfunc_run(_medfunc_tx(name, cycled=False))
    differ = [not torch.equal(state.params[n], p) for n, p in reference.named_parameters()]
    assert any(differ)


def test_fused_cpu_kernel_reads_the_schedule_on_the_host_and_matches_torch_fused():
    model = _Loss(make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=MAX_LR, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=TOTAL)
    for x, y in _batches()[:TOTAL]:
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
        sched.step()
    state = _medfunc_run(_medfunc_tx("adamw", kernel="fused"))
    for param_name, param in model.named_parameters():
        assert torch.equal(state.params[param_name], param), param_name


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_torch_interop_reports_the_momentum_at_the_states_step(name):
    state = _medfunc_run(_medfunc_tx(name), steps=4)
    reference, momenta = _torch_run(name, **({"momentum": 0.9} if name == "sgd" else {}))
    schedule = mf.schedules.one_cycle_momentum(TOTAL)
    sd = to_torch_state_dict(state.tx, state.opt_state, state.params, state.step)
    key = "betas" if name != "sgd" else "momentum"
    value = sd["param_groups"][0][key]
    assert (value[0] if name != "sgd" else value) == float(schedule(4))
    opt = torch_optimizer(state.tx, state.params, step=state.step)
    assert opt.param_groups[0][key] == value
    # a torch optimizer loaded from it continues with that momentum
    assert momenta[4] == float(schedule(4))


def test_a_skipped_update_leaves_params_and_moments_unchanged():
    tx = _medfunc_tx("adamw")
    state = _medfunc_run(tx, steps=3)
    params = {n: p.clone() for n, p in state.params.items()}
    moments = [m.clone() for m in state.opt_state.exp_avg.values()]
    grads = {n: torch.full_like(p, float("nan")) for n, p in state.params.items()}
    ctx = ctx_at(3, found_inf=torch.ones((), dtype=torch.float32))
    tx.update(OrderedDict(grads), state.opt_state, state.params, ctx)
    for n, p in state.params.items():
        assert torch.equal(p, params[n])
    for before, after in zip(moments, state.opt_state.exp_avg.values()):
        assert torch.equal(before, after)


def test_an_auto_kernel_with_a_beta1_schedule_avoids_the_fused_kernel_on_accelerators():
    cuda = torch.device("cuda")
    assert resolve_kernel("auto", cuda, adam=True).fused
    scheduled = resolve_kernel("auto", cuda, adam=True, tensor_beta1=True)
    assert not scheduled.fused
    with pytest.raises(ConfigError, match="kernel='fused' on cuda takes Adam's beta1 as a"):
        resolve_kernel("fused", cuda, adam=True, tensor_beta1=True)
    # on the CPU the fused kernel reads the schedule's CPU tensor for free
    assert resolve_kernel("fused", torch.device("cpu"), adam=True, tensor_beta1=True).fused


def test_invalid_momentum_values_are_config_errors():
    with pytest.raises(ConfigError, match="momentum must be a Python float or a schedule"):
        sgd(0.1, momentum=torch.tensor(0.9))
    with pytest.raises(ConfigError, match="betas"):
        adamw(0.1, betas=(lambda step: step, 1.5))
    with pytest.raises(ConfigError, match="nesterov=True needs"):
        sgd(0.1, momentum=mf.schedules.one_cycle_momentum(10), nesterov=True, dampening=0.1)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_deepspeed_lr_scheduler_sets_the_momentum_as_one_cycle_lr(name):
    from medfunc.distributed.deepspeed import ScheduleLR

    tx = _medfunc_tx(name)
    model = _Loss(make_model())
    opt = torch_optimizer(tx, OrderedDict(model.named_parameters()))
    sched = ScheduleLR(opt, tx.spec)
    _, momenta = _torch_run(name, **({"momentum": 0.9} if name == "sgd" else {}))
    seen = []
    for _ in range(TOTAL):
        group = opt.param_groups[0]
        seen.append(group["betas"][0] if name != "sgd" else group["momentum"])
        opt.step()
        sched.step()
    assert seen == momenta


def test_a_beta1_schedule_traces_as_one_graph_without_host_reads():
    """fullgraph=True fails on any host read of a tensor (a sync on accelerators): the beta1
    schedule stays a graph tensor (torch's capturable kernel, as on accelerators)."""
    tx = _medfunc_tx("adamw")
    params = OrderedDict((n, p.detach().clone()) for n, p in make_model().named_parameters())
    compiled_params = OrderedDict((n, p.clone()) for n, p in params.items())
    g = torch.Generator().manual_seed(4)
    grads = OrderedDict((n, torch.randn(p.shape, generator=g)) for n, p in params.items())
    eager_state, compiled_state = tx.init(params), tx.init(compiled_params)

    def update(params, state, step):
        return tx.update(grads, state, params, UpdateContext(step=step))

    compiled = torch.compile(update, backend="eager", fullgraph=True)
    for k in range(5):
        update(params, eager_state, torch.tensor(k))
        compiled(compiled_params, compiled_state, torch.tensor(k))
    # the capturable kernel computes the bias corrections on tensors: equal within rounding
    for name, value in params.items():
        torch.testing.assert_close(compiled_params[name], value, rtol=0, atol=5e-6)
    assert not torch.equal(compiled_params["fc1.weight"], make_model().fc1.weight)


def test_an_sgd_momentum_schedule_off_the_cpu_warns_of_the_per_step_read():
    cuda_path = KernelConfig(fused=True, capturable=False, device_type="cuda")
    schedule = mf.schedules.one_cycle_momentum(10)
    with pytest.warns(RuntimeWarning, match="sgd with a momentum schedule on cuda"):
        check_momentum_schedule(cuda_path, adam=False, scheduled=schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_momentum_schedule(cuda_path, adam=True, scheduled=schedule)  # tensor beta1
        check_momentum_schedule(cuda_path, adam=False, scheduled=None)
        cpu_path = KernelConfig(fused=False, capturable=False, device_type="cpu")
        check_momentum_schedule(cpu_path, adam=False, scheduled=schedule)
