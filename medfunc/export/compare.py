"""Naming a model's outputs and comparing an exported model's outputs with the eager ones."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from medfunc.errors import ExportError

__all__ = ["compare_outputs", "flatten_outputs"]


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
        >>> a, b, c = torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4)
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


def _align(
    want: list[tuple[str, Any]], got: list[tuple[str, Any]], label: str
) -> list[tuple[str, Any]]:
    """``got`` in ``want``'s order: refused if the counts differ, matched by name when both
    sides hold the same names in another order (e.g. a dict)."""
    if len(want) != len(got):
        raise ExportError(
            f"{label}: the exported model returns {len(got)} output(s) "
            f"{[n for n, _ in got]} but the eager model returns {len(want)} {[n for n, _ in want]}"
        )
    want_names, got_names = [n for n, _ in want], [n for n, _ in got]
    if want_names != got_names and sorted(want_names) == sorted(got_names):
        by_name = dict(got)
        return [(n, by_name[n]) for n in want_names]
    return got


def _difference(name: str, ref: Any, out: Any, label: str) -> tuple[float, bool]:
    """The largest absolute difference of one output, and whether it must be exact (integer
    and bool outputs); NaN or infinity where the other side differs counts as infinite."""
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
        return (float(diffs.max()) if diffs.numel() else 0.0), True
    a, b = ref_t.to(torch.float64), out_t.to(torch.float64)
    finite = torch.isfinite(a) & torch.isfinite(b)
    same_special = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if bool((~finite & ~same_special).any()):
        return math.inf, False  # NaN/inf where the other side has a number (or another special)
    diffs = (a - b).abs()[finite]
    return (float(diffs.max()) if diffs.numel() else 0.0), False


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
        >>> a = torch.tensor([[0.5, -1.0]])
        >>> b = (a + 2**-20).numpy()   # e.g. what onnxruntime returned
        >>> compare_outputs([("logits", a)], [("logits", b)], atol=1e-4, label="ONNX")
        9.5367431640625e-07
    """
    want = _as_named_pairs(expected)
    got = _align(want, _as_named_pairs(actual), label)
    worst = 0.0
    failures: list[tuple[float, str]] = []
    for (name, ref), (_, out) in zip(want, got):
        diff, exact = _difference(name, ref, out, label)
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
