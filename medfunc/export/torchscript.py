"""TorchScript export: ``torch.jit.trace``, saved, reloaded and compared with the eager model."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from medfunc.atomic import atomic_replace, ensure_writable, temporary_path
from medfunc.errors import ExportError
from medfunc.export.common import (
    describe_error,
    eval_mode,
    export_target,
    module_device,
    run_eager,
)
from medfunc.export.compare import compare_outputs, flatten_outputs
from medfunc.state import TrainState

__all__ = ["to_torchscript"]

_JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


def _trace(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.jit.ScriptModule:
    if kwargs:
        return torch.jit.trace(module, example_kwarg_inputs=kwargs, strict=False, check_trace=False)
    return torch.jit.trace(module, args, strict=False, check_trace=False)


def _tracer_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """The first sentence of each tracer warning; other warnings (but torch.jit's deprecation
    notes) are issued again."""
    notes: list[str] = []
    for record in caught:
        if issubclass(record.category, torch.jit.TracerWarning):
            notes.append(str(record.message).split(". ")[0].strip())
        elif not re.match(_JIT_DEPRECATION, str(record.message)):
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
    return notes


def _trace_and_save(
    module: torch.nn.Module, args: tuple, kwargs: dict, staged: Path, name: str
) -> list[str]:
    """Trace the module on the example into ``staged``; return the tracer's notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _trace(module, args, kwargs).save(str(staged))
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(
                f"TorchScript export (torch.jit.trace) of {name} failed: {describe_error(exc)}"
            ) from exc
    return _tracer_notes(caught)


def _verify(
    staged: Path,
    device: torch.device,
    example: tuple[tuple, dict],
    expected: list[tuple[str, torch.Tensor]],
    atol: float,
    name: str,
) -> None:
    """Reload the saved file, run it on the example and compare with the eager outputs."""
    args, kwargs = example
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_JIT_DEPRECATION)
            loaded = torch.jit.load(str(staged), map_location=device)
        produced = loaded(*args, **kwargs)
    except Exception as exc:
        raise ExportError(
            f"TorchScript export of {name} failed verification: the saved file "
            f"could not be reloaded and run ({describe_error(exc)})"
        ) from exc
    compare_outputs(
        expected,
        flatten_outputs(produced),
        atol=atol,
        label=f"TorchScript export of {name} (reloaded with torch.jit.load)",
    )


def _warn_frozen_branches(name: str, notes: list[str]) -> None:
    warnings.warn(
        f"TorchScript trace of {name}: the tracer reported {len(notes)} spot(s) where "
        f"Python used a tensor's value (e.g. {notes[0]!r}). The saved graph replays "
        "the path taken for export_input_example; inputs that would branch differently are "
        "not handled by it.",
        UserWarning,
        stacklevel=3,
    )


def to_torchscript(
    state_or_module: TrainState | torch.nn.Module,
    example: Any,
    path: str | os.PathLike,
    *,
    verify: bool = True,
    atol: float = 1e-6,
) -> Path:
    """Export to TorchScript with ``torch.jit.trace``, save, reload and verify.

    The model is traced in eval mode on ``example`` (``strict=False``, so dict and
    ``ModelOutput`` outputs become ``Dict[str, Tensor]``), saved to a temporary file, reloaded
    with ``torch.jit.load`` and compared with the eager outputs; only then is the file renamed to
    ``path``. A trace records the operations run for this example: Python control flow on tensor
    values is frozen to the branch taken. When the tracer reports such spots, a single
    ``UserWarning`` says so (consider :func:`to_onnx`, whose exporter refuses them instead).

    Args:
        state_or_module: a :class:`TrainState` (its params and buffers are written into
            ``state.module`` with :func:`~medfunc.state.bind_module` and exported) or a module.
        example: ``export_input_example``: dict (``model(**example)``), tuple/list
            (``model(*example)``) or a tensor. For a state built with ``apply_fn`` the file runs
            ``apply_fn(model, example)`` and takes the example's tensors positionally.
        path: the ``.pt`` file to write (parent folders are created).
        verify: reload the saved file and compare it with the eager model.
        atol: the largest absolute difference accepted by the verification.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ExportError: the model does not accept ``example``, cannot be traced, or the reloaded
            module disagrees with the eager model (the message gives the output and the max
            difference). The underlying exception is chained.

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1))
        >>> x = torch.randn(3, 4)
        >>> print(to_torchscript(state, x, "out/model.pt"))
        out/model.pt
        >>> loaded = torch.jit.load("out/model.pt")
        >>> torch.allclose(loaded(x), mf.apply_model(state, x))
        True
    """
    module, args, kwargs, _ = export_target(state_or_module, example)
    path = ensure_writable(path)  # a target that cannot work fails before tracing
    device = module_device(module)
    name = type(module).__name__
    staged = temporary_path(path)
    try:
        with eval_mode(module), torch.no_grad():
            expected = flatten_outputs(run_eager(module, args, kwargs, "TorchScript"))
            notes = _trace_and_save(module, args, kwargs, staged, name)
            if verify:
                _verify(staged, device, (args, kwargs), expected, atol, name)
        atomic_replace(staged, path)
    finally:
        with contextlib.suppress(OSError):  # gone once replaced; never hides the export's error
            staged.unlink()
    if notes:
        _warn_frozen_branches(name, notes)
    return path
