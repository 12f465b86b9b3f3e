"""Normalisation layers. BatchNorm/InstanceNorm parameters and running statistics index the channel dim;
BatchNorm in batch-statistics mode observes (freezes) the other dims. GroupNorm is ``Product(groups, per_group)``
over channels with ``per_group`` frozen (its statistics observe it) and ``num_groups`` rewritten after Shrink.
LayerNorm/RMSNorm statistics observe the normalised dims, which are frozen.
"""
from __future__ import annotations

import math
import operator
import weakref
from typing import Any

import torch
import torch.fx as fx

from .context import RewriteContext, RuleContext, RuleFn
from .registry import REWRITES, RULES, _arg, _nd, _set_arg, aten, rule


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


# ====================================================================================== hidden-size pruning modes
# The rules above freeze the dims that normalisation statistics observe (the default, ``norms="freeze"``).
# :func:`norm_rules` returns a rule table in which they are pruned instead, in one of two modes:
#
# * ``"exact"``: the shrunk program reproduces the masked one. In the masked program every removed channel of the
#   normalised input is exactly zero (its producers' rows, biases and norm parameters are zeroed), so a statistic
#   over the original width D sees the kept values plus zeros:
#     mean_D(x)      = sum_kept(x) / D
#     mean_D(x^2)    = sum_kept(x^2) / D                                    (RMSNorm)
#     var_D(x)       = (sum_kept((x - mu)^2) + (D - Dk) * mu^2) / D,  mu = sum_kept(x) / D   (LayerNorm)
#   Shrink rewrites each statistic to those formulas over the Dk kept channels (the divisor D is pinned). For a
#   fused ``rms_norm`` the pin is folded instead: with c = D / Dk,
#     x / sqrt(sum_kept(x^2)/D + eps) = sqrt(c) * x / sqrt(sum_kept(x^2)/Dk + c*eps),
#   i.e. rms_norm over the kept width with eps' = c*eps, times sqrt(c) (the factor can go into the weight:
#   ``fxprune.hf`` does that for stock configs). The fold/pin is only valid when the input is provably zero in
#   the removed channels (:func:`zero_in_removed`); otherwise the dim stays frozen and the report says why.
#   The LayerNorm mean over a zero-padded vector is *not* the kept mean, hence the decomposed form.
# * ``"renormalize"``: the op normalises over the kept width only (the fused op stays, with a smaller
#   normalized_shape; a mean keeps dividing by the kept count). This is what a stock model of the smaller width
#   computes, but it is not the masked program: Shrink reports it as approximate with the measured deviation.
NORM_MODES = ("freeze", "exact", "renormalize")

_PASS_THROUGH = {aten.to, aten._to_copy, aten.clone, aten.alias, aten.contiguous, aten.view, aten.reshape,
                 aten._unsafe_view, aten.permute, aten.transpose, aten.t, aten.unsqueeze, aten.squeeze, aten.expand,
                 aten.flatten, aten.unflatten, aten.slice, aten.select, aten.narrow, aten.dropout, aten.neg,
                 aten.relu, aten.gelu, aten.silu, aten.tanh, aten.leaky_relu, aten.abs, aten.type_as,
                 aten.repeat, aten.repeat_interleave, aten.detach, aten.lift_fresh_copy, aten.sin, aten.hardswish,
                 aten.mish, aten.elu, aten.selu, aten.celu, aten.sign, aten.sqrt}
_PRODUCERS = {aten.linear, aten.addmm, aten.mm, aten.bmm, aten.matmul, aten.conv1d, aten.conv2d, aten.conv3d,
              aten.convolution, aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
              aten.embedding}
_ZERO_MEMO: "weakref.WeakKeyDictionary[Any, dict[fx.Node, bool]]" = weakref.WeakKeyDictionary()


def _packet(node: fx.Node) -> Any:
    t = node.target
    return t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t


def zero_in_removed(A: Any, x: Any) -> bool:
    """True when ``x`` is provably exactly zero in every removed channel of the *masked* program: it comes from
    producers whose removed rows and biases are zeroed (linear/conv/matmul with a parameter, embeddings, norms
    with an affine weight, parameters themselves) through ops that keep zeros (views, casts, products with
    anything, sums of such tensors, odd/zero-preserving activations such as ReLU/GELU/SiLU/tanh, powers > 0).
    Conservative: anything else (a sigmoid, a constant offset, a graph input) is not zero."""
    memo = _ZERO_MEMO.setdefault(A, {})
    return _zero(x, memo, 0)


def _zero(x: Any, memo: dict, depth: int) -> bool:
    if not isinstance(x, fx.Node):
        return False
    if x in memo:
        return memo[x]
    if depth > 400:
        return False
    memo[x] = False  # cycles cannot happen in a DAG; this only guards the recursion
    r = _zero_uncached(x, memo, depth + 1)
    memo[x] = r
    return r


def _tensor_args(node: fx.Node) -> list[Any]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _zero_uncached(x: fx.Node, memo: dict, depth: int) -> bool:
    if x.op == "get_attr":
        v = x.meta.get("val")
        return v is None or (isinstance(v, torch.Tensor) and v.is_floating_point())
    if x.op != "call_function":
        return False
    op = _packet(x)
    args = x.args
    if op in _PRODUCERS:
        return True
    if x.target is operator.getitem:
        src = args[0]
        return isinstance(src, fx.Node) and _packet(src) in (aten.native_layer_norm, aten.native_dropout) \
            and args[1] == 0 and _zero(src, memo, depth)
    if op in (aten.layer_norm, aten.native_layer_norm):
        return isinstance(_arg(x, 2, "weight"), fx.Node)
    if op is aten.rms_norm:
        return isinstance(_arg(x, 2, "weight"), fx.Node)
    if op in (aten.batch_norm, aten._native_batch_norm_legit_no_training):
        return isinstance(args[1], fx.Node) if len(args) > 1 else False
    if op is aten.scaled_dot_product_attention:
        return _zero(args[2], memo, depth)  # attention-weighted sums of v's rows
    if op in _PASS_THROUGH:
        return bool(args) and _zero(args[0], memo, depth)
    if op is aten.pow:
        e = args[1] if len(args) > 1 else None
        return isinstance(e, (int, float)) and e > 0 and _zero(args[0], memo, depth)
    if op is aten.mul:
        return any(_carries_last(a, x) and _zero(a, memo, depth) for a in _tensor_args(x))
    if op is aten.div:
        return _carries_last(args[0], x) and _zero(args[0], memo, depth)
    if op in (aten.add, aten.sub):
        others = [a for a in args[1:] if not isinstance(a, fx.Node)]
        if any(not isinstance(a, (int, float)) or a != 0 for a in others[:1]):
            return False  # a nonzero constant offset
        return all(_carries_last(a, x) and _zero(a, memo, depth) for a in _tensor_args(x))
    if op is aten.cat:
        return all(_zero(a, memo, depth) for a in args[0])
    return False


def _carries_last(a: Any, out: fx.Node) -> bool:
    """``a`` is not broadcast along the last (channel) dim of ``out``: a scalar or size-1 parameter is not zeroed
    by masking, so it cannot vouch for zeros."""
    va, vo = getattr(a, "meta", {}).get("val"), out.meta.get("val")
    if not isinstance(va, torch.Tensor) or not isinstance(vo, torch.Tensor) or va.dim() == 0 or vo.dim() == 0:
        return False
    return va.shape[-1] == vo.shape[-1]


def _size(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _weight_name(w: Any) -> str | None:
    return w.target if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _norm_mode_rule(mode: str):
    def rule_(A: RuleContext, node: fx.Node) -> None:
        x, ns = node.args[0], node.args[1]
        s = list(A.sp(x))
        k = len(ns)
        normed = s[-k:]
        is_ln = node.target.overloadpacket is aten.layer_norm
        w, b = _arg(node, 2, "weight"), (_arg(node, 3, "bias") if is_ln else None)
        for p in (w, b):
            if isinstance(p, fx.Node):
                for a, bsp in zip(A.sp(p), normed):
                    A.unify(a, bsp, node, "layer norm parameter")
        eps = _arg(node, 4, "eps", 1e-5) if is_ln else _arg(node, 3, "eps")
        if mode == "exact" and not zero_in_removed(A, x):
            A.freeze(normed, node, f"normalisation statistics observe the channel count and the input "
                                   f"{x.name!r} is not provably zero in removed channels (norms='exact' needs it)")
        elif mode == "exact" and eps is None:
            A.freeze(normed, node, "normalisation statistics observe the channel count and eps=None (the runtime "
                                   "dtype's epsilon) cannot be rescaled exactly; give the norm an explicit eps")
        else:
            A.aux[node] = {"norm": {"mode": mode, "kind": "layer_norm" if is_ln else "rms_norm", "dims": normed,
                                    "size": _size(A.shape(x)[-k:]), "weight": _weight_name(w), "eps": eps,
                                    "module": _module(node)}}
        A.set(node, s)

    return rule_


def _stat_rule(mode: str, reduction: RuleFn):
    """``mean``/``sum`` over dims whose input is zero in removed channels (the RMSNorm statistic
    ``mean(x.pow(2), -1)`` of HF models): prunable, the mean's divisor pinned in exact mode. Any other reduction
    keeps the default rule (frozen)."""
    def rule_(A: RuleContext, node: fx.Node) -> None:
        x = node.args[0]
        dims = _arg(node, 1, "dim")
        keep = bool(_arg(node, 2, "keepdim", False))
        s, shp = A.sp(x), A.shape(x)
        if s is None or dims is None or not zero_in_removed(A, x):
            reduction(A, node)
            return
        n = len(s)
        dims = sorted({_nd(d, n) for d in ([dims] if isinstance(dims, int) else dims)})
        if not dims:
            reduction(A, node)
            return
        if node.target.overloadpacket is aten.mean:
            A.aux[node] = {"norm": {"mode": mode, "kind": "mean", "dims": [s[d] for d in dims],
                                    "size": _size(shp[d] for d in dims), "module": _module(node),
                                    **_rms_tail(node)}}
        out = [A.t.new(1, node.name) if d in dims else s[d] for d in range(n)] if keep else \
            [s[d] for d in range(n) if d not in dims]
        A.set(node, out)

    return rule_


def _module(node: fx.Node) -> str | None:
    """Qualified name of the innermost module that ran ``node`` (torch.export's ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] or None if stack else None


def _rms_tail(mean: fx.Node) -> dict[str, Any]:
    """For ``mean(x^2) -> add(eps) -> rsqrt -> mul(x, .) -> [to] -> mul(weight, .)`` (HF RMSNorm): the epsilon
    and the weight's name (used to fold the pinned divisor into a stock checkpoint); empty when not that shape."""
    out: dict[str, Any] = {}
    add = next((u for u in mean.users if _packet(u) is aten.add and len(u.args) > 1
                and isinstance(u.args[1], (int, float))), None)
    if add is None:
        return out
    out["eps"] = float(add.args[1])
    rs = next((u for u in add.users if _packet(u) is aten.rsqrt), None)
    cur = rs
    for _ in range(4):
        if cur is None:
            return out
        nxt = [u for u in cur.users if _packet(u) in (aten.mul, aten.to, aten._to_copy)]
        if len(nxt) != 1:
            return out
        cur = nxt[0]
        if _packet(cur) is aten.mul:
            w = [a for a in cur.args if isinstance(a, fx.Node) and a.op == "get_attr"]
            if w:
                out["weight"] = w[0].target
                return out
    return out


def norm_rules(mode: str, base: dict[Any, RuleFn] | None = None) -> dict[Any, RuleFn]:
    """The analyzer's rule table for ``norms=mode`` (see the comment above :data:`NORM_MODES`): ``"freeze"`` is
    :data:`~fxprune.rules.RULES` itself."""
    if mode not in NORM_MODES:
        raise ValueError(f"norms must be one of {NORM_MODES}, got {mode!r}")
    base = RULES if base is None else base
    if mode == "freeze":
        return base
    red = base[aten.mean]
    return {**base, aten.layer_norm: _norm_mode_rule(mode), aten.rms_norm: _norm_mode_rule(mode),
            aten.mean.dim: _stat_rule(mode, red), aten.sum.dim_IntList: _stat_rule(mode, base[aten.sum])}


def norm_kept(R: RewriteContext, info: dict[str, Any]) -> int:
    """Kept size of a recorded norm's normalised dims under Shrink's masks."""
    n = 1
    for s in info["dims"]:
        n *= R.new(s)
    return n


def _call(graph: fx.Graph, op: Any, *args: Any) -> fx.Node:
    return graph.call_function(op, tuple(args))


def _become(node: fx.Node, op: Any, *args: Any) -> None:
    """Turn ``node`` into ``op(*args)`` in place: it keeps its name, so later rewrites and Shrink's shape check
    still find it (new helper nodes are only ever used by it)."""
    node.target = op
    node.args = tuple(args)
    node.kwargs = {}


def _rewrite_norm(R: RewriteContext, node: fx.Node) -> None:
    info = R.aux(node).get("norm")
    if info is None:
        return
    D, Dk = info["size"], norm_kept(R, info)
    if Dk == D:
        return
    k = len(info["dims"])
    new_shape = [R.new(s) for s in info["dims"]]
    g = node.graph
    if info["kind"] == "layer_norm":
        if info["mode"] == "renormalize":
            _set_arg(node, 1, "normalized_shape", new_shape)
            return
        # exact: decomposed LayerNorm with the original divisor (see the comment above NORM_MODES)
        x, w, b = node.args[0], _arg(node, 2, "weight"), _arg(node, 3, "bias")
        eps = float(_arg(node, 4, "eps", 1e-5))
        dims = list(range(-k, 0))
        with g.inserting_before(node):
            mu = _call(g, aten.div.Tensor, _call(g, aten.sum.dim_IntList, x, dims, True), float(D))
            xc = _call(g, aten.sub.Tensor, x, mu)
            ss = _call(g, aten.sum.dim_IntList, _call(g, aten.mul.Tensor, xc, xc), dims, True)
            pad = _call(g, aten.mul.Tensor, _call(g, aten.mul.Tensor, mu, mu), float(D - Dk))
            var = _call(g, aten.div.Tensor, _call(g, aten.add.Tensor, ss, pad), float(D))
            r = _call(g, aten.rsqrt.default, _call(g, aten.add.Tensor, var, eps))
            if isinstance(w, fx.Node) and isinstance(b, fx.Node):
                y = _call(g, aten.mul.Tensor, _call(g, aten.mul.Tensor, xc, r), w)
                final = (aten.add.Tensor, y, b)
            elif isinstance(w, fx.Node):
                final = (aten.mul.Tensor, _call(g, aten.mul.Tensor, xc, r), w)
            elif isinstance(b, fx.Node):
                final = (aten.add.Tensor, _call(g, aten.mul.Tensor, xc, r), b)
            else:
                final = (aten.mul.Tensor, xc, r)
        _become(node, *final)
        return
    if info["kind"] == "rms_norm":
        if info["mode"] == "renormalize":
            _set_arg(node, 1, "normalized_shape", new_shape)
            return
        # exact, folded: rms_norm over the kept width with eps * D/Dk, times sqrt(D/Dk)
        c = D / Dk
        eps = info["eps"]  # never None here: the rule froze eps=None in exact mode
        with g.inserting_before(node):
            inner = _call(g, aten.rms_norm.default, node.args[0], new_shape, _arg(node, 2, "weight"),
                          float(eps) * c)
        _become(node, aten.mul.Tensor, inner, math.sqrt(c))
        return
    if info["kind"] == "mean" and info["mode"] == "exact":
        # mean over the original width of a zero-padded input == sum over the kept entries / D
        with g.inserting_before(node):
            total = g.call_function(aten.sum.dim_IntList, tuple(node.args), dict(node.kwargs))
        _become(node, aten.div.Tensor, total, float(D))


for _op in (aten.layer_norm, aten.rms_norm, aten.mean.dim):
    REWRITES[_op] = _rewrite_norm
