"""medfunc's error classes.

Every error medfunc raises on bad input derives from :class:`MedfuncError` and also from the
builtin class a caller would naturally catch (``ValueError``, ``TypeError``, ...), so existing
``except ValueError`` blocks keep working. Messages say what was expected, what was found and
what to do.
"""

from __future__ import annotations

from pathlib import Path


class MedfuncError(Exception):
    """Base class of every medfunc error."""


class ConfigError(MedfuncError, ValueError):
    """A configuration value (optimizer, schedule, trainer option) is invalid."""


class BatchError(MedfuncError, TypeError):
    """A batch has a type or structure the model cannot take."""


class LossError(MedfuncError, ValueError):
    """The model's output holds no loss, or the loss is not a scalar."""


class ConsumedStateError(MedfuncError, RuntimeError):
    """A TrainState was used after it was donated to a step."""


class NonFiniteError(MedfuncError, RuntimeError):
    """Training produced too many consecutive non-finite (skipped) steps."""


class CheckpointError(MedfuncError):
    """Base class of checkpoint errors."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """The checkpoint file is truncated, corrupt or not a medfunc checkpoint."""


class UnsafeCheckpointError(CheckpointError, ValueError):
    """The checkpoint holds pickled code or objects that are not plain tensors and containers."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's structure, shapes or dtypes differ from the state it is restored into."""


class CheckpointVersionError(CheckpointError, ValueError):
    """The checkpoint was written by a newer format version than this medfunc reads."""


class CheckpointWriteError(CheckpointError, OSError):
    """A file could not be written: the disk is full, permission is denied, the file system is
    read-only, or the target is a folder.

    ``errno`` is the cause's (e.g. ``errno.ENOSPC``) and ``filename`` the target; the message
    names both and says what to do. The file that was at the target before is unchanged.
    """

    def __init__(self, code: int, message: str, filename: str) -> None:
        super().__init__(code, message, filename)

    def __str__(self) -> str:
        return self.strerror


class ExportError(MedfuncError, RuntimeError):
    """A model could not be exported, or the exported file disagrees with eager outputs."""


class DistributedError(MedfuncError, RuntimeError):
    """The distributed environment is misconfigured or a peer failed."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at a step boundary on SIGTERM or SIGINT, after writing a checkpoint.

    A ``KeyboardInterrupt`` (not an ``Exception``), as Ctrl-C always was: ``except Exception``
    blocks do not swallow it, and code that handles Ctrl-C keeps working.

    Attributes:
        checkpoint: the checkpoint written at the step boundary (``resume_from`` for the rerun).
        signum: the signal received (``signal.SIGTERM`` or ``signal.SIGINT``).
        step: the optimizer step the checkpoint holds.
        exit_code: ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), the shell's convention.
    """

    def __init__(self, message: str, *, checkpoint: Path, signum: int, step: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signum = signum
        self.step = step
        self.exit_code = 128 + signum
