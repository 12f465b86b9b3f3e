"""Calibration importance: channel, head and neuron scores from activations on real data (``ctx.data``).

Criteria (one score per channel of every group, higher = more important):

* ``"activation"`` -- Minitron's activation criterion (Muralidharan et al. 2024, "Compact Language Models via
  Pruning and Knowledge Distillation"): the magnitude of the activations a channel feeds into the next layer.
  For every *site* (the input of a linear/conv/matmul with a parameter weight, i.e. where a channel is consumed)
  we accumulate the per-position sum of squares over all tokens of all batches; a channel's score at a site is the
  root mean square of its positions: for an MLP neuron the input of ``down_proj`` (Minitron's neuron criterion),
  for an attention head the L2 norm of the head's output entering ``o_proj`` (the head criterion: all head_dim
  positions of the head), for the hidden size the normalised inputs of q/k/v, gate/up and the LM head (the
  embedding-channel criterion on the norm outputs). Groups consumed nowhere by a parameter (the q/k head_dim,
  which only meets the attention product) use the outputs of their producing layers instead.
* ``"taylor"`` -- first-order Taylor expansion of the loss on the same sites (Molchanov et al. 2017/2019):
  removing channel ``c`` changes the loss by about ``sum_{positions of c} a * dL/da``; the score is the absolute
  value of that sum per sequence, summed over sequences. The loss is next-token cross entropy for models fed
  ``input_ids`` that return logits, or ``loss=fn(outputs, batch)``.

A channel seen at several sites gets the mean of its per-site scores, each site normalised by its mean (as the
magnitude criteria do). Statistics are streamed: per batch only the running per-position sums are kept (float64),
never the activations of the data set. The same data in the same order gives bit-identical scores.
Under ``torch.distributed`` (a process group initialised, e.g. by ``torchrun``) each rank runs its own shard of
the data (:func:`fxprune.calibration.shard`) and the sums are added over the ranks before scoring
(:class:`fxprune.calibration.Accumulator`): the single-process scores up to float64 addition order.

Batches come from ``ctx.data`` (any iterable; ``fxprune.compile(..., data=loader)``): a dict of keyword inputs, a
tuple of positional inputs or one tensor, shaped like the example inputs (the traced graph has static sizes but
for a dynamic batch dimension). Non-tensor example keyword inputs (``use_cache=False``) are added.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxprune.errors import InputError
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program
from fxprune.records import Record

aten = torch.ops.aten
CRITERIA = ("activation", "taylor")
_CONSUMERS = {aten.linear: 0, aten.matmul: 0, aten.mm: 0, aten.addmm: 1, aten.conv1d: 0, aten.conv2d: 0,
              aten.conv3d: 0, aten.convolution: 0}
_WEIGHT_ARG = {aten.linear: 1, aten.matmul: 1, aten.mm: 1, aten.addmm: 2, aten.conv1d: 1, aten.conv2d: 1,
               aten.conv3d: 1, aten.convolution: 1}
_CONV = {aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution}


@dataclass(frozen=True)
class ImportanceRecord(Record):
    """Scores per group id from a calibration run (``criterion``, batches and tokens seen). ``graph_id`` ties the
    scores to the graph they index (ChannelPrune uses them only on that graph)."""

    criterion: str
    scores: Mapping[int, np.ndarray] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0
    graph_id: int = 0

    def __post_init__(self) -> None:
        frozen = {}
        for k, v in self.scores.items():
            a = np.array(v, dtype=np.float64, copy=True)
            a.setflags(write=False)
            frozen[int(k)] = a
        object.__setattr__(self, "scores", MappingProxyType(frozen))


@dataclass
class _Site:
    node: str
    dim: int  # channel dim of the activation (negative: from the end)
    maps: list[tuple[int, np.ndarray]]  # (group id, channel of each position or -1)
    size: int
    ss: np.ndarray | None = None  # per-position sum of squares (activation)
    taylor: dict[int, np.ndarray] = field(default_factory=dict)  # group id -> per-channel sum over sequences
    count: int = 0  # rows (tokens) accumulated


def _packet(n: fx.Node) -> Any:
    t = n.target
    return t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t


def _maps(program: Program, node: fx.Node, dim: int, wanted: set[int]) -> tuple[list[tuple[int, np.ndarray]], int]:
    gs = program.groups
    a = gs.analysis
    sp = a.node_spaces.get(node.name)
    if not isinstance(sp, list) or not sp or not isinstance(sp[0], int):
        return [], 0
    s = sp[dim]
    out = []
    for leaf, idx in a.table.coords(s):
        g = gs.by_space(leaf)
        if g is not None and g.id in wanted:
            out.append((g.id, idx))
    return out, a.table.size(a.table.find(s))


def find_sites(program: Program, groups: Iterable[int] | None = None) -> list[_Site]:
    """Where each group's channels are measured: inputs of parameter-weighted linear/conv/matmul nodes (consumer
    sites), and for groups consumed nowhere else the outputs of their producing nodes."""
    gs = program.groups
    wanted = {g.id for g in gs} if groups is None else set(groups)
    sites: dict[tuple[str, int], _Site] = {}
    covered: set[int] = set()
    producers: list[tuple[fx.Node, int]] = []
    for n in program.gm.graph.nodes:
        if n.op != "call_function":
            continue
        op = _packet(n)
        if op not in _CONSUMERS:
            continue
        w = n.args[_WEIGHT_ARG[op]] if len(n.args) > _WEIGHT_ARG[op] else None
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        x = n.args[_CONSUMERS[op]]
        dim = 1 if op in _CONV else -1
        producers.append((n, dim))
        if not isinstance(x, fx.Node) or (x.name, dim) in sites:
            continue
        maps, size = _maps(program, x, dim, wanted)
        if maps:
            sites[(x.name, dim)] = _Site(x.name, dim, maps, size)
            covered.update(g for g, _ in maps)
    missing = wanted - covered
    if missing:
        for n, dim in producers:
            maps, size = _maps(program, n, dim, missing)
            if maps and (n.name, dim) not in sites:
                sites[(n.name, dim)] = _Site(n.name, dim, maps, size)
    return list(sites.values())


class _Recorder:
    active: "_Recorder | None" = None

    def __init__(self, sites: list[_Site], criterion: str):
        self.sites = sites
        self.criterion = criterion
        self.tensors: list[tuple[_Site, torch.Tensor]] = []

    def see(self, site: _Site, x: torch.Tensor) -> None:
        d = site.dim % x.dim()
        if self.criterion == "activation":
            with torch.no_grad():
                xd = x.detach().to(torch.float64)
                other = [i for i in range(x.dim()) if i != d]
                ss = xd.pow(2).sum(other).numpy() if other else xd.pow(2).numpy()
            site.ss = ss if site.ss is None else site.ss + ss
            site.count += x.numel() // max(x.shape[d], 1)
        else:
            self.tensors.append((site, x))


def _record(x: Any, i: int) -> Any:
    rec = _Recorder.active
    if rec is not None and isinstance(x, torch.Tensor):
        rec.see(rec.sites[i], x)
    return x


def _instrument(gm: fx.GraphModule, sites: list[_Site]) -> fx.GraphModule:
    """A module sharing ``gm``'s parameters whose graph passes every site through ``_record``."""
    graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph)
    out.meta = dict(gm.meta)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    by_name = {n.name: n for n in graph.nodes}
    for i, s in enumerate(sites):
        n = by_name[s.node]
        with graph.inserting_after(n):
            graph.call_function(_record, (n, i))
    out.recompile()
    return out


def _call_inputs(program: Program, batch: Any) -> tuple[tuple, dict]:
    """Batch -> (args, kwargs) like the example inputs, adding the examples' non-tensor keyword values."""
    static = {k: v for k, v in program.kwargs.items() if not isinstance(v, torch.Tensor)}
    if isinstance(batch, Mapping):
        return (), {**static, **dict(batch)}
    if isinstance(batch, torch.Tensor):
        if program.args:
            return (batch,), dict(program.kwargs)
        keys = [k for k, v in program.kwargs.items() if isinstance(v, torch.Tensor)]
        if len(keys) != 1:
            raise InputError("a calibration batch is one tensor but the example inputs have several tensor "
                             f"keyword inputs {keys}", fix="make the data loader yield dicts of keyword inputs")
        return (), {**static, keys[0]: batch}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), dict(program.kwargs)
    raise InputError(f"calibration batches must be dicts, tuples or tensors, got {type(batch).__name__}",
                     fix="yield e.g. {'input_ids': ids} from the data loader")


def lm_loss(outputs: Any, batch: tuple[tuple, dict]) -> torch.Tensor:
    """Next-token cross entropy of the first 3-D floating output against ``input_ids`` (or the first integer
    input)."""
    args, kwargs = batch
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = next((a for a in args if isinstance(a, torch.Tensor) and not a.is_floating_point()), None)
    logits = next((x for x in tree_flatten(outputs)[0] if isinstance(x, torch.Tensor) and x.is_floating_point()
                   and x.dim() == 3), None)
    if ids is None or logits is None:
        raise InputError("importance='taylor' needs a loss: the model's outputs have no (batch, seq, vocab) logits "
                         "for next-token loss on input_ids", fix="pass loss=fn(outputs, (args, kwargs)) -> scalar")
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       ids[:, 1:].reshape(-1))


def _unflatten_out(gm: fx.GraphModule, out: Any) -> Any:
    spec = getattr(gm, "_out_spec", None)
    if spec is None or not isinstance(out, (list, tuple)):
        return out
    try:
        return tree_unflatten(list(out), spec)
    except Exception:
        return out


def calibration_scores(program: Program, ctx: PassContext | Any, *, criterion: str = "activation",
                       data: Any = None, max_batches: int | None = None,
                       loss: Callable[[Any, tuple[tuple, dict]], torch.Tensor] | None = None,
                       groups: Iterable[int] | None = None) -> dict[int, np.ndarray]:
    """Scores per group id for ``criterion`` over the batches of ``data`` (default ``ctx.data``); groups no site
    sees are absent. See the module docstring."""
    if criterion not in CRITERIA:
        raise InputError(f"criterion must be one of {CRITERIA}, got {criterion!r}", fix="use 'activation'")
    data = getattr(ctx, "data", None) if data is None else data
    if data is None:
        raise InputError(f"importance {criterion!r} needs calibration data, but no data was given",
                         fix="pass data=<iterable of batches> to fxprune.compile (a list of {'input_ids': ...} "
                             "dicts works)")
    if any(t.is_meta for t in program.gm.parameters()):
        raise InputError(f"importance {criterion!r} needs weight values, but the model is on the meta device",
                         fix="load real weights first")
    sites = find_sites(program, groups)
    gm = _instrument(program.gm, sites)
    rec = _Recorder(sites, criterion)
    loss = lm_loss if loss is None else loss
    n_batches = tokens = 0
    params = [p for p in gm.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    prev, _Recorder.active = _Recorder.active, rec
    try:
        if criterion == "taylor":
            for p in params:
                p.requires_grad_(True)
        for batch in data:
            if max_batches is not None and n_batches >= max_batches:
                break
            args, kwargs = _call_inputs(program, batch)
            if criterion == "activation":
                with torch.no_grad():
                    gm(*args, **kwargs)
            else:
                with torch.enable_grad():
                    out = gm(*args, **kwargs)
                    value = loss(_unflatten_out(gm, out), (args, kwargs))
                    xs = [x for _, x in rec.tensors]
                    grads = torch.autograd.grad(value, xs, allow_unused=True)
                for (site, x), g in zip(rec.tensors, grads):
                    _taylor_accumulate(site, x.detach(), g)
                rec.tensors.clear()
                del out, value, grads, xs
            first = next((v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)), None)
            tokens += int(first.shape[0] * (first.shape[1] if first.dim() > 1 else 1)) if first is not None else 0
            n_batches += 1
    finally:
        _Recorder.active = prev
        rec.tensors.clear()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    n_batches, tokens = _reduce(sites, criterion, n_batches, tokens)  # over torch.distributed ranks, if any
    if n_batches == 0:
        raise InputError("the calibration data yielded no batches", fix="pass a non-empty iterable as data=")
    return _combine(program, sites, criterion)


def _reduce(sites: list[_Site], criterion: str, n_batches: int, tokens: int) -> tuple[int, int]:
    """Sum every site's statistics over the ranks of a ``torch.distributed`` process group
    (:class:`fxprune.calibration.Accumulator`; each rank ran its shard of the data); a no-op in one process.
    Returns the total (batches, tokens)."""
    from fxprune.calibration import Accumulator, distributed

    if not distributed():
        return n_batches, tokens
    acc = Accumulator()
    acc.add("batches", n_batches)
    acc.add("tokens", tokens)
    for i, s in enumerate(sites):
        acc.add(f"{i}.count", s.count)
        if criterion == "activation":
            acc.add(f"{i}.seen", s.ss is not None)
            acc.add(f"{i}.ss", s.ss if s.ss is not None else np.zeros(s.size))
        for gid, idx in s.maps:
            sel = idx >= 0
            size = int(idx[sel].max()) + 1 if sel.any() else 0
            acc.add(f"{i}.{gid}.seen", gid in s.taylor)
            acc.add(f"{i}.{gid}.taylor", s.taylor.get(gid, np.zeros(size)))
    acc.reduce()
    for i, s in enumerate(sites):
        s.count = int(acc.get(f"{i}.count"))
        if criterion == "activation":
            s.ss = acc.get(f"{i}.ss") if acc.get(f"{i}.seen") > 0 else None
        for gid, _ in s.maps:
            if acc.get(f"{i}.{gid}.seen") > 0:
                s.taylor[gid] = acc.get(f"{i}.{gid}.taylor")
    return int(acc.get("batches")), int(acc.get("tokens"))


def _taylor_accumulate(site: _Site, x: torch.Tensor, g: torch.Tensor | None) -> None:
    if g is None:
        return
    d = site.dim % x.dim()
    prod = (x.to(torch.float64) * g.to(torch.float64))
    other = [i for i in range(x.dim()) if i not in (0, d)]
    per = prod.sum(other) if other else prod  # (batch, positions) or (positions,)
    if per.dim() == 1:
        per = per.unsqueeze(0)
    if d == 0:
        per = per.transpose(0, 1)
    per = per.numpy()
    for gid, idx in site.maps:
        sel = idx >= 0
        size = int(idx[sel].max()) + 1 if sel.any() else 0
        acc = np.zeros((per.shape[0], size))
        np.add.at(acc.T, idx[sel], per[:, sel].T)
        tot = np.abs(acc).sum(0)
        prev = site.taylor.get(gid)
        site.taylor[gid] = tot if prev is None else prev + tot
    site.count += x.shape[0]


def _combine(program: Program, sites: list[_Site], criterion: str) -> dict[int, np.ndarray]:
    gs = program.groups
    per_group: dict[int, list[np.ndarray]] = {}
    for s in sites:
        for gid, idx in s.maps:
            size = gs[gid].size
            sel = idx >= 0
            if criterion == "activation":
                if s.ss is None:
                    continue
                acc = np.zeros(size)
                np.add.at(acc, idx[sel], s.ss[sel])
                v = np.sqrt(acc / max(s.count, 1))
            else:
                t = s.taylor.get(gid)
                if t is None:
                    continue
                v = np.zeros(size)
                v[:len(t)] = t
            m = v.mean()
            per_group.setdefault(gid, []).append(v / m if m > 0 else v)
    return {gid: np.mean(vs, axis=0) for gid, vs in per_group.items()}


@register_pass
class ActivationImportance(Pass):
    """Compute calibration importance (``criterion="activation"`` or ``"taylor"``) over ``ctx.data`` for every
    group and record it (:class:`ImportanceRecord`); a following ``ChannelPrune(importance=criterion)`` uses the
    record instead of running the data again. ``max_batches`` bounds the run."""

    name = "activation_importance"
    requires = frozenset({"groups"})

    def __init__(self, criterion: str = "activation", max_batches: int | None = None):
        if criterion not in CRITERIA:
            raise InputError(f"criterion must be one of {CRITERIA}, got {criterion!r}", fix="use 'activation'")
        self.criterion = criterion
        self.max_batches = max_batches

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        scores = calibration_scores(program, ctx, criterion=self.criterion, max_batches=self.max_batches)
        rec = ImportanceRecord(self.criterion, scores, graph_id=id(program.gm))
        return PassResult(program, changed=False, stats={"criterion": self.criterion, "groups_scored": len(scores)},
                          record=rec)
