"""Checkpoint I/O: medfunc's save_state / read_checkpoint / restore_state against bare
torch.save / torch.load of the same payload, in time and in peak memory.

The state is an MLP of ``Linear(2048, 2048)`` layers whose parameters and AdamW moments take
about ``--sizes`` MiB (several sizes in one run). Every operation runs ``--repeats`` times, each
time in a fresh Python process that first builds what the operation needs (the state to save,
or the ``like`` state to restore into) and warms up on a tiny checkpoint; the rounds go through
the operations in turn, so a slower moment of the machine hits all of them alike. The table
shows the median and best wall-clock time, the throughput of the median, the ratio of the
median to the torch baseline of the same run (``torch.save`` + fsync for saving, ``torch.load``
for reading and restoring) and the peak extra memory.

Peak extra memory is the growth of the process's resident set (``VmHWM`` in /proc/self/status,
reset with /proc/self/clear_refs after the set-up) during the operation, minus what the operation
returns (a loaded payload or restored state, which ``torch.load`` allocates alike); the largest
over the repeats. ``restore_state(..., donate=True)`` returns no new bytes (the restored state's
tensors are the ``like`` state's, built in the set-up), so its peak extra is the whole growth.
It covers torch storage, which tracemalloc does not see, and no page cache.

``torch.load`` reads the checkpoint medfunc wrote (a plain ``torch.load`` of it works), so both
read the same bytes. Saves write a new file each (as a run saving ``step-N.pt`` does). Files go
to ``--folder`` (default: a temporary folder on the same disk as /tmp); before every load the
file is read once, so all loads read it from the OS page cache, not from the disk.

Usage:
    python benchmarks/checkpoint_io.py [--sizes 480 4096] [--repeats 5] [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import medfunc as mf
from medfunc.checkpoint import read_checkpoint, restore_state, save_state
from medfunc.checkpoint.payload import build_payload
from medfunc.state import tree_flatten

WIDTH = 2048
MIB = 2**20

#: operation -> the torch baseline its ratio is taken against (None: a baseline or informative).
OPERATIONS: dict[str, str | None] = {
    "torch.save (no fsync)": None,
    "torch.save + fsync": None,
    "medfunc save_state": "torch.save + fsync",
    "torch.load(weights_only=True)": None,
    "torch.load(weights_only=True, mmap=True) (lazy, reads nothing yet)": None,
    "torch.load(weights_only=True) beside a held like state": None,
    "medfunc read_checkpoint": "torch.load(weights_only=True)",
    "medfunc restore_state(path, like=...)": "torch.load(weights_only=True)",
    "medfunc restore_state(path, like=..., donate=True)": "torch.load(weights_only=True)",
}


def _model(megabytes: int) -> torch.nn.Module:
    floats_per_layer = WIDTH * WIDTH * 3  # weight plus its two moments
    layers = max(1, round(megabytes * MIB / 4 / floats_per_layer))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def _loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return out.pow(2).mean()


def make_like(megabytes: int) -> mf.TrainState:
    """A fresh state of the benchmark's model (what a resuming run restores into).

    Args:
        megabytes: the approximate size of parameters plus AdamW moments.

    Returns:
        ``init_state`` of the MLP with AdamW (zero moments).
    """
    return mf.init_state(_model(megabytes), mf.optim.adamw(1e-4), loss_fn=_loss)


def make_state(megabytes: int) -> mf.TrainState:
    """An MLP state (params + AdamW moments, all float32) of about ``megabytes`` MB, after one
    update so the optimizer state is populated.

    Args:
        megabytes: the approximate size of parameters plus AdamW moments.

    Returns:
        The trained state.
    """
    state, _ = mf.train_step(make_like(megabytes), torch.randn(4, WIDTH), donate=True)
    return state


def tensor_bytes(value: Any) -> int:
    """Bytes of the distinct storages of the tensors in ``value`` (a state or a payload).

    Args:
        value: a TrainState, a tensor, or dicts/lists/tuples of them and plain values.

    Returns:
        The sum of the storages' sizes, each storage once.
    """
    storages: dict[int, int] = {}

    def visit(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, mf.TrainState):
            for leaf in tree_flatten(item)[0]:
                visit(leaf)
        elif isinstance(item, dict):
            for v in item.values():
                visit(v)
        elif isinstance(item, (list, tuple)):
            for v in item:
                visit(v)

    visit(value)
    return sum(storages.values())


def torch_save_fsync(payload: dict, path: Path) -> None:
    """torch.save followed by flush + fsync (the durability part of an atomic save).

    Args:
        payload: what to save.
        path: the file.
    """
    with open(path, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS


def _warm_up(folder: Path) -> None:
    """One tiny save and load of every kind, so one-off costs (imports, first calls) are paid."""
    tiny = mf.init_state(torch.nn.Linear(8, 8), mf.optim.adamw(1e-4), loss_fn=_loss)
    tiny, _ = mf.train_step(tiny, torch.randn(2, 8))
    path = save_state(tiny, folder / "warm-up.pt")
    torch_save_fsync(build_payload(tiny, {}, True, True), folder / "warm-up-torch.pt")
    torch.load(path, weights_only=True)
    torch.load(path, weights_only=True, mmap=True)
    restore_state(read_checkpoint(path), like=tiny)
    restore_state(path, like=tiny)
    restore_state(path, like=tiny, donate=True)


def _setup(operation: str, megabytes: int, folder: Path) -> Callable[[], Any]:
    """Build what ``operation`` needs; return it as a call without arguments."""
    ours = folder / "medfunc.pt"
    written = folder / "written.pt"  # saves create a new file, as a run saving step-N.pt does
    if operation.startswith("torch.save"):
        payload = build_payload(make_state(megabytes), {}, True, True)
        if operation == "torch.save + fsync":
            return lambda: torch_save_fsync(payload, written)
        return lambda: torch.save(payload, written)
    if operation == "medfunc save_state":
        state = make_state(megabytes)
        return lambda: save_state(state, written)
    if operation == "torch.load(weights_only=True)":
        return lambda: torch.load(ours, weights_only=True)
    if operation.startswith("torch.load(weights_only=True, mmap=True)"):
        return lambda: torch.load(ours, weights_only=True, mmap=True)
    if operation == "torch.load(weights_only=True) beside a held like state":
        held = make_like(megabytes)  # the memory a resuming process holds, as restore_state's
        return lambda: (held, torch.load(ours, weights_only=True))[1]
    if operation == "medfunc read_checkpoint":
        return lambda: read_checkpoint(ours)
    like = make_like(megabytes)
    donate = operation.endswith("donate=True)")
    return lambda: restore_state(ours, like=like, donate=donate)


def child(operation: str, megabytes: int, folder: Path) -> dict[str, float]:
    """Run ``operation`` once in this (fresh) process and measure it.

    Args:
        operation: a key of :data:`OPERATIONS`, or ``prepare`` (write the checkpoint the loads
            read).
        megabytes: the state's approximate size.
        folder: where the checkpoint files are.

    Returns:
        ``seconds``, ``extra`` (peak resident growth minus the bytes the operation returned);
        for ``prepare`` the ``state``'s bytes.
    """
    if operation == "prepare":
        state = make_state(megabytes)
        save_state(state, folder / "medfunc.pt")
        return {"state": tensor_bytes(state)}
    _warm_up(folder)
    run = _setup(operation, megabytes, folder)
    _reset_peak()
    before = _memory()["VmRSS"]
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = _memory()["VmHWM"]
    # mapped: no memory yet; donated: the bytes are the like state's, there before the reset
    kept = 0 if "mmap=True" in operation or "donate=True" in operation else tensor_bytes(result)
    return {"seconds": seconds, "extra": peak - before - kept}


def _warm_page_cache(path: Path) -> None:
    """Read ``path`` once, so that a load after it reads from memory, not from the disk (a saved
    file may have left the page cache when later saves and the set-up of a process filled it)."""
    with open(path, "rb", buffering=0) as handle:
        while handle.read(1 << 24):
            pass


def _spawn(operation: str, megabytes: int, folder: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", operation, "--sizes", str(megabytes)]
    command += ["--folder", str(folder)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(megabytes: int, repeats: int, folder: Path) -> dict[str, Any]:
    """Time and measure every operation at one size, ``repeats`` fresh processes each.

    Args:
        megabytes: the state's approximate size.
        repeats: processes per operation.
        folder: where the files go.

    Returns:
        ``rows`` (operation -> list of measurements), ``state`` and ``file`` bytes, the load
        averages before and after.
    """
    # the checkpoint is written by a process of its own: memory this one kept from building the
    # state would crowd the page cache and the measured processes
    path = folder / "medfunc.pt"
    state_size = _spawn("prepare", megabytes, folder)["state"]
    load_before = os.getloadavg()
    rows: dict[str, list[dict[str, float]]] = {op: [] for op in OPERATIONS}
    for _ in range(repeats):
        for operation in OPERATIONS:
            if "save" not in operation:
                _warm_page_cache(path)
            rows[operation].append(_spawn(operation, megabytes, folder))
            (folder / "written.pt").unlink(missing_ok=True)
    return {
        "rows": rows,
        "state": state_size,
        "file": path.stat().st_size,
        "load": (load_before, os.getloadavg()),
    }


def table(result: dict[str, Any]) -> str:
    """A Markdown table of one size's measurements.

    Args:
        result: what :func:`run` returned.

    Returns:
        The table.
    """
    rows, size, state_size = result["rows"], result["file"], result["state"]
    medians = {op: statistics.median(m["seconds"] for m in ms) for op, ms in rows.items()}
    lines = [
        "| operation | median s | best s | MiB/s (median) | vs torch (median) "
        "| peak extra MiB | peak extra / state |",
        "|---|---|---|---|---|---|---|",
    ]
    for op, measurements in rows.items():
        median = medians[op]
        best = min(m["seconds"] for m in measurements)
        extra = max(m["extra"] for m in measurements)
        baseline = OPERATIONS[op]
        if baseline:
            ratio = f"{median / medians[baseline]:.2f}x"
        else:
            ratio = "baseline" if op in OPERATIONS.values() else "-"
        lines.append(
            f"| {op} | {median:.3f} | {best:.3f} | {size / MIB / median:.0f} | {ratio} "
            f"| {extra / MIB:.0f} | {100 * extra / state_size:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[480], help="state sizes, MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None, help="where the files go")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.sizes[0], args.folder)))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.repeats} repeats")
    for megabytes in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.folder) as folder:
            result = run(megabytes, args.repeats, Path(folder))
        (before, after) = result["load"]
        print(
            f"\nstate: {result['state'] / MIB:.0f} MiB in tensors, file "
            f"{result['file'] / MIB:.0f} MiB; load average before {before[0]:.2f} / "
            f"{before[1]:.2f} / {before[2]:.2f}, after {after[0]:.2f} / {after[1]:.2f} / "
            f"{after[2]:.2f}"
        )
        print(table(result), flush=True)


if __name__ == "__main__":
    main()
