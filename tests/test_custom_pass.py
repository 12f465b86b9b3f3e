"""A user-written pass runs inside compile (the README example)."""
import numpy as np

import fxprune
from fxprune import Pass, PassResult
from fxprune.passes import Shrink

from hard_cases import build


class KeepEven(Pass):
    """Keep only even-numbered channels of every prunable group of at least 8 channels."""

    name = "keep_even"
    requires = frozenset({"groups"})

    def run(self, program, ctx):
        n = 0
        for g in program.groups.prunable():
            if g.kind == "channels" and g.size >= 8:
                program.masks[g.id] = np.arange(g.size) % 2 == 0
                n += 1
        return PassResult(program, stats={"groups": n})


def test_custom_pass_in_compile():
    model, x = build("residual_chain")
    out = fxprune.compile(model, x, passes=[KeepEven(), Shrink()])
    assert out.report.verified
    assert out.report.params_after < out.report.params_before
    assert out.program.history[0]["pass"] == "keep_even" and out.program.history[0]["stats"]["groups"] > 0
    w = out.module.get_parameter("stem.0.weight")  # parameters keep their qualified names
    assert w.shape[0] == 8  # 16 channels -> the 8 even ones
    assert model.get_parameter("stem.0.weight").shape[0] == 16  # the user's model is untouched


def test_analyze_is_printable_and_exportable():
    model, x = build("concat_of_concats")
    groups = fxprune.analyze(model, x)
    text = str(groups)
    assert "prunable" in text and "frozen" in text
    d = groups.as_dict()
    assert d["groups"] and all("members" in g for g in d["groups"])
    assert groups.to_json()
    # the concat output is not a group of its own: its pieces are the producers' groups
    sizes = sorted(g.size for g in groups.prunable())
    assert 8 in sizes and 12 in sizes and 6 in sizes
