"""``scaled_dot_product_attention``: q/k head_dim unified, k/v sequence and heads unified, GQA (fewer kv heads
than q heads, ``enable_gqa=True``) as ``q_heads = Product(kv_heads, q_per_kv)``, the attention mask aligned with the
scores. The default scale ``1/sqrt(head_dim)`` observes head_dim: instead of freezing it, the rewrite pins the
original scale when head_dim shrinks.

The key sequence is the softmax's dim: a masked (zeroed) key still takes softmax weight (``exp(q.0) = 1``), so
removing it changes every output row; it is frozen like ``softmax``'s dim (regression: timm register tokens, whose
positions were a prunable space of ``reg_token``). With ``is_causal`` the query positions index the causal mask
against the key positions, so they freeze too.
"""
from __future__ import annotations

import math

import torch.fx as fx

from .context import RewriteContext, RuleContext
from .registry import _arg, aten, rule


def _rewrite_sdpa(R: RewriteContext, node: fx.Node) -> None:
    aux = R.aux(node)
    if _arg(node, 6, "scale") is None and R.new(aux["head_dim"]) != aux["head_dim_size"]:
        kw = dict(node.kwargs)
        kw["scale"] = 1.0 / math.sqrt(aux["head_dim_size"])  # pin the original default scale
        node.kwargs = kw


@rule(aten.scaled_dot_product_attention, rewrite=_rewrite_sdpa)
def _sdpa(A: RuleContext, node: fx.Node) -> None:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    gqa = bool(_arg(node, 7, "enable_gqa", False))
    qs, ks, vs = A.sp(q), A.sp(k), A.sp(v)
    hq, hk = A.shape(q), A.shape(k)
    A.unify(qs[-1], ks[-1], node, "q/k head_dim")
    A.unify(ks[-2], vs[-2], node, "k/v sequence")
    A.freeze([ks[-2]], node, "softmax over the key sequence observes its positions")
    if bool(_arg(node, 5, "is_causal", False)):
        A.freeze([qs[-2]], node, "the causal mask indexes query against key positions")
    for i in range(len(hk) - 2):
        A.unify(ks[i], vs[i], node, "k/v batch and heads")
    out = list(qs[:-1]) + [vs[-1]]
    for i in range(len(hq) - 2):
        j = len(hk) - len(hq) + i
        if j < 0:
            continue
        if hq[i] == hk[j]:
            A.unify(qs[i], ks[j], node, "q/k batch and heads")
        elif gqa and i == len(hq) - 3 and hq[i] % hk[j] == 0:
            rep = A.t.new(hq[i] // hk[j], f"{node.name}.q_per_kv")
            A.unify(qs[i], A.t.product([ks[j], rep]), node, "GQA query groups")
        elif hk[j] != 1:
            A.freeze([qs[i], ks[j]], node, "q/k batch dims do not match")
    if isinstance(mask, fx.Node):
        ms, mh = A.sp(mask), A.shape(mask)
        full = tuple(hq[:-1]) + (hk[-2],)
        ref = list(qs[:-1]) + [ks[-2]]
        for i, (s, n) in enumerate(zip(ms, mh)):
            j = len(full) - len(mh) + i
            if n > 1 and full[j] == n:
                A.unify(ref[j], s, node, "attention mask")
    A.aux[node] = {"head_dim": qs[-1], "head_dim_size": hq[-1]}
    dims = list(qs[:-1]) + [ks[-2]]
    A.mac(node, 1, dims + [qs[-1]])
    A.mac(node, 1, dims + [vs[-1]])
    A.set(node, out)
