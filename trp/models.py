"""Model zoo: the networks TRP is trained and evaluated on, built by name.

The CIFAR ResNets follow He et al. 2016 ("Deep Residual Learning", section 4.2) with the
parameter-free option-A shortcut, so ResNet-20 has the 0.27 M parameters quoted in the paper
(exactly 269,722; the 272,474 sometimes quoted is the option-B variant with 1x1-conv + BN
projections) and 40,551,040 multiply-accumulates on a 32x32 image.
VGG-16 is the usual CIFAR variant with batch norm and a single linear classifier. ResNet-18/50 come
from torchvision, which is imported only when one of them is asked for.

Example:
    >>> import torch
    >>> model = create("resnet20")
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trp.errors import TRPError

__all__ = [
    "MODELS",
    "BasicBlock",
    "ResNetCifar",
    "VGGCifar",
    "ZeroPadShortcut",
    "create",
    "default_input_size",
    "names",
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
    # Imported here so that `import trp` (and the CIFAR models) never need torchvision.
    try:
        import torchvision.models as tvm
    except ImportError as err:
        raise TRPError(f"model '{name}' needs torchvision: pip install torchvision") from err
    model: nn.Module = getattr(tvm, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        old = model.conv1
        assert isinstance(old, nn.Conv2d)
        model.conv1 = nn.Conv2d(
            in_channels,
            old.out_channels,
            kernel_size=old.kernel_size,  # type: ignore[arg-type]
            stride=old.stride,  # type: ignore[arg-type]
            padding=old.padding,  # type: ignore[arg-type]
            bias=old.bias is not None,
        )
        # Match torchvision's own init for convs so the replacement is not the odd one out.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


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


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise TRPError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


def _check_positive(label: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TRPError(f"{label} must be a positive integer, got {value!r}")


def create(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: One of :func:`names`, e.g. ``"resnet56"``.
        num_classes: Number of output logits (>= 1).
        in_channels: Channels of the input image (>= 1), e.g. 1 for grayscale digits.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        TRPError: If the name is unknown, a size is not a positive integer, or torchvision is
            missing for a torchvision model.

    Example:
        >>> import torch
        >>> model = create("resnet20", num_classes=10, in_channels=1)
        >>> model(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
        >>> sum(p.numel() for p in create("resnet20").parameters())
        269722
    """
    _check_name(name)
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


def default_input_size(name: str) -> int:
    """Return the image side a model was designed for (informational only).

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
