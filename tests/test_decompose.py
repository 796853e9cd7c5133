"""Tests for trp.decompose: exact layer decomposition, planning, the speed-up budget, plans and rollback."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn

import trp
import trp.decompose as dec
from trp import svd as svd_mod
from trp.errors import TRPError
from trp.models import create

pytestmark = pytest.mark.usefixtures("one_thread")

C, N, H, W = 6, 8, 11, 13
CONV_SCHEMES = ["channel", "spatial", "decouple"]
KERNELS = [(3, 3), (5, 5), (1, 3)]
STRIDES = [1, 2, (2, 1)]
PADDINGS = [0, 1, (2, 0), "same"]
DILATIONS = [1, 2]
RESNET_INPUT = (3, 32, 32)
RESNET20_MACS = 40_551_040


def _geometries() -> list:
    """Every valid kernel × stride × padding × dilation combination for a C×11×13 input.

    PyTorch allows padding='same' only with stride 1, so those combinations are not generated; the
    largest dilated kernel (5×5, dilation 2, extent 9) and padding (4 for 'same') fit the input,
    which reflect padding requires.
    """
    out = []
    for kernel, stride, padding, dilation in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS):
        if padding == "same" and stride != 1:
            continue
        ident = f"k{kernel[0]}x{kernel[1]}-s{stride}-p{padding}-d{dilation}".replace(" ", "")
        out.append(pytest.param(kernel, stride, padding, dilation, id=ident))
    return out


GEOMETRIES = _geometries()


def _assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4, what: str = "") -> None:
    """max |out − ref| <= rel · max(1, max |ref|)."""
    out, ref = out.detach(), ref.detach()
    assert out.shape == ref.shape, what
    err = float((out - ref).abs().max())
    assert err <= rel * max(1.0, float(ref.abs().max())), f"{what} max abs error {err:.3g}"


def _conv(kernel, stride=1, padding=0, dilation=1, bias=True, padding_mode="zeros", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(C, N, kernel, stride, padding, dilation, bias=bias, padding_mode=padding_mode, dtype=dtype)
    if bias:
        with torch.no_grad():
            conv.bias.normal_()  # the default init is tiny; make a dropped bias visible
    return conv


def _compose(low: nn.Sequential, scheme: str, shape: torch.Size) -> torch.Tensor:
    """The dense kernel the two built layers compute, read back from their weights."""
    a, b = low[0].weight.detach(), low[1].weight.detach()
    if scheme == "linear":
        return b @ a
    n, c, kh, kw = shape
    if scheme == "channel":
        return torch.einsum("nk,kcyx->ncyx", b[:, :, 0, 0], a)
    if scheme == "spatial":
        return torch.einsum("kcy,nkx->ncyx", a[:, :, :, 0], b[:, :, 0, :])
    k = a.shape[0] // n
    return torch.einsum("nkc,nkyx->ncyx", a[:, :, 0, 0].reshape(n, k, c), b)


def _built_rank(low: nn.Sequential, scheme: str) -> int:
    if scheme == "linear":
        return low[0].out_features
    if scheme == "decouple":
        return low[0].out_channels // low[1].out_channels
    return low[0].out_channels


def _snapshot(model: nn.Module) -> tuple[dict, dict]:
    return dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snap: tuple[dict, dict]) -> None:
    modules, state = snap
    now = dict(model.named_modules())
    assert now.keys() == modules.keys()
    assert all(now[name] is mod for name, mod in modules.items())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def _low_rank_weights_(model: nn.Module, layout: str, decay: float | None = None, rank: int | None = None) -> nn.Module:
    """Give every Conv2d a prescribed spectrum in ``layout``: geometric decay and/or exact low rank."""
    with torch.no_grad():
        for m in model.modules():
            if type(m) is nn.Conv2d:
                u, s, vh = svd_mod.svd(svd_mod.to_matrix(m.weight, layout))
                if decay is not None:
                    s = s[..., :1] * decay ** torch.arange(s.shape[-1], dtype=s.dtype)
                if rank is not None:
                    s = torch.where(torch.arange(s.shape[-1]) < rank, s, torch.zeros_like(s))
                m.weight.copy_(svd_mod.from_matrix((u * s[..., None, :]) @ vh, layout, m.weight.shape))
    return model


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    """One seeded ResNet-20 in eval mode; tests that change it work on a deep copy."""
    torch.manual_seed(0)
    return create("resnet20").eval()


# --------------------------------------------------------------------------------------------
# 1. Exactness at full rank
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("kernel, stride, padding, dilation", GEOMETRIES)
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_full_rank_is_exact(scheme, kernel, stride, padding, dilation, padding_mode) -> None:
    """At full rank every scheme must reproduce the dense conv for every stride/padding/dilation/mode, bias or not."""
    x = torch.randn(2, C, H, W)
    for bias in (True, False):  # both in one case to keep the product at a few hundred cases
        conv = _conv(kernel, stride, padding, dilation, bias, padding_mode)
        low = trp.decompose_layer(conv, scheme)
        with torch.no_grad():
            _assert_close(low(x), conv(x), what=f"bias={bias}")


@pytest.mark.parametrize("padding_mode", ["replicate", "circular"])
@pytest.mark.parametrize("kernel, stride, padding", [((3, 3), 1, 1), ((5, 5), (2, 1), (2, 1)), ((1, 3), 2, 1)])
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_full_rank_is_exact_other_padding_modes(scheme, kernel, stride, padding, padding_mode) -> None:
    """replicate and circular padding are also per-dimension, so the split layers must stay exact."""
    conv = _conv(kernel, stride, padding, 1, True, padding_mode)
    x = torch.randn(2, C, H, W)
    with torch.no_grad():
        _assert_close(trp.decompose_layer(conv, scheme)(x), conv(x))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("kernel, padding, dilation", [((2, 2), "same", 1), ((2, 4), "same", 2), ((4, 3), (1, 2), 1)])
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_full_rank_is_exact_even_kernels(scheme, kernel, padding, dilation, padding_mode) -> None:
    """Even kernels make 'same' padding asymmetric; splitting it per dimension must stay exact."""
    conv = _conv(kernel, 1, padding, dilation, True, padding_mode)
    x = torch.randn(2, C, H, W)
    with torch.no_grad():
        _assert_close(trp.decompose_layer(conv, scheme)(x), conv(x))


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [((3, 3), 1, 1, 1), ((5, 5), 2, (2, 0), 2), ((1, 3), (2, 1), 0, 1), ((3, 3), 1, "same", 2)],
    ids=["3x3", "5x5-s2-d2", "1x3-s21", "same-d2"],
)
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_full_rank_is_exact_channels_last(scheme, kernel, stride, padding, dilation) -> None:
    """A channels-last input (and a channels-last source layer) must give the same result as NCHW."""
    conv = _conv(kernel, stride, padding, dilation).to(memory_format=torch.channels_last)
    x = torch.randn(2, C, H, W)
    low = trp.decompose_layer(conv, scheme).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = conv(x)
        _assert_close(low(x.contiguous(memory_format=torch.channels_last)), ref)
        _assert_close(trp.decompose_layer(conv, scheme)(x.contiguous(memory_format=torch.channels_last)), ref)


@pytest.mark.parametrize("kernel, stride, padding, dilation", GEOMETRIES[::5])
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_full_rank_is_exact_float64(scheme, kernel, stride, padding, dilation) -> None:
    """In float64 the full-rank form must match to ~1e-10, so the float32 tolerance hides no real error."""
    conv = _conv(kernel, stride, padding, dilation, dtype=torch.float64, padding_mode="reflect")
    x = torch.randn(2, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        _assert_close(trp.decompose_layer(conv, scheme)(x), conv(x), rel=1e-10)


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("in_f, out_f", [(12, 8), (8, 12), (7, 7)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_full_rank_is_exact(bias, in_f, out_f, lead) -> None:
    """A Linear layer decomposed at full rank must match on 2-D and on (B, T, in) inputs, bias or not."""
    torch.manual_seed(0)
    fc = nn.Linear(in_f, out_f, bias=bias)
    x = torch.randn(*lead, in_f)
    low = trp.decompose_layer(fc, "linear")
    with torch.no_grad():
        _assert_close(low(x), fc(x))


# --------------------------------------------------------------------------------------------
# 2. Reduced rank is the Eckart–Young optimum of the scheme's matrix
# --------------------------------------------------------------------------------------------

REDUCED_GEOMS = [
    pytest.param(dict(kernel_size=3, padding=1), id="3x3"),
    pytest.param(dict(kernel_size=5, stride=2, padding=(2, 0), dilation=2, padding_mode="reflect"), id="5x5-reflect"),
    pytest.param(dict(kernel_size=(1, 3), stride=(2, 1), padding=1), id="1x3"),
]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("geom", REDUCED_GEOMS)
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_reduced_rank_is_eckart_young(scheme, geom, k) -> None:
    """The built rank-k layers must compute W_k with ‖W − W_k‖_F = sqrt(Σ_{i>k} σ_i²) of the scheme's matrix."""
    torch.manual_seed(k)
    conv = nn.Conv2d(C, N, dtype=torch.float64, **geom)
    w = conv.weight.detach()
    low = trp.decompose_layer(conv, scheme, k)
    sv = torch.linalg.svdvals(svd_mod.to_matrix(w, scheme))  # independent of trp.svd
    full = sv.shape[-1]
    assert _built_rank(low, scheme) == min(k, full)
    wk = _compose(low, scheme, w.shape)
    tail = float(sv[..., k:].pow(2).sum().sqrt())  # for decouple: the sum of every filter's tail
    assert float(torch.linalg.norm(w - wk)) == pytest.approx(tail, rel=1e-8, abs=1e-12)
    assert int(torch.linalg.matrix_rank(svd_mod.to_matrix(wk, scheme)).max()) <= k
    # The same kernel as svd.truncate + from_matrix, and the module really computes it.
    u, s, vh = svd_mod.svd(svd_mod.to_matrix(w, scheme))
    assert torch.allclose(wk, svd_mod.from_matrix(svd_mod.truncate(u, s, vh, k), scheme, w.shape), atol=1e-12)
    dense_k = copy.deepcopy(conv)
    with torch.no_grad():
        dense_k.weight.copy_(wk)
        x = torch.randn(2, C, H, W, dtype=torch.float64)
        _assert_close(low(x), dense_k(x), rel=1e-10)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_linear_reduced_rank_is_eckart_young(k) -> None:
    """A rank-k Linear must be the best rank-k approximation of its weight."""
    torch.manual_seed(k)
    fc = nn.Linear(12, 9, dtype=torch.float64)
    low = trp.decompose_layer(fc, "linear", k)
    wk = _compose(low, "linear", fc.weight.shape)
    sv = torch.linalg.svdvals(fc.weight.detach())
    assert float(torch.linalg.norm(fc.weight.detach() - wk)) == pytest.approx(float(sv[k:].norm()), rel=1e-8)
    assert int(torch.linalg.matrix_rank(wk)) == k
    x = torch.randn(4, 3, 12, dtype=torch.float64)
    _assert_close(low(x), nn.functional.linear(x, wk, fc.bias), rel=1e-10)


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_decompose_layer_accepts_criteria(scheme) -> None:
    """decompose_layer resolves a per-layer criterion on the layer's spectrum; a global budget is refused."""
    conv = _conv((3, 3), padding=1, dtype=torch.float64)
    s = svd_mod.spectrum(svd_mod.svd(svd_mod.to_matrix(conv.weight.detach(), scheme))[1])
    for crit in (trp.energy(0.8), trp.fraction(0.5), trp.value(float(s[1])), trp.fixed(100)):
        assert _built_rank(trp.decompose_layer(conv, scheme, crit), scheme) == crit.select(s)
    with pytest.raises(TRPError, match="whole model"):
        trp.decompose_layer(conv, scheme, trp.speedup(2))


# --------------------------------------------------------------------------------------------
# 3. The built layers are stock layers carrying the source's attributes, device and dtype
# --------------------------------------------------------------------------------------------

STRUCT_GEOMS = [
    pytest.param((3, 3), 1, 1, 1, "zeros", id="3x3"),
    pytest.param((5, 3), (2, 1), (2, 1), (2, 1), "reflect", id="5x3-asym-reflect"),
    pytest.param((3, 5), 1, "same", 2, "zeros", id="same"),
    pytest.param((3, 3), 2, "valid", 1, "zeros", id="valid"),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kernel, stride, padding, dilation, mode", STRUCT_GEOMS)
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_built_layers_are_stock_and_carry_attributes(scheme, kernel, stride, padding, dilation, mode, bias, dtype) -> None:
    """Decomposed layers are plain nn.Conv2d in an nn.Sequential with the source's geometry, device, dtype."""
    conv = _conv(kernel, stride, padding, dilation, bias, mode, dtype=dtype)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    low = trp.decompose_layer(conv, scheme, 2)
    assert type(low) is nn.Sequential and len(low) == 2
    first, second = low
    assert type(first) is nn.Conv2d and type(second) is nn.Conv2d
    for p in low.parameters():
        assert p.dtype == dtype and p.device == conv.weight.device and p.requires_grad and p.is_leaf
    (kh, kw), (sh, sw), (dh, dw) = kernel, _pair(stride), _pair(dilation)
    pad = padding if isinstance(padding, str) else _pair(padding)
    if scheme == "channel":
        assert (first.in_channels, first.out_channels, first.kernel_size) == (C, 2, (kh, kw))
        assert (first.stride, first.padding, first.dilation, first.padding_mode) == ((sh, sw), pad, (dh, dw), mode)
        assert (second.in_channels, second.out_channels, second.kernel_size) == (2, N, (1, 1))
        assert (second.stride, second.padding, second.dilation, second.groups) == ((1, 1), (0, 0), (1, 1), 1)
    elif scheme == "spatial":
        vpad, hpad = (pad, pad) if isinstance(pad, str) else ((pad[0], 0), (0, pad[1]))
        assert (first.in_channels, first.out_channels, first.kernel_size) == (C, 2, (kh, 1))
        assert (first.stride, first.padding, first.dilation, first.padding_mode) == ((sh, 1), vpad, (dh, 1), mode)
        assert (second.in_channels, second.out_channels, second.kernel_size) == (2, N, (1, kw))
        assert (second.stride, second.padding, second.dilation, second.padding_mode) == ((1, sw), hpad, (1, dw), mode)
    else:
        assert (first.in_channels, first.out_channels, first.kernel_size, first.groups) == (C, 2 * N, (1, 1), 1)
        assert (second.in_channels, second.out_channels, second.kernel_size, second.groups) == (2 * N, N, (kh, kw), N)
        assert (second.stride, second.padding, second.dilation, second.padding_mode) == ((sh, sw), pad, (dh, dw), mode)
    assert first.bias is None
    assert (second.bias is not None) == bias
    if bias:
        assert torch.equal(second.bias, conv.bias)
        assert second.bias.data_ptr() != conv.bias.data_ptr()  # a new parameter, not an alias
    after = conv.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the source layer is untouched
    x = torch.randn(1, C, H, W, dtype=dtype)
    with torch.no_grad():
        assert low(x).shape == conv(x).shape and low(x).dtype == dtype
    if dtype == torch.float16:  # AMP weights: factored in float32, stored back in half
        wk = _compose(low.float(), scheme, conv.weight.shape)
        best = svd_mod.truncate(*svd_mod.svd(svd_mod.to_matrix(conv.weight.detach().float(), scheme)), 2)
        assert torch.allclose(svd_mod.to_matrix(wk, scheme), best, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_built_linear_is_stock(bias, dtype) -> None:
    """The linear scheme builds Linear(in→k, no bias) then Linear(k→out, bias) in the source's dtype."""
    fc = nn.Linear(12, 9, bias=bias, dtype=dtype)
    low = trp.decompose_layer(fc, "linear", 3)
    assert type(low) is nn.Sequential and [type(m) for m in low] == [nn.Linear, nn.Linear]
    assert (low[0].in_features, low[0].out_features, low[0].bias) == (12, 3, None)
    assert (low[1].in_features, low[1].out_features, low[1].bias is not None) == (3, 9, bias)
    assert all(p.dtype == dtype for p in low.parameters())


def test_decomposed_model_keeps_float64(resnet20) -> None:
    """decompose_ on a float64 model builds float64 layers that run on float64 input."""
    model = copy.deepcopy(resnet20).double()
    trp.decompose_(model, "channel", trp.fixed(4), input_shape=RESNET_INPUT)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randn(1, *RESNET_INPUT, dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------------------------
# 4. Unsupported layers stay dense with a reason
# --------------------------------------------------------------------------------------------


class _SubConv(nn.Conv2d):
    """A Conv2d subclass that may override forward: it must not be treated as a stock conv."""


class _Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, N, 3, padding=1)
        self.grouped = nn.Conv2d(N, N, 3, padding=1, groups=2)
        self.sub = _SubConv(N, N, 3, padding=1)
        self.tconv = nn.ConvTranspose2d(N, C, 3, stride=2)
        self.c1 = nn.Conv1d(C, C, 3)
        self.c3 = nn.Conv3d(1, 2, 3)
        self.fc = nn.Linear(C, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tconv(self.sub(self.grouped(self.conv(x))))
        y = self.c1(x.flatten(2))
        z = self.c3(x[:, None])
        return self.fc(y.mean(-1)) + z.mean()


ZOO_REASONS = {
    "grouped": "groups=2",
    "sub": "_SubConv is not handled",
    "tconv": "ConvTranspose2d is not handled",
    "c1": "Conv1d is not handled",
    "c3": "Conv3d is not handled",
}


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_unsupported_layers_stay_dense(scheme) -> None:
    """Grouped/transposed/1-D/3-D convs, Conv2d subclasses and Linear under a conv scheme are left dense with a reason."""
    torch.manual_seed(0)
    model = _Zoo().eval()
    x = torch.randn(2, C, H, W)
    with torch.no_grad():
        ref = model(x)
    p = trp.plan(model, scheme, trp.fixed(1), input_shape=(C, H, W))
    lps = {lp.name: lp for lp in p.layers}
    assert set(lps) == {"conv", "grouped", "sub", "tconv", "c1", "c3", "fc"}
    assert lps["conv"].decomposed and lps["conv"].scheme == scheme
    for name, why in ZOO_REASONS.items():
        assert not lps[name].decomposed and why in lps[name].reason and lps[name].scheme is None
    assert "Linear is not handled" in lps["fc"].reason and "use scheme 'linear'" in lps["fc"].reason
    kept = {name: dec.get_module(model, name) for name in list(ZOO_REASONS) + ["fc"]}
    assert trp.decompose_(model, scheme, trp.fixed(1), input_shape=(C, H, W)) is model
    assert isinstance(model.conv, nn.Sequential)
    assert all(dec.get_module(model, name) is mod for name, mod in kept.items())
    with torch.no_grad():
        assert model(x).shape == ref.shape


def test_scheme_tuple_handles_convs_and_linears() -> None:
    """Several schemes are tried in order per layer: ("channel", "linear") decomposes both convs and Linears."""
    torch.manual_seed(0)
    model = _Zoo().eval()
    p = trp.plan(model, ("channel", "linear"), trp.fixed(1), input_shape=(C, H, W))
    lps = {lp.name: lp for lp in p.layers}
    assert lps["conv"].scheme == "channel" and lps["fc"].scheme == "linear"
    assert lps["conv"].decomposed and lps["fc"].decomposed
    assert "no scheme of [channel, linear] applies" in lps["tconv"].reason
    trp.decompose_(model, ("channel", "linear"), trp.fixed(1), input_shape=(C, H, W))
    assert [type(m) for m in model.fc] == [nn.Linear, nn.Linear]
    assert [type(m) for m in model.conv] == [nn.Conv2d, nn.Conv2d]


def test_scheme_tuple_on_resnet20(resnet20) -> None:
    """On ResNet-20, ("channel", "linear") must decompose every conv and the classifier."""
    model = copy.deepcopy(resnet20)
    p = trp.plan(model, ("channel", "linear"), trp.fixed(4), input_shape=RESNET_INPUT)
    assert all(lp.decomposed for lp in p.layers) and len(p.layers) == 20
    assert {lp.scheme for lp in p.layers} == {"channel", "linear"}
    trp.decompose_(model, ("channel", "linear"), plan=p)
    assert isinstance(model.fc, nn.Sequential) and isinstance(model.fc[0], nn.Linear)
    prof = trp.profile(model, RESNET_INPUT)
    assert prof.macs == p.macs_after and prof.params == p.params_after


@pytest.mark.parametrize(
    "module, scheme, match",
    [
        (nn.Conv2d(8, 8, 3, groups=2), "channel", "groups=2"),
        (nn.Conv2d(8, 8, 3, groups=8), "decouple", "groups=8"),
        (nn.ConvTranspose2d(8, 8, 3), "channel", "ConvTranspose2d"),
        (nn.Conv1d(8, 8, 3), "spatial", "Conv1d"),
        (nn.Conv3d(8, 8, 3), "decouple", "Conv3d"),
        (nn.Linear(8, 8), "channel", "use scheme 'linear'"),
        (nn.Conv2d(8, 8, 3), "linear", "Conv2d is not handled by scheme 'linear'"),
        (nn.BatchNorm2d(8), "channel", "BatchNorm2d"),
        (_SubConv(8, 8, 3), "channel", "_SubConv"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_decompose_layer_unsupported_raises(module, scheme, match) -> None:
    """decompose_layer must refuse a layer its scheme cannot represent exactly, with the reason."""
    with pytest.raises(TRPError, match=match):
        trp.decompose_layer(module, scheme)


@pytest.mark.parametrize("scheme", ["bogus", "Channel", (), ["channel", "bogus"]])
def test_unknown_scheme_raises(resnet20, scheme) -> None:
    """An unknown (or empty) scheme is a TRPError everywhere, and decompose_ leaves the model untouched."""
    model = copy.deepcopy(resnet20)
    snap = _snapshot(model)
    with pytest.raises(TRPError):
        trp.plan(model, scheme, input_shape=RESNET_INPUT)
    with pytest.raises(TRPError):
        trp.decompose_(model, scheme, input_shape=RESNET_INPUT)
    if isinstance(scheme, str):
        with pytest.raises(TRPError, match="unknown scheme"):
            trp.decompose_layer(nn.Conv2d(3, 4, 3), scheme)
    _assert_unchanged(model, snap)


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
    trp.decompose_(model, "channel", trp.fraction(1.0), input_shape=(C, H, W))
    assert model[0] is conv


def test_rank_that_does_not_lower_macs_stays_dense_resnet_stem(resnet20) -> None:
    """ResNet-20's 3-channel stem at energy 1.0 would cost more decomposed, so it stays dense."""
    model = copy.deepcopy(resnet20)
    p = trp.plan(model, "channel", trp.energy(1.0), input_shape=RESNET_INPUT)
    stem = p.layers[0]
    assert stem.name == "conv1" and stem.rank == 16 and stem.full_rank == 16
    assert not stem.decomposed and "does not lower its MACs" in stem.reason
    conv1 = model.conv1
    trp.decompose_(model, plan=p)
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
    trp.decompose_(model, ("channel", "linear"), trp.fixed(4), filter_fn=keep, input_shape=RESNET_INPUT)
    assert model.layer3[0].conv1 is kept and isinstance(model.fc, nn.Linear)
    assert isinstance(model.layer1[0].conv1, nn.Sequential)


# --------------------------------------------------------------------------------------------
# 6. The global speed-up budget
# --------------------------------------------------------------------------------------------


def _gains(model: nn.Module, lp) -> torch.Tensor:
    w = dec.get_module(model, lp.name).weight.detach()
    spec = svd_mod.spectrum(svd_mod.svd(svd_mod.to_matrix(w, lp.scheme))[1]).double()
    return spec.pow(2) / spec.pow(2).sum() / (lp.macs_after // lp.rank)


@pytest.mark.parametrize("target", [2, 2.5, 3, 4])
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_speedup_budget_is_met_and_real(resnet20, scheme, target) -> None:
    """speedup(s) must land within 2% of s, and the decomposed model's counted MACs must agree with the plan."""
    model = copy.deepcopy(resnet20)
    p = trp.plan(model, scheme, trp.speedup(target), input_shape=RESNET_INPUT)
    assert p.macs_before == RESNET20_MACS
    assert abs(p.speedup / target - 1) <= 0.02
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
    trp.decompose_(model, plan=p)
    prof = trp.profile(model, RESNET_INPUT)
    assert prof.macs == p.macs_after
    assert prof.params == p.params_after == sum(q.numel() for q in model.parameters())
    assert abs(RESNET20_MACS / prof.macs / target - 1) <= 0.02


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
    snap = _snapshot(model)
    with pytest.raises(TRPError, match="out of reach"):
        trp.decompose_(model, scheme, trp.speedup(1000), input_shape=RESNET_INPUT)
    _assert_unchanged(model, snap)


# --------------------------------------------------------------------------------------------
# 7. Plans: JSON, apply_plan, table
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


@pytest.mark.parametrize(
    "make",
    [
        lambda p, tmp: "not json at all",
        lambda p, tmp: "{not json",
        lambda p, tmp: "[1, 2, 3]",
        lambda p, tmp: "",
        lambda p, tmp: "{}",
        lambda p, tmp: json.dumps({**_plan_dict(p), "format": "trp-plan/2"}),
        lambda p, tmp: json.dumps({k: v for k, v in _plan_dict(p).items() if k != "layers"}),
        lambda p, tmp: json.dumps({**_plan_dict(p), "layers": [{"bogus": 1}]}),
        lambda p, tmp: json.dumps({**_plan_dict(p), "layers": [1, 2]}),
        lambda p, tmp: json.dumps({**_plan_dict(p), "input_shape": 5}),
        lambda p, tmp: json.dumps({**_plan_dict(p), "macs_before": "many"}),
        lambda p, tmp: tmp / "missing.json",
        lambda p, tmp: tmp,  # a directory
    ],
    ids=["text", "broken", "list", "empty", "empty-obj", "format", "no-layers", "bad-layer", "int-layers",
         "bad-shape", "bad-macs", "missing-file", "directory"],
)
def test_plan_from_json_garbage_raises(channel_plan, tmp_path, make) -> None:
    """Anything that is not a trp plan must be a TRPError, never a KeyError/JSONDecodeError traceback."""
    with pytest.raises(TRPError):
        trp.Plan.from_json(make(channel_plan, tmp_path))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize(
    "field, bad", [("scheme", "bogus"), ("scheme", None), ("rank", None), ("rank", 0), ("rank", "4")],
)
def test_damaged_plan_layer_is_trperror(channel_plan, field, bad) -> None:
    """A plan whose decomposed layer has an unknown scheme or an invalid rank is damaged: TRPError, not a crash."""
    d = json.loads(channel_plan.to_json())
    i = next(i for i, lp in enumerate(d["layers"]) if lp["reason"] is None)
    d["layers"][i][field] = bad
    with pytest.raises(TRPError):
        trp.apply_plan(create("resnet20"), trp.Plan.from_json(json.dumps(d)))


@pytest.mark.parametrize("scheme", CONV_SCHEMES + [("spatial", "linear")], ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_apply_plan_then_load_state_dict_reproduces(resnet20, scheme) -> None:
    """A fresh model given the plan's structure and the decomposed state_dict must compute identical outputs."""
    model = copy.deepcopy(resnet20)
    p = trp.plan(model, scheme, trp.speedup(2.5), input_shape=RESNET_INPUT)
    trp.decompose_(model, plan=p)
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
    snap = _snapshot(model)
    with pytest.raises(TRPError, match=match):
        trp.apply_plan(model, p)
    with pytest.raises(TRPError, match=match):
        trp.decompose_(model, plan=p)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_decompose_with_plan_applies_its_ranks(resnet20, scheme) -> None:
    """decompose_(plan=...) uses the plan's ranks (not the rank argument) on another model's weights."""
    p = trp.plan(resnet20, scheme, trp.speedup(3), input_shape=RESNET_INPUT)
    torch.manual_seed(1)
    other = create("resnet20")
    trp.decompose_(other, "channel", trp.fixed(1), input_shape=RESNET_INPUT, plan=p)
    for lp in p.layers:
        mod = dec.get_module(other, lp.name)
        if lp.decomposed:
            assert isinstance(mod, nn.Sequential) and _built_rank(mod, lp.scheme) == lp.rank
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
    snap = _snapshot(model)
    trp.plan(model, "spatial", trp.speedup(2), input_shape=RESNET_INPUT)
    _assert_unchanged(model, snap)
    assert model.training


# --------------------------------------------------------------------------------------------
# 8. decompose_: identity, rollback, accuracy
# --------------------------------------------------------------------------------------------


def test_decompose_returns_same_model(resnet20) -> None:
    """decompose_ works in place and returns the very model it was given (like torchao's quantize_)."""
    model = copy.deepcopy(resnet20)
    assert trp.decompose_(model, "channel", trp.fixed(4), input_shape=RESNET_INPUT) is model
    assert isinstance(model.layer1[0].conv1, nn.Sequential)


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_decompose_rolls_back_when_build_fails(resnet20, monkeypatch, scheme) -> None:
    """If building the third layer fails, no layer of the model may have been replaced."""
    model = copy.deepcopy(resnet20)
    snap = _snapshot(model)
    cls = type(dec.SCHEMES[scheme])
    real = cls.build
    calls = []

    def flaky(self, module, k, factors=None):
        calls.append(k)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return real(self, module, k, factors)

    monkeypatch.setattr(cls, "build", flaky)
    with pytest.raises(RuntimeError, match="simulated failure"):
        trp.decompose_(model, scheme, trp.fixed(2), input_shape=RESNET_INPUT)
    assert len(calls) == 3
    _assert_unchanged(model, snap)


def test_decompose_rolls_back_when_swap_fails(resnet20, monkeypatch) -> None:
    """If the third replacement itself fails mid-swap, the two already made are undone."""
    model = copy.deepcopy(resnet20)
    snap = _snapshot(model)
    real = dec.set_module
    calls = []

    def flaky(m, name, new):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated swap failure")
        real(m, name, new)

    monkeypatch.setattr(dec, "set_module", flaky)
    with pytest.raises(RuntimeError, match="simulated swap failure"):
        trp.decompose_(model, "channel", trp.fixed(2), input_shape=RESNET_INPUT)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_energy_0999_keeps_outputs_close(scheme) -> None:
    """With trained-like decaying spectra, energy 0.999 must decompose layers yet change the logits little."""
    torch.manual_seed(0)
    model = _low_rank_weights_(create("resnet20"), scheme, decay=0.5).eval()
    x = torch.randn(4, *RESNET_INPUT)
    with torch.no_grad():
        ref = model(x)
    p = trp.plan(model, scheme, trp.energy(0.999), input_shape=RESNET_INPUT)
    assert sum(lp.decomposed for lp in p.layers) >= 10 and p.speedup > 1.2
    assert all(lp.energy >= 0.999 - 1e-6 for lp in p.layers if lp.decomposed)
    trp.decompose_(model, plan=p)
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_full_rank_model_is_unchanged(resnet20, scheme) -> None:
    """At fraction(1.0) no layer of ResNet-20 gets cheaper, so all stay dense and the output is unchanged."""
    model = copy.deepcopy(resnet20)
    x = torch.randn(2, *RESNET_INPUT)
    with torch.no_grad():
        ref = model(x)
    p = trp.plan(model, scheme, trp.fraction(1.0), input_shape=RESNET_INPUT)
    conv_lps = [lp for lp in p.layers if lp.type == "Conv2d"]
    assert all(lp.rank == lp.full_rank and "does not lower" in lp.reason for lp in conv_lps)
    trp.decompose_(model, plan=p)
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).norm() / ref.norm()) <= 1e-4


@pytest.mark.parametrize("scheme, rank", [("channel", 4), ("spatial", 2), ("decouple", 1)])
def test_exactly_low_rank_model_is_reproduced(scheme, rank) -> None:
    """When every conv is exactly rank r in the scheme's layout, the decomposed model (ranks by energy) matches to 1e-4."""
    torch.manual_seed(0)
    model = _low_rank_weights_(create("resnet20"), scheme, rank=rank).eval()
    x = torch.randn(2, *RESNET_INPUT)
    with torch.no_grad():
        ref = model(x)
    p = trp.plan(model, scheme, trp.energy(0.99999), input_shape=RESNET_INPUT)
    convs = [lp for lp in p.layers if lp.type == "Conv2d"]
    assert all(lp.decomposed and lp.rank <= rank for lp in convs)
    trp.decompose_(model, plan=p)
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).norm() / ref.norm()) <= 1e-4
