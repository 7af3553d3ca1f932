"""Skip-on-overflow (found_inf) and gradient clipping, against torch's own utilities."""

from __future__ import annotations

from collections import OrderedDict

import optree
import pytest
import torch
from optim_helpers import ctx_at, load_params, params_of, real_grads
from optim_helpers import make_sequential_model as make_model
from optim_helpers import one_thread as one_thread  # autouse fixture of this module

from medfunc.optim import adam, adamw, chain, clip_by_global_norm, clip_by_value, global_norm, sgd


def leaves(tree) -> list[torch.Tensor]:
    return [t.clone() for t in optree.tree_leaves(tree, namespace="medfunc")]


def clone_tree(tree):
    return optree.tree_map(torch.clone, tree, namespace="medfunc")


def assert_bitwise(a, b):
    la, lb = optree.tree_leaves(a, namespace="medfunc"), optree.tree_leaves(b, namespace="medfunc")
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.device == y.device
        assert torch.equal(x, y)


OPTIMIZERS = [
    ("adamw", lambda k: adamw(1e-2, weight_decay=0.1, kernel=k)),
    ("adamw-amsgrad", lambda k: adamw(1e-2, amsgrad=True, lr_multipliers=[("3.", 2.0)], kernel=k)),
    ("adam-l2", lambda k: adam(1e-2, weight_decay=0.1, kernel=k)),
    ("sgd", lambda k: sgd(0.1, weight_decay=0.01, kernel=k)),
    ("sgd-nesterov", lambda k: sgd(0.1, momentum=0.9, nesterov=True, kernel=k)),
    ("sgd-dampening", lambda k: sgd(0.1, momentum=0.9, dampening=0.2, kernel=k)),
]


def trained(tx, steps=3):
    model = make_model()
    params = params_of(model)
    state = tx.init(params)
    for k in range(steps):
        load_params(model, params)
        _, params, state = tx.update(real_grads(model), state, params, ctx_at(k))
    load_params(model, params)
    return model, params, state


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
@pytest.mark.parametrize("case", OPTIMIZERS, ids=[c[0] for c in OPTIMIZERS])
def test_found_inf_one_leaves_params_and_state_bitwise_unchanged(case, kernel):
    tx = case[1](kernel)
    for steps in (0, 3):  # before the first update (lazy torch state) and mid-training
        _, params, state = trained(tx, steps)
        before = (leaves(params), leaves(state))
        bad = OrderedDict((n, torch.full_like(p, float("nan"))) for n, p in params.items())
        next(iter(bad.values())).view(-1)[0] = float("inf")
        ctx = ctx_at(steps, found_inf=torch.ones(()))
        _, params, state = tx.update(bad, state, params, ctx)
        assert_bitwise((leaves(params), leaves(state)), before)
        assert float(ctx.metrics["lr"]) > 0


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
@pytest.mark.parametrize("case", OPTIMIZERS, ids=[c[0] for c in OPTIMIZERS])
def test_found_inf_zero_equals_no_found_inf(case, kernel):
    tx = case[1](kernel)
    for steps in (0, 3):
        model, params, state = trained(tx, steps)
        grads = real_grads(model)
        p1, s1 = clone_tree(params), clone_tree(state)
        _, p1, s1 = tx.update(clone_tree(grads), s1, p1, ctx_at(steps))
        ctx = ctx_at(steps, found_inf=torch.zeros(()))
        _, p2, s2 = tx.update(clone_tree(grads), state, params, ctx)
        assert_bitwise((p1, s1), (p2, s2))
        assert not all(torch.equal(a, b.detach()) for a, b in zip(leaves(p1), model.parameters()))


def test_update_returns_the_given_tensors_updated_in_place():
    tx = adamw(1e-2)
    model, params, state = trained(tx, 1)
    ids = [t.data_ptr() for t in leaves_ptrs(params, state)]
    _, p2, s2 = tx.update(real_grads(model), state, params, ctx_at(1))
    assert [t.data_ptr() for t in leaves_ptrs(p2, s2)] == ids


def leaves_ptrs(params, state):
    return optree.tree_leaves((params, state), namespace="medfunc")


# ----------------------------------------------------------------------------------- clipping


def test_clip_by_global_norm_equals_clip_grad_norm_bitwise():
    model = make_model()
    grads = real_grads(model)
    for max_norm in (0.05, 1e3):  # clipping and (coefficient clamped to 1) not clipping
        ours = OrderedDict((n, g.clone()) for n, g in grads.items())
        ctx = ctx_at(0)
        ours, _, _ = clip_by_global_norm(max_norm).update(ours, (), OrderedDict(), ctx)
        for p, g in zip(model.parameters(), grads.values()):
            p.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert torch.equal(ctx.metrics["grad_norm"], total)
        assert torch.equal(global_norm(grads), total)
        for (n, p), g in zip(model.named_parameters(), ours.values()):
            assert torch.equal(g, p.grad), n


def test_clip_by_global_norm_reuses_ctx_grad_norm():
    model = make_model()
    grads = real_grads(model)
    given = global_norm(grads) * 4  # deliberately not the real norm: proves it is reused
    ctx = ctx_at(0, grad_norm=given)
    ours, _, _ = clip_by_global_norm(0.1).update(
        OrderedDict((n, g.clone()) for n, g in grads.items()), (), OrderedDict(), ctx
    )
    for p, g in zip(model.parameters(), grads.values()):
        p.grad = g.clone()
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), 0.1, given)
    for p, g in zip(model.parameters(), ours.values()):
        assert torch.equal(g, p.grad)
    assert ctx.metrics["grad_norm"] is given


def test_clip_by_value_equals_clip_grad_value_bitwise():
    model = make_model()
    grads = real_grads(model)
    ours, _, _ = clip_by_value(0.01).update(
        OrderedDict((n, g.clone()) for n, g in grads.items()),
        (),
        OrderedDict(),
        ctx_at(0),
    )
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
    for p, g in zip(model.parameters(), ours.values()):
        assert torch.equal(g, p.grad)
    assert any(torch.equal(g.abs().max(), torch.tensor(0.01)) for g in ours.values())


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_chain_clip_adamw_equals_torch_loop(kernel):
    tx = chain(clip_by_global_norm(0.5), adamw(1e-2, decay_mask=None, kernel=kernel))
    ref = make_model()
    params = params_of(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, **{kernel: True})
    state = tx.init(params)
    assert isinstance(state, tuple) and state[0] == ()
    for k in range(20):
        grads = real_grads(ref)
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        ctx = ctx_at(k)
        _, params, state = tx.update(grads, state, params, ctx)
        assert torch.equal(ctx.metrics["grad_norm"], norm)
    for n, p in ref.named_parameters():
        assert torch.equal(params[n], p.detach()), n
        assert torch.equal(state[1].exp_avg_sq[n], opt.state[p]["exp_avg_sq"]), n
