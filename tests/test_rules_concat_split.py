"""fxprune.rules.concat_split on tiny graphs: cat is a Concat of the inputs' spaces, split/chunk/slice/select/unbind
refine the input into pieces, stack adds a frozen axis, narrow freezes; the split/slice/select rewrites."""
import types

import numpy as np
import torch
import torch.nn as nn

from fxprune.analyzer import analyze_graph
from fxprune.rules import REWRITES
from fxprune.spaces import CONCAT
from fxprune.trace import trace

aten = torch.ops.aten


def analyze(model, *inputs):
    gm = trace(model.eval(), inputs, dynamic_batch=False)
    return gm, analyze_graph(gm)


def node(gm, op):
    (n,) = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is op]
    return n


def pieces(t, s):
    kind, parts = t.definition(s)
    assert kind == CONCAT, kind
    return [t.find(x) for x in parts]


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], dim=-3))


def test_cat_output_is_concat_of_input_spaces():
    gm, a = analyze(Cat(), torch.randn(2, 3, 4, 4))
    t, p = a.table, a.param_spaces
    cat = a.node_spaces[node(gm, aten.cat).name]
    assert t.size(cat[1]) == 8
    assert pieces(t, cat[1]) == [t.find(p["a.weight"][0]), t.find(p["b.weight"][0])]  # negative dim normalised
    assert t.leaves(p["out.weight"][1]) == [t.find(p["a.weight"][0]), t.find(p["b.weight"][0])]
    assert t.find(cat[2]) == t.find(a.node_spaces[node(gm, aten.cat).args[0][0].name][2])  # other dims unified


class Split(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.sizes = sizes
        self.conv = nn.Conv2d(3, 8, 1)
        self.heads = nn.ModuleList(nn.Conv2d(s, 2, 1) for s in sizes)

    def forward(self, x):
        return [h(y) for h, y in zip(self.heads, torch.split(self.conv(x), self.sizes, dim=1))]


def test_split_unequal_chunks_refines_the_producer():
    gm, a = analyze(Split([3, 5]), torch.randn(2, 3, 4, 4))
    t, p = a.table, a.param_spaces
    parts = pieces(t, p["conv.weight"][0])
    assert [t.size(x) for x in parts] == [3, 5]
    assert parts == [t.find(p["heads.0.weight"][1]), t.find(p["heads.1.weight"][1])]
    assert not set(parts) & set(t.frozen_leaves())


def test_split_rewrite_writes_kept_sizes():
    gm, a = analyze(Split([3, 5]), torch.randn(2, 3, 4, 4))
    t = a.table
    sp = node(gm, aten.split_with_sizes)
    first, second = pieces(t, a.param_spaces["conv.weight"][0])
    kept = {first: 2, second: 4}
    R = types.SimpleNamespace(spaces=lambda n: a.node_spaces[n.name],
                              shape=lambda n: tuple(n.meta["val"].shape),
                              new=lambda s: kept.get(t.find(s), t.size(t.find(s))))
    REWRITES[aten.split_with_sizes](R, sp)
    assert sp.target is aten.split_with_sizes.default
    assert sp.args[1:] == ([2, 4], 1)


def test_chunk_pieces():
    class Chunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 6)

        def forward(self, x):
            a, b, c = self.fc(x).chunk(3, dim=-1)
            return a * b + c

    gm, a = analyze(Chunk(), torch.randn(2, 3))
    t = a.table
    # the three chunks are multiplied/added: all unified into one leaf of 2 channels, repeated three times
    parts = pieces(t, a.param_spaces["fc.weight"][0])
    assert len(parts) == 3 and len(set(parts)) == 1 and t.size(parts[0]) == 2
    # after Shrink a chunk becomes split_with_sizes with the kept piece sizes (chunk(k) may not divide evenly)
    ch = node(gm, aten.chunk)
    R = types.SimpleNamespace(spaces=lambda n: a.node_spaces[n.name], shape=lambda n: tuple(n.meta["val"].shape),
                              new=lambda s: 1)
    REWRITES[aten.chunk](R, ch)
    assert ch.target is aten.split_with_sizes.default and ch.args[1:] == ([1, 1, 1], 1)


class SliceSelect(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        return y[:, 2:5], y[:, 6]


def test_slice_and_select_cut_the_space_into_pieces():
    gm, a = analyze(SliceSelect(), torch.randn(2, 3, 4))
    t, p = a.table, a.param_spaces
    leaves = t.leaves(p["conv.weight"][0])
    sizes = [t.size(x) for x in leaves]
    assert sizes == [2, 3, 1, 1, 1]  # pre, slice, gap, selected, post
    sl = node(gm, aten.slice)
    assert t.find(a.node_spaces[sl.name][1]) == leaves[1]
    assert t.frozen_leaves()[leaves[3]] == "selected index"
    assert leaves[0] not in t.frozen_leaves() and leaves[2] not in t.frozen_leaves()
    # rewrites: bounds and index follow the kept positions
    keep = np.array([False, True, True, False, True, True, True, True])
    R = types.SimpleNamespace(spaces=lambda n: a.node_spaces[n.name], shape=lambda n: tuple(n.meta["val"].shape),
                              keep=lambda s: keep)
    REWRITES[aten.slice](R, sl)
    assert sl.args[2:4] == (1, 3)
    sel = node(gm, aten.select)
    REWRITES[aten.select](R, sel)
    assert sel.args[2] == 4  # positions 0 and 3 removed before index 6


def test_stack_unifies_inputs_and_freezes_the_new_axis():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)

        def forward(self, x):
            return torch.stack([self.a(x), self.b(x)], dim=1)

    gm, a = analyze(Stack(), torch.randn(2, 3))
    t, p = a.table, a.param_spaces
    assert t.find(p["a.weight"][0]) == t.find(p["b.weight"][0])
    out = a.node_spaces[node(gm, aten.stack).name]
    assert t.size(out[1]) == 2 and t.frozen_leaves()[t.find(out[1])] == "stacked axis"
    assert t.find(out[2]) == t.find(p["a.weight"][0])


def test_unbind_pieces_are_single_positions():
    class Unbind(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            a, b, c = self.fc(x).unbind(1)
            return a + b * c

    gm, a = analyze(Unbind(), torch.randn(2, 3))
    t = a.table
    parts = pieces(t, a.param_spaces["fc.weight"][0])
    assert [t.size(x) for x in parts] == [1, 1, 1]


def test_narrow_freezes_and_names_the_node():
    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 6)

        def forward(self, x):
            return self.fc(x).narrow(1, 1, 2)

    gm, a = analyze(Narrow(), torch.randn(2, 3))
    t = a.table
    n = node(gm, aten.narrow)
    assert (n.name, "aten.narrow.default", "narrow") in a.frozen_nodes
    assert t.frozen_leaves()[t.find(a.param_spaces["fc.weight"][0])] == f"{n.name} (aten.narrow.default): narrow"
