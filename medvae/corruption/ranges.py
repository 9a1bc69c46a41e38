"""Validation of corruption parameters and parameter ranges.

Every transform in :mod:`medvae.corruption` checks its arguments through :func:`parse_range` (the
TorchIO ``_parse_range`` idiom), so a bad value always fails the same way: a ``ValueError`` that
names the parameter, says what was given and what is allowed.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

__all__ = ["parse_range", "parse_value", "parse_prob"]


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _check(v: float, name: str, *, low: float | None, high: float | None, low_open: bool,
           high_open: bool, integer: bool) -> None:
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if integer and float(v) != int(v):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if low is not None and (v < low or (low_open and v == low)):
        op = ">" if low_open else ">="
        raise ValueError(f"{name} must be {op} {low:g}, got {v!r}")
    if high is not None and (v > high or (high_open and v == high)):
        op = "<" if high_open else "<="
        raise ValueError(f"{name} must be {op} {high:g}, got {v!r}")


def parse_range(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> tuple[float, float] | tuple[int, int]:
    """Validate a parameter given as a number or a ``(min, max)`` range.

    Parameters
    ----------
    value : number or sequence of two numbers
        A single number means the fixed range ``(value, value)`` (unlike MONAI, a scalar is *not*
        read as ``[0, value]``). A pair ``(a, b)`` must satisfy ``a <= b``.
    name : str
        The parameter's name, used in the error message.
    low, high : float, optional
        Bounds every value must respect.
    low_open, high_open : bool, keyword-only
        Make the corresponding bound exclusive (e.g. ``dose`` in ``(0, 1]``).
    integer : bool, keyword-only
        Require integers and return ``int`` values.

    Returns
    -------
    tuple
        ``(min, max)`` as floats (or ints when ``integer``).

    Raises
    ------
    ValueError
        Naming ``name`` when the value is not a number or pair, not finite, out of bounds, or
        when ``min > max``.

    Examples
    --------
    >>> parse_range([0.02, 0.12], "sigma", low=0)
    (0.02, 0.12)
    >>> parse_range(3, "n_boxes", low=1, integer=True)
    (3, 3)
    >>> parse_range(-0.1, "sigma", low=0)
    Traceback (most recent call last):
    ...
    ValueError: sigma must be >= 0, got -0.1
    """
    if _is_number(value):
        pair = [value, value]
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value):
        pair = list(value)
    else:
        hint = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {hint} or a [min, max] pair, got {value!r}")
    for v in pair:
        _check(float(v), name, low=low, high=high, low_open=low_open, high_open=high_open,
               integer=integer)
    lo, hi = (int(v) for v in pair) if integer else (float(v) for v in pair)
    if lo > hi:
        raise ValueError(f"{name} range must be [min, max] with min <= max, got {value!r}")
    return lo, hi


def parse_value(value: Any, name: str, **bounds: Any) -> float | int:
    """Validate a single number with the same rules as :func:`parse_range`.

    >>> parse_value(0.5, "prob", low=0, high=1)
    0.5
    """
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return parse_range(value, name, **bounds)[0]


def parse_prob(value: Any, name: str = "prob") -> float:
    """A probability in [0, 1]."""
    return float(parse_value(value, name, low=0.0, high=1.0))


def parse_int(value: Any, name: str, **bounds: Any) -> int:
    """An integer (``Integral`` or an integral float) with bounds."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        value = int(value)
    return int(parse_value(value, name, integer=True, **bounds))
