"""Run folders: one run per folder, unique default names, checkpoint retention and ``best.json``.

A run folder holds the files of exactly one run. :func:`default_run_dir` names a new folder per
run (a timestamp with microseconds plus the process id). :func:`prepare_run_dir` refuses a
non-empty folder that is not the one being resumed, unless the user asked to overwrite it; then
it removes the previous run's files first, and only those: a folder holding anything the
trainer does not write (:func:`is_run_file`) is refused, never emptied.
:func:`prune_checkpoints` keeps the newest ``save_total_limit`` checkpoints, never deleting a
protected one (the best, the one resumed from). :func:`write_best` records the best checkpoint
in ``best.json``.

Example:
    >>> folder = Path("run")
    >>> prepare_run_dir(folder, resuming=False, overwrite=False)   # new or empty: fine
    >>> folder.mkdir()
    >>> _ = (folder / "metrics.jsonl").write_text("{}")
    >>> prepare_run_dir(folder, resuming=False, overwrite=True)    # the old run is removed
    >>> list(folder.iterdir())
    []
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medfunc import distributed
from medfunc.atomic import atomic_write
from medfunc.errors import ConfigError

__all__ = [
    "resolve_run_dir",
    "BEST_FILE",
    "best_record",
    "checkpoint_files",
    "default_run_dir",
    "is_run_file",
    "prepare_run_dir",
    "prune_checkpoints",
    "write_best",
]

BEST_FILE = "best.json"
#: Files the trainer (and ``medfunc train``) writes at the top of a run folder.
RUN_FILES = frozenset(
    {
        "metrics.jsonl",
        "model.safetensors",
        "model.pt",
        "model.onnx",
        "model.onnx.data",
        BEST_FILE,
        "metrics.png",
        "config.json",
        "generation_config.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    }
)
#: Folders the logging backends write in a run folder (TensorBoard, W&B).
RUN_FOLDERS = frozenset({"tb_logs", "wandb", "save_pretrained", "visualizations"})
_CHECKPOINT = re.compile(r"^checkpoint-(epoch|step)\d+\.pt$")
#: A Hugging Face model's sharded weights (``save_pretrained`` of a large model).
_SHARDS = re.compile(r"^model-\d+-of-\d+\.safetensors$|^model\.safetensors\.index\.json$")
#: The versioned weights (``model_versioning``): ``model.v{N}.safetensors``.
VERSION_FILE = re.compile(r"^model\.v\d+\.safetensors$")
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-\d+-[0-9a-f]+$")


def default_run_dir(prefix: str, root: str | os.PathLike = "runs") -> Path:
    """A new run folder name, unique per run: ``{root}/{prefix}-{YYYYmmdd-HHMMSS-ffffff}-{pid}``.

    Under torchrun every rank gets rank 0's name.

    Args:
        prefix: e.g. the recipe's name.
        root: the parent folder.

    Returns:
        The folder's path (not created).

    Example:
        >>> default_run_dir("breast_cancer").name.startswith("breast_cancer-")
        True
    """
    from medfunc import distributed

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    name = distributed.broadcast_object(f"{prefix}-{stamp}-{os.getpid()}")
    return Path(root) / name


def is_run_file(path: Path) -> bool:
    """Whether ``path`` (an entry of a run folder) is something the trainer writes.

    Args:
        path: a file or folder directly inside a run folder.

    Returns:
        True for checkpoints, the weights, exports, logs, ``best.json``, the metrics plot, the
        Hugging Face ``config.json``/``generation_config.json``, the weight versions
        ``model.v{N}.safetensors`` and their ``manifest.json``, the folders ``tb_logs``/``wandb``/
        ``visualizations`` and the temporary files of an interrupted atomic write of any of
        them.

    Example:
        >>> is_run_file(Path("run/checkpoint-epoch3.pt")), is_run_file(Path("run/notes.txt"))
        (True, False)
    """
    name = path.name
    temporary = _TEMPORARY.match(name)
    if temporary:
        name = temporary.group("name")
    if name in RUN_FOLDERS:
        return path.is_dir() or temporary is not None
    versioned = VERSION_FILE.match(name)
    return bool(_CHECKPOINT.match(name) or _SHARDS.match(name) or versioned) or name in RUN_FILES


def prepare_run_dir(path: Path, *, resuming: bool, overwrite: bool) -> None:
    """Make sure ``path`` will hold this run's files only.

    Args:
        path: the run folder.
        resuming: the run continues a checkpoint stored in ``path`` (its files are kept).
        overwrite: remove a previous run's files first (``overwrite_output_dir``).

    Raises:
        ConfigError: ``path`` is a file; or it holds another run's files and ``overwrite`` is
            false; or ``overwrite`` is set and it holds files the trainer does not write (they
            are listed and nothing is removed); or ``overwrite`` and ``resuming`` are both set.

    Example:
        >>> prepare_run_dir(Path("new-run"), resuming=False, overwrite=False)
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path} is a file, not a folder; choose another output_dir")
    entries = sorted(path.iterdir()) if path.is_dir() else []
    if resuming:
        if overwrite:
            raise ConfigError(
                f"overwrite_output_dir=True would delete {path}, the run being resumed from; "
                "resume without overwrite_output_dir, or write the resumed run to another "
                "output_dir"
            )
        return
    if not entries:
        return
    shown = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not overwrite:
        raise ConfigError(
            f"output_dir {path} already holds another run's files ({shown}); training into "
            "it would mix two runs. Choose a new output_dir, resume that run with "
            "resume_from=<one of its checkpoints>, or replace it with "
            "TrainerConfig.overwrite_output_dir=True (medfunc train --overwrite)"
        )
    unknown = [p.name for p in entries if not is_run_file(p)]
    if unknown:
        raise ConfigError(
            f"overwrite_output_dir=True but output_dir {path} holds files this trainer does "
            f"not write ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); "
            "nothing was removed. Move them away or choose a new output_dir"
        )
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def resolve_run_dir(
    output_dir: str | os.PathLike | None, *, resume_from: str | None, overwrite: bool
) -> Path:
    """The run folder of a training run, checked on rank 0 (:func:`prepare_run_dir`).

    Every rank must call this: rank 0's verdict is broadcast, so all ranks fail together.

    Args:
        output_dir: the folder asked for; None: the resumed checkpoint's folder, else a new
            :func:`default_run_dir`.
        resume_from: the checkpoint being resumed, or None.
        overwrite: ``overwrite_output_dir``: a folder holding a previous run is emptied.

    Returns:
        The run folder.

    Raises:
        ConfigError: the folder holds another run (and ``overwrite`` is False) or other files.

    Example:
        >>> resolve_run_dir("run", resume_from=None, overwrite=False)
        PosixPath('run')
    """
    source = Path(resume_from).parent if resume_from else None
    out = Path(output_dir) if output_dir is not None else source or default_run_dir("run")
    resuming = source is not None and out.resolve() == source.resolve()
    problem = None
    if distributed.is_main_process():
        try:
            prepare_run_dir(out, resuming=resuming, overwrite=overwrite)
        except ConfigError as err:
            problem = str(err)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)
    return out


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest first (by modification time, then name).

    Args:
        folder: a run folder.

    Returns:
        The ``checkpoint-epoch{N}.pt`` / ``checkpoint-step{S}.pt`` files.

    Example:
        >>> checkpoint_files(Path("no-such-run"))
        []
    """
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CHECKPOINT.match(p.name) and p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def prune_checkpoints(
    ordered: Iterable[Path], limit: int | None, protected: Iterable[Path | None]
) -> list[Path]:
    """Delete all but the newest ``limit`` checkpoints, never a protected one.

    Call it after the newest checkpoint was written (atomically).

    Args:
        ordered: the run's checkpoint files, oldest first (duplicates ignored).
        limit: ``save_total_limit``; None keeps every checkpoint.
        protected: files never deleted (the best checkpoint, the one resumed from).

    Returns:
        The files deleted.

    Example:
        >>> prune_checkpoints([Path("a.pt"), Path("b.pt")], None, [])
        []
    """
    unique = list(dict.fromkeys(Path(p) for p in ordered))
    if limit is None or len(unique) <= limit:
        return []
    keep = {p.resolve() for p in protected if p is not None}
    deleted = []
    for path in unique[: len(unique) - limit]:
        if path.resolve() in keep:
            continue
        path.unlink(missing_ok=True)
        deleted.append(path)
    return deleted


def best_record(position: Any, metric: str) -> dict[str, Any]:
    """The ``best.json`` record of a loop position whose best evaluation is checkpointed.

    Args:
        position: a :class:`~medfunc.tracking.LoopPosition`.
        metric: the metric that decides the best (``eval_metric``).

    Returns:
        ``{"checkpoint", "epoch", "step", "metric", "value", "metrics"}``.

    Example:
        >>> from medfunc.early_stopping import EarlyStopping
        >>> from medfunc.tracking import LoopPosition
        >>> position = LoopPosition(EarlyStopping(), best_checkpoint="checkpoint-epoch2.pt")
        >>> best_record(position, "loss")["checkpoint"]
        'checkpoint-epoch2.pt'
    """
    return {
        "checkpoint": position.best_checkpoint,
        "epoch": position.best_epoch,
        "step": position.best_step,
        "metric": metric,
        "value": position.stopping.best,
        "metrics": dict(position.best_metrics),
    }


def write_best(folder: Path, record: Mapping[str, Any]) -> Path:
    """Write ``best.json`` (atomically): which checkpoint holds the best evaluation.

    Args:
        folder: the run folder.
        record: ``{"checkpoint", "epoch", "step", "metric", "value", "metrics"}``.

    Returns:
        The file written.

    Example:
        >>> write_best(Path("."), {"checkpoint": "checkpoint-epoch2.pt", "step": 30}).name
        'best.json'
    """
    text = json.dumps(dict(record), indent=2, sort_keys=True) + "\n"
    path = folder / BEST_FILE
    atomic_write(path, lambda handle: handle.write(text.encode()))
    return path
