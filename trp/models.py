"""Model zoo: the networks TRP is trained and evaluated on, built by name.

The CIFAR ResNets follow He et al. 2016 ("Deep Residual Learning", section 4.2) with the
parameter-free option-A shortcut, so ResNet-20 has the 0.27 M parameters quoted in the paper
(exactly 269,722; the 272,474 sometimes quoted is the option-B variant with 1x1-conv + BN
projections) and 40,551,040 multiply-accumulates on a 32x32 image.
VGG-16 is the usual CIFAR variant with batch norm and a single linear classifier. ResNet-18/50 come
from torchvision, which is imported only when one of them is asked for.

Beyond the zoo, :func:`create` builds any architecture from a source (:mod:`trp.sources`):
``torchvision:NAME``, ``timm:NAME``, ``hf:CONFIG.json`` or ``python:MODULE:FUNCTION``, with
keyword arguments as JSON; this module is the one place a source string is resolved.

Example:
    >>> import torch
    >>> model = create("resnet20")
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trp import sources
from trp.errors import TRPError
from trp.sources import SOURCES, HFClassifier

__all__ = [
    "MODELS",
    "SOURCES",
    "BasicBlock",
    "HFClassifier",
    "ResNetCifar",
    "VGGCifar",
    "ZeroPadShortcut",
    "check",
    "check_source",
    "create",
    "default_input_size",
    "names",
    "portable_kwargs",
]

_VGG16_CFG: list[int | str] = [
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
]  # fmt: skip


def _kaiming_init(module: nn.Module) -> None:
    # Same scheme as the widely used CIFAR ResNet code (fan-in Kaiming normal on every conv and
    # linear weight), so accuracies are comparable with published baselines.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad the extra channels.

    A real module rather than a lambda, so that models stay deep-copyable, picklable and traceable
    by ``torch.compile`` / ``torch.export``.

    The new channels are split evenly before and after the input channels, which is what the
    common CIFAR ResNet code does; that keeps the network function identical to checkpoints trained
    with it.

    Args:
        in_planes: Channels of the input.
        out_planes: Channels of the output (``>= in_planes``).
        stride: Spatial subsampling step.

    Example:
        >>> import torch
        >>> ZeroPadShortcut(16, 32, 2)(torch.ones(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise TRPError(f"option-A shortcut cannot shrink channels ({in_planes} -> {out_planes})")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride
        extra = out_planes - in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_front or self.pad_back:
            x = F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (He et al. 2016, figure 2).

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (2 halves the feature map).

    Example:
        >>> import torch
        >>> BasicBlock(16, 32, stride=2)(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = ZeroPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth ``6n + 2``: three stages of 16/32/64 channels, ``n`` blocks each.

    Args:
        depth: Total layer count; ``(depth - 2)`` must be divisible by 6 (20, 32, 44, 56, 110...).
        num_classes: Number of output logits.
        in_channels: Channels of the input image.

    Example:
        >>> import torch
        >>> net = ResNetCifar(20, num_classes=10, in_channels=1)
        >>> len(net.layer1), net(torch.zeros(1, 1, 8, 8)).shape
        (3, torch.Size([1, 10]))
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise TRPError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self._in_planes = 16
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        # Adaptive pooling (instead of the paper's fixed 8x8) lets small inputs such as 8x8 digits
        # through the same network.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self.apply(_kaiming_init)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self._in_planes, planes, block_stride))
            self._in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


class VGGCifar(nn.Module):
    """VGG with batch norm for small images: conv features, global average pool, one linear layer.

    Args:
        cfg: Conv widths, with ``"M"`` marking a 2x2 max-pool.
        num_classes: Number of output logits.
        in_channels: Channels of the input image.

    Example:
        >>> import torch
        >>> net = VGGCifar([8, "M", 16, "M"], num_classes=3, in_channels=1)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                # ceil_mode keeps a 1x1 map at 1x1, so 8x8 inputs survive all five pools.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                width = int(item)
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.apply(_kaiming_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(out)


def _resnet_cifar(depth: int, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNetCifar(depth, num_classes=num_classes, in_channels=in_channels)


def _vgg16(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return VGGCifar(_VGG16_CFG, num_classes=num_classes, in_channels=in_channels)


def _torchvision_resnet(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return sources.build("torchvision", name, num_classes, in_channels, {})


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": partial(_resnet_cifar, 20),
    "resnet32": partial(_resnet_cifar, 32),
    "resnet44": partial(_resnet_cifar, 44),
    "resnet56": partial(_resnet_cifar, 56),
    "resnet110": partial(_resnet_cifar, 110),
    "vgg16": _vgg16,
    "resnet18": partial(_torchvision_resnet, "resnet18"),
    "resnet50": partial(_torchvision_resnet, "resnet50"),
}

_INPUT_SIZES: dict[str, int] = {"resnet18": 224, "resnet50": 224}


def names() -> list[str]:
    """List the model names :func:`create` accepts, in registry order.

    Returns:
        The known model names.

    Example:
        >>> names()[:2]
        ['resnet20', 'resnet32']
    """
    return list(MODELS)


def _check_positive(label: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TRPError(f"{label} must be a positive integer, got {value!r}")


def check_source(source: Any, what: str = "model") -> str:
    """A model source, checked without running any user code: a zoo name (:func:`names`) or one of
    ``torchvision:NAME``, ``timm:NAME``, ``hf:CONFIG.json``, ``python:MODULE:FUNCTION`` (see
    :func:`trp.sources.check_name`; a ``python:`` module is imported by :func:`create` only).

    Example:
        >>> check_source("torchvision:mobilenet_v2")
        'torchvision:mobilenet_v2'
        >>> check_source("torchvision:mobilenet_v9")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: unknown torchvision classification model 'mobilenet_v9' (did you mean mobilenet_v2, ...?); see torchvision.models.list_models(module=torchvision.models)
    """
    if not isinstance(source, str) or ":" not in source and source not in MODELS:
        raise TRPError(f"unknown {what} {source!r}; choose one of: {', '.join(MODELS)}, or {sources.HELP}")
    kind, rest = sources.split(source)
    if kind:
        sources.check_name(kind, rest, source, what)
    return source


def check(source: Any, kwargs: Any = None, what: str = "model") -> dict:
    """Check a source and its kwargs (a JSON object or its text, see :func:`trp.sources.check_kwargs`);
    returns the kwargs as a plain dict. Zoo models take none.

    Example:
        >>> check("timm:vit_tiny_patch16_224", '{"img_size": 32}')
        {'img_size': 32}
        >>> check("resnet20", {"width": 2})
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: model 'resnet20' takes no model-kwargs (they are for torchvision:NAME, timm:NAME, hf:CONFIG.json or python:MODULE:FUNCTION)
    """
    kind, _ = sources.split(check_source(source, what))
    out = sources.check_kwargs(kind, kwargs)
    if out and not kind:
        raise TRPError(f"model {source!r} takes no model-kwargs (they are for {sources.HELP})")
    return out


def portable_kwargs(source: str, kwargs: Mapping[str, Any] | None = None) -> dict:
    """The kwargs to record in a model file so that the file alone rebuilds the model: for
    ``hf:CONFIG.json`` the file's config with the overrides applied (``{"config": {...}}``);
    other sources' kwargs as :func:`check` returns them.

    Example:
        >>> portable_kwargs("timm:resnet18", {"drop_rate": 0.1})
        {'drop_rate': 0.1}
    """
    out = check(source, kwargs)
    kind, rest = sources.split(source)
    return sources.portable(kind, rest, out) if kind else out


def create(source: str, /, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model (random weights: nothing is ever downloaded).

    ``source`` is one of:

    * a zoo name (:func:`names`), e.g. ``"resnet56"`` (no kwargs);
    * ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=...,
      **kwargs)``, a classification model; for ``in_channels != 3`` its first conv is rebuilt;
    * ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...,
      **kwargs)`` (needs ``pip install timm``);
    * ``hf:CONFIG.json``: a transformers image classifier built from a local config file
      (``AutoModelForImageClassification.from_config``, never remote code), kwargs overriding the
      file's fields, or ``config={...}`` holding the whole config instead of the file (so model
      files are self-contained, see :func:`portable_kwargs`); wrapped in
      :class:`~trp.sources.HFClassifier` (needs ``pip install transformers``);
    * ``python:MODULE:FUNCTION``: the user's own factory, called with the kwargs plus
      ``num_classes``/``in_channels`` where its signature takes them. **This imports and runs
      MODULE**: loading a model file with a ``python:`` source is the same trust as running a
      script, so do it only with files you chose; the module must be importable from ``sys.path``
      or the current folder (nothing is ever unpickled).

    Args:
        source: The model source.
        num_classes: Number of output logits (>= 1).
        in_channels: Channels of the input image (>= 1), e.g. 1 for grayscale digits.
        **kwargs: The source's keyword arguments (JSON values; see :func:`check_kwargs`).

    Returns:
        The model, in training mode, on the CPU (or the current default device).

    Raises:
        TRPError: If the source or its kwargs are bad, a package is missing, or building fails.

    Example:
        >>> import torch
        >>> model = create("resnet20", num_classes=10, in_channels=1)
        >>> model(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
        >>> sum(p.numel() for p in create("resnet20").parameters())
        269722
        >>> create("torchvision:mobilenet_v2", num_classes=5, in_channels=1)(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 5])
    """
    kwargs = check(source, kwargs)
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    kind, rest = sources.split(source)
    if not kind:
        return MODELS[source](num_classes=num_classes, in_channels=in_channels)
    return sources.build(kind, rest, num_classes, in_channels, kwargs)


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise TRPError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


def default_input_size(name: str) -> int:
    """Return the image side a zoo model was designed for (informational only).

    Other sources declare theirs on the model (see :func:`trp.tracing.default_input_shape`).

    Args:
        name: One of :func:`names`.

    Returns:
        32 for the CIFAR models, 224 for the ImageNet (torchvision) ones.

    Raises:
        TRPError: If the name is unknown.

    Example:
        >>> default_input_size("resnet56"), default_input_size("resnet50")
        (32, 224)
    """
    _check_name(name)
    return _INPUT_SIZES.get(name, 32)
