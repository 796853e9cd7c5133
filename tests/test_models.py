"""Tests for trp.models: sizes, shapes, shortcut semantics, errors and serialisability; the package namespace."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trp import models
from trp.errors import TRPError

CIFAR_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16"]
TORCHVISION_NAMES = ["resnet18", "resnet50"]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_cover_registry() -> None:
    """names() is the public list of what create() accepts, so it must match the registry."""
    assert models.names() == list(models.MODELS)
    assert set(models.names()) == set(CIFAR_NAMES + TORCHVISION_NAMES)


def test_resnet20_parameter_count() -> None:
    """Option-A ResNet-20 must have exactly the paper's 0.27 M (269,722) parameters."""
    # 272,474 would mean 1x1-conv (option-B) shortcuts had crept in.
    assert _num_params(models.create("resnet20")) == 269_722


def test_resnet20_macs() -> None:
    """Compression ratios are reported against ResNet-20's 40,551,040 MACs at 32x32."""
    model = models.create("resnet20").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() == 2 * 40_551_040


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_models_output_shape(name: str) -> None:
    """Every CIFAR model must give (B, num_classes) logits on 32x32 RGB and 8x8 grayscale."""
    torch.manual_seed(0)
    model = models.create(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    small = models.create(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        out = small(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_models_output_shape(name: str) -> None:
    """torchvision ResNets must honour num_classes and in_channels like the CIFAR models."""
    pytest.importorskip("torchvision")
    model = models.create(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    gray = models.create(name, num_classes=4, in_channels=1).eval()
    assert gray.conv1.in_channels == 1
    assert gray.conv1.kernel_size == (7, 7) and gray.conv1.stride == (2, 2)
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "blocks"),
    [("resnet20", 3), ("resnet32", 5), ("resnet44", 7), ("resnet56", 9), ("resnet110", 18)],
)
def test_depth_gives_block_count(name: str, blocks: int) -> None:
    """A depth-(6n+2) ResNet must have n BasicBlocks in each of its three stages."""
    model = models.create(name)
    for stage in (model.layer1, model.layer2, model.layer3):
        assert isinstance(stage, nn.Sequential)
        assert len(stage) == blocks
        assert all(isinstance(block, models.BasicBlock) for block in stage)


def test_module_names() -> None:
    """Other modules find layers by name, so the attribute names are part of the API."""
    model = models.create("resnet20")
    names = dict(model.named_modules())
    for key in ["conv1", "bn1", "layer1", "layer2", "layer3", "fc"]:
        assert key in names
    for suffix in ["conv1", "bn1", "conv2", "bn2", "shortcut"]:
        assert f"layer2.0.{suffix}" in names
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 64
    vgg = models.create("vgg16")
    assert isinstance(vgg.features, nn.Sequential)
    assert isinstance(vgg.classifier, nn.Linear) and vgg.classifier.in_features == 512
    assert sum(isinstance(m, nn.Conv2d) for m in vgg.modules()) == 13


def test_shortcut_option_a_is_exact() -> None:
    """Option A must pass the subsampled input through unchanged and add only zero channels."""
    model = models.create("resnet20")
    block = model.layer2[0]
    assert isinstance(block.shortcut, models.ZeroPadShortcut)
    assert list(block.shortcut.parameters()) == []
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    x = torch.randn(2, 16, 16, 16)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 8, 8)
    # Channels split evenly: 8 zero channels, the 16 inputs, 8 zero channels.
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :8]) == 0
    assert torch.count_nonzero(out[:, 24:]) == 0


def test_unknown_name_raises() -> None:
    """A typo must give a one-line TRPError that lists the valid names."""
    with pytest.raises(TRPError, match="unknown model 'resnet21'; choose one of: resnet20") as info:
        models.create("resnet21")
    assert "\n" not in str(info.value)
    with pytest.raises(TRPError, match="unknown model 'resnet21'; choose one of: resnet20"):
        models.default_input_size("resnet21")


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": 0}, {"num_classes": -3}])
def test_bad_sizes_raise(kwargs: dict[str, int]) -> None:
    """Non-positive class or channel counts must be rejected before building anything."""
    (key, value), = kwargs.items()
    with pytest.raises(TRPError, match=f"{key} must be a positive integer, got {value}"):
        models.create("resnet20", **kwargs)


def test_default_input_size() -> None:
    """CIFAR models are designed for 32x32 inputs, torchvision ones for 224x224."""
    assert models.default_input_size("resnet20") == 32
    assert models.default_input_size("vgg16") == 32
    assert models.default_input_size("resnet50") == 224


def test_deepcopy_and_export() -> None:
    """Models must survive deepcopy and torch.export (no lambdas or globals inside)."""
    torch.manual_seed(0)
    model = models.create("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(twin(x), expected)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected)


# --------------------------------------------------------------------------------------------
# The package namespace
# --------------------------------------------------------------------------------------------


def test_plain_import_binds_models() -> None:
    """After a plain ``import trp`` (fresh process), ``trp.models.create`` works without importing trp.models."""
    code = ("import trp; m = trp.models.create('resnet20'); "
            "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ResNetCifar", "269722"]


def test_package_all_is_unique_and_complete() -> None:
    """trp.__all__ names each export once ("load" was listed twice) and every name in it exists."""
    import trp

    assert trp.__all__.count("load") == 1
    assert len(trp.__all__) == len(set(trp.__all__))
    missing = [name for name in trp.__all__ if not hasattr(trp, name)]
    assert missing == []
    ns: dict = {}
    exec("from trp import *", ns)
    assert set(trp.__all__) <= set(ns)


# --------------------------------------------------------------------------------------------
# Sources beyond the zoo (issue #13): torchvision:, timm:, hf:, python:
# --------------------------------------------------------------------------------------------


def test_torchvision_source_sizes_and_first_conv() -> None:
    """torchvision:NAME takes num_classes, and in_channels through a rebuilt first conv (any model)."""
    model = models.create("torchvision:mobilenet_v2", num_classes=6, in_channels=1).eval()
    first = model.features[0][0]
    assert first.in_channels == 1 and first.stride == (2, 2) and first.kernel_size == (3, 3)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 6)
    net = models.create("torchvision:resnet18", num_classes=3, zero_init_residual=True)  # kwargs reach the builder
    assert net.fc.out_features == 3 and torch.count_nonzero(net.layer1[0].bn2.weight) == 0


def test_sources_are_checked_before_building() -> None:
    """check() validates a source and its kwargs without building or importing user code."""
    assert models.check("torchvision:resnet18", '{"zero_init_residual": true}') == {"zero_init_residual": True}
    assert models.check("python:pkg.never_imported_module:make", {"width": (1, 2)}) == {"width": [1, 2]}
    assert "pkg" not in sys.modules
    for source, kwargs, message in [
        ("torchvision:resnet1", None, "unknown torchvision classification model 'resnet1'"),
        ("python:pkg.mod", None, "python: needs MODULE:FUNCTION"),
        ("hf:", None, "hf: needs the path of a config file"),
        ("torchvision:", None, "torchvision: needs a model name"),
        ("torchvision:resnet18", {"w": {1: 2}}, "keys must be strings"),
        ("torchvision:resnet18", {"w": float("inf")}, "model-kwargs w must be finite"),
        ("torchvision:resnet18", {"w": object()}, "must be a JSON value"),
        ("torchvision:resnet18", '"x"', "must be a JSON object"),
        ("torchvision:resnet18", {"in_channels": 1}, "may not set 'in_channels': it comes from the data"),
        ("resnet20", {"width": 2}, "model 'resnet20' takes no model-kwargs"),
    ]:
        with pytest.raises(TRPError, match=message):
            models.check(source, kwargs)


def test_hf_kwargs_become_self_contained(tmp_path) -> None:  # noqa: ANN001
    """portable_kwargs stores an hf: config file's content (with the overrides) so a model file needs no config file."""
    pytest.importorskip("transformers")
    config = {"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32, "image_size": 8, "patch_size": 4, "_name_or_path": "/home/someone"}
    path = tmp_path / "vit.json"
    path.write_text(__import__("json").dumps(config))
    kwargs = models.portable_kwargs(f"hf:{path}", {"num_hidden_layers": 2})
    assert kwargs == {"config": {**{k: v for k, v in config.items() if k != "_name_or_path"}, "num_hidden_layers": 2}}
    path.unlink()
    model = models.create(f"hf:{path}", num_classes=4, in_channels=1, **kwargs).eval()
    assert isinstance(model, models.HFClassifier) and model.config.num_hidden_layers == 2
    assert model.config.num_channels == 1 and model.config.num_labels == 4
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
