"""Hugging Face ``datasets.Dataset`` as Trainer data: only the columns the model takes.

A ``datasets.Dataset`` is a map-style dataset, so the Trainer batches its rows like any other
(see :mod:`medfunc.trainer_data`). Its rows usually hold more than the model's inputs: the raw
text next to ``input_ids``, an id, a date. As the Hugging Face Trainer does with
``remove_unused_columns``, :func:`select_model_inputs` drops the columns that the model's
``forward`` does not name (a ``PeftModel``'s wrapped model's ``forward``), logging which ones,
so ``model(**batch)`` gets exactly its inputs. A model whose ``forward`` takes ``**kwargs``
gets every column. Rows must come as tensors (``dataset.set_format("torch")``) or NumPy arrays:
the default Python lists would be batched position by position.

Example::

    ds = datasets.Dataset.from_dict({"text": texts, "input_ids": ids, "labels": labels})
    ds.set_format("torch")
    trainer.train(ds)          # batches hold input_ids and labels; "text" is dropped
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

import torch

from medfunc.errors import ConfigError
from medfunc.peft_models import forward_module

__all__ = ["TENSOR_FORMATS", "is_hf_dataset", "model_input_names", "select_model_inputs"]

log = logging.getLogger("medfunc.trainer")

#: ``datasets`` formats whose rows the default collate batches correctly.
TENSOR_FORMATS = ("torch", "numpy")
#: Label columns the Hugging Face data collators rename to ``labels``.
_RENAMED_LABELS = ("label", "label_ids")


def is_hf_dataset(data: Any) -> bool:
    """Whether ``data`` is a ``datasets.Dataset`` (False whenever ``datasets`` is not imported).

    Args:
        data: the Trainer's data.

    Returns:
        True for a ``datasets.Dataset``.

    Example:
        >>> is_hf_dataset([{"x": 1}])
        False
    """
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(data, datasets.Dataset)


def model_input_names(model: torch.nn.Module) -> list[str] | None:
    """The keyword inputs of ``model``'s ``forward``, or None when it takes ``**kwargs``.

    Args:
        model: a model (a ``PeftModel`` is looked through to the model it wraps).

    Returns:
        The parameter names of ``forward`` in order, or None.

    Example:
        >>> model_input_names(torch.nn.Linear(2, 2))
        ['input']
    """
    signature = inspect.signature(forward_module(model).forward)
    kinds = [p.kind for p in signature.parameters.values()]
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return None
    return [
        name
        for name, p in signature.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def _returned_columns(data: Any) -> list[str]:
    """The columns a row of ``data`` holds under its current format."""
    fmt = data.format
    shown = list(fmt["columns"] or data.column_names)
    if fmt.get("output_all_columns"):
        shown += [c for c in data.column_names if c not in shown]
    return shown


def select_model_inputs(data: Any, model: torch.nn.Module, role: str) -> Any:
    """``data`` less the columns ``model`` does not take, when it is a ``datasets.Dataset``.

    Args:
        data: the Trainer's data (anything other than a ``datasets.Dataset`` is returned as is).
        model: the model trained or evaluated.
        role: the argument's name for messages, e.g. ``"train_dataset"``.

    Returns:
        ``data.remove_columns(unused)`` (the format is kept), or ``data``.

    Raises:
        ConfigError: the dataset's rows are not tensors or arrays (no ``set_format``); it has a
            ``label``/``label_ids`` column where the model takes ``labels``; or none of its
            columns is an input of the model.

    Example::

        ds = select_model_inputs(ds.with_format("torch"), model, "train_dataset")
        ds.column_names            # ['input_ids', 'attention_mask', 'labels']
    """
    if not is_hf_dataset(data):
        return data
    kind = data.format["type"]
    if kind not in TENSOR_FORMATS:
        raise ConfigError(
            f"{role} is a datasets.Dataset whose rows are Python objects (format type "
            f"{kind!r}), which batching would stack position by position; call "
            f"{role}.set_format('torch') (or pass {role}.with_format('torch'))"
        )
    accepted = model_input_names(model)
    if accepted is None:
        return data
    columns = _returned_columns(data)
    unused = [c for c in columns if c not in accepted]
    name = type(forward_module(model)).__name__
    renamed = [c for c in _RENAMED_LABELS if c in unused]
    if renamed and "labels" in accepted and "labels" not in columns:
        raise ConfigError(
            f"{role} has a {renamed[0]!r} column but {name}.forward takes 'labels' (medfunc "
            f"does not rename columns); call {role} = {role}.rename_column({renamed[0]!r}, "
            "'labels')"
        )
    if len(unused) == len(columns):
        raise ConfigError(
            f"none of the columns of {role} ({columns}) is an input of {name}.forward "
            f"({accepted}); rename the columns to the model's inputs "
            f"({role}.rename_column(old, new))"
        )
    if unused:
        log.info("%s: dropped the columns %s, which %s.forward does not take", role, unused, name)
        data = data.remove_columns(unused)
    return data
