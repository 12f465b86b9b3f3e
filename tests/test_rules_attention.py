"""fxprune.rules.attention on tiny graphs: SDPA heads and head_dim, GQA query groups, the default-scale rewrite."""
import math
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.analyzer import analyze_graph
from fxprune.rules import REWRITES
from fxprune.spaces import PRODUCT
from fxprune.trace import trace

aten = torch.ops.aten


def analyze(model, *inputs):
    gm = trace(model.eval(), inputs, dynamic_batch=False)
    return gm, analyze_graph(gm)


def sdpa_node(gm):
    (n,) = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is aten.scaled_dot_product_attention]
    return n


class Attn(nn.Module):
    def __init__(self, q_heads=4, kv_heads=4, head_dim=3, scale=None):
        super().__init__()
        self.hq, self.hk, self.d, self.scale = q_heads, kv_heads, head_dim, scale
        self.q = nn.Linear(6, q_heads * head_dim)
        self.k = nn.Linear(6, kv_heads * head_dim)
        self.v = nn.Linear(6, kv_heads * head_dim)
        self.o = nn.Linear(q_heads * head_dim, 6)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.hq, self.d).transpose(1, 2)
        k = self.k(x).view(B, T, self.hk, self.d).transpose(1, 2)
        v = self.v(x).view(B, T, self.hk, self.d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=self.hq != self.hk)
        return self.o(y.transpose(1, 2).reshape(B, T, self.hq * self.d))


def factors(t, s):
    kind, parts = t.definition(s)
    assert kind == PRODUCT, kind
    return [t.find(x) for x in parts]


def test_sdpa_heads_and_head_dim():
    gm, a = analyze(Attn(), torch.randn(2, 5, 6))
    t, p = a.table, a.param_spaces
    hq, dq = factors(t, p["q.weight"][0])
    hk, dk = factors(t, p["k.weight"][0])
    hv, dv = factors(t, p["v.weight"][0])
    assert (t.size(hq), t.size(dq)) == (4, 3)
    assert hq == hk == hv  # same heads everywhere
    assert dq == dk  # q/k head_dim (the contraction)
    assert dv != dq  # v's head_dim is independent
    assert factors(t, p["o.weight"][1]) == [hq, dv]
    frozen = t.frozen_leaves()
    assert not {hq, dq, dv} & set(frozen)  # the default scale is rewritten, not frozen
    sd = sdpa_node(gm)
    assert t.find(a.aux[sd.name]["head_dim"]) == dq and a.aux[sd.name]["head_dim_size"] == 3
    assert len([m_ for m_ in a.mac_terms if m_.node == sd.name]) == 2


def test_sdpa_gqa_query_heads_are_kv_heads_times_queries_per_kv():
    gm, a = analyze(Attn(q_heads=4, kv_heads=2), torch.randn(2, 5, 6))
    t, p = a.table, a.param_spaces
    hk, dk = factors(t, p["k.weight"][0])
    assert factors(t, p["v.weight"][0])[0] == hk and t.size(hk) == 2
    q_heads, dq = factors(t, p["q.weight"][0])
    kv, per = factors(t, q_heads)
    assert kv == hk and t.size(per) == 2
    assert dq == dk
    assert t.origin[per] == f"{sdpa_node(gm).name}.q_per_kv"


def _rewrite_ctx(a, kept):
    """A minimal RewriteContext: ``kept`` maps a leaf root to its kept size."""
    return types.SimpleNamespace(aux=lambda n: a.aux.get(n.name, {}),
                                 new=lambda s: kept.get(a.table.find(s), a.table.size(a.table.find(s))),
                                 keep=lambda s: np.ones(a.table.size(s), bool))


def test_sdpa_rewrite_pins_the_default_scale_only_when_head_dim_shrinks():
    gm, a = analyze(Attn(), torch.randn(2, 5, 6))
    sd = sdpa_node(gm)
    head_dim = a.table.find(a.aux[sd.name]["head_dim"])
    REWRITES[aten.scaled_dot_product_attention](_rewrite_ctx(a, {}), sd)
    assert "scale" not in sd.kwargs or sd.kwargs["scale"] is None
    REWRITES[aten.scaled_dot_product_attention](_rewrite_ctx(a, {head_dim: 2}), sd)
    assert sd.kwargs["scale"] == 1.0 / math.sqrt(3)


def test_sdpa_rewrite_keeps_an_explicit_scale():
    gm, a = analyze(Attn(scale=0.25), torch.randn(2, 5, 6))
    sd = sdpa_node(gm)
    head_dim = a.table.find(a.aux[sd.name]["head_dim"])
    before = (sd.args, dict(sd.kwargs))
    REWRITES[aten.scaled_dot_product_attention](_rewrite_ctx(a, {head_dim: 2}), sd)
    assert (sd.args, dict(sd.kwargs)) == before
