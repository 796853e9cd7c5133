"""Tests for trp.validate: the one set of input checks shared by the library, the CLI and the benchmark."""

from __future__ import annotations

import argparse
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from trp.errors import TRPError
from trp.validate import MAX_WHOLE, argtype, boolean, choice, number, text, whole

# --------------------------------------------------------------------------------------------
# number
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, expected",
    [(3, 3.0), (0.5, 0.5), ("3e-4", 3e-4), (" 2 ", 2.0), (np.float32(0.25), 0.25), (torch.tensor(1.5), 1.5),
     (Fraction(1, 4), 0.25), (-1e300, -1e300)],
    ids=["int", "float", "str", "padded-str", "numpy", "tensor", "fraction", "huge-negative"],
)
def test_number_accepts_finite_numbers(x, expected) -> None:
    """number takes ints, floats, numeric strings and objects with __float__, and returns a float."""
    got = number(x, "lr")
    assert got == expected and type(got) is float


@pytest.mark.parametrize(
    "x, match",
    [
        (True, "lr must be a number, got True"),
        (False, "lr must be a number, got False"),
        ("1e400", "lr must be finite, got '1e400'"),
        (1e400, "lr must be finite, got inf"),
        (float("nan"), "lr must be finite, got nan"),
        ("nan", "lr must be finite, got 'nan'"),
        (float("-inf"), "lr must be finite, got -inf"),
        ("abc", "lr must be a number, got 'abc'"),
        ("", "lr must be a number, got ''"),
        (None, "lr must be a number, got None"),
        ([1.0], r"lr must be a number, got \[1.0\]"),
        (10**400, "lr must be a number, got 1000"),  # float() overflows
    ],
    ids=["true", "false", "str-1e400", "inf-literal", "nan", "str-nan", "-inf", "word", "empty", "none", "list",
         "int-too-big"],
)
def test_number_refuses_non_numbers(x, match) -> None:
    """Booleans are not numbers, and non-finite values (1e400 overflows to inf, nan) are refused."""
    with pytest.raises(TRPError, match=match) as info:
        number(x, "lr")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "x, bounds, match",
    [
        (-0.1, dict(low=0), "lr must be >= 0, got -0.1"),
        (0, dict(low=0, low_open=True), "lr must be > 0, got 0"),
        (1.5, dict(high=1), "lr must be <= 1, got 1.5"),
    ],
)
def test_number_bounds(x, bounds, match) -> None:
    """low is inclusive unless low_open; high is inclusive; a value out of range says which bound."""
    with pytest.raises(TRPError, match=match):
        number(x, "lr", **bounds)


def test_number_bounds_are_inclusive() -> None:
    """The bounds themselves are valid values (except low with low_open)."""
    assert number(0, "lr", low=0) == 0.0
    assert number(1, "lr", high=1) == 1.0
    assert number(1e-12, "lr", low=0, low_open=True) == 1e-12


# --------------------------------------------------------------------------------------------
# whole
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, expected",
    [(8, 8), (8.0, 8), ("8", 8), ("8.0", 8), ("1e3", 1000), (1e3, 1000), (-3, -3), (np.int64(5), 5),
     (MAX_WHOLE, MAX_WHOLE), (-MAX_WHOLE, -MAX_WHOLE)],
    ids=["int", "float", "str", "str-float", "str-exp", "float-exp", "negative", "numpy", "max", "min"],
)
def test_whole_accepts_whole_numbers(x, expected) -> None:
    """whole takes 8, 8.0, "8.0", "1e3" and returns an int."""
    got = whole(x, "epochs")
    assert got == expected and type(got) is int


@pytest.mark.parametrize(
    "x, match",
    [
        (True, "epochs must be a whole number, got True"),
        (False, "epochs must be a whole number, got False"),
        (8.5, "epochs must be a whole number, got 8.5"),
        ("8.5", "epochs must be a whole number, got '8.5'"),
        (float("nan"), "epochs must be a whole number, got nan"),
        (float("inf"), "epochs must be a whole number, got inf"),
        ("1e400", "epochs must be finite, got '1e400'"),
        ("eight", "epochs must be a number, got 'eight'"),
        (None, "epochs must be a number, got None"),
        (MAX_WHOLE + 1, "epochs is too large"),
        (-MAX_WHOLE - 1, "epochs is too large"),
        (1e300, "epochs is too large"),
    ],
    ids=["true", "false", "8.5", "str-8.5", "nan", "inf", "str-1e400", "word", "none", "max+1", "min-1", "1e300"],
)
def test_whole_refuses(x, match) -> None:
    """Bools, fractions, non-finite values and counts beyond MAX_WHOLE are refused with one line."""
    with pytest.raises(TRPError, match=match) as info:
        whole(x, "epochs")
    assert "\n" not in str(info.value)


def test_whole_bounds() -> None:
    """whole's bounds are inclusive on both sides."""
    assert whole(1, "epochs", low=1, high=3) == 1 and whole("3", "epochs", low=1, high=3) == 3
    with pytest.raises(TRPError, match="epochs must be >= 1, got 0"):
        whole(0, "epochs", low=1)
    with pytest.raises(TRPError, match="epochs must be <= 3, got 4"):
        whole(4.0, "epochs", high=3)


def test_max_whole_is_two_to_the_53() -> None:
    """MAX_WHOLE is the largest count every float64 represents exactly (2**53)."""
    assert MAX_WHOLE == 2**53 and float(MAX_WHOLE) == MAX_WHOLE and math.isfinite(MAX_WHOLE)


# --------------------------------------------------------------------------------------------
# boolean, choice, text
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x", [True, False])
def test_boolean_accepts_bools(x) -> None:
    """boolean returns a real bool unchanged."""
    assert boolean(x, "amp") is x


@pytest.mark.parametrize("x", ["no", "true", 1, 0, None, 1.0, np.bool_(True)])
def test_boolean_refuses_truthy_values(x) -> None:
    """"no" or 1 in a config file is an error, not a truthy value."""
    with pytest.raises(TRPError, match="amp must be true or false, got "):
        boolean(x, "amp")


def test_choice() -> None:
    """choice accepts exactly one of the options and lists them all when refusing."""
    options = ("channel", "spatial")
    assert choice("spatial", "scheme", options) == "spatial"
    for bad in ("Spatial", "", None, 1, ["channel"]):
        with pytest.raises(TRPError, match=r"unknown scheme .*; choose one of: channel, spatial$"):
            choice(bad, "scheme", options)


def test_text() -> None:
    """text accepts strings only: a number or None where a path belongs is an error."""
    assert text("runs/a", "out") == "runs/a" and text("", "out") == ""
    for bad in (5, None, b"runs", ["runs"]):
        with pytest.raises(TRPError, match="out must be a string, got "):
            text(bad, "out")


# --------------------------------------------------------------------------------------------
# argtype
# --------------------------------------------------------------------------------------------


def test_argtype_applies_the_checker() -> None:
    """argtype turns a checker with bounds into an argparse type that returns the checked value."""
    assert argtype(whole, low=1)("3") == 3
    assert argtype(number, low=0, high=1)("0.5") == 0.5
    assert argtype(whole).__name__ == "whole"


@pytest.mark.parametrize(
    "check, bounds, arg, message",
    [
        (whole, dict(low=1), "0", "must be >= 1, got 0"),
        (whole, {}, "8.5", "must be a whole number, got '8.5'"),
        (number, {}, "1e400", "must be finite, got '1e400'"),
        (number, {}, "x", "must be a number, got 'x'"),
    ],
)
def test_argtype_reports_usage_errors(check, bounds, arg, message) -> None:
    """A bad flag value is an argparse usage error carrying the checker's message."""
    with pytest.raises(argparse.ArgumentTypeError, match=message) as info:
        argtype(check, **bounds)(arg)
    assert str(info.value) == message


def test_argtype_in_a_parser(capsys: pytest.CaptureFixture) -> None:
    """Inside argparse, a refused value exits with status 2 and the checker's message on stderr."""
    parser = argparse.ArgumentParser(prog="trp")
    parser.add_argument("--epochs", type=argtype(whole, low=1))
    assert parser.parse_args(["--epochs", "1e3"]).epochs == 1000
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--epochs", "0"])
    assert info.value.code == 2
    assert "argument --epochs: must be >= 1, got 0" in capsys.readouterr().err
