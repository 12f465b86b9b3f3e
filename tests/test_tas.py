"""TAS (METHODS.md section 7): channel-wise interpolation shapes, d E[MACs] / d alpha != 0, with a large lambda the
arg-max MACs approach the target, the materialised network equals the supernet's arg-max path (and has exactly its
MACs), unsupported structures are reported, the KD helper."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import InputError
from fxprune.flops import count_macs
from fxprune.models.resnet import CifarResNet
from fxprune.passes.tas import (TASearch, TASRecord, TASTrainer, TASWidthMix, channel_interp, kd_finetune,
                                materialize, tas_depth_choices)


def _supernet(n: int = 2, width: int = 4, img: int = 12, target: float = 0.5, **kw):
    torch.manual_seed(0)
    model = CifarResNet(n=n, width=width).eval()
    x = torch.randn(2, 3, img, img)
    out = fxprune.compile(model, (x,), passes=[TASearch(flops_target=target, **kw)])
    return model, x, out


def test_channel_wise_interpolation_shapes_and_values():
    x = torch.randn(2, 5, 3, 4)
    assert channel_interp(x, 8).shape == (2, 8, 3, 4)
    assert channel_interp(x, 3).shape == (2, 3, 3, 4)
    assert channel_interp(x, 5) is x
    const = torch.full((1, 4, 2, 2), 3.0)
    assert torch.allclose(channel_interp(const, 7), torch.full((1, 7, 2, 2), 3.0))
    # 2 -> 4 channels: each input channel repeated (area interpolation)
    two = torch.tensor([1.0, 5.0]).view(1, 2, 1, 1)
    assert channel_interp(two, 4).flatten().tolist() == [1.0, 1.0, 5.0, 5.0]
    # another channel dim (a linear layer's (N, T, C) output)
    assert channel_interp(torch.randn(2, 3, 6), 9, dim=2).shape == (2, 3, 9)
    # the width mixer: two sampled widths of an 8-channel producer, per-width BN, output padded to 8
    bn = (torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8))
    mix = TASWidthMix(0, (2, 4, 6, 8), 8, 1, bn=bn)
    from fxprune.passes.tas import TASState
    st = TASState()
    st.width[0] = ([1, 2], torch.tensor([0.25, 0.75]))
    y = mix.eval()(torch.randn(3, 8, 5, 5), st)
    assert y.shape == (3, 8, 5, 5)
    assert torch.equal(y[:, 6:], torch.zeros(3, 2, 5, 5))  # beyond the larger sampled width: zeros
    assert y[:, :6].abs().sum() > 0


def test_supernet_structure_and_depth_choices():
    model, x, out = _supernet(n=3)
    rec = out.program.records_of(TASRecord)[0]
    stats = out.report.passes[0]["stats"]
    assert stats["groups_searched"] > 0 and stats["depth_stages"] == 3
    assert tas_depth_choices(9) == (1, 3, 5, 7, 9) and tas_depth_choices(3) == (1, 2, 3)
    ctrl = out.module.tas
    # stage 1: 3 identity units after the stem; stages 2, 3: 2 identity units after the downsample block
    assert [len(u) for u, _ in rec.stages] == [3, 2, 2]
    assert ctrl.stage_choices == [(0, 2, 3), (0, 1, 2), (0, 1, 2)]  # TAS's rule on 4 and 3 blocks, minus the entry
    full_w = {g: ws[-1] for g, ws in ctrl.cands.items()}
    full_d = {s: cs[-1] for s, cs in enumerate(ctrl.stage_choices)}
    assert ctrl.macs_of(full_w, full_d) == rec.dense_macs == fxprune.analyze(model, (x,)).macs()
    # the supernet runs in both modes with the right output shape
    for mode in ("search", "argmax"):
        ctrl.mode = mode
        assert out.module(torch.randn(3, *x.shape[1:])).shape == (3, 10)
    ctrl.mode = "argmax"


def test_expected_macs_gradient_is_nonzero():
    _, _, out = _supernet(n=3)
    ctrl = out.module.tas
    e = ctrl.expected_macs()
    e.backward()
    for name, p in list(ctrl.alpha.items()) + list(ctrl.beta.items()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # one-hot distributions: the expectation is the exact MACs of that architecture
    with torch.no_grad():
        for g, a in ctrl.alpha.items():
            a.zero_()
            a[1] = 50.0
        for s, b in ctrl.beta.items():
            b.zero_()
            b[0] = 50.0
    assert float(ctrl.expected_macs().detach()) == pytest.approx(ctrl.macs_of(), rel=1e-5)


def _toy_data(n: int, img: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, img, img, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return fxprune.data.loader(x, y, 16, seed=seed)


@pytest.mark.parametrize("target", [0.35, 0.6])
def test_large_lambda_drives_argmax_macs_to_the_target(target):
    """Architecture updates on the cost loss alone (lambda large: the task loss is negligible) move the arg-max MACs
    from well outside into the band [target - tolerance, target]."""
    _, _, out = _supernet(n=2, target=target, tolerance=0.05)
    ctrl = out.module.tas
    start = ctrl.macs_of() / ctrl.dense_macs
    assert abs(start - target) > 0.05  # it has to move
    tr = TASTrainer(out.module, lambda o, y: F.cross_entropy(o, y), arch_lr=0.05, lambda_cost=50.0)
    for _ in range(150):
        closs, cur = tr.cost_loss()
        tr.a_opt.zero_grad()
        if closs.requires_grad:
            (tr.lambda_cost * closs).backward()
            tr.a_opt.step()
    ratio = ctrl.macs_of() / ctrl.dense_macs
    assert target - 0.05 - 1e-9 <= ratio <= target + 1e-9, ratio


def test_trainer_alternates_on_two_halves():
    _, _, out = _supernet(n=2, target=0.5)
    ctrl = out.module.tas
    alpha0 = {k: v.detach().clone() for k, v in ctrl.alpha.items()}
    w0 = out.module.get_parameter("conv1.weight").detach().clone()
    tr = TASTrainer(out.module, lambda o, y: F.cross_entropy(o, y), arch_lr=0.05, lambda_cost=5.0)
    hist = tr.fit(_toy_data(128, 12), epochs=2, settle=0)
    assert len(hist) == 2 * 4  # 64 samples per half, batches of 16
    assert all(np.isfinite([h["weight_loss"], h["arch_loss"], h["cost_loss"]]).all() for h in hist)
    assert hist[0]["tau"] == pytest.approx(5.0) and hist[-1]["tau"] == pytest.approx(0.1)
    assert any(not torch.equal(alpha0[k], v.detach()) for k, v in ctrl.alpha.items())
    assert not torch.equal(w0, out.module.get_parameter("conv1.weight").detach())
    assert ctrl.mode == "argmax"
    # settle: architecture-only steps bring the arg-max into the band without touching the weights
    w1 = out.module.get_parameter("conv1.weight").detach().clone()
    tr.settle(300)
    assert tr.in_band()
    assert torch.equal(w1, out.module.get_parameter("conv1.weight").detach())


def test_materialised_net_equals_the_argmax_path():
    _, x, out = _supernet(n=3, width=6)
    sup = out.module
    ctrl = sup.tas
    rng = np.random.default_rng(0)
    # train a little so that per-width BN statistics differ from the original, then fix random architectures
    tr = TASTrainer(sup, lambda o, y: F.cross_entropy(o, y), arch_lr=0.05)
    tr.fit(_toy_data(64, 12), epochs=1)
    xs = torch.randn(4, *x.shape[1:])
    for trial in range(3):
        widths = {g: int(rng.choice(ws)) for g, ws in ctrl.cands.items()}
        depths = {s: int(rng.choice(cs)) for s, cs in enumerate(ctrl.stage_choices)}
        ctrl.mode = "fixed"
        ctrl.fixed = {"width": {g: ctrl.cands[g].index(w) for g, w in widths.items()},
                      "depth": {s: ctrl.stage_choices[s].index(d) for s, d in depths.items()}}
        with torch.no_grad():
            want = sup(xs)
        ctrl.mode = "argmax"
        mat = materialize(out, widths=widths, depths=depths)
        assert mat.report.verified
        with torch.no_grad():
            got = mat.module(xs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert count_macs(mat.module, (xs[:2],)) == ctrl.macs_of(widths, depths)  # MACs of the example batch (2)
        assert sum(p.numel() for p in mat.module.parameters()) < sum(p.numel() for p in out.module.parameters())
    # the default: the arg-max architecture
    mat = materialize(out)
    with torch.no_grad():
        torch.testing.assert_close(mat.module(xs), sup(xs), rtol=1e-4, atol=1e-5)


class PreAct(nn.Module):
    """A pre-activation residual block (BN after the add): not supported by the rewrite, reported."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 12, 3, padding=1)
        self.bn_mid = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = self.stem(x)
        h = self.bn(h + self.c1(h))
        h = F.relu(self.bn_mid(self.mid(h)))
        return self.head(h.mean((2, 3)))


def test_unsupported_groups_are_reported_and_kept():
    model = PreAct().eval()
    x = torch.randn(2, 3, 8, 8)
    out = fxprune.compile(model, (x,), passes=[TASearch(flops_target=0.6, depth=False)])
    rec = out.program.records_of(TASRecord)[0]
    assert len(rec.widths) == 1 and len(rec.unsupported) == 1
    assert "BatchNorm" in next(iter(rec.unsupported.values()))
    mat = materialize(out)
    assert mat.report.verified
    with pytest.raises(InputError):
        TASearch(flops_target=1.5)
    with pytest.raises(InputError):
        TASTrainer(model, F.cross_entropy)


def test_kd_finetune_helper():
    torch.manual_seed(0)
    teacher = CifarResNet(n=1, width=4).eval()
    student = CifarResNet(n=1, width=2)
    data = _toy_data(64, 8)
    hist = kd_finetune(student, teacher, data, epochs=2, lr=1e-2)
    assert hist["steps"] == 8 and len(hist["losses"]) == 2 and all(np.isfinite(hist["losses"]))
