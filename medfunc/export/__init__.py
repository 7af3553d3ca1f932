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

The package's modules: :mod:`~medfunc.export.torchscript` (:func:`to_torchscript`),
:mod:`~medfunc.export.onnx` (:func:`to_onnx`), :mod:`~medfunc.export.compare` (output names and
the comparison both verifications use) and :mod:`~medfunc.export.common` (what both share). Files
are moved into place with :func:`medfunc.atomic.atomic_replace`.

Example::

    from medfunc.export import to_onnx, to_torchscript

    example = {"input_ids": ids, "attention_mask": mask}
    to_torchscript(state, example, "out/model.pt")
    to_onnx(state, example, "out/model.onnx", opset=18)   # needs medfunc[onnx]; takes seconds
"""

from medfunc.export.compare import compare_outputs, flatten_outputs
from medfunc.export.onnx import DYNAMO_MIN_OPSET as DYNAMO_MIN_OPSET
from medfunc.export.onnx import EXTERNAL_DATA_BYTES as EXTERNAL_DATA_BYTES
from medfunc.export.onnx import to_onnx
from medfunc.export.torchscript import to_torchscript

__all__ = ["compare_outputs", "flatten_outputs", "to_onnx", "to_torchscript"]
