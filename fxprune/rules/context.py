"""The typed contracts between the rules and their callers.

A rule ``fn(A, node)`` is written against :class:`RuleContext`; the analyzer's ``fxprune.analyzer.Analyzer`` is the
implementation. A shape-constant rewrite ``fn(R, node)`` is written against :class:`RewriteContext`;
``fxprune.masking.RewriteContext`` is the implementation. Both are structural (``typing.Protocol``), so the rules
package imports neither the analyzer nor masking.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import numpy as np
import torch.fx as fx

from ..spaces import SpaceTable


@runtime_checkable
class RuleContext(Protocol):
    """What an analysis rule may read and do while the analyzer walks one graph.

    ``sp(x)`` / ``shape(x)`` / ``val(x)``: the spaces, static shape and FakeTensor of a tensor argument (None for
    non-tensors); ``spaces[node]``: raw spaces of any visited node (a list of lists for tuple outputs);
    ``set(node, spaces)``: the node's output spaces (every rule must call it); ``unify``/``freeze``: relate or
    freeze spaces, naming ``node`` in the report; ``t``: the :class:`SpaceTable` (``new``/``concat``/``product``);
    ``aux[node]``: extra spaces or constants that the node's rewrite will need; ``mac``: a MACs term;
    ``role``: tag a parameter (e.g. ``"bn_weight"``, ``"no_zero"``).
    """

    gm: fx.GraphModule
    t: SpaceTable
    spaces: dict[fx.Node, Any]
    aux: dict[fx.Node, dict[str, Any]]
    frozen_nodes: list[tuple[str, str, str]]

    def val(self, x: Any) -> Any: ...

    def shape(self, x: Any) -> tuple[int, ...] | None: ...

    def sp(self, x: Any) -> list[int] | None: ...

    def fresh(self, shape: Iterable[Any], origin: str, frozen: str | None = None) -> list[int]: ...

    def set(self, node: fx.Node, spaces: Any) -> None: ...

    def unify(self, a: int, b: int, node: fx.Node, what: str = "") -> bool: ...

    def freeze(self, spaces: Iterable[int], node: fx.Node, why: str) -> None: ...

    def freeze_all(self, node: fx.Node, why: str) -> None: ...

    def broadcast(self, node: fx.Node, tensors: list[Any], out_shape: tuple[int, ...]) -> list[int]: ...

    def mac(self, node: fx.Node, const: int, spaces: Iterable[int]) -> None: ...

    def role(self, node: Any, role: str) -> None: ...


@runtime_checkable
class RewriteContext(Protocol):
    """What a shape-constant rewrite sees after Shrink decided the keep masks.

    ``new(space)``: kept size of a space; ``old_size(space)``: its size before; ``keep(space)``: its boolean keep
    mask; ``spaces(node)``: the node's spaces as analysed; ``aux(node)``: what the rule stored in ``aux``;
    ``shape(node)``: the node's static shape before shrinking.
    """

    def keep(self, space: int) -> np.ndarray: ...

    def new(self, space: int) -> int: ...

    def old_size(self, space: int) -> int: ...

    def spaces(self, node: fx.Node) -> Any: ...

    def aux(self, node: fx.Node) -> dict[str, Any]: ...

    def shape(self, node: fx.Node) -> tuple[int, ...]: ...


RuleFn = Callable[[RuleContext, fx.Node], None]
RewriteFn = Callable[[RewriteContext, fx.Node], None]
