"""Analyses in the MLIR style: registered by name, computed on demand, cached on the Program, and invalidated after
a pass unless the pass declares them preserved.

An analysis is a function ``Program -> value``. The core registers ``"groups"`` (the coupled-channel groups of the
current graph); pass families may register their own with :func:`register_analysis` before the passes that use
them are defined. ``Pass.requires`` / ``Pass.preserves`` may only name registered analyses (plus the precondition
names in :data:`PRECONDITIONS`); anything else is an error when the pass class is defined.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from .program import Program

AnalysisFn = Callable[["Program"], Any]

ANALYSES: dict[str, AnalysisFn] = {}

#: names a pass may require that are checked conditions, not computed analyses
PRECONDITIONS: dict[str, str] = {
    "masks": "a previous pass selected channels or weights (channel or weight masks exist)",
}


def register_analysis(name: str) -> Callable[[AnalysisFn], AnalysisFn]:
    """Decorator: register ``fn(program)`` as the analysis ``name``."""
    def deco(fn: AnalysisFn) -> AnalysisFn:
        if name in PRECONDITIONS:
            raise ValueError(f"{name!r} is a precondition name, not an analysis")
        ANALYSES[name] = fn
        return fn

    return deco


def check_names(names: Iterable[str], what: str, owner: str) -> frozenset[str]:
    """Validate ``requires``/``preserves`` names; returns them as a frozenset."""
    if isinstance(names, str):
        raise TypeError(f"{owner}.{what} must be a set of names, not the string {names!r}")
    names = frozenset(names)
    allowed = set(ANALYSES) | (set(PRECONDITIONS) if what == "requires" else set())
    unknown = sorted(n for n in names if n not in allowed)
    if unknown:
        raise ValueError(f"{owner}.{what} names unknown analyses {unknown}; registered: {sorted(allowed)} "
                         f"(register new ones with fxprune.analysis.register_analysis)")
    return names


class AnalysisCache:
    """The cached analyses of one Program. Copying shares the cached values (analyses are read-only by contract)."""

    def __init__(self, values: dict[str, Any] | None = None):
        self._values: dict[str, Any] = dict(values or {})

    def get(self, name: str, program: "Program") -> Any:
        if name not in self._values:
            fn = ANALYSES.get(name)
            if fn is None:
                raise KeyError(f"no analysis named {name!r}; registered: {sorted(ANALYSES)}")
            self._values[name] = fn(program)
        return self._values[name]

    def cached(self, name: str) -> Any:
        """The cached value or None (never computes)."""
        return self._values.get(name)

    def put(self, name: str, value: Any) -> None:
        self._values[name] = value

    def keep_only(self, preserved: Iterable[str]) -> None:
        """Drop every cached analysis not in ``preserved``."""
        keep = set(preserved)
        for n in list(self._values):
            if n not in keep:
                del self._values[n]

    def names(self) -> list[str]:
        return list(self._values)

    def copy(self) -> "AnalysisCache":
        return AnalysisCache(self._values)
