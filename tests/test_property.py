"""Property test: random DAGs of conv / BN / activation / add / cat / split prune and shrink correctly."""
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.passes import ApplyMasks, ChannelPrune, Shrink
from fxprune.testing import make_observable
from fxprune.verify import random_like


class RandomDAG(nn.Module):
    """Interprets a list of ops over a growing list of tensors (index-based, so the graph is a DAG)."""

    def __init__(self, ops):
        super().__init__()
        self.ops = ops
        self.mods = nn.ModuleList()
        chans = [3]
        for op in ops:
            kind = op[0]
            if kind == "conv":
                _, src, cout, k = op
                self.mods.append(nn.Conv2d(chans[src], cout, k, 1, k // 2))
                chans.append(cout)
            elif kind == "bnact":
                _, src = op
                self.mods.append(nn.Sequential(nn.BatchNorm2d(chans[src]), nn.ReLU()))
                chans.append(chans[src])
            elif kind == "add":
                _, a, b = op
                self.mods.append(nn.Identity())
                chans.append(chans[a])
            elif kind == "cat":
                _, a, b = op
                self.mods.append(nn.Identity())
                chans.append(chans[a] + chans[b])
            elif kind == "split":
                _, src, k = op
                self.mods.append(nn.Identity())
                chans.append(k)
                chans.append(chans[src] - k)
        self.chans = chans
        self.head = nn.Conv2d(chans[-1], 3, 1)

    def forward(self, x):
        ts = [x]
        for op, mod in zip(self.ops, self.mods):
            kind = op[0]
            if kind in ("conv", "bnact"):
                ts.append(mod(ts[op[1]]))
            elif kind == "add":
                ts.append(ts[op[1]] + ts[op[2]])
            elif kind == "cat":
                ts.append(torch.cat([ts[op[1]], ts[op[2]]], dim=1))
            elif kind == "split":
                a, b = torch.split(ts[op[1]], [op[2], self.chans[op[1]] - op[2]], dim=1)
                ts.extend([a, b])
        return self.head(ts[-1])


@st.composite
def dags(draw):
    chans = [3]
    ops = []
    ops.append(("conv", 0, draw(st.sampled_from([6, 8, 12])), 3))
    chans.append(ops[-1][2])
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(["conv", "bnact", "add", "cat", "split"]))
        live = list(range(1, len(chans)))
        src = draw(st.sampled_from(live))
        if kind == "conv":
            ops.append(("conv", src, draw(st.sampled_from([4, 6, 8, 12])), draw(st.sampled_from([1, 3]))))
            chans.append(ops[-1][2])
        elif kind == "bnact":
            ops.append(("bnact", src))
            chans.append(chans[src])
        elif kind == "add":
            same = [i for i in live if chans[i] == chans[src]]
            ops.append(("add", src, draw(st.sampled_from(same))))
            chans.append(chans[src])
        elif kind == "cat":
            ops.append(("cat", src, draw(st.sampled_from(live))))
            chans.append(chans[ops[-1][1]] + chans[ops[-1][2]])
        elif kind == "split" and chans[src] >= 4:
            k = draw(st.integers(1, chans[src] - 1))
            ops.append(("split", src, k))
            chans.extend([k, chans[src] - k])
    return ops


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=dags(), ratio=st.sampled_from([0.3, 0.5, 0.7]), seed=st.integers(0, 3))
def test_random_dag_shrinks_correctly(ops, ratio, seed):
    torch.manual_seed(seed)
    model = make_observable(RandomDAG(ops).eval(), seed)
    x = (torch.randn(2, 3, 8, 8),)
    shrunk = fxprune.compile(model, x, passes=[ChannelPrune(ratio), Shrink()], seed=seed)
    masked = fxprune.compile(model, x, passes=[ChannelPrune(ratio), ApplyMasks()], seed=seed)
    assert shrunk.report.verified in (True, None)
    assert shrunk.report.macs_after <= shrunk.report.macs_before
    (a,), _ = random_like(x, {}, seed=99)
    with torch.no_grad():
        ys, ym, yd = shrunk.module(a), masked.module(a), model(a)
    assert ys.shape == yd.shape
    assert (ys - ym).abs().max().item() <= 1e-4 * max(ym.abs().max().item(), 1e-6)
