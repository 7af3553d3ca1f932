"""How a model is called on a batch, and where its loss is found.

The batch convention (as the original trainer's): a dict batch calls ``model(**batch)``, a
tuple/list ``model(*batch)``, a tensor ``model(batch)``; a state's ``apply_fn(model, batch)``
replaces it. The model returns a loss tensor, a mapping or ``ModelOutput`` with ``"loss"``, or
outputs that the state's ``loss_fn(outputs, batch)`` turns into the loss.

Example:
    >>> split_batch({"x": torch.zeros(2)})
    ((), {'x': tensor([0., 0.])})
    >>> extract_loss({"loss": torch.tensor(0.5)}, None)
    tensor(0.5000)
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.func import functional_call

from medfunc.errors import BatchError, LossError


class module_mode:  # noqa: N801 - used as a function: ``with module_mode(module, True):``
    """Put ``module`` in train/eval mode for the block, then restore every submodule's own mode
    (so e.g. a BatchNorm a user froze with ``.eval()`` stays frozen). Nothing is walked when the
    module is already in that mode (a step's usual case). A class rather than a generator
    function, as a step enters it on every call.

    Args:
        module: the model.
        training: the mode for the block.
    """

    __slots__ = ("module", "training", "modes")

    def __init__(self, module: torch.nn.Module, training: bool) -> None:
        self.module = module
        self.training = training
        self.modes: list[tuple[torch.nn.Module, bool]] = []

    def __enter__(self) -> None:
        if self.module.training != self.training:
            self.modes = [(m, m.training) for m in self.module.modules()]
            self.module.train(self.training)

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def split_batch(batch: Any) -> tuple[tuple, dict]:
    """Map a batch to call arguments: dict -> ``model(**batch)``, tuple/list -> ``model(*batch)``,
    tensor -> ``model(batch)``.

    Args:
        batch: the batch.

    Returns:
        ``(args, kwargs)``.

    Example:
        >>> t = torch.ones(2)
        >>> split_batch({"x": t})
        ((), {'x': tensor([1., 1.])})
        >>> split_batch((t, t))
        ((tensor([1., 1.]), tensor([1., 1.])), {})
    """
    if isinstance(batch, Mapping):
        if not batch:
            raise BatchError(
                "the batch is an empty mapping; expected model inputs such as "
                "{'input_ids': ..., 'labels': ...}"
            )
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    raise BatchError(
        f"a batch must be a dict (called as model(**batch)), a tuple/list (model(*batch)) or a "
        f"tensor (model(batch)); got {type(batch).__name__}"
    )


_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_batch(module: torch.nn.Module, apply_fn: Callable | None, batch: Any) -> None:
    """Check, on the host, that ``batch`` fits how the model will be called.

    A tuple/list batch is called as ``model(*batch)``; when that does not fit the forward's
    signature (a ``TensorDataset`` of ``(x, y)`` for a ``Sequential``), say so and name
    ``apply_fn`` instead of letting the call fail inside the model.

    Raises:
        BatchError: the batch is not a dict, tuple/list or tensor (without ``apply_fn``), or a
            tuple/list does not fit ``model.forward``.
    """
    if apply_fn is not None:
        _applied(module, apply_fn)
        return
    if not isinstance(batch, (tuple, list)):
        split_batch(batch)  # refuses an empty mapping or a batch of another type
        return
    args = tuple(batch)
    signature = _SIGNATURES.get(module)
    if signature is None:
        try:
            signature = inspect.signature(module.forward)
        except (TypeError, ValueError):
            return
        _SIGNATURES[module] = signature
    try:
        signature.bind(*args)
    except TypeError as err:
        raise BatchError(
            f"the batch is a {type(batch).__name__} of {len(batch)}, called as model(*batch), "
            f"but {type(module).__name__}.forward{signature} does not take that ({err}). Pass "
            "apply_fn=lambda model, batch: model(batch[0]) (your calling convention) to "
            "init_state, and loss_fn=lambda outputs, batch: ... for the loss"
        ) from None


def check_devices(batch: Any, device: torch.device) -> None:
    items = (
        batch.items()
        if isinstance(batch, Mapping)
        else enumerate(batch if isinstance(batch, (tuple, list)) else [batch])
    )
    for key, value in items:
        if isinstance(value, torch.Tensor) and value.device.type != device.type:
            raise BatchError(
                f"batch[{key!r}] is on {value.device} but the state is on {device}; move the "
                "batch first, e.g. mf.data.to_device(batch, state.device)"
            )


def extract_loss(outputs: Any, batch: Any, loss_fn: Any = None) -> torch.Tensor:
    """The scalar loss of a forward pass, by the seed's contract.

    Args:
        outputs: the model's outputs: a loss tensor, a mapping / ModelOutput with ``"loss"``,
            or anything ``loss_fn`` understands.
        batch: the batch (passed to ``loss_fn``).
        loss_fn: optional ``loss_fn(outputs, batch) -> loss``.

    Returns:
        The 0-d floating-point loss tensor.

    Example:
        >>> batch = {"x": torch.ones(2, 4)}
        >>> extract_loss({"loss": torch.tensor(0.5)}, batch)
        tensor(0.5000)
        >>> extract_loss(torch.ones(2), batch, loss_fn=lambda outputs, batch: outputs.sum())
        tensor(2.)
    """
    if loss_fn is not None:
        loss, source = loss_fn(outputs, batch), "loss_fn(outputs, batch)"
    elif isinstance(outputs, torch.Tensor):
        loss, source = outputs, "the model's output"
    elif isinstance(outputs, Mapping) and outputs.get("loss") is not None:
        loss, source = outputs["loss"], "outputs['loss']"
    elif getattr(outputs, "loss", None) is not None:
        loss, source = outputs.loss, "outputs.loss"
    else:
        found = (
            f"a mapping with keys {sorted(outputs)}"
            if isinstance(outputs, Mapping)
            else type(outputs).__name__
        )
        hint = ""
        if isinstance(batch, Mapping) and "label" in batch and "labels" not in batch:
            hint = (
                " The batch has a 'label' entry: Hugging Face models compute their loss from "
                "'labels' (plural); rename the column."
            )
        raise LossError(
            f"the model's output holds no loss: expected a loss tensor or a mapping/ModelOutput "
            f"with a 'loss' entry, found {found}. Return the loss from the model or pass "
            f"loss_fn=lambda outputs, batch: ... to init_state.{hint}"
        )
    if not isinstance(loss, torch.Tensor):
        raise LossError(f"{source} must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise LossError(
            f"{source} must be a scalar (0-d) tensor, got shape {tuple(loss.shape)}; reduce it "
            "(e.g. .mean()) in the model or loss_fn"
        )
    if not loss.is_floating_point():
        raise LossError(f"{source} must be floating point, got dtype {loss.dtype}")
    # a 0-d loss is returned as is: a reshape would add a view (and its backward node) per step
    return loss if loss.dim() == 0 else loss.reshape(())


class _Applied(torch.nn.Module):
    """``apply_fn(model, batch)`` as a module's forward, so ``functional_call`` can bind the
    state's tensors (under the prefix ``"model."``) around a user's calling convention."""

    def __init__(self, model: torch.nn.Module, apply_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.apply_fn = apply_fn

    def forward(self, batch: Any) -> Any:
        return self.apply_fn(self.model, batch)


_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _applied(module: torch.nn.Module, apply_fn: Callable) -> _Applied:
    """The cached :class:`_Applied` of ``(module, apply_fn)`` (made on the host, before any
    tracing: dynamo cannot trace building a module)."""
    applied = _APPLIED.get(module, {}).get(apply_fn)
    if applied is None:
        applied = _Applied(module, apply_fn)
        _APPLIED.setdefault(module, {})[apply_fn] = applied
    return applied


def call_model(
    module: torch.nn.Module,
    apply_fn: Callable | None,
    batch: Any,
    bindings: tuple[Mapping, Mapping] | Mapping | None,
    *,
    strict: bool = True,
) -> Any:
    """Run the model on ``batch``: ``apply_fn(module, batch)`` when given, else by the batch
    convention (:func:`split_batch`); with ``bindings`` (params and buffers, or one mapping)
    bound through ``functional_call``, else with the module's own tensors.

    Args:
        module: the model.
        apply_fn: the state's ``apply_fn`` or None.
        batch: the batch.
        bindings: the tensors to bind, or None to call the module as it is.
        strict: ``functional_call``'s ``strict`` (every tensor of the module bound).

    Returns:
        The model's outputs.
    """
    if apply_fn is None:
        args, kwargs = split_batch(batch)
        if bindings is None:
            return module(*args, **kwargs)
        return functional_call(module, bindings, args, kwargs, strict=strict)
    if bindings is None:
        return apply_fn(module, batch)
    applied = _applied(module, apply_fn)
    parts = bindings if isinstance(bindings, tuple) else (bindings,)
    prefixed = tuple({f"model.{k}": v for k, v in part.items()} for part in parts)
    return functional_call(applied, prefixed, (batch,), strict=strict)
