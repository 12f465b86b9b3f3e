"""Concatenation and its inverses. ``cat`` makes the output dim ``Concat`` of the inputs' spaces; ``split``,
``chunk``, ``unbind``, ``slice`` and ``select`` refine the input dim into a ``Concat`` of the pieces (their sizes,
bounds and indices are recomputed from the kept positions after Shrink). ``stack`` adds a new axis,
``getitem`` picks one output of a multi-output op, ``narrow`` freezes.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .context import RewriteContext, RuleContext
from .registry import _arg, _nd, _set_arg, aten, rule


@rule(aten.cat, aten.concat, aten.concatenate)
def _cat(A: RuleContext, node: fx.Node) -> None:
    tensors = [t for t in node.args[0] if A.shape(t) is not None and A.shape(t) != (0,)]
    out_shape = A.shape(node)
    d = _nd(_arg(node, 1, "dim", 0), len(out_shape))
    out = [None] * len(out_shape)  # type: list[int | None]
    for t in tensors:
        for i, s in enumerate(A.sp(t)):
            if i == d:
                continue
            if out[i] is None:
                out[i] = s
            else:
                A.unify(out[i], s, node, f"cat dim {i}")
    out[d] = A.t.concat([A.sp(t)[d] for t in tensors], node.name)
    A.set(node, out)


@rule(aten.stack)
def _stack(A: RuleContext, node: fx.Node) -> None:
    tensors = list(node.args[0])
    out_shape = A.shape(node)
    d = _nd(_arg(node, 1, "dim", 0), len(out_shape))
    base = list(A.sp(tensors[0]))
    for t in tensors[1:]:
        for a, b in zip(base, A.sp(t)):
            A.unify(a, b, node, "stack")
    new = A.t.new(len(tensors), f"{node.name}.stack", "stacked axis")
    A.set(node, base[:d] + [new] + base[d:])


def _split_outputs(A: RuleContext, node: fx.Node, d: int) -> None:
    x = node.args[0]
    s = list(A.sp(x))
    outs = []
    pieces = []
    for v in A.val(node):
        o = list(s)
        o[d] = A.t.new(int(v.shape[d]), f"{node.name}.piece")
        pieces.append(o[d])
        outs.append(o)
    A.unify(s[d], A.t.concat(pieces, node.name), node, "split pieces")
    A.set(node, outs)


def _rewrite_split(R: RewriteContext, node: fx.Node) -> None:
    pieces = R.spaces(node)
    x = node.args[0]
    d = _nd(_arg(node, 2, "dim", 0) if node.target.overloadpacket is not aten.unbind else 0, len(R.shape(x)))
    sizes = [R.new(p[d]) for p in pieces]
    node.target = aten.split_with_sizes.default
    node.args = (x, sizes, d)
    node.kwargs = {}


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.unsafe_split, aten.unsafe_chunk,
      aten.unsafe_split_with_sizes, aten.split_with_sizes_copy, aten.split_copy, rewrite=_rewrite_split)
def _split(A: RuleContext, node: fx.Node) -> None:
    if node.target.overloadpacket is aten.tensor_split and not isinstance(node.args[1], (int, list, tuple)):
        A.freeze_all(node, "tensor_split by a tensor of indices")
        return
    _split_outputs(A, node, _nd(_arg(node, 2, "dim", 0), len(A.shape(node.args[0]))))


@rule(aten.unbind)
def _unbind(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    d = _nd(_arg(node, 1, "dim", 0), len(A.shape(x)))
    s = list(A.sp(x))
    pieces = [A.t.new(1, f"{node.name}.unbind") for _ in A.val(node)]
    A.unify(s[d], A.t.concat(pieces, node.name), node, "unbind")
    A.set(node, [s[:d] + s[d + 1:] for _ in pieces])


@rule(operator.getitem)
def _getitem(A: RuleContext, node: fx.Node) -> None:
    src, i = node.args
    s = A.spaces.get(src)
    if isinstance(s, list) and s and isinstance(s[0], list) and isinstance(i, int):
        A.set(node, s[i])
    elif A.val(node) is None or not isinstance(A.val(node), torch.Tensor):
        A.set(node, None)
    else:
        A.freeze_all(node, "getitem on a value the analyzer does not track")


def _rewrite_slice(R: RewriteContext, node: fx.Node) -> None:
    x = node.args[0]
    shp = R.shape(x)
    d = _nd(_arg(node, 1, "dim", 0), len(shp))
    keep = R.keep(R.spaces(x)[d])
    if keep.all():
        return
    start, end = _arg(node, 2, "start"), _arg(node, 3, "end")
    n = shp[d]
    s0 = 0 if start is None else (start + n if start < 0 else min(start, n))
    e0 = n if end is None else (end + n if end < 0 else min(end, n))
    _set_arg(node, 2, "start", int(keep[:s0].sum()))
    _set_arg(node, 3, "end", int(keep[:e0].sum()))


@rule(aten.slice, rewrite=_rewrite_slice)
def _slice(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    shp = A.shape(x)
    d = _nd(_arg(node, 1, "dim", 0), len(shp))
    step = _arg(node, 4, "step", 1)
    s = list(A.sp(x))
    n = shp[d]
    m = A.shape(node)[d]
    out = list(s)
    if m == n:
        A.set(node, out)
        return
    if step != 1:
        out[d] = A.t.new(m, node.name)
        A.freeze([s[d], out[d]], node, "strided slice")
        A.set(node, out)
        return
    start = _arg(node, 2, "start") or 0
    start = max(0, start + n if start < 0 else min(start, n))
    out[d] = A.t.new(m, node.name)
    pre, post = A.t.new(start, node.name), A.t.new(n - start - m, node.name)
    for p in (pre, post):
        A.t._frozen.pop(p, None) if A.t.size(p) > 0 else None
    A.unify(s[d], A.t.concat([pre, out[d], post], node.name), node, "slice")
    A.set(node, out)


def _rewrite_select(R: RewriteContext, node: fx.Node) -> None:
    x = node.args[0]
    d = _nd(node.args[1], len(R.shape(x)))
    idx = node.args[2]
    n = R.shape(x)[d]
    idx = idx + n if idx < 0 else idx
    keep = R.keep(R.spaces(x)[d])
    if not keep.all():
        _set_arg(node, 2, "index", int(keep[:idx].sum()))


@rule(aten.select, rewrite=_rewrite_select)
def _select(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    shp = A.shape(x)
    d = _nd(node.args[1], len(shp))
    idx = node.args[2]
    idx = idx + shp[d] if idx < 0 else idx
    s = list(A.sp(x))
    pieces = [A.t.new(idx, node.name), A.t.new(1, node.name, "selected index"), A.t.new(shp[d] - idx - 1, node.name)]
    for p in (pieces[0], pieces[2]):
        A.t._frozen.pop(p, None) if A.t.size(p) > 0 else None
    A.unify(s[d], A.t.concat(pieces, node.name), node, "select")
    A.set(node, s[:d] + s[d + 1:])


@rule(aten.narrow)
def _narrow(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    d = _nd(node.args[1], len(A.shape(x)))
    s = list(A.sp(x))
    out = list(s)
    if A.shape(node)[d] != A.shape(x)[d]:
        out[d] = A.t.new(A.shape(node)[d], node.name)
        A.freeze([s[d], out[d]], node, "narrow")
    A.set(node, out)
