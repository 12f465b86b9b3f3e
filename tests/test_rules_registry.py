"""The rules package as a contract: its layout (one module per op family), the registries and the @rule decorator,
the typed contexts (RuleContext / RewriteContext) that the analyzer and masking implement, no import cycle with the
analyzer, and how the analyzer looks rules up (overload, packet, pointwise tag, unknown ops, failing rules)."""
import ast
import operator
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxprune.analyzer
import fxprune.masking
import fxprune.rules
from fxprune.analyzer import Analyzer, analyze_graph
from fxprune.errors import AnalysisError
from fxprune.rules import REWRITES, RULES, RewriteContext, RuleContext, rule
from fxprune.rules import util
from fxprune.spaces import SpaceConflict
from fxprune.trace import trace

aten = torch.ops.aten
RULES_DIR = Path(fxprune.rules.__file__).parent


def analyze(model, *inputs, rules=None):
    gm = trace(model.eval(), inputs, dynamic_batch=False)
    return gm, analyze_graph(gm, rules)


class LinFn(nn.Module):
    """fc (3 -> width) -> fn -> head (width -> 2): the features are prunable unless fn freezes them."""

    def __init__(self, fn, width=4):
        super().__init__()
        self.fc, self.fn, self.head = nn.Linear(3, width), fn, nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.fn(self.fc(x)))


def features_frozen(a):
    return a.table.frozen_leaves().get(a.table.find(a.param_spaces["fc.weight"][0]))


# ------------------------------------------------------------------------------------------------ layout, no cycle
def _fxprune_imports(path):
    """(module, names) of every import of an fxprune module outside the rules package in ``path``."""
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level >= 2:  # from ..x import y / from .. import x
                out.append((n.module or "", [a.name for a in n.names]))
            elif n.level == 0 and (n.module or "").startswith("fxprune") and not n.module.startswith("fxprune.rules"):
                out.append((n.module, [a.name for a in n.names]))
        elif isinstance(n, ast.Import):
            out.extend((a.name, []) for a in n.names if a.name.startswith("fxprune") and
                       not a.name.startswith("fxprune.rules"))
    return out


def test_rules_package_imports_only_spaces_from_fxprune():
    files = sorted(RULES_DIR.glob("*.py"))
    assert len(files) >= 12
    found = {p.name: _fxprune_imports(p) for p in files}
    assert found.pop("context.py") == [("spaces", ["SpaceTable"])]
    assert all(v == [] for v in found.values()), found  # in particular never fxprune.analyzer / fxprune.masking


@pytest.mark.parametrize("target, family", [
    ("pointwise", "pointwise"), (aten.prelu, "pointwise"), (aten.conv2d, "conv"), (aten.convolution, "conv"),
    (aten.linear, "linear"), (aten.einsum, "linear"), (aten.layer_norm, "norm"), (aten.group_norm, "norm"),
    (aten.scaled_dot_product_attention, "attention"), (aten.cat, "concat_split"), (operator.getitem, "concat_split"),
    (aten.view, "reshape"), (aten.permute, "reshape"), (aten.pixel_shuffle, "spatial"),
    (aten.max_pool2d, "spatial"), (aten.mean, "reduction"), (aten.softmax, "reduction"),
    (aten.embedding, "indexing"), (aten.index, "indexing"), (aten.zeros, "factory"),
])
def test_each_family_registers_its_ops(target, family):
    assert RULES[target].__module__ == f"fxprune.rules.{family}"


def test_every_rewrite_belongs_to_a_ruled_op():
    # a rewrite may be keyed by one overload (aten.mean.dim) of a ruled packet (aten.mean)
    unruled = {t for t in REWRITES if t not in RULES and getattr(t, "overloadpacket", None) not in RULES}
    assert not unruled
    assert {aten.view, aten.split, aten.slice, aten.select, aten.group_norm, aten.conv2d,
            aten.scaled_dot_product_attention, aten.expand, aten.unflatten} <= set(REWRITES)


def test_rule_decorator_registers_rule_and_rewrite():
    target = object()

    def rewrite(R, node):
        pass

    try:
        @rule(target, rewrite=rewrite)
        def fn(A, node):
            pass

        assert RULES[target] is fn and REWRITES[target] is rewrite
    finally:
        RULES.pop(target, None)
        REWRITES.pop(target, None)
    assert target not in RULES


def test_analyzer_reexports_util_helpers():
    assert fxprune.analyzer.op_name is util.op_name
    assert fxprune.analyzer.size_hint is util.size_hint
    assert util.size_hint(7) == 7


# ------------------------------------------------------------------------------------------------ typed contexts
def test_analyzer_implements_rule_context():
    gm = trace(LinFn(nn.ReLU()).eval(), (torch.randn(2, 3),), dynamic_batch=False)
    assert isinstance(Analyzer(gm, RULES), RuleContext)
    assert not isinstance(types.SimpleNamespace(sp=None), RuleContext)


def test_masking_rewrite_context_implements_the_protocol():
    gm, a = analyze(LinFn(nn.ReLU()), torch.randn(2, 3))
    R = fxprune.masking.RewriteContext(types.SimpleNamespace(analysis=a), {}, {})
    assert isinstance(R, RewriteContext)
    assert R.new(a.param_spaces["fc.weight"][0]) == 4
    assert not isinstance(types.SimpleNamespace(new=None), RewriteContext)


# ------------------------------------------------------------------------------------------------ lookup and errors
def test_unknown_op_freezes_what_it_touches_and_names_the_node():
    gm, a = analyze(LinFn(lambda y: torch.linalg.cross(y, y * 2, dim=1), width=3), torch.randn(2, 3))
    (name,) = [n.name for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) is aten.linalg_cross]
    op = "aten.linalg_cross.default"
    assert a.unknown_ops == {op: [name]}
    assert (name, op, f"no rule for {op}") in a.frozen_nodes
    assert features_frozen(a) == f"{name} ({op}): no rule for {op}"


@torch.library.custom_op("fxprune_test::double_rows", mutates_args=())
def double_rows(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@double_rows.register_fake
def _(x):
    return torch.empty_like(x)


def _same_spaces(A: RuleContext, node) -> None:
    A.set(node, list(A.sp(node.args[0])))


def test_custom_op_without_rule_freezes_then_a_rule_makes_it_transparent():
    op = torch.ops.fxprune_test.double_rows
    gm, a = analyze(LinFn(lambda y: double_rows(y)), torch.randn(2, 3))
    assert a.unknown_ops == {"fxprune_test.double_rows.default": ["double_rows"]}
    assert features_frozen(a) == ("double_rows (fxprune_test.double_rows.default): no rule for "
                                  "fxprune_test.double_rows.default")
    # a registry passed to analyze_graph: by overload packet (covers every overload) or by overload
    for key in (op, op.default):
        gm, a = analyze(LinFn(lambda y: double_rows(y)), torch.randn(2, 3), rules={**RULES, key: _same_spaces})
        assert a.unknown_ops == {} and features_frozen(a) is None
        assert a.table.find(a.param_spaces["fc.weight"][0]) == a.table.find(a.param_spaces["head.weight"][1])
    assert op not in RULES and op.default not in RULES  # the global registry was not touched


def test_pointwise_ops_are_found_through_the_pointwise_tag():
    gm, a = analyze(LinFn(nn.ReLU()), torch.randn(2, 3))
    assert aten.relu not in RULES and aten.relu.default not in RULES
    assert a.unknown_ops == {} and features_frozen(a) is None
    without = {k: v for k, v in RULES.items() if k != "pointwise"}
    gm, a = analyze(LinFn(nn.ReLU()), torch.randn(2, 3), rules=without)
    assert a.unknown_ops == {"aten.relu.default": ["relu"]}


def _rules_with_relu(fn):
    return {**RULES, aten.relu: fn}


def test_rule_raising_an_error_names_the_node():
    def broken(A, node):
        raise ValueError("boom")

    with pytest.raises(AnalysisError, match="rule for aten.relu.default failed at node 'relu': ValueError: boom"):
        analyze(LinFn(nn.ReLU()), torch.randn(2, 3), rules=_rules_with_relu(broken))


def test_rule_with_unexpected_conflict_freezes_the_node():
    def conflicting(A, node):
        raise SpaceConflict("no way")

    gm, a = analyze(LinFn(nn.ReLU()), torch.randn(2, 3), rules=_rules_with_relu(conflicting))
    assert ("relu", "aten.relu.default", "rule failed: no way") in a.frozen_nodes
    assert features_frozen(a) == "relu (aten.relu.default): rule failed: no way"


def test_rule_that_sets_no_output_freezes_the_node():
    gm, a = analyze(LinFn(nn.ReLU()), torch.randn(2, 3), rules=_rules_with_relu(lambda A, node: None))
    assert ("relu", "aten.relu.default", "rule produced no output spaces") in a.frozen_nodes
    assert features_frozen(a) == "relu (aten.relu.default): rule produced no output spaces"
