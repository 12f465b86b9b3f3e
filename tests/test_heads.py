"""HeadPrune: whole attention heads removed; shrunk == masked; head counts rewritten (ViT, LLaMA GQA, HF, timm)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import models
from fxprune.errors import InputError, PassError
from fxprune.passes import Shrink
from fxprune.passes.apply_masks import ApplyMasks
from fxprune.passes.heads import HeadPrune, attention_head_layers
from fxprune.program import Program
from fxprune.testing import make_observable
from fxprune.verify import random_like

torch.set_num_threads(1)


def _sdpa_heads(gm):
    """(q heads, k heads) at every SDPA of a (shrunk) module, from its re-propagated shapes."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and "scaled_dot_product" in str(n.target):
            out.append((int(n.args[0].meta["val"].shape[1]), int(n.args[1].meta["val"].shape[1])))
    return out


def _prune(model, args, kwargs=None, **opts):
    model = make_observable(model.eval())
    kwargs = kwargs or {}
    out = fxprune.compile(model, args, example_kwargs=kwargs, passes=[HeadPrune(**opts), Shrink()])
    masked = fxprune.compile(model, args, example_kwargs=kwargs, passes=[HeadPrune(**opts), ApplyMasks()])
    assert out.report.verified is True and out.report.observable is True
    a, kw = random_like(args, kwargs, seed=5)
    with torch.no_grad():
        ys, ym = out.module(*a, **kw), masked.module(*a, **kw)
    ys = ys if isinstance(ys, torch.Tensor) else ys[0]
    ym = ym if isinstance(ym, torch.Tensor) else ym[0]
    assert (ys - ym).abs().max() <= 1e-4 * max(float(ym.abs().max()), 1e-6)  # shrunk == masked
    return out


def test_vit_heads_removed_and_counts_rewritten():
    m, x = models.get("vit", size="tiny")
    out = _prune(m, x, ratio=0.5)
    assert _sdpa_heads(out.module) == [(2, 2), (2, 2)]
    assert out.module.get_parameter("blocks.0.attn.qkv.weight").shape == (3 * 2 * 16, 64)
    assert out.module.get_parameter("blocks.0.attn.proj.weight").shape == (64, 2 * 16)
    st = out.report.passes[0]["stats"]
    assert [(r["heads_before"], r["heads_after"]) for r in st["layers"]] == [(4, 2), (4, 2)]
    # the reshape to heads carries the new head count
    shapes = [list(n.args[1]) for n in out.module.graph.nodes if n.op == "call_function"
              and n.target is torch.ops.aten.reshape.default and len(n.args[1]) == 5]
    assert shapes and all(s[2:] == [3, 2, 16] for s in shapes)


def test_vit_callable_importance_picks_the_heads():
    m, x = models.get("vit", size="tiny")
    m = make_observable(m.eval())
    out = fxprune.compile(m, x, passes=[HeadPrune(0.5, importance=lambda g, prog: np.arange(g.size)), Shrink()])
    w = m.blocks[0].attn.qkv.weight.detach().reshape(3, 4, 16, 64)
    kept = w[:, 2:].reshape(-1, 64)  # heads 2 and 3 have the highest scores
    assert torch.equal(out.module.get_parameter("blocks.0.attn.qkv.weight"), kept)
    r1 = fxprune.compile(m, x, passes=[HeadPrune(0.5, importance="random")], seed=1).program.masks
    r2 = fxprune.compile(m, x, passes=[HeadPrune(0.5, importance="random")], seed=1).program.masks
    assert all(np.array_equal(r1[k], r2[k]) for k in r1)


@pytest.mark.parametrize("gqa,q_heads,kv_heads", [("kv", 2, 1), ("query", 2, 2)])
def test_llama_gqa(gqa, q_heads, kv_heads):
    m, x = models.get("llama", size="tiny")  # 4 query heads, 2 kv heads, head_dim 16
    out = _prune(m, x, ratio=0.5, gqa=gqa)
    assert _sdpa_heads(out.module) == [(q_heads, q_heads)] * 2  # k/v repeated to the query heads
    assert out.module.get_parameter("layers.0.self_attn.q_proj.weight").shape[0] == q_heads * 16
    assert out.module.get_parameter("layers.0.self_attn.k_proj.weight").shape[0] == kv_heads * 16
    assert out.module.get_parameter("layers.0.self_attn.v_proj.weight").shape[0] == kv_heads * 16
    assert out.module.get_parameter("layers.0.self_attn.o_proj.weight").shape[1] == q_heads * 16
    units = {r["unit"] for r in out.report.passes[0]["stats"]["layers"]}
    assert units == {gqa}


def test_llama_layers_and_heads_per_layer():
    m, x = models.get("llama", size="tiny")
    prog = Program(fxprune.trace(m, x), x, {}, source=m)
    layers = attention_head_layers(prog)
    assert len(layers) == 2 and all(e["heads"] == 4 and e["query"] is not None for e in layers)
    assert {"layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight"} <= set(layers[0]["kv"].params())
    out = _prune(m, x, heads_per_layer=2, gqa="kv")
    assert _sdpa_heads(out.module) == [(2, 2)] * 2
    with pytest.raises(InputError):  # 3 heads = 1.5 kv groups: not reachable
        fxprune.compile(m, x, passes=[HeadPrune(heads_per_layer=3, gqa="kv")])


def _hf_llama():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, use_cache=False, tie_word_embeddings=True)
    return T.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("gqa,q_heads,kv_heads", [("kv", 2, 1), ("query", 2, 2)])
def test_hf_llama_config(gqa, q_heads, kv_heads):
    m = _hf_llama()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    kw = {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    out = _prune(m, (), kw, ratio=0.5, gqa=gqa)
    assert _sdpa_heads(out.module) == [(q_heads, q_heads)] * 2
    attn = "model.layers.1.self_attn."
    assert out.module.get_parameter(attn + "q_proj.weight").shape == (q_heads * 16, 64)
    assert out.module.get_parameter(attn + "k_proj.weight").shape == (kv_heads * 16, 64)
    assert out.module.get_parameter("lm_head.weight").shape == (128, 64)


def test_timm_vit_and_hf_bert():
    timm = pytest.importorskip("timm")
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    v = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)  # 3 heads
    out = _prune(v, (torch.randn(2, 3, 32, 32),), ratio=0.34)
    assert _sdpa_heads(out.module) == [(2, 2)] * 2
    bert = T.AutoModel.from_config(T.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    out = _prune(bert, (), {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}, ratio=0.5)
    assert _sdpa_heads(out.module) == [(2, 2)] * 2
    assert out.module.get_parameter("encoder.layer.0.attention.self.query.weight").shape == (32, 64)


def test_errors():
    for bad in (lambda: HeadPrune(), lambda: HeadPrune(0.5, heads_per_layer=2), lambda: HeadPrune(1.0),
                lambda: HeadPrune(heads_per_layer=0), lambda: HeadPrune(0.5, gqa="both"),
                lambda: HeadPrune(0.5, importance="taylorx")):
        with pytest.raises(InputError):
            bad()
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(PassError, match="no attention heads"):
        fxprune.compile(cnn, (torch.randn(2, 3, 8, 8),), passes=[HeadPrune(0.5)])
