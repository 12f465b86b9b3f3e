"""ThinK: query-driven pruning of key-cache channels (Xu et al., arXiv 2407.21018).

At prefill, per layer and KV head, key channel ``j`` gets the score ``||Q_obs[:, j]|| * ||K[:, j]||`` (= the
Frobenius norm of its rank-1 share ``Q_obs[:, j] K[:, j]^T`` of the observation queries' logits), where ``Q_obs``
stacks the last ``observe`` prompt queries of every query head of the KV head's GQA group and ``K`` is every prompt
key. The ``floor(ratio * D)`` lowest-scoring channels are dropped: the cache stores the compact keys of all prompt
tokens but the last ``recent`` (``B x Hkv x P x (D - floor(ratio D))``) plus the kept channel indices; the last
``recent`` prompt tokens and every generated token keep all ``D`` channels. Values are untouched. Decode computes
``q[idx] . K_compact^T`` for the compact part and ``q . K_full^T`` for the rest, one softmax over both
(``decode="compact"``); ``decode="zero_fill"`` instead rebuilds dense keys with zeros in the dropped channels and
calls the model's own attention (what the authors' code does; numerically the same logits). Prefill attention
itself is dense (the pruning only affects what later tokens read).

Use::

    from fxprune.passes import ThinKCache, think
    model = think.apply(hf_model, ratio=0.4)            # patch once; model.generate(ids) now uses ThinKCache
    out = model.generate(ids, max_new_tokens=64)
    out = hf_model.generate(ids, cache=ThinKCache(ratio=0.5), max_new_tokens=64)   # or pass a cache explicitly

On our reference LLaMA: ``kv_cache.generate(model, ids, ThinKCache(...), n)`` / ``kv_cache.forward``.
``score="key"`` (``||K[:, j]||`` only) and ``score="random"`` are the ablations of the benchmark.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from fxprune.errors import InputError

from . import kv_cache
from .kv_cache import AttnCall, KVCache, KVLayer, Tensor, additive

SCORES = ("query", "key", "random")
DECODES = ("compact", "zero_fill")


def channel_scores(q_obs: Tensor, k: Tensor, *, score: str = "query", generator: torch.Generator | None = None
                   ) -> Tensor:
    """Per (batch, KV head, channel) scores (B, Hkv, D).

    ``q_obs`` (B, Hq, O, D): the observation queries; ``k`` (B, Hkv, T, D): the prompt keys. ``"query"``:
    ``||Q_obs[:, j]|| * ||K[:, j]||`` with ``Q_obs`` stacking the ``Hq / Hkv`` query heads of each GQA group;
    ``"key"``: ``||K[:, j]||``; ``"random"``: uniform noise (a random channel choice).
    """
    b, hkv, _, d = k.shape
    kn = k.float().pow(2).sum(2).sqrt()
    if score == "key":
        return kn
    if score == "random":
        return torch.rand((b, hkv, d), generator=generator).to(k.device)
    if score != "query":
        raise InputError(f"score must be one of {SCORES}, got {score!r}")
    rep = q_obs.shape[1] // hkv
    qn = q_obs.float().reshape(b, hkv, rep * q_obs.shape[2], d).pow(2).sum(2).sqrt()
    return qn * kn


def n_dropped(head_dim: int, ratio: float) -> int:
    """Channels dropped per KV head: ``floor(ratio * D)`` (the authors' ``int(head_dim * ratio)``)."""
    return int(math.floor(ratio * head_dim + 1e-9))


class ThinKLayer(KVLayer):
    """One layer of :class:`ThinKCache`.

    Stored: ``k_compact`` (B, Hkv, P, Dk) post-RoPE keys of the pruned prefix, ``idx`` (B, Hkv, Dk) int16 kept
    channel indices (sorted), ``k_full`` (B, Hkv, R, D) the recent + generated keys, ``values`` (B, Hkv, T, D).
    ``dropped_score`` (B, Hkv): the sum of the dropped channels' scores (bounds the observation logits' error).
    """

    def __init__(self, cfg: "ThinKCache"):
        super().__init__()
        self.cfg = cfg
        self.k_compact: Tensor | None = None
        self.idx: Tensor | None = None
        self.k_full: Tensor | None = None
        self.values: Tensor | None = None
        self.dropped_score: Tensor | None = None

    def reset(self) -> None:
        self.__init__(self.cfg)

    @property
    def n_compact(self) -> int:
        return 0 if self.k_compact is None else self.k_compact.shape[2]

    def tensors(self) -> dict[str, Tensor | None]:
        return {"keys": self.k_full, "keys_compact": self.k_compact, "key_index": self.idx, "values": self.values}

    # ------------------------------------------------------------------ prefill
    def compress(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Store the prompt's keys/values, pruning the key channels of all but the last ``recent`` tokens."""
        cfg = self.cfg
        b, hkv, t, d = k.shape
        p = max(t - cfg.recent, 0)
        drop = n_dropped(d, cfg.ratio)
        self.values = v.clone(memory_format=torch.contiguous_format)
        self.length = t
        if drop == 0 or p == 0:
            self.k_full = k.clone(memory_format=torch.contiguous_format)
            return
        scores = channel_scores(q[:, :, -cfg.observe:], k, score=cfg.score, generator=cfg.generator)
        order = scores.argsort(dim=-1, descending=True)
        keep = order[..., : d - drop].sort(dim=-1).values
        self.dropped_score = scores.gather(-1, order[..., d - drop:]).sum(-1)
        self.idx = keep.to(torch.int16 if d < 2 ** 15 else torch.int32)
        self.k_compact = k[:, :, :p].gather(-1, keep[:, :, None, :].expand(b, hkv, p, d - drop)).contiguous()
        self.k_full = k[:, :, p:].clone(memory_format=torch.contiguous_format)

    def dense_keys(self) -> Tensor:
        """All keys as (B, Hkv, T, D) with zeros in the dropped channels of the compact part (zero-fill decode)."""
        if self.k_compact is None:
            return self.k_full
        b, hkv, p, dk = self.k_compact.shape
        d = self.k_full.shape[-1]
        zf = self.k_full.new_zeros(b, hkv, p, d)
        zf.scatter_(-1, self.idx.long()[:, :, None, :].expand(b, hkv, p, dk), self.k_compact)
        return torch.cat([zf, self.k_full], dim=2)

    # ------------------------------------------------------------------ attention
    def attend(self, call: AttnCall) -> Tensor:
        if self.length == 0:
            out = call.fallback(call.q, call.k, call.v, call.mask)  # dense prefill
            self.compress(call.q, call.k, call.v)
            return out
        self.k_full = torch.cat([self.k_full, call.k], dim=2)
        self.values = torch.cat([self.values, call.v], dim=2)
        self.length += call.k.shape[2]
        if self.k_compact is None:
            return call.fallback(call.q, self.k_full, self.values, call.mask)
        if self.cfg.decode == "zero_fill":
            return call.fallback(call.q, self.dense_keys(), self.values, call.mask)
        return compact_attention(call.q, self.k_compact, self.idx, self.k_full, self.values, call.mask,
                                 call.scaling)


def compact_attention(q: Tensor, k_compact: Tensor, idx: Tensor, k_full: Tensor, values: Tensor,
                      mask: Tensor | None, scaling: float) -> Tensor:
    """softmax([q[idx] . K_compact^T, q . K_full^T] * scaling + mask) . V for GQA: q (B, Hq, L, D), k_compact
    (B, Hkv, P, Dk), idx (B, Hkv, Dk), k_full (B, Hkv, R, D), values (B, Hkv, P + R, D) -> (B, Hq, L, D)."""
    b, hq, n, d = q.shape
    hkv, p, dk = k_compact.shape[1], k_compact.shape[2], k_compact.shape[3]
    rep = hq // hkv
    t = p + k_full.shape[2]
    qg = q.reshape(b, hkv, rep, n, d)
    q_sel = qg.gather(-1, idx.long()[:, :, None, None, :].expand(b, hkv, rep, n, dk))
    s_c = torch.matmul(q_sel, k_compact[:, :, None].transpose(-1, -2))
    s_f = torch.matmul(qg, k_full[:, :, None].transpose(-1, -2))
    s = torch.cat([s_c, s_f], dim=-1).reshape(b, hq, n, t) * scaling
    s = s + additive(mask, n, t, s.dtype, s.device)
    w = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(w.reshape(b, hkv, rep, n, t), values[:, :, None])
    return out.reshape(b, hq, n, d)


class ThinKCache(KVCache):
    """KV cache with ThinK key-channel pruning (see the module docstring).

    ``ratio``: fraction of key channels dropped per KV head (``floor(ratio * D)``); ``observe``: observation
    window (last prompt queries used for scoring); ``recent``: prompt tokens kept at full width; ``score``:
    ``"query"`` (ThinK), ``"key"`` (``||K_j||`` only) or ``"random"`` (seeded by ``seed``); ``decode``:
    ``"compact"`` or ``"zero_fill"``. ``ratio=0`` keeps every channel: the cache is then a plain dense cache and
    decoding equals the unpruned model's bit for bit. ``nbytes()`` gives the measured bytes by role.
    """

    def __init__(self, ratio: float = 0.4, observe: int = 32, recent: int = 32, *, score: str = "query",
                 decode: str = "compact", seed: int = 0):
        if not 0.0 <= ratio < 1.0:
            raise InputError(f"ratio must be in [0, 1), got {ratio}")
        if observe < 1 or recent < 0:
            raise InputError(f"observe must be >= 1 and recent >= 0, got observe={observe}, recent={recent}")
        if score not in SCORES:
            raise InputError(f"score must be one of {SCORES}, got {score!r}")
        if decode not in DECODES:
            raise InputError(f"decode must be one of {DECODES}, got {decode!r}")
        super().__init__()
        self.ratio, self.observe, self.recent = float(ratio), int(observe), int(recent)
        self.score, self.decode, self.seed = score, decode, int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def new_layer(self) -> ThinKLayer:
        return ThinKLayer(self)

    def options(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "observe": self.observe, "recent": self.recent, "score": self.score,
                "decode": self.decode, "seed": self.seed}

    def __repr__(self) -> str:
        return "ThinKCache(" + ", ".join(f"{k}={v!r}" for k, v in self.options().items()) + ")"


def apply(model: nn.Module, ratio: float = 0.4, observe: int = 32, recent: int = 32, **kwargs: Any) -> nn.Module:
    """Patch ``model`` in place (:func:`fxprune.passes.kv_cache.enable`) and make its ``generate`` use a fresh
    ``ThinKCache(ratio, observe, recent, **kwargs)`` whenever no cache is passed. Returns ``model``; undo with
    ``kv_cache.disable(model)``. Our reference LLaMA has no ``generate``: use ``kv_cache.generate``."""
    ThinKCache(ratio, observe, recent, **kwargs)  # validate now
    kv_cache.enable(model)
    if not kv_cache.is_reference_llama(model):
        kv_cache.set_default_cache(model, lambda: ThinKCache(ratio, observe, recent, **kwargs))
    return model
