"""The Program/pass contract: typed stages and records, the analysis manager, clone isolation, seeding."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import PassContext, PassManager, Program
from fxprune.analysis import ANALYSES, register_analysis
from fxprune.errors import StageError
from fxprune.pass_manager import Pass, PassResult
from fxprune.passes import ApplyMasks, ChannelPrune, FTWTGates, NMSparsity, Shrink
from fxprune.passes import importance as imp
from fxprune.program import Stage
from fxprune.records import SelectionRecord, ShrinkRecord
from fxprune.seeding import derive_seed, torch_generator
from fxprune.trace import trace


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x).relu(), self.b(x).relu()], 1))


def _program(model=None, x=None):
    torch.manual_seed(0)
    model = model or TwoBranch().eval()
    x = torch.randn(2, 3, 8, 8) if x is None else x
    return Program(trace(model, (x,)), (x,), {}, source=model), model, x


# ------------------------------------------------------------------------------------------------------ stages
def test_stages_follow_the_pipeline():
    prog, _, _ = _program()
    assert prog.stage is Stage.TRACED
    sel, _ = PassManager([ChannelPrune(ratio=0.5)]).run(prog, PassContext())
    assert sel.stage is Stage.SELECTED
    masked, _ = PassManager([ApplyMasks()]).run(sel, PassContext())
    assert masked.stage is Stage.MASKED
    shrunk, _ = PassManager([Shrink()]).run(masked, PassContext())
    assert shrunk.stage is Stage.SHRUNK and shrunk.masks == {}
    assert [h["stage"] for h in shrunk.history] == ["selected", "masked", "shrunk"]


def test_graph_rewrite_on_unapplied_selection_is_a_stage_error():
    prog, _, _ = _program()
    with pytest.raises(StageError, match="not applied") as ei:
        PassManager([ChannelPrune(ratio=0.5), FTWTGates()]).run(prog, PassContext())
    assert "ApplyMasks" in str(ei.value) and ei.value.pass_name == "ftwt_gates"


def test_user_pass_writing_masks_directly_makes_a_selection():
    class Half(Pass):
        name = "half"
        requires = frozenset({"groups"})

        def run(self, program, ctx):
            g = next(g for g in program.groups.prunable() if g.kind == "channels")
            program.masks[g.id] = np.arange(g.size) < g.size // 2
            return PassResult(program)

    prog, _, _ = _program()
    out, _ = PassManager([Half()]).run(prog, PassContext())
    assert out.stage is Stage.SELECTED


# ------------------------------------------------------------------------------------------------ requirements
def test_unknown_requires_or_preserves_is_an_error_at_definition():
    with pytest.raises(ValueError, match="unknown analyses"):
        class Bad(Pass):  # noqa: F841
            name = "bad"
            requires = frozenset({"grups"})
    with pytest.raises(ValueError, match="unknown analyses"):
        class Bad2(Pass):  # noqa: F841
            name = "bad2"
            preserves = frozenset({"nope"})
    with pytest.raises(TypeError, match="not the string"):
        class Bad3(Pass):  # noqa: F841
            name = "bad3"
            requires = "groups"


def test_analysis_manager_caches_and_invalidates_unless_preserved():
    calls = []

    @register_analysis("test_param_count")
    def _count(program):
        calls.append(1)
        return program.num_params()

    try:
        class Reader(Pass):
            name = "reader"
            requires = frozenset({"test_param_count"})

            def run(self, program, ctx):
                return PassResult(program, changed=False, stats={"n": program.analysis("test_param_count")})

        class Rewriter(Pass):  # changes the graph, preserves nothing by default
            name = "rewriter"
            changes_graph = True

            def run(self, program, ctx):
                return PassResult(program, changed=False)

        class KeepingRewriter(Rewriter):
            name = "keeping_rewriter"
            preserves = frozenset({"test_param_count"})

        prog, _, _ = _program()
        PassManager([Reader(), Reader()]).run(prog, PassContext())
        assert len(calls) == 1  # computed once, reused by the second pass
        calls.clear()
        PassManager([Reader(), Rewriter(), Reader()]).run(prog.clone(deep=False), PassContext())
        assert len(calls) == 2  # invalidated by the graph change
        calls.clear()
        out, _ = PassManager([Reader(), KeepingRewriter(), Reader()]).run(_program()[0], PassContext())
        assert len(calls) == 1  # declared preserved: kept
        assert out.analyses.cached("groups") is None  # not preserved by the rewriter: dropped
    finally:
        ANALYSES.pop("test_param_count", None)


def test_a_pass_never_mutates_its_input_program():
    prog, _, _ = _program()
    sel, _ = PassManager([ChannelPrune(ratio=0.5, round_to=2)]).run(prog, PassContext())
    masks = {k: v.copy() for k, v in sel.masks.items()}
    divisors = dict(sel.divisors)
    history = json.dumps(sel.history, default=str)
    again, _ = PassManager([ChannelPrune(ratio=0.5, round_to=4)]).run(sel, PassContext())
    assert {k: v.tolist() for k, v in sel.masks.items()} == {k: v.tolist() for k, v in masks.items()}
    assert sel.divisors == divisors and json.dumps(sel.history, default=str) == history
    assert again.divisors != divisors and len(again.records) == 2 and len(sel.records) == 1


def test_records_are_typed_and_immutable():
    prog, _, _ = _program()
    out, _ = PassManager([ChannelPrune(ratio=0.5), Shrink()]).run(prog, PassContext())
    (sel,) = out.records_of(SelectionRecord)
    (shr,) = out.records_of(ShrinkRecord)
    with pytest.raises(TypeError):
        sel.importance[0] = (0.0, 0.0, 0.0)
    idx = shr.kept_indices["a.weight"][0]
    assert idx.dtype == np.int64 and len(idx) == 4 and shr.original_shapes["a.weight"] == (8, 3, 3, 3)
    with pytest.raises(ValueError):
        idx[0] = 7


# -------------------------------------------------------------------------------------------------- seeding
def test_seed_streams_differ_by_whole_salt():
    long_a, long_b = "random-importance-" + "x" * 20 + "1", "random-importance-" + "x" * 20 + "2"
    assert derive_seed(0, long_a) != derive_seed(0, long_b)
    assert derive_seed(0, "unstructured-conv1.weight") != derive_seed(0, "unstructured-conv2.weight")
    assert derive_seed(0, "a") == derive_seed(0, "a") and derive_seed(0, "a") != derive_seed(1, "a")
    a = torch.rand(16, generator=torch_generator(0, long_a))
    b = torch.rand(16, generator=torch_generator(0, long_b))
    assert not torch.equal(a, b)


def test_equal_size_groups_get_different_random_scores():
    prog, _, _ = _program()
    groups = [g for g in prog.groups.prunable() if g.kind == "channels" and g.size == 8]
    assert len(groups) >= 2
    score = imp.resolve("random")
    s = [np.asarray(score(prog, g, PassContext(seed=3))) for g in groups[:2]]
    assert not np.allclose(s[0], s[1])
    again = np.asarray(score(prog, groups[0], PassContext(seed=3)))
    assert np.array_equal(s[0], again)  # deterministic


# ----------------------------------------------------------------------------------------------- no double work
def test_shrink_applies_weight_masks_once_and_compile_does_not_copy_again(monkeypatch):
    import sys

    import fxprune.masking as M
    C = sys.modules["fxprune.compile"]  # the module (fxprune.compile is the function)

    calls = {"weight_masks": 0, "masked_copy": 0}
    real_awm, real_mc = M.apply_weight_masks, C.masked_copy

    def count_awm(*a, **k):
        calls["weight_masks"] += 1
        return real_awm(*a, **k)

    def count_mc(*a, **k):
        calls["masked_copy"] += 1
        return real_mc(*a, **k)

    monkeypatch.setattr(C, "masked_copy", count_mc)
    import fxprune.passes.shrink as S
    monkeypatch.setattr(S, "apply_weight_masks", count_awm)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    out = fxprune.compile(model, (torch.randn(2, 16),), [ChannelPrune(ratio=0.5), NMSparsity(2, 4), Shrink()])
    assert out.program.stage is Stage.SHRUNK
    assert calls == {"weight_masks": 1, "masked_copy": 0}
    w = out.module.get_parameter("0.weight")
    assert w.shape == (16, 16) and int((w.reshape(16, -1, 4) != 0).sum(-1).max()) <= 2
