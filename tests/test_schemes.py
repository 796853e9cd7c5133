"""Tests for trp.schemes: the one registry of schemes, their matrix layouts, costs, build and compose."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import trp
import trp.decompose
import trp.svd
from trp import schemes
from trp.errors import TRPError
from trp.tracing import trace_calls

pytestmark = pytest.mark.usefixtures("one_thread")

CONV_SHAPES = [(8, 6, 3, 3), (8, 6, 5, 5), (8, 6, 1, 3), (4, 12, 3, 1), (1, 1, 1, 1)]
IN_HW = (11, 13)

try:  # Hugging Face's Conv1D (GPT-2): a Linear with its weight stored in×out
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is an optional extra (the test extra installs it)
    Conv1D = None


def _samples() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Layers of the kinds the registry handles, each with one sample's input shape."""
    torch.manual_seed(0)
    return [
        (nn.Conv2d(6, 8, 3, padding=1, dtype=torch.float64), (6, *IN_HW)),
        (nn.Conv2d(6, 8, (5, 3), stride=(2, 1), padding=(2, 0), dilation=(1, 2), dtype=torch.float64), (6, *IN_HW)),
        (nn.Conv2d(6, 4, (1, 3), bias=False, dtype=torch.float64), (6, *IN_HW)),
        (nn.Linear(12, 7, dtype=torch.float64), (12,)),
        (nn.Linear(5, 9, bias=False, dtype=torch.float64), (3, 5)),
    ] + ([(Conv1D(7, 12).double(), (3, 12))] if Conv1D is not None else [])


def _cases() -> list:
    """Every (scheme, layer) pair the scheme accepts, so a new scheme in the registry is covered too."""
    out = []
    for name, sch in schemes.SCHEMES.items():
        accepted = [(i, m, shape) for i, (m, shape) in enumerate(_samples()) if sch.check(m) is None]
        assert accepted, f"no sample layer for scheme {name!r}: add one to _samples()"
        out += [pytest.param(name, i, id=f"{name}-{i}") for i, _, _ in accepted]
    return out


CASES = _cases()


def _sample(i: int) -> tuple[nn.Module, tuple[int, ...]]:
    return _samples()[i]


# --------------------------------------------------------------------------------------------
# The registry is the one definition of the schemes
# --------------------------------------------------------------------------------------------


def test_registry_is_the_single_definition() -> None:
    """trp.SCHEMES is the registry itself, and the old homes (svd layouts, decompose.SCHEMES) are gone."""
    assert trp.SCHEMES is schemes.SCHEMES
    assert tuple(schemes.SCHEMES) == schemes.names() == ("channel", "spatial", "decouple", "linear")
    assert all(sch.name == name for name, sch in schemes.SCHEMES.items())
    for old in ("LAYOUTS", "to_matrix", "from_matrix"):
        assert not hasattr(trp.svd, old), f"trp.svd.{old} still exists"
    for old in ("SCHEMES", "compose", "fold_bn_", "get_module", "default_input_shape"):
        assert not hasattr(trp.decompose, old), f"trp.decompose.{old} still exists"


def test_names_filters() -> None:
    """names(batched=...) splits single-matrix from batched layouts; names_for lists what can take a layer."""
    assert schemes.names(batched=True) == ("decouple",)
    assert schemes.names(batched=False) == ("channel", "spatial", "linear")
    assert schemes.names_for(nn.Conv2d(4, 4, 3)) == ("channel", "spatial", "decouple")
    assert schemes.names_for(nn.Linear(4, 4)) == ("linear",)
    assert schemes.names_for(nn.Conv2d(4, 4, 3, groups=2)) == ()
    assert schemes.names_for(nn.Conv1d(4, 4, 3)) == ()


def test_applicable_gives_first_scheme_or_every_reason() -> None:
    """applicable picks the first scheme that accepts the layer, else explains every refusal."""
    sch, why = schemes.applicable(nn.Linear(3, 3), ("channel", "linear"))
    assert sch is schemes.get("linear") and why is None
    sch, why = schemes.applicable(nn.Conv2d(3, 3, 3), ("spatial", "linear"))
    assert sch is schemes.get("spatial") and why is None
    sch, why = schemes.applicable(nn.Linear(3, 3), ("channel",))
    assert sch is None and why == "Linear is not handled by scheme 'channel' (use scheme 'linear')"
    sch, why = schemes.applicable(nn.ConvTranspose2d(3, 3, 3), ("channel", "linear"))
    assert sch is None and why.startswith("no scheme of [channel, linear] applies: ")
    assert "scheme 'channel'" in why and "scheme 'linear'" in why
    with pytest.raises(TRPError, match="unknown scheme 'bogus'"):
        schemes.applicable(nn.Linear(3, 3), ("bogus", "linear"))


@pytest.mark.parametrize("bad", ["bogus", "Channel", "", None, 3])
def test_get_unknown_scheme_lists_choices(bad) -> None:
    """A misspelt scheme must be a one-line TRPError listing the choices, not a silent reshape."""
    with pytest.raises(TRPError, match=r"unknown scheme .*; choose one of: channel, spatial, decouple, linear$"):
        schemes.get(bad)


# --------------------------------------------------------------------------------------------
# Matrix layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("layout", ["channel", "spatial", "decouple"])
def test_to_from_matrix_roundtrip(layout: str, shape: tuple[int, ...]) -> None:
    """from_matrix must invert to_matrix exactly, or a full-rank decomposition could not be exact."""
    w = torch.randn(shape)
    sch = schemes.get(layout)
    m = sch.to_matrix(w)
    n, c, kh, kw = shape
    expected = {"channel": (n, c * kh * kw), "spatial": (c * kh, n * kw), "decouple": (n, c, kh * kw)}[layout]
    assert tuple(m.shape) == expected
    assert torch.equal(sch.from_matrix(m, w.shape), w)


@pytest.mark.parametrize("name, i", CASES)
def test_every_scheme_roundtrips_exactly(name: str, i: int) -> None:
    """Every registered scheme's from_matrix inverts its to_matrix bit for bit, on every layer it accepts."""
    module, _ = _sample(i)
    sch = schemes.get(name)
    w = module.weight.detach()
    m = sch.to_matrix(w)
    assert m.dim() == (3 if sch.batched else 2)
    assert torch.equal(sch.from_matrix(m, w.shape), w)
    assert sch.full_rank(module) == min(m.shape[-2:])


def test_layouts_index_the_documented_entries() -> None:
    """Each layout must put W[n,c,y,x] where the scheme's factorization expects it."""
    n, c, kh, kw = 4, 3, 2, 5
    w = torch.arange(n * c * kh * kw, dtype=torch.float64).reshape(n, c, kh, kw)
    ch, sp, de = (schemes.get(lay).to_matrix(w) for lay in ("channel", "spatial", "decouple"))
    for i in range(n):
        for j in range(c):
            for y in range(kh):
                for x in range(kw):
                    v = w[i, j, y, x]
                    assert ch[i, (j * kh + y) * kw + x] == v
                    assert sp[j * kh + y, i * kw + x] == v
                    assert de[i, j, y * kw + x] == v


def test_linear_layout_is_identity() -> None:
    """A Linear weight is already the matrix; the linear layout must not copy or permute it."""
    w = torch.randn(5, 7)
    sch = schemes.get("linear")
    assert sch.to_matrix(w) is w
    assert torch.equal(sch.from_matrix(w, w.shape), w)


# --------------------------------------------------------------------------------------------
# factorize / build / compose
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, i", CASES)
def test_compose_of_full_rank_build_is_the_weight(name: str, i: int) -> None:
    """compose(build(full rank)) gives back the dense weight, and the built module computes the layer."""
    module, shape = _sample(i)
    sch = schemes.get(name)
    low = sch.build(module, sch.full_rank(module), sch.factorize(module.weight))
    dense = module.weight.detach()
    if schemes.is_hf_conv1d(module):  # compose gives the equivalent nn.Linear's out×in weight
        dense = dense.t()
    assert torch.allclose(sch.compose(low), dense, rtol=0, atol=1e-12)
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(low(x), module(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name, i", CASES)
def test_factorize_and_singular_values_agree(name: str, i: int) -> None:
    """factorize is the SVD of to_matrix; singular_values is that spectrum without the vectors."""
    module, _ = _sample(i)
    sch = schemes.get(name)
    u, s, vh = sch.factorize(module.weight)
    assert torch.allclose((u * s[..., None, :]) @ vh, sch.to_matrix(module.weight.detach()), atol=1e-12)
    spectrum = sch.singular_values(module.weight)
    assert spectrum.dim() == 1 and spectrum.numel() == sch.full_rank(module)
    assert torch.allclose(spectrum, trp.svd.spectrum(s), atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name, i", CASES)
def test_costs_per_rank_match_the_built_layers(name: str, i: int, k: int) -> None:
    """k·macs_per_rank is what FlopCounterMode measures on the rank-k build; k·params_per_rank + bias its size."""
    module, shape = _sample(i)
    sch = schemes.get(name)
    ((ins, outs),) = trace_calls(nn.Sequential(module), shape)["0"]
    for factors in (sch.factorize(module.weight), None):  # apply_plan builds without factors
        low = sch.build(module, k, factors)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            low(torch.zeros(1, *shape, dtype=torch.float64))
        assert counter.get_total_flops() == 2 * k * sch.macs_per_rank(module, ins, outs)
        bias = 0 if module.bias is None else module.bias.numel()
        assert sum(p.numel() for p in low.parameters()) == k * sch.params_per_rank(module) + bias


@pytest.mark.parametrize("name, i", CASES)
def test_build_without_factors_has_the_same_structure(name: str, i: int) -> None:
    """build(module, k) without factors has the structure of the factored build, so state_dicts load into it."""
    module, _ = _sample(i)
    sch = schemes.get(name)
    trained = sch.build(module, 2, sch.factorize(module.weight))
    fresh = sch.build(module, 2)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in trained.state_dict().items()}
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(sch.compose(fresh), sch.compose(trained))


# --------------------------------------------------------------------------------------------
# Mixing schemes by layer type; Hugging Face's Conv1D (issue #13)
# --------------------------------------------------------------------------------------------


class _Mixed(nn.Module):
    """A conv net with a Linear head: the classic case for convs in one scheme, Linears in another."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dw(self.conv2(self.conv(x))).mean((2, 3)))


def test_default_for_and_auto() -> None:
    """auto gives a Conv2d 'channel' and a Linear 'linear'; a layer no scheme takes has no default."""
    assert schemes.default_for(nn.Conv2d(3, 3, 3)) == "channel"
    assert schemes.default_for(nn.Linear(3, 3)) == "linear"
    assert schemes.default_for(nn.Conv2d(4, 4, 3, groups=2)) is None
    sch, why = schemes.applicable(nn.Linear(3, 3), ("spatial", "auto"))
    assert sch is schemes.get("linear") and why is None
    sch, why = schemes.applicable(nn.Conv2d(4, 4, 3, groups=4), ("auto",))
    assert sch is None and why == "no scheme handles Conv2d"
    assert schemes.parse_names(("auto", "linear")) == ("auto", "linear")
    for bad in ([], 3, ("channel", "tucker")):
        with pytest.raises(TRPError):
            schemes.parse_names(bad)


def test_trp_mixes_schemes_per_layer_type() -> None:
    """TRP(scheme=("spatial", "linear")) gives each layer the first scheme accepting it, projects each in its
    own layout, and a layer filter_fn accepts that no scheme handles is an error naming it."""
    torch.manual_seed(0)
    model = _Mixed()
    take = lambda m, n: n in ("conv2", "fc")  # noqa: E731
    reg = trp.TRP(model, scheme=("spatial", "linear"), energy=0.6, period=1, nuclear=0.0, filter_fn=take)
    assert {layer.name: layer.scheme.name for layer in reg.layers} == {"conv2": "spatial", "fc": "linear"}
    assert reg.scheme == ("spatial", "linear")
    reg.project_now()
    for layer in reg.layers:  # each weight is exactly low-rank in its own scheme's layout
        s = torch.linalg.svdvals(layer.scheme.to_matrix(layer.weight.detach().double()))
        assert int((s > 1e-5 * s[0]).sum()) == reg.ranks()[layer.name]
    auto = trp.TRP(_Mixed(), scheme="auto", filter_fn=take, nuclear=0.0)
    assert {layer.name: layer.scheme.name for layer in auto.layers} == {"conv2": "channel", "fc": "linear"}
    with pytest.raises(TRPError, match=r"layer 'dw' \(Conv2d\) accepted by filter_fn: no scheme of \[spatial, linear\] "
                                       r"applies: groups=8"):
        trp.TRP(_Mixed(), scheme=("spatial", "linear"), filter_fn=lambda m, n: n in ("fc", "dw"))
    with pytest.raises(TRPError, match="unknown TRP scheme 'tucker'"):
        trp.TRP(_Mixed(), scheme=("linear", "tucker"), filter_fn=take)


def test_trp_speedup_budget_over_mixed_schemes() -> None:
    """A MACs budget spans layers of different schemes, each costed in its own scheme: the ranks TRP
    reaches plan to at least the target speed-up, short of it by less than one rank of one layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(),
                          nn.Linear(32 * 36, 64), nn.Linear(64, 10))
    take = lambda m, n: n in ("1", "3", "4")  # noqa: E731
    shape = (3, 6, 6)
    reg = trp.TRP(model, scheme=("channel", "linear"), speedup=2.0, period=1, nuclear=0.0, filter_fn=take,
                  input_shape=shape)
    assert {layer.name: layer.scheme.name for layer in reg.layers} == {"1": "channel", "3": "linear", "4": "linear"}
    reg.project_now()
    p = trp.plan(model, ("channel", "linear"), reg.ranks(), take, shape)
    budget = p.macs_before / 2.0
    step = max(lp.macs_after // lp.rank for lp in p.layers if lp.decomposed)  # MACs are linear in the rank
    # On 6x6 inputs one conv rank is 5 % of the budget, so "within 2 %" is not reachable from below.
    assert p.macs_after <= budget < p.macs_after + step, (p.macs_after, budget, step)


def test_hf_conv1d_is_linear() -> None:
    """Hugging Face's Conv1D (weight in×out) goes through the linear scheme: costs, exact build, auto."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    layer = transformers.pytorch_utils.Conv1D(7, 12)  # nf=7 outputs, nx=12 inputs
    assert schemes.is_hf_conv1d(layer) and schemes.default_for(layer) == "linear"
    sch = schemes.get("linear")
    assert sch.features(layer) == (12, 7) and sch.full_rank(layer) == 7
    low = sch.build(layer, 7, sch.factorize(layer.weight))
    assert [type(m) for m in low] == [nn.Linear, nn.Linear] and low[0].in_features == 12
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        assert torch.allclose(low(x), layer(x), atol=1e-5)
    assert schemes.get("channel").check(layer) == "Conv1D is not handled by scheme 'channel' (use scheme 'linear')"


def test_a_class_named_conv1d_elsewhere_is_not_hf() -> None:
    """Conv1D is recognized by its module path, not its name alone (and transformers is never imported)."""

    class Conv1D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

    assert not schemes.is_hf_conv1d(Conv1D())
    assert schemes.get("linear").check(Conv1D()) == "Conv1D is not handled by scheme 'linear'"


# --------------------------------------------------------------------------------------------
# Factorizing at a known rank: randomized or Gram route, checked against the optimum (issue #13)
# --------------------------------------------------------------------------------------------


def _low_rank_plus_noise(m: int, n: int, r: int, noise: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) + noise * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("k", [20, 300], ids=["randomized", "gram"])
def test_factorize_at_rank_is_near_optimal_without_full_svd(monkeypatch, k) -> None:
    """With the rank and its optimal energy, a large layer is factorized without LAPACK's full SVD and its
    rank-k error is within 1 % of Eckart–Young's."""
    w = _low_rank_plus_noise(600, 900, 20, 0.05)
    s = torch.linalg.svdvals(w.double())
    energy = trp.rank.kept_energy(s, k)
    optimal = float(s[k:].pow(2).sum().sqrt())

    def forbidden(*args, **kwargs):
        raise AssertionError("the full SVD was taken")

    monkeypatch.setattr(trp.svd, "svd", forbidden)
    u, sk, vh = schemes.get("linear").factorize(w, "fc", rank=k, energy=energy)
    assert u.shape == (600, k) and sk.shape == (k,) and vh.shape == (k, 900)
    err = float(torch.linalg.matrix_norm(w - (u * sk) @ vh))
    assert optimal <= err * (1 + 1e-4) and err <= 1.01 * optimal


def test_factorize_falls_back_to_full_svd_when_short_of_optimal(monkeypatch) -> None:
    """A cheap result worse than the check allows is replaced by the full SVD (here: told a higher energy
    than any rank-k factors can keep)."""
    w = _low_rank_plus_noise(600, 700, 20, 0.5)
    calls = []
    real = trp.svd.svd
    monkeypatch.setattr(trp.svd, "svd", lambda m, name="weight": calls.append(name) or real(m, name))
    u, s, vh = schemes.get("linear").factorize(w, "fc", rank=10, energy=0.999999)
    assert calls == ["fc"] and u.shape == (600, 600)


def test_factorize_at_rank_leaves_global_rng_alone() -> None:
    """The randomized route uses its own seeded generator: deterministic, and the caller's stream is untouched."""
    w = _low_rank_plus_noise(600, 700, 20, 0.05)
    e = trp.rank.kept_energy(torch.linalg.svdvals(w), 20)
    torch.manual_seed(5)
    a = schemes.get("linear").factorize(w, rank=20, energy=e)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after)
    b = schemes.get("linear").factorize(w, rank=20, energy=e)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
