"""Exact low-rank decomposition of conv and Linear layers into stock layers, in place.

:func:`decompose_` is the one verb (in the style of torchao's ``quantize_``): give it a rank
criterion (or a ready :class:`~trp.plan.Plan`) and it replaces every planned layer by the two stock
layers of its scheme (:mod:`trp.schemes`), so FLOP counters, ``state_dict``, export and
``torch.compile`` see ordinary ``nn.Conv2d`` / ``nn.Linear`` modules. Each decomposed layer takes
exactly one SVD (planning needs only singular values, see :mod:`trp.plan`); every replacement is
built before any is made, so a failure leaves the model unchanged.

Example:
    >>> conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    >>> model = decompose_(nn.Sequential(conv), 4)
    >>> model[0][0].out_channels
    4
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from trp import rank as rank_mod
from trp import schemes
from trp import svd as svd_mod
from trp.errors import TRPError
from trp.plan import Plan, SchemeArg, low_rank_layers, plan
from trp.surgery import FilterFn, replace_modules

__all__ = ["decompose_", "decompose_layer"]


def decompose_layer(module: nn.Module, scheme: str = "channel", rank: rank_mod.RankArg = None) -> nn.Sequential:
    """Build the two-layer low-rank form of one dense layer (like TensorLy-Torch's ``from_conv``).

    Args:
        module: An ``nn.Conv2d`` (groups=1) or ``nn.Linear``.
        scheme: A name of :data:`trp.schemes.SCHEMES`.
        rank: A rank, a per-layer criterion such as ``trp.energy(0.9)``, or None for full rank
            (exact up to float round-off).

    Returns:
        An ``nn.Sequential`` of two stock layers on the module's device and dtype.

    Example:
        >>> import torch
        >>> conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        >>> low = decompose_layer(conv, "channel")
        >>> x = torch.randn(2, 8, 10, 10)
        >>> torch.allclose(low(x), conv(x), atol=1e-5)
        True
    """
    sch = schemes.get(scheme)
    reason = sch.check(module)
    if reason:
        raise TRPError(reason)
    criterion = None if rank is None else rank_mod.resolve(rank)
    if isinstance(criterion, (rank_mod.Speedup, dict)):
        raise TRPError("a speed-up budget or per-layer ranks apply to a whole model: use trp.decompose_ or trp.plan")
    u, s, vh = sch.factorize(module.weight)
    k = s.shape[-1] if criterion is None else criterion.select(svd_mod.spectrum(s))
    return sch.build(module, k, (u, s, vh))


def decompose_(
    model: nn.Module,
    plan_or_rank: Plan | rank_mod.RankArg | str = None,
    filter_fn: FilterFn | None = None,
    *,
    scheme: SchemeArg | None = None,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Decompose a model's layers in place and return it.

    Args:
        model: Any ``nn.Module``.
        plan_or_rank: A :class:`~trp.plan.Plan` to apply to this model's current weights, or what
            :func:`trp.plan` takes as ``rank`` (a criterion, its text such as ``"speedup:3"``, an
            int, ``{layer: rank}``; default ``trp.energy(0.9)``).
        filter_fn: ``filter_fn(module, name) -> bool`` picks the layers (not with a Plan).
        scheme: A scheme name or several tried in order per layer (default ``"channel"``; not with a Plan).
        input_shape: One sample's shape for MACs accounting (not with a Plan).

    The decomposed layers are new parameters: build the optimizer afterwards.

    Example:
        >>> import trp
        >>> from trp.models import create
        >>> model = trp.decompose_(create("resnet20"), trp.speedup(3.0), input_shape=(3, 32, 32))
        >>> round(trp.profile(model, (3, 32, 32)).macs / 40_551_040, 1)
        0.3
    """
    if isinstance(plan_or_rank, Plan):
        if filter_fn is not None or input_shape is not None or scheme is not None:
            raise TRPError("a Plan already fixes the layers, schemes and input shape: pass them to trp.plan instead")
        p = plan_or_rank
    else:
        rank = rank_mod.parse(plan_or_rank) if isinstance(plan_or_rank, str) else plan_or_rank
        p = plan(model, "channel" if scheme is None else scheme, rank, filter_fn, input_shape)
    replace_modules(model, low_rank_layers(model, p))
    return model
