"""TrainState: pytree registration, ordering, replace, init_state."""

from __future__ import annotations

import copy
from collections import OrderedDict

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from conftest import TinyClassifier, make_batches
from torch import nn

import medfunc as mf
from medfunc.compile import compile_step
from medfunc.state import LEAF_FIELDS, PYTREE_NAMESPACE


class Unsorted(nn.Module):
    """Parameter names whose model order is not alphabetical."""

    def __init__(self) -> None:
        super().__init__()
        self.zeta = nn.Linear(3, 4)
        self.alpha = nn.Linear(4, 2)

    def forward(self, x, labels):
        return nn.functional.cross_entropy(self.alpha(torch.relu(self.zeta(x))), labels)


def _state(**kwargs) -> mf.TrainState:
    torch.manual_seed(0)
    return mf.init_state(TinyClassifier(batchnorm=True), mf.optim.adamw(1e-3), **kwargs)


def test_params_keep_model_order_through_optree_and_torch_pytree():
    state = mf.init_state(Unsorted(), mf.optim.sgd(0.1))
    expected = [n for n, _ in Unsorted().named_parameters()]
    assert (
        list(state.params) == expected == ["zeta.weight", "zeta.bias", "alpha.weight", "alpha.bias"]
    )
    leaves = optree.tree_leaves(state, namespace=PYTREE_NAMESPACE)
    assert leaves[0] is state.params["zeta.weight"]
    assert leaves[2] is state.params["alpha.weight"]
    torch_leaves = torch_pytree.tree_leaves(state)
    assert torch_leaves[0] is state.params["zeta.weight"]


@pytest.mark.parametrize("precision,accumulate", [("fp32", 1), ("fp16", 3)])
def test_flatten_unflatten_round_trips_every_field(precision, accumulate):
    state = _state(precision=precision, accumulate_steps=accumulate)
    for flatten, unflatten in [
        (
            lambda s: optree.tree_flatten(s, namespace=PYTREE_NAMESPACE),
            lambda leaves, spec: optree.tree_unflatten(spec, leaves),
        ),
        (torch_pytree.tree_flatten, lambda leaves, spec: torch_pytree.tree_unflatten(leaves, spec)),
    ]:
        leaves, spec = flatten(state)
        rebuilt = unflatten(leaves, spec)
        for field in LEAF_FIELDS:
            original = optree.tree_leaves(getattr(state, field), namespace=PYTREE_NAMESPACE)
            again = optree.tree_leaves(getattr(rebuilt, field), namespace=PYTREE_NAMESPACE)
            assert len(original) == len(again), field
            assert all(a is b for a, b in zip(original, again)), field
        assert isinstance(rebuilt.params, OrderedDict)
        assert list(rebuilt.params) == list(state.params)
        for static in ("module", "tx", "loss_fn", "policy", "accumulate_steps"):
            assert getattr(rebuilt, static) is getattr(state, static)


def test_static_metadata_is_not_a_leaf():
    state = _state()
    leaves = optree.tree_leaves(state, namespace=PYTREE_NAMESPACE)
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    n_expected = sum(
        len(optree.tree_leaves(getattr(state, f), namespace=PYTREE_NAMESPACE)) for f in LEAF_FIELDS
    )
    assert len(leaves) == n_expected


def test_replace_returns_a_copy_and_leaves_the_original():
    state = _state()
    new = state.replace(step=torch.tensor(7))
    assert int(new.step) == 7 and int(state.step) == 0
    assert new.params is state.params
    with pytest.raises(TypeError):
        new.replace(not_a_field=1)
    with pytest.raises(dataclasses_frozen_error()):
        state.step = torch.tensor(1)


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_init_state_fields():
    state = _state(precision="fp16", seed=5)
    assert state.step.dtype == torch.int64 and state.step.shape == ()
    assert state.rng.tolist() == [5, 0]
    assert float(state.loss_scale.scale) == 65536.0
    assert list(state.buffers) == [n for n, _ in state.module.named_buffers()]
    assert state.accum == ()


def test_frozen_parameters_stay_in_state_but_are_not_optimized():
    torch.manual_seed(0)
    model = TinyClassifier()
    model.fc1.weight.requires_grad_(False)
    state = mf.init_state(model, mf.optim.adamw(1e-2))
    assert "fc1.weight" in state.params and "fc1.weight" not in state.trainable
    frozen_before = state.params["fc1.weight"].clone()
    for batch in make_batches(3):
        state, _ = mf.train_step(state, batch)
    assert torch.equal(state.params["fc1.weight"], frozen_before)
    assert not torch.equal(state.params["fc2.weight"], model.fc2.weight)
    opt_leaves = optree.tree_leaves(state.opt_state, namespace=PYTREE_NAMESPACE)
    assert not any(leaf.shape == frozen_before.shape for leaf in opt_leaves)


def test_init_state_moves_to_device_and_validates():
    state = _state(device="cpu")
    assert state.device.type == "cpu"
    with pytest.raises(mf.ConfigError, match="accumulate_steps"):
        _state(accumulate_steps=0)
    with pytest.raises(mf.ConfigError, match="precision"):
        _state(precision="fp8")
    with pytest.raises(mf.ConfigError, match="torch.nn.Module"):
        mf.init_state("not a model", mf.optim.sgd(0.1))


def test_bind_module_writes_state_values_into_the_module():
    state = _state()
    state, _ = mf.train_step(state, make_batches(1)[0])
    module = mf.bind_module(state)
    for name, p in module.named_parameters():
        assert torch.equal(p, state.params[name])


def _ensemble_reference(model, batches, seed):
    """One member trained alone on its own deep copy of ``model``."""
    state = mf.init_state(copy.deepcopy(model), mf.optim.adamw(1e-2), seed=seed)
    for batch in batches:
        state, _ = mf.train_step(state, batch)
    return state


@pytest.mark.parametrize("donate", [True, False])
def test_states_built_from_one_model_never_share_storage(donate):
    torch.manual_seed(0)
    model = TinyClassifier(dropout=0.3)
    initial = copy.deepcopy(model)
    states = [mf.init_state(model, mf.optim.adamw(1e-2), seed=s) for s in range(3)]
    # the first state uses the model's own tensors; the others got copies
    assert states[0].params["fc1.weight"].data_ptr() == model.fc1.weight.data_ptr()
    pointers = {s.params["fc1.weight"].data_ptr() for s in states}
    assert len(pointers) == 3
    batches = make_batches(4)
    for batch in batches:
        states = [mf.train_step(s, batch, donate=donate)[0] for s in states]
    for seed, state in enumerate(states):
        expected = _ensemble_reference(initial, batches, seed)
        for name, value in state.params.items():
            assert torch.equal(value, expected.params[name]), (seed, name)
    assert torch.equal(model.fc1.weight.detach(), states[0].params["fc1.weight"]) is donate


def test_compiled_ensemble_members_stay_independent():
    torch.manual_seed(0)
    model = TinyClassifier()
    initial = copy.deepcopy(model)
    states = [mf.init_state(model, mf.optim.sgd(0.1), seed=s) for s in range(2)]
    steps = [compile_step(mf.train_step, mode="inductor") for _ in states]
    batches = make_batches(3)
    for batch in batches:
        states = [step(s, batch)[0] for step, s in zip(steps, states)]
    alone = mf.init_state(copy.deepcopy(initial), mf.optim.sgd(0.1), seed=1)
    for batch in batches:
        alone, _ = mf.train_step(alone, batch)
    for name, value in states[1].params.items():
        torch.testing.assert_close(value, alone.params[name], rtol=1e-5, atol=1e-6)


def test_a_state_is_free_to_reuse_the_model_once_the_old_one_is_gone():
    model = TinyClassifier()
    first = mf.init_state(model, mf.optim.sgd(0.1))
    del first
    again = mf.init_state(model, mf.optim.sgd(0.1))
    assert again.params["fc1.weight"].data_ptr() == model.fc1.weight.data_ptr()


def test_a_model_constructor_is_built_under_the_seed():
    a = mf.init_state(lambda: TinyClassifier(), mf.optim.sgd(0.1), seed=1)
    b = mf.init_state(lambda: TinyClassifier(), mf.optim.sgd(0.1), seed=1)
    c = mf.init_state(lambda: TinyClassifier(), mf.optim.sgd(0.1), seed=2)
    assert torch.equal(a.params["fc1.weight"], b.params["fc1.weight"])
    assert not torch.equal(a.params["fc1.weight"], c.params["fc1.weight"])
    torch.manual_seed(1)
    assert torch.equal(a.params["fc1.weight"], TinyClassifier().fc1.weight.detach())
    with pytest.raises(mf.ConfigError, match="zero-argument function"):
        mf.init_state(lambda: 3, mf.optim.sgd(0.1))


def test_a_torch_optimizer_as_tx_names_from_torch():
    model = TinyClassifier()
    with pytest.raises(mf.ConfigError, match="from_torch"):
        mf.init_state(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(mf.ConfigError, match="from_torch"):
        mf.init_state(model, torch.optim.SGD)
