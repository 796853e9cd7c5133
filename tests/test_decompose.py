"""Tests for trp.decompose: exact layer decomposition, unsupported layers, decompose_ (argument forms, one SVD per
layer, rollback, accuracy).

Planning and plans are in tests/test_plan.py, the scheme registry in tests/test_schemes.py, aliased and tied
layers in tests/test_surgery.py.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import trp
from trp import schemes
from trp import svd as svd_mod
from trp.errors import TRPError
from trp.models import create
from trp.surgery import get_module
from model_checks import assert_unchanged, built_rank, fail_third_swap, snapshot

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


def _low_rank_weights_(model: nn.Module, layout: str, decay: float | None = None, rank: int | None = None) -> nn.Module:
    """Give every Conv2d a prescribed spectrum in ``layout``: geometric decay and/or exact low rank."""
    sch = schemes.get(layout)
    with torch.no_grad():
        for m in model.modules():
            if type(m) is nn.Conv2d:
                u, s, vh = svd_mod.svd(sch.to_matrix(m.weight))
                if decay is not None:
                    s = s[..., :1] * decay ** torch.arange(s.shape[-1], dtype=s.dtype)
                if rank is not None:
                    s = torch.where(torch.arange(s.shape[-1]) < rank, s, torch.zeros_like(s))
                m.weight.copy_(sch.from_matrix((u * s[..., None, :]) @ vh, m.weight.shape))
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
    sch = schemes.get(scheme)
    low = trp.decompose_layer(conv, scheme, k)
    sv = torch.linalg.svdvals(sch.to_matrix(w))  # independent of trp.svd
    full = sv.shape[-1]
    assert built_rank(low, scheme) == min(k, full)
    wk = _compose(low, scheme, w.shape)
    assert torch.allclose(sch.compose(low), wk, rtol=0, atol=1e-12)  # the registry's compose agrees
    tail = float(sv[..., k:].pow(2).sum().sqrt())  # for decouple: the sum of every filter's tail
    assert float(torch.linalg.norm(w - wk)) == pytest.approx(tail, rel=1e-8, abs=1e-12)
    assert int(torch.linalg.matrix_rank(sch.to_matrix(wk)).max()) <= k
    # The same kernel as svd.truncate + from_matrix, and the module really computes it.
    u, s, vh = svd_mod.svd(sch.to_matrix(w))
    assert torch.allclose(wk, sch.from_matrix(svd_mod.truncate(u, s, vh, k), w.shape), atol=1e-12)
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
    s = svd_mod.spectrum(svd_mod.svd(schemes.get(scheme).to_matrix(conv.weight.detach()))[1])
    for crit in (trp.energy(0.8), trp.fraction(0.5), trp.value(float(s[1])), trp.fixed(100)):
        assert built_rank(trp.decompose_layer(conv, scheme, crit), scheme) == crit.select(s)
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
        sch = schemes.get(scheme)
        best = svd_mod.truncate(*svd_mod.svd(sch.to_matrix(conv.weight.detach().float())), 2)
        assert torch.allclose(sch.to_matrix(wk), best, atol=1e-2)


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
    trp.decompose_(model, trp.fixed(4), input_shape=RESNET_INPUT)
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
    kept = {name: get_module(model, name) for name in list(ZOO_REASONS) + ["fc"]}
    assert trp.decompose_(model, trp.fixed(1), scheme=scheme, input_shape=(C, H, W)) is model
    assert isinstance(model.conv, nn.Sequential)
    assert all(get_module(model, name) is mod for name, mod in kept.items())
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
    trp.decompose_(model, trp.fixed(1), scheme=("channel", "linear"), input_shape=(C, H, W))
    assert [type(m) for m in model.fc] == [nn.Linear, nn.Linear]
    assert [type(m) for m in model.conv] == [nn.Conv2d, nn.Conv2d]


def test_scheme_tuple_on_resnet20(resnet20) -> None:
    """On ResNet-20, ("channel", "linear") must decompose every conv and the classifier."""
    model = copy.deepcopy(resnet20)
    p = trp.plan(model, ("channel", "linear"), trp.fixed(4), input_shape=RESNET_INPUT)
    assert all(lp.decomposed for lp in p.layers) and len(p.layers) == 20
    assert {lp.scheme for lp in p.layers} == {"channel", "linear"}
    trp.decompose_(model, p)
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


@pytest.mark.parametrize(
    "scheme, match",
    [("bogus", "unknown scheme 'bogus'"), ("Channel", "unknown scheme 'Channel'"), ((), "no scheme given"),
     (["channel", "bogus"], "unknown scheme 'bogus'")],
    ids=["bogus", "Channel", "empty", "list"],
)
def test_unknown_scheme_raises(resnet20, scheme, match) -> None:
    """An unknown (or empty) scheme is a TRPError everywhere, and decompose_ leaves the model untouched."""
    model = copy.deepcopy(resnet20)
    snap = snapshot(model)
    with pytest.raises(TRPError, match=match):
        trp.plan(model, scheme, input_shape=RESNET_INPUT)
    with pytest.raises(TRPError, match=match):
        trp.decompose_(model, scheme=scheme, input_shape=RESNET_INPUT)
    if isinstance(scheme, str):
        with pytest.raises(TRPError, match=match):
            trp.decompose_layer(nn.Conv2d(3, 4, 3), scheme)
    assert_unchanged(model, snap)



# --------------------------------------------------------------------------------------------
# 8. decompose_: identity, rollback, accuracy
# --------------------------------------------------------------------------------------------


def test_decompose_returns_same_model(resnet20) -> None:
    """decompose_ works in place and returns the very model it was given (like torchao's quantize_)."""
    model = copy.deepcopy(resnet20)
    assert trp.decompose_(model, trp.fixed(4), input_shape=RESNET_INPUT) is model
    assert isinstance(model.layer1[0].conv1, nn.Sequential)


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_decompose_rolls_back_when_build_fails(resnet20, monkeypatch, scheme) -> None:
    """If building the third layer fails, no layer of the model may have been replaced."""
    model = copy.deepcopy(resnet20)
    snap = snapshot(model)
    cls = type(schemes.SCHEMES[scheme])
    real = cls.build
    calls = []

    def flaky(self, module, k, factors=None):
        calls.append(k)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return real(self, module, k, factors)

    monkeypatch.setattr(cls, "build", flaky)
    with pytest.raises(RuntimeError, match="simulated failure"):
        trp.decompose_(model, trp.fixed(2), scheme=scheme, input_shape=RESNET_INPUT)
    assert len(calls) == 3
    assert_unchanged(model, snap)


def test_decompose_rolls_back_when_swap_fails(resnet20, monkeypatch) -> None:
    """If the third replacement itself fails mid-swap, the two already made are undone."""
    model = copy.deepcopy(resnet20)
    snap = snapshot(model)
    fail_third_swap(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated swap failure"):
        trp.decompose_(model, trp.fixed(2), input_shape=RESNET_INPUT)
    assert_unchanged(model, snap)


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
    trp.decompose_(model, p)
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("scheme", CONV_SCHEMES + [("spatial", "linear")], ids=str)
def test_full_rank_model_is_unchanged(resnet20, scheme) -> None:
    """Every ResNet-20 layer decomposed at full rank computes the same output (fails if a scheme's build is broken).

    Full rank never lowers a layer's MACs, so the fraction(1.0) plan keeps every layer dense; the
    same plan with its layers forced to decomposed (as a user may edit a plan's JSON) then makes
    decompose_ really build every layer at full rank.
    """
    model = copy.deepcopy(resnet20)
    x = torch.randn(2, *RESNET_INPUT)
    with torch.no_grad():
        ref = model(x)
    p = trp.plan(model, scheme, trp.fraction(1.0), input_shape=RESNET_INPUT)
    lps = [lp for lp in p.layers if lp.scheme is not None]
    assert len(lps) == (20 if isinstance(scheme, tuple) else 19)
    assert all(lp.rank == lp.full_rank and "does not lower" in lp.reason for lp in lps)
    snap = snapshot(model)
    trp.decompose_(model, p)
    assert_unchanged(model, snap)  # nothing lowers MACs: nothing is replaced
    forced = trp.Plan.from_json(p.to_json())
    for lp in forced.layers:
        if lp.scheme is not None:
            lp.reason = None
    trp.decompose_(model, forced)
    built = [get_module(model, lp.name) for lp in lps]
    assert all(type(m) is nn.Sequential and len(m) == 2 for m in built)
    assert [built_rank(m, lp.scheme) for m, lp in zip(built, lps)] == [lp.full_rank for lp in lps]
    assert trp.profile(model, RESNET_INPUT).macs == forced.macs_after > RESNET20_MACS
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
    trp.decompose_(model, p)
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).norm() / ref.norm()) <= 1e-4


@pytest.mark.parametrize(
    "arg, same_as",
    [("speedup:3", trp.speedup(3)), ("fixed:4", trp.fixed(4)), (4, trp.fixed(4)), (None, trp.energy(0.9))],
    ids=["speedup-text", "fixed-text", "int", "default"],
)
def test_decompose_rank_argument_forms(resnet20, arg, same_as) -> None:
    """decompose_ reads a criterion's text ("speedup:3"), an int (fixed) and None (energy 0.9) as plan() would."""
    model = copy.deepcopy(resnet20)
    p = trp.plan(resnet20, "channel", same_as, input_shape=RESNET_INPUT)
    assert any(lp.decomposed for lp in p.layers)
    trp.decompose_(model, arg, input_shape=RESNET_INPUT)
    for lp in p.layers:
        mod = get_module(model, lp.name)
        assert (type(mod) is nn.Sequential) == lp.decomposed
        if lp.decomposed:
            assert built_rank(mod, "channel") == lp.rank
    assert trp.profile(model, RESNET_INPUT).macs == p.macs_after


@pytest.mark.parametrize(
    "arg, match", [("speedup", "rank must look like NAME:NUMBER"), ("speedup:0.5", "speed-up must be >= 1"),
                   (True, "rank must be an int"), (2.5, "rank must be an int")],
)
def test_decompose_bad_rank_argument_raises(resnet20, arg, match) -> None:
    """A malformed rank argument is a one-line TRPError and the model is left untouched."""
    model = copy.deepcopy(resnet20)
    snap = snapshot(model)
    with pytest.raises(TRPError, match=match):
        trp.decompose_(model, arg, input_shape=RESNET_INPUT)
    assert_unchanged(model, snap)


# --------------------------------------------------------------------------------------------
# 9. One SVD per decomposed layer
# --------------------------------------------------------------------------------------------


def _count_svds(monkeypatch) -> list[str]:
    """Wrap trp.svd.svd (the schemes call it as ``svd_mod.svd``) to record the layer name of every call."""
    real = svd_mod.svd
    names: list[str] = []

    def counting(matrix, name="weight"):
        names.append(name)
        return real(matrix, name)

    monkeypatch.setattr(svd_mod, "svd", counting)
    return names


@pytest.mark.parametrize("rank", [trp.speedup(3), trp.fixed(4)], ids=str)
@pytest.mark.parametrize("scheme", CONV_SCHEMES + [("channel", "linear")], ids=str)
def test_decompose_takes_one_svd_per_layer(resnet20, monkeypatch, scheme, rank) -> None:
    """decompose_ takes one SVD per decomposed layer, planning itself or given a plan; plan() takes none."""
    names = _count_svds(monkeypatch)
    p = trp.plan(resnet20, scheme, rank, input_shape=RESNET_INPUT)
    assert names == []  # planning needs singular values only (svdvals)
    decomposed = [lp.name for lp in p.layers if lp.decomposed]
    assert len(decomposed) >= 10
    trp.decompose_(copy.deepcopy(resnet20), p)
    assert names == decomposed
    names.clear()
    trp.decompose_(copy.deepcopy(resnet20), rank, scheme=scheme, input_shape=RESNET_INPUT)
    assert names == decomposed


def test_decompose_layer_takes_one_svd(monkeypatch) -> None:
    """decompose_layer factors its layer once, for a fixed rank and for a criterion alike."""
    names = _count_svds(monkeypatch)
    conv = _conv((3, 3), padding=1)
    trp.decompose_layer(conv, "spatial", trp.energy(0.9))
    trp.decompose_layer(conv, "decouple", 2)
    assert len(names) == 2
