"""Plans: which layer is decomposed with which scheme at which rank, and what that costs.

A :class:`Plan` is made by :func:`plan` without changing the model: the layers are traced once for
their shapes (so MACs count every call of a shared layer), each candidate's spectrum comes from
``svdvals`` (no singular vectors: planning needs only the values), and the rank criterion or the
whole-model budget (:func:`trp.rank.solve_budget`) picks the ranks. Every conv and Linear weight
the trace finds is listed, those left dense with the reason: a weight passed to a functional call
(``F.linear(x, self.qkv.weight)``) or held by an ``nn.MultiheadAttention`` cannot be replaced by two
smaller layers, and a layer the forward pass never calls costs nothing. The plan saves to JSON and
rebuilds the decomposed structure on a fresh model (:func:`apply_plan`), so compressed weights load
without pickled modules. :func:`rank_costs` gives the same MACs accounting without any SVD, for
budgets that are solved again and again during training (TRP).

Example:
    >>> import trp
    >>> from trp.models import create
    >>> p = plan(create("resnet20"), "channel", trp.speedup(3.0), input_shape=(3, 32, 32))
    >>> abs(p.speedup / 3.0 - 1) < 0.02
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, Union

from torch import Tensor, nn

from trp import rank as rank_mod
from trp import schemes
from trp.errors import TRPError
from trp.io import atomic_write_text
from trp.surgery import FilterFn, get_module, replace_modules
from trp.tracing import Trace, sample_shape, trace

__all__ = ["LayerPlan", "Plan", "Candidate", "SchemeArg", "plan", "rank_costs", "apply_plan", "checked_module",
           "low_rank_layers", "MHA_REASON", "FUNCTIONAL_REASON", "UNUSED_REASON"]

SchemeArg = Union[str, Sequence[str]]
PLAN_FORMAT = "trp-plan/1"

MHA_REASON = ("nn.MultiheadAttention passes its projection weights to a functional call; "
              "use trp.attention.unfuse_attention_ to decompose them")
FUNCTIONAL_REASON = "used functionally (not through its module's forward): stays dense"
UNUSED_REASON = "not called in the traced forward pass: stays dense"


@dataclass
class LayerPlan:
    """One layer of a :class:`Plan`: what happens to it and what it costs before and after."""

    name: str
    type: str
    weight_shape: list[int]
    in_shape: list[int]
    out_shape: list[int]
    macs_before: int
    params_before: int  # its own parameters; for a decomposed layer, those decomposing it frees (ties count once)
    scheme: str | None = None
    rank: int | None = None
    full_rank: int | None = None
    energy: float | None = None
    macs_after: int = 0
    params_after: int = 0
    reason: str | None = None

    @property
    def decomposed(self) -> bool:
        """True when the layer is replaced by its low-rank form."""
        return self.reason is None


@dataclass
class Plan:
    """The per-layer decisions for one model at one input size; saves to and loads from JSON."""

    input_shape: list[int]
    criterion: str
    macs_before: int
    params_before: int
    layers: list[LayerPlan] = field(default_factory=list)

    @property
    def macs_after(self) -> int:
        return self.macs_before - sum(lp.macs_before - lp.macs_after for lp in self.layers if lp.decomposed)

    @property
    def params_after(self) -> int:
        return self.params_before - sum(lp.params_before - lp.params_after for lp in self.layers if lp.decomposed)

    @property
    def speedup(self) -> float:
        """Whole-model MACs before divided by after."""
        return self.macs_before / max(self.macs_after, 1)

    @property
    def product_macs(self) -> int:
        """MACs of products between activations (attention scores and the like): in the totals,
        in no layer's row, never decomposed."""
        return self.macs_before - sum(lp.macs_before for lp in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = PLAN_FORMAT
        d["macs_after"], d["params_after"], d["speedup"] = self.macs_after, self.params_after, self.speedup
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize; with ``path``, also write the file atomically."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise TRPError(f"not a trp plan (missing format {PLAN_FORMAT!r})")
        try:
            layers = [LayerPlan(**lp) for lp in d["layers"]]
            result = cls(list(d["input_shape"]), str(d["criterion"]), int(d["macs_before"]), int(d["params_before"]),
                         layers)
        except (KeyError, TypeError, ValueError) as err:
            raise TRPError(f"damaged trp plan: {err}") from None
        for lp in layers:
            if lp.decomposed and (lp.scheme not in schemes.SCHEMES or isinstance(lp.rank, bool)
                                  or not isinstance(lp.rank, int) or lp.rank < 1):
                raise TRPError(f"damaged trp plan: layer {lp.name!r} has scheme {lp.scheme!r}, rank {lp.rank!r}")
        return result

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Plan":
        """Load from a JSON string or a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text_or_path).read_text()
            except OSError as err:
                raise TRPError(f"cannot read plan {text_or_path}: {err.strerror}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise TRPError(f"damaged trp plan: {err.msg} at line {err.lineno}") from None

    def table(self) -> str:
        """Per-layer report as aligned text, with the reason for every layer left dense."""
        width = max([len(lp.name) for lp in self.layers] + [5])
        head = f"{'layer':<{width}}  {'scheme':<8} {'rank':>9} {'energy':>7} {'MACs before':>12} {'MACs after':>12}  note"
        lines = [head]
        for lp in self.layers:
            rk = f"{lp.rank}/{lp.full_rank}" if lp.rank is not None else "-"
            en = f"{lp.energy:.3f}" if lp.energy is not None else "-"
            after = lp.macs_after if lp.decomposed else lp.macs_before
            note = "" if lp.decomposed else f"dense: {lp.reason}"
            lines.append(f"{lp.name:<{width}}  {lp.scheme or '-':<8} {rk:>9} {en:>7} {lp.macs_before:>12,} {after:>12,}  {note}")
        if self.product_macs > 0:
            products = f"{self.product_macs:,}"
            lines.append(f"(activation products such as attention scores: {products} MACs, not decomposable)")
        lines.append(
            f"model: MACs {self.macs_before:,} -> {self.macs_after:,} ({self.speedup:.2f}x), "
            f"params {self.params_before:,} -> {self.params_after:,} ({self.criterion}, input {tuple(self.input_shape)})"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass
class Candidate:
    """A decomposable layer as a whole-model budget sees it (see :meth:`trp.rank.Speedup.solve`)."""

    lp: LayerPlan
    module: nn.Module
    scheme: schemes.Scheme
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]]  # (input, output) shape of every call
    cost: int  # MACs per unit of rank, summed over the layer's calls
    spectrum: Tensor | None = None  # filled in by plan()

    @property
    def name(self) -> str:
        return self.lp.name

    @property
    def dense(self) -> int:
        """The dense layer's MACs over all its calls."""
        return self.lp.macs_before


def _rows(model: nn.Module, traced: Trace) -> dict[str, LayerPlan]:
    """One LayerPlan per weight-holding module the trace saw (or should have), with its MACs."""
    modules = dict(model.named_modules())
    rows: dict[str, LayerPlan] = {}
    for u in traced.uses:
        if u.kind == "product":
            continue
        lp = rows.get(u.name)
        if lp is None:
            module = modules[u.name]
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor):  # nn.MultiheadAttention holds in_proj_weight
                weight = getattr(module, "in_proj_weight", None)
            shape = list(weight.shape) if isinstance(weight, Tensor) else []
            lp = rows[u.name] = LayerPlan(u.name, type(module).__name__, shape, list(u.in_shape), list(u.out_shape),
                                          0, sum(p.numel() for p in module.parameters(recurse=False)))
        lp.macs_before += u.macs
    for name in traced.unused:
        module = modules[name]
        rows[name] = LayerPlan(name, type(module).__name__, list(module.weight.shape), [], [], 0,
                               sum(p.numel() for p in module.parameters(recurse=False)), reason=UNUSED_REASON)
    return rows


def _fixed_reasons(model: nn.Module, traced: Trace, rows: dict[str, LayerPlan]) -> None:
    """The reasons that do not depend on the scheme or filter: attention, functional use, no use."""
    attention = {u.name for u in traced.uses if u.kind == "attention"}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            attention.update(n for n, m in model.named_modules() if m is module.out_proj)
    functional = traced.functional()
    for name, lp in rows.items():
        if name in attention:
            lp.reason = MHA_REASON
        elif name in functional:
            lp.reason = FUNCTIONAL_REASON


def _trace(model: nn.Module, scheme: SchemeArg, filter_fn: FilterFn | None,
           input_shape: Sequence[int] | None) -> tuple[Plan, list[Candidate]]:
    """Every traced conv/Linear layer as a LayerPlan with its costs; the decomposable ones as candidates."""
    names = schemes.parse_names(scheme)
    shape = sample_shape(model, input_shape)
    traced = trace(model, shape)
    result = Plan(list(shape), "", traced.macs, sum(p.numel() for p in model.parameters()))
    rows = _rows(model, traced)
    _fixed_reasons(model, traced, rows)
    calls = traced.calls()
    modules = dict(model.named_modules())
    cands = []
    for name, lp in rows.items():
        result.layers.append(lp)
        if lp.reason is not None:
            continue
        module = modules[name]
        if filter_fn is not None and not filter_fn(module, name):
            lp.reason = "excluded by filter_fn"
            continue
        sch, lp.reason = schemes.applicable(module, names)
        if sch is not None:
            lp.scheme = sch.name
            cost = sum(sch.macs_per_rank(module, i, o) for i, o in calls[name])  # a shared layer pays per call
            cands.append(Candidate(lp, module, sch, list(calls[name]), cost))
    return result, cands


def rank_costs(model: nn.Module, scheme: SchemeArg = "channel", filter_fn: FilterFn | None = None,
               input_shape: Sequence[int] | None = None) -> tuple[int, dict[str, tuple[int, int]]]:
    """The model's MACs and, per decomposable layer, (MACs per unit of rank, dense MACs); no SVD.

    Example:
        >>> total, costs = rank_costs(nn.Sequential(nn.Conv2d(3, 8, 3)), input_shape=(3, 10, 10))
        >>> total, costs["0"]
        (13824, (2240, 13824))
    """
    result, cands = _trace(model, scheme, filter_fn, input_shape)
    return result.macs_before, {c.lp.name: (c.cost, c.lp.macs_before) for c in cands}


def plan(
    model: nn.Module,
    scheme: SchemeArg = "channel",
    rank: rank_mod.RankArg = None,
    filter_fn: FilterFn | None = None,
    input_shape: Sequence[int] | None = None,
) -> Plan:
    """Decide, without changing the model, how every layer would be decomposed.

    Args:
        model: Any ``nn.Module``.
        scheme: A scheme name, or several tried in order per layer (``("channel", "linear")``);
            ``"auto"`` picks each layer's :func:`trp.schemes.default_for`.
        rank: A criterion (``trp.energy(0.9)`` by default, ``trp.value``, ``trp.fixed``,
            ``trp.fraction``, or the whole-model ``trp.speedup``), an int rank, or a dict of
            per-layer ranks ``{name: k}``.
        filter_fn: ``filter_fn(module, name) -> bool`` picks the layers to consider.
        input_shape: One sample's shape for MACs accounting (default:
            :func:`trp.tracing.default_input_shape`).

    Returns:
        A :class:`Plan` listing every conv and Linear layer (and ``nn.MultiheadAttention``), with
        the reason for those left dense.

    Example:
        >>> import trp
        >>> p = plan(nn.Sequential(nn.Linear(64, 64)), "linear", trp.fixed(8))
        >>> p.layers[0].rank, p.speedup
        (8, 4.0)
    """
    criterion = rank_mod.resolve(rank)
    result, cands = _trace(model, scheme, filter_fn, input_shape)
    result.criterion = "per-layer ranks" if isinstance(criterion, dict) else str(criterion)
    for c in cands:
        c.spectrum = c.scheme.singular_values(c.module.weight, c.name)
    spectra = {c.name: c.spectrum for c in cands}
    budget = hasattr(criterion, "solve")  # a whole-model budget (trp.speedup, trp.latency) allocates rank jointly
    if budget:
        ranks = criterion.solve(cands, result.macs_before, model=model, input_shape=result.input_shape)
    elif isinstance(criterion, dict):  # explicit per-layer ranks (e.g. from SVD training's pruning)
        ranks = {n: min(criterion[n], int(s.numel())) if n in criterion else None for n, s in spectra.items()}
    else:
        ranks = {n: criterion.select(s) for n, s in spectra.items()}
    for c in cands:
        lp, spectrum = c.lp, spectra[c.lp.name]
        lp.full_rank = int(spectrum.numel())
        k = ranks[lp.name] or lp.full_rank  # None: the budget found the dense form cheaper, or no rank given
        bias = sum(p.numel() for p in c.module.parameters(recurse=False)) - c.module.weight.numel()
        lp.rank, lp.energy = k, rank_mod.kept_energy(spectrum, k)
        lp.macs_after = k * c.cost
        lp.params_after = k * c.scheme.params_per_rank(c.module) + bias
        if isinstance(criterion, dict) and lp.name not in criterion:
            lp.reason = "no rank given for it in the per-layer ranks"
        elif budget and ranks[lp.name] is None and not isinstance(criterion, rank_mod.Speedup):
            lp.reason = f"{criterion} keeps it dense: no allowed rank of it is faster than dense"
        elif lp.macs_after >= lp.macs_before:
            lp.reason = f"rank {k} does not lower its MACs ({lp.macs_after:,} >= {lp.macs_before:,} dense)"
    _count_tied_once(model, result)
    return result


def _count_tied_once(model: nn.Module, result: Plan) -> None:
    """Make each decomposed layer's ``params_before`` what decomposing it frees, counting a tied weight once.

    A parameter shared by several modules is freed only when every module holding it is decomposed,
    and then it is counted for the first of them only; so ``Plan.params_after`` is the decomposed
    model's real parameter count and never negative.
    """
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():  # a module under several names is listed once
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(module)
    decomposed = {id(get_module(model, lp.name)) for lp in result.layers if lp.decomposed}
    counted: set[int] = set()
    for lp in result.layers:
        if not lp.decomposed:
            continue
        freed = 0
        for p in get_module(model, lp.name).parameters(recurse=False):
            if id(p) not in counted and all(id(m) in decomposed for m in holders[id(p)]):
                counted.add(id(p))
                freed += p.numel()
        lp.params_before = freed


def checked_module(model: nn.Module, lp: LayerPlan) -> nn.Module:
    """The model's layer that ``lp`` describes, or a TRPError saying how the plan does not fit.

    Example:
        >>> p = plan(nn.Sequential(nn.Linear(4, 4)), "linear", 2)
        >>> checked_module(nn.Sequential(nn.Linear(4, 4)), p.layers[0])
        Linear(in_features=4, out_features=4, bias=True)
    """
    try:
        module = get_module(model, lp.name)
    except AttributeError:
        raise TRPError(f"the plan does not fit this model: it has no layer {lp.name!r}") from None
    weight = getattr(module, "weight", None)
    if type(module).__name__ != lp.type or weight is None or list(weight.shape) != lp.weight_shape:
        shape = list(weight.shape) if weight is not None else None
        raise TRPError(
            f"the plan does not fit this model: layer {lp.name!r} is {type(module).__name__} {shape}, "
            f"the plan expects {lp.type} {lp.weight_shape}"
        )
    return module


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Give a fresh model the plan's decomposed structure (weights left to ``load_state_dict``).

    This is how a compressed checkpoint loads without pickled modules: build the architecture,
    apply the saved plan, then load the saved weights.

    Example:
        >>> import trp
        >>> from trp.models import create
        >>> small = trp.decompose_(create("resnet20"), trp.fixed(4), input_shape=(3, 32, 32))
        >>> p = trp.plan(create("resnet20"), rank=trp.fixed(4), input_shape=(3, 32, 32))
        >>> fresh = apply_plan(create("resnet20"), p)
        >>> fresh.load_state_dict(small.state_dict())
        <All keys matched successfully>
    """
    replacements = {lp.name: schemes.get(lp.scheme).build(checked_module(model, lp), lp.rank)
                    for lp in plan.layers if lp.decomposed}
    replace_modules(model, replacements)
    return model


def low_rank_layers(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """The two-layer replacement of every layer the plan decomposes, from the model's current
    weights: one factorization per layer, at the planned rank (a checked randomized SVD where the
    rank is far below the layer's size, see :meth:`trp.schemes.Scheme.factorize`). Nothing in the
    model changes; ``trp.surgery.replace_modules(model, low_rank_layers(model, plan))`` applies them.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(8, 8))
        >>> new = low_rank_layers(model, plan(model, "linear", 2))
        >>> [m.out_features for m in new["0"]]
        [2, 8]
    """
    out: dict[str, nn.Module] = {}
    for lp in plan.layers:
        if lp.decomposed:
            module = checked_module(model, lp)
            sch = schemes.get(lp.scheme)
            out[lp.name] = sch.build(module, lp.rank, sch.factorize(module.weight, lp.name, lp.rank, lp.energy))
    return out
