"""Worker for tests/distributed/test_distributed.py: DDP, the DeepSpeed fallback, helpers and
FSDP2 with checkpoints, all in one torchrun launch. Writes results to $MEDFUNC_TEST_OUT."""

from __future__ import annotations

import json
import sys
import warnings

import torch
from dist_common import (
    STEPS,
    accumulate_run,
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
from medfunc.errors import DistributedError


def train(state: mf.TrainState, start: int, stop: int, rank: int, world: int) -> mf.TrainState:
    data = batches()
    for i in range(start, stop):
        state, _ = mf.train_step(state, shard(data[i], rank, world), donate=True)
    return state


def helpers(rank: int) -> dict:
    sums = dist.all_reduce_sum({"a": torch.tensor(rank + 1.0), "n": torch.tensor(rank + 1)})
    means = dist.all_reduce_mean(torch.tensor([rank * 2.0, 1.0]))
    return {
        "any": dist.agree(rank == 1, op="any"),
        "all": dist.agree(rank == 1, op="all"),
        "sum_a": float(sums["a"]),
        "sum_n": int(sums["n"]),
        "mean": means.tolist(),
        "broadcast": dist.broadcast_object({"from": rank}),
        "gathered": dist.all_gather_object(rank * 10),
        "is_main": dist.is_main_process(),
    }


def main() -> None:
    info = dist.init(timeout_s=60)
    rank, world = info.rank, info.world_size
    out = out_dir()
    record: dict = {"world": world, "helpers": helpers(rank)}

    ddp = dist.data_parallel(mf.init_state(make_model(), make_tx()), debug=True)
    ddp = train(ddp, 0, STEPS, rank, world)
    torch.save(full_params(ddp), out / f"ddp_rank{rank}.pt")

    with torch.no_grad():
        if rank == 1:
            next(iter(ddp.params.values())).add_(1e-3)
    try:
        dist.check_in_sync(ddp)
        record["diverged_error"] = None
    except DistributedError as err:
        record["diverged_error"] = str(err)

    for kind in ("ddp", "fsdp"):
        model, tx = make_model(), make_tx()
        if kind == "ddp":
            accum = dist.data_parallel(mf.init_state(model, tx, accumulate_steps=2))
        else:
            accum = dist.fully_shard_state(model, tx, accumulate_steps=2)
        accum = accumulate_run(accum, rank, world)
        record[f"{kind}_accumulate_step"] = int(accum.step)
        torch.save(full_params(accum), out / f"{kind}_accumulate_rank{rank}.pt")

    sys.modules["deepspeed"] = None  # the import now fails: the fallback path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = dist.deepspeed_state(make_model(), make_tx())
    record["fallback_warnings"] = [str(w.message) for w in caught]
    record["fallback_has_grad_sync"] = (
        fallback.grad_path is not None and fallback.grad_path.name == "data_parallel"
    )
    fallback = train(fallback, 0, STEPS, rank, world)
    torch.save(full_params(fallback), out / f"fallback_rank{rank}.pt")

    fsdp = dist.fully_shard_state(make_model(), make_tx())
    record["fsdp_param_types"] = sorted({type(p).__name__ for p in fsdp.params.values()})
    fsdp = train(fsdp, 0, STEPS // 2, rank, world)
    dist.save_full(fsdp, out / "fsdp_full.pt")
    dist.save_sharded(fsdp, out / "fsdp_sharded")
    fsdp = train(fsdp, STEPS // 2, STEPS, rank, world)
    torch.save(full_params(fsdp), out / f"fsdp_rank{rank}.pt")

    resumed = dist.load_sharded(
        out / "fsdp_sharded", like=dist.fully_shard_state(make_model(), make_tx())
    )
    record["sharded_resume_step"] = int(resumed.step)
    resumed = train(resumed, STEPS // 2, STEPS, rank, world)
    torch.save(full_params(resumed), out / f"fsdp_sharded_resumed_rank{rank}.pt")

    resumed = dist.load_full(
        out / "fsdp_full.pt", like=dist.fully_shard_state(make_model(), make_tx())
    )
    record["full_resume_step"] = int(resumed.step)
    resumed = train(resumed, STEPS // 2, STEPS, rank, world)
    torch.save(full_params(resumed), out / f"fsdp_full_resumed_rank{rank}.pt")

    (out / f"record_rank{rank}.json").write_text(json.dumps(record))
    dist.shutdown()


if __name__ == "__main__":
    main()
    end_worker()
