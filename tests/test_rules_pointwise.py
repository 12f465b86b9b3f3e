"""fxprune.rules.pointwise on tiny graphs: elementwise ops unify aligned dims, broadcasting skips size-1 dims,
PReLU's weight indexes the channels, GLU's halves share one space."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.analyzer import analyze_graph
from fxprune.spaces import CONCAT
from fxprune.trace import trace

aten = torch.ops.aten


def analyze(model, *inputs):
    gm = trace(model.eval(), inputs, dynamic_batch=False)
    return gm, analyze_graph(gm)


def node(gm, op):
    (name,) = [n.name for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is op]
    return name


class AddTwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) + self.b(x))


def test_add_of_two_convs_is_one_space():
    gm, a = analyze(AddTwoConvs(), torch.randn(2, 3, 5, 5))
    t, p = a.table, a.param_spaces
    out = t.find(p["a.weight"][0])
    assert t.find(p["b.weight"][0]) == out
    assert t.find(p["a.bias"][0]) == t.find(p["b.bias"][0]) == out
    assert t.find(p["c.weight"][1]) == out  # the consumer's in-channels
    assert t.find(a.node_spaces[node(gm, aten.add)][1]) == out
    # relu has no explicit rule: it is found through torch.Tag.pointwise
    assert t.find(a.node_spaces[node(gm, aten.relu)][1]) == out
    assert out not in t.frozen_leaves()
    assert t.find(p["c.weight"][0]) != out


class BroadcastScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.scale = nn.Parameter(torch.ones(6, 1, 1))
        self.row = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return self.conv(x) * self.scale + self.row


def test_broadcast_unifies_only_aligned_non_singleton_dims():
    gm, a = analyze(BroadcastScale(), torch.randn(2, 3, 5, 5))
    t, p = a.table, a.param_spaces
    assert t.find(p["scale"][0]) == t.find(p["conv.weight"][0])
    # the row vector is right-aligned with the last (spatial) dim, not the channels
    out = a.node_spaces[node(gm, aten.add)]
    assert t.find(p["row"][0]) == t.find(out[3])
    assert t.find(p["row"][0]) != t.find(p["conv.weight"][0])
    # size-1 dims of the scale stay their own (frozen) spaces
    assert t.find(p["scale"][1]) != t.find(out[2])


class PReLUs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.per_channel, self.shared = nn.PReLU(6), nn.PReLU(1)

    def forward(self, x):
        y = self.conv(x)
        return self.per_channel(y), self.shared(y)


def test_prelu_weight_indexes_channels_only_when_per_channel():
    gm, a = analyze(PReLUs(), torch.randn(2, 3, 5, 5))
    t, p = a.table, a.param_spaces
    assert t.find(p["per_channel.weight"][0]) == t.find(p["conv.weight"][0])
    assert t.size(p["shared.weight"][0]) == 1
    assert t.find(p["shared.weight"][0]) != t.find(p["conv.weight"][0])


class GLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv1d(3, 8, 1), nn.Conv1d(4, 2, 1)

    def forward(self, x):
        return self.out(F.glu(self.conv(x), dim=1))


def test_glu_halves_share_one_space():
    gm, a = analyze(GLU(), torch.randn(2, 3, 5))
    t, p = a.table, a.param_spaces
    kind, halves = t.definition(p["conv.weight"][0])
    assert kind == CONCAT and len(halves) == 2
    assert t.find(halves[0]) == t.find(halves[1])  # channel i of the value half pairs with channel i of the gate
    assert t.size(halves[0]) == 4
    assert t.find(p["out.weight"][1]) == t.find(halves[0])
    assert t.leaves(p["conv.weight"][0]) == [t.find(halves[0])]
