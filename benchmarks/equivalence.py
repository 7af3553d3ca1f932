"""How far each compile_step mode is from the eager train_step, measured.

Trains the same model from the same state for ``--steps`` steps with ``mf.train_step`` and with
``mf.compile_step(mf.train_step, mode=...)`` for every mode the device supports, and prints the
largest absolute and relative parameter difference, the largest loss difference, and whether the
parameters, optimizer state and metrics are bitwise equal. docs/performance.md quotes these figures
as the tolerance of each mode.

Usage:
    python benchmarks/equivalence.py --device cuda --steps 20 --out equivalence.md
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import optree
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_models import MLP, SdpaBert  # noqa: E402

import medfunc as mf  # noqa: E402
from medfunc.compile import MODES, compile_step  # noqa: E402


def _cases(device: torch.device) -> dict[str, tuple[Callable, Callable, str]]:
    """name -> (build model, make batch i, precision)."""

    def mlp_batch(i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {
            "x": torch.randn(64, 30, generator=g).to(device),
            "labels": torch.randint(0, 2, (64,), generator=g).to(device),
        }

    def bert_batch(i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 1000, (8, 64), generator=g)
        return {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (8,), generator=g).to(device),
        }

    def bert() -> torch.nn.Module:
        return SdpaBert(1000, 128, 2, 4, 512, max_len=64)

    low = "bf16" if device.type == "cuda" else "fp32"
    cases = {
        "mlp (fp32)": (MLP, mlp_batch, "fp32"),
        f"sdpa-bert 2x128 ({low})": (bert, bert_batch, low),
    }
    if device.type == "cuda":
        cases["sdpa-bert 2x128 (fp16)"] = (bert, bert_batch, "fp16")
    return cases


def _state(build: Callable, precision: str, device: torch.device) -> mf.TrainState:
    torch.manual_seed(0)
    model = build().to(device)
    tx = mf.optim.chain(
        mf.optim.clip_by_global_norm(1.0),
        mf.optim.adamw(mf.schedules.linear_warmup(1e-3, 5, 1000), weight_decay=0.01),
    )
    return mf.init_state(model, tx, precision=precision, seed=0)


def _trees(state: mf.TrainState) -> list[torch.Tensor]:
    leaves = optree.tree_leaves(
        {"params": state.params, "opt_state": state.opt_state}, namespace="medfunc"
    )
    return [t.detach().float().cpu() for t in leaves if isinstance(t, torch.Tensor)]


def compare(device: torch.device, steps: int, modes: list[str]) -> list[dict]:
    """One row per (case, mode): the measured distance from the eager step after ``steps``."""
    rows = []
    for name, (build, batch, precision) in _cases(device).items():
        eager = _state(build, precision, device)
        losses = []
        for i in range(steps):
            eager, m = mf.train_step(eager, batch(i), donate=True)
            losses.append(float(m["loss"]))
        reference = _trees(eager)
        ref_params = [t.detach().float().cpu() for t in eager.params.values()]
        for mode in modes:
            fast = compile_step(mf.train_step, mode=mode)
            state = _state(build, precision, device)
            mode_losses = []
            for i in range(steps):
                state, m = fast(state, batch(i))
                mode_losses.append(float(m["loss"]))
            params = [t.detach().float().cpu() for t in state.params.values()]
            diffs = [(a - b).abs().max().item() for a, b in zip(params, ref_params)]
            rel = [
                ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                for a, b in zip(params, ref_params)
            ]
            bitwise = all(torch.equal(a, b) for a, b in zip(_trees(state), reference))
            rows.append(
                {
                    "case": name,
                    "mode": mode,
                    "max_abs": max(diffs),
                    "max_rel": max(rel),
                    "loss": max(abs(a - b) for a, b in zip(mode_losses, losses)),
                    "bitwise": bitwise and mode_losses == losses,
                }
            )
            print(rows[-1], flush=True)
            del fast, state
    return rows


def table(rows: list[dict], steps: int) -> str:
    """Markdown table of :func:`compare`'s rows."""
    out = [
        f"Distance from the eager `train_step` after {steps} steps (AdamW + clipping, dropout on):",
        "",
        "| model (precision) | mode | max abs param diff | max rel param diff | max loss diff "
        "| bitwise |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['mode']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | "
            f"{r['loss']:.2e} | {'yes' if r['bitwise'] else 'no'} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--modes", default=None, help="comma-separated modes (default: all the device has)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    modes = (
        args.modes.split(",")
        if args.modes
        else (list(MODES) if device.type == "cuda" else ["inductor"])
    )
    text = table(compare(device, args.steps, modes), args.steps)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
