"""LatencyPrune: choose per-group widths that meet a latency target measured on the target backend (HALP-style).

How it works (a selection pass: it writes keep-masks like ChannelPrune; Shrink removes the channels):

1. every conv2d / linear node is an op (:class:`~fxprune.passes.latency_table.OpSpec`) whose input and output
   widths are linear in the kept counts of the candidate groups (coupled groups, concat and product spaces
   included: ``width = const + sum(multiplicity * kept)``);
2. each candidate group may take a few *levels* (kept counts): multiples of ``step`` (measured by default: the
   channel granularity at which the backend's kernels get faster, :func:`probe_step`; and of the group's divisor)
   between the ``max_ratio`` floor and the full width, ``levels`` of them; each op's widths then take a small grid
   of values, and the :class:`~fxprune.passes.latency_table.LatencyTable` measures every grid point once per
   machine (cached on disk); off-grid widths (ops fed by several groups) are interpolated;
3. a greedy knapsack picks the widths: while the predicted latency is above the target, take the (group, level)
   step that loses the least importance per millisecond saved, looking ahead over all lower levels so that a level
   that is no faster on this hardware is skipped (this is where hardware-friendly widths come from); then add back
   the steps that fit below the target, most importance per millisecond first;
4. with ``measure=True`` (default) the dense and the selected (shrunk, not yet verified) programs are exported to
   ONNX and timed against each other in interleaved rounds; the end-to-end latency is modelled as
   a function of the table sum through the measured points (the dense one and every measured selection: a
   secant that brackets the target), and the selection is redone until the measured latency is within
   ``tolerance`` of the target (``calibrate`` rounds at most).

The importance is ChannelPrune's (``importance=``), normalised by each group's mean as in its global scope.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from fxprune.errors import BudgetError, InputError
from fxprune.groups import GroupSet
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program
from fxprune.records import SelectionRecord

from . import importance as imp
from .channel_prune import ChannelPrune, _checked_scores, _top_k, use_norm_mode
from .latency_table import BACKENDS, LatencyTable, OpSpec

__all__ = ["LatencyPrune", "LatencyModel", "Width", "LatOp", "extract_ops", "group_levels", "select_widths",
           "calibrate_selection", "probe_step"]

_CONV = {"aten.conv2d.default", "aten.convolution.default"}
_LINEAR = {"aten.linear.default"}


@dataclass
class Width:
    """A dim's width as a linear function of the candidate groups' kept counts: ``const + sum(m * kept[g])``."""

    const: float
    terms: dict[int, float] = field(default_factory=dict)  # group id -> positions per kept channel
    scale: int = 1  # a grouped conv's weight dim 1 is per group: width = scale * (...)

    def at(self, counts: dict[int, int]) -> float:
        return self.scale * (self.const + sum(m * counts[g] for g, m in self.terms.items()))


@dataclass
class LatOp:
    """One timed op: its spec, the widths of its input and output, and the grids the table measures."""

    node: str
    spec: OpSpec
    w_in: Width
    w_out: Width
    grid_in: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    grid_out: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def groups(self) -> set[int]:
        return set(self.w_in.terms) | set(self.w_out.terms)

    def points(self) -> list[tuple[OpSpec, int, int]]:
        if self.spec.depthwise:
            return [(self.spec, int(w), int(w)) for w in self.grid_out]
        return [(self.spec, int(a), int(b)) for a in self.grid_in for b in self.grid_out]

    def cost(self, table: LatencyTable, counts: dict[int, int]) -> float:
        wo = self.w_out.at(counts)
        if self.spec.depthwise:
            g = self.grid_out
            return table.predict(self.spec, wo, wo, g, g) if len(g) == 1 else _interp1(table, self.spec, g, wo)
        return table.predict(self.spec, self.w_in.at(counts), wo, self.grid_in, self.grid_out)


def _interp1(table: LatencyTable, spec: OpSpec, g: np.ndarray, w: float) -> float:
    w = min(max(w, float(g[0])), float(g[-1]))
    j = int(np.searchsorted(g, w))
    if g[j] == w:
        return table.lookup(spec, int(w), int(w))
    a, b = int(g[j - 1]), int(g[j])
    f = (w - a) / (b - a)
    return table.lookup(spec, a, a) * (1 - f) + table.lookup(spec, b, b) * f


# ---------------------------------------------------------------------------------------------------- op model
def _width(gs: GroupSet, space: int, cand: set[int], prior: dict[int, np.ndarray]) -> Width:
    t = gs.analysis.table
    w = Width(0.0)
    for leaf, idx in t.coords(space):
        g = gs.by_space(leaf)
        n = int((idx >= 0).sum())
        if g is not None and g.id in cand:
            w.terms[g.id] = w.terms.get(g.id, 0.0) + n / g.size
        else:
            m = prior.get(leaf)
            w.const += n if m is None else int(np.isin(idx[idx >= 0], np.nonzero(m)[0]).sum())
    return w


def extract_ops(program: Program, cand: set[int]) -> list[LatOp]:
    """The conv2d (not transposed) and linear nodes of ``program`` whose weight is a tracked parameter, with the
    widths of their input and output in terms of the groups ``cand``."""
    gs = program.groups
    an = gs.analysis
    prior = program.leaf_keep()
    ops: list[LatOp] = []
    for n in program.gm.graph.nodes:
        tgt = str(n.target)
        if n.op != "call_function" or tgt not in _CONV | _LINEAR:
            continue
        x, w = n.args[0], n.args[1]
        if getattr(w, "op", None) != "get_attr" or not isinstance(x.meta.get("val"), torch.Tensor):
            continue
        name = an.param_alias.get(w.target, w.target)
        if name not in an.param_spaces:
            continue
        xs = tuple(int(s) for s in x.meta["val"].shape)
        wshape = tuple(int(s) for s in program.param(name).shape)
        ps = an.param_spaces[name]
        has_bias = len(n.args) > 2 and n.args[2] is not None
        if tgt in _CONV:
            a = list(n.args) + [None] * 9
            if tgt == "aten.convolution.default":
                if a[6]:  # transposed
                    continue
                stride, pad, dil, groups = a[3], a[4], a[5], a[8]
            else:
                stride, pad, dil, groups = a[3] or [1, 1], a[4] or [0, 0], a[5] or [1, 1], a[6] or 1
            if len(xs) != 4 or isinstance(pad, str):
                continue
            groups = int(groups)
            dw = groups > 1 and wshape[1] == 1 and groups == xs[1] == wshape[0]
            spec = OpSpec("conv", xs[0], xs[2:], tuple(wshape[2:]), tuple(map(int, stride)), tuple(map(int, pad)),
                          tuple(map(int, dil)), 1 if dw else groups, dw, has_bias)
            w_out = _width(gs, ps[0], cand, prior)
            w_in = w_out if dw else _width(gs, ps[1], cand, prior)
            if not dw:
                w_in.scale = groups
        else:
            if len(xs) < 2:
                continue
            spec = OpSpec("linear", xs[0], xs[1:-1], bias=has_bias)
            w_out, w_in = _width(gs, ps[0], cand, prior), _width(gs, ps[1], cand, prior)
        ops.append(LatOp(n.name, spec, w_in, w_out))
    return ops


def group_levels(size: int, *, step: int, levels: int, max_ratio: float, divisor: int = 1,
                 top: int | None = None) -> list[int]:
    """Kept counts a group of ``size`` channels may take, descending, ``top`` (default ``size``) first: multiples
    of ``lcm(step, divisor)`` (of ``divisor`` alone for groups smaller than twice that) from the ``max_ratio``
    floor up, ``levels`` of them at most (evenly spread)."""
    top = size if top is None else top
    unit = math.lcm(step, divisor)
    if size < 2 * unit:
        unit = divisor
    floor = max(unit, size - int(math.floor(size * max_ratio + 1e-9)))
    floor = int(math.ceil(floor / unit)) * unit
    cands = [top] + [k for k in range((top - 1) // unit * unit, floor - 1, -unit) if 0 < k < top]
    if len(cands) <= levels:
        return cands
    idx = np.unique(np.round(np.linspace(0, len(cands) - 1, levels)).astype(int))
    return [cands[i] for i in idx]


def probe_step(ops: list[LatOp], table: LatencyTable, counts: dict[int, int],
               candidates: tuple[int, ...] = (8, 16, 32), share: float = 0.5) -> tuple[int, dict[str, Any]]:
    """The channel granularity at which this backend's kernels get faster, measured on the model's costliest
    op (most MACs among the non-depthwise convs and linears at the dense widths ``counts``): at its output width
    ``W`` rounded down to a multiple of 32 (as its input width too), the smallest ``s`` in ``candidates`` for which
    removing ``s`` channels saves at least ``share`` of the proportional latency (``1 - ((W - s) / W) ** 2``).
    A kernel that pads channels to blocks of 16 (ONNX Runtime's NCHWc convolutions on AVX-512: 56 channels cost
    what 64 do) gives 16; one that works on 8 gives 8. Returns ``(step, record)``; ``candidates[0]`` when no op
    is wide enough to probe (W < 64) or no candidate saves enough."""
    best = None
    for op in ops:
        if op.spec.depthwise or (op.spec.kind == "conv" and op.spec.groups != 1):
            continue
        wi, wo = op.w_in.at(counts), op.w_out.at(counts)
        size = float(np.prod(op.spec.spatial or (1,))) * float(np.prod(op.spec.kernel or (1,)))
        macs = wi * wo * size
        if best is None or macs > best[0]:
            best = (macs, op, wo)
    rec: dict[str, Any] = {"candidates": list(candidates)}
    if best is None or int(best[2]) // 32 * 32 < 64:
        rec["note"] = "no conv/linear op of 64 or more channels to probe"
        return candidates[0], rec
    _, op, wo = best
    w = int(wo) // 32 * 32
    pts = [(op.spec, w, w)] + [(op.spec, w - c, w - c) for c in candidates if w - c >= 8]
    table.ensure(pts)
    full = table.lookup(op.spec, w, w)
    rec.update(op=op.node, width=w, ms={str(w): round(full, 5)})
    for c in candidates:
        if w - c < 8:
            break
        t = table.lookup(op.spec, w - c, w - c)
        rec["ms"][str(w - c)] = round(t, 5)
        if full - t >= share * full * (1 - ((w - c) / w) ** 2):
            rec["step"] = c
            return c, rec
    rec["note"] = "no candidate step saved enough latency"
    return candidates[0], rec


def _dim_grid(w: Width, levels: dict[int, list[int]], n: int, multiple: int) -> np.ndarray:
    """The widths at which the table measures a dim: exact when one group drives it, else ``n`` even points."""
    full = w.at({g: levels[g][0] for g in w.terms})
    if not w.terms:
        return np.array([int(round(full))], dtype=np.int64)
    if len(w.terms) == 1:
        (g,) = w.terms
        vals = {int(round(w.at({g: k}))) for k in levels[g]}
    else:
        lo = w.at({g: levels[g][-1] for g in w.terms})
        vals = {int(round(v)) for v in np.linspace(lo, full, n)}
    vals = {max(multiple, int(math.ceil(v / multiple)) * multiple) for v in vals}
    return np.array(sorted(vals), dtype=np.int64)


class LatencyModel:
    """Predicted latency (table units, ms) of the ops at given kept counts, with per-group incremental deltas."""

    def __init__(self, ops: list[LatOp], table: LatencyTable, levels: dict[int, list[int]], grid: int):
        self.ops, self.table, self.levels = ops, table, levels
        for op in ops:
            mult = op.spec.groups if op.spec.kind == "conv" else 1
            op.grid_out = _dim_grid(op.w_out, levels, grid, mult)
            op.grid_in = op.grid_out if op.spec.depthwise else _dim_grid(op.w_in, levels, grid, mult)
        self.by_group: dict[int, list[int]] = {g: [] for g in levels}
        for i, op in enumerate(ops):
            for g in op.groups:
                self.by_group.setdefault(g, []).append(i)

    def points(self) -> list[tuple[OpSpec, int, int]]:
        return [p for op in self.ops for p in op.points()]

    def op_costs(self, counts: dict[int, int]) -> np.ndarray:
        return np.array([op.cost(self.table, counts) for op in self.ops], dtype=np.float64)

    def total(self, counts: dict[int, int]) -> float:
        return float(self.op_costs(counts).sum())

    def cost_of(self, idx: Iterable[int], counts: dict[int, int]) -> float:
        return sum(self.ops[i].cost(self.table, counts) for i in idx)


# ---------------------------------------------------------------------------------------------------- selection
def select_widths(model: LatencyModel, cum: dict[int, np.ndarray], target: float,
                  start: dict[int, int] | None = None) -> dict[int, int]:
    """Kept count per group with ``model.total(counts) <= target`` losing the least importance (greedy knapsack).

    ``cum[g][k]``: importance of group ``g``'s top ``k`` channels. Down phase: repeatedly apply the (group, lower
    level) move with the smallest importance lost per unit of latency saved (moves saving nothing are never taken);
    up phase: while some move to a higher level still fits under ``target``, apply the one with the most importance
    gained per unit of latency added; then (one group down, another up) swaps that fit and keep more importance,
    and the up phase again, until nothing changes. When no single move lowers the latency before the target is met
    (a measured table can make each group's next level alone no faster), the down phase jumps to the lowest levels
    and the up phase climbs back. Raises BudgetError when even the lowest levels miss ``target``."""
    levels = model.levels
    counts = dict(start) if start is not None else {g: lv[0] for g, lv in levels.items()}
    pos = {g: levels[g].index(counts[g]) for g in levels}
    total = model.total(counts)
    floor_counts = {g: lv[-1] for g, lv in levels.items()}
    if model.total(floor_counts) > target + 1e-12:
        raise BudgetError(f"the latency target ({target:.4g} table-ms) is below what the lowest widths reach "
                          f"({model.total(floor_counts):.4g}); frozen layers and unmodelled ops set the floor",
                          fix="raise target_latency, raise max_ratio, or unfreeze more layers")

    def moves(g: int, down: bool) -> list[tuple[float, int, float, float]]:
        idx = model.by_group.get(g, [])
        here = model.cost_of(idx, counts)
        out = []
        rng = range(pos[g] + 1, len(levels[g])) if down else range(pos[g] - 1, -1, -1)
        for j in rng:
            k = levels[g][j]
            trial = dict(counts)
            trial[g] = k
            dlat = here - model.cost_of(idx, trial)  # > 0: faster
            dimp = float(cum[g][counts[g]] - cum[g][k])  # > 0 going down
            out.append((j, k, dlat, dimp))
        return out

    cache: dict[int, list] = {}
    while total > target + 1e-12:
        best = None
        for g in levels:
            if g not in cache:
                cache[g] = moves(g, True)
            for j, k, dlat, dimp in cache[g]:
                if dlat <= 1e-12:
                    continue
                r = dimp / dlat
                if best is None or r < best[0] - 1e-15:
                    best = (r, g, j, k, dlat)
        if best is None:  # no single group's move helps (a measured table need not be monotone): the lowest
            counts.update(floor_counts)  # widths meet the target (checked above); the up phase restores from there
            pos.update({g: len(levels[g]) - 1 for g in levels})
            total = model.total(counts)
            break
        _, g, j, k, dlat = best
        counts[g], pos[g] = k, j
        total -= dlat
        _invalidate(cache, model, g)

    def up_phase(total: float) -> float:
        cache = {}
        while True:
            best = None
            for g in levels:
                if pos[g] == 0:
                    continue
                if g not in cache:
                    cache[g] = moves(g, False)
                for j, k, dlat, dimp in cache[g]:
                    add = -dlat
                    if total + add > target + 1e-12:
                        continue
                    gain = -dimp
                    r = gain / max(add, 1e-12)
                    if gain > 0 and (best is None or r > best[0]):
                        best = (r, g, j, k, add)
            if best is None:
                break
            _, g, j, k, add = best
            counts[g], pos[g] = k, j
            total += add
            _invalidate(cache, model, g)
        return total

    for _ in range(4):
        total = up_phase(total)
        before = dict(counts)
        total = _swap_phase(model, cum, target, counts, pos, moves, total)
        if counts == before:
            break
    else:
        up_phase(total)
    return counts


def _swap_phase(model: LatencyModel, cum: dict[int, np.ndarray], target: float, counts: dict[int, int],
                pos: dict[int, int], moves: Any, total: float, max_swaps: int | None = None) -> float:
    """Local search after the greedy: apply (one group down, another up) pairs that fit under ``target`` and keep
    more importance, best first (pair deltas are estimated as additive, then checked exactly). Updates
    ``counts``/``pos`` in place; returns the new total."""
    levels = model.levels
    cd: dict[int, list] = {}
    cu: dict[int, list] = {}
    for _ in range(max_swaps if max_swaps is not None else 2 * len(levels)):
        for g in levels:
            if g not in cd:
                cd[g], cu[g] = moves(g, True), moves(g, False)
        down = [(g, j, k, dl, di) for g in levels for j, k, dl, di in cd[g]]
        up = [(g, j, k, -dl, -di) for g in levels for j, k, dl, di in cu[g]]
        if not down or not up:
            break
        dg = np.array([d[0] for d in down])
        ug = np.array([u[0] for u in up])
        dlat = np.array([d[3] for d in down])
        dimp = np.array([d[4] for d in down])
        ulat = np.array([u[3] for u in up])
        uimp = np.array([u[4] for u in up])
        gain = uimp[None, :] - dimp[:, None]
        ok = (total - dlat[:, None] + ulat[None, :] <= target + 1e-12) & (dg[:, None] != ug[None, :]) & (gain > 1e-9)
        if not ok.any():
            break
        done = False
        for flat in np.argsort(-np.where(ok, gain, -np.inf), axis=None)[:16]:
            a, b = np.unravel_index(flat, ok.shape)
            if not ok[a, b]:
                break
            trial = {**counts, down[a][0]: down[a][2], up[b][0]: up[b][2]}
            t = model.total(trial)
            if t <= target + 1e-12:
                counts.update(trial)
                pos[down[a][0]], pos[up[b][0]] = down[a][1], up[b][1]
                total, done = t, True
                _invalidate(cd, model, down[a][0])
                _invalidate(cd, model, up[b][0])
                _invalidate(cu, model, down[a][0])
                _invalidate(cu, model, up[b][0])
                break
        if not done:
            break
    return total


def _invalidate(cache: dict[int, list], model: LatencyModel, g: int) -> None:
    touched = {h for i in model.by_group.get(g, []) for h in model.ops[i].groups} | {g}
    for h in touched:
        cache.pop(h, None)


# ---------------------------------------------------------------------------------------------------- the pass
@register_pass
class LatencyPrune(Pass):
    """Prune channels to meet a latency target measured on the target backend (per-op latency tables; see the
    module docstring of :mod:`fxprune.passes.latency_prune`). Latency is that of the example inputs' shape
    (compile with a batch-8 example to target batch 8).

    ``target_latency``: the target as a fraction of the dense model's latency (e.g. 0.5); or ``target_ms``:
    an absolute target in milliseconds (exactly one of the two). ``backend``: ``"onnxruntime"`` (CPU) or
    ``"torch.compile"`` (CPU: op tables from torch's own conv/matmul kernels, end-to-end calibration of
    ``torch.compile``'d dense and pruned modules). ``threads``: intra-op threads of the measurements.
    ``importance``, ``ignore``, ``max_ratio``, ``norms``: as in ChannelPrune (max_ratio: largest fraction of one
    group removed). ``step``: kept counts are multiples of it (and of the group's divisor); ``"auto"`` (default)
    measures it (:func:`probe_step`: 16 where the kernels pad channels to blocks of 16, else 8); ``levels``: how many
    widths per group are measured and considered; ``grid``: grid points per dim for ops fed by several groups.
    ``measure``: time the dense and selected models end to end and recalibrate (``calibrate`` selections at most;
    5 by default, what ResNet-50 at batch 8 needed) until the measured latency is within ``tolerance`` (relative)
    of the target; with ``strict`` a miss after
    the last round raises BudgetError instead of being reported only. ``confirm``: a selection that measures
    within ``tolerance`` is timed once more (fresh sessions) and judged by the mean of the two ratios, so one
    lucky measurement on a noisy machine does not end the loop. ``measure=False`` predicts from the table
    alone (latency proportional to the sum over ops). ``table``: a LatencyTable to use (e.g.
    ``LatencyTable.synthetic(fn)``); otherwise the cached one for this host/backend/version/threads
    (``cache_dir``, ``rebuild=True`` to measure it again; ``repeats``, ``max_spread``: rounds per point and the
    largest relative interquartile range accepted, else MeasurementError). ``repeats_e2e``: interleaved rounds
    of the end-to-end measurement. ``dense_onnx``: an ONNX file of the dense model at the example inputs'
    shape, already exported (skips the dense export; it must be the same model, which is not checked).
    """

    name = "latency_prune"
    requires = frozenset({"groups"})

    def __init__(self, target_latency: float | None = None, *, target_ms: float | None = None,
                 backend: str = "onnxruntime", threads: int = 2, importance: Any = "l2",
                 ignore: str | Iterable[Any] = (), max_ratio: float = 0.9, norms: str = "freeze", step: int | str = "auto",
                 levels: int = 8, grid: int = 6, measure: bool = True, calibrate: int = 5, tolerance: float = 0.05,
                 strict: bool = True, table: Any = None, cache_dir: str | None = None, rebuild: bool = False,
                 repeats: int = 7, max_spread: float = 0.5, repeats_e2e: int = 15, dense_onnx: str | None = None,
                 confirm: bool = True):
        if (target_latency is None) == (target_ms is None):
            raise InputError("give exactly one of target_latency= (fraction of dense) or target_ms=",
                             fix="e.g. LatencyPrune(target_latency=0.5)")
        if target_latency is not None and not (0 < target_latency < 1):
            raise InputError(f"target_latency must be in (0, 1), got {target_latency!r}",
                             fix="a fraction of the dense latency, e.g. 0.5; or target_ms= for milliseconds")
        if target_ms is not None and not target_ms > 0:
            raise InputError(f"target_ms must be > 0, got {target_ms!r}", fix="e.g. target_ms=10.0")
        if target_ms is not None and not measure:
            raise InputError("target_ms needs measure=True (the dense latency in ms is measured end to end)",
                             fix="use target_latency= with measure=False")
        if step != "auto" and not (isinstance(step, int) and step >= 1):
            raise InputError(f"step must be 'auto' or an int >= 1, got {step!r}",
                             fix="step='auto' measures the backend's channel granularity; or e.g. step=8")
        for nm, v, lo in (("levels", levels, 2), ("grid", grid, 2), ("calibrate", calibrate, 1),
                          ("repeats_e2e", repeats_e2e, 3)):
            if not (isinstance(v, int) and v >= lo):
                raise InputError(f"{nm} must be an int >= {lo}, got {v!r}", fix=f"e.g. {nm}={max(lo, 3)}")
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}",
                             fix="backend='onnxruntime' or backend='torch.compile' (TensorRT tables are not "
                                 "implemented)")
        if dense_onnx is not None and backend != "onnxruntime":
            raise InputError("dense_onnx is an ONNX file for backend='onnxruntime'",
                             fix=f"leave dense_onnx out with backend={backend!r}")
        if not isinstance(confirm, bool):
            raise InputError(f"confirm must be True or False, got {confirm!r}", fix="e.g. confirm=True")
        if not (0 < tolerance < 1):
            raise InputError(f"tolerance must be in (0, 1), got {tolerance!r}", fix="e.g. tolerance=0.05")
        if table is not None and not isinstance(table, LatencyTable):
            raise InputError(f"table must be a LatencyTable, got {type(table).__name__}",
                             fix="LatencyTable(backend, threads) or LatencyTable.synthetic(fn)")
        self._cp = ChannelPrune(ratio=0.0, importance=importance, ignore=ignore, max_ratio=max_ratio, norms=norms,
                                scope="global")
        self.target_latency, self.target_ms = target_latency, target_ms
        self.backend, self.threads, self.importance = backend, threads, importance
        self.ignore, self.max_ratio, self.norms = ignore, max_ratio, norms
        self.step, self.levels, self.grid = step, levels, grid
        self.measure, self.calibrate, self.tolerance, self.strict = measure, calibrate, tolerance, strict
        self.confirm = confirm
        self.table, self.cache_dir, self.rebuild = table, cache_dir, rebuild
        self.repeats, self.max_spread, self.repeats_e2e = repeats, max_spread, repeats_e2e
        if dense_onnx is not None and not os.path.exists(dense_onnx):
            raise InputError(f"dense_onnx {dense_onnx!r} does not exist", fix="export the dense model first")
        self.dense_onnx = dense_onnx

    def _table(self) -> LatencyTable:
        if self.table is not None:
            return self.table
        return LatencyTable(self.backend, self.threads, cache_dir=self.cache_dir, rebuild=self.rebuild,
                            repeats=self.repeats, max_spread=self.max_spread)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        gs = use_norm_mode(program, self.norms)
        groups = self._cp.candidates(program)
        score_fn = imp.prepare(self.importance, program, groups, ctx)
        prior = program.leaf_keep()
        scores: dict[int, np.ndarray] = {}
        for g in groups:
            s = score_fn(program, g, ctx)
            if s is not None:
                s = _checked_scores(s, g)
                s = s / (s.mean() + 1e-12)
                if g.space in prior:
                    s = np.where(prior[g.space], s, -np.inf)
                scores[g.id] = s
        groups = [g for g in groups if g.id in scores]
        levels: dict[int, list[int]] = {}
        cum: dict[int, np.ndarray] = {}
        tops = {g.id: int(prior[g.space].sum()) if g.space in prior else g.size for g in groups}
        table = self._table()
        step, probe = self.step, None
        if step == "auto":
            step, probe = probe_step(extract_ops(program, set(tops)), table, tops)
        for g in groups:
            top = tops[g.id]
            levels[g.id] = group_levels(g.size, step=step, levels=self.levels, max_ratio=self.max_ratio,
                                        divisor=program.divisors.get(g.id, 1), top=top)
            s = np.sort(np.where(np.isfinite(scores[g.id]), scores[g.id], 0.0))[::-1]
            cum[g.id] = np.concatenate([[0.0], np.cumsum(s)])
        levels = {g: lv for g, lv in levels.items() if len(lv) > 1}
        ops = extract_ops(program, set(levels))
        if not ops:
            raise InputError("no conv2d or linear op with a tracked weight: nothing to build a latency model from",
                             fix="use ChannelPrune(target_macs=...) for this model")
        model = LatencyModel(ops, table, levels, self.grid)
        table.ensure(model.points(), progress=ctx.log.append)
        dense_counts = {g: lv[0] for g, lv in levels.items()}
        p_dense = model.total(dense_counts)
        stats: dict[str, Any] = {"ops": len(ops), "groups_considered": len(levels),
                                 "table_points": len(model.points()), "table_points_measured": table.measured_now,
                                 "table_file": str(table.path) if table.path else "synthetic",
                                 "table_dense_ms": round(p_dense, 4), "step": step}
        if probe is not None:
            stats["step_probe"] = probe
        try:
            stats["load_average"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:  # pragma: no cover
            pass
        if not self.measure:
            counts = select_widths(model, cum, self.target_latency * p_dense)
            stats["predicted_ratio"] = round(model.total(counts) / p_dense, 4)
            stats["target_ratio"] = self.target_latency
        else:
            counts = self._closed_loop(program, model, cum, scores, stats)
        masks = {}
        for g in groups:
            if g.id in counts and counts[g.id] < (levels[g.id][0]):
                masks[g.id] = _top_k(scores[g.id], counts[g.id])
        for gid, m in masks.items():
            program.select_channels(gid, m)
        record = SelectionRecord({gid: (float(np.min(scores[gid][np.isfinite(scores[gid])])),
                                        float(np.mean(scores[gid][np.isfinite(scores[gid])])),
                                        float(np.max(scores[gid]))) for gid in masks})
        total_imp = sum(float(c[-1]) for c in cum.values())
        stats.update(
            importance_retained=round(sum(float(cum[g][counts.get(g, -1)]) for g in cum) / total_imp, 4)
            if total_imp else 1.0, groups_pruned=len(masks),
            channels_removed=int(sum((~m).sum() for m in masks.values())),
            macs_dense=gs.macs(), macs_estimate=gs.macs(program.leaf_keep()),
            kept={int(g): int(k) for g, k in counts.items() if k < levels[g][0]},
            seconds=round(time.perf_counter() - t0, 1))
        return PassResult(program, changed=bool(masks), stats=stats, record=record)

    # ------------------------------------------------------------------ end-to-end calibration
    def _closed_loop(self, program: Program, model: LatencyModel, cum: dict[int, np.ndarray],
                     scores: dict[int, np.ndarray], stats: dict[str, Any]) -> dict[int, int]:
        table = model.table if model.table.fn is None else LatencyTable(
            self.backend, self.threads, persist=False, repeats=self.repeats, max_spread=self.max_spread)
        with tempfile.TemporaryDirectory(prefix="fxprune-latency-") as tmp:
            if self.backend == "torch.compile":
                dense_ms, measure = self._torch_timer(program, model, scores, table)
            else:
                dense_ms, measure = self._ort_timer(program, model, scores, table, Path(tmp))
            target = self.target_latency if self.target_latency is not None else self.target_ms / dense_ms
            stats["dense_ms_first"] = round(dense_ms, 3)
            stats["target_ratio"] = round(target, 4)
            rounds, counts = calibrate_selection(model, cum, target, measure, rounds=self.calibrate,
                                                 tolerance=self.tolerance, confirm=self.confirm, dense_ms=dense_ms,
                                                 wait_s=5.0)
        stats["rounds"] = rounds
        best = min([row for row in rounds if not row.get("slow_spell")] or rounds, key=lambda row: row["miss"])
        stats.update(predicted_ratio=best["predicted_ratio"], measured_ratio=best["measured_ratio"],
                     predicted_ms=best["predicted_ms"], measured_ms=best["pruned_ms"], dense_ms=best["dense_ms"],
                     target_miss=round(best["miss"], 4))
        if best["miss"] > self.tolerance and self.strict:
            last = rounds[-1]
            if last.get("clipped_to") == "floor" and last["measured_ratio"] > target:
                raise BudgetError(
                    f"the latency target {target:.3f} of dense is below what the lowest widths reach: measured "
                    f"{last['measured_ratio']:.3f} with every group at its max_ratio floor (frozen layers and ops "
                    f"outside the latency table set that floor)",
                    fix="raise target_latency, raise max_ratio, or unfreeze more layers; strict=False keeps the "
                        "closest selection")
            raise BudgetError(
                f"measured latency {best['measured_ratio']:.3f} of dense misses the target {target:.3f} by "
                f"{100 * best['miss']:.1f}% (tolerance {100 * self.tolerance:.0f}%) after {len(rounds)} calibration "
                f"rounds (predicted {best['predicted_ratio']:.3f})",
                fix="raise calibrate= or tolerance=, measure on a quieter machine, or strict=False to keep the "
                    "closest selection")
        return counts


    def _ort_timer(self, program: Program, model: LatencyModel, scores: dict[int, np.ndarray],
                   table: LatencyTable, tmp: Path) -> tuple[float, Any]:
        """The dense latency (ms) on ONNX Runtime, and ``measure(counts, round)``: the selection exported to ONNX
        (once per round) and timed against the dense export."""
        dense_path = Path(self.dense_onnx) if self.dense_onnx else tmp / "dense.onnx"
        if not self.dense_onnx:
            _export(program.gm, program.args, dense_path)
        inputs = _feed(dense_path, program.args)
        dense_ms = table.time_model(dense_path, inputs, repeats=self.repeats_e2e)

        def measure(counts: dict[int, int], r: int) -> tuple[float, float, float]:
            path = tmp / f"pruned{r}.onnx"
            if not path.exists():  # a confirmation times the same round's file again
                _export(_shrunk(program, counts, model.levels, scores), program.args, path)
            return _compare(table, dense_path, path, inputs, self.repeats_e2e)
        return dense_ms, measure

    def _torch_timer(self, program: Program, model: LatencyModel, scores: dict[int, np.ndarray],
                     table: LatencyTable) -> tuple[float, Any]:
        """The dense latency (ms) of ``torch.compile(program.gm)`` on the CPU, and ``measure(counts, round)``: the
        selection shrunk, compiled (once per round) and timed against the compiled dense module."""
        args = tuple(program.args)
        dense = torch.compile(program.gm, dynamic=False)
        (dense_ms,), _ = table.compare_callables([dense], args, repeats=self.repeats_e2e)
        compiled: dict[int, Any] = {}

        def measure(counts: dict[int, int], r: int) -> tuple[float, float, float]:
            if r not in compiled:  # a confirmation times the same round's module again
                compiled[r] = torch.compile(_shrunk(program, counts, model.levels, scores), dynamic=False)
            (d, p), (_, ratio) = table.compare_callables([dense, compiled[r]], args, repeats=self.repeats_e2e)
            return d, p, ratio
        return dense_ms, measure


def calibrate_selection(model: LatencyModel, cum: dict[int, np.ndarray], target: float,
                        measure: Any, *, rounds: int, tolerance: float, confirm: bool = False,
                        dense_ms: float | None = None, disturbed: float = 1.15, retimes: int = 2,
                        wait_s: float = 0.0) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Closed-loop selection: select for a table-sum budget, measure the selection end to end, and choose the next
    budget from the measured points (:func:`_next_budget`: a bracketing secant once the target is bracketed),
    until the measured ratio is within ``tolerance`` of ``target`` or ``rounds`` are spent. With ``confirm``, a
    selection measured within ``tolerance`` is measured again (``measure(counts, round)`` a second time) and its
    ratio is the mean of the two (``first_ratio``/``confirm_ratio`` in its record): it ends the loop only if that
    mean is within ``tolerance`` too; else the loop goes on from the second timing (the first was kept because it
    hit the target, so it is biased towards it).

    A timing whose dense latency is more than ``disturbed`` times the fastest dense latency seen so far
    (``dense_ms``, the pass's first dense timing, included) ran in one of the machine's slow spells (measured: the
    YOLOv8-style detector at batch 8 timed 28 ms instead of 22 for minutes, other tenants of the host), which do not
    slow two models alike (its selections' ratios moved by up to 0.1): it is timed again after ``wait_s``
    seconds, ``retimes`` times at most, and the last timing is kept (the discarded dense timings are in the
    record as ``disturbed_dense_ms``). Spells also end: once a faster dense timing shows that earlier rounds ran
    in one, those rounds (``slow_spell`` in their record) are left out of the fit and of the choice of the result.

    ``measure(counts, round) -> (dense_ms, pruned_ms, ratio)`` times a selection against the dense model. Budgets
    stay within [lowest widths, dense]; when the lowest widths are measured and are still slower than the target
    the loop stops. Returns every round's record (``miss``: relative distance to the target; ``predicted_ratio``:
    the ratio the measured points interpolate at the selection's table sum) and the counts of the round with
    the smallest miss."""
    p_dense = model.total({g: lv[0] for g, lv in model.levels.items()})
    floor = model.total({g: lv[-1] for g, lv in model.levels.items()})
    pts = [(p_dense, 1.0)]  # (table sum, measured ratio to dense)
    records: list[dict[str, Any]] = []
    budget = target * p_dense  # first guess: latency proportional to the table sum
    dense_seen = [dense_ms] if dense_ms else []
    fitted: list[tuple[float, float, float]] = []  # (table sum, ratio, the dense time it was measured with)
    chosen: list[dict[int, int]] = []  # each record's counts

    def quiet(d: float) -> bool:
        return not dense_seen or d <= disturbed * min(dense_seen)

    def timed(counts: dict[int, int], r: int, extra: dict[str, Any]) -> tuple[float, float, float]:
        for attempt in range(retimes + 1):
            d, p, q = measure(counts, r)
            if quiet(d) or attempt == retimes:
                dense_seen.append(d)
                return d, p, q
            extra.setdefault("disturbed_dense_ms", []).append(round(d, 3))
            time.sleep(wait_s)
        raise AssertionError("unreachable")

    for r in range(rounds):
        pts = [(p_dense, 1.0)] + [(x, y) for x, y, d in fitted if quiet(d)]
        clipped = "floor" if budget <= floor else None
        budget = min(max(budget, floor), p_dense)
        counts = select_widths(model, cum, budget)
        p_sel = model.total(counts)
        step = 0.125
        for _ in range(6):  # a budget that selects an already measured selection learns nothing: step onwards,
            seen = [y for x, y in pts if abs(x - p_sel) <= 1e-9 * p_dense]  # a growing part of the bracket
            if not seen or clipped:
                break
            if seen[0] < target:  # too fast: up towards the nearest slower point
                up = min((x for x, y in pts if y >= target and x > p_sel), default=p_dense)
                budget = max(budget, p_sel) + step * (up - max(budget, p_sel))
            else:  # too slow: down towards the nearest faster point (or the floor)
                down = max((x for x, y in pts if y < target and x < p_sel), default=floor)
                budget = p_sel - step * (p_sel - down)
            step = min(2 * step, 0.5)
            counts = select_widths(model, cum, budget)
            p_sel = model.total(counts)
        pred = _interp_ratio(pts, p_sel)
        extra: dict[str, Any] = {}
        d_ms, p_ms, meas = timed(counts, r, extra)
        point, point_d = meas, d_ms  # what the next budget is fitted to
        if confirm and abs(meas / target - 1) <= tolerance:
            d2, p2, m2 = timed(counts, r, extra)
            extra.update(first_ratio=round(meas, 4), confirm_ratio=round(m2, 4))
            d_ms, p_ms, meas = 0.5 * (d_ms + d2), 0.5 * (p_ms + p2), 0.5 * (meas + m2)
            point, point_d = m2, d2  # the first timing was kept because it hit the target: biased towards it
        miss = abs(meas / target - 1)
        row = {"round": r, "predicted_ratio": round(pred, 4), "measured_ratio": round(meas, 4),
               "dense_ms": round(d_ms, 3), "pruned_ms": round(p_ms, 3), "predicted_ms": round(pred * d_ms, 3),
               "table_sum_ms": round(p_sel, 4), "miss": miss, **extra}
        if clipped:
            row["clipped_to"] = clipped
        records.append(row)
        chosen.append(counts)
        if quiet(d_ms) and (miss <= tolerance or (clipped == "floor" and meas > target)):
            break
        fitted.append((p_sel, point, point_d))
        budget = _next_budget([(p_dense, 1.0)] + [(x, y) for x, y, d in fitted if quiet(d)], target)
    ok = [i for i, row in enumerate(records) if quiet(row["dense_ms"])]
    for i, row in enumerate(records):
        if i not in ok:
            row["slow_spell"] = True
    i = min(ok or range(len(records)), key=lambda i: records[i]["miss"])
    return records, chosen[i]


def _interp_ratio(pts: list[tuple[float, float]], x: float) -> float:
    """The measured ratio at table sum ``x``: piecewise linear through the measured points, proportional to the
    nearest one outside their range."""
    xs = sorted(pts)
    if x <= xs[0][0]:
        return xs[0][1] * x / xs[0][0]
    if x >= xs[-1][0]:
        return xs[-1][1] * x / xs[-1][0]
    return float(np.interp(x, [p[0] for p in xs], [p[1] for p in xs]))


def _next_budget(pts: list[tuple[float, float]], target: float) -> float:
    """The table-sum budget expected to measure ``target``, from the measured ``(table_sum, ratio)`` points: a
    safeguarded secant. The secant through the two points nearest the target (when its slope is positive),
    kept inside the bracket when the target is bracketed (points measured on both sides), else the secant
    between the bracket's ends (their midpoint if noise made them non-monotone); with neither, proportional
    through the nearest point. The relation is only assumed monotone: the share of the latency outside the table
    (attention matmuls, pooling, overheads) may shrink with the widths too, so no intercept is imposed."""
    below = [p for p in pts if p[1] < target]
    above = [p for p in pts if p[1] >= target]
    cand = None
    near = sorted(pts, key=lambda p: abs(p[1] - target))[:2]
    if len(near) == 2 and abs(near[0][0] - near[1][0]) > 1e-12:
        (x1, y1), (x2, y2) = near
        a = (y1 - y2) / (x1 - x2)
        if a > 0:
            cand = x1 + (target - y1) / a
    if below and above:
        xb, yb = max(below, key=lambda p: p[1])
        xa, ya = min(above, key=lambda p: p[1])
        if cand is not None and min(xa, xb) < cand < max(xa, xb):
            return cand
        if xa > xb and ya > yb:
            return xb + (target - yb) * (xa - xb) / (ya - yb)
        return 0.5 * (xa + xb)
    if cand is not None and cand > 0:
        return cand
    x, y = near[0]
    return x * target / y


def _shrunk(program: Program, counts: dict[int, int], levels: dict[int, list[int]],
            scores: dict[int, np.ndarray]) -> torch.nn.Module:
    """The program with ``counts`` applied as the pass will apply them (each group's top ``counts[g]`` channels
    by ``scores``), physically shrunk: the model the user gets, timed (not verified)."""
    from fxprune.masking import param_keep, rewrite_shape_constants, shrunk_copy
    from fxprune.shape_prop import propagate_shapes

    gs = program.groups
    keep = dict(program.leaf_keep())
    for gid, k in counts.items():
        if k < levels[gid][0]:
            keep[gs[gid].space] = _top_k(scores[gid], k)
    pk = param_keep(gs, keep)
    gm = shrunk_copy(program.gm, gs, keep, keep=pk)
    rewrite_shape_constants(gm, gs, keep)
    propagate_shapes(gm, program, pass_name="latency_prune", what="on the shrunk copy timed for calibration")
    return gm


def _export(gm: torch.nn.Module, args: tuple, path: Path) -> None:
    from fxprune.backends import onnx as onnx_backend

    onnx_backend.export(gm, tuple(args), path, dynamic_batch=False, check_parity=False)


def _feed(path: Path, args: tuple) -> dict[str, np.ndarray]:
    from fxprune.backends import onnxruntime as ort

    sess = ort.session(path, 1)
    return ort.feed(sess, tuple(args))


def _compare(table: LatencyTable, dense: Path, pruned: Path, inputs: dict[str, np.ndarray],
             repeats: int) -> tuple[float, float, float]:
    """Medians (ms) of the dense and pruned models timed in interleaved rounds, and the median per-round ratio
    pruned / dense; MeasurementError if too noisy."""
    (d, p), (_, ratio) = table.compare_ratios([dense, pruned], inputs, repeats=repeats)
    return d, p, ratio


# ---------------------------------------------------------------------------------------------------- measuring
def kept_counts(groups: GroupSet, module: torch.nn.Module) -> dict[int, int]:
    """Kept channels per prunable group of ``groups`` (the dense model's) in a pruned ``module`` with the same
    parameter names (fxprune's Compiled.module, a Torch-Pruning model pruned in place), read from the shape of a
    member that spans its whole dim. Groups without such a member are left out."""
    params = dict(module.named_parameters())
    alias = {v: k for k, v in groups.analysis.param_alias.items()}
    out: dict[int, int] = {}
    for g in groups.prunable():
        for m in g.members:
            full = groups.param_shapes.get(m.param)
            p = params.get(m.param, params.get(alias.get(m.param, ""), None))
            if p is None or full is None or m.covers != full[m.dim] or m.covers % g.size:
                continue
            out[g.id] = int(p.shape[m.dim]) * g.size // full[m.dim]
            break
    return out


def importance_retained(model: torch.nn.Module, example_inputs: tuple, counts: dict[int, int],
                        importance: Any = "l2", seed: int = 0) -> float:
    """Fraction of the (per-group mean-normalised) importance kept when each group keeps its ``counts[g]`` most
    important channels (an upper bound for a method that keeps other channels), over the groups LatencyPrune
    would consider; the measure LatencyPrune reports as ``importance_retained``."""
    from fxprune.trace import trace

    program = Program(trace(model, tuple(example_inputs), {}), tuple(example_inputs), {}, source=model)
    groups = ChannelPrune(ratio=0.0, importance=importance).candidates(program)
    ctx = PassContext(seed=seed)
    fn = imp.prepare(importance, program, groups, ctx)
    kept = total = 0.0
    for g in groups:
        s = fn(program, g, ctx)
        if s is None:
            continue
        s = np.sort(_checked_scores(s, g))[::-1]
        s = s / (s.mean() + 1e-12)
        total += float(s.sum())
        kept += float(s[: counts.get(g.id, g.size)].sum())
    return kept / total if total else 1.0
