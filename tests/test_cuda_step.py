"""The eager step and the Trainer on CUDA against PyTorch's own CUDA path.

Skipped without CUDA (run by benchmarks/gpu_check.sh): the fused CUDA optimizer kernels, fp16
loss scaling against ``torch.amp.GradScaler("cuda")``, bf16 autocast, and the Trainer with and
without ``compile``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyClassifier, gradscaler_step, make_batches, make_dataset

import medfunc as mf
from medfunc.rng import step_seed
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _model(**kwargs) -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(**kwargs).cuda()


def _cuda(batches):
    return [mf.data.to_device(b, "cuda") for b in batches]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_cuda_step_matches_the_imperative_fused_loop(precision):
    model = _model(dropout=0.3, batchnorm=True)
    reference = copy.deepcopy(model)
    tx = mf.optim.chain(
        mf.optim.clip_by_global_norm(1.0),
        mf.optim.adamw(1e-2, weight_decay=0.01, decay_mask=None, kernel="fused"),
    )
    state = mf.init_state(model, tx, seed=5, precision=precision)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    reference.train()
    for i, batch in enumerate(_cuda(make_batches(12, batch_size=32))):
        state, metrics = mf.train_step(state, batch)
        torch.manual_seed(step_seed(torch.tensor([5, i])))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = reference(**batch)["loss"]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-5)
        assert float(metrics["grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
    expected = dict(reference.named_parameters())
    for name, value in state.params.items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=1e-6)


def test_fp16_on_cuda_follows_gradscaler_including_skips():
    model = _model()
    reference = copy.deepcopy(model)
    policy = mf.get_policy("fp16", growth_interval=3, init_scale=2.0**10)
    state = mf.init_state(
        model, mf.optim.adamw(1e-2, kernel="fused", decay_mask=None), precision=policy
    )
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=3)
    batches = _cuda(make_batches(12))
    for i in (3, 7):
        bad = dict(batches[i])
        bad["x"] = bad["x"].clone()
        bad["x"][0, 0] = float("inf")
        batches[i] = bad
    skipped = []
    for batch in batches:
        state, metrics = mf.train_step(state, batch)
        gradscaler_step(reference, batch, opt, scaler, "cuda")
        assert float(metrics["loss_scale"]) == scaler.get_scale()
        skipped.append(bool(metrics["skipped"]))
    assert skipped == [i in (3, 7) for i in range(12)]
    assert int(state.step) == 10
    expected = dict(reference.named_parameters())
    for name, value in state.params.items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["cudagraph", "inductor+cudagraph"])
def test_trainer_on_cuda_compiled_equals_eager(tmp_path, mode):
    def run(compile_option, folder):
        torch.manual_seed(0)
        config = TrainerConfig(
            device="cuda",
            num_epochs=2,
            batch_size=16,
            learning_rate=1e-2,
            save_every_epochs=None,
            progress_bar=False,
            compile=compile_option,
            seed=3,
        )
        trainer = MedicalModelTrainer(TinyClassifier(dropout=0.2), config)
        trainer.train(make_dataset(64), make_dataset(32), output_dir=tmp_path / folder)
        return {n: p.detach().cpu() for n, p in trainer.model.named_parameters()}

    eager = run(False, "eager")
    compiled = run(mode, "compiled")
    for name, value in eager.items():
        if mode == "cudagraph":
            assert torch.equal(compiled[name], value), name
        else:
            torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5)
