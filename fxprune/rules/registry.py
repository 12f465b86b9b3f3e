"""The op registries (``RULES`` for the analyzer, ``REWRITES`` for Shrink), the ``@rule`` decorator and the small
argument helpers every rule family shares.

Lookup (``fxprune.analyzer.Analyzer._call``): the exact ``OpOverload`` first, then its ``OpOverloadPacket``
(``aten.conv2d`` covers ``aten.conv2d.default`` and ``aten.conv2d.padding``), then the ``"pointwise"`` rule for
any overload tagged ``torch.Tag.pointwise``. Ops found nowhere freeze every space they touch.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from .context import RewriteFn, RuleContext, RuleFn
from .util import op_name

aten = torch.ops.aten
RULES: dict[Any, RuleFn] = {}
REWRITES: dict[Any, RewriteFn] = {}


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _set_arg(node: fx.Node, i: int, name: str, value: Any) -> None:
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        kw = dict(node.kwargs)
        kw[name] = value
        node.kwargs = kw


def rule(*targets: Any, rewrite: RewriteFn | None = None):
    """Register the decorated function as the analysis rule of ``targets`` (and ``rewrite`` as their rewrite)."""
    def deco(fn):
        for t in targets:
            RULES[t] = fn
            if rewrite is not None:
                REWRITES[t] = rewrite
        return fn

    return deco


def _nd(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _freeze_quiet(A: RuleContext, spaces: Iterable[int], node: fx.Node, why: str) -> None:
    """Freeze without listing ``node`` under the report's frozen-by nodes (spatial dims are frozen in every CNN);
    a group that ends up frozen this way still names the node in its reason."""
    for sp_ in spaces:
        A.t.freeze(sp_, f"{node.name} ({op_name(node)}): {why}")
