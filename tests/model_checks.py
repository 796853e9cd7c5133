"""Checks shared by the plan and decomposition tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from trp import surgery


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


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    """PyTorch's own count, autograd on (so nn.MultiheadAttention takes its counted slow path), with the
    formula torch registers for GPU attention kernels given to the CPU flash-attention kernel it misses."""

    def sdpa(q, k, v, *args, out_shape=None, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return sdpa_flop_count(q, k, v)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.enable_grad():
        model(x)
    return counter.get_total_flops() // 2


def fail_third_swap(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make ``trp.surgery.set_module`` raise on its third call (a swap failing half-way); returns the calls."""
    real: Callable = surgery.set_module
    calls: list[str] = []

    def flaky(m: nn.Module, name: str, new: nn.Module) -> None:
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated swap failure")
        real(m, name, new)

    monkeypatch.setattr(surgery, "set_module", flaky)
    return calls
