"""Typed records: what a pass decided, handed to later passes, reports and saves.

A pass returns at most one record in :class:`fxprune.PassResult`; the pass manager appends it to
``Program.records`` (a tuple: records are immutable and shared between a Program and its clones). Later code asks
for them by type (``program.records_of(ShrinkRecord)``), never by string key. Pass families define their own record
classes next to their passes by subclassing :class:`Record`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np


def _frozen_array(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Record:
    """Base class of per-pass records (frozen dataclasses)."""


@dataclass(frozen=True)
class SelectionRecord(Record):
    """A structured selection: per group id, (min, mean, max) of the importance scores the choice was made on."""

    importance: Mapping[int, tuple[float, float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "importance", MappingProxyType(dict(self.importance)))


@dataclass(frozen=True)
class ShrinkRecord(Record):
    """What Shrink removed, exactly: for every parameter/buffer (by qualified name) that lost entries, per dim the
    *original* indices it kept (``None`` where the dim is untouched), and the original shape. Saves, ``keep.json``
    and ``replay`` use these indices directly."""

    kept_indices: Mapping[str, tuple[np.ndarray | None, ...]] = field(default_factory=dict)
    original_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    kept_channels: Mapping[int, int] = field(default_factory=dict)  # group id (pre-shrink) -> channels kept
    #: normalisations whose normalised width shrank, by node name: mode ("exact"/"renormalize"), kind, weight,
    #: eps, before, after (:func:`fxprune.masking.norm_sites`)
    norms: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ki = {k: tuple(None if d is None else _frozen_array(np.asarray(d, dtype=np.int64)) for d in v)
              for k, v in self.kept_indices.items()}
        object.__setattr__(self, "kept_indices", MappingProxyType(ki))
        object.__setattr__(self, "original_shapes",
                           MappingProxyType({k: tuple(int(s) for s in v) for k, v in self.original_shapes.items()}))
        object.__setattr__(self, "kept_channels", MappingProxyType(dict(self.kept_channels)))
        object.__setattr__(self, "norms", MappingProxyType({k: MappingProxyType(dict(v))
                                                            for k, v in self.norms.items()}))

    @staticmethod
    def from_keep_masks(param_keep: Mapping[str, list[np.ndarray | None]],
                        shapes: Mapping[str, tuple[int, ...]], kept_channels: Mapping[int, int]) -> "ShrinkRecord":
        """Build from per-dim boolean keep masks (``fxprune.masking.param_keep``)."""
        idx = {name: tuple(None if k is None else np.nonzero(k)[0] for k in dims)
               for name, dims in param_keep.items() if any(k is not None for k in dims)}
        return ShrinkRecord(idx, {n: tuple(shapes[n]) for n in idx if n in shapes}, kept_channels)


def compose_kept_indices(records: list[ShrinkRecord]) -> dict[str, tuple[np.ndarray | None, ...]]:
    """Original indices kept per parameter and dim after several Shrinks in a row (later indices index into the
    earlier result)."""
    out: dict[str, tuple[np.ndarray | None, ...]] = {}
    for rec in records:
        for name, dims in rec.kept_indices.items():
            prev = out.get(name)
            if prev is None:
                out[name] = tuple(dims)
                continue
            merged = []
            for p, d in zip(prev, dims):
                if d is None:
                    merged.append(p)
                elif p is None:
                    merged.append(d)
                else:
                    merged.append(p[d])
            out[name] = tuple(merged)
    return out
