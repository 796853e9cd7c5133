"""Tests for trp.rank: the per-layer rank criteria, their validation and the command-line parser."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import trp
from trp import rank as rank_mod
from trp.errors import TRPError


def _random_spectrum(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    # Mix decay profiles: flat, geometric, and heavy-tailed, some with exact zeros at the end.
    kind = seed % 3
    if kind == 0:
        s = torch.rand(n, generator=g, dtype=torch.float64) + 0.01
    elif kind == 1:
        s = torch.rand(1, generator=g, dtype=torch.float64) * 0.9 ** torch.arange(n, dtype=torch.float64) + 1e-3
    else:
        s = torch.rand(n, generator=g, dtype=torch.float64).pow(4) * 10
        s[n - n // 4 :] = 0.0
    return s.sort(descending=True).values


def _brute_energy_rank(s: torch.Tensor, e: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ e·Σσ², computed term by term (with the documented 1e-12 slack)."""
    power = [float(v) ** 2 for v in s]
    total = math.fsum(power)
    if total == 0.0:
        return 1
    for k in range(1, len(power) + 1):
        if math.fsum(power[:k]) >= e * total * (1 - 1e-12):
            return k
    return len(power)


@pytest.mark.parametrize("seed", range(30))
def test_energy_rank_matches_brute_force(seed: int) -> None:
    """energy_rank must be the smallest rank holding a fraction e of the energy (TRP Eq. 3)."""
    s = _random_spectrum(seed)
    for e in (0.01, 0.3, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0, float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))):
        k = rank_mod.energy_rank(s, e)
        assert k == _brute_energy_rank(s, e), e
        assert trp.energy(e).select(s) == k
        assert rank_mod.kept_energy(s, k) >= e - 1e-9
        if k > 1:
            assert rank_mod.kept_energy(s, k - 1) < e


@pytest.mark.parametrize(
    "s, e, k",
    [
        ([1.0, 1.0, 1.0, 1.0], 0.5, 2),  # exactly on the boundary: the boundary rank suffices
        ([1.0, 1.0, 1.0, 1.0], 0.25, 1),
        ([1.0, 1.0, 1.0, 1.0], 0.26, 2),
        ([3.0, 2.0, 1.0], 0.9, 2),
        ([2.0, 0.0, 0.0], 1.0, 1),  # zeros carry no energy: full energy is reached at the last non-zero
        ([0.0, 0.0, 0.0], 0.5, 1),  # an all-zero layer still keeps one value (a layer cannot vanish)
        ([5.0], 1.0, 1),
    ],
)
def test_energy_rank_edge_cases(s: list[float], e: float, k: int) -> None:
    """Boundary ties, zero tails and all-zero spectra must give the obvious rank, never 0 or n+1."""
    assert rank_mod.energy_rank(torch.tensor(s), e) == k


@pytest.mark.parametrize("seed", range(10))
def test_energy_one_is_full_rank(seed: int) -> None:
    """energy(1.0) must keep every singular value of a spectrum without zeros, despite round-off."""
    g = torch.Generator().manual_seed(seed)
    n = 1 + seed * 7
    s = (torch.rand(n, generator=g) * 0.999 ** torch.arange(n) + 1e-4).sort(descending=True).values
    assert trp.energy(1.0).select(s) == n
    assert trp.energy(1.0).select(s.double()) == n


def test_kept_energy() -> None:
    """kept_energy reports the fraction of Σσ² kept, 1.0 for an all-zero spectrum."""
    assert rank_mod.kept_energy(torch.tensor([3.0, 1.0]), 1) == pytest.approx(0.9)
    assert rank_mod.kept_energy(torch.tensor([3.0, 1.0]), 2) == pytest.approx(1.0)
    assert rank_mod.kept_energy(torch.zeros(3), 1) == 1.0


@pytest.mark.parametrize(
    "t, k",
    [(0.0, 5), (0.05, 4), (0.06, 3), (0.1, 3), (0.5, 2), (1.0, 1), (1.5, 1), (100.0, 1)],
)
def test_value_counts_at_least_threshold(t: float, k: int) -> None:
    """value(t) keeps σ ≥ t (inclusive) and always at least one value."""
    s = torch.tensor([2.0, 0.5, 0.1, 0.05, 0.01])
    assert trp.value(t).select(s) == k


@pytest.mark.parametrize("k, n, expected", [(1, 5, 1), (3, 5, 3), (5, 5, 5), (8, 5, 5), (100, 1, 1)])
def test_fixed_caps_at_full_rank(k: int, n: int, expected: int) -> None:
    """fixed(k) keeps k values, capped at the layer's full rank."""
    assert trp.fixed(k).select(torch.ones(n)) == expected


@pytest.mark.parametrize(
    "p, n, expected",
    [(0.5, 16, 8), (0.5, 5, 3), (0.01, 5, 1), (1.0, 7, 7), (1 / 3, 3, 1), (0.3, 10, 3), (0.07, 100, 7), (0.14, 100, 14), (0.29, 100, 29), (0.71, 10, 8)],
)
def test_fraction_rounds_up(p: float, n: int, expected: int) -> None:
    """fraction(p) keeps ceil(p·n) values; round-off such as 0.07·100 = 7.000000000000001 must not add one."""
    assert trp.fraction(p).select(torch.ones(n)) == expected


@pytest.mark.parametrize(
    "make, arg",
    [
        (trp.energy, 0),
        (trp.energy, 1.5),
        (trp.energy, -0.1),
        (trp.energy, float("nan")),
        (trp.energy, float("inf")),
        (trp.energy, "x"),
        (trp.energy, None),
        (trp.fraction, 0),
        (trp.fraction, 1.01),
        (trp.fraction, float("nan")),
        (trp.fixed, 0),
        (trp.fixed, -3),
        (trp.fixed, 2.5),
        (trp.fixed, float("inf")),
        (trp.speedup, 0.5),
        (trp.speedup, 0),
        (trp.speedup, float("nan")),
        (trp.speedup, float("inf")),
        (trp.value, -1),
        (trp.value, float("nan")),
    ],
)
def test_invalid_criteria_raise(make, arg) -> None:
    """Out-of-range or non-numeric criterion values must be rejected up front with a TRPError."""
    with pytest.raises(TRPError):
        make(arg)


@pytest.mark.parametrize(
    "make, arg, field, expected",
    [
        (trp.energy, 1, "e", 1.0),
        (trp.fraction, 1, "p", 1.0),
        (trp.fixed, 8.0, "k", 8),
        (trp.speedup, 1, "s", 1.0),
        (trp.value, 0, "t", 0.0),
    ],
)
def test_valid_boundary_values_normalised(make, arg, field: str, expected) -> None:
    """Inclusive bounds are accepted and stored with a canonical type (float, or int for fixed)."""
    crit = make(arg)
    got = getattr(crit, field)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("energy:0.95", rank_mod.Energy(0.95)),
        ("fixed:8", rank_mod.Fixed(8)),
        ("speedup:3", rank_mod.Speedup(3.0)),
        ("value:0.05", rank_mod.Value(0.05)),
        ("fraction:0.5", rank_mod.Fraction(0.5)),
    ],
)
def test_parse(text: str, expected) -> None:
    """parse accepts NAME:NUMBER and gives the same criterion as the constructor; str() parses back."""
    got = trp.parse(text)
    assert got == expected and type(got) is type(expected)
    assert trp.parse(str(got)) == got


@pytest.mark.parametrize(
    "text", ["bogus", "energy", "energy:x", "energy:", "speed:3", ":3", "energy:1.5", "fixed:2.5", "value:-1", ""]
)
def test_parse_rejects(text: str) -> None:
    """A malformed or out-of-range command-line rank is a TRPError, not a ValueError traceback."""
    with pytest.raises(TRPError):
        trp.parse(text)


def test_criteria_are_frozen() -> None:
    """Criteria are immutable values, so one can be shared between plans without surprises."""
    crit = trp.energy(0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        crit.e = 0.5  # type: ignore[misc]
    assert hash(crit) == hash(trp.energy(0.9))
