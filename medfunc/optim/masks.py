"""Weight-decay masks and per-name learning-rate multipliers, and the parameter groups they make.

Parameters are grouped, as ``torch.optim`` param_groups, by ``(lr multiplier, weight decay)``;
each group is one kernel call. Groups keep the order in which their first parameter appears in
the model, and parameters keep model order inside a group.

Example:
    >>> names = ["encoder.weight", "encoder.bias", "ln_f.weight", "head.weight"]
    >>> [g.names for g in param_groups(names, 0.01, "default", [("head", 10.0)])]
    [('encoder.weight',), ('encoder.bias', 'ln_f.weight'), ('head.weight',)]
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from medfunc import validation
from medfunc.errors import ConfigError

DecayMask = str | None | Callable[[str], bool] | Sequence[str]
LrMultipliers = Sequence[tuple[str, float]] | Mapping[str, float] | None

#: Name components (dot-separated) holding one of these substrings get no weight decay by default.
DEFAULT_NO_DECAY_SUBSTRINGS = ("bias", "norm", "LayerNorm")
_LN_COMPONENT = re.compile(r"^ln(?:$|_|\d)")


class ParamGroup(NamedTuple):
    """One parameter group: one kernel call, one ``torch.optim`` param_group.

    Attributes:
        names: the parameter names in the group, in model order.
        lr_multiplier: factor applied to the base LR.
        weight_decay: the group's weight decay (0.0 for masked-out parameters).
    """

    names: tuple[str, ...]
    lr_multiplier: float
    weight_decay: float


def default_decay_mask(name: str) -> bool:
    """The default weight-decay mask: True (decay) unless the name marks a bias or a norm.

    A parameter gets no decay when one of its dot-separated name components contains ``bias``,
    ``norm`` or ``LayerNorm`` (case-sensitive), or is ``ln`` or starts with ``ln_`` / ``ln``
    followed by a digit (``ln_1``, ``ln_f``, ``ln2``). ``kernel`` or ``lnk`` do not match.

    Args:
        name: dotted parameter name, e.g. ``"encoder.layer.0.LayerNorm.weight"``.

    Returns:
        True if the parameter should be weight-decayed.

    Example:
        >>> default_decay_mask("h.0.ln_1.weight"), default_decay_mask("h.0.mlp.kernel")
        (False, True)
    """
    for part in name.split("."):
        if any(s in part for s in DEFAULT_NO_DECAY_SUBSTRINGS) or _LN_COMPONENT.match(part):
            return False
    return True


_DECAY_MASK_ALLOWED = (
    "'default', None, a callable name -> bool (True = decay) or a non-empty list of non-empty "
    "substrings whose parameters get no decay"
)


def validate_decay_mask(decay_mask: DecayMask) -> DecayMask:
    """Check the form of a ``decay_mask`` argument (which names it matches is checked at init).

    Args:
        decay_mask: "default", None (decay everything), a callable ``name -> bool`` (True =
            decay) or a list of substrings whose parameters get no decay.

    Returns:
        The mask in canonical, hashable form (a list becomes a tuple).

    Raises:
        ConfigError: any other value (a bare string, an empty list, ...).

    Example:
        >>> validate_decay_mask(["bias", "norm"])
        ('bias', 'norm')
    """
    if decay_mask is None or decay_mask == "default" or callable(decay_mask):
        return decay_mask
    if isinstance(decay_mask, str):
        raise validation.fail(
            "decay_mask", _DECAY_MASK_ALLOWED, decay_mask, "; wrap one substring in a list"
        )
    is_list = isinstance(decay_mask, Sequence)
    if not is_list or not all(isinstance(part, str) and part for part in decay_mask):
        raise validation.fail("decay_mask", _DECAY_MASK_ALLOWED, decay_mask)
    if not decay_mask:
        raise validation.fail(
            "decay_mask", _DECAY_MASK_ALLOWED, decay_mask, "; pass None to decay every parameter"
        )
    return tuple(decay_mask)


def _decays(decay_mask: DecayMask, name: str) -> bool:
    if decay_mask is None:
        return True
    if decay_mask == "default":
        return default_decay_mask(name)
    if callable(decay_mask):
        result = decay_mask(name)
        if not isinstance(result, bool):
            raise ConfigError(
                f"decay_mask callable must return a bool, returned {result!r} for {name!r}"
            )
        return result
    return not any(s in name for s in decay_mask)


def _multiplier(lr_multipliers: tuple[tuple[str, float], ...], name: str) -> float:
    for pattern, mult in lr_multipliers:
        if pattern in name:
            return mult
    return 1.0


def check_patterns(
    names: Sequence[str],
    decay_mask: DecayMask,
    lr_multipliers: tuple[tuple[str, float], ...],
) -> None:
    """Raise :class:`ConfigError` for mask or multiplier patterns that name no parameter.

    A ``decay_mask`` list whose substrings match no parameter at all is an error; single
    substrings that match nothing (while others do) give a ``UserWarning``. Every
    ``lr_multipliers`` pattern must match at least one parameter.

    Args:
        names: the trainable parameter names.
        decay_mask: as given to the optimizer.
        lr_multipliers: validated multipliers.
    """
    if isinstance(decay_mask, tuple):
        unmatched = [s for s in decay_mask if not any(s in n for n in names)]
        if len(unmatched) == len(decay_mask):
            raise ConfigError(
                f"decay_mask substrings {list(decay_mask)} match no trainable parameter, so "
                f"every parameter would be decayed; parameter names look like "
                f"{list(names[:4])}. Fix the substrings or pass decay_mask=None."
            )
        if unmatched:
            warnings.warn(
                f"decay_mask substrings {unmatched} match no trainable parameter",
                UserWarning,
                stacklevel=3,
            )
    unmatched_lr = [p for p, _ in lr_multipliers if not any(p in n for n in names)]
    if unmatched_lr:
        raise ConfigError(
            f"lr_multipliers patterns {unmatched_lr} match no trainable parameter; parameter "
            f"names look like {list(names[:4])}"
        )


def param_groups(
    names: Sequence[str],
    weight_decay: float,
    decay_mask: DecayMask,
    lr_multipliers: LrMultipliers,
) -> tuple[ParamGroup, ...]:
    """Group parameter names by ``(lr multiplier, weight decay)``, as torch param_groups.

    Checks and normalises ``decay_mask`` and ``lr_multipliers``, then :func:`group_names`.

    Args:
        names: trainable parameter names in model order.
        weight_decay: the optimizer's weight decay (applied where the mask says decay).
        decay_mask: see :func:`validate_decay_mask`.
        lr_multipliers: ``[(substring, multiplier), ...]`` or a mapping; the first matching
            pattern wins.

    Returns:
        The groups, ordered by the first appearance of their key in ``names``.

    Raises:
        ConfigError: an invalid ``decay_mask`` or ``lr_multipliers``.

    Example:
        >>> groups = param_groups(["fc.weight", "fc.bias"], 0.1, "default", None)
        >>> [(g.names, g.weight_decay) for g in groups]
        [(('fc.weight',), 0.1), (('fc.bias',), 0.0)]
    """
    return group_names(
        names,
        weight_decay,
        validate_decay_mask(decay_mask),
        validation.name_multipliers("lr_multipliers", lr_multipliers),
    )


def group_names(
    names: Sequence[str],
    weight_decay: float,
    decay_mask: DecayMask,
    lr_multipliers: tuple[tuple[str, float], ...],
) -> tuple[ParamGroup, ...]:
    """:func:`param_groups` for arguments already checked (as an ``OptimizerSpec`` holds them).

    Args:
        names: trainable parameter names in model order.
        weight_decay: the optimizer's weight decay (applied where the mask says decay).
        decay_mask: a mask :func:`validate_decay_mask` returned.
        lr_multipliers: ``((substring, multiplier), ...)`` as
            :func:`~medfunc.validation.name_multipliers` returns them.

    Returns:
        The groups, ordered by the first appearance of their key in ``names``.

    Example:
        >>> [g.names for g in group_names(["fc.weight", "fc.bias"], 0.0, None, ())]
        [('fc.weight', 'fc.bias')]
    """
    groups: dict[tuple[float, float], list[str]] = {}
    for name in names:
        wd = float(weight_decay) if weight_decay and _decays(decay_mask, name) else 0.0
        groups.setdefault((_multiplier(lr_multipliers, name), wd), []).append(name)
    return tuple(ParamGroup(tuple(ns), m, wd) for (m, wd), ns in groups.items())
