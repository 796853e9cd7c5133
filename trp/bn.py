"""BatchNorm folding for inference: merge each BatchNorm2d into the conv before it.

BN after a conv is an affine map per output channel, so at inference it folds into the conv's
weight and bias: W' = W·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β. Folding before decomposition
removes a memory-bound pass per layer, which is what lets measured latency follow the MACs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trp.errors import TRPError
from trp.surgery import get_module, set_module

__all__ = ["conv_bn_pairs", "fold_bn_", "fold_bn_structure_"]


def conv_bn_pairs(model: nn.Module) -> list[list[str]]:
    """Conv2d → BatchNorm2d pairs where the BN is the conv's only consumer, found by torch.fx.

    Example:
        >>> conv_bn_pairs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
        [['0', '1']]
    """
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
    pairs = conv_bn_pairs(model)
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
        if not isinstance(conv, nn.Conv2d):
            raise TRPError(f"the folded-BN list does not fit this model: {conv_name!r} is {type(conv).__name__}, not Conv2d")
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
        set_module(model, bn_name, nn.Identity())
    return model
