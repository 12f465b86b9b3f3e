"""ResNets, torchvision style: CIFAR ResNet-56 (BasicBlock) and ImageNet-style ResNet-50-like (Bottleneck).

Shortcuts are ``identity`` or a 1x1-conv+BN ``downsample`` when the stride or the width changes; ReLUs are
``nn.ReLU(inplace=True)``. Registered as ``resnet56`` and ``resnet50`` (see :mod:`.resnet56`, :mod:`.resnet50`);
``build(variant=...)`` picks one directly. Both trace with ``torch.fx.symbolic_trace`` and ``torch.export``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import build_on, check_size, image_inputs, seeded


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN + shortcut, ReLU (ResNet v1.5 stride placement)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n BasicBlocks (16, 32, 64 channels at width 1)."""

    def __init__(self, n: int = 9, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for stage, mult in enumerate((1, 2, 4)):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(cin, width * mult, stride))
                cin = width * mult
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ImageNetResNet(nn.Module):
    """ResNet-50-like: 7x7 stem + maxpool, Bottleneck stages, adaptive avgpool, flatten, fc."""

    def __init__(self, layers=(3, 4, 6, 3), width: int = 64, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, n in enumerate(layers):
            w = width * (2 ** i)
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


RESNET56_SIZES = {"tiny": dict(n=1, width=8, num_classes=10, img=32),    # ResNet-8, ~20K params
                  "full": dict(n=9, width=16, num_classes=10, img=32)}    # ResNet-56, ~0.86M params
RESNET50_SIZES = {"tiny": dict(layers=(1, 1, 1, 1), width=8, num_classes=10, img=64),     # ~0.13M params
                  "full": dict(layers=(3, 4, 6, 3), width=64, num_classes=1000, img=224)}  # ~25.6M params
VARIANTS = {"resnet56": (CifarResNet, RESNET56_SIZES), "resnet50": (ImageNetResNet, RESNET50_SIZES)}
SIZES = RESNET56_SIZES  # sizes of the default variant


def _variant(variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"unknown ResNet variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def build(size: str = "tiny", seed: int = 0, device=None, variant: str = "resnet56", **overrides) -> nn.Module:
    """A randomly initialised ResNet (``variant`` "resnet56": CIFAR, or "resnet50": ImageNet-style), deterministic
    in ``seed``. ``overrides`` replace constructor arguments of the size's config. forward(x: (B, 3, img, img))
    -> logits (B, num_classes)."""
    ctor, sizes = _variant(variant)
    cfg = {**check_size(size, sizes), **overrides}
    cfg.pop("img")
    with seeded(seed):
        return build_on(device, ctor, **cfg)


def example_inputs(size: str = "tiny", batch: int = 2, seed: int = 0, variant: str = "resnet56") -> tuple:
    """``(x,)``: a (batch, 3, img, img) float image batch for ``size`` of ``variant``."""
    return image_inputs(check_size(size, _variant(variant)[1])["img"], batch, seed)


def build_resnet56(size: str = "tiny", seed: int = 0, device=None, **overrides) -> nn.Module:
    """CIFAR ResNet-56 (size "full") or ResNet-8 (size "tiny"); forward(x: (B, 3, 32, 32)) -> (B, 10)."""
    return build(size, seed, device, variant="resnet56", **overrides)


def example_inputs_resnet56(size: str = "tiny", batch: int = 2, seed: int = 0) -> tuple:
    return example_inputs(size, batch, seed, variant="resnet56")


def build_resnet50(size: str = "tiny", seed: int = 0, device=None, **overrides) -> nn.Module:
    """ResNet-50-like (size "full": 224x224 -> 1000 classes; "tiny": [1,1,1,1] bottlenecks, 64x64 -> 10)."""
    return build(size, seed, device, variant="resnet50", **overrides)


def example_inputs_resnet50(size: str = "tiny", batch: int = 2, seed: int = 0) -> tuple:
    return example_inputs(size, batch, seed, variant="resnet50")
