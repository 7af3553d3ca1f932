"""medfunc.distributed against real multi-process runs (torchrun, Gloo on the CPU).

Each slow test group is one torchrun launch (a module-scoped fixture) whose worker script in
tests/distributed/scripts/ writes its results to a temporary folder; the assertions compare
them with a single-process medfunc run computed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import medfunc as mf
from medfunc import distributed as dist
from medfunc.checkpoint import restore_state
from medfunc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "distributed" / "scripts"
sys.path.insert(0, str(SCRIPTS))

from dist_common import (  # noqa: E402
    STEPS,
    accumulate_run,
    free_port,
    make_model,
    make_tx,
    reference_run,
    stop_launch,
    torchrun_command,
)

# Two ranks on halves of each batch against one process on the whole batch (fp32, CPU): the
# sums are reassociated, so the match is within float32 rounding, not bitwise.
TOL = 1e-6
LAUNCH_TIMEOUT_S = 240


def _env(out: Path, **extra: str) -> dict:
    return dict(
        os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MEDFUNC_TEST_OUT=str(out), **extra
    )


def _torchrun(script: str, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    command = torchrun_command(SCRIPTS / script, *args)
    return subprocess.run(
        command,
        cwd=SCRIPTS,
        env=_env(out, **env),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )


def _max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _load(out: Path, name: str) -> tuple[dict, dict]:
    return (torch.load(out / f"{name}_rank0.pt"), torch.load(out / f"{name}_rank1.pt"))


@pytest.fixture(scope="module")
def reference() -> dict:
    """Params after STEPS single-process steps on the full batches."""
    return dict(reference_run(0, STEPS).params)


# ------------------------------------------------------------------------------------------------
# single process: every helper degrades to a no-op


def test_single_process_helpers_report_rank_zero_of_one():
    info = dist.init()
    assert (info.rank, info.world_size, info.device.type) == (0, 1, "cpu")
    assert dist.init() is info
    assert not dist.is_distributed() and dist.is_main_process()
    assert (dist.rank(), dist.world_size()) == (0, 1)
    assert dist.agree(True, op="all") and not dist.agree(False, op="any")
    value = torch.tensor([1.0, 2.0])
    summed = dist.all_reduce_sum({"v": value})["v"]
    assert torch.equal(summed, value) and summed is not value
    assert torch.equal(
        dist.all_reduce_mean(torch.tensor(3)), torch.tensor(3.0, dtype=torch.float64)
    )
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.all_gather_object(5) == [5]
    assert dist.shard_indices(10, rank_=1, world=3) == range(3, 6)
    covered = [
        i for r in range(3) for i in dist.shard_indices(10, drop_last=False, rank_=r, world=3)
    ]
    assert covered == list(range(10))
    dist.barrier()


def test_single_process_adapters_return_ordinary_states(reference):
    state = mf.init_state(make_model(), make_tx())
    assert dist.data_parallel(state) is state
    sharded = dist.fully_shard_state(make_model(), make_tx())
    assert sharded.grad_path is None and not dist.is_fsdp_state(sharded)
    data = reference_run(0, STEPS, sharded)
    assert _max_diff(dict(data.params), reference) == 0.0


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="op must be 'any' or 'all'"):
        dist.agree(True, op="most")
    with pytest.raises(ConfigError, match="tensor or a mapping"):
        dist.all_reduce_sum([1.0])
    with pytest.raises(ConfigError, match="deepspeed_config file"):
        dist.deepspeed_state(make_model(), make_tx(), "/nonexistent/ds.json")
    with pytest.raises(ConfigError, match="'optimizer' section"):
        dist.deepspeed_state(make_model(), make_tx(), {"optimizer": {"type": "AdamW"}})
    with pytest.raises(ConfigError, match="stage"):
        dist.deepspeed_state(make_model(), make_tx(), {"zero_optimization": {"stage": 3}})


# ------------------------------------------------------------------------------------------------
# DDP, helpers, the DeepSpeed fallback and FSDP2: one launch


@pytest.fixture(scope="module")
def ddp_fsdp_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp_fsdp")
    done = _torchrun("ddp_fsdp_worker.py", out)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = [json.loads((out / f"record_rank{r}.json").read_text()) for r in (0, 1)]
    return out, records


@pytest.mark.slow
def test_ddp_two_ranks_on_half_batches_equal_one_process_on_full_batches(ddp_fsdp_run, reference):
    out, records = ddp_fsdp_run
    rank0, rank1 = _load(out, "ddp")
    assert [r["world"] for r in records] == [2, 2]
    assert _max_diff(rank0, rank1) == 0.0
    assert _max_diff(rank0, reference) < TOL
    assert _max_diff(rank0, dict(mf.init_state(make_model(), make_tx()).params)) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_gradient_accumulation_syncs_once_per_update_and_equals_one_process(ddp_fsdp_run, kind):
    out, records = ddp_fsdp_run
    single = accumulate_run(mf.init_state(make_model(), make_tx(), accumulate_steps=2))
    assert records[0][f"{kind}_accumulate_step"] == int(single.step) == 4
    rank0, rank1 = _load(out, f"{kind}_accumulate")
    assert _max_diff(rank0, rank1) == 0.0
    assert _max_diff(rank0, dict(single.params)) < TOL


@pytest.mark.slow
def test_collective_helpers_agree_across_ranks(ddp_fsdp_run):
    _, records = ddp_fsdp_run
    for rank, record in enumerate(records):
        helpers = record["helpers"]
        assert helpers["any"] is True and helpers["all"] is False
        assert (helpers["sum_a"], helpers["sum_n"]) == (3.0, 3)
        assert helpers["mean"] == [1.0, 1.0]
        assert helpers["broadcast"] == {"from": 0}
        assert helpers["gathered"] == [0, 10]
        assert helpers["is_main"] is (rank == 0)


@pytest.mark.slow
def test_debug_check_names_the_parameter_that_diverged(ddp_fsdp_run):
    _, records = ddp_fsdp_run
    for record in records:
        message = record["diverged_error"]
        assert message is not None and "'fc1.weight'" in message
        assert "max difference of 0.001" in message


@pytest.mark.slow
def test_deepspeed_missing_warns_and_falls_back_to_ddp(ddp_fsdp_run):
    out, records = ddp_fsdp_run
    for record in records:
        assert len(record["fallback_warnings"]) == 1
        assert "deepspeed is not installed" in record["fallback_warnings"][0]
        assert "data_parallel" in record["fallback_warnings"][0]
        assert record["fallback_has_grad_sync"] is True
    assert _max_diff(_load(out, "fallback")[0], _load(out, "ddp")[0]) == 0.0


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_process(ddp_fsdp_run, reference):
    out, records = ddp_fsdp_run
    assert records[0]["fsdp_param_types"] == ["DTensor"]
    rank0, rank1 = _load(out, "fsdp")
    assert _max_diff(rank0, rank1) == 0.0
    assert _max_diff(rank0, reference) < TOL


@pytest.mark.slow
def test_fsdp_sharded_and_full_checkpoints_resume_on_two_ranks(ddp_fsdp_run):
    out, records = ddp_fsdp_run
    uninterrupted = _load(out, "fsdp")[0]
    for kind in ("sharded", "full"):
        assert records[0][f"{kind}_resume_step"] == STEPS // 2
        for resumed in _load(out, f"fsdp_{kind}_resumed"):
            assert _max_diff(resumed, uninterrupted) == 0.0


@pytest.mark.slow
def test_fsdp_checkpoints_restore_in_one_process_and_continue(ddp_fsdp_run, reference):
    out, _ = ddp_fsdp_run
    uninterrupted = _load(out, "fsdp")[0]
    full = restore_state(out / "fsdp_full.pt", model=make_model(), tx=make_tx())
    sharded = dist.load_sharded(out / "fsdp_sharded", like=mf.init_state(make_model(), make_tx()))
    for state in (full, sharded):
        assert int(state.step) == STEPS // 2
        state = reference_run(STEPS // 2, STEPS, state)
        assert _max_diff(dict(state.params), reference) < TOL
        assert _max_diff(dict(state.params), uninterrupted) < TOL


# ------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1 / ZeRO-2 on the CPU: one launch


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("deepspeed")
    done = _torchrun("deepspeed_worker.py", out, DS_ACCELERATOR="cpu")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out, json.loads((out / "record_rank0.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_trains_like_one_process(deepspeed_run, reference, stage):
    out, record = deepspeed_run
    assert record[f"zero{stage}_stage"] == stage
    assert record[f"zero{stage}_train_step_refused"] is True
    assert record[f"zero{stage}_optimizer"] == "DeepSpeedZeroOptimizer"
    assert record[f"zero{stage}_step"] == STEPS
    before, after = record[f"zero{stage}_probe"]
    assert after < 0.85 * before
    rank0, rank1 = _load(out, f"zero{stage}")
    assert _max_diff(rank0, rank1) == 0.0
    assert _max_diff(rank0, reference) < TOL


@pytest.mark.slow
def test_deepspeed_checkpoints_resume(deepspeed_run, reference):
    out, record = deepspeed_run
    uninterrupted = _load(out, "zero2")[0]
    for kind in ("sharded", "full"):
        assert record[f"{kind}_resume_step"] == STEPS // 2
        assert _max_diff(_load(out, f"zero2_{kind}_resumed")[0], uninterrupted) == 0.0
    state = restore_state(out / "ds_full.pt", model=make_model(), tx=make_tx())
    assert int(state.step) == STEPS // 2
    state = reference_run(STEPS // 2, STEPS, state)
    assert _max_diff(dict(state.params), reference) < TOL


@pytest.mark.slow
def test_deepspeed_runs_in_a_single_process(tmp_path, reference):
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "deepspeed_worker.py")],
        cwd=SCRIPTS,
        env=_env(tmp_path, DS_ACCELERATOR="cpu"),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / "record_rank0.json").read_text())
    assert record["zero2_step"] == STEPS and record["sharded_resume_step"] == STEPS // 2
    params = torch.load(tmp_path / "zero2_rank0.pt")
    assert _max_diff(params, reference) < TOL
    for kind in ("sharded", "full"):
        assert _max_diff(torch.load(tmp_path / f"zero2_{kind}_resumed_rank0.pt"), params) == 0.0


# ------------------------------------------------------------------------------------------------
# a failed rank: the survivor raises DistributedError within the timeout


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "hang"])
def test_failed_rank_makes_the_other_raise_distributed_error(tmp_path, how):
    timeout_s = 6
    port = free_port()
    env = _env(tmp_path, MEDFUNC_DIST_TIMEOUT_S=str(timeout_s))
    nodes = []
    for node in (0, 1):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node_rank={node}",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(SCRIPTS / "kill_worker.py"),
            how,
        ]
        stream = subprocess.PIPE if node == 0 else subprocess.DEVNULL
        nodes.append(
            subprocess.Popen(
                command,
                cwd=SCRIPTS,
                env=env,
                stdout=stream,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    started = time.monotonic()
    try:
        output, _ = nodes[0].communicate(timeout=LAUNCH_TIMEOUT_S)
        elapsed = time.monotonic() - started
    finally:
        stop_launch(nodes, tmp_path)
    assert nodes[0].returncode != 0
    assert "medfunc.errors.DistributedError: gradient all-reduce" in output
    assert "most likely rank 1" in output
    failed_after = float((tmp_path / "failed_after.txt").read_text())
    if how == "hang":
        assert timeout_s - 0.5 < failed_after < timeout_s + 10
        assert f"(timeout {timeout_s} s)" in output
    else:
        assert failed_after < timeout_s
    assert elapsed < LAUNCH_TIMEOUT_S


# ------------------------------------------------------------------------------------------------
# the runnable example of docs/distributed.md


@pytest.mark.slow
def test_example_script_trains_under_torchrun_and_writes_a_restorable_checkpoint(tmp_path):
    example = ROOT / "examples" / "distributed_train.py"
    command = torchrun_command(
        example,
        "--mode",
        "ddp",
        "--epochs",
        "2",
        "--out",
        str(tmp_path),
    )
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["mode"], summary["world_size"]) == ("ddp", 2)
    assert summary["eval"]["accuracy"] > 0.9
    assert done.stdout.count("epoch 2: eval loss") == 1

    from medfunc.checkpoint import read_checkpoint
    from medfunc.recipes.breast_cancer import MLPClassifier, make_splits

    payload = read_checkpoint(tmp_path / "final.pt")
    assert payload["trainer_state"]["global_step"] == summary["steps"]
    model = MLPClassifier(dropout=0.1)
    model.load_state_dict(payload["model_state"])
    splits = make_splits(seed=0)
    with torch.no_grad():
        logits = model.eval()(splits.x_eval)["logits"]
    accuracy = float((logits.argmax(dim=1) == splits.y_eval).double().mean())
    assert accuracy == pytest.approx(summary["eval"]["accuracy"], abs=1e-12)
