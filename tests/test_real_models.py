"""Real architectures from torchvision / timm / HuggingFace (random init, small inputs or configs; fxprune.zoo)."""
import pytest
import torch

import fxprune
from fxprune import zoo
from fxprune.passes import ApplyMasks, ChannelPrune, Shrink
from fxprune.testing import make_observable
from fxprune.verify import random_like


def _check(model, args, kwargs=None, ratio=0.5, heads=False):
    model = make_observable(model.eval())
    kwargs = kwargs or {}
    out = fxprune.compile(model, args, example_kwargs=kwargs, passes=[ChannelPrune(ratio, heads=heads), Shrink()])
    r = out.report
    assert r.verified is True and r.observable is not False
    assert r.params_after < 0.9 * r.params_before
    masked = fxprune.compile(model, args, example_kwargs=kwargs, passes=[ChannelPrune(ratio, heads=heads),
                                                                       ApplyMasks()])
    a, kw = random_like(args, kwargs, seed=11)
    with torch.no_grad():
        ys, ym = out.module(*a, **kw), masked.module(*a, **kw)
    ys = ys if isinstance(ys, torch.Tensor) else ys[0]
    ym = ym if isinstance(ym, torch.Tensor) else ym[0]
    assert (ys - ym).abs().max() <= 1e-4 * max(float(ym.abs().max()), 1e-6)
    return out


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5",
                                  "efficientnet_b0", "regnet_y_400mf"])
def test_torchvision(name):
    pytest.importorskip("torchvision")
    model, x, _ = zoo.resolve(f"torchvision:{name}", input_shape="2,3,64,64")
    _check(model, x)


def _hf(name, task, **config):
    pytest.importorskip("transformers")
    return zoo.resolve(f"hf:{name}", task=task, overrides=config, batch=2, seq=8)


def test_hf_llama_gqa_with_attention_mask():
    m, (ids,), _ = _hf("llama", "causal-lm", vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    mask = torch.ones(2, 8, dtype=torch.long)
    out = _check(m, (), {"input_ids": ids, "attention_mask": mask}, heads=True)
    # q/k/v/o shrank, the tied embedding kept the vocab
    assert out.module.get_parameter("model.layers.0.self_attn.q_proj.weight").shape[0] < 64
    assert out.module.get_parameter("lm_head.weight").shape[0] == 128


def test_hf_bert_and_gpt2():
    bert, (ids,), _ = _hf("bert", "base", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=128)
    _check(bert, (), {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    gpt2, ids, _ = _hf("gpt2", "causal-lm", vocab_size=128, n_embd=64, n_layer=2, n_head=4)
    _check(gpt2, ids)


def test_timm_models():
    pytest.importorskip("timm")
    _check(*zoo.resolve("timm:resnet18d", input_shape="2,3,64,64")[:2])
    vit, x, _ = zoo.resolve("timm:vit_tiny_patch16_224", overrides={"img_size": 64}, batch=2)
    assert x[0].shape == (2, 3, 64, 64)
    _check(vit, x, heads=True)
