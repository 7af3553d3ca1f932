"""Sharded checkpoints under FSDP2: ``mf.distributed.save_sharded`` / ``load_sharded`` against
``torch.distributed.checkpoint`` saving and loading the same model the way PyTorch documents it
(``get_state_dict`` / ``set_state_dict`` of an FSDP2 model and its ``torch.optim.AdamW``).

Both sides shard the same MLP of ``Linear(2048, 2048)`` layers with ``fully_shard`` on every rank
and hold AdamW moments (one optimizer step before timing), so the files hold the same tensors:
parameters, ``exp_avg``, ``exp_avg_sq`` and the step. Each round saves a new folder with each
side, then loads each side's folder into its own state; the rounds alternate the order of the
two sides. Rank 0 prints the median and best time of every operation and the ratio of the
medians (medfunc / torch) measured in the same run. Folders go to ``--folder`` (default: a
temporary folder on the disk of /tmp); loads read from the OS page cache (each folder has just
been written).

Usage (launches itself with torchrun on 2 processes, gloo on CPU):
    python benchmarks/sharded_checkpoint_io.py [--mib 480] [--repeats 5] [--folder DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

WIDTH = 2048
MIB = 2**20


def _model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers)))


def _layers_for(mib: int) -> int:
    """Layers whose parameters and two AdamW moments take about ``mib`` MiB in fp32."""
    per_layer = 3 * (WIDTH * WIDTH + WIDTH) * 4
    return max(1, round(mib * MIB / per_layer))


def _batch() -> torch.Tensor:
    return torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1))


def _medfunc_side(layers: int) -> tuple[Callable[[Path], None], Callable[[Path], None]]:
    import medfunc as mf

    state = mf.distributed.fully_shard_state(
        _model(layers), mf.optim.adamw(1e-3), loss_fn=lambda out, batch: out.square().mean()
    )
    state, _ = mf.train_step(state, _batch())
    holder = {"state": state}

    def save(folder: Path) -> None:
        mf.distributed.save_sharded(holder["state"], folder)

    def load(folder: Path) -> None:
        holder["state"] = mf.distributed.load_sharded(folder, like=holder["state"])

    return save, load


def _torch_side(layers: int) -> tuple[Callable[[Path], None], Callable[[Path], None]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    model = _model(layers)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    model(_batch()).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()

    def save(folder: Path) -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))

    def load(folder: Path) -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    return save, load


def _timed(fn: Callable[[Path], None], folder: Path) -> float:
    torch.distributed.barrier()
    start = time.perf_counter()
    fn(folder)
    torch.distributed.barrier()
    return time.perf_counter() - start


def _worker(args: argparse.Namespace) -> None:
    import medfunc as mf

    info = mf.distributed.init(timeout_s=600)
    torch.set_num_threads(1)
    layers = _layers_for(args.mib)
    sides = {"medfunc": _medfunc_side(layers), "torch DCP": _torch_side(layers)}
    times: dict[tuple[str, str], list[float]] = {}
    root = Path(args.folder)
    for round_ in range(args.repeats):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for name in order:
            save, load = sides[name]
            folder = root / f"{name.split()[0]}-{round_}"
            times.setdefault((name, "save"), []).append(_timed(save, folder))
            times.setdefault((name, "load"), []).append(_timed(load, folder))
            torch.distributed.barrier()
            if info.rank == 0:
                shutil.rmtree(folder)
    if info.rank == 0:
        _print_table(times, layers, info.world_size, args)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _print_table(
    times: dict[tuple[str, str], list[float]], layers: int, world: int, args: argparse.Namespace
) -> None:
    size = 3 * layers * (WIDTH * WIDTH + WIDTH) * 4 / MIB
    print(
        f"FSDP2 sharded checkpoint, {world} ranks (gloo, CPU), {layers} x Linear({WIDTH}, "
        f"{WIDTH}) + AdamW moments = {size:.0f} MiB, {args.repeats} rounds, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print("| operation | medfunc median (best) s | torch DCP median (best) s | ratio |")
    print("|---|---|---|---|")
    for op in ("save", "load"):
        ours, theirs = times[("medfunc", op)], times[("torch DCP", op)]
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(
            f"| {op} | {statistics.median(ours):.3f} ({min(ours):.3f}) | "
            f"{statistics.median(theirs):.3f} ({min(theirs):.3f}) | {ratio:.2f}x |"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={_free_port()}", __file__, "--worker", "--mib", str(args.mib),
            "--repeats", str(args.repeats), "--folder", args.folder or tmp,
        ]  # fmt: skip
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
