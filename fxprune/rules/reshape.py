"""Views and dim re-orderings. ``view``/``reshape``/``flatten``/``unflatten`` match runs of dims with equal
products and relate them through ``Product`` (channels -> heads x head_dim, C x H x W -> features, many-to-many
through the common refinement); their size arguments are rewritten after Shrink. ``permute``/``transpose``/``t``/
``movedim``/``squeeze``/``unsqueeze`` re-order spaces; ``expand``/``repeat``/``repeat_interleave`` broadcast or tile
(``repeat`` is ``Concat(S, S, ...)``, ``repeat_interleave`` is ``Product(S, count)``).
"""
from __future__ import annotations

import math
from typing import Any

import torch.fx as fx

from .context import RewriteContext, RuleContext
from .registry import _arg, _nd, _set_arg, aten, rule


def _group_dims(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Match runs of dims of ``a`` and ``b`` with equal products (size-1 dims are skipped)."""
    ia = [i for i, n in enumerate(a) if n != 1]
    ib = [i for i, n in enumerate(b) if n != 1]
    groups = []
    i = j = 0
    while i < len(ia) or j < len(ib):
        if i >= len(ia) or j >= len(ib):
            return None
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(ia):
                    return None
                ga.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                if j >= len(ib):
                    return None
                gb.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        groups.append((ga, gb))
    return groups


def _reshape_spaces(A: RuleContext, node: fx.Node, x: fx.Node) -> None:
    ins, outs = A.shape(x), A.shape(node)
    s = list(A.sp(x))
    out = [A.t.new(n, f"{node.name}[{i}]", None if n != 1 else "size-1 dim") for i, n in enumerate(outs)]
    groups = _group_dims(ins, outs)
    if groups is None:
        A.freeze(s + out, node, f"reshape {ins} -> {outs} not understood")
        A.set(node, out)
        return
    for ga, gb in groups:
        if len(ga) == 1 and len(gb) == 1:
            A.unify(s[ga[0]], out[gb[0]], node, "reshape")
        elif len(ga) == 1:
            A.unify(s[ga[0]], A.t.product([out[k] for k in gb]), node, "reshape factor")
        elif len(gb) == 1:
            A.unify(out[gb[0]], A.t.product([s[k] for k in ga]), node, "reshape merge")
        else:
            _regroup(A, node, [s[k] for k in ga], [ins[k] for k in ga], [out[k] for k in gb], [outs[k] for k in gb])
    A.set(node, out)


def _regroup(A: RuleContext, node: fx.Node, sa: list[int], na: list[int], sb: list[int], nb: list[int]) -> None:
    """Many dims -> many dims (e.g. (B, H*D) -> (B*H, D)): unify through the common refinement of both
    factorisations when the cumulative products form a divisibility chain; otherwise freeze."""
    cum_a = [math.prod(na[: i + 1]) for i in range(len(na))]
    cum_b = [math.prod(nb[: i + 1]) for i in range(len(nb))]
    bounds = sorted(set(cum_a) | set(cum_b))
    if any(b % a for a, b in zip([1] + bounds, bounds)):
        A.freeze(sa + sb, node, f"reshape regroups dims {tuple(na)} -> {tuple(nb)} with no common refinement")
        return
    factors = [A.t.new(b // a, f"{node.name}.factor") for a, b in zip([1] + bounds, bounds)]

    def side(spaces: list[int], cum: list[int]) -> None:
        start = 0
        for s, c in zip(spaces, cum):
            stop = bounds.index(c) + 1
            A.unify(s, A.t.product(factors[start:stop]), node, "reshape regroup")
            start = stop

    side(sa, cum_a)
    side(sb, cum_b)


def _new_sizes(R: RewriteContext, node: fx.Node, old: list[Any], spaces: list[int], allow_infer: bool) -> list[Any]:
    """New shape-argument entries: ints are recomputed from the kept sizes; a symbolic entry (e.g. batch*heads under
    a dynamic batch) whose dim shrank becomes -1 when that is unambiguous; otherwise the rewrite is impossible."""
    new = []
    for o, s in zip(old, spaces):
        if isinstance(o, int):
            new.append(o if o == -1 else R.new(s))
        elif R.new(s) != R.old_size(s):
            if not allow_infer or any(x == -1 for x in old if isinstance(x, int)) or \
                    sum(1 for x, y in zip(old, spaces) if not isinstance(x, int) and R.new(y) != R.old_size(y)) > 1:
                raise ValueError(f"symbolic size {o} of a pruned dim cannot be rewritten")
            new.append(-1)
        else:
            new.append(o)
    return new


def _rewrite_shape_arg(index: int, name: str):
    def rw(R: RewriteContext, node: fx.Node) -> None:
        old = list(_arg(node, index, name))
        new = _new_sizes(R, node, old, R.spaces(node), allow_infer=True)
        if new != old:
            _set_arg(node, index, name, new)

    return rw


def _freeze_unrewritable_symbolic(A: RuleContext, node: fx.Node, sizes: Any, allow_infer: bool) -> None:
    """Symbolic shape entries (dynamic batch, e.g. batch*heads) can only be rewritten as a single inferred -1."""
    out = A.spaces[node]
    sym = [i for i, o in enumerate(sizes) if not isinstance(o, int)]
    has_minus_one = any(isinstance(o, int) and o == -1 for o in sizes)
    if sym and (not allow_infer or has_minus_one or len(sym) > 1):
        A.freeze([out[i] for i in sym], node, "symbolic size that cannot be rewritten")


@rule(aten.view, aten.reshape, aten._unsafe_view, rewrite=_rewrite_shape_arg(1, "size"))
def _view(A: RuleContext, node: fx.Node) -> None:
    _reshape_spaces(A, node, node.args[0])
    _freeze_unrewritable_symbolic(A, node, list(_arg(node, 1, "size")), allow_infer=True)


@rule(aten.flatten, aten.view_as, aten.reshape_as)
def _flatten(A: RuleContext, node: fx.Node) -> None:
    _reshape_spaces(A, node, node.args[0])


def _rewrite_unflatten(R: RewriteContext, node: fx.Node) -> None:
    x = node.args[0]
    d = _nd(node.args[1], len(R.shape(x)))
    sp = R.spaces(node)
    old = list(node.args[2])
    new = [o if (not isinstance(o, int) or o == -1) else R.new(sp[d + i]) for i, o in enumerate(old)]
    if new != old:
        _set_arg(node, 2, "sizes", new)


@rule(aten.unflatten, rewrite=_rewrite_unflatten)
def _unflatten(A: RuleContext, node: fx.Node) -> None:
    _reshape_spaces(A, node, node.args[0])


@rule(aten.permute)
def _permute(A: RuleContext, node: fx.Node) -> None:
    s = A.sp(node.args[0])
    dims = [_nd(d, len(s)) for d in node.args[1]]
    A.set(node, [s[d] for d in dims])


@rule(aten.transpose, aten.swapaxes, aten.swapdims)
def _transpose(A: RuleContext, node: fx.Node) -> None:
    s = list(A.sp(node.args[0]))
    a, b = _nd(node.args[1], len(s)), _nd(node.args[2], len(s))
    s[a], s[b] = s[b], s[a]
    A.set(node, s)


@rule(aten.t, aten.numpy_T)
def _t(A: RuleContext, node: fx.Node) -> None:
    A.set(node, list(reversed(A.sp(node.args[0]))))


@rule(aten.movedim)
def _movedim(A: RuleContext, node: fx.Node) -> None:
    s = list(A.sp(node.args[0]))
    src, dst = node.args[1], node.args[2]
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    n = len(s)
    order = [None] * n  # type: list[int | None]
    for a, b in zip(src, dst):
        order[_nd(b, n)] = _nd(a, n)
    rest = iter([i for i in range(n) if i not in {_nd(a, n) for a in src}])
    A.set(node, [s[o] if o is not None else s[next(rest)] for o in order])


@rule(aten.unsqueeze)
def _unsqueeze(A: RuleContext, node: fx.Node) -> None:
    s = list(A.sp(node.args[0]))
    d = _nd(node.args[1], len(s) + 1)
    A.set(node, s[:d] + [A.t.new(1, node.name)] + s[d:])


@rule(aten.squeeze)
def _squeeze(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    s, shp = list(A.sp(x)), A.shape(x)
    if len(node.args) > 1:
        dims = node.args[1]
        dims = {_nd(d, len(s)) for d in ([dims] if isinstance(dims, int) else dims)}
    else:
        dims = set(range(len(s)))
    A.set(node, [sp_ for i, (sp_, n) in enumerate(zip(s, shp)) if not (i in dims and n == 1)])


def _rewrite_expand(R: RewriteContext, node: fx.Node) -> None:
    old = list(node.args[1])
    sp = R.spaces(node)
    new = []
    for o, s in zip(old, sp):
        if isinstance(o, int):
            new.append(o if o == -1 else R.new(s))
        elif R.new(s) != R.old_size(s):
            raise ValueError(f"symbolic expand size {o} of a pruned dim cannot be rewritten")
        else:
            new.append(o)
    if new != old:
        _set_arg(node, 1, "size", new)


@rule(aten.expand, rewrite=_rewrite_expand)
def _expand(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    s, shp = list(A.sp(x)), A.shape(x)
    outs = A.shape(node)
    lead = len(outs) - len(shp)
    out = [A.t.new(n, f"{node.name}.expand[{i}]", None) for i, n in enumerate(outs[:lead])]
    for sp_, n, m in zip(s, shp, outs[lead:]):
        out.append(sp_ if n == m else A.t.new(m, f"{node.name}.expand", None))
    A.set(node, out)
    _freeze_unrewritable_symbolic(A, node, list(node.args[1]), allow_infer=False)


@rule(aten.expand_as)
def _expand_as(A: RuleContext, node: fx.Node) -> None:
    A.set(node, A.broadcast(node, [node.args[0], node.args[1]], A.shape(node)))


@rule(aten.repeat)
def _repeat(A: RuleContext, node: fx.Node) -> None:
    x, reps = node.args[0], list(node.args[1])
    s = list(A.sp(x))
    lead = len(reps) - len(s)
    out = [A.t.new(n, node.name, "repeat axis") for n in reps[:lead]]
    for sp_, n, r, m in zip(s, A.shape(x), reps[lead:], A.shape(node)[lead:]):
        if isinstance(r, int) and r == 1:
            out.append(sp_)
        elif isinstance(r, int) and n > 1:
            out.append(A.t.concat([sp_] * r, node.name))
        else:  # a broadcast-like repeat of a size-1 dim, or a symbolic (dynamic-batch) count
            new = A.t.new(m, node.name, "repeat axis")
            if n > 1:
                A.freeze([sp_], node, "repeated a symbolic number of times")
            out.append(new)
    A.set(node, out)


@rule(aten.repeat_interleave)
def _repeat_interleave(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    reps = _arg(node, 1, "repeats")
    d = _arg(node, 2, "dim")
    if not isinstance(reps, int) or d is None:
        A.freeze_all(node, "repeat_interleave with tensor repeats or without dim")
        return
    s = list(A.sp(x))
    d = _nd(d, len(s))
    out = list(s)
    out[d] = A.t.product([s[d], A.t.new(reps, f"{node.name}.repeat", "repeat_interleave count")], node.name)
    A.set(node, out)
