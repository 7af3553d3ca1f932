"""Parameters without a gradient: medfunc treats them exactly as ``torch.optim`` treats a
``.grad`` that is None (no state, no decay, no momentum, no step count), against the imperative
torch loop as the reference, in eager, accumulated, compiled, fp16 and data-parallel steps.

The models change which parameters they use from step to step: two task heads trained
alternately, a block the forward stops using for a while (frozen, then unfrozen) and one layer
no forward ever uses. Run as a script under torchrun, this file is also the data-parallel worker
of :func:`test_ddp_and_fsdp_equal_torch_and_ranks_agree_on_the_set_of_gradients`.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import torchrun_command
from torch import nn

import medfunc as mf
from medfunc.compile import compile_step
from medfunc.optim import from_torch_state_dict, to_torch_state_dict, torch_param_groups
from medfunc.testing import assert_trees_equal

# (task, use_extra) per micro-batch: head b starts late, the extra block pauses at steps 3-5
# and comes back, "never" is never used.
PLAN = [
    ("a", True),
    ("a", True),
    ("a", True),
    ("b", False),
    ("a", False),
    ("b", False),
    ("b", True),
    ("a", True),
    ("b", True),
    ("a", False),
]
COMPILE_TOL = {"rtol": 1e-4, "atol": 1e-5}  # tests/test_compile.py's tolerance


class Heads(nn.Module):
    """A trunk, an optional extra block, two task heads and a layer no forward uses."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 16)
        self.extra = nn.Linear(16, 16)
        self.head_a = nn.Linear(16, 3)
        self.head_b = nn.Linear(16, 3)
        self.never = nn.Linear(16, 3)
        self.use_extra = True

    def forward(self, x: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        if self.use_extra:
            h = h + torch.tanh(self.extra(h))
        head = self.head_a if task == "a" else self.head_b
        return nn.functional.cross_entropy(head(h), labels)


def _model() -> Heads:
    torch.manual_seed(0)
    return Heads()


def _batches(plan: list, seed: int = 0, size: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randn(size, 6, generator=g),
            "labels": torch.randint(0, 3, (size,), generator=g),
            "task": task,
        }
        for task, _ in plan
    ]


def _steps(plan: list, seed: int = 0) -> list[tuple[bool, dict]]:
    """``(use_extra, batch)`` per entry of ``plan``."""
    return [(use_extra, batch) for (_, use_extra), batch in zip(plan, _batches(plan, seed))]


def _trainable(state: mf.TrainState) -> OrderedDict:
    return OrderedDict((n, state.params[n]) for n in state.trainable)


def _torch_step(model, opt, batch, use_extra, *, k=1, apply=True, scaler=None, clip=None):
    """One micro-batch of the imperative reference loop; returns clip_grad_norm_'s norm."""
    model.use_extra = use_extra
    if scaler is not None:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch)
    else:
        loss = model(**batch)
    loss = loss / k if k > 1 else loss
    (scaler.scale(loss) if scaler is not None else loss).backward()
    norm = None
    if apply:
        if scaler is not None:
            scaler.unscale_(opt)
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return norm


def _mf_step(state, batch, use_extra, step=mf.train_step):
    state.module.use_extra = use_extra
    return step(state, batch)


def _assert_equal(a: torch.Tensor, b: torch.Tensor, what: str, tol: dict | None) -> None:
    if tol is None:
        assert a.dtype == b.dtype and torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


def assert_matches_torch(state, model, opt, *, tol: dict | None = None) -> None:
    """Params bitwise (or within ``tol``) equal to the reference model's, and the optimizer
    state, as a torch state_dict, with exactly the reference optimizer's entries."""
    for name, value in model.named_parameters():
        _assert_equal(state.params[name], value.detach(), name, tol)
    ours = to_torch_state_dict(state.tx, state.opt_state, _trainable(state), state.step)
    theirs = opt.state_dict()
    assert sorted(ours["state"]) == sorted(theirs["state"])
    names = [n for g in theirs["param_groups"] for n in g["param_names"]]
    assert [n for g in ours["param_groups"] for n in g["param_names"]] == names
    for idx, entry in theirs["state"].items():
        assert sorted(ours["state"][idx]) == sorted(entry), names[idx]
        for key, value in entry.items():
            exact = tol if key != "step" else None
            _assert_equal(ours["state"][idx][key], value, f"{names[idx]} {key}", exact)


def _with_state(opt: torch.optim.Optimizer) -> set[str]:
    names = [n for g in opt.param_groups for n in g["param_names"]]
    return {names[i] for i in opt.state_dict()["state"]}


# (medfunc transformation, torch optimizer over named params), single param group
OPTIMIZERS = {
    "adamw": (
        lambda: mf.optim.adamw(1e-2, weight_decay=0.1, decay_mask=None, kernel="foreach"),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    ),
    "adam_amsgrad": (
        lambda: mf.optim.adam(
            1e-2, weight_decay=0.01, amsgrad=True, decay_mask=None, kernel="foreach"
        ),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01, amsgrad=True, foreach=True),
    ),
    "sgd_nesterov": (
        lambda: mf.optim.sgd(
            0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, decay_mask=None, kernel="foreach"
        ),
        lambda ps: torch.optim.SGD(
            ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, foreach=True
        ),
    ),
    "sgd_dampening": (
        lambda: mf.optim.sgd(
            0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2, decay_mask=None, kernel="foreach"
        ),
        lambda ps: torch.optim.SGD(
            ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2, foreach=True
        ),
    ),
    "sgd_plain": (
        lambda: mf.optim.sgd(0.1, weight_decay=1e-2, decay_mask=None, kernel="foreach"),
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-2, foreach=True),
    ),
}


def _setup(name: str, **init_kwargs):
    make_tx, make_opt = OPTIMIZERS[name]
    model = _model()
    reference = copy.deepcopy(model)
    state = mf.init_state(model, make_tx(), **init_kwargs)
    opt = make_opt(list(reference.named_parameters()))
    return state, reference, opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_equals_torch_while_the_used_parameters_change(name):
    state, reference, opt = _setup(name)
    for use_extra, batch in _steps(PLAN):
        state, _ = _mf_step(state, batch, use_extra)
        _torch_step(reference, opt, batch, use_extra)
        assert_matches_torch(state, reference, opt)
    assert "never.weight" not in _with_state(opt)
    assert torch.equal(state.params["never.weight"], _model().never.weight.detach())


def test_state_is_created_at_a_parameters_first_gradient():
    state, reference, opt = _setup("adamw")
    steps = _steps(PLAN)
    for use_extra, batch in steps[:3]:
        state, _ = _mf_step(state, batch, use_extra)
        _torch_step(reference, opt, batch, use_extra)
    sd = to_torch_state_dict(state.tx, state.opt_state, _trainable(state), state.step)
    names = list(state.trainable)
    assert (
        {names[i] for i in sd["state"]}
        == _with_state(opt)
        == {
            "trunk.weight",
            "trunk.bias",
            "extra.weight",
            "extra.bias",
            "head_a.weight",
            "head_a.bias",
        }
    )
    head_b = state.params["head_b.weight"].clone()
    state, _ = _mf_step(state, steps[3][1], False)  # head b's first gradient, extra unused
    assert not torch.equal(state.params["head_b.weight"], head_b)
    assert float(state.opt_state.step["head_b.weight"]) == 1.0
    assert float(state.opt_state.step["extra.weight"]) == 3.0
    assert float(state.opt_state.step["head_a.weight"]) == 3.0


def test_multiple_param_groups_with_decay_mask_and_clipping_equal_torch():
    model = _model()
    reference = copy.deepcopy(model)
    adamw = mf.optim.adamw(1e-2, weight_decay=0.05, lr_multipliers=[("head", 3.0)])
    tx = mf.optim.chain(mf.optim.clip_by_global_norm(0.5), adamw)
    state = mf.init_state(model, tx)
    groups = torch_param_groups(tx, OrderedDict(reference.named_parameters()))
    opt = torch.optim.AdamW(groups, foreach=True)
    for use_extra, batch in _steps(PLAN):
        state, metrics = _mf_step(state, batch, use_extra)
        norm = _torch_step(reference, opt, batch, use_extra, clip=0.5)
        assert torch.equal(metrics["grad_norm"], norm)
        assert_matches_torch(state, reference, opt)


@pytest.mark.parametrize("name", ["adamw", "sgd_dampening"])
def test_accumulation_gives_a_gradient_to_parameters_used_by_any_micro_batch(name):
    # windows of 2: (a, a) leaves head b without a gradient, (a, b) gives both heads one,
    # and the extra block pauses for whole windows and for half of one
    plan = [
        ("a", True),
        ("a", True),
        ("a", False),
        ("b", True),
        ("b", False),
        ("b", False),
        ("a", True),
        ("b", False),
        ("a", False),
        ("a", False),
    ]
    state, reference, opt = _setup(name, accumulate_steps=2)
    for i, (use_extra, batch) in enumerate(_steps(plan)):
        state, metrics = _mf_step(state, batch, use_extra)
        apply = i % 2 == 1
        _torch_step(reference, opt, batch, use_extra, k=2, apply=apply)
        assert bool(metrics["applied"]) == apply
        if apply:
            assert_matches_torch(state, reference, opt)
    assert "never.weight" not in _with_state(opt)


def test_fp16_loss_scaling_neither_unscales_nor_checks_a_missing_gradient():
    policy = mf.get_policy("fp16", init_scale=2.0**10, growth_interval=3)
    for name in ("adamw", "sgd_nesterov"):
        state, reference, opt = _setup(name, precision=policy)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        steps = _steps(PLAN)
        bad = {**steps[4][1], "x": steps[4][1]["x"].clone()}
        bad["x"][0, 0] = float("inf")  # a skipped step while head b has no gradient
        steps[4] = (steps[4][0], bad)
        skipped = []
        for use_extra, batch in steps:
            state, metrics = _mf_step(state, batch, use_extra)
            _torch_step(reference, opt, batch, use_extra, scaler=scaler)
            skipped.append(bool(metrics["skipped"]))
            assert float(metrics["loss_scale"]) == scaler.get_scale()
            assert_matches_torch(state, reference, opt)
        assert skipped == [i == 4 for i in range(len(PLAN))]


def test_compiled_step_specialises_on_the_set_of_gradients():
    state, reference, opt = _setup("adamw")
    fast = compile_step(mf.train_step, mode="inductor")
    compiles = []
    for use_extra, batch in _steps(PLAN):
        state, _ = _mf_step(state, batch, use_extra, step=fast)
        _torch_step(reference, opt, batch, use_extra)
        assert_matches_torch(state, reference, opt, tol=COMPILE_TOL)
        compiles.append(fast.stats.compiles)
    assert fast.stats.whole_step_compiled
    # one graph per (task, extra block used) combination, reused when it comes back
    assert compiles[-1] == len(set(PLAN)) == 4
    assert compiles[1] == compiles[2] == compiles[0]
    assert torch.equal(state.params["never.weight"], _model().never.weight.detach())


def test_compiled_accumulation_equals_torch():
    plan = [("a", True), ("a", True), ("a", True), ("b", True), ("b", True), ("b", True)] * 2
    state, reference, opt = _setup("adamw", accumulate_steps=2)
    fast = compile_step(mf.train_step, mode="inductor")
    for i, (use_extra, batch) in enumerate(_steps(plan)):
        state, _ = _mf_step(state, batch, use_extra, step=fast)
        _torch_step(reference, opt, batch, use_extra, k=2, apply=i % 2 == 1)
        if i % 2 == 1:
            assert_matches_torch(state, reference, opt, tol=COMPILE_TOL)
            assert ("head_b.weight" in _with_state(opt)) == (i >= 3)


def test_torch_state_dict_round_trip_keeps_resume_bitwise():
    for name in ("adamw", "sgd_dampening"):
        state, reference, opt = _setup(name)
        steps = _steps(PLAN)
        for use_extra, batch in steps[:3]:
            state, _ = _mf_step(state, batch, use_extra)
            _torch_step(reference, opt, batch, use_extra)
        sd = to_torch_state_dict(state.tx, state.opt_state, _trainable(state), state.step)
        # into plain PyTorch and back: the entries of the never-used parameters stay absent
        fresh = OPTIMIZERS[name][1](list(copy.deepcopy(reference).named_parameters()))
        fresh.load_state_dict(sd)
        back = from_torch_state_dict(state.tx, fresh.state_dict(), _trainable(state))
        resumed = state.replace(opt_state=back)
        assert_matches_torch(resumed, reference, opt)
        for use_extra, batch in steps[3:]:
            state, _ = _mf_step(state, batch, use_extra)
            resumed, _ = _mf_step(resumed, batch, use_extra)
            _torch_step(reference, opt, batch, use_extra)
        assert_matches_torch(state, reference, opt)
        assert_trees_equal(resumed.opt_state, state.opt_state)
        assert_trees_equal(resumed.params, state.params)


def test_checkpoint_inside_a_window_resumes_bitwise(tmp_path):
    plan = [("a", True), ("a", True), ("a", True), ("b", False), ("b", False), ("a", True)] * 2
    steps = _steps(plan)
    whole = mf.init_state(_model(), OPTIMIZERS["sgd_dampening"][0](), accumulate_steps=3)
    for use_extra, batch in steps:
        whole, _ = _mf_step(whole, batch, use_extra)
    part = mf.init_state(_model(), OPTIMIZERS["sgd_dampening"][0](), accumulate_steps=3)
    for use_extra, batch in steps[:5]:  # 2 of 3 micro-batches
        part, _ = _mf_step(part, batch, use_extra)
    assert part.accum.grads.used == ("trunk.weight", "trunk.bias", "head_b.weight", "head_b.bias")
    path = mf.save_state(part, tmp_path / "mid.pt")
    saved = torch.load(path, weights_only=True)
    names = [n for g in saved["optimizer_state"]["param_groups"] for n in g["param_names"]]
    assert {names[i] for i in saved["optimizer_state"]["state"]} == {
        "trunk.weight",
        "trunk.bias",
        "extra.weight",
        "extra.bias",
        "head_a.weight",
        "head_a.bias",
    }
    like = mf.init_state(_model(), OPTIMIZERS["sgd_dampening"][0](), accumulate_steps=3)
    resumed = mf.restore_state(path, like=like)
    assert resumed.accum.grads.used == part.accum.grads.used
    for use_extra, batch in steps[5:]:
        resumed, _ = _mf_step(resumed, batch, use_extra)
    for field in ("params", "opt_state", "accum", "step"):
        assert_trees_equal(getattr(resumed, field), getattr(whole, field))


# ------------------------------------------------------------------------------------------------
# data parallel: this file is the torchrun worker


def _ddp_plan(rank: int) -> list:
    # steps 0-1: both ranks head a (head b has no gradient anywhere); steps 2-3: rank 0 head a,
    # rank 1 head b (each head has a gradient on one rank); steps 4-5: both head b, extra block
    # unused on rank 1 only
    return [
        ("a", True),
        ("a", True),
        ("a" if rank == 0 else "b", True),
        ("a" if rank == 0 else "b", False),
        ("b", True),
        ("b", rank == 0),
    ]


def _ddp_worker(out: Path) -> None:
    """Under torchrun: medfunc's data_parallel AdamW against torch's
    DistributedDataParallel(find_unused_parameters=True) with torch.optim.AdamW."""
    from medfunc import distributed as dist

    info = dist.init()
    rank = info.rank
    plan = _ddp_plan(rank)
    for k in (1, 2):
        state = mf.init_state(_model(), OPTIMIZERS["adamw"][0](), accumulate_steps=k)
        state = dist.data_parallel(state)
        reference = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(reference, find_unused_parameters=True)
        opt = OPTIMIZERS["adamw"][1](list(reference.named_parameters()))
        for i, (use_extra, batch) in enumerate(_steps(plan, seed=rank)):
            state, _ = _mf_step(state, batch, use_extra)
            reference.use_extra = use_extra
            if k == 1:
                ddp(**batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            elif i % 2 == 0:
                with ddp.no_sync():
                    (ddp(**batch) / k).backward()
            else:
                (ddp(**batch) / k).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        dist.check_in_sync(state)
        sd = to_torch_state_dict(state.tx, state.opt_state, _trainable(state), state.step)
        result = {
            "params": dict(state.params),
            "reference": {n: p.detach() for n, p in reference.named_parameters()},
            "ours": sorted(sd["state"]),
            "theirs": sorted(opt.state_dict()["state"]),
        }
        torch.save(result, out / f"k{k}_rank{rank}.pt")
    # FSDP2: both ranks use the same parameters (FSDP's reduce-scatter needs that) on the same
    # batches, so the mean gradient is the single-process one
    fsdp = dist.fully_shard_state(_model(), OPTIMIZERS["adamw"][0]())
    reference = _model()
    opt = OPTIMIZERS["adamw"][1](list(reference.named_parameters()))
    for use_extra, batch in _steps(PLAN):
        fsdp, _ = _mf_step(fsdp, batch, use_extra)
        _torch_step(reference, opt, batch, use_extra)
    full = dist.gather_full_state(fsdp)
    sd = to_torch_state_dict(full.tx, full.opt_state, _trainable(full), full.step)
    result = {
        "params": {n: p.clone() for n, p in full.params.items()},
        "reference": {n: p.detach() for n, p in reference.named_parameters()},
        "ours": sorted(sd["state"]),
        "theirs": sorted(opt.state_dict()["state"]),
    }
    torch.save(result, out / f"fsdp_rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_and_fsdp_equal_torch_and_ranks_agree_on_the_set_of_gradients(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    command = torchrun_command(__file__, str(tmp_path))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-4000:]
    initial = _model().never.weight.detach()
    for run in ("k1", "k2", "fsdp"):
        rank0, rank1 = (torch.load(tmp_path / f"{run}_rank{r}.pt") for r in (0, 1))
        for name, value in rank0["params"].items():
            assert torch.equal(value, rank1["params"][name]), (run, name)
            # mean gradients: DDP divides before its all-reduce, medfunc after (rounding only)
            torch.testing.assert_close(value, rank0["reference"][name], rtol=0, atol=1e-6)
        assert rank0["ours"] == rank0["theirs"] == rank1["ours"], run
        assert torch.equal(rank0["params"]["never.weight"], initial), run


if __name__ == "__main__":
    from conftest import end_worker

    _ddp_worker(Path(sys.argv[1]))
    end_worker()
