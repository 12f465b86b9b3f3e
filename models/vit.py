"""ViT (timm layout): patch-embedding conv, class token, position embedding, pre-norm blocks with a fused qkv
Linear + SDPA, MLP fc1-GELU-fc2, final LayerNorm, class-token head.

Traces with ``torch.export`` and ``torch.fx.symbolic_trace``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import build_on, check_size, image_inputs, seeded


class Attention(nn.Module):
    """Multi-head self-attention: one fused ``qkv = nn.Linear(dim, 3 * dim)``, ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """forward(x: (B, 3, img, img)) -> logits (B, num_classes)."""

    def __init__(self, img: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 num_classes: int = 1000, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


SIZES = {
    "tiny": dict(img=32, patch=8, dim=64, depth=2, heads=4, num_classes=10),
    "full": dict(img=224, patch=16, dim=384, depth=12, heads=6, num_classes=1000),  # ViT-S/16
    "base": dict(img=224, patch=16, dim=768, depth=12, heads=12, num_classes=1000),  # ViT-B/16
}


def build(size: str = "tiny", seed: int = 0, device=None, **overrides) -> nn.Module:
    """ViT (size "tiny": 32x32, patch 8, dim 64, depth 2, 4 heads, 10 classes; "full": ViT-S/16; "base": ViT-B/16),
    deterministic in ``seed``. forward(x: (B, 3, img, img)) -> logits (B, num_classes).
    ``overrides`` replace constructor arguments; ``device="meta"`` allocates nothing."""
    cfg = {**check_size(size, SIZES), **overrides}
    with seeded(seed):
        return build_on(device, ViT, **cfg)


def example_inputs(size: str = "tiny", batch: int = 2, seed: int = 0) -> tuple:
    """``(x,)``: a (batch, 3, img, img) float image batch for ``size``."""
    return image_inputs(check_size(size, SIZES)["img"], batch, seed)
