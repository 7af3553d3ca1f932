"""Worker for tests/distributed/test_distributed.py: DeepSpeed ZeRO-1 and ZeRO-2 on the CPU through
dist.deepspeed_step, with sharded (DeepSpeed) and full (medfunc) checkpoints. Writes results to
$MEDFUNC_TEST_OUT."""

from __future__ import annotations

import json

import torch
from dist_common import (
    STEPS,
    batches,
    end_worker,
    full_params,
    make_model,
    make_tx,
    out_dir,
    shard,
)

import medfunc as mf
from medfunc import distributed as dist

HALF = STEPS // 2


def build(stage: int) -> mf.TrainState:
    return dist.deepspeed_state(
        make_model(),
        make_tx(),
        {"zero_optimization": {"stage": stage}},
        max_grad_norm=0.5,
        micro_batch_size=4,
    )


def train(
    state: mf.TrainState, start: int, stop: int, rank: int, world: int, losses: list | None = None
) -> mf.TrainState:
    data = batches()
    for i in range(start, stop):
        state, metrics = dist.deepspeed_step(state, shard(data[i], rank, world))
        if losses is not None:
            losses.append(float(dist.all_reduce_mean(metrics["loss"])))
    return state


def _train_step_refused(state: mf.TrainState) -> bool:
    """mf.train_step on a DeepSpeed state names the step to use instead of running."""
    try:
        mf.train_step(state, batches()[0])
    except mf.ConfigError as e:
        return "deepspeed_step" in str(e)
    return False


def probe_loss(state: mf.TrainState) -> float:
    """The loss on the first global batch, averaged over ranks (no update)."""
    info = dist.get_info()
    metrics = mf.eval_step(state, shard(batches()[0], info.rank, info.world_size))
    return float(dist.all_reduce_mean(metrics["loss"]))


def main() -> None:
    info = dist.init(timeout_s=120)
    rank, world = info.rank, info.world_size
    out = out_dir()
    record: dict = {}
    for stage in (1, 2):
        state = build(stage)
        engine = dist.deepspeed_engine_of(state)
        record[f"zero{stage}_train_step_refused"] = _train_step_refused(state)
        record[f"zero{stage}_optimizer"] = type(engine.optimizer).__name__
        record[f"zero{stage}_stage"] = engine.zero_optimization_stage()
        before = probe_loss(state)
        losses: list[float] = []
        state = train(state, 0, HALF, rank, world, losses)
        if stage == 2:
            dist.save_sharded(state, out / "ds_sharded")
            dist.save_full(state, out / "ds_full.pt")
        state = train(state, HALF, STEPS, rank, world, losses)
        record[f"zero{stage}_probe"] = [before, probe_loss(state)]
        record[f"zero{stage}_losses"] = losses
        record[f"zero{stage}_step"] = int(state.step)
        torch.save(full_params(state), out / f"zero{stage}_rank{rank}.pt")

    for kind in ("sharded", "full"):
        fresh = build(2)
        if kind == "sharded":
            resumed = dist.load_sharded(out / "ds_sharded", like=fresh)
        else:
            resumed = dist.load_full(out / "ds_full.pt", like=fresh)
        record[f"{kind}_resume_step"] = int(resumed.step)
        resumed = train(resumed, HALF, STEPS, rank, world)
        torch.save(full_params(resumed), out / f"zero2_{kind}_resumed_rank{rank}.pt")

    (out / f"record_rank{rank}.json").write_text(json.dumps(record))
    dist.shutdown()


if __name__ == "__main__":
    main()
    end_worker()
