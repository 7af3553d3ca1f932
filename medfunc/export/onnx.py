"""ONNX export: ``torch.onnx.export`` (the ``torch.export``-based exporter by default), checked with
``onnx.checker`` and verified in onnxruntime against the eager model."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medfunc.atomic import atomic_replace, ensure_writable, temporary_path
from medfunc.errors import ExportError
from medfunc.export.common import (
    describe_error,
    eval_mode,
    export_target,
    quiet_exporter,
    root_cause,
    run_eager,
)
from medfunc.export.compare import compare_outputs, flatten_outputs
from medfunc.state import TrainState

__all__ = ["DYNAMO_MIN_OPSET", "EXTERNAL_DATA_BYTES", "to_onnx"]

#: Lowest default-domain opset the torch.export-based ONNX exporter implements.
DYNAMO_MIN_OPSET = 18
#: Above this many bytes of weights the ONNX file keeps them in ``<name>.data`` beside it
#: (a single protobuf file cannot exceed 2 GiB).
EXTERNAL_DATA_BYTES = 1536 * 1024**2

_INSTALL_HINT = "install the ONNX extra: pip install 'medfunc[onnx]'"


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


@dataclass(frozen=True)
class _Graph:
    """What the exporters and the verification need to know about the graph to write."""

    adapter: _OnnxAdapter
    inputs: list[torch.Tensor]  # the example's tensors (what verification feeds)
    traced_inputs: list[torch.Tensor]  # what the exporter runs (see _graph)
    input_names: list[str]
    expected: list[tuple[str, torch.Tensor]]  # the eager outputs
    batch: int | None  # the example's batch size; None: no symbolic batch dimension
    batched: list[bool]  # which inputs carry the batch in dim 0
    opset: int | None
    external: bool  # weights go to <name>.data beside the file

    @property
    def output_names(self) -> list[str]:
        return [n for n, _ in self.expected]


def _graph(
    module: torch.nn.Module,
    example: tuple[tuple, dict, list[str]],
    expected: list[tuple[str, torch.Tensor]],
    dynamic_batch: bool,
    opset: int | None,
) -> _Graph:
    """The graph's inputs (a batch-1 example doubled for the exporter), adapter and settings."""
    args, kwargs, input_names = example
    tensors = list(kwargs.values()) if kwargs else list(args)
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
    return _Graph(
        adapter=adapter,
        inputs=tensors,
        traced_inputs=traced_inputs,
        input_names=input_names,
        expected=expected,
        batch=batch,
        batched=batched,
        opset=opset,
        external=weight_bytes > EXTERNAL_DATA_BYTES,
    )


class _StageFailed(Exception):
    """An exporter step failed; ``stage`` says which (the exporter's error is the cause)."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


@contextlib.contextmanager
def _stage(what: str) -> Iterator[None]:
    """Report a failure inside the block as a failure while ``what``."""
    try:
        yield
    except _StageFailed:
        raise
    except Exception as exc:
        raise _StageFailed(what) from exc


def _export_dynamo(graph: _Graph, staged: Path) -> None:
    """The torch.export-based exporter: capture the program, then translate it."""
    dim = torch.export.Dim("batch")
    shapes = tuple({0: dim} if b else None for b in graph.batched)
    with _stage("capturing the graph with torch.export"):
        program = torch.export.export(
            graph.adapter,
            tuple(graph.traced_inputs),
            dynamic_shapes=(shapes,) if graph.batch is not None else None,
            strict=False,
        )
    with _stage("translating the graph to ONNX"):
        torch.onnx.export(
            program,
            (),
            str(staged),
            dynamo=True,
            input_names=graph.input_names,
            output_names=graph.output_names,
            opset_version=graph.opset,
            external_data=graph.external,
        )


def _export_traced(graph: _Graph, staged: Path) -> None:
    """The TorchScript-based exporter (``dynamo=False``): trace, then translate."""
    axes = {n: {0: "batch"} for n, b in zip(graph.input_names, graph.batched) if b}
    if axes:
        axes.update(
            (n, {0: "batch"})
            for n, t in graph.expected
            if t.dim() >= 1 and t.shape[0] == graph.batch
        )
    with _stage("tracing the model"):
        torch.onnx.export(
            graph.adapter,
            tuple(graph.traced_inputs),
            str(staged),
            dynamo=False,
            input_names=graph.input_names,
            output_names=graph.output_names,
            opset_version=graph.opset,
            dynamic_axes=axes or None,
        )


def _export(graph: _Graph, staged: Path, use_dynamo: bool, label: str) -> None:
    """Write the graph to ``staged``; an ExportError naming the failed stage if it fails."""
    try:
        with quiet_exporter(), _stage("exporting"):
            (_export_dynamo if use_dynamo else _export_traced)(graph, staged)
    except _StageFailed as failed:
        exc = failed.__cause__
        hint = ""
        if "data-dependent" in str(root_cause(exc)).lower():
            hint = (
                " The model branches on a tensor's value (data-dependent control flow): "
                "rewrite it with torch.where / torch.cond, or pass dynamo=False to trace "
                "the branch taken for the example."
            )
        raise ExportError(
            f"{label} failed while {failed.stage}: {describe_error(exc)}.{hint}"
        ) from exc
    if not staged.exists():
        raise ExportError(f"{label} wrote no file")


def _exporter_name(use_dynamo: bool) -> str:
    if use_dynamo:
        return "torch.export-based exporter (dynamo=True)"
    return "TorchScript-based exporter (dynamo=False)"


def _publish(workdir: Path, staged: Path, path: Path) -> None:
    """Move the verified files into ``path``'s folder, the ``.onnx`` file last."""
    for item in sorted(workdir.iterdir(), key=lambda p: p == staged):
        atomic_replace(item, path.parent / item.name)


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
        example: ``export_input_example``: dict, tuple/list or tensor of inputs. For a state
            built with ``apply_fn`` the graph runs ``apply_fn(model, example)``.
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

    Example::

        to_onnx(state, {"input_ids": ids, "attention_mask": mask}, "out/model.onnx")
        sess = onnxruntime.InferenceSession("out/model.onnx")
        (logits,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    """
    onnx, ort = _require_onnx(verify)
    module, args, kwargs, input_names = export_target(state_or_module, example)
    path = ensure_writable(path)  # a target that cannot work fails before tracing
    use_dynamo = dynamo if dynamo is not None else (opset is None or opset >= DYNAMO_MIN_OPSET)
    label = f"ONNX export ({_exporter_name(use_dynamo)}) of {type(module).__name__}"
    workdir = temporary_path(path)
    workdir.mkdir()
    staged = workdir / path.name
    try:
        with eval_mode(module), torch.no_grad():
            expected = flatten_outputs(run_eager(module, args, kwargs, "ONNX"))
            graph = _graph(module, (args, kwargs, input_names), expected, dynamic_batch, opset)
            _export(graph, staged, use_dynamo, label)
            if verify:
                _verify_onnx(onnx, ort, staged, graph, atol=atol, label=label)
            elif opset is not None:
                _check_opset(onnx, staged, opset, label)
        _publish(workdir, staged, path)
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


def _session(onnx: Any, ort: Any, staged: Path, opset: int | None, label: str) -> Any:
    """Checker and opset check, then an onnxruntime session on the CPU."""
    try:
        onnx.checker.check_model(str(staged), full_check=False)
    except Exception as exc:
        raise ExportError(
            f"{label}: onnx.checker rejected the file ({describe_error(exc)})"
        ) from exc
    if opset is not None:
        _check_opset(onnx, staged, opset, label)
    try:
        return ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(
            f"{label}: onnxruntime cannot load the file ({describe_error(exc)})"
        ) from exc


def _run_and_compare(
    session: Any,
    graph: _Graph,
    inputs: list[torch.Tensor],
    want: list[tuple[str, torch.Tensor]],
    what: str,
    *,
    atol: float,
    label: str,
) -> None:
    """Run the session on ``inputs`` (``what`` they are) and compare its outputs with ``want``."""
    graph_inputs = {i.name for i in session.get_inputs()}
    output_names = [o.name for o in session.get_outputs()]
    try:
        feed = {
            n: t.detach().cpu().numpy()
            for n, t in zip(graph.input_names, inputs)
            if n in graph_inputs
        }
        got = session.run(None, feed)
    except Exception as exc:
        raise ExportError(
            f"{label}: onnxruntime failed to run the file {what} ({describe_error(exc)})"
        ) from exc
    compare_outputs(
        want, list(zip(output_names, got)), atol=atol, label=f"{label}, onnxruntime {what}"
    )


def _verify_onnx(
    onnx: Any, ort: Any, staged: Path, graph: _Graph, *, atol: float, label: str
) -> None:
    """Checker, opset, then onnxruntime vs eager at the example batch and at another size."""
    session = _session(onnx, ort, staged, graph.opset, label)
    checks = {"atol": atol, "label": label}
    inputs = graph.inputs
    if graph.batch is None:
        _run_and_compare(session, graph, inputs, graph.expected, "on the example", **checks)
        return
    batch = inputs[0].shape[0]
    what = f"at the example batch ({batch})"
    _run_and_compare(session, graph, inputs, graph.expected, what, **checks)
    other = batch + 2 if batch > 1 else 3
    rows = torch.arange(other - 1, -1, -1) % batch  # the example's rows, reordered and repeated
    resized = [
        t.index_select(0, rows.to(t.device)) if b else t for t, b in zip(inputs, graph.batched)
    ]
    eager = flatten_outputs(_call(graph.adapter.module, resized, graph.adapter.kwarg_names))
    what = f"at another batch size ({other})"
    _run_and_compare(session, graph, resized, eager, what, **checks)
