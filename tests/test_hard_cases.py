"""Every hard case of DESIGN.md: prune at 0.3 and 0.6, MACs fall, shrunk == masked on fresh inputs, shapes kept."""
import pytest
import torch
from torch.utils._pytree import tree_flatten

import fxprune
from fxprune.passes import ApplyMasks, ChannelPrune, Shrink
from fxprune.verify import random_like

from hard_cases import CASES, build


def _leaves(out):
    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("ratio", [0.3, 0.6])
@pytest.mark.parametrize("name", sorted(CASES))
def test_hard_case(name, ratio):
    model, inputs = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense_out = _leaves(model(*inputs))
    select = lambda: ChannelPrune(ratio, heads=True)  # noqa: E731 - same selection twice (deterministic)
    shrunk = fxprune.compile(model, inputs, passes=[select(), Shrink()])
    masked = fxprune.compile(model, inputs, passes=[select(), ApplyMasks()])
    r = shrunk.report
    assert r.verified is True
    assert r.macs_after < r.macs_before, f"{name}: MACs did not fall ({r.macs_before} -> {r.macs_after})"
    assert r.params_after < r.params_before
    # independent check on fresh inputs (not the ones compile verified with)
    args, kwargs = random_like(inputs, {}, seed=1234)
    with torch.no_grad():
        a, b = _leaves(shrunk.module(*args)), _leaves(masked.module(*args))
        d = _leaves(model(*args))
    assert [x.shape for x in a] == [x.shape for x in dense_out] == [x.shape for x in d]
    for x, y, z in zip(a, b, d):
        scale = y.abs().max().item()
        assert (x - y).abs().max().item() <= 1e-4 * max(scale, 1e-6), name
    # the check can see the pruning: masked differs from dense
    assert any(not torch.allclose(y, z, atol=1e-5) for y, z in zip(b, d)), f"{name}: pruning unobservable"
    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("name", sorted(CASES))
def test_dynamic_batch(name):
    """Traced with a dynamic batch dim: the shrunk module runs (and matches the masked one) at another batch size."""
    model, inputs = build(name)
    shrunk = fxprune.compile(model, inputs, passes=[ChannelPrune(0.5), Shrink()])
    masked = fxprune.compile(model, inputs, passes=[ChannelPrune(0.5), ApplyMasks()])
    assert shrunk.module.meta["fxprune_dynamic_batch"] is True
    x = inputs[0]
    big = torch.cat([x] * 5, dim=0)[:5]  # batch 5
    (fresh,), _ = random_like((big,), {}, seed=7)
    with torch.no_grad():
        a, b = _leaves(shrunk.module(fresh)), _leaves(masked.module(fresh))
    assert a[0].shape[0] == 5
    for x_, y_ in zip(a, b):
        assert (x_ - y_).abs().max().item() <= 1e-4 * max(y_.abs().max().item(), 1e-6)


@pytest.mark.parametrize("k, prunable", [(1, True), (3, False)])
def test_conv_length_dim_is_pointwise_only_for_1x1(k, prunable):
    """S (12 rows of each third of proj.weight) is the length of a 1d conv: prunable through a 1x1 conv, frozen
    (reason names the conv) through a k=3 conv whose output length depends on it."""
    from hard_cases import SpatialAsChannels

    gs = fxprune.analyze(SpatialAsChannels(k=k), (torch.randn(2, 8, 10),))
    s_groups = [g for g in gs.groups if g.size == 12 and any(m.param == "proj.weight" for m in g.members)]
    assert s_groups, gs
    for g in s_groups:
        if prunable:
            assert g.frozen is None, g.frozen
        else:
            assert g.frozen is not None and "spatial dim" in g.frozen and "conv1d" in g.frozen, g.frozen


def test_register_token_positions_are_frozen_by_sdpa():
    """The register tokens' sequence dim (4 positions of reg_token) reaches SDPA's keys: frozen, and the report names
    the SDPA node (regression: timm naflexvit refused with a structural mismatch)."""
    model, inputs = build("register_tokens_sdpa")
    gs = fxprune.analyze(model, inputs)
    (g,) = [g for g in gs.groups if any(m.param == "reg_token" and m.dim == 1 for m in g.members)]
    assert g.frozen is not None and "key sequence" in g.frozen and "scaled_dot_product_attention" in g.frozen, g


def test_unfold_passes_channels_and_freezes_windows():
    """unfold has a rule: the kv channels (heads x (dqk + dv)) reaching it stay prunable; the unfolded dims freeze
    naming the unfold node."""
    model, inputs = build("halo_unfold")
    gs = fxprune.analyze(model, inputs)
    kv = [g for g in gs.groups if any(m.param == "kv.weight" and m.dim == 0 for m in g.members)]
    assert kv and any(g.frozen is None and g.size > 1 for g in kv), kv
    assert not [g for g in gs.groups if g.frozen and "no rule" in g.frozen], gs
