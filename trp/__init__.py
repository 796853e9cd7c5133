"""trp: Trained Rank Pruning for PyTorch.

Train networks into low-rank form (Xu et al., IJCAI 2020), decompose them exactly into stock
layers, and measure what the decomposition buys.

Example:
    >>> import trp
    >>> model = trp.decompose_(trp.models.create("resnet20"), trp.speedup(3.0), input_shape=(3, 32, 32))
    >>> round(40_551_040 / trp.profile(model, (3, 32, 32)).macs, 1)
    3.0
"""

from __future__ import annotations

from trp import models
from trp.attention import UnfusedMultiheadAttention, unfuse_attention_
from trp.bn import fold_bn_
from trp.decompose import decompose_, decompose_layer
from trp.errors import TRPError
from trp.hook import TRP, ramp
from trp.latency_budget import latency
from trp.measure import Profile, cross_check, latency_ms, profile
from trp.plan import LayerPlan, Plan, apply_plan, plan
from trp.rank import energy, fixed, fraction, parse, speedup, value
from trp.schemes import SCHEMES
from trp.saving import load, save

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "TRP",
    "LayerPlan",
    "Plan",
    "Profile",
    "TRPError",
    "UnfusedMultiheadAttention",
    "apply_plan",
    "cross_check",
    "decompose_",
    "decompose_layer",
    "energy",
    "fixed",
    "fold_bn_",
    "fraction",
    "latency",
    "latency_ms",
    "load",
    "models",
    "parse",
    "plan",
    "profile",
    "ramp",
    "save",
    "speedup",
    "unfuse_attention_",
    "value",
]
