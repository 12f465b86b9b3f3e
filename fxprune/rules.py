"""Op rules of the dependency analyzer and the matching shape-constant rewrites used by Shrink.

A rule ``fn(A, node)`` reads the spaces of the node's inputs (``A.sp``), unifies/concatenates/factors them
(``A.unify``, ``A.t.concat``, ``A.t.product``), records MACs terms and auxiliary spaces, and sets the output spaces
(``A.set``). Reductions, softmax and normalisation statistics over a dim *observe* its channel count: those dims
are frozen (masked and shrunk models would differ). The one exception is SDPA's default ``1/sqrt(head_dim)`` scale,
which Shrink pins to the original value instead.

A rewrite ``fn(R, node)`` updates the node's shape constants after Shrink: ``R.new(space)`` is the kept size of a
space, ``R.keep(space)`` its boolean keep mask, ``R.spaces(node)`` the node's spaces (looked up by name).
"""
from __future__ import annotations

import math
import operator
import string
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from .analyzer import Analyzer, op_name

aten = torch.ops.aten
RULES: dict[Any, Callable[[Analyzer, fx.Node], None]] = {}
REWRITES: dict[Any, Callable[[Any, fx.Node], None]] = {}


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _set_arg(node: fx.Node, i: int, name: str, value: Any) -> None:
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        kw = dict(node.kwargs)
        kw[name] = value
        node.kwargs = kw


def rule(*targets: Any, rewrite: Callable | None = None):
    def deco(fn):
        for t in targets:
            RULES[t] = fn
            if rewrite is not None:
                REWRITES[t] = rewrite
        return fn

    return deco


def _nd(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# ----------------------------------------------------------------------------------------------- elementwise
@rule("pointwise", aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_, aten.dropout,
      aten.feature_dropout, aten.alpha_dropout, aten.dropout_, aten.detach_, aten.rsub, aten.feature_dropout_, aten.alpha_dropout_, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy,
      aten.type_as, aten.lift_fresh_copy, aten.copy_, aten.zero_, aten.fill_, aten.zeros_like, aten.ones_like,
      aten.full_like, aten.empty_like, aten.rand_like, aten.randn_like, aten.mish, aten.mish_, aten.elu, aten.elu_,
      aten.leaky_relu, aten.leaky_relu_, aten.gelu_, aten.silu_, aten.relu_, aten.celu, aten.selu,
      aten.hardtanh_, aten.masked_fill_, aten.__and__, aten.__or__, aten.__xor__, aten.__iand__, aten.__ior__,
      aten.bitwise_and, aten.bitwise_or, aten.bitwise_not, aten.logical_and, aten.logical_or, aten.logical_not, aten.clamp_, aten.clamp_min_, aten.mul_, aten.add_, aten.sub_,
      aten.div_, aten.sigmoid_, aten.tanh_)
def _pointwise(A: Analyzer, node: fx.Node) -> None:
    out_shape = A.shape(node)
    if out_shape is None:
        A.freeze_all(node, "pointwise op without a tensor result")
        return
    A.set(node, A.broadcast(node, [a for a in node.all_input_nodes if A.sp(a) is not None], out_shape))


@rule(aten.native_dropout)
def _native_dropout(A: Analyzer, node: fx.Node) -> None:
    s = A.sp(node.args[0])
    A.set(node, [s, list(s)])


@rule(aten.prelu, aten._prelu_kernel)
def _prelu(A: Analyzer, node: fx.Node) -> None:
    x, w = node.args[0], node.args[1]
    s = list(A.sp(x))
    if A.shape(w) and A.shape(w)[0] > 1:
        A.unify(s[1], A.sp(w)[0], node, "prelu weight")
    A.set(node, s)


@rule(aten.glu)
def _glu(A: Analyzer, node: fx.Node) -> None:
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


# ----------------------------------------------------------------------------------------------- conv / linear
def _freeze_quiet(A: Analyzer, spaces: Iterable[int], node: fx.Node, why: str) -> None:
    """Freeze without listing ``node`` under the report's frozen-by nodes (spatial dims are frozen in every CNN);
    a group that ends up frozen this way still names the node in its reason."""
    for sp_ in spaces:
        A.t.freeze(sp_, f"{node.name} ({op_name(node)}): {why}")


def _per_dim(v: Any, n: int, default: int) -> list[int]:
    if v is None:
        return [default] * n
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


def _conv_like(A: Analyzer, node: fx.Node, x: fx.Node, w: fx.Node, b: Any, groups: int, transposed: bool,
               stride: Any = None, padding: Any = None) -> None:
    xs, ws = A.sp(x), A.sp(w)
    out_shape = A.shape(node)
    out = A.fresh(out_shape, node.name, None)
    nsp = len(out_shape) - 2
    strides, pads, kernel_shape = _per_dim(stride, nsp, 1), _per_dim(padding, nsp, 0), A.shape(w)[2:]
    for i in range(2, len(out_shape)):
        j = i - 2
        if (not isinstance(pads[j], str) and kernel_shape[j] == 1 and strides[j] == 1 and pads[j] == 0
                and out_shape[i] == A.shape(x)[i]):
            A.unify(out[i], xs[i], node, "1x1 conv is pointwise along spatial dims")
        else:
            # the output length is a function of the input length: neither may change under pruning
            _freeze_quiet(A, [xs[i], out[i]], node, "spatial dim (output size depends on it)")
    for i in range(2, len(ws)):
        A.t.freeze(ws[i], "kernel dim")
    A.unify(out[0], xs[0], node, "batch")
    w_in, w_out = (ws[0], ws[1]) if transposed else (ws[1], ws[0])  # w_in: per-group in-channels (or full C_in)
    if groups == 1:
        A.unify(xs[1], w_in, node, "conv in-channels")
        A.unify(out[1], w_out, node, "conv out-channels")
        g_space = None
    else:
        g_space = A.t.new(groups, f"{node.name}.groups")
        if transposed:
            # weight (C_in, C_out/g, k...): C_in = (g, C_in/g); out = (g, C_out/g)
            cin_g = A.t.new(A.shape(x)[1] // groups, f"{node.name}.in_per_group")
            A.unify(w_in, A.t.product([g_space, cin_g]), node, "grouped conv weight")
            A.unify(xs[1], A.t.product([g_space, cin_g]), node, "grouped conv in-channels")
            A.unify(out[1], A.t.product([g_space, w_out]), node, "grouped conv out-channels")
        else:
            A.unify(xs[1], A.t.product([g_space, w_in]), node, "grouped conv in-channels")
            A.unify(w_out, A.t.product([g_space, A.t.new(out_shape[1] // groups, f"{node.name}.out_per_group")]),
                    node, "grouped conv weight")
            A.unify(out[1], w_out, node, "grouped conv out-channels")
    if isinstance(b, fx.Node) and A.sp(b) is not None:
        A.unify(A.sp(b)[0], out[1], node, "conv bias")
    A.aux[node] = {"groups": g_space}
    kernel = 1
    for n in A.shape(w)[2:]:
        kernel *= n
    A.mac(node, kernel, list(out) + [ws[1]])
    A.set(node, out)


def _rewrite_groups(R: Any, node: fx.Node, index: int, name: str) -> None:
    g = R.aux(node).get("groups")
    if g is not None:
        _set_arg(node, index, name, R.new(g))


@rule(aten.conv1d, aten.conv2d, aten.conv3d, rewrite=lambda R, n: _rewrite_groups(R, n, 6, "groups"))
def _conv(A: Analyzer, node: fx.Node) -> None:
    _conv_like(A, node, node.args[0], node.args[1], _arg(node, 2, "bias"), _arg(node, 6, "groups", 1), False,
               _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0))


@rule(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
      rewrite=lambda R, n: _rewrite_groups(R, n, 6, "groups"))
def _conv_t(A: Analyzer, node: fx.Node) -> None:
    _conv_like(A, node, node.args[0], node.args[1], _arg(node, 2, "bias"), _arg(node, 6, "groups", 1), True,
               _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0))


@rule(aten.convolution, rewrite=lambda R, n: _rewrite_groups(R, n, 8, "groups"))
def _convolution(A: Analyzer, node: fx.Node) -> None:
    _conv_like(A, node, node.args[0], node.args[1], node.args[2], node.args[8], bool(node.args[6]), node.args[3],
               node.args[4])


@rule(aten.linear)
def _linear(A: Analyzer, node: fx.Node) -> None:
    x, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias")
    xs, ws = A.sp(x), A.sp(w)
    out = list(xs[:-1]) + [ws[0]]
    A.unify(xs[-1], ws[1], node, "linear in-features")
    if isinstance(b, fx.Node):
        A.unify(A.sp(b)[0], ws[0], node, "linear bias")
    A.mac(node, 1, out + [ws[1]])
    A.set(node, out)


def _matmul_spaces(A: Analyzer, node: fx.Node, a: fx.Node, b: fx.Node) -> list[int]:
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
def _matmul(A: Analyzer, node: fx.Node) -> None:
    A.set(node, _matmul_spaces(A, node, node.args[0], node.args[1]))


@rule(aten.addmm, aten.baddbmm, aten.addbmm)
def _addmm(A: Analyzer, node: fx.Node) -> None:
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
def _einsum(A: Analyzer, node: fx.Node) -> None:
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


# ----------------------------------------------------------------------------------------------- normalisation
def _norm_params(A: Analyzer, node: fx.Node, channel: int, params: list[Any], bn_weight: Any = None) -> None:
    for p in params:
        if isinstance(p, fx.Node) and A.sp(p) is not None:
            A.unify(A.sp(p)[0], channel, node, "norm parameter")
    if bn_weight is not None:
        A.role(bn_weight, "bn_weight")


def _bn_batch_stats(A: Analyzer, node: fx.Node, s: list[int], training: Any) -> None:
    """Batch statistics (training=True, e.g. weight standardisation) observe every dim but the channel dim."""
    if training is True:
        A.freeze([sp for i, sp in enumerate(s) if i != 1], node, "batch statistics over these dims")


@rule(aten.batch_norm)
def _batch_norm(A: Analyzer, node: fx.Node) -> None:
    x, w, b, rm, rv = node.args[:5]
    s = list(A.sp(x))
    _bn_batch_stats(A, node, s, _arg(node, 5, "training"))
    _norm_params(A, node, s[1], [w, b, rm, rv], bn_weight=w)
    A.role(rv, "no_zero")
    A.aux[node] = {"bn": (w, b, rm, rv)}
    A.set(node, s)


@rule(aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional,
      aten.native_batch_norm, aten._native_batch_norm_legit)
def _native_bn(A: Analyzer, node: fx.Node) -> None:
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
def _instance_norm(A: Analyzer, node: fx.Node) -> None:
    x = node.args[0]
    s = list(A.sp(x))
    _norm_params(A, node, s[1], list(node.args[1:5]))
    A.role(_arg(node, 4, "running_var"), "no_zero")
    A.set(node, s)


@rule(aten.group_norm, rewrite=lambda R, n: _set_arg(n, 1, "num_groups", R.new(R.aux(n)["groups"])))
def _group_norm(A: Analyzer, node: fx.Node) -> None:
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
def _layer_norm(A: Analyzer, node: fx.Node) -> None:
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
def _native_layer_norm(A: Analyzer, node: fx.Node) -> None:
    _layer_norm(A, node)
    s = A.spaces[node]
    stat_shape = tuple(A.val(node)[1].shape)
    A.set(node, [s, A.fresh(stat_shape, node.name, "layer norm stats"), A.fresh(stat_shape, node.name, "stats")])


# ----------------------------------------------------------------------------------------------- embedding
@rule(aten.embedding)
def _embedding(A: Analyzer, node: fx.Node) -> None:
    w, idx = node.args[0], node.args[1]
    ws = A.sp(w)
    A.freeze([ws[0]], node, "embedding rows are addressed by integer indices")
    A.set(node, list(A.sp(idx)) + [ws[1]])


# ----------------------------------------------------------------------------------------------- attention
def _rewrite_sdpa(R: Any, node: fx.Node) -> None:
    aux = R.aux(node)
    if _arg(node, 6, "scale") is None and R.new(aux["head_dim"]) != aux["head_dim_size"]:
        kw = dict(node.kwargs)
        kw["scale"] = 1.0 / math.sqrt(aux["head_dim_size"])  # pin the original default scale
        node.kwargs = kw


@rule(aten.scaled_dot_product_attention, rewrite=_rewrite_sdpa)
def _sdpa(A: Analyzer, node: fx.Node) -> None:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    gqa = bool(_arg(node, 7, "enable_gqa", False))
    qs, ks, vs = A.sp(q), A.sp(k), A.sp(v)
    hq, hk = A.shape(q), A.shape(k)
    A.unify(qs[-1], ks[-1], node, "q/k head_dim")
    A.unify(ks[-2], vs[-2], node, "k/v sequence")
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


# ----------------------------------------------------------------------------------------------- cat / split
@rule(aten.cat, aten.concat, aten.concatenate)
def _cat(A: Analyzer, node: fx.Node) -> None:
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
def _stack(A: Analyzer, node: fx.Node) -> None:
    tensors = list(node.args[0])
    out_shape = A.shape(node)
    d = _nd(_arg(node, 1, "dim", 0), len(out_shape))
    base = list(A.sp(tensors[0]))
    for t in tensors[1:]:
        for a, b in zip(base, A.sp(t)):
            A.unify(a, b, node, "stack")
    new = A.t.new(len(tensors), f"{node.name}.stack", "stacked axis")
    A.set(node, base[:d] + [new] + base[d:])


def _split_outputs(A: Analyzer, node: fx.Node, d: int) -> None:
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


def _rewrite_split(R: Any, node: fx.Node) -> None:
    pieces = R.spaces(node)
    x = node.args[0]
    d = _nd(_arg(node, 2, "dim", 0) if node.target.overloadpacket is not aten.unbind else 0, len(R.shape(x)))
    sizes = [R.new(p[d]) for p in pieces]
    node.target = aten.split_with_sizes.default
    node.args = (x, sizes, d)
    node.kwargs = {}


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.unsafe_split, aten.unsafe_chunk,
      aten.unsafe_split_with_sizes, aten.split_with_sizes_copy, aten.split_copy, rewrite=_rewrite_split)
def _split(A: Analyzer, node: fx.Node) -> None:
    if node.target.overloadpacket is aten.tensor_split and not isinstance(node.args[1], (int, list, tuple)):
        A.freeze_all(node, "tensor_split by a tensor of indices")
        return
    _split_outputs(A, node, _nd(_arg(node, 2, "dim", 0), len(A.shape(node.args[0]))))


@rule(aten.unbind)
def _unbind(A: Analyzer, node: fx.Node) -> None:
    x = node.args[0]
    d = _nd(_arg(node, 1, "dim", 0), len(A.shape(x)))
    s = list(A.sp(x))
    pieces = [A.t.new(1, f"{node.name}.unbind") for _ in A.val(node)]
    A.unify(s[d], A.t.concat(pieces, node.name), node, "unbind")
    A.set(node, [s[:d] + s[d + 1:] for _ in pieces])


@rule(operator.getitem)
def _getitem(A: Analyzer, node: fx.Node) -> None:
    src, i = node.args
    s = A.spaces.get(src)
    if isinstance(s, list) and s and isinstance(s[0], list) and isinstance(i, int):
        A.set(node, s[i])
    elif A.val(node) is None or not isinstance(A.val(node), torch.Tensor):
        A.set(node, None)
    else:
        A.freeze_all(node, "getitem on a value the analyzer does not track")


def _rewrite_slice(R: Any, node: fx.Node) -> None:
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
def _slice(A: Analyzer, node: fx.Node) -> None:
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


def _rewrite_select(R: Any, node: fx.Node) -> None:
    x = node.args[0]
    d = _nd(node.args[1], len(R.shape(x)))
    idx = node.args[2]
    n = R.shape(x)[d]
    idx = idx + n if idx < 0 else idx
    keep = R.keep(R.spaces(x)[d])
    if not keep.all():
        _set_arg(node, 2, "index", int(keep[:idx].sum()))


@rule(aten.select, rewrite=_rewrite_select)
def _select(A: Analyzer, node: fx.Node) -> None:
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
def _narrow(A: Analyzer, node: fx.Node) -> None:
    x = node.args[0]
    d = _nd(node.args[1], len(A.shape(x)))
    s = list(A.sp(x))
    out = list(s)
    if A.shape(node)[d] != A.shape(x)[d]:
        out[d] = A.t.new(A.shape(node)[d], node.name)
        A.freeze([s[d], out[d]], node, "narrow")
    A.set(node, out)


# ----------------------------------------------------------------------------------------------- views
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


def _reshape_spaces(A: Analyzer, node: fx.Node, x: fx.Node) -> None:
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


def _regroup(A: Analyzer, node: fx.Node, sa: list[int], na: list[int], sb: list[int], nb: list[int]) -> None:
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


def _new_sizes(R: Any, node: fx.Node, old: list[Any], spaces: list[int], allow_infer: bool) -> list[Any]:
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
    def rw(R: Any, node: fx.Node) -> None:
        old = list(_arg(node, index, name))
        new = _new_sizes(R, node, old, R.spaces(node), allow_infer=True)
        if new != old:
            _set_arg(node, index, name, new)

    return rw


def _freeze_unrewritable_symbolic(A: Analyzer, node: fx.Node, sizes: Any, allow_infer: bool) -> None:
    """Symbolic shape entries (dynamic batch, e.g. batch*heads) can only be rewritten as a single inferred -1."""
    out = A.spaces[node]
    sym = [i for i, o in enumerate(sizes) if not isinstance(o, int)]
    has_minus_one = any(isinstance(o, int) and o == -1 for o in sizes)
    if sym and (not allow_infer or has_minus_one or len(sym) > 1):
        A.freeze([out[i] for i in sym], node, "symbolic size that cannot be rewritten")


@rule(aten.view, aten.reshape, aten._unsafe_view, rewrite=_rewrite_shape_arg(1, "size"))
def _view(A: Analyzer, node: fx.Node) -> None:
    _reshape_spaces(A, node, node.args[0])
    _freeze_unrewritable_symbolic(A, node, list(_arg(node, 1, "size")), allow_infer=True)


@rule(aten.flatten, aten.view_as, aten.reshape_as)
def _flatten(A: Analyzer, node: fx.Node) -> None:
    _reshape_spaces(A, node, node.args[0])


def _rewrite_unflatten(R: Any, node: fx.Node) -> None:
    x = node.args[0]
    d = _nd(node.args[1], len(R.shape(x)))
    sp = R.spaces(node)
    old = list(node.args[2])
    new = [o if (not isinstance(o, int) or o == -1) else R.new(sp[d + i]) for i, o in enumerate(old)]
    if new != old:
        _set_arg(node, 2, "sizes", new)


@rule(aten.unflatten, rewrite=_rewrite_unflatten)
def _unflatten(A: Analyzer, node: fx.Node) -> None:
    _reshape_spaces(A, node, node.args[0])


@rule(aten.permute)
def _permute(A: Analyzer, node: fx.Node) -> None:
    s = A.sp(node.args[0])
    dims = [_nd(d, len(s)) for d in node.args[1]]
    A.set(node, [s[d] for d in dims])


@rule(aten.transpose, aten.swapaxes, aten.swapdims)
def _transpose(A: Analyzer, node: fx.Node) -> None:
    s = list(A.sp(node.args[0]))
    a, b = _nd(node.args[1], len(s)), _nd(node.args[2], len(s))
    s[a], s[b] = s[b], s[a]
    A.set(node, s)


@rule(aten.t, aten.numpy_T)
def _t(A: Analyzer, node: fx.Node) -> None:
    A.set(node, list(reversed(A.sp(node.args[0]))))


@rule(aten.movedim)
def _movedim(A: Analyzer, node: fx.Node) -> None:
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
def _unsqueeze(A: Analyzer, node: fx.Node) -> None:
    s = list(A.sp(node.args[0]))
    d = _nd(node.args[1], len(s) + 1)
    A.set(node, s[:d] + [A.t.new(1, node.name)] + s[d:])


@rule(aten.squeeze)
def _squeeze(A: Analyzer, node: fx.Node) -> None:
    x = node.args[0]
    s, shp = list(A.sp(x)), A.shape(x)
    if len(node.args) > 1:
        dims = node.args[1]
        dims = {_nd(d, len(s)) for d in ([dims] if isinstance(dims, int) else dims)}
    else:
        dims = set(range(len(s)))
    A.set(node, [sp_ for i, (sp_, n) in enumerate(zip(s, shp)) if not (i in dims and n == 1)])


def _rewrite_expand(R: Any, node: fx.Node) -> None:
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
def _expand(A: Analyzer, node: fx.Node) -> None:
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
def _expand_as(A: Analyzer, node: fx.Node) -> None:
    A.set(node, A.broadcast(node, [node.args[0], node.args[1]], A.shape(node)))


@rule(aten.repeat)
def _repeat(A: Analyzer, node: fx.Node) -> None:
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


# ----------------------------------------------------------------------------------------------- spatial ops
@rule(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
      aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten.adaptive_max_pool1d,
      aten.adaptive_max_pool2d, aten.adaptive_max_pool3d, aten.max_pool2d_with_indices, aten.max_pool3d_with_indices,
      aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten.upsample_bilinear2d,
      aten.upsample_bicubic2d, aten.upsample_linear1d, aten.upsample_trilinear3d, aten._upsample_nearest_exact2d,
      aten._upsample_bilinear2d_aa, aten.reflection_pad2d, aten.replication_pad2d, aten.reflection_pad1d,
      aten.replication_pad1d, aten.grid_sampler, aten.grid_sampler_2d)
def _spatial(A: Analyzer, node: fx.Node) -> None:
    x = node.args[0]
    s = list(A.sp(x))
    v = A.val(node)
    shp = tuple(v[0].shape) if isinstance(v, (list, tuple)) else tuple(v.shape)
    lead = 2 if len(shp) >= 3 else 1
    out = s[:lead] + [A.t.new(n, f"{node.name}.spatial", "spatial dim") for n in shp[lead:]]
    _freeze_quiet(A, s[lead:], node, "spatial dim (output size depends on it)")
    A.set(node, [out, list(out)] if isinstance(v, (list, tuple)) else out)


@rule(aten.constant_pad_nd, aten.pad)
def _pad(A: Analyzer, node: fx.Node) -> None:
    x = node.args[0]
    s, shp = list(A.sp(x)), A.shape(x)
    pads = list(node.args[1])
    out = list(s)
    for k in range(len(pads) // 2):
        d = len(shp) - 1 - k
        if pads[2 * k] or pads[2 * k + 1]:
            out[d] = A.t.new(A.shape(node)[d], node.name)
            A.freeze([s[d], out[d]], node, "padded dim")
    A.set(node, out)


@rule(aten.pixel_shuffle)
def _pixel_shuffle(A: Analyzer, node: fx.Node) -> None:
    x, r = node.args[0], node.args[1]
    s = list(A.sp(x))
    out_shape = A.shape(node)
    c = A.t.new(out_shape[-3], f"{node.name}.channels")
    r1, r2 = A.t.new(r, node.name, "pixel shuffle factor"), A.t.new(r, node.name, "pixel shuffle factor")
    A.unify(s[-3], A.t.product([c, r1, r2]), node, "pixel shuffle channels")
    _freeze_quiet(A, s[-2:], node, "spatial dim (output size depends on it)")
    out = s[:-3] + [c] + [A.t.new(n, f"{node.name}.spatial", "spatial dim") for n in out_shape[-2:]]
    A.set(node, out)


@rule(aten.pixel_unshuffle)
def _pixel_unshuffle(A: Analyzer, node: fx.Node) -> None:
    x, r = node.args[0], node.args[1]
    s = list(A.sp(x))
    out_shape = A.shape(node)
    r1, r2 = A.t.new(r, node.name, "pixel shuffle factor"), A.t.new(r, node.name, "pixel shuffle factor")
    c = A.t.product([s[-3], r1, r2], node.name)
    _freeze_quiet(A, s[-2:], node, "spatial dim (output size depends on it)")
    out = s[:-3] + [c] + [A.t.new(n, f"{node.name}.spatial", "spatial dim") for n in out_shape[-2:]]
    A.set(node, out)


@rule(aten.channel_shuffle, aten.native_channel_shuffle)
def _channel_shuffle(A: Analyzer, node: fx.Node) -> None:
    x, g = node.args[0], node.args[1]
    s = list(A.sp(x))
    C = A.shape(x)[1]
    gs, ks = A.t.new(g, f"{node.name}.groups", "channel shuffle groups"), A.t.new(C // g, f"{node.name}.per_group")
    A.unify(s[1], A.t.product([gs, ks]), node, "channel shuffle")
    out = list(s)
    out[1] = A.t.product([ks, gs], node.name)
    A.set(node, out)


# ----------------------------------------------------------------------------------------------- reductions
def _reduce_dims(A: Analyzer, node: fx.Node, dims: Any, keepdim: bool, why: str) -> None:
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
def _reduction(A: Analyzer, node: fx.Node) -> None:
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
def _along_dim(A: Analyzer, node: fx.Node) -> None:
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
def _tri(A: Analyzer, node: fx.Node) -> None:
    s = list(A.sp(node.args[0]))
    A.freeze(s[-2:], node, "triangular mask indexes positions")
    A.set(node, s)


# ----------------------------------------------------------------------------------------------- factories & misc
@rule(aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.new_zeros, aten.new_ones, aten.new_full,
      aten.new_empty, aten.rand, aten.randn, aten.randint, aten.scalar_tensor, aten.tensor, aten.eye, aten.linspace,
      aten.empty_strided, aten.randperm)
def _factory(A: Analyzer, node: fx.Node) -> None:
    v = A.val(node)
    A.set(node, A.fresh(v.shape, node.name, "created from shape literals (factory op)"))


def _drop_size_check(R: Any, node: fx.Node) -> None:
    kw = dict(node.kwargs)
    for k in ("size", "stride"):
        if kw.get(k) is not None:
            kw[k] = None
    node.kwargs = kw
    if len(node.args) > 1:
        node.args = node.args[:1]


@rule(aten._assert_tensor_metadata, rewrite=_drop_size_check)
def _assert_meta(A: Analyzer, node: fx.Node) -> None:
    A.set(node, None)


@rule(aten._assert_scalar, aten.sym_constrain_range, aten.sym_constrain_range_for_size, aten.sym_size,
      aten.sym_numel, aten.sym_stride, aten._assert_async)
def _no_channels(A: Analyzer, node: fx.Node) -> None:
    A.set(node, None)


@rule(aten.index)
def _index(A: Analyzer, node: fx.Node) -> None:
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
def _index_select(A: Analyzer, node: fx.Node) -> None:
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


@rule(aten.repeat_interleave)
def _repeat_interleave(A: Analyzer, node: fx.Node) -> None:
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
