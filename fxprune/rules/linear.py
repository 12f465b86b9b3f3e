"""Linear maps and contractions: ``linear``, ``matmul``/``mm``/``bmm``, ``addmm``/``baddbmm``/``addbmm`` and
``einsum`` (explicit output, no ellipsis). Contracted dims are unified; batch dims broadcast; each records a MACs
term over the spaces it iterates.
"""
from __future__ import annotations

import string

import torch.fx as fx

from .context import RuleContext
from .registry import _arg, aten, rule


@rule(aten.linear)
def _linear(A: RuleContext, node: fx.Node) -> None:
    x, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias")
    xs, ws = A.sp(x), A.sp(w)
    out = list(xs[:-1]) + [ws[0]]
    A.unify(xs[-1], ws[1], node, "linear in-features")
    if isinstance(b, fx.Node):
        A.unify(A.sp(b)[0], ws[0], node, "linear bias")
    A.mac(node, 1, out + [ws[1]])
    A.set(node, out)


def _matmul_spaces(A: RuleContext, node: fx.Node, a: fx.Node, b: fx.Node) -> list[int]:
    sa, sb = list(A.sp(a)), list(A.sp(b))
    ha, hb = A.shape(a), A.shape(b)
    out_shape = A.shape(node)
    if len(ha) == 1:
        sa, ha = [A.t.new(1, "mm")] + sa, (1,) + ha
    if len(hb) == 1:
        sb, hb = sb + [A.t.new(1, "mm")], hb + (1,)
    A.unify(sa[-1], sb[-2], node, "matmul contraction")
    contraction = sa[-1]
    # batch dims broadcast
    nb = len(out_shape) - (2 if len(A.shape(a)) > 1 and len(A.shape(b)) > 1 else 1)
    batch = [None] * max(nb, 0)  # type: list[int | None]
    for s, h in ((sa[:-2], ha[:-2]), (sb[:-2], hb[:-2])):
        off = len(batch) - len(h)
        for i, (sp_, n) in enumerate(zip(s, h)):
            if n == 1 and out_shape[off + i] != 1:
                continue
            if batch[off + i] is None:
                batch[off + i] = sp_
            else:
                A.unify(batch[off + i], sp_, node, "matmul batch")
    batch = [x if x is not None else A.t.new(out_shape[i], node.name, "broadcast dim") for i, x in enumerate(batch)]
    out = batch[:]
    if len(A.shape(a)) > 1:
        out.append(sa[-2])
    if len(A.shape(b)) > 1:
        out.append(sb[-1])
    A.mac(node, 1, out + [contraction])
    return out


@rule(aten.matmul, aten.mm, aten.bmm)
def _matmul(A: RuleContext, node: fx.Node) -> None:
    A.set(node, _matmul_spaces(A, node, node.args[0], node.args[1]))


@rule(aten.addmm, aten.baddbmm, aten.addbmm)
def _addmm(A: RuleContext, node: fx.Node) -> None:
    out = _matmul_spaces(A, node, node.args[1], node.args[2])
    if node.target.overloadpacket is aten.addbmm:
        out = out[1:]
    bias = node.args[0]
    if A.sp(bias) is not None:
        A.broadcast(node, [bias], tuple(A.shape(node)))
        hb = A.shape(bias)
        for i, (s, n) in enumerate(zip(A.sp(bias), hb)):
            j = len(out) - len(hb) + i
            if n > 1:
                A.unify(out[j], s, node, "addmm bias")
    A.set(node, out)


@rule(aten.einsum)
def _einsum(A: RuleContext, node: fx.Node) -> None:
    eq, operands = node.args[0], node.args[1]
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if "..." in eq or not rhs or len(terms) != len(operands):
        A.freeze_all(node, f"einsum equation {eq!r} not supported (ellipsis or implicit output)")
        return
    letter: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for term, op in zip(terms, operands):
        for ch, s, n in zip(term, A.sp(op), A.shape(op)):
            sizes.setdefault(ch, n)
            if n == 1 and sizes[ch] != 1:
                continue
            if ch in letter:
                A.unify(letter[ch], s, node, f"einsum index {ch}")
            else:
                letter[ch] = s
    out = [letter[ch] for ch in rhs]
    A.mac(node, 1, [letter[ch] for ch in string.ascii_letters if ch in letter])
    A.set(node, out)
