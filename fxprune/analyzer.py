"""The dependency analyzer: label every tensor dimension with a channel space by running op rules over the graph.

``analyze_graph(gm)`` walks the nodes in topological order. Each op has a rule (``fxprune.rules``) that unifies,
concatenates or factors the spaces of its inputs, parameters and outputs. Ops without a rule freeze every space they
touch, and the report names the node and op. Graph inputs and outputs are frozen (their shapes never change).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx

from .errors import AnalysisError
from .rules import RULES, RuleContext, RuleFn
from .rules.util import op_name, size_hint
from .spaces import SpaceConflict, SpaceTable

__all__ = ["Analysis", "Analyzer", "MacTerm", "RuleContext", "RuleFn", "analyze_graph", "op_name", "size_hint"]


@dataclass
class MacTerm:
    """MACs of one op: ``const * prod(size(s) for s in spaces)``; exact under pruning of those spaces."""

    node: str
    const: int
    spaces: tuple[int, ...]


@dataclass
class Analysis:
    """What the analyzer knows about a graph. Produced by :func:`analyze_graph`; read by groups, masks, shrink."""

    table: SpaceTable
    node_spaces: dict[str, Any]  # node name -> spaces of each dim (list; list of lists for tuple outputs)
    param_spaces: dict[str, list[int]]  # canonical parameter/buffer name -> space of each dim
    param_alias: dict[str, str]  # every get_attr target -> canonical name (tied weights share one)
    param_roles: dict[str, set[str]]  # canonical name -> roles ("bn_weight", "no_zero", "producer", ...)
    aux: dict[str, dict[str, Any]]  # node name ->  extra spaces/constants needed by rewrites
    frozen_nodes: list[tuple[str, str, str]]  # (node, op, reason) for every freeze caused by a node
    unknown_ops: dict[str, list[str]]  # op -> node names without a rule
    mac_terms: list[MacTerm]
    param_nodes: set[str] = field(default_factory=set)  # names of get_attr nodes
    notes: list[str] = field(default_factory=list)


class Analyzer:
    """Mutable state while walking one graph; rules call its helpers (the implementation of
    :class:`fxprune.rules.RuleContext`)."""

    def __init__(self, gm: fx.GraphModule, rules: Mapping[Any, RuleFn]):
        self.gm = gm
        self.rules = rules
        self.t = SpaceTable()
        self.spaces: dict[fx.Node, Any] = {}
        self.param_spaces: dict[str, list[int]] = {}
        self.param_alias: dict[str, str] = {}
        self.param_roles: dict[str, set[str]] = {}
        self.aux: dict[fx.Node, dict[str, Any]] = {}
        self.frozen_nodes: list[tuple[str, str, str]] = []
        self.unknown: dict[str, list[str]] = {}
        self.mac_terms: list[MacTerm] = []
        self.notes: list[str] = []
        self._by_tensor: dict[int, str] = {}

    # ----------------------------------------------------------------- helpers for rules
    @staticmethod
    def val(x: Any) -> Any:
        return x.meta.get("val") if isinstance(x, fx.Node) else None

    def shape(self, x: Any) -> tuple[int, ...] | None:
        v = self.val(x)
        if isinstance(v, torch.Tensor):
            return tuple(size_hint(s) for s in v.shape)
        return None

    def sp(self, x: Any) -> list[int] | None:
        """Spaces of a tensor-valued argument (None for non-tensors)."""
        if not isinstance(x, fx.Node):
            return None
        s = self.spaces.get(x)
        if s is None or (s and isinstance(s[0], list)):
            return None
        return s

    def fresh(self, shape: Iterable[Any], origin: str, frozen: str | None = None) -> list[int]:
        return [self.t.new(size_hint(n), f"{origin}[{i}]", frozen if not isinstance(n, torch.SymInt) else
                           "symbolic (dynamic) dim") for i, n in enumerate(shape)]

    def set(self, node: fx.Node, spaces: Any) -> None:
        self.spaces[node] = spaces

    def unify(self, a: int, b: int, node: fx.Node, what: str = "") -> bool:
        try:
            self.t.unify(a, b)
            return True
        except SpaceConflict as e:
            reason = f"{node.name} ({op_name(node)}): cannot align {what or 'dims'}: {e}"
            self.t.freeze(a, reason)
            self.t.freeze(b, reason)
            self.frozen_nodes.append((node.name, op_name(node), f"cannot align {what or 'dims'}: {e}"))
            return False

    def freeze(self, spaces: Iterable[int], node: fx.Node, why: str) -> None:
        if node.op == "output":
            reason = why
        elif node.op == "placeholder":
            reason = f"{why} {node.name!r}"
        else:
            reason = f"{node.name} ({op_name(node)}): {why}"
        any_ = False
        for s in spaces:
            self.t.freeze(s, reason)
            any_ = True
        if any_:
            self.frozen_nodes.append((node.name, op_name(node), why))

    def freeze_all(self, node: fx.Node, why: str) -> None:
        """Freeze every dim of every tensor input and of the output of ``node`` (the no-rule fallback)."""
        spaces: list[int] = []
        for a in node.all_input_nodes:
            spaces.extend(self._flat_spaces(self.spaces.get(a)))
        if node not in self.spaces:
            self.set(node, self._fresh_like(self.val(node), node.name, why))
        spaces.extend(self._flat_spaces(self.spaces.get(node)))
        self.freeze(spaces, node, why)

    def _flat_spaces(self, s: Any) -> list[int]:
        if s is None:
            return []
        if isinstance(s, int):
            return [s]
        out: list[int] = []
        for x in s:
            out.extend(self._flat_spaces(x))
        return out

    def _fresh_like(self, v: Any, origin: str, frozen: str | None) -> Any:
        if isinstance(v, torch.Tensor):
            return self.fresh(v.shape, origin, frozen)
        if isinstance(v, (list, tuple)):
            return [self._fresh_like(x, f"{origin}.{i}", frozen) for i, x in enumerate(v)]
        return None

    def broadcast(self, node: fx.Node, tensors: list[Any], out_shape: tuple[int, ...]) -> list[int]:
        """Broadcast-unify ``tensors`` (nodes) right-aligned with an output of ``out_shape``."""
        out = [None] * len(out_shape)  # type: list[int | None]
        for t in tensors:
            s, shp = self.sp(t), self.shape(t)
            if s is None or shp is None:
                continue
            off = len(out_shape) - len(shp)
            for i, (space, n) in enumerate(zip(s, shp)):
                j = off + i
                if n == 1 and out_shape[j] != 1:
                    continue
                if out[j] is None:
                    out[j] = space
                else:
                    self.unify(out[j], space, node, f"broadcast dim {j}")
        return [o if o is not None else self.t.new(n, f"{node.name}[{i}]", "broadcast dim")
                for i, (o, n) in enumerate(zip(out, out_shape))]

    def mac(self, node: fx.Node, const: int, spaces: Iterable[int]) -> None:
        self.mac_terms.append(MacTerm(node.name, int(const), tuple(spaces)))

    def role(self, node: Any, role: str) -> None:
        """Tag the parameter behind ``node`` (a get_attr node) with a role, e.g. "bn_weight" or "no_zero"."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            self.param_roles.setdefault(self.param_alias[node.target], set()).add(role)

    # ----------------------------------------------------------------- walking
    def _get_attr(self, node: fx.Node) -> None:
        obj = self.gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor):
            self.set(node, None)
            return
        key = id(obj)
        canon = self._by_tensor.setdefault(key, node.target)
        self.param_alias[node.target] = canon
        if canon in self.param_spaces:
            self.set(node, self.param_spaces[canon])  # tied weight: the same spaces
            return
        frozen = None if (obj.is_floating_point() or obj.is_complex()) else "integer tensor (indices or positions)"
        spaces = self.fresh(obj.shape, node.target, frozen)
        self.param_spaces[canon] = spaces
        self.param_roles.setdefault(canon, set())
        self.set(node, spaces)

    def run(self) -> Analysis:
        graph = self.gm.graph
        for node in graph.nodes:
            if node.op == "placeholder":
                self.set(node, self._fresh_like(self.val(node), node.name, "graph input"))
                if self.spaces[node] is not None:
                    self.freeze(self._flat_spaces(self.spaces[node]), node, "graph input")
            elif node.op == "get_attr":
                self._get_attr(node)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "call_module":
                if self.val(node) is None:
                    self.set(node, None)  # e.g. export's _guards_fn: checks inputs, produces no tensor
                else:
                    self.unknown.setdefault(f"module:{node.target}", []).append(node.name)
                    self.freeze_all(node, f"no rule for call_module {node.target}")
            elif node.op == "call_method":
                self.unknown.setdefault(f"method:{node.target}", []).append(node.name)
                self.freeze_all(node, f"no rule for method {node.target}")
            elif node.op == "output":
                outs = self._flat_spaces([self.spaces.get(a) for a in node.all_input_nodes])
                self.freeze(outs, node, "graph output")
        return Analysis(
            table=self.t,
            node_spaces={n.name: s for n, s in self.spaces.items()},
            param_spaces=self.param_spaces,
            param_alias=self.param_alias,
            param_roles=self.param_roles,
            aux={n.name: a for n, a in self.aux.items()},
            frozen_nodes=self.frozen_nodes,
            unknown_ops=self.unknown,
            mac_terms=self.mac_terms,
            param_nodes={n.name for n in graph.nodes if n.op == "get_attr"},
            notes=self.notes,
        )

    def _call(self, node: fx.Node) -> None:
        v = self.val(node)
        target = node.target
        fn = self.rules.get(target)
        if fn is None and isinstance(target, torch._ops.OpOverload):
            fn = self.rules.get(target.overloadpacket)
            if fn is None and torch.Tag.pointwise in target.tags:
                fn = self.rules.get("pointwise")
        if fn is None:
            if v is None or isinstance(v, (int, float, bool, torch.SymInt)):
                self.set(node, None)  # asserts, sym sizes: no channels involved
                if not any(self.sp(a) for a in node.all_input_nodes):
                    return
                # a non-tensor result computed from tensors (e.g. item()): its inputs' channels are observed
            name = op_name(node)
            self.unknown.setdefault(name, []).append(node.name)
            self.freeze_all(node, f"no rule for {name}")
            return
        try:
            fn(self, node)
        except SpaceConflict as e:  # a rule that did not expect a conflict: freeze conservatively
            self.freeze_all(node, f"rule failed: {e}")
        except Exception as e:
            raise AnalysisError(
                f"rule for {op_name(node)} failed at node {node.name!r}: {type(e).__name__}: {e}",
                fix="please report this model; meanwhile pass the module containing this op in ignore=[...]",
            ) from e
        if node not in self.spaces:
            self.freeze_all(node, "rule produced no output spaces")


def analyze_graph(gm: fx.GraphModule, rules: Mapping[Any, RuleFn] | None = None) -> Analysis:
    """Run the dependency analyzer over ``gm`` (an exported GraphModule with FakeTensor metadata).

    ``rules`` replaces the op registry (default: :data:`fxprune.rules.RULES`), e.g. ``{**RULES, op: my_rule}`` to try
    a rule without registering it globally.
    """
    for node in gm.graph.nodes:
        if node.op not in ("output", "get_attr") and "val" not in node.meta and node.op != "call_module":
            raise AnalysisError(
                f"node {node.name!r} has no shape metadata",
                fix="trace the model with fxprune.trace (torch.export) so every node carries meta['val']",
            )
    return Analyzer(gm, RULES if rules is None else rules).run()
