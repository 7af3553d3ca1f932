"""Compile time: ``compile_step(mf.train_step, mode="inductor")`` against ``torch.compile``.

Two ways to compile the same training step on the same model, measured side by side:

* ``torch``: ``torch.compile(model)`` for the forward/backward, ``clip_grad_norm_`` (foreach)
  and a compiled ``torch.optim.AdamW`` step (``torch.compile(opt.step)``, the LR a tensor that a
  ``LambdaLR`` warm-up updates in place, so LR changes do not recompile), weight decay 0.01 (not
  on biases and norms).
* ``medfunc``: ``mf.compile_step(mf.train_step, mode="inductor")`` on a state with
  ``chain(clip_by_global_norm(1.0), adamw(linear_warmup(...), weight_decay=0.01))``: forward,
  backward, clipping, the schedule and AdamW in one graph.

Each measurement runs in a fresh Python process with an empty inductor/Triton cache directory
(``TORCHINDUCTOR_CACHE_DIR``), so nothing compiled earlier is reused; imports, building the
model and the optimizer are not timed. Reported per runner: the first step's time (tracing and
compiling included), the second and third step's time (a recompile shows there), and the graphs
dynamo compiled over the three steps. Runners alternate, the order flipping per repeat; the
table shows medians over ``--repeats``. The target is ``medfunc / torch <= 1.2`` on the first
step.

Models: ``mlp`` (the step-throughput MLP, 30 -> 128 -> 128 -> 2, batch 64) and ``bert`` (a Hugging
Face ``BertForSequenceClassification`` with 2 layers, hidden size 32, 2 heads, intermediate size
64, vocabulary 1000, batch 8 x 32 tokens, dropout 0.1).

Usage:
    python benchmarks/compile_time.py --models mlp,bert --repeats 3
    python benchmarks/compile_time.py --models bert --repeats 1 --out compile.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from bench_models import MLP
from torch import nn

RUNNERS = ("torch", "medfunc")
MODELS = ("mlp", "bert")
STEPS = 3
LR = 1e-3
WARMUP_LR_STEPS = 10
TOTAL_LR_STEPS = 100_000


def _bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return transformers.BertForSequenceClassification(config)


def _batch(model: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if model == "mlp":
        return {
            "x": torch.randn(64, 30, generator=g),
            "labels": torch.randint(0, 2, (64,), generator=g),
        }
    ids = torch.randint(0, 1000, (8, 32), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (8,), generator=g),
    }


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return (MLP() if name == "mlp" else _bert()).train()


def _lr_factor(step: int) -> float:
    if step < WARMUP_LR_STEPS:
        return step / WARMUP_LR_STEPS
    return max(0.0, (TOTAL_LR_STEPS - step) / (TOTAL_LR_STEPS - WARMUP_LR_STEPS))


def _torch_step(model: nn.Module) -> Callable[[dict], None]:
    import medfunc as mf

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if mf.optim.default_decay_mask(name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=torch.tensor(LR), foreach=True, capturable=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor)
    forward = torch.compile(model)
    opt_step = torch.compile(opt.step)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: dict) -> None:
        out = forward(**batch)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt_step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def _medfunc_step(model: nn.Module) -> Callable[[dict], None]:
    import medfunc as mf

    schedule = mf.schedules.linear_warmup(LR, WARMUP_LR_STEPS, TOTAL_LR_STEPS)
    tx = mf.optim.chain(
        mf.optim.clip_by_global_norm(1.0), mf.optim.adamw(schedule, weight_decay=0.01)
    )
    box = {"state": mf.init_state(model, tx, seed=0)}
    fast = mf.compile_step(mf.train_step, mode="inductor")

    def step(batch: dict) -> None:
        box["state"], metrics = fast(box["state"], batch)
        float(metrics["loss"])

    return step


def measure(model: str, runner: str) -> dict:
    """One measurement in this process: seconds of each of the first ``STEPS`` steps and the
    graphs dynamo compiled."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    batch = _batch(model)
    step = (_torch_step if runner == "torch" else _medfunc_step)(_model(model))
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return {"times": times, "graphs": int(counters["stats"]["unique_graphs"])}


def _child(model: str, runner: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="compile_time_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_COMPILE_THREADS="1")
        out = subprocess.run(
            [sys.executable, __file__, "--child", model, runner],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    if out.returncode != 0:
        raise RuntimeError(f"{model}/{runner} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(results: dict, repeats: int, loads: tuple[float, float]) -> str:
    def med(runs: list[dict], i: int) -> float:
        return statistics.median(r["times"][i] for r in runs)

    lines = [
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores, 1 thread, inductor compile threads 1, cold cache, "
        f"1-minute load average {loads[0]:.2f} before the run, {loads[1]:.2f} after; "
        f"median of {repeats}.",
        "",
        "| model | torch: 1st step (s) | medfunc: 1st step (s) | ratio | torch: 2nd + 3rd (ms) "
        "| medfunc: 2nd + 3rd (ms) | graphs torch / medfunc |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for model, runs in results.items():
        t, m = runs["torch"], runs["medfunc"]
        first_t, first_m = med(t, 0), med(m, 0)
        rest_t = med(t, 1) + med(t, 2)
        rest_m = med(m, 1) + med(m, 2)
        graphs = f"{t[0]['graphs']} / {m[0]['graphs']}"
        lines.append(
            f"| {model} | {first_t:.1f} | {first_m:.1f} | {first_m / first_t:.2f}x "
            f"| {rest_t * 1e3:.1f} | {rest_m * 1e3:.1f} | {graphs} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,bert")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "RUNNER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    results: dict[str, dict[str, list]] = {m: {r: [] for r in RUNNERS} for m in models}
    load_before = os.getloadavg()[0]
    for model in models:
        for i in range(args.repeats):
            for runner in RUNNERS if i % 2 == 0 else RUNNERS[::-1]:
                res = _child(model, runner)
                results[model][runner].append(res)
                print(f"{model} {runner} #{i}: {res}", file=sys.stderr, flush=True)
    table = _table(results, args.repeats, (load_before, os.getloadavg()[0]))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
