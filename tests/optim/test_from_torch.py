"""from_torch: any torch.optim optimizer as a GradientTransformation, against the optimizer run
imperatively (``loss.backward(); opt.step(); opt.zero_grad()``)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, make_batches

import medfunc as mf
from medfunc.errors import ConfigError
from medfunc.optim import torch_adapter
from medfunc.optim.torch_adapter import TorchOptimizerState, check_tx, from_torch
from medfunc.state import tree_leaves_with_path
from medfunc.testing import assert_trees_equal, check_step_pure

TESTS = Path(__file__).resolve().parents[1]
STEPS = 30

CASES = {
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.9, "centered": True}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 1e-3}),
    "nadam": (torch.optim.NAdam, {"lr": 1e-2, "weight_decay": 1e-2}),
    "radam": (torch.optim.RAdam, {"lr": 1e-2}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
}
if hasattr(torch.optim, "Adafactor"):
    CASES["adafactor"] = (torch.optim.Adafactor, {"lr": 1e-2})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as in the resuming process (CPU reductions depend on the count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier()


def batches(n: int = STEPS) -> list[dict]:
    return make_batches(n, seed=3)


def resume_tx() -> mf.optim.GradientTransformation:
    """Clipping then NAdam on a warm-up schedule: the configuration of the resume test."""
    lr = mf.schedules.linear_warmup(1e-2, 5, STEPS)
    return mf.optim.chain(mf.optim.clip_by_global_norm(0.5), from_torch(torch.optim.NAdam, lr=lr))


def train(state: mf.TrainState, start: int, stop: int) -> mf.TrainState:
    for batch in batches()[start:stop]:
        state, _ = mf.train_step(state, batch, donate=True)
    return state


def leaves(state: mf.TrainState) -> dict[str, torch.Tensor]:
    return {path: leaf.clone() for path, leaf in tree_leaves_with_path(state)}


def _reference(cls, kwargs, steps=STEPS, *, lrs=None, clip=None):
    """The torch optimizer run imperatively on a copy of the model, on the same batches."""
    model = make_model()
    opt = cls(model.parameters(), **kwargs)
    for i, batch in enumerate(batches()[:steps]):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[i]
        model(**batch)["loss"].backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return model, opt


def _assert_equals_reference(state: mf.TrainState, opt_state: TorchOptimizerState, model, opt):
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name
        torch_state = opt.state[p]
        assert list(opt_state.state[name]) == list(torch_state), name
        for key, value in torch_state.items():
            ours = opt_state.state[name][key]
            assert ours.dtype == value.dtype and ours.device == value.device, (name, key)
            assert torch.equal(ours, value), (name, key)
    assert bool(opt_state.has_state.all())


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
@pytest.mark.parametrize("case", list(CASES))
def test_thirty_steps_bitwise_equal_to_the_torch_optimizer_run_imperatively(case, donate):
    cls, kwargs = CASES[case]
    state = mf.init_state(make_model(), from_torch(cls, **kwargs))
    for batch in batches():
        state, metrics = mf.train_step(state, batch, donate=donate)
    model, opt = _reference(cls, kwargs)
    _assert_equals_reference(state, state.opt_state, model, opt)
    assert int(state.step) == STEPS
    assert metrics["lr"].dtype == torch.float64 and metrics["lr"].shape == ()
    assert float(metrics["lr"]) == kwargs["lr"]


def test_state_layout_is_allocated_at_init_before_torch_creates_it():
    tx = from_torch(torch.optim.RMSprop, lr=1e-2, momentum=0.9)
    opt_state = tx.init(OrderedDict(make_model().named_parameters()))
    assert list(opt_state.state["fc1.weight"]) == ["step", "square_avg", "momentum_buffer"]
    assert opt_state.state["fc1.weight"]["square_avg"].shape == (16, 6)
    assert opt_state.state["fc1.weight"]["step"].device.type == "cpu"
    assert not bool(opt_state.has_state.any())
    # Adafactor cannot run on meta tensors: its layout comes from zero copies instead
    if "adafactor" in CASES:
        tx = from_torch(torch.optim.Adafactor, lr=1e-2)
        opt_state = tx.init(OrderedDict(make_model().named_parameters()))
        assert opt_state.state["fc1.weight"]["row_var"].shape == (16, 1)
        assert opt_state.state["fc1.bias"]["variance"].shape == (16,)


def test_donated_steps_update_the_state_tensors_in_place():
    model = make_model()
    state = mf.init_state(model, from_torch(torch.optim.RMSprop, lr=1e-2, momentum=0.9))
    first, second = batches(2)
    state, _ = mf.train_step(state, first, donate=True)
    square_avg = state.opt_state.state["fc1.weight"]["square_avg"]
    buffer = state.opt_state.state["fc2.bias"]["momentum_buffer"]
    before = square_avg.clone()
    state, _ = mf.train_step(state, second, donate=True)
    assert state.opt_state.state["fc1.weight"]["square_avg"] is square_avg
    assert state.opt_state.state["fc2.bias"]["momentum_buffer"] is buffer
    assert not torch.equal(square_avg, before)
    assert state.params["fc1.weight"].data_ptr() == model.fc1.weight.data_ptr()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("case", ["rmsprop", "sgd_momentum", "nadam"])
def test_pure_step_leaves_the_input_state_unchanged(case):
    cls, kwargs = CASES[case]
    state = mf.init_state(make_model(), from_torch(cls, **kwargs))
    first, second = batches(2)
    check_step_pure(state, first)  # before torch holds any state
    state, _ = mf.train_step(state, first)
    snapshot = mf.tree_map(torch.clone, (state.params, state.opt_state))
    check_step_pure(state, second)  # with state
    new, _ = mf.train_step(state, second)
    assert_trees_equal((state.params, state.opt_state), snapshot)
    assert not torch.equal(new.params["fc1.weight"], state.params["fc1.weight"])


def test_medfunc_schedule_sets_the_group_lr_from_the_step():
    schedule = mf.schedules.linear_warmup(1e-2, 5, STEPS)
    lrs = [float(schedule(torch.tensor(i))) for i in range(STEPS)]
    kwargs = {"alpha": 0.9}
    state = mf.init_state(make_model(), from_torch(torch.optim.RMSprop, lr=schedule, **kwargs))
    logged = []
    for batch in batches():
        state, metrics = mf.train_step(state, batch)
        logged.append(metrics["lr"])
    model, opt = _reference(torch.optim.RMSprop, {"lr": lrs[0], **kwargs}, lrs=lrs)
    _assert_equals_reference(state, state.opt_state, model, opt)
    assert all(m.dtype == torch.float64 and m.device == state.device for m in logged)
    assert [float(m) for m in logged] == lrs
    assert lrs[0] == 0.0 and lrs[5] == 1e-2


def test_chained_after_clipping_equals_clip_grad_norm_then_step():
    kwargs = {"lr": 1e-2, "momentum": 0.5}
    tx = mf.optim.chain(
        mf.optim.clip_by_global_norm(0.3), from_torch(torch.optim.RMSprop, **kwargs)
    )
    state = mf.init_state(make_model(), tx)
    for batch in batches():
        state, metrics = mf.train_step(state, batch, donate=True)
    model, opt = _reference(torch.optim.RMSprop, kwargs, clip=0.3)
    _assert_equals_reference(state, state.opt_state[1], model, opt)
    assert float(metrics["lr"]) == 1e-2


def _with_inf(batch: dict) -> dict:
    bad = dict(batch)
    bad["x"] = batch["x"].clone()
    bad["x"][0, 0] = float("inf")
    return bad


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
def test_nonfinite_batch_skips_the_update_bitwise(donate):
    state = mf.init_state(make_model(), from_torch(torch.optim.NAdam, lr=1e-2))
    first, second = batches(2)
    # skipped before any update: torch would hold no state yet, and neither do we
    state, metrics = mf.train_step(state, _with_inf(first), donate=donate)
    assert bool(metrics["skipped"]) and int(state.step) == 0
    assert not bool(state.opt_state.has_state.any())
    state, _ = mf.train_step(state, first, donate=donate)
    before = leaves(state)
    state, metrics = mf.train_step(state, _with_inf(second), donate=donate)
    assert bool(metrics["skipped"]) and metrics["lr"].dtype == torch.float64
    after = leaves(state)
    assert list(after) == list(before)
    for path in before:
        if path != "rng":
            assert torch.equal(after[path], before[path]), path
    state, _ = mf.train_step(state, second, donate=donate)
    # the two applied updates are the reference's two steps
    model, opt = _reference(torch.optim.NAdam, {"lr": 1e-2}, steps=2)
    _assert_equals_reference(state, state.opt_state, model, opt)
    assert int(state.step) == 2


def test_found_inf_in_a_direct_update_leaves_everything_unchanged():
    params = OrderedDict((n, p.detach().clone()) for n, p in make_model().named_parameters())
    tx = from_torch(torch.optim.Adagrad, lr=0.1)
    opt_state = tx.init(params)
    grads = OrderedDict((n, torch.randn_like(p)) for n, p in params.items())
    ctx = mf.optim.UpdateContext(step=torch.tensor(0))
    grads, params, opt_state = tx.update(grads, opt_state, params, ctx)
    snapshot = mf.tree_map(torch.clone, (params, opt_state))
    skip = mf.optim.UpdateContext(step=torch.tensor(1), found_inf=torch.ones(()))
    _, params, opt_state = tx.update(grads, opt_state, params, skip)
    assert_trees_equal((params, opt_state), snapshot)
    assert float(skip.metrics["lr"]) == 0.1


def test_a_missing_gradient_skips_the_parameter_as_torch_does():
    model = make_model()
    params = OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters())
    tx = from_torch(torch.optim.RMSprop, lr=1e-2)
    opt_state = tx.init(params)
    g = torch.Generator().manual_seed(0)
    grads = OrderedDict((n, torch.randn(p.shape, generator=g)) for n, p in params.items())
    grads["fc2.bias"] = None
    _, params, opt_state = tx.update(
        grads, opt_state, params, mf.optim.UpdateContext(step=torch.tensor(0))
    )
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    for n, p in model.named_parameters():
        p.grad = grads[n]
    opt.step()
    assert opt_state.has_state.tolist() == [True, True, True, False]
    for n, p in model.named_parameters():
        assert torch.equal(params[n], p.detach()), n


def test_param_groups_equal_torch_param_groups():
    schedule = mf.schedules.step(0.1, 5, 0.5)
    tx = from_torch(
        torch.optim.SGD,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-2,
        param_groups=[{"params": ["bias"], "weight_decay": 0.0, "lr": schedule}],
    )
    state = mf.init_state(make_model(), tx)
    for batch in batches(12):
        state, _ = mf.train_step(state, batch)
    model = make_model()
    named = dict(model.named_parameters())
    opt = torch.optim.SGD(
        [
            {"params": [named["fc1.weight"], named["fc2.weight"]]},
            {"params": [named["fc1.bias"], named["fc2.bias"]], "weight_decay": 0.0},
        ],
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-2,
    )
    for i, batch in enumerate(batches(12)):
        opt.param_groups[1]["lr"] = float(schedule(torch.tensor(i)))
        model(**batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    _assert_equals_reference(state, state.opt_state, model, opt)
    sd = torch_adapter.to_state_dict(state.tx, state.opt_state, state.params, state.step)
    assert [g["param_names"] for g in sd["param_groups"]] == [
        ["fc1.weight", "fc2.weight"],
        ["fc1.bias", "fc2.bias"],
    ]
    assert sd["param_groups"][1]["lr"] == float(schedule(torch.tensor(12)))


def test_state_dict_conversion_continues_bitwise_in_both_directions():
    cls, kwargs = CASES["rmsprop"]
    tx = from_torch(cls, **kwargs)
    state = mf.init_state(make_model(), tx)
    state = train(state, 0, 10)
    model, opt = _reference(cls, kwargs, steps=10)
    # medfunc -> torch: equals the torch optimizer's own state_dict, and torch continues from it
    trainable = OrderedDict((n, state.params[n]) for n in state.trainable)
    sd = torch_adapter.to_state_dict(tx, state.opt_state, trainable, state.step)
    own = opt.state_dict()
    assert [{k: v for k, v in g.items() if k != "param_names"} for g in sd["param_groups"]] == (
        own["param_groups"]
    )
    assert list(sd["state"]) == list(own["state"])
    for index, entry in own["state"].items():
        assert list(sd["state"][index]) == list(entry)
        for key, value in entry.items():
            assert torch.equal(sd["state"][index][key], value), (index, key)
    continued = copy.deepcopy(model)
    named = OrderedDict(continued.named_parameters())
    torch_opt = torch_adapter.torch_optimizer(tx, named, step=state.step)
    torch_opt.load_state_dict(sd)
    for batch in batches()[10:20]:
        continued(**batch)["loss"].backward()
        torch_opt.step()
        torch_opt.zero_grad()
    # torch -> medfunc: from the imperative optimizer's state_dict, medfunc continues
    like = mf.init_state(copy.deepcopy(model), tx)
    trainable = OrderedDict((n, like.params[n]) for n in like.trainable)
    resumed = like.replace(
        opt_state=torch_adapter.from_state_dict(tx, opt.state_dict(), trainable),
        step=torch.tensor(10),
    )
    resumed = train(resumed, 10, 20)
    state = train(state, 10, 20)
    for n, p in continued.named_parameters():
        assert torch.equal(state.params[n], p.detach()), n
        assert torch.equal(resumed.params[n], p.detach()), n
    assert_trees_equal(resumed.opt_state, state.opt_state)


def test_state_dict_conversion_errors_name_the_mismatch():
    tx = from_torch(torch.optim.RMSprop, lr=1e-2)
    params = OrderedDict((n, p.detach()) for n, p in make_model().named_parameters())
    other = torch.optim.Adam(make_model().parameters())
    for p in other.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    other.step()
    with pytest.raises(ConfigError, match="lacks .*square_avg"):
        torch_adapter.from_state_dict(tx, other.state_dict(), params)
    with pytest.raises(ConfigError, match="3 trainable parameters|numbers 4 distinct"):
        torch_adapter.from_state_dict(tx, other.state_dict(), OrderedDict(list(params.items())[:3]))
    with pytest.raises(ConfigError, match="no from_torch optimizer"):
        torch_adapter.to_state_dict(mf.optim.sgd(0.1), (), params, 0)


def test_checkpoint_round_trip_restores_bitwise(tmp_path):
    state = train(mf.init_state(make_model(), resume_tx()), 0, 15)
    path = mf.save_state(state, tmp_path / "ckpt.pt")
    restored = mf.restore_state(path, like=mf.init_state(make_model(), resume_tx()))
    assert_trees_equal(leaves(restored), leaves(state))


# the fresh process: restore the checkpoint, train the remaining steps, save the final leaves
_RESUME_WORKER = """
import sys
import torch
sys.path[:0] = sys.argv[1].split("|")
torch.set_num_threads(1)
import medfunc as mf
import test_from_torch as t
state = mf.restore_state(sys.argv[2], model=t.make_model(), tx=t.resume_tx())
state = t.train(state, 15, t.STEPS)
torch.save(t.leaves(state), sys.argv[3])
"""


def test_resume_in_a_fresh_process_is_bitwise_equal_to_the_straight_run(tmp_path):
    straight = leaves(train(mf.init_state(make_model(), resume_tx()), 0, STEPS))
    half = train(mf.init_state(make_model(), resume_tx()), 0, 15)
    mf.save_state(half, tmp_path / "half.pt")
    out = tmp_path / "resumed.pt"
    subprocess.run(
        [
            sys.executable,
            "-c",
            _RESUME_WORKER,
            f"{TESTS / 'optim'}|{TESTS}",
            str(tmp_path / "half.pt"),
            str(out),
        ],
        check=True,
        timeout=120,
    )
    resumed = torch.load(out, weights_only=True)
    assert list(resumed) == list(straight)
    for path, value in straight.items():
        assert resumed[path].dtype == value.dtype, path
        assert torch.equal(resumed[path], value), f"{path} differs after resume"
    assert any(p.startswith("opt_state/1/0/fc1.weight/") for p in straight)


class _CountingSGD(torch.optim.Optimizer):
    """A third-party style optimizer keeping Python numbers in its state."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["count"] = 0
                    state["scale"] = 1.0
                    state["trace"] = torch.zeros_like(p)
                state["count"] += 1
                state["scale"] *= 0.9
                state["trace"].mul_(0.5).add_(p.grad)
                p.add_(state["trace"], alpha=-group["lr"] * state["scale"])


class _GroupStateOptimizer(torch.optim.SGD):
    """Keeps a running value in its param_groups, as some adaptive-LR optimizers do."""

    def step(self, closure=None):
        for group in self.param_groups:
            group["lr"] = group["lr"]
            group["d"] = group.get("d", 1.0) * 2
        return super().step(closure)


def test_a_third_party_optimizer_with_python_numbers_in_its_state(tmp_path):
    tx = from_torch(_CountingSGD, lr=0.05)
    state = mf.init_state(make_model(), tx)
    assert state.opt_state.state["fc1.bias"]["count"].dtype == torch.int64
    assert state.opt_state.state["fc1.bias"]["scale"].dtype == torch.float64
    state = train(state, 0, 10)
    model = make_model()
    opt = _CountingSGD(model.parameters(), lr=0.05)
    for batch in batches(10):
        model(**batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name
        assert int(state.opt_state.state[name]["count"]) == opt.state[p]["count"] == 10
        assert float(state.opt_state.state[name]["scale"]) == opt.state[p]["scale"]
    path = mf.save_state(state, tmp_path / "c.pt")
    restored = mf.restore_state(path, like=mf.init_state(make_model(), tx))
    assert_trees_equal(leaves(restored), leaves(state))


def test_an_optimizer_keeping_state_in_its_param_groups_is_refused():
    tx = from_torch(_GroupStateOptimizer, lr=0.1)
    with pytest.raises(ConfigError, match=r"changed param_groups\[0\]\['d'\]"):
        mf.init_state(make_model(), tx)


def test_check_tx_names_from_torch_for_torch_optimizers():
    model = make_model()
    with pytest.raises(ConfigError, match="from_torch") as info:
        check_tx(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert "mf.optim.from_torch(torch.optim.SGD, lr=0.1, momentum=0.9)" in str(info.value)
    with pytest.raises(ConfigError, match=r"class torch\.optim\.SGD .*from_torch"):
        check_tx(torch.optim.SGD)
    with pytest.raises(ConfigError, match="GradientTransformation"):
        check_tx("adamw")
    tx = from_torch(torch.optim.SGD, lr=0.1)
    assert check_tx(tx) is tx
    assert check_tx(mf.optim.adamw(1e-3)) is not None
    assert isinstance(ConfigError("x"), ValueError)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: from_torch(torch.optim.SGD(m.parameters(), lr=0.1)), "class, not an instance"),
        (lambda m: from_torch(torch.nn.Linear), "torch.optim.Optimizer subclass"),
        (lambda m: from_torch(torch.optim.LBFGS), "closure"),
        (lambda m: from_torch(torch.optim.SparseAdam), "sparse gradients"),
        (lambda m: from_torch(torch.optim.SGD, lr=0.1, momentun=0.9), "did you mean 'momentum'"),
        (lambda m: from_torch(torch.optim.SGD, lr=torch.tensor(0.1)), "lambda step"),
        (lambda m: from_torch(torch.optim.SGD, lr=-1.0), "lr must be"),
        (lambda m: from_torch(torch.optim.SGD, params=[], lr=0.1), "param_groups"),
        (lambda m: from_torch(torch.optim.SGD, lr=0.1, param_groups=["bias"]), "param_groups"),
        (
            lambda m: from_torch(torch.optim.SGD, lr=0.1, param_groups=[{"params": "bias"}]),
            r"\['params'\] must be a non-empty list",
        ),
        (
            lambda m: from_torch(torch.optim.SGD, lr=0.1, param_groups=[{"params": ["b"], "x": 1}]),
            "unexpected argument 'x'",
        ),
        (
            lambda m: mf.init_state(
                m, from_torch(torch.optim.SGD, lr=0.1, param_groups=[{"params": ["conv"]}])
            ),
            "selects no trainable parameter",
        ),
        (
            lambda m: mf.init_state(m, from_torch(torch.optim.RMSprop, lr=0.1, alpha=-1.0)),
            "torch.optim.RMSprop refused its arguments.*alpha",
        ),
    ],
)
def test_configuration_errors_name_the_problem(make, match):
    with pytest.raises(ConfigError, match=match):
        make(make_model())


def test_optimizer_default_lr_is_used_and_logged():
    state = mf.init_state(make_model(), from_torch(torch.optim.Adagrad))
    state, metrics = mf.train_step(state, batches(1)[0])
    assert float(metrics["lr"]) == 1e-2  # Adagrad's default
    model, opt = _reference(torch.optim.Adagrad, {}, steps=1)
    _assert_equals_reference(state, state.opt_state, model, opt)


def test_compile_step_inductor_compiles_forward_backward_and_runs_the_update_eagerly():
    from medfunc.compile import compile_step

    cls, kwargs = CASES["rmsprop"]
    state = mf.init_state(make_model(), from_torch(cls, **kwargs))
    eager = mf.init_state(make_model(), from_torch(cls, **kwargs))
    fast = compile_step(mf.train_step, mode="inductor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in batches(3):
            state, _ = fast(state, batch)
            eager, _ = mf.train_step(eager, batch)
    # known up front: no failed whole-step attempt, no fallback warning
    assert not [w for w in caught if "could not trace the whole step" in str(w.message)]
    assert fast.stats.whole_step_compiled is False
    for name, value in eager.params.items():
        torch.testing.assert_close(state.params[name], value, rtol=1e-5, atol=1e-6)
    assert bool(state.opt_state.has_state.all())


def test_docs_example_runs_and_prints_what_it_says(capsys):
    text = (TESTS.parent / "docs" / "optimizers.md").read_text()
    section = text.split("## Any torch optimizer: from_torch", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    exec(compile(block, "docs/optimizers.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    expected = [line.split("#", 1)[1].strip() for line in block.splitlines() if "print(" in line]
    assert printed == expected
