"""Small modules for every hard case of DESIGN.md (shared by tests)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ResidualChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.b1 = nn.Sequential(cbr(16, 16), nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.b2 = nn.Sequential(cbr(16, 16), nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = F.relu(x + self.b2(x))
        return self.head(x.mean((2, 3)))


class ConcatOfConcats(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 8), cbr(3, 12), cbr(3, 6)
        self.mix = cbr(20, 16, 1)
        self.out = nn.Conv2d(16 + 6 + 20, 10, 1)

    def forward(self, x):
        ab = torch.cat([self.a(x), self.b(x)], dim=1)
        abc = torch.cat([self.mix(ab), torch.cat([self.c(x), ab], dim=-3)], dim=1)
        return self.out(abc).mean((2, 3))


class UnequalSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 24)
        self.p1, self.p2, self.p3 = cbr(4, 8), cbr(8, 8), cbr(12, 8)
        self.out = nn.Conv2d(8 + 8 + 24, 5, 1)

    def forward(self, x):
        y = self.stem(x)
        a, b, c = torch.split(y, [4, 8, 12], dim=1)
        z = torch.cat([self.p1(a) + self.p2(b), self.p3(c), y], dim=1)
        return self.out(z)


class FlattenClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 32), nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.fc(self.f(x))


class DepthwiseGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.dw = cbr(32, 32, 3, 1, g=32)
        self.gc = cbr(32, 64, 3, 1, g=4)
        self.pw = cbr(64, 32, 1)
        self.head = nn.Linear(32, 7)

    def forward(self, x):
        x = self.stem(x)
        x = self.pw(self.gc(self.dw(x))) + x
        return self.head(x.mean((2, 3)))


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int = 2):
        super().__init__()
        self.g = groups
        self.stem = cbr(3, 32)
        self.branch = cbr(16, 16)
        self.out = nn.Conv2d(32, 6, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = x.shape
        x = x.view(n, self.g, c // self.g, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.out(x)


class PixelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = cbr(3, 16 * 4)
        self.c2 = cbr(16, 32)
        self.c3 = nn.Conv2d(32 * 4, 3, 3, 1, 1)

    def forward(self, x):
        y = F.pixel_shuffle(self.c1(x), 2)
        y = F.pixel_unshuffle(self.c2(y), 2)
        return self.c3(y)


class TransposedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = cbr(3, 16, 3, 2)
        self.up = nn.ConvTranspose2d(16, 24, 4, 2, 1)
        self.bn = nn.BatchNorm2d(24)
        self.upg = nn.ConvTranspose2d(24, 24, 3, 1, 1, groups=3)
        self.out = nn.Conv2d(24, 3, 1)

    def forward(self, x):
        return self.out(F.relu(self.upg(F.relu(self.bn(self.up(self.enc(x)))))))


class GQAAttention(nn.Module):
    """LLaMA-style attention: separate q/k/v, kv heads < q heads via repeat_kv, SDPA with the default scale."""

    def __init__(self, dim: int = 64, heads: int = 8, kv_heads: int = 2, use_enable_gqa: bool = False):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, dim, bias=False)
        self.enable_gqa = use_enable_gqa
        self.inp = nn.Linear(16, dim)
        self.head = nn.Linear(dim, 16)

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv, self.d).transpose(1, 2)
        if self.enable_gqa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            rep = self.h // self.kv
            k = k[:, :, None].expand(b, self.kv, rep, n, self.d).reshape(b, self.h, n, self.d)
            v = v[:, :, None].expand(b, self.kv, rep, n, self.d).reshape(b, self.h, n, self.d)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, n, self.h * self.d)
        return self.head(x + self.o(y))


class FusedQKVLayerNorm(nn.Module):
    """ViT block: LayerNorm over channels (freezes the residual stream), fused qkv, SDPA default scale, MLP."""

    def __init__(self, dim: int = 48, heads: int = 4):
        super().__init__()
        self.h = heads
        self.embed = nn.Linear(12, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x[:, 0])


class TiedEmbedding(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.SiLU(), nn.Linear(64, dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.mlp(h)
        return self.lm_head(h)


class SharedConvTwice(nn.Module):
    """One conv module (one parameter) applied twice: a parameter used twice."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.shared = nn.Conv2d(16, 16, 3, 1, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.out(x)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(cbr(3, 16), cbr(16, 32, 3, 2))
        self.cls = nn.Sequential(cbr(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        self.reg = nn.Sequential(cbr(32, 16), nn.Conv2d(16, 4, 1))

    def forward(self, x):
        f = self.backbone(x)
        return self.cls(f), self.reg(f)


class ChannelsLast(nn.Module):
    """ConvNeXt-style: permute to NHWC, LayerNorm-free MLP on the last dim, permute back."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.dw = nn.Conv2d(16, 16, 7, 1, 3, groups=16)
        self.pw1, self.pw2 = nn.Linear(16, 64), nn.Linear(64, 16)
        self.gamma = nn.Parameter(torch.full((16,), 0.5))
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(y))) * self.gamma
        return self.out(x + y.permute(0, 3, 1, 2))


class GroupNormUpsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, 2, 1)
        self.gn = nn.GroupNorm(8, 32)
        self.c2 = nn.Conv2d(32, 16, 3, 1, 1)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.out = nn.Conv2d(16 + 3, 3, 1)

    def forward(self, x):
        y = F.silu(self.gn(self.c1(x)))
        y = F.interpolate(F.relu(self.inorm(self.c2(y))), scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(torch.cat([y, x], dim=1))


class TorchMHA(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, dim))
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        h = h + a
        return self.out(h + self.ff(h))


class EinsumStackUnbind(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(10, 24), nn.Linear(10, 24)
        self.w = nn.Parameter(torch.randn(24, 16) * 0.2)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        s = torch.stack([self.a(x), self.b(x)], dim=0)
        p, q = s.unbind(0)
        y = torch.einsum("bi,ij->bj", F.relu(p) * q, self.w)
        return self.out(y)


class SpatialAsChannels(nn.Module):
    """EfficientViM-style state mixer: a per-channel state dim S (a prunable channel space of the projection) is the
    *length* of later 1d convs. A 1x1 conv is pointwise along it (S stays prunable); a k=3 conv's output length
    depends on it, so S must freeze there (regression: timm efficientvim / bat_resnext shrank it inconsistently)."""

    def __init__(self, k: int = 1):
        super().__init__()
        self.s = 12
        self.proj = nn.Conv1d(8, 3 * self.s, 1)
        self.mix = nn.Conv1d(8, 8, k, padding=k // 2)
        self.out = nn.Conv1d(8, 8, 1)

    def forward(self, x):  # x: (B, 8, L)
        b, c, dt = torch.split(self.proj(x), [self.s, self.s, self.s], dim=1)
        ab = b * torch.sigmoid(dt)
        h = x @ ab.transpose(-2, -1)  # (B, 8, S): S plays the length of the convs below
        h = self.mix(h)
        return self.out(h @ c)  # (B, 8, L)


class RegisterTokensSDPA(nn.Module):
    """NaFlexViT-style block: learned register tokens (a (1, R, C) parameter, R > 1) concatenated to the patch
    tokens, then SDPA over the sequence. The register positions must not be a prunable space: a zeroed key still
    takes softmax weight, so removing it changes every output (regression: timm naflexvit_base_patch16_parfac_gap
    refused with a structural mismatch at blocks.0.attn's SDPA)."""

    def __init__(self, dim: int = 32, heads: int = 4, regs: int = 4):
        super().__init__()
        self.h = heads
        self.embed = nn.Linear(12, dim)
        self.reg_token = nn.Parameter(torch.randn(1, regs, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)
        self.regs = regs

    def forward(self, x):
        x = self.embed(x)
        b = x.shape[0]
        x = torch.cat([self.reg_token.expand(b, -1, -1), x], dim=1)
        n, c = x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        return self.head(x[:, self.regs:].mean(1))


class HaloUnfold(nn.Module):
    """timm HaloAttention's windows: a 1x1 kv conv, zero padding by the halo, ``unfold`` over H then W into
    overlapping windows, heads folded into the batch by a reshape, k/v split per head, softmax over the window.
    ``unfold`` had no rule (every channel through it froze; timm halonet/sehalonet/lamhalobotnet); now the window
    dims freeze and channels (per-head dims, heads) pass through."""

    def __init__(self, dim: int = 16, heads: int = 2, dqk: int = 4, dv: int = 6, block: int = 4, halo: int = 1):
        super().__init__()
        self.h, self.dqk, self.dv, self.bs, self.halo = heads, dqk, dv, block, halo
        self.stem = cbr(3, dim)
        self.q = nn.Conv2d(dim, heads * dqk, 1, bias=False)
        self.kv = nn.Conv2d(dim, heads * (dqk + dv), 1, bias=False)
        self.out = nn.Conv2d(heads * dv, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        B, _, H, W = x.shape
        nh, nw, bs, win = H // self.bs, W // self.bs, self.bs, self.bs + 2 * self.halo
        q = self.q(x).reshape(-1, self.dqk, nh, bs, nw, bs).permute(0, 1, 3, 5, 2, 4)
        q = q.reshape(B * self.h, self.dqk, -1, nh * nw).transpose(1, 3)  # (B*h, blocks, bs*bs, dqk)
        kv = F.pad(self.kv(x), [self.halo] * 4)
        kv = kv.unfold(2, win, bs).unfold(3, win, bs).reshape(B * self.h, self.dqk + self.dv, nh * nw, -1)
        k, v = torch.split(kv.permute(0, 2, 3, 1), [self.dqk, self.dv], dim=-1)
        attn = ((q @ k.transpose(-1, -2)) * self.dqk ** -0.5).softmax(dim=-1)
        y = (attn @ v).transpose(1, 3)  # (B*h, dv, bs*bs, blocks)
        y = y.reshape(-1, self.dv, bs, bs, nh, nw).permute(0, 1, 4, 2, 5, 3).reshape(B, self.h * self.dv, H, W)
        return self.out(y)


CASES = {
    "residual_chain": (ResidualChain, lambda: (torch.randn(2, 3, 16, 16),)),
    "concat_of_concats": (ConcatOfConcats, lambda: (torch.randn(2, 3, 16, 16),)),
    "unequal_split": (UnequalSplit, lambda: (torch.randn(2, 3, 16, 16),)),
    "flatten_classifier": (FlattenClassifier, lambda: (torch.randn(2, 3, 16, 16),)),
    "depthwise_grouped": (DepthwiseGrouped, lambda: (torch.randn(2, 3, 16, 16),)),
    "channel_shuffle": (ChannelShuffle, lambda: (torch.randn(2, 3, 16, 16),)),
    "pixel_shuffle": (PixelShuffleNet, lambda: (torch.randn(2, 3, 16, 16),)),
    "transposed_conv": (TransposedConv, lambda: (torch.randn(2, 3, 16, 16),)),
    "gqa_repeat_kv": (GQAAttention, lambda: (torch.randn(2, 6, 16),)),
    "gqa_enable_gqa": (lambda: GQAAttention(use_enable_gqa=True), lambda: (torch.randn(2, 6, 16),)),
    "vit_block_layernorm": (FusedQKVLayerNorm, lambda: (torch.randn(2, 5, 12),)),
    "tied_embedding": (TiedEmbedding, lambda: (torch.randint(0, 50, (2, 7)),)),
    "shared_conv_twice": (SharedConvTwice, lambda: (torch.randn(2, 3, 16, 16),)),
    "two_heads": (TwoHeads, lambda: (torch.randn(2, 3, 16, 16),)),
    "channels_last": (ChannelsLast, lambda: (torch.randn(2, 3, 16, 16),)),
    "groupnorm_upsample": (GroupNormUpsample, lambda: (torch.randn(2, 3, 16, 16),)),
    "torch_mha": (TorchMHA, lambda: (torch.randn(2, 5, 8),)),
    "einsum_stack_unbind": (EinsumStackUnbind, lambda: (torch.randn(3, 10),)),
    "spatial_as_channels_1x1": (SpatialAsChannels, lambda: (torch.randn(2, 8, 10),)),
    "spatial_as_channels_k3": (lambda: SpatialAsChannels(k=3), lambda: (torch.randn(2, 8, 10),)),
    "register_tokens_sdpa": (RegisterTokensSDPA, lambda: (torch.randn(2, 6, 12),)),
    "halo_unfold": (HaloUnfold, lambda: (torch.randn(2, 3, 8, 8),)),
}


def build(name: str, seed: int = 0):
    from fxprune.testing import make_observable

    ctor, inputs = CASES[name]
    torch.manual_seed(seed)
    model = make_observable(ctor().eval(), seed)
    torch.manual_seed(seed + 1)
    return model, inputs()
