"""Elementwise and broadcasting ops: aligned dims share a space (``A.broadcast``). Also the two pointwise ops
with a parameter or a split: PReLU (its per-channel weight indexes dim 1) and GLU (the two halves of the gated dim
are unified with each other and with the output).
"""
from __future__ import annotations

import torch.fx as fx

from .context import RuleContext
from .registry import _arg, _nd, aten, rule


@rule("pointwise", aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_, aten.dropout,
      aten.feature_dropout, aten.alpha_dropout, aten.dropout_, aten.detach_, aten.rsub, aten.feature_dropout_, aten.alpha_dropout_, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy,
      aten.type_as, aten.lift_fresh_copy, aten.copy_, aten.zero_, aten.fill_, aten.zeros_like, aten.ones_like,
      aten.full_like, aten.empty_like, aten.rand_like, aten.randn_like, aten.mish, aten.mish_, aten.elu, aten.elu_,
      aten.leaky_relu, aten.leaky_relu_, aten.gelu_, aten.silu_, aten.relu_, aten.celu, aten.selu,
      aten.hardtanh_, aten.masked_fill_, aten.__and__, aten.__or__, aten.__xor__, aten.__iand__, aten.__ior__,
      aten.bitwise_and, aten.bitwise_or, aten.bitwise_not, aten.logical_and, aten.logical_or, aten.logical_not, aten.clamp_, aten.clamp_min_, aten.mul_, aten.add_, aten.sub_,
      aten.div_, aten.sigmoid_, aten.tanh_)
def _pointwise(A: RuleContext, node: fx.Node) -> None:
    out_shape = A.shape(node)
    if out_shape is None:
        A.freeze_all(node, "pointwise op without a tensor result")
        return
    A.set(node, A.broadcast(node, [a for a in node.all_input_nodes if A.sp(a) is not None], out_shape))


@rule(aten.native_dropout)
def _native_dropout(A: RuleContext, node: fx.Node) -> None:
    s = A.sp(node.args[0])
    A.set(node, [s, list(s)])


@rule(aten.prelu, aten._prelu_kernel)
def _prelu(A: RuleContext, node: fx.Node) -> None:
    x, w = node.args[0], node.args[1]
    s = list(A.sp(x))
    if A.shape(w) and A.shape(w)[0] > 1:
        A.unify(s[1], A.sp(w)[0], node, "prelu weight")
    A.set(node, s)


@rule(aten.glu)
def _glu(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    shp = A.shape(x)
    d = _nd(_arg(node, 1, "dim", -1), len(shp))
    s = list(A.sp(x))
    out = A.fresh(A.shape(node), node.name)
    half = shp[d] // 2
    a, b = A.t.new(half, node.name), A.t.new(half, node.name)
    A.unify(s[d], A.t.concat([a, b]), node, "glu halves")
    A.unify(a, b, node, "glu halves")
    A.unify(out[d], a, node, "glu output")
    for i in range(len(shp)):
        if i != d:
            A.unify(out[i], s[i], node)
    A.set(node, out)
