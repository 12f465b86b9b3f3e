"""A YOLOv8-style detector (Ultralytics layout): Conv-BN-SiLU, C2f, SPPF, FPN/PAN neck, 3-scale decoupled Detect head.

C2f halves its cv1 output with ``.split((c, c), 1)`` by default and with ``.chunk(2, 1)`` in the P3 stage
(``use_chunk=True``), so both forms occur. The head returns raw per-level maps ``cat([box, cls], 1)``; no anchor
decoding / DFL. Traces with ``torch.export`` and ``torch.fx.symbolic_trace`` (the halves are indexed rather than
``list(...)``-ed as in Ultralytics, because symbolic_trace cannot iterate a Proxy).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import build_on, check_size, image_inputs, seeded


class Conv(nn.Module):
    """Conv2d(bias=False) + BatchNorm2d + SiLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, residual add when ``shortcut``."""

    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """cv1 to 2c, split in two, n bottlenecks on the second half, concat everything, cv2."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False, use_chunk: bool = False):
        super().__init__()
        self.c = cout // 2
        self.use_chunk = use_chunk
        self.cv1 = Conv(cin, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_chunk:
            halves = self.cv1(x).chunk(2, 1)
        else:
            halves = self.cv1(x).split((self.c, self.c), 1)
        y = [halves[0], halves[1]]  # Ultralytics: list(...chunk(2, 1)); indexing keeps symbolic_trace working
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """cv1, three chained MaxPool2d(5, 1, 2), concat of the four maps, cv2."""

    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__()
        c = cin // 2
        self.cv1, self.cv2 = Conv(cin, c, 1), Conv(c * 4, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Detect(nn.Module):
    """Decoupled head per scale: box branch (2 Conv + 1x1 to 4*reg_max), cls branch (2 Conv + 1x1 to nc)."""

    def __init__(self, nc: int, chs: tuple[int, ...], reg_max: int = 16):
        super().__init__()
        c2, c3 = max(16, chs[0] // 4, reg_max * 4), max(chs[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for x in chs)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in chs)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat((b(x), c(x)), 1) for x, b, c in zip(xs, self.cv2, self.cv3)]


class YOLOv8(nn.Module):
    """Backbone (P3/P4/P5 + SPPF), FPN top-down (Upsample + cat), PAN bottom-up (stride-2 Conv + cat), Detect.
    forward(x) -> list of 3 maps (B, 4 * reg_max + nc, H/s, W/s), s = 8, 16, 32."""

    def __init__(self, width: float = 0.25, depth: float = 0.33, nc: int = 80, reg_max: int = 16):
        super().__init__()
        ch = lambda c: max(8, int(c * width) // 8 * 8)  # noqa: E731
        n = lambda k: max(1, round(k * depth))  # noqa: E731
        c1, c2, c3, c4, c5 = ch(64), ch(128), ch(256), ch(512), ch(1024)
        self.stem = Conv(3, c1, 3, 2)
        self.b1 = nn.Sequential(Conv(c1, c2, 3, 2), C2f(c2, c2, n(3), True))
        self.b2 = nn.Sequential(Conv(c2, c3, 3, 2), C2f(c3, c3, n(6), True, use_chunk=True))  # P3
        self.b3 = nn.Sequential(Conv(c3, c4, 3, 2), C2f(c4, c4, n(6), True))  # P4
        self.b4 = nn.Sequential(Conv(c4, c5, 3, 2), C2f(c5, c5, n(3), True), SPPF(c5, c5))  # P5
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h1 = C2f(c5 + c4, c4, n(3))
        self.h2 = C2f(c4 + c3, c3, n(3))
        self.d1 = Conv(c3, c3, 3, 2)
        self.h3 = C2f(c3 + c4, c4, n(3))
        self.d2 = Conv(c4, c4, 3, 2)
        self.h4 = C2f(c4 + c5, c5, n(3))
        self.detect = Detect(nc, (c3, c4, c5), reg_max)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.b2(self.b1(self.stem(x)))
        p4 = self.b3(p3)
        p5 = self.b4(p4)
        f4 = self.h1(torch.cat([self.up(p5), p4], 1))
        n3 = self.h2(torch.cat([self.up(f4), p3], 1))
        n4 = self.h3(torch.cat([self.d1(n3), f4], 1))
        n5 = self.h4(torch.cat([self.d2(n4), p5], 1))
        return self.detect([n3, n4, n5])


SIZES = {"tiny": dict(width=0.125, depth=0.33, nc=4, img=64), "full": dict(width=0.25, depth=0.33, nc=80, img=320)}


def build(size: str = "tiny", seed: int = 0, device=None, **overrides) -> nn.Module:
    """The YOLOv8-style detector (size "full": YOLOv8n widths/depths, nc 80, 320x320; "tiny": width 0.125, nc 4,
    64x64), deterministic in ``seed``. forward(x: (B, 3, H, W)) -> [P3, P4, P5], P_i of shape
    (B, 4 * reg_max + nc, H / s_i, W / s_i) for strides 8, 16, 32 (box distribution channels first, then classes).
    ``overrides`` replace constructor arguments; ``device="meta"`` allocates nothing."""
    cfg = {**check_size(size, SIZES), **overrides}
    cfg.pop("img")
    with seeded(seed):
        return build_on(device, YOLOv8, **cfg)


def example_inputs(size: str = "tiny", batch: int = 2, seed: int = 0) -> tuple:
    """``(x,)``: a (batch, 3, img, img) float image batch for ``size``."""
    return image_inputs(check_size(size, SIZES)["img"], batch, seed)
