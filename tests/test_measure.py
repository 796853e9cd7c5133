"""Tests for trp.measure: MACs/parameter accounting at the real input size, and latency."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import trp
from trp.errors import TRPError
from trp.tracing import default_input_shape, layer_macs, sample_shape, trace_shapes
from trp.models import create
from trp.tracing import example_input, trace_calls
from model_checks import flop_counter_macs

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET_INPUT = (3, 32, 32)


class _GroupedLinear3d(nn.Module):
    """A grouped conv whose rows feed a Linear as a (B, T, in) sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.conv(x))  # (B, 8, 5, 6)
        return self.fc(y.flatten(1, 2))  # (B, 40, 6) -> (B, 40, 5)


class _OtherConvs(nn.Module):
    """Transposed, 1-D and 3-D convolutions, which are counted too."""

    def __init__(self) -> None:
        super().__init__()
        self.tconv = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1)
        self.c1 = nn.Conv1d(4, 3, 3)
        self.c3 = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tconv(x)
        return self.c1(x.flatten(2)).mean() + self.c3(x[:, None]).mean()


def _decomposed(scheme) -> nn.Module:
    torch.manual_seed(0)
    return trp.decompose_(create("resnet20"), trp.speedup(3), scheme=scheme, input_shape=RESNET_INPUT)


FLOP_CASES = [
    pytest.param(lambda: create("resnet20"), RESNET_INPUT, id="resnet20"),
    pytest.param(lambda: create("resnet20"), (3, 20, 28), id="resnet20-20x28"),
    pytest.param(lambda: create("vgg16"), RESNET_INPUT, id="vgg16"),
    pytest.param(lambda: _decomposed("channel"), RESNET_INPUT, id="resnet20-channel"),
    pytest.param(lambda: _decomposed("spatial"), RESNET_INPUT, id="resnet20-spatial"),
    pytest.param(lambda: _decomposed("decouple"), RESNET_INPUT, id="resnet20-decouple"),
    pytest.param(lambda: _decomposed(("channel", "linear")), RESNET_INPUT, id="resnet20-channel+linear"),
    pytest.param(_GroupedLinear3d, (6, 11, 13), id="grouped+linear3d"),
    pytest.param(_OtherConvs, (6, 5, 7), id="tconv+conv1d+conv3d"),
]


@pytest.mark.parametrize("make, shape", FLOP_CASES)
def test_macs_match_flop_counter(make, shape) -> None:
    """profile's MACs must be half of PyTorch's FlopCounterMode total, for dense, decomposed and odd layers."""
    model = make().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    prof = trp.profile(model, shape)
    assert prof.macs > 0
    assert 2 * prof.macs == counter.get_total_flops()


def test_resnet20_reference_numbers() -> None:
    """ResNet-20 (option-A shortcuts) has 40,551,040 MACs and 269,722 (0.27 M) parameters at 32×32."""
    prof = trp.profile(create("resnet20"), RESNET_INPUT)
    assert prof.macs == 40_551_040
    assert prof.params == 269_722
    assert prof.input_shape == RESNET_INPUT
    assert len(prof.layers) == 20 and prof.layers[0].name == "conv1" and prof.layers[-1].name == "fc"


def test_input_size_is_honoured() -> None:
    """Doubling the image side quadruples every conv's MACs; the classifier after global pooling is unchanged."""
    model = create("resnet20")
    small, big = trp.profile(model, (3, 32, 32)), trp.profile(model, (3, 64, 64))
    assert [layer.name for layer in small.layers] == [layer.name for layer in big.layers]
    for a, b in zip(small.layers, big.layers):
        assert b.macs == (a.macs if a.type == "Linear" else 4 * a.macs), a.name
        assert b.params == a.params
    fc = small.layers[-1].macs
    assert fc == 640
    assert big.macs == 4 * (small.macs - fc) + fc
    assert big.params == small.params


@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_layer_table_sums_to_total(name) -> None:
    """The per-layer rows must add up to the reported totals, and the text table must show them."""
    model = create(name)
    prof = trp.profile(model, RESNET_INPUT)
    assert sum(layer.macs for layer in prof.layers) == prof.macs
    assert prof.params == sum(p.numel() for p in model.parameters())
    counted = {layer.name for layer in prof.layers}
    own = sum(p.numel() for n, m in model.named_modules() if n in counted for p in m.parameters(recurse=False))
    assert sum(layer.params for layer in prof.layers) == own
    for layer in prof.layers:
        assert layer.macs == layer_macs(model.get_submodule(layer.name), layer.in_shape, layer.out_shape)
    table = prof.table()
    assert all(layer.name in table for layer in prof.layers)
    assert table.splitlines()[-1].split()[:2] == ["total", f"{prof.macs:,}"]
    assert str(prof) == table


CANNOT = "the model cannot take input of shape "


@pytest.mark.parametrize(
    "name, shape, match",
    [
        ("vgg16", (1, 32, 32), CANNOT + r"\(1, 32, 32\)"),  # wrong channel count
        ("resnet20", (4, 32, 32), CANNOT + r"\(4, 32, 32\)"),
        ("resnet20", (3, 0, 0), r"input_shape must be non-empty with every size >= 1, got \(3, 0, 0\)"),  # empty image
        ("resnet20", (3,), CANNOT + r"\(3,\)"),  # missing spatial dims
        ("vgg16", (3, 32), CANNOT + r"\(3, 32\)"),
        ("vgg16", (3, 1, 32, 32), CANNOT + r"\(1, 32, 32\)"),  # read as a batch of 3 one-channel images
        ("vgg16", (2, 3, 1, 32, 32), CANNOT + r"\(2, 3, 1, 32, 32\)"),  # one dimension too many
    ],
)
def test_input_the_model_cannot_take_raises_trperror(name, shape, match) -> None:
    """A shape the model cannot run is a TRPError naming the shape, for profile and plan alike."""
    model = create(name)
    with pytest.raises(TRPError, match=match):
        trp.profile(model, shape)
    with pytest.raises(TRPError, match=match):
        trp.plan(model, "channel", input_shape=shape)
    assert model.training  # the mode is restored even on failure


@pytest.mark.parametrize("shape", [(3, 2, 2), (3, 1, 1)])
def test_vgg16_takes_tiny_inputs(shape) -> None:
    """VGG-16's ceil-mode pools keep a 1×1 map alive, so tiny images are valid inputs, not errors."""
    prof = trp.profile(create("vgg16"), shape)
    assert prof.macs > 0 and prof.layers[0].out_shape == (64, *shape[1:])


def test_trace_shapes_leaves_model_alone() -> None:
    """Tracing runs in eval mode on a batch of one: BN statistics are not updated and the mode is restored."""
    model = create("resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = trace_shapes(model, (3, 16, 16))
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert shapes["conv1"] == ((3, 16, 16), (16, 16, 16))
    assert shapes["layer3.0.conv1"] == ((32, 8, 8), (64, 4, 4))
    assert shapes["fc"] == ((64,), (10,))


def test_profile_follows_model_dtype() -> None:
    """A float64 model is traced with a float64 sample instead of failing on a dtype mismatch."""
    model = create("resnet20").double()
    assert trp.profile(model, RESNET_INPUT).macs == 40_551_040


def test_profile_without_counted_layers() -> None:
    """A model with no conv or Linear (or no parameters) counts zero MACs rather than failing."""
    prof = trp.profile(nn.Sequential(nn.ReLU(), nn.Flatten()), (3, 4, 4))
    assert prof.macs == 0 and prof.params == 0 and prof.layers == []


@pytest.mark.parametrize(
    "module, in_shape, out_shape, expected",
    [
        (nn.Conv2d(16, 32, 3, padding=1), (16, 8, 8), (32, 8, 8), 32 * 8 * 8 * 16 * 9),
        (nn.Conv2d(16, 32, 3, padding=1, groups=4), (16, 8, 8), (32, 8, 8), 32 * 8 * 8 * 4 * 9),
        (nn.Conv2d(16, 32, (1, 3), stride=2), (16, 8, 9), (32, 4, 4), 32 * 4 * 4 * 16 * 3),
        (nn.ConvTranspose2d(16, 8, 3, stride=2), (16, 5, 5), (8, 11, 11), 16 * 5 * 5 * 8 * 9),
        (nn.ConvTranspose2d(16, 8, 3, stride=2, groups=2), (16, 5, 5), (8, 11, 11), 16 * 5 * 5 * 4 * 9),
        (nn.Conv1d(4, 6, 3), (4, 10), (6, 8), 6 * 8 * 4 * 3),
        (nn.Conv3d(2, 3, 3), (2, 5, 5, 5), (3, 3, 3, 3), 3 * 27 * 2 * 27),
        (nn.Linear(12, 5), (12,), (5,), 60),
        (nn.Linear(12, 5), (7, 12), (7, 5), 7 * 60),
        (nn.BatchNorm2d(4), (4, 3, 3), (4, 3, 3), 0),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_layer_macs(module, in_shape, out_shape, expected) -> None:
    """layer_macs counts one sample's multiply-accumulates from the traced shapes."""
    assert layer_macs(module, in_shape, out_shape) == expected


class _SharedLinear(nn.Module):
    """One Linear applied twice (weight sharing): it does its arithmetic twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


def test_reused_module_counted_per_call() -> None:
    """A layer called twice in one forward costs twice its MACs; profile must agree with FlopCounterMode."""
    model = _SharedLinear()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 8))
    assert 2 * trp.profile(model, (8,)).macs == counter.get_total_flops() == 2 * 128


@pytest.mark.parametrize("channels_last", [False, True])
def test_latency_ms_is_positive_and_quick(channels_last) -> None:
    """latency_ms returns a positive float in a fraction of a second and restores the training flag."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).train()
    import time

    start = time.perf_counter()
    ms = trp.latency_ms(model, (3, 16, 16), batch_size=2, threads=1, min_run_time=0.05, channels_last=channels_last)
    elapsed = time.perf_counter() - start
    assert isinstance(ms, float) and ms > 0 and math.isfinite(ms)
    assert elapsed < 5
    assert model.training


def test_latency_ms_on_decomposed_model() -> None:
    """A decomposed model is timed like any other (its layers are stock modules)."""
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    small = trp.decompose_(copy.deepcopy(model), trp.fixed(2), input_shape=(8, 12, 12))
    assert trp.latency_ms(small, (8, 12, 12), min_run_time=0.05) > 0


# --------------------------------------------------------------------------------------------
# The sample shape: a batch dimension is understood, a missing one guessed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_profile_understands_batch_dimension(name) -> None:
    """profile(model, (1, 3, 32, 32)), as fvcore/torchinfo users write it, equals profile(model, (3, 32, 32))."""
    model = create(name)
    assert trp.profile(model, (1, *RESNET_INPUT)) == trp.profile(model, RESNET_INPUT)
    assert trp.profile(model, (1, *RESNET_INPUT)).input_shape == RESNET_INPUT


@pytest.mark.parametrize(
    "model, shape, expected",
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3)), (1, 3, 32, 32), (3, 32, 32)),
        (nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 32, 32), (3, 32, 32)),
        (nn.Sequential(nn.Conv2d(3, 4, 3)), [3, 20, 28], (3, 20, 28)),
        (nn.Sequential(nn.Linear(8, 2)), (5, 8), (5, 8)),  # a sequence input: nothing is dropped
        (nn.Sequential(nn.Conv1d(3, 4, 3)), (2, 3, 9), (2, 3, 9)),
    ],
    ids=["conv-batch", "conv", "conv-list", "linear-seq", "conv1d"],
)
def test_sample_shape(model, shape, expected) -> None:
    """sample_shape drops a batch dimension only from a 4-D shape for a Conv2d-first model."""
    assert sample_shape(model, shape) == expected


@pytest.mark.parametrize(
    "shape, match",
    [((), "input_shape must be non-empty"), ((3, 0, 32), "every size >= 1"), ((3, -1), "every size >= 1"),
     ("abc", "input_shape must be a sequence of whole numbers"), ((3, None), "input_shape must be a sequence")],
)
def test_sample_shape_rejects(shape, match) -> None:
    """An empty, non-positive or non-numeric input shape is a TRPError naming input_shape."""
    with pytest.raises(TRPError, match=match):
        sample_shape(nn.Sequential(nn.Conv2d(3, 4, 3)), shape)


def test_default_input_shape() -> None:
    """A declared ``input_shape`` wins; else (C, 32, 32) from the first conv, or (in_features,) for a first Linear."""
    assert default_input_shape(create("resnet20")) == RESNET_INPUT
    assert default_input_shape(create("resnet20", in_channels=1)) == (1, 32, 32)
    assert default_input_shape(nn.Sequential(nn.Linear(12, 3), nn.Conv2d(2, 2, 1))) == (12,)
    declared = nn.Sequential(nn.Conv2d(3, 4, 3))
    declared.input_shape = [3, 224, 224]
    assert default_input_shape(declared) == (3, 224, 224)
    assert sample_shape(declared, None) == (3, 224, 224)
    with pytest.raises(TRPError, match="cannot guess the input shape .*; pass input_shape"):
        default_input_shape(nn.Sequential(nn.ReLU()))


# --------------------------------------------------------------------------------------------
# Attention, functional weights and activation products (issue #13)
# --------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """nn.MultiheadAttention (cross-attention with kdim/vdim, bias_kv, zero_attn) called from a module."""

    def __init__(self, batch_first: bool, need_weights: bool) -> None:
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, add_bias_kv=True, add_zero_attn=True,
                                         batch_first=batch_first)
        self.to_k, self.to_v = nn.Linear(8, 6), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 8)
        q = x[:, :3]
        k, v = self.to_k(x), self.to_v(x)
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        return self.mha(q, k, v, need_weights=self.need_weights)[0]


class _Functional(nn.Module):
    """swin's pattern: a Linear's weight passed to F.linear, plus matmul, einsum and SDPA between activations."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 8)
        b, t, _ = x.shape
        windows = x.reshape(b * 2, t // 2, 8)  # windows folded into the batch dimension
        q, k, v = torch.nn.functional.linear(windows, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        scores = (q @ k.transpose(-2, -1)).softmax(-1)
        y = torch.einsum("bij,bjd->bid", scores, v)
        y = torch.nn.functional.scaled_dot_product_attention(y, k, v)
        y = torch.nn.functional.linear(y, self.proj.weight, self.proj.bias)
        return self.proj(y.reshape(b, t, 8))  # also called as a module


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "sdpa"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_multihead_attention_counted_like_flop_counter(batch_first, need_weights) -> None:
    """nn.MultiheadAttention's projections and both attention products are counted, kdim/vdim,
    bias_kv and zero_attn included, and agree with FlopCounterMode exactly."""
    model = _Attention(batch_first, need_weights).eval()
    prof = trp.profile(model, (7, 8))
    assert prof.macs == flop_counter_macs(model, torch.zeros(1, 7, 8))
    rows = {(row.name, row.kind): row for row in prof.layers}
    assert rows[("mha", "attention")].type == "MultiheadAttention"
    assert rows[("mha.out_proj", "functional")].macs == 3 * 8 * 8  # 3 queries through the 8×8 output projection
    assert rows[("mha", "attention")].macs == 3 * 64 + 7 * (6 + 5) * 8 + 2 * 3 * (7 + 2) * 8


def test_functional_weights_and_products_counted() -> None:
    """A weight passed to F.linear is counted for its owner (kind 'functional'), products of activations
    for the module computing them; the total is FlopCounterMode's, the unused layer counts nothing."""
    model = _Functional().eval()
    prof = trp.profile(model, (6, 8))
    assert prof.macs == flop_counter_macs(model, torch.zeros(1, 6, 8))
    kinds = {(row.name, row.kind): row.macs for row in prof.layers}
    assert kinds[("qkv", "functional")] == 6 * 8 * 24
    assert kinds[("proj", "functional")] == kinds[("proj", "module")] == 6 * 8 * 8
    # two windows of 3 tokens: QKᵀ (matmul) and scores·V (einsum) 3·3·8 each, SDPA 3·3·(8 + 8)
    assert kinds[("", "product")] == 2 * (2 * 3 * 3 * 8 + 3 * 3 * (8 + 8))
    assert not any(row.name == "unused" for row in prof.layers)
    table = prof.table()
    assert "functional" in table and "product" in table and "matmul" in table


def test_folded_batch_counts_every_slice() -> None:
    """A layer applied to a tensor whose leading dimension folds windows into the batch is one call per slice."""

    class Folded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(-1, 3, 8))  # (1, 12, 8) -> (4, 3, 8)

    model = Folded()
    calls = trace_calls(model, (12, 8))
    assert calls["fc"] == [((3, 8), (3, 4))] * 4
    assert trp.profile(model, (12, 8)).macs == flop_counter_macs(model, torch.zeros(1, 12, 8)) == 12 * 32


def test_cross_check_warns_on_disagreement() -> None:
    """profile(check=True) is silent when FlopCounterMode agrees and warns in one line when it does not
    (torch.tensordot multiplies without any op profile counts)."""

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tensordot(x, self.w, dims=1))

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trp.profile(create("resnet20"), RESNET_INPUT, check=True)
        assert trp.measure.cross_check(_Functional(), (6, 8)) == 0.0
    with pytest.warns(UserWarning, match=r"trp.profile counts 64 MACs .* FlopCounterMode 128 \(50.0 % apart\)") as rec:
        trp.profile(Hidden(), (8,), check=True)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)


def _tiny_vit(image_size: int = 48) -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(image_size=image_size, patch_size=16, num_layers=1, num_heads=2,
                                                hidden_dim=16, mlp_dim=32)


def test_model_rejecting_the_probe_asks_for_input_shape() -> None:
    """A model that asserts on its input size (torchvision's ViT) gives one TRPError line asking for input_shape."""
    model = _tiny_vit()
    with pytest.raises(TRPError, match=r"^the model cannot take input of shape \(3, 32, 32\): Wrong image height! "
                                       r"Expected 48 but got 32! \(pass input_shape, one sample's shape"):
        trp.profile(model, (3, 32, 32))
    with pytest.raises(TRPError, match="pass input_shape"):
        trp.plan(model, "linear", input_shape=(3, 32, 32))


def test_default_input_shape_uses_declared_sizes() -> None:
    """torchvision's image_size, timm's patch_embed.img_size and HF configs give the probe; token models get ids."""
    vit = _tiny_vit(48)
    assert default_input_shape(vit) == (3, 48, 48)
    assert trp.profile(vit).input_shape == (3, 48, 48)
    timm_like = nn.Sequential(nn.Conv2d(4, 8, 3))
    timm_like.pretrained_cfg = {"input_size": (4, 40, 40)}
    assert default_input_shape(timm_like) == (4, 40, 40)
    timm_like.patch_embed = nn.Module()
    timm_like.patch_embed.img_size = (24, 32)  # what the model was built for beats the pretrained default
    assert default_input_shape(timm_like) == (4, 24, 32)
    hf_like = nn.Sequential(nn.Conv2d(1, 8, 3))
    hf_like.config = type("Config", (), {"image_size": 20, "num_channels": 1})()
    assert default_input_shape(hf_like) == (1, 20, 20)
    tokens = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    assert default_input_shape(tokens) == (128,)
    tokens.config = type("Config", (), {"max_position_embeddings": 16})()
    assert default_input_shape(tokens) == (16,)
    assert example_input(tokens, (16,)).dtype == torch.int64
    assert trp.profile(tokens).macs == 16 * 8 * 50


def test_timm_and_transformers_declared_shapes() -> None:
    """The real packages: a timm ViT built for 32×32 probes at 32×32; a GPT-2 at min(128, n_positions) tokens."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, pretrained=False)
    assert default_input_shape(model) == (3, 32, 32)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=40)
    gpt = transformers.GPT2LMHeadModel(config)
    assert default_input_shape(gpt) == (40,)
    prof = trp.profile(gpt)
    conv1d = [row for row in prof.layers if row.type == "Conv1D"]
    assert len(conv1d) == 4 and all(row.kind == "module" for row in conv1d)
    assert prof.macs == flop_counter_macs(gpt, torch.zeros(1, 40, dtype=torch.long))
