"""Rank criteria: how many singular values each layer keeps.

Each criterion is a small frozen dataclass validated in ``__post_init__``. Per-layer criteria
(:func:`energy`, :func:`value`, :func:`fixed`, :func:`fraction`) map one spectrum to a rank;
:func:`speedup` is a whole-model budget that :mod:`trp.decompose` solves across all layers at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from trp.errors import TRPError

__all__ = [
    "Energy",
    "Value",
    "Fixed",
    "Fraction",
    "Speedup",
    "Criterion",
    "energy",
    "value",
    "fixed",
    "fraction",
    "speedup",
    "parse",
    "energy_rank",
    "kept_energy",
]


def _finite(x: float, what: str) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise TRPError(f"{what} must be a number, got {x!r}") from None
    if not math.isfinite(x):
        raise TRPError(f"{what} must be finite, got {x}")
    return x


def energy_rank(s: Tensor, e: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ e·Σ σ_i² (TRP paper, Eq. 3).

    Example:
        >>> energy_rank(torch.tensor([3.0, 2.0, 1.0]), 0.9)
        2
    """
    power = s.detach().double().pow(2)
    total = float(power.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(power, 0)
    # A relative slack of 1e-12 keeps e = 1.0 at the last non-zero value despite rounding.
    k = int(torch.searchsorted(cum, torch.tensor(e * total * (1 - 1e-12), dtype=cum.dtype))) + 1
    return max(1, min(k, s.numel()))


def kept_energy(s: Tensor, k: int) -> float:
    """Fraction of Σσ² that the first k singular values keep.

    Example:
        >>> round(kept_energy(torch.tensor([3.0, 1.0]), 1), 2)
        0.9
    """
    power = s.detach().double().pow(2)
    total = float(power.sum())
    return 1.0 if total == 0.0 else float(power[:k].sum()) / total


@dataclass(frozen=True)
class Energy:
    """Keep the smallest rank holding a fraction ``e`` of the spectrum's energy."""

    e: float

    def __post_init__(self) -> None:
        e = _finite(self.e, "energy")
        if not 0.0 < e <= 1.0:
            raise TRPError(f"energy must be in (0, 1], got {e}")
        object.__setattr__(self, "e", e)

    def select(self, s: Tensor) -> int:
        return energy_rank(s, self.e)

    def __str__(self) -> str:
        return f"energy:{self.e:g}"


@dataclass(frozen=True)
class Value:
    """Keep singular values σ_i ≥ t (the paper's code decomposes TRP nets with t = 0.05)."""

    t: float

    def __post_init__(self) -> None:
        t = _finite(self.t, "singular-value threshold")
        if t < 0.0:
            raise TRPError(f"singular-value threshold must be >= 0, got {t}")
        object.__setattr__(self, "t", t)

    def select(self, s: Tensor) -> int:
        return max(1, int((s >= self.t).sum()))

    def __str__(self) -> str:
        return f"value:{self.t:g}"


@dataclass(frozen=True)
class Fixed:
    """Keep ``k`` singular values (capped at full rank)."""

    k: int

    def __post_init__(self) -> None:
        k = _finite(self.k, "rank")
        if k < 1 or k != int(k):
            raise TRPError(f"rank must be a whole number >= 1, got {self.k}")
        object.__setattr__(self, "k", int(k))

    def select(self, s: Tensor) -> int:
        return min(self.k, s.numel())

    def __str__(self) -> str:
        return f"fixed:{self.k}"


@dataclass(frozen=True)
class Fraction:
    """Keep ``ceil(p · full rank)`` singular values."""

    p: float

    def __post_init__(self) -> None:
        p = _finite(self.p, "rank fraction")
        if not 0.0 < p <= 1.0:
            raise TRPError(f"rank fraction must be in (0, 1], got {p}")
        object.__setattr__(self, "p", p)

    def select(self, s: Tensor) -> int:
        return max(1, min(s.numel(), math.ceil(self.p * s.numel() - 1e-9)))

    def __str__(self) -> str:
        return f"fraction:{self.p:g}"


@dataclass(frozen=True)
class Speedup:
    """A whole-model target: total MACs fall by ``s``× (solved jointly over layers)."""

    s: float

    def __post_init__(self) -> None:
        s = _finite(self.s, "speed-up")
        if s < 1.0:
            raise TRPError(f"speed-up must be >= 1, got {s}")
        object.__setattr__(self, "s", s)

    def __str__(self) -> str:
        return f"speedup:{self.s:g}"


Criterion = Union[Energy, Value, Fixed, Fraction, Speedup]


def energy(e: float) -> Energy:
    """Rank by energy: the smallest k with Σ_{i≤k} σ_i² ≥ e·Σ σ_i².

    Example:
        >>> energy(0.9).select(torch.tensor([3.0, 2.0, 1.0]))
        2
    """
    return Energy(e)


def value(t: float) -> Value:
    """Rank by value: keep σ_i ≥ t.

    Example:
        >>> value(0.05).select(torch.tensor([1.0, 0.1, 0.01]))
        2
    """
    return Value(t)


def fixed(k: int) -> Fixed:
    """A fixed rank k for every layer.

    Example:
        >>> fixed(8).select(torch.ones(4))
        4
    """
    return Fixed(k)


def fraction(p: float) -> Fraction:
    """A fraction p of each layer's full rank.

    Example:
        >>> fraction(0.5).select(torch.ones(16))
        8
    """
    return Fraction(p)


def speedup(s: float) -> Speedup:
    """A global MACs budget: ranks chosen from the singular values so the model runs ``s``× fewer MACs.

    Example:
        >>> speedup(3.0)
        Speedup(s=3.0)
    """
    return Speedup(s)


_PARSERS = {"energy": energy, "value": value, "fixed": fixed, "fraction": fraction, "speedup": speedup}


def parse(text: str) -> Criterion:
    """Parse ``name:number`` as given on the command line.

    Example:
        >>> parse("value:0.05")
        Value(t=0.05)
    """
    name, sep, num = str(text).partition(":")
    if not sep or name not in _PARSERS:
        raise TRPError(f"rank must look like NAME:NUMBER with NAME one of {', '.join(_PARSERS)}; got {text!r}")
    try:
        number = float(num)
    except ValueError:
        raise TRPError(f"rank {text!r}: {num!r} is not a number") from None
    return _PARSERS[name](number)
