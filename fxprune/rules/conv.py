"""Convolutions (``conv1d/2d/3d``, transposed, ``aten.convolution``), grouped and depthwise included.

The weight's in-dim is unified with the input's channels and its out-dim with the output's. A grouped conv ties
in- and out-channels blockwise: both are ``Product(groups, per_group)`` with one shared ``groups`` space, which
the rewrite turns back into the ``groups`` argument after Shrink. Spatial dims are pointwise (unified) for 1x1,
stride-1, unpadded kernels and frozen otherwise (the output length depends on the input length).
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from .context import RewriteContext, RuleContext
from .registry import _arg, _freeze_quiet, _set_arg, aten, rule


def _per_dim(v: Any, n: int, default: int) -> list[int]:
    if v is None:
        return [default] * n
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


def _conv_like(A: RuleContext, node: fx.Node, x: fx.Node, w: fx.Node, b: Any, groups: int, transposed: bool,
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


def _rewrite_groups(R: RewriteContext, node: fx.Node, index: int, name: str) -> None:
    g = R.aux(node).get("groups")
    if g is not None:
        _set_arg(node, index, name, R.new(g))


@rule(aten.conv1d, aten.conv2d, aten.conv3d, rewrite=lambda R, n: _rewrite_groups(R, n, 6, "groups"))
def _conv(A: RuleContext, node: fx.Node) -> None:
    _conv_like(A, node, node.args[0], node.args[1], _arg(node, 2, "bias"), _arg(node, 6, "groups", 1), False,
               _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0))


@rule(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
      rewrite=lambda R, n: _rewrite_groups(R, n, 6, "groups"))
def _conv_t(A: RuleContext, node: fx.Node) -> None:
    _conv_like(A, node, node.args[0], node.args[1], _arg(node, 2, "bias"), _arg(node, 6, "groups", 1), True,
               _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0))


@rule(aten.convolution, rewrite=lambda R, n: _rewrite_groups(R, n, 8, "groups"))
def _convolution(A: RuleContext, node: fx.Node) -> None:
    _conv_like(A, node, node.args[0], node.args[1], node.args[2], node.args[8], bool(node.args[6]), node.args[3],
               node.args[4])
