"""AbsorbBNShift: fold the constant output of removed BatchNorm channels into the next layer's bias.

A BN channel with ``gamma = 0`` outputs the constant ``beta`` everywhere; after the following activations and
shape-preserving ops it is still a constant ``v = f(beta)``. Removing the channel drops the consumer's contribution
``sum_k W[o, c, k] * v``; adding exactly that to the consumer's bias (or, for a bias-free consumer whose only user
is an eval-mode BatchNorm, subtracting it from that BN's running mean) makes pruning such a channel change nothing.
Run it after a selection pass and before ``Shrink`` (or ``ApplyMasks``)::

    compile(model, x, passes=[BNScalePrune(0.5), AbsorbBNShift(), Shrink()])

Constants are propagated through pointwise ops (any activation, residual adds of constant channels, scalar
arithmetic), channel concat/split/slice, max pooling, nearest/bilinear upsampling, adaptive average pooling and
spatial means. A consumer is a conv (``groups == 1``, not transposed) or a linear layer whose removed input columns
all carry a constant. Exactness and reporting:

* exact when the removed gammas are exactly 0 and the consumer has no zero padding (or a 1x1 kernel);
* a conv with zero padding sees zeros, not ``v``, at the border: absorbing is exact in the interior only; such
  layers are listed under ``approximate`` (``padded="skip"`` leaves them alone instead);
* consumers with neither a bias nor a BatchNorm right after them (we do not add parameters to the graph),
  grouped/transposed convs, and columns whose input is not provably constant are listed under ``skipped`` with
  the reason.

Stats: per consumer where the shift went (``into``) and its size (``max_bias_change``), ``max_removed_gamma``
(exactness needs 0), and on the program's example inputs ``max_change`` = max |dense - pruned| output difference
with absorption and ``max_change_without`` without it.
"""
from __future__ import annotations

import copy
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from fxprune.errors import InputError, PassError
from fxprune.masking import apply_channel_masks, apply_weight_masks, param_keep
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program, Stage

_IDENTITY = ("aten.clone.default", "aten.contiguous.default", "aten.alias.default", "aten.detach.default",
             "aten.dropout.default", "aten._to_copy.default", "aten.to.dtype", "aten.to.dtype_layout",
             "aten.lift_fresh_copy.default", "aten.feature_dropout.default")
_KEEP_POOLS = ("aten.max_pool2d.default", "aten.max_pool1d.default", "aten.max_pool3d.default",
               "aten.adaptive_avg_pool2d.default", "aten.adaptive_avg_pool1d.default",
               "aten.adaptive_max_pool2d.default", "aten.upsample_nearest2d.default", "aten.upsample_nearest2d.vec",
               "aten.upsample_bilinear2d.default", "aten.upsample_bilinear2d.vec", "aten.upsample_nearest1d.default",
               "aten.upsample_nearest3d.default", "aten.upsample_nearest3d.vec", "aten._adaptive_avg_pool2d.default")
_AVG_POOLS = ("aten.avg_pool2d.default", "aten.avg_pool1d.default", "aten.avg_pool3d.default")
_TUPLE_POOLS = ("aten.max_pool2d_with_indices.default", "aten.adaptive_max_pool2d.default")
_BN = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default",
       "aten.native_batch_norm.default", "aten._native_batch_norm_legit.default",
       "aten.cudnn_batch_norm.default")
_CONV = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.convolution.default",
         "aten.conv1d.padding", "aten.conv2d.padding", "aten.conv3d.padding")
_UNTAGGED_POINTWISE = ("aten.hardswish.default", "aten.selu.default", "aten.celu.default", "aten.relu6.default",
                       "aten.log_sigmoid.default", "aten.softshrink.default", "aten.hardshrink.default")
_SPLIT = ("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.tensor_split.sections",
          "aten.unsafe_split.Tensor", "aten.split_with_sizes_copy.default")

Consts = dict[int, tuple[float, bool]]  # channel (dim 1) -> (constant value, exact)


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _dim1(dim: int, ndim: int) -> bool:
    return ndim >= 2 and (dim == 1 or dim == 1 - ndim)


def _following_bn(node: fx.Node) -> fx.Node | None:
    """The eval-mode BatchNorm that is the only user of ``node`` (its running mean can absorb a shift exactly)."""
    users = list(node.users)
    if len(users) != 1:
        return None
    u = users[0]
    t = str(u.target)
    if u.op != "call_function" or u.args[0] is not node or len(u.args) < 5:
        return None
    rm = u.args[3]
    if not (isinstance(rm, fx.Node) and rm.op == "get_attr"):
        return None
    if t == "aten.batch_norm.default" and len(u.args) > 5 and u.args[5] is False:
        return u
    if t == "aten._native_batch_norm_legit_no_training.default":
        return u
    return None


@register_pass
class AbsorbBNShift(Pass):
    """Absorb removed BN channels' constant output (``f(beta)``) into the consumer's bias (see module docs).

    ``padded``: ``"absorb"`` (default; exact in the interior, reported as approximate) or ``"skip"`` for convs
    with zero padding. ``measure``: compare dense and pruned outputs on the example inputs (three forwards).
    """

    name = "absorb_bn_shift"
    requires = frozenset({"groups", "masks"})
    accepts = frozenset({Stage.SELECTED})  # before ApplyMasks/Shrink: the removed BN shifts must still be there
    modifies_weights = True

    def __init__(self, padded: str = "absorb", measure: bool = True):
        if padded not in ("absorb", "skip"):
            raise InputError(f"padded must be 'absorb' or 'skip', got {padded!r}",
                             fix="'absorb' folds the shift even where zero padding makes borders inexact")
        self.padded = padded
        self.measure = bool(measure)

    # ------------------------------------------------------------------ run
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gs = program.groups
        leaf_keep = program.leaf_keep()
        keep = param_keep(gs, leaf_keep)
        alias = gs.analysis.param_alias
        gm = program.gm
        dense = copy.deepcopy(gm) if self.measure else None

        consts: dict[fx.Node, Any] = {}
        notes: list[str] = []
        removed_gamma = 0.0
        absorbed: list[dict[str, Any]] = []
        approximate: list[str] = []
        skipped: list[dict[str, str]] = []
        updates: list[tuple[str, torch.Tensor]] = []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            t = str(node.target)
            try:
                if t in _BN:
                    c, g = self._bn(program, node, keep, alias)
                    removed_gamma = max(removed_gamma, g)
                    if c:
                        consts[node] = c
                elif t in _CONV or t == "aten.linear.default":
                    self._consumer(program, node, t, keep, alias, consts, absorbed, approximate, skipped, updates)
                else:
                    c = self._propagate(program, node, t, consts)
                    if c:
                        consts[node] = c
            except (PassError, InputError):
                raise
            except Exception as e:  # an op we could not evaluate: its output carries no constants
                notes.append(f"{node.name}: {type(e).__name__}: {e}")
        with torch.no_grad():
            for pname, delta in updates:
                p = program.param(pname)
                p.add_(delta.to(p.dtype))
        stats: dict[str, Any] = {"absorbed": absorbed, "approximate": approximate, "skipped": skipped,
                                 "layers_absorbed": len(absorbed), "max_removed_gamma": removed_gamma,
                                 "max_bias_change": max((a["max_bias_change"] for a in absorbed), default=0.0),
                                 "notes": notes}
        if self.measure and dense is not None:
            stats.update(self._measure(program, dense, gs, leaf_keep))
        return PassResult(program, changed=bool(absorbed), stats=stats)

    # ------------------------------------------------------------------ sources
    def _bn(self, program: Program, node: fx.Node, keep: dict, alias: dict) -> tuple[Consts, float]:
        w, b = node.args[1] if len(node.args) > 1 else None, node.args[2] if len(node.args) > 2 else None
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return {}, 0.0
        k = keep.get(alias.get(w.target, w.target), [None])[0]
        if k is None:
            return {}, 0.0
        gamma = program.param(w.target).detach().float().reshape(-1)
        beta = (program.param(b.target).detach().float().reshape(-1) if isinstance(b, fx.Node) and b.op == "get_attr"
                else torch.zeros_like(gamma))
        rem = np.nonzero(~k)[0]
        out = {int(c): (float(beta[c]), float(gamma[c]) == 0.0) for c in rem}
        return out, float(gamma[torch.from_numpy(rem)].abs().max()) if len(rem) else 0.0

    # ------------------------------------------------------------------ propagation
    def _propagate(self, program: Program, node: fx.Node, t: str, consts: dict) -> Any:
        args = node.args
        x = args[0] if args else None
        if t == "<built-in function getitem>" or node.target is operator.getitem:
            src = consts.get(x)
            if isinstance(src, list) and isinstance(args[1], int) and args[1] < len(src):
                return src[args[1]]
            if isinstance(src, dict) and args[1] == 0:  # (out, indices) of a tuple-returning pool / BN
                return src
            return None
        if t in ("aten.cat.default", "aten.concat.default"):
            tensors = args[0]
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            vo = _val(node)
            if not isinstance(vo, torch.Tensor) or not _dim1(dim, vo.dim()):
                return None
            out: Consts = {}
            off = 0
            for a in tensors:
                va = _val(a)
                if not isinstance(va, torch.Tensor):
                    return None
                s = consts.get(a)
                if isinstance(s, dict):
                    out.update({off + c: ve for c, ve in s.items()})
                off += int(va.shape[1])
            return out or None
        if not isinstance(x, fx.Node):
            return None
        src = consts.get(x)
        if t in _IDENTITY or t in _KEEP_POOLS or t in _TUPLE_POOLS:
            if not isinstance(src, dict):
                return None
            vi, vo = _val(x), _val(node)
            vo = vo[0] if isinstance(vo, (tuple, list)) else vo
            if not (isinstance(vi, torch.Tensor) and isinstance(vo, torch.Tensor) and vi.dim() >= 2
                    and vo.dim() >= 2 and vi.shape[1] == vo.shape[1]):
                return None
            return dict(src)
        if t in _AVG_POOLS:
            if not isinstance(src, dict):
                return None
            pad = args[3] if len(args) > 3 else node.kwargs.get("padding", 0)
            cip = args[5] if len(args) > 5 else node.kwargs.get("count_include_pad", True)
            inexact = bool(cip) and any(int(p) for p in (pad if isinstance(pad, (list, tuple)) else [pad]))
            return {c: (v, e and not inexact) for c, (v, e) in src.items()}
        if t in ("aten.mean.dim", "aten.sum.dim_IntList", "aten.amax.default"):
            if not isinstance(src, dict):
                return None
            vi = _val(x)
            dims = args[1] if len(args) > 1 else None
            if dims is None or not isinstance(vi, torch.Tensor):
                return None
            dims = [d % vi.dim() for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
            if 0 in dims or 1 in dims:
                return None
            if t == "aten.sum.dim_IntList":
                n = int(np.prod([int(vi.shape[d]) for d in dims]))
                return {c: (v * n, e) for c, (v, e) in src.items()}
            return dict(src)
        if t in ("aten.view.default", "aten.reshape.default", "aten.flatten.using_ints", "aten._unsafe_view.default"):
            vi, vo = _val(x), _val(node)
            if isinstance(src, dict) and isinstance(vi, torch.Tensor) and isinstance(vo, torch.Tensor) and \
                    vi.dim() >= 2 and vo.dim() >= 2 and vi.shape[0] == vo.shape[0] and vi.shape[1] == vo.shape[1]:
                return dict(src)
            return None
        if t in _SPLIT:
            if not isinstance(src, dict):
                return None
            vo = _val(node)
            vi = _val(x)
            dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
            if not isinstance(vo, (list, tuple)) or not isinstance(vi, torch.Tensor) or not _dim1(dim, vi.dim()):
                return None
            outs, off = [], 0
            for piece in vo:
                n = int(piece.shape[1])
                outs.append({c - off: ve for c, ve in src.items() if off <= c < off + n})
                off += n
            return outs
        if t == "aten.slice.Tensor":
            if not isinstance(src, dict):
                return None
            vi = _val(x)
            dim = args[1] if len(args) > 1 else 0
            if not isinstance(vi, torch.Tensor) or not _dim1(dim, vi.dim()):
                return dict(src) if isinstance(vi, torch.Tensor) and dim % vi.dim() not in (0, 1) else None
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            end = args[3] if len(args) > 3 and args[3] is not None else vi.shape[1]
            step = args[4] if len(args) > 4 else 1
            idx = list(range(int(vi.shape[1])))[int(start):int(min(end, vi.shape[1])):int(step)]
            return {j: src[c] for j, c in enumerate(idx) if c in src}
        if isinstance(node.target, torch._ops.OpOverload) and (torch.Tag.pointwise in node.target.tags
                                                               or t in _UNTAGGED_POINTWISE):
            return self._pointwise(program, node, consts)
        return None

    def _pointwise(self, program: Program, node: fx.Node, consts: dict) -> Consts | None:
        vo = _val(node)
        if not isinstance(vo, torch.Tensor) or vo.dim() < 2 or not vo.is_floating_point():
            return None
        nd, C = vo.dim(), int(vo.shape[1])
        inputs = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)]
        if not any(isinstance(consts.get(a), dict) for a in inputs):
            return None
        exact = True
        fail = False

        def sub(a: Any) -> Any:
            nonlocal exact, fail
            if not isinstance(a, fx.Node):
                return a
            v = _val(a)
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                fail = True
                return a
            shape = [1] * (nd - v.dim()) + [int(s) for s in v.shape]
            if len(shape) != nd or shape[1] not in (C, 1):
                fail = True
                return a
            small = [1] * nd
            small[1] = shape[1]
            if a.op == "get_attr":  # a parameter broadcast over batch and space is a constant too
                if any(s != 1 for i, s in enumerate(shape) if i != 1):
                    fail = True
                    return a
                return program.param(a.target).detach().float().reshape(small)
            tt = torch.full(small, float("nan"))
            for c, (val, e) in (consts.get(a) or {}).items():
                tt.view(-1)[c] = val
                exact = exact and e
            return tt

        args, kwargs = tree_map(sub, node.args), tree_map(sub, dict(node.kwargs))
        if fail:
            return None
        with torch.no_grad():
            r = node.target(*args, **kwargs)
        if not isinstance(r, torch.Tensor) or r.numel() not in (C, 1):
            return None
        r = r.reshape(-1).expand(C) if r.numel() == 1 else r.reshape(-1)
        fin = torch.isfinite(r)
        return {int(c): (float(r[c]), exact) for c in torch.nonzero(fin).flatten().tolist()} or None

    # ------------------------------------------------------------------ consumers
    def _consumer(self, program: Program, node: fx.Node, t: str, keep: dict, alias: dict, consts: dict,
                  absorbed: list, approximate: list, skipped: list, updates: list) -> None:
        x, w = node.args[0], node.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return
        wk = keep.get(alias.get(w.target, w.target), [])
        col_keep = wk[1] if len(wk) > 1 else None
        if col_keep is None:
            return  # no input channel of this consumer is removed
        cols = np.nonzero(~col_keep)[0]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        padded = False
        if t != "aten.linear.default":
            if t == "aten.convolution.default":
                transposed, groups, padding = node.args[6], node.args[8], node.args[4]
            else:
                transposed = False
                groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
                padding = node.args[4] if len(node.args) > 4 else node.kwargs.get("padding", 0)
            if transposed or groups != 1:
                skipped.append({"consumer": node.name, "reason": "transposed or grouped conv"})
                return
            W = program.param(w.target)
            kernel = [int(s) for s in W.shape[2:]]
            if isinstance(padding, str):
                padded = padding == "same" and any(k > 1 for k in kernel)
            else:
                pads = padding if isinstance(padding, (list, tuple)) else [padding]
                padded = any(int(p) > 0 for p in pads) and any(k > 1 for k in kernel)
        else:
            vx = _val(x)
            if not isinstance(vx, torch.Tensor) or vx.dim() != 2:
                skipped.append({"consumer": node.name, "reason": "linear on a non-2D input"})
                return
        src = consts.get(x)
        if not isinstance(src, dict) or any(int(c) not in src for c in cols):
            missing = len(cols) if not isinstance(src, dict) else sum(1 for c in cols if int(c) not in src)
            skipped.append({"consumer": node.name, "reason": f"{missing} of {len(cols)} removed input channels are "
                                                             "not provably constant (no BN with a removed channel "
                                                             "reaches them through supported ops)"})
            return
        target, sign = None, 1.0
        if isinstance(b, fx.Node) and b.op == "get_attr":
            target = b.target
        else:  # no bias: a BatchNorm right after the consumer takes the shift into its running mean
            bn = _following_bn(node)
            if bn is not None:
                target, sign = bn.args[3].target, -1.0
        if target is None:
            skipped.append({"consumer": node.name, "reason": "no bias to absorb into and no eval-mode BatchNorm "
                                                             "right after it (fxprune does not add parameters)"})
            return
        if padded and self.padded == "skip":
            skipped.append({"consumer": node.name, "reason": "zero padding (padded='skip')"})
            return
        W = program.param(w.target).detach().float()
        v = torch.tensor([src[int(c)][0] for c in cols], dtype=torch.float32)
        cols_t = torch.from_numpy(cols)
        Wc = W.index_select(1, cols_t)
        delta = (Wc.reshape(Wc.shape[0], Wc.shape[1], -1).sum(-1) * v).sum(1)
        updates.append((target, sign * delta))
        exact = all(src[int(c)][1] for c in cols) and not padded
        if padded:
            approximate.append(node.name)
        absorbed.append({"consumer": node.name, "into": target, "columns": int(len(cols)),
                         "max_bias_change": float(delta.abs().max()) if delta.numel() else 0.0,
                         "exact": exact, "zero_padding": padded})

    # ------------------------------------------------------------------ measurement
    @staticmethod
    @torch.no_grad()
    def _measure(program: Program, dense: fx.GraphModule, gs: Any, leaf_keep: dict) -> dict[str, float]:
        def masked(gm: fx.GraphModule) -> fx.GraphModule:
            m = copy.deepcopy(gm)
            apply_channel_masks(m, gs, leaf_keep)
            apply_weight_masks(m, program.weight_masks)
            return m

        def leaves(out: Any) -> list[torch.Tensor]:
            return [o.float() for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.is_floating_point()]

        ref = leaves(dense(*program.args, **program.kwargs))
        with_ = leaves(masked(program.gm)(*program.args, **program.kwargs))
        without = leaves(masked(dense)(*program.args, **program.kwargs))

        def diff(a: list, b: list) -> float:
            return max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)

        return {"max_change": diff(ref, with_), "max_change_without": diff(ref, without),
                "output_scale": max((float(r.abs().max()) for r in ref if r.numel()), default=0.0)}
