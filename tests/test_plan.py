"""Tests for trp.plan: planning without changing the model, the speed-up budget, plans as JSON, apply_plan."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import trp
from trp import schemes
from trp import svd as svd_mod
from trp.errors import TRPError
from trp.models import create
from trp.plan import rank_costs
from trp.surgery import get_module
from model_checks import assert_unchanged, built_rank, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

C, N, H, W = 6, 8, 11, 13
CONV_SCHEMES = ["channel", "spatial", "decouple"]
RESNET_INPUT = (3, 32, 32)
RESNET20_MACS = 40_551_040


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    """One seeded ResNet-20 in eval mode; tests that change it work on a deep copy."""
    torch.manual_seed(0)
    return create("resnet20").eval()


# --------------------------------------------------------------------------------------------
# 1. What plan decides per layer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", ["energy:0.9", True, 0.5, [4]])
def test_plan_rejects_bad_rank_type(resnet20, rank) -> None:
    """A rank that is neither an int nor a criterion is a TRPError (a bool is not a rank)."""
    with pytest.raises(TRPError, match="rank must be"):
        trp.plan(resnet20, "channel", rank, input_shape=RESNET_INPUT)


def test_rank_that_does_not_lower_macs_stays_dense_pointwise() -> None:
    """A 1×1 conv at full rank costs more as two layers, so it must stay dense with that reason."""
    model = nn.Sequential(nn.Conv2d(C, N, 1))
    p = trp.plan(model, "channel", trp.fraction(1.0), input_shape=(C, H, W))
    (lp,) = p.layers
    assert not lp.decomposed and "does not lower its MACs" in lp.reason
    assert lp.rank == C and lp.macs_after >= lp.macs_before
    assert p.macs_after == p.macs_before and p.speedup == 1.0
    conv = model[0]
    trp.decompose_(model, trp.fraction(1.0), scheme="channel", input_shape=(C, H, W))
    assert model[0] is conv


def test_rank_that_does_not_lower_macs_stays_dense_resnet_stem(resnet20) -> None:
    """ResNet-20's 3-channel stem at energy 1.0 would cost more decomposed, so it stays dense."""
    model = copy.deepcopy(resnet20)
    p = trp.plan(model, "channel", trp.energy(1.0), input_shape=RESNET_INPUT)
    stem = p.layers[0]
    assert stem.name == "conv1" and stem.rank == 16 and stem.full_rank == 16
    assert not stem.decomposed and "does not lower its MACs" in stem.reason
    conv1 = model.conv1
    trp.decompose_(model, p)
    assert model.conv1 is conv1


def test_filter_fn_exclusion_is_recorded(resnet20) -> None:
    """Layers the filter rejects are listed as "excluded by filter_fn" and left in place."""
    model = copy.deepcopy(resnet20)
    seen = []

    def keep(module: nn.Module, name: str) -> bool:
        seen.append((type(module), name))
        return not name.startswith("layer3") and name != "fc"

    p = trp.plan(model, ("channel", "linear"), trp.fixed(4), filter_fn=keep, input_shape=RESNET_INPUT)
    assert (nn.Conv2d, "layer3.0.conv1") in seen and (nn.Linear, "fc") in seen
    for lp in p.layers:
        excluded = lp.name.startswith("layer3") or lp.name == "fc"
        assert (lp.reason == "excluded by filter_fn") == excluded
        assert lp.decomposed == (not excluded)
    kept = model.layer3[0].conv1
    trp.decompose_(model, trp.fixed(4), keep, scheme=("channel", "linear"), input_shape=RESNET_INPUT)
    assert model.layer3[0].conv1 is kept and isinstance(model.fc, nn.Linear)
    assert isinstance(model.layer1[0].conv1, nn.Sequential)


# --------------------------------------------------------------------------------------------
# 2. The global speed-up budget
# --------------------------------------------------------------------------------------------


def _gains(model: nn.Module, lp) -> torch.Tensor:
    w = get_module(model, lp.name).weight.detach()
    spec = svd_mod.spectrum(svd_mod.svd(schemes.get(lp.scheme).to_matrix(w))[1]).double()
    return spec.pow(2) / spec.pow(2).sum() / (lp.macs_after // lp.rank)


@pytest.mark.parametrize("target", [2, 2.5, 3, 4])
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_speedup_budget_is_met_and_real(resnet20, scheme, target) -> None:
    """speedup(s) must reach s and land within 2% past it, and the decomposed model's counted MACs must agree
    with the plan."""
    model = copy.deepcopy(resnet20)
    p = trp.plan(model, scheme, trp.speedup(target), input_shape=RESNET_INPUT)
    assert p.macs_before == RESNET20_MACS
    assert 1 <= p.speedup / target <= 1.02
    assert str(p.criterion) == f"speedup:{target:g}"
    # Rank goes where energy per MAC is highest: no unkept value buys more energy per MAC than a kept one,
    # except for the last greedy fill steps that take a cheaper rank to land on the budget.
    lps = [lp for lp in p.layers if lp.decomposed]
    kept, nexts = [], []
    for lp in lps:
        g = _gains(model, lp)
        kept += g[1 : lp.rank].tolist()  # the first value is kept by every decomposed layer regardless
        cost = lp.macs_after // lp.rank
        if lp.rank < lp.full_rank and (lp.rank + 1) * cost < lp.macs_before:
            nexts.append(float(g[lp.rank]))
    assert sum(v < max(nexts) for v in kept) <= 2
    # The plan's accounting is what the decomposed model really costs.
    trp.decompose_(model, p)
    prof = trp.profile(model, RESNET_INPUT)
    assert prof.macs == p.macs_after
    assert prof.params == p.params_after == sum(q.numel() for q in model.parameters())
    assert 1 <= RESNET20_MACS / prof.macs / target <= 1.02


def test_speedup_prefers_concentrated_spectrum() -> None:
    """Of two equal-cost layers, the one whose energy is concentrated in few values must get the lower rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(N, N, 3, padding=1), nn.Conv2d(N, N, 3, padding=1))
    spectra = [0.3 ** torch.arange(N, dtype=torch.float32), torch.ones(N)]  # concentrated, then flat
    with torch.no_grad():
        for conv, s in zip(model, spectra):
            u, _, vh = torch.linalg.svd(torch.randn(N, N * 9), full_matrices=False)
            conv.weight.copy_(((u * s) @ vh).reshape(conv.weight.shape))
    p = trp.plan(model, "channel", trp.speedup(2), input_shape=(N, H, W))
    a, b = p.layers
    assert a.decomposed and b.decomposed
    assert a.rank < b.rank and a.energy > b.energy
    assert p.speedup >= 2 / 1.02


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_speedup_out_of_reach_raises(resnet20, scheme) -> None:
    """A target beyond what rank 1 everywhere achieves must be refused, saying how far it can go."""
    with pytest.raises(TRPError, match="out of reach"):
        trp.plan(resnet20, scheme, trp.speedup(1000), input_shape=RESNET_INPUT)
    model = copy.deepcopy(resnet20)
    snap = snapshot(model)
    with pytest.raises(TRPError, match="out of reach"):
        trp.decompose_(model, trp.speedup(1000), scheme=scheme, input_shape=RESNET_INPUT)
    assert_unchanged(model, snap)


# --------------------------------------------------------------------------------------------
# 3. Plans: JSON, apply_plan, table
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel_plan(resnet20) -> trp.Plan:
    return trp.plan(resnet20, ("channel", "linear"), trp.speedup(3), input_shape=RESNET_INPUT)


def test_plan_json_roundtrip(channel_plan, tmp_path) -> None:
    """A plan must survive to_json/from_json exactly, from a string and from a file."""
    text = channel_plan.to_json()
    assert trp.Plan.from_json(text) == channel_plan
    d = json.loads(text)
    assert d["format"] == "trp-plan/1" and d["macs_after"] == channel_plan.macs_after
    path = tmp_path / "plan.json"
    assert channel_plan.to_json(path) == text and path.read_text() == text
    assert trp.Plan.from_json(path) == channel_plan
    assert trp.Plan.from_json(str(path)) == channel_plan
    back = trp.Plan.from_json(text)
    assert back.macs_after == channel_plan.macs_after and back.speedup == channel_plan.speedup


def _plan_dict(plan: trp.Plan) -> dict:
    return json.loads(plan.to_json())


UNREADABLE, DAMAGED = "cannot read plan", "damaged trp plan: "
NOT_PLAN = r"not a trp plan \(missing format 'trp-plan/1'\)"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p, tmp: "not json at all", UNREADABLE),  # not JSON-looking: read as a path
        (lambda p, tmp: "{not json", DAMAGED),
        (lambda p, tmp: "[1, 2, 3]", UNREADABLE),
        (lambda p, tmp: "", UNREADABLE),
        (lambda p, tmp: "{}", NOT_PLAN),
        (lambda p, tmp: json.dumps({**_plan_dict(p), "format": "trp-plan/2"}), NOT_PLAN),
        (lambda p, tmp: json.dumps({k: v for k, v in _plan_dict(p).items() if k != "layers"}), DAMAGED),
        (lambda p, tmp: json.dumps({**_plan_dict(p), "layers": [{"bogus": 1}]}), DAMAGED),
        (lambda p, tmp: json.dumps({**_plan_dict(p), "layers": [1, 2]}), DAMAGED),
        (lambda p, tmp: json.dumps({**_plan_dict(p), "input_shape": 5}), DAMAGED),
        (lambda p, tmp: json.dumps({**_plan_dict(p), "macs_before": "many"}), DAMAGED),
        (lambda p, tmp: tmp / "missing.json", UNREADABLE + ".*No such file"),
        (lambda p, tmp: tmp, UNREADABLE + ".*Is a directory"),  # a directory
    ],
    ids=["text", "broken", "list", "empty", "empty-obj", "format", "no-layers", "bad-layer", "int-layers",
         "bad-shape", "bad-macs", "missing-file", "directory"],
)
def test_plan_from_json_garbage_raises(channel_plan, tmp_path, make, match) -> None:
    """Anything that is not a trp plan must be a one-line TRPError, never a KeyError/JSONDecodeError traceback."""
    with pytest.raises(TRPError, match=match) as info:
        trp.Plan.from_json(make(channel_plan, tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize(
    "field, bad", [("scheme", "bogus"), ("scheme", None), ("rank", None), ("rank", 0), ("rank", "4")],
)
def test_damaged_plan_layer_is_trperror(channel_plan, field, bad) -> None:
    """A plan whose decomposed layer has an unknown scheme or an invalid rank is damaged: TRPError, not a crash."""
    d = json.loads(channel_plan.to_json())
    i = next(i for i, lp in enumerate(d["layers"]) if lp["reason"] is None)
    d["layers"][i][field] = bad
    with pytest.raises(TRPError, match=rf"damaged trp plan: layer '{d['layers'][i]['name']}' has scheme"):
        trp.apply_plan(create("resnet20"), trp.Plan.from_json(json.dumps(d)))


@pytest.mark.parametrize("scheme", CONV_SCHEMES + [("spatial", "linear")], ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_apply_plan_then_load_state_dict_reproduces(resnet20, scheme) -> None:
    """A fresh model given the plan's structure and the decomposed state_dict must compute identical outputs."""
    model = copy.deepcopy(resnet20)
    p = trp.plan(model, scheme, trp.speedup(2.5), input_shape=RESNET_INPUT)
    trp.decompose_(model, p)
    fresh = create("resnet20")
    assert trp.apply_plan(fresh, trp.Plan.from_json(p.to_json())) is fresh
    fresh.load_state_dict(model.state_dict())  # strict: every key and shape matches
    fresh.eval()
    x = torch.randn(2, *RESNET_INPUT)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: create("vgg16"), "no layer 'conv1'"),
        (lambda: create("resnet20", in_channels=1), r"layer 'conv1' is Conv2d \[16, 1, 3, 3\].*expects Conv2d \[16, 3, 3, 3\]"),
        (lambda: create("resnet20", num_classes=7), r"layer 'fc' is Linear \[7, 64\]"),
    ],
    ids=["vgg16", "resnet20-gray", "resnet20-7-classes"],
)
def test_apply_plan_wrong_architecture_names_layer(resnet20, other, match) -> None:
    """A plan applied to a model it does not fit must name the offending layer and change nothing."""
    p = trp.plan(resnet20, ("channel", "linear"), trp.fixed(4), input_shape=RESNET_INPUT)
    model = other()
    snap = snapshot(model)
    with pytest.raises(TRPError, match=match):
        trp.apply_plan(model, p)
    with pytest.raises(TRPError, match=match):
        trp.decompose_(model, p)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_decompose_with_plan_applies_its_ranks(resnet20, scheme) -> None:
    """decompose_(model, plan) applies the plan's schemes and ranks to another model's weights;
    a filter or input shape next to a Plan is refused, since the plan fixes both."""
    p = trp.plan(resnet20, scheme, trp.speedup(3), input_shape=RESNET_INPUT)
    torch.manual_seed(1)
    other = create("resnet20")
    snap = snapshot(other)
    with pytest.raises(TRPError, match="a Plan already fixes the layers, schemes and input shape"):
        trp.decompose_(other, p, input_shape=RESNET_INPUT)
    with pytest.raises(TRPError, match="a Plan already fixes the layers, schemes and input shape"):
        trp.decompose_(other, p, lambda m, n: True)
    assert_unchanged(other, snap)
    trp.decompose_(other, p)
    for lp in p.layers:
        mod = get_module(other, lp.name)
        if lp.decomposed:
            assert isinstance(mod, nn.Sequential) and built_rank(mod, lp.scheme) == lp.rank
        else:
            assert type(mod).__name__ == lp.type
    assert trp.profile(other, RESNET_INPUT).macs == p.macs_after


def test_plan_table_mentions_every_layer(resnet20) -> None:
    """table() lists every counted layer and gives the reason for each one left dense."""
    model = copy.deepcopy(resnet20)
    p = trp.plan(model, "channel", trp.energy(1.0), filter_fn=lambda m, n: n != "layer2.0.conv2",
                 input_shape=RESNET_INPUT)
    table = p.table()
    lines = table.splitlines()
    assert len(lines) == len(p.layers) + 2
    for lp, line in zip(p.layers, lines[1:]):
        assert line.startswith(lp.name + " ")
        if not lp.decomposed:
            assert line.endswith(f"dense: {lp.reason}")
    assert "dense: excluded by filter_fn" in table and "dense: rank 16 does not lower" in table
    assert "energy:1" in lines[-1] and "(3, 32, 32)" in lines[-1]
    assert str(p) == table


def test_plan_does_not_change_model(resnet20) -> None:
    """plan only reads the model: modules, weights, BN statistics and the training flag are untouched."""
    model = copy.deepcopy(resnet20).train()
    snap = snapshot(model)
    trp.plan(model, "spatial", trp.speedup(2), input_shape=RESNET_INPUT)
    assert_unchanged(model, snap)
    assert model.training



# --------------------------------------------------------------------------------------------
# 4. Planning reads singular values only; costs without any SVD
# --------------------------------------------------------------------------------------------


def _count(monkeypatch, owner, attr: str, calls: list) -> None:
    """Wrap ``owner.attr`` so each call appends its first argument's shape to ``calls``."""
    real = getattr(owner, attr)

    def counting(matrix, *args, **kwargs):
        calls.append(tuple(matrix.shape))
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(owner, attr, counting)


@pytest.mark.parametrize("rank", [trp.speedup(3), trp.energy(0.9), trp.fixed(4)], ids=str)
@pytest.mark.parametrize("scheme", CONV_SCHEMES + [("channel", "linear")], ids=str)
def test_plan_takes_no_svd(resnet20, monkeypatch, scheme, rank) -> None:
    """plan() computes no singular vectors: one svdvals per candidate layer and no SVD at all."""
    svds, linalg_svds, svdvals = [], [], []
    _count(monkeypatch, svd_mod, "svd", svds)
    _count(monkeypatch, torch.linalg, "svd", linalg_svds)
    _count(monkeypatch, svd_mod, "svdvals", svdvals)
    p = trp.plan(resnet20, scheme, rank, input_shape=RESNET_INPUT)
    assert svds == [] and linalg_svds == []
    assert len(svdvals) == sum(lp.scheme is not None for lp in p.layers) > 0


@pytest.mark.parametrize("scheme", CONV_SCHEMES + [("spatial", "linear")], ids=str)
def test_rank_costs_match_the_plan_without_svd(resnet20, monkeypatch, scheme) -> None:
    """rank_costs gives the plan's MACs accounting (per-rank and dense MACs per layer) with no SVD of any kind."""

    def forbidden(*args, **kwargs):
        raise AssertionError("rank_costs must not take an SVD")

    p = trp.plan(resnet20, scheme, trp.fixed(4), lambda m, n: n != "layer2.1.conv1", RESNET_INPUT)
    for attr in ("svd", "svdvals"):
        monkeypatch.setattr(svd_mod, attr, forbidden)
        monkeypatch.setattr(torch.linalg, attr, forbidden)
    total, costs = rank_costs(resnet20, scheme, lambda m, n: n != "layer2.1.conv1", RESNET_INPUT)
    assert total == p.macs_before == RESNET20_MACS
    expected = {lp.name: (lp.macs_after // lp.rank, lp.macs_before) for lp in p.layers if lp.scheme is not None}
    assert costs == expected and "layer2.1.conv1" not in costs and len(costs) >= 18


def test_rank_costs_count_every_call() -> None:
    """A layer called twice pays its per-rank cost twice, as its dense MACs do."""
    lin = nn.Linear(16, 16)
    total, costs = rank_costs(nn.Sequential(lin, nn.ReLU(), lin), "linear", input_shape=(16,))
    assert total == 2 * 256 and costs == {"0": (2 * 32, 2 * 256)}


def test_plan_understands_batch_dimension(resnet20) -> None:
    """A (1, C, H, W) input shape, as fvcore/torchinfo users write it, plans exactly like (C, H, W)."""
    with_batch = trp.plan(resnet20, "channel", trp.fixed(4), input_shape=(1, *RESNET_INPUT))
    assert with_batch == trp.plan(resnet20, "channel", trp.fixed(4), input_shape=RESNET_INPUT)
    assert with_batch.input_shape == list(RESNET_INPUT)


def test_plan_with_per_layer_ranks(resnet20) -> None:
    """A {layer: rank} dict sets those layers' ranks (capped at full rank); layers not named are not lowered."""
    p = trp.plan(resnet20, "channel", {"layer1.0.conv1": 3, "layer3.2.conv2": 10_000}, input_shape=RESNET_INPUT)
    lps = {lp.name: lp for lp in p.layers}
    assert p.criterion == "per-layer ranks"
    assert lps["layer1.0.conv1"].decomposed and lps["layer1.0.conv1"].rank == 3
    big = lps["layer3.2.conv2"]
    assert big.rank == big.full_rank == 64 and not big.decomposed and "does not lower" in big.reason
    assert [lp.name for lp in p.layers if lp.decomposed] == ["layer1.0.conv1"]
    for bad, match in [({"layer1.0.conv1": 0}, r"rank of layer 'layer1.0.conv1' must be >= 1"),
                       ({"layer1.0.conv1": 2.5}, r"rank of layer 'layer1.0.conv1' must be a whole number"),
                       ({"layer1.0.conv1": True}, r"rank of layer 'layer1.0.conv1' must be a whole number")]:
        with pytest.raises(TRPError, match=match):
            trp.plan(resnet20, "channel", bad, input_shape=RESNET_INPUT)


# --------------------------------------------------------------------------------------------
# 5. Every weight is listed: functional use, attention, unused layers; auto schemes (issue #13)
# --------------------------------------------------------------------------------------------


class _Everything(nn.Module):
    """A conv, Linears called as modules, one used functionally, one never called, and an attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)
        self.side = nn.Linear(16, 16)
        self.spare = nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).flatten(2).transpose(1, 2)  # (B, 64, 16) tokens
        t = self.fc(t) + torch.nn.functional.linear(t, self.side.weight)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


def test_plan_lists_every_weight_with_its_reason() -> None:
    """A functional weight, an unused layer and a fused attention are listed dense with their reasons,
    never absent; the totals include the attention products, which the table names."""
    from trp.plan import FUNCTIONAL_REASON, MHA_REASON, UNUSED_REASON

    torch.manual_seed(0)
    model = _Everything().eval()
    shape = (3, 8, 8)
    p = trp.plan(model, "auto", trp.fixed(2), input_shape=shape)
    rows = {lp.name: lp for lp in p.layers}
    assert set(rows) == {"conv", "fc", "side", "spare", "attn", "attn.out_proj", "head"}
    assert rows["side"].reason == FUNCTIONAL_REASON and rows["side"].macs_before == 64 * 16 * 16
    assert rows["spare"].reason == UNUSED_REASON and rows["spare"].macs_before == 0
    assert rows["attn"].reason == rows["attn.out_proj"].reason == MHA_REASON
    assert {n for n, lp in rows.items() if lp.decomposed} == {"conv", "fc", "head"}
    assert (rows["conv"].scheme, rows["fc"].scheme) == ("channel", "linear")
    assert p.macs_before == trp.profile(model, shape).macs
    assert rows["attn"].macs_before == 3 * 64 * 16 * 16 + 2 * 64 * 64 * 16  # q/k/v projections, QKᵀ and AV
    assert p.product_macs == 0  # a fused attention's products are in its own row
    trp.decompose_(model, p)
    assert model.side.weight.shape == (16, 16) and isinstance(model.fc, nn.Sequential)
    assert trp.profile(model, shape).macs == p.macs_after
    from trp.attention import unfuse_attention_

    unfuse_attention_(model)
    p = trp.plan(model, "auto", trp.fixed(2), input_shape=shape)
    assert p.product_macs == 2 * 64 * 64 * 16  # now computed by the unfused module's SDPA call
    assert "activation products such as attention scores: 131,072 MACs" in p.table()
    projections = {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"}
    assert {lp.name for lp in p.layers if lp.decomposed} >= projections


def test_low_rank_layers_match_decompose(resnet20) -> None:
    """low_rank_layers builds what decompose_ puts in (same ranks and products), leaving the model unchanged."""
    from trp.plan import low_rank_layers

    model = copy.deepcopy(resnet20)
    snap = snapshot(model)
    p = trp.plan(model, ("channel", "linear"), trp.speedup(2.0), input_shape=RESNET_INPUT)
    new = low_rank_layers(model, p)
    assert_unchanged(model, snap)
    assert set(new) == {lp.name for lp in p.layers if lp.decomposed}
    reference = trp.decompose_(copy.deepcopy(resnet20), p)
    for name, low in new.items():
        sch = schemes.get(p.layers[[lp.name for lp in p.layers].index(name)].scheme)
        assert torch.allclose(sch.compose(low), sch.compose(get_module(reference, name)), atol=1e-5)


def test_plan_auto_on_a_big_linear_factorizes_once_without_full_svd(monkeypatch) -> None:
    """A 1024-wide Linear at a low planned rank is planned from the Gram spectrum and factorized by the checked
    randomized route: neither LAPACK's svdvals nor the full SVD runs."""
    from trp.plan import low_rank_layers

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(1024, 768)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(768, 16, generator=g) @ torch.randn(16, 1024, generator=g) / 32)
    model = nn.Sequential(lin)
    monkeypatch.setattr(torch.linalg, "svdvals", lambda *a, **k: pytest.fail("LAPACK svdvals was called"))
    monkeypatch.setattr(svd_mod, "svd", lambda *a, **k: pytest.fail("the full SVD was taken"))
    p = trp.plan(model, "auto", trp.energy(0.999), input_shape=(1024,))
    (lp,) = p.layers
    assert lp.scheme == "linear" and lp.rank == 16
    low = low_rank_layers(model, p)["0"]
    x = torch.randn(4, 1024, generator=g)
    with torch.no_grad():
        assert torch.allclose(low(x), lin(x), atol=1e-4)
