"""fxprune.rules.spatial on tiny graphs: pooling/upsampling pass channels and freeze spatial dims quietly,
pixel (un)shuffle and channel shuffle factor channels, padding freezes the padded dims."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.analyzer import analyze_graph
from fxprune.spaces import PRODUCT
from fxprune.trace import trace

aten = torch.ops.aten


def analyze(model, *inputs):
    gm = trace(model.eval(), inputs, dynamic_batch=False)
    return gm, analyze_graph(gm)


def node(gm, op):
    (n,) = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is op]
    return n


def factors(t, s):
    kind, parts = t.definition(s)
    assert kind == PRODUCT, kind
    return [t.find(x) for x in parts]


class Sandwich(nn.Module):
    """conv(3 -> cin) -> fn -> conv(cout -> 2): fn's channel spaces become the two convs' weight dims."""

    def __init__(self, fn, cin, cout):
        super().__init__()
        self.a, self.fn, self.b = nn.Conv2d(3, cin, 1), fn, nn.Conv2d(cout, 2, 1)

    def forward(self, x):
        return self.b(self.fn(self.a(x)))


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.f = fn

    def forward(self, x):
        return self.f(x)


def test_pool_and_upsample_pass_channels():
    m = Sandwich(Fn(lambda y: F.interpolate(F.max_pool2d(y, 2), scale_factor=2.0)), 4, 4)
    gm, a = analyze(m, torch.randn(2, 3, 8, 8))
    t, p = a.table, a.param_spaces
    assert t.find(p["a.weight"][0]) == t.find(p["b.weight"][1])
    assert t.find(p["a.weight"][0]) not in t.frozen_leaves()
    pool = a.node_spaces[node(gm, aten.max_pool2d).name]
    assert t.size(pool[2]) == 4 and t.frozen_leaves()[t.find(pool[2])] == "spatial dim"


def test_pooled_feature_dim_is_frozen_quietly_with_the_pool_named():
    """A dim that is a channel space elsewhere (linear out-features) but a pooled length here cannot change."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)

        def forward(self, x):
            return F.max_pool1d(self.fc(x), 2)

    gm, a = analyze(M(), torch.randn(2, 3, 8))
    t = a.table
    pool = node(gm, aten.max_pool1d)
    assert t.frozen_leaves()[t.find(a.param_spaces["fc.weight"][0])] == \
        f"{pool.name} (aten.max_pool1d.default): spatial dim (output size depends on it)"
    assert not any(n == pool.name for n, _, _ in a.frozen_nodes)  # quiet: not listed as a freezing node


def test_pixel_shuffle_channels_are_channels_times_r_squared():
    gm, a = analyze(Sandwich(nn.PixelShuffle(2), 12, 3), torch.randn(2, 3, 4, 4))
    t, p = a.table, a.param_spaces
    c, r1, r2 = factors(t, p["a.weight"][0])
    assert c == t.find(p["b.weight"][1]) and t.size(c) == 3
    assert t.frozen_leaves()[r1] == t.frozen_leaves()[r2] == "pixel shuffle factor"
    assert c not in t.frozen_leaves()


def test_pixel_unshuffle_output_is_input_channels_times_r_squared():
    gm, a = analyze(Sandwich(nn.PixelUnshuffle(2), 3, 12), torch.randn(2, 3, 4, 4))
    t, p = a.table, a.param_spaces
    c, r1, r2 = factors(t, p["b.weight"][1])
    assert c == t.find(p["a.weight"][0]) and (t.size(r1), t.size(r2)) == (2, 2)


def test_channel_shuffle_swaps_the_factors():
    gm, a = analyze(Sandwich(nn.ChannelShuffle(2), 6, 6), torch.randn(2, 3, 4, 4))
    t, p = a.table, a.param_spaces
    g, k = factors(t, p["a.weight"][0])
    assert (t.size(g), t.size(k)) == (2, 3)
    assert factors(t, p["b.weight"][1]) == [k, g]
    assert t.frozen_leaves()[g] == "channel shuffle groups"
    assert k not in t.frozen_leaves()


def test_constant_pad_freezes_only_padded_dims():
    m = Sandwich(Fn(lambda y: F.pad(y, (1, 1, 0, 0))), 4, 4)
    gm, a = analyze(m, torch.randn(2, 3, 5, 5))
    t, p = a.table, a.param_spaces
    (pad,) = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) in (aten.pad, aten.constant_pad_nd)]
    src, out = a.node_spaces[pad.args[0].name], a.node_spaces[pad.name]
    assert t.find(out[1]) == t.find(p["a.weight"][0]) == t.find(p["b.weight"][1])
    assert t.find(out[2]) == t.find(src[2])  # not padded
    op = f"aten.{pad.target.__name__}"
    assert t.size(out[3]) == 7 and t.frozen_leaves()[t.find(out[3])] == f"{pad.name} ({op}): padded dim"
    assert [(n, w) for n, o, w in a.frozen_nodes if o == op] == [(pad.name, "padded dim")]


class Deformable(nn.Module):
    """Deformable-attention sampling: each query samples ``points`` locations predicted by a Linear, weighted by a
    softmax over the points from another Linear (HF Deformable DETR / RT-DETR in miniature)."""

    def __init__(self, c=8, points=4):
        super().__init__()
        self.points = points
        self.value = nn.Conv2d(3, c, 1)
        self.offsets = nn.Linear(c, points * 2)
        self.weights = nn.Linear(c, points)
        self.out = nn.Linear(c, 5)

    def forward(self, img, q):  # img (N, 3, H, W), q (N, Q, c)
        n, nq, _ = q.shape
        v = self.value(img)
        grid = torch.tanh(self.offsets(q)).view(n, nq, self.points, 2)
        s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (N, c, Q, P)
        w = self.weights(q).softmax(-1).view(n, 1, nq, self.points)
        return self.out((s * w).sum(-1).transpose(1, 2))


def test_grid_sample_output_positions_are_the_grids():
    m = Deformable()
    gm, a = analyze(m, torch.randn(2, 3, 6, 6), torch.randn(2, 5, 8))
    t, p = a.table, a.param_spaces
    (gs,) = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) in
             (aten.grid_sampler, aten.grid_sampler_2d)]
    g = a.node_spaces[gs.name]
    assert t.find(g[1]) == t.find(p["value.weight"][0])  # channels pass through from the sampled input
    # the sampled points are the offsets Linear's (P, 2) rows: the output's last dim is that P, not a fresh space
    (pts, xy) = factors(t, p["offsets.weight"][0])
    assert t.find(g[3]) == t.find(pts)
    assert t.find(xy) in t.frozen_leaves()  # the coordinate pair is consumed by the sampler


def test_deformable_sampling_shrinks_and_verifies():
    import fxprune
    from fxprune.passes import ChannelPrune, Shrink

    torch.manual_seed(0)
    m = Deformable().eval()
    x = (torch.randn(2, 3, 6, 6), torch.randn(2, 5, 8))
    out = fxprune.compile(m, x, [ChannelPrune(ratio=0.5), Shrink()])
    assert out.report.verified
    assert out.report.params_after < out.report.params_before
    y = out.module(torch.randn(3, 3, 6, 6), torch.randn(3, 5, 8))
    assert y.shape == (3, 5, 5)
