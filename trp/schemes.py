"""The registry of decomposition schemes: the one home of everything a scheme is.

A conv kernel W of shape N×C×kh×kw is low-rank only after it is laid out as a matrix, and the
layout decides which two-layer factorization the rank buys. Each scheme owns its matrix layout
(:meth:`Scheme.to_matrix` / :meth:`Scheme.from_matrix`), its MACs and parameters per unit of rank,
the layer types it accepts, building the two stock layers of rank k from the SVD factors, and
composing them back into the dense weight. Every other module (planning, TRP, SVD training,
reports, the command line, the benchmark) takes its list of schemes from :data:`SCHEMES`.

* ``channel`` (Zhang et al., TPAMI 2016): ``M = W.reshape(N, C·kh·kw)``; Conv2d(C→k, kh×kw,
  stride, padding, dilation) then Conv2d(k→N, 1×1, bias).
* ``spatial`` (Jaderberg et al., 2014): ``M[(c,y), (n,x)] = W[n,c,y,x]``, a (C·kh)×(N·kw) matrix;
  Conv2d(C→k, kh×1) carrying the vertical stride, padding and dilation, then Conv2d(k→N, 1×kw,
  bias) carrying the horizontal ones.
* ``decouple`` (Guo et al., BMVC 2018): every output filter ``W[n]`` as a C×(kh·kw) matrix, a
  *batch* of N matrices sharing one rank k: k pointwise→depthwise paths per filter, built as one
  1×1 conv C→k·N and one grouped kh×kw conv k·N→N with groups=N.
* ``linear``: a Linear weight is already a matrix; Linear(in→k, no bias) then Linear(k→out, bias).
  Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2) is a Linear whose weight is stored
  transposed (in×out, ``y = x·W + b``); the matrix is its weight as stored too (its SVD is the
  transpose of Wᵀ's, so spectra, projections and sub-gradients are the same), and :meth:`build`
  reads the factors the other way round, giving the same two stock Linears. Conv1D is recognized
  by its class's module path, so ``transformers`` is never imported here.

One run can mix schemes by layer type: wherever a list of names is taken, each layer gets the
first that accepts it, and the name ``auto`` stands for :func:`default_for` (the first registered
scheme accepting the layer: ``channel`` for a Conv2d, ``linear`` for a Linear or Conv1D).

Stride, padding (numbers or ``'same'``/``'valid'``), dilation, ``padding_mode`` and bias carry over
exactly: at full rank the two layers compute the dense layer's output. For the batched ``decouple``
layout a layer's *spectrum* is ``sqrt(Σ_n σ_{n,i}²)``, so the energy criterion and the Eckart–Young
error read the same for every scheme.

Example:
    >>> conv = nn.Conv2d(4, 6, 3)
    >>> sch = get("spatial")
    >>> low = sch.build(conv, 12, sch.factorize(conv.weight))
    >>> torch.allclose(sch.compose(low), conv.weight, atol=1e-5)
    True
"""

from __future__ import annotations

import abc
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from trp import svd as svd_mod
from trp.errors import TRPError
from trp.validate import choice

__all__ = ["Scheme", "SCHEMES", "AUTO", "get", "names", "names_for", "default_for", "parse_names", "applicable",
           "is_hf_conv1d", "Factors"]

Factors = tuple[Tensor, Tensor, Tensor]

#: In a list of scheme names: the layer's own default scheme (:func:`default_for`).
AUTO = "auto"


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``transformers.pytorch_utils.Conv1D`` (checked by class name and module
    path, so ``transformers`` need not be installed, and is never imported).

    Example:
        >>> is_hf_conv1d(nn.Linear(2, 2))
        False
    """
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers"


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _split(s: Tensor, k: int) -> Tensor:
    # sqrt(σ) on both sides keeps the two factors equally scaled, which matters for training
    # them afterwards (fine-tuning, weight decay) and for float32 round-off.
    return s[..., :k].clamp_min(0).sqrt()


def _dd(module: nn.Module) -> dict:
    return {"device": module.weight.device, "dtype": module.weight.dtype}


class Scheme(abc.ABC):
    """How one kind of layer is laid out as a matrix, costed, factorized and composed back."""

    name = ""
    #: True when the layout is a batch of matrices sharing one rank (no single U·diag(s)·Vᵀ).
    batched = False

    def check(self, module: nn.Module) -> str | None:
        """The reason this scheme cannot decompose ``module``, or None if it can."""
        if type(module) is not nn.Conv2d:
            kind = type(module).__name__
            hint = " (use scheme 'linear')" if isinstance(module, nn.Linear) or is_hf_conv1d(module) else ""
            return f"{kind} is not handled by scheme {self.name!r}{hint}"
        if module.groups != 1:
            return f"groups={module.groups}: scheme {self.name!r} needs groups=1"
        return None

    @abc.abstractmethod
    def to_matrix(self, weight: Tensor) -> Tensor:
        """The weight laid out as the matrix (or batch of matrices) whose rank the scheme exploits."""

    @abc.abstractmethod
    def from_matrix(self, matrix: Tensor, shape: Sequence[int]) -> Tensor:
        """Invert :meth:`to_matrix`: a (possibly low-rank) matrix back in the weight's shape."""

    def factorize(self, weight: Tensor, name: str = "layer", rank: int | None = None,
                  energy: float | None = None) -> Factors:
        """The thin SVD ``(U, S, Vh)`` of the weight in this layout (float32 or wider).

        With the ``rank`` k that will be kept and the ``energy`` the plan expects it to keep
        (``Σ_{i≤k} σ_i² / Σ σ_i²``), a single-matrix layout far larger than k is factorized by a
        randomized SVD (:func:`trp.svd.svd_rank`), checked against that energy and replaced by the
        full SVD when it falls short; only the first k factors are then guaranteed.
        """
        matrix = self.to_matrix(weight.detach())
        if rank is not None and energy is not None and not self.batched:
            return svd_mod.svd_rank(matrix, rank, energy, name)
        return svd_mod.svd(matrix, name)

    def singular_values(self, weight: Tensor, name: str = "layer") -> Tensor:
        """The layer's spectrum without the singular vectors (``svdvals``, much cheaper)."""
        return svd_mod.spectrum(svd_mod.svdvals(self.to_matrix(weight.detach()), name))

    def full_rank(self, module: nn.Module) -> int:
        m = self.to_matrix(module.weight.detach())
        return min(m.shape[-2], m.shape[-1])

    @abc.abstractmethod
    def macs_per_rank(self, module: nn.Module, ins: Sequence[int], outs: Sequence[int]) -> int:
        """MACs of the decomposed form per unit of rank, for one call with these shapes."""

    @abc.abstractmethod
    def params_per_rank(self, module: nn.Module) -> int:
        """Weights of the decomposed form per unit of rank (the bias comes on top)."""

    @abc.abstractmethod
    def build(self, module: nn.Module, k: int, factors: Factors | None = None) -> nn.Sequential:
        """The two-layer module of rank k; from the SVD ``factors`` (U, S, Vh), or untrained without them."""

    @abc.abstractmethod
    def compose(self, module: nn.Sequential) -> Tensor:
        """The dense weight a decomposed two-layer module computes (the inverse of :meth:`build`)."""


class ChannelScheme(Scheme):
    name = "channel"

    def to_matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, matrix: Tensor, shape: Sequence[int]) -> Tensor:
        return matrix.reshape(tuple(shape))

    def macs_per_rank(self, module: nn.Conv2d, ins: Sequence[int], outs: Sequence[int]) -> int:
        n, c, kh, kw = module.weight.shape
        return (c * kh * kw + n) * outs[1] * outs[2]

    def params_per_rank(self, module: nn.Conv2d) -> int:
        n, c, kh, kw = module.weight.shape
        return c * kh * kw + n

    def build(self, module: nn.Conv2d, k: int, factors: Factors | None = None) -> nn.Sequential:
        n, c, kh, kw = module.weight.shape
        first = nn.Conv2d(c, k, (kh, kw), module.stride, module.padding, module.dilation,
                          bias=False, padding_mode=module.padding_mode, **_dd(module))
        second = nn.Conv2d(k, n, 1, bias=module.bias is not None, **_dd(module))
        if factors is not None:
            u, s, vh = factors
            root = _split(s, k)
            with torch.no_grad():
                first.weight.copy_((root[:, None] * vh[:k]).reshape(k, c, kh, kw))
                second.weight.copy_((u[:, :k] * root).reshape(n, k, 1, 1))
                if module.bias is not None:
                    second.bias.copy_(module.bias)
        return nn.Sequential(first, second)

    def compose(self, module: nn.Sequential) -> Tensor:
        a, b = module[0].weight.detach(), module[1].weight.detach()
        return torch.einsum("nk,kchw->nchw", b[:, :, 0, 0], a)


class SpatialScheme(Scheme):
    name = "spatial"

    def to_matrix(self, weight: Tensor) -> Tensor:
        n, c, kh, kw = weight.shape
        return weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)

    def from_matrix(self, matrix: Tensor, shape: Sequence[int]) -> Tensor:
        n, c, kh, kw = shape
        return matrix.reshape(c, kh, n, kw).permute(2, 0, 1, 3).contiguous()

    def macs_per_rank(self, module: nn.Conv2d, ins: Sequence[int], outs: Sequence[int]) -> int:
        n, c, kh, kw = module.weight.shape
        # The vertical layer keeps the input's full width; the horizontal one produces the output.
        return c * kh * outs[1] * ins[2] + n * kw * outs[1] * outs[2]

    def params_per_rank(self, module: nn.Conv2d) -> int:
        n, c, kh, kw = module.weight.shape
        return c * kh + n * kw

    def build(self, module: nn.Conv2d, k: int, factors: Factors | None = None) -> nn.Sequential:
        n, c, kh, kw = module.weight.shape
        sh, sw = _pair(module.stride)
        dh, dw = _pair(module.dilation)
        if isinstance(module.padding, str):  # 'same' / 'valid' apply per dimension, so they split too
            pv = ph = module.padding
        else:
            p0, p1 = _pair(module.padding)
            pv, ph = (p0, 0), (0, p1)
        # A padding mode other than zeros pads each dimension independently of the other, so
        # padding rows before the vertical pass and columns before the horizontal one is exact.
        vertical = nn.Conv2d(c, k, (kh, 1), (sh, 1), pv, (dh, 1), bias=False, padding_mode=module.padding_mode,
                             **_dd(module))
        horizontal = nn.Conv2d(k, n, (1, kw), (1, sw), ph, (1, dw), bias=module.bias is not None,
                               padding_mode=module.padding_mode, **_dd(module))
        if factors is not None:
            u, s, vh = factors  # u: (C·kh)×r, vh: r×(N·kw)
            root = _split(s, k)
            with torch.no_grad():
                vertical.weight.copy_((u[:, :k] * root).t().reshape(k, c, kh, 1))
                horizontal.weight.copy_((root[:, None] * vh[:k]).reshape(k, n, kw).permute(1, 0, 2).unsqueeze(2))
                if module.bias is not None:
                    horizontal.bias.copy_(module.bias)
        return nn.Sequential(vertical, horizontal)

    def compose(self, module: nn.Sequential) -> Tensor:
        a, b = module[0].weight.detach(), module[1].weight.detach()
        return torch.einsum("kcy,nkx->ncyx", a[..., 0], b[:, :, 0, :])


class DecoupleScheme(Scheme):
    name = "decouple"
    batched = True

    def to_matrix(self, weight: Tensor) -> Tensor:
        n, c, kh, kw = weight.shape
        return weight.reshape(n, c, kh * kw)

    def from_matrix(self, matrix: Tensor, shape: Sequence[int]) -> Tensor:
        return matrix.reshape(tuple(shape))

    def macs_per_rank(self, module: nn.Conv2d, ins: Sequence[int], outs: Sequence[int]) -> int:
        n, c, kh, kw = module.weight.shape
        # The pointwise layer runs at the input resolution, the grouped depthwise one at the output's.
        return n * c * ins[1] * ins[2] + n * kh * kw * outs[1] * outs[2]

    def params_per_rank(self, module: nn.Conv2d) -> int:
        n, c, kh, kw = module.weight.shape
        return n * c + n * kh * kw

    def build(self, module: nn.Conv2d, k: int, factors: Factors | None = None) -> nn.Sequential:
        n, c, kh, kw = module.weight.shape
        # Channels are ordered filter-major (n·k + j) so that groups=N gives each filter its own k paths.
        pointwise = nn.Conv2d(c, k * n, 1, bias=False, **_dd(module))
        depthwise_sum = nn.Conv2d(k * n, n, (kh, kw), module.stride, module.padding, module.dilation, groups=n,
                                  bias=module.bias is not None, padding_mode=module.padding_mode, **_dd(module))
        if factors is not None:
            u, s, vh = factors  # u: N×C×r, s: N×r, vh: N×r×(kh·kw)
            root = _split(s, k)
            with torch.no_grad():
                pointwise.weight.copy_((u[:, :, :k] * root[:, None, :]).permute(0, 2, 1).reshape(k * n, c, 1, 1))
                depthwise_sum.weight.copy_((root[:, :, None] * vh[:, :k]).reshape(n, k, kh, kw))
                if module.bias is not None:
                    depthwise_sum.bias.copy_(module.bias)
        return nn.Sequential(pointwise, depthwise_sum)

    def compose(self, module: nn.Sequential) -> Tensor:
        a, b = module[0].weight.detach(), module[1].weight.detach()
        n, k = b.shape[0], b.shape[1]
        return torch.einsum("nkc,nkyx->ncyx", a[:, :, 0, 0].reshape(n, k, -1), b)


class LinearScheme(Scheme):
    name = "linear"

    def check(self, module: nn.Module) -> str | None:
        if type(module) is not nn.Linear and not is_hf_conv1d(module):
            return f"{type(module).__name__} is not handled by scheme 'linear'"
        return None

    def features(self, module: nn.Module) -> tuple[int, int]:
        """The layer's (in, out) features, read from its weight (out×in, or in×out for a Conv1D)."""
        rows, cols = module.weight.shape
        return (rows, cols) if is_hf_conv1d(module) else (cols, rows)

    def to_matrix(self, weight: Tensor) -> Tensor:
        return weight

    def from_matrix(self, matrix: Tensor, shape: Sequence[int]) -> Tensor:
        return matrix.reshape(tuple(shape))

    def macs_per_rank(self, module: nn.Module, ins: Sequence[int], outs: Sequence[int]) -> int:
        n_in, n_out = self.features(module)
        positions = math.prod(outs) // n_out
        return (n_in + n_out) * positions

    def params_per_rank(self, module: nn.Module) -> int:
        return sum(self.features(module))

    def build(self, module: nn.Module, k: int, factors: Factors | None = None) -> nn.Sequential:
        n_in, n_out = self.features(module)
        first = nn.Linear(n_in, k, bias=False, **_dd(module))
        second = nn.Linear(k, n_out, bias=module.bias is not None, **_dd(module))
        if factors is not None:
            u, s, vh = factors
            root = _split(s, k)
            a, b = root[:, None] * vh[:k], u[:, :k] * root  # W = b·a as stored
            if is_hf_conv1d(module):  # W is in×out: y = x·W = (x·b)·a, so the roles swap
                a, b = b.t(), a.t()
            with torch.no_grad():
                first.weight.copy_(a)
                second.weight.copy_(b)
                if module.bias is not None:
                    second.bias.copy_(module.bias)
        return nn.Sequential(first, second)

    def compose(self, module: nn.Sequential) -> Tensor:
        """The out×in weight of the one Linear the two compute (a Conv1D's weight is its transpose)."""
        return module[1].weight.detach() @ module[0].weight.detach()


#: Every scheme by name: the single source of truth for which schemes exist. The order is the
#: preference order of :func:`default_for`.
SCHEMES: Mapping[str, Scheme] = {s.name: s for s in (ChannelScheme(), SpatialScheme(), DecoupleScheme(), LinearScheme())}


def get(name: str) -> Scheme:
    """The scheme registered under ``name``.

    Example:
        >>> get("channel").name
        'channel'
    """
    return SCHEMES[choice(name, "scheme", tuple(SCHEMES))]


def names(batched: bool | None = None) -> tuple[str, ...]:
    """Registered scheme names; ``batched=False`` keeps those with one matrix per layer.

    Example:
        >>> names(batched=False)
        ('channel', 'spatial', 'linear')
    """
    return tuple(n for n, s in SCHEMES.items() if batched is None or s.batched == batched)


def names_for(module: nn.Module) -> tuple[str, ...]:
    """The schemes that can decompose ``module`` (e.g. a 3×3 conv, to list the conv schemes).

    Example:
        >>> names_for(nn.Conv2d(2, 2, 3))
        ('channel', 'spatial', 'decouple')
    """
    return tuple(n for n, s in SCHEMES.items() if s.check(module) is None)


def default_for(module: nn.Module) -> str | None:
    """The scheme ``auto`` picks for ``module``: the first registered one that accepts it
    (``channel`` for a Conv2d with groups=1, ``linear`` for a Linear or HF Conv1D), or None when no
    scheme can decompose it.

    Example:
        >>> default_for(nn.Conv2d(2, 2, 3)), default_for(nn.Linear(2, 2)), default_for(nn.ReLU())
        ('channel', 'linear', None)
    """
    found = names_for(module)
    return found[0] if found else None


def parse_names(scheme: str | Sequence[str]) -> tuple[str, ...]:
    """A scheme argument (one name, or several tried in order per layer; ``auto`` allowed) as a
    checked tuple of names; an unknown name is an error even if an earlier one would apply.

    Example:
        >>> parse_names("channel"), parse_names(["spatial", "auto"])
        (('channel',), ('spatial', 'auto'))
    """
    names_ = (scheme,) if isinstance(scheme, str) else tuple(scheme) if isinstance(scheme, Sequence) else None
    if names_ is None:
        raise TRPError(f"scheme must be a scheme name or a list of them, got {scheme!r}")
    if not names_:
        raise TRPError("no scheme given")
    for name in names_:
        if name != AUTO:
            get(name)
    return names_


def applicable(module: nn.Module, schemes: Sequence[str]) -> tuple[Scheme | None, str | None]:
    """The first of ``schemes`` that can decompose ``module`` (``auto``: its :func:`default_for`),
    or None with every scheme's reason.

    Example:
        >>> applicable(nn.Linear(3, 3), ("channel", "linear"))[0].name
        'linear'
        >>> applicable(nn.Conv2d(3, 3, 3), ("auto",))[0].name
        'channel'
    """
    reasons = []
    schemes = parse_names(schemes)  # an unknown name is an error even if an earlier one applies
    for name in schemes:
        if name == AUTO:
            default = default_for(module)
            if default is not None:
                return get(default), None
            reasons.append(f"no scheme handles {type(module).__name__}")
            continue
        scheme = get(name)
        why = scheme.check(module)
        if why is None:
            return scheme, None
        reasons.append(why)
    if len(reasons) == 1:
        return None, reasons[0]
    return None, f"no scheme of [{', '.join(schemes)}] applies: " + "; ".join(reasons)
