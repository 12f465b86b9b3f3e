"""Program: the IR every pass reads and returns.

A Program is a traced GraphModule (parameters reachable by name through ``get_attr`` nodes) plus what passes have
decided about it: channel keep-masks per group, their divisors, fine-grained weight masks, the pipeline
:class:`Stage`, typed per-pass records (:mod:`fxprune.records`), a history, and a cache of analyses
(:mod:`fxprune.analysis`). Passes never mutate the Program they are given: the pass manager hands each pass a
:meth:`Program.clone` whose mutable state (masks, divisors, weight masks, history, analysis cache, and the module
where the pass changes weights or graph) is private, so a failing pass leaves the previous Program intact.
"""
from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._pytree import tree_flatten_spec

from .analysis import AnalysisCache, register_analysis
from .groups import GroupSet
from .records import Record

R = TypeVar("R", bound=Record)


class Stage(enum.Enum):
    """Where a Program stands in the select -> mask -> shrink pipeline.

    TRACED: no pending selection. SELECTED: masks chosen, weights untouched. MASKED: every pending mask is applied
    (removed channels and masked weights are exactly zero in ``gm``). SHRUNK: removed channels are physically gone
    and the remaining fine-grained masks are applied.
    """

    TRACED = "traced"
    SELECTED = "selected"
    MASKED = "masked"
    SHRUNK = "shrunk"


ANY_STAGE = frozenset(Stage)


@register_analysis("groups")
def _groups_analysis(program: "Program") -> GroupSet:
    from .analyzer import analyze_graph

    return GroupSet(analyze_graph(program.gm), program.param_shapes())


@dataclass
class Program:
    gm: fx.GraphModule
    args: tuple
    kwargs: dict
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # group id -> keep mask (structured)
    weight_masks: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> keep mask (fine-grained)
    divisors: dict[int, int] = field(default_factory=dict)  # group id -> kept count must be a multiple of this
    stage: Stage = Stage.TRACED
    records: tuple[Record, ...] = ()
    history: list[dict[str, Any]] = field(default_factory=list)
    analyses: AnalysisCache = field(default_factory=AnalysisCache)
    source: nn.Module | None = None  # the user's model (never modified; used by adapters and replay)

    # ------------------------------------------------------------------ analyses
    def analysis(self, name: str) -> Any:
        """The registered analysis ``name`` of this program (computed once, cached until invalidated)."""
        return self.analyses.get(name, self)

    @property
    def groups(self) -> GroupSet:
        """The coupled-channel groups of the current graph (the ``"groups"`` analysis)."""
        return self.analysis("groups")

    # ------------------------------------------------------------------ selection state
    def select_channels(self, gid: int, keep: np.ndarray, *, divisor: int | None = None) -> None:
        """Intersect group ``gid``'s keep-mask with ``keep`` (a bool array); the program becomes SELECTED."""
        keep = np.asarray(keep, dtype=bool)
        old = self.masks.get(gid)
        self.masks[gid] = keep.copy() if old is None else (keep & old)
        if divisor and divisor > 1:
            self.divisors[gid] = int(divisor)
        self.stage = Stage.SELECTED

    def set_weight_mask(self, name: str, mask: torch.Tensor) -> None:
        """Set (or intersect with the existing) fine-grained mask of parameter ``name``; the program becomes
        SELECTED."""
        old = self.weight_masks.get(name)
        self.weight_masks[name] = mask if old is None else (old * mask.to(old.dtype))
        self.stage = Stage.SELECTED

    def has_selection(self) -> bool:
        return bool(self.masks) or bool(self.weight_masks)

    def records_of(self, kind: type[R]) -> list[R]:
        """Every record of type ``kind`` (oldest first)."""
        return [r for r in self.records if isinstance(r, kind)]

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
        """A new Program whose mutable state is private. ``deep=True`` also copies the module (for passes that
        modify weights or the graph in place); otherwise the module is shared and must be treated as read-only.
        Cached analyses refer to nodes and parameters by name, which a deep copy preserves, so they carry over."""
        return Program(
            gm=copy.deepcopy(self.gm) if deep else self.gm,
            args=self.args,
            kwargs=self.kwargs,
            masks={k: v.copy() for k, v in self.masks.items()},
            weight_masks={k: v.clone() for k, v in self.weight_masks.items()},
            divisors=dict(self.divisors),
            stage=self.stage,
            records=self.records,
            history=copy.deepcopy(self.history),
            analyses=self.analyses.copy(),
            source=self.source,
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
