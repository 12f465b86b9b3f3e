"""fxprune.rules.reduction on tiny graphs: reductions and softmax over a channel dim freeze it and name the node;
over other dims the channels pass through; binary max/min are pointwise; tril/triu freeze their last two dims."""
import torch
import torch.nn as nn

from fxprune.analyzer import analyze_graph
from fxprune.trace import trace

aten = torch.ops.aten


def analyze(model, *inputs):
    gm = trace(model.eval(), inputs, dynamic_batch=False)
    return gm, analyze_graph(gm)


def node(gm, op):
    (n,) = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is op]
    return n


class Lin(nn.Module):
    """fc (3 -> 4 features) -> fn -> head (4 -> 2) when ``head`` (so the output does not freeze the features)."""

    def __init__(self, fn, head=False):
        super().__init__()
        self.fc, self.fn = nn.Linear(3, 4), fn
        self.head = nn.Linear(4, 2) if head else nn.Identity()

    def forward(self, x):
        return self.head(self.fn(self.fc(x)))


def test_mean_over_channels_freezes_them_and_names_the_node():
    gm, a = analyze(Lin(lambda y: y.mean(-1)), torch.randn(2, 5, 3))
    t = a.table
    mean = node(gm, aten.mean)
    why = "mean over these dims observes the channel count"
    assert t.frozen_leaves()[t.find(a.param_spaces["fc.weight"][0])] == f"{mean.name} (aten.mean.dim): {why}"
    assert (mean.name, "aten.mean.dim", why) in a.frozen_nodes
    out = a.node_spaces[mean.name]
    assert len(out) == 2 and t.find(out[1]) == t.find(a.node_spaces["x"][1])


def test_mean_over_other_dims_keeps_channels_prunable():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    gm, a = analyze(M(), torch.randn(2, 3, 5, 5))
    t, p = a.table, a.param_spaces
    assert t.find(p["conv.weight"][0]) == t.find(p["fc.weight"][1])
    assert t.find(p["conv.weight"][0]) not in t.frozen_leaves()


def test_keepdim_reduction_leaves_a_size_one_dim():
    gm, a = analyze(Lin(lambda y: y - y.amax(1, keepdim=True), head=True), torch.randn(2, 5, 3))
    t = a.table
    out = a.node_spaces[node(gm, aten.amax).name]
    assert t.size(out[1]) == 1 and t.find(out[2]) == t.find(a.param_spaces["fc.weight"][0])
    assert t.find(a.param_spaces["fc.weight"][0]) not in t.frozen_leaves()  # reduced over dim 1, not channels


def test_softmax_over_channels_freezes_but_over_sequence_does_not():
    gm, a = analyze(Lin(lambda y: y.softmax(-1)), torch.randn(2, 5, 3))
    sm = node(gm, aten.softmax)
    why = "softmax mixes positions along this dim"
    assert [w for n, _, w in a.frozen_nodes if n == sm.name] == [why]
    assert a.table.find(a.param_spaces["fc.weight"][0]) in a.table.frozen_leaves()

    gm, a = analyze(Lin(lambda y: y.softmax(1), head=True), torch.randn(2, 5, 3))
    assert a.table.find(a.param_spaces["fc.weight"][0]) not in a.table.frozen_leaves()


def test_binary_max_is_pointwise():
    """torch.max(a, b) is aten.max.other: the reduction rule hands it to the pointwise rule."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.max(self.a(x), self.b(x)))

    gm, a = analyze(M(), torch.randn(2, 3))
    assert node(gm, aten.max).target is aten.max.other
    t, p = a.table, a.param_spaces
    assert t.find(p["a.weight"][0]) == t.find(p["b.weight"][0]) == t.find(p["head.weight"][1])
    assert t.find(p["a.weight"][0]) not in t.frozen_leaves()


def test_tril_freezes_last_two_dims():
    gm, a = analyze(Lin(lambda y: y.tril()), torch.randn(2, 4, 3))
    tril = node(gm, aten.tril)
    assert (tril.name, "aten.tril.default", "triangular mask indexes positions") in a.frozen_nodes
    assert a.table.find(a.param_spaces["fc.weight"][0]) in a.table.frozen_leaves()
