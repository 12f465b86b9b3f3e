"""Ops whose output length along a dim is a function of the input length (pooling, upsampling, reflection and
replication padding, grid sampling, sliding windows with ``Tensor.unfold``): those dims are frozen, channels pass
through. Constant padding freezes the padded dims. Pixel (un)shuffle and channel shuffle factor channels into products.
"""
from __future__ import annotations

import torch.fx as fx

from .context import RuleContext
from .registry import _arg, _freeze_quiet, _nd, aten, rule


@rule(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
      aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten.adaptive_max_pool1d,
      aten.adaptive_max_pool2d, aten.adaptive_max_pool3d, aten.max_pool2d_with_indices, aten.max_pool3d_with_indices,
      aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten.upsample_bilinear2d,
      aten.upsample_bicubic2d, aten.upsample_linear1d, aten.upsample_trilinear3d, aten._upsample_nearest_exact2d,
      aten._upsample_bilinear2d_aa, aten.reflection_pad2d, aten.replication_pad2d, aten.reflection_pad1d,
      aten.replication_pad1d)
def _spatial(A: RuleContext, node: fx.Node) -> None:
    x = node.args[0]
    s = list(A.sp(x))
    v = A.val(node)
    shp = tuple(v[0].shape) if isinstance(v, (list, tuple)) else tuple(v.shape)
    lead = 2 if len(shp) >= 3 else 1
    out = s[:lead] + [A.t.new(n, f"{node.name}.spatial", "spatial dim") for n in shp[lead:]]
    _freeze_quiet(A, s[lead:], node, "spatial dim (output size depends on it)")
    A.set(node, [out, list(out)] if isinstance(v, (list, tuple)) else out)


@rule(aten.grid_sampler, aten.grid_sampler_2d, aten.grid_sampler_3d)
def _grid_sample(A: RuleContext, node: fx.Node) -> None:
    """``grid_sample(x (N, C, *in), grid (N, *out, k))``: output position ``p`` samples ``x`` at ``grid[:, p]``, so
    the output's spatial dims are the grid's (same positions: pruning grid positions, e.g. deformable-attention
    sampling points from a Linear, removes those outputs), channels pass through from ``x``, the batch is shared.
    ``x``'s spatial dims are read at coordinates and the grid's coordinate dim is consumed: both frozen."""
    x, grid = node.args[0], node.args[1]
    s, g = list(A.sp(x)), list(A.sp(grid))
    A.unify(s[0], g[0], node, "batch")
    _freeze_quiet(A, s[2:], node, "spatial dim sampled at grid coordinates")
    _freeze_quiet(A, [g[-1]], node, "grid coordinate dim")
    A.set(node, [s[0], s[1]] + g[1:-1])


@rule(aten.constant_pad_nd, aten.pad)
def _pad(A: RuleContext, node: fx.Node) -> None:
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
def _pixel_shuffle(A: RuleContext, node: fx.Node) -> None:
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
def _pixel_unshuffle(A: RuleContext, node: fx.Node) -> None:
    x, r = node.args[0], node.args[1]
    s = list(A.sp(x))
    out_shape = A.shape(node)
    r1, r2 = A.t.new(r, node.name, "pixel shuffle factor"), A.t.new(r, node.name, "pixel shuffle factor")
    c = A.t.product([s[-3], r1, r2], node.name)
    _freeze_quiet(A, s[-2:], node, "spatial dim (output size depends on it)")
    out = s[:-3] + [c] + [A.t.new(n, f"{node.name}.spatial", "spatial dim") for n in out_shape[-2:]]
    A.set(node, out)


@rule(aten.channel_shuffle, aten.native_channel_shuffle)
def _channel_shuffle(A: RuleContext, node: fx.Node) -> None:
    x, g = node.args[0], node.args[1]
    s = list(A.sp(x))
    C = A.shape(x)[1]
    gs, ks = A.t.new(g, f"{node.name}.groups", "channel shuffle groups"), A.t.new(C // g, f"{node.name}.per_group")
    A.unify(s[1], A.t.product([gs, ks]), node, "channel shuffle")
    out = list(s)
    out[1] = A.t.product([ks, gs], node.name)
    A.set(node, out)


@rule(aten.unfold)
def _unfold(A: RuleContext, node: fx.Node) -> None:
    """``x.unfold(d, size, step)``: dim ``d`` becomes the window count and a trailing dim of ``size`` is appended;
    both depend on ``d``'s length, which is frozen. Every other dim keeps its positions (timm HaloAttention's kv
    windows: its channels pass through)."""
    x = node.args[0]
    s = list(A.sp(x))
    d = _nd(_arg(node, 1, "dimension", 0), len(s))
    shp = A.shape(node)
    _freeze_quiet(A, [s[d]], node, "spatial dim (output size depends on it)")
    out = list(s)
    out[d] = A.t.new(shp[d], f"{node.name}.windows", "spatial dim")
    A.set(node, out + [A.t.new(shp[-1], f"{node.name}.window", "spatial dim")])
