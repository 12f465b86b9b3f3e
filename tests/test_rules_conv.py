"""fxprune.rules.conv on tiny graphs: in/out channels, grouped and depthwise ties, transposed weights, spatial
dims (pointwise for 1x1 kernels, frozen otherwise), MACs and the groups rewrite."""
import types

import torch
import torch.nn as nn

from fxprune.analyzer import analyze_graph
from fxprune.rules import REWRITES, RULES
from fxprune.spaces import PRODUCT
from fxprune.trace import trace

aten = torch.ops.aten


def analyze(model, *inputs):
    gm = trace(model.eval(), inputs, dynamic_batch=False)
    return gm, analyze_graph(gm)


def placeholder(gm):
    (name,) = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return name


def conv_nodes(gm):
    return [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) in (aten.conv1d, aten.conv2d,
                                                                                      aten.conv_transpose2d)]


def test_conv_in_and_out_channels():
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1))
    gm, a = analyze(m, torch.randn(2, 3, 8, 8))
    t, p = a.table, a.param_spaces
    assert t.find(p["0.weight"][0]) == t.find(p["0.bias"][0]) == t.find(p["1.weight"][1])
    c0 = conv_nodes(gm)[0].name
    assert t.find(a.node_spaces[c0][1]) == t.find(p["0.weight"][0])
    assert t.find(a.node_spaces[placeholder(gm)][1]) == t.find(p["0.weight"][1])  # graph input: frozen
    assert "graph input" in t.frozen_leaves()[t.find(p["0.weight"][1])]
    assert t.frozen_leaves()[t.find(p["0.weight"][2])] == "kernel dim"
    assert t.find(p["0.weight"][0]) not in t.frozen_leaves()
    assert a.aux[c0] == {"groups": None}
    (mac,) = [m_ for m_ in a.mac_terms if m_.node == c0]
    assert mac.const == 9
    assert [t.find(s) for s in mac.spaces] == [t.find(s) for s in a.node_spaces[c0] + [p["0.weight"][1]]]


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 4, 1)
        self.g = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.post = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.post(self.g(self.pre(x)))


def test_grouped_conv_ties_in_and_out_channels_blockwise():
    gm, a = analyze(Grouped(), torch.randn(2, 3, 8, 8))
    t, p = a.table, a.param_spaces
    g_node = conv_nodes(gm)[1].name
    groups = a.aux[g_node]["groups"]
    assert t.size(groups) == 2
    kind, (g_in, per_in) = t.definition(p["pre.weight"][0])  # in-channels = (groups, in per group)
    assert kind == PRODUCT and t.find(g_in) == t.find(groups)
    assert t.find(per_in) == t.find(p["g.weight"][1]) and t.size(per_in) == 2
    kind, (g_out, per_out) = t.definition(p["g.weight"][0])  # out-channels = (groups, out per group)
    assert kind == PRODUCT and t.find(g_out) == t.find(groups) and t.size(per_out) == 3
    assert t.find(p["post.weight"][1]) == t.find(p["g.weight"][0]) == t.find(p["g.bias"][0])
    assert RULES[aten.conv2d] is RULES[aten.conv1d] and aten.conv2d in REWRITES


def test_groups_rewrite_sets_the_kept_group_count():
    gm, a = analyze(Grouped(), torch.randn(2, 3, 8, 8))
    g_node = conv_nodes(gm)[1]
    groups = a.aux[g_node.name]["groups"]
    R = types.SimpleNamespace(aux=lambda n: a.aux[n.name], new=lambda s: 1 if a.table.find(s) == a.table.find(groups)
                              else a.table.size(s))
    REWRITES[aten.conv2d](R, g_node)
    assert g_node.args[6] == 1


def test_depthwise_conv_ties_in_out_and_groups():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 2, 1))
    gm, a = analyze(m, torch.randn(2, 3, 8, 8))
    t, p = a.table, a.param_spaces
    dw = conv_nodes(gm)[1].name
    space = t.find(p["0.weight"][0])
    assert t.find(a.aux[dw]["groups"]) == space
    assert t.find(p["1.weight"][0]) == t.find(p["2.weight"][1]) == space
    assert t.size(p["1.weight"][1]) == 1
    assert space not in t.frozen_leaves()


def test_transposed_conv_weight_is_in_then_out():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 6, 2, stride=2), nn.Conv2d(6, 2, 1))
    gm, a = analyze(m, torch.randn(2, 3, 4, 4))
    t, p = a.table, a.param_spaces
    assert t.find(p["1.weight"][0]) == t.find(p["0.weight"][0])  # (C_in, C_out, k, k)
    assert t.find(p["1.weight"][1]) == t.find(p["1.bias"][0]) == t.find(p["2.weight"][1])
    assert t.find(p["1.weight"][0]) != t.find(p["1.weight"][1])
    tc = conv_nodes(gm)[1].name
    out = a.node_spaces[tc]
    assert t.size(out[2]) == 8
    assert "spatial dim (output size depends on it)" in t.frozen_leaves()[t.find(out[2])]
    assert not any(n == tc for n, _, _ in a.frozen_nodes)  # spatial freezes are quiet


def test_grouped_transposed_conv():
    """weight (C_in, C_out/g, k, k): in-channels = (groups, C_in/g), out-channels = (groups, weight dim 1)."""
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 6, 1, groups=2), nn.Conv2d(6, 2, 1))
    gm, a = analyze(m, torch.randn(2, 3, 4, 4))
    t, p = a.table, a.param_spaces
    groups = t.find(a.aux[conv_nodes(gm)[1].name]["groups"])
    kind, (g_in, per_in) = t.definition(p["0.weight"][0])
    assert kind == PRODUCT and t.find(g_in) == groups and t.size(per_in) == 2
    kind, (g_w, per_w) = t.definition(p["1.weight"][0])  # the same factors (two equal products)
    assert (t.find(g_w), t.find(per_w)) == (t.find(g_in), t.find(per_in))
    kind, (g_out, per_out) = t.definition(p["2.weight"][1])
    assert kind == PRODUCT and t.find(g_out) == groups
    assert t.find(per_out) == t.find(p["1.weight"][1]) and t.size(per_out) == 3


def test_spatial_dims_pointwise_for_1x1_and_frozen_for_3x3():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3))
    gm, a = analyze(m, torch.randn(2, 3, 6, 6))
    t = a.table
    c0, c1, c2 = (n.name for n in conv_nodes(gm))
    assert t.find(a.node_spaces[c0][2]) == t.find(a.node_spaces[c1][2]) == t.find(a.node_spaces[placeholder(gm)][2])
    assert t.find(a.node_spaces[c2][2]) != t.find(a.node_spaces[c1][2])
    reason = t.frozen_leaves()[t.find(a.node_spaces[c2][2])]
    assert reason == f"{c2} (aten.conv2d.default): spatial dim (output size depends on it)"
