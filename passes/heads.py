"""HeadPrune: remove whole attention heads; Shrink then slices q/k/v/o and rewrites the head counts.

The analyzer already factors each attention projection into ``heads x head_dim`` (product spaces): a head is an
outer factor, i.e. a group of kind ``"heads"`` whose channel ``i`` owns the q/k/v rows and the output-projection
columns of head ``i`` (``Member.coords``). HeadPrune only takes head groups that reach an attention op (the head
dim of ``scaled_dot_product_attention`` or a batched ``matmul``), so conv groups are never touched.

Grouped-query attention has two head groups per layer: the kv heads (members include k_proj/v_proj and the query
rows of every kv group) and the query heads within a kv group (members q_proj/o_proj only; index ``j`` is the
``j``-th query head of *every* kv group). ``gqa="kv"`` removes kv heads together with their query groups;
``gqa="query"`` removes query heads inside every kv group, so the ratio of query to kv heads stays an integer.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from fxprune.errors import InputError, PassError
from fxprune.groups import Group, GroupSet
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program
from fxprune.utils import ignore_filter

from . import importance as imp
from .unstructured import validate_ignore

aten = torch.ops.aten
_SDPA = tuple(getattr(aten, n).default for n in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                                               "_scaled_dot_product_flash_attention_for_cpu",
                                               "_scaled_dot_product_efficient_attention",
                                               "_scaled_dot_product_cudnn_attention")
              if hasattr(aten, n))
_MATMUL = (aten.matmul.default, aten.bmm.default)


def attention_leaves(gm: Any, groups: GroupSet) -> set[int]:
    """Leaf spaces of the batch-like dims (all but the last two) of the activation inputs of attention ops
    (``scaled_dot_product_attention`` variants, and ``matmul``/``bmm`` between two activations)."""
    a = groups.analysis
    t = a.table
    out: set[int] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _SDPA:
            args = node.args[:3]
        elif node.target in _MATMUL:
            args = node.args[:2]
            if any(getattr(x, "op", None) == "get_attr" for x in args):
                continue  # a weight matmul, not attention
        else:
            continue
        for x in args:
            sp = a.node_spaces.get(getattr(x, "name", None))
            if not isinstance(sp, list) or len(sp) < 3 or not isinstance(sp[0], int):
                continue
            for s in sp[:-2]:
                out.update(t.leaves(t.find(s)))
    return out


def attention_head_layers(program: Program) -> list[dict[str, Any]]:
    """One entry per attention layer: ``{"groups": [...], "kv": Group|None, "query": Group|None, "heads": H}``.

    ``kv`` is the kv-head group (or the only head group of multi-head attention), ``query`` the query-per-kv
    group of GQA. ``heads`` is the number of query heads.
    """
    gs = program.groups
    leaves = attention_leaves(program.gm, gs)
    heads = [g for g in gs if g.kind == "heads" and g.size > 1 and g.space in leaves]
    ids = {g.id for g in heads}
    seen: set[int] = set()
    layers = []
    for g in heads:
        if g.id in seen:
            continue
        comp, stack = [], [g.id]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            comp.append(gs[i])
            stack.extend(j for j in gs[i].related if j in ids and j not in seen)
        comp.sort(key=lambda x: x.id)
        entry: dict[str, Any] = {"groups": comp, "kv": None, "query": None}
        if len(comp) == 1:
            entry["kv"] = comp[0]
            entry["heads"] = comp[0].size
        elif len(comp) == 2:
            a, b = comp
            pa, pb = set(a.params()), set(b.params())
            if pa > pb:
                entry["kv"], entry["query"] = a, b
            elif pb > pa:
                entry["kv"], entry["query"] = b, a
            else:
                entry["unsupported"] = "two head groups, neither owns the k/v projections"
            entry["heads"] = a.size * b.size
        else:
            entry["unsupported"] = f"{len(comp)} coupled head groups"
            entry["heads"] = int(np.prod([c.size for c in comp]))
        layers.append(entry)
    return layers


@register_pass
class HeadPrune(Pass):
    """Remove attention heads: ``ratio`` of the heads of every attention layer, or keep ``heads_per_layer``.

    ``importance``: ``"l2"`` (default), ``"l1"``, ``"bn_scale"``, ``"random"``, a Torch-Pruning importance object
    or a callable ``fn(group, program) -> scores``
    (one score per head of the group; the q/k/v rows and output-projection columns a head owns are found through
    ``Member.coords``). ``gqa``: ``"kv"`` (remove kv heads with their query groups) or ``"query"`` (remove query
    heads inside every kv group). ``ignore``: module names / modules whose heads stay. Follow with ``Shrink()``.
    """

    name = "head_prune"
    requires = frozenset({"groups"})

    def __init__(self, ratio: float | None = None, *, heads_per_layer: int | None = None, importance: Any = "l2",
                 gqa: str = "kv", ignore: Iterable[Any] = ()):
        if (ratio is None) == (heads_per_layer is None):
            raise InputError("give exactly one of ratio= or heads_per_layer=",
                             fix="e.g. HeadPrune(0.5) or HeadPrune(heads_per_layer=4)")
        if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool)
                                  or not 0.0 <= ratio < 1.0):
            raise InputError(f"ratio must be in [0, 1), got {ratio!r}", fix="ratio is the fraction of heads removed")
        if heads_per_layer is not None and (not isinstance(heads_per_layer, int) or isinstance(heads_per_layer, bool)
                                            or heads_per_layer < 1):
            raise InputError(f"heads_per_layer must be a positive int, got {heads_per_layer!r}",
                             fix="the number of query heads kept in every attention layer")
        if gqa not in ("kv", "query"):
            raise InputError(f"gqa must be 'kv' or 'query', got {gqa!r}",
                             fix="'kv' removes kv heads with their query heads, 'query' query heads per kv group")
        if isinstance(importance, str) and importance not in imp.BUILTIN:
            raise InputError(f"unknown importance {importance!r}",
                             fix=f"use one of {', '.join(imp.BUILTIN)} or a callable fn(group, program) -> scores")
        if not isinstance(importance, str):
            imp.resolve(importance)
        self.ratio = ratio
        self.heads_per_layer = heads_per_layer
        self.importance = importance
        self.gqa = gqa
        self.ignore = validate_ignore(ignore)

    def _choose(self, entry: dict[str, Any]) -> Group | None:
        kv, q = entry["kv"], entry["query"]
        if q is None:
            return kv
        if self.gqa == "query":
            return q
        return kv

    def _keep(self, entry: dict[str, Any], g: Group) -> int:
        per_unit = entry["heads"] // g.size  # query heads removed with one channel of g
        if self.ratio is not None:
            keep = g.size - int(math.floor(g.size * self.ratio + 1e-9))
        else:
            if self.heads_per_layer % per_unit or self.heads_per_layer > entry["heads"]:
                raise InputError(
                    f"heads_per_layer={self.heads_per_layer} is not reachable for {g.label}: "
                    f"{entry['heads']} heads, removable in units of {per_unit}",
                    fix=f"use a multiple of {per_unit} up to {entry['heads']}, or gqa='query'/'kv'")
            keep = self.heads_per_layer // per_unit
        return max(1, keep)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        ignored = ignore_filter(program, self.ignore)
        score_fn = imp.resolve(self.importance)
        layers, skipped = [], []
        for entry in attention_head_layers(program):
            labels = [g.label for g in entry["groups"]]
            if "unsupported" in entry:
                skipped.append({"groups": labels, "reason": entry["unsupported"]})
                continue
            g = self._choose(entry)
            if g is None or g.size <= 1:
                skipped.append({"groups": labels, "reason": "no removable head group"})
                continue
            if not g.prunable:
                skipped.append({"groups": labels, "reason": f"frozen: {g.frozen}"})
                continue
            if any(ignored(p) for p in g.params()):
                skipped.append({"groups": labels, "reason": "ignored"})
                continue
            keep = self._keep(entry, g)
            s = score_fn(program, g, ctx)
            if s is None:
                skipped.append({"groups": labels, "reason": "importance gave no scores"})
                continue
            s = np.asarray(s, dtype=np.float64)
            order = np.argsort(-s, kind="stable")
            mask = np.zeros(g.size, dtype=bool)
            mask[order[:keep]] = True
            old = program.masks.get(g.id)
            program.masks[g.id] = mask if old is None else (mask & old)
            per_unit = entry["heads"] // g.size
            layers.append({"group": g.id, "label": g.label, "unit": "kv" if entry["query"] is not None and
                           g is entry["kv"] else ("query" if g is entry["query"] else "head"),
                           "heads_before": entry["heads"], "heads_after": int(program.masks[g.id].sum()) * per_unit})
        if not layers and not skipped:
            raise PassError("found no attention heads (no head group reaches an attention op)", pass_name=self.name,
                            fix="HeadPrune needs attention written with reshape-to-heads + SDPA or matmul")
        return PassResult(program, changed=any(x["heads_after"] < x["heads_before"] for x in layers),
                          stats={"layers": layers, "skipped": skipped})
