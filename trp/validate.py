"""Input validation shared by the library, the command line and the benchmark.

One home for "is this a usable number": every public entry point checks its arguments with these
helpers, so the same bad value gets the same one-line :class:`~trp.errors.TRPError` whether it came
from Python, a config file or a command-line flag. Booleans are never numbers (``True`` is not one
epoch), and whole numbers may be written ``8``, ``8.0`` or ``"1e3"``, but not ``8.5``.

Example:
    >>> number("3e-4", "nuclear", low=0)
    0.0003
    >>> whole(1e3, "epochs", low=1)
    1000
    >>> whole(True, "epochs")
    Traceback (most recent call last):
    ...
    trp.errors.TRPError: epochs must be a whole number, got True
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Sequence, TypeVar

from trp.errors import TRPError

__all__ = ["number", "whole", "boolean", "choice", "text", "argtype", "MAX_WHOLE"]

T = TypeVar("T")

# Counts (epochs, steps, ranks, sizes, seeds) above this are refused before anything is allocated.
MAX_WHOLE = 2**53


def _fmt(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"  # whole numbers in full: 4294967295, not 4.29497e+09


def _bound(value: float, what: str, low: float | None, high: float | None, low_open: bool) -> None:
    if low is not None and (value <= low if low_open else value < low):
        raise TRPError(f"{what} must be {'>' if low_open else '>='} {_fmt(low)}, got {_fmt(value)}")
    if high is not None and value > high:
        raise TRPError(f"{what} must be <= {_fmt(high)}, got {_fmt(value)}")


def number(x: Any, what: str, *, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    """A finite float within ``[low, high]`` (``(low, high]`` with ``low_open``).

    Example:
        >>> number(0.9, "energy", low=0, high=1, low_open=True)
        0.9
    """
    if isinstance(x, bool) or not isinstance(x, (int, float, str)) and not hasattr(x, "__float__"):
        raise TRPError(f"{what} must be a number, got {x!r}")
    try:
        value = float(x)
    except (TypeError, ValueError, OverflowError):
        raise TRPError(f"{what} must be a number, got {x!r}") from None
    if not math.isfinite(value):
        raise TRPError(f"{what} must be finite, got {x!r}")
    _bound(value, what, low, high, low_open)
    return value


def whole(x: Any, what: str, *, low: int | None = None, high: int | None = None) -> int:
    """A whole number (an int, or a float/str with no fraction) within ``[low, high]``.

    Example:
        >>> whole("20", "period", low=1)
        20
    """
    if isinstance(x, bool):
        raise TRPError(f"{what} must be a whole number, got {x!r}")
    if isinstance(x, int):
        value = x
    else:
        f = number(x, what) if not isinstance(x, float) or math.isfinite(x) else math.nan
        if not math.isfinite(f) or f != int(f):
            raise TRPError(f"{what} must be a whole number, got {x!r}")
        value = int(f)
    if abs(value) > MAX_WHOLE:
        raise TRPError(f"{what} is too large: {x!r}")
    _bound(value, what, low, high, False)
    return value


def boolean(x: Any, what: str) -> bool:
    """A real boolean: ``"no"`` or ``1`` in a config file is an error, not a truthy value.

    Example:
        >>> boolean(False, "amp")
        False
    """
    if not isinstance(x, bool):
        raise TRPError(f"{what} must be true or false, got {x!r}")
    return x


def choice(x: Any, what: str, options: Sequence[str]) -> str:
    """One of ``options``.

    Example:
        >>> choice("spatial", "scheme", ("channel", "spatial"))
        'spatial'
    """
    if not isinstance(x, str) or x not in options:
        raise TRPError(f"unknown {what} {x!r}; choose one of: {', '.join(options)}")
    return x


def text(x: Any, what: str) -> str:
    """A string (a path, a name): ``"data_dir": 5`` in a config file is an error.

    Example:
        >>> text("runs/a", "out")
        'runs/a'
    """
    if not isinstance(x, str):
        raise TRPError(f"{what} must be a string, got {x!r}")
    return x


def argtype(check: Callable[..., T], **bounds: Any) -> Callable[[str], T]:
    """An argparse ``type=`` built from a checker: the same rule, reported as a usage error.

    Example:
        >>> argtype(whole, low=1)("3")
        3
    """

    def parse(s: str) -> T:
        try:
            return check(s, "value", **bounds)
        except TRPError as err:
            raise argparse.ArgumentTypeError(str(err).replace("value ", "", 1)) from None

    parse.__name__ = check.__name__
    return parse
