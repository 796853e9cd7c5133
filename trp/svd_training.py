"""SVD training (Yang et al., CVPR Workshops 2020): train layers as U·diag(s)·Vᵀ, then prune s.

Where TRP (:mod:`trp.hook`) keeps dense weights and takes an SVD every few steps, SVD training
takes one SVD at the start and then trains the factors themselves (Yang et al., "Learning Low-rank
Deep Neural Networks via Singular Vector Orthogonality Regularization and Singular Value
Sparsification", Sec. 3):

* **Parametrization.** Every eligible layer holds ``U`` (m×r), ``s`` (r) and ``V`` (n×r) with
  ``M = U·diag(s)·Vᵀ`` its weight in a matrix layout of :mod:`trp.svd` (``channel``: N×(C·kh·kw),
  ``spatial``: (C·kh)×(N·kw), ``linear`` for Linear layers), initialized from the full-rank SVD of
  the current weight, so the parametrized model computes exactly what the dense one did.
* **Regularization** (paper Eq. 2–4), added to the task loss L_T:
  ``L = L_T + λ_o Σ_l L_o(U_l, V_l) + λ_s Σ_l L_s(s_l)`` with the orthogonality loss
  ``L_o = (‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) / r``, which keeps U and V close to singular vectors, and
  the sparsity loss ``L_s = ‖s‖₁`` (L1) or ``‖s‖₁ / ‖s‖₂`` (Hoyer), which drives singular values
  to zero, i.e. lowers the rank.
* **Pruning** at the end: small |s| are cut (by any per-layer criterion of :mod:`trp.rank`, energy
  by default) and each layer becomes the same two stock layers that :func:`trp.decompose_` builds,
  with a :class:`~trp.decompose.Plan` so the result saves and loads like any decomposed model.

Usage::

    model = svd_parametrize_(create("resnet20"), "channel")
    cfg = SVDTrainingConfig(orth=1.0, sparsity_kind="hoyer", sparsity=1e-3)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + regularization(model, cfg)
        opt.zero_grad(); loss.backward(); opt.step()
    model, plan = finalize_(model, trp.energy(0.99), input_shape=(3, 32, 32))

The forward pass composes the dense kernel from the factors and runs one ``F.conv2d``, as the
paper trains; for CIFAR-sized layers the composition costs far less than the convolution.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp import rank as rank_mod
from trp import svd as svd_mod
from trp.decompose import SCHEMES, LayerPlan, Plan, default_input_shape, replace_modules
from trp.errors import TRPError
from trp.hook import default_filter, unwrap
from trp.measure import COUNTED, layer_macs, trace_shapes

__all__ = [
    "SVDLayer",
    "SVDConv2d",
    "SVDLinear",
    "SVDTrainingConfig",
    "SPARSITY_KINDS",
    "TRAINING_SCHEMES",
    "default_filter",
    "svd_parametrize_",
    "svd_layers",
    "orthogonality_penalty",
    "sparsity_penalty",
    "orthogonality_loss",
    "sparsity_loss",
    "regularization",
    "parse_sparsity",
    "ranks",
    "finalize_",
    "to_dense_",
    "truncate_to_dense_",
]

FilterFn = Callable[[nn.Module, str], bool]
RankArg = Union[rank_mod.Criterion, int, str, Mapping[str, int], None]

#: Sparsity regularizers on the singular values (paper Eq. 4).
SPARSITY_KINDS = ("l1", "hoyer")
#: Conv matrix layouts a layer can be trained in (``decouple`` is a batch of matrices per layer,
#: which has no single U·diag(s)·Vᵀ, so it is not offered).
TRAINING_SCHEMES = ("channel", "spatial")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class SVDLayer(nn.Module, abc.ABC):
    """Common part of :class:`SVDConv2d` and :class:`SVDLinear`: the factors and what they compose.

    Attributes:
        U: Left factor, m×r (parameter).
        s: Singular values, r (parameter; may turn negative while training).
        V: Right factor, n×r (parameter), so the layer's matrix is ``U·diag(s)·Vᵀ``.
        bias: The dense layer's bias (parameter) or None.
        layout: The :mod:`trp.svd` matrix layout (``channel``, ``spatial`` or ``linear``).
        scheme: The :data:`trp.decompose.SCHEMES` entry that rebuilds the pruned layer
            (same name as ``layout``).
        weight_shape: Shape of the dense weight.
    """

    U: nn.Parameter
    s: nn.Parameter
    V: nn.Parameter
    bias: nn.Parameter | None
    layout: str
    scheme: str
    weight_shape: tuple[int, ...]

    def _init_factors(self, weight: Tensor, bias: Tensor | None, name: str) -> None:
        # The full-rank (thin) SVD of the current weight: at r = min(m, n) the product is the weight
        # itself, so training starts from exactly the initial or pretrained network (paper Sec. 3.1).
        u, s, vh = svd_mod.svd(svd_mod.to_matrix(weight.detach(), self.layout), name)
        grad = weight.requires_grad
        self.weight_shape = tuple(weight.shape)
        self.U = nn.Parameter(u.to(weight.dtype).contiguous(), requires_grad=grad)
        self.s = nn.Parameter(s.to(weight.dtype).contiguous(), requires_grad=grad)
        self.V = nn.Parameter(vh.mT.to(weight.dtype).contiguous(), requires_grad=grad)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    @property
    def rank(self) -> int:
        """Number of trained singular values r = min(m, n) (the rank before pruning)."""
        return int(self.s.numel())

    def matrix(self) -> Tensor:
        """``U·diag(s)·Vᵀ`` in the layer's matrix layout (differentiable)."""
        return (self.U * self.s) @ self.V.mT

    def dense_weight(self) -> Tensor:
        """The dense kernel the factors compose (differentiable; what ``forward`` convolves with)."""
        return svd_mod.from_matrix(self.matrix(), self.layout, self.weight_shape)

    @property
    def weight(self) -> Tensor:
        """Alias of :meth:`dense_weight`, so code reading ``layer.weight`` sees the dense kernel."""
        return self.dense_weight()

    @torch.no_grad()
    def sorted_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(u, σ, vh)`` with σ = |s| descending and the signs of s folded into u (detached).

        Training can push an s_i through zero; ``s_i u_i v_iᵀ = |s_i| (sign(s_i) u_i) v_iᵀ`` keeps the
        product while making the values the non-negative, sorted spectrum every rank criterion and
        :meth:`trp.decompose.Scheme.build` expect.
        """
        s = self.s.detach()
        sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
        mag = s.abs()
        order = torch.argsort(mag, descending=True, stable=True)
        u = (self.U.detach() * sign)[:, order]
        return u, mag[order], self.V.detach()[:, order].mT

    def spectrum(self) -> Tensor:
        """The layer's singular values |s|, descending (detached).

        Example:
            >>> layer = SVDLinear(4, 3)
            >>> bool((layer.spectrum()[:-1] >= layer.spectrum()[1:]).all())
            True
        """
        return self.sorted_factors()[1]

    @torch.no_grad()
    def truncated_weight(self, k: int | None = None) -> Tensor:
        """The dense kernel from the k largest |s| only (all of them for None); detached."""
        if k is None:
            return self.dense_weight().detach()
        u, s, vh = self.sorted_factors()
        return svd_mod.from_matrix(svd_mod.truncate(u, s, vh, k), self.layout, self.weight_shape)

    @abc.abstractmethod
    def _dense_module(self) -> nn.Module:
        """An untrained stock ``nn.Conv2d`` / ``nn.Linear`` with this layer's settings."""

    @torch.no_grad()
    def to_dense(self, k: int | None = None) -> nn.Module:
        """A stock ``nn.Conv2d`` / ``nn.Linear`` computing this layer (pruned to rank k if given).

        Example:
            >>> lin = nn.Linear(5, 3)
            >>> dense = SVDLinear.from_dense(lin).to_dense()
            >>> type(dense).__name__, torch.allclose(dense.weight, lin.weight, atol=1e-6)
            ('Linear', True)
        """
        module = self._dense_module()
        module.weight.copy_(self.truncated_weight(k))
        module.weight.requires_grad_(self.U.requires_grad)
        if self.bias is not None:
            module.bias.copy_(self.bias)
            module.bias.requires_grad_(self.bias.requires_grad)
        return module.train(self.training)


def _reversed_padding(padding: str | tuple[int, int], kernel: tuple[int, int], dilation: tuple[int, int]) -> list[int]:
    # The F.pad amounts nn.Conv2d uses for a padding_mode other than zeros (last dimension first);
    # 'same' puts the odd pixel at the end, exactly as nn.Conv2d does.
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        out: list[int] = []
        for d, k in zip(reversed(dilation), reversed(kernel)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    ph, pw = _pair(padding)  # type: ignore[arg-type]
    return [pw, pw, ph, ph]


class SVDConv2d(SVDLayer):
    """A Conv2d (groups=1) trained as ``U·diag(s)·Vᵀ`` of its ``channel`` or ``spatial`` matrix.

    Stride, padding (numbers, ``'same'``, ``'valid'``), dilation, bias and ``padding_mode``
    (zeros, reflect, replicate, circular) behave as in ``nn.Conv2d``. The constructor builds a
    freshly initialized ``nn.Conv2d`` and factorizes it; :meth:`from_dense` factorizes an existing one.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode:
            As for ``nn.Conv2d``.
        scheme: ``channel`` or ``spatial``.
        device, dtype: Where and in which precision the parameters live.

    Example:
        >>> conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        >>> layer = SVDConv2d.from_dense(conv, "channel")
        >>> layer.U.shape, layer.s.shape, layer.V.shape
        (torch.Size([8, 8]), torch.Size([8]), torch.Size([36, 8]))
        >>> x = torch.randn(2, 4, 9, 9)
        >>> torch.allclose(layer(x), conv(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        scheme: str = "channel",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dense = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, padding_mode,
                          device=device, dtype=dtype)
        self._configure(dense, scheme, "layer")

    @classmethod
    def from_dense(cls, module: nn.Conv2d, scheme: str = "channel", name: str = "layer") -> SVDConv2d:
        """Factorize an existing ``nn.Conv2d`` (its weights are copied, the module is not changed).

        Args:
            module: A plain ``nn.Conv2d`` with groups=1.
            scheme: ``channel`` or ``spatial``.
            name: The layer's name, for error messages.

        Raises:
            TRPError: Unsupported module or scheme, or non-finite weights.

        Example:
            >>> SVDConv2d.from_dense(nn.Conv2d(3, 6, (3, 1)), "spatial").U.shape
            torch.Size([9, 6])
        """
        if scheme not in TRAINING_SCHEMES:
            raise TRPError(f"unknown SVD-training scheme {scheme!r}; choose one of: {', '.join(TRAINING_SCHEMES)}")
        reason = SCHEMES[scheme].check(module)
        if reason:
            raise TRPError(f"layer {name!r}: {reason}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._configure(module, scheme, name)
        return layer.train(module.training)

    def _configure(self, module: nn.Conv2d, scheme: str, name: str) -> None:
        if scheme not in TRAINING_SCHEMES:
            raise TRPError(f"unknown SVD-training scheme {scheme!r}; choose one of: {', '.join(TRAINING_SCHEMES)}")
        self.in_channels, self.out_channels = module.in_channels, module.out_channels
        self.kernel_size = _pair(module.kernel_size)
        self.stride = _pair(module.stride)
        padding = module.padding
        self.padding: str | tuple[int, int] = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(module.dilation)
        self.groups = 1
        self.padding_mode = module.padding_mode
        self._pad = _reversed_padding(self.padding, self.kernel_size, self.dilation)
        self.layout = self.scheme = scheme
        self._init_factors(module.weight, module.bias, name)

    def forward(self, x: Tensor) -> Tensor:
        # The paper trains on the composed kernel: W = U·diag(s)·Vᵀ (Eq. 1), reshaped, then one conv.
        weight = self.dense_weight()
        if self.padding_mode != "zeros":
            return F.conv2d(F.pad(x, self._pad, mode=self.padding_mode), weight, self.bias, self.stride, 0,
                            self.dilation)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)

    def _dense_module(self) -> nn.Conv2d:
        return torch.nn.utils.skip_init(
            nn.Conv2d, self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, 1, self.bias is not None, self.padding_mode, device=self.U.device, dtype=self.U.dtype,
        )

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, dilation={self.dilation}, scheme={self.scheme!r}, rank={self.rank}")
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text + ("" if self.bias is not None else ", bias=False")


class SVDLinear(SVDLayer):
    """A Linear layer trained as ``U·diag(s)·Vᵀ`` of its weight (layout ``linear``).

    Args:
        in_features, out_features, bias: As for ``nn.Linear``.
        device, dtype: Where and in which precision the parameters live.

    Example:
        >>> lin = nn.Linear(6, 4)
        >>> layer = SVDLinear.from_dense(lin)
        >>> x = torch.randn(3, 6)
        >>> layer.U.shape, torch.allclose(layer(x), lin(x), atol=1e-5)
        (torch.Size([4, 4]), True)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._configure(nn.Linear(in_features, out_features, bias, device=device, dtype=dtype), "layer")

    @classmethod
    def from_dense(cls, module: nn.Linear, scheme: str = "linear", name: str = "layer") -> SVDLinear:
        """Factorize an existing ``nn.Linear`` (its weights are copied, the module is not changed).

        Args:
            module: A plain ``nn.Linear``.
            scheme: Must be ``linear`` (accepted for symmetry with :meth:`SVDConv2d.from_dense`).
            name: The layer's name, for error messages.

        Example:
            >>> SVDLinear.from_dense(nn.Linear(8, 3)).V.shape
            torch.Size([8, 3])
        """
        if scheme != "linear":
            raise TRPError(f"layer {name!r}: a Linear layer is trained in scheme 'linear', not {scheme!r}")
        reason = SCHEMES["linear"].check(module)
        if reason:
            raise TRPError(f"layer {name!r}: {reason}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._configure(module, name)
        return layer.train(module.training)

    def _configure(self, module: nn.Linear, name: str) -> None:
        self.in_features, self.out_features = module.in_features, module.out_features
        self.layout = self.scheme = "linear"
        self._init_factors(module.weight, module.bias, name)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def _dense_module(self) -> nn.Linear:
        return torch.nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, self.bias is not None,
                                        device=self.U.device, dtype=self.U.dtype)

    def extra_repr(self) -> str:
        bias = "" if self.bias is not None else ", bias=False"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{bias}"


# ------------------------------------------------------------------------------ model-level helpers


def svd_layers(model: nn.Module) -> list[tuple[str, SVDLayer]]:
    """The SVD-parametrized layers of a model (looking through DDP / compiled wrappers), by name.

    Example:
        >>> m = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> [name for name, _ in svd_layers(m)]
        ['1']
    """
    return [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, SVDLayer)]


def _aliases(net: nn.Module) -> dict[int, list[str]]:
    # A module reachable under several names (weight tying) must be replaced under all of them.
    out: dict[int, list[str]] = {}
    for name, m in net.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(name)
    return out


def svd_parametrize_(model: nn.Module, scheme: str = "channel", filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace the eligible layers of a model by SVD-parametrized ones, in place, and return it.

    Eligible: every plain ``nn.Conv2d`` with groups=1 and every plain ``nn.Linear`` that
    ``filter_fn(module, name)`` accepts; the default, :func:`default_filter`, takes every conv but the
    first and no Linear, as TRP does. Layers the filter accepts but no scheme supports (grouped convs,
    other layer types) stay dense. Every factorization is computed before any layer is swapped, so a
    failure (e.g. non-finite weights) leaves the model unchanged. Build the optimizer afterwards:
    the factors are new parameters.

    Args:
        model: Any ``nn.Module`` (a DDP or compiled wrapper is looked through).
        scheme: Conv matrix layout, ``channel`` or ``spatial``; Linear layers always use ``linear``.
        filter_fn: ``filter_fn(module, name) -> bool`` picks the layers.

    Returns:
        The same model object, which at this point computes the same function as before.

    Raises:
        TRPError: Unknown scheme, no eligible layer, or a weight that cannot be factorized.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        >>> x = torch.randn(1, 3, 8, 8); before = model(x)
        >>> svd_parametrize_(model, "spatial")[2].scheme
        'spatial'
        >>> torch.allclose(model(x), before, atol=1e-5)
        True
    """
    if scheme not in TRAINING_SCHEMES:
        raise TRPError(f"unknown SVD-training scheme {scheme!r}; choose one of: {', '.join(TRAINING_SCHEMES)}")
    net = unwrap(model)
    filter_fn = filter_fn or default_filter(net)
    made: dict[int, SVDLayer] = {}
    replacements: dict[str, nn.Module] = {}
    for name, module in net.named_modules(remove_duplicate=False):
        if not name:
            continue
        if id(module) not in made:
            if type(module) is nn.Conv2d and module.groups == 1 and filter_fn(module, name):
                made[id(module)] = SVDConv2d.from_dense(module, scheme, name)
            elif type(module) is nn.Linear and filter_fn(module, name):
                made[id(module)] = SVDLinear.from_dense(module, "linear", name)
            else:
                continue
        replacements[name] = made[id(module)]
    if not replacements:
        if svd_layers(net):  # already parametrized: calling twice is harmless
            return model
        raise TRPError("SVD training found no eligible layer (Conv2d with groups=1 or Linear accepted by filter_fn)")
    replace_modules(net, replacements)
    return model


def _layers_or_raise(model: nn.Module) -> list[SVDLayer]:
    layers = [m for _, m in svd_layers(model)]
    if not layers:
        raise TRPError("the model has no SVD-parametrized layer; call svd_parametrize_(model) first")
    return layers


# ----------------------------------------------------------------------------------- regularizers


def orthogonality_penalty(u: Tensor, v: Tensor) -> Tensor:
    """One layer's orthogonality loss ``(‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) / r`` (paper Eq. 3).

    Dividing by the rank r, as the paper does, keeps wide and narrow layers on a comparable scale
    (‖UᵀU − I‖²_F sums r² entries). Its gradient is ``4·U(UᵀU − I)/r`` for U, likewise for V.

    Args:
        u: m×r left factor.
        v: n×r right factor.

    Example:
        >>> q, _ = torch.linalg.qr(torch.randn(6, 3))
        >>> float(orthogonality_penalty(q, q)) < 1e-10
        True
        >>> float(orthogonality_penalty(2 * torch.eye(2), torch.eye(2)))  # (2 * 3²) / 2
        9.0
    """
    r = u.shape[-1]
    eye = torch.eye(r, dtype=u.dtype, device=u.device)
    return ((u.mT @ u - eye).pow(2).sum() + (v.mT @ v - eye).pow(2).sum()) / r


def sparsity_penalty(s: Tensor, kind: str = "hoyer") -> Tensor:
    """One layer's sparsity loss on its singular values (paper Eq. 4).

    ``l1``: ``‖s‖₁``, a constant pull of every s_i towards zero (the nuclear norm of the layer when
    U and V are orthonormal). ``hoyer``: ``‖s‖₁ / ‖s‖₂`` (Hoyer 2004), which is scale-invariant, so
    it changes the *shape* of the spectrum (few large, many zero values) without shrinking it all.
    Its gradient is ``sign(s)/‖s‖₂ − ‖s‖₁·s/‖s‖₂³``.

    Args:
        s: The singular values (any sign).
        kind: ``l1`` or ``hoyer``.

    Example:
        >>> float(sparsity_penalty(torch.tensor([3.0, -4.0]), "l1"))
        7.0
        >>> round(float(sparsity_penalty(torch.tensor([3.0, -4.0]), "hoyer")), 6)  # 7 / 5
        1.4
    """
    if kind not in SPARSITY_KINDS:
        raise TRPError(f"unknown sparsity regularizer {kind!r}; choose one of: {', '.join(SPARSITY_KINDS)}")
    l1 = s.abs().sum()
    if kind == "l1":
        return l1
    # sqrt of a clamped sum of squares: an all-zero s gives 0/tiny = 0 with a finite gradient,
    # where a norm's backward would divide 0 by 0.
    l2 = s.pow(2).sum().clamp_min(torch.finfo(s.dtype).tiny).sqrt()
    return l1 / l2


def orthogonality_loss(model: nn.Module) -> Tensor:
    """``Σ_layers (‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) / r`` over the model's SVD layers (paper Eq. 3).

    Raises:
        TRPError: The model has no SVD-parametrized layer.

    Example:
        >>> m = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> orthogonality_loss(m).item() < 1e-8  # freshly factorized: U, V orthonormal
        True
    """
    return torch.stack([orthogonality_penalty(layer.U, layer.V) for layer in _layers_or_raise(model)]).sum()


def sparsity_loss(model: nn.Module, kind: str = "hoyer") -> Tensor:
    """``Σ_layers ‖s‖₁`` (``l1``) or ``Σ_layers ‖s‖₁/‖s‖₂`` (``hoyer``) (paper Eq. 4).

    Raises:
        TRPError: Unknown kind, or the model has no SVD-parametrized layer.

    Example:
        >>> m = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> 1.0 <= sparsity_loss(m, "hoyer").item() <= 8 ** 0.5  # between 1 and sqrt(r)
        True
    """
    if kind not in SPARSITY_KINDS:
        raise TRPError(f"unknown sparsity regularizer {kind!r}; choose one of: {', '.join(SPARSITY_KINDS)}")
    return torch.stack([sparsity_penalty(layer.s, kind) for layer in _layers_or_raise(model)]).sum()


def _number(x: object, what: str) -> float:
    if isinstance(x, bool):
        raise TRPError(f"{what} must be a number, got {x!r}")
    try:
        value = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TRPError(f"{what} must be a number, got {x!r}") from None
    if not math.isfinite(value) or value < 0.0:
        raise TRPError(f"{what} must be finite and >= 0, got {value}")
    return value


@dataclass(frozen=True)
class SVDTrainingConfig:
    """The weights of SVD training's regularizers: ``λ_o·L_o + λ_s·L_s`` (paper Eq. 2).

    Attributes:
        orth: λ_o, weight of :func:`orthogonality_loss` (finite, >= 0).
        sparsity_kind: ``hoyer`` or ``l1`` (:func:`sparsity_loss`).
        sparsity: λ_s, weight of the sparsity loss (finite, >= 0).
        scheme: Conv layout the layers are trained in: ``channel`` or ``spatial``.

    Example:
        >>> SVDTrainingConfig(sparsity_kind="l1", sparsity=1e-4).sparsity
        0.0001
        >>> try:
        ...     SVDTrainingConfig(orth=-1)
        ... except TRPError as err:
        ...     print(err)
        orthogonality weight must be finite and >= 0, got -1.0
    """

    orth: float = 1.0
    sparsity_kind: str = "hoyer"
    sparsity: float = 1e-3
    scheme: str = "channel"

    def __post_init__(self) -> None:
        object.__setattr__(self, "orth", _number(self.orth, "orthogonality weight"))
        object.__setattr__(self, "sparsity", _number(self.sparsity, "sparsity weight"))
        if self.sparsity_kind not in SPARSITY_KINDS:
            raise TRPError(
                f"unknown sparsity regularizer {self.sparsity_kind!r}; choose one of: {', '.join(SPARSITY_KINDS)}"
            )
        if self.scheme not in TRAINING_SCHEMES:
            raise TRPError(f"unknown SVD-training scheme {self.scheme!r}; choose one of: {', '.join(TRAINING_SCHEMES)}")


def parse_sparsity(text: str) -> tuple[str, float]:
    """Parse the command-line form ``KIND:WEIGHT`` of the sparsity regularizer.

    Example:
        >>> parse_sparsity("hoyer:1e-3")
        ('hoyer', 0.001)
        >>> parse_sparsity("l1:0")
        ('l1', 0.0)
    """
    kind, sep, num = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in SPARSITY_KINDS:
        kinds = ", ".join(SPARSITY_KINDS)
        raise TRPError(f"sparsity must look like KIND:WEIGHT with KIND one of {kinds}; got {text!r}")
    try:
        weight = float(num)
    except ValueError:
        raise TRPError(f"sparsity {text!r}: {num.strip()!r} is not a number") from None
    return kind, _number(weight, "sparsity weight")


def regularization(model: nn.Module, config: SVDTrainingConfig | None = None) -> Tensor:
    """``λ_o·Σ L_o + λ_s·Σ L_s``: the term SVD training adds to the task loss (paper Eq. 2).

    A weight of 0 skips its term entirely.

    Args:
        model: A model with SVD-parametrized layers.
        config: The weights (default :class:`SVDTrainingConfig`).

    Example:
        >>> m = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> cfg = SVDTrainingConfig(orth=1.0, sparsity_kind="l1", sparsity=0.5)
        >>> torch.allclose(regularization(m, cfg), orthogonality_loss(m) + 0.5 * sparsity_loss(m, "l1"))
        True
    """
    config = config or SVDTrainingConfig()
    layers = _layers_or_raise(model)
    total = torch.zeros((), dtype=layers[0].s.dtype, device=layers[0].s.device)
    if config.orth > 0:
        total = total + config.orth * orthogonality_loss(model)
    if config.sparsity > 0:
        total = total + config.sparsity * sparsity_loss(model, config.sparsity_kind)
    return total


# ----------------------------------------------------------------------------- ranks and pruning


def ranks(model: nn.Module, energy: float = 0.99) -> dict[str, tuple[int, int]]:
    """Each SVD layer's ``(k, r)``: the energy rank of its |s| and its full rank.

    k is the smallest rank with Σ_{i≤k} σ_i² ≥ e·Σ σ_i² over σ = |s| (read off the trained values;
    no SVD is taken).

    Example:
        >>> m = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> with torch.no_grad():
        ...     _ = m[1].s[2:].zero_()
        >>> ranks(m, 1.0)
        {'1': (2, 8)}
    """
    criterion = rank_mod.energy(energy)
    return {name: (criterion.select(layer.spectrum()), layer.rank) for name, layer in svd_layers(model)}


_RANK_HELP = "rank must be an int, a {layer: rank} dict or a criterion such as trp.energy(0.99)"


def _criterion(rank: RankArg) -> rank_mod.Criterion | Mapping[str, int]:
    if rank is None:
        return rank_mod.energy(0.99)
    if isinstance(rank, bool):
        raise TRPError(f"{_RANK_HELP}, got {rank!r}")
    if isinstance(rank, int):
        return rank_mod.fixed(rank)
    if isinstance(rank, str):  # the command line's NAME:NUMBER
        rank = rank_mod.parse(rank)
    if isinstance(rank, rank_mod.Speedup):
        raise TRPError(
            "SVD training prunes each layer by its own singular values; a whole-model speed-up budget does not "
            "apply (use trp.energy, trp.value, trp.fixed or trp.fraction, or to_dense_ then trp.decompose_)"
        )
    if isinstance(rank, (rank_mod.Energy, rank_mod.Value, rank_mod.Fixed, rank_mod.Fraction, Mapping)):
        return rank
    raise TRPError(f"{_RANK_HELP}, got {rank!r}")


def _select(criterion: rank_mod.Criterion | Mapping[str, int], name: str, spectrum: Tensor) -> int:
    if isinstance(criterion, Mapping):
        k = criterion.get(name)
        if k is None:
            return spectrum.numel()
        return rank_mod.fixed(k).select(spectrum)
    return criterion.select(spectrum)


def _input_shape(net: nn.Module) -> tuple[int, ...]:
    # trp.decompose.default_input_shape looks for the first nn.Conv2d / nn.Linear; an SVD layer in
    # front (a custom filter_fn) must answer the same question.
    if getattr(net, "input_shape", None) is None:
        for m in net.modules():
            if isinstance(m, SVDConv2d):
                return (m.in_channels, 32, 32)
            if isinstance(m, SVDLinear):
                return (m.in_features,)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                break
    return default_input_shape(net)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def finalize_(
    model: nn.Module, rank: RankArg = None, input_shape: Sequence[int] | None = None
) -> tuple[nn.Module, Plan]:
    """Prune the singular values and turn every SVD layer into stock layers, in place.

    For each SVD layer (paper Sec. 3.3): fold the signs of s into U, sort by |s|, keep the k values
    the criterion picks on that spectrum, and build, from the *trained* factors truncated to k, the
    very modules :func:`trp.decompose_` would (``SCHEMES[scheme].build``): two ``nn.Conv2d`` or
    ``nn.Linear`` in an ``nn.Sequential``. The factors are not exactly orthonormal after training,
    so the kept layer is ``U_k·diag(|s|_k)·V_kᵀ`` itself, not a re-SVD of anything. A layer where
    rank k would not lower the MACs becomes one dense ``nn.Conv2d``/``nn.Linear`` with that same
    pruned weight. The returned :class:`~trp.decompose.Plan` has the format of :func:`trp.plan`, so
    ``trp.apply_plan(fresh_model, plan)`` followed by ``load_state_dict`` restores the result.

    Args:
        model: A model with SVD-parametrized layers.
        rank: A per-layer criterion (``trp.energy(0.99)`` by default, ``trp.value``, ``trp.fixed``,
            ``trp.fraction``), its command-line form (``"energy:0.99"``), an int rank, or
            ``{layer name: rank}``; not ``trp.speedup``.
        input_shape: One sample's shape for MACs accounting (default: as :func:`trp.plan`).

    Returns:
        ``(model, plan)``: the same model object, now free of SVD layers, and its plan.

    Raises:
        TRPError: No SVD layer, a speed-up criterion, or a model that rejects ``input_shape``.

    Example:
        >>> import trp
        >>> model = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3)))
        >>> with torch.no_grad():
        ...     _ = model[1].s[4:].zero_()  # as if the sparsity loss had driven them to zero
        >>> model, plan = finalize_(model, trp.energy(1.0), input_shape=(3, 12, 12))
        >>> model[1]
        Sequential(
          (0): Conv2d(16, 4, kernel_size=(3, 3), stride=(1, 1), bias=False)
          (1): Conv2d(4, 32, kernel_size=(1, 1), stride=(1, 1))
        )
        >>> [(lp.name, lp.rank, lp.decomposed) for lp in plan.layers]
        [('0', None, False), ('1', 4, True)]
    """
    net = unwrap(model)
    _layers_or_raise(net)
    criterion = _criterion(rank)
    input_shape = tuple(int(d) for d in (input_shape or _input_shape(net)))
    shapes = trace_shapes(net, input_shape, COUNTED + (SVDLayer,))
    modules = dict(net.named_modules())
    aliases = _aliases(net)
    label = "per-layer ranks" if isinstance(criterion, Mapping) else str(criterion)
    result = Plan(list(input_shape), label, 0, sum(p.numel() for p in net.parameters()))
    built: dict[int, nn.Module] = {}
    for name, (ins, outs) in shapes.items():
        module = modules[name]
        if not isinstance(module, SVDLayer):
            weight = getattr(module, "weight", None)
            lp = LayerPlan(name, type(module).__name__, list(weight.shape) if weight is not None else [], list(ins),
                           list(outs), layer_macs(module, ins, outs), _own_params(module),
                           reason="not SVD-parametrized")
        else:
            # ``full`` stands in for the dense layer the plan describes: what trp.plan would have
            # seen on this model, and what apply_plan will find in a fresh one.
            full = module.to_dense()
            u, s, vh = module.sorted_factors()
            sch = SCHEMES[module.scheme]
            lp = LayerPlan(name, type(full).__name__, list(full.weight.shape), list(ins), list(outs),
                           layer_macs(full, ins, outs), _own_params(full), scheme=sch.name, full_rank=module.rank)
            k = _select(criterion, name, s)
            bias = full.bias.numel() if full.bias is not None else 0
            lp.rank, lp.energy = k, rank_mod.kept_energy(s, k)
            lp.macs_after = k * sch.macs_per_rank(full, ins, outs)
            lp.params_after = k * sch.params_per_rank(full) + bias
            result.params_before += _own_params(full) - _own_params(module)
            if lp.macs_after >= lp.macs_before:
                lp.reason = f"rank {k} does not lower its MACs ({lp.macs_after:,} >= {lp.macs_before:,} dense)"
                new = module.to_dense(k)
            else:
                new = sch.build(full, k, (u, s, vh)).train(module.training)
                for p in new.parameters():
                    p.requires_grad_(module.U.requires_grad)
            built[id(module)] = new
        result.macs_before += lp.macs_before
        result.layers.append(lp)
    for name, layer in svd_layers(net):  # SVD layers the forward pass never reached: pruned, left dense
        if id(layer) not in built:
            k = _select(criterion, name, layer.spectrum())
            built[id(layer)] = layer.to_dense(k)
            result.params_before += _own_params(layer.to_dense()) - _own_params(layer)
    replacements = {alias: built[key] for key in built for alias in aliases[key] if alias}
    replace_modules(net, replacements)
    return model, result


def to_dense_(model: nn.Module) -> nn.Module:
    """Turn every SVD layer back into a stock ``nn.Conv2d`` / ``nn.Linear``, in place, unpruned.

    The dense weight is the composed ``U·diag(s)·Vᵀ``, so the model's function is unchanged. Useful
    for plain checkpoints and for decomposing afterwards with any criterion (``trp.decompose_``).

    Example:
        >>> model = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> type(to_dense_(model)[1]).__name__
        'Conv2d'
    """
    net = unwrap(model)
    aliases = _aliases(net)
    built = {id(layer): layer.to_dense() for _, layer in svd_layers(net)}
    replace_modules(net, {alias: built[key] for key in built for alias in aliases[key] if alias})
    return model


def truncate_to_dense_(model: nn.Module, rank: RankArg = None) -> tuple[nn.Module, dict[str, int]]:
    """Prune each SVD layer's singular values and turn it into a dense layer of exactly that rank.

    The dense weight is ``U_k diag(s_k) V_kᵀ`` from the trained factors (the k largest |s|), so a
    later ``trp.decompose_`` at rank k reproduces it exactly; ``trp compress`` uses this to treat
    SVD-trained runs like any other (folding BatchNorm first, then the common plan).

    Returns:
        The model and the chosen rank of every pruned layer, by name.

    Example:
        >>> model = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> _, chosen = truncate_to_dense_(model, 4)
        >>> chosen
        {'1': 4}
    """
    criterion = _criterion(rank)
    net = unwrap(model)
    aliases = _aliases(net)
    built: dict[int, nn.Module] = {}
    chosen: dict[str, int] = {}
    for name, layer in svd_layers(net):
        k = int(_select(criterion, name, layer.spectrum()))
        built.setdefault(id(layer), layer.to_dense(k))
        chosen[name] = k
    replace_modules(net, {alias: built[key] for key in built for alias in aliases[key] if alias})
    return model, chosen
