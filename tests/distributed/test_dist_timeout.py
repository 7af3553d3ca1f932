"""The collective timeout holds for every process group, DeepSpeed's included.

torch gives a group created without a timeout its own default (30 min for Gloo), and DeepSpeed
creates all of its groups that way; ``mf.distributed.init`` makes the job's timeout that
default. The fast tests check the mechanism in one process; the slow one hangs a real DeepSpeed
peer under torchrun and times the survivor.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
from torch.distributed import distributed_c10d

from medfunc import distributed as dist
from medfunc.distributed import env

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "distributed" / "scripts"
sys.path.insert(0, str(SCRIPTS))

from dist_common import stop_launch, torchrun_command  # noqa: E402

TIMEOUT_S = 5
LAUNCH_TIMEOUT_S = 240


def _timeout_s(group: torch_dist.ProcessGroup) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


@pytest.fixture
def own_group(monkeypatch) -> Iterator[None]:
    """A one-rank Gloo group created before medfunc's init (as a user's own set-up would)."""
    monkeypatch.setattr(env, "_info", None)
    monkeypatch.delenv(env.TIMEOUT_ENV, raising=False)
    torch_default = distributed_c10d.default_pg_timeout
    torch_dist.init_process_group(
        "gloo",
        store=torch_dist.HashStore(),
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=7),
    )
    try:
        yield
    finally:
        dist.shutdown()
        assert distributed_c10d.default_pg_timeout == torch_default


def test_init_on_a_joined_group_adopts_its_timeout_for_later_groups(own_group):
    info = dist.init()
    assert info.timeout_s == 7.0
    assert _timeout_s(torch_dist.new_group([0])) == 7.0


def test_an_explicit_timeout_applies_to_existing_and_later_groups(own_group):
    earlier = torch_dist.new_group([0])
    info = dist.init(timeout_s=3)
    assert info.timeout_s == 3.0
    assert _timeout_s(torch_dist.group.WORLD) == 3.0
    assert _timeout_s(earlier) == 3.0
    assert _timeout_s(torch_dist.new_group([0])) == 3.0


@pytest.mark.slow
def test_deepspeed_hung_peer_fails_within_the_configured_timeout(tmp_path):
    env_vars = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        MEDFUNC_TEST_OUT=str(tmp_path),
        MEDFUNC_DIST_TIMEOUT_S=str(TIMEOUT_S),
    )
    command = torchrun_command(SCRIPTS / "timeout_worker.py")
    launcher = subprocess.Popen(
        command,
        cwd=SCRIPTS,
        env=env_vars,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
        ended = time.time()
    finally:
        stop_launch([launcher], tmp_path)
    assert launcher.returncode != 0
    # every group that exists once DeepSpeed has initialised, its own included, has the timeout
    groups = json.loads((tmp_path / "groups.json").read_text())
    assert len(groups) >= 2 and set(groups.values()) == {float(TIMEOUT_S)}, groups
    # rank 0 raised when the timeout ran out, and the whole job was over soon after
    failed_after = float((tmp_path / "failed_after.txt").read_text())
    assert TIMEOUT_S - 0.5 < failed_after < TIMEOUT_S + 10
    step_started = float((tmp_path / "step_started.txt").read_text())
    assert ended - step_started < TIMEOUT_S + 10
    assert "medfunc.errors.DistributedError: DeepSpeed forward/backward/step failed" in output
    assert f"(timeout {TIMEOUT_S} s)" in output
    assert "most likely rank 1" in output
