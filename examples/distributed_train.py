"""Multi-process training of a breast-cancer classifier with DDP, FSDP2 or DeepSpeed ZeRO.

The loop is the single-process medfunc loop; only the line that builds the state changes with
the mode. Every rank trains on its own slice of each global batch and evaluates its slice of
the held-out set; the metrics are summed over ranks and printed by rank 0.

Run (CPU, two processes; see docs/distributed.md):
    torchrun --nproc_per_node=2 examples/distributed_train.py --mode ddp
    torchrun --nproc_per_node=2 examples/distributed_train.py --mode fsdp
    torchrun --nproc_per_node=2 examples/distributed_train.py --mode deepspeed --zero-stage 2
It also runs as a single process: python examples/distributed_train.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import medfunc as mf
from medfunc import distributed as dist
from medfunc.recipes.breast_cancer import MLPClassifier, make_splits

MAX_GRAD_NORM = 1.0


def build_state(mode: str, zero_stage: int, steps: int, device: torch.device) -> mf.TrainState:
    """The one line that differs between the modes."""
    torch.manual_seed(0)
    model = MLPClassifier(dropout=0.1)
    schedule = mf.schedules.linear_warmup(3e-3, max(1, steps // 10), steps)
    tx = mf.optim.chain(mf.optim.clip_by_global_norm(MAX_GRAD_NORM), mf.optim.adamw(schedule))
    if mode == "fsdp":
        return dist.fully_shard_state(model, tx)
    if mode == "deepspeed":
        return dist.deepspeed_state(
            model, tx, {"zero_optimization": {"stage": zero_stage}}, max_grad_norm=MAX_GRAD_NORM
        )
    return dist.data_parallel(mf.init_state(model, tx, device=device))


def evaluate(state: mf.TrainState, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Loss and accuracy over the whole held-out set (each rank scores its slice)."""
    rows = dist.shard_indices(len(y), drop_last=False)
    batch = {"features": x[rows.start : rows.stop], "labels": y[rows.start : rows.stop]}
    metrics = mf.eval_step(state, batch)
    logits = metrics["outputs"]["logits"]
    totals = dist.all_reduce_sum(
        {
            "loss": metrics["loss"].double() * len(rows),
            "correct": (logits.argmax(dim=1) == batch["labels"]).sum().double(),
            "seen": torch.tensor(float(len(rows)), dtype=torch.float64),
        }
    )
    return {
        "loss": float(totals["loss"] / totals["seen"]),
        "accuracy": float(totals["correct"] / totals["seen"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp", "deepspeed"], default="ddp")
    parser.add_argument("--zero-stage", type=int, choices=[1, 2], default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/distributed"))
    args = parser.parse_args()

    info = dist.init()
    splits = make_splits(seed=0)
    n = len(splits.y_train)
    steps_per_epoch = n // args.batch_size
    state = build_state(args.mode, args.zero_stage, args.epochs * steps_per_epoch, info.device)

    step = dist.step_for(state)  # deepspeed_step for a DeepSpeed state, else mf.train_step
    best, bad_epochs, history = float("inf"), 0, []
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for b in range(steps_per_epoch):
            rows = order[b * args.batch_size : (b + 1) * args.batch_size]
            part = dist.shard_indices(len(rows))
            mine = rows[part.start : part.stop]
            batch = {"features": splits.x_train[mine], "labels": splits.y_train[mine]}
            state, _ = step(state, mf.data.to_device(batch, info.device), donate=True)
        result = evaluate(state, splits.x_eval, splits.y_eval)
        history.append(result)
        if dist.is_main_process():
            print(
                f"epoch {epoch + 1}: eval loss {result['loss']:.4f}, "
                f"accuracy {result['accuracy']:.4f}",
                flush=True,
            )
        bad_epochs = 0 if result["loss"] < best else bad_epochs + 1
        best = min(best, result["loss"])
        if dist.agree(bad_epochs >= args.patience, op="any"):
            break

    checkpoint = dist.save_full(state, args.out / "final.pt", extra={"epoch": len(history)})
    if dist.is_main_process():
        print(
            json.dumps(
                {
                    "mode": args.mode,
                    "world_size": info.world_size,
                    "steps": int(state.step),
                    "checkpoint": str(checkpoint),
                    "eval": history[-1],
                }
            ),
            flush=True,
        )
    dist.shutdown()


if __name__ == "__main__":
    main()
