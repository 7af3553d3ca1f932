"""The step-throughput benchmark's runners: one training loop each (plain PyTorch, medfunc in
every mode, the Hugging Face Trainer, Lightning), set up once and then run for N steps."""

from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_models import ModelSpec  # noqa: E402

import medfunc as mf  # noqa: E402
from medfunc.compile import compile_step  # noqa: E402

CLOCK = {"now": time.perf_counter}


def now() -> float:
    """The benchmark's clock: wall time (default) or this process's CPU time (``--clock cpu``)."""
    return CLOCK["now"]()


WARMUP_LR_STEPS = 10
TOTAL_LR_STEPS = 100_000
RUNNERS = (  # in priority order: with --time-budget, later runners are the first to go
    "plain",
    "medfunc",
    "plain-cudagraph",
    "medfunc-cudagraph",
    "medfunc-inductor+cudagraph",
    "hf-trainer",
    "plain-compile",
    "medfunc-inductor",
    "lightning",
)
# Libraries a runner imports, loaded before a memory probe's baseline (import is not training).
PROBE_PREIMPORTS = {
    "hf-trainer": ("transformers.trainer", "accelerate"),
    "lightning": ("lightning",),
}
CUDA_ONLY = {"plain-cudagraph", "medfunc-cudagraph", "medfunc-inductor+cudagraph"}
COMPILED = {"plain-compile", "medfunc-inductor", "medfunc-inductor+cudagraph"}
# Dense peak TFLOP/s (bf16 tensor cores, fp32 without TF32) by card-name substring.


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lr_factor(step: int) -> float:
    if step < WARMUP_LR_STEPS:
        return step / WARMUP_LR_STEPS
    return max(0.0, (TOTAL_LR_STEPS - step) / (TOTAL_LR_STEPS - WARMUP_LR_STEPS))


def _loss_of(out: Any) -> torch.Tensor:
    return out["loss"] if isinstance(out, Mapping) else out.loss


def _param_groups(model: nn.Module, weight_decay: float = 0.01) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if mf.optim.default_decay_mask(name) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _autocast(spec: ModelSpec, device: torch.device) -> contextlib.AbstractContextManager:
    if spec.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _build(spec: ModelSpec, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return spec.build().to(device).train()


class Runner:
    """Set up once (model, optimizer, warm-up), then run steps."""

    note = ""

    def __init__(self, spec: ModelSpec, device: torch.device, batch: dict) -> None:
        self.spec = spec
        self.device = device
        self.batch = batch
        self.i = 0

    def setup(self, warmup: int) -> None:
        raise NotImplementedError

    def run(self, steps: int) -> None:
        raise NotImplementedError

    def timed(self, steps: int) -> float:
        """Run ``steps`` steps; milliseconds per step."""
        sync(self.device)
        start = now()
        self.run(steps)
        sync(self.device)
        return (now() - start) / steps * 1e3


class PlainRunner(Runner):
    compile_model = False

    def setup(self, warmup: int) -> None:
        self.model = _build(self.spec, self.device)
        self.forward = torch.compile(self.model) if self.compile_model else self.model
        kernel = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.AdamW(_param_groups(self.model), lr=self.spec.lr, **kernel)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_factor)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.run(warmup)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            with _autocast(self.spec, self.device):
                loss = _loss_of(self.forward(**self.batch))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)


class PlainCompileRunner(PlainRunner):
    compile_model = True


class PlainCudaGraphRunner(Runner):
    """The whole imperative step captured by hand, as the PyTorch CUDA-graph docs show."""

    def setup(self, warmup: int) -> None:
        self.model = _build(self.spec, self.device)
        self.lr = torch.tensor(0.0, device=self.device)
        groups = _param_groups(self.model)
        self.opt = torch.optim.AdamW(groups, lr=self.lr, fused=True, capturable=True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.static = {k: v.clone() for k, v in self.batch.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(torch.cuda.default_generators[self.device.index or 0])
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self._step()
        self.run(warmup)

    def _step(self) -> None:
        with _autocast(self.spec, self.device):
            loss = _loss_of(self.model(**self.static))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()

    def run(self, steps: int) -> None:
        for _ in range(steps):
            for k, v in self.batch.items():
                self.static[k].copy_(v, non_blocking=True)
            self.lr.fill_(self.spec.lr * _lr_factor(self.i))
            self.graph.replay()
            self.i += 1


class MedfuncRunner(Runner):
    mode: str | None = None

    def setup(self, warmup: int) -> None:
        model = _build(self.spec, self.device)
        schedule = mf.schedules.linear_warmup(self.spec.lr, WARMUP_LR_STEPS, TOTAL_LR_STEPS)
        tx = mf.optim.chain(
            mf.optim.clip_by_global_norm(1.0), mf.optim.adamw(schedule, weight_decay=0.01)
        )
        self.state = mf.init_state(model, tx, precision=self.spec.precision, seed=0)
        self.step_fn = (
            mf.train_step if self.mode is None else compile_step(mf.train_step, mode=self.mode)
        )
        self.run(warmup)
        if self.mode is not None:
            self.note = _compiled_note(self.step_fn.stats)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.state, _ = self.step_fn(self.state, self.batch, donate=True)


def _compiled_note(stats: Any) -> str:
    parts = []
    if stats.whole_step_compiled is False:
        parts.append("update eager (whole step not traceable)")
    if stats.captures:
        parts.append(f"{stats.captures} graph(s), {stats.replays} replays")
    return "; ".join(parts)


class MedfuncInductor(MedfuncRunner):
    mode = "inductor"


class MedfuncCudaGraph(MedfuncRunner):
    mode = "cudagraph"


class MedfuncInductorCudaGraph(MedfuncRunner):
    mode = "inductor+cudagraph"


class HFTrainerRunner(Runner):
    """``transformers.Trainer`` over the benchmark batch's examples (a fresh Trainer per repeat,
    sharing one model)."""

    note = "per-step median inside trainer.train(), includes its data loading"

    def setup(self, warmup: int) -> None:
        self.model = _build(self.spec, self.device)
        batch = {k: v.cpu() for k, v in self.batch.items()}
        self.size = len(next(iter(batch.values())))
        self.examples = [{k: v[i] for k, v in batch.items()} for i in range(self.size)]
        self.warmup = warmup
        self.tmp = tempfile.TemporaryDirectory()
        self.timed(1)

    def timed(self, steps: int) -> float:
        from transformers import Trainer, TrainerCallback, TrainingArguments
        from transformers.trainer_callback import PrinterCallback

        stamps: list[float] = []
        device = self.device

        class Stamp(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                sync(device)
                stamps.append(now())

        max_steps = self.warmup + steps
        args = TrainingArguments(
            output_dir=self.tmp.name,
            max_steps=max_steps,
            per_device_train_batch_size=self.size,
            learning_rate=self.spec.lr,
            weight_decay=0.01,
            warmup_steps=WARMUP_LR_STEPS,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            bf16=self.spec.precision == "bf16",
            use_cpu=self.device.type == "cpu",
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=self.model,
            args=args,
            train_dataset=_Repeat(self.examples, max_steps + 1),
            callbacks=[Stamp()],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        deltas = [b - a for a, b in zip(stamps[self.warmup :], stamps[self.warmup + 1 :])]
        return statistics.median(deltas) * 1e3 if deltas else float("nan")


class LightningRunner(Runner):
    """A ``LightningModule`` around the model, fit by ``lightning.Trainer`` (a fresh Trainer per
    repeat, sharing one module), timed like :class:`HFTrainerRunner`."""

    note = "per-step median inside trainer.fit(), includes its data loading; foreach AdamW"

    def setup(self, warmup: int) -> None:
        import logging

        import lightning

        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
        net = _build(self.spec, self.device)
        spec = self.spec

        class Module(lightning.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
                return _loss_of(self.net(**batch))

            def configure_optimizers(self) -> dict:
                # foreach, not fused: Lightning refuses gradient clipping with fused AdamW
                # under mixed precision (the fused kernel unscales internally).
                opt = torch.optim.AdamW(_param_groups(self.net), lr=spec.lr, foreach=True)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        self.module = Module()
        batch = {k: v.cpu() for k, v in self.batch.items()}
        self.size = len(next(iter(batch.values())))
        self.examples = [{k: v[i] for k, v in batch.items()} for i in range(self.size)]
        self.warmup = warmup
        self.timed(1)

    def timed(self, steps: int) -> float:
        import lightning

        stamps: list[float] = []
        device = self.device

        class Stamp(lightning.Callback):
            def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
                sync(device)
                stamps.append(now())

        max_steps = self.warmup + steps
        trainer = lightning.Trainer(
            max_steps=max_steps,
            accelerator=self.device.type,
            devices=1,
            precision="bf16-mixed" if self.spec.precision == "bf16" else "32-true",
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Stamp()],
        )
        loader = torch.utils.data.DataLoader(
            _Repeat(self.examples, max_steps + 1), batch_size=self.size, num_workers=0
        )
        trainer.fit(self.module, loader)
        deltas = [b - a for a, b in zip(stamps[self.warmup :], stamps[self.warmup + 1 :])]
        return statistics.median(deltas) * 1e3 if deltas else float("nan")


class _Repeat(torch.utils.data.Dataset):
    """The benchmark batch's examples, repeated ``times`` times (a map-style dataset)."""

    def __init__(self, examples: list[dict], times: int) -> None:
        self.examples = examples
        self.times = times

    def __len__(self) -> int:
        return len(self.examples) * self.times

    def __getitem__(self, i: int) -> dict:
        return self.examples[i % len(self.examples)]


RUNNER_CLASSES: dict[str, type[Runner]] = {
    "plain": PlainRunner,
    "plain-compile": PlainCompileRunner,
    "plain-cudagraph": PlainCudaGraphRunner,
    "medfunc": MedfuncRunner,
    "medfunc-inductor": MedfuncInductor,
    "medfunc-cudagraph": MedfuncCudaGraph,
    "medfunc-inductor+cudagraph": MedfuncInductorCudaGraph,
    "hf-trainer": HFTrainerRunner,
    "lightning": LightningRunner,
}


def skip_reason(runner: str, device: torch.device) -> str | None:
    """Why ``runner`` cannot run here (None when it can)."""
    if runner in CUDA_ONLY and device.type != "cuda":
        return "CUDA only"
    needs = {"lightning": ("lightning",), "hf-trainer": ("transformers", "accelerate")}
    for module in needs.get(runner, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            return f"skipped: {module} is not importable"
    return None
