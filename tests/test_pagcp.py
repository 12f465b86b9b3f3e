"""PAGCP (METHODS.md section 2): the threshold schedule multiplies to T, every accepted group satisfies each task's
loss bound on the calibration data (re-checked independently of the pass), MACs fall monotonically, rounds and the
fine-tune callback."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import InputError
from fxprune.masking import masked_copy
from fxprune.passes import Shrink
from fxprune.passes.pagcp import PAGCP, CalibrationLosses, PAGCPRecord, solve_lambda, threshold_schedule


class TwoHead(nn.Module):
    """A shared trunk with a classification head and a regression head."""

    def __init__(self, w: int = 12):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                   nn.Conv2d(w, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.cls = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 3))
        self.reg = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 2))

    def forward(self, x):
        f = self.trunk(x)
        return self.cls(f), self.reg(f)


TASKS = {"cls": lambda o, y: F.cross_entropy(o[0], y[0]), "reg": lambda o, y: F.mse_loss(o[1], y[1])}


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g)
    y = (x[:, 0, :6].mean((1, 2)) > 0).long() + (x[:, 0, 6:].mean((1, 2)) > 0).long()
    r = torch.stack([x[:, 0, :, :6].mean((1, 2)), x[:, 0].abs().mean((1, 2))], 1)
    return x, y, r


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = TwoHead()
    x, y, r = _data(512, 0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for step in range(120):
        i = torch.randint(0, 512, (64,))
        out = model(x[i])
        loss = F.cross_entropy(out[0], y[i]) + F.mse_loss(out[1], r[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xc, yc, rc = _data(96, 1)
    calib = [(xc[k:k + 48], (yc[k:k + 48], rc[k:k + 48])) for k in range(0, 96, 48)]
    return model, calib


def test_threshold_schedule_multiplies_to_T():
    for t1, n, T in [(0.06, 10, 6.0), (0.06, 57, 6.0), (0.2, 3, 2.0), (0.05, 30, 1.5)]:
        ts = threshold_schedule(t1, n, T)
        assert ts[0] == pytest.approx(t1)
        assert math.prod(1 + t for t in ts) == pytest.approx(T, rel=1e-9)
        lam = solve_lambda(t1, n, T)
        assert all(b == pytest.approx(a * lam) for a, b in zip(ts, ts[1:]))
    assert solve_lambda(0.06, 57, 6.0) < 1 < solve_lambda(0.06, 10, 6.0)  # many groups: shrinking thresholds
    with pytest.raises(InputError):
        solve_lambda(0.5, 4, 1.2)


def _recorded_round(out):
    rec = out.program.records_of(PAGCPRecord)
    assert len(rec) == 1
    return rec[0]


def test_every_accepted_group_meets_each_task_bound(trained):
    model, calib = trained
    x0 = calib[0][0][:2]
    out = fxprune.compile(model, (x0,), passes=[PAGCP(TASKS, calib, initial_rate=0.02, initial_thres=1.5)])
    rec = _recorded_round(out)
    rnd = rec.rounds[0]
    assert math.prod(1 + t for t in rnd.schedule) == pytest.approx(1.5, rel=1e-9)
    decisions = rnd.decisions
    accepted = [d for d in decisions if d.ratio > 0]
    assert accepted, "nothing accepted: the test would not check the bound"
    assert any(d.ratio < 0.95 for d in decisions), "no bound was ever active: the test would not check it"
    # the recorded losses respect the bound of their step
    for d in accepted:
        for lo, b in zip(d.losses, d.base):
            assert lo <= (1 + d.threshold) * b + 1e-9
    # independent re-check: rebuild the sequential (greedy) model decision by decision from the recorded keep masks
    # and recompute every task loss with a masked copy, outside the pass' calibration oracle
    program = fxprune.compile(model, (x0,), passes=[]).program
    gs = program.groups
    keep: dict[int, np.ndarray] = {}
    n = sum(xb.shape[0] for xb, _ in calib)
    for d in decisions:
        if d.ratio == 0:
            continue
        keep[gs[d.group].space] = d.keep
        assert d.kept == int(d.keep.sum()) < gs[d.group].size
        m = masked_copy(program.gm, gs, keep, {})
        with torch.no_grad():
            vals = [sum(float(fn(m(xb), yb)) * xb.shape[0] for xb, yb in calib) / n for fn in TASKS.values()]
        for v, lo, b in zip(vals, d.losses, d.base):
            assert v == pytest.approx(lo, rel=1e-4, abs=1e-6)
            assert v <= (1 + d.threshold) * b + 1e-6
    # the final program's losses equal what the pass reports
    final = masked_copy(program.gm, gs, {gs[g].space: mk for g, mk in out.program.masks.items()}, {})
    with torch.no_grad():
        for k, fn in enumerate(TASKS.values()):
            tot = sum(float(fn(final(xb), yb)) * xb.shape[0] for xb, yb in calib) / 96
            assert tot == pytest.approx(rnd.final_losses[k], rel=1e-4)


def test_bound_is_active_and_a_looser_threshold_prunes_more(trained):
    model, calib = trained
    x0 = calib[0][0][:2]
    macs = []
    for T in (1.1, 4.0):
        out = fxprune.compile(model, (x0,), passes=[PAGCP(TASKS, calib, initial_rate=0.01, initial_thres=T, topk=1.0),
                                                    Shrink()])
        assert out.report.verified
        macs.append(out.report.macs_after)
        rnd = _recorded_round(out).rounds[0]
        # every decision of the sequential pass: its losses within its bound
        for d in rnd.decisions:
            assert all(lo <= (1 + d.threshold) * b + 1e-9 for lo, b in zip(d.losses, d.base))
    assert macs[1] < macs[0]


def test_macs_fall_monotonically_and_rounds_finetune(trained):
    model, calib = trained
    x0 = calib[0][0][:2]
    calls = []

    def finetune(module, rnd):
        calls.append(rnd)
        opt = torch.optim.SGD(module.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
        with fxprune.train.train_mode(module):
            for xb, yb in calib:
                loss = sum(fn(module(xb), yb) for fn in TASKS.values())
                opt.zero_grad()
                loss.backward()
                opt.step()

    p = PAGCP(TASKS, calib, rounds=2, finetune=finetune, initial_rate=0.02, initial_thres=1.5)
    out = fxprune.compile(model, (x0,), passes=[p])
    assert calls == [0]
    rec = _recorded_round(out)
    assert len(rec.rounds) == 2
    prev_final = None
    for rnd in rec.rounds:
        prev = None
        for d in rnd.decisions:
            assert d.macs_after <= d.macs_before
            if d.ratio > 0:
                assert d.macs_after < d.macs_before
            if prev is not None:
                assert d.macs_before == prev.macs_after  # sequential: each group starts where the last ended
            prev = d
    # the second round starts from the first round's selection: MACs never grow
    gs = out.program.groups
    assert gs.macs(out.program.leaf_keep()) <= gs.macs()
    # removed channels stayed exactly zero through the fine-tune (gradient hooks), kept ones trained
    from fxprune.masking import param_keep
    keep = param_keep(gs, out.program.leaf_keep())
    for name, dims in keep.items():
        t = out.program.param(name)
        for d, k in enumerate(dims):
            if k is not None and t.is_floating_point() and "running_var" not in name:
                assert float(t.detach().index_select(d, torch.from_numpy(np.nonzero(~k)[0])).abs().max()) == 0.0
    shr = fxprune.compile(model, (x0,), passes=[PAGCP(TASKS, calib, rounds=2, finetune=finetune, initial_rate=0.02,
                                                      initial_thres=1.5), Shrink()])
    assert shr.report.verified and shr.report.macs_after < shr.report.macs_before


def test_stacked_oracle_equals_one_at_a_time(trained):
    model, calib = trained
    x0 = calib[0][0][:2]
    program = fxprune.compile(model, (x0,), passes=[]).program
    gs = program.groups
    rng = np.random.default_rng(0)
    cands = []
    for _ in range(3):
        keep = {}
        for g in gs.prunable():
            keep[g.space] = rng.random(g.size) > 0.4
            keep[g.space][0] = True
        cands.append(keep)
    a = CalibrationLosses(program.gm, gs, TASKS, calib, stack=1).losses(cands)
    b = CalibrationLosses(program.gm, gs, TASKS, calib, stack=3)
    vb = b.losses(cands)
    assert b.stats["stacked_forwards"] > 0
    np.testing.assert_allclose(a, vb, rtol=1e-4, atol=1e-6)
    assert not np.allclose(a[0], a[1])  # the candidates differ, so equality is not trivial


def test_options_are_checked():
    with pytest.raises(InputError):
        PAGCP({}, None)
    with pytest.raises(InputError):
        PAGCP(TASKS, None, initial_thres=1.01)
    with pytest.raises(InputError):
        PAGCP(TASKS, None, topk=0)
    with pytest.raises(InputError):
        PAGCP(TASKS, None, rounds=True)
