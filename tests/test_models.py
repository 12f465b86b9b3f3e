"""Reference models: build deterministically, run, export; full configs build on the meta device."""
import pytest
import torch
from torch.utils._pytree import tree_flatten

from fxprune import models


@pytest.mark.parametrize("name", models.names())
def test_tiny_builds_runs_and_is_deterministic(name):
    m1, x = models.get(name, "tiny", seed=3)
    m2, _ = models.get(name, "tiny", seed=3)
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    with torch.no_grad():
        out = [t for t in tree_flatten(m1(*x))[0] if isinstance(t, torch.Tensor)]
    assert out and all(torch.isfinite(t).all() for t in out)
    assert sum(p.numel() for p in m1.parameters()) < 2_000_000


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="resnet56"):
        models.get("resnet9000")


@pytest.mark.parametrize("name,size,lo,hi", [("llama", "full", 0.9e9, 1.5e9), ("vit", "base", 80e6, 92e6),
                                             ("vit", "full", 20e6, 24e6), ("resnet50", "full", 24e6, 27e6),
                                             ("mobilenetv2", "full", 3.2e6, 3.8e6), ("resnet56", "full", 0.8e6, 0.9e6)])
def test_full_configs_on_meta(name, size, lo, hi):
    m, _ = models.get(name, size, device="meta")
    params = {id(p): p for p in m.parameters()}
    assert all(p.is_meta for p in params.values())
    n = sum(p.numel() for p in params.values())
    assert lo <= n <= hi, n
