"""fxprune.zoo.resolve: every spec kind, clear errors with a did-you-mean, file factories; fxprune.flops.count_macs
on a model that made torch's FLOP counter assert (a no-grad view of a requires-grad parameter fed to a submodule)."""
import textwrap

import pytest
import torch
import torch.nn as nn

from fxprune import zoo
from fxprune.errors import InputError
from fxprune.flops import count_macs


def test_reference_model():
    m, x, label = zoo.resolve("resnet56", size="tiny", batch=3)
    assert label == "resnet56 (tiny)" and not m.training
    assert len(x) == 1 and x[0].shape[0] == 3
    _, x2, _ = zoo.resolve("resnet56", size="tiny", input_shape="2,3,16,16")
    assert x2[0].shape == (2, 3, 16, 16)
    with pytest.raises(InputError, match="takes no overrides"):
        zoo.resolve("resnet56", overrides=["width=2"])


def test_torchvision():
    pytest.importorskip("torchvision")
    m, x, label = zoo.resolve("torchvision:resnet18")
    assert label == "torchvision:resnet18" and not m.training and x[0].shape == (1, 3, 224, 224)
    m, x, _ = zoo.resolve("torchvision:resnet18", batch=2, max_image_size=64, overrides={"num_classes": 7})
    assert x[0].shape == (2, 3, 64, 64) and m(*x).shape == (2, 7)


def test_timm_and_image_size_cap():
    pytest.importorskip("timm")
    m, x, label = zoo.resolve("timm:resnet18", input_shape="2,3,32,32")
    assert label == "timm:resnet18" and x[0].shape == (2, 3, 32, 32)
    # a ViT has a fixed grid: the capped input fails on the native model, so it is rebuilt with img_size=32
    m, x, _ = zoo.resolve("timm:vit_tiny_patch16_224", max_image_size=32, overrides=["depth=1"])
    assert x[0].shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert m(*x).shape == (1, 1000)


def test_hf_small_configs_overrides_and_tasks():
    pytest.importorskip("transformers")
    m, x, label = zoo.resolve("hf:llama")
    cfg = m.config
    assert label == "hf:llama (LlamaForCausalLM)" and not m.training
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.use_cache) == (2, 128, 4, 2, 1000, False)
    assert x[0].shape == (1, 16) and x[0].dtype == torch.long and int(x[0].max()) < 1000
    # overrides go through the config's constructor: derived fields (head_dim) follow them
    m, x, _ = zoo.resolve("hf:llama", overrides=["hidden_size=64", "vocab_size=64"], batch=2, seq=8)
    assert m.config.head_dim == 16 and x[0].shape == (2, 8) and int(x[0].max()) < 64
    # a vision model gets pixel_values of its config's image size; task picks the head
    m, x, label = zoo.resolve("hf:vit", task="image-classification",
                              overrides={"image_size": 32, "patch_size": 8, "num_labels": 3})
    assert label == "hf:vit (ViTForImageClassification)" and x[0].shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert m(*x).logits.shape == (1, 3)
    with pytest.raises(InputError, match="has no field 'num_hiden_layers'.*did you mean"):
        zoo.resolve("hf:llama", overrides=["num_hiden_layers=3"])
    with pytest.raises(InputError, match="unknown transformers model type 'lama'.*did you mean"):
        zoo.resolve("hf:lama")
    with pytest.raises(InputError, match="unknown task"):
        zoo.resolve("hf:llama", task="causal")


def test_hf_config_folder(tmp_path):
    T = pytest.importorskip("transformers")
    T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1).save_pretrained(tmp_path)
    m, x, label = zoo.resolve(f"hf:{tmp_path}", overrides=["num_hidden_layers=1"], batch=2)
    # a folder's config is used as it is (not made small), with the overrides set on it
    assert label.endswith("(LlamaForCausalLM)") and m.config.hidden_size == 32 and len(m.model.layers) == 1
    assert x[0].shape == (2, 16) and int(x[0].max()) < 64


def test_unknown_names_did_you_mean():
    with pytest.raises(InputError, match=r"unknown model 'resnet5' \(did you mean resnet5\d, resnet5\d\?\)") as e:
        zoo.resolve("resnet5")
    assert isinstance(e.value, ValueError)
    with pytest.raises(InputError, match="unknown model 'no_such_model'"):
        zoo.resolve("no_such_model")
    with pytest.raises(InputError, match=r"did you mean timm:resnet18\?"):  # a misspelt prefix
        zoo.resolve("tim:resnet18")
    with pytest.raises(InputError, match="name the model after 'timm:'"):
        zoo.resolve("timm:")
    with pytest.raises(InputError, match="bad input shape"):
        zoo.resolve("resnet56", input_shape="2,x,3")
    pytest.importorskip("torchvision")
    with pytest.raises(InputError, match="unknown torchvision model 'resnet5'.*did you mean"):
        zoo.resolve("torchvision:resnet5")
    with pytest.raises(InputError, match=r"did you mean torchvision:resnet18\?"):  # a bare zoo name
        zoo.resolve("resnet18")


MODEL_PY = textwrap.dedent("""\
    import torch
    import torch.nn as nn


    def build(width=8):
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU()), torch.randn(2, 3, 8, 8)


    def build_plain(width=8):
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU())


    def not_a_module():
        return 3
""")


def test_file_factory(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_PY)
    path = str(tmp_path / "net.py")
    state = torch.get_rng_state()
    m, x, label = zoo.resolve(f"{path}:build")
    assert torch.equal(torch.get_rng_state(), state)  # seeded build, the caller's RNG untouched
    assert label == "net.py:build (Sequential)" and x[0].shape == (2, 3, 8, 8) and m[0].out_channels == 8
    m2, _, _ = zoo.resolve(f"{path}:build")
    assert torch.equal(m[0].weight, m2[0].weight)  # same seed, same weights
    m, x, _ = zoo.resolve(f"{path}:build_plain", input_shape=[(1, 3, 5, 5)], overrides={"width": 4})
    assert m[0].out_channels == 4 and x[0].shape == (1, 3, 5, 5)
    with pytest.raises(InputError, match="returned no example inputs"):
        zoo.resolve(f"{path}:build_plain")
    with pytest.raises(InputError, match="has no callable 'biuld' \\(did you mean build"):
        zoo.resolve(f"{path}:biuld")
    with pytest.raises(InputError, match="returned int"):
        zoo.resolve(f"{path}:not_a_module")
    with pytest.raises(InputError, match="name the factory"):
        zoo.resolve(path)
    with pytest.raises(InputError, match="does not exist"):
        zoo.resolve(str(tmp_path / "missing.py") + ":build")


def test_parse_helpers():
    assert zoo.parse_shape("2,3,32,32;2,4") == [(2, 3, 32, 32), (2, 4)]
    assert zoo.parse_shape((2, 4)) == [(2, 4)]
    assert zoo.parse_overrides(["a=1", "b=0.5", "c=true", "d=[1, 2]", "e=x"]) == \
        {"a": 1, "b": 0.5, "c": True, "d": [1, 2], "e": "x"}
    with pytest.raises(InputError, match="KEY=VALUE"):
        zoo.parse_overrides(["novalue"])


class _ClsToken(nn.Module):
    """timm CaiT's pattern: ``cls_token.expand(...)`` (under no_grad: requires_grad, no grad_fn) fed to a block."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.block = nn.Linear(8, 8)

    def forward(self, x):
        t = self.cls_token.expand(x.shape[0], -1, -1)
        return self.block(t).sum() + x.sum()


def test_count_macs_no_grad_view_of_parameter():
    m = _ClsToken()
    assert count_macs(m, (torch.randn(2, 4, 8),)) == 2 * 8 * 8  # torch's module tracker used to assert here
    assert all(p.requires_grad for p in m.parameters())  # restored afterwards
    m.block.weight.requires_grad_(False)  # frozen parameters stay frozen
    count_macs(m, (torch.randn(2, 4, 8),))
    assert not m.block.weight.requires_grad and m.block.bias.requires_grad
    assert count_macs(nn.Linear(4, 3), (torch.randn(5, 4),)) == 5 * 4 * 3
