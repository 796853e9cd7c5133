"""Checks shared by the plan and decomposition tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


def built_rank(low: nn.Sequential, scheme: str) -> int:
    """The rank a decomposed two-layer module was built at."""
    if scheme == "linear":
        return low[0].out_features
    if scheme == "decouple":
        return low[0].out_channels // low[1].out_channels
    return low[0].out_channels


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    """The model's modules (by identity) and a copy of its state, to check that nothing changed."""
    return dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snap: tuple[dict, dict]) -> None:
    """The same module objects under the same names, and bitwise the same state, as at ``snapshot``."""
    modules, state = snap
    now = dict(model.named_modules())
    assert now.keys() == modules.keys()
    assert all(now[name] is mod for name, mod in modules.items())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
