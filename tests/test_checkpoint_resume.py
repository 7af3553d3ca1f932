"""Exact resume: a run saved and restored in a fresh Python process equals the straight run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

from medfunc.checkpoint import save_state

SCRIPTS = Path(__file__).resolve().parent / "scripts"
_spec = importlib.util.spec_from_file_location("resume_worker", SCRIPTS / "resume_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def test_resume_in_a_fresh_process_is_bitwise_equal_to_the_straight_run(tmp_path):
    checkpoints, results = tmp_path / "checkpoints", tmp_path / "results"
    expected, at_split = {}, {}
    for config in worker.CONFIGS:
        expected[config.name] = worker.leaves(
            worker.train(worker.make_state(config), 0, worker.TOTAL)
        )
        part = worker.train(worker.make_state(config), 0, config.split)
        at_split[config.name] = worker.leaves(part)
        save_state(
            part, checkpoints / f"{config.name}.pt", extra={"data_position": config.split}
        )

    subprocess.run(
        [sys.executable, str(SCRIPTS / "resume_worker.py"), str(checkpoints), str(results)],
        check=True,
        timeout=120,
    )

    for config in worker.CONFIGS:
        want = expected[config.name]
        got = torch.load(results / f"{config.name}.pt", weights_only=True)
        assert list(got) == list(want), config.name
        for path, value in want.items():
            assert got[path].dtype == value.dtype, (config.name, path)
            assert torch.equal(got[path], value), f"{config.name}: {path} differs after resume"
        # the resumed part really trained: params, moments and rng moved on after the split
        before = at_split[config.name]
        assert not torch.equal(want["params/fc1.weight"], before["params/fc1.weight"])
        assert not torch.equal(want["opt_state/1/1/fc1.weight"], before["opt_state/1/1/fc1.weight"])
        assert int(want["rng"][1]) == worker.TOTAL
        if config.precision == "fp16":
            # the scaler backed off (overflowing start) and grew again: its state matters
            assert float(want["loss_scale/0"]) < 2.0**24
            assert not torch.equal(want["loss_scale/0"], before["loss_scale/0"]) or not (
                torch.equal(want["loss_scale/1"], before["loss_scale/1"])
            )
        if config.accumulate == 3 and config.split % 3:
            assert int(before["accum/1"]) == config.split % 3
