"""Checkpoint I/O: medfunc's save_state / read_checkpoint / restore_state against bare
torch.save / torch.load of the same payload.

The state is an MLP whose parameters and AdamW moments take about 500 MB. Every operation runs
``--repeats`` times; the table shows the median and the best time and the throughput of the
median. Files go to ``--folder`` (default: a temporary folder on the same disk as /tmp); the OS
page cache is not dropped, so loads read from memory when the file was just written.

Usage:
    python benchmarks/checkpoint_io.py [--megabytes 500] [--repeats 5] [--folder DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import medfunc as mf
from medfunc.checkpoint import read_checkpoint, restore_state, save_state
from medfunc.state import tree_flatten

WIDTH = 2048


def make_state(megabytes: int) -> mf.TrainState:
    """An MLP state (params + AdamW moments, all float32) of about ``megabytes`` MB, after one
    update so the optimizer state is populated."""
    floats_per_layer = WIDTH * WIDTH * 3  # weight plus its two moments
    layers = max(1, round(megabytes * 2**20 / 4 / floats_per_layer))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    state = mf.init_state(model, mf.optim.adamw(1e-4), loss_fn=lambda out, batch: out.pow(2).mean())
    state, _ = mf.train_step(state, torch.randn(4, WIDTH), donate=True)
    return state


def state_bytes(state: mf.TrainState) -> int:
    """Bytes of all tensors in the state."""
    return sum(t.numel() * t.element_size() for t in tree_flatten(state)[0])


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def torch_save_fsync(payload: dict, path: Path) -> None:
    """torch.save followed by flush + fsync (the durability part of an atomic save)."""
    with open(path, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())


def run(megabytes: int, repeats: int, folder: Path) -> list[tuple[str, list[float], int]]:
    """Time every operation; return ``(name, times, bytes)`` rows."""
    state = make_state(megabytes)
    ours, bare = folder / "medfunc.pt", folder / "torch.pt"
    save_state(state, ours)
    payload = read_checkpoint(ours)
    size = ours.stat().st_size
    like = mf.init_state(state.module, state.tx, loss_fn=state.loss_fn)
    rows = [
        ("torch.save (no fsync)", timed(lambda: torch.save(payload, bare), repeats)),
        ("torch.save + fsync", timed(lambda: torch_save_fsync(payload, bare), repeats)),
        ("medfunc save_state", timed(lambda: save_state(state, ours), repeats)),
        ("torch.load", timed(lambda: torch.load(bare, weights_only=True), repeats)),
        (
            "torch.load(mmap=True)",
            timed(lambda: torch.load(bare, weights_only=True, mmap=True), repeats),
        ),
        ("medfunc read_checkpoint", timed(lambda: read_checkpoint(ours), repeats)),
        ("medfunc restore_state", timed(lambda: restore_state(ours, like), repeats)),
    ]
    print(f"state: {state_bytes(state) / 2**20:.0f} MiB in tensors, file {size / 2**20:.0f} MiB")
    return [(name, times, size) for name, times in rows]


def table(rows: list[tuple[str, list[float], int]]) -> str:
    """A Markdown table of the timings."""
    lines = [
        "| operation | median s | best s | MiB/s (median) |",
        "|---|---|---|---|",
    ]
    for name, times, size in rows:
        median = statistics.median(times)
        lines.append(f"| {name} | {median:.3f} | {min(times):.3f} | {size / 2**20 / median:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=500, help="approximate state size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None, help="where the files go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        rows = run(args.megabytes, args.repeats, Path(folder))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.repeats} repeats")
    print(table(rows))


if __name__ == "__main__":
    main()
