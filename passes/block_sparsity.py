"""BlockSparsity (LPViT, Xu et al., arXiv 2407.02068) and BlockSparseRewrite (BSR kernels where they are faster).

LPViT prunes whole ``B x B`` tiles of the linear weights of a ViT, with a per-layer amount chosen to meet a MACs
budget at the least estimated output distortion:

1. Label-free calibration: ``g`` = the gradient of ``mean(f(x)^2)`` w.r.t. each weight, averaged over the
   calibration batches (no labels needed).
2. Block score: ``mean |w * g|`` over each tile; a layer at amount ``a`` drops its ``round(a * #tiles)`` lowest.
3. Distortion curve per layer (second-order Taylor, Fisher approximation of the Hessian)::

       delta_l(a) = mean((dW * g)^2) + 0.5 * dW^T (F + 1e-7 I) dW,   F = mean_b g_b g_b^T
                  = mean((dW * g)^2) + 0.5 * (mean_b (g_b . dW)^2 + 1e-7 |dW|^2),   dW = -w on the dropped tiles,

   evaluated exactly for every tile count (cumulative sums in score order; no sampling needed). ``g_b`` are the
   gradients of calibration micro-batches of ``fisher_batch`` samples (the empirical Fisher). LPViT's code uses
   the rank-1 ``g g^T`` of the averaged gradient (``fisher_batch=0``); we default to the micro-batch Fisher,
   whose estimate tracked the measured output error better in our development runs on a tiny ViT (not a recorded
   benchmark; tests/test_block_sparsity asserts Spearman > 0.7 for ``fisher_batch=1``).
4. Hardware term: ``p_l(a)`` = surviving tiles x input activation size (normalised); the curve is
   ``delta_l + beta * p_l`` with ``beta`` = mean over layers of the max slope of ``delta_l`` / mean max slope of
   ``p_l`` (``hardware="auto"``), a given float, or 0 (off). Sign: ours *falls* as a layer is pruned (the paper's
   power model: cost of the surviving blocks), so the term rewards pruning layers with large activations. The
   authors' code (``tools/pruners.py``, ``gen_rd_curves_block_approx``) names the quantity
   ``num_survived_w_blocks`` but computes it as ``amount * numel / B^2``, which *grows* with the pruned fraction
   and so penalises pruning exactly those layers; we follow the paper's definition and flag the code's sign as the
   departure. ``hardware=0`` (no term) sidesteps the question.
5. Allocation: each layer takes the amount where its curve's slope equals ``lambda`` (the minimiser of
   ``curve(a) - lambda * a``, at most ``max_amount`` = 0.95); ``lambda`` is bisected until the MACs (or
   sparsity) target is met, then single tiles are added in order of least extra distortion until the target is
   met exactly (within one tile). ``allocation="uniform"`` gives every layer the same amount instead.

Only linear layers whose weight holds at least one full tile are pruned (others are listed as skipped); edge tiles
of weights not divisible by the block are cropped. The result is ``program.weight_masks`` (every tile all-0 or
all-1). MACs are counted as the dense MACs (:func:`fxprune.flops.count_macs`, as in the report) minus the MACs
of the removed weights.

Where the speed comes from: :class:`BlockSparseRewrite` replaces a linear op by
:class:`fxprune.passes.sparse_kernels.BlockSparseLinear` (torch BSR kernel) only when it measured faster than the dense
op on this machine, per layer. See ``benchmarks/block_sparse_speed.py`` for where that happens (on CPU, at high
block sparsity only).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx

from fxprune.errors import BudgetError, InputError
from fxprune.masking import apply_channel_masks, apply_weight_masks
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program, Stage
from fxprune.records import Record
from fxprune.utils import get_tensor, owner

from .sparse_kernels import BlockSparseLinear, WeightInfo, block_grid, block_scores, expand_blocks, time_linear
from .unstructured import targets, validate_ignore

DAMP = 1e-7


# ----------------------------------------------------------------------------------------------- calibration
def _split(args: tuple, kwargs: dict, size: int):
    """Split a batch into micro-batches of ``size`` samples along dim 0 of every tensor."""
    lead = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    n = int(lead.shape[0]) if lead is not None else 1
    if size <= 0 or size >= n:
        yield args, kwargs, n
        return
    for i in range(0, n, size):
        cut = (lambda t: t[i:i + size] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t)
        yield tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}, min(size, n - i)


def _batches(loader: Any, limit: int):
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        if isinstance(batch, torch.Tensor):
            yield (batch,), {}
        elif isinstance(batch, dict):
            yield (), batch
        elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            yield (batch[0],), {}
        elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (list, tuple)):
            yield tuple(batch[0]), {}
        else:
            raise InputError(f"calibration batches must be tensors, (x, y) tuples or dicts of kwargs, got "
                             f"{type(batch).__name__}", fix="pass fxprune.data.loader(x, y) or a DataLoader")


def _float_leaves(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


@dataclass
class Calibration:
    """Label-free calibration: the average gradient ``g`` of ``mean(f(x)^2)`` per weight, and for the Fisher term
    the per-tile sums of ``w * g_b`` of every micro-batch gradient ``g_b`` (``(B, tiles)`` per weight)."""

    grads: dict[str, torch.Tensor]
    tile_wg: dict[str, torch.Tensor]
    samples: int


def calibrate(module: torch.nn.Module, names: list[str], loader: Any, block: tuple[int, int] | None, batches: int = 4,
              fisher_batch: int = 4, static_batch: int | None = None) -> Calibration:
    """Run ``batches`` calibration batches split into micro-batches of ``fisher_batch`` samples (0: whole batch),
    with ``torch.autograd.grad`` (no ``.grad`` of the module is touched). ``static_batch``: the module was traced
    for exactly this batch size, so micro-batches have that size (a smaller remainder is dropped)."""
    if static_batch is not None:
        fisher_batch = static_batch
    params = [get_tensor(module, n) for n in names]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    tiles: list[list[torch.Tensor]] = [[] for _ in params]
    weights = [p.detach().float() for p in params]
    samples = 0
    try:
        for args, kwargs in _batches(loader, batches):
            for a, kw, n in _split(args, kwargs, fisher_batch):
                if static_batch is not None and n != static_batch:
                    continue
                with torch.enable_grad():
                    outs = _float_leaves(module(*a, **kw))
                    if not outs:
                        raise InputError("the model has no floating-point output to calibrate on",
                                         fix="BlockSparsity needs a model with float outputs")
                    loss = sum(o.float().pow(2).mean() for o in outs)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                for i, g in enumerate(grads):
                    g = torch.zeros_like(total[i]) if g is None else g.float()
                    total[i].add_(g, alpha=n)
                    if block is not None:
                        wg = (weights[i] * g).reshape(weights[i].shape[0], -1)
                        tiles[i].append(block_scores(wg, block, "sum").reshape(-1).double())
                samples += n
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    if samples == 0:
        raise InputError("the calibration loader yielded no usable batch" +
                         (f" (the model was traced for batch size {static_batch})" if static_batch else ""),
                         fix="pass a non-empty loader" + (f" with batches of (a multiple of) {static_batch} samples"
                                                          if static_batch else ""))
    return Calibration({nm: t / samples for nm, t in zip(names, total)},
                       {nm: torch.stack(t) for nm, t in zip(names, tiles) if t}, samples)


def calibration_gradients(module: torch.nn.Module, names: list[str], loader: Any, batches: int = 4
                          ) -> dict[str, torch.Tensor]:
    """The average label-free calibration gradient ``d mean(f(x)^2) / d w`` of each weight."""
    return calibrate(module, names, loader, None, batches, 0).grads


# ----------------------------------------------------------------------------------------------- curves
@dataclass
class LayerCurve:
    """Distortion curve of one layer over the number ``k`` of dropped tiles (``k = 0 .. kmax``)."""

    name: str
    shape: tuple[int, int]
    grid: tuple[int, int]  # tiles per (row, col)
    order: np.ndarray  # tile indices (row-major in the grid) from least to most important
    delta: np.ndarray  # (kmax + 1,) estimated distortion after dropping the first k tiles
    pruned: np.ndarray  # (kmax + 1,) weight elements dropped
    macs: int  # dense MACs of the layer
    act: float  # input activation elements (hardware term)
    power: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (kmax + 1,) normalised hardware term
    curve: np.ndarray = field(default_factory=lambda: np.zeros(0))  # delta + beta * power

    @property
    def n_tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def kmax(self) -> int:
        return len(self.delta) - 1

    def amount(self, k: int) -> float:
        return k / self.n_tiles

    def mask(self, k: int, block: tuple[int, int]) -> torch.Tensor:
        b = torch.ones(self.n_tiles, dtype=torch.bool)
        b[torch.from_numpy(self.order[:k].copy())] = False
        return expand_blocks(b.reshape(self.grid), block, self.shape)


def layer_curve(name: str, w: torch.Tensor, g: torch.Tensor, block: tuple[int, int], max_amount: float,
                macs: int = 0, act: float = 0.0, tile_wg: torch.Tensor | None = None) -> LayerCurve:
    """Block scores ``mean|w*g|`` and the exact second-order distortion for every number of dropped tiles.

    ``tile_wg``: ``(B, tiles)`` per-tile sums of ``w * g_b`` for micro-batch gradients ``g_b``; the Fisher term is
    then ``0.5 mean_b (g_b . dW)^2`` (the empirical Fisher). Without it, the rank-1 ``(g . dW)^2`` of the averaged
    gradient (LPViT's code) is used.
    """
    w = w.detach().float()
    g = g.detach().float()
    wg = w * g
    score = block_scores(wg.abs(), block, "mean").reshape(-1).double()
    grid = block_grid(tuple(w.shape), block)
    s1 = block_scores(wg.pow(2), block, "sum").reshape(-1).double()  # sum (w g)^2 per tile
    s3 = block_scores(w.pow(2), block, "sum").reshape(-1).double()  # sum w^2 per tile
    size = block_scores(torch.ones_like(w), block, "sum").reshape(-1).double()
    s2 = (block_scores(wg, block, "sum").reshape(1, -1).double() if tile_wg is None else tile_wg.double())
    order = np.lexsort((np.arange(score.numel()), score.numpy()))  # ascending score, ties by index
    kmax = int(math.floor(max_amount * score.numel() + 1e-9))
    o = torch.from_numpy(order[:kmax].copy())

    def cum(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros(*v.shape[:-1], 1, dtype=torch.float64), v[..., o].cumsum(-1)], -1)

    # dW = -w on the dropped tiles: mean((dW g)^2) + 0.5 (mean_b (g_b . dW)^2 + damp |dW|^2)
    delta = cum(s1) / w.numel() + 0.5 * (cum(s2).pow(2).mean(0) + DAMP * cum(s3))
    return LayerCurve(name, tuple(w.shape), grid, order, delta.numpy(), cum(size).numpy(), int(macs), float(act))


def _max_slope(y: np.ndarray, n_tiles: int) -> float:
    if len(y) < 2:
        return 0.0
    return float(np.abs(np.diff(y)).max() * n_tiles)


def add_hardware_term(curves: list[LayerCurve], beta: Any) -> float:
    """Set ``curve = delta + beta * power`` on every layer; returns the beta used."""
    big = max((c.act * c.n_tiles for c in curves), default=1.0) or 1.0
    for c in curves:
        k = np.arange(c.kmax + 1)
        c.power = (c.n_tiles - k) * c.act / big  # surviving tiles x input activation size
    if beta == "auto":
        d = np.mean([_max_slope(c.delta, c.n_tiles) for c in curves]) if curves else 0.0
        p = np.mean([_max_slope(c.power, c.n_tiles) for c in curves]) if curves else 0.0
        beta = float(d / p) if p > 0 else 0.0
    beta = float(beta or 0.0)
    for c in curves:
        c.curve = c.delta + beta * c.power
    return beta


def _alloc_at(curves: list[LayerCurve], lam: float) -> list[int]:
    out = []
    for c in curves:
        a = np.arange(c.kmax + 1) / c.n_tiles
        out.append(int(np.argmin(c.curve - lam * a)))  # first minimiser: fewest tiles on ties
    return out


# ----------------------------------------------------------------------------------------------- the pass
@register_pass
class BlockSparsity(Pass):
    """LPViT block pruning of linear weights to a MACs budget (or a weight sparsity).

    ``block``: tile ``(rows, cols)`` of the ``(out, in)`` weight (an int means square). ``target_macs``: the MACs
    budget as a fraction of the dense model's MACs (< 1) or an absolute count; ``sparsity``: instead, the
    fraction of the prunable weights removed. ``allocation``: ``"lpvit"`` (distortion-curve slope matching) or
    ``"uniform"``. ``calib``: calibration loader (default: ``compile(data=...)``); ``calib_batches`` batches are
    used, split into micro-batches of ``fisher_batch`` samples for the empirical Fisher (0: one rank-1 term from
    the averaged gradient, as in LPViT's code). ``hardware``: ``"auto"``, a float beta, or 0 to drop the hardware
    term. ``max_amount``: cap per layer.
    ``include_conv``: also tile conv weights, viewed as ``(C_out, C_in * k_h * k_w)`` matrices (as LPViT's code
    does). ``ignore``: module names / modules left dense.
    """

    name = "block_sparsity"

    def __init__(self, block: Any = (32, 32), *, target_macs: float | None = None, sparsity: float | None = None,
                 allocation: str = "lpvit", calib: Any = None, calib_batches: int = 4, fisher_batch: int = 4,
                 hardware: Any = "auto", max_amount: float = 0.95, include_conv: bool = False,
                 ignore: Iterable[Any] = ()):
        if isinstance(block, int) and not isinstance(block, bool):
            block = (block, block)
        if not (isinstance(block, (tuple, list)) and len(block) == 2 and
                all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
            raise InputError(f"block must be an int or a pair of positive ints, got {block!r}",
                             fix="e.g. block=(32, 32) for ViT-B, (16, 16) for ViT-S")
        if (target_macs is None) == (sparsity is None):
            raise InputError("give exactly one of target_macs= or sparsity=",
                             fix="e.g. BlockSparsity(target_macs=0.5) or BlockSparsity(sparsity=0.7)")
        if target_macs is not None and (not isinstance(target_macs, (int, float)) or isinstance(target_macs, bool)
                                        or target_macs <= 0):
            raise InputError(f"target_macs must be > 0, got {target_macs!r}",
                             fix="a fraction of the dense MACs (e.g. 0.5) or an absolute count")
        if sparsity is not None and (not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool)
                                     or not 0.0 < sparsity < 1.0):
            raise InputError(f"sparsity must be in (0, 1), got {sparsity!r}", fix="e.g. sparsity=0.7")
        if allocation not in ("lpvit", "uniform"):
            raise InputError(f"allocation must be 'lpvit' or 'uniform', got {allocation!r}", fix="use 'lpvit'")
        if not (isinstance(hardware, (int, float)) and not isinstance(hardware, bool) and hardware >= 0) \
                and hardware != "auto":
            raise InputError(f"hardware must be 'auto' or a float >= 0, got {hardware!r}",
                             fix="'auto' sets beta from the curves' slopes; 0 turns the term off")
        if not isinstance(max_amount, (int, float)) or not 0.0 < max_amount < 1.0:
            raise InputError(f"max_amount must be in (0, 1), got {max_amount!r}", fix="e.g. 0.95")
        if not isinstance(calib_batches, int) or calib_batches < 1:
            raise InputError(f"calib_batches must be a positive int, got {calib_batches!r}", fix="e.g. 4")
        if not isinstance(fisher_batch, int) or isinstance(fisher_batch, bool) or fisher_batch < 0:
            raise InputError(f"fisher_batch must be an int >= 0, got {fisher_batch!r}",
                             fix="samples per Fisher micro-batch (1: per-sample; 0: whole batches, rank-1)")
        self.block = (int(block[0]), int(block[1]))
        self.target_macs = target_macs
        self.sparsity = sparsity
        self.allocation = allocation
        self.calib = calib
        self.calib_batches = calib_batches
        self.fisher_batch = fisher_batch
        self.hardware = hardware
        self.max_amount = float(max_amount)
        self.include_conv = bool(include_conv)
        self.ignore = validate_ignore(ignore)

    def options(self) -> dict[str, Any]:
        d = super().options()
        d["calib"] = None if self.calib is None else type(self.calib).__name__
        return d

    # ------------------------------------------------------------------ layers and curves
    def layers(self, program: Program) -> tuple[dict[str, WeightInfo], dict[str, str]]:
        chosen, skipped = {}, {}
        for name, info in targets(program, self.ignore).items():
            rows, cols = info.shape[0], int(math.prod(info.shape[1:]))
            if info.kind != "linear" and not (self.include_conv and info.kind == "conv"):
                skipped[name] = f"{info.kind} weight (LPViT prunes linear layers; include_conv=True adds convs)"
            elif rows < self.block[0] or cols < self.block[1]:
                skipped[name] = f"weight {info.shape} smaller than one {self.block} tile"
            else:
                chosen[name] = info
        return chosen, skipped

    def curves(self, program: Program, ctx: PassContext) -> tuple[list[LayerCurve], dict[str, str], float]:
        """Per-layer distortion curves (with the hardware term); also used by tests and benchmarks."""
        infos, skipped = self.layers(program)
        if not infos:
            raise InputError("no linear layer holds a full tile", fix=f"use a smaller block than {self.block}")
        loader = self.calib if self.calib is not None else ctx.data
        if loader is None:
            raise InputError("BlockSparsity needs calibration data (label-free: only inputs are used)",
                             fix="pass BlockSparsity(calib=loader) or fxprune.compile(..., data=loader)")
        for name in infos:
            if get_tensor(program.gm, name).is_meta:
                raise InputError(f"{name} is on the meta device", fix="load real weights before BlockSparsity")
        static = None
        if not program.gm.meta.get("fxprune_dynamic_batch", False):
            lead = next((t for t in program.flat_inputs() if isinstance(t, torch.Tensor) and t.dim() > 0), None)
            static = int(lead.shape[0]) if lead is not None else None
        cal = calibrate(program.gm, list(infos), loader, self.block, self.calib_batches, self.fisher_batch, static)
        nodes = {n.name: n for n in program.gm.graph.nodes}
        curves = []
        for name, info in infos.items():
            act = 0.0
            for nn_ in info.nodes:
                x = nodes[nn_].args[0]
                v = x.meta.get("val") if isinstance(x, fx.Node) else None
                if isinstance(v, torch.Tensor):
                    act += float(math.prod(int(s) if not isinstance(s, torch.SymInt) else (s.node.hint or 2)
                                           for s in v.shape))
            w = get_tensor(program.gm, name)
            curves.append(layer_curve(name, w.reshape(w.shape[0], -1), cal.grads[name].reshape(w.shape[0], -1),
                                      self.block, self.max_amount, info.macs, act, cal.tile_wg[name]))
        beta = add_hardware_term(curves, self.hardware if self.allocation == "lpvit" else 0.0)
        return curves, skipped, beta

    # ------------------------------------------------------------------ allocation
    def allocate(self, curves: list[LayerCurve], cost: np.ndarray, budget: float) -> list[int]:
        """Tiles dropped per layer so that ``sum(cost_l * pruned_l(k_l))`` >= ``budget`` (the amount to remove)."""

        def removed(ks: list[int]) -> float:
            return float(sum(cost[i] * c.pruned[k] for i, (c, k) in enumerate(zip(curves, ks))))

        kmax = [c.kmax for c in curves]
        if removed(kmax) + 1e-9 < budget:
            raise BudgetError(f"the target needs {budget:.4g} removed but at most {removed(kmax):.4g} can be "
                              f"(max_amount={self.max_amount} of the tiles of {len(curves)} linear layers)",
                              fix="raise target_macs / lower sparsity, raise max_amount, or use a smaller block")
        if budget <= 0:
            return [0] * len(curves)
        if self.allocation == "uniform":
            lo, hi = 0.0, self.max_amount
            for _ in range(60):
                mid = (lo + hi) / 2
                ks = [min(c.kmax, int(math.floor(mid * c.n_tiles + 1e-9))) for c in curves]
                if removed(ks) >= budget:
                    hi = mid
                else:
                    lo = mid
            lo_ks = [min(c.kmax, int(math.floor(lo * c.n_tiles + 1e-9))) for c in curves]
        else:
            slopes = [_max_slope(c.curve, c.n_tiles) for c in curves]
            big = max(slopes + [1.0]) * 4 + 1.0
            lo, hi = -big, big
            for _ in range(100):
                mid = (lo + hi) / 2
                if removed(_alloc_at(curves, mid)) >= budget:
                    hi = mid
                else:
                    lo = mid
            lo_ks = _alloc_at(curves, lo)  # the last allocation still short of the budget
        return self._fill(curves, cost, lo_ks, budget, removed)

    @staticmethod
    def _fill(curves: list[LayerCurve], cost: np.ndarray, ks: list[int], budget: float, removed: Any) -> list[int]:
        """Add single tiles (least curve increase per removed cost first) until ``budget`` is removed."""
        ks = list(ks)
        have = removed(ks)
        heap: list[tuple[float, int]] = []

        def push(i: int) -> None:
            c = curves[i]
            k = ks[i]
            if k < c.kmax:
                gain = cost[i] * (c.pruned[k + 1] - c.pruned[k])
                heapq.heappush(heap, (float(c.curve[k + 1] - c.curve[k]) / max(gain, 1e-30), i))

        for i in range(len(curves)):
            push(i)
        while have < budget and heap:
            _, i = heapq.heappop(heap)
            c = curves[i]
            have += cost[i] * (c.pruned[ks[i] + 1] - c.pruned[ks[i]])
            ks[i] += 1
            push(i)
        return ks

    # ------------------------------------------------------------------ run
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from fxprune.flops import count_macs

        curves, skipped, beta = self.curves(program, ctx)
        numel = np.array([c.shape[0] * c.shape[1] for c in curves], dtype=np.float64)
        dense_total = 0.0
        if self.target_macs is not None:  # the report's count (torch's FLOP counter), minus removed weights' MACs
            dense_total = float(count_macs(program.gm, program.args, program.kwargs))
            target = self.target_macs * dense_total if self.target_macs < 1 else float(self.target_macs)
            cost = np.array([c.macs for c in curves], dtype=np.float64) / numel  # MACs per weight element
            budget = dense_total - target
        else:
            cost = np.ones(len(curves))
            budget = self.sparsity * float(numel.sum())
            target = float(numel.sum()) - budget
        ks = self.allocate(curves, cost, budget)
        per_layer = {}
        for c, k in zip(curves, ks):
            m = c.mask(k, self.block).reshape(get_tensor(program.gm, c.name).shape)
            old = program.weight_masks.get(c.name)
            program.weight_masks[c.name] = m if old is None else (m & old.bool())
            per_layer[c.name] = {"amount": round(c.amount(k), 4), "tiles": c.n_tiles, "dropped": k,
                                 "distortion": float(c.delta[k])}
        removed = float(sum(cost[i] * c.pruned[k] for i, (c, k) in enumerate(zip(curves, ks))))
        stats: dict[str, Any] = {"block": list(self.block), "allocation": self.allocation, "beta": beta,
                                 "layers": per_layer, "skipped": skipped}
        if self.target_macs is not None:
            stats.update({"macs_dense": int(dense_total), "macs_target": int(target),
                          "macs_after": int(round(dense_total - removed)),
                          "macs_ratio": round((dense_total - removed) / dense_total, 5)})
        else:
            stats.update({"sparsity": round(removed / float(numel.sum()), 5)})
        return PassResult(program, changed=removed > 0, stats=stats,
                          record=BlockSparsityRecord(block=tuple(self.block)))


@dataclass(frozen=True)
class BlockSparsityRecord(Record):
    """BlockSparsity's decision: the tile shape (read by a later BlockSparseRewrite without ``block=``)."""

    block: tuple[int, int]


# ----------------------------------------------------------------------------------------------- BSR rewrite
@register_pass
class BlockSparseRewrite(Pass):
    """Lower block-sparse linear layers to :class:`fxprune.passes.sparse_kernels.BlockSparseLinear` where faster.

    For every ``aten.linear`` whose weight has all-zero ``block`` tiles (default block: the one of the preceding
    ``BlockSparsity``) and whose dims divide into tiles, the dense op and the BSR kernel are timed on a random
    input of the example shape (best of ``repeats``); the BSR module replaces the op only when it is at least
    ``min_speedup`` times faster (``force="bsr"`` / ``"dense"`` overrides the measurement). Run it last, after
    ``Shrink``: the result is an inference module (BSR weights are buffers, not trainable) that the analyzer and
    ONNX export do not handle.
    """

    name = "block_sparse_rewrite"
    modifies_weights = True
    changes_graph = True

    def __init__(self, block: Any = None, *, min_speedup: float = 1.05, repeats: int = 5, force: str | None = None):
        if isinstance(block, int) and not isinstance(block, bool):
            block = (block, block)
        if block is not None and not (isinstance(block, (tuple, list)) and len(block) == 2
                                      and all(isinstance(b, int) and b >= 1 for b in block)):
            raise InputError(f"block must be None, an int or a pair of ints, got {block!r}", fix="e.g. (32, 32)")
        if force not in (None, "bsr", "dense"):
            raise InputError(f"force must be None, 'bsr' or 'dense', got {force!r}", fix="leave it None to measure")
        if not isinstance(repeats, int) or repeats < 1:
            raise InputError(f"repeats must be a positive int, got {repeats!r}", fix="e.g. repeats=5")
        self.block = None if block is None else (int(block[0]), int(block[1]))
        self.min_speedup = float(min_speedup)
        self.repeats = repeats
        self.force = force

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        recorded = program.records_of(BlockSparsityRecord)
        block = self.block or (recorded[-1].block if recorded else None)
        if block is None:
            raise InputError("no block size: give BlockSparseRewrite(block=...) or run BlockSparsity before it",
                             fix="e.g. BlockSparseRewrite(block=(32, 32))")
        block = tuple(block)
        if program.masks and any(not m.all() for m in program.masks.values()):
            raise InputError("channel masks are still pending", fix="run Shrink() before BlockSparseRewrite")
        gm = program.gm
        if program.stage is Stage.SELECTED:  # masks chosen but not yet applied (MASKED/SHRUNK: already in gm)
            if program.masks:
                apply_channel_masks(gm, program.groups, program.leaf_keep())
            apply_weight_masks(gm, program.weight_masks)
        gen = ctx.generator("block-sparse-rewrite")
        layers: dict[str, Any] = {}
        count = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
                continue
            wnode = node.args[1]
            bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if not (isinstance(wnode, fx.Node) and wnode.op == "get_attr"):
                continue
            w = get_tensor(gm, wnode.target)
            if w.dim() != 2 or w.shape[0] % block[0] or w.shape[1] % block[1]:
                continue
            if bool((block_scores((w != 0).float(), block, "sum") > 0).all()):
                continue  # no all-zero tile: nothing for BSR to skip
            b = get_tensor(gm, bnode.target) if isinstance(bnode, fx.Node) and bnode.op == "get_attr" else None
            if bnode is not None and b is None:
                continue
            xv = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            if not isinstance(xv, torch.Tensor):
                continue
            shape = [int(s) if not isinstance(s, torch.SymInt) else int(s.node.hint or 2) for s in xv.shape]
            x = torch.randn(shape, generator=gen, dtype=w.dtype)
            t = time_linear(w, b, x, block, repeats=self.repeats)
            use = self.force == "bsr" or (self.force is None and t["bsr_ms"] * self.min_speedup < t["dense_ms"])
            layers[wnode.target] = {k: round(v, 4) for k, v in t.items()} | {"bsr": bool(use)}
            if not use:
                continue
            mod_name = f"_bsr_{count}"
            count += 1
            gm.add_submodule(mod_name, BlockSparseLinear(w, b, block))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(mod_name, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            for an in (wnode, bnode):
                if isinstance(an, fx.Node) and not an.users:
                    gm.graph.erase_node(an)
                    if not any(n.op == "get_attr" and n.target == an.target for n in gm.graph.nodes):
                        mod, attr = owner(gm, an.target)
                        delattr(mod, attr)
            program.weight_masks.pop(wnode.target, None)
        gm.graph.lint()
        gm.recompile()
        program.masks = {}
        program.divisors = {}
        if program.stage is not Stage.SHRUNK:
            program.stage = Stage.MASKED
        return PassResult(program, changed=count > 0, stats={"block": list(block), "rewritten": count,
                                                             "layers": layers})
