"""Exact resume: a run saved and restored in a fresh Python process equals the straight run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

from medfunc.checkpoint import save_state

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
_spec = importlib.util.spec_from_file_location("resume_worker", SCRIPTS / "resume_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def test_resume_in_a_fresh_process_is_bitwise_equal_to_the_straight_run(tmp_path, one_thread):
    checkpoints, results = tmp_path / "checkpoints", tmp_path / "results"
    expected, at_split, logs = {}, {}, {}
    for config in worker.CONFIGS:
        logs[config.name] = []
        expected[config.name] = worker.leaves(
            worker.train(worker.make_state(config), 0, worker.TOTAL, logs[config.name])
        )
        part = worker.train(worker.make_state(config), 0, config.split)
        at_split[config.name] = worker.leaves(part)
        save_state(part, checkpoints / f"{config.name}.pt", extra={"data_position": config.split})

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
        before, after_split = at_split[config.name], logs[config.name][config.split :]
        assert not torch.equal(want["params/fc1.weight"], before["params/fc1.weight"])
        assert any(
            not torch.equal(value, before[path])
            for path, value in want.items()
            if path.startswith("opt_state/")
        )
        assert int(want["rng"][1]) == worker.TOTAL
        if config.precision == "fp16":
            # after the split the scaler both skipped (backed off) and applied updates
            assert any(bool(m["skipped"]) for m in after_split)
            assert any(bool(m["applied"]) and not bool(m["skipped"]) for m in after_split)
        if config.accumulate == 3:
            assert int(before["accum/1"]) == config.split % 3
        if config.ema is not None:
            assert not torch.equal(want["ema/0/fc1.weight"], before["ema/0/fc1.weight"])
            assert int(want["ema/1"]) > int(before["ema/1"]) > 0
