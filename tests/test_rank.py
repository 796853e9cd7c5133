"""Tests for trp.rank: the per-layer criteria, their validation, the command-line parser, resolve, the budget solver."""

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
    "make, arg, match",
    [
        (trp.energy, 0, "energy must be > 0, got 0"),
        (trp.energy, 1.5, "energy must be <= 1, got 1.5"),
        (trp.energy, -0.1, "energy must be > 0, got -0.1"),
        (trp.energy, float("nan"), "energy must be finite"),
        (trp.energy, float("inf"), "energy must be finite"),
        (trp.energy, "x", "energy must be a number, got 'x'"),
        (trp.energy, None, "energy must be a number, got None"),
        (trp.energy, True, "energy must be a number, got True"),
        (trp.fraction, 0, "rank fraction must be > 0"),
        (trp.fraction, 1.01, "rank fraction must be <= 1"),
        (trp.fraction, float("nan"), "rank fraction must be finite"),
        (trp.fixed, 0, "rank must be >= 1, got 0"),
        (trp.fixed, -3, "rank must be >= 1, got -3"),
        (trp.fixed, 2.5, "rank must be a whole number, got 2.5"),
        (trp.fixed, float("inf"), "rank must be a whole number, got inf"),
        (trp.fixed, True, "rank must be a whole number, got True"),
        (trp.speedup, 0.5, "speed-up must be >= 1, got 0.5"),
        (trp.speedup, 0, "speed-up must be >= 1, got 0"),
        (trp.speedup, float("nan"), "speed-up must be finite"),
        (trp.speedup, float("inf"), "speed-up must be finite"),
        (trp.value, -1, "singular-value threshold must be >= 0"),
        (trp.value, float("nan"), "singular-value threshold must be finite"),
    ],
)
def test_invalid_criteria_raise(make, arg, match: str) -> None:
    """Out-of-range or non-numeric criterion values must be rejected up front with a TRPError."""
    with pytest.raises(TRPError, match=match):
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
        ("latency:2", trp.latency(2.0)),
    ],
)
def test_parse(text: str, expected) -> None:
    """parse accepts NAME:NUMBER and gives the same criterion as the constructor; str() parses back."""
    got = trp.parse(text)
    assert got == expected and type(got) is type(expected)
    assert trp.parse(str(got)) == got


FORMAT = "rank must look like NAME:NUMBER with NAME one of energy, value, fixed, fraction, speedup, latency"


@pytest.mark.parametrize(
    "text, match",
    [
        ("bogus", FORMAT),
        ("energy", FORMAT),
        ("energy:x", "rank 'energy:x': 'x' is not a number"),
        ("energy:", "rank 'energy:': '' is not a number"),
        ("speed:3", FORMAT),
        (":3", FORMAT),
        ("energy:1.5", "energy must be <= 1"),
        ("fixed:2.5", "rank must be a whole number"),
        ("value:-1", "singular-value threshold must be >= 0"),
        ("latency:0.5", "latency speed-up must be >= 1"),
        ("", FORMAT),
    ],
)
def test_parse_rejects(text: str, match: str) -> None:
    """A malformed or out-of-range command-line rank is a TRPError, not a ValueError traceback."""
    with pytest.raises(TRPError, match=match):
        trp.parse(text)


def test_register_refuses_a_second_meaning() -> None:
    """A registered name keeps its parser: registering another under it, or a non-word, is an error."""
    rank_mod.register("latency", trp.latency)  # the same function again: allowed, nothing changes
    with pytest.raises(TRPError, match="rank criterion 'latency' is already registered"):
        rank_mod.register("latency", rank_mod.speedup)
    with pytest.raises(TRPError, match="must be a plain word"):
        rank_mod.register("a:b", rank_mod.speedup)
    assert type(trp.parse("latency:3")).__name__ == "Latency"


def test_criteria_are_frozen() -> None:
    """Criteria are immutable values, so one can be shared between plans without surprises."""
    crit = trp.energy(0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        crit.e = 0.5  # type: ignore[misc]
    assert hash(crit) == hash(trp.energy(0.9))


# --------------------------------------------------------------------------------------------
# resolve: the one normalization of a rank argument
# --------------------------------------------------------------------------------------------


def test_resolve_normalizes_rank_arguments() -> None:
    """None → energy(0.9) (or the given default), int → fixed, criteria unchanged, dicts checked per layer."""
    assert rank_mod.resolve(None) == trp.energy(0.9)
    assert rank_mod.resolve(None, default=trp.value(0.05)) == trp.value(0.05)
    assert rank_mod.resolve(4) == trp.fixed(4)
    crit = trp.speedup(2.5)
    assert rank_mod.resolve(crit) is crit
    assert rank_mod.resolve({"a": 2, "b": 3.0, "c": "5"}) == {"a": 2, "b": 3, "c": 5}
    assert all(type(k) is int for k in rank_mod.resolve({"b": 3.0, "c": "5"}).values())


@pytest.mark.parametrize(
    "rank, match",
    [
        (True, "rank must be an int, a {layer: rank} dict or a criterion"),
        (0.5, "rank must be an int, a {layer: rank} dict or a criterion"),
        ("energy:0.9", "rank must be an int, a {layer: rank} dict or a criterion"),
        ([4], "rank must be an int"),
        (0, "rank must be >= 1, got 0"),
        ({"conv": 0}, "rank of layer 'conv' must be >= 1"),
        ({"conv": True}, "rank of layer 'conv' must be a whole number"),
        ({"conv": 2.5}, "rank of layer 'conv' must be a whole number"),
    ],
)
def test_resolve_rejects(rank, match: str) -> None:
    """A bool, a float, a string (parse it first) or a bad per-layer rank is a one-line TRPError."""
    with pytest.raises(TRPError, match=match) as info:
        rank_mod.resolve(rank)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# solve_budget: the whole-model budget on plain records
# --------------------------------------------------------------------------------------------


def _made_up_layers(seed: int, n: int = 12) -> list[rank_mod.BudgetLayer]:
    """Layers with random spectra (flat to fast-decaying), costs per rank and dense costs, in made-up units."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        full = int(torch.randint(4, 65, (1,), generator=g))
        decay = float(torch.rand(1, generator=g)) * 0.3 + 0.7
        spectrum = torch.rand(full, generator=g, dtype=torch.float64) * decay ** torch.arange(full)
        spectrum = spectrum.sort(descending=True).values
        cost = float(torch.randint(10, 200, (1,), generator=g))
        dense = cost * full * (0.4 + float(torch.rand(1, generator=g)))  # some layers cheaper dense than at full rank
        out.append(rank_mod.BudgetLayer(f"layer{i}", spectrum, cost, dense))
    return out


def _cost(layers, ranks, total) -> float:
    return total - sum(lay.dense for lay in layers) + sum(
        lay.dense if ranks[lay.name] is None else ranks[lay.name] * lay.cost for lay in layers
    )


@pytest.mark.parametrize("target", [1.2, 1.5, 2.0, 3.0, 5.0])
@pytest.mark.parametrize("seed", range(6))
def test_solve_budget_meets_target_within_two_percent(seed: int, target: float) -> None:
    """On a made-up set of layers the ranks reach the target and at most 2 % past it, each rank valid, dense
    only when cheaper."""
    layers = _made_up_layers(seed)
    total = sum(lay.dense for lay in layers) * 1.1  # 10 % of the model is not decomposable
    assert rank_mod.rank_one_speedup(layers, total) > target  # the made-up set can reach it
    ranks = rank_mod.solve_budget(layers, total, target)
    assert set(ranks) == {lay.name for lay in layers}
    for lay in layers:
        k = ranks[lay.name]
        assert k is None or (1 <= k <= lay.spectrum.numel() and k * lay.cost < lay.dense), (lay.name, k)
    assert 1 <= total / _cost(layers, ranks, total) / target <= 1.02


def test_solve_budget_keeps_layer_dense_when_rank_one_costs_more() -> None:
    """A layer whose rank 1 already costs at least its dense form is never decomposed (None)."""
    layers = [
        rank_mod.BudgetLayer("costly", torch.tensor([9.0, 0.1]), cost=120.0, dense=100.0),
        rank_mod.BudgetLayer("cheap", torch.tensor([4.0, 2.0, 1.0, 0.5]), cost=10.0, dense=100.0),
    ]
    for target in (1.0, 1.3, 1.6):
        ranks = rank_mod.solve_budget(layers, 200.0, target)
        assert ranks["costly"] is None and ranks["cheap"] is not None
    assert rank_mod.rank_one_speedup(layers, 200.0) == pytest.approx(200 / 110)


def test_solve_budget_puts_rank_where_energy_per_cost_is_highest() -> None:
    """Of two equal-cost layers the one with a concentrated spectrum gets the lower rank."""
    layers = [
        rank_mod.BudgetLayer("flat", torch.ones(8, dtype=torch.float64), 10.0, 200.0),
        rank_mod.BudgetLayer("steep", 0.3 ** torch.arange(8, dtype=torch.float64), 10.0, 200.0),
    ]
    ranks = rank_mod.solve_budget(layers, 400.0, 4.0)
    assert ranks["steep"] < ranks["flat"]
    assert abs(400.0 / _cost(layers, ranks, 400.0) / 4.0 - 1) <= 0.02


def test_solve_budget_takes_any_cost_unit() -> None:
    """Costs are plain numbers (MACs or milliseconds): scaling every cost leaves the ranks unchanged."""
    layers = _made_up_layers(3)
    total = sum(lay.dense for lay in layers) * 1.1
    scaled = [rank_mod.BudgetLayer(lay.name, lay.spectrum, lay.cost * 1e-6, lay.dense * 1e-6) for lay in layers]
    assert rank_mod.solve_budget(scaled, total * 1e-6, 2.0) == rank_mod.solve_budget(layers, total, 2.0)


def test_solve_budget_unreachable_raises_one_line() -> None:
    """A target beyond every layer at rank 1 is a one-line TRPError that says how far the layers can go."""
    layers = [rank_mod.BudgetLayer("a", torch.ones(4), 10.0, 100.0)]
    best = rank_mod.rank_one_speedup(layers, 200.0)
    assert best == pytest.approx(200 / 110)
    with pytest.raises(TRPError, match=rf"speed-up 3x is out of reach: .* runs {best:.2f}x fewer MACs") as info:
        rank_mod.solve_budget(layers, 200.0, 3.0)
    assert "\n" not in str(info.value)
    with pytest.raises(TRPError, match="speed-up 1.5x is out of reach"):
        rank_mod.solve_budget([], 200.0, 1.5)  # nothing to decompose


def test_solve_budget_target_one_keeps_everything_cheaper() -> None:
    """speed-up 1 is always reachable; no layer is decomposed to a form costing more than dense."""
    layers = _made_up_layers(1)
    total = sum(lay.dense for lay in layers)
    ranks = rank_mod.solve_budget(layers, total, 1.0)
    assert _cost(layers, ranks, total) <= total * 1.02
