"""Runtime KV-cache machinery shared by ThinK (``passes/think.py``) and CSKV (``passes/lowrank_kv.py``).

Why these are not graph passes: a KV cache exists only in the incremental decoding loop (``model.generate()``, one
forward per new token that reads and extends per-layer state). ``torch.export`` captures one full-sequence forward
with no cache, so a Program has nothing to rewrite; and users want to keep their generation code. So the KV-cache
methods are *runtime transforms of the user's eager model*:

* a **cache class of ours** (:class:`KVCache`; a ``transformers.Cache`` subclass when transformers is installed,
  built lazily so ``fxprune.passes`` imports without it) whose per-layer objects own the storage and the attention
  over it (:meth:`KVLayer.attend`);
* :func:`enable` patches a HuggingFace Llama-family model once: it registers an attention function
  (``fxprune_kv_<sdpa|eager>``) that hands attention to the cache layer when the cache is ours and otherwise calls
  the original implementation unchanged (so ``use_cache=False`` forwards and plain ``DynamicCache`` generation give
  the same numbers as before), plus a forward pre-hook on every attention module that passes the layer input and
  position ids along (CSKV needs the input of ``k_proj``/``v_proj``);
* our reference LLaMA (``fxprune.models.llama``) has no cache path at all; :func:`forward` / :func:`generate` run it
  incrementally with the same cache layers (and run HF models through their own ``forward``/``generate``).

They compose with the compiler: prune and shrink a model with ``fxprune.compile``, re-apply the kept indices to
your own HF class with ``fxprune.replay``, then put a KV-cache transform on top of that eager model.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.errors import InputError

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------------- helpers
def rotate_half(x: Tensor) -> Tensor:
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` (B, H, N, D) rotated with ``cos``/``sin`` of shape (B, N, D) or (N, D) (Llama ``rotate_half`` RoPE)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def storage_bytes(*tensors: Tensor | None) -> int:
    """Bytes of the storages behind ``tensors`` (each storage once): what the cache really holds, views included."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def causal_mask(rows: int, cols: int, offset: int, kind: str, dtype: torch.dtype, device: Any) -> Tensor:
    """(1, 1, rows, cols) mask where query ``i`` (absolute position ``offset + i``) may see keys ``<= offset + i``.
    ``kind`` "bool" (True = attend, SDPA) or "float" (additive, 0 / dtype min, eager)."""
    q = torch.arange(rows, device=device)[:, None] + offset
    ok = torch.arange(cols, device=device)[None, :] <= q
    if kind == "bool":
        return ok[None, None]
    return torch.zeros(rows, cols, dtype=dtype, device=device).masked_fill(~ok, torch.finfo(dtype).min)[None, None]


def additive(mask: Tensor | None, rows: int, cols: int, dtype: torch.dtype, device: Any) -> Tensor:
    """Any mask convention (None = causal aligned to the end, bool, additive float) as an additive float mask."""
    if mask is None:
        return causal_mask(rows, cols, cols - rows, "float", dtype, device)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


@dataclass
class AttnCall:
    """One attention call of one layer, handed by the model adapter to :meth:`KVLayer.attend`.

    ``q`` (B, Hq, L, D) and ``k`` (B, Hkv, L, D) are after RoPE, ``v`` (B, Hkv, L, D); ``hidden`` (B, L, C) is the
    input of the k/v projections; ``positions`` (B, L) their RoPE positions. ``mask`` covers every key after this
    step (B|1, 1, L, T) in the fallback's convention (``mask_kind``), or is None: plain causal, aligned to the end.
    ``fallback(q, K, V, mask)`` is the model's own attention over dense K/V (B, Hkv, T, D) -> (B, Hq, L, D);
    ``rope(x, positions)`` rotates pre-RoPE keys (B, Hkv, N, D) at ``positions`` (B, N).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    hidden: Tensor | None
    positions: Tensor
    mask: Tensor | None
    scaling: float
    module: nn.Module
    fallback: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
    rope: Callable[[Tensor, Tensor], Tensor]
    mask_kind: str = "bool"

    @property
    def n_rep(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def mask_for(self, rows: slice, cols: int, offset: int) -> Tensor | None:
        """The mask of query rows ``rows`` against the first ``cols`` keys, the rows' first absolute position being
        ``offset``; None where plain causal attention is meant and the fallback infers it (one query, or queries
        that are exactly the last keys starting at 0)."""
        n = rows.stop - rows.start
        if self.mask is not None:
            return self.mask[:, :, rows, :cols]
        if n == 1 or (offset == 0 and n == cols):
            return None
        return causal_mask(n, cols, offset, self.mask_kind, self.q.dtype, self.q.device)


# ------------------------------------------------------------------------------------------------- cache classes
class KVLayer:
    """One layer's cache: owns its storage and computes attention over it (:meth:`attend`)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self) -> None:
        self.length = 0  # tokens seen (stored in any form)
        self._expect = False  # update() ran, attend() not yet

    @property
    def is_initialized(self) -> bool:
        return self.length > 0

    def get_seq_length(self) -> int:
        return self.length

    def attend(self, call: AttnCall) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor | None]:  # pragma: no cover - interface
        """The tensors the layer stores, by role, for :meth:`nbytes`."""
        raise NotImplementedError

    def nbytes(self) -> dict[str, int]:
        return {k: storage_bytes(t) for k, t in self.tensors().items()}

    def reset(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _select_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        for name, t in list(vars(self).items()):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                setattr(self, name, fn(t))


def _hf_cache_base() -> type | None:
    try:
        from transformers.cache_utils import Cache
    except Exception:  # transformers missing or broken: plain object (reference models still work)
        return None
    return Cache


_HF_SUBCLASSES: dict[type, type] = {}


class KVCache:
    """Base of our caches: a list of :class:`KVLayer` made on demand. When transformers is installed an instance is
    also a ``transformers.Cache`` (a subclass is built lazily on first use), so ``model.generate(cache=...)``
    accepts it; it works only on models patched by :func:`enable` (``update`` alone stores nothing)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "KVCache":
        base = _hf_cache_base()
        if base is None or issubclass(cls, base):
            return super().__new__(cls)
        sub = _HF_SUBCLASSES.get(cls)
        if sub is None:
            sub = type(cls.__name__, (cls, base), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                   "__doc__": cls.__doc__})
            _HF_SUBCLASSES[cls] = sub
        return super().__new__(sub)

    def __init__(self) -> None:
        base = _hf_cache_base()
        if base is not None and isinstance(self, base):
            base.__init__(self, layers=[])
        else:
            self.layers = []

    # -- our interface
    def new_layer(self) -> KVLayer:  # pragma: no cover - interface
        raise NotImplementedError

    def layer(self, idx: int) -> KVLayer:
        while len(self.layers) <= idx:
            self.layers.append(self.new_layer())
        return self.layers[idx]

    def nbytes(self) -> dict[str, int]:
        """Measured bytes of every stored tensor (storages, views included), summed over layers, by role, plus
        ``"total"``."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                out[k] = out.get(k, 0) + v
        out["total"] = sum(out.values())
        return out

    # -- transformers.Cache interface
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        layer = self.layer(layer_idx)
        if layer._expect:
            raise InputError(f"{type(self).__name__}.update was called twice for layer {layer_idx} without attention "
                             "going through the cache: the model is not patched",
                             fix="call fxprune.passes.kv_cache.enable(model) (or the method's apply(model)) first")
        layer._expect = True
        return key_states, value_states  # attention over the stored states happens in KVLayer.attend

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(f"{type(self).__name__} cannot be cropped (compressed entries are not "
                                      "reversible); use greedy or sampling generation without assistant models")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for layer in self.layers:
            layer._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        for layer in self.layers:
            layer._select_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.layers) and all(layer.is_initialized for layer in self.layers)

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self.layers)}, seq={self.get_seq_length()})"


def kv_bytes(cache: Any) -> dict[str, int]:
    """Measured cache bytes: ours via :meth:`KVCache.nbytes`; a transformers ``DynamicCache`` (keys + values of every
    layer) for the dense reference."""
    if isinstance(cache, KVCache):
        return cache.nbytes()
    keys = sum(storage_bytes(layer.keys) for layer in cache.layers if getattr(layer, "keys", None) is not None)
    vals = sum(storage_bytes(layer.values) for layer in cache.layers if getattr(layer, "values", None) is not None)
    return {"keys": keys, "values": vals, "total": keys + vals}


# ------------------------------------------------------------------------------------------ HuggingFace adapter
SUPPORTED_HF_ATTENTION = ("sdpa", "eager")


def _eager(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
           scaling: float, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """HF's eager attention (same ops in the same order), for models whose module offers none."""
    rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, rep), repeat_kv(value, rep)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), None


def _original_attention(module: nn.Module, impl: str) -> Callable:
    if impl == "eager":
        return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", _eager)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def _hf_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  scaling: float | None = None, dropout: float = 0.0, *, _impl: str, **kwargs: Any):
    """The attention function registered as ``fxprune_kv_<impl>``: our cache layer when the call carries our cache,
    the original implementation (same arguments) otherwise."""
    orig = _original_attention(module, _impl)
    state = module.__dict__.get("_fxprune_kv_state")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if state is None:
        return orig(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    cache, hidden, positions, rope = state
    layer = cache.layer(module.layer_idx)
    layer._expect = False

    def fallback(q: Tensor, k: Tensor, v: Tensor, m: Tensor | None) -> Tensor:
        return orig(module, q, k, v, m, scaling=scaling, dropout=0.0, **kwargs)[0].transpose(1, 2)

    call = AttnCall(q=query, k=key, v=value, hidden=hidden, positions=positions, mask=attention_mask,
                    scaling=float(scaling), module=module, fallback=fallback, rope=rope,
                    mask_kind="float" if _impl == "eager" else "bool")
    out = layer.attend(call)
    return out.transpose(1, 2).contiguous(), None


def _find_rotary(model: nn.Module) -> nn.Module | None:
    for name, m in model.named_modules():
        if name.endswith("rotary_emb"):
            return m
    return None


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj"))]


def is_hf_decoder(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "set_attn_implementation") and bool(_attention_modules(model))


def is_reference_llama(model: nn.Module) -> bool:
    return hasattr(model, "rotary") and hasattr(model, "layers") and hasattr(model, "embed_tokens") \
        and not hasattr(model, "config")


def enable(model: nn.Module) -> nn.Module:
    """Patch a HuggingFace Llama-family model (in place, idempotent) so caches of ours work inside its ``forward``
    and ``generate``; other caches and cache-less forwards are unaffected. Our reference LLaMA needs no patch (use
    :func:`forward` / :func:`generate`). Returns ``model``. Undo with :func:`disable`."""
    if is_reference_llama(model):
        return model
    if not is_hf_decoder(model):
        raise InputError(f"{type(model).__name__} is neither a HuggingFace decoder with q_proj/k_proj/v_proj attention "
                         "nor fxprune's reference LLaMA",
                         fix="KV-cache methods need a Llama-family causal LM (LlamaForCausalLM, Mistral, Qwen2, ...)")
    if getattr(model, "_fxprune_kv_enabled", None):
        return model
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    impl = model.config._attn_implementation
    if impl not in SUPPORTED_HF_ATTENTION:
        raise InputError(f"attention implementation {impl!r} is not supported by the fxprune KV caches",
                         fix="load the model with attn_implementation='sdpa' or 'eager'")
    name = f"fxprune_kv_{impl}"
    AttentionInterface.register(name, functools.partial(_hf_attention, _impl=impl))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    rotary = _find_rotary(model)
    if rotary is None:
        raise InputError(f"no rotary embedding module (``rotary_emb``) found in {type(model).__name__}")

    def rope(x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = rotary(x, positions)
        return apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))

    handles = []
    for attn in _attention_modules(model):
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if not isinstance(cache, KVCache):
                mod.__dict__["_fxprune_kv_state"] = None
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            pos = kwargs.get("position_ids")
            if pos is None:
                start = cache.get_seq_length(mod.layer_idx)
                pos = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]
            mod.__dict__["_fxprune_kv_state"] = (cache, hidden, pos.expand(hidden.shape[0], -1), rope)

        def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            mod.__dict__["_fxprune_kv_state"] = None

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.register_forward_hook(post, with_kwargs=True))
    model.set_attn_implementation(name)
    model.__dict__["_fxprune_kv_enabled"] = {"impl": impl, "handles": handles}
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable` and :func:`set_default_cache` (hooks removed, original attention restored)."""
    state = model.__dict__.pop("_fxprune_kv_enabled", None)
    if state:
        for h in state["handles"]:
            h.remove()
        model.set_attn_implementation(state["impl"])
    model.__dict__.pop("generate", None)
    model.__dict__.pop("_fxprune_kv_factory", None)
    return model


def set_default_cache(model: nn.Module, factory: Callable[[], KVCache]) -> nn.Module:
    """Make ``model.generate(...)`` (HF models) use ``factory()`` whenever the caller passes no cache, so users keep
    their generation code. Idempotent; the last factory wins."""
    model.__dict__["_fxprune_kv_factory"] = factory
    if "generate" in model.__dict__ or not hasattr(type(model), "generate"):
        return model
    orig = type(model).generate.__get__(model)

    @functools.wraps(orig)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None \
                and kwargs.get("use_cache", True) is not False:
            kwargs["cache"] = model.__dict__["_fxprune_kv_factory"]()
        return orig(*args, **kwargs)

    model.__dict__["generate"] = generate
    return model


# ------------------------------------------------------------------------------- reference model (fxprune.models)
def _sdpa_fallback(scaling: float) -> Callable:
    def fallback(q: Tensor, k: Tensor, v: Tensor, m: Tensor | None) -> Tensor:
        rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        causal = m is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, scale=scaling)
    return fallback


def _reference_forward(model: nn.Module, input_ids: Tensor, cache: KVCache) -> Tensor:
    b, n = input_ids.shape
    t0 = cache.get_seq_length()
    x = model.embed_tokens(input_ids)
    inv_freq = model.rotary.inv_freq
    positions = torch.arange(t0, t0 + n, device=input_ids.device)[None].expand(b, -1)

    def cos_sin(pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = pos[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rope(v: Tensor, pos: Tensor) -> Tensor:
        c, s = cos_sin(pos, v.dtype)
        return apply_rope(v, c, s)

    cos, sin = cos_sin(positions, x.dtype)
    mask = None if (n == 1 or t0 == 0) else causal_mask(n, t0 + n, t0, "bool", x.dtype, x.device)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, n, attn.heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, attn.kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, n, attn.kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scaling = attn.head_dim ** -0.5
        call = AttnCall(q=q, k=k, v=v, hidden=h, positions=positions, mask=mask, scaling=scaling, module=attn,
                        fallback=_sdpa_fallback(scaling), rope=rope, mask_kind="bool")
        y = cache.layer(i).attend(call)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(b, n, attn.heads * attn.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))


@torch.no_grad()
def forward(model: nn.Module, input_ids: Tensor, cache: KVCache) -> Tensor:
    """Logits of ``input_ids`` (B, L) continuing what ``cache`` holds, extending the cache. Works on our reference
    LLaMA (incremental path written here) and on HF models (their own forward; :func:`enable` is applied)."""
    if is_reference_llama(model):
        return _reference_forward(model, input_ids, cache)
    enable(model)
    return model(input_ids=input_ids, cache=cache, use_cache=True).logits


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, cache: KVCache, max_new_tokens: int) -> Tensor:
    """Greedy generation through ``cache``: HF models via ``model.generate(cache=...)``, our reference LLaMA via
    :func:`forward`. Returns prompt + new tokens (B, L + max_new_tokens)."""
    if not is_reference_llama(model):
        enable(model)
        return model.generate(input_ids, cache=cache, max_new_tokens=max_new_tokens, do_sample=False,
                              attention_mask=torch.ones_like(input_ids))
    out = input_ids
    logits = forward(model, input_ids, cache)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1:].argmax(-1)
        out = torch.cat([out, nxt], dim=1)
        logits = forward(model, nxt, cache)
    return out


def iter_batches(data: Any) -> Iterable[Any]:
    """Batches from a loader, a list of tensors/dicts, or a single tensor."""
    if isinstance(data, (torch.Tensor, dict)):
        return [data]
    return data


def run_model(model: nn.Module, batch: Any) -> Any:
    """One cache-less forward: ``model(**batch)`` for dicts, else ``model(input_ids=..., use_cache=False)`` for HF
    models and ``model(ids)`` otherwise."""
    if isinstance(batch, dict):
        return model(**batch)
    if batch.dim() == 1:
        batch = batch[None]
    if hasattr(model, "config"):
        try:
            return model(input_ids=batch, use_cache=False)
        except TypeError:
            return model(input_ids=batch)
    return model(batch)
