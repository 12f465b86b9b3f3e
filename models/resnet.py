"""ResNets: CIFAR-style ResNet-56 (BasicBlock) and ImageNet-style ResNet-50-like (Bottleneck)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import build_on, check_size, seeded


class BasicBlock(nn.Module):
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


RESNET56_SIZES = {"tiny": dict(n=1, width=8, img=32), "full": dict(n=9, width=16, img=32)}
RESNET50_SIZES = {"tiny": dict(layers=(1, 1, 1, 1), width=8, img=64, num_classes=10),
                  "full": dict(layers=(3, 4, 6, 3), width=64, img=224, num_classes=1000)}


def build_resnet56(size: str = "tiny", seed: int = 0, device=None, **overrides) -> nn.Module:
    cfg = {**check_size(size, RESNET56_SIZES), **overrides}
    cfg.pop("img")
    with seeded(seed):
        return build_on(device, CifarResNet, **cfg)


def example_inputs_resnet56(size: str = "tiny", batch: int = 2, seed: int = 0) -> tuple:
    img = check_size(size, RESNET56_SIZES)["img"]
    return (torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed)),)


def build_resnet50(size: str = "tiny", seed: int = 0, device=None, **overrides) -> nn.Module:
    cfg = {**check_size(size, RESNET50_SIZES), **overrides}
    cfg.pop("img")
    with seeded(seed):
        return build_on(device, ImageNetResNet, **cfg)


def example_inputs_resnet50(size: str = "tiny", batch: int = 2, seed: int = 0) -> tuple:
    img = check_size(size, RESNET50_SIZES)["img"]
    return (torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed)),)
