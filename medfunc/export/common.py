"""What both exporters share: the module and example they export, eval mode, quiet exporters and
error reasons short enough for a message."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from medfunc.errors import ExportError
from medfunc.state import TrainState, bind_module

__all__ = [
    "describe_error",
    "eval_mode",
    "export_target",
    "module_device",
    "quiet_exporter",
    "resolve_module",
    "root_cause",
    "run_eager",
    "split_example",
]

_QUIET_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch.fx.experimental.symbolic_shapes",
    "onnxscript",
)


def resolve_module(state_or_module: TrainState | torch.nn.Module) -> torch.nn.Module:
    """The module to export: a state's module with the state's values bound, or the module."""
    if isinstance(state_or_module, TrainState):
        return bind_module(state_or_module)
    if isinstance(state_or_module, torch.nn.Module):
        return state_or_module
    raise ExportError(
        f"export expects a TrainState or a torch.nn.Module, got {type(state_or_module).__name__}"
    )


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for a module without)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def split_example(example: Any, device: torch.device) -> tuple[tuple, dict, list[str]]:
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


class _AppliedExport(torch.nn.Module):
    """A state's ``apply_fn(model, inputs)`` as a forward over positional tensors: the exported
    graph takes the example's tensors in order and rebuilds the example's structure (a dict with
    its keys, a tuple, or the lone tensor) before calling ``apply_fn``."""

    def __init__(self, model: torch.nn.Module, apply_fn: Callable, example: Any) -> None:
        super().__init__()
        self.model = model
        self.apply_fn = apply_fn
        self.keys = [str(k) for k in example] if isinstance(example, Mapping) else None
        self.lone_tensor = isinstance(example, torch.Tensor)

    def forward(self, *inputs: torch.Tensor) -> Any:
        if self.keys is not None:
            return self.apply_fn(self.model, dict(zip(self.keys, inputs)))
        return self.apply_fn(self.model, inputs[0] if self.lone_tensor else tuple(inputs))


def export_target(
    state_or_module: TrainState | torch.nn.Module, example: Any
) -> tuple[torch.nn.Module, tuple, dict, list[str]]:
    """The module to export and its example as ``(module, args, kwargs, input names)``.

    A state with an ``apply_fn`` exports ``apply_fn(model, example)``: the graph's inputs are the
    example's tensors, positional in the example's order (a dict's keys name them), so the
    exported model is called as the state calls its model. Otherwise the model itself is
    exported with the example as its inputs (:func:`split_example`).

    Args:
        state_or_module: a :class:`TrainState` (its values bound into its module) or a module.
        example: ``export_input_example``: dict, tuple/list or tensor.

    Returns:
        ``(module, args, kwargs, input_names)`` with the tensors on the module's device.

    Example:
        >>> state = mf.init_state(torch.nn.Linear(4, 2), mf.optim.sgd(0.1),
        ...                       apply_fn=lambda model, batch: model(batch[0]))
        >>> module, args, kwargs, names = export_target(state, (torch.randn(3, 4),))
        >>> module(*args).shape, names
        (torch.Size([3, 2]), ['input_0'])
    """
    module = resolve_module(state_or_module)
    args, kwargs, names = split_example(example, module_device(module))
    apply_fn = getattr(state_or_module, "apply_fn", None)
    if apply_fn is None:
        return module, args, kwargs, names
    return _AppliedExport(module, apply_fn, example), (*args, *kwargs.values()), {}, names


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block; afterwards every submodule gets its own previous mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of ``exc``'s ``__cause__`` chain."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def describe_error(exc: BaseException, limit: int = 600) -> str:
    """``"Type: message"`` of the root cause, its first lines, cut at ``limit`` characters."""
    root = root_cause(exc)
    text = " ".join(line.strip() for line in str(root).strip().splitlines()[:4] if line.strip())
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


def run_eager(module: torch.nn.Module, args: tuple, kwargs: dict, exporter: str) -> Any:
    """The eager outputs on the example; an ExportError naming ``exporter`` if the model raises."""
    try:
        return module(*args, **kwargs)
    except Exception as exc:  # the example does not fit the model
        raise ExportError(
            f"{exporter} export of {type(module).__name__} failed: the model raised on "
            f"export_input_example ({describe_error(exc)}); give an example matching the forward "
            "signature"
        ) from exc


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
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
