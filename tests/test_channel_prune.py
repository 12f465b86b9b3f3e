"""ChannelPrune options: importance criteria, scopes, round_to, ignore, target_macs, Torch-Pruning adapter."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.passes import ChannelPrune, Shrink

from hard_cases import build


def _kept(out):
    return {r.label: r.after for r in out.report.groups if r.frozen is None}


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "random"])
def test_builtin_importances(importance):
    m, x = build("residual_chain")
    out = fxprune.compile(m, x, passes=[ChannelPrune(0.5, importance=importance), Shrink()])
    assert out.report.verified and out.report.params_after < out.report.params_before


def test_random_importance_is_seeded():
    m, x = build("concat_of_concats")
    a = fxprune.compile(m, x, passes=[ChannelPrune(0.5, importance="random"), Shrink()], seed=3)
    b = fxprune.compile(m, x, passes=[ChannelPrune(0.5, importance="random"), Shrink()], seed=3)
    c = fxprune.compile(m, x, passes=[ChannelPrune(0.5, importance="random"), Shrink()], seed=4)
    wa, wb, wc = (o.module.get_parameter("a.0.weight") for o in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_l2_keeps_the_largest_channels():
    m, x = build("residual_chain")
    with torch.no_grad():
        w = m.b1[0][0].weight  # a conv whose out-channels form their own group with its BN and the next conv
        w.mul_(0.01)
        w[[1, 5, 9]] *= 1000.0  # make three channels clearly the most important
    out = fxprune.compile(m, x, passes=[ChannelPrune(0.75, importance="l2")])
    (g,) = [g for g in out.program.groups.containing("b1.0.0.weight") if any(
        mem.param == "b1.0.0.weight" and mem.dim == 0 for mem in g.members)]
    keep = out.program.masks[g.id]
    assert keep.sum() == 4 and keep[[1, 5, 9]].all()


def test_callable_importance_and_shape_check():
    m, x = build("residual_chain")
    out = fxprune.compile(m, x, passes=[ChannelPrune(0.5, importance=lambda g, p: np.arange(g.size)), Shrink()])
    assert out.report.verified
    with pytest.raises(fxprune.errors.InputError, match="one score per channel"):
        fxprune.compile(m, x, passes=[ChannelPrune(0.5, importance=lambda g, p: np.ones(3)), Shrink()])


def test_round_to_and_global_scope():
    m, x = build("concat_of_concats")
    out = fxprune.compile(m, x, passes=[ChannelPrune(0.5, round_to=4), Shrink()])
    assert all(r.after % 4 == 0 or r.after == r.before for r in out.report.groups if r.frozen is None)
    g = fxprune.compile(m, x, passes=[ChannelPrune(0.5, scope="global"), Shrink()])
    assert g.report.verified
    total_before = sum(r.before for r in g.report.groups if r.frozen is None)
    total_after = sum(r.after for r in g.report.groups if r.frozen is None)
    assert abs((total_before - total_after) / total_before - 0.5) < 0.15


def test_ignore_by_module_and_name():
    m, x = build("residual_chain")
    out = fxprune.compile(m, x, passes=[ChannelPrune(0.5, ignore=[m.b1, "b2.0"]), Shrink()])
    assert out.module.get_parameter("b1.0.0.weight").shape[0] == 16
    assert out.module.get_parameter("b2.0.0.weight").shape[0] == 16
    with pytest.raises(fxprune.errors.InputError, match="not part of the model"):
        fxprune.compile(m, x, passes=[ChannelPrune(0.5, ignore=[nn.Linear(2, 2)])])


def test_outputs_frozen_without_ignore():
    m, x = build("two_heads")
    out = fxprune.compile(m, x, passes=[ChannelPrune(0.6), Shrink()])
    y1, y2 = out.module(*x)
    z1, z2 = m(*x)
    assert y1.shape == z1.shape and y2.shape == z2.shape


def test_torch_pruning_importance_adapter():
    tp = pytest.importorskip("torch_pruning")
    m, x = build("residual_chain")
    for imp in (tp.importance.GroupMagnitudeImportance(p=2), tp.importance.LAMPImportance(p=2),
                tp.importance.FPGMImportance(p=2)):
        out = fxprune.compile(m, x, passes=[ChannelPrune(0.5, importance=imp), Shrink()])
        assert out.report.verified and out.report.params_after < out.report.params_before
    # Taylor needs gradients on the user's model: accumulate them first
    m.zero_grad()
    m(*x).sum().backward()
    out = fxprune.compile(m, x, passes=[ChannelPrune(0.5, importance=tp.importance.GroupTaylorImportance()),
                                        Shrink()])
    assert out.report.verified
