"""Small type and range checks shared by SamplingParams, EngineConfig and the request edge.

Each takes the error family to raise (a value class and its type-error sibling from
`scheduler.errors`), so a sampling field raises SamplingParamsError, a config field ConfigError.

    >>> check_int("n", 3, lo=1)
    3
    >>> check_int("n", True, lo=1)
    Traceback (most recent call last):
    ...
    scheduler.errors.InvalidTypeError: n=True must be an integer >= 1, not bool
"""

from __future__ import annotations

import math

from scheduler.errors import InvalidRequestError, InvalidTypeError, show

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _allowed(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"<= {hi}"
    return "any value"


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, hint: str | None = None,
              err: type[InvalidRequestError] = InvalidRequestError,
              type_err: type[InvalidTypeError] = InvalidTypeError) -> int:
    """An int (never a bool or a float, not even 2.0) within [lo, hi]."""
    allowed = hint or _allowed(lo, hi)
    if not isinstance(value, int) or isinstance(value, bool):
        raise type_err(f"{name}={show(value)} must be an integer {allowed}, not {type(value).__name__}",
                       name, value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise err(f"{name}={show(value)} is out of range; allowed: {allowed}", name, value)
    return value


def check_number(name: str, value, allowed: str, ok, *, err: type[InvalidRequestError] = InvalidRequestError,
                 type_err: type[InvalidTypeError] = InvalidTypeError) -> float:
    """A finite int or float (never a bool, NaN or inf) for which ok(value) holds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise type_err(f"{name}={show(value)} must be a number {allowed}, not {type(value).__name__}",
                       name, value)
    if not math.isfinite(value) or not ok(value):
        raise err(f"{name}={show(value)} is out of range; allowed: a finite number {allowed}", name, value)
    return value


def check_bool(name: str, value, *, type_err: type[InvalidTypeError] = InvalidTypeError) -> bool:
    """True or False only: a string such as "false" is an error, never truthy."""
    if not isinstance(value, bool):
        raise type_err(f"{name}={show(value)} must be True or False, not {type(value).__name__}", name, value)
    return value


def check_str(name: str, value, *, type_err: type[InvalidTypeError] = InvalidTypeError) -> str:
    if not isinstance(value, str):
        raise type_err(f"{name}={show(value)} must be a str, not {type(value).__name__}", name, value)
    return value
