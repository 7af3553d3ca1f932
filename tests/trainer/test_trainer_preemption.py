"""SIGTERM and Ctrl-C stop the Trainer at a step boundary with a checkpoint that resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import torchrun_command

import medfunc as mf
from medfunc.checkpoint import read_checkpoint
from medfunc.errors import TrainingInterrupted
from medfunc.recipes.base import TensorDictDataset
from medfunc.trainer import MedicalModelTrainer

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "scripts" / "preempt_worker.py"
sys.path.insert(0, str(WORKER.parent))

import preempt_worker as worker  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class _SignallingDataset(TensorDictDataset):
    """The worker's examples; reading the ``at``-th one sends ``signum`` to this process."""

    def __init__(self, signum: int, at: int, repeat: int = 1) -> None:
        super().__init__(dict(worker.make_data().tensors))
        self.signum, self.at, self.repeat, self.reads = signum, at, repeat, 0

    def __getitem__(self, index: int) -> dict:
        self.reads += 1
        if self.reads == self.at:
            for _ in range(self.repeat):
                os.kill(os.getpid(), self.signum)
        return super().__getitem__(index)


def _train(out: Path, data=None, **options) -> MedicalModelTrainer:
    if isinstance(data, _SignallingDataset):  # it signals the process reading it: this one
        options.setdefault("num_workers", 0)
    trainer = MedicalModelTrainer(worker.make_model(), worker.make_config(**options))
    trainer.train(worker.make_data() if data is None else data, output_dir=out)
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    return dict(_train(tmp_path_factory.mktemp("full")).state.params)


def _assert_bitwise(params, expected) -> None:
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(params[name], value), name


def _resume(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    return dict(_train(out, resume_from=str(checkpoint)).state.params)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_in_flight_with_a_checkpoint_that_resumes_exactly(
    tmp_path, uninterrupted, signum, caplog
):
    previous = signal.getsignal(signum)
    out = tmp_path / "run"
    # the 10th example read belongs to the third batch (4 per batch): step 3 completes first
    with pytest.raises(TrainingInterrupted) as caught:
        _train(out, data=_SignallingDataset(signum, at=10))
    interrupted = caught.value
    assert isinstance(interrupted, KeyboardInterrupt)
    assert (interrupted.signum, interrupted.step) == (signum, 3)
    assert interrupted.exit_code == EXIT_CODES[signum]
    assert interrupted.checkpoint == out / "checkpoint-step3.pt"
    assert f"resume_from={str(interrupted.checkpoint)!r}" in str(interrupted)
    assert signal.Signals(signum).name in str(interrupted)
    assert str(interrupted) in caplog.text
    assert signal.getsignal(signum) is previous  # the handlers were restored
    saved = read_checkpoint(interrupted.checkpoint)["trainer_state"]
    assert (saved["global_step"], saved["batch_index"], saved["epoch"]) == (3, 3, 0)
    assert sorted(p.name for p in out.glob("*.pt")) == ["checkpoint-step3.pt"]

    _assert_bitwise(_resume(interrupted.checkpoint, out), uninterrupted)


def test_a_signal_during_an_epochs_last_step_stops_before_the_epoch_end_work(
    tmp_path, uninterrupted
):
    # the step is checkpointed at once; the resumed run closes the epoch (evaluation, saving)
    out = tmp_path / "run"
    steps = worker.EXAMPLES // worker.BATCH
    with pytest.raises(TrainingInterrupted) as caught:
        _train(out, data=_SignallingDataset(signal.SIGTERM, at=worker.EXAMPLES))
    assert caught.value.checkpoint == out / f"checkpoint-step{steps}.pt"
    assert read_checkpoint(caught.value.checkpoint)["trainer_state"]["batch_index"] == steps
    _assert_bitwise(_resume(caught.value.checkpoint, out), uninterrupted)


def test_repeated_signals_still_leave_one_complete_checkpoint(tmp_path, uninterrupted):
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as caught:
        _train(out, data=_SignallingDataset(signal.SIGINT, at=22, repeat=5))
    assert caught.value.step == 6
    _assert_bitwise(_resume(caught.value.checkpoint, out), uninterrupted)


def test_a_resumed_run_interrupted_before_its_first_step_points_at_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as first:
        _train(out, data=_SignallingDataset(signal.SIGTERM, at=10))
    # the resumed run reads its next batch (example 1 of batch 4) and is stopped after step 4
    with pytest.raises(TrainingInterrupted) as second:
        _train(
            out,
            data=_SignallingDataset(signal.SIGTERM, at=1),
            resume_from=str(first.value.checkpoint),
        )
    assert second.value.step == 4
    assert second.value.checkpoint == out / "checkpoint-step4.pt"


def test_handlers_are_installed_only_while_the_trainer_trains(tmp_path):
    seen = []

    class _Recording(worker.SlowClassifier):
        def forward(self, x, labels=None):
            seen.append(signal.getsignal(signal.SIGTERM))
            return super().forward(x, labels)

    torch.manual_seed(0)
    model = _Recording()
    before = signal.getsignal(signal.SIGTERM)
    MedicalModelTrainer(model, worker.make_config(num_epochs=1)).train(
        worker.make_data(), output_dir=tmp_path / "run"
    )
    assert seen and all(handler is not before for handler in seen)
    assert signal.getsignal(signal.SIGTERM) is before

    seen.clear()
    state = mf.init_state(model, mf.optim.sgd(0.1))
    mf.train_step(state, worker.make_data()[0:4])
    assert seen == [before]  # the functional step installs nothing


def test_training_in_a_thread_installs_no_handler(tmp_path):
    errors = []

    def run() -> None:
        try:
            _train(tmp_path / "run", num_epochs=1)
        except BaseException as err:  # noqa: BLE001 - reported to the main thread
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == []


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before training started: {err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training did not start")
        time.sleep(0.01)


def _started_worker(out: Path, marker: Path, **popen: object) -> subprocess.Popen:
    """The preemption worker training into ``out``, returned once its first forward pass began
    (it writes ``marker`` then sleeps 0.3 s in that step)."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), "--sleep", "0.3", "--marker", str(marker)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    _wait_for(marker, proc)
    return proc


def _signal_run(proc: subprocess.Popen, signum: int, repeat: int) -> tuple[int, str]:
    for _ in range(repeat):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            break
        time.sleep(0.005)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def _checkpoint_named_in(stderr: str) -> Path:
    line = next(line for line in stderr.splitlines() if "resume_from=" in line)
    return Path(line.rsplit("resume_from=", 1)[1].strip(")"))


@pytest.mark.parametrize(
    ("signum", "repeat"),
    [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGTERM, 10), (signal.SIGINT, 10)],
)
def test_a_signalled_process_exits_with_its_code_and_resumes_bitwise(
    tmp_path, uninterrupted, signum, repeat
):
    # the marker is written as a forward pass starts: the burst of signals (within ~60 ms) ends
    # while that step still sleeps, before the handlers are restored
    out, marker = tmp_path / "run", tmp_path / "started"
    proc = _started_worker(out, marker)
    code, stderr = _signal_run(proc, signum, repeat)

    assert code == EXIT_CODES[signum], stderr[-3000:]
    assert "Traceback" not in stderr
    assert ("received again" in stderr) == (repeat > 1)
    checkpoint = _checkpoint_named_in(stderr)
    assert [p.name for p in out.glob("*.pt")] == [checkpoint.name]
    assert not list(out.glob(".*tmp*"))
    step = read_checkpoint(checkpoint)["trainer_state"]["global_step"]
    assert 1 <= step < worker.EPOCHS * worker.EXAMPLES // worker.BATCH
    _assert_bitwise(_resume(checkpoint, out), uninterrupted)


def test_a_sigterm_to_the_whole_process_group_leaves_the_loader_workers_running(
    tmp_path, uninterrupted
):
    # as a scheduler signals every process of a job: the DataLoader workers (num_workers=2)
    # ignore it and the trainer stops at the step boundary
    out, marker = tmp_path / "run", tmp_path / "started"
    proc = _started_worker(out, marker, start_new_session=True)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr
    checkpoint = _checkpoint_named_in(stderr)
    _assert_bitwise(_resume(checkpoint, out), uninterrupted)


def test_the_cli_exits_with_143_on_sigterm_and_names_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medfunc.cli", "train", "--output-dir", str(out)]
        + ["--set", "num_epochs=1000", "--set", "log_every=1", "--set", "save_every_epochs=0"]
        + ["--set", "enable_tensorboard=false", "--set", "progress_bar=false"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(out / "metrics.jsonl", proc)
    code, stderr = _signal_run(proc, signal.SIGTERM, 1)
    assert code == 143, stderr[-3000:]
    checkpoint = _checkpoint_named_in(stderr)
    assert checkpoint.is_file()
    assert "Traceback" not in stderr
    assert read_checkpoint(checkpoint)["trainer_state"]["run"]["recipe"] == "breast_cancer"


def _torchrun(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        torchrun_command(WORKER, str(out), *extra),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_ranks_stop_at_the_same_step_on_sigterm_and_resume_bitwise(tmp_path):
    full = tmp_path / "full"
    code, stderr = _signal_run(_torchrun(full), signal.SIGTERM, 0)
    assert code == 0, stderr[-3000:]
    expected = torch.load(full / "params.pt", weights_only=True)

    out, marker = tmp_path / "run", tmp_path / "started"
    proc = _torchrun(out, "--sleep", "0.15", "--marker", str(marker))
    _wait_for(marker, proc)
    code, stderr = _signal_run(proc, signal.SIGTERM, 1)  # torchrun forwards it to both ranks
    assert code != 0
    checkpoints = list(out.glob("checkpoint-*.pt"))
    assert len(checkpoints) == 1, stderr[-3000:]
    saved = read_checkpoint(checkpoints[0])["trainer_state"]
    assert 1 <= saved["global_step"] < worker.EPOCHS * worker.EXAMPLES // (2 * worker.BATCH)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == saved["global_step"]

    code, stderr = _signal_run(_torchrun(out, "--resume", str(checkpoints[0])), signal.SIGTERM, 0)
    assert code == 0, stderr[-3000:]
    _assert_bitwise(torch.load(out / "params.pt", weights_only=True), expected)
