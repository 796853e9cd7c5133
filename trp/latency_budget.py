"""``trp.latency(s)``: a whole-model budget in measured time, on the latency model of :mod:`trp.latency_model`.

The budget T_dense / s is spent where it keeps the most singular-value energy per measured
millisecond (:func:`solve_time`, the time counterpart of :func:`trp.rank.solve_budget`), on rank
multiples the kernels prefer; a layer whose decomposed form is not faster stays dense.

Example:
    >>> str(latency(2, multiple=8, runtime="channels_last"))
    'latency:2'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor, nn

from trp import rank as rank_mod
from trp.errors import TRPError
from trp.latency_model import MULTIPLES, LatencyTable, Target, Timer, measure_layers, model_time
from trp.validate import number, whole

__all__ = ["Option", "SLACK", "solve_time", "Allocation", "allocate", "Latency", "latency"]

# As in trp.rank.solve_budget: a fastest allocation this close above the budget is accepted.
SLACK = 0.02
Option = tuple[float, float, Any]  # one choice of a layer: (ms, energy kept, rank; None = dense)


def _frontier(options: Sequence[Option]) -> tuple[list[Option], list[Option]]:
    """The efficient options (less time, more energy) and their upper concave hull, by time."""
    front: list[Option] = []
    for opt in sorted(options, key=lambda o: (o[0], -o[1])):
        if not front or opt[1] > front[-1][1]:  # slower and no more energy: dominated
            front.append(opt)
    hull: list[Option] = []
    for opt in front:  # keep the slopes Δenergy/Δms strictly falling
        while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (opt[0] - hull[-1][0])
                                  <= (opt[1] - hull[-1][1]) * (hull[-1][0] - hull[-2][0])):
            hull.pop()
        hull.append(opt)
    return front, hull


def solve_time(options: Mapping[str, Sequence[Option]], fixed_ms: float,
               budget_ms: float) -> tuple[dict[str, Any], float]:
    """One ``(ms, energy, rank)`` option per layer: the most energy within ``fixed_ms + Σ ms <= budget_ms``.

    An option slower than another with as much energy is never taken (so a decomposed form no
    faster than dense loses to dense, whose energy is 1). On each layer's upper concave hull of
    (ms, energy) one threshold λ on energy per millisecond sets every layer's choice; a binary
    search finds the lowest λ within budget, then the time left goes greedily, best energy per
    millisecond first. If even the fastest choice is over budget, it is returned as it is.

    Returns:
        ``({layer: rank}, total ms)``.

    Example:
        >>> opts = {"x": [(10, 1.0, None), (2, 0.5, 1), (4, 0.8, 2), (6, 0.95, 3)],
        ...         "y": [(10, 1.0, None), (2, 0.9, 1), (4, 0.95, 2), (6, 0.99, 3)]}
        >>> solve_time(opts, 0.0, 8.0)
        ({'x': 3, 'y': 1}, 8.0)
    """
    fronts = {name: _frontier(opts) for name, opts in options.items()}
    slopes = {name: [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(hull, hull[1:])]
              for name, (_, hull) in fronts.items()}

    def pick(lam: float) -> tuple[dict[str, Option], float]:
        chosen = {name: hull[sum(g >= lam for g in slopes[name])] for name, (_, hull) in fronts.items()}
        return chosen, fixed_ms + sum(o[0] for o in chosen.values())

    best, total = pick(math.inf)
    lams = sorted({g for gs in slopes.values() for g in gs}, reverse=True)
    best, total = rank_mod.last_within(lams, pick, budget_ms, (best, total))
    while True:  # fill the time left: best marginal energy per ms among the efficient options
        moves = [((o[1] - cur[1]) / (o[0] - cur[0]), name, o) for name, (front, _) in fronts.items()
                 for cur in (best[name],) for o in front if o[0] > cur[0] and total + o[0] - cur[0] <= budget_ms]
        if not moves:
            return {name: o[2] for name, o in best.items()}, total
        _, name, o = max(moves, key=lambda m: m[0])
        total, best[name] = total + o[0] - best[name][0], o


@dataclass
class Allocation:
    """What a latency budget decided: ranks (None: dense), why layers stay dense, predicted time."""

    ranks: dict[str, int | None]
    reasons: dict[str, str]
    model_ms: float
    predicted_ms: float
    multiple: int
    table: LatencyTable

    @property
    def speedup(self) -> float:
        """Predicted whole-model speed-up over the dense model."""
        return self.model_ms / self.predicted_ms


@dataclass(frozen=True)
class Latency:
    """A whole-model target in measured time: the model runs ``s``× faster on the target.

    Ranks go where they keep the most singular-value energy per measured millisecond
    (:func:`solve_time`), as multiples of ``multiple`` (default: the one the measurements prefer,
    :func:`preferred_multiple`); layers whose decomposed form is not faster stay dense. The dense
    model's time is ``model_ms`` if given, else measured from the ``model`` given to :meth:`solve`
    (cached, :func:`model_time`). The other fields make the :class:`Target` (whole model timed
    with 6× ``min_run_time``).
    """

    s: float
    multiple: int | None = None
    batch_size: int = 128
    runtime: str = "eager"
    threads: int | None = None
    min_run_time: float = 0.05
    cache_dir: str | None = None
    model_ms: float | None = None
    timer: Timer | None = field(default=None, compare=False, repr=False)
    rounds: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "s", number(self.s, "latency speed-up", low=1.0))
        if self.multiple is not None and whole(self.multiple, "rank multiple") not in MULTIPLES:
            raise TRPError(f"rank multiple must be one of {', '.join(map(str, MULTIPLES))}, got {self.multiple!r}")
        if self.model_ms is not None:
            object.__setattr__(self, "model_ms", number(self.model_ms, "model time (ms)", low=0.0, low_open=True))
        target = self.target  # validates; the normalized values are stored back
        for name in ("batch_size", "runtime", "threads", "min_run_time", "cache_dir", "rounds"):
            object.__setattr__(self, name, getattr(target, name))

    @property
    def target(self) -> Target:
        """Where the budget is measured."""
        return Target(self.batch_size, self.runtime, self.threads, self.min_run_time, 6 * self.min_run_time,
                      self.cache_dir, self.timer, self.rounds)

    def __str__(self) -> str:
        return f"latency:{self.s:g}"

    def solve(self, layers: Sequence[Any], total: float = 0.0, model: nn.Module | None = None,
              input_shape: Sequence[int] | None = None) -> dict[str, int | None]:
        """``{name: rank or None}``, as :meth:`trp.rank.Speedup.solve` (``total``, the MACs, is unused)."""
        return self.allocate(layers, model, input_shape).ranks

    def allocate(self, layers: Sequence[Any], model: nn.Module | None = None,
                 input_shape: Sequence[int] | None = None, log: Callable[[str], None] | None = None) -> Allocation:
        """The ranks, the reasons for dense layers, the multiple and the predicted time.

        ``layers`` have ``name``, ``module``, ``scheme``, ``calls``, ``cost``, ``dense`` and ``spectrum``
        (computed when None): :class:`trp.plan.Candidate` or :class:`Layer`. ``model`` (with its
        ``input_shape``) is timed when ``model_ms`` was not given; ``log`` gets a line per timed layer.
        """
        target = self.target
        table = measure_layers(layers, target, log)
        if self.model_ms is None and model is None:
            raise TRPError(f"{self} needs the dense model's time: pass the model to solve() or give model_ms")
        table.model_ms = self.model_ms or model_time(model, input_shape, target)
        spectra = {c.name: c.spectrum if c.spectrum is not None else c.scheme.singular_values(c.module.weight, c.name)
                   for c in layers}
        return allocate(table, spectra, self.s, self.multiple)


def allocate(table: LatencyTable, spectra: Mapping[str, Tensor], s: float, multiple: int | None = None) -> Allocation:
    """Ranks for ``s``× less predicted time on a measured ``table`` (its ``model_ms`` set), from the
    layers' current singular values; what :meth:`Latency.allocate` and TRP's ``latency=`` target
    (a table measured once, spectra new at every projection) share. Raises a TRPError when even
    the fastest measured form of every layer cannot reach ``s`` (within :data:`SLACK`).

    Example:
        >>> import torch
        >>> from trp.latency_model import LayerLatency
        >>> t = LatencyTable({}, {"a": LayerLatency("a", "channel", 8.0, [1, 2, 3], [1.0, 2.0, 3.0], 3)}, 10.0)
        >>> a = allocate(t, {"a": torch.tensor([2.0, 1.0, 0.1, 0.1])}, 2.0)
        >>> a.ranks, a.predicted_ms
        ({'a': 3}, 5.0)
    """
    if table.model_ms is None:
        raise TRPError("the latency table has no whole-model time: measure the dense model (model_time) first")
    m = multiple or table.multiple
    options, reasons = _options(table, spectra, m)
    budget = table.model_ms / s
    fixed = table.model_ms - sum(table.layers[name].dense_ms for name in options)
    ranks, predicted = solve_time(options, fixed, budget)
    if predicted > budget * (1 + SLACK):
        key = table.key
        raise TRPError(f"latency speed-up {s:g}x is out of reach: with every layer at its fastest measured "
                       f"form the model is predicted {table.model_ms / predicted:.2f}x faster "
                       f"({key.get('runtime', '?')}, batch {key.get('batch_size', '?')})")
    for name, k in ranks.items():
        if k is None:
            reasons.setdefault(name, "dense keeps the most energy within the time budget")
        else:
            reasons.pop(name, None)
    return Allocation(ranks, reasons, table.model_ms, predicted, m, table)


def _options(table: LatencyTable, spectra: Mapping[str, Tensor],
             m: int) -> tuple[dict[str, list[Option]], dict[str, str]]:
    """Every layer's choices (dense, or a rank multiple of ``m``) and why some can only stay dense."""
    options: dict[str, list[Option]] = {}
    reasons: dict[str, str] = {}
    for name, spectrum in spectra.items():
        lay = table.layers[name]
        ks = lay.allowed(m)
        options[name] = [(lay.dense_ms, 1.0, None)] + [(lay.at(k), rank_mod.kept_energy(spectrum, k), k) for k in ks]
        if not ks:
            reasons[name] = f"no rank that is a multiple of {m} lowers its MACs (below rank {lay.top + 1})"
        elif min(lay.at(k) for k in ks) >= lay.dense_ms:
            k = min(ks, key=lay.at)
            reasons[name] = (f"decomposed form measured no faster than dense at any rank (fastest "
                             f"{lay.at(k):.3f} ms at rank {k} >= {lay.dense_ms:.3f} ms dense)")
    return options, reasons


def latency(s: float, multiple: int | None = None, batch_size: int = 128, runtime: str = "eager",
            **kwargs: Any) -> Latency:
    """A whole-model budget in measured time: the model runs ``s``× faster (see :class:`Latency`).

    Example:
        >>> str(latency(2, multiple=8, runtime="channels_last"))
        'latency:2'
    """
    return Latency(s, multiple, batch_size, runtime, **kwargs)


rank_mod.register("latency", latency)  # ``--rank latency:S`` / ``trp.parse("latency:S")``
