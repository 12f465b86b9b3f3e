"""BatchNorm-scale channel selection: network slimming (``BNScalePrune``) and YOLOv4-style group channel pruning
with per-partition thresholds (``GroupChannelPrune``). Both are selection passes: they write keep-masks for prunable
``"channels"`` groups that contain at least one BatchNorm; ``Shrink`` removes the channels.

A channel's score is ``|gamma|`` aggregated over the group's coupled BatchNorms (residual adds and concats couple
several BNs into one group; ``reduce`` picks mean, max or sum). Groups without a BatchNorm are not scored and keep
all their channels (listed under ``groups_without_bn`` in the stats).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from fxprune.errors import InputError
from fxprune.groups import Group
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program
from fxprune.records import SelectionRecord


REDUCES = ("mean", "max", "sum")
@dataclass(frozen=True)
class PartitionRecord(SelectionRecord):
    """GroupChannelPrune's selection: importance summaries plus the partition each scored group fell into."""

    partition: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "partition", MappingProxyType(dict(self.partition)))


YOLOV4_QUANTILES = (0.18, 0.50, 0.97, 0.865, 0.68)  # the YOLOv4 code's 5 group quantiles (its own partition)


def bn_members(program: Program, group: Group) -> list[tuple[str, np.ndarray]]:
    """(BN weight name, coords) for every BatchNorm scale indexed by ``group``'s channels."""
    roles = program.groups.analysis.param_roles
    return [(m.param, m.coords) for m in group.members if m.dim == 0 and "bn_weight" in roles.get(m.param, set())]


def bn_group_scores(program: Program, group: Group, reduce: str = "mean") -> np.ndarray | None:
    """One score per channel: |gamma| aggregated over the group's BatchNorms (None when it has none)."""
    per_bn = []
    for name, coords in bn_members(program, group):
        t = program.param(name).detach().float().abs().cpu().numpy().reshape(-1)
        s = np.zeros(group.size)
        c = np.zeros(group.size)
        sel = coords >= 0
        np.add.at(s, coords[sel], t[sel])
        np.add.at(c, coords[sel], 1)
        per_bn.append(np.where(c > 0, s / np.maximum(c, 1), np.nan))
    if not per_bn:
        return None
    a = np.stack(per_bn)
    if reduce == "mean":
        out = np.nanmean(a, axis=0)
    elif reduce == "max":
        out = np.nanmax(a, axis=0)
    else:
        out = np.nansum(a, axis=0)
    return np.nan_to_num(out, nan=0.0)


def _ignored(program: Program, ignore: Sequence[str]) -> set[str]:
    names = set()
    alias = program.groups.analysis.param_alias
    for prefix in ignore:
        if not isinstance(prefix, str):
            raise InputError(f"ignore entries must be module or parameter names, got {type(prefix).__name__}",
                             fix="e.g. ignore=['head']")
        for p, canon in alias.items():
            if p == prefix or p.startswith(prefix + ".") or prefix == "":
                names.add(canon)
    return names


def _candidates(program: Program, ignore: Sequence[str]) -> list[Group]:
    ign = _ignored(program, ignore)
    return [g for g in program.groups.prunable()
            if g.kind == "channels" and not (ign and any(m.param in ign for m in g.members))]


def _floor_keep(size: int, min_channels: int, min_fraction: float) -> int:
    return min(size, max(1, int(min_channels), int(math.floor(min_fraction * size))))


def _keep_smallest_removed(scores: np.ndarray, remove: np.ndarray, floor: int) -> np.ndarray:
    """Keep mask from a removal set, restoring the highest-scoring removed channels until ``floor`` are kept."""
    keep = ~remove
    short = floor - int(keep.sum())
    if short > 0:
        cand = np.nonzero(remove)[0]
        best = cand[np.argsort(-scores[cand], kind="stable")[:short]]
        keep[best] = True
    return keep


def _write(program: Program, masks: dict[int, np.ndarray],
           scores: dict[int, np.ndarray]) -> tuple[int, int, dict[int, tuple[float, float, float]]]:
    for gid, m in masks.items():
        program.select_channels(gid, m)
    importance = {gid: (float(s.min()), float(s.mean()), float(s.max())) for gid, s in scores.items() if gid in masks}
    removed = sum(int((~m).sum()) for m in masks.values())
    return removed, sum(1 for m in masks.values() if not m.all()), importance


# ---------------------------------------------------------------------------------------------------- BNScalePrune
@register_pass
class BNScalePrune(Pass):
    """Network slimming on groups: remove the channels with the smallest BN scale.

    ``ratio``: fraction of channels removed. ``scope="layer"`` removes ``floor(ratio * C)`` channels from every
    group; ``scope="global"`` ranks all channels of all groups by raw ``|gamma|`` (one threshold: the ``ratio``
    quantile) so sparse-trained layers lose more. ``min_channels``: each group keeps at least this many.
    ``reduce``: how the gammas of a group's coupled BNs are combined. ``ignore``: module/parameter names left alone.
    """

    name = "bn_scale_prune"
    requires = frozenset({"groups"})

    def __init__(self, ratio: float = 0.5, scope: str = "layer", *, min_channels: int = 1, reduce: str = "mean",
                 ignore: Iterable[str] = ()):
        if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
            raise InputError(f"ratio must be in [0, 1), got {ratio!r}",
                             fix="ratio is the fraction of channels removed, e.g. 0.5")
        if scope == "local":
            scope = "layer"
        if scope not in ("layer", "global"):
            raise InputError(f"scope must be 'layer' or 'global', got {scope!r}",
                             fix="'layer': the same fraction per group; 'global': one |gamma| threshold")
        if reduce not in REDUCES:
            raise InputError(f"reduce must be one of {REDUCES}, got {reduce!r}", fix="use reduce='mean'")
        if isinstance(min_channels, bool) or not (isinstance(min_channels, int) and min_channels >= 1):
            raise InputError(f"min_channels must be an int >= 1, got {min_channels!r}", fix="e.g. min_channels=8")
        self.ratio = float(ratio)
        self.scope = scope
        self.min_channels = min_channels
        self.reduce = reduce
        self.ignore = list(ignore)
        _check_ignore(self.ignore)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gs = program.groups
        scores: dict[int, np.ndarray] = {}
        no_bn = []
        for g in _candidates(program, self.ignore):
            s = bn_group_scores(program, g, self.reduce)
            if s is None:
                no_bn.append(g.id)
            else:
                scores[g.id] = s
        masks: dict[int, np.ndarray] = {}
        threshold = None
        if self.scope == "layer":
            for gid, s in scores.items():
                size = s.size
                keep_n = max(_floor_keep(size, self.min_channels, 0.0),
                             size - int(math.floor(size * self.ratio + 1e-9)))
                order = np.argsort(-s, kind="stable")
                m = np.zeros(size, dtype=bool)
                m[order[:keep_n]] = True
                masks[gid] = m
        elif scores:
            allv = np.concatenate(list(scores.values()))
            n_remove = int(math.floor(allv.size * self.ratio + 1e-9))
            order = np.argsort(allv, kind="stable")
            remove_flat = np.zeros(allv.size, dtype=bool)
            remove_flat[order[:n_remove]] = True
            threshold = float(allv[order[n_remove - 1]]) if n_remove > 0 else None
            off = 0
            for gid, s in scores.items():
                rem = remove_flat[off:off + s.size]
                off += s.size
                masks[gid] = _keep_smallest_removed(s, rem.copy(), _floor_keep(s.size, self.min_channels, 0.0))
        removed, pruned, importance = _write(program, masks, scores)
        return PassResult(program, changed=removed > 0, record=SelectionRecord(importance), stats={
            "scope": self.scope, "ratio": self.ratio, "threshold": threshold, "groups_pruned": pruned,
            "channels_removed": removed, "channels_scored": int(sum(s.size for s in scores.values())),
            "groups_without_bn": no_bn, "macs_dense": gs.macs(),
            "macs_estimate": gs.macs(program.leaf_keep())})


def _check_ignore(ignore: list) -> None:
    for item in ignore:
        if not isinstance(item, str):
            raise InputError(f"ignore entries must be module or parameter names, got {type(item).__name__}",
                             fix="e.g. ignore=['head']")


# ------------------------------------------------------------------------------------------------ GroupChannelPrune
_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")


def _type_name(t: Any) -> str:
    s = t if isinstance(t, str) else getattr(t, "__qualname__", getattr(t, "__name__", str(t)))
    s = str(s).split("'")[1] if str(s).startswith("<class '") else str(s)
    return s.split(".")[-1]


def feature_info(program: Program) -> dict[str, dict[str, Any]]:
    """For every BatchNorm weight used in the graph: its output feature shape, spatial stride relative to the
    graph's image input, module path, and block type (the innermost enclosing module, containers skipped, whose
    subtree holds at least two weight layers: e.g. a C2f or a Bottleneck, not a Conv-BN-Act wrapper)."""
    gm = program.gm
    analysis = program.groups.analysis
    roles = analysis.param_roles
    alias = analysis.param_alias
    in_hw = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor) and v.dim() >= 3 and v.is_floating_point():
                in_hw = [int(s) for s in v.shape[2:]]
                break
    weight_layers = [name for name, shape in program.param_shapes().items() if len(shape) >= 2]

    def layers_under(prefix: str) -> int:
        return sum(1 for w in weight_layers if w.startswith(prefix + "."))

    out: dict[str, dict[str, Any]] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or "bn_weight" not in roles.get(alias.get(n.target, n.target), set()):
            continue
        canon = alias.get(n.target, n.target)
        if canon in out:
            continue
        for u in n.users:
            v = u.meta.get("val")
            if isinstance(v, (tuple, list)):
                v = v[0] if v else None
            if not isinstance(v, torch.Tensor):
                continue
            shape = [int(s) for s in v.shape]
            spatial = shape[2:]
            stride = None
            if in_hw and spatial and len(spatial) == len(in_hw) and all(s > 0 for s in spatial):
                stride = int(round(in_hw[0] / spatial[0]))
            stack = list((u.meta.get("nn_module_stack") or {}).values())
            path, block = "", "layer"
            chain = [(p, _type_name(t)) for p, t in stack]
            if chain:
                path = chain[-1][0]
            for p, tname in reversed(chain[:-1] if len(chain) > 1 else []):
                if p == "" or tname in _CONTAINERS:
                    continue
                if layers_under(p) >= 2:
                    block = tname
                    break
            out[canon] = {"node": u.name, "shape": shape, "stride": stride,
                          "spatial": "x".join(str(s) for s in spatial) or "-", "module": path, "block": block}
            break
    return out


def auto_partition(program: Program, groups: list[Group]) -> dict[int, str]:
    """Partition name per group: ``"s{stride}/{block}"`` from the first BatchNorm of the group (graph order)."""
    info = feature_info(program)
    out = {}
    for g in groups:
        names = [n for n, _ in bn_members(program, g) if n in info]
        if not names:
            continue
        f = info[names[0]]
        scale = f"s{f['stride']}" if f["stride"] is not None else f["spatial"]
        out[g.id] = f"{scale}/{f['block']}"
    return out


@register_pass
class GroupChannelPrune(Pass):
    """Group channel pruning (YOLOv4 recipe): per-partition BN-scale thresholds.

    Prunable groups with a BatchNorm are split into partitions; inside partition ``p`` the ``quantiles[p]``
    fraction of channels with the smallest ``|gamma|`` (pooled over all the partition's groups) is removed, then
    every group keeps at least ``max(min_channels, floor(min_fraction * C))`` channels.

    ``partition="auto"``: by the spatial scale of the BN output (stride w.r.t. the input, from shape metadata) and
    block type (module similarity), named like ``"s8/C2f"``. Or a mapping ``{partition: [module prefixes, parameter
    names or group ids]}`` or a callable ``f(group, program) -> name | None``; unassigned groups are not pruned.
    ``quantiles``: one float for all partitions, a mapping ``{partition name or glob: q}`` (unmatched partitions use
    ``default_quantile``, or are not pruned when it is None), or a sequence matched to the partitions in sorted
    name order (its length must equal the number of partitions). The stats list every partition with its groups,
    quantile, threshold and achieved ratio; the pass' :class:`PartitionRecord` (``program.records_of(PartitionRecord)``) maps group id -> partition.
    """

    name = "group_channel_prune"
    requires = frozenset({"groups"})

    def __init__(self, partition: str | Mapping[str, Sequence[Any]] | Callable[[Group, Program], str | None] = "auto",
                 quantiles: float | Mapping[str, float] | Sequence[float] = 0.5, *, min_channels: int = 16,
                 min_fraction: float = 0.01, default_quantile: float | None = None, reduce: str = "mean",
                 ignore: Iterable[str] = ()):
        if isinstance(partition, str):
            if partition != "auto":
                raise InputError(f"partition must be 'auto', a mapping or a callable, got {partition!r}",
                                 fix="e.g. partition='auto' or partition={'backbone': ['backbone'], 'head': ['head']}")
        elif isinstance(partition, Mapping):
            for k, v in partition.items():
                if not isinstance(k, str) or isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
                    raise InputError(f"partition mapping entries must be name -> list of module names/group ids, got "
                                     f"{k!r}: {v!r}", fix="e.g. {'p3': ['neck.c2f_3', 'head.cv2.0']}")
        elif not callable(partition):
            raise InputError(f"partition must be 'auto', a mapping or a callable, got {type(partition).__name__}",
                             fix="partition='auto'")
        _check_q(quantiles)
        if default_quantile is not None:
            _check_q(default_quantile)
        if isinstance(min_channels, bool) or not (isinstance(min_channels, int) and min_channels >= 1):
            raise InputError(f"min_channels must be an int >= 1, got {min_channels!r}", fix="e.g. min_channels=16")
        if not (isinstance(min_fraction, (int, float)) and 0.0 <= min_fraction <= 1.0):
            raise InputError(f"min_fraction must be in [0, 1], got {min_fraction!r}", fix="e.g. 0.01")
        if reduce not in REDUCES:
            raise InputError(f"reduce must be one of {REDUCES}, got {reduce!r}", fix="use reduce='mean'")
        self.partition = partition if not isinstance(partition, Mapping) else {k: list(v) for k, v in
                                                                                 partition.items()}
        self.quantiles = dict(quantiles) if isinstance(quantiles, Mapping) else (
            list(quantiles) if isinstance(quantiles, (list, tuple)) else quantiles)
        self.min_channels = min_channels
        self.min_fraction = float(min_fraction)
        self.default_quantile = default_quantile
        self.reduce = reduce
        self.ignore = list(ignore)
        _check_ignore(self.ignore)

    # ------------------------------------------------------------------ partitioning
    def assign(self, program: Program, groups: list[Group]) -> dict[int, str]:
        if self.partition == "auto":
            return auto_partition(program, groups)
        out: dict[int, str] = {}
        if callable(self.partition) and not isinstance(self.partition, Mapping):
            for g in groups:
                name = self.partition(g, program)
                if name is not None:
                    out[g.id] = str(name)
            return out
        alias = program.groups.analysis.param_alias
        for pname, items in self.partition.items():
            for item in items:
                if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                    hits = [g for g in groups if g.id == int(item)]
                elif isinstance(item, str):
                    params = {c for p, c in alias.items() if p == item or p.startswith(item + ".")}
                    hits = [g for g in groups if any(m.param in params for m in g.members if m.dim == 0)]
                else:
                    raise InputError(f"partition {pname!r}: entries must be module names or group ids, got "
                                     f"{item!r}", fix="e.g. {'p3': ['neck.0', 12]}")
                for g in hits:
                    out.setdefault(g.id, pname)
        return out

    def quantile_for(self, pname: str, order: list[str]) -> float | None:
        q = self.quantiles
        if isinstance(q, (int, float)):
            return float(q)
        if isinstance(q, list):
            if len(q) != len(order):
                raise InputError(f"{len(q)} quantiles for {len(order)} partitions ({', '.join(order)})",
                                 fix="give one quantile per partition, or a mapping {partition: q}")
            return float(q[order.index(pname)])
        if pname in q:
            return float(q[pname])
        for pat, v in q.items():
            if fnmatch.fnmatchcase(pname, pat):
                return float(v)
        return None if self.default_quantile is None else float(self.default_quantile)

    # ------------------------------------------------------------------ run
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gs = program.groups
        cands = _candidates(program, self.ignore)
        scores: dict[int, np.ndarray] = {}
        no_bn = []
        for g in cands:
            s = bn_group_scores(program, g, self.reduce)
            if s is None:
                no_bn.append(g.id)
            else:
                scores[g.id] = s
        assigned = {gid: p for gid, p in self.assign(program, [g for g in cands if g.id in scores]).items()
                    if gid in scores}
        order = sorted(set(assigned.values()), key=_partition_key)
        masks: dict[int, np.ndarray] = {}
        parts: dict[str, dict[str, Any]] = {}
        for pname in order:
            gids = [gid for gid in scores if assigned.get(gid) == pname]
            q = self.quantile_for(pname, order)
            allv = np.concatenate([scores[gid] for gid in gids])
            entry: dict[str, Any] = {"groups": gids, "labels": [gs[gid].label for gid in gids], "quantile": q,
                                     "channels": int(allv.size)}
            if q is None:
                entry.update({"threshold": None, "removed": 0, "ratio": 0.0, "note": "no quantile: not pruned"})
                parts[pname] = entry
                continue
            n_remove = int(math.floor(allv.size * q + 1e-9))
            order_idx = np.argsort(allv, kind="stable")
            rem_flat = np.zeros(allv.size, dtype=bool)
            rem_flat[order_idx[:n_remove]] = True
            off = 0
            removed = 0
            floored = []
            for gid in gids:
                s = scores[gid]
                rem = rem_flat[off:off + s.size].copy()
                off += s.size
                floor = _floor_keep(s.size, self.min_channels, self.min_fraction)
                m = _keep_smallest_removed(s, rem, floor)
                if int(m.sum()) > int((~rem).sum()):
                    floored.append(gid)
                masks[gid] = m
                removed += int((~m).sum())
            entry.update({"threshold": float(allv[order_idx[n_remove - 1]]) if n_remove > 0 else None,
                          "removed": removed, "ratio": removed / max(allv.size, 1), "floored_groups": floored})
            parts[pname] = entry
        n_removed, pruned, importance = _write(program, masks, scores)
        unassigned = [gid for gid in scores if gid not in assigned]
        record = PartitionRecord(importance, partition=dict(assigned))
        return PassResult(program, changed=n_removed > 0, record=record, stats={
            "partitions": parts, "unassigned_groups": unassigned, "groups_without_bn": no_bn,
            "groups_pruned": pruned, "channels_removed": n_removed, "macs_dense": gs.macs(),
            "macs_estimate": gs.macs(program.leaf_keep())})


def _partition_key(name: str) -> tuple:
    head = name.split("/")[0]
    if head.startswith("s") and head[1:].isdigit():
        return (0, int(head[1:]), name)
    return (1, 0, name)


def _check_q(q: Any) -> None:
    def ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0

    if isinstance(q, Mapping):
        bad = {k: v for k, v in q.items() if not ok(v) or not isinstance(k, str)}
    elif isinstance(q, (list, tuple)):
        bad = {i: v for i, v in enumerate(q) if not ok(v)}
        if not q:
            bad = {"quantiles": "empty"}
    else:
        bad = {} if ok(q) else {"quantiles": q}
    if bad:
        raise InputError(f"quantiles must be fractions in [0, 1) (the share of channels removed per partition); "
                         f"bad: {bad}", fix="e.g. quantiles=0.5 or quantiles={'s8/*': 0.3, 's32/*': 0.7}")
