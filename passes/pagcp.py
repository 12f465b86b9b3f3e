"""PAGCP: performance-aware global channel pruning for multitask networks (arXiv 2303.11923).

A selection pass (``Shrink`` removes the channels). One round, following the authors' ``prune/sensitivity.py``:

1. Order the prunable channel groups by the MACs that 30% L1 pruning of the group removes (every coupled layer is
   counted: :meth:`fxprune.groups.GroupSet.macs`).
2. Threshold schedule: ``t_1 = initial_rate`` and ``lambda`` solves ``prod_{i<L} (1 + t_1 lambda^i) = T`` with
   ``T = initial_thres`` and ``L`` the number of groups (:func:`solve_lambda`); ``t_{i+1} = lambda t_i``. As in the
   authors' code, groups are visited largest-MACs-first when ``lambda <= 1`` and smallest-first otherwise, so the
   largest groups always get the largest tolerance.
3. Greedy, on the already-pruned model: for ratios r on the grid (0.05 .. 0.95), remove the lowest-L1 fraction r of
   the group's channels and evaluate every task loss on the calibration data; stop at the first r where some task
   loss exceeds ``(1 + t) x`` its base loss and accept the previous ratio (nothing when the first ratio fails). After
   an accepted group the base losses become ``max(base, accepted losses)`` per task and ``t <- lambda t``.
4. Filter: score accepted groups by ``(sum of task losses after - before) / (MACs before - after)`` and keep only the
   ``topk`` fraction (of all groups considered) with the smallest scores.

``rounds > 1`` repeats this on the pruned program; ``finetune(module, round)`` is called between rounds with the
masked module (removed channels are zero and gradient hooks keep them at zero while the callback trains).

Every task loss is evaluated through one interface, :class:`CalibrationLosses` (``losses(candidates) -> array
(K, tasks)``): the calibration batches are concatenated into chunks of ``calib_batch`` samples and each candidate
keep map costs one forward per chunk for *all* tasks. With ``stack > 1`` several candidates of one group share a
forward: the calibration chunk is repeated once per candidate and the channels each candidate removes are zeroed in
that candidate's copy of every activation (:class:`_StackedMasker`), which equals zeroing the weights (the masked
program) because removed channels are exactly zero wherever they flow. Its cost (seconds, forwards, candidates) is
in the pass stats and the record; it dominates the pass.

Departures from the authors' code: groups are fxprune's coupled channel groups (their code special-cases YOLOv5 C3
residual chains and prunes single convs otherwise); L1 is the group's L1 over all coupled slices
(:func:`fxprune.passes.importance.magnitude`) on the masked weights; a group that never violates its bound keeps the
largest grid ratio (their code records 0.9 but applies nothing in the sequential pass); the final keep masks are the
ones evaluated in the greedy pass (their code re-ranks the unpruned weights by L1 at the chosen ratio).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from fxprune.errors import InputError
from fxprune.groups import Group, GroupSet
from fxprune.masking import apply_channel_masks, masked_in_place, param_keep
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program, Stage
from fxprune.records import SelectionRecord

from .importance import magnitude

DEFAULT_GRID = tuple(round(float(r), 4) for r in np.linspace(0.05, 0.95, 19))


# ------------------------------------------------------------------------------------------------- the schedule
def solve_lambda(t1: float, n: int, T: float) -> float:
    """``lambda`` with ``prod_{i<n} (1 + t1 * lambda**i) == T`` (bisection in log space; the product grows with
    lambda). ``n == 1`` has no solution unless ``T == 1 + t1``: returns 1.0 then (the schedule is one threshold)."""
    if not (t1 > 0 and T > 1 + t1 and n >= 1):
        raise InputError(f"no threshold schedule with t1={t1}, T={T}: T must exceed 1 + t1",
                         fix="raise initial_thres or lower initial_rate")
    if n == 1:
        return 1.0
    target = math.log(T)
    i = np.arange(n, dtype=np.float64)

    def f(loglam: float) -> float:
        return float(np.logaddexp(0.0, math.log(t1) + i * loglam).sum()) - target

    lo, hi = -60.0, 1.0
    while f(hi) < 0:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def threshold_schedule(t1: float, n: int, T: float) -> list[float]:
    """``[t_1, ..., t_n]`` with ``t_{i+1} = lambda t_i`` and ``prod (1 + t_i) = T``."""
    lam = solve_lambda(t1, n, T)
    return [t1 * lam ** k for k in range(n)]


# ------------------------------------------------------------------------------------------------- the records
@dataclass(frozen=True)
class PAGCPDecision:
    """What the greedy pass decided for one group (ids are those of the program the round ran on)."""

    group: int
    ratio: float  # accepted ratio of the group's kept channels removed (0: rejected at the first grid point)
    kept: int  # channels kept after the decision
    threshold: float  # t the bound used: each task loss <= (1 + t) * base
    base: tuple[float, ...]  # per-task base losses before this group
    losses: tuple[float, ...]  # per-task losses at the accepted ratio (== base when rejected)
    macs_before: int
    macs_after: int
    score: float  # (sum(losses) - sum(base)) / (macs_before - macs_after); inf when nothing was removed
    selected: bool  # kept by the top-k filter
    evaluations: int  # candidate ratios evaluated for this group
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # the group's keep mask afterwards

    def __post_init__(self) -> None:
        k = np.array(self.keep, dtype=bool, copy=True)
        k.setflags(write=False)
        object.__setattr__(self, "keep", k)


@dataclass(frozen=True)
class PAGCPRound:
    lam: float
    t1: float
    T: float
    schedule: tuple[float, ...]  # the planned thresholds t_1..t_L (prod (1 + t_i) == T)
    order: tuple[int, ...]  # group ids in visiting order
    macs_sensitivity: Mapping[int, int]  # MACs removed by 30% L1 pruning of each group
    decisions: tuple[PAGCPDecision, ...]
    base_losses: tuple[float, ...]  # per task, at the start of the round
    final_losses: tuple[float, ...]  # per task, with the selected groups pruned
    calib: Mapping[str, float]  # cost of the calibration oracle in this round

    def __post_init__(self) -> None:
        object.__setattr__(self, "macs_sensitivity", MappingProxyType(dict(self.macs_sensitivity)))
        object.__setattr__(self, "calib", MappingProxyType(dict(self.calib)))


@dataclass(frozen=True)
class PAGCPRecord(SelectionRecord):
    """PAGCP's selection: importance summaries (L1) plus every round's schedule and per-group decisions."""

    tasks: tuple[str, ...] = ()
    rounds: tuple[PAGCPRound, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------------------------------- calibration oracle
def _as_args(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _cat_targets(ys: list[Any]) -> Any:
    """Concatenate a list of target pytrees along dim 0 (tensors) / element-wise (lists, tuples, dicts)."""
    y0 = ys[0]
    if isinstance(y0, torch.Tensor):
        return torch.cat(ys, 0) if y0.dim() else y0
    if isinstance(y0, dict):
        return {k: _cat_targets([y[k] for y in ys]) for k in y0}
    if isinstance(y0, (list, tuple)):
        out = [_cat_targets([y[i] for y in ys]) for i in range(len(y0))]
        return type(y0)(out) if isinstance(y0, tuple) else out
    return y0


def _repeat_targets(y: Any, k: int) -> Any:
    if isinstance(y, torch.Tensor):
        return y.repeat(k, *([1] * (y.dim() - 1))) if y.dim() else y
    if isinstance(y, dict):
        return {key: _repeat_targets(v, k) for key, v in y.items()}
    if isinstance(y, (list, tuple)):
        out = [_repeat_targets(v, k) for v in y]
        return type(y)(out) if isinstance(y, tuple) else out
    return y


def _batch_size(args: tuple) -> int:
    for a in tree_flatten(args)[0]:
        if isinstance(a, torch.Tensor) and a.dim():
            return int(a.shape[0])
    return 1


def _split_outputs(out: Any, k: int) -> list[Any]:
    """Split a (pytree) model output stacked over ``k`` candidates into ``k`` outputs."""
    if isinstance(out, torch.Tensor):
        return list(out.chunk(k, 0)) if out.dim() else [out] * k
    if isinstance(out, dict):
        parts = {key: _split_outputs(v, k) for key, v in out.items()}
        return [{key: parts[key][i] for key in out} for i in range(k)]
    if isinstance(out, (list, tuple)):
        parts = [_split_outputs(v, k) for v in out]
        res = [[p[i] for p in parts] for i in range(k)]
        return [tuple(r) if isinstance(out, tuple) else r for r in res]
    return [out] * k


class CalibrationLosses:
    """Every task loss of the masked program on the calibration data, for a list of candidate keep maps.

    ``losses(candidates)`` takes keep maps ``{leaf space: bool mask}`` (:meth:`Program.leaf_keep` form) and returns
    an array ``(len(candidates), len(tasks))`` of per-sample-mean task losses. All tasks share each forward. The
    calibration batches are read once and concatenated into chunks of ``calib_batch`` samples. ``stack``: how many
    candidates share one forward (see the module docstring); falls back to one at a time where the graph does not
    allow it. ``stats`` accumulates the cost.
    """

    def __init__(self, gm: fx.GraphModule, groups: GroupSet, tasks: Mapping[str, Callable[[Any, Any], Any]],
                 calib: Iterable, *, calib_batch: int = 256, stack: int = 1):
        self.gm, self.groups, self.tasks = gm, groups, dict(tasks)
        batches = [(_as_args(x), y) for x, y in calib]
        if not batches:
            raise InputError("PAGCP: the calibration loader yielded no batches",
                             fix="pass calib= a loader of (inputs, targets) batches (a few hundred samples)")
        self.n_samples = sum(_batch_size(a) for a, _ in batches)
        self.chunks: list[tuple[tuple, Any, int]] = []
        cur_a: list[tuple] = []
        cur_y: list[Any] = []
        size = 0
        for a, y in batches:  # concatenate consecutive batches up to calib_batch samples
            cur_a.append(a)
            cur_y.append(y)
            size += _batch_size(a)
            if size >= calib_batch:
                self._flush(cur_a, cur_y, size)
                cur_a, cur_y, size = [], [], 0
        if cur_a:
            self._flush(cur_a, cur_y, size)
        self.stack = max(1, int(stack))
        self._stacker: _StackedMasker | None = None
        self.stats = {"seconds": 0.0, "forwards": 0, "candidates": 0, "calls": 0, "stacked_forwards": 0}

    def _flush(self, args: list[tuple], ys: list[Any], n: int) -> None:
        cat = tuple(torch.cat([a[i] for a in args], 0) if isinstance(args[0][i], torch.Tensor) and args[0][i].dim()
                    else args[0][i] for i in range(len(args[0])))
        self.chunks.append((cat, _cat_targets(ys), n))

    def _task_losses(self, out: Any, y: Any) -> list[float]:
        vals = []
        for name, fn in self.tasks.items():
            v = fn(out, y)
            v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            if not math.isfinite(v):
                v = float("inf")
            vals.append(v)
        return vals

    @torch.no_grad()
    def losses(self, candidates: Sequence[dict[int, np.ndarray]]) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.zeros((len(candidates), len(self.tasks)))
        todo = list(range(len(candidates)))
        if self.stack > 1 and len(candidates) > 1:
            if self._stacker is None:
                self._stacker = _StackedMasker(self.gm, self.groups)
            if self._stacker.ok:
                done = self._stacked(candidates, out)
                todo = [i for i in todo if i not in done]
        for i in todo:
            with masked_in_place(self.gm, self.groups, candidates[i], {}):
                acc = np.zeros(len(self.tasks))
                for args, y, n in self.chunks:
                    acc += np.asarray(self._task_losses(self.gm(*args), y)) * n
                    self.stats["forwards"] += 1
                out[i] = acc / self.n_samples
        self.stats["seconds"] += time.perf_counter() - t0
        self.stats["candidates"] += len(candidates)
        self.stats["calls"] += 1
        return out

    def _stacked(self, candidates: Sequence[dict[int, np.ndarray]], out: np.ndarray) -> set[int]:
        """Evaluate candidates ``stack`` at a time in one forward each (per chunk). Returns the indices done."""
        done: set[int] = set()
        # the leaves all candidates share are applied to the weights once; the differing ones per copy
        common = set.intersection(*(set(c) for c in candidates))
        shared = {leaf: candidates[0][leaf] for leaf in common
                  if all(np.array_equal(c[leaf], candidates[0][leaf]) for c in candidates)}
        varying = sorted({leaf for c in candidates for leaf in c if leaf not in shared})
        if not self._stacker.supports(varying):
            return done
        with masked_in_place(self.gm, self.groups, shared, {}):
            for s in range(0, len(candidates), self.stack):
                idx = list(range(s, min(s + self.stack, len(candidates))))
                k = len(idx)
                acc = np.zeros((k, len(self.tasks)))
                for args, y, n in self.chunks:
                    keeps = [{leaf: candidates[i].get(leaf) for leaf in varying} for i in idx]
                    outs = self._stacker.run(args, keeps, n)
                    for j, o in enumerate(_split_outputs(outs, k)):
                        acc[j] += np.asarray(self._task_losses(o, y)) * n
                    self.stats["forwards"] += 1
                    self.stats["stacked_forwards"] += 1
                for j, i in enumerate(idx):
                    out[i] = acc[j] / self.n_samples
                    done.add(i)
        return done


class _StackedMasker:
    """Runs ``gm`` on ``k`` copies of a batch at once, zeroing in copy ``j`` the channels that candidate ``j``
    removes, at every activation that carries them (an ``fx.Interpreter``; the module is not modified).

    Equal to the masked program (weights zeroed) because a removed channel is exactly zero after its producers and
    contributes nothing to its consumers. Needs every activation that carries a varying leaf to have the batch in
    dim 0 and the leaf outside dim 0 (checked per call: ``supports``)."""

    def __init__(self, gm: fx.GraphModule, groups: GroupSet):
        self.gm, self.groups = gm, groups
        self.a = groups.analysis
        self.ok = True
        self._nodes: dict[int, list[tuple[str, int, np.ndarray]]] = {}
        t = self.a.table
        self._batch = set()  # the space of the inputs' dim 0 (the batch, unified through the graph)
        for n in gm.graph.nodes:
            sp = self.a.node_spaces.get(n.name)
            if n.op == "placeholder" and isinstance(sp, list) and sp and isinstance(sp[0], int):
                self._batch.add(t.find(sp[0]))

    def _carriers(self, leaf: int) -> list[tuple[str, int, np.ndarray]] | None:
        if leaf in self._nodes:
            return self._nodes[leaf]
        t = self.a.table
        out = []
        for n in self.gm.graph.nodes:
            if n.op not in ("call_function", "call_module") or n.name in self.a.param_nodes:
                continue
            sp = self.a.node_spaces.get(n.name)
            if not (isinstance(sp, list) and sp and isinstance(sp[0], int)):
                continue
            for d, s in enumerate(sp):
                if leaf in t.leaves(s):
                    if d == 0 or t.find(sp[0]) not in self._batch:
                        self._nodes[leaf] = None  # type: ignore[assignment]
                        return None
                    coords = dict(t.coords(s)).get(t.find(leaf))
                    out.append((n.name, d, coords))
        self._nodes[leaf] = out
        return out

    def supports(self, leaves: Sequence[int]) -> bool:
        return all(self._carriers(leaf) is not None for leaf in leaves)

    def run(self, args: tuple, keeps: list[dict[int, np.ndarray]], n: int) -> Any:
        k = len(keeps)
        mult: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for leaf in keeps[0]:
            for name, d, coords in self._carriers(leaf):
                sel = coords >= 0
                m = np.ones((k, len(coords)), dtype=np.float32)
                for j, kp in enumerate(keeps):
                    if kp[leaf] is not None:
                        m[j, sel] = kp[leaf][coords[sel]].astype(np.float32)
                mult.setdefault(name, []).append((d, torch.from_numpy(m)))
        big = tuple(a.repeat(k, *([1] * (a.dim() - 1))) if isinstance(a, torch.Tensor) and a.dim() else a
                    for a in args)
        interp = _MaskingInterpreter(self.gm, mult, k)
        return interp.run(*big)


class _MaskingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, mult: dict[str, list[tuple[int, torch.Tensor]]], k: int):
        super().__init__(gm, garbage_collect_values=True)
        self.mult, self.k = mult, k

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        for d, m in self.mult.get(n.name, ()):
            if not isinstance(out, torch.Tensor) or out.dim() <= d:
                continue
            shape = [1] * out.dim()
            shape[0], shape[d] = self.k, out.shape[d]
            b = out.shape[0] // self.k
            out = (out.reshape(self.k, b, *out.shape[1:]) * m.to(out.dtype).reshape(
                [self.k, 1] + shape[1:])).reshape(out.shape)
        return out


# ---------------------------------------------------------------------------------------------------- the pass
def _grad_mask_hooks(gm: nn.Module, groups: GroupSet, leaf_keep: dict[int, np.ndarray]) -> list[Any]:
    """Gradient hooks that keep removed channel slices at zero while a fine-tune callback trains ``gm``."""
    handles = []
    keep = param_keep(groups, leaf_keep)
    alias = groups.analysis.param_alias
    for name, p in gm.named_parameters():
        dims = keep.get(alias.get(name, name))
        if not dims or all(k is None for k in dims):
            continue
        m = torch.ones(p.shape, dtype=p.dtype)
        for d, k in enumerate(dims):
            if k is not None:
                shape = [1] * p.dim()
                shape[d] = len(k)
                m = m * torch.from_numpy(k.astype(np.float32)).to(p.dtype).reshape(shape)
        handles.append(p.register_hook(lambda g, m=m: g * m.to(g.device)))
    return handles


@register_pass
class PAGCP(Pass):
    """Performance-aware global channel pruning for multitask networks (see the module docstring).

    ``tasks``: ``{name: loss_fn(outputs, targets) -> scalar}`` (mean over the batch). ``calib``: a loader of
    ``(inputs, targets)`` (default: ``compile(data=...)``). ``initial_rate`` (t_1), ``initial_thres`` (T), ``topk``
    and the ratio ``grid`` follow the authors' defaults; ``rate_slope``/``thres_slope`` change t_1 and T per round as
    in their code. ``rounds`` of prune -> ``finetune(module, round)``; ``ignore``: parameter-name prefixes whose
    groups are not pruned; ``calib_batch``: samples per forward; ``stack``: candidates per forward.
    """

    name = "pagcp"
    requires = frozenset({"groups"})
    accepts = frozenset({Stage.TRACED, Stage.SELECTED})
    modifies_weights = True  # masked evaluation in place (restored) and the fine-tune callback

    def __init__(self, tasks: Mapping[str, Callable[..., Any]], calib: Any = None, *, initial_rate: float = 0.06,
                 initial_thres: float = 6.0, topk: float = 0.8, rounds: int = 1,
                 finetune: Callable[..., Any] | None = None, grid: Sequence[float] = DEFAULT_GRID,
                 rate_slope: float = 0.0, thres_slope: float = 0.0, ignore: Sequence[str] = (),
                 calib_batch: int = 256, stack: int = 1, min_channels: int = 1):
        if not tasks:
            raise InputError("PAGCP needs at least one task loss", fix="tasks={'cls': loss_fn, ...}")
        for k, fn in tasks.items():
            if not callable(fn):
                raise InputError(f"task {k!r}: loss must be callable(outputs, targets)", fix="pass a function")
        if not 0 < initial_rate < 1:
            raise InputError(f"initial_rate must be in (0, 1), got {initial_rate}", fix="e.g. 0.06")
        if not initial_thres > 1 + initial_rate:
            raise InputError(f"initial_thres must exceed 1 + initial_rate, got {initial_thres}",
                             fix="T is the product of all (1 + t_i), e.g. 6")
        if not 0 < topk <= 1:
            raise InputError(f"topk must be in (0, 1], got {topk}", fix="e.g. 0.8")
        if not (isinstance(rounds, int) and rounds >= 1):
            raise InputError(f"rounds must be an int >= 1, got {rounds!r}", fix="e.g. rounds=2")
        grid = tuple(float(r) for r in grid)
        if not grid or any(not 0 < r < 1 for r in grid) or list(grid) != sorted(grid):
            raise InputError(f"grid must be increasing ratios in (0, 1), got {grid}",
                             fix="e.g. numpy.linspace(0.05, 0.95, 19)")
        if isinstance(ignore, str):
            ignore = [ignore]
        self.tasks = dict(tasks)
        self.calib = calib
        self.initial_rate, self.initial_thres, self.topk = float(initial_rate), float(initial_thres), float(topk)
        self.rounds = rounds
        self.finetune = finetune
        self.grid = grid
        self.rate_slope, self.thres_slope = float(rate_slope), float(thres_slope)
        self.ignore = list(ignore)
        self.calib_batch = int(calib_batch)
        self.stack = int(stack)
        self.min_channels = max(1, int(min_channels))

    def options(self) -> dict[str, Any]:
        opts = super().options()
        opts["tasks"] = list(self.tasks)
        opts.pop("calib", None)
        return opts

    # ------------------------------------------------------------------ helpers
    def _candidates(self, program: Program) -> list[Group]:
        alias = program.groups.analysis.param_alias
        ign = {c for p, c in alias.items() for pre in self.ignore if p == pre or p.startswith(pre + ".")}
        out = []
        for g in program.groups.prunable():
            if g.kind != "channels" or (ign and any(m.param in ign for m in g.members)):
                continue
            out.append(g)
        return out

    @staticmethod
    def _keep_lowest_removed(scores: np.ndarray, kept: np.ndarray, ratio: float, floor: int) -> np.ndarray:
        """Remove ``floor(n * ratio)`` of the ``n`` kept channels, lowest score first (>= ``floor`` stay)."""
        idx = np.nonzero(kept)[0]
        n = len(idx)
        k = max(min(floor, n), n - int(math.floor(n * ratio + 1e-9)))
        order = idx[np.argsort(-scores[idx], kind="stable")]
        out = np.zeros_like(kept)
        out[order[:k]] = True
        return out

    # ------------------------------------------------------------------ run
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        t_start = time.perf_counter()
        calib = self.calib if self.calib is not None else ctx.data
        if calib is None:
            raise InputError("PAGCP needs calibration data", fix="PAGCP(tasks, calib=loader) or compile(data=...)")
        gs = program.groups
        oracle = CalibrationLosses(program.gm, gs, self.tasks, calib, calib_batch=self.calib_batch, stack=self.stack)
        rounds: list[PAGCPRound] = []
        importance: dict[int, tuple[float, float, float]] = {}
        for rnd in range(self.rounds):
            info = self._round(program, gs, oracle, rnd, importance)
            rounds.append(info)
            if self.finetune is not None and rnd < self.rounds - 1:
                self._finetune(program, gs, rnd)
        masks = program.masks
        removed = sum(int((~m).sum()) for m in masks.values())
        total_calib = dict(oracle.stats)
        seconds = time.perf_counter() - t_start
        stats = {"rounds": len(rounds), "groups_pruned": sum(1 for m in masks.values() if not m.all()),
                 "channels_removed": removed, "macs_dense": gs.macs(), "macs_estimate": gs.macs(program.leaf_keep()),
                 "final_losses": {k: round(v, 6) for k, v in zip(self.tasks, rounds[-1].final_losses)},
                 "base_losses": {k: round(v, 6) for k, v in zip(self.tasks, rounds[0].base_losses)},
                 "calib_seconds": round(total_calib["seconds"], 3), "calib_forwards": total_calib["forwards"],
                 "calib_candidates": total_calib["candidates"],
                 "calib_fraction": round(total_calib["seconds"] / max(seconds, 1e-9), 3)}
        record = PAGCPRecord(importance, tuple(self.tasks), tuple(rounds))
        return PassResult(program, changed=removed > 0, stats=stats, record=record)

    def _finetune(self, program: Program, gs: GroupSet, rnd: int) -> None:
        leaf_keep = program.leaf_keep()
        with torch.no_grad():
            apply_channel_masks(program.gm, gs, leaf_keep)
        handles = _grad_mask_hooks(program.gm, gs, leaf_keep)
        try:
            self.finetune(program.gm, rnd)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            apply_channel_masks(program.gm, gs, leaf_keep)  # e.g. weight decay or momentum from earlier state

    def _round(self, program: Program, gs: GroupSet, oracle: CalibrationLosses, rnd: int,
               importance: dict[int, tuple[float, float, float]]) -> PAGCPRound:
        calib0 = dict(oracle.stats)
        t1 = self.initial_rate + self.rate_slope * rnd
        T = self.initial_thres + self.thres_slope * rnd
        accepted = dict(program.leaf_keep())  # leaf -> keep (current state of the sequential model)
        cands = [g for g in self._candidates(program)
                 if int(accepted.get(g.space, np.ones(g.size, bool)).sum()) > self.min_channels]
        base = oracle.losses([accepted])[0]
        base_round = tuple(float(v) for v in base)
        if not cands:
            return PAGCPRound(1.0, t1, T, (), (), {}, (), base_round, base_round, {})
        # 1. MACs removed by 30% L1 pruning of each group alone
        with masked_in_place(program.gm, gs, accepted, {}):
            scores = {g.id: magnitude(program, g, 1) for g in cands}
        for g in cands:
            importance[g.id] = (float(scores[g.id].min()), float(scores[g.id].mean()), float(scores[g.id].max()))
        macs_now = gs.macs(accepted)
        sens = {}
        for g in cands:
            cur = accepted.get(g.space, np.ones(g.size, bool))
            k = self._keep_lowest_removed(scores[g.id], cur, 0.3, self.min_channels)
            sens[g.id] = macs_now - gs.macs({**accepted, g.space: k})
        lam = solve_lambda(t1, len(cands), T)
        schedule = tuple(t1 * lam ** i for i in range(len(cands)))
        order = sorted(cands, key=lambda g: sens[g.id], reverse=lam <= 1.0)
        # 2. greedy, sequential
        t = t1
        raw = []
        for g in order:
            cur = accepted.get(g.space, np.ones(g.size, bool))
            with masked_in_place(program.gm, gs, accepted, {}):
                s = magnitude(program, g, 1)  # L1 on the already-pruned model
            macs_before = gs.macs(accepted)
            keeps = [self._keep_lowest_removed(s, cur, r, self.min_channels) for r in self.grid]
            # evaluate grid points, ``stack`` distinct ones per oracle call, until the first violation
            chunk = max(1, self.stack)
            losses: list[np.ndarray | None] = [None] * len(keeps)
            first_bad = None
            evaluated = 0
            i = 0
            while i < len(keeps) and first_bad is None:
                idx: list[int] = []
                j = i
                while j < len(keeps) and len(idx) < chunk:
                    if np.array_equal(keeps[j], cur):
                        losses[j] = base.copy()  # nothing removed at this ratio (small group): no forward
                    elif not (j > 0 and np.array_equal(keeps[j], keeps[j - 1])):
                        idx.append(j)  # a new channel set (small groups repeat sets along the grid)
                    j += 1
                if idx:
                    vals = oracle.losses([{**accepted, g.space: keeps[q]} for q in idx])
                    evaluated += len(idx)
                    for q, v in zip(idx, vals):
                        losses[q] = v
                for q in range(i, j):
                    if losses[q] is None:
                        losses[q] = losses[q - 1]
                    if first_bad is None and np.any(losses[q] > (1.0 + t) * np.maximum(base, 1e-12)):
                        first_bad = q
                i = j
            if first_bad == 0 or first_bad is None and not keeps:
                raw.append((g, 0.0, cur, t, base.copy(), base.copy(), macs_before, macs_before, evaluated))
                continue
            acc = (first_bad - 1) if first_bad is not None else len(keeps) - 1
            keep = keeps[acc]
            if np.array_equal(keep, cur):  # the accepted ratio removes nothing: a rejection (t is not advanced)
                raw.append((g, 0.0, cur, t, base.copy(), base.copy(), macs_before, macs_before, evaluated))
                continue
            new_losses = np.asarray(losses[acc])
            accepted[g.space] = keep
            macs_after = gs.macs(accepted)
            raw.append((g, self.grid[acc], keep, t, base.copy(), new_losses, macs_before, macs_after, evaluated))
            base = np.maximum(base, new_losses)
            t *= lam
        # 3. filter: smallest (d loss / d MACs) first, the top-k fraction of all groups considered
        def score(item: tuple) -> float:
            _, ratio, _, _, b, l, mb, ma, _ = item
            return float("inf") if ratio == 0 or mb == ma else float((l.sum() - b.sum()) / (mb - ma))

        ranked = sorted((it for it in raw if it[1] > 0 and it[6] > it[7]), key=score)
        n_keep = min(len(ranked), int(len(cands) * self.topk))
        chosen = {it[0].id for it in ranked[:n_keep]}
        decisions = []
        for it in raw:
            g, ratio, keep, thr, b, l, mb, ma, ev = it
            sel = g.id in chosen
            if sel:
                program.select_channels(g.id, keep)
            decisions.append(PAGCPDecision(g.id, float(ratio), int(keep.sum()), float(thr),
                                           tuple(float(v) for v in b), tuple(float(v) for v in l), int(mb), int(ma),
                                           score(it), sel, int(ev), keep))
        final = oracle.losses([program.leaf_keep()])[0] if chosen else np.asarray(base_round)
        cost = {k: (oracle.stats[k] - calib0[k]) for k in ("seconds", "forwards", "candidates")}
        return PAGCPRound(float(lam), float(t1), float(T), tuple(float(x) for x in schedule),
                          tuple(g.id for g in order), sens, tuple(decisions), base_round,
                          tuple(float(v) for v in final), cost)
