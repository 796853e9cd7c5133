"""Tests for trp.surgery: finding layers by name, replacing them under every alias, rollback, unwrap, default filter;
and, end to end, decomposing models with aliased modules and tied weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import trp
from trp.surgery import aliases, default_filter, get_module, replace_modules, set_module, unwrap
from model_checks import fail_third_swap

pytestmark = pytest.mark.usefixtures("one_thread")


class _TwoNames(nn.Module):
    """One block reachable as ``a`` and ``b`` (and its Linear as ``a.0``, ``b.0``); forward uses ``b`` only."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.a = block
        self.b = block
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(x))


def test_get_and_set_module() -> None:
    """get_module resolves dotted names ("" is the model); set_module replaces exactly one name."""
    model = _TwoNames()
    assert get_module(model, "") is model
    assert get_module(model, "a.0") is model.a[0]
    with pytest.raises(AttributeError):
        get_module(model, "a.7")
    new = nn.Identity()
    set_module(model, "head", new)
    assert model.head is new
    set_module(model, "a.1", nn.Tanh())
    assert isinstance(model.a[1], nn.Tanh)  # a and b are one module, so both see it


def test_aliases_lists_every_name() -> None:
    """aliases maps each module to all the names it is reachable by, in registration order."""
    lin = nn.Linear(2, 2)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    assert aliases(seq)[id(lin)] == ["0", "2"]
    model = _TwoNames()
    names = aliases(model)
    assert names[id(model.a)] == ["a", "b"]
    assert names[id(model.a[0])] == ["a.0", "b.0"]
    assert names[id(model.head)] == ["head"]
    assert names[id(model)] == [""]


@pytest.mark.parametrize("name", ["0", "2"])
def test_replace_modules_replaces_every_alias(name) -> None:
    """Replacing a module under any one of its names replaces it under all, keeping the sharing."""
    lin = nn.Linear(3, 3)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    new = nn.Linear(3, 3)
    replace_modules(seq, {name: new})
    assert seq[0] is new and seq[2] is new and lin not in list(seq)


def test_replace_modules_nested_alias() -> None:
    """A layer inside a shared block is replaced under both dotted paths; the forward sees the new layer."""
    model = _TwoNames()
    new = nn.Linear(4, 4)
    replace_modules(model, {"a.0": new})
    assert model.a[0] is new and model.b[0] is new
    calls = []
    new.register_forward_hook(lambda *args: calls.append(1))
    model(torch.zeros(1, 4))
    assert calls == [1]


def test_replace_modules_rolls_back_on_failure() -> None:
    """If one replacement of a batch fails, the ones already made (every alias) are undone."""
    lin = nn.Linear(3, 3)
    head = nn.Linear(3, 3)
    seq = nn.Sequential(lin, nn.ReLU(), lin, head)
    before = list(seq)
    with pytest.raises(AttributeError):
        replace_modules(seq, {"0": nn.Identity(), "3": nn.Identity(), "9": nn.Identity()})
    assert list(seq) == before and all(a is b for a, b in zip(seq, before))


def test_replace_modules_rolls_back_when_a_swap_fails(monkeypatch) -> None:
    """A failure inside the swap itself (the third set_module) also leaves the model as it was."""
    lin, head = nn.Linear(3, 3), nn.Linear(3, 3)
    seq = nn.Sequential(lin, nn.ReLU(), lin, head)
    before = list(seq)
    calls = fail_third_swap(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated swap failure"):
        replace_modules(seq, {"0": nn.Identity(), "3": nn.Identity()})
    assert calls[:3] == ["0", "2", "3"]
    assert all(a is b for a, b in zip(seq, before))


def test_unwrap() -> None:
    """unwrap finds the module inside DataParallel (``.module``) or a compiled wrapper (``._orig_mod``)."""
    inner = nn.Linear(2, 2)
    assert unwrap(inner) is inner
    assert unwrap(nn.DataParallel(inner)) is inner

    class Compiled(nn.Module):
        def __init__(self, mod: nn.Module) -> None:
            super().__init__()
            self._orig_mod = mod

    assert unwrap(Compiled(nn.DataParallel(inner))) is inner


def test_default_filter_skips_stem_grouped_and_linear() -> None:
    """The paper's choice: every groups=1 Conv2d but the first; no grouped conv, no Linear, no subclass."""

    class SubConv(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3, groups=2), SubConv(8, 8, 1),
                          nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 2))
    keep = default_filter(model)
    assert [name for name, mod in model.named_modules() if keep(mod, name)] == ["1", "4"]


# --------------------------------------------------------------------------------------------
# Whole models: a module under several names, layers sharing one weight (issue #13, item 3)
# --------------------------------------------------------------------------------------------

WIDTH = 64


def _flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return counter.get_total_flops()


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


class _SecondName(nn.Module):
    """One Linear registered as ``a`` and ``b``; forward calls it twice through the second name only."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(WIDTH, WIDTH)
        self.a = lin
        self.b = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.b(x)))


def _shared_sequential() -> nn.Module:
    lin = nn.Linear(WIDTH, WIDTH)
    return nn.Sequential(lin, nn.ReLU(), lin)


ALIASED = [pytest.param(_shared_sequential, ("0", "2"), id="sequential"),
           pytest.param(_SecondName, ("a", "b"), id="second-name")]


@pytest.mark.parametrize("make, names", ALIASED)
def test_alias_is_replaced_under_every_name_and_stays_exact(make, names) -> None:
    """A Linear registered twice is decomposed once, replaced under both names, and exact at full rank."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(3, WIDTH)
    with torch.no_grad():
        ref = model(x)
    p = trp.plan(model, "linear", trp.fraction(1.0), input_shape=(WIDTH,))
    (lp,) = p.layers  # one layer, listed under its first name, paying for both calls
    assert lp.name == names[0] and lp.macs_before == 2 * WIDTH * WIDTH
    assert "does not lower" in lp.reason
    lp.reason = None  # full rank never lowers MACs: force it, to check exactness through both names
    trp.decompose_(model, p)
    first, second = (get_module(model, n) for n in names)
    assert type(first) is nn.Sequential and first is second
    with torch.no_grad():
        assert torch.allclose(model(x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [trp.fixed(8), trp.speedup(2.0)], ids=str)
@pytest.mark.parametrize("make, names", ALIASED)
def test_alias_plan_speedup_is_what_flop_counter_measures(make, names, rank) -> None:
    """The plan's speed-up on a shared Linear is the one FlopCounterMode (FLOPs = 2·MACs) measures after decompose_."""
    torch.manual_seed(0)
    model = make().eval()
    dense = _flops(model, (WIDTH,))
    p = trp.plan(model, "linear", rank, input_shape=(WIDTH,))
    assert 2 * p.macs_before == dense and p.speedup > 1.5
    trp.decompose_(model, p)
    after = _flops(model, (WIDTH,))
    assert 2 * p.macs_after == after
    assert p.speedup == pytest.approx(dense / after, rel=1e-12)
    assert get_module(model, names[0]) is get_module(model, names[1])
    assert p.params_after == _unique_params(model) == trp.profile(model, (WIDTH,)).params


class _Tied(nn.Module):
    """An encoder and a decoder Linear tying one weight (the decoder keeps its own bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(WIDTH, WIDTH, bias=False)
        self.dec = nn.Linear(WIDTH, WIDTH)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.enc(x)))


@pytest.mark.parametrize("keep", [None, lambda m, n: n == "enc"], ids=["both", "enc-only"])
def test_tied_weights_are_counted_once(keep) -> None:
    """Two layers tying one weight: the plan counts it once, params_after is never negative and is the real count."""
    torch.manual_seed(0)
    model = _Tied().eval()
    assert model.enc.weight is model.dec.weight
    p = trp.plan(model, "linear", trp.fixed(8), keep, input_shape=(WIDTH,))
    assert p.params_before == _unique_params(model) == WIDTH * WIDTH + WIDTH
    assert trp.profile(model, (WIDTH,)).params == p.params_before
    assert p.params_after >= 0
    trp.decompose_(model, p)
    assert p.params_after == _unique_params(model) == trp.profile(model, (WIDTH,)).params
    assert 2 * p.macs_after == _flops(model, (WIDTH,))
