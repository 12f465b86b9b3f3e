"""A LLaMA-style decoder-only LM (HF ``modeling_llama`` layout): RMSNorm (float32), rotary embeddings, GQA via
``repeat_kv`` + causal SDPA, SwiGLU MLP, final RMSNorm, lm_head tied to the embedding.

Parameter names follow HF: ``embed_tokens``, ``layers.N.self_attn.{q,k,v,o}_proj``,
``layers.N.mlp.{gate,up,down}_proj``, ``layers.N.{input,post_attention}_layernorm``, ``norm``, ``lm_head``
(``lm_head.weight is embed_tokens.weight``).
Traces with ``torch.export`` (no attention_mask: the ``is_causal=True`` path). ``torch.fx.symbolic_trace`` succeeds
but, without ``concrete_args={"attention_mask": None}``, the ``attention_mask is not None`` test sees a Proxy and
records the padding-mask branch, so the traced module then requires an attention_mask.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import build_on, check_size, seeded


class RMSNorm(nn.Module):
    """weight * x / rms(x), the normalisation computed in float32 and cast back (as HF)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, kv, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class Rotary(nn.Module):
    """cos/sin tables (seq, head_dim) for positions 0..seq-1 from the ``inv_freq`` buffer (non-persistent, so on the
    meta device it stays meta like the weights), cast to the activations' dtype."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq, device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class Attention(nn.Module):
    """q/k/v/o projections (bias=False), RoPE on q and k, k/v repeated to the query heads, SDPA (default scale)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, inter: int):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(hidden), RMSNorm(hidden)
        self.self_attn = Attention(hidden, heads, kv_heads)
        self.mlp = MLP(hidden, inter)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLM(nn.Module):
    """forward(input_ids: (B, S) long, attention_mask: (B, S) | None = None) -> logits (B, S, vocab) in the
    embedding's dtype.

    ``attention_mask`` (1 = token, 0 = padding) is optional. Without it attention is plain causal
    (``is_causal=True``). With it, keys at padding positions are masked out on top of the causal mask; every query
    may still attend to itself, so rows of padding queries stay finite (their logits are meaningless). Positions are
    always 0..S-1 (no position shift for left padding).
    """

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inter: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(DecoderLayer(hidden, heads, kv_heads, inter) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.rotary = Rotary(hidden // heads)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s = input_ids.shape
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(x, s)
        mask = None
        if attention_mask is not None:  # (B, 1, S, S) bool, True = may attend
            pos = torch.arange(s, device=input_ids.device)
            causal, diag = pos[None, :] <= pos[:, None], pos[None, :] == pos[:, None]
            mask = causal[None, None] & (attention_mask[:, None, None, :].bool() | diag[None, None])
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


SIZES = {
    "tiny": dict(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, seq=8),
    "full": dict(vocab=32000, hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, seq=16),  # ~1.04B (tied)
}


def build(size: str = "tiny", seed: int = 0, device=None, **overrides) -> nn.Module:
    """The LLaMA-style LM (size "tiny": vocab 128, hidden 64, 2 layers, 4 q / 2 kv heads, intermediate 128;
    "full": vocab 32000, hidden 2048, 16 layers, 32 q / 8 kv heads, intermediate 8192, ~1.04B parameters),
    deterministic in ``seed``. ``device="meta"`` constructs under ``torch.device("meta")``: no storage is allocated.
    ``overrides`` replace constructor arguments (vocab, hidden, layers, heads, kv_heads, inter)."""
    cfg = {**check_size(size, SIZES), **overrides}
    cfg.pop("seq")
    with seeded(seed):
        return build_on(device, LlamaLM, **cfg)


def example_inputs(size: str = "tiny", batch: int = 2, seed: int = 0) -> tuple:
    """``(input_ids,)``: a (batch, seq) LongTensor of token ids in [0, vocab) (seq 8 tiny, 16 full)."""
    cfg = check_size(size, SIZES)
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg["vocab"], (batch, cfg["seq"]), generator=g),)
