"""Fine-grained sparsity runtime of the weight-sparsity family (Unstructured, NMSparsity, BlockSparsity, PDP).

* :func:`sparsifiable_weights`: which parameters are conv/linear/matmul weights, along which dim they reduce
  (the "input" dim: ``in_features`` of a linear, ``C_in`` of a conv) and their MACs at the example shapes.
* :func:`nm_mask`, :func:`block_scores` / :func:`expand_blocks`: the N:M and block patterns.
* :class:`HardMask`, :func:`enforce_masks`, :func:`bake`, :func:`load_masked_state_dict`: keep weight masks through
  training and save/load with ``torch.nn.utils.parametrize`` (the effective weight is ``original * mask``, so no
  optimizer, momentum or weight decay can revive a pruned weight).
* :func:`check_nm`, :func:`check_nm_onnx`: verify the N:M layout TensorRT's sparse tensor cores need, on tensors
  and on the initializers of an exported ONNX file.
* :class:`BlockSparseLinear`, :func:`time_linear`: a linear layer whose block-sparse weight runs with torch's BSR
  kernels (``Tensor.to_sparse_bsr`` + ``addmm``); :class:`fxprune.passes.block_sparsity.BlockSparseRewrite` swaps
  it in per layer only where it measured faster than dense.

Generic attribute helpers (``get_tensor``, ``owner``, ``ignore_filter``) live in :mod:`fxprune.utils`.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from fxprune.errors import InputError
from fxprune.utils import get_tensor, owner

aten = torch.ops.aten

# op overload -> (kind, index of the weight argument)
_WEIGHT_SLOTS: dict[Any, tuple[str, int]] = {
    aten.linear.default: ("linear", 1),
    aten.conv1d.default: ("conv", 1),
    aten.conv2d.default: ("conv", 1),
    aten.conv3d.default: ("conv", 1),
    aten.conv1d.padding: ("conv", 1),
    aten.conv2d.padding: ("conv", 1),
    aten.conv3d.padding: ("conv", 1),
    aten.conv_transpose1d.default: ("conv_transpose", 1),
    aten.conv_transpose2d.input: ("conv_transpose", 1),
    aten.conv_transpose3d.input: ("conv_transpose", 1),
    aten.mm.default: ("matmul", 1),
    aten.matmul.default: ("matmul", 1),
    aten.addmm.default: ("matmul", 2),
}


@dataclass
class WeightInfo:
    """A parameter used only as the weight of conv / linear / matmul ops."""

    name: str  # qualified name (the first get_attr target that reaches this tensor)
    kind: str  # "linear" | "conv" | "conv_transpose" | "matmul"
    shape: tuple[int, ...]
    reduction_dim: int  # the input (reduction) dim of the weight: 1 for linear/conv, 0 for matmul/conv_transpose
    nodes: list[str] = field(default_factory=list)  # the ops using it
    macs: int = 0  # dense MACs of all its uses at the example input shapes
    aliases: list[str] = field(default_factory=list)  # other names of the same tensor (tied weights)

    @property
    def reduction_size(self) -> int:
        return int(self.shape[self.reduction_dim])


def _hint(n: Any) -> int:
    if isinstance(n, torch.SymInt):
        h = n.node.hint
        return int(h) if h is not None else 2
    return int(n)


def _numel(v: Any) -> int:
    if not isinstance(v, torch.Tensor):
        return 0
    return int(math.prod(_hint(s) for s in v.shape))


def sparsifiable_weights(gm: fx.GraphModule) -> dict[str, WeightInfo]:
    """Parameters used *only* as conv/linear/matmul weights (every use, tied aliases included), keyed by name.

    Parameters with any other use (embedding tables tied to an ``lm_head``, a weight also added somewhere) are left
    out: masking them would change more than the matmul.
    """
    by_tensor: dict[int, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                t = get_tensor(gm, n.target)
            except AttributeError:
                continue
            if isinstance(t, nn.Parameter) and t.dim() >= 2 and t.is_floating_point():
                names = by_tensor.setdefault(id(t), [])
                if n.target not in names:
                    names.append(n.target)
    out: dict[str, WeightInfo] = {}
    attr_nodes = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    for names in by_tensor.values():
        kinds: set[str] = set()
        ok = True
        nodes: list[str] = []
        macs = 0
        for nm in names:
            for user in attr_nodes[nm].users:
                slot = _WEIGHT_SLOTS.get(user.target) if user.op == "call_function" else None
                if slot is None or len(user.args) <= slot[1] or user.args[slot[1]] is not attr_nodes[nm] \
                        or sum(a is attr_nodes[nm] for a in user.args) != 1:
                    ok = False
                    break
                kind = slot[0]
                shape = tuple(get_tensor(gm, nm).shape)
                if kind == "matmul" and len(shape) != 2:
                    ok = False
                    break
                kinds.add(kind)
                nodes.append(user.name)
                macs += _use_macs(kind, shape, user)
            if not ok:
                break
        if not ok or len(kinds) != 1:
            continue
        kind = kinds.pop()
        shape = tuple(get_tensor(gm, names[0]).shape)
        red = 0 if kind in ("matmul", "conv_transpose") else 1
        out[names[0]] = WeightInfo(names[0], kind, shape, red, nodes, macs, names[1:])
    return out


def _use_macs(kind: str, wshape: tuple[int, ...], node: fx.Node) -> int:
    outv = node.meta.get("val")
    if kind == "conv_transpose":
        inv = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        return _numel(inv) * int(math.prod(wshape[1:]))
    if kind == "conv":
        return _numel(outv) * int(math.prod(wshape[1:]))
    if kind == "linear":
        return _numel(outv) * int(wshape[1])
    return _numel(outv) * int(wshape[0])  # matmul: out (..., N) from (..., K) @ (K, N)


# ----------------------------------------------------------------------------------------------- patterns
def nm_mask(scores: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every run of ``m`` consecutive positions along ``dim`` (bool mask).

    For a conv weight ``(O, C_in, kh, kw)`` with ``dim=1`` the groups run over ``C_in`` for each ``(o, kh, kw)``,
    the layout TensorRT's sparse tensor cores require. ``scores.shape[dim]`` must be divisible by ``m``.
    """
    s = scores.movedim(dim, -1)
    shp = s.shape
    if shp[-1] % m:
        raise InputError(f"dim {dim} has {shp[-1]} positions, not a multiple of m={m}", fix="skip this weight")
    g = s.reshape(*shp[:-1], shp[-1] // m, m)
    idx = g.topk(n, dim=-1).indices
    keep = torch.zeros(g.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)
    return keep.reshape(shp).movedim(-1, dim).contiguous()


def check_nm(t: torch.Tensor, n: int = 2, m: int = 4, dim: int = 1) -> bool:
    """True when every run of ``m`` consecutive positions along ``dim`` has at most ``n`` nonzeros."""
    s = t.detach().movedim(dim, -1)
    if s.shape[-1] % m:
        return False
    g = (s != 0).reshape(*s.shape[:-1], s.shape[-1] // m, m).sum(-1)
    return bool((g <= n).all())


def block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def block_scores(t: torch.Tensor, block: tuple[int, int], reduce: str = "mean") -> torch.Tensor:
    """Per-tile mean (or sum) of a 2-D tensor over ``block`` tiles; edge tiles are averaged over their real size."""
    r, c = block
    nr, nc = block_grid(tuple(t.shape), block)
    pad = torch.zeros(nr * r, nc * c, dtype=t.dtype, device=t.device)
    pad[: t.shape[0], : t.shape[1]] = t
    s = pad.reshape(nr, r, nc, c).sum((1, 3))
    if reduce == "sum":
        return s
    ones = torch.zeros(nr * r, nc * c, dtype=t.dtype, device=t.device)
    ones[: t.shape[0], : t.shape[1]] = 1
    return s / ones.reshape(nr, r, nc, c).sum((1, 3))


def expand_blocks(bmask: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Tile-level mask -> element mask of ``shape`` (edge tiles cropped)."""
    full = bmask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[: shape[0], : shape[1]].contiguous()


def is_block_pattern(mask: torch.Tensor, block: tuple[int, int]) -> bool:
    """True when every tile of ``mask`` is all-True or all-False."""
    nr, nc = block_grid(tuple(mask.shape), block)
    s = block_scores(mask.float(), block, reduce="mean")
    return bool(((s == 0) | (s == 1)).all())


# ----------------------------------------------------------------------------------------------- hard masks
class HardMask(nn.Module):
    """Parametrization ``w -> w * mask``. The mask is a (persistent, bool) buffer, so it is in ``state_dict``."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


def enforce_masks(module: nn.Module, masks: dict[str, torch.Tensor] | Any) -> nn.Module:
    """Register a :class:`HardMask` parametrization for every ``{param name: bool mask}`` on ``module`` (in place).

    ``module`` is a compiled GraphModule (``Compiled.module``) or any module with those qualified names; ``masks``
    may also be a :class:`~fxprune.compile.Compiled` or :class:`~fxprune.program.Program` (their ``weight_masks``).
    After this, training can not revive masked weights: the forward always uses ``original * mask`` and the
    gradient of a masked position is exactly zero. Use :func:`bake` before ONNX export. Returns ``module``.
    """
    if hasattr(masks, "program"):
        masks = masks.program.weight_masks
    elif hasattr(masks, "weight_masks"):
        masks = masks.weight_masks
    if not isinstance(masks, dict):
        raise InputError(f"masks must be a dict of parameter name -> bool tensor, got {type(masks).__name__}",
                         fix="pass compiled.program.weight_masks")
    for name, mask in masks.items():
        try:
            mod, attr = owner(module, name)
        except AttributeError as e:
            raise InputError(f"module has no parameter {name!r}", fix="enforce masks on the module they were "
                             "computed for (the compiled module keeps qualified names)") from e
        if parametrize.is_parametrized(mod, attr):
            for p in mod.parametrizations[attr]:
                if isinstance(p, HardMask):
                    p.mask &= mask.to(p.mask.device, torch.bool)
                    break
            else:
                parametrize.register_parametrization(mod, attr, HardMask(mask))
            continue
        w = getattr(mod, attr)
        if tuple(w.shape) != tuple(mask.shape):
            raise InputError(f"mask for {name} has shape {tuple(mask.shape)}, parameter has {tuple(w.shape)}",
                             fix="masks must come from the same (shrunk) module")
        with torch.no_grad():
            w.mul_(mask.to(w.dtype))  # zero the stored value too, so original and effective weight agree
        parametrize.register_parametrization(mod, attr, HardMask(mask))
    return module


def current_masks(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{param name: mask}`` of every :class:`HardMask` on ``module``."""
    out = {}
    for mname, mod in module.named_modules():
        if not parametrize.is_parametrized(mod):
            continue
        for attr, plist in mod.parametrizations.items():
            for p in plist:
                if isinstance(p, HardMask):
                    out[f"{mname}.{attr}" if mname else attr] = p.mask.clone()
    return out


def bake(module: nn.Module) -> nn.Module:
    """Remove every :class:`HardMask` parametrization, leaving ``weight = original * mask`` as a plain parameter
    (exact zeros in the pattern): what ONNX export and ``torch.export`` should see. In place; returns ``module``."""
    for _, mod in list(module.named_modules()):
        if not parametrize.is_parametrized(mod):
            continue
        for attr in list(mod.parametrizations.keys()):
            if any(isinstance(p, HardMask) for p in mod.parametrizations[attr]):
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)
    return module


_PARAM_KEY = ".parametrizations."


def masks_in_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HardMask buffers of a state dict saved from an :func:`enforce_masks`-ed module, by parameter name."""
    out = {}
    for k, v in state.items():
        if _PARAM_KEY in k and k.endswith(".mask"):
            prefix, rest = k.split(_PARAM_KEY, 1)
            attr = rest.split(".", 1)[0]
            out[f"{prefix}.{attr}"] = v.to(torch.bool)
        elif k.startswith("parametrizations.") and k.endswith(".mask"):
            out[k.split(".")[1]] = v.to(torch.bool)
    return out


def load_masked_state_dict(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Load a state dict saved from an :func:`enforce_masks`-ed module into a fresh copy of the same (unmasked)
    module: the masks are re-registered first, then the values are loaded. Returns ``module``."""
    masks = masks_in_state_dict(state)
    todo = {k: v for k, v in masks.items() if k not in current_masks(module)}
    enforce_masks(module, todo)
    module.load_state_dict(state, strict=strict)
    return module


# ----------------------------------------------------------------------------------------------- ONNX check
@dataclass
class NMReport:
    ok: bool
    n: int
    m: int
    layers: list[dict[str, Any]]

    @property
    def sparse_layers(self) -> list[str]:
        return [r["initializer"] for r in self.layers if r["ok"]]

    def __str__(self) -> str:
        k = len(self.sparse_layers)
        return f"{self.n}:{self.m} layout {'ok' if self.ok else 'violated'}: {k}/{len(self.layers)} weights sparse"


def check_nm_onnx(model: Any, n: int = 2, m: int = 4, expect: Iterable[str] | None = None) -> NMReport:
    """Check the N:M layout of the weight initializers of an ONNX model (path or ``onnx.ModelProto``).

    Conv ``W (O, C_in/g, k...)``: groups along ``C_in`` for each ``(o, k...)``; Gemm ``B``: along K (dim 1 with
    ``transB=1``, else dim 0); MatMul with an initializer as second input ``(K, N)``: along K. Every weight whose
    reduction size is a multiple of ``m`` is listed with ``ok`` (at most ``n`` nonzeros in every group). ``ok`` of
    the report: every weight listed in ``expect`` (initializer names; default: all listed weights that have any
    zero) satisfies the pattern, and at least one does.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(model) if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else model
    inits = {i.name: i for i in proto.graph.initializer}
    rows: list[dict[str, Any]] = []
    for node in proto.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            name, dim = node.input[1], 1
        elif node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            name, dim = node.input[1], 1 if trans_b else 0
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            name, dim = node.input[1], 0
        else:
            continue
        w = numpy_helper.to_array(inits[name])
        if w.ndim < 2 or w.shape[dim] % m:
            rows.append({"initializer": name, "op": node.op_type, "node": node.name, "ok": False,
                         "reason": f"reduction dim {w.shape[dim] if w.ndim >= 2 else '?'} not a multiple of {m}",
                         "zeros": float((w == 0).mean()) if w.size else 0.0})
            continue
        s = np.moveaxis(w, dim, -1)
        g = (s != 0).reshape(*s.shape[:-1], s.shape[-1] // m, m).sum(-1)
        rows.append({"initializer": name, "op": node.op_type, "node": node.name, "ok": bool((g <= n).all()),
                     "zeros": float((w == 0).mean())})
    if expect is not None:
        want = set(expect)
        checked = [r for r in rows if r["initializer"] in want]
        ok = len(checked) == len(want) and all(r["ok"] for r in checked) and bool(checked)
    else:
        checked = [r for r in rows if r["zeros"] > 0]
        ok = bool(checked) and all(r["ok"] for r in checked)
    return NMReport(ok, n, m, rows)


# ----------------------------------------------------------------------------------------------- BSR linear
def _bsr(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse BSR support is in beta"
        return w.detach().to_sparse_bsr(block)


class BlockSparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored block-sparse (BSR) and multiplied by torch's sparse BSR kernel.

    Inference only: the weight is a buffer (not trainable). ``W.shape`` must be divisible by ``block``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, block: tuple[int, int]):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] % block[0] or weight.shape[1] % block[1]:
            raise InputError(f"weight {tuple(weight.shape)} is not divisible into {block} blocks",
                             fix="only layers whose dims are multiples of the block size can run as BSR")
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.block = tuple(block)
        self.register_buffer("weight_bsr", _bsr(weight, self.block))
        self.register_buffer("bias_col", None if bias is None else bias.detach().reshape(-1, 1).clone())

    @property
    def density(self) -> float:
        nb = (self.out_features // self.block[0]) * (self.in_features // self.block[1])
        return float(self.weight_bsr.values().shape[0]) / max(nb, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xt = x.reshape(-1, self.in_features).t().contiguous()
        if self.bias_col is None:
            y = torch.mm(self.weight_bsr, xt)
        else:
            y = torch.addmm(self.bias_col, self.weight_bsr, xt)
        return y.t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"density={self.density:.3f}")


def _time(fn, repeats: int, warmup: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def time_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, block: tuple[int, int],
                repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Best-of-``repeats`` milliseconds of the dense ``F.linear`` and of :class:`BlockSparseLinear` on ``x``."""
    w = weight.detach()
    b = None if bias is None else bias.detach()
    sparse = BlockSparseLinear(w, b, block)
    dense_ms = _time(lambda: torch.nn.functional.linear(x, w, b), repeats, warmup)
    bsr_ms = _time(lambda: sparse(x), repeats, warmup)
    return {"dense_ms": dense_ms, "bsr_ms": bsr_ms, "density": sparse.density}
