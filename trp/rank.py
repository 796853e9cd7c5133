"""Rank criteria: how many singular values each layer keeps.

Each criterion is a small frozen dataclass validated in ``__post_init__``. Per-layer criteria
(:func:`energy`, :func:`value`, :func:`fixed`, :func:`fraction`) map one spectrum to a rank;
:func:`speedup` is a whole-model budget solved across all layers at once (:func:`solve_budget`, on plain
:class:`BudgetLayer` records, so planning and TRP's training target share one solver).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar, Union

import torch
from torch import Tensor

from trp.errors import TRPError
from trp.validate import number, whole

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
    "register",
    "energy_rank",
    "kept_energy",
    "resolve",
    "RankArg",
    "BudgetLayer",
    "solve_budget",
    "rank_one_speedup",
    "last_within",
]


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


class _Written:
    """``str()`` as the command line writes a criterion: ``label:value`` (see :func:`parse`)."""

    label: ClassVar[str] = ""

    def __str__(self) -> str:
        (value,) = (getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]
        return f"{self.label}:{value:g}"


@dataclass(frozen=True)
class Energy(_Written):
    """Keep the smallest rank holding a fraction ``e`` of the spectrum's energy."""

    label = "energy"

    e: float

    def __post_init__(self) -> None:
        e = number(self.e, "energy", low=0.0, high=1.0, low_open=True)
        object.__setattr__(self, "e", e)

    def select(self, s: Tensor) -> int:
        return energy_rank(s, self.e)


@dataclass(frozen=True)
class Value(_Written):
    """Keep singular values σ_i ≥ t (the paper's code decomposes TRP nets with t = 0.05)."""

    label = "value"

    t: float

    def __post_init__(self) -> None:
        t = number(self.t, "singular-value threshold", low=0.0)
        object.__setattr__(self, "t", t)

    def select(self, s: Tensor) -> int:
        return max(1, int((s >= self.t).sum()))


@dataclass(frozen=True)
class Fixed(_Written):
    """Keep ``k`` singular values (capped at full rank)."""

    label = "fixed"

    k: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", whole(self.k, "rank", low=1))

    def select(self, s: Tensor) -> int:
        return min(self.k, s.numel())


@dataclass(frozen=True)
class Fraction(_Written):
    """Keep ``ceil(p · full rank)`` singular values."""

    label = "fraction"

    p: float

    def __post_init__(self) -> None:
        p = number(self.p, "rank fraction", low=0.0, high=1.0, low_open=True)
        object.__setattr__(self, "p", p)

    def select(self, s: Tensor) -> int:
        return max(1, min(s.numel(), math.ceil(self.p * s.numel() - 1e-9)))


@dataclass(frozen=True)
class Speedup(_Written):
    """A whole-model target: total MACs fall by ``s``× (solved jointly over layers)."""

    label = "speedup"

    s: float

    def __post_init__(self) -> None:
        s = number(self.s, "speed-up", low=1.0)
        object.__setattr__(self, "s", s)

    def solve(self, layers: Sequence[Any], total: float, **context: Any) -> dict[str, int | None]:
        """Ranks for this budget over layers with ``name``, ``spectrum``, ``cost`` (MACs per rank) and
        ``dense`` (MACs) attributes, the whole model costing ``total`` MACs (see :func:`solve_budget`).
        ``context`` (the model, its input shape) is what other budgets, e.g. ``trp.latency``, need."""
        return solve_budget([BudgetLayer(c.name, c.spectrum, c.cost, c.dense) for c in layers], total, self.s)


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


# One home for the ``NAME:NUMBER`` forms; budgets defined above this module in the dependency
# order (``trp.latency`` in :mod:`trp.latency_budget`) add theirs with :func:`register`.
_PARSERS: dict[str, Callable[[float], Any]] = {"energy": energy, "value": value, "fixed": fixed, "fraction": fraction,
                                               "speedup": speedup}


def register(name: str, make: Callable[[float], Any]) -> None:
    """Let :func:`parse` read ``name:NUMBER`` as ``make(NUMBER)`` (how ``latency:S`` becomes
    ``trp.latency(S)`` without this module importing the latency model). Registering a name again
    with the same function is a no-op; with another, an error.

    Example:
        >>> register("speedup", speedup)  # already there: nothing changes
        >>> parse("latency:2")
        Latency(s=2.0, multiple=None, batch_size=128, runtime='eager', threads=None, min_run_time=0.05, cache_dir=None, model_ms=None, rounds=1)
    """
    if not name.isidentifier():
        raise TRPError(f"a rank criterion name must be a plain word, got {name!r}")
    if _PARSERS.get(name, make) is not make:
        raise TRPError(f"rank criterion {name!r} is already registered")
    _PARSERS[name] = make


def parse(text: str) -> Any:
    """Parse ``name:number`` as given on the command line (the names of :func:`register` included).

    Example:
        >>> parse("value:0.05"), str(parse("latency:2.5"))
        (Value(t=0.05), 'latency:2.5')
    """
    name, sep, num = str(text).partition(":")
    if not sep or name not in _PARSERS:
        raise TRPError(f"rank must look like NAME:NUMBER with NAME one of {', '.join(_PARSERS)}; got {text!r}")
    try:
        number = float(num)
    except ValueError:
        raise TRPError(f"rank {text!r}: {num!r} is not a number") from None
    return _PARSERS[name](number)


RankArg = Union[Criterion, int, Mapping[str, int], None]
_RANK_HELP = "rank must be an int, a {layer: rank} dict or a criterion such as trp.energy(0.9)"


def resolve(rank: RankArg, default: Criterion | None = None) -> Criterion | dict[str, int]:
    """Normalize a rank argument: None → ``default`` (``energy(0.9)``), an int → :func:`fixed`, a
    ``{layer: rank}`` dict checked entry by entry, a criterion as it is. The one place where the
    library, SVD training and the command line turn "a rank" into something that selects.

    Example:
        >>> resolve(4), resolve(None), resolve({"conv": 2})
        (Fixed(k=4), Energy(e=0.9), {'conv': 2})
    """
    if rank is None:
        return default if default is not None else Energy(0.9)
    if isinstance(rank, (Energy, Value, Fixed, Fraction, Speedup)) or callable(getattr(rank, "solve", None)):
        return rank  # a criterion, or another whole-model budget such as trp.latency(s)
    if isinstance(rank, bool):
        raise TRPError(f"{_RANK_HELP}, got {rank!r}")
    if isinstance(rank, int):
        return Fixed(rank)
    if isinstance(rank, Mapping):
        return {str(name): whole(k, f"rank of layer {name!r}", low=1) for name, k in rank.items()}
    raise TRPError(f"{_RANK_HELP}, got {rank!r}")


@dataclass(frozen=True)
class BudgetLayer:
    """One layer as the budget solver sees it: plain numbers, no module.

    ``cost`` is what one unit of rank costs (MACs, or milliseconds for a latency budget) and
    ``dense`` what the layer costs undecomposed, in the same unit.
    """

    name: str
    spectrum: Tensor
    cost: float
    dense: float


def rank_one_speedup(layers: Sequence[BudgetLayer], total: float) -> float:
    """The largest speed-up the layers can give: every one at rank 1, or dense where that is cheaper.

    Example:
        >>> round(rank_one_speedup([BudgetLayer("a", torch.ones(4), 10, 100)], 200), 2)
        1.82
    """
    best = total - sum(lay.dense - lay.cost for lay in layers if lay.cost < lay.dense)
    return total / max(best, 1e-12)


T = TypeVar("T")


def last_within(thresholds: Sequence[float], allocate: Callable[[float], tuple[T, float]], budget: float,
                start: tuple[T, float]) -> tuple[T, float]:
    """The allocation at the last of the descending ``thresholds`` whose cost stays within ``budget``.

    ``allocate(λ) -> (allocation, cost)`` keeps every option worth at least λ per unit of cost, so
    the cost grows as λ falls and a binary search finds the lowest λ (the most rank) that fits;
    ``start`` is returned when none does. Shared by the MACs and the time budgets.

    Example:
        >>> last_within([3.0, 2.0, 1.0], lambda lam: (lam, 10 / lam), 6.0, ("none", 0.0))
        (2.0, 5.0)
    """
    best = start
    lo, hi = 0, len(thresholds) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        chosen = allocate(thresholds[mid])
        if chosen[1] <= budget:
            best, lo = chosen, mid + 1
        else:
            hi = mid - 1
    return best


def solve_budget(layers: Sequence[BudgetLayer], total: float, target: float) -> dict[str, int | None]:
    """Ranks for a whole-model budget (``total / target``), from the singular values alone.

    Each layer's j-th singular value buys a share σ_j²/Σσ² of that layer's energy for ``cost``;
    a single threshold λ on energy per unit of cost keeps, in every layer, the values above it, so
    rank goes where it keeps the most energy per MAC (or per millisecond). A layer whose low-rank
    form would cost at least its dense form stays dense (None). The total is monotone in λ, so a
    binary search over the sorted gains finds the smallest budget-meeting threshold; one rank of
    one layer is the step size.

    Args:
        layers: The decomposable layers.
        total: The whole model's cost, the layers not listed included (at their dense cost).
        target: The speed-up s >= 1 to reach.

    Example:
        >>> lay = [BudgetLayer("a", torch.tensor([4.0, 2.0, 1.0, 0.5]), 20, 100),
        ...        BudgetLayer("b", torch.tensor([1.0, 1.0, 1.0, 1.0]), 20, 100)]
        >>> solve_budget(lay, 200, 2.0)  # "a" keeps 76 % of its energy in one rank; "b" needs all four
        {'a': 1, 'b': 4}
    """
    budget = total / target
    fixed_cost = total - sum(lay.dense for lay in layers)
    gains = []
    for lay in layers:
        power = lay.spectrum.detach().double().pow(2)
        share = power / power.sum() if float(power.sum()) > 0 else torch.zeros_like(power)
        gains.append(share / lay.cost)

    def ranks_at(lam: float) -> tuple[dict[str, int | None], float]:
        out: dict[str, int | None] = {}
        cost = fixed_cost
        for lay, g in zip(layers, gains):
            k = max(1, int((g >= lam).sum()))
            if k * lay.cost >= lay.dense:
                out[lay.name], cost = None, cost + lay.dense
            else:
                out[lay.name], cost = k, cost + k * lay.cost
        return out, cost

    lams = torch.unique(torch.cat(gains)).flip(0).tolist() if gains else []  # descending
    best, best_cost = ranks_at(math.inf)
    if best_cost > budget * 1.02:
        raise TRPError(
            f"speed-up {target:g}x is out of reach: with every decomposable layer at rank 1 the model runs "
            f"{total / best_cost:.2f}x fewer MACs"
        )
    best, best_cost = last_within(lams, ranks_at, budget, (best, best_cost))
    # A dense switch can make the next threshold jump by up to a layer's whole cost; fill what is
    # left of the budget one rank at a time, best energy per unit of cost first, never past it: a
    # speed-up of s means at least s (a step past it once gave speedup(3.0) 2.9999x).
    cost = best_cost
    while True:
        options = [
            (float(g[k]), lay, k)
            for lay, g in zip(layers, gains)
            if (k := best[lay.name]) is not None and k < g.numel()
            and cost + lay.cost <= budget and (k + 1) * lay.cost < lay.dense
        ]
        if not options:
            return best
        _, lay, k = max(options, key=lambda o: o[0])
        best[lay.name], cost = k + 1, cost + lay.cost
