"""Real architectures from torchvision / timm / HuggingFace (random init, small inputs or configs)."""
import pytest
import torch

import fxprune
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
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    _check(tv.models.get_model(name, weights=None), (torch.randn(2, 3, 64, 64),))


def _hf(cfg_cls, auto, **kw):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = getattr(T, cfg_cls)(**kw)
    return getattr(T, auto).from_config(cfg)


def test_hf_llama_gqa_with_attention_mask():
    m = _hf("LlamaConfig", "AutoModelForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, use_cache=False,
            tie_word_embeddings=True)
    ids = torch.randint(0, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    out = _check(m, (), {"input_ids": ids, "attention_mask": mask}, heads=True)
    # q/k/v/o shrank, the tied embedding kept the vocab
    assert out.module.get_parameter("model.layers.0.self_attn.q_proj.weight").shape[0] < 64
    assert out.module.get_parameter("lm_head.weight").shape[0] == 128


def test_hf_bert_and_gpt2():
    ids = torch.randint(0, 128, (2, 8))
    bert = _hf("BertConfig", "AutoModel", vocab_size=128, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=128)
    _check(bert, (), {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    gpt2 = _hf("GPT2Config", "AutoModelForCausalLM", vocab_size=128, n_embd=64, n_layer=2, n_head=4, use_cache=False)
    _check(gpt2, (ids,))


def test_timm_models():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    _check(timm.create_model("resnet18d", pretrained=False), (torch.randn(2, 3, 64, 64),))
    _check(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64), (torch.randn(2, 3, 64, 64),),
           heads=True)
