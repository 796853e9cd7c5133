"""SVD training's regularizers (Yang et al., CVPR Workshops 2020, Eq. 2–4) on the factors of
:mod:`trp.svd_training`: ``L = L_T + λ_o Σ_l L_o(U_l, V_l) + λ_s Σ_l L_s(s_l)``.

* Orthogonality ``L_o = (‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) / r`` keeps U and V close to singular vectors.
* Sparsity ``L_s = ‖s‖₁`` (L1) or ``‖s‖₁ / ‖s‖₂`` (Hoyer) drives singular values to zero, i.e.
  lowers the rank that pruning keeps.

Example:
    >>> from torch import nn
    >>> from trp.svd_training import svd_parametrize_
    >>> model = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
    >>> regularization(model, SVDTrainingConfig(orth=1.0, sparsity=0.0)).item() < 1e-5  # factors start orthonormal
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trp.errors import TRPError
from trp.svd_training import factors, require_svd_layers
from trp.validate import choice, number

__all__ = [
    "SPARSITY_KINDS", "DEFAULT_SPARSITY", "SVDTrainingConfig", "orthogonality_penalty", "sparsity_penalty",
    "orthogonality_loss", "sparsity_loss", "regularization", "parse_sparsity", "parse_sparsity_rate", "step_weight",
]

#: Sparsity regularizers on the singular values (paper Eq. 4).
SPARSITY_KINDS = ("l1", "hoyer")

#: The default of ``trp train --method svd``: a weight per epoch, i.e. 10 / (steps per epoch) per step.
#: The pull of the sparsity term on a singular value adds up over the optimizer steps, so a fixed weight
#: per step sparsifies a dataset of 12 steps per epoch (digits) 30x less per epoch than one of 391
#: (CIFAR-10). Stated per epoch, the same default shrinks the spectrum by the same amount per pass
#: over the data on any dataset: on digits (12 steps per epoch) 0.83 per step, on cifar10-mini (29-32)
#: about 0.33, on full CIFAR-10 0.026, on ImageNet (10k steps) 1e-3, the scale Yang et al. use there.
#: Chosen by measurement (20 epochs of digits and of cifar10-mini, see benchmarks/FINETUNE.md).
DEFAULT_SPARSITY = "hoyer:10/epoch"


def orthogonality_penalty(u: Tensor, v: Tensor) -> Tensor:
    """One layer's orthogonality loss ``(‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) / r`` (paper Eq. 3) of the
    m×r factor ``u`` and the n×r factor ``v``.

    Dividing by the rank r, as the paper does, keeps wide and narrow layers on a comparable scale
    (‖UᵀU − I‖²_F sums r² entries). Its gradient is ``4·U(UᵀU − I)/r`` for U, likewise for V.

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
    """One layer's sparsity loss on its singular values ``s`` (any sign) (paper Eq. 4).

    ``l1``: ``‖s‖₁``, a constant pull of every s_i towards zero (the nuclear norm of the layer when
    U and V are orthonormal). ``hoyer``: ``‖s‖₁ / ‖s‖₂`` (Hoyer 2004), which is scale-invariant, so
    it changes the *shape* of the spectrum (few large, many zero values) without shrinking it all.
    Its gradient is ``sign(s)/‖s‖₂ − ‖s‖₁·s/‖s‖₂³``.

    Example:
        >>> float(sparsity_penalty(torch.tensor([3.0, -4.0]), "l1"))
        7.0
        >>> round(float(sparsity_penalty(torch.tensor([3.0, -4.0]), "hoyer")), 6)  # 7 / 5
        1.4
    """
    choice(kind, "sparsity regularizer", SPARSITY_KINDS)
    l1 = s.abs().sum()
    if kind == "l1":
        return l1
    # sqrt of a clamped sum of squares: an all-zero s gives 0/tiny = 0 with a finite gradient,
    # where a norm's backward would divide 0 by 0.
    l2 = s.pow(2).sum().clamp_min(torch.finfo(s.dtype).tiny).sqrt()
    return l1 / l2


def orthogonality_loss(model: nn.Module) -> Tensor:
    """``Σ_layers (‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) / r`` over the model's SVD layers (paper Eq. 3).

    Raises TRPError if the model has no SVD-parametrized layer.

    Example:
        >>> from trp.svd_training import svd_parametrize_
        >>> m = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> orthogonality_loss(m).item() < 1e-8  # freshly factorized: U, V orthonormal
        True
    """
    terms = [orthogonality_penalty(f.U, f.V) for f in map(factors, (m for _, m in require_svd_layers(model)))]
    return torch.stack(terms).sum()


def sparsity_loss(model: nn.Module, kind: str = "hoyer") -> Tensor:
    """``Σ_layers ‖s‖₁`` (``l1``) or ``Σ_layers ‖s‖₁/‖s‖₂`` (``hoyer``) (paper Eq. 4).

    Raises TRPError for an unknown kind or a model without SVD-parametrized layers.

    Example:
        >>> from trp.svd_training import svd_parametrize_
        >>> m = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> 1.0 <= sparsity_loss(m, "hoyer").item() <= 8 ** 0.5  # between 1 and sqrt(r)
        True
    """
    choice(kind, "sparsity regularizer", SPARSITY_KINDS)
    return torch.stack([sparsity_penalty(factors(m).s, kind) for _, m in require_svd_layers(model)]).sum()


@dataclass(frozen=True)
class SVDTrainingConfig:
    """The weights of SVD training's regularizers: ``λ_o·L_o + λ_s·L_s`` (paper Eq. 2). The matrix
    layout is not among them: it is :func:`svd_parametrize_`'s ``scheme``, fixed at parametrization.

    Attributes: ``orth`` λ_o (finite, >= 0) weighs :func:`orthogonality_loss`; ``sparsity`` λ_s
    (finite, >= 0) weighs :func:`sparsity_loss` of kind ``sparsity_kind`` (``hoyer`` or ``l1``).

    Example:
        >>> SVDTrainingConfig(sparsity_kind="l1", sparsity=1e-4).sparsity
        0.0001
        >>> try:
        ...     SVDTrainingConfig(orth=-1)
        ... except TRPError as err:
        ...     print(err)
        orthogonality weight must be >= 0, got -1
    """

    orth: float = 1.0
    sparsity_kind: str = "hoyer"
    sparsity: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "orth", number(self.orth, "orthogonality weight", low=0.0))
        object.__setattr__(self, "sparsity", number(self.sparsity, "sparsity weight", low=0.0))
        choice(self.sparsity_kind, "sparsity regularizer", SPARSITY_KINDS)


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
    return kind, number(num.strip(), f"sparsity weight in {text!r}", low=0.0)


def parse_sparsity_rate(text: str) -> tuple[str, float, bool]:
    """Parse ``KIND:WEIGHT`` (a weight per optimizer step) or ``KIND:WEIGHT/epoch`` (per pass over the data).

    Returns ``(kind, weight, per_epoch)``; :func:`step_weight` turns it into the weight of one step.

    Example:
        >>> parse_sparsity_rate("hoyer:10/epoch"), parse_sparsity_rate("l1:1e-4")
        (('hoyer', 10.0, True), ('l1', 0.0001, False))
    """
    body, sep, unit = str(text).strip().rpartition("/")
    if sep and unit.strip().lower() == "epoch":
        kind, weight = parse_sparsity(body)
        return kind, weight, True
    if sep:
        raise TRPError(f"sparsity must look like KIND:WEIGHT or KIND:WEIGHT/epoch; got {text!r}")
    kind, weight = parse_sparsity(text)
    return kind, weight, False


def step_weight(weight: float, per_epoch: bool, steps_per_epoch: int) -> float:
    """The sparsity weight of one optimizer step: ``weight / steps_per_epoch`` for a per-epoch weight.

    Example:
        >>> step_weight(10.0, True, 40), step_weight(0.3, False, 40)
        (0.25, 0.3)
    """
    if not per_epoch:
        return weight
    if steps_per_epoch < 1:
        raise TRPError(f"steps per epoch must be >= 1, got {steps_per_epoch}")
    return weight / steps_per_epoch


def regularization(model: nn.Module, config: SVDTrainingConfig | None = None) -> Tensor:
    """``λ_o·Σ L_o + λ_s·Σ L_s``: the term SVD training adds to the task loss (paper Eq. 2).

    A weight of 0 skips its term entirely.

    Example:
        >>> from trp.svd_training import svd_parametrize_
        >>> m = svd_parametrize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)))
        >>> cfg = SVDTrainingConfig(orth=1.0, sparsity_kind="l1", sparsity=0.5)
        >>> torch.allclose(regularization(m, cfg), orthogonality_loss(m) + 0.5 * sparsity_loss(m, "l1"))
        True
    """
    config = config or SVDTrainingConfig()
    s = factors(require_svd_layers(model)[0][1]).s
    total = torch.zeros((), dtype=s.dtype, device=s.device)
    if config.orth > 0:
        total = total + config.orth * orthogonality_loss(model)
    if config.sparsity > 0:
        total = total + config.sparsity * sparsity_loss(model, config.sparsity_kind)
    return total


# ----------------------------------------------------------------------------- ranks and pruning
