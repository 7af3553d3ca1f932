"""Verified TorchScript and ONNX export of a model or a :class:`~medfunc.state.TrainState`.

Both exporters take the seed's ``export_input_example``: a dict of keyword inputs
(``model(**example)``), a tuple/list of positional inputs (``model(*example)``) or one tensor
(``model(example)``). Every input must be a tensor. The model is exported in eval mode (each
submodule's previous train/eval mode is restored afterwards), under ``torch.no_grad()``, with the
example moved to the model's device.

Each file is written to a temporary name in the target folder, verified against the eager model
and only then renamed into place, so a failed or unverified export never leaves a (partial) file.

What the exported graphs return (see ``docs/export.md``):

- TorchScript (``torch.jit.trace``): the model's own output structure; a mapping or Hugging Face
  ``ModelOutput`` becomes a ``Dict[str, Tensor]`` of its tensor entries, tuples stay tuples.
  Call the loaded module like the eager one: ``loaded(**example)``.
- ONNX: one graph input per example tensor, named after the dict keys (``input_0``, ... for a
  tuple, ``input`` for a single tensor), and a flat list of tensor outputs named by
  :func:`flatten_outputs`: a mapping's keys in the model's order (``"logits"``), ``output_0`` ...
  for a tuple, ``output`` for a single tensor; nested containers join names with ``"."``.
  ``None`` entries are dropped.

Example:
    >>> from medfunc.export import to_onnx, to_torchscript
    >>> example = {"input_ids": ids, "attention_mask": mask}
    >>> to_torchscript(state, example, "out/model.pt")
    >>> to_onnx(state, example, "out/model.onnx", opset=18)
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medfunc.errors import ExportError
from medfunc.state import TrainState, bind_module

__all__ = ["compare_outputs", "flatten_outputs", "to_onnx", "to_torchscript"]

#: Lowest default-domain opset the torch.export-based ONNX exporter implements.
DYNAMO_MIN_OPSET = 18
#: Above this many bytes of weights the ONNX file keeps them in ``<name>.data`` beside it
#: (a single protobuf file cannot exceed 2 GiB).
EXTERNAL_DATA_BYTES = 1536 * 1024**2

_INSTALL_HINT = "install the ONNX extra: pip install 'medfunc[onnx]'"
_JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"
_QUIET_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch.fx.experimental.symbolic_shapes",
    "onnxscript",
)


# --------------------------------------------------------------------------------------------
# Inputs, outputs and comparison
# --------------------------------------------------------------------------------------------


def _resolve_module(state_or_module: TrainState | torch.nn.Module) -> torch.nn.Module:
    if isinstance(state_or_module, TrainState):
        return bind_module(state_or_module)
    if isinstance(state_or_module, torch.nn.Module):
        return state_or_module
    raise ExportError(
        f"export expects a TrainState or a torch.nn.Module, got {type(state_or_module).__name__}"
    )


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _split_example(example: Any, device: torch.device) -> tuple[tuple, dict, list[str]]:
    """(args, kwargs, input names) of ``example``, tensors moved to ``device``."""

    def check(name: str, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"export_input_example[{name!r}] is a {type(value).__name__}; every export input "
                "must be a tensor (fix constants inside the model or a small wrapper module)"
            )
        return value.to(device)

    if isinstance(example, Mapping):
        if not example:
            raise ExportError("export_input_example is an empty dict; give the model's inputs")
        kwargs = {str(k): check(str(k), v) for k, v in example.items()}
        return (), kwargs, list(kwargs)
    if isinstance(example, (tuple, list)):
        if not example:
            raise ExportError("export_input_example is empty; give the model's inputs")
        args = tuple(check(str(i), v) for i, v in enumerate(example))
        return args, {}, [f"input_{i}" for i in range(len(args))]
    if isinstance(example, torch.Tensor):
        return (example.to(device),), {}, ["input"]
    raise ExportError(
        "export_input_example must be a dict of keyword inputs, a tuple/list of positional "
        f"inputs or a tensor; got {type(example).__name__}"
    )


def flatten_outputs(outputs: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Flatten a model's outputs into ``(name, tensor)`` pairs in a stable order.

    A tensor is ``"output"``; a mapping (dict, Hugging Face ``ModelOutput``) contributes its
    entries in insertion order named by their keys; a tuple/list contributes ``output_0``,
    ``output_1``, ...; nested containers join names with ``"."``. ``None`` entries are skipped.
    These are the ONNX output names and the order of the ONNX graph's outputs.

    Args:
        outputs: what the model returned.
        prefix: name of ``outputs`` itself (used by the recursion).

    Returns:
        The ``(name, tensor)`` pairs.

    Raises:
        ExportError: an output is neither a tensor, a mapping, a sequence nor ``None``, or there
            is no tensor at all.

    Example:
        >>> [n for n, _ in flatten_outputs({"logits": a, "hidden": (b, c)})]
        ['logits', 'hidden.0', 'hidden.1']
    """
    flat: list[tuple[str, torch.Tensor]] = []

    def visit(value: Any, name: str, index_prefix: str) -> None:
        if value is None:
            return
        if isinstance(value, torch.Tensor):
            flat.append((name or "output", value))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key), "")
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                visit(item, f"{name}.{i}" if name else f"{index_prefix}{i}", "")
        else:
            raise ExportError(
                f"model output {name or 'output'!r} is a {type(value).__name__}; an exported graph "
                "can only return tensors (or dicts/tuples/lists of tensors)"
            )

    visit(outputs, prefix, "output_")
    if not flat:
        raise ExportError("the model returned no tensor for export_input_example")
    return flat


def _as_named_pairs(outputs: Any) -> list[tuple[str, Any]]:
    if isinstance(outputs, Mapping):
        return list(outputs.items())
    return [(str(name), value) for name, value in outputs]


def compare_outputs(
    expected: Mapping[str, Any] | Sequence[tuple[str, Any]],
    actual: Mapping[str, Any] | Sequence[tuple[str, Any]],
    *,
    atol: float,
    label: str = "export",
) -> float:
    """Compare exported outputs with the eager model's, pairwise in order (by name when both
    sides have the same names in another order).

    Floating outputs must agree within ``atol`` (absolute; NaN and infinities must sit at the
    same places), integer and bool outputs exactly.

    Args:
        expected: the eager outputs, ``(name, tensor)`` pairs (or a mapping).
        actual: the exported model's outputs, ``(name, tensor or numpy array)`` pairs, in the
            same order.
        atol: the largest absolute difference accepted.
        label: what is being checked, for the message (e.g. "ONNX (onnxruntime, batch 5)").

    Returns:
        The largest absolute difference found.

    Raises:
        ExportError: a count, shape or value disagrees; the message names the output and gives
            the maximum difference.

    Example:
        >>> compare_outputs([("logits", a)], [("logits", b)], atol=1e-4, label="ONNX")
        3.1e-07
    """
    want = _as_named_pairs(expected)
    got = _as_named_pairs(actual)
    if len(want) != len(got):
        raise ExportError(
            f"{label}: the exported model returns {len(got)} output(s) "
            f"{[n for n, _ in got]} but the eager model returns {len(want)} {[n for n, _ in want]}"
        )
    want_names, got_names = [n for n, _ in want], [n for n, _ in got]
    if want_names != got_names and sorted(want_names) == sorted(got_names):
        by_name = dict(got)  # same outputs in another order (e.g. a dict): match them by name
        got = [(n, by_name[n]) for n in want_names]
    worst = 0.0
    failures: list[tuple[float, str]] = []
    for (name, ref), (_, out) in zip(want, got):
        ref_t = torch.as_tensor(ref).detach().cpu()
        out_t = torch.as_tensor(out).detach().cpu()
        if tuple(ref_t.shape) != tuple(out_t.shape):
            raise ExportError(
                f"{label}: output {name!r} has shape {tuple(out_t.shape)}, eager gives "
                f"{tuple(ref_t.shape)}"
            )
        exact = not (ref_t.is_floating_point() or ref_t.is_complex() or out_t.is_floating_point())
        if exact:
            diffs = (ref_t.to(torch.int64) - out_t.to(torch.int64)).abs()
            diff = float(diffs.max()) if diffs.numel() else 0.0
        else:
            a, b = ref_t.to(torch.float64), out_t.to(torch.float64)
            finite = torch.isfinite(a) & torch.isfinite(b)
            same_special = (a == b) | (torch.isnan(a) & torch.isnan(b))
            if bool((~finite & ~same_special).any()):
                diff = math.inf  # NaN/inf where the other side has a number (or another special)
            else:
                diffs = (a - b).abs()[finite]
                diff = float(diffs.max()) if diffs.numel() else 0.0
        worst = max(worst, diff)
        if diff > (0.0 if exact else atol):
            failures.append((diff, name))
    if failures:
        diff, name = max(failures)
        others = [n for _, n in failures if n != name]
        also = f" (also outside tolerance: {others})" if others else ""
        raise ExportError(
            f"{label}: output {name!r} differs from the eager model: max |difference| = "
            f"{diff:.3g} > atol {atol:g}{also}. The exported graph does not reproduce the model; "
            "check for data-dependent control flow or unsupported ops, or raise atol if the "
            "difference is numerical noise"
        )
    return worst


# --------------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block; afterwards every submodule gets its own previous mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _reason(exc: BaseException, limit: int = 600) -> str:
    root = _root_cause(exc)
    text = " ".join(line.strip() for line in str(root).strip().splitlines()[:4] if line.strip())
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


def _eager(module: torch.nn.Module, args: tuple, kwargs: dict, exporter: str) -> Any:
    try:
        return module(*args, **kwargs)
    except Exception as exc:  # the example does not fit the model
        raise ExportError(
            f"{exporter} export of {type(module).__name__} failed: the model raised on "
            f"export_input_example ({_reason(exc)}); give an example matching the forward "
            "signature"
        ) from exc


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' progress prints and info/warning logs (errors still raise)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --------------------------------------------------------------------------------------------
# TorchScript
# --------------------------------------------------------------------------------------------


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
            (``model(*example)``) or a tensor.
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
        >>> to_torchscript(state, {"input_ids": ids}, "out/model.pt")
        >>> loaded = torch.jit.load("out/model.pt")
        >>> logits = loaded(input_ids=ids)["logits"]
    """
    module = _resolve_module(state_or_module)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = _module_device(module)
    args, kwargs, _ = _split_example(example, device)
    name = type(module).__name__
    temporary = _temporary_name(path)
    tracer_notes: list[str] = []
    try:
        with _eval_mode(module), torch.no_grad():
            expected = flatten_outputs(_eager(module, args, kwargs, "TorchScript"))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    if kwargs:
                        traced = torch.jit.trace(
                            module, example_kwarg_inputs=kwargs, strict=False, check_trace=False
                        )
                    else:
                        traced = torch.jit.trace(module, args, strict=False, check_trace=False)
                    traced.save(str(temporary))
                except ExportError:
                    raise
                except Exception as exc:
                    raise ExportError(
                        f"TorchScript export (torch.jit.trace) of {name} failed: {_reason(exc)}"
                    ) from exc
            for record in caught:
                if issubclass(record.category, torch.jit.TracerWarning):
                    tracer_notes.append(str(record.message).split(". ")[0].strip())
                elif not re.match(_JIT_DEPRECATION, str(record.message)):
                    warnings.warn_explicit(
                        record.message, record.category, record.filename, record.lineno
                    )
            if verify:
                try:
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION)
                        loaded = torch.jit.load(str(temporary), map_location=device)
                    produced = loaded(*args, **kwargs)
                except Exception as exc:
                    raise ExportError(
                        f"TorchScript export of {name} failed verification: the saved file "
                        f"could not be reloaded and run ({_reason(exc)})"
                    ) from exc
                compare_outputs(
                    expected,
                    flatten_outputs(produced),
                    atol=atol,
                    label=f"TorchScript export of {name} (reloaded with torch.jit.load)",
                )
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    if tracer_notes:
        warnings.warn(
            f"TorchScript trace of {name}: the tracer reported {len(tracer_notes)} spot(s) where "
            f"Python used a tensor's value (e.g. {tracer_notes[0]!r}). The saved graph replays "
            "the path taken for export_input_example; inputs that would branch differently are "
            "not handled by it.",
            UserWarning,
            stacklevel=2,
        )
    return path


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def _call(
    module: torch.nn.Module, inputs: Sequence[torch.Tensor], kwarg_names: list[str] | None
) -> Any:
    """Call ``module`` with the graph inputs (as keywords when the example was a dict)."""
    if kwarg_names is None:
        return module(*inputs)
    return module(**dict(zip(kwarg_names, inputs)))


class _OnnxAdapter(torch.nn.Module):
    """Positional tensors in, a flat tuple of tensors out (the ONNX graph's signature)."""

    def __init__(self, module: torch.nn.Module, kwarg_names: list[str] | None) -> None:
        super().__init__()
        self.module = module
        self.kwarg_names = kwarg_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = _call(self.module, inputs, self.kwarg_names)
        return tuple(tensor for _, tensor in flatten_outputs(out))


def _require_onnx(verify: bool) -> tuple[Any, Any]:
    try:
        import onnx
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the 'onnx' package: {_INSTALL_HINT}") from exc
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the 'onnxscript' package (torch's exporter): {_INSTALL_HINT}"
        ) from exc
    ort = None
    if verify:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ExportError(
                f"verifying the ONNX file needs the 'onnxruntime' package: {_INSTALL_HINT} "
                "(or pass verify=False)"
            ) from exc
    return onnx, ort


def _batch_inputs(
    tensors: list[torch.Tensor], dynamic_batch: bool
) -> tuple[int | None, list[bool]]:
    """The example batch size and which inputs carry it in dim 0."""
    if not dynamic_batch or not tensors or tensors[0].dim() == 0:
        return None, [False] * len(tensors)
    batch = tensors[0].shape[0]
    return batch, [t.dim() >= 1 and t.shape[0] == batch for t in tensors]


def _onnx_opset(model_proto: Any) -> int | None:
    for entry in model_proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def to_onnx(
    state_or_module: TrainState | torch.nn.Module,
    example: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
    dynamo: bool | None = None,
) -> Path:
    """Export to ONNX with ``torch.onnx.export``, check it and verify it in onnxruntime.

    The exporter is torch's default, the ``torch.export``-based one (``dynamo=True``): it
    captures the whole program and *refuses* what it cannot represent (Python branches on tensor
    values, unsupported ops) instead of silently freezing one path. It implements opset 18 and
    newer; for ``opset < 18`` the TorchScript-based exporter (``dynamo=False``, deprecated in
    torch) is used unless ``dynamo=True`` is given. The graph's inputs are the example's
    tensors (named after the dict keys), its outputs the model's tensors named as by
    :func:`flatten_outputs`. With ``dynamic_batch``, dim 0 of every input whose dim 0 equals the
    first input's is a symbolic ``batch`` dimension.

    Verification: ``onnx.checker.check_model``, then onnxruntime (CPUExecutionProvider) runs the
    file on the example and, with ``dynamic_batch``, on a batch of a different size built from
    the example's rows; every output must match the eager model within ``atol``. Only then is
    the file renamed to ``path``. Weights above ~1.5 GiB go to ``<name>.data`` beside it.

    Args:
        state_or_module: a :class:`TrainState` (exported with its own params and buffers, which
            :func:`~medfunc.state.bind_module` writes into ``state.module``) or a module.
        example: ``export_input_example``: dict, tuple/list or tensor of inputs.
        path: the ``.onnx`` file to write (parent folders are created).
        opset: the ONNX opset (default: the exporter's default, 18+ for the dynamo exporter).
        dynamic_batch: make the batch dimension symbolic and verify at a second batch size.
        verify: run the checker and onnxruntime comparison.
        atol: the largest absolute difference accepted by the verification.
        dynamo: force the exporter: True (torch.export-based), False (TorchScript-based); None
            picks the dynamo exporter unless ``opset < 18``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ExportError: a package is missing (``pip install 'medfunc[onnx]'``); the model does not
            accept ``example``; the exporter fails (the message names the exporter and the
            underlying reason, which is chained); the checker rejects the file; the requested
            opset could not be produced; or onnxruntime's outputs disagree with the eager model
            (the message names the output and gives the max difference).

    Example:
        >>> to_onnx(state, {"input_ids": ids, "attention_mask": mask}, "out/model.onnx")
        >>> sess = onnxruntime.InferenceSession("out/model.onnx")
        >>> (logits,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": m.numpy()})
    """
    onnx, ort = _require_onnx(verify)
    module = _resolve_module(state_or_module)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    use_dynamo = dynamo if dynamo is not None else (opset is None or opset >= DYNAMO_MIN_OPSET)
    exporter = (
        "torch.export-based exporter (dynamo=True)"
        if use_dynamo
        else "TorchScript-based exporter (dynamo=False)"
    )
    device = _module_device(module)
    args, kwargs, input_names = _split_example(example, device)
    tensors = list(kwargs.values()) if kwargs else list(args)
    name = type(module).__name__
    adapter = _OnnxAdapter(module, list(kwargs) if kwargs else None)
    adapter.training = False  # (not .eval(): that would lose the submodules' own modes)
    batch, batched = _batch_inputs(tensors, dynamic_batch)
    # Exporters specialise size-1 dimensions (a traced reshape bakes in the 1), so a batch-1
    # example is exported from two copies of its row; verification still runs at batch 1.
    traced_inputs = (
        [torch.cat([t, t]) if b else t for t, b in zip(tensors, batched)] if batch == 1 else tensors
    )
    weight_bytes = sum(
        t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
    )
    external = weight_bytes > EXTERNAL_DATA_BYTES

    workdir = _temporary_name(path)
    workdir.mkdir()
    staged = workdir / path.name
    try:
        with _eval_mode(module), torch.no_grad():
            expected = flatten_outputs(_eager(module, args, kwargs, "ONNX"))
            output_names = [n for n, _ in expected]
            stage = "exporting"
            try:
                with _quiet_exporter():
                    if use_dynamo:
                        dim = torch.export.Dim("batch")
                        shapes = tuple({0: dim} if b else None for b in batched)
                        stage = "capturing the graph with torch.export"
                        program = torch.export.export(
                            adapter,
                            tuple(traced_inputs),
                            dynamic_shapes=(shapes,) if batch is not None else None,
                            strict=False,
                        )
                        stage = "translating the graph to ONNX"
                        torch.onnx.export(
                            program,
                            (),
                            str(staged),
                            dynamo=True,
                            input_names=input_names,
                            output_names=output_names,
                            opset_version=opset,
                            external_data=external,
                        )
                    else:
                        stage = "tracing the model"
                        axes = {n: {0: "batch"} for n, b in zip(input_names, batched) if b}
                        if axes:
                            axes.update(
                                (n, {0: "batch"})
                                for n, t in expected
                                if t.dim() >= 1 and t.shape[0] == batch
                            )
                        torch.onnx.export(
                            adapter,
                            tuple(traced_inputs),
                            str(staged),
                            dynamo=False,
                            input_names=input_names,
                            output_names=output_names,
                            opset_version=opset,
                            dynamic_axes=axes or None,
                        )
            except Exception as exc:
                hint = ""
                if "data-dependent" in str(_root_cause(exc)).lower():
                    hint = (
                        " The model branches on a tensor's value (data-dependent control flow): "
                        "rewrite it with torch.where / torch.cond, or pass dynamo=False to trace "
                        "the branch taken for the example."
                    )
                raise ExportError(
                    f"ONNX export ({exporter}) of {name} failed while {stage}: "
                    f"{_reason(exc)}.{hint}"
                ) from exc
            if not staged.exists():
                raise ExportError(f"ONNX export ({exporter}) of {name} wrote no file")
            if verify:
                _verify_onnx(
                    onnx,
                    ort,
                    staged,
                    eager=lambda inputs: _call(module, inputs, adapter.kwarg_names),
                    inputs=tensors,
                    input_names=input_names,
                    batched=batched if batch is not None else None,
                    expected=expected,
                    atol=atol,
                    opset=opset,
                    label=f"ONNX export ({exporter}) of {name}",
                )
            elif opset is not None:
                _check_opset(onnx, staged, opset, f"ONNX export ({exporter}) of {name}")
        produced = sorted(workdir.iterdir(), key=lambda p: p == staged)  # the .onnx file last
        for item in produced:
            _fsync(item)
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return path


def _check_opset(onnx: Any, staged: Path, opset: int, label: str) -> None:
    found = _onnx_opset(onnx.load(str(staged), load_external_data=False))
    if found != opset:
        raise ExportError(
            f"{label}: opset {opset} was requested but the file has opset {found} (the "
            f"exporter's version conversion failed); use opset >= {DYNAMO_MIN_OPSET} or "
            "dynamo=False"
        )


def _verify_onnx(
    onnx: Any,
    ort: Any,
    staged: Path,
    *,
    eager: Callable[[list[torch.Tensor]], Any],
    inputs: list[torch.Tensor],
    input_names: list[str],
    batched: list[bool] | None,
    expected: list[tuple[str, torch.Tensor]],
    atol: float,
    opset: int | None,
    label: str,
) -> None:
    """Checker, opset, then onnxruntime vs eager at the example batch and at another size."""
    try:
        onnx.checker.check_model(str(staged), full_check=False)
    except Exception as exc:
        raise ExportError(f"{label}: onnx.checker rejected the file ({_reason(exc)})") from exc
    if opset is not None:
        _check_opset(onnx, staged, opset, label)
    try:
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{label}: onnxruntime cannot load the file ({_reason(exc)})") from exc
    graph_inputs = {i.name for i in session.get_inputs()}
    output_names = [o.name for o in session.get_outputs()]

    def run(feed_tensors: list[torch.Tensor], want: list, what: str) -> None:
        try:
            feed = {
                n: t.detach().cpu().numpy()
                for n, t in zip(input_names, feed_tensors)
                if n in graph_inputs
            }
            got = session.run(None, feed)
        except Exception as exc:
            raise ExportError(
                f"{label}: onnxruntime failed to run the file {what} ({_reason(exc)})"
            ) from exc
        compare_outputs(
            want, list(zip(output_names, got)), atol=atol, label=f"{label}, onnxruntime {what}"
        )

    if batched is None:
        run(inputs, expected, "on the example")
        return
    batch = inputs[0].shape[0]
    run(inputs, expected, f"at the example batch ({batch})")
    other = batch + 2 if batch > 1 else 3
    rows = torch.arange(other - 1, -1, -1) % batch  # the example's rows, reordered and repeated
    resized = [t.index_select(0, rows.to(t.device)) if b else t for t, b in zip(inputs, batched)]
    run(resized, flatten_outputs(eager(resized)), f"at another batch size ({other})")
