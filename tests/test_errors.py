"""Bad input gets a clear fxprune.errors.* naming the fix, and the user's model is never modified."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import errors
from fxprune.passes import ChannelPrune, Shrink

from hard_cases import build


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: not traceable
            return self.a(x)
        return self.b(x)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {k: id(p) for k, p in model.named_parameters()}


def _unchanged(model, snap):
    sd, ids = snap
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert {k: id(p) for k, p in model.named_parameters()} == ids


def test_untraceable_model():
    m = DataDependent().eval()
    snap = _snapshot(m)
    with pytest.raises(errors.TraceError) as e:
        fxprune.compile(m, (torch.randn(1, 3, 8, 8),))
    assert "DataDependent" in str(e.value) and "fix:" in str(e.value)
    _unchanged(m, snap)


def test_not_a_module():
    with pytest.raises(errors.InputError, match="nn.Module"):
        fxprune.compile(lambda x: x, (torch.randn(1),))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "half"])
def test_ratio_out_of_range(ratio):
    with pytest.raises(errors.InputError, match="ratio"):
        ChannelPrune(ratio)


def test_unknown_importance():
    with pytest.raises(errors.InputError, match="l1, l2, bn_scale, random"):
        ChannelPrune(0.5, importance="taylorr")


def test_pass_class_instead_of_instance():
    m, x = build("residual_chain")
    with pytest.raises(errors.InputError, match="instantiate"):
        fxprune.compile(m, x, passes=[ChannelPrune])


def test_target_macs_below_frozen_floor():
    m, x = build("residual_chain")
    snap = _snapshot(m)
    with pytest.raises(errors.BudgetError) as e:
        fxprune.compile(m, x, passes=[ChannelPrune(target_macs=0.001), Shrink()])
    assert "channel_prune" in str(e.value) and "raise target_macs" in str(e.value)
    _unchanged(m, snap)


def test_target_macs_met():
    m, x = build("residual_chain")
    out = fxprune.compile(m, x, passes=[ChannelPrune(target_macs=0.5), Shrink()])
    assert out.report.macs_after <= 0.5 * out.report.macs_before
    assert out.report.macs_after >= 0.35 * out.report.macs_before  # not far below the target either


def test_bad_example_inputs():
    m, _ = build("residual_chain")
    with pytest.raises(errors.InputError, match="example_inputs"):
        fxprune.compile(m, 3.0)
    with pytest.raises(errors.TraceError):
        fxprune.compile(m, (torch.randn(2, 5, 16, 16),))  # wrong channel count


def test_failed_pass_leaves_previous_program_intact():
    m, x = build("residual_chain")

    class Boom(fxprune.Pass):
        name = "boom"
        modifies_weights = True

        def run(self, program, ctx):
            for p in program.gm.parameters():
                p.data.zero_()  # scribble on the copy, then fail
            raise RuntimeError("kaput")

    out = fxprune.compile(m, x, passes=[ChannelPrune(0.5)])
    before = {k: v.clone() for k, v in out.program.gm.state_dict().items()}
    pm = fxprune.PassManager([Boom()])
    with pytest.raises(errors.PassError, match="boom.*kaput"):
        pm.run(out.program, fxprune.PassContext())
    assert all(torch.equal(v, before[k]) for k, v in out.program.gm.state_dict().items())


def test_invariant_frozen_group_kept():
    m, x = build("residual_chain")

    class PruneFrozen(fxprune.Pass):
        name = "prune_frozen"
        requires = frozenset({"groups"})

        def run(self, program, ctx):
            g = program.groups.frozen()[0]
            mask = __import__("numpy").ones(g.size, dtype=bool)
            mask[0] = False
            program.masks[g.id] = mask
            return fxprune.PassResult(program)

    with pytest.raises(errors.PassError, match="frozen"):
        fxprune.compile(m, x, passes=[PruneFrozen()])
