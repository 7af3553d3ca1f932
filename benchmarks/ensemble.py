"""Ensemble step throughput: K members in one vectorised step against K sequential steps.

Both runners train K = 8 copies of the benchmark MLP (``bench_models.MLP``: 30 -> 128 -> 128 -> 2,
dropout 0.1, batch 64 x 30, fp32) with AdamW, clipping at 1.0 and a constant LR, each member
initialised from its own seed:

* ``sequential``: K states, one ``mf.train_step(state, batch, donate=True)`` per member.
* ``vectorised``: one stacked state, ``mf.ensemble.train_step(state, batch, donate=True)``.

Timing: each repeat runs ``--steps`` steps of both runners in turn (interleaved, the order
alternating per repeat); the table shows the median time per ensemble step (all K members)
over repeats, and the sequential/vectorised ratio. On CUDA the device is synchronised before
each clock read.

Usage:
    python benchmarks/ensemble.py --device cpu --threads 1
    python benchmarks/ensemble.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import MLP  # noqa: E402

import medfunc as mf  # noqa: E402


def _batch(device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(64, 30, generator=g).to(device),
        "labels": torch.randint(0, 2, (64,), generator=g).to(device),
    }


def _runners(members: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """Zero-argument callables that each run one ensemble step (all members)."""
    tx = mf.optim.chain(mf.optim.clip_by_global_norm(1.0), mf.optim.adamw(1e-3))
    batch = _batch(device)
    states = [mf.init_state(MLP, tx, seed=s, device=device) for s in range(members)]
    stacked = [mf.ensemble.init_state(MLP, tx, members=members, device=device)]

    def sequential() -> None:
        for k, state in enumerate(states):
            states[k], _ = mf.train_step(state, batch, donate=True)

    def vectorised() -> None:
        stacked[0], _ = mf.ensemble.train_step(stacked[0], batch, donate=True, per_member=False)

    return {"sequential": sequential, "vectorised": vectorised}


def _time(run: Callable[[], None], steps: int, device: torch.device) -> float:
    """Milliseconds per call over ``steps`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    runners = _runners(args.members, device)
    for run in runners.values():
        _time(run, args.warmup, device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(args.repeats):
        order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
        for name in order:
            times[name].append(_time(runners[name], args.steps, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    where = (
        f"{device.type}, {torch.get_num_threads()} threads"
        if device.type == "cpu"
        else str(torch.cuda.get_device_name(device))
    )
    print(
        f"K = {args.members} MLP members (64 x 30, fp32), AdamW + clipping; {where}; "
        f"torch {torch.__version__}; median of {args.repeats} x {args.steps} steps"
    )
    print("| runner | ms per ensemble step | ms per member |")
    print("|---|---|---|")
    for name, ms in median.items():
        print(f"| {name} | {ms:.3f} | {ms / args.members:.3f} |")
    print(f"speed-up (sequential / vectorised): {median['sequential'] / median['vectorised']:.2f}x")


if __name__ == "__main__":
    main()
