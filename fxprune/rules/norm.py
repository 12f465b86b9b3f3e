"""Normalisation layers. BatchNorm/InstanceNorm parameters and running statistics index the channel dim;
BatchNorm in batch-statistics mode observes (freezes) the other dims. GroupNorm is ``Product(groups, per_group)``
over channels with ``per_group`` frozen (its statistics observe it) and ``num_groups`` rewritten after Shrink.
LayerNorm/RMSNorm statistics observe the normalised dims, which are frozen.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from .context import RuleContext
from .registry import _arg, _set_arg, aten, rule


def _norm_params(A: RuleContext, node: fx.Node, channel: int, params: list[Any], bn_weight: Any = None) -> None:
    for p in params:
        if isinstance(p, fx.Node) and A.sp(p) is not None:
            A.unify(A.sp(p)[0], channel, node, "norm parameter")
    if bn_weight is not None:
        A.role(bn_weight, "bn_weight")


def _bn_batch_stats(A: RuleContext, node: fx.Node, s: list[int], training: Any) -> None:
    """Batch statistics (training=True, e.g. weight standardisation) observe every dim but the channel dim."""
    if training is True:
        A.freeze([sp for i, sp in enumerate(s) if i != 1], node, "batch statistics over these dims")


@rule(aten.batch_norm)
def _batch_norm(A: RuleContext, node: fx.Node) -> None:
    x, w, b, rm, rv = node.args[:5]
    s = list(A.sp(x))
    _bn_batch_stats(A, node, s, _arg(node, 5, "training"))
    _norm_params(A, node, s[1], [w, b, rm, rv], bn_weight=w)
    A.role(rv, "no_zero")
    A.aux[node] = {"bn": (w, b, rm, rv)}
    A.set(node, s)


@rule(aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional,
      aten.native_batch_norm, aten._native_batch_norm_legit)
def _native_bn(A: RuleContext, node: fx.Node) -> None:
    no_stats = node.target._overloadname == "no_stats"
    x, w, b = node.args[:3]
    rm, rv = (None, None) if no_stats else node.args[3:5]
    s = list(A.sp(x))
    if node.target.overloadpacket is not aten._native_batch_norm_legit_no_training:
        _bn_batch_stats(A, node, s, node.args[3] if no_stats else node.args[5])
    _norm_params(A, node, s[1], [w, b, rm, rv], bn_weight=w)
    A.role(rv, "no_zero")
    outs = [s] + [[s[1]] for _ in range(len(A.val(node)) - 1)]
    A.set(node, outs)


@rule(aten.instance_norm)
def _instance_norm(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    s = list(A.sp(x))
    _norm_params(A, node, s[1], list(node.args[1:5]))
    A.role(_arg(node, 4, "running_var"), "no_zero")
    A.set(node, s)


@rule(aten.group_norm, rewrite=lambda R, n: _set_arg(n, 1, "num_groups", R.new(R.aux(n)["groups"])))
def _group_norm(A: RuleContext, node: fx.Node) -> None:
    x, G = node.args[0], _arg(node, 1, "num_groups")
    s = list(A.sp(x))
    C = A.shape(x)[1]
    g, per = A.t.new(G, f"{node.name}.groups"), A.t.new(C // G, f"{node.name}.per_group")
    A.t.freeze(per, f"{node.name} (aten.group_norm): statistics over the channels of a group")
    if C // G > 1:
        A.frozen_nodes.append((node.name, "aten.group_norm", "statistics over the channels of a group"))
    A.unify(s[1], A.t.product([g, per]), node, "group norm groups")
    _norm_params(A, node, s[1], [_arg(node, 2, "weight"), _arg(node, 3, "bias")])
    A.aux[node] = {"groups": g}
    A.set(node, s)


@rule(aten.layer_norm, aten.rms_norm)
def _layer_norm(A: RuleContext, node: fx.Node) -> None:
    x, ns = node.args[0], node.args[1]
    s = list(A.sp(x))
    k = len(ns)
    normed = s[-k:]
    A.freeze(normed, node, "normalisation statistics over these dims observe the channel count")
    params = [_arg(node, 2, "weight")] + ([_arg(node, 3, "bias")] if node.target.overloadpacket is aten.layer_norm
                                           else [])
    for p in params:
        if isinstance(p, fx.Node):
            for a, bsp in zip(A.sp(p), normed):
                A.unify(a, bsp, node, "layer norm parameter")
    A.set(node, s)


@rule(aten.native_layer_norm)
def _native_layer_norm(A: RuleContext, node: fx.Node) -> None:
    _layer_norm(A, node)
    s = A.spaces[node]
    stat_shape = tuple(A.val(node)[1].shape)
    A.set(node, [s, A.fresh(stat_shape, node.name, "layer norm stats"), A.fresh(stat_shape, node.name, "stats")])
