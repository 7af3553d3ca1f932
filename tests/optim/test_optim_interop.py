"""torch.optim state_dict interop: medfunc -> torch -> medfunc, continuing bitwise."""

from __future__ import annotations

import io
from collections import OrderedDict

import pytest
import torch
from optim_helpers import X, Y, load_params, make_model, params_of, real_grads
from optim_helpers import one_thread as one_thread  # autouse fixture of this module
from torch import nn

from medfunc.errors import ConfigError
from medfunc.optim import (
    UpdateContext,
    adam,
    adamw,
    chain,
    clip_by_global_norm,
    from_torch_state_dict,
    sgd,
    to_torch_state_dict,
    torch_param_groups,
)


def grads_at(params: OrderedDict) -> OrderedDict:
    """Real gradients of the fixed loss at ``params`` (a fresh model loaded with them)."""
    return real_grads(load_params(make_model(), params))


def medfunc_steps(tx, params, state, start, n):
    for k in range(start, start + n):
        _, params, state = tx.update(
            grads_at(params), state, params, UpdateContext(step=torch.tensor(k))
        )
    return params, state


def torch_steps(model, opt, n):
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()


def model_params(model) -> OrderedDict:
    return OrderedDict(model.named_parameters())


def assert_same(a, b, path="sd"):
    """Recursive equality of state dicts (tensors bitwise, with dtype and device)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b and type(a) is type(b) or (a == b and {type(a), type(b)} <= {int, float}), (
            path,
            a,
            b,
        )


TXS = [
    (
        "adamw-masks-mult",
        lambda: adamw(1e-2, weight_decay=0.1, lr_multipliers=[("fc2", 3.0)], kernel="foreach"),
        torch.optim.AdamW,
    ),
    (
        "adam-amsgrad",
        lambda: adam(1e-2, weight_decay=0.01, amsgrad=True, kernel="foreach"),
        torch.optim.Adam,
    ),
    (
        "sgd-momentum",
        lambda: sgd(0.05, momentum=0.9, weight_decay=1e-3, kernel="foreach"),
        torch.optim.SGD,
    ),
    ("adamw-fused", lambda: adamw(1e-2, kernel="fused"), torch.optim.AdamW),
    ("sgd-fused", lambda: sgd(0.05, momentum=0.9, dampening=0.1, kernel="fused"), torch.optim.SGD),
]


def make_torch_opt(tx, cls, model):
    spec_flags = {"fused": True} if tx.spec.kernel == "fused" else {"foreach": True}
    hyper = tx.spec.hyperparameters()
    return cls(torch_param_groups(tx, model_params(model)), **hyper, **spec_flags)


@pytest.mark.parametrize("case", TXS, ids=[c[0] for c in TXS])
def test_to_torch_state_dict_equals_torch_and_continues_bitwise(case):
    _, make_tx, cls = case
    tx = make_tx()
    # reference: torch trains 10 steps from the same start
    ref = make_model()
    ref_opt = make_torch_opt(tx, cls, ref)
    torch_steps(ref, ref_opt, 10)

    params = params_of(make_model())
    params, state = medfunc_steps(tx, params, tx.init(params), 0, 10)
    sd = to_torch_state_dict(tx, state, params, step=torch.tensor(10))
    assert_same(sd, ref_opt.state_dict())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    # continue in torch from the converted state ...
    model = load_params(make_model(), params)
    opt = make_torch_opt(tx, cls, model)
    opt.load_state_dict(sd)
    torch_steps(model, opt, 10)
    # ... and in medfunc
    params, state = medfunc_steps(tx, params, state, 10, 10)
    for n, p in model.named_parameters():
        assert torch.equal(params[n], p.detach()), n
    assert_same(to_torch_state_dict(tx, state, params, 20), opt.state_dict())


@pytest.mark.parametrize("case", TXS, ids=[c[0] for c in TXS])
def test_from_torch_state_dict_continues_bitwise(case):
    _, make_tx, cls = case
    tx = make_tx()
    model = make_model()
    opt = make_torch_opt(tx, cls, model)
    torch_steps(model, opt, 10)

    params = params_of(model)
    state = from_torch_state_dict(tx, opt.state_dict(), params)
    torch_steps(model, opt, 10)
    params, state = medfunc_steps(tx, params, state, 10, 10)
    for n, p in model.named_parameters():
        assert torch.equal(params[n], p.detach()), n
    assert_same(to_torch_state_dict(tx, state, params, 20), opt.state_dict())


def test_single_group_torch_optimizer_without_param_names_maps_in_model_order():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, foreach=True)
    torch_steps(model, opt, 5)
    sd = opt.state_dict()
    assert "param_names" not in sd["param_groups"][0]
    tx = adamw(1e-2, weight_decay=0.0, kernel="foreach")
    params = params_of(model)
    state = from_torch_state_dict(tx, sd, params)
    for i, (n, _p) in enumerate(model.named_parameters()):
        assert torch.equal(state.exp_avg[n], sd["state"][i]["exp_avg"]), n


def test_chain_interop_and_state_before_any_update():
    tx = chain(clip_by_global_norm(1.0), adamw(1e-3, kernel="foreach"))
    params = params_of(make_model())
    state = tx.init(params)
    sd = to_torch_state_dict(tx, state, params, 0)
    assert sd["state"] == {}  # torch creates state lazily on the first step
    assert [g["param_names"] for g in sd["param_groups"]] == [
        ["fc1.weight", "fc2.weight"],
        ["fc1.bias", "ln.weight", "ln.bias", "fc2.bias"],
    ]
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3, 4, 5]]
    back = from_torch_state_dict(tx, sd, params)
    assert back[0] == () and float(back[1].step["fc1.weight"]) == 0


def test_schedule_lr_in_param_groups():
    tx = sgd(lambda step: 0.1 / (1.0 + step.double()), lr_multipliers=[("fc2", 2.0)])
    params = params_of(make_model())
    sd = to_torch_state_dict(tx, tx.init(params), params, 3)
    assert [g["lr"] for g in sd["param_groups"]] == [0.1 / 4.0, 0.1 / 4.0 * 2.0]
    assert torch_param_groups(tx, params)[0]["lr"] == 0.1


def _trained_sd(cls=torch.optim.AdamW, **kw):
    model = make_model()
    opt = cls(model.parameters(), lr=1e-2, foreach=True, **kw)
    torch_steps(model, opt, 2)
    return opt.state_dict()


def test_from_torch_state_dict_errors_name_the_mismatch():
    params = params_of(make_model())
    tx = adamw(1e-2, decay_mask=None, kernel="foreach")
    sd = _trained_sd()
    fewer = OrderedDict(list(params.items())[:-1])
    with pytest.raises(ConfigError, match="holds 6 parameters but the model has 5"):
        from_torch_state_dict(tx, sd, fewer)
    wrong = OrderedDict(params)
    wrong["fc1.weight"] = torch.zeros(16, 7)
    with pytest.raises(ConfigError, match=r"shape \(16, 6\) but the parameter has shape \(16, 7\)"):
        from_torch_state_dict(tx, sd, wrong)
    with pytest.raises(ConfigError, match="from an SGD optimizer but the transformation is adamw"):
        from_torch_state_dict(tx, _trained_sd(torch.optim.SGD, momentum=0.9), params)
    with pytest.raises(ConfigError, match=r"lacks \['max_exp_avg_sq'\].*amsgrad=False"):
        from_torch_state_dict(adamw(1e-2, amsgrad=True, decay_mask=None), sd, params)
    with pytest.raises(ConfigError, match="'state' and 'param_groups'"):
        from_torch_state_dict(tx, {"state": {}}, params)
    named = OrderedDict(make_model().named_parameters())
    named_sd = torch.optim.AdamW(torch_param_groups(tx, named)).state_dict()
    renamed = OrderedDict(("model." + n, p) for n, p in params.items())
    with pytest.raises(ConfigError, match=r"param_names differ.*missing \['model.fc1.weight'"):
        from_torch_state_dict(tx, named_sd, renamed)
    with pytest.raises(ConfigError, match="exactly one optimizer"):
        from_torch_state_dict(clip_by_global_norm(1.0), sd, params)


def test_from_torch_optimizers_convert_through_the_interop_functions():
    """to/from_torch_state_dict and torch_optimizer accept a from_torch transformation."""
    import copy

    from conftest import TinyClassifier, make_batches

    import medfunc as mf

    torch.manual_seed(0)
    model = TinyClassifier()
    reference = copy.deepcopy(model)
    tx = mf.optim.from_torch(torch.optim.RMSprop, lr=1e-2, momentum=0.9)
    state = mf.init_state(model, tx)
    opt = torch.optim.RMSprop(reference.parameters(), lr=1e-2, momentum=0.9)
    for batch in make_batches(3):
        state, _ = mf.train_step(state, batch)
        reference(**batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    trainable = OrderedDict((n, state.params[n]) for n in state.trainable)
    sd = mf.optim.to_torch_state_dict(state.tx, state.opt_state, trainable, state.step)
    expected = opt.state_dict()
    assert sorted(sd["state"]) == sorted(expected["state"])
    for index, entries in expected["state"].items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(sd["state"][index][key]), torch.as_tensor(value))
    back = mf.optim.from_torch_state_dict(state.tx, expected, trainable)
    assert type(back) is type(state.opt_state)
    assert isinstance(mf.optim.torch_optimizer(state.tx, trainable), torch.optim.RMSprop)
