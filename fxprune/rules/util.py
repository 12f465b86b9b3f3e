"""Tiny FX helpers shared by the analyzer, the rules and Shrink (no fxprune imports, so no cycles).

``fxprune.analyzer.op_name`` and ``fxprune.analyzer.size_hint`` re-export these.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


def size_hint(n: Any) -> int:
    """An int for a static or symbolic (dynamic) size: symbolic sizes give their example value."""
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        return int(hint) if hint is not None else 2
    return int(n)


def op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t.__name__}" if t.namespace == "aten" else str(t)
    return getattr(t, "__name__", str(t))
