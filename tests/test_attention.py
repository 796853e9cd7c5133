"""Tests for trp.attention: the unfused drop-in for nn.MultiheadAttention, and unfuse_attention_."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import trp
from trp.attention import UnfusedMultiheadAttention, unfuse_attention_
from trp.errors import TRPError
from trp.plan import MHA_REASON
from trp.surgery import get_module, replace_modules

pytestmark = pytest.mark.usefixtures("one_thread")

E, HEADS, L, S, N = 8, 2, 4, 5, 3

# Options of nn.MultiheadAttention and of its call; each is run batch_first both ways, with and
# without need_weights, in eval mode with autograd on and off (off takes torch's fused fast path
# where it can), and compared with the original.
CASES = [
    pytest.param({}, {}, id="plain"),
    pytest.param({}, {"attn_mask": "bool"}, id="bool-mask"),
    pytest.param({}, {"attn_mask": "float"}, id="float-mask"),
    pytest.param({}, {"attn_mask": "3d"}, id="3d-mask"),
    pytest.param({}, {"key_padding_mask": True}, id="padding"),
    pytest.param({}, {"attn_mask": "bool", "key_padding_mask": True}, id="both-masks"),
    pytest.param({}, {"attn_mask": "causal", "is_causal": True}, id="causal"),
    pytest.param({}, {"average_attn_weights": False}, id="per-head-weights"),
    pytest.param({"kdim": 6, "vdim": 3}, {"attn_mask": "bool"}, id="kdim-vdim"),
    pytest.param({"add_bias_kv": True, "add_zero_attn": True}, {"key_padding_mask": True}, id="bias-kv-zero-attn"),
    pytest.param({"bias": False}, {}, id="no-bias"),
    pytest.param({}, {"unbatched": True, "attn_mask": "bool"}, id="unbatched"),
    pytest.param({}, {"self": True, "key_padding_mask": True}, id="self-attention"),
]


def _inputs(opts: dict, call: dict, batch_first: bool) -> tuple[tuple, dict]:
    """query/key/value and keyword arguments for one case (masks leave every query a visible key)."""
    g = torch.Generator().manual_seed(1)
    kdim, vdim = opts.get("kdim", E), opts.get("vdim", E)
    unbatched = call.get("unbatched", False)

    def seq(length: int, width: int) -> torch.Tensor:
        if unbatched:
            return torch.randn(length, width, generator=g)
        shape = (N, length, width) if batch_first else (length, N, width)
        return torch.randn(*shape, generator=g)

    if call.get("self"):
        q = seq(S, E)
        args, tgt = (q, q, q), S
    else:
        args, tgt = (seq(L, E), seq(S, kdim), seq(S, vdim)), L
    kwargs = {k: v for k, v in call.items() if k in ("is_causal", "average_attn_weights")}
    kind = call.get("attn_mask")
    if kind == "bool":
        mask = torch.rand(tgt, S, generator=g) > 0.6
        mask[:, 0] = False
        kwargs["attn_mask"] = mask
    elif kind == "float":
        kwargs["attn_mask"] = torch.randn(tgt, S, generator=g)
    elif kind == "3d":
        kwargs["attn_mask"] = torch.randn(N * HEADS, tgt, S, generator=g)
    elif kind == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(S)[:tgt]
    if call.get("key_padding_mask"):
        kpm = torch.rand(N, S, generator=g) > 0.6
        kpm[:, 0] = False
        kwargs["key_padding_mask"] = kpm
    return args, kwargs


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("opts, call", CASES)
def test_unfused_matches_fused(opts, call, batch_first, need_weights, grad) -> None:
    """At full rank the unfused module computes nn.MultiheadAttention's output and weights to 1e-5."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **opts).eval()
    flat = UnfusedMultiheadAttention.from_fused(mha)
    args, kwargs = _inputs(opts, call, batch_first)
    with torch.set_grad_enabled(grad):
        want, want_w = mha(*args, need_weights=need_weights, **kwargs)
        got, got_w = flat(*args, need_weights=need_weights, **kwargs)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert (got - want).abs().max() < 1e-5
    if need_weights:
        assert got_w.shape == want_w.shape and (got_w - want_w).abs().max() < 1e-5
    else:
        assert got_w is None and want_w is None


def test_unfused_is_four_stock_linears_with_the_weights() -> None:
    """q/k/v/out_proj are plain nn.Linear holding the packed in-projection's rows and out_proj's weights."""
    mha = nn.MultiheadAttention(E, HEADS, kdim=6, vdim=3)
    flat = UnfusedMultiheadAttention.from_fused(mha)
    for lin in (flat.q_proj, flat.k_proj, flat.v_proj, flat.out_proj):
        assert type(lin) is nn.Linear
    assert (flat.k_proj.in_features, flat.v_proj.in_features) == (6, 3)
    assert torch.equal(flat.q_proj.weight, mha.q_proj_weight) and torch.equal(flat.v_proj.weight, mha.v_proj_weight)
    assert torch.equal(flat.k_proj.bias, mha.in_proj_bias[E:2 * E])
    assert torch.equal(flat.out_proj.weight, mha.out_proj.weight)
    packed = nn.MultiheadAttention(E, HEADS)
    flat = UnfusedMultiheadAttention.from_fused(packed)
    assert torch.equal(torch.cat([flat.q_proj.weight, flat.k_proj.weight, flat.v_proj.weight]), packed.in_proj_weight)


def test_unfused_trains_and_applies_dropout() -> None:
    """In training mode attention dropout applies (outputs differ run to run) and gradients reach every projection."""
    torch.manual_seed(0)
    flat = UnfusedMultiheadAttention(E, HEADS, dropout=0.5, batch_first=True).train()
    x = torch.randn(N, L, E)
    first, _ = flat(x, x, x)
    second, _ = flat(x, x, x)
    assert not torch.equal(first, second)
    first.sum().backward()
    assert all(lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
               for lin in (flat.q_proj, flat.k_proj, flat.v_proj, flat.out_proj))


def test_causal_hint_needs_a_mask_like_torch() -> None:
    """is_causal without attn_mask is refused exactly as nn.MultiheadAttention refuses it."""
    x = torch.randn(L, N, E)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        nn.MultiheadAttention(E, HEADS)(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        UnfusedMultiheadAttention(E, HEADS)(x, x, x, is_causal=True)


class _Encoder(nn.Module):
    """A tiny pre-norm encoder block with one attention module registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.alias = self.attn  # the same module reachable by a second name
        self.norm = nn.LayerNorm(E)
        self.fc = nn.Linear(E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(x)
        x = x + self.alias(h, h, h, need_weights=False)[0]
        return self.fc(x)


def test_unfuse_attention_replaces_every_alias_and_keeps_the_output() -> None:
    """unfuse_attention_ swaps the module under both names (sharing kept) and the model computes the same."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    x = torch.randn(2, L, E)
    with torch.no_grad():
        before = model(x)
    assert unfuse_attention_(model) == ["attn"]
    assert isinstance(model.attn, UnfusedMultiheadAttention) and model.alias is model.attn
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-5
    assert unfuse_attention_(model) == []  # nothing left to unfuse
    keys = set(model.state_dict())
    assert "attn.q_proj.weight" in keys and not any("in_proj" in k for k in keys)


def test_unfuse_attention_by_name_and_errors() -> None:
    """names= picks the modules; a name that is no nn.MultiheadAttention is a TRPError naming it."""
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS), nn.MultiheadAttention(E, HEADS))
    assert unfuse_attention_(model, ["1"]) == ["1"]
    assert type(model[0]) is nn.MultiheadAttention and isinstance(model[1], UnfusedMultiheadAttention)
    assert unfuse_attention_(model, ["1"]) == []  # already unfused: a replay does nothing
    with pytest.raises(TRPError, match="no nn.MultiheadAttention named '0.out_proj'"):
        unfuse_attention_(model, ["0.out_proj"])
    with pytest.raises(TRPError, match="no nn.MultiheadAttention named 'nope'"):
        unfuse_attention_(model, ["nope"])


def test_unfuse_attention_on_meta_device_gives_the_structure() -> None:
    """On the meta device (how a saved model's structure is rebuilt) unfusing needs only shapes."""
    with torch.device("meta"):
        model = _Encoder()
    unfuse_attention_(model)
    real = _Encoder()
    unfuse_attention_(real)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert model.attn.q_proj.weight.is_meta


def test_plan_lists_fused_attention_and_decomposes_unfused() -> None:
    """Fused, the plan lists the attention and its out_proj as dense with the reason; unfused, it sees four
    Linears and decomposes them, and profile's MACs are the same both ways."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    shape = (L, E)
    p = trp.plan(model, "linear", trp.fixed(2), input_shape=shape)
    rows = {lp.name: lp for lp in p.layers}
    assert rows["attn"].reason == MHA_REASON and rows["attn"].type == "MultiheadAttention"
    assert rows["attn.out_proj"].reason == MHA_REASON
    assert rows["fc"].decomposed
    fused_macs = trp.profile(model, shape).macs
    assert p.macs_before == fused_macs
    unfuse_attention_(model)
    assert trp.profile(model, shape).macs == fused_macs
    p = trp.plan(model, "linear", trp.fixed(2), input_shape=shape)
    assert {lp.name for lp in p.layers if lp.decomposed} == {"attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                             "attn.out_proj", "fc"}
    x = torch.randn(2, *shape)
    with torch.no_grad():
        before = model(x)
    full = copy.deepcopy(model)
    replace_modules(full, {lp.name: trp.decompose_layer(get_module(full, lp.name), "linear")
                           for lp in p.layers if lp.decomposed})
    assert isinstance(full.attn.k_proj, nn.Sequential)
    with torch.no_grad():
        assert (full(x) - before).abs().max() < 1e-5  # each projection at full rank: exact
    trp.decompose_(model, p)
    assert isinstance(model.attn.q_proj, nn.Sequential) and model.alias is model.attn
    with torch.no_grad():
        assert model(x).shape == before.shape


def test_load_into_an_instance_that_is_already_unfused(tmp_path) -> None:
    """trp.load(folder, model=instance) accepts an instance the user unfused before, as well as a fused one."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    unfuse_attention_(model)
    trp.save(model, tmp_path / "m", input_shape=(L, E))
    x = torch.randn(2, L, E)
    fused, unfused = _Encoder(), _Encoder()
    unfuse_attention_(unfused)
    for instance in (fused, unfused):
        loaded = trp.load(tmp_path / "m", model=instance).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
