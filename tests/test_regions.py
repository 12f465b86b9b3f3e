"""Region tracing (issue 19): models whose whole forward does not export (detector post-processing) are pruned in
their traceable submodules, with channels coupled across region boundaries and the eager glue left untouched."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune import errors
from fxprune.passes import ChannelPrune, Shrink
from fxprune.regions import RegionCompiled
from fxprune.testing import make_observable

tv_ops = pytest.importorskip("torchvision.ops", reason="torchvision is needed for NMS")


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.s1 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU())

    def forward(self, x):
        a = self.s1(self.stem(x))
        return {"c3": a, "c4": self.s2(a)}


class FPN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lat3, self.lat4 = nn.Conv2d(32, 24, 1), nn.Conv2d(64, 24, 1)
        self.out3, self.out4 = nn.Conv2d(24, 24, 3, 1, 1), nn.Conv2d(24, 24, 3, 1, 1)

    def forward(self, feats):
        p4 = self.lat4(feats["c4"])
        p3 = self.lat3(feats["c3"]) + F.interpolate(p4, scale_factor=2.0)
        return [self.out3(p3), self.out4(p4)]


class Head(nn.Module):
    def __init__(self, nc: int = 3):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(24, 24, 3, 1, 1), nn.ReLU())
        self.cls, self.box = nn.Conv2d(24, nc, 1), nn.Conv2d(24, 4, 1)

    def forward(self, feats):
        return [self.cls(self.conv(f)) for f in feats], [self.box(self.conv(f)) for f in feats]


class Det(nn.Module):
    """Backbone -> FPN -> shared head -> score threshold (a Python int from tensor values) -> top-k -> NMS."""

    def __init__(self):
        super().__init__()
        self.backbone, self.fpn, self.head = Backbone(), FPN(), Head()

    def forward(self, x):
        cls, box = self.head(self.fpn(self.backbone(x)))
        scores = torch.cat([c.flatten(2) for c in cls], 2).sigmoid().max(1).values[0]
        boxes = torch.cat([b.flatten(2) for b in box], 2)[0].T
        boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:].abs() + 1], 1)
        n = max(int((scores > scores.mean()).sum()), 1)  # data-dependent: torch.export refuses the whole model
        top, idx = scores.topk(n)
        keep = tv_ops.nms(boxes[idx], top, 0.5)
        return {"boxes": boxes[idx][keep], "scores": top[keep], "cls": cls}


def _det() -> Det:
    torch.manual_seed(0)
    return make_observable(Det(), 0).eval()


X = torch.randn(1, 3, 64, 64)


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def auto() -> RegionCompiled:
    return fxprune.compile(_det(), (X,), [ChannelPrune(ratio=0.5), Shrink()], regions="auto")


def test_whole_model_does_not_trace_without_regions():
    with pytest.raises(errors.TraceError) as e:
        fxprune.compile(_det(), (X,), passes=[])
    assert e.value.cause == "control_flow"


def test_auto_regions_prune_across_boundaries_and_verify(auto):
    assert isinstance(auto, RegionCompiled)
    assert auto.plan.regions == ["backbone", "fpn", "head"]
    m = auto.module
    assert type(m) is Det  # the user's class, pruned submodules
    # cross-region coupling: the backbone's stage outputs and the FPN lateral convs that read them were pruned alike
    assert m.backbone.s1[0].out_channels == m.fpn.lat3.in_channels < 32
    assert m.backbone.s2[0].out_channels == m.fpn.lat4.in_channels < 64
    assert m.backbone.s1[1].num_features == m.backbone.s1[0].out_channels
    # inside the FPN and head: pruned too, consistent with each other
    assert m.fpn.out3.out_channels == m.head.conv[0].in_channels
    # head outputs go to eager post-processing: never pruned
    assert (m.head.cls.out_channels, m.head.box.out_channels) == (3, 4)
    assert auto.report.verified is True
    e2e = auto.end_to_end
    assert e2e["regions_ok"] and e2e["outputs_ok"] and e2e["region_tensors"] == 4
    assert auto.report.params_after < 0.6 * auto.report.params_before


def test_pruned_detector_equals_masked_detector_end_to_end(auto):
    """Independent of compile's own check: zero the removed channels in a copy of the original and compare outputs
    on a fresh input (the NMS result included)."""
    from fxprune.regions import _kept, _write_back
    from fxprune.report import graph_facts, named_tensors
    orig = _det()
    masked = _write_back(orig, named_tensors(auto.program.gm), _kept(auto.program), graph_facts(auto.program.gm),
                         zero_fill=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, got = masked(x), auto.module(x)
    assert ref["boxes"].shape == got["boxes"].shape and ref["boxes"].shape[0] > 0
    torch.testing.assert_close(got["scores"], ref["scores"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["boxes"], ref["boxes"], rtol=1e-4, atol=1e-4)
    for a, b in zip(got["cls"], ref["cls"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and the pruning changed something observable: the unpruned model gives other scores
    with torch.no_grad():
        dense = orig(x)
    assert not torch.allclose(dense["cls"][0], got["cls"][0], atol=1e-3)


def test_eager_consumers_freeze_and_report(auto):
    frozen = [f for f in auto.report.frozen_by if f["op"] == "eager"]
    assert len(frozen) == 4 and all("head output" in f["reason"] and "read by eager code in Det" in f["reason"]
                                    for f in frozen)
    assert any("regions (3): backbone, fpn, head" in n for n in auto.report.notes)


def test_named_regions_override_and_freeze_what_eager_code_reads():
    m = _det()
    snap = _snapshot(m)
    out = fxprune.compile(m, (X,), [ChannelPrune(ratio=0.5), Shrink()], regions=["backbone", "head"])
    assert out.plan.regions == ["backbone", "head"]
    p = out.module
    # the FPN is eager glue now: untouched, and the backbone outputs it reads are frozen
    assert p.fpn.lat3.weight.shape == (24, 32, 1, 1) and p.fpn.lat4.weight.shape == (24, 64, 1, 1)
    assert p.backbone.s1[0].out_channels == 32 and p.backbone.s2[0].out_channels == 64
    assert p.backbone.stem[0].out_channels < 16  # inside the region: pruned
    assert p.head.conv[0].out_channels < 24
    reasons = [f["reason"] for f in out.report.frozen_by if f["op"] == "eager"]
    assert any(r.startswith("backbone output") and "read by eager code in fpn" in r for r in reasons)
    assert out.report.verified is True and out.end_to_end["outputs_ok"]
    assert all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())  # the user's model is unchanged


def test_bad_region_names():
    with pytest.raises(errors.InputError, match="not a submodule"):
        fxprune.compile(_det(), (X,), regions=["nope"])
    with pytest.raises(errors.InputError, match="lies inside"):
        fxprune.compile(_det(), (X,), regions=["backbone", "backbone.s1"])


def test_auto_on_a_traceable_model_is_the_usual_compile():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    out = fxprune.compile(m, (torch.randn(1, 3, 16, 16),), regions="auto")
    assert not isinstance(out, RegionCompiled) and out.report.verified


def test_save_and_replay(auto, tmp_path):
    folder = auto.save(tmp_path / "det", plot=False)
    assert (folder / "regions.pt").is_file() and (folder / "keep.json").is_file()
    back = fxprune.replay(_det(), folder)
    assert type(back) is Det
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = auto.module(x), back(x)
    torch.testing.assert_close(a["scores"], b["scores"])
    assert back.fpn.lat3.in_channels == auto.module.fpn.lat3.in_channels
    mem = fxprune.replay(_det(), auto)  # from the Compiled in memory
    assert mem.backbone.s1[0].out_channels == auto.module.backbone.s1[0].out_channels
    with pytest.raises(errors.LoadError):
        fxprune.replay(nn.Sequential(nn.Linear(2, 2)), folder)


@pytest.mark.slow
def test_torchvision_detector_save_replay(tmp_path):
    from torchvision.models import detection as D
    torch.manual_seed(0)
    build = dict(weights=None, weights_backbone=None, min_size=128, max_size=128, rpn_pre_nms_top_n_test=50,
                 rpn_post_nms_top_n_test=20)
    m = make_observable(D.fasterrcnn_mobilenet_v3_large_320_fpn(**build), 0).eval()
    img = torch.rand(3, 128, 128)
    out = fxprune.compile(m, ([img],), [ChannelPrune(ratio=0.5), Shrink()], regions="auto")
    assert out.plan.regions == ["backbone", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"]
    assert out.report.verified and out.end_to_end["regions_ok"] and out.end_to_end["outputs_ok"]
    assert out.report.params_after < 0.8 * out.report.params_before
    res = out.module([img])
    assert isinstance(res, list) and set(res[0]) == {"boxes", "labels", "scores"}
    folder = out.save(tmp_path / "frcnn", plot=False)
    torch.manual_seed(1)
    back = fxprune.replay(make_observable(D.fasterrcnn_mobilenet_v3_large_320_fpn(**build), 1), folder)
    assert type(back).__name__ == "FasterRCNN"
    with torch.no_grad():
        raw_a, raw_b = out.module.rpn.head([out.module.backbone(img[None])["0"]]), \
            back.rpn.head([back.backbone(img[None])["0"]])
    torch.testing.assert_close(raw_a, raw_b)
