"""Groups: the prunable channel spaces of a graph, with the parameter slices each channel owns.

A :class:`Group` is one leaf class of the analyzer's space algebra that indexes at least one parameter. Channel
``i`` of a group owns, for every member ``(param, dim)``, the positions ``p`` with ``coords[p] == i``. Removing the
channel removes all of them (and the matching activation positions). Groups related by a product (heads x head_dim)
or a concat (q|k|v) are linked in :attr:`GroupSet.graph`, a networkx graph that also holds the parameters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx
import numpy as np

from .analyzer import Analysis


@dataclass
class Member:
    """A parameter dimension (or part of one) indexed by a group's channels."""

    param: str
    dim: int
    coords: np.ndarray  # for each position of param.shape[dim]: channel index in the group, or -1

    @property
    def covers(self) -> int:
        return int((self.coords >= 0).sum())

    def __repr__(self) -> str:
        return f"{self.param}[dim {self.dim}]"


@dataclass
class Group:
    """One prunable (or frozen) channel space."""

    id: int
    space: int  # leaf root in the analysis' SpaceTable
    size: int
    members: list[Member]
    frozen: str | None = None  # reason, or None when prunable
    label: str = ""
    kind: str = "channels"  # "channels", or "heads" for an outer factor (heads, conv groups, GQA query groups)
    related: list[int] = field(default_factory=list)  # ids of groups sharing a product/concat with this one

    @property
    def prunable(self) -> bool:
        return self.frozen is None and self.size > 1

    def params(self) -> list[str]:
        seen: list[str] = []
        for m in self.members:
            if m.param not in seen:
                seen.append(m.param)
        return seen

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "size": self.size,
            "label": self.label,
            "kind": self.kind,
            "prunable": self.prunable,
            "frozen": self.frozen,
            "members": [{"param": m.param, "dim": m.dim, "positions": m.covers} for m in self.members],
            "related": self.related,
        }


class GroupSet:
    """All groups of an analysis. Iterable, printable, exportable (``as_dict``/``to_json``)."""

    def __init__(self, analysis: Analysis, param_shapes: dict[str, tuple[int, ...]]):
        self.analysis = analysis
        t = analysis.table
        frozen = t.frozen_leaves()
        by_leaf: dict[int, list[Member]] = {}
        order: list[int] = []
        self.param_shapes = param_shapes
        for name, spaces in analysis.param_spaces.items():
            for d, s in enumerate(spaces):
                for leaf, idx in t.coords(s):
                    if leaf not in by_leaf:
                        by_leaf[leaf] = []
                        order.append(leaf)
                    by_leaf[leaf].append(Member(name, d, idx))
        self.groups: list[Group] = []
        self._by_space: dict[int, Group] = {}
        order = [leaf for leaf in order if not _trivial(frozen.get(leaf), t.size(leaf))]
        # safety net: a channel space that no activation carries was not modelled by any op rule (its use is
        # unknown), so it must not be pruned
        seen_in_activations = self._activation_leaves()
        for leaf in order:
            if leaf not in seen_in_activations and leaf not in frozen:
                frozen[leaf] = "not carried by any activation (use not modelled by the analyzer)"
        for gid, leaf in enumerate(order):
            members = by_leaf[leaf]
            g = Group(gid, leaf, t.size(leaf), members, frozen.get(leaf), label=_label(members))
            if g.size <= 1 and g.frozen is None:
                g.frozen = "single channel"
            self.groups.append(g)
            self._by_space[leaf] = g
        for leaf in self._outer_factors():
            if leaf in self._by_space:
                self._by_space[leaf].kind = "heads"
        self.graph = self._build_graph()
        for g in self.groups:
            g.related = sorted(n[1] for n in self.graph.neighbors(("group", g.id)) if n[0] == "group")

    def _activation_leaves(self) -> set[int]:
        t = self.analysis.table
        out: set[int] = set()
        seen: set[int] = set()

        def walk(sp: Any) -> None:
            if sp is None:
                return
            if isinstance(sp, int):
                r = t.find(sp)
                if r not in seen:
                    seen.add(r)
                    out.update(t.leaves(r))
                return
            for x in sp:
                walk(x)

        for name, sp in self.analysis.node_spaces.items():
            if name not in self.analysis.param_nodes:
                walk(sp)
        return out

    def _outer_factors(self) -> set[int]:
        """Leaves that are a non-last factor of a product whose later factors hold a prunable leaf."""
        t = self.analysis.table
        frozen = t.frozen_leaves()
        outer: set[int] = set()
        seen: set[int] = set()
        stack = [s for spaces in self.analysis.param_spaces.values() for s in spaces]
        while stack:
            r = t.find(stack.pop())
            if r in seen:
                continue
            seen.add(r)
            kind, parts = t.definition(r)
            if kind == "product":
                for i, p in enumerate(parts[:-1]):
                    later = [x for q in parts[i + 1:] for x in t.leaves(q)]
                    if any(x not in frozen and t.size(x) > 1 for x in later):
                        outer.update(t.leaves(p))
            stack.extend(parts)
        return outer

    def _build_graph(self) -> nx.Graph:
        G = nx.Graph()
        t = self.analysis.table
        for g in self.groups:
            G.add_node(("group", g.id), size=g.size, frozen=g.frozen)
            for m in g.members:
                G.add_node(("param", m.param))
                G.add_edge(("group", g.id), ("param", m.param), dim=m.dim)
        # groups that appear together inside one param dim are structurally related (product / concat)
        for name, spaces in self.analysis.param_spaces.items():
            for s in spaces:
                leaves = [self._by_space[x].id for x in t.leaves(s) if x in self._by_space]
                for a, b in zip(leaves, leaves[1:]):
                    if a != b:
                        G.add_edge(("group", a), ("group", b), relation="shares a parameter dim")
        return G

    # ------------------------------------------------------------------ access
    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, gid: int) -> Group:
        return self.groups[gid]

    def by_space(self, leaf: int) -> Group | None:
        return self._by_space.get(self.analysis.table.find(leaf))

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def frozen(self) -> list[Group]:
        return [g for g in self.groups if not g.prunable]

    def containing(self, param: str) -> list[Group]:
        canon = self.analysis.param_alias.get(param, param)
        return [g for g in self.groups if any(m.param == canon for m in g.members)]

    def macs(self, leaf_keep: dict[int, np.ndarray] | None = None) -> int:
        """Analytic MACs of the graph with only the ``leaf_keep`` positions of each leaf space kept
        (:meth:`fxprune.program.Program.leaf_keep`; ``None`` or ``{}``: dense). Exact for conv/linear/matmul/SDPA
        terms (the analyzer's MAC terms); a cheap estimate for budgets, not a FLOP count of the shrunk module."""
        t = self.analysis.table
        cache: dict[int, int] = {}

        def size(s: int) -> int:
            r = t.find(s)
            if r not in cache:
                cache[r] = int(t.keep_positions(r, leaf_keep).sum()) if leaf_keep else t.size(r)
            return cache[r]

        total = 0
        for term in self.analysis.mac_terms:
            n = term.const
            for s in term.spaces:
                n *= size(s)
            total += n
        return total

    # ------------------------------------------------------------------ export
    def as_dict(self) -> dict[str, Any]:
        return {
            "groups": [g.as_dict() for g in self.groups],
            "unknown_ops": {k: v for k, v in self.analysis.unknown_ops.items()},
            "frozen_by": [{"node": n, "op": o, "reason": r} for n, o, r in self.analysis.frozen_nodes],
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.as_dict(), **kw)

    def __str__(self) -> str:
        rows = [f"{'id':>4}  {'size':>6}  {'state':<10}  members"]
        for g in self.groups:
            state = ("prunable" if g.kind == "channels" else "heads") if g.prunable else "frozen"
            mem = ", ".join(repr(m) for m in g.members[:4]) + (f", +{len(g.members) - 4}" if len(g.members) > 4
                                                                else "")
            rows.append(f"{g.id:>4}  {g.size:>6}  {state:<10}  {mem}" + (f"\n{'':>26}frozen: {g.frozen}"
                                                                          if g.frozen and g.size > 1 else ""))
        n_p = len(self.prunable())
        rows.append(f"{len(self.groups)} groups, {n_p} prunable, {len(self.groups) - n_p} frozen")
        if self.analysis.unknown_ops:
            rows.append("ops without a rule (their channels are frozen): " +
                        ", ".join(f"{k} x{len(v)}" for k, v in self.analysis.unknown_ops.items()))
        return "\n".join(rows)

    __repr__ = __str__


_TRIVIAL = ("kernel dim", "size-1 dimension", "spatial dim")


def _trivial(reason: str | None, size: int) -> bool:
    """Kernel, spatial and size-1 dims are not channel spaces: they are never listed as groups."""
    return size <= 1 or (reason is not None and reason.startswith(_TRIVIAL))


def _label(members: list[Member]) -> str:
    if not members:
        return ""
    m = members[0]
    return f"{m.param}[{m.dim}]"
