"""The checkers every configuration value goes through.

Each checker is a pure function ``check(field, value, ...)`` that returns the value in its
canonical form (a ``float`` for a number, a tuple for a pair, ...) or raises
:class:`~medfunc.errors.ConfigError` naming the field, the value and what is allowed::

    learning_rate must be a finite number >= 0; got -1

Optimizers, schedules, clipping, masks, precision policies, :class:`TrainerConfig` and the
registries (:func:`check_kwargs`) all check through this module, so a value is judged and
reported the same way wherever it is given.

Example:
    >>> non_negative_float("learning_rate", 3e-4)
    0.0003
    >>> non_negative_float("learning_rate", -1)
    Traceback (most recent call last):
    ...
    medfunc.errors.ConfigError: learning_rate must be a finite number >= 0; got -1
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from medfunc.errors import ConfigError

__all__ = [
    "betas",
    "boolean",
    "check_kwargs",
    "check_names",
    "fail",
    "fraction",
    "instance_of",
    "integer",
    "name_multipliers",
    "non_negative_float",
    "non_negative_int",
    "number",
    "one_of",
    "positive_float",
    "positive_int",
    "probability",
]


def fail(field: str, allowed: str, value: Any, hint: str = "") -> ConfigError:
    """The error for ``field`` holding ``value`` where ``allowed`` was expected (not raised).

    Args:
        field: the option's name as the user wrote it, e.g. ``"TrainerConfig.batch_size"``.
        allowed: what the option accepts, phrased to follow "must be".
        value: the rejected value (shown with ``repr``).
        hint: text appended to the message, e.g. ``"; did you mean 'adamw'?"``.

    Returns:
        A :class:`ConfigError` reading ``"<field> must be <allowed>; got <value!r><hint>"``.

    Example:
        >>> str(fail("batch_size", "an integer >= 1", 0))
        'batch_size must be an integer >= 1; got 0'
    """
    return ConfigError(f"{field} must be {allowed}; got {value!r}{hint}")


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` to Python, not to a config)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bounds_text(
    minimum: float | None,
    maximum: float | None,
    exclusive_minimum: bool,
    exclusive_maximum: bool,
) -> str:
    """The bounds as the message states them, e.g. ``"> 0 and <= 1"``."""
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if exclusive_minimum else '>='} {minimum:g}")
    if maximum is not None:
        bounds.append(f"{'<' if exclusive_maximum else '<='} {maximum:g}")
    return " and ".join(bounds)


def _in_bounds(
    x: float,
    minimum: float | None,
    maximum: float | None,
    exclusive_minimum: bool,
    exclusive_maximum: bool,
) -> bool:
    """Whether ``x`` lies within the bounds."""
    low_ok = minimum is None or (x > minimum if exclusive_minimum else x >= minimum)
    high_ok = maximum is None or (x < maximum if exclusive_maximum else x <= maximum)
    return low_ok and high_ok


def number(
    field: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    allow_inf: bool = False,
    optional: bool = False,
) -> float | None:
    """Check a real number (not a bool) within optional bounds.

    Args:
        field: the option's name, for the message.
        value: the value to check.
        minimum, maximum: the bounds, or None for none.
        exclusive_minimum, exclusive_maximum: make a bound strict (``>`` / ``<``).
        allow_inf: accept ``inf`` / ``-inf`` (when the bounds do); NaN is always refused.
        optional: accept None (and return it).

    Returns:
        The value as a ``float`` (or None).

    Raises:
        ConfigError: not a real number, NaN, infinite (unless allowed) or out of bounds.

    Example:
        >>> number("norm_type", float("inf"), minimum=0, exclusive_minimum=True, allow_inf=True)
        inf
    """
    if value is None and optional:
        return None
    bounds = _bounds_text(minimum, maximum, exclusive_minimum, exclusive_maximum)
    allowed = ("a number" if allow_inf else "a finite number") + (f" {bounds}" if bounds else "")
    allowed += " (inf allowed)" if allow_inf else ""
    allowed += " or None" if optional else ""
    if not _is_real(value):
        raise fail(field, allowed, value)
    x = float(value)
    finite_ok = math.isfinite(x) or (allow_inf and math.isinf(x))
    if not finite_ok or not _in_bounds(x, minimum, maximum, exclusive_minimum, exclusive_maximum):
        raise fail(field, allowed, value)
    return x


def positive_float(field: str, value: Any, *, optional: bool = False) -> float | None:
    """Check a finite number > 0.

    Args:
        field: the option's name, for the message.
        value: the value to check.
        optional: accept None (and return it).

    Returns:
        The value as a ``float`` (or None).

    Raises:
        ConfigError: not a finite number > 0.

    Example:
        >>> positive_float("max_norm", 1)
        1.0
    """
    return number(field, value, minimum=0.0, exclusive_minimum=True, optional=optional)


def non_negative_float(field: str, value: Any, *, optional: bool = False) -> float | None:
    """Check a finite number >= 0.

    Args:
        field: the option's name, for the message.
        value: the value to check.
        optional: accept None (and return it).

    Returns:
        The value as a ``float`` (or None).

    Raises:
        ConfigError: not a finite number >= 0.

    Example:
        >>> non_negative_float("weight_decay", 0)
        0.0
    """
    return number(field, value, minimum=0.0, optional=optional)


def probability(field: str, value: Any, *, optional: bool = False) -> float | None:
    """Check a number in ``[0, 1]`` (a probability, a momentum, a fraction).

    Args:
        field: the option's name, for the message.
        value: the value to check.
        optional: accept None (and return it).

    Returns:
        The value as a ``float`` (or None).

    Raises:
        ConfigError: not a number in ``[0, 1]``.

    Example:
        >>> probability("dropout_prob", 0.1)
        0.1
    """
    return number(field, value, minimum=0.0, maximum=1.0, optional=optional)


def fraction(field: str, value: Any, *, optional: bool = False) -> float | None:
    """Check a number strictly between 0 and 1 (e.g. the share of a cycle spent warming up).

    Args:
        field: the option's name, for the message.
        value: the value to check.
        optional: accept None (and return it).

    Returns:
        The value as a ``float`` (or None).

    Raises:
        ConfigError: not a number in ``(0, 1)``.

    Example:
        >>> fraction("pct_start", 0.3)
        0.3
    """
    return number(
        field,
        value,
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
        exclusive_maximum=True,
        optional=optional,
    )


def integer(
    field: str,
    value: Any,
    *,
    minimum: int | None = None,
    optional: bool = False,
) -> int | None:
    """Check an integer (``int`` or another integral type, not a bool or a float).

    Args:
        field: the option's name, for the message.
        value: the value to check.
        minimum: the smallest allowed value, or None for no bound.
        optional: accept None (and return it).

    Returns:
        The value as an ``int`` (or None).

    Raises:
        ConfigError: not an integer, or smaller than ``minimum``.

    Example:
        >>> integer("onnx_opset", 17, minimum=7)
        17
    """
    if value is None and optional:
        return None
    allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    allowed += " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(field, allowed, value)
    if minimum is not None and value < minimum:
        raise fail(field, allowed, value)
    return int(value)


def positive_int(field: str, value: Any, *, optional: bool = False) -> int | None:
    """Check an integer >= 1.

    Args:
        field: the option's name, for the message.
        value: the value to check.
        optional: accept None (and return it).

    Returns:
        The value as an ``int`` (or None).

    Raises:
        ConfigError: not an integer >= 1.

    Example:
        >>> positive_int("total_steps", 100)
        100
    """
    return integer(field, value, minimum=1, optional=optional)


def non_negative_int(field: str, value: Any, *, optional: bool = False) -> int | None:
    """Check an integer >= 0.

    Args:
        field: the option's name, for the message.
        value: the value to check.
        optional: accept None (and return it).

    Returns:
        The value as an ``int`` (or None).

    Raises:
        ConfigError: not an integer >= 0.

    Example:
        >>> non_negative_int("warmup_steps", 0)
        0
    """
    return integer(field, value, minimum=0, optional=optional)


def boolean(field: str, value: Any, *, optional: bool = False) -> bool | None:
    """Check a ``bool`` (``1`` or ``"yes"`` are refused, so a typo does not turn into True).

    Args:
        field: the option's name, for the message.
        value: the value to check.
        optional: accept None (and return it).

    Returns:
        The value (or None).

    Raises:
        ConfigError: not a bool.

    Example:
        >>> boolean("amsgrad", False)
        False
    """
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise fail(field, "true or false" + (" or None" if optional else ""), value)
    return value


def betas(field: str, value: Any) -> tuple[float, float]:
    """Check Adam's ``(beta1, beta2)``: a pair of numbers, each in ``[0, 1)``.

    Args:
        field: the option's name, for the message.
        value: a tuple or list of two numbers.

    Returns:
        The pair as a tuple of two floats.

    Raises:
        ConfigError: not a pair, or a beta outside ``[0, 1)``.

    Example:
        >>> betas("betas", [0.9, 0.99])
        (0.9, 0.99)
    """
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_real(b) and 0.0 <= float(b) < 1.0 for b in value)
    )
    if not ok:
        raise fail(field, "a pair of numbers in [0, 1), e.g. (0.9, 0.999)", value)
    return (float(value[0]), float(value[1]))


def _closest(word: Any, candidates: Collection[Any]) -> str | None:
    """The candidate closest to ``word`` (ignoring case), or None when none is close."""
    if not isinstance(word, str):
        return None
    by_lower = {c.lower(): c for c in candidates if isinstance(c, str)}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1)
    return by_lower[close[0]] if close else None


def _is_among(value: Any, allowed: Collection[Any]) -> bool:
    """``value in allowed``, comparing only values of the same type (no tensor ``==``)."""
    return any(value is a or (isinstance(value, type(a)) and value == a) for a in allowed)


def one_of(field: str, value: Any, allowed: Collection[Any], *, normalize: bool = False) -> Any:
    """Check that ``value`` is one of ``allowed``; suggest the closest one for a misspelling.

    Args:
        field: the option's name, for the message.
        value: the value to check.
        allowed: the accepted values, in the order the message lists them.
        normalize: strip and lower-case a string before comparing (for case-insensitive names).

    Returns:
        The value (normalised when ``normalize``).

    Raises:
        ConfigError: the value is not allowed (the message lists the allowed values).

    Example:
        >>> one_of("optimizer", " AdamW", ("adamw", "adam", "sgd"), normalize=True)
        'adamw'
        >>> one_of("optimizer", "adamx", ("adamw", "adam", "sgd"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        medfunc.errors.ConfigError: optimizer must be one of 'adamw', 'adam', 'sgd'; got 'adamx'...
    """
    key = value.strip().lower() if normalize and isinstance(value, str) else value
    if _is_among(key, allowed):
        return key
    close = _closest(key, allowed)
    hint = f"; did you mean {close!r}?" if close else ""
    raise fail(field, "one of " + ", ".join(repr(a) for a in allowed), value, hint)


def instance_of(field: str, value: Any, types: type | tuple[type, ...], allowed: str) -> Any:
    """Check that ``value`` is an instance of ``types``.

    Args:
        field: the option's name, for the message.
        value: the value to check.
        types: the accepted class or classes.
        allowed: what to call them in the message, e.g. ``"GradientTransformation objects"``.

    Returns:
        The value.

    Raises:
        ConfigError: the value has another type (the message names its type).

    Example:
        >>> instance_of("seed", 3, int, "an int")
        3
    """
    if not isinstance(value, types):
        raise ConfigError(f"{field} must be {allowed}; got a {type(value).__name__}")
    return value


def name_multipliers(field: str, value: Any) -> tuple[tuple[str, float], ...]:
    """Check per-name LR multipliers: ``[(name substring, multiplier >= 0), ...]`` or a mapping.

    Args:
        field: the option's name, for the message.
        value: a sequence of ``(substring, multiplier)`` pairs, a mapping
            ``{substring: multiplier}`` (its order is kept) or None (no multipliers).

    Returns:
        The pairs as a tuple of ``(str, float)`` tuples (empty for None).

    Raises:
        ConfigError: not a sequence or mapping of pairs, an empty substring, or a multiplier
            that is not a finite number >= 0.

    Example:
        >>> name_multipliers("lr_multipliers", {"head": 10})
        (('head', 10.0),)
    """
    if value is None:
        return ()
    items = list(value.items()) if isinstance(value, Mapping) else value
    allowed = (
        "a list of (name substring, LR multiplier) pairs with multipliers >= 0, e.g. "
        "[('encoder', 0.5)], a mapping {substring: multiplier}, or None"
    )
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise fail(field, allowed, value)
    pairs = []
    for item in items:
        ok = (
            isinstance(item, (tuple, list))
            and len(item) == 2
            and isinstance(item[0], str)
            and bool(item[0])
            and _is_real(item[1])
            and math.isfinite(float(item[1]))
            and float(item[1]) >= 0
        )
        if not ok:
            raise fail(field, allowed, value)
        pairs.append((item[0], float(item[1])))
    return tuple(pairs)


def check_names(where: str, names: Collection[str], allowed: Sequence[str]) -> None:
    """Check option names against the accepted ones; suggest the closest for a misspelling.

    Args:
        where: what takes the names, e.g. ``"optimizer 'sgd'"``.
        names: the names given.
        allowed: the accepted names, in the order the message lists them.

    Raises:
        ConfigError: a name is not accepted (all unknown names, with suggestions, and the
            accepted ones are listed).

    Example:
        >>> check_names("scaler", ["init_scale"], ("init_scale", "growth_interval"))
        >>> check_names("scaler", ["init_scal"], ("init_scale",))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        medfunc.errors.ConfigError: scaler got an unexpected argument 'init_scal' (did you mean...
    """
    unknown = [n for n in names if n not in allowed]
    if not unknown:
        return
    described = []
    for name in unknown:
        close = _closest(name, allowed)
        described.append(f"{name!r}" + (f" (did you mean {close!r}?)" if close else ""))
    what = "unexpected arguments" if len(unknown) > 1 else "an unexpected argument"
    accepts = ", ".join(allowed) if allowed else "no arguments"
    raise ConfigError(f"{where} got {what} {', '.join(described)}; it accepts: {accepts}")


_NAMED_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def check_kwargs(
    factory: Callable[..., Any], kwargs: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """Check keyword arguments against ``factory``'s signature before calling it.

    Unknown names (with a did-you-mean suggestion) and missing required arguments raise here, so
    the factory is called only with arguments it takes and any error it raises is its own.

    Args:
        factory: the callable the arguments are for.
        kwargs: the keyword arguments.
        where: what the arguments configure, for the message, e.g. ``"schedule 'cosine'"``.

    Returns:
        The arguments, as a new dict.

    Raises:
        ConfigError: an argument ``factory`` does not take, or a required one is missing.

    Example:
        >>> def cosine(lr, t_max, eta_min=0.0): ...
        >>> check_kwargs(cosine, {"lr": 0.1, "t_max": 10}, "schedule 'cosine'")
        {'lr': 0.1, 't_max': 10}
        >>> check_kwargs(cosine, {"lr": 0.1, "t_maks": 10}, "cosine")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        medfunc.errors.ConfigError: cosine got an unexpected argument 't_maks' (did you mean...
    """
    params = list(inspect.signature(factory).parameters.values())
    named = [p.name for p in params if p.kind in _NAMED_KINDS]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        check_names(where, list(kwargs), named)
    missing = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and p.name not in kwargs
    ]
    if missing:
        raise ConfigError(
            f"{where} needs the argument{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)}; got {sorted(kwargs)}"
        )
    return dict(kwargs)
