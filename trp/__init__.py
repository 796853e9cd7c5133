"""trp: Trained Rank Pruning for PyTorch.

Train networks into low-rank form (Xu et al., IJCAI 2020), decompose them exactly into stock
layers, and measure what the decomposition buys.

Example:
    >>> import trp
    >>> from trp.models import create
    >>> model = trp.decompose_(create("resnet20"), "channel", trp.speedup(3.0), input_shape=(3, 32, 32))
    >>> round(40_551_040 / trp.profile(model, (3, 32, 32)).macs, 1)
    3.0
"""

from __future__ import annotations

from trp.checkpoint import load
from trp.decompose import SCHEMES, LayerPlan, Plan, apply_plan, decompose_, decompose_layer, fold_bn_, plan
from trp.errors import TRPError
from trp.hook import TRP, ramp
from trp.measure import Profile, latency_ms, profile
from trp.rank import energy, fixed, fraction, parse, speedup, value

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "TRP",
    "LayerPlan",
    "Plan",
    "Profile",
    "TRPError",
    "apply_plan",
    "decompose_",
    "decompose_layer",
    "energy",
    "fixed",
    "fold_bn_",
    "load",
    "fraction",
    "latency_ms",
    "load",
    "parse",
    "plan",
    "profile",
    "ramp",
    "speedup",
    "value",
]
