"""Versioned copies of the final weights: ``model.v{N}.safetensors`` and ``manifest.json``.

With ``TrainerConfig.model_versioning`` (on by default, as in the original trainer) every
weights file the trainer writes is also kept as ``model.v{N}.safetensors`` beside it, and
``manifest.json`` lists the versions. ``N`` counts up across the runs that train in the same
folder (a resumed run adds the next version); an existing version file is never overwritten.
Both files are written atomically (:func:`medfunc.atomic.atomic_write`): after a crash the
folder holds the old manifest or the new one, each whole.

``manifest.json``::

    {"format": "medfunc.model_versions", "latest": 2,
     "versions": [{"version": 1, "file": "model.v1.safetensors", "epoch": 3, "step": 120,
                   "time": "2026-12-01T03:14:15+00:00", "sha256": "9f2c...", "bytes": 5231}, ...]}

Example:
    >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1))
    >>> from medfunc.weights import save_weights
    >>> weights = save_weights(state, "run/model.safetensors")
    >>> record_version(weights, epoch=1, step=10)["file"]
    'model.v1.safetensors'
    >>> record_version(weights, epoch=2, step=20)["version"]
    2
    >>> [v["file"] for v in read_manifest("run")["versions"]]
    ['model.v1.safetensors', 'model.v2.safetensors']
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from medfunc.atomic import atomic_write
from medfunc.errors import ConfigError

__all__ = ["MANIFEST_FILE", "VERSION_FILE", "read_manifest", "record_version"]

#: The manifest's name, in the folder of the weights.
MANIFEST_FILE = "manifest.json"
#: A version file's name pattern (the version number is ``N``).
VERSION_FILE = re.compile(r"^model\.v(?P<n>\d+)\.safetensors$")
_FORMAT = "medfunc.model_versions"
_CHUNK = 1 << 22


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's ``manifest.json`` (an empty one when there is none).

    Args:
        folder: the run folder.

    Returns:
        ``{"format", "latest", "versions": [...]}``.

    A manifest of the original trainer in the same folder (its ``versions`` list naming
    ``pytorch_model.v{N}.bin`` files) is read too: its entries are kept, and medfunc's versions
    are numbered after them.

    Raises:
        ConfigError: the manifest exists but is not JSON, or has no ``versions`` list.

    Example:
        >>> read_manifest("empty-folder")
        {'format': 'medfunc.model_versions', 'latest': 0, 'versions': []}
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        return {"format": _FORMAT, "latest": 0, "versions": []}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{path} cannot be read as JSON ({error}); move it away to start a new list of "
            "model versions (the model.v*.safetensors files are kept and numbered on)"
        ) from error
    versions = manifest.get("versions") if isinstance(manifest, dict) else None
    if not isinstance(versions, list) or not all(isinstance(v, dict) for v in versions):
        raise ConfigError(
            f"{path} is not a model-versions manifest (a JSON object with a 'versions' list of "
            "objects); it was written by another program: move it away or set "
            "TrainerConfig.model_versioning=False"
        )
    return {**manifest, "format": _FORMAT}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _next_version(folder: Path, manifest: dict[str, Any]) -> int:
    """One more than every version the manifest lists and every version file present."""
    listed = [v["version"] for v in manifest["versions"] if isinstance(v.get("version"), int)]
    present = [int(m["n"]) for p in folder.iterdir() if (m := VERSION_FILE.match(p.name))]
    return max([0, int(manifest.get("latest", 0)), *listed, *present]) + 1


def record_version(
    weights: str | os.PathLike, *, epoch: int | None = None, step: int | None = None
) -> dict[str, Any]:
    """Copy ``weights`` to the next ``model.v{N}.safetensors`` beside it and list it in
    ``manifest.json`` (both atomic; earlier versions are never overwritten).

    Args:
        weights: the weights file just written (e.g. ``run/model.safetensors``).
        epoch: epochs completed when it was written.
        step: optimizer steps taken when it was written.

    Returns:
        The manifest entry: ``version``, ``file``, ``epoch``, ``step``, ``time`` (UTC, ISO
        8601), ``sha256`` and ``bytes`` of the version file.

    Raises:
        ConfigError: the folder holds a manifest that is not medfunc's.
        CheckpointWriteError: the version file or the manifest cannot be written.
    """
    weights = Path(weights)
    folder = weights.parent
    manifest = read_manifest(folder)
    version = _next_version(folder, manifest)
    target = folder / f"model.v{version}.safetensors"
    with weights.open("rb") as source:
        atomic_write(target, lambda handle: shutil.copyfileobj(source, handle, _CHUNK))
    entry = {
        "version": version,
        "file": target.name,
        "epoch": epoch,
        "step": step,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sha256": _sha256(target),
        "bytes": target.stat().st_size,
    }
    manifest = {**manifest, "latest": version, "versions": [*manifest["versions"], entry]}
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(folder / MANIFEST_FILE, lambda handle: handle.write(text.encode()))
    return entry
