"""model_versioning: every weights save also keeps model.v{N}.safetensors and lists it in
manifest.json; versions count up across resumed runs and are never overwritten."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import TinyClassifier, make_dataset
from safetensors.torch import load_file

from medfunc.errors import ConfigError
from medfunc.trainer import MedicalModelTrainer, TrainerConfig
from medfunc.versioning import read_manifest, record_version


def _trainer(**options) -> MedicalModelTrainer:
    torch.manual_seed(0)
    base = dict(device="cpu", progress_bar=False, batch_size=8, num_workers=0, shuffle=False)
    return MedicalModelTrainer(TinyClassifier(), TrainerConfig(**{**base, **options}))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_run_adds_a_version_and_never_overwrites_one(tmp_path):
    assert TrainerConfig().model_versioning is True  # the original's default
    _trainer(num_epochs=1).train(make_dataset(16), output_dir=tmp_path)
    first = tmp_path / "model.v1.safetensors"
    assert first.read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    first_bytes = first.read_bytes()

    resume = str(tmp_path / "checkpoint-epoch1.pt")
    _trainer(num_epochs=2, resume_from=resume).train(make_dataset(16), output_dir=tmp_path)
    second = tmp_path / "model.v2.safetensors"
    assert first.read_bytes() == first_bytes  # version 1 is kept as it was
    assert second.read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    assert second.read_bytes() != first_bytes  # trained one more epoch

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["latest"] == 2
    entries = manifest["versions"]
    assert [(e["version"], e["file"], e["epoch"], e["step"]) for e in entries] == [
        (1, "model.v1.safetensors", 1, 2),
        (2, "model.v2.safetensors", 2, 4),
    ]
    for entry in entries:
        path = tmp_path / entry["file"]
        assert entry["sha256"] == _sha256(path) and entry["bytes"] == path.stat().st_size
        assert entry["time"].endswith("+00:00")
    loaded = load_file(first)
    assert sorted(loaded) == sorted(TinyClassifier().state_dict())


def test_versioning_off_writes_no_versions(tmp_path):
    _trainer(num_epochs=1, model_versioning=False).train(make_dataset(16), output_dir=tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("model.v*")) and not (tmp_path / "manifest.json").exists()


def test_a_version_file_outside_the_manifest_is_skipped_not_overwritten(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights-1")
    assert record_version(weights, epoch=1, step=5)["version"] == 1
    stray = tmp_path / "model.v3.safetensors"  # e.g. left by a save that crashed mid-way
    stray.write_bytes(b"stray")
    weights.write_bytes(b"weights-2")
    entry = record_version(weights, epoch=2, step=10)
    assert entry["file"] == "model.v4.safetensors"
    assert stray.read_bytes() == b"stray"
    assert (tmp_path / "model.v4.safetensors").read_bytes() == b"weights-2"
    assert [v["version"] for v in read_manifest(tmp_path)["versions"]] == [1, 4]
    assert not list(tmp_path.glob(".*tmp*"))


def test_the_original_trainers_manifest_is_kept_and_numbered_after(tmp_path):
    (tmp_path / "manifest.json").write_text(
        '{"versions": [{"version": 1, "file": "pytorch_model.v1.bin"},'
        ' {"version": 2, "file": "pytorch_model.v2.bin"}]}'
    )
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    assert record_version(weights, epoch=3, step=30)["file"] == "model.v3.safetensors"
    manifest = read_manifest(tmp_path)
    assert [v["file"] for v in manifest["versions"]] == [
        "pytorch_model.v1.bin",
        "pytorch_model.v2.bin",
        "model.v3.safetensors",
    ]


def test_a_manifest_without_versions_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text('{"files": ["a.bin"]}')
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    with pytest.raises(ConfigError, match=r"manifest.json is not a model-versions manifest"):
        record_version(weights)
    assert not list(tmp_path.glob("model.v*"))
