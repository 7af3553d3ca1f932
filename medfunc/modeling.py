"""Model options applied before :func:`~medfunc.state.init_state`: activation checkpointing
(by block or by module-name pattern), dropout override and channels_last.

Each helper changes the module in place and leaves its ``state_dict()`` keys alone, so
checkpoints stay interchangeable with the unprepared model.

Example:
    >>> layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, batch_first=True)
    >>> model = nn.TransformerEncoder(layer, num_layers=2)
    >>> model = prepare_model(model, gradient_checkpointing=True, dropout_prob=0.1)
    >>> state = mf.init_state(model, mf.optim.adamw(3e-5))
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medfunc.errors import ConfigError

__all__ = [
    "DEFAULT_RECOMPUTE_PATTERNS",
    "DROPOUT_TYPES",
    "HF_CHECKPOINTING",
    "enable_activation_recompute",
    "enable_gradient_checkpointing",
    "is_checkpointed",
    "prepare_model",
    "set_dropout",
    "to_channels_last",
]

#: What :func:`enable_gradient_checkpointing` returns when the model's own (Hugging Face) API
#: was used.
HF_CHECKPOINTING = "<hf>"
#: The module-name substrings :func:`enable_activation_recompute` wraps by default (those of
#: ``medvllm.training.trainer``).
DEFAULT_RECOMPUTE_PATTERNS: tuple[str, ...] = ("attention", "conv3d")
#: Module classes whose ``p`` :func:`set_dropout` overrides.
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_BLOCK_CONTAINERS = (nn.ModuleList, nn.Sequential)


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------


class _Rebind:
    """Checkpoint ``context_fn``: the recomputation sees the tensors the forward saw.

    medfunc's ``train_step`` runs the model through ``torch.func.functional_call`` and takes
    gradients after that call has returned, when the module holds its own parameters again (which
    a pure step does not update). Plain non-reentrant checkpointing would then recompute the
    activations from those stale weights and return wrong gradients. This context function
    captures, at forward time, the parameter and buffer tensors bound to every submodule of
    ``root`` and binds them again around the recomputation (buffers as copies, so BatchNorm
    running statistics are not updated twice). It is a no-op when nothing changed in between.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __call__(
        self,
    ) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        captured = [(m, dict(m._parameters), dict(m._buffers)) for m in self.root.modules()]
        return contextlib.nullcontext(), _rebound(captured)


@contextlib.contextmanager
def _rebound(captured: list[tuple[nn.Module, dict, dict]]) -> Iterator[None]:
    previous = [(m, dict(m._parameters), dict(m._buffers)) for m, _, _ in captured]
    for m, params, buffers in captured:
        for name, value in params.items():
            if name in m._parameters:
                m._parameters[name] = value
        for name, value in buffers.items():
            if name in m._buffers:
                m._buffers[name] = value.clone() if value is not None else None
    try:
        yield
    finally:
        for m, params, buffers in previous:
            for name, value in params.items():
                m._parameters[name] = value
            for name, value in buffers.items():
                m._buffers[name] = value


class _CheckpointedForward:
    """An instance-level ``forward`` running the module's own forward under non-reentrant
    activation checkpointing whenever gradients are being recorded (eval / no_grad: unchanged)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        # An instance-level forward set by someone else is kept; the class's own forward is
        # looked up when called, so copies and pickles need no bound method of another object.
        self.instance_forward: Callable[..., Any] | None = module.__dict__.get("forward")
        self.context_fn = _Rebind(module)

    @property
    def original(self) -> Callable[..., Any]:
        """The forward being checkpointed."""
        if self.instance_forward is not None:
            return self.instance_forward
        return types.MethodType(type(self.module).forward, self.module)

    @property
    def __wrapped__(self) -> Callable[..., Any]:  # inspect.signature() shows the real signature
        return self.original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.original
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if torch.compiler.is_compiling():
            # Compiled graphs take the parameters as inputs and recompute from them.
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=self.context_fn, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether :func:`enable_gradient_checkpointing` wrapped this (sub)module's forward.

    Args:
        module: a module.

    Returns:
        True if its ``forward`` runs under medfunc's activation checkpointing.

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, batch_first=True)
        >>> encoder = nn.TransformerEncoder(layer, num_layers=2)
        >>> names = enable_gradient_checkpointing(encoder)
        >>> is_checkpointed(encoder.layers[0]), is_checkpointed(encoder)
        (True, False)
    """
    return isinstance(module.__dict__.get("forward"), _CheckpointedForward)


def _hf_enable(model: nn.Module) -> bool:
    """Use the model's own API (Hugging Face ``PreTrainedModel``); False when there is none."""
    if getattr(model, "supports_gradient_checkpointing", True) is False:
        return False
    kwargs = {"use_reentrant": False, "context_fn": _Rebind(model)}
    try:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        if callable(enable):
            enable(activation_checkpointing_kwargs=kwargs)
            return True
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            return False
        try:
            accepts = "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters
        except (TypeError, ValueError):
            accepts = False
        if accepts:
            enable(gradient_checkpointing_kwargs=kwargs)
        else:  # transformers < 4.35: its own (reentrant) checkpointing
            enable()
        return True
    except ValueError:  # "... does not support / is not compatible with gradient checkpointing"
        return False


def _default_blocks(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Candidate blocks: non-leaf children of a ModuleList/Sequential, and modules whose class
    name contains "Block" or "Attention" or ends with "Layer"."""
    for parent_name, parent in model.named_modules():
        if isinstance(parent, _BLOCK_CONTAINERS):
            for child_name, child in parent.named_children():
                if next(child.children(), None) is not None:
                    yield (f"{parent_name}.{child_name}" if parent_name else child_name), child
    for name, module in model.named_modules():
        cls = type(module).__name__
        if name and ("Block" in cls or "Attention" in cls or cls.endswith("Layer")):
            yield name, module


def _matching(model: nn.Module, patterns: list[str]) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if name and any(
            fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(type(module).__name__, p)
            for p in patterns
        ):
            yield name, module


def enable_gradient_checkpointing(
    model: nn.Module, patterns: str | Iterable[str] | None = None
) -> list[str]:
    """Recompute chosen blocks' activations in the backward pass instead of storing them.

    Without ``patterns``, a model with a Hugging Face API (``activation_checkpointing_enable`` /
    ``gradient_checkpointing_enable``) gets it, non-reentrant; otherwise medfunc wraps the
    *repeated blocks*: the outermost modules that are non-leaf children of an ``nn.ModuleList`` or
    ``nn.Sequential`` (``encoder.layers.0``, ``blocks.3``), or whose class name contains
    ``"Block"`` or ``"Attention"`` or ends with ``"Layer"`` (``TransformerEncoderLayer``,
    ``BertLayer``; not ``LayerNorm``). A block nested inside a chosen one is not wrapped again.

    Wrapping replaces the block's ``forward`` with an instance attribute that runs the original
    under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` when gradients are
    recorded. No module is inserted: ``state_dict()`` keys are unchanged. Calling this again
    wraps nothing twice. It works under ``torch.func.functional_call`` + ``torch.autograd.grad``
    (medfunc's ``train_step``): the recomputation uses the tensors the forward used. Blocks
    holding BatchNorm are fine (running statistics are updated once). RNG state (dropout) is
    replayed by ``checkpoint``, so gradients equal the unwrapped model's.

    Args:
        model: the model (changed in place).
        patterns: glob patterns (``fnmatch``, case-sensitive) matched against qualified
            submodule names (``"encoder.layer.*"``) or class names (``"BertLayer"``); the
            outermost matches are wrapped. Given patterns always use medfunc's wrapping, also on
            Hugging Face models.

    When neither the Hugging Face API nor the block rule applies (and no ``patterns`` were
    given), ``gradient_checkpointing = True`` is set on every (sub)module that has that
    attribute, as the original trainer's toggle did, with a ``UserWarning``; a model without
    such an attribute is left as it is (also with the warning, never an error).

    Returns:
        The qualified names of the checkpointed submodules (including ones wrapped by an earlier
        call), ``["<hf>"]`` when the model's own API was used, or the names of the modules
        whose ``gradient_checkpointing`` attribute was set (``""``: the model itself).

    Raises:
        ConfigError: given ``patterns`` matched nothing (the message lists the model's
            top-level children).

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, batch_first=True)
        >>> enable_gradient_checkpointing(nn.TransformerEncoder(layer, 6))
        ['layers.0', 'layers.1', 'layers.2', 'layers.3', 'layers.4', 'layers.5']
        >>> model = nn.Module()
        >>> model.encoder = nn.Module()
        >>> model.encoder.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        >>> enable_gradient_checkpointing(model, ["encoder.blocks.*"])
        ['encoder.blocks.0', 'encoder.blocks.1']
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if patterns is None and _hf_enable(model):
        return [HF_CHECKPOINTING]
    pattern_list = list(patterns) if patterns is not None else None
    candidates = _matching(model, pattern_list) if pattern_list else _default_blocks(model)
    chosen: dict[str, nn.Module] = {}
    for name, module in sorted(candidates, key=lambda item: item[0].count(".")):
        if name in chosen or any(name.startswith(f"{outer}.") for outer in chosen):
            continue
        chosen[name] = module
    if not chosen and not pattern_list:
        return _attribute_toggle(model)
    if not chosen:
        children = [n for n, _ in model.named_children()]
        raise ConfigError(
            f"gradient checkpointing: no submodule of {type(model).__name__} matched patterns "
            f"{pattern_list}; its top-level children are {children}. Pass "
            "patterns=['<name glob or class name>'] naming the repeated blocks to checkpoint"
        )
    return _wrap(model, chosen)


def _wrap(model: nn.Module, chosen: dict[str, nn.Module]) -> list[str]:
    """Checkpoint the ``chosen`` submodules; their names in model order."""
    names = []
    for name, module in model.named_modules():
        if name in chosen:
            if not is_checkpointed(module):
                module.forward = _CheckpointedForward(module)
            names.append(name)
    return names


def _attribute_toggle(model: nn.Module) -> list[str]:
    """Set ``gradient_checkpointing = True`` on the (sub)modules that have that attribute, with
    a warning: the model's own code decides what it does with the flag."""
    flagged = [n for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")]
    for name in flagged:
        model.get_submodule(name).gradient_checkpointing = True
    children = [n for n, _ in model.named_children()]
    if flagged:
        what = (
            f"set gradient_checkpointing=True on {[n or '<model>' for n in flagged]}; whether "
            "activations are recomputed is up to the model's own forward"
        )
    else:
        what = "nothing was changed: activations are stored as without the option"
    warnings.warn(
        f"gradient checkpointing: {type(model).__name__} has no Hugging Face "
        "gradient_checkpointing_enable and no repeated blocks medfunc recognises (top-level "
        f"children {children}); {what}. Pass patterns (or activation_recompute_patterns) "
        "naming the blocks to checkpoint them with medfunc",
        UserWarning,
        stacklevel=3,
    )
    return flagged


def enable_activation_recompute(
    model: nn.Module, patterns: str | Iterable[str] = DEFAULT_RECOMPUTE_PATTERNS
) -> list[str]:
    """Recompute in the backward pass the submodules whose qualified name contains a pattern.

    A submodule is chosen when one of ``patterns`` is a substring of its qualified name
    (``"encoder.layer.0.attention"`` contains ``"attention"``); top-level children count
    (``model.attention`` is wrapped). Only the outermost matches are wrapped, and a module
    inside one already checkpointed (by :func:`enable_gradient_checkpointing`) is left alone.
    Wrapping is the same as :func:`enable_gradient_checkpointing`'s: non-reentrant
    ``torch.utils.checkpoint``, no module inserted, ``state_dict()`` keys unchanged, gradients
    equal to the unwrapped model's.

    Args:
        model: the model (changed in place).
        patterns: substrings of qualified module names (case-sensitive); default
            :data:`DEFAULT_RECOMPUTE_PATTERNS`.

    Returns:
        The qualified names of the submodules now recomputed (a warning when there is none).

    Raises:
        ConfigError: ``patterns`` is empty or holds something other than non-empty strings.

    Example:
        >>> model = nn.Module()
        >>> model.attention = nn.Linear(8, 8)
        >>> model.decoder = nn.Module()
        >>> model.decoder.conv3d = nn.Conv3d(1, 1, 1)
        >>> enable_activation_recompute(model)
        ['attention', 'decoder.conv3d']
        >>> list(model.state_dict())[:2]
        ['attention.weight', 'attention.bias']
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    pattern_list = list(patterns)
    if not pattern_list or not all(isinstance(p, str) and p for p in pattern_list):
        raise ConfigError(
            f"activation_recompute_patterns must be non-empty strings (substrings of module "
            f"names such as 'attention'), got {pattern_list!r}"
        )
    covered = [n for n, m in model.named_modules() if is_checkpointed(m)]
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=True):
        if not name or not any(p in name for p in pattern_list):
            continue
        outer = [*covered, *chosen]
        if any(name.startswith(f"{o}.") for o in outer if o):
            continue
        chosen[name] = module
    if not chosen:
        warnings.warn(
            f"activation recompute: no submodule name of {type(model).__name__} contains any "
            f"of {pattern_list}; nothing is recomputed. Module names look like "
            f"{[n for n, _ in model.named_modules() if n][:6]}",
            UserWarning,
            stacklevel=2,
        )
        return []
    return _wrap(model, chosen)


# --------------------------------------------------------------------------------------------
# Dropout, channels_last
# --------------------------------------------------------------------------------------------


def set_dropout(model: nn.Module, p: float) -> int:
    """Set the drop probability of every dropout layer.

    Covers ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout`` (and
    subclasses) and the attention dropout of ``nn.MultiheadAttention`` (its ``dropout`` float).
    Functional dropout calls inside a model's code and a Hugging Face config's values are not
    changed.

    Args:
        model: the model (changed in place).
        p: the new probability, ``0 <= p < 1``.

    Returns:
        How many modules were changed.

    Raises:
        ConfigError: ``p`` is not a number in ``[0, 1)``.

    Example:
        >>> model = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32)
        >>> set_dropout(model, 0.0)   # deterministic fine-tuning
        4
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ConfigError(
            f"dropout_prob must be a number with 0 <= p < 1, got {p!r}; use 0.0 to disable dropout"
        )
    p = float(p)
    count = 0
    for module in model.modules():
        if isinstance(module, DROPOUT_TYPES):
            module.p = p
            count += 1
        elif isinstance(module, nn.MultiheadAttention):
            module.dropout = p
            count += 1
    return count


def to_channels_last(model: nn.Module, device: str | torch.device | None = None) -> bool:
    """Convert 4-d parameters and buffers to ``torch.channels_last`` when running on CUDA.

    channels_last speeds up convolutions on CUDA (tensor cores); on other devices this is a
    no-op with a warning. Feed 4-d inputs in the same format for the full benefit
    (``x.to(memory_format=torch.channels_last)``).

    Args:
        model: the model (changed in place).
        device: where the model will run (default: where its parameters are).

    Returns:
        True if the model was converted.

    Example (on a CUDA machine)::

        cnn = torch.nn.Conv2d(3, 8, kernel_size=3)
        to_channels_last(cnn, "cuda")  # True
    """
    if device is None:
        first = next(iter((*model.parameters(), *model.buffers())), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda":
        warnings.warn(
            f"channels_last only benefits CUDA; the model runs on {device.type}, so its memory "
            "format is left unchanged",
            UserWarning,
            stacklevel=2,
        )
        return False
    model.to(memory_format=torch.channels_last)
    return True


def prepare_model(
    model: nn.Module,
    *,
    gradient_checkpointing: bool | str | Iterable[str] = False,
    activation_recompute: bool | Iterable[str] = False,
    channels_last: bool = False,
    dropout_prob: float | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Apply the model options (what the Trainer calls before ``init_state``).

    Args:
        model: the model (changed in place).
        gradient_checkpointing: True for :func:`enable_gradient_checkpointing`'s default, or
            patterns naming the blocks.
        activation_recompute: True for :func:`enable_activation_recompute` with
            :data:`DEFAULT_RECOMPUTE_PATTERNS`, or the name substrings to use.
        channels_last: convert with :func:`to_channels_last` (CUDA only).
        dropout_prob: if not None, :func:`set_dropout` to this probability.
        device: where the model will run, for ``channels_last`` (default: where its parameters
            are). The model is not moved.

    Returns:
        ``model``.

    Raises:
        ConfigError: invalid ``dropout_prob``, or given patterns that match no block.

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=2)
        >>> model = prepare_model(model, gradient_checkpointing=True, dropout_prob=0.0)
        >>> model.layers[0].dropout.p
        0.0
    """
    if dropout_prob is not None:
        set_dropout(model, dropout_prob)
    if gradient_checkpointing is not False and gradient_checkpointing is not None:
        patterns = None if gradient_checkpointing is True else gradient_checkpointing
        enable_gradient_checkpointing(model, patterns)
    if activation_recompute is not False and activation_recompute is not None:
        if activation_recompute is True:
            enable_activation_recompute(model)
        else:
            enable_activation_recompute(model, activation_recompute)
    if channels_last:
        to_channels_last(model, device)
    return model
