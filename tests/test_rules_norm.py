"""fxprune.rules.norm on tiny graphs: BatchNorm parameters and roles, GroupNorm's (groups, per_group) product and
its rewrite, LayerNorm statistics freezing the normalised dims."""
import types

import torch
import torch.nn as nn

from fxprune.analyzer import analyze_graph
from fxprune.rules import REWRITES
from fxprune.spaces import PRODUCT
from fxprune.trace import trace

aten = torch.ops.aten


def analyze(model, *inputs):
    gm = trace(model.eval(), inputs, dynamic_batch=False)
    return gm, analyze_graph(gm)


def node(gm, op):
    (n,) = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is op]
    return n


def test_batch_norm_params_and_stats_index_the_channels():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    gm, a = analyze(m, torch.randn(2, 3, 5, 5))
    t, p = a.table, a.param_spaces
    c = t.find(p["0.weight"][0])
    for name in ("1.weight", "1.bias", "1.running_mean", "1.running_var", "2.weight"):
        assert t.find(p[name][1 if name == "2.weight" else 0]) == c, name
    assert c not in t.frozen_leaves()
    assert "bn_weight" in a.param_roles["1.weight"]
    assert "no_zero" in a.param_roles["1.running_var"]
    assert "no_zero" not in a.param_roles["1.running_mean"]


class GN(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.conv, self.gn, self.out = nn.Conv2d(3, 6, 1), nn.GroupNorm(groups, 6), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.gn(self.conv(x)))


def test_group_norm_is_groups_times_frozen_per_group():
    gm, a = analyze(GN(2), torch.randn(2, 3, 5, 5))
    t, p = a.table, a.param_spaces
    gn = node(gm, aten.group_norm)
    groups = a.aux[gn.name]["groups"]
    kind, (g, per) = t.definition(p["conv.weight"][0])
    assert kind == PRODUCT and t.find(g) == t.find(groups) and (t.size(g), t.size(per)) == (2, 3)
    assert t.find(g) not in t.frozen_leaves()  # whole groups may go
    assert t.frozen_leaves()[t.find(per)] == f"{gn.name} (aten.group_norm): statistics over the channels of a group"
    assert (gn.name, "aten.group_norm", "statistics over the channels of a group") in a.frozen_nodes
    assert t.leaves(p["gn.weight"][0]) == t.leaves(p["conv.weight"][0])
    # the rewrite writes the kept group count back
    R = types.SimpleNamespace(aux=lambda n: a.aux[n.name], new=lambda s: 1)
    REWRITES[aten.group_norm](R, gn)
    assert gn.args[1] == 1


def test_group_norm_with_one_channel_per_group_is_not_reported():
    gm, a = analyze(GN(6), torch.randn(2, 3, 5, 5))
    assert not any(op == "aten.group_norm" for _, op, _ in a.frozen_nodes)
    assert a.table.find(a.param_spaces["conv.weight"][0]) not in a.table.frozen_leaves()


def test_layer_norm_statistics_freeze_the_normalised_dim():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    gm, a = analyze(m, torch.randn(2, 5, 3))
    t, p = a.table, a.param_spaces
    ln = node(gm, aten.layer_norm).name
    feat = t.find(p["0.weight"][0])
    assert t.find(p["1.weight"][0]) == t.find(p["1.bias"][0]) == t.find(p["2.weight"][1]) == feat
    assert t.frozen_leaves()[feat] == (f"{ln} (aten.layer_norm.default): normalisation statistics over these dims "
                                       "observe the channel count")
    assert (ln, "aten.layer_norm.default", "normalisation statistics over these dims observe the channel count") \
        in a.frozen_nodes
