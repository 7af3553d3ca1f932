"""CUDA checks of medfunc.optim: updates never sync with the host, and equal torch.optim on CUDA.

Skipped without CUDA (run by benchmarks/gpu_check.sh).
"""

from __future__ import annotations

from collections import OrderedDict

import optree
import pytest
import torch
from torch import nn

from medfunc.optim import (
    UpdateContext,
    adam,
    adamw,
    chain,
    clip_by_global_norm,
    sgd,
    torch_optimizer,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _schedule(step: torch.Tensor) -> torch.Tensor:
    return 1e-2 * torch.clamp((step.to(torch.float64) + 1) / 10, max=1.0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3)).cuda()


def _grads(model: nn.Module) -> OrderedDict:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g).cuda(), torch.randint(0, 3, (32,), generator=g).cuda()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return OrderedDict((n, p.grad.detach().clone()) for n, p in model.named_parameters())


TXS = {
    "adamw-auto(fused)": lambda lr: adamw(lr, amsgrad=True, lr_multipliers=[("3.", 2.0)]),
    "adamw-foreach(capturable)": lambda lr: adamw(lr, kernel="foreach"),
    "adam-auto(fused)": lambda lr: adam(lr, weight_decay=0.01),
    "sgd-auto(fused)-dampening": lambda lr: sgd(lr, momentum=0.9, dampening=0.1),
    "sgd-auto(fused)-nesterov": lambda lr: sgd(lr, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", list(TXS))
def test_update_with_schedule_and_found_inf_never_syncs(name):
    model = _model()
    params = OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters())
    tx = chain(clip_by_global_norm(1.0), TXS[name](_schedule))
    state = tx.init(params)
    grads = _grads(model)
    inputs = [
        (torch.tensor(k, device="cuda"), torch.tensor(float(k == 1), device="cuda"))
        for k in range(3)
    ]
    snapshots = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, found_inf in inputs:
            snapshots.append(optree.tree_map(torch.clone, (params, state), namespace="medfunc"))
            g = OrderedDict((n, t.clone()) for n, t in grads.items())
            ctx = UpdateContext(step=step, found_inf=found_inf)
            _, params, state = tx.update(g, state, params, ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the skipped update (found_inf == 1) left everything bitwise unchanged
    initial, before_skip, after_skip = (
        optree.tree_leaves(s, namespace="medfunc") for s in snapshots
    )
    assert all(torch.equal(a, b) for a, b in zip(before_skip, after_skip))
    assert not all(torch.equal(a, b) for a, b in zip(initial, before_skip))


@pytest.mark.parametrize("name", list(TXS))
def test_cuda_kernels_equal_torch_optim_on_cuda(name):
    tx = TXS[name](1e-2)
    ref = _model()
    opt = torch_optimizer(tx, OrderedDict(ref.named_parameters()))
    params = OrderedDict((n, p.detach().clone()) for n, p in ref.named_parameters())
    state = tx.init(params)
    for k in range(10):
        grads = _grads(ref)
        opt.step()
        _, params, state = tx.update(grads, state, params, UpdateContext(step=torch.tensor(k)))
    for n, p in ref.named_parameters():
        assert torch.equal(params[n], p.detach()), n
