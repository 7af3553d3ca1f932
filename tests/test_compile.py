"""compile_step against the eager train_step.

CPU: mode="inductor" (compiled once per precision via module-scoped fixtures, to keep the module
fast) and the compile wrapper run with ``torch.compiler.set_stance("force_eager")`` (bitwise).
CUDA (``@pytest.mark.gpu``): the CUDA-graph modes, bitwise against eager where the kernels are
the same (mode="cudagraph") and within tolerance under inductor.

Why inductor is compared within a tolerance: inductor fuses and reorders floating-point work
(e.g. the clip coefficient and the Adam update are computed in one fused kernel, reductions are
split differently), so results differ from eager in the last bits; differences stay ~1e-7 over
the 10 fp32 steps here (fp16: ~1e-5, because compiled fp16 regions keep fp32 intermediates that
eager rounds to fp16). Dropout masks, step counters, skip flags and the loss scale are compared
exactly: inductor runs with ``fallback_random=True``, so it draws eager's masks from the state RNG.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TinyClassifier, make_batches, tiny_bert

import medfunc as mf
from medfunc.compile import MODES, compile_step, default_mode, resolve_mode
from medfunc.graphs import MetricPack, batch_signature
from medfunc.testing import assert_trees_close, assert_trees_equal

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
STEPS = 10


def _state(
    *, precision="fp32", accumulate_steps=1, device="cpu", batchnorm=False, seed=7, kernel="auto"
):
    torch.manual_seed(0)
    model = TinyClassifier(dropout=0.3, batchnorm=batchnorm).to(device)
    tx = mf.optim.chain(
        mf.optim.clip_by_global_norm(1.0),
        mf.optim.adamw(mf.schedules.linear_warmup(1e-2, 3, 20), weight_decay=0.01, kernel=kernel),
    )
    return mf.init_state(
        model, tx, seed=seed, precision=precision, accumulate_steps=accumulate_steps
    )


def _leaves(state):
    return {
        "params": state.params,
        "buffers": state.buffers,
        "opt_state": state.opt_state,
        "loss_scale": state.loss_scale,
        "step": state.step,
        "rng": state.rng,
        "accum": state.accum,
    }


def _inject_nonfinite(batch):
    bad = dict(batch)
    bad["x"] = batch["x"].clone()
    bad["x"][0, 0] = float("inf")
    return bad


def _run_both(precision, batches, fast):
    """Eager (donate=False) and compiled (donate=True) runs from identical states."""
    eager, compiled = _state(precision=precision), _state(precision=precision)
    runs = {"eager": [], "compiled": []}
    for batch in batches:
        eager, metrics = mf.train_step(eager, batch)
        runs["eager"].append((_leaves(eager), metrics))
        compiled, metrics = fast(compiled, batch)
        runs["compiled"].append((mf.tree_map(torch.clone, _leaves(compiled)), metrics))
    return runs, compiled


@pytest.fixture(scope="module")
def fp32_run():
    fast = compile_step(mf.train_step, mode="inductor")
    batches = make_batches(STEPS, batch_size=16)
    eager, compiled = _state(), _state()
    runs = {"eager": [], "compiled": []}
    compiles_after_first = None
    for i, batch in enumerate(batches):
        eager, metrics = mf.train_step(eager, batch)
        runs["eager"].append((_leaves(eager), metrics))
        if i == 0:
            compiled, metrics = fast(compiled, batch)
            compiles_after_first = fast.stats.compiles
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled, metrics = fast(compiled, batch)
        runs["compiled"].append((mf.tree_map(torch.clone, _leaves(compiled)), metrics))
    return {
        "runs": runs,
        "fast": fast,
        "state": compiled,
        "batches": batches,
        "compiles_after_first": compiles_after_first,
    }


def test_inductor_matches_eager_over_ten_steps_with_dropout_batchnorm_clip_schedule(fp32_run):
    for (eager, me), (compiled, mc) in zip(fp32_run["runs"]["eager"], fp32_run["runs"]["compiled"]):
        assert_trees_equal(
            {"step": compiled["step"], "rng": compiled["rng"]},
            {"step": eager["step"], "rng": eager["rng"]},
        )
        assert_trees_equal(
            {k: mc[k] for k in ("lr", "skipped", "applied")},
            {k: me[k] for k in ("lr", "skipped", "applied")},
        )
        # same dropout masks: a different mask moves the loss by ~1e-2, not ~1e-7
        assert_trees_close(
            {k: mc[k] for k in ("loss", "grad_norm")},
            {k: me[k] for k in ("loss", "grad_norm")},
            rtol=1e-5,
            atol=1e-6,
        )
        assert_trees_close(compiled, eager, rtol=1e-4, atol=1e-5)
    losses = [float(m["loss"]) for _, m in fp32_run["runs"]["eager"]]
    assert len(set(losses)) == STEPS


def test_inductor_compiles_the_whole_step_once_while_the_lr_changes(fp32_run):
    """One graph holds forward, backward, clipping, the schedule and AdamW; the LR is a tensor
    computed in the graph, so nine steps with nine different LRs run with recompiles
    forbidden (error_on_recompile) and the compile count stays where the first step left it."""
    fast = fp32_run["fast"]
    lrs = [float(m["lr"]) for _, m in fp32_run["runs"]["compiled"]]
    assert len(set(lrs[1:])) == STEPS - 1
    assert fast.stats.whole_step_compiled is True
    assert fp32_run["compiles_after_first"] == 1
    assert fast.stats.compiles == 1
    assert fast.stats.calls == STEPS


def test_inductor_donate_false_leaves_the_input_and_donate_true_consumes_it(fp32_run):
    fast = fp32_run["fast"]
    state = fp32_run["state"]
    batch = fp32_run["batches"][0]
    before = mf.tree_map(torch.clone, _leaves(state))
    pure, metrics = fast(state, batch, donate=False)
    assert_trees_equal(_leaves(state), before)
    assert int(pure.step) == int(state.step) + 1
    donated, _ = fast(state, batch)
    assert_trees_equal(_leaves(donated), _leaves(pure))
    with pytest.raises(mf.ConsumedStateError):
        state.params  # noqa: B018
    assert fast.stats.compiles == 1


def test_inductor_fp16_loss_scaling_matches_eager_including_skipped_steps():
    policy = mf.get_policy("fp16", growth_interval=3, init_scale=2.0**10)
    batches = make_batches(8, batch_size=16)
    batches[2] = _inject_nonfinite(batches[2])
    fast = compile_step(mf.train_step, mode="inductor")
    runs, _ = _run_both(policy, batches, fast)
    skipped = []
    for (eager, me), (compiled, mc) in zip(runs["eager"], runs["compiled"]):
        assert_trees_equal(
            {k: mc[k] for k in ("skipped", "applied", "loss_scale", "lr")},
            {k: me[k] for k in ("skipped", "applied", "loss_scale", "lr")},
        )
        assert_trees_equal(compiled["loss_scale"], eager["loss_scale"])
        assert_trees_equal(compiled["step"], eager["step"])
        assert_trees_close(compiled["params"], eager["params"], rtol=1e-3, atol=1e-4)
        skipped.append(bool(me["skipped"]))
    assert skipped == [i == 2 for i in range(8)]
    assert fast.stats.compiles == 1


def test_inductor_fp32_skips_a_non_finite_step_as_eager_does():
    """Without loss scaling the skip flag comes from the gradient norm (``norm - norm == 0``);
    the compiled graph must keep that arithmetic (no algebraic folding to 0) and skip the
    non-finite step, as the eager step does."""
    batches = make_batches(5, batch_size=16)
    batches[2] = _inject_nonfinite(batches[2])
    fast = compile_step(mf.train_step, mode="inductor")
    runs, _ = _run_both("fp32", batches, fast)
    skipped = []
    for (eager, me), (compiled, mc) in zip(runs["eager"], runs["compiled"]):
        assert_trees_equal(mc["skipped"], me["skipped"])
        assert_trees_equal(compiled["step"], eager["step"])
        assert torch.isfinite(torch.cat([p.flatten() for p in compiled["params"].values()])).all()
        skipped.append(bool(mc["skipped"]))
    assert skipped == [i == 2 for i in range(5)]


@pytest.mark.parametrize(("precision", "accumulate_steps"), [("fp32", 1), ("fp16", 3)])
def test_compiled_wrapper_run_eagerly_is_bitwise_train_step(precision, accumulate_steps):
    """The step core compile_step compiles and captures, run without compiling
    (``set_stance("force_eager")``), equals train_step bitwise: same kernels, same order."""
    fast = compile_step(mf.train_step, mode="inductor")
    eager = _state(precision=precision, accumulate_steps=accumulate_steps, batchnorm=True)
    compiled = _state(precision=precision, accumulate_steps=accumulate_steps, batchnorm=True)
    batches = make_batches(7)
    batches[4] = _inject_nonfinite(batches[4])
    with torch.compiler.set_stance("force_eager"):
        for batch in batches:
            eager, me = mf.train_step(eager, batch)
            compiled, mc = fast(compiled, batch)
            assert_trees_equal(mc, me)
            assert_trees_equal(_leaves(compiled), _leaves(eager))
    assert int(compiled.accum.count if accumulate_steps > 1 else 0) == 7 % accumulate_steps


_MODEL_LOG = logging.getLogger("medfunc.tests.model")


class _LoggingClassifier(TinyClassifier):
    """Logs from its forward, as Hugging Face models do (``logger.warning_once``)."""

    def forward(self, x, labels=None):
        _MODEL_LOG.warning("forward called")
        return super().forward(x, labels)


def test_logging_in_the_forward_does_not_break_the_whole_step_graph(caplog):
    torch.manual_seed(0)
    tx = mf.optim.adamw(1e-2)
    eager = mf.init_state(_LoggingClassifier(), tx, seed=1)
    torch.manual_seed(0)
    compiled = mf.init_state(_LoggingClassifier(), tx, seed=1)
    fast = compile_step(mf.train_step, mode="inductor")
    batch = make_batches(1)[0]
    with caplog.at_level(logging.WARNING, logger="medfunc.tests.model"):
        eager, _ = mf.train_step(eager, batch)
        logged_eagerly = len(caplog.records)
        compiled, _ = fast(compiled, batch)
    assert logged_eagerly == 1
    assert fast.stats.whole_step_compiled is True
    assert_trees_close(compiled.params, eager.params, rtol=1e-5, atol=1e-7)
    with pytest.raises(mf.ConfigError, match="fullgraph=False"):
        bad = mf.init_state(_PrintingClassifier(), tx)
        compile_step(mf.train_step, mode="inductor")(bad, batch)


class _PrintingClassifier(TinyClassifier):
    """Calls into Python that dynamo cannot trace (an error log is never skipped)."""

    def forward(self, x, labels=None):
        _MODEL_LOG.error("forward called")
        return super().forward(x, labels)


class _FirstCallClassifier(TinyClassifier):
    """Picks its loss on its first forward and keeps the choice on itself, as Hugging Face
    classifiers keep ``config.problem_type``; draws noise in every forward, train or eval."""

    def __init__(self) -> None:
        super().__init__(dropout=0.3)
        self.loss_kind = None

    def forward(self, x, labels=None, noise=1e-3):
        if self.loss_kind is None and labels is not None:
            self.loss_kind = "smoothed" if labels.dtype == torch.long else "plain"
        out = super().forward(x + noise * torch.randn_like(x))
        if labels is not None:
            smoothing = 0.1 if self.loss_kind == "smoothed" else 0.0
            out["loss"] = torch.nn.functional.cross_entropy(
                out["logits"], labels, label_smoothing=smoothing
            )
        return out


def _first_call_state():
    torch.manual_seed(0)
    tx = mf.optim.chain(mf.optim.clip_by_global_norm(1.0), mf.optim.adamw(1e-2))
    return mf.init_state(_FirstCallClassifier(), tx, seed=3)


def _compare_with_eager(runs):
    """Step, RNG and LR exactly; loss (same dropout masks) and params within inductor's
    rounding (see the module docstring)."""
    for (eager, me), (compiled, mc) in zip(runs["eager"], runs["compiled"]):
        assert_trees_equal(
            {"step": compiled["step"], "rng": compiled["rng"], "lr": mc["lr"]},
            {"step": eager["step"], "rng": eager["rng"], "lr": me["lr"]},
        )
        assert_trees_close(mc["loss"], me["loss"], rtol=1e-5, atol=1e-6)
        assert_trees_close(compiled["params"], eager["params"], rtol=1e-4, atol=1e-5)


def _run_compiled_once_each(make_state, batches):
    """Eager and compiled runs from twin states; every compiled call after the first runs with
    recompiles forbidden (``error_on_recompile``)."""
    fast = compile_step(mf.train_step, mode="inductor")
    eager, compiled = make_state(), make_state()
    runs = {"eager": [], "compiled": []}
    for i, batch in enumerate(batches):
        eager, metrics = mf.train_step(eager, batch)
        runs["eager"].append((_leaves(eager), metrics))
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            compiled, metrics = fast(compiled, batch)
        runs["compiled"].append((mf.tree_map(torch.clone, _leaves(compiled)), metrics))
    return fast, runs, compiled


@pytest.mark.filterwarnings("error")
def test_a_forward_that_sets_an_attribute_on_its_first_call_compiles_the_step_once():
    """The model's first forward runs on the host before the trace, so the graph sees the
    attribute already set and the second call does not compile again."""
    fast, runs, compiled = _run_compiled_once_each(_first_call_state, make_batches(5, 16))
    assert fast.stats.compiles == 1
    assert fast.stats.whole_step_compiled is True
    assert compiled.module.loss_kind == "smoothed"
    _compare_with_eager(runs)


@pytest.mark.slow
def test_error_on_recompile_is_raised_not_turned_into_the_split_fallback():
    """A user who sets dynamo's ``error_on_recompile`` gets the error at the recompile (a new
    batch size), not a warning and a quiet switch to the eager optimizer update."""
    fast = compile_step(mf.train_step, mode="inductor")
    state = _state()
    state, _ = fast(state, make_batches(1, 16)[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        with pytest.raises(torch._dynamo.exc.RecompileError):
            fast(state, make_batches(1, 8)[0])
    assert fast.stats.whole_step_compiled is True


def test_the_host_forward_moves_no_generator_and_runs_once_per_kind_of_batch():
    """The first-call forward draws its noise inside a forked RNG: the global generator and the
    state's RNG stay where the eager step leaves them and the steps stay bitwise equal. It runs
    once per batch structure and dtypes, not per batch size or per value of a number."""
    fast = compile_step(mf.train_step, mode="inductor")
    eager, compiled = _first_call_state(), _first_call_state()
    forwards = {"eager": 0, "compiled": 0}
    for name, state in (("eager", eager), ("compiled", compiled)):
        state.module.register_forward_hook(
            lambda *_, name=name: forwards.update({name: forwards[name] + 1})
        )
    sizes = [*make_batches(2, 16), *make_batches(2, 8)]
    batches = [{**batch, "noise": 1e-3 * (i + 1)} for i, batch in enumerate(sizes)]
    with torch.compiler.set_stance("force_eager"):
        for batch in batches:
            before = torch.get_rng_state()
            eager, me = mf.train_step(eager, batch)
            compiled, mc = fast(compiled, batch)
            assert torch.equal(torch.get_rng_state(), before)
            assert_trees_equal(mc, me)
            assert_trees_equal(_leaves(compiled), _leaves(eager))
        assert forwards == {"eager": 4, "compiled": 5}
        soft = torch.nn.functional.one_hot(batches[0]["labels"], 3).float()
        compiled, _ = fast(compiled, {**batches[0], "labels": soft})
    assert forwards == {"eager": 4, "compiled": 7}


def _tiny_gpt2():
    """A tiny Hugging Face ``GPT2ForSequenceClassification`` built from a config (no download)."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=40,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    return transformers.GPT2ForSequenceClassification(config)


@pytest.mark.slow
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("build", [tiny_bert, _tiny_gpt2], ids=["bert", "gpt2"])
def test_hugging_face_classifiers_compile_the_step_once(build):
    """Hugging Face classifiers set ``config.problem_type`` in their first forward; the step
    still compiles once for five calls of one shape, with dropout, and matches eager."""
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(1, 40, (4, 8), generator=g),
            "labels": torch.randint(0, 3, (4,), generator=g),
        }
        for _ in range(5)
    ]

    def make_state():
        tx = mf.optim.chain(
            mf.optim.clip_by_global_norm(1.0),
            mf.optim.adamw(mf.schedules.linear_warmup(1e-2, 2, 10), weight_decay=0.01),
        )
        return mf.init_state(build(), tx, seed=1)

    fast, runs, compiled = _run_compiled_once_each(make_state, batches)
    assert compiled.module.config.problem_type == "single_label_classification"
    assert fast.stats.compiles == 1
    assert fast.stats.whole_step_compiled is True
    _compare_with_eager(runs)


def test_graph_modes_need_cuda_and_bad_arguments_are_config_errors():
    if not torch.cuda.is_available():
        for mode in ("cudagraph", "inductor+cudagraph"):
            with pytest.raises(mf.ConfigError, match="needs CUDA"):
                compile_step(mf.train_step, mode=mode)
    with pytest.raises(mf.ConfigError, match="mode must be one of"):
        compile_step(mf.train_step, mode="reduce-overhead")
    with pytest.raises(mf.ConfigError, match="compiles medfunc.train_step"):
        compile_step(mf.eval_step)
    with pytest.raises(mf.ConfigError, match="max_graphs"):
        compile_step(mf.train_step, max_graphs=0)
    with pytest.raises(mf.ConfigError, match="warmup_steps"):
        compile_step(mf.train_step, warmup_steps=True)


def test_a_compiled_step_refuses_a_state_of_another_setup():
    fast = compile_step(mf.train_step, mode="inductor")
    batch = make_batches(1)[0]
    with torch.compiler.set_stance("force_eager"):
        fast(_state(), batch)
        with pytest.raises(mf.ConfigError, match="built for another model"):
            fast(_state(precision="fp16"), batch)


def test_default_and_resolved_modes():
    assert default_mode("cuda") == default_mode(torch.device("cuda:1")) == "inductor+cudagraph"
    assert default_mode("cpu") == "inductor"
    assert resolve_mode(False, "cuda") is None
    assert resolve_mode(None, "cpu") is None
    assert resolve_mode(True, "cpu") == "inductor"
    assert resolve_mode(True, "cuda") == "inductor+cudagraph"
    for mode in MODES:
        assert resolve_mode(mode, "cpu") == mode
    with pytest.raises(mf.ConfigError, match="compile must be"):
        resolve_mode("max-autotune", "cpu")


def test_metric_pack_returns_fresh_tensors_of_each_dtype():
    metrics = {
        "loss": torch.tensor(1.25),
        "lr": torch.tensor(3e-4, dtype=torch.float64),
        "skipped": torch.tensor(True),
        "applied": torch.tensor(False),
        "grad_norm": torch.tensor(0.5, dtype=torch.bfloat16),
    }
    pack = MetricPack(metrics, torch.device("cpu"))
    pack.write(metrics)
    first = pack.read()
    assert_trees_equal(first, metrics)
    pack.write({k: torch.zeros_like(v) for k, v in metrics.items()})
    assert_trees_equal(first, metrics)
    assert not pack.read()["skipped"]


def testbatch_signature_keys_shapes_dtypes_and_constants():
    a = {"x": torch.zeros(4, 3), "labels": torch.zeros(4, dtype=torch.long)}
    b = {"labels": torch.ones(4, dtype=torch.long), "x": torch.ones(4, 3)}
    c = {"x": torch.zeros(5, 3), "labels": torch.zeros(5, dtype=torch.long)}
    d = {"x": torch.zeros(4, 3, dtype=torch.float64), "labels": torch.zeros(4, dtype=torch.long)}
    keys = [batch_signature(batch)[2] for batch in (a, b, c, d)]
    assert keys[0] == keys[1]
    assert len({keys[0], keys[2], keys[3]}) == 3
    assert batch_signature((torch.zeros(2), 1))[2] != batch_signature((torch.zeros(2), 2))[2]
    with pytest.raises(mf.BatchError, match="cannot be part of a CUDA graph"):
        batch_signature({"x": torch.zeros(2), "meta": {1, 2}})


# ---------------------------------------------------------------------------------------------
# CUDA graphs


def _count_forwards(state):
    calls = []
    state.module.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cudagraph_is_bitwise_eager_and_replays_without_running_python(precision):
    policy = (
        mf.get_policy(precision, growth_interval=3, init_scale=2.0**10)
        if (precision == "fp16")
        else precision
    )
    eager = _state(precision=policy, device="cuda", batchnorm=True)
    graphed = _state(precision=policy, device="cuda", batchnorm=True)
    forwards = _count_forwards(graphed)
    fast = compile_step(mf.train_step, mode="cudagraph")
    batches = [mf.data.to_device(b, "cuda") for b in make_batches(12, batch_size=16)]
    batches[5] = _inject_nonfinite(batches[5])
    kept = []
    for batch in batches:
        eager, me = mf.train_step(eager, batch)
        graphed, mg = fast(graphed, batch)
        assert_trees_equal(mg, me)
        assert_trees_equal(_leaves(graphed), _leaves(eager))
        kept.append((mg, {k: v.clone() for k, v in mg.items()}))
    for metrics, copy_ in kept:  # metrics are fresh tensors, not overwritten by later replays
        assert_trees_equal(metrics, copy_)
    assert bool(kept[5][0]["skipped"])  # the non-finite batch is skipped in every precision
    assert fast.stats.captures == 1
    assert fast.stats.replays == 12
    # forward ran in the warm-up steps and the capture only, never in the 12 replays
    assert len(forwards) == 3 + 1
    # the returned state is the graph's static storage: the model trains in place
    assert graphed.params["fc1.weight"].data_ptr() == graphed.module.fc1.weight.data_ptr()


@pytest.mark.gpu
@requires_cuda
def test_cudagraph_new_batch_shape_gets_a_second_graph_and_lru_eviction():
    eager = _state(device="cuda")
    graphed = _state(device="cuda")
    fast = compile_step(mf.train_step, mode="cudagraph", max_graphs=2)
    small = [mf.data.to_device(b, "cuda") for b in make_batches(3, batch_size=8)]
    large = [mf.data.to_device(b, "cuda") for b in make_batches(3, batch_size=16, seed=1)]
    odd = [mf.data.to_device(b, "cuda") for b in make_batches(1, batch_size=5, seed=2)]
    with pytest.warns(UserWarning, match="evicting the least recently used"):
        for batch in [small[0], large[0], small[1], large[1], odd[0], small[2], large[2]]:
            eager, me = mf.train_step(eager, batch)
            graphed, mg = fast(graphed, batch)
            assert_trees_equal(mg, me)
            assert_trees_equal(_leaves(graphed), _leaves(eager))
    # small, large, (small, large hit), odd (evicts small), small (evicts large), large (evicts odd)
    assert fast.stats.captures == 5
    assert fast.stats.evictions == 3
    assert fast.stats.replays == 7


@pytest.mark.gpu
@requires_cuda
def test_cudagraph_accumulation_phases_are_separate_graphs():
    eager = _state(device="cuda", accumulate_steps=3, batchnorm=True)
    graphed = _state(device="cuda", accumulate_steps=3, batchnorm=True)
    fast = compile_step(mf.train_step, mode="cudagraph")
    for batch in [mf.data.to_device(b, "cuda") for b in make_batches(9)]:
        eager, me = mf.train_step(eager, batch)
        graphed, mg = fast(graphed, batch)
        assert_trees_equal(mg, me)
        assert_trees_equal(_leaves(graphed), _leaves(eager))
    assert fast.stats.captures == 2
    assert int(graphed.step) == 3


@pytest.mark.gpu
@requires_cuda
def test_cudagraph_copies_in_a_foreign_state_and_refuses_to_keep_its_own():
    fast = compile_step(mf.train_step, mode="cudagraph")
    batches = [mf.data.to_device(b, "cuda") for b in make_batches(4)]
    state = _state(device="cuda")
    state, _ = fast(state, batches[0])
    with pytest.raises(mf.ConfigError, match="donate=True"):
        fast(state, batches[1], donate=False)
    snapshot = state.replace(
        **mf.tree_map(
            torch.clone,
            {
                "params": state.params,
                "buffers": state.buffers,
                "opt_state": state.opt_state,
                "step": state.step,
            },
        )
    )
    state, _ = fast(state, batches[1])
    reference, me = mf.train_step(snapshot, batches[2])
    restored, mg = fast(snapshot, batches[2], donate=False)
    assert fast.stats.copies_in == 1
    assert_trees_equal(mg, me)
    assert_trees_equal(_leaves(restored), _leaves(reference))
    assert not snapshot.consumed
    with pytest.raises(mf.ConsumedStateError):
        state.params  # noqa: B018 - its storage was taken over by the copied-in state


@pytest.mark.gpu
@requires_cuda
def test_inductor_cudagraph_matches_eager_within_tolerance():
    eager = _state(device="cuda")
    graphed = _state(device="cuda")
    fast = compile_step(mf.train_step, mode="inductor+cudagraph")
    for batch in [mf.data.to_device(b, "cuda") for b in make_batches(STEPS, batch_size=16)]:
        eager, me = mf.train_step(eager, batch)
        graphed, mg = fast(graphed, batch)
        assert_trees_equal(
            {k: mg[k] for k in ("lr", "skipped")}, {k: me[k] for k in ("lr", "skipped")}
        )
        assert_trees_close(mg["loss"], me["loss"], rtol=1e-5, atol=1e-6)
        assert_trees_close(_leaves(graphed), _leaves(eager), rtol=1e-4, atol=1e-5)
    assert fast.stats.captures == 1
    assert fast.stats.replays == STEPS
    assert fast.stats.compiles >= 1


def _replay_prologue_kernels():
    """Kernels PyTorch itself launches around a replay of an empty graph with the default CUDA
    generator registered (its seed/offset fills): the floor for any graph step with dropout."""
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(torch.cuda.default_generators[0])
    x = torch.zeros(4, device="cuda")
    with torch.cuda.graph(graph):
        x.add_(torch.rand(4, device="cuda"))
    graph.replay()
    return _launches(graph.replay, 5)[1]


def _launches(fn, steps):
    """CUDA graph and kernel launches per call of ``fn``, counted by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    graphs = kernels = 0
    for event in prof.key_averages():
        if event.key == "cudaGraphLaunch":
            graphs += event.count
        elif event.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"):
            kernels += event.count
    return graphs / steps, kernels / steps


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ["cudagraph", "inductor+cudagraph"])
def test_graph_modes_launch_one_graph_and_no_kernels_per_step(mode):
    state = _state(device="cuda")
    eager_state = _state(device="cuda")
    fast = compile_step(mf.train_step, mode=mode)
    batch = mf.data.to_device(make_batches(1, batch_size=64)[0], "cuda")
    holder = {"g": state, "e": eager_state}

    def graph_step():
        holder["g"], _ = fast(holder["g"], batch)

    def eager_step():
        holder["e"], _ = mf.train_step(holder["e"], batch, donate=True)

    for _ in range(5):
        graph_step()
        eager_step()
    graphs, kernels = _launches(graph_step, 5)
    eager_graphs, eager_kernels = _launches(eager_step, 5)
    assert graphs == 1
    assert kernels == _replay_prologue_kernels()  # nothing of medfunc's own runs as a kernel
    assert eager_graphs == 0
    assert eager_kernels > 20  # the eager step launches each of its kernels from the host


def test_compiled_calls_do_not_grow_memory():
    """Each call once entered a fresh dynamo config patch, whose ContextVar stayed behind
    (about 200 bytes per call)."""
    import tracemalloc

    fast = compile_step(mf.train_step, mode="inductor")
    state = _state()
    batch = make_batches(1)[0]
    for _ in range(50):
        state, _ = fast(state, batch)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(2000):
            state, _ = fast(state, batch)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = {d.traceback[0].filename: d.size_diff for d in after.compare_to(before, "filename")}
    config_growth = sum(v for k, v in growth.items() if k.endswith("_config_module.py"))
    assert config_growth < 20_000  # 2000 calls at ~200 bytes each: about 400 kB
    assert fast.stats.calls == 2050


@pytest.mark.gpu
@requires_cuda
def test_graph_modes_refuse_a_from_torch_optimizer_with_the_reason():
    state = mf.init_state(
        TinyClassifier().cuda(), mf.optim.from_torch(torch.optim.RMSprop, lr=1e-2)
    )
    batch = mf.data.to_device(make_batches(1)[0], "cuda")
    with pytest.raises(mf.ConfigError, match="from_torch"):
        compile_step(mf.train_step, mode="cudagraph")(state, batch)
