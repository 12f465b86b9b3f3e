"""Program: the IR every pass reads and returns.

A Program is a traced GraphModule (parameters reachable by name through ``get_attr`` nodes) plus what passes have
decided about it: channel keep-masks per group, fine-grained weight masks, a history, and a cache of analyses
(the dependency groups). Passes never mutate the Program they are given; they return a new one (``clone``), so a
failing pass leaves the previous Program intact.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._pytree import tree_flatten_spec


@dataclass
class Program:
    gm: fx.GraphModule
    args: tuple
    kwargs: dict
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # group id -> keep mask (structured)
    weight_masks: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> keep mask (fine-grained)
    history: list[dict[str, Any]] = field(default_factory=list)
    analyses: dict[str, Any] = field(default_factory=dict)
    source: nn.Module | None = None  # the user's model (never modified; used by adapters and replay)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ analyses
    @property
    def groups(self):
        """The coupled-channel groups of the current graph (computed once, cached until the graph changes)."""
        from .groups import GroupSet

        gs = self.analyses.get("groups")
        if gs is None:
            from .analyzer import analyze_graph

            analysis = analyze_graph(self.gm)
            gs = GroupSet(analysis, self.param_shapes())
            self.analyses["groups"] = gs
        return gs

    def invalidate(self, *names: str) -> None:
        for n in names or list(self.analyses):
            self.analyses.pop(n, None)

    # ------------------------------------------------------------------ parameters
    def param(self, name: str) -> torch.Tensor:
        obj: Any = self.gm
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for n in self.gm.graph.nodes:
            if n.op == "get_attr":
                t = self.param(n.target)
                if isinstance(t, torch.Tensor):
                    out[n.target] = tuple(t.shape)
        return out

    def flat_inputs(self, args: tuple | None = None, kwargs: dict | None = None) -> list[Any]:
        args = self.args if args is None else args
        kwargs = self.kwargs if kwargs is None else kwargs
        spec = getattr(self.gm, "_in_spec", None)
        if spec is None:
            return list(args) + list(kwargs.values())
        return list(tree_flatten_spec((args, kwargs), spec))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.gm(*args, **kwargs)

    # ------------------------------------------------------------------ copying
    def clone(self, *, deep: bool) -> "Program":
        """A new Program. ``deep=True`` copies the module (for passes that modify weights or the graph)."""
        return Program(
            gm=copy.deepcopy(self.gm) if deep else self.gm,
            args=self.args,
            kwargs=self.kwargs,
            masks={k: v.copy() for k, v in self.masks.items()},
            weight_masks={k: v.clone() for k, v in self.weight_masks.items()},
            history=list(self.history),
            analyses=dict(self.analyses) if not deep else _rebind_analyses(self.analyses),
            source=self.source,
            meta=dict(self.meta),
        )

    def leaf_keep(self) -> dict[int, np.ndarray]:
        """Keep masks keyed by the analysis' leaf spaces (what shrink and masking consume)."""
        gs = self.groups
        return {gs[gid].space: m for gid, m in self.masks.items()}

    def num_params(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in list(self.gm.parameters()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        return total


def _rebind_analyses(analyses: dict[str, Any]) -> dict[str, Any]:
    # Analyses refer to nodes by name and parameters by qualified name, both preserved by deepcopy, so the cached
    # group set stays valid for the copy as long as the graph is not changed.
    return dict(analyses)
