"""BNScalePrune, GroupChannelPrune (per-partition quantiles, auto partition) and AbsorbBNShift."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune import PassContext, PassManager, Program
from fxprune.errors import InputError, PassError
from fxprune.passes import ApplyMasks, ChannelPrune, Shrink
from fxprune.passes.bn_absorb import AbsorbBNShift
from fxprune.passes.bn_prune import BNScalePrune, GroupChannelPrune, PartitionRecord, bn_group_scores, feature_info
from fxprune.testing import make_observable


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops on a shared 2-core machine: one intra-op thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, k=3, s=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class Block(nn.Module):
    """Two convs and a shortcut (a 'block type' for the auto partition)."""

    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = ConvBNAct(c, c), ConvBNAct(c, c)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class Split(nn.Module):
    """1x1 conv, channel split, a branch, concat (a second block type)."""

    def __init__(self, c):
        super().__init__()
        self.cv1, self.m, self.cv2 = ConvBNAct(c, 2 * c, 1), ConvBNAct(c, c), ConvBNAct(3 * c, c, 1)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, b, self.m(b)], 1))


class MultiScale(nn.Module):
    def __init__(self, w=16):
        super().__init__()
        self.stem = ConvBNAct(3, w, s=1)
        self.s1 = nn.Sequential(Block(w), Split(w))
        self.down1 = ConvBNAct(w, 2 * w, s=2)
        self.s2 = nn.Sequential(Block(2 * w), Split(2 * w))
        self.down2 = ConvBNAct(2 * w, 4 * w, s=2)
        self.s4 = nn.Sequential(Split(4 * w), Split(4 * w))
        self.head = nn.Conv2d(4 * w, 5, 1)

    def forward(self, x):
        x = self.s4(self.down2(self.s2(self.down1(self.s1(self.stem(x))))))
        return self.head(x)


def model(seed=0):
    torch.manual_seed(seed)
    return make_observable(MultiScale().eval(), seed), (torch.randn(2, 3, 16, 16),)


_TRACED = {}


def traced(build, key):
    """The dense program of a model, traced once per test session (passes never mutate the program they get)."""
    if key not in _TRACED:
        m, x = build()
        gm = fxprune.trace(m, x)
        prog = Program(gm, x, {}, source=m)
        prog.groups  # noqa: B018 - analyse once
        _TRACED[key] = (m, x, prog)
    return _TRACED[key]


def run(program, passes, verify=True):
    """Run passes on a traced program like fxprune.compile does, minus the trace. Returns (final, stats list)."""
    ctx = PassContext(seed=0, verify=verify, dense=program.gm)
    final, results = PassManager(passes).run(program, ctx)
    return final, [r.stats for _, r, _ in results]


def bn_weights(m):
    return {n: mod.weight for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)}


def zero_half_gammas(m):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight[::2] = 0.0
    return m


def scaled_deep():
    m, x = model()
    with torch.no_grad():  # the deep stage's BNs get tiny gammas: a global threshold prunes them hardest
        for n, w in bn_weights(m).items():
            if n.startswith(("s4", "down2")):
                w.mul_(0.01)
        m.stem.bn.weight.copy_(torch.arange(16, dtype=torch.float32) / 10 + 0.01)  # 0.01 ... 1.51
    return m, x


def test_bn_scale_layer_removes_smallest_gammas_per_group():
    m, x, prog = traced(scaled_deep, "scaled")
    final, stats = run(prog, [BNScalePrune(0.5)])
    gs = final.groups
    g = next(g for g in gs.prunable() if any(mm.param == "stem.bn.weight" for mm in g.members))
    sc = bn_group_scores(final, g)
    mask = final.masks[g.id]
    assert sc[~mask].max() < sc[mask].min()
    for gid, mk in final.masks.items():
        size = gs[gid].size
        assert mk.sum() == size - size // 2
        sc = bn_group_scores(final, gs[gid])
        assert sc[~mk].max() <= sc[mk].min()
    assert stats[0]["channels_removed"] == sum(gs[gid].size // 2 for gid in final.masks)


def test_bn_scale_global_threshold_and_min_channels():
    m, x, prog = traced(scaled_deep, "scaled")
    final, stats = run(prog, [BNScalePrune(0.5, scope="global", min_channels=2)])
    st = stats[0]
    total = st["channels_scored"]
    assert total // 2 - 2 * len(final.masks) <= st["channels_removed"] <= total // 2
    gs = final.groups
    for gid, mk in final.masks.items():
        assert mk.sum() >= 2
    thr = st["threshold"]
    for gid, mk in final.masks.items():
        sc = bn_group_scores(final, gs[gid])
        if mk.sum() > 2:  # not floored: one global threshold separates removed from kept channels
            assert sc[~mk].max(initial=-1) <= thr < sc[mk].min()
    deep = [gid for gid in final.masks if gs[gid].label.startswith(("s4", "down2"))]
    shallow = [gid for gid in final.masks if gid not in deep]
    frac = lambda ids: np.mean([1 - final.masks[g].mean() for g in ids])  # noqa: E731
    assert deep and frac(deep) > frac(shallow) + 0.3


def test_group_channel_prune_ratios_equal_quantiles():
    m, x, prog = traced(model, "plain")
    q = {"s1/*": 0.25, "s2/*": 0.5, "s4/*": 0.75}
    final, stats = run(prog, [GroupChannelPrune("auto", q, min_channels=1, min_fraction=0.0)])
    parts = stats[0]["partitions"]
    assert len(parts) >= 4
    assert {name.split("/")[0] for name in parts} == {"s1", "s2", "s4"}
    gs = final.groups
    for name, p in parts.items():
        want = q[name.split("/")[0] + "/*"]
        assert p["quantile"] == want
        assert p["ratio"] == pytest.approx(np.floor(p["channels"] * want) / p["channels"])
        assert abs(p["ratio"] - want) < 1.0 / p["channels"] + 1e-9
        assert sum(int((~final.masks[g]).sum()) for g in p["groups"]) == p["removed"]
        # one threshold per partition: removed channels score at most it, kept ones at least it
        for g in p["groups"]:
            sc = bn_group_scores(final, gs[g])
            assert sc[~final.masks[g]].max(initial=-1) <= p["threshold"] <= sc[final.masks[g]].min()
    assert set(final.records_of(PartitionRecord)[-1].partition) == {g for p in parts.values() for g in p["groups"]}


def test_auto_partition_uses_stride_and_block_type():
    m, x, prog = traced(model, "plain")
    final, stats = run(prog, [GroupChannelPrune("auto", 0.5, min_channels=1)])
    blocks = {name.split("/")[1] for name in stats[0]["partitions"]}
    assert {"Block", "Split"} <= blocks
    info = feature_info(prog)
    assert info["down1.bn.weight"]["stride"] == 2 and info["s4.0.cv2.bn.weight"]["stride"] == 4
    assert info["s4.0.m.bn.weight"]["block"] == "Split" and info["s1.0.cv1.bn.weight"]["block"] == "Block"


def test_group_channel_prune_mapping_sequence_and_floor():
    m, x, prog = traced(model, "plain")
    mapping = {"early": ["stem", "s1", "down1"], "late": ["s2", "down2", "s4"]}
    final, stats = run(prog, [GroupChannelPrune(mapping, [0.2, 0.6], min_channels=1, min_fraction=0)])
    parts = stats[0]["partitions"]
    assert set(parts) == {"early", "late"}
    assert parts["early"]["quantile"] == 0.2 and parts["late"]["quantile"] == 0.6
    final, stats = run(prog, [GroupChannelPrune("auto", 0.9, min_channels=12)])  # the per-layer floor
    for gid, mk in final.masks.items():
        assert mk.sum() >= min(12, mk.size)
    assert any(p["floored_groups"] for p in stats[0]["partitions"].values())
    with pytest.raises(InputError, match="quantiles"):
        run(prog, [GroupChannelPrune("auto", [0.5, 0.5], min_channels=1)])


@pytest.mark.parametrize("p", [BNScalePrune(0.5), BNScalePrune(0.5, "global"),
                               GroupChannelPrune("auto", 0.6, min_channels=2)])
def test_shrunk_equals_masked(p):
    m, x, prog = traced(model, "plain")
    masked, _ = run(prog, [p, ApplyMasks()])
    shrunk, stats = run(prog, [p, Shrink()])
    assert stats[1]["verified"] and stats[1]["removed_channels"] > 0
    assert shrunk.num_params() < masked.num_params()
    xx = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        a, b = masked.gm(xx), shrunk.gm(xx)
    assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))


class OneByOne(nn.Module):
    """BN -> activation -> 1x1 conv / maxpool + concat / linear: every absorption is exact."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)  # no bias: BN running mean
        self.c3 = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = F.silu(self.b1(self.c1(x)))
        b = F.relu(self.b2(self.c2(a)))
        y = self.c3(torch.cat([F.max_pool2d(a, 3, 1, 1), F.hardswish(b)], 1))
        return self.fc(y.mean((2, 3)))


def one_by_one():
    torch.manual_seed(0)
    return zero_half_gammas(make_observable(OneByOne().eval())), (torch.randn(2, 3, 8, 8),)


def test_absorb_makes_pruning_zero_gamma_channels_exact():
    m, x, prog = traced(one_by_one, "1x1")
    final, stats = run(prog, [BNScalePrune(0.5), AbsorbBNShift(), Shrink()])
    st = stats[1]
    assert st["max_removed_gamma"] == 0.0 and not st["skipped"] and not st["approximate"]
    assert {a["into"] for a in st["absorbed"]} == {"b2.running_mean", "c3.bias"}
    assert all(a["exact"] for a in st["absorbed"])
    assert st["max_change_without"] > 1e-3 and st["max_change"] < 1e-5
    assert stats[2]["verified"]
    plain, _ = run(prog, [BNScalePrune(0.5), Shrink()])
    xx = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert (final.gm(xx) - m(xx)).abs().max() < 1e-5
        assert (plain.gm(xx) - m(xx)).abs().max() > 1e-3


def zero_multiscale():
    m, x = model()
    return zero_half_gammas(m), x


def test_absorb_reports_padding_and_missing_bias():
    m, x, prog = traced(zero_multiscale, "zero")
    _, stats = run(prog, [BNScalePrune(0.5), AbsorbBNShift()])
    st = stats[1]
    assert st["approximate"]  # 3x3 convs with zero padding: inexact at the borders, reported
    assert all(not a["exact"] for a in st["absorbed"] if a["zero_padding"])
    assert st["max_change"] < st["max_change_without"]
    _, stats = run(prog, [BNScalePrune(0.5), AbsorbBNShift(padded="skip")])
    assert not stats[1]["approximate"] and any("padding" in s["reason"] for s in stats[1]["skipped"])

    class NoBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 4, 1, bias=False)

        def forward(self, x):
            return F.relu(self.c2(F.relu(self.b1(self.c1(x)))))

    def no_bias():
        torch.manual_seed(0)
        return zero_half_gammas(make_observable(NoBias().eval())), (torch.randn(2, 3, 4, 4),)

    _, _, p2 = traced(no_bias, "nobias")
    _, stats = run(p2, [BNScalePrune(0.5), AbsorbBNShift()])
    assert stats[1]["skipped"] and "no bias" in stats[1]["skipped"][0]["reason"]


def test_compile_api_and_bad_options():
    m, x = one_by_one()
    out = fxprune.compile(m, x, passes=[BNScalePrune(0.5), AbsorbBNShift(), Shrink()])
    assert out.report.verified and out.report.macs_after < out.report.macs_before
    assert [h["pass"] for h in out.report.passes] == ["bn_scale_prune", "absorb_bn_shift", "shrink"]
    with pytest.raises(InputError):
        BNScalePrune(1.0)
    with pytest.raises(InputError):
        BNScalePrune(0.5, scope="tensor")
    with pytest.raises(InputError):
        BNScalePrune(0.5, min_channels=0)
    with pytest.raises(InputError):
        GroupChannelPrune("scales")
    with pytest.raises(InputError):
        GroupChannelPrune("auto", quantiles=1.5)
    with pytest.raises(InputError):
        GroupChannelPrune("auto", quantiles={"s8/*": -0.1})
    with pytest.raises(InputError):
        GroupChannelPrune({"p": "backbone"})
    with pytest.raises(InputError):
        AbsorbBNShift(padded="maybe")
    _, _, prog = traced(one_by_one, "1x1")
    with pytest.raises(PassError, match="masks"):
        run(prog, [AbsorbBNShift()])
    with pytest.raises(PassError, match="masked"):
        run(prog, [ChannelPrune(ratio=0.5), ApplyMasks(), AbsorbBNShift()])
