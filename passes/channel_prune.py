"""ChannelPrune: score channels of every prunable group and write keep-masks (a selection pass; nothing is removed
until Shrink).
"""
from __future__ import annotations

import difflib
import heapq
import math
import re
from typing import Any, Iterable

import numpy as np
import torch.nn as nn

from fxprune.errors import BudgetError, InputError
from fxprune.groups import Group, GroupSet
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program
from fxprune.records import SelectionRecord

from . import activation_importance  # noqa: F401 (registers ActivationImportance for recipes)
from . import importance as imp


@register_pass
class ChannelPrune(Pass):
    """Remove a fraction of the channels of every prunable group (or meet a MACs target).

    ``ratio``: fraction of channels removed per group (scope="local") or over all groups (scope="global").
    ``target_macs``: instead of a ratio, the MACs budget (absolute, or a fraction of the dense MACs if < 1); the
    ratio is found by bisection on the analytic MACs model, then what rounding left of the budget is filled back
    (``round_to`` channels at a time, most important first). ``round_to`` keeps channel counts multiples of it.
    ``ignore``: modules or parameter names whose groups are left alone. ``heads``: also prune outer factors
    (attention heads, conv groups); by default only innermost channels are pruned (HeadPrune handles heads).

    ``target_params``: instead of a ratio, the parameter budget (absolute, or a fraction of the dense count if < 1),
    found by bisection on the exact parameter count of the selection.
    ``scope="uniform"``: every layer keeps the same width per role (groups whose members are the same parameters
    up to the layer index: each layer's MLP, each layer's heads), and the per-head width (head_dim, shared with
    rotary frequencies) is left alone, so the result is expressible in a stock config (``fxprune.hf``).
    ``norms``: what to do with the dims that normalisation statistics observe (the hidden size of a transformer):
    ``"freeze"`` (default: never pruned), ``"exact"`` (pruned; Shrink pins the statistics' original divisor, so
    shrunk == masked is verified) or ``"renormalize"`` (pruned; the norms normalise over the kept width like a
    smaller stock model, which is *not* the masked program: the report says approximate, with the deviation).
    ``norm_scale``: groups that normalisations observe (the hidden size) are pruned at ``norm_scale * ratio`` (local
    and uniform scopes; 0 keeps them), e.g. to prune the residual stream less than the MLPs.
    ``importance="activation"`` / ``"taylor"``: calibration importance over ``ctx.data``
    (:mod:`fxprune.passes.activation_importance`; Minitron's activation criterion, first-order Taylor).
    """

    name = "channel_prune"
    requires = frozenset({"groups"})

    def __init__(self, ratio: float | None = None, *, target_macs: float | None = None,
                 target_params: float | None = None, importance: Any = "l2", scope: str = "local",
                 round_to: int = 1, ignore: str | Iterable[Any] = (), heads: bool = False, max_ratio: float = 0.9,
                 norms: str = "freeze", norm_scale: float = 1.0):
        if sum(x is not None for x in (ratio, target_macs, target_params)) != 1:
            raise InputError("give exactly one of ratio=, target_macs= or target_params=",
                             fix="e.g. ChannelPrune(ratio=0.5), ChannelPrune(target_macs=0.5) or "
                                 "ChannelPrune(target_params=0.8)")
        if target_params is not None and not (isinstance(target_params, (int, float)) and target_params > 0):
            raise InputError(f"target_params must be > 0, got {target_params!r}",
                             fix="a fraction of the dense parameter count (e.g. 0.8) or an absolute count")
        from fxprune.rules.norm import NORM_MODES

        if norms not in NORM_MODES:
            raise InputError(f"norms must be one of {', '.join(map(repr, NORM_MODES))}, got {norms!r}",
                             fix="norms='exact' prunes the hidden size and verifies it; 'renormalize' is "
                                 "approximate; 'freeze' keeps it")
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
            raise InputError(f"ratio must be in [0, 1), got {ratio!r}",
                             fix="ratio is the fraction of channels removed, e.g. 0.5")
        if target_macs is not None and not (isinstance(target_macs, (int, float)) and target_macs > 0):
            raise InputError(f"target_macs must be > 0, got {target_macs!r}",
                             fix="a fraction of the dense MACs (e.g. 0.5) or an absolute count")
        if scope not in ("local", "global", "uniform"):
            raise InputError(f"scope must be 'local', 'global' or 'uniform', got {scope!r}", fix="use scope='local'")
        if not (isinstance(round_to, int) and round_to >= 1):
            raise InputError(f"round_to must be a positive int, got {round_to!r}", fix="e.g. round_to=8")
        imp.resolve(importance)  # validate early
        self.ratio = ratio
        self.target_macs = target_macs
        self.target_params = target_params
        self.norms = norms
        if not (isinstance(norm_scale, (int, float)) and 0.0 <= norm_scale <= 1.0):
            raise InputError(f"norm_scale must be in [0, 1], got {norm_scale!r}",
                             fix="the hidden size is pruned at norm_scale * ratio, e.g. 0.25")
        self.norm_scale = norm_scale
        self._normalized: set[int] = set()  # set per run: groups observed by normalisations
        self.importance = importance
        self.scope = scope
        self.round_to = round_to
        if not (isinstance(max_ratio, (int, float)) and 0.0 < max_ratio < 1.0):
            raise InputError(f"max_ratio must be in (0, 1), got {max_ratio!r}",
                             fix="the largest fraction of one group that a global selection may remove, e.g. 0.9")
        self.ignore = [ignore] if isinstance(ignore, str) else list(ignore)  # one string is one name
        self.heads = heads
        self.max_ratio = max_ratio

    # ------------------------------------------------------------------ helpers
    def _ignored_params(self, program: Program) -> set[str]:
        names: set[str] = set()
        by_id = {}
        for n, mod in (program.source.named_modules() if program.source is not None else []):
            by_id[id(mod)] = n
        for item in self.ignore:
            if isinstance(item, str):
                prefix = item
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise InputError(f"ignore[...] module {type(item).__name__} is not part of the model",
                                     fix="pass a submodule of the compiled model or its qualified name")
                prefix = by_id[id(item)]
            else:
                raise InputError(f"ignore entries must be modules or names, got {type(item).__name__}",
                                 fix="e.g. ignore=[model.fc] or ignore=['fc']")
            hit = False
            for p in program.groups.analysis.param_alias:
                if p == prefix or p.startswith(prefix + ".") or prefix == "":
                    names.add(program.groups.analysis.param_alias[p])
                    hit = True
            if not hit:
                modules = sorted({p.rsplit(".", 1)[0] for p in program.groups.analysis.param_alias})
                close = difflib.get_close_matches(prefix, modules, n=3)
                raise InputError(f"ignore={prefix!r} matches no module or parameter of the model"
                                 + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""),
                                 fix="use qualified module names as in model.named_modules(), e.g. 'fc' or "
                                     "'layer1.0.conv1'")
        return names

    def candidates(self, program: Program) -> list[Group]:
        ignored = self._ignored_params(program)
        gs = program.groups
        out = []
        for g in gs.prunable():
            if g.kind == "heads" and not self.heads:
                continue
            if ignored and any(m.param in ignored for m in g.members):
                continue
            if self.scope == "uniform" and g.kind == "channels" and any(gs[r].kind == "heads" for r in g.related):
                continue  # per-head width (head_dim, rotary frequencies): one value for q/k/v in a stock config
            out.append(g)
        return out

    def _keep_count(self, size: int, ratio: float) -> int:
        keep = size - int(math.floor(size * ratio + 1e-9))
        if self.round_to > 1:
            keep = min(size, int(math.ceil(keep / self.round_to)) * self.round_to)
        return max(1, keep)

    def select(self, groups: list[Group], scores: dict[int, np.ndarray], ratio: float) -> dict[int, np.ndarray]:
        masks: dict[int, np.ndarray] = {}
        if self.scope in ("local", "uniform"):  # uniform: equal-size groups of one role keep equal counts
            for g in groups:
                k = self._keep_count(g.size, ratio * (self.norm_scale if g.id in self._normalized else 1.0))
                masks[g.id] = _top_k(scores[g.id], k)
            return masks
        # global: one threshold over normalised scores, bounded per group by max_ratio and rounding
        allv = np.concatenate([scores[g.id] / (scores[g.id].mean() + 1e-12) for g in groups]) if groups else []
        if len(allv) == 0:
            return masks
        n_remove = int(math.floor(len(allv) * ratio))
        thr = np.sort(allv)[n_remove - 1] if n_remove > 0 else -np.inf
        for g in groups:
            s = scores[g.id] / (scores[g.id].mean() + 1e-12)
            k = int((s > thr).sum())
            k = max(k, g.size - int(math.floor(g.size * self.max_ratio)))
            k = self._keep_count(g.size, 1 - k / g.size)
            masks[g.id] = _top_k(scores[g.id], k)
        return masks

    # ------------------------------------------------------------------ run
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gs = use_norm_mode(program, self.norms)
        self._normalized = normalized_groups(gs)
        groups = self.candidates(program)
        if self.scope == "uniform":
            _check_uniform(groups)
        score_fn = imp.prepare(self.importance, program, groups, ctx)
        scores: dict[int, np.ndarray] = {}
        skipped = []
        for g in groups:
            s = score_fn(program, g, ctx)
            if s is None:
                skipped.append(g.id)
                continue
            scores[g.id] = _checked_scores(s, g)
        groups = [g for g in groups if g.id in scores]
        prior = program.leaf_keep()
        dense_macs = gs.macs()
        if self.target_macs is not None:
            target = self.target_macs * dense_macs if self.target_macs < 1 else self.target_macs
            ratio = self._solve_ratio(gs, groups, scores, prior, target, dense_macs)
        elif self.target_params is not None:
            dense_params = count_params_at(program, {})
            target = self.target_params * dense_params if self.target_params < 1 else self.target_params
            ratio = self._solve_ratio(gs, groups, scores, prior, target, dense_params,
                                      cost=lambda keep: count_params_at(program, keep), what="target_params",
                                      unit="parameters")
        else:
            ratio = float(self.ratio)
        masks = self.select(groups, scores, ratio)
        filled = 0
        if self.target_macs is not None and self.scope != "uniform":
            filled = self._fill_budget(gs, groups, scores, prior, masks, target, gs.macs)
        elif self.target_params is not None and self.scope != "uniform":
            filled = self._fill_budget(gs, groups, scores, prior, masks, target,
                                       lambda keep: count_params_at(program, keep))
        for gid, m in masks.items():
            # a group kept whole stays as wide as it was (24 channels under round_to=16): no divisor to record
            program.select_channels(gid, m, divisor=self.round_to if m.size >= self.round_to and not m.all()
                                    else None)
        record = SelectionRecord(
            {gid: (float(scores[gid].min()), float(scores[gid].mean()), float(scores[gid].max())) for gid in masks})
        est = gs.macs(program.leaf_keep())
        removed = sum(int((~m).sum()) for m in masks.values())
        stats = {"ratio": round(ratio, 4), "groups_pruned": sum(1 for m in masks.values() if not m.all()),
                 "channels_removed": removed, "groups_unscored": skipped, "macs_dense": dense_macs,
                 "macs_estimate": est}
        if filled:
            stats["units_filled"] = filled
        if self.target_params is not None:
            stats["params_estimate"] = count_params_at(program, program.leaf_keep())
        if self.norms != "freeze":
            stats["norm_mode"] = self.norms
        return PassResult(program, changed=removed > 0, stats=stats, record=record)

    def _fill_budget(self, gs: GroupSet, groups: list[Group], scores: dict[int, np.ndarray],
                     prior: dict[int, np.ndarray], masks: dict[int, np.ndarray], target: float, cost: Any) -> int:
        """Give back what the bisection left of the budget: the cost of a selection jumps when many groups cross
        a rounding step at once (equal-sized groups with alike scores under ``round_to=16`` went from 0.5 to 0.31
        of the MACs), so the ratio that meets the target can keep far less. Channels are added back a unit at a
        time (``round_to`` channels, the group's next best by score), the unit with the highest mean normalised
        score first, while the cost stays within ``target``. Updates ``masks``; returns the units added."""
        unit = self.round_to

        def keep_of(ms: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
            keep = dict(prior)
            for gid, m in ms.items():
                leaf = gs[gid].space
                keep[leaf] = m & prior[leaf] if leaf in prior else m
            return keep

        if cost(keep_of(masks)) > target:
            return 0
        norm = {g.id: scores[g.id] / (scores[g.id].mean() + 1e-12) for g in groups if g.id in masks}
        order = {gid: np.argsort(-scores[gid], kind="stable") for gid in norm}
        heap: list[tuple[float, int, int]] = []

        def push(gid: int) -> None:
            k, size = int(masks[gid].sum()), masks[gid].size
            if k < size:
                nxt = order[gid][k:min(size, k + unit)]
                heapq.heappush(heap, (-float(np.mean(norm[gid][nxt])), gid, min(size, k + unit)))

        for gid in norm:
            push(gid)
        added = 0
        while heap:
            _, gid, k = heapq.heappop(heap)
            trial = dict(masks)
            trial[gid] = _top_k(scores[gid], k)
            if cost(keep_of(trial)) <= target:
                masks[gid] = trial[gid]
                added += 1
                push(gid)
        return added

    def _solve_ratio(self, gs: GroupSet, groups: list[Group], scores: dict[int, np.ndarray],
                     prior: dict[int, np.ndarray], target: float, dense: int, cost: Any = None,
                     what: str = "target_macs", unit: str = "MACs") -> float:
        cost = gs.macs if cost is None else cost

        def macs_at(r: float) -> int:
            keep = dict(prior)
            for gid, m in self.select(groups, scores, r).items():
                leaf = gs[gid].space
                keep[leaf] = m & prior[leaf] if leaf in prior else m
            return cost(keep)

        floor_macs = macs_at(0.999 if self.scope != "global" else self.max_ratio)
        if floor_macs > target:
            raise BudgetError(
                f"{what}={target:.4g} is below what the frozen channels allow (at least {floor_macs:.4g} {unit} "
                f"of {dense:.4g} remain when every prunable group keeps its minimum)",
                fix=f"raise {what} to >= {floor_macs / dense:.3f} of the dense {unit}, or unfreeze more layers")
        lo, hi = 0.0, 0.999
        for _ in range(30):
            mid = (lo + hi) / 2
            if macs_at(mid) > target:
                lo = mid
            else:
                hi = mid
        return hi


def use_norm_mode(program: Program, norms: str) -> GroupSet:
    """Make ``program``'s cached ``"groups"`` analysis the one for ``norms`` (see ChannelPrune) and return it.

    The norm modes only change which dims are frozen, never the spaces, so group ids stay those of the default
    analysis (checked); Shrink then uses this analysis, whose norm nodes carry the mode for their rewrite."""
    from fxprune.analyzer import analyze_graph
    from fxprune.rules.norm import norm_rules

    gs = program.groups
    if norms == "freeze" or getattr(gs, "norm_mode", "freeze") == norms:
        return gs
    new = GroupSet(analyze_graph(program.gm, rules=norm_rules(norms)), program.param_shapes())
    if [(g.space, g.size) for g in new] != [(g.space, g.size) for g in gs]:
        raise InputError(f"norms={norms!r} changed the channel groups of this graph (a rule bug)",
                         fix="use norms='freeze' and report this model")
    new.norm_mode = norms  # type: ignore[attr-defined]
    program.analyses.put("groups", new)
    return new


def normalized_groups(gs: GroupSet) -> set[int]:
    """Ids of the groups whose channels a normalisation statistic observes (recorded by the norm-mode rules)."""
    t = gs.analysis.table
    out: set[int] = set()
    for aux in gs.analysis.aux.values():
        info = aux.get("norm") if isinstance(aux, dict) else None
        for s in (info or {}).get("dims", ()):
            for leaf in t.leaves(s):
                g = gs.by_space(leaf)
                if g is not None:
                    out.add(g.id)
    return out


_LAYER = re.compile(r"\.\d+\.")


def role_of(g: Group) -> tuple:
    """A group's role: its kind and members with layer indices wildcarded (``layers.3.mlp`` -> ``layers.*.mlp``)."""
    return (g.kind, tuple(sorted({(_LAYER.sub(".*.", m.param), m.dim) for m in g.members})))


def _check_uniform(groups: list[Group]) -> None:
    sizes: dict[tuple, set[int]] = {}
    for g in groups:
        sizes.setdefault(role_of(g), set()).add(g.size)
    bad = {r: s for r, s in sizes.items() if len(s) > 1}
    if bad:
        r, s = next(iter(bad.items()))
        raise InputError(f"scope='uniform': the groups of role {r[1][0][0]!r} have different sizes {sorted(s)}, so "
                         "equal per-layer widths cannot be chosen", fix="use scope='local'")


def count_params_at(program: Program, leaf_keep: dict[int, np.ndarray]) -> int:
    """Parameters (not buffers) the program keeps under ``leaf_keep`` (tied parameters counted once)."""
    from fxprune.masking import param_keep

    keep = param_keep(program.groups, leaf_keep) if leaf_keep else {}
    shapes = program.groups.param_shapes
    total = 0
    for name in program.groups.analysis.param_spaces:
        t = program.param(name)
        if not isinstance(t, nn.Parameter):
            continue
        n = 1
        dims = keep.get(name, [None] * t.dim())
        for d, size in enumerate(shapes.get(name, tuple(t.shape))):
            k = dims[d] if d < len(dims) else None
            n *= int(k.sum()) if k is not None else int(size)
        total += n
    return total


def _checked_scores(s: Any, g: Group) -> np.ndarray:
    """Importance scores as float64, or InputError naming the group when they are malformed."""
    try:
        arr = np.asarray(s.detach().cpu() if hasattr(s, "detach") else s, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"importance for group {g.id} ({g.label}) is not numeric: {type(s).__name__}",
                         fix="return one float score per channel") from e
    if arr.shape != (g.size,):
        raise InputError(f"importance for group {g.id} ({g.label}) has shape {arr.shape}, expected ({g.size},)",
                         fix="return one score per channel of the group (g.size of them)")
    if not np.isfinite(arr).all():
        raise InputError(f"importance for group {g.id} ({g.label}) contains NaN or Inf "
                         f"({int((~np.isfinite(arr)).sum())} of {g.size})",
                         fix="check the weights for NaN/Inf, or make the importance callable return finite scores")
    return arr


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    mask = np.zeros(scores.shape[0], dtype=bool)
    mask[order[:k]] = True
    return mask
