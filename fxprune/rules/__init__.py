"""Op rules of the dependency analyzer and the matching shape-constant rewrites used by Shrink.

One module per op family; importing this package imports them all, which registers their rules:

* :mod:`.registry` -- ``RULES``, ``REWRITES``, the ``@rule`` decorator, shared argument helpers;
* :mod:`.context` -- the typed contracts :class:`RuleContext` (analysis side) and :class:`RewriteContext` (Shrink);
* :mod:`.util` -- ``op_name`` and ``size_hint`` (re-exported by ``fxprune.analyzer``);
* families: :mod:`.pointwise`, :mod:`.conv`, :mod:`.linear`, :mod:`.norm`, :mod:`.attention`,
  :mod:`.concat_split`, :mod:`.reshape`, :mod:`.spatial`, :mod:`.reduction`, :mod:`.indexing`, :mod:`.factory`.

A rule ``fn(A, node)`` reads the spaces of the node's inputs (``A.sp``), unifies/concatenates/factors them
(``A.unify``, ``A.t.concat``, ``A.t.product``), records MACs terms and auxiliary spaces, and sets the output spaces
(``A.set``). Reductions, softmax and normalisation statistics over a dim *observe* its channel count: those dims
are frozen (masked and shrunk models would differ). The one exception is SDPA's default ``1/sqrt(head_dim)`` scale,
which Shrink pins to the original value instead.

A rewrite ``fn(R, node)`` updates the node's shape constants after Shrink: ``R.new(space)`` is the kept size of a
space, ``R.keep(space)`` its boolean keep mask, ``R.spaces(node)`` the node's spaces (looked up by name).

This package never imports ``fxprune.analyzer`` (the analyzer imports it).
"""
from __future__ import annotations

from . import (attention, concat_split, conv, factory, indexing, linear, norm, pointwise,  # noqa: F401 (register)
               reduction, reshape, spatial)
from .context import RewriteContext, RewriteFn, RuleContext, RuleFn
from .registry import REWRITES, RULES, rule

__all__ = ["RULES", "REWRITES", "rule", "RuleContext", "RewriteContext", "RuleFn", "RewriteFn"]
