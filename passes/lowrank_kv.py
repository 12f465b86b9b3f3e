"""CSKV: low-rank keys/values with a bi-branch KV cache (Wang et al., arXiv 2409.10593).

``k_proj`` / ``v_proj`` (``W``, out x in) get a low-rank pair ``W^T ~ A^T B^T`` of rank ``r = int(density * D) *
H_kv`` (the authors' per-head compressed width times the KV heads) from a truncated SVD of ``W^T`` (``"svd"``), or
of ``diag(s) W^T`` with ``s = (mean |x| + 1e-6) ** 0.5`` over calibration activations, ``A`` then rescaled by
``diag(1/s)`` (``"asvd"``); ``sqrt(Sigma)`` is split between ``A`` and ``B``. ``"lsq"`` (ours, not the paper's)
solves the layer-wise MSE objective of the fitting step in closed form (a whitened SVD over the calibration
inputs' second moment). The cache stores the rank-``r``
features ``c = x A^T`` *before* RoPE; attention reads ``K = RoPE(c B_K^T)`` and ``V = c B_V^T``.

Bi-branch cache (the authors' "parallel inference"): the model keeps its original projections. The current window
(absolute positions ``[W floor(t / W), t]``, ``window=32``) is held as original full-precision K/V; when a window
completes, its features ``c`` replace it, optionally quantised (``bits=4|8``; keys per channel over the window's
tokens, values per token over groups of ``r / H_kv``; min-max asymmetric, fp16 scale and zero point). Prefill
attention is exact (original K/V); only tokens that read older windows see the compressed cache. A multi-token call
after prefill (teacher forcing) is split at window boundaries, so every query sees exactly what it would see when
decoding token by token.

``fit_lowrank_kv(model, loader, steps)`` trains only the pairs on the layer-wise MSE of K and V against the frozen
model's own K and V (the authors' objective), a few hundred Adam steps.

Use::

    from fxprune.passes import LowRankKV
    from fxprune.passes.lowrank_kv import fit_lowrank_kv
    model = LowRankKV(k_density=0.5, v_density=0.5, method="asvd", calib=batches, bits=4).apply(hf_model)
    fit_lowrank_kv(model, batches, steps=300)     # optional
    model.generate(ids, max_new_tokens=64)        # uses a fresh LowRankKVCache(window=32, bits=4)

For models without a KV cache (encoders such as all-MiniLM-L6-v2), ``LowRankKV(...).factorize(model)`` replaces
the K/V projections by their pairs (``Linear(in, r) -> Linear(r, out)``): only the low-rank part applies.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.errors import InputError

from . import kv_cache
from .kv_cache import AttnCall, KVCache, KVLayer, Tensor

METHODS = ("svd", "asvd", "lsq")
BITS = (None, 4, 8)
DECODER_TARGETS = ("k_proj", "v_proj")
ENCODER_TARGETS = ("key", "value")
SUFFIX = "_lowrank"


# ----------------------------------------------------------------------------------------------- factorisation
class LowRankPair(nn.Module):
    """``y = B (A x) + bias``: ``A`` (r, in), ``B`` (out, r); ``bias`` is the original projection's (fixed)."""

    def __init__(self, A: Tensor, B: Tensor, bias: Tensor | None):
        super().__init__()
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def encode(self, x: Tensor) -> Tensor:
        return F.linear(x, self.A)

    def decode(self, c: Tensor) -> Tensor:
        return F.linear(c, self.B, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def extra_repr(self) -> str:
        return f"in={self.A.shape[1]}, rank={self.rank}, out={self.B.shape[0]}, bias={self.bias is not None}"


def svd_factors(weight: Tensor, rank: int, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``A`` (rank, in), ``B`` (out, rank) with ``x W^T ~ (x A^T) B^T``: truncated SVD of ``W^T`` or, with
    ``scale`` (in,), of ``diag(scale) W^T`` (ASVD) followed by ``A <- A diag(1/scale)``."""
    w = weight.detach().float()
    m = w.t() if scale is None else scale.float()[:, None] * w.t()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if scale is not None:
        u = u / scale.float()[:, None]
    root = s.sqrt()
    A = (u * root).t()
    B = (root[:, None] * vh).t()
    return A.to(weight.dtype).contiguous(), B.to(weight.dtype).contiguous()


@dataclass
class Target:
    """A K or V projection to factorise."""

    parent: nn.Module
    attr: str
    linear: nn.Linear
    role: str  # "k" or "v"
    heads: int
    head_dim: int
    path: str

    @property
    def pair(self) -> LowRankPair | None:
        return getattr(self.parent, self.attr + SUFFIX, None)


def find_targets(model: nn.Module, names: tuple[str, str] | None = None) -> list[Target]:
    """K/V projections: ``k_proj``/``v_proj`` of decoder attention (HF Llama family, our reference LLaMA), else
    ``key``/``value`` of BERT-style self-attention; ``names`` overrides the (key, value) attribute names."""
    out: list[Target] = []
    candidates = [names] if names else [DECODER_TARGETS, ENCODER_TARGETS]
    for kn, vn in candidates:
        for path, mod in model.named_modules():
            k, v = getattr(mod, kn, None), getattr(mod, vn, None)
            if not (isinstance(k, nn.Linear) or isinstance(getattr(mod, kn + SUFFIX, None), LowRankPair)):
                continue
            head_dim = getattr(mod, "head_dim", None) or getattr(mod, "attention_head_size", None)
            for attr, role in ((kn, "k"), (vn, "v")):
                lin = getattr(mod, attr)
                if isinstance(lin, LowRankPair):
                    continue  # already factorised in place
                if not isinstance(lin, nn.Linear):
                    continue
                hd = int(head_dim or lin.out_features)
                out.append(Target(mod, attr, lin, role, lin.out_features // hd, hd, f"{path}.{attr}".lstrip(".")))
        if out:
            break
    return out


def lsq_factors(weight: Tensor, rank: int, gram: Tensor, damp: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``A`` (rank, in), ``B`` (out, rank) minimising ``||X (W^T - A^T B^T)||_F`` for inputs ``X`` with second
    moment ``gram = X^T X / N`` (in, in): with ``gram = R^T R`` (Cholesky, ``damp`` * mean diagonal added), the
    truncated SVD ``U S V^T`` of ``R W^T`` gives ``A^T = R^{-1} U sqrt(S)``, ``B^T = sqrt(S) V^T`` (a whitened SVD:
    the exact optimum of the layer-wise MSE that :func:`fit_lowrank_kv` descends)."""
    g = gram.double()
    g = g + damp * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    r = torch.linalg.cholesky(g).transpose(0, 1)  # upper: g = r^T r
    u, s, vh = torch.linalg.svd(r @ weight.detach().double().t(), full_matrices=False)
    root = s[:rank].sqrt()
    at = torch.linalg.solve_triangular(r, u[:, :rank] * root, upper=True)
    return at.t().to(weight.dtype).contiguous(), (root[:, None] * vh[:rank]).t().to(weight.dtype).contiguous()


@torch.no_grad()
def input_stats(model: nn.Module, linears: list[nn.Linear], calib: Any, *, gram: bool = False
                ) -> dict[int, tuple[Tensor, Tensor | None]]:
    """Per linear (by ``id``), over every token of ``calib``: the mean ``|x|`` per input channel (ASVD's scale
    statistic) and, with ``gram``, the second moment ``X^T X / N`` (float64)."""
    acc: dict[int, list] = {}

    def hook(mod: nn.Module, inp: tuple, out: Any) -> None:
        x = inp[0].detach().reshape(-1, inp[0].shape[-1])
        a = acc.setdefault(id(mod), [0, 0, 0])
        a[0] = a[0] + x.float().abs().sum(0)
        if gram:
            xd = x.double()
            a[1] = a[1] + xd.t() @ xd
        a[2] += x.shape[0]

    handles = [lin.register_forward_hook(hook) for lin in {id(l): l for l in linears}.values()]
    try:
        for batch in kv_cache.iter_batches(calib):
            kv_cache.run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not acc:
        raise InputError("the calibration data produced no activations at the K/V projections")
    return {k: (a[0] / a[2], a[1] / a[2] if gram else None) for k, a in acc.items()}


def input_abs_mean(model: nn.Module, linears: list[nn.Linear], calib: Any) -> dict[int, Tensor]:
    """Mean ``|x|`` per input channel of each linear over every token of ``calib`` (ASVD's scale statistic)."""
    return {k: v[0] for k, v in input_stats(model, linears, calib).items()}


class LowRankKV:
    """CSKV configuration and transforms (see the module docstring).

    ``k_density`` / ``v_density``: kept fraction of each head's width (rank ``int(density * head_dim) * heads``);
    ``method``: ``"svd"``, ``"asvd"`` or ``"lsq"`` (the last two need ``calib``: token-id tensors, dicts of model
    inputs, or a loader; ``"lsq"``, not in the paper, is the closed-form optimum of the layer-wise MSE that
    :func:`fit_lowrank_kv` trains for, see :func:`lsq_factors`);
    ``alpha``: ASVD exponent; ``window`` / ``bits``: the bi-branch cache made by :meth:`apply`; ``targets``:
    (key, value) attribute names when not the usual ones. :meth:`attach` adds the pairs beside the projections
    (``<parent>.k_proj_lowrank``) without changing the model's outputs; :meth:`apply` also switches decoding to
    :class:`LowRankKVCache`; :meth:`factorize` replaces the projections by the pairs (no cache needed).
    All three modify ``model`` in place and return it.
    """

    def __init__(self, k_density: float = 0.5, v_density: float = 0.5, method: str = "svd", calib: Any = None, *,
                 alpha: float = 0.5, window: int = 32, bits: int | None = None,
                 targets: tuple[str, str] | None = None):
        for name, d in (("k_density", k_density), ("v_density", v_density)):
            if not 0.0 < d <= 1.0:
                raise InputError(f"{name} must be in (0, 1], got {d}")
        if method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {method!r}")
        if method in ("asvd", "lsq") and calib is None:
            raise InputError(f"method={method!r} needs calibration data", fix="pass calib=[input_ids, ...]")
        if bits not in BITS:
            raise InputError(f"bits must be one of {BITS}, got {bits!r}")
        if window < 1:
            raise InputError(f"window must be >= 1, got {window}")
        self.k_density, self.v_density, self.method, self.calib = float(k_density), float(v_density), method, calib
        self.alpha, self.window, self.bits, self.targets = float(alpha), int(window), bits, targets

    def rank(self, t: Target) -> int:
        d = self.k_density if t.role == "k" else self.v_density
        return max(1, int(d * t.head_dim + 1e-9)) * t.heads

    @torch.no_grad()
    def attach(self, model: nn.Module) -> nn.Module:
        targets = find_targets(model, self.targets)
        if not targets:
            raise InputError(f"no K/V projections found in {type(model).__name__}",
                             fix="pass targets=(key_attr, value_attr) naming the nn.Linear K/V projections")
        stats: dict[int, tuple[Tensor, Tensor | None]] = {}
        if self.method in ("asvd", "lsq"):
            stats = input_stats(model, [t.linear for t in targets], self.calib, gram=self.method == "lsq")
        for t in targets:
            if self.method == "lsq":
                A, B = lsq_factors(t.linear.weight, self.rank(t), stats[id(t.linear)][1])
            else:
                scale = (stats[id(t.linear)][0] + 1e-6) ** self.alpha if self.method == "asvd" else None
                A, B = svd_factors(t.linear.weight, self.rank(t), scale)
            pair = LowRankPair(A, B, t.linear.bias).to(t.linear.weight.device)
            t.parent.add_module(t.attr + SUFFIX, pair)
        model.__dict__["_fxprune_lowrank_kv"] = self
        return model

    def apply(self, model: nn.Module) -> nn.Module:
        """Attach (freshly computed) pairs and decode through :class:`LowRankKVCache` (HF Llama-family decoders:
        patched in place, ``generate`` gets a fresh cache when none is passed; our reference LLaMA: use
        ``kv_cache.forward`` / ``kv_cache.generate`` with a ``LowRankKVCache``). Pairs attached earlier (fitted
        ones too) are replaced."""
        if not (kv_cache.is_reference_llama(model) or kv_cache.is_hf_decoder(model)):
            raise InputError(f"{type(model).__name__} has no KV cache to compress",
                             fix="for encoders use LowRankKV(...).factorize(model) (low-rank K/V only)")
        self.attach(model)
        kv_cache.enable(model)
        if not kv_cache.is_reference_llama(model):
            window, bits = self.window, self.bits
            kv_cache.set_default_cache(model, lambda: LowRankKVCache(window=window, bits=bits))
        return model

    @torch.no_grad()
    def factorize(self, model: nn.Module) -> nn.Module:
        """Replace every K/V projection by its low-rank pair (attaching the pairs first when needed)."""
        targets = find_targets(model, self.targets)
        if not targets or targets[0].pair is None:
            self.attach(model)
            targets = find_targets(model, self.targets)
        for t in targets:
            pair = t.pair
            delattr(t.parent, t.attr + SUFFIX)
            setattr(t.parent, t.attr, pair)
        return model

    def options(self) -> dict[str, Any]:
        return {"k_density": self.k_density, "v_density": self.v_density, "method": self.method,
                "alpha": self.alpha, "window": self.window, "bits": self.bits}

    def __repr__(self) -> str:
        return "LowRankKV(" + ", ".join(f"{k}={v!r}" for k, v in self.options().items()) + ")"


def pairs_of(model: nn.Module) -> list[tuple[nn.Linear, LowRankPair, str]]:
    """(original projection, attached pair, path) for every attached pair."""
    out = []
    for path, mod in model.named_modules():
        for name, child in mod.named_children():
            if name.endswith(SUFFIX) and isinstance(child, LowRankPair):
                lin = getattr(mod, name[: -len(SUFFIX)], None)
                if isinstance(lin, nn.Linear):
                    out.append((lin, child, f"{path}.{name}".lstrip(".")))
    return out


def _capture(model: nn.Module, pairs: list, batch: Any) -> dict[int, tuple[Tensor, Tensor]]:
    """Inputs and outputs of every paired projection in one cache-less forward of the (frozen) model."""
    caught: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
        caught[id(mod)] = (inp[0].detach(), out.detach())

    handles = [lin.register_forward_hook(hook) for lin, _, _ in pairs]
    try:
        with torch.no_grad():
            kv_cache.run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return caught


def _loss(pairs: list, caught: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
    return torch.stack([F.mse_loss(pair(caught[id(lin)][0]), caught[id(lin)][1]) for lin, pair, _ in pairs]).mean()


def _need_pairs(model: nn.Module) -> list:
    pairs = pairs_of(model)
    if not pairs:
        raise InputError("no low-rank K/V pairs attached", fix="call LowRankKV(...).attach(model) or .apply(model)")
    return pairs


@torch.no_grad()
def kv_mse(model: nn.Module, data: Any) -> float:
    """Mean over pairs of the MSE between each pair's output and its projection's, averaged over the batches of
    ``data`` (no training)."""
    pairs = _need_pairs(model)
    vals = [float(_loss(pairs, _capture(model, pairs, b))) for b in kv_cache.iter_batches(data)]
    return sum(vals) / len(vals)


def fit_lowrank_kv(model: nn.Module, loader: Any, *, steps: int = 300, lr: float = 1e-3,
                   cache_activations: bool = True) -> list[float]:
    """Train the attached low-rank pairs (only them; the LLM stays frozen) on the layer-wise MSE between each pair's
    K (or V) and the original projection's, inputs taken from the frozen model's own forward (CSKV's objective).

    ``loader``: batches of token ids (or dicts of model inputs), cycled for ``steps`` Adam steps at ``lr``.
    ``cache_activations``: keep each batch's projection inputs/outputs after its first forward, so later steps
    skip the model (exact: the model is frozen and its forward does not use the pairs; memory: tokens x (in + out)
    floats per projection). Returns the training loss (mean MSE over pairs) of every step, measured before that
    step's update; use :func:`kv_mse` on held-out data for numbers that are not the training batches'."""
    pairs = _need_pairs(model)
    params = [p for _, pair, _ in pairs for p in (pair.A, pair.B)]
    ids = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    batches = list(kv_cache.iter_batches(loader))
    if not batches:
        raise InputError("fit_lowrank_kv got no batches")
    flags = [(p, p.requires_grad) for p in params]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    store: dict[int, dict] = {}
    history = []
    try:
        for step in range(steps):
            i = step % len(batches)
            caught = store.get(i)
            if caught is None:
                caught = _capture(model, pairs, batches[i])
                if cache_activations:
                    store[i] = caught
            loss = _loss(pairs, caught)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p, flag in flags:
            p.requires_grad_(flag)
    return history


# ------------------------------------------------------------------------------------------------ quantisation
def quantize(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min-max quantisation of ``x`` with one (scale, zero) per slice reduced over ``dim`` (kept as a
    size-1 dim). Returns uint8 codes (4-bit codes packed two per byte along the last dim, zero-padded to even
    length), fp16 scale and fp16 zero point."""
    levels = 2 ** bits - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(1e-8).half()
    zero = lo.half()
    q = ((x - zero.to(x.dtype)) / scale.to(x.dtype)).round().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        if q.shape[-1] % 2:
            q = F.pad(q, (0, 1))
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale, zero


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, bits: int, dtype: torch.dtype, size: int) -> Tensor:
    """Inverse of :func:`quantize`; ``size``: the true length of the last dim."""
    if bits == 4:
        q = torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2)[..., :size]
    return q.to(dtype) * scale.to(dtype) + zero.to(dtype)


class LowRankKVLayer(KVLayer):
    """One layer of :class:`LowRankKVCache`.

    Stored: compressed windows ``ck`` (B, P, r_k) / ``cv`` (B, P, r_v) as features or codes (plus ``k_scale``,
    ``k_zero`` (B, P/W, r_k) and ``v_scale``, ``v_zero`` (B, P, G)); the current window's original post-RoPE keys
    ``win_k`` and values ``win_v`` (B, Hkv, w, D) and its features ``win_ck``, ``win_cv`` (B, w, r), kept to
    compress it when it completes; ``pos`` (B, T) int32 RoPE positions.
    """

    def __init__(self, cfg: "LowRankKVCache"):
        super().__init__()
        self.cfg = cfg
        self.ck = self.cv = self.k_scale = self.k_zero = self.v_scale = self.v_zero = None
        self.win_k = self.win_v = self.win_ck = self.win_cv = None
        self.pos: Tensor | None = None
        self.n_compressed = 0
        self.rv = 0

    def reset(self) -> None:
        self.__init__(self.cfg)

    def tensors(self) -> dict[str, Tensor | None]:
        return {"key_features": self.ck, "value_features": self.cv, "key_scales": _cat(self.k_scale, self.k_zero),
                "value_scales": _cat(self.v_scale, self.v_zero), "window_keys": self.win_k,
                "window_values": self.win_v, "window_key_features": self.win_ck,
                "window_value_features": self.win_cv, "positions": self.pos}

    def nbytes(self) -> dict[str, int]:
        from .kv_cache import storage_bytes

        out = {k: storage_bytes(t) for k, t in self.tensors().items() if k not in ("key_scales", "value_scales")}
        out["key_scales"] = storage_bytes(self.k_scale, self.k_zero)
        out["value_scales"] = storage_bytes(self.v_scale, self.v_zero)
        return out

    # ------------------------------------------------------------------ storage
    def _append(self, k: Tensor, v: Tensor, ck: Tensor, cv: Tensor, pos: Tensor) -> None:
        self.win_k = k.clone(memory_format=torch.contiguous_format) if self.win_k is None \
            else torch.cat([self.win_k, k], 2)
        self.win_v = v.clone(memory_format=torch.contiguous_format) if self.win_v is None \
            else torch.cat([self.win_v, v], 2)
        self.win_ck = ck.contiguous() if self.win_ck is None else torch.cat([self.win_ck, ck], 1)
        self.win_cv = cv.contiguous() if self.win_cv is None else torch.cat([self.win_cv, cv], 1)
        p = pos.to(torch.int32)
        self.pos = p.contiguous() if self.pos is None else torch.cat([self.pos, p], 1)
        self.length += k.shape[2]

    def _flush(self, heads: int) -> tuple[Tensor, Tensor] | None:
        """Compress every completed window of the window branch; returns the new entries' stored features (as they
        will be read back: dequantised when quantised) or None."""
        w = self.cfg.window
        n = (self.win_k.shape[2] // w) * w if self.win_k is not None else 0
        if n == 0:
            return None
        ck, cv = self.win_ck[:, :n], self.win_cv[:, :n]
        self.win_k = self.win_k[:, :, n:].clone(memory_format=torch.contiguous_format)
        self.win_v = self.win_v[:, :, n:].clone(memory_format=torch.contiguous_format)
        self.win_ck = self.win_ck[:, n:].clone()
        self.win_cv = self.win_cv[:, n:].clone()
        bits = self.cfg.bits
        if bits is None:
            self.ck = ck.clone() if self.ck is None else torch.cat([self.ck, ck], 1)
            self.cv = cv.clone() if self.cv is None else torch.cat([self.cv, cv], 1)
            self.n_compressed += n
            return ck, cv
        b, _, rk = ck.shape
        rv = self.rv = cv.shape[-1]
        qk, sk, zk = quantize(ck.reshape(b, n // w, w, rk), bits, dim=2)  # keys: per channel over the window
        groups = heads if rv % heads == 0 else 1
        qv, sv, zv = quantize(cv.reshape(b, n, groups, rv // groups), bits, dim=3)  # values: per token (group)
        qk, sk, zk = qk.reshape(b, n, -1), sk.reshape(b, n // w, rk), zk.reshape(b, n // w, rk)
        qv, sv, zv = qv.reshape(b, n, -1), sv.reshape(b, n, groups), zv.reshape(b, n, groups)
        self.ck = qk if self.ck is None else torch.cat([self.ck, qk], 1)
        self.cv = qv if self.cv is None else torch.cat([self.cv, qv], 1)
        self.k_scale = sk if self.k_scale is None else torch.cat([self.k_scale, sk], 1)
        self.k_zero = zk if self.k_zero is None else torch.cat([self.k_zero, zk], 1)
        self.v_scale = sv if self.v_scale is None else torch.cat([self.v_scale, sv], 1)
        self.v_zero = zv if self.v_zero is None else torch.cat([self.v_zero, zv], 1)
        self.n_compressed += n
        return self._features(self.n_compressed - n, self.n_compressed, ck.dtype)

    def _features(self, start: int, stop: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Stored features of compressed tokens ``[start, stop)`` (window-aligned), dequantised."""
        bits = self.cfg.bits
        if bits is None:
            return self.ck[:, start:stop], self.cv[:, start:stop]
        w = self.cfg.window
        b, rk = self.k_scale.shape[0], self.k_scale.shape[2]
        nw = (stop - start) // w
        qk = self.ck[:, start:stop].reshape(b, nw, w, -1)
        sk = self.k_scale[:, start // w: stop // w, None]
        zk = self.k_zero[:, start // w: stop // w, None]
        ck = dequantize(qk, sk, zk, bits, dtype, rk).reshape(b, stop - start, rk)
        g = self.v_scale.shape[2]
        qv = self.cv[:, start:stop].reshape(b, stop - start, g, -1)
        cv = dequantize(qv, self.v_scale[:, start:stop, :, None], self.v_zero[:, start:stop, :, None], bits, dtype,
                        self.rv // g)
        return ck, cv.reshape(b, stop - start, -1)

    # ------------------------------------------------------------------ attention
    def attend(self, call: AttnCall) -> Tensor:
        mod = call.module
        pk, pv = _pair(mod, "k"), _pair(mod, "v")
        heads, d = call.k.shape[1], call.k.shape[3]
        ck_new, cv_new = pk.encode(call.hidden), pv.encode(call.hidden)
        if self.length == 0:  # prefill: exact attention on the original K/V, then store
            out = call.fallback(call.q, call.k, call.v, call.mask)
            self._append(call.k, call.v, ck_new, cv_new, call.positions)
            self._flush(heads)
            return out

        def rebuild(ck: Tensor, cv: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
            b, n, _ = ck.shape
            k = pk.decode(ck).view(b, n, heads, d).transpose(1, 2)
            v = pv.decode(cv).view(b, n, heads, d).transpose(1, 2)
            return call.rope(k, pos.long()), v

        if self.n_compressed:
            k_old, v_old = rebuild(*self._features(0, self.n_compressed, call.k.dtype), self.pos[:, :self.n_compressed])
        else:
            k_old = call.k.new_zeros(call.k.shape[0], heads, 0, d)
            v_old = k_old
        outs, s, n = [], 0, call.k.shape[2]
        w = self.cfg.window
        while s < n:
            start = self.length  # absolute position of query s
            e = min(n, s + w - start % w)
            self._append(call.k[:, :, s:e], call.v[:, :, s:e], ck_new[:, s:e], cv_new[:, s:e], call.positions[:, s:e])
            keys = torch.cat([k_old, self.win_k], 2)
            vals = torch.cat([v_old, self.win_v], 2)
            outs.append(call.fallback(call.q[:, :, s:e], keys, vals, call.mask_for(slice(s, e), self.length, start)))
            new = self._flush(heads)
            if new is not None:
                nk, nv = rebuild(*new, self.pos[:, self.n_compressed - new[0].shape[1]: self.n_compressed])
                k_old, v_old = torch.cat([k_old, nk], 2), torch.cat([v_old, nv], 2)
            s = e
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _cat(*ts: Tensor | None) -> Tensor | None:
    ts = tuple(t for t in ts if t is not None)
    return None if not ts else torch.cat([t.flatten() for t in ts])


def _pair(mod: nn.Module, role: str) -> LowRankPair:
    for name in ((DECODER_TARGETS[0] if role == "k" else DECODER_TARGETS[1]),
                 (ENCODER_TARGETS[0] if role == "k" else ENCODER_TARGETS[1])):
        p = getattr(mod, name + SUFFIX, None)
        if isinstance(p, LowRankPair):
            return p
    raise InputError(f"attention module {type(mod).__name__} has no low-rank {role.upper()} pair",
                     fix="call LowRankKV(...).apply(model) before decoding with a LowRankKVCache")


class LowRankKVCache(KVCache):
    """The CSKV bi-branch cache: the current ``window`` tokens as original full-precision K/V, completed windows as
    rank-``r`` pre-RoPE features (``bits=None``: model dtype; ``4``/``8``: quantised, keys per channel, values per
    token). Needs a model with pairs attached (:meth:`LowRankKV.apply`). ``nbytes()`` gives measured bytes by role."""

    def __init__(self, window: int = 32, bits: int | None = None):
        if bits not in BITS:
            raise InputError(f"bits must be one of {BITS}, got {bits!r}")
        if window < 1:
            raise InputError(f"window must be >= 1, got {window}")
        super().__init__()
        self.window, self.bits = int(window), bits

    def new_layer(self) -> LowRankKVLayer:
        return LowRankKVLayer(self)

    def __repr__(self) -> str:
        return f"LowRankKVCache(window={self.window}, bits={self.bits})"
