"""Factory ops (``zeros``, ``arange``, ``full``...: their sizes are literals, so their dims are frozen) and ops
that carry no channels (shape assertions, symbolic sizes); ``_assert_tensor_metadata``'s size check is dropped by
its rewrite after Shrink.
"""
from __future__ import annotations

import torch.fx as fx

from .context import RewriteContext, RuleContext
from .registry import aten, rule


@rule(aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.new_zeros, aten.new_ones, aten.new_full,
      aten.new_empty, aten.rand, aten.randn, aten.randint, aten.scalar_tensor, aten.tensor, aten.eye, aten.linspace,
      aten.empty_strided, aten.randperm)
def _factory(A: RuleContext, node: fx.Node) -> None:
    v = A.val(node)
    A.set(node, A.fresh(v.shape, node.name, "created from shape literals (factory op)"))


def _drop_size_check(R: RewriteContext, node: fx.Node) -> None:
    kw = dict(node.kwargs)
    for k in ("size", "stride"):
        if kw.get(k) is not None:
            kw[k] = None
    node.kwargs = kw
    if len(node.args) > 1:
        node.args = node.args[:1]


@rule(aten._assert_tensor_metadata, rewrite=_drop_size_check)
def _assert_meta(A: RuleContext, node: fx.Node) -> None:
    A.set(node, None)


@rule(aten._assert_scalar, aten.sym_constrain_range, aten.sym_constrain_range_for_size, aten.sym_size,
      aten.sym_numel, aten.sym_stride, aten._assert_async)
def _no_channels(A: RuleContext, node: fx.Node) -> None:
    A.set(node, None)
