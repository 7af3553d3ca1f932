"""The Trainer facade under a real 2-process torchrun (gloo): DDP, rank-0 outputs, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, torchrun_command
from safetensors.torch import load_file

from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer, TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = dict(
    num_epochs=1,
    learning_rate=0.05,
    eval_batch_size=5,
    log_every=2,
    device="cpu",
    enable_tensorboard=True,
    progress_bar=False,
    eval_metric="auroc",
    seed=3,
)

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import TinyClassifier
    from medfunc import distributed
    from medfunc.distributed.checkpoint import gather_full_state
    from medfunc.recipes.base import TensorDictDataset
    from medfunc.trainer import MedicalModelTrainer, TrainerConfig

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 6, generator=g)
        labels = (x[:, 0] + torch.randn(n, generator=g) > 0).long()
        return TensorDictDataset({{"x": x, "labels": labels}})

    torch.manual_seed(0)
    model = TinyClassifier(classes=2)
    config = TrainerConfig(batch_size=4, **{options!r})
    trainer = MedicalModelTrainer(model, config)
    result = trainer.train(data(48, 0), data(37, 1), output_dir={out!r})
    rank = distributed.rank()
    sharded = config.fsdp or config.deepspeed
    full = gather_full_state(trainer.state) if sharded else trainer.state
    record = {{"world": distributed.world_size(), "history": result.history,
              "evaluate": trainer.evaluate(data(37, 1)),
              "params": {{n: p.tolist() for n, p in full.params.items()}}}}
    with open({out!r} + f"/../rank{{rank}}.json", "w") as handle:
        json.dump(record, handle)
    from conftest import end_worker
    end_worker()
""")


def _data(n: int, seed: int) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    labels = (x[:, 0] + torch.randn(n, generator=g) > 0).long()
    return TensorDictDataset({"x": x, "labels": labels})


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process training on the global batch (2 ranks x 4 examples)."""
    torch.manual_seed(0)
    options = {**OPTIONS, "enable_tensorboard": False}
    trainer = MedicalModelTrainer(TinyClassifier(classes=2), TrainerConfig(batch_size=8, **options))
    trainer.train(_data(48, 0), _data(37, 1), output_dir=tmp_path_factory.mktemp("single"))
    return trainer.state.params


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "deepspeed"])
def test_two_process_training_writes_once_and_reduces_metrics_over_all_ranks(
    tmp_path, single_process, mode
):
    out = tmp_path / "run"
    script = tmp_path / "train.py"
    options = {**OPTIONS, "fsdp": mode == "fsdp", "deepspeed": mode == "deepspeed"}
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), options=options, out=str(out)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        torchrun_command(script),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert sorted(p.name for p in out.glob("*.pt")) == ["checkpoint-epoch1.pt"]
    assert len(list((out / "tb_logs").glob("events.out.tfevents.*"))) == 1
    assert not list(out.glob(".*tmp*"))

    # the replicas agree, and equal one process training on the global batch
    assert ranks[0]["params"] == ranks[1]["params"]
    for name, value in single_process.items():
        torch.testing.assert_close(
            torch.tensor(ranks[0]["params"][name]), value, rtol=0, atol=1e-6, msg=name
        )

    # metrics over the whole eval set, gathered from both ranks, equal one process's metrics
    # of the same (rank-0 saved) weights
    model = TinyClassifier(classes=2)
    model.load_state_dict(load_file(out / "model.safetensors"))
    reference = MedicalModelTrainer(model, TrainerConfig(**OPTIONS)).evaluate(_data(37, 1))
    for record in ranks:
        assert record["evaluate"].keys() == reference.keys()
        for key, value in reference.items():
            assert record["evaluate"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert record["history"][-1]["auroc"] == pytest.approx(reference["auroc"], abs=1e-9)
