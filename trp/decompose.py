"""Exact low-rank decomposition of conv and Linear layers into stock layers, planned per model.

A scheme turns one dense layer into an ``nn.Sequential`` of two stock layers (``nn.Conv2d`` or
``nn.Linear``), so FLOP counters, ``state_dict``, export and ``torch.compile`` see ordinary modules.
Stride, padding (numbers or ``'same'``/``'valid'``), dilation, ``padding_mode`` and bias carry over
exactly: at full rank the two layers compute the dense layer's output.

Schemes (the registry :data:`SCHEMES`):

* ``channel`` (Zhang et al., TPAMI 2016): Conv2d(C→k, kh×kw, stride, padding, dilation) then
  Conv2d(k→N, 1×1, bias).
* ``spatial`` (Jaderberg et al., 2014): Conv2d(C→k, kh×1) carrying the vertical stride, padding
  and dilation, then Conv2d(k→N, 1×kw, bias) carrying the horizontal ones.
* ``decouple`` (Guo et al., BMVC 2018): each filter W[n] (C×kh·kw) by SVD into k rank-one terms,
  i.e. k pointwise→depthwise paths per output channel: one 1×1 conv C→k·N, then one grouped
  kh×kw conv k·N→N with groups=N, which is the depthwise conv of every path and the sum over a
  filter's k paths in one stock layer.
* ``linear``: Linear(in→k, no bias) then Linear(k→out, bias).
"""

from __future__ import annotations

import abc
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import torch
from torch import Tensor, nn

from trp import rank as rank_mod
from trp import svd as svd_mod
from trp.errors import TRPError
from trp.measure import layer_macs, trace_calls

__all__ = [
    "Scheme",
    "SCHEMES",
    "LayerPlan",
    "Plan",
    "decompose_layer",
    "plan",
    "decompose_",
    "apply_plan",
    "get_module",
    "set_module",
    "default_input_shape",
    "fold_bn_",
    "fold_bn_structure_",
    "compose",
    "replace_modules",
]

FilterFn = Callable[[nn.Module, str], bool]
SchemeArg = Union[str, Sequence[str]]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Scheme(abc.ABC):
    """How one kind of layer is laid out, costed and rebuilt. Subclasses fill in the details."""

    name = ""
    layout = ""

    def check(self, module: nn.Module) -> str | None:
        """The reason this scheme cannot decompose ``module``, or None if it can."""
        if type(module) is not nn.Conv2d:
            kind = type(module).__name__
            hint = " (use scheme 'linear')" if isinstance(module, nn.Linear) else ""
            return f"{kind} is not handled by scheme {self.name!r}{hint}"
        if module.groups != 1:
            return f"groups={module.groups}: scheme {self.name!r} needs groups=1"
        return None

    def full_rank(self, module: nn.Module) -> int:
        m = svd_mod.to_matrix(module.weight.detach(), self.layout)
        return min(m.shape[-2], m.shape[-1])

    @abc.abstractmethod
    def macs_per_rank(self, module: nn.Module, ins: Sequence[int], outs: Sequence[int]) -> int:
        """MACs of the decomposed form per unit of rank, for one call with these shapes."""

    @abc.abstractmethod
    def params_per_rank(self, module: nn.Module) -> int:
        """Weights of the decomposed form per unit of rank (the bias comes on top)."""

    @abc.abstractmethod
    def build(self, module: nn.Module, k: int, factors: tuple[Tensor, Tensor, Tensor] | None = None) -> nn.Sequential:
        """The two-layer module of rank k; from the SVD ``factors`` (U, S, Vh), or untrained without them."""

    @staticmethod
    def _split(s: Tensor, k: int) -> Tensor:
        # sqrt(σ) on both sides keeps the two factors equally scaled, which matters for training
        # them afterwards (fine-tuning, weight decay) and for float32 round-off.
        return s[..., :k].clamp_min(0).sqrt()


class ChannelScheme(Scheme):
    name = layout = "channel"

    def macs_per_rank(self, module: nn.Conv2d, ins: Sequence[int], outs: Sequence[int]) -> int:
        n, c, kh, kw = module.weight.shape
        return (c * kh * kw + n) * outs[1] * outs[2]

    def params_per_rank(self, module: nn.Conv2d) -> int:
        n, c, kh, kw = module.weight.shape
        return c * kh * kw + n

    def build(self, module: nn.Conv2d, k: int, factors: tuple[Tensor, Tensor, Tensor] | None = None) -> nn.Sequential:
        n, c, kh, kw = module.weight.shape
        dd = {"device": module.weight.device, "dtype": module.weight.dtype}
        first = nn.Conv2d(c, k, (kh, kw), module.stride, module.padding, module.dilation,
                          bias=False, padding_mode=module.padding_mode, **dd)
        second = nn.Conv2d(k, n, 1, bias=module.bias is not None, **dd)
        if factors is not None:
            u, s, vh = factors
            root = self._split(s, k)
            with torch.no_grad():
                first.weight.copy_((root[:, None] * vh[:k]).reshape(k, c, kh, kw))
                second.weight.copy_((u[:, :k] * root).reshape(n, k, 1, 1))
                if module.bias is not None:
                    second.bias.copy_(module.bias)
        return nn.Sequential(first, second)


class SpatialScheme(Scheme):
    name = layout = "spatial"

    def macs_per_rank(self, module: nn.Conv2d, ins: Sequence[int], outs: Sequence[int]) -> int:
        n, c, kh, kw = module.weight.shape
        # The vertical layer keeps the input's full width; the horizontal one produces the output.
        return c * kh * outs[1] * ins[2] + n * kw * outs[1] * outs[2]

    def params_per_rank(self, module: nn.Conv2d) -> int:
        n, c, kh, kw = module.weight.shape
        return c * kh + n * kw

    def build(self, module: nn.Conv2d, k: int, factors: tuple[Tensor, Tensor, Tensor] | None = None) -> nn.Sequential:
        n, c, kh, kw = module.weight.shape
        sh, sw = _pair(module.stride)
        dh, dw = _pair(module.dilation)
        if isinstance(module.padding, str):  # 'same' / 'valid' apply per dimension, so they split too
            pv = ph = module.padding
        else:
            p0, p1 = _pair(module.padding)
            pv, ph = (p0, 0), (0, p1)
        dd = {"device": module.weight.device, "dtype": module.weight.dtype}
        # A padding mode other than zeros pads each dimension independently of the other, so
        # padding rows before the vertical pass and columns before the horizontal one is exact.
        vertical = nn.Conv2d(c, k, (kh, 1), (sh, 1), pv, (dh, 1), bias=False, padding_mode=module.padding_mode, **dd)
        horizontal = nn.Conv2d(k, n, (1, kw), (1, sw), ph, (1, dw), bias=module.bias is not None,
                               padding_mode=module.padding_mode, **dd)
        if factors is not None:
            u, s, vh = factors  # u: (C·kh)×r, vh: r×(N·kw)
            root = self._split(s, k)
            with torch.no_grad():
                vertical.weight.copy_((u[:, :k] * root).t().reshape(k, c, kh, 1))
                horizontal.weight.copy_((root[:, None] * vh[:k]).reshape(k, n, kw).permute(1, 0, 2).unsqueeze(2))
                if module.bias is not None:
                    horizontal.bias.copy_(module.bias)
        return nn.Sequential(vertical, horizontal)


class DecoupleScheme(Scheme):
    name = layout = "decouple"

    def macs_per_rank(self, module: nn.Conv2d, ins: Sequence[int], outs: Sequence[int]) -> int:
        n, c, kh, kw = module.weight.shape
        # The pointwise layer runs at the input resolution, the grouped depthwise one at the output's.
        return n * c * ins[1] * ins[2] + n * kh * kw * outs[1] * outs[2]

    def params_per_rank(self, module: nn.Conv2d) -> int:
        n, c, kh, kw = module.weight.shape
        return n * c + n * kh * kw

    def build(self, module: nn.Conv2d, k: int, factors: tuple[Tensor, Tensor, Tensor] | None = None) -> nn.Sequential:
        n, c, kh, kw = module.weight.shape
        dd = {"device": module.weight.device, "dtype": module.weight.dtype}
        # Channels are ordered filter-major (n·k + j) so that groups=N gives each filter its own k paths.
        pointwise = nn.Conv2d(c, k * n, 1, bias=False, **dd)
        depthwise_sum = nn.Conv2d(k * n, n, (kh, kw), module.stride, module.padding, module.dilation, groups=n,
                                  bias=module.bias is not None, padding_mode=module.padding_mode, **dd)
        if factors is not None:
            u, s, vh = factors  # u: N×C×r, s: N×r, vh: N×r×(kh·kw)
            root = self._split(s, k)
            with torch.no_grad():
                pointwise.weight.copy_((u[:, :, :k] * root[:, None, :]).permute(0, 2, 1).reshape(k * n, c, 1, 1))
                depthwise_sum.weight.copy_((root[:, :, None] * vh[:, :k]).reshape(n, k, kh, kw))
                if module.bias is not None:
                    depthwise_sum.bias.copy_(module.bias)
        return nn.Sequential(pointwise, depthwise_sum)


class LinearScheme(Scheme):
    name = layout = "linear"

    def check(self, module: nn.Module) -> str | None:
        if type(module) is not nn.Linear:
            return f"{type(module).__name__} is not handled by scheme 'linear'"
        return None

    def macs_per_rank(self, module: nn.Linear, ins: Sequence[int], outs: Sequence[int]) -> int:
        positions = math.prod(outs) // module.out_features
        return (module.in_features + module.out_features) * positions

    def params_per_rank(self, module: nn.Linear) -> int:
        return module.in_features + module.out_features

    def build(self, module: nn.Linear, k: int, factors: tuple[Tensor, Tensor, Tensor] | None = None) -> nn.Sequential:
        dd = {"device": module.weight.device, "dtype": module.weight.dtype}
        first = nn.Linear(module.in_features, k, bias=False, **dd)
        second = nn.Linear(k, module.out_features, bias=module.bias is not None, **dd)
        if factors is not None:
            u, s, vh = factors
            root = self._split(s, k)
            with torch.no_grad():
                first.weight.copy_(root[:, None] * vh[:k])
                second.weight.copy_(u[:, :k] * root)
                if module.bias is not None:
                    second.bias.copy_(module.bias)
        return nn.Sequential(first, second)


SCHEMES: dict[str, Scheme] = {s.name: s for s in (ChannelScheme(), SpatialScheme(), DecoupleScheme(), LinearScheme())}


def _schemes(scheme: SchemeArg) -> list[Scheme]:
    names = [scheme] if isinstance(scheme, str) else list(scheme)
    if not names:
        raise TRPError("no scheme given")
    for name in names:
        if name not in SCHEMES:
            raise TRPError(f"unknown scheme {name!r}; choose one of: {', '.join(SCHEMES)}")
    return [SCHEMES[name] for name in names]


def _factors(module: nn.Module, scheme: Scheme, name: str) -> tuple[Tensor, Tensor, Tensor]:
    matrix = svd_mod.to_matrix(module.weight.detach(), scheme.layout)
    return svd_mod.svd(matrix, name)


def _resolve_rank(rank: int | rank_mod.Criterion | None, s: Tensor) -> int:
    if rank is None:
        return s.shape[-1]
    if isinstance(rank, bool):
        raise TRPError(f"rank must be an int or a criterion, got {rank!r}")
    if isinstance(rank, int):
        return rank_mod.fixed(rank).select(svd_mod.spectrum(s))
    if isinstance(rank, rank_mod.Speedup):
        raise TRPError("a speed-up budget applies to a whole model: use trp.decompose_ or trp.plan")
    return rank.select(svd_mod.spectrum(s))


def decompose_layer(module: nn.Module, scheme: str = "channel", rank: int | rank_mod.Criterion | None = None) -> nn.Sequential:
    """Build the two-layer low-rank form of one dense layer (like TensorLy-Torch's ``from_conv``).

    Args:
        module: An ``nn.Conv2d`` (groups=1) or ``nn.Linear``.
        scheme: ``channel``, ``spatial``, ``decouple`` or ``linear``.
        rank: A rank, a per-layer criterion such as ``trp.energy(0.9)``, or None for full rank
            (exact up to float round-off).

    Returns:
        An ``nn.Sequential`` of two stock layers on the module's device and dtype.

    Example:
        >>> conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        >>> low = decompose_layer(conv, "channel")
        >>> x = torch.randn(2, 8, 10, 10)
        >>> torch.allclose(low(x), conv(x), atol=1e-5)
        True
    """
    sch = _schemes(scheme)[0]
    reason = sch.check(module)
    if reason:
        raise TRPError(reason)
    u, s, vh = _factors(module, sch, "layer")
    k = _resolve_rank(rank, s)
    return sch.build(module, k, (u, s, vh))


@dataclass
class LayerPlan:
    """One layer of a :class:`Plan`: what happens to it and what it costs before and after."""

    name: str
    type: str
    weight_shape: list[int]
    in_shape: list[int]
    out_shape: list[int]
    macs_before: int
    params_before: int
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = "trp-plan/1"
        d["macs_after"], d["params_after"], d["speedup"] = self.macs_after, self.params_after, self.speedup
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize; with ``path``, also write the file atomically."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            from trp.io import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != "trp-plan/1":
            raise TRPError("not a trp plan (missing format 'trp-plan/1')")
        try:
            layers = [LayerPlan(**lp) for lp in d["layers"]]
            plan = cls(list(d["input_shape"]), str(d["criterion"]), int(d["macs_before"]), int(d["params_before"]), layers)
        except (KeyError, TypeError, ValueError) as err:
            raise TRPError(f"damaged trp plan: {err}") from None
        for lp in layers:
            if lp.decomposed and (lp.scheme not in SCHEMES or isinstance(lp.rank, bool) or not isinstance(lp.rank, int)
                                  or lp.rank < 1):
                raise TRPError(f"damaged trp plan: layer {lp.name!r} has scheme {lp.scheme!r}, rank {lp.rank!r}")
        return plan

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
        lines.append(
            f"model: MACs {self.macs_before:,} -> {self.macs_after:,} ({self.speedup:.2f}x), "
            f"params {self.params_before:,} -> {self.params_after:,} ({self.criterion}, input {tuple(self.input_shape)})"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted name (``""`` is the model itself).

    Example:
        >>> get_module(nn.Sequential(nn.Linear(2, 2)), "0")
        Linear(in_features=2, out_features=2, bias=True)
    """
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted name.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> set_module(m, "0", nn.Identity()); m
        Sequential(
          (0): Identity()
        )
    """
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new)


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """A sample shape when none is given: the model's ``input_shape`` attribute if it has one, else
    3-D (C, 32, 32) from the first conv's input channels, or (in_features,) for a Linear-first model.

    Example:
        >>> default_input_shape(nn.Sequential(nn.Conv2d(1, 4, 3)))
        (1, 32, 32)
    """
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return tuple(int(d) for d in shape)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (module.in_channels, 32, 32)
        if isinstance(module, nn.Linear):
            return (module.in_features,)
    raise TRPError("cannot guess the input shape of a model with no Conv2d or Linear layer; pass input_shape")


@dataclass
class _Candidate:
    lp: LayerPlan
    module: nn.Module
    scheme: Scheme
    factors: tuple[Tensor, Tensor, Tensor]
    spectrum: Tensor
    cost: int  # MACs per unit of rank


def _solve_speedup(cands: list[_Candidate], macs_total: int, target: float) -> dict[str, int | None]:
    """Ranks for a whole-model MACs budget, from the singular values alone.

    Each layer's j-th singular value buys a share σ_j²/Σσ² of that layer's energy for ``cost`` MACs;
    a single threshold λ on energy per MAC keeps, in every layer, the values above it, so rank goes
    where it keeps the most energy per FLOP. A layer whose low-rank form would cost at least its
    dense form stays dense (None). The total is monotone in λ, so a binary search over the sorted
    gains finds the smallest budget-meeting threshold; one rank of one layer is the step size.
    """
    budget = macs_total / target
    fixed_macs = macs_total - sum(c.lp.macs_before for c in cands)
    gains = []
    for c in cands:
        power = c.spectrum.double().pow(2)
        share = power / power.sum() if float(power.sum()) > 0 else torch.zeros_like(power)
        gains.append(share / c.cost)

    def ranks_at(lam: float) -> tuple[dict[str, int | None], int]:
        out: dict[str, int | None] = {}
        total = fixed_macs
        for c, g in zip(cands, gains):
            k = max(1, int((g >= lam).sum()))
            if k * c.cost >= c.lp.macs_before:
                out[c.lp.name], total = None, total + c.lp.macs_before
            else:
                out[c.lp.name], total = k, total + k * c.cost
        return out, total

    lams = torch.unique(torch.cat(gains)).flip(0).tolist() if gains else []  # descending
    best, best_total = ranks_at(math.inf)
    if best_total > budget * 1.02:
        raise TRPError(
            f"speed-up {target:g}x is out of reach: with every decomposable layer at rank 1 the model runs "
            f"{macs_total / best_total:.2f}x fewer MACs"
        )
    lo, hi = 0, len(lams) - 1  # find the last λ (most rank) whose total stays within budget
    while lo <= hi:
        mid = (lo + hi) // 2
        ranks, total = ranks_at(lams[mid])
        if total <= budget:
            best, best_total, lo = ranks, total, mid + 1
        else:
            hi = mid - 1
    # A dense switch can make the next threshold jump by up to a layer's whole cost; fill what is
    # left of the budget one rank at a time, best energy per MAC first, taking a last step past the
    # budget only when that lands closer to it (coarse steps, as in ``decouple``, need that).
    total = best_total
    while True:
        options = [
            (float(g[k]), c, k)
            for c, g in zip(cands, gains)
            if (k := best[c.lp.name]) is not None and k < g.numel()
            and total + c.cost - budget < budget - total and (k + 1) * c.cost < c.lp.macs_before
        ]
        if not options:
            return best
        _, c, k = max(options, key=lambda o: o[0])
        best[c.lp.name], total = k + 1, total + c.cost


def plan(
    model: nn.Module,
    scheme: SchemeArg = "channel",
    rank: rank_mod.Criterion | int | None = None,
    filter_fn: FilterFn | None = None,
    input_shape: Sequence[int] | None = None,
) -> Plan:
    """Decide, without changing the model, how every layer would be decomposed.

    Args:
        model: Any ``nn.Module``.
        scheme: A scheme name, or several tried in order per layer (``("channel", "linear")``).
        rank: A criterion (``trp.energy(0.9)`` by default, ``trp.value``, ``trp.fixed``,
            ``trp.fraction``, or the whole-model ``trp.speedup``), an int rank, or a dict of
            per-layer ranks ``{name: k}``.
        filter_fn: ``filter_fn(module, name) -> bool`` picks the layers to consider.
        input_shape: One sample's shape for MACs accounting (default: :func:`default_input_shape`).

    Returns:
        A :class:`Plan` listing every conv and Linear layer, with the reason for those left dense.

    Example:
        >>> from trp.models import create
        >>> import trp
        >>> p = plan(create("resnet20"), "channel", trp.speedup(3.0), input_shape=(3, 32, 32))
        >>> abs(p.speedup / 3.0 - 1) < 0.02
        True
    """
    schemes = _schemes(scheme)
    if rank is None:
        rank = rank_mod.energy(0.9)
    if isinstance(rank, bool) or not isinstance(rank, (int, dict, rank_mod.Energy, rank_mod.Value, rank_mod.Fixed,
                                                        rank_mod.Fraction, rank_mod.Speedup)):
        raise TRPError(f"rank must be an int, a {{layer: rank}} dict or a criterion such as trp.energy(0.9), got {rank!r}")
    if isinstance(rank, int):
        rank = rank_mod.fixed(rank)
    input_shape = tuple(int(d) for d in (input_shape or default_input_shape(model)))
    calls = trace_calls(model, input_shape)
    modules = dict(model.named_modules())
    macs_total = sum(layer_macs(modules[n], i, o) for n, shapes in calls.items() for i, o in shapes)
    params_total = sum(p.numel() for p in model.parameters())
    names = ", ".join(s.name for s in schemes)
    label = "per-layer ranks" if isinstance(rank, dict) else str(rank)
    result = Plan(list(input_shape), label, macs_total, params_total)
    cands: list[_Candidate] = []
    for name, shapes in calls.items():
        module = modules[name]
        weight = getattr(module, "weight", None)
        ins, outs = shapes[0]
        lp = LayerPlan(name, type(module).__name__, list(weight.shape) if weight is not None else [], list(ins),
                       list(outs), sum(layer_macs(module, i, o) for i, o in shapes),
                       sum(p.numel() for p in module.parameters(recurse=False)))
        result.layers.append(lp)
        if filter_fn is not None and not filter_fn(module, name):
            lp.reason = "excluded by filter_fn"
            continue
        reasons = []
        for sch in schemes:
            why = sch.check(module)
            if why is None:
                break
            reasons.append(why)
        else:
            lp.reason = "; ".join(reasons) if len(reasons) == 1 else f"no scheme of [{names}] applies: " + "; ".join(reasons)
            continue
        lp.scheme = sch.name
        u, s, vh = _factors(module, sch, name)
        spec = svd_mod.spectrum(s)
        lp.full_rank = int(spec.numel())
        cost = sum(sch.macs_per_rank(module, i, o) for i, o in shapes)  # a shared layer pays per call
        cands.append(_Candidate(lp, module, sch, (u, s, vh), spec, cost))

    if isinstance(rank, rank_mod.Speedup):
        ranks = _solve_speedup(cands, macs_total, rank.s)
    elif isinstance(rank, dict):  # explicit per-layer ranks (e.g. from SVD training's pruning)
        ranks = {c.lp.name: min(int(rank[c.lp.name]), c.lp.full_rank) if c.lp.name in rank else None for c in cands}
    else:
        ranks = {c.lp.name: rank.select(c.spectrum) for c in cands}
    for c in cands:
        lp, k = c.lp, ranks[c.lp.name]
        extra = sum(p.numel() for p in c.module.parameters(recurse=False)) - c.module.weight.numel()  # the bias
        if k is None:  # the budget solver found the dense form cheaper, or no rank was given
            k = lp.full_rank
        lp.rank, lp.energy = k, rank_mod.kept_energy(c.spectrum, k)
        lp.macs_after = k * c.cost
        lp.params_after = k * c.scheme.params_per_rank(c.module) + extra
        if lp.macs_after >= lp.macs_before:
            lp.reason = f"rank {k} does not lower its MACs ({lp.macs_after:,} >= {lp.macs_before:,} dense)"
    return result


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Put each new module at its dotted name; if any replacement fails, undo those already made.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> replace_modules(m, {"1": nn.Identity()}); m[1]
        Identity()
    """
    originals: dict[str, nn.Module] = {}
    try:
        for name, new in replacements.items():
            originals[name] = get_module(model, name)
            set_module(model, name, new)
    except Exception:
        for name, old in originals.items():  # roll back: the model is left as it was
            set_module(model, name, old)
        raise


def decompose_(
    model: nn.Module,
    scheme: SchemeArg = "channel",
    rank: rank_mod.Criterion | int | None = None,
    filter_fn: FilterFn | None = None,
    input_shape: Sequence[int] | None = None,
    plan: Plan | None = None,
) -> nn.Module:
    """Decompose a model's layers in place and return it (like torchao's ``quantize_``).

    Either the arguments of :func:`plan` pick the ranks, or a ready ``plan`` is applied to this
    model's current weights. Every replacement is computed before any is made, so a failure leaves
    the model unchanged. The decomposed layers are new parameters: build the optimizer afterwards.

    Example:
        >>> import trp
        >>> from trp.models import create
        >>> model = trp.decompose_(create("resnet20"), "channel", trp.speedup(3.0), input_shape=(3, 32, 32))
        >>> round(trp.profile(model, (3, 32, 32)).macs / 40_551_040, 1)
        0.3
    """
    p = plan if plan is not None else globals()["plan"](model, scheme, rank, filter_fn, input_shape)
    replacements = {}
    for lp in p.layers:
        if not lp.decomposed:
            continue
        module = _checked_module(model, lp)
        sch = SCHEMES[lp.scheme]
        replacements[lp.name] = sch.build(module, lp.rank, _factors(module, sch, lp.name))
    replace_modules(model, replacements)
    return model


def _checked_module(model: nn.Module, lp: LayerPlan) -> nn.Module:
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
        >>> small = trp.decompose_(create("resnet20"), rank=trp.fixed(4), input_shape=(3, 32, 32))
        >>> p = trp.plan(create("resnet20"), rank=trp.fixed(4), input_shape=(3, 32, 32))
        >>> fresh = apply_plan(create("resnet20"), p)
        >>> fresh.load_state_dict(small.state_dict())
        <All keys matched successfully>
    """
    replacements = {}
    for lp in plan.layers:
        if lp.decomposed:
            module = _checked_module(model, lp)
            replacements[lp.name] = SCHEMES[lp.scheme].build(module, lp.rank)
    replace_modules(model, replacements)
    return model


def _conv_bn_pairs(model: nn.Module) -> list[list[str]]:
    """Conv2d → BatchNorm2d pairs where the BN is the conv's only consumer, found by torch.fx."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # control flow fx cannot trace: fold nothing rather than guess
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or not node.args:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if type(conv) is nn.Conv2d and len(src.users) == 1 and conv.out_channels == bn.num_features:
            pairs.append([str(src.target), str(node.target)])
    return pairs


def fold_bn_(model: nn.Module) -> list[list[str]]:
    """Fold every inference-mode BatchNorm2d into the conv before it, in place.

    BN after a conv is an affine map per output channel, so for inference it can be merged into
    the conv's weight and bias: W' = W·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β. Folding before
    decomposition removes a memory-bound pass per layer, which is what lets measured latency follow
    the MACs. The BN becomes ``nn.Identity``. Only valid for evaluation (running statistics).

    Returns:
        The folded ``[conv, bn]`` name pairs (what :func:`fold_bn_structure_` needs to rebuild it).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> x = torch.randn(1, 3, 5, 5); before = m(x)
        >>> fold_bn_(m)
        [['0', '1']]
        >>> torch.allclose(m(x), before, atol=1e-5)
        True
    """
    pairs = _conv_bn_pairs(model)
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = get_module(model, conv_name), get_module(model, bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            new_bias = (bias - bn.running_mean) * scale + shift
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
            set_module(model, bn_name, nn.Identity())
    return pairs


def fold_bn_structure_(model: nn.Module, pairs: Sequence[Sequence[str]]) -> nn.Module:
    """Give a fresh model the structure :func:`fold_bn_` produced (conv bias, BN removed).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
        >>> fold_bn_structure_(m, [["0", "1"]])[1]
        Identity()
    """
    for conv_name, bn_name in pairs:
        try:
            conv = get_module(model, conv_name)
            get_module(model, bn_name)
        except AttributeError:
            raise TRPError(f"the folded-BN list does not fit this model (no {conv_name!r} / {bn_name!r})") from None
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
        set_module(model, bn_name, nn.Identity())
    return model


def compose(module: nn.Sequential, scheme: str) -> Tensor:
    """The dense weight a decomposed two-layer module computes (the inverse of ``build``).

    Example:
        >>> conv = nn.Conv2d(4, 6, 3)
        >>> torch.allclose(compose(decompose_layer(conv, "spatial"), "spatial"), conv.weight, atol=1e-5)
        True
    """
    a, b = module[0].weight.detach(), module[1].weight.detach()
    if scheme == "linear":
        return b @ a
    if scheme == "channel":
        return torch.einsum("nk,kchw->nchw", b[:, :, 0, 0], a)
    if scheme == "spatial":
        return torch.einsum("kcy,nkx->ncyx", a[..., 0], b[:, :, 0, :])
    if scheme == "decouple":
        n, k = b.shape[0], b.shape[1]
        return torch.einsum("nkc,nkyx->ncyx", a[:, :, 0, 0].reshape(n, k, -1), b)
    raise TRPError(f"unknown scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
