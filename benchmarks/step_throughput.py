"""Training-step throughput: medfunc's step against plain PyTorch loops and the HF Trainer.

Every runner trains the same model (same init, same batch, dropout on) with AdamW, weight decay
0.01 (not on biases and norms), global-norm clipping at 1.0 and a linear-warmup LR schedule:

* ``plain``: an imperative loop (``loss.backward()``, ``clip_grad_norm_``, ``opt.step()``,
  ``sched.step()``, ``zero_grad(set_to_none=True)``); foreach AdamW on the CPU, fused on CUDA.
* ``plain-compile``: the same loop around ``torch.compile(model)``.
* ``plain-cudagraph`` (CUDA): the same step captured by hand in one CUDA graph (capturable fused
  AdamW, LR in a device tensor, static batch buffers), replayed per step.
* ``medfunc``: ``mf.train_step(state, batch, donate=True)``.
* ``medfunc-inductor`` / ``medfunc-cudagraph`` / ``medfunc-inductor+cudagraph``:
  ``mf.compile_step(mf.train_step, mode=...)``.
* ``hf-trainer``: ``transformers.Trainer`` (its defaults: fused AdamW, linear schedule, clipping
  at 1.0), timed from inside ``trainer.train()`` by a callback: the per-step time is the median
  difference of consecutive ``on_step_end`` timestamps after the warm-up steps (CUDA: the
  callback synchronizes first). It includes the Trainer's own data loading and collation of
  the same examples; ``train()``'s setup is not counted.
* ``lightning``: the model in a ``LightningModule`` fit by ``lightning.Trainer`` (same optimizer,
  schedule and clipping), timed like the HF Trainer; skipped with a note when ``lightning`` is
  not importable (likewise the HF Trainer without ``accelerate``).

Timing: all runners of a model are set up (and warmed up/compiled) first; then each repeat runs
``--steps`` steps of every runner in turn (interleaved, the order rotating per repeat) and the
table shows the median over repeats. Memory: on CUDA the runner's own allocations (its
persistent tensors after setup plus its peak increase during the timed steps,
``torch.cuda.max_memory_allocated``); on the CPU the peak RSS growth of a fresh subprocess that
runs only that runner (``/proc/self/clear_refs`` resets the high-water mark after setup, so
compilation is not counted). MFU (CUDA): FLOPs of one forward+backward counted by
``torch.utils.flop_counter.FlopCounterMode`` divided by step time and the card's dense peak.

Usage:
    python benchmarks/step_throughput.py --device cpu --models mlp,bert --steps 30 --repeats 5
    python benchmarks/step_throughput.py --device cuda --out results.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from bench_models import ModelSpec, expand_models, model_specs
from bench_runners import (
    CLOCK,
    COMPILED,
    PROBE_PREIMPORTS,
    RUNNER_CLASSES,
    RUNNERS,
    Runner,
    _autocast,
    _build,
    _loss_of,
    skip_reason,
    sync,
)

STARTED = time.perf_counter()
# Dense peak TFLOP/s (bf16 tensor cores, fp32 without TF32) by card-name substring.
PEAK_TFLOPS = (
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
)


def cuda_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


LAUNCH_EVENTS = {
    "graph": ("cudaGraphLaunch",),
    "kernel": ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"),
    "copy": ("cudaMemcpyAsync", "cudaMemsetAsync"),
}


def launches_per_step(r: Runner, steps: int = 4) -> str:
    """CUDA launches per step, counted by the profiler over ``steps`` steps of ``r``.

    The evidence that a CUDA-graph runner replays one graph: its row reads ``1 graph`` with no
    (or only a few host-side) kernel launches, where an eager runner launches hundreds.
    """
    from torch.profiler import ProfilerActivity, profile

    sync(r.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r.run(steps)
        sync(r.device)
    counts = dict.fromkeys(LAUNCH_EVENTS, 0)
    for event in prof.key_averages():
        for kind, names in LAUNCH_EVENTS.items():
            if event.key in names:
                counts[kind] += event.count
    return ", ".join(f"{counts[k] / steps:g} {k}" for k in LAUNCH_EVENTS)


def flops_per_step(spec: ModelSpec, device: torch.device, batch: dict) -> float:
    """FLOPs of one forward+backward, counted with ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _build(spec, device)
    counter = FlopCounterMode(display=False)
    with counter, _autocast(spec, device):
        _loss_of(model(**batch)).backward()
    del model
    return float(counter.get_total_flops())


def peak_flops(device: torch.device, precision: str, override: float | None) -> float | None:
    """The card's dense peak FLOP/s for ``precision`` (None when unknown)."""
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in name:
            return (bf16 if precision == "bf16" else fp32) * 1e12
    return None


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def probe_cpu_memory(model: str, runner: str, steps: int, warmup: int) -> dict:
    """In this (fresh) process: peak RSS growth while ``runner`` trains ``model`` on the CPU."""
    device = torch.device("cpu")
    spec = model_specs(device)[model]
    batch = spec.batch(device)
    for module in PROBE_PREIMPORTS.get(runner, ()) + ("torch._dynamo", "torch.optim.lr_scheduler"):
        importlib.import_module(module)
    gc.collect()
    before = _rss_kib("VmRSS")
    r = RUNNER_CLASSES[runner](spec, device, batch)
    r.setup(warmup)
    method = "clear_refs"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        method = "ru_maxrss"
    r.timed(steps)
    peak = (
        _rss_kib("VmHWM")
        if method == "clear_refs"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    return {"peak_mib": (peak - before) / 1024, "method": method}


def cpu_memory(model: str, runner: str, steps: int, warmup: int, threads: int) -> float | None:
    """Run :func:`probe_cpu_memory` in a subprocess; MiB (None on failure)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--probe-memory",
        f"{model}:{runner}",
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--threads",
        str(threads),
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


@dataclass
class Result:
    model: str
    runner: str
    ms: float | None = None
    mem_mib: float | None = None
    mfu: float | None = None
    launches: str = ""
    note: str = ""


def bench_model(
    spec: ModelSpec, runners: list[str], device: torch.device, args: argparse.Namespace
) -> list[Result]:
    """Set up every runner, time them interleaved, measure memory."""
    batch = spec.batch(device)
    results: dict[str, Result] = {}
    live: dict[str, Runner] = {}
    persistent: dict[str, int] = {}
    for name in runners:
        reason = skip_reason(name, device)
        if not reason and args.time_budget and time.perf_counter() - STARTED > args.time_budget:
            reason = f"skipped: past --time-budget {args.time_budget:.0f} s"
        if reason:
            results[name] = Result(spec.name, name, note=reason)
            continue
        gc.collect()  # a failed runner's tensors must not be freed inside the next one's setup
        before = cuda_allocated(device)
        r = RUNNER_CLASSES[name](spec, device, batch)
        t0 = time.perf_counter()
        try:
            r.setup(args.warmup)
        except ImportError as e:
            results[name] = Result(spec.name, name, note=f"skipped: {e}")
            continue
        except Exception as e:  # a runner that cannot run here is reported, not fatal
            results[name] = Result(
                spec.name,
                name,
                note=f"failed: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:120] if str(e) else ''}",
            )
            continue
        sync(device)
        persistent[name] = cuda_allocated(device) - before
        live[name] = r
        results[name] = Result(spec.name, name, note=r.note)
        print(f"  setup {spec.name}/{name}: {time.perf_counter() - t0:.1f} s", flush=True)

    times: dict[str, list[float]] = {name: [] for name in live}
    transient: dict[str, int] = dict.fromkeys(live, 0)
    order = list(live)
    for rep in range(args.repeats):
        if rep and args.time_budget and time.perf_counter() - STARTED > args.time_budget:
            for name in live:
                results[name].note = f"only {rep} repeat(s) within --time-budget"
            break
        shift = rep % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            if name not in live:
                continue
            r = live[name]
            if device.type == "cuda":
                sync(device)
                start = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            try:
                times[name].append(r.timed(args.steps))
            except Exception as e:  # reported in the table, the other runners go on
                results[name].note = f"failed while timing: {type(e).__name__}: {e}"[:160]
                del live[name]
                order.remove(name)
                continue
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                transient[name] = max(transient[name], peak - start)

    flops = None
    peak = peak_flops(device, spec.precision, args.peak_tflops)
    if peak and live:
        with contextlib.suppress(Exception):
            flops = flops_per_step(spec, device, batch)
    for name, r in live.items():
        res = results[name]
        res.ms = statistics.median(times[name]) if times[name] else None
        res.note = r.note or res.note
        if device.type == "cuda":
            mem = persistent[name] + transient[name]
            # negative: the runner freed memory it did not allocate (Lightning's teardown)
            res.mem_mib = mem / 2**20 if mem >= 0 else None
        elif args.memory == "all" or (args.memory == "eager" and name not in COMPILED):
            res.mem_mib = cpu_memory(spec.name, name, args.steps, args.warmup, args.threads)
        if flops and peak and res.ms:
            res.mfu = flops / (res.ms / 1e3) / peak
        if device.type == "cuda" and args.launches and type(r).timed is Runner.timed:
            try:
                res.launches = launches_per_step(r)
            except Exception as e:  # the profiler is evidence, not the benchmark
                res.launches = f"not counted: {type(e).__name__}"
    live.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [results[name] for name in runners]


def environment(device: torch.device) -> str:
    """One line naming the machine, torch version and date."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        machine = (
            f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}, "
            f"load average {load})"
        )
    return (
        f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{datetime.date.today().isoformat()}"
    )


def table(results: list[Result], specs: dict[str, ModelSpec]) -> str:
    """Markdown table: ms/step, ratio to ``plain``, memory, MFU, notes."""
    rows = [
        "| model | shape | runner | ms/step | x plain | peak mem (MiB) | MFU | launches/step "
        "| notes |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    base = {r.model: r.ms for r in results if r.runner == "plain" and r.ms}
    for r in results:
        ms = f"{r.ms:.3f}" if r.ms is not None and not math.isnan(r.ms) else "-"
        ratio = f"{r.ms / base[r.model]:.2f}" if r.ms and base.get(r.model) else "-"
        mem = f"{r.mem_mib:.1f}" if r.mem_mib is not None else "-"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        notes = "; ".join(filter(None, [r.note, *specs[r.model].notes]))
        rows.append(
            f"| {r.model} | {specs[r.model].shape} | {r.runner} | {ms} | {ratio} | "
            f"{mem} | {mfu} | {r.launches or '-'} | {notes} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--models",
        default="mlp,bert,gpt2",
        help=(
            "comma-separated: mlp, mlp-wide, bert (= bert-hf and bert-sdpa), bert-hf, "
            "bert-sdpa, gpt2"
        ),
    )
    p.add_argument(
        "--runners",
        default=",".join(RUNNERS),
        help=f"comma-separated subset of {', '.join(RUNNERS)}",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per repeat (default 20 on the CPU, 50 on CUDA)",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after setup")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (robust on a CPU shared with other jobs; "
        "counts all of the process's threads)",
    )
    p.add_argument(
        "--memory",
        choices=["all", "eager", "off"],
        default="eager",
        help="CPU memory probes (fresh subprocess per runner): all runners, the "
        "uncompiled ones, or none; CUDA always measures",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense peak TFLOP/s for MFU (default: from the card's name)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds after which runners not yet set up are skipped (noted in the table)",
    )
    p.add_argument(
        "--launches",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: count graph/kernel launches per step with the profiler (after timing)",
    )
    p.add_argument("--out", default=None, help="write the markdown table to this file")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 50 if args.device == "cuda" else 20
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.clock == "cpu":
        CLOCK["now"] = time.process_time
    if args.probe_memory:
        model, runner = args.probe_memory.split(":")
        print(json.dumps(probe_cpu_memory(model, runner, args.steps, args.warmup)))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    specs = model_specs(device)
    models = expand_models(args.models)
    unknown = [m for m in models if m not in specs]
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    bad = [r for r in runners if r not in RUNNERS]
    if unknown or bad:
        print(f"error: unknown models {unknown} / runners {bad}", file=sys.stderr)
        return 2
    if "plain" not in runners:
        runners.insert(0, "plain")
    header = environment(device)
    print(f"# step throughput: {header}", flush=True)
    results: list[Result] = []
    clock = "wall-clock" if args.clock == "wall" else "process CPU time"
    text = f"{header}: no models\n"
    for model in models:
        print(f"{model}:", flush=True)
        results.extend(bench_model(specs[model], runners, device, args))
        text = (
            f"{header}; {clock}, median of {args.repeats} interleaved repeats of {args.steps} "
            f"steps after {args.warmup} warm-up steps\n\n{table(results, specs)}\n"
        )
        if args.out:  # rewritten after each model, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
