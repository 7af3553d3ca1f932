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
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import medfunc as mf  # noqa: E402
from medfunc.compile import compile_step  # noqa: E402

STARTED = time.perf_counter()
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
PEAK_TFLOPS = (
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
)


# ---------------------------------------------------------------------------------------------
# models


class MLP(nn.Module):
    """A small classifier: 30 features -> 128 -> 128 -> 2, ReLU, dropout 0.1."""

    def __init__(self, features: int = 30, hidden: int = 128, classes: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.drop(F.relu(self.fc1(x)))
        logits = self.head(F.relu(self.fc2(h)))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class SdpaBlock(nn.Module):
    """A post-norm transformer encoder block (BERT's layout) with fused SDPA attention."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=1e-12)
        self.ffn_in = nn.Linear(dim, ffn)
        self.ffn_out = nn.Linear(ffn, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = self.attn_norm(x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d))))
        return self.ffn_norm(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))


class SdpaBert(nn.Module):
    """A BERT-shaped sequence classifier built from :class:`SdpaBlock` (no Hugging Face)."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        layers: int,
        heads: int,
        ffn: int,
        max_len: int = 512,
        classes: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.emb_norm = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SdpaBlock(dim, heads, ffn, dropout) for _ in range(layers))
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.emb_norm(self.tok(input_ids) + self.pos(positions)))
        mask = attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            x = block(x, mask)
        logits = self.classifier(self.drop(torch.tanh(self.pooler(x[:, 0]))))
        return {"loss": F.cross_entropy(logits.float(), labels), "logits": logits}


@dataclass
class ModelSpec:
    """One benchmark model: how to build it, its batch, precision and peak LR."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], dict[str, torch.Tensor]]
    precision: str
    lr: float
    shape: str
    tokens: int
    notes: list[str] = field(default_factory=list)


def _text_batch(
    batch_size: int, seq: int, vocab: int, classes: int | None
) -> Callable[[torch.device], dict[str, torch.Tensor]]:
    def make(device: torch.device) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch_size, seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch["labels"] = (
            torch.randint(0, classes, (batch_size,), generator=g) if classes else ids.clone()
        )
        return {k: v.to(device) for k, v in batch.items()}

    return make


def model_specs(device: torch.device) -> dict[str, ModelSpec]:
    """The benchmark models; transformer sizes are scaled down on the CPU."""
    cuda = device.type == "cuda"
    low = "bf16" if cuda else "fp32"
    specs: dict[str, ModelSpec] = {}

    def mlp_batch(dev: torch.device) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {
            "x": torch.randn(64, 30, generator=g).to(dev),
            "labels": torch.randint(0, 2, (64,), generator=g).to(dev),
        }

    specs["mlp"] = ModelSpec("mlp", MLP, mlp_batch, "fp32", 1e-3, "64 x 30, fp32", 64)

    if cuda:
        bert = {"dim": 768, "layers": 12, "heads": 12, "ffn": 3072}
        bsz, seq, bert_note = 32, 128, []
    else:
        bert = {"dim": 256, "layers": 4, "heads": 4, "ffn": 1024}
        bsz, seq = 8, 128
        bert_note = ["CPU: scaled down to 4 layers x 256 hidden, batch 8 x 128"]
    shape = f"{bsz} x {seq}, {low}"

    def bert_hf() -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            hidden_size=bert["dim"],
            num_hidden_layers=bert["layers"],
            num_attention_heads=bert["heads"],
            intermediate_size=bert["ffn"],
            num_labels=2,
        )
        return BertForSequenceClassification(config)

    def bert_sdpa() -> nn.Module:
        return SdpaBert(30522, bert["dim"], bert["layers"], bert["heads"], bert["ffn"])

    for name, build in (("bert-hf", bert_hf), ("bert-sdpa", bert_sdpa)):
        specs[name] = ModelSpec(
            name,
            build,
            _text_batch(bsz, seq, 30522, 2),
            low,
            5e-5,
            shape,
            bsz * seq,
            list(bert_note),
        )

    if cuda:
        gpt = {"n_layer": 12, "n_embd": 768, "n_head": 12}
        gbsz, gseq, gpt_note = 16, 1024, []
    else:
        gpt = {"n_layer": 2, "n_embd": 256, "n_head": 4}
        gbsz, gseq = 2, 256
        gpt_note = ["CPU: scaled down to 2 layers x 256 hidden, batch 2 x 256"]

    def gpt2() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_positions=max(gseq, 1024), **gpt))

    specs["gpt2"] = ModelSpec(
        "gpt2",
        gpt2,
        _text_batch(gbsz, gseq, 50257, None),
        low,
        6e-4,
        f"{gbsz} x {gseq}, {low}",
        gbsz * gseq,
        list(gpt_note),
    )
    return specs


def expand_models(names: str) -> list[str]:
    """``mlp,bert,gpt2`` -> model keys (``bert`` stands for both BERT variants)."""
    out: list[str] = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        out.extend(["bert-hf", "bert-sdpa"] if name == "bert" else [name])
    return out


# ---------------------------------------------------------------------------------------------
# runners


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


# ---------------------------------------------------------------------------------------------
# measurement helpers


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# ---------------------------------------------------------------------------------------------
# the benchmark


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
        help="comma-separated: mlp, bert (= bert-hf and bert-sdpa), bert-hf, bert-sdpa, gpt2",
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
