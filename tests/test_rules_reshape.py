"""fxprune.rules.reshape on tiny graphs: view factoring C -> (H, D), flatten merging, many-to-many regrouping,
permute/transpose/unsqueeze/squeeze re-ordering, expand/repeat/repeat_interleave, and the view-size rewrite."""
import types

import torch
import torch.nn as nn

from fxprune.analyzer import analyze_graph
from fxprune.rules import REWRITES
from fxprune.spaces import CONCAT, PRODUCT
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


class Lin(nn.Module):
    """A linear layer followed by ``fn`` (so the reshaped dim is a prunable space, not a graph input)."""

    def __init__(self, fn, cin=3, cout=8):
        super().__init__()
        self.fc, self.fn = nn.Linear(cin, cout), fn

    def forward(self, x):
        return self.fn(self.fc(x))


def test_view_factors_channels_into_heads_and_head_dim():
    gm, a = analyze(Lin(lambda y: y.view(2, 5, 2, 4)), torch.randn(2, 5, 3))
    t, p = a.table, a.param_spaces
    v = node(gm, aten.view)
    out = a.node_spaces[v.name]
    assert factors(t, p["fc.weight"][0]) == [t.find(out[2]), t.find(out[3])]
    assert (t.size(out[2]), t.size(out[3])) == (2, 4)
    assert t.find(out[0]) == t.find(a.node_spaces["x"][0])
    # the rewrite recomputes the sizes from the kept sizes of the output spaces
    R = types.SimpleNamespace(spaces=lambda n: a.node_spaces[n.name], new=lambda s: 1 if t.find(s) == t.find(out[2])
                              else t.size(t.find(s)), old_size=lambda s: t.size(t.find(s)))
    REWRITES[aten.view](R, v)
    assert list(v.args[1]) == [2, 5, 1, 4]


def test_flatten_merges_into_a_product():
    gm, a = analyze(Lin(lambda y: y.flatten(1), cout=4), torch.randn(2, 6, 3))
    t, p = a.table, a.param_spaces
    out = a.node_spaces[node(gm, aten.flatten).name]
    assert factors(t, out[1]) == [t.find(a.node_spaces["x"][1]), t.find(p["fc.weight"][0])]


def test_many_to_many_reshape_goes_through_the_common_refinement():
    # (B=2, H*D=8) -> (B*H=4, D=4): factors 2 | 2 | 4
    gm, a = analyze(Lin(lambda y: y.reshape(4, 4)), torch.randn(2, 3))
    t, p = a.table, a.param_spaces
    out = a.node_spaces[node(gm, aten.reshape).name]
    h, d = factors(t, p["fc.weight"][0])
    assert (t.size(h), t.size(d)) == (2, 4)
    assert t.find(out[1]) == d
    assert factors(t, out[0])[1] == h


def test_reshape_without_common_refinement_freezes():
    # (6, 10) -> (4, 15): 4 does not divide 6
    gm, a = analyze(Lin(lambda y: y.reshape(4, 15), cin=3, cout=10), torch.randn(6, 3))
    t = a.table
    v = node(gm, aten.reshape)
    why = "reshape regroups dims (6, 10) -> (4, 15) with no common refinement"
    assert [w for n, _, w in a.frozen_nodes if n == v.name] == [why]
    assert t.find(a.param_spaces["fc.weight"][0]) in t.frozen_leaves()


def test_permute_transpose_unsqueeze_squeeze_reorder_spaces():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x).permute(0, 2, 3, 1)  # channels last
            return y, y.transpose(1, -1), y.unsqueeze(2), y[:, :1].squeeze(1)

    gm, a = analyze(M(), torch.randn(2, 3, 5, 6))
    t, p = a.table, a.param_spaces
    c = t.find(p["conv.weight"][0])
    conv = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is aten.conv2d][0]
    src = [t.find(s) for s in a.node_spaces[conv.name]]
    perm = [t.find(s) for s in a.node_spaces[node(gm, aten.permute).name]]
    assert perm == [src[0], src[2], src[3], src[1]] and perm[3] == c
    tr = [t.find(s) for s in a.node_spaces[node(gm, aten.transpose).name]]
    assert tr == [perm[0], perm[3], perm[2], perm[1]]
    un = a.node_spaces[node(gm, aten.unsqueeze).name]
    assert len(un) == 5 and t.size(un[2]) == 1 and t.find(un[4]) == c
    sq = [t.find(s) for s in a.node_spaces[node(gm, aten.squeeze).name]]
    assert sq == [perm[0], perm[2], perm[3]]


def test_expand_keeps_expanded_dims_apart():
    gm, a = analyze(Lin(lambda y: y.unsqueeze(1).expand(2, 5, 8), cout=8), torch.randn(2, 3))
    t, p = a.table, a.param_spaces
    ex = a.node_spaces[node(gm, aten.expand).name]
    assert t.find(ex[2]) == t.find(p["fc.weight"][0])
    assert t.size(ex[1]) == 5 and t.find(ex[1]) != t.find(p["fc.weight"][0])


def test_repeat_is_a_concat_of_copies():
    gm, a = analyze(Lin(lambda y: y.repeat(1, 3), cout=4), torch.randn(2, 3))
    t, p = a.table, a.param_spaces
    out = a.node_spaces[node(gm, aten.repeat).name]
    kind, parts = t.definition(out[1])
    assert kind == CONCAT and [t.find(x) for x in parts] == [t.find(p["fc.weight"][0])] * 3


def test_repeat_interleave_is_a_product_with_a_frozen_count():
    class RepeatHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 2)

        def forward(self, y):
            return self.head(y.repeat_interleave(2, dim=1))

    gm, a = analyze(Lin(RepeatHead(), cout=4), torch.randn(2, 3))
    t, p = a.table, a.param_spaces
    out = a.node_spaces[node(gm, aten.repeat_interleave).name]
    c, count = factors(t, out[1])
    assert c == t.find(p["fc.weight"][0]) and t.size(count) == 2
    assert factors(t, p["fn.head.weight"][1]) == [c, count]
    assert t.frozen_leaves()[count] == "repeat_interleave count"
