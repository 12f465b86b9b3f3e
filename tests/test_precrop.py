"""PreCrop (METHODS.md section 8): SynFlow runs without data, the cropped network has the target parameter count
(within 2%), runs, and its widths respect the coupled channel groups; the convex allocation; re-initialisation."""
from __future__ import annotations

import math

import pytest
import torch

import fxprune
from fxprune import models
from fxprune.errors import InputError
from fxprune.flops import count_params
from fxprune.passes import Shrink
from fxprune.passes.precrop import PreCrop, PreCropRecord, prunable_weights, synflow_masks
from fxprune.records import ShrinkRecord


class NoData:
    """A loader that fails the test if anything reads it."""

    def __iter__(self):
        raise AssertionError("SynFlow must not read data")


@pytest.fixture(scope="module")
def resnet():
    return models.get("resnet56", "tiny")


def test_synflow_is_data_free_and_hits_the_density(resnet):
    model, ex = resnet
    program = fxprune.compile(model, ex, passes=[]).program
    names = prunable_weights(program)
    masks = synflow_masks(program.gm, program.args, names, 0.2, iterations=20)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept / total == pytest.approx(0.2, abs=0.01)
    assert all(m.any() for m in masks.values())  # SynFlow avoids layer collapse
    out = fxprune.compile(model, ex, passes=[PreCrop(0.3, "synflow", data=NoData(), iterations=20), Shrink()],
                          data=NoData())
    assert out.report.verified


@pytest.mark.parametrize("density,allocation", [(0.3, "ratio"), (0.5, "ratio"), (0.3, "convex"), (0.3, "uniform")])
def test_params_within_2_percent_and_groups_respected(resnet, density, allocation):
    model, ex = resnet
    out = fxprune.compile(model, ex, passes=[PreCrop(density, "synflow", allocation, iterations=20), Shrink()])
    dense = count_params(model)
    got = count_params(out.module)
    assert abs(got / (density * dense) - 1) <= 0.02, (got, density * dense)
    assert out.report.verified
    y = out.module(torch.randn(3, *ex[0].shape[1:]))
    assert y.shape == (3, 10) and torch.isfinite(y).all()
    # every member of a group has the group's kept width in the cropped module (residual chains share one width)
    rec = out.program.records_of(ShrinkRecord)[0]
    groups = fxprune.analyze(model, ex)
    params = dict(out.module.named_parameters())
    buffers = dict(out.module.named_buffers())
    checked = 0
    for gid, kept in rec.kept_channels.items():
        for m in groups[gid].members:
            t = params.get(m.param, buffers.get(m.param))
            if t is not None and m.covers == groups[gid].size:
                assert t.shape[m.dim] == kept, (m.param, m.dim, t.shape, kept)
                checked += 1
    assert checked > 10
    # the residual chain of stage 1 (stem conv, both blocks' second convs) is one group: equal widths
    sd = out.module.state_dict()
    assert sd["conv1.weight"].shape[0] == sd["layer1.0.conv2.weight"].shape[0] == sd["layer1.0.conv1.weight"].shape[1]
    assert sd["layer3.0.conv2.weight"].shape[0] == sd["layer3.0.downsample.0.weight"].shape[0] == \
        sd["fc.weight"].shape[1]
    assert out.report.params_after < out.report.params_before


def test_densities_steer_the_widths(resnet):
    """Ratio allocation follows the scorer: SNIP on data and SynFlow give different layer densities, and the
    channel ratios reproduce each scorer's densities better than uniform scaling does."""
    model, ex = resnet
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, *ex[0].shape[1:], generator=g), torch.randint(0, 10, (16,), generator=g))]
    recs = {}
    for scorer in ("synflow", "snip", "grasp"):
        out = fxprune.compile(model, ex, passes=[PreCrop(0.3, scorer, data=data, iterations=20), Shrink()])
        recs[scorer] = out.program.records_of(PreCropRecord)[0]
        assert out.report.verified
    assert recs["synflow"].densities != recs["snip"].densities
    assert recs["synflow"].ratios != recs["snip"].ratios or recs["synflow"].ratios != recs["grasp"].ratios


def test_convex_allocation_beats_uniform_on_its_objective():
    model, ex = models.get("mobilenetv2", "tiny")
    out = fxprune.compile(model, ex, passes=[PreCrop(0.4, allocation="convex"), Shrink()])
    rec = out.program.records_of(PreCropRecord)[0]
    assert abs(rec.params / rec.target_params - 1) <= 0.02
    # uniform scaling of every group at the same budget: a feasible point of the same program
    uni = fxprune.compile(model, ex, passes=[fxprune.passes.ChannelPrune(target_params=0.4)])
    program = uni.program
    from fxprune.masking import param_keep
    keep = param_keep(program.groups, program.leaf_keep())
    objective_uniform = 0.0
    for name in rec.densities:
        dims = keep.get(name, [])
        d = 1.0
        for k in dims:
            if k is not None:
                d *= k.mean()
        objective_uniform += math.log(d)
    objective_convex = sum(math.log(v) for v in rec.densities.values())
    assert objective_convex > objective_uniform


def test_reinitialised_for_the_narrow_network(resnet):
    model, ex = resnet
    out = fxprune.compile(model, ex, passes=[PreCrop(0.3, iterations=10), Shrink()])
    sd = out.module.state_dict()
    w = sd["layer2.0.conv2.weight"]
    bound = 1 / math.sqrt(w.shape[1] * 9)  # PyTorch's default rule at the cropped fan-in
    assert float(w.abs().max()) <= bound + 1e-6 and float(w.abs().max()) > 0.8 * bound
    assert torch.equal(sd["layer2.0.bn2.weight"], torch.ones_like(sd["layer2.0.bn2.weight"]))
    assert torch.equal(sd["layer2.0.bn2.running_mean"], torch.zeros_like(sd["layer2.0.bn2.running_mean"]))
    keep = fxprune.compile(model, ex, passes=[PreCrop(0.3, iterations=10, init="keep"), Shrink()])
    assert not torch.equal(keep.module.state_dict()["layer2.0.conv2.weight"], w)


def test_options_are_checked():
    with pytest.raises(InputError):
        PreCrop(0.0)
    with pytest.raises(InputError):
        PreCrop(0.5, scorer="magnitude")
    with pytest.raises(InputError):
        PreCrop(0.5, allocation="greedy")
    with pytest.raises(InputError):
        PreCrop(0.5, min_width=0)
    model, ex = models.get("resnet56", "tiny")
    with pytest.raises(InputError):
        fxprune.compile(model, ex, passes=[PreCrop(0.5, scorer="snip")])  # needs data
