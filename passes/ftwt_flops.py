"""Per-sample ("dynamic") MACs of a module with FTWT channel gates (:class:`fxprune.passes.ftwt.FTWTGates`).

Every conv2d/linear node costs ``dense = prod(out.shape[1:]) * prod(weight.shape[1:])`` MACs per sample (what
:func:`fxprune.flops.count_macs` counts for a batch of one). With gates, a sample's cost is::

    dense * (active_in / C_in) * (active_out / C_out)

where ``active_out`` comes from the gate after the layer's block and ``active_in`` from the gate whose zeros reach
the layer's input through zero-preserving ops (ReLU, pooling, flatten); layers without either keep their dense
cost. Each gate adds its predictor's ``C_in * C_out`` MACs (the 1x1 conv on the pooled block input). Only conv and
linear MACs are counted (as torch's FLOP counter does); BatchNorm, activations and pooling are not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import InputError
from fxprune.utils import get_tensor, iter_batches

from .ftwt import gate_conv, gate_nodes, source_gate

aten = torch.ops.aten
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv2d.padding,
         aten.conv1d.padding, aten.conv3d.padding}
_LINEAR = {aten.linear.default}


def _hint(s: Any) -> int:
    if isinstance(s, torch.SymInt):
        h = s.node.hint
        return int(h) if h is not None else 1
    return int(s)


@dataclass
class LayerCost:
    node: str
    weight: str
    dense: int  # MACs per sample without gating
    in_gate: str | None  # gate module whose mask scales the input channels
    out_gate: str | None  # gate module whose mask scales the output channels


@dataclass
class DynamicMACs:
    """Per-sample MACs over a dataset: ``per_sample`` (one value per sample), summary statistics, the dense
    reference and the mean active-channel fraction of every gate."""

    dense: int
    per_sample: np.ndarray
    gate_overhead: int
    layers: list[LayerCost]
    active_fraction: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(self.per_sample.mean())

    def summary(self) -> dict[str, Any]:
        ps = self.per_sample
        q = np.percentile(ps, [5, 25, 50, 75, 95])
        hist, edges = np.histogram(ps, bins=10)
        return {"dense_macs": self.dense, "mean_macs": float(ps.mean()), "std_macs": float(ps.std()),
                "min_macs": float(ps.min()), "max_macs": float(ps.max()),
                "percentiles": dict(zip(["p5", "p25", "p50", "p75", "p95"], [float(v) for v in q])),
                "mean_ratio": float(ps.mean() / self.dense) if self.dense else math.nan,
                "reduction": float(1 - ps.mean() / self.dense) if self.dense else math.nan,
                "gate_overhead_macs": self.gate_overhead, "samples": int(ps.size),
                "histogram": {"counts": hist.tolist(), "edges": [float(e) for e in edges]},
                "active_fraction": self.active_fraction}


def layer_costs(gm: fx.GraphModule) -> tuple[list[LayerCost], int]:
    """Dense per-sample MACs of every conv/linear node with its input/output gates; and the gates' overhead."""
    gates = gate_nodes(gm)
    gate_of = {n: n.target for n, _ in gates}
    out_gate: dict[fx.Node, str] = {}
    overhead = 0
    for n, mod in gates:
        conv = gate_conv(n)
        if conv is not None:
            out_gate[conv] = n.target
        overhead += mod.predictor.in_channels * mod.predictor.out_channels
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CONV | _LINEAR:
            continue
        yv = node.meta.get("val")
        wnode = node.args[1]
        if not isinstance(yv, torch.Tensor) or not isinstance(wnode, fx.Node):
            raise InputError(f"node {node.name} has no shape metadata",
                             fix="run the module through fxprune.compile (shapes are propagated there)")
        wv = wnode.meta.get("val")
        wshape = tuple(wv.shape) if isinstance(wv, torch.Tensor) else tuple(get_tensor(gm, wnode.target).shape)
        dense = math.prod(_hint(s) for s in yv.shape[1:]) * math.prod(int(s) for s in wshape[1:])
        src = source_gate(node.args[0], gate_of)
        rows.append(LayerCost(node.name, str(wnode.target), int(dense), gate_of[src] if src is not None else None,
                              out_gate.get(node)))
    return rows, overhead


def macs_from_masks(layers: list[LayerCost], masks: dict[str, torch.Tensor], overhead: int) -> np.ndarray:
    """Per-sample MACs from each gate's bool mask ``(N, C)``."""
    n = next(iter(masks.values())).shape[0] if masks else 1
    frac = {k: m.float().mean(1).double().numpy() for k, m in masks.items()}
    total = np.full(n, float(overhead))
    for lc in layers:
        f = np.ones(n)
        if lc.in_gate is not None:
            f = f * frac[lc.in_gate]
        if lc.out_gate is not None:
            f = f * frac[lc.out_gate]
        total += lc.dense * f
    return total


@torch.no_grad()
def dynamic_macs(module: nn.Module, data: Iterable, *, max_batches: int | None = None) -> DynamicMACs:
    """Run ``module`` (an FTWT-gated GraphModule, or a Compiled) over ``data`` and count each sample's MACs."""
    gm = getattr(module, "module", module)
    if not isinstance(gm, fx.GraphModule):
        raise InputError("dynamic_macs needs the GraphModule from fxprune.compile", fix="pass compiled.module")
    layers, overhead = layer_costs(gm)
    gates = {n.target: m for n, m in gate_nodes(gm)}
    if not gates:
        raise InputError("no FTWT gate in this module", fix="compile with passes=[FTWTGates(...)]")
    per_sample, sums = [], {k: [0.0, 0] for k in gates}
    for x, _ in iter_batches(data, max_batches):
        for g in gates.values():
            g.last_mask = None
        gm(x)
        masks = {}
        for k, g in gates.items():
            if g.last_mask is None:
                raise InputError(f"gate {k} did not run (disabled?)", fix="enable every gate for dynamic MACs")
            masks[k] = g.last_mask
            sums[k][0] += float(g.last_mask.float().sum())
            sums[k][1] += g.last_mask.numel()
        per_sample.append(macs_from_masks(layers, masks, overhead))
    if not per_sample:
        raise InputError("data yielded no batch")
    dense = sum(lc.dense for lc in layers)
    return DynamicMACs(dense, np.concatenate(per_sample), overhead, layers,
                       {k: s / max(c, 1) for k, (s, c) in sums.items()})


__all__ = ["LayerCost", "DynamicMACs", "layer_costs", "macs_from_masks", "dynamic_macs"]
