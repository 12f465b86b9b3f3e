"""Reference models: tiny configs build deterministically, run with finite outputs of the documented shapes, and
trace (torch.export strict=False, torch.fx.symbolic_trace); full configs build on the meta device with the expected
parameter counts."""
import time

import pytest
import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from fxprune import models

# documented output shapes at size "tiny", batch 2
TINY_OUT = {
    "resnet56": [(2, 10)],
    "resnet50": [(2, 10)],
    "mobilenetv2": [(2, 10)],
    "yolov8": [(2, 4 * 16 + 4, 8, 8), (2, 4 * 16 + 4, 4, 4), (2, 4 * 16 + 4, 2, 2)],  # 64x64, strides 8/16/32
    "vit": [(2, 10)],
    "llama": [(2, 8, 128)],
    "multitask": [(2, 10), (2, 4)],
}
# symbolic_trace needs the optional argument pinned (see models/llama.py)
FX_CONCRETE = {"llama": {"attention_mask": None}}


def _leaves(out):
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def test_registry_names():
    assert models.names() == list(TINY_OUT)
    for name, mod in models.REGISTRY.items():
        assert callable(mod.build) and callable(mod.example_inputs) and "tiny" in mod.SIZES and "full" in mod.SIZES


@pytest.mark.parametrize("name", list(TINY_OUT))
def test_tiny(name):
    rng = torch.get_rng_state()
    m1, x = models.get(name, "tiny", seed=3)
    assert torch.equal(rng, torch.get_rng_state())  # building leaves the global RNG alone
    assert not m1.training
    m2, x2 = models.get(name, "tiny", seed=3)
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert all(torch.equal(a, b) for a, b in zip(x, x2))
    sd3 = models.get(name, "tiny", seed=4)[0].state_dict()
    assert any(not torch.equal(sd1[k], sd3[k]) for k in sd1)
    assert sum(p.numel() for p in m1.parameters()) < 2_000_000

    with torch.no_grad():
        t0 = time.perf_counter()
        out = m1(*x)
        t1 = time.perf_counter()
        out = _leaves(out)
    assert [tuple(t.shape) for t in out] == TINY_OUT[name]
    assert all(torch.isfinite(t).all() for t in out)
    assert t1 - t0 < 1.0  # design target is < 50 ms; loose here against noisy shared runners

    ep = torch.export.export(m1, x, strict=False)
    gm = torch.fx.symbolic_trace(m1, concrete_args=FX_CONCRETE.get(name))
    with torch.no_grad():
        for y in (_leaves(ep.module()(*x)), _leaves(gm(*x))):
            assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(y, out))


def test_unknown_name_and_size():
    with pytest.raises(ValueError, match="resnet56.*llama"):
        models.get("resnet9000")
    with pytest.raises(ValueError, match="tiny"):
        models.get("vit", size="huge")


def test_llama_tied_and_padding_mask():
    m, (ids,) = models.get("llama", "tiny")
    assert ids.dtype == torch.long and m.lm_head.weight is m.embed_tokens.weight
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    with torch.no_grad():
        plain, masked = m(ids), m(ids, mask)
    assert torch.isfinite(masked).all()
    assert torch.allclose(plain[0], masked[0], atol=1e-5) and torch.allclose(plain[1, :5], masked[1, :5], atol=1e-5)


@pytest.mark.parametrize("name,size,lo,hi", [
    ("llama", "full", 1.0e9, 1.1e9),        # 1.04B with the tied lm_head counted once
    ("vit", "base", 85e6, 88e6),            # ViT-B/16: 86.6M
    ("vit", "full", 21.5e6, 22.5e6),        # ViT-S/16: 22.1M
    ("resnet50", "full", 25e6, 26e6),       # 25.6M
    ("mobilenetv2", "full", 3.4e6, 3.6e6),  # 3.5M
    ("resnet56", "full", 0.8e6, 0.9e6),     # 0.86M
    ("yolov8", "full", 3.0e6, 3.3e6),       # YOLOv8n: 3.16M
    ("multitask", "full", 0.4e6, 0.6e6),
])
def test_full_configs_on_meta(name, size, lo, hi):
    t0 = time.perf_counter()
    m, _ = models.get(name, size, device="meta")
    assert time.perf_counter() - t0 < 5.0
    params = {id(p): p for p in m.parameters()}
    assert all(p.is_meta for p in params.values()) and all(b.is_meta for b in m.buffers())
    n = sum(p.numel() for p in params.values())
    assert lo <= n <= hi, n


def test_full_example_inputs():
    assert models.llama.example_inputs("full", batch=1)[0].shape == (1, 16)
    assert models.vit.example_inputs("base")[0].shape == (2, 3, 224, 224)
    assert models.resnet.build(variant="resnet50").fc.out_features == 10
