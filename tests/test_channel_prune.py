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


class _EqualWidths(nn.Module):
    """Four 3x3 convs of 32 channels and one of 24: with alike random scores every group crosses a rounding step
    at the same ratio."""

    def __init__(self, ch=(3, 32, 32, 32, 32, 24)):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU())
                                     for a, b in zip(ch, ch[1:])])
        self.head = nn.Conv2d(24, 8, 1)

    def forward(self, x):
        return self.head(self.convs(x))


def test_target_macs_with_round_to_fills_what_rounding_left_of_the_budget():
    """The bisection's ratio alone kept 0.31 of the MACs for target_macs=0.5 under round_to=16 on the YOLOv8-style
    detector: every 32-channel group jumped to 16 at once. What is left of the budget is given back 16 channels at
    a time, so the result is just under the target."""
    torch.manual_seed(0)
    m, x = _EqualWidths().eval(), torch.randn(1, 3, 16, 16)
    for scope in ("local", "global"):
        out = fxprune.compile(m, x, passes=[ChannelPrune(target_macs=0.5, round_to=16, scope=scope), Shrink()])
        frac = out.report.macs_after / out.report.macs_before
        assert 0.4 < frac <= 0.5 + 1e-9, (scope, frac)
        assert out.report.verified and out.report.passes[0]["stats"]["units_filled"] > 0
        assert all(r.after % 16 == 0 or r.after == r.before for r in out.report.groups if r.frozen is None)


def test_round_to_larger_than_what_a_group_sheds_keeps_it_whole():
    """ChannelPrune(ratio=0.2, round_to=16) on MobileNetV2 raised PassError ('group keeps 24 channels, not a
    multiple of 16'): a 24-channel group rounded up to its whole width was still given the divisor 16."""
    torch.manual_seed(0)
    m, x = _EqualWidths((3, 64, 64, 24)).eval(), torch.randn(1, 3, 16, 16)
    out = fxprune.compile(m, x, passes=[ChannelPrune(0.3, round_to=16), Shrink()])
    assert out.report.verified
    kept = sorted(r.after for r in out.report.groups if r.frozen is None)
    assert kept == [24, 48, 48]  # 64 - 19 = 45 -> 48; 24 - 7 = 17 -> 32, capped at the whole 24


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
