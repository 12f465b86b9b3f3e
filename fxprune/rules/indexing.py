"""Ops that address positions with integer tensors: ``embedding`` (rows frozen, the embedding dim passes through),
advanced ``index`` (indexed dims and index tensors frozen, the ``:`` dims pass through) and ``index_select``/
``gather``/``take_along_dim``.
"""
from __future__ import annotations

import torch.fx as fx

from .context import RuleContext
from .registry import _nd, aten, rule


@rule(aten.embedding)
def _embedding(A: RuleContext, node: fx.Node) -> None:
    w, idx = node.args[0], node.args[1]
    ws = A.sp(w)
    A.freeze([ws[0]], node, "embedding rows are addressed by integer indices")
    A.set(node, list(A.sp(idx)) + [ws[1]])


@rule(aten.index)
def _index(A: RuleContext, node: fx.Node) -> None:
    """Advanced indexing ``x[..., idx, ...]``: indexed dims are frozen (as are the index tensors), dims indexed by
    ``None`` (``:``) pass through; the broadcast index dims replace the indexed ones (in place when adjacent,
    in front otherwise), exactly as torch defines it."""
    x, indices = node.args[0], list(node.args[1])
    s = list(A.sp(x))
    indices = indices + [None] * (len(s) - len(indices))
    pos = [i for i, ix in enumerate(indices) if ix is not None]
    idx_spaces = []
    for ix in indices:
        if A.sp(ix) is not None:
            idx_spaces.extend(A.sp(ix))
    A.freeze([s[i] for i in pos] + idx_spaces, node, "indexed by a tensor")
    out_shape = A.shape(node)
    out = A.fresh(out_shape, node.name, "indexed by a tensor")
    rest = [s[i] for i in range(len(s)) if indices[i] is None]
    n_idx = len(out_shape) - len(rest)
    adjacent = pos == list(range(pos[0], pos[-1] + 1)) if pos else True
    if adjacent and pos:
        passthrough = list(range(pos[0])) + list(range(pos[0] + n_idx, len(out_shape)))
    else:
        passthrough = list(range(n_idx, len(out_shape)))
    for j, sp_ in zip(passthrough, rest):
        A.unify(out[j], sp_, node, "index passthrough")
    A.set(node, out)


@rule(aten.index_select, aten.gather, aten.take_along_dim)
def _index_select(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    s = list(A.sp(x))
    d = _nd(node.args[1], len(s)) if node.target.overloadpacket is not aten.take_along_dim else None
    out = A.fresh(A.shape(node), node.name)
    if A.sp(node.args[2 if d is not None else 1]) is not None:
        A.freeze(A.sp(node.args[2 if d is not None else 1]), node, "tensor of indices")
    for i, (a, b) in enumerate(zip(s, out)):
        if i == d or (d is None) or A.shape(x)[i] != A.shape(node)[i]:
            A.freeze([a, b], node, "gathered by a tensor of indices")
        else:
            A.unify(a, b, node, "gather passthrough")
    A.set(node, out)
