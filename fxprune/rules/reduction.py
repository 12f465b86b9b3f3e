"""Reductions (``mean``, ``sum``, ``amax``, ``var``, ``norm``, ``argmax``...) observe the channel count of the dims
they reduce, and ops along a dim (``softmax``, ``cumsum``, ``sort``, ``topk``, ``flip``, ``roll``...) mix its
positions: those dims are frozen, the others pass through. ``tril``/``triu`` freeze their last two dims.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .context import RuleContext
from .pointwise import _pointwise
from .registry import _arg, _nd, aten, rule


def _reduce_dims(A: RuleContext, node: fx.Node, dims: Any, keepdim: bool, why: str) -> None:
    x = node.args[0]
    s = list(A.sp(x))
    n = len(s)
    if dims is None or dims == [] or dims == ():
        dims = list(range(n))
    dims = {_nd(d, n) for d in ([dims] if isinstance(dims, int) else dims)}
    shp = A.shape(x)
    observed = [s[d] for d in dims if shp[d] > 1]
    A.freeze(observed, node, why)
    out = [A.t.new(1, node.name) if (d in dims) else s[d] for d in range(n)] if keepdim else \
        [s[d] for d in range(n) if d not in dims]
    v = A.val(node)
    A.set(node, [out, list(out)] if isinstance(v, (list, tuple)) else out)


@rule(aten.mean, aten.sum, aten.amax, aten.amin, aten.prod, aten.var, aten.std, aten.logsumexp, aten.norm,
      aten.linalg_vector_norm, aten.any, aten.all, aten.argmax, aten.argmin, aten.max, aten.min, aten.var_mean,
      aten.std_mean, aten.nansum, aten.count_nonzero)
def _reduction(A: RuleContext, node: fx.Node) -> None:
    op = node.target.overloadpacket
    name = op.__name__ if hasattr(op, "__name__") else str(op)
    why = f"{name} over these dims observes the channel count"
    ov = node.target._overloadname
    v = A.val(node)
    # full reductions (no dim argument) produce a scalar
    if isinstance(v, torch.Tensor) and v.dim() == 0 and len(node.args) <= 1 and "dim" not in node.kwargs:
        _reduce_dims(A, node, None, False, why)
        return
    if op in (aten.max, aten.min) and ov in ("other", "binary"):
        _pointwise(A, node)
        return
    if op is aten.norm or op is aten.linalg_vector_norm:
        dims = _arg(node, 2, "dim")
        keep = _arg(node, 3, "keepdim", False)
    elif op in (aten.var, aten.std, aten.var_mean, aten.std_mean) and ov in ("correction", "correction_names"):
        dims = _arg(node, 1, "dim")
        keep = node.kwargs.get("keepdim", False)
    else:
        dims = _arg(node, 1, "dim")
        keep = _arg(node, 2, "keepdim", False)
    if op in (aten.argmax, aten.argmin) and dims is None:
        _reduce_dims(A, node, None, False, why)
        return
    _reduce_dims(A, node, dims, bool(keep), why)


@rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum, aten.cumprod, aten.flip,
      aten.roll, aten.sort, aten.argsort, aten.topk, aten.diff, aten.cummax, aten.logcumsumexp)
def _along_dim(A: RuleContext, node: fx.Node) -> None:
    """Ops that mix positions along some dims: those dims are frozen, the others pass through."""
    x = node.args[0]
    s = list(A.sp(x))
    n = len(s)
    op = node.target.overloadpacket
    if op is aten.flip:
        dims = node.args[1]
    elif op is aten.roll:
        dims = _arg(node, 2, "dims", [])
        dims = list(range(n)) if not dims else dims
    elif op in (aten.sort, aten.argsort):
        dims = [_arg(node, 1, "dim", -1)] if not isinstance(_arg(node, 1, "dim", -1), bool) else [-1]
    elif op is aten.topk:
        dims = [_arg(node, 2, "dim", -1)]
    else:
        dims = [_arg(node, 1, "dim", -1)]
    dims = [dims] if isinstance(dims, int) else dims
    A.freeze([s[_nd(d, n)] for d in dims], node, f"{op.__name__} mixes positions along this dim")
    v = A.val(node)
    if isinstance(v, (list, tuple)):
        out = list(s)
        if op is aten.topk or op is aten.diff:
            d = _nd(dims[0], n)
            out[d] = A.t.new(v[0].shape[d], node.name, "topk")
        A.set(node, [out, list(out)])
    else:
        out = list(s)
        if tuple(v.shape) != A.shape(x):
            for d in dims:
                out[_nd(d, n)] = A.t.new(v.shape[_nd(d, n)], node.name, "resized dim")
        A.set(node, out)


@rule(aten.tril, aten.triu)
def _tri(A: RuleContext, node: fx.Node) -> None:
    s = list(A.sp(node.args[0]))
    A.freeze(s[-2:], node, "triangular mask indexes positions")
    A.set(node, s)
