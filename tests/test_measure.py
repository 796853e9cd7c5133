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
from trp.measure import layer_macs, trace_shapes
from trp.models import create

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
    return trp.decompose_(create("resnet20"), scheme, trp.speedup(3), input_shape=RESNET_INPUT)


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


@pytest.mark.parametrize(
    "name, shape",
    [
        ("vgg16", (1, 32, 32)),  # wrong channel count
        ("resnet20", (4, 32, 32)),
        ("resnet20", (3, 0, 0)),  # empty image
        ("resnet20", (3,)),  # missing spatial dims
        ("vgg16", (3, 32)),
        ("vgg16", (3, 1, 32, 32)),  # one dimension too many
    ],
)
def test_input_the_model_cannot_take_raises_trperror(name, shape) -> None:
    """A shape the model cannot run is a TRPError naming the shape, for profile and plan alike."""
    model = create(name)
    with pytest.raises(TRPError, match="cannot take input of shape"):
        trp.profile(model, shape)
    with pytest.raises(TRPError, match="cannot take input of shape"):
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
    small = trp.decompose_(copy.deepcopy(model), "channel", trp.fixed(2), input_shape=(8, 12, 12))
    assert trp.latency_ms(small, (8, 12, 12), min_run_time=0.05) > 0
