"""train_step / eval_step against real PyTorch references."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyClassifier, gradscaler_step, make_batches
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import medfunc as mf
from medfunc.rng import step_seed
from medfunc.testing import (
    assert_trees_close,
    assert_trees_equal,
    check_step_deterministic,
    check_step_pure,
)


def _model(**kwargs) -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(**kwargs)


def _snapshot(state):
    return mf.tree_map(torch.clone, (state.params, state.opt_state))


def test_matches_imperative_reference_loop_with_dropout_batchnorm_clip_and_schedule():
    peak, warmup, total, seed = 3e-3, 5, 30, 11
    model = _model(dropout=0.3, batchnorm=True)
    reference = copy.deepcopy(model)
    tx = mf.optim.chain(
        mf.optim.clip_by_global_norm(1.0),
        mf.optim.adamw(
            mf.schedules.linear_warmup(peak, warmup, total),
            weight_decay=0.01,
            decay_mask=None,
            kernel="foreach",
        ),
    )
    state = mf.init_state(model, tx, seed=seed)

    opt = torch.optim.AdamW(reference.parameters(), lr=peak, weight_decay=0.01, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup))
    )
    reference.train()
    lrs = []
    for i, batch in enumerate(make_batches(total, batch_size=16)):
        state, metrics = mf.train_step(state, batch)
        torch.manual_seed(step_seed(torch.tensor([seed, i])))
        loss = reference(**batch)["loss"]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        lrs.append((float(metrics["lr"]), opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
        opt.zero_grad()
        assert float(metrics["grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
        assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    assert all(a == pytest.approx(b, rel=1e-12) for a, b in lrs)
    expected = dict(reference.named_parameters())
    for name, value in state.params.items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=1e-6)
    for name, value in reference.named_buffers():
        torch.testing.assert_close(state.buffers[name], value, rtol=0, atol=1e-6)
    assert int(state.step) == total


@settings(max_examples=12, deadline=None)
@given(
    precision=st.sampled_from(["fp32", "bf16", "fp16"]),
    accumulate=st.integers(min_value=1, max_value=3),
    calls=st.integers(min_value=1, max_value=4),
    batchnorm=st.booleans(),
)
def test_input_state_is_never_modified(precision, accumulate, calls, batchnorm):
    state = mf.init_state(
        _model(dropout=0.2, batchnorm=batchnorm),
        mf.optim.adamw(1e-2),
        precision=precision,
        accumulate_steps=accumulate,
    )
    for batch in make_batches(calls):
        check_step_pure(state, batch)
        state, _ = mf.train_step(state, batch)


def test_two_calls_are_bitwise_equal_and_global_rng_is_untouched():
    state = mf.init_state(_model(dropout=0.5), mf.optim.adamw(1e-2), seed=3)
    batch = make_batches(1)[0]
    check_step_deterministic(state, batch)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    mf.train_step(state, batch)
    assert torch.equal(torch.get_rng_state(), before)


def test_dropout_masks_follow_the_state_rng():
    batch = make_batches(1)[0]
    a = mf.init_state(_model(dropout=0.5), mf.optim.sgd(0.1), seed=1)
    b = mf.init_state(_model(dropout=0.5), mf.optim.sgd(0.1), seed=2)
    _, ma = mf.train_step(a, batch)
    _, mb = mf.train_step(b, batch)
    assert float(ma["loss"]) != float(mb["loss"])
    s1, m1 = mf.train_step(a, batch)
    _, m2 = mf.train_step(s1, batch)
    assert float(m1["loss"]) != float(m2["loss"]), "the counter must change the dropout mask"


def _inject_nonfinite(batch, value=float("nan")):
    bad = dict(batch)
    bad["x"] = batch["x"].clone()
    bad["x"][0, 0] = value
    return bad


def test_fp16_loss_scale_trajectory_equals_gradscaler_including_skips():
    model = _model()
    reference = copy.deepcopy(model)
    policy = mf.get_policy("fp16", growth_interval=3, init_scale=2.0**10)
    state = mf.init_state(
        model, mf.optim.adamw(1e-2, kernel="foreach", decay_mask=None), precision=policy
    )
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    batches = make_batches(14)
    for i in (4, 9, 10):
        batches[i] = _inject_nonfinite(batches[i], float("inf") if i == 9 else float("nan"))
    skipped_ref, skipped_mf = [], []
    for batch in batches:
        state, metrics = mf.train_step(state, batch)
        skipped_ref.append(gradscaler_step(reference, batch, opt, scaler))
        skipped_mf.append(bool(metrics["skipped"]))
        assert float(metrics["loss_scale"]) == scaler.get_scale()
        assert scaler.state_dict()["_growth_tracker"] == int(state.loss_scale.growth_tracker)
    assert skipped_mf == skipped_ref == [i in (4, 9, 10) for i in range(14)]
    assert int(state.step) == 11
    expected = dict(reference.named_parameters())
    for name, value in state.params.items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_nonfinite_gradients_skip_the_update_in_every_precision(precision, kernel):
    state = mf.init_state(_model(), mf.optim.adamw(1e-2, kernel=kernel), precision=precision)
    good, bad = make_batches(2)
    state, _ = mf.train_step(state, good)
    before = _snapshot(state)
    new, metrics = mf.train_step(state, _inject_nonfinite(bad))
    assert bool(metrics["skipped"]) and bool(metrics["applied"])
    assert_trees_equal(_snapshot(new), before)
    assert int(new.step) == 1
    after_good, metrics = mf.train_step(new, good)
    assert not bool(metrics["skipped"]) and int(after_good.step) == 2


def test_accumulation_equals_one_big_batch():
    k, b = 4, 5
    big_batches = make_batches(3, batch_size=k * b)
    tx = mf.optim.chain(mf.optim.clip_by_global_norm(0.5), mf.optim.adamw(1e-2))
    big = mf.init_state(_model(), tx)
    micro = mf.init_state(_model(), tx, accumulate_steps=k)
    for batch in big_batches:
        big, big_metrics = mf.train_step(big, batch)
        applied = []
        for j in range(k):
            part = {name: t[j * b : (j + 1) * b] for name, t in batch.items()}
            micro, metrics = mf.train_step(micro, part)
            applied.append(bool(metrics["applied"]))
        assert applied == [False] * (k - 1) + [True]
        torch.testing.assert_close(metrics["loss"], big_metrics["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            metrics["grad_norm"], big_metrics["grad_norm"], rtol=1e-5, atol=1e-6
        )
    assert_trees_close(micro.params, big.params, rtol=1e-5, atol=1e-6)
    assert int(micro.step) == int(big.step) == 3


@pytest.mark.parametrize("precision,accumulate", [("fp32", 1), ("fp16", 2), ("bf16", 3)])
def test_donate_gives_the_same_numbers_and_consumes_the_state(precision, accumulate):
    model = _model(dropout=0.2, batchnorm=True)
    pure = mf.init_state(
        copy.deepcopy(model), mf.optim.adamw(1e-2), precision=precision, accumulate_steps=accumulate
    )
    donated = mf.init_state(
        model, mf.optim.adamw(1e-2), precision=precision, accumulate_steps=accumulate
    )
    for batch in make_batches(6):
        pure, m_pure = mf.train_step(pure, batch)
        old = donated
        donated, m_donated = mf.train_step(donated, batch, donate=True)
        assert_trees_equal(m_donated, m_pure)
        with pytest.raises(mf.ConsumedStateError, match="donated"):
            mf.train_step(old, batch)
        with pytest.raises(mf.ConsumedStateError):
            _ = old.params
    assert_trees_equal(
        (
            donated.params,
            donated.buffers,
            donated.opt_state,
            donated.loss_scale,
            donated.step,
            donated.rng,
        ),
        (pure.params, pure.buffers, pure.opt_state, pure.loss_scale, pure.step, pure.rng),
    )


class ScalarModel(nn.Module):
    def __init__(self, out) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.out = out

    def forward(self, x):
        return self.out(self.w * x)


def test_bad_inputs_give_clear_errors():
    state = mf.init_state(_model(), mf.optim.sgd(0.1))
    with pytest.raises(mf.BatchError, match="got int"):
        mf.train_step(state, 3)
    with pytest.raises(mf.BatchError, match="empty"):
        mf.train_step(state, {})
    no_loss = mf.init_state(ScalarModel(lambda y: {"logits": y}), mf.optim.sgd(0.1))
    with pytest.raises(mf.LossError, match=r"holds no loss.*\['logits'\]"):
        mf.train_step(no_loss, torch.ones(3))
    vector = mf.init_state(ScalarModel(lambda y: y), mf.optim.sgd(0.1))
    with pytest.raises(mf.LossError, match=r"scalar.*shape \(3,\)"):
        mf.train_step(vector, torch.ones(3))
    integer = mf.init_state(ScalarModel(lambda y: y.sum().long()), mf.optim.sgd(0.1))
    with pytest.raises(mf.LossError, match="floating point"):
        mf.train_step(integer, torch.ones(3))


def test_loss_fn_tuple_batch_and_tensor_batch():
    class TupleModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 1)

        def forward(self, x, y):
            return nn.functional.mse_loss(self.inner(x), y)

    torch.manual_seed(0)
    tuple_state = mf.init_state(TupleModel(), mf.optim.sgd(0.1))
    linear = copy.deepcopy(tuple_state.module.inner)
    target = torch.randn(8, 1)
    loss_fn = lambda out, batch: nn.functional.mse_loss(out, target)  # noqa: E731
    tensor_state = mf.init_state(linear, mf.optim.sgd(0.1), loss_fn=loss_fn)
    x = torch.randn(8, 4)
    tuple_state, m1 = mf.train_step(tuple_state, (x, target))
    tensor_state, m2 = mf.train_step(tensor_state, x)
    assert float(m1["loss"]) == float(m2["loss"])
    assert torch.equal(tensor_state.params["weight"], tuple_state.params["inner.weight"])
    plain = mf.init_state(ScalarModel(lambda y: y.square().sum()), mf.optim.sgd(0.1))
    _, m3 = mf.train_step(plain, torch.ones(3))
    assert float(m3["loss"]) == 3.0


def test_eval_step_uses_eval_mode_no_grad_and_restores_mode():
    model = _model(dropout=0.5, batchnorm=True)
    state = mf.init_state(model, mf.optim.sgd(0.1))
    for batch in make_batches(3):
        state, _ = mf.train_step(state, batch)
    batch = make_batches(1, seed=9)[0]
    metrics = mf.eval_step(state, batch)
    reference = copy.deepcopy(mf.bind_module(state)).eval()
    with torch.no_grad():
        expected = reference(**batch)
    assert model.training
    assert torch.equal(metrics["outputs"]["logits"], expected["logits"])
    assert torch.equal(metrics["loss"], expected["loss"])
    assert not metrics["outputs"]["logits"].requires_grad
    assert torch.equal(mf.eval_step(state, batch)["loss"], metrics["loss"])


def test_metrics_are_zero_dim_tensors():
    state = mf.init_state(_model(), mf.optim.adamw(1e-3), precision="fp16")
    _, metrics = mf.train_step(state, make_batches(1)[0])
    assert set(metrics) >= {"loss", "grad_norm", "lr", "skipped", "applied", "loss_scale"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())


def test_step_restores_each_submodules_mode():
    model = _model(dropout=0.5, batchnorm=True)
    model.eval()
    model.fc1.train()
    state = mf.init_state(model, mf.optim.sgd(0.1))
    mf.train_step(state, make_batches(1)[0])
    mf.eval_step(state, make_batches(1)[0])
    assert [m.training for m in model.modules()] == [m is model.fc1 for m in model.modules()]


def test_errors_name_the_problem_instead_of_leaking_raw_torch_errors():
    frozen = _model()
    frozen.requires_grad_(False)
    state = mf.init_state(frozen, mf.optim.adamw(1e-2))
    with pytest.raises(mf.ConfigError, match="no trainable parameters"):
        mf.train_step(state, make_batches(1)[0])

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x, labels):
            return nn.functional.cross_entropy(self.fc(x), labels).detach()

    state = mf.init_state(Detached(), mf.optim.adamw(1e-2))
    with pytest.raises(mf.LossError, match="does not require grad"):
        mf.train_step(state, make_batches(1)[0])

    class NoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x, label=None):
            return {"logits": self.fc(x)}

    batch = {"x": torch.randn(4, 6), "label": torch.zeros(4, dtype=torch.long)}
    with pytest.raises(mf.LossError, match="'labels' \\(plural\\)"):
        mf.train_step(mf.init_state(NoLoss(), mf.optim.sgd(0.1)), batch)
    if not torch.cuda.is_available():
        with pytest.raises(mf.ConfigError, match="CUDA is not available"):
            mf.init_state(_model(), mf.optim.sgd(0.1), device="cuda")


def test_lr_metric_has_one_dtype_on_accumulate_and_update_calls():
    state = mf.init_state(_model(), mf.optim.adamw(1e-2), accumulate_steps=2)
    dtypes = []
    for batch in make_batches(4):
        state, metrics = mf.train_step(state, batch)
        dtypes.append(metrics["lr"].dtype)
    assert dtypes == [torch.float64] * 4


def test_apply_fn_calls_a_model_that_the_batch_convention_does_not_fit():
    """A TensorDataset-style (x, y) tuple batch for a plain Sequential: apply_fn says how to
    call the model; the loop equals the imperative torch loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    reference = copy.deepcopy(model)
    batches = [(b["x"], b["labels"]) for b in make_batches(5)]

    def loss_fn(outputs, batch):
        return nn.functional.cross_entropy(outputs, batch[1])

    with pytest.raises(mf.BatchError, match="apply_fn"):
        mf.train_step(
            mf.init_state(copy.deepcopy(model), mf.optim.sgd(0.1), loss_fn=loss_fn), batches[0]
        )
    state = mf.init_state(
        model, mf.optim.sgd(0.1), loss_fn=loss_fn, apply_fn=lambda m, batch: m(batch[0])
    )
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in batches:
        state, metrics = mf.train_step(state, batch)
        loss = nn.functional.cross_entropy(reference(batch[0]), batch[1])
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-6)
    for name, value in reference.named_parameters():
        torch.testing.assert_close(state.params[name], value.detach(), rtol=0, atol=1e-7)
    logits = mf.apply_model(state, batches[0])
    torch.testing.assert_close(logits, reference(batches[0][0]).detach(), rtol=0, atol=1e-6)
    assert float(mf.eval_step(state, batches[1])["loss"]) == pytest.approx(
        nn.functional.cross_entropy(reference(batches[1][0]), batches[1][1]).item(), rel=1e-6
    )


def test_apply_fn_under_compile_step_and_donation():
    from medfunc.compile import compile_step

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def loss_fn(outputs, batch):
        return nn.functional.cross_entropy(outputs, batch[1])

    kwargs = {"loss_fn": loss_fn, "apply_fn": lambda m, batch: m(batch[0])}
    eager = mf.init_state(build(), mf.optim.adamw(1e-2), **kwargs)
    donated = mf.init_state(build(), mf.optim.adamw(1e-2), **kwargs)
    compiled = mf.init_state(build(), mf.optim.adamw(1e-2), **kwargs)
    fast = compile_step(mf.train_step, mode="inductor")
    for b in make_batches(3):
        batch = (b["x"], b["labels"])
        eager, _ = mf.train_step(eager, batch)
        donated, _ = mf.train_step(donated, batch, donate=True)
        compiled, _ = fast(compiled, batch)
    assert_trees_equal(donated.params, eager.params)
    assert_trees_close(compiled.params, eager.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("alias", "name"),
    [("bfloat16", "bf16"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"), ("FP32", "fp32")],
)
def test_precision_aliases(alias, name):
    assert mf.init_state(_model(), mf.optim.sgd(0.1), precision=alias).policy.name == name


def test_a_parameter_replaced_on_the_module_is_not_taken_for_the_states_own():
    """The donated fast path calls the module directly only while the state's tensors are the
    module's own; replacing a Parameter on the module must send the step back to binding the
    state's tensors (the cached module structure is invalidated)."""
    state = mf.init_state(_model(), mf.optim.sgd(0.1))
    batch = make_batches(1)[0]
    for _ in range(2):
        state, _ = mf.train_step(state, batch, donate=True)
    expected, _ = mf.train_step(state, batch)  # pure step on the state's own values
    state.module.fc2.weight = nn.Parameter(torch.zeros_like(state.module.fc2.weight))
    after, _ = mf.train_step(state, batch, donate=True)
    assert_trees_equal(after.params, expected.params)


_RESIDENT_SET_SCRIPT = """
import sys
import torch
from conftest import TinyClassifier, make_batches
import medfunc as mf

def resident_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))

torch.manual_seed(0)
torch.set_num_threads(1)
tx = mf.optim.chain(mf.optim.clip_by_global_norm(1.0), mf.optim.adamw(1e-3))
state = mf.init_state(TinyClassifier(dropout=0.1), tx)
batch = make_batches(1)[0]
samples = []
for i in range(1, 6_001):
    state, metrics = mf.train_step(state, batch, donate=True)
    if i % 1_000 == 0:
        samples.append(resident_kib())
print(int(state.step), *samples)
"""


@pytest.mark.slow
def test_eager_donated_steps_do_not_grow_memory():
    """Eager donated steps keep the resident set flat: a fresh process (its heap not shaped by
    other tests) samples its RSS every 1,000 steps; from the first sample on it may not grow
    by 1 MB over 5,000 steps (a leak of 200 bytes a step would). RSS, not tracemalloc: torch
    frees tensor objects past tracemalloc's hooks, which then reports growth that the
    process never has."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-c", _RESIDENT_SET_SCRIPT],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    step, *samples = (int(v) for v in done.stdout.split())
    assert step == 6_000 and len(samples) == 6
    assert samples[-1] - samples[0] < 1024, samples


def test_the_step_rng_seeds_from_the_state_and_restores_the_callers_generator_on_error():
    from medfunc.rng import next_rng, seeded_rng

    rng = torch.tensor([1, 2])
    expected = torch.rand(3, generator=torch.Generator().manual_seed(step_seed(rng)))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with seeded_rng(rng, torch.device("cpu")):
        assert torch.equal(torch.rand(3), expected)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(RuntimeError, match="boom"):
        with seeded_rng(rng, torch.device("cpu")):
            torch.rand(3)
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), before)
    advanced = next_rng(rng)
    assert advanced.tolist() == [1, 3] and rng.tolist() == [1, 2]
    assert advanced.dtype == torch.int64


def test_the_state_a_donated_step_returns_is_live_and_guards_its_storage():
    model = _model()
    state = mf.init_state(model, mf.optim.adamw(1e-2))
    new, _ = mf.train_step(state, make_batches(1)[0], donate=True)
    assert state.consumed and not new.consumed
    assert new.params["fc1.weight"].data_ptr() == model.fc1.weight.data_ptr()
    # the new state is registered as holding the module's storage: a second init_state copies
    other = mf.init_state(model, mf.optim.adamw(1e-2))
    assert other.params["fc1.weight"].data_ptr() != model.fc1.weight.data_ptr()
    with pytest.raises(TypeError, match="no_such_field"):
        new.replace(no_such_field=1)


def test_a_zero_dim_loss_is_differentiated_as_returned():
    from medfunc.calling import extract_loss

    loss = torch.tensor(0.5, requires_grad=True) * 2
    assert extract_loss({"loss": loss}, {}) is loss
    assert extract_loss({"loss": loss.reshape(1)}, {}).shape == ()
