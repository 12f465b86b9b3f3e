"""MobileNetV2 (torchvision layout): inverted residuals (expand 1x1, depthwise 3x3 with groups=C, linear 1x1
projection), residual add when stride 1 and in == out, ReLU6, classifier Dropout + Linear.

Traces with ``torch.export`` and ``torch.fx.symbolic_trace``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import build_on, check_size, image_inputs, seeded


def _cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] - 3x3 depthwise-BN-ReLU6 - 1x1 project-BN (linear bottleneck) [+ x]."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [_cbr(cin, hidden, 1)]
        layers += [_cbr(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """forward(x: (B, 3, H, W)) -> logits (B, num_classes). ``depth`` caps the blocks per stage (None: the paper's)."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, width: float = 1.0, num_classes: int = 1000, depth: int | None = None):
        super().__init__()
        c = lambda v: max(8, int(v * width + 4) // 8 * 8)  # noqa: E731 - round to multiples of 8
        cin, last = c(32), c(1280) if width > 1 else 1280
        feats = [_cbr(3, cin, 3, 2)]
        settings = self.SETTINGS if depth is None else [(t, ch, min(n, depth), s) for t, ch, n, s in self.SETTINGS]
        for t, ch, n, s in settings:
            for i in range(n):
                feats.append(InvertedResidual(cin, c(ch), s if i == 0 else 1, t))
                cin = c(ch)
        last = last if depth is None else c(320)
        feats.append(_cbr(cin, last, 1))
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


SIZES = {"tiny": dict(width=0.25, depth=1, num_classes=10, img=32),
         "full": dict(width=1.0, depth=None, num_classes=1000, img=224)}


def build(size: str = "tiny", seed: int = 0, device=None, **overrides) -> nn.Module:
    """MobileNetV2 (size "full": width 1.0, 224x224, 1000 classes; "tiny": width 0.25, one block per stage, 32x32,
    10 classes), deterministic in ``seed``. forward(x: (B, 3, img, img)) -> logits (B, num_classes).
    ``overrides`` replace constructor arguments; ``device="meta"`` allocates nothing."""
    cfg = {**check_size(size, SIZES), **overrides}
    cfg.pop("img")
    with seeded(seed):
        return build_on(device, MobileNetV2, **cfg)


def example_inputs(size: str = "tiny", batch: int = 2, seed: int = 0) -> tuple:
    """``(x,)``: a (batch, 3, img, img) float image batch for ``size``."""
    return image_inputs(check_size(size, SIZES)["img"], batch, seed)
