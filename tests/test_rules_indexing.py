"""fxprune.rules.indexing and fxprune.rules.factory on tiny graphs: embedding rows frozen but its dim prunable,
advanced indexing and gather freeze the indexed dims, factory ops freeze literal sizes."""
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


def test_embedding_rows_frozen_dim_prunable():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4, 2)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    gm, a = analyze(M(), torch.randint(0, 10, (2, 5)))
    t, p = a.table, a.param_spaces
    emb = node(gm, aten.embedding)
    assert t.frozen_leaves()[t.find(p["emb.weight"][0])] == \
        f"{emb.name} (aten.embedding.default): embedding rows are addressed by integer indices"
    assert t.find(p["emb.weight"][1]) == t.find(p["fc.weight"][1])
    assert t.find(p["emb.weight"][1]) not in t.frozen_leaves()
    assert [t.find(s) for s in a.node_spaces[emb.name][:2]] == [t.find(s) for s in a.node_spaces["ids"]]


class Gather(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fc, self.fn, self.head = nn.Linear(3, 6), fn, nn.Linear(6, 2)
        self.register_buffer("idx", torch.tensor([0, 2]))

    def forward(self, x):
        return self.head(self.fn(self.fc(x), self.idx))


def test_advanced_index_freezes_indexed_dim_and_passes_the_others():
    gm, a = analyze(Gather(lambda y, i: y[i]), torch.randn(4, 3))
    t, p = a.table, a.param_spaces
    ix = node(gm, aten.index)
    assert (ix.name, "aten.index.Tensor", "indexed by a tensor") in a.frozen_nodes
    assert t.find(a.node_spaces["x"][0]) in t.frozen_leaves()
    assert t.find(p["fc.weight"][0]) == t.find(p["head.weight"][1])  # the ':' dim passes through (unified)
    # note: it is frozen too today, because the rule creates every output dim with the "indexed by a tensor" reason
    assert t.find(p["fc.weight"][0]) != t.find(a.node_spaces["x"][0])
    assert t.frozen_leaves()[t.find(p["idx"][0])] == "integer tensor (indices or positions)"


def test_index_select_over_features_freezes_them():
    gm, a = analyze(Gather(lambda y, i: torch.cat([y.index_select(1, i)] * 3, 1)), torch.randn(4, 3))
    t, p = a.table, a.param_spaces
    sel = node(gm, aten.index_select)
    assert (sel.name, "aten.index_select.default", "gathered by a tensor of indices") in a.frozen_nodes
    assert t.frozen_leaves()[t.find(p["fc.weight"][0])] == \
        f"{sel.name} (aten.index_select.default): gathered by a tensor of indices"
    out = a.node_spaces[sel.name]
    assert t.find(out[0]) == t.find(a.node_spaces["x"][0])  # the other dim passes through


def test_factory_sizes_are_literals():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.fc(x) + torch.zeros(4))

    gm, a = analyze(M(), torch.randn(2, 3))
    t = a.table
    z = node(gm, aten.zeros)
    assert t.frozen_leaves()[t.find(a.node_spaces[z.name][0])] == "created from shape literals (factory op)"
    assert t.find(a.param_spaces["fc.weight"][0]) == t.find(a.node_spaces[z.name][0])  # so the features freeze
