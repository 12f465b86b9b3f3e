"""fxprune.rules.linear on tiny graphs: linear in/out features, flatten into a classifier, matmul/bmm
contraction, addmm bias, einsum letters, MACs terms."""
import torch
import torch.nn as nn

from fxprune.analyzer import analyze_graph
from fxprune.spaces import PRODUCT
from fxprune.trace import trace

aten = torch.ops.aten


def analyze(model, *inputs):
    gm = trace(model.eval(), inputs, dynamic_batch=False)
    return gm, analyze_graph(gm)


def node(gm, op):
    (name,) = [n.name for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is op]
    return name


def test_linear_chain():
    m = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    gm, a = analyze(m, torch.randn(4, 3))
    t, p = a.table, a.param_spaces
    hidden = t.find(p["0.weight"][0])
    assert t.find(p["0.bias"][0]) == t.find(p["2.weight"][1]) == hidden
    assert hidden not in t.frozen_leaves()
    assert "graph output" in t.frozen_leaves()[t.find(p["2.weight"][0])]
    macs = {m_.node: [t.find(s) for s in m_.spaces] for m_ in a.mac_terms}
    first = [n.name for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is aten.linear][0]
    assert macs[first] == [t.find(a.node_spaces[first][0]), hidden, t.find(p["0.weight"][1])]


class FlattenClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_flatten_into_linear_is_a_product_of_channels_and_positions():
    gm, a = analyze(FlattenClassifier(), torch.randn(2, 3, 4, 4))
    t, p = a.table, a.param_spaces
    kind, (c, h, w) = t.definition(p["fc.weight"][1])
    assert kind == PRODUCT
    assert t.find(c) == t.find(p["conv.weight"][0])
    assert (t.size(h), t.size(w)) == (2, 2)
    assert t.find(c) not in t.frozen_leaves()  # channels stay prunable: each removes 4 input features


class Scores(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(3, 8), nn.Linear(3, 8)

    def forward(self, x):
        return torch.bmm(self.q(x), self.k(x).transpose(1, 2))


def test_bmm_contraction_unifies_q_and_k_features():
    gm, a = analyze(Scores(), torch.randn(2, 5, 3))
    t, p = a.table, a.param_spaces
    assert t.find(p["q.weight"][0]) == t.find(p["k.weight"][0])
    assert t.find(p["q.weight"][0]) not in t.frozen_leaves()
    bmm = node(gm, aten.bmm)
    (mac,) = [m_ for m_ in a.mac_terms if m_.node == bmm]
    assert t.find(mac.spaces[-1]) == t.find(p["q.weight"][0])  # the contraction is the last MACs factor
    assert len(mac.spaces) == 4


class AddMM(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.w = nn.Parameter(torch.randn(4, 5))
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return torch.addmm(self.b, self.fc(x), self.w)


def test_addmm_contraction_and_bias():
    gm, a = analyze(AddMM(), torch.randn(2, 3))
    t, p = a.table, a.param_spaces
    node(gm, aten.addmm)  # exported as addmm, not decomposed
    assert t.find(p["w"][0]) == t.find(p["fc.weight"][0])
    assert t.find(p["b"][0]) == t.find(p["w"][1])


class Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.w = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return torch.einsum("bd,de->be", self.fc(x), self.w)


def test_einsum_unifies_letters():
    gm, a = analyze(Einsum(), torch.randn(2, 3))
    t, p = a.table, a.param_spaces
    assert t.find(p["w"][0]) == t.find(p["fc.weight"][0])
    out = a.node_spaces[node(gm, aten.einsum)]
    assert t.find(out[1]) == t.find(p["w"][1])
    assert t.find(out[0]) == t.find(a.node_spaces["x"][0])


def test_einsum_with_ellipsis_freezes_and_names_the_node():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return torch.einsum("...d,...d->...", self.fc(x), self.fc(x))

    gm, a = analyze(M(), torch.randn(2, 3))
    name = node(gm, aten.einsum)
    assert (name, "aten.einsum.default", "einsum equation '...d,...d->...' not supported (ellipsis or implicit "
            "output)") in a.frozen_nodes
    assert a.table.find(a.param_spaces["fc.weight"][0]) in a.table.frozen_leaves()
