"""A multitask CNN: shared conv-BN-ReLU backbone with a residual block, then two heads on the shared features: a
classification head (global pool, Linear to 10) and a regression head (conv branch, pool, Linear to 4).

Traces with ``torch.export`` and ``torch.fx.symbolic_trace``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import build_on, check_size, image_inputs, seeded


def _cbr(cin: int, cout: int, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MultiTaskNet(nn.Module):
    """forward(x) -> (class logits (B, num_classes), box regression (B, 4))."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem = _cbr(3, width)
        self.down = _cbr(width, 2 * width, 2)
        self.res = nn.Sequential(_cbr(2 * width, 2 * width), nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False),
                                 nn.BatchNorm2d(2 * width))
        self.relu = nn.ReLU(inplace=True)
        self.cls_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))
        self.reg_branch = nn.Sequential(_cbr(2 * width, width), _cbr(width, width, 2))
        self.reg_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.down(self.stem(x))
        f = self.relu(f + self.res(f))
        return self.cls_head(f), self.reg_head(self.reg_branch(f))


SIZES = {"tiny": dict(width=16, num_classes=10, img=32), "full": dict(width=64, num_classes=10, img=128)}


def build(size: str = "tiny", seed: int = 0, device=None, **overrides) -> nn.Module:
    """The multitask CNN (size "tiny": width 16, 32x32; "full": width 64, 128x128), deterministic in ``seed``.
    forward(x: (B, 3, img, img)) -> (logits (B, 10), regression (B, 4)).
    ``overrides`` replace constructor arguments; ``device="meta"`` allocates nothing."""
    cfg = {**check_size(size, SIZES), **overrides}
    cfg.pop("img")
    with seeded(seed):
        return build_on(device, MultiTaskNet, **cfg)


def example_inputs(size: str = "tiny", batch: int = 2, seed: int = 0) -> tuple:
    """``(x,)``: a (batch, 3, img, img) float image batch for ``size``."""
    return image_inputs(check_size(size, SIZES)["img"], batch, seed)
