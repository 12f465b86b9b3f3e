"""YOLOv8 compression pipeline (arXiv 2509.12918): sparsity-aware training -> BN-scale pruning -> channel-wise
distillation, on a YOLOv8-style detector trained on synthetic detection data (coloured shapes on noise).

    .venv/bin/python examples/yolov8_pipeline.py            # the default (small) run, ~1-2 min on 2 cores
    .venv/bin/python examples/yolov8_pipeline.py --tiny     # seconds (what tests/test_examples_tiny.py runs)

The training loop is ours (plain PyTorch, ``fxprune.train.fit``); every fxprune piece works the same in your own
loop: ``reg.step(epoch)`` each epoch, ``out, dloss = cwd(images)`` for the distilled student forward.

This file also holds what the YOLOv4-style pipeline (``examples/yolov4_pipeline.py``) shares: the synthetic data,
the detection loss, the evaluation, and a small YOLOv8-style detector used when ``fxprune.models`` has none.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxprune  # noqa: E402
from fxprune.distill import ChannelWiseLoss  # noqa: E402
from fxprune.train import SparsityRegularizer, fit  # noqa: E402

SHAPES = ("rectangle", "ellipse", "triangle")


# ------------------------------------------------------------------------------------------- a YOLOv8-style detector
class Conv(nn.Module):
    """Conv-BN-SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """Decoupled head: per level a box branch (4 * reg_max DFL bins) and a class branch."""

    def __init__(self, nc: int, ch: tuple[int, ...], reg_max: int = 8):
        super().__init__()
        self.nc, self.reg_max = nc, reg_max
        c2, c3 = max(16, ch[0] // 4, 4 * reg_max), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        with torch.no_grad():  # class prior: few cells hold an object
            for seq in self.cv3:
                seq[-1].bias.fill_(-4.0)

    def forward(self, xs):
        return [torch.cat([b(x), c(x)], 1) for x, b, c in zip(xs, self.cv2, self.cv3)]


class TinyYOLOv8(nn.Module):
    """A YOLOv8-style detector (backbone of Conv/C2f/SPPF, PAN neck with upsample+concat, decoupled head).
    Returns a list of 3 maps ``(N, 4 * reg_max + nc, H/s, W/s)`` for strides 8, 16, 32."""

    def __init__(self, nc: int = 3, w: int = 16, reg_max: int = 8):
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, reg_max, (8, 16, 32)
        self.b0, self.b1, self.b2 = Conv(3, w, 3, 2), Conv(w, 2 * w, 3, 2), C2f(2 * w, 2 * w)
        self.b3, self.b4 = Conv(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w)
        self.b5, self.b6 = Conv(4 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w)
        self.b7, self.b8 = Conv(8 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w)
        self.sppf = SPPF(8 * w, 8 * w)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1 = C2f(16 * w, 8 * w, shortcut=False)
        self.n2 = C2f(12 * w, 4 * w, shortcut=False)
        self.d1, self.n3 = Conv(4 * w, 4 * w, 3, 2), C2f(12 * w, 8 * w, shortcut=False)
        self.d2, self.n4 = Conv(8 * w, 8 * w, 3, 2), C2f(16 * w, 8 * w, shortcut=False)
        self.head = Detect(nc, (4 * w, 8 * w, 8 * w), reg_max)

    def forward(self, x):
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.sppf(self.b8(self.b7(p4)))
        h4 = self.n1(torch.cat([self.up(p5), p4], 1))
        h3 = self.n2(torch.cat([self.up(h4), p3], 1))
        o4 = self.n3(torch.cat([self.d1(h3), h4], 1))
        o5 = self.n4(torch.cat([self.d2(o4), p5], 1))
        return self.head([h3, o4, o5])


@dataclass
class DetSpec:
    nc: int
    reg_max: int
    strides: tuple[int, ...]
    image_size: int


def _find_head(model: nn.Module) -> nn.Module | None:
    """The decoupled detection head: a module with ``cv2`` (box) and ``cv3`` (class) branch lists."""
    for m in model.modules():
        if isinstance(getattr(m, "cv2", None), nn.ModuleList) and isinstance(getattr(m, "cv3", None), nn.ModuleList):
            return m
    return None


def get_detector(size: str = "tiny", image_size: int = 64, seed: int = 0) -> tuple[nn.Module, DetSpec, str]:
    """The YOLOv8-style detector of ``fxprune.models`` (its ``"tiny"`` configuration) when its head layout can be
    read (``[box: 4 * reg_max | cls: nc]`` per level, from the last convs of the head's branches), else
    :class:`TinyYOLOv8`. The class branches get the usual prior bias (-4: few cells hold an object).
    Returns (model, layout, where it came from)."""
    torch.manual_seed(seed)
    try:
        from fxprune import models as zoo

        model, ex = zoo.get("yolov8", size="tiny", seed=seed)
        head = _find_head(model)
        x = ex[0] if isinstance(ex, (tuple, list)) else ex
        box, cls = head.cv2[0][-1], head.cv3[0][-1]
        nc, reg_max = int(cls.out_channels), int(box.out_channels) // 4
        with torch.no_grad():
            outs = model.eval()(x)
        if nc < len(SHAPES) or not isinstance(outs, (list, tuple)) or len(outs) != 3 or any(
                o.shape[1] != 4 * reg_max + nc for o in outs):
            raise ValueError("unexpected head layout")
        strides = tuple(int(round(x.shape[-1] / o.shape[-1])) for o in outs)
        with torch.no_grad():
            for seq in head.cv3:
                seq[-1].bias.fill_(-4.0)
        return model, DetSpec(nc, reg_max, strides, int(x.shape[-1])), "fxprune.models.get('yolov8', 'tiny')"
    except Exception:
        w = {"tiny": 8, "small": 16}.get(size, 16)
        model = TinyYOLOv8(nc=len(SHAPES), w=w)
        return model, DetSpec(len(SHAPES), model.reg_max, model.strides, image_size), "examples TinyYOLOv8"


# -------------------------------------------------------------------------------------- synthetic detection data
def synthetic_detection(n: int, image_size: int = 64, max_objects: int = 3, seed: int = 0
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``n`` noise images with 1..max_objects filled shapes (class = shape kind). Returns images (N, 3, S, S) and
    per image a (k, 5) tensor ``[cls, x1, y1, x2, y2]`` in pixels."""
    g = torch.Generator().manual_seed(seed)
    S = image_size
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32) + 0.5, torch.arange(S, dtype=torch.float32) + 0.5,
                            indexing="ij")
    images = torch.randn(n, 3, S, S, generator=g) * 0.5
    boxes = []
    for i in range(n):
        k = int(torch.randint(1, max_objects + 1, (1,), generator=g))
        objs = []
        for _ in range(k):
            cls = int(torch.randint(0, len(SHAPES), (1,), generator=g))
            side = float(torch.empty(1).uniform_(0.12, 0.6, generator=g)) * S
            w = side * float(torch.empty(1).uniform_(0.7, 1.3, generator=g))
            h = side * float(torch.empty(1).uniform_(0.7, 1.3, generator=g))
            w, h = min(w, S - 2), min(h, S - 2)
            x1 = float(torch.empty(1).uniform_(0, S - w, generator=g))
            y1 = float(torch.empty(1).uniform_(0, S - h, generator=g))
            cx, cy = x1 + w / 2, y1 + h / 2
            if cls == 0:
                m = (xx >= x1) & (xx <= x1 + w) & (yy >= y1) & (yy <= y1 + h)
            elif cls == 1:
                m = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
            else:  # upward triangle inside the box
                t = (yy - y1) / h
                m = (t >= 0) & (t <= 1) & ((xx - cx).abs() <= t * w / 2)
            colour = torch.rand(3, generator=g) * 2 + 0.5
            images[i][:, m] = colour[:, None] * torch.where(torch.rand(3, generator=g) > 0.5, 1.0, -1.0)[:, None]
            objs.append([cls, x1, y1, x1 + w, y1 + h])
        boxes.append(torch.tensor(objs, dtype=torch.float32))
    return images, boxes


def build_targets(boxes: list[torch.Tensor], spec: DetSpec) -> list[dict[str, torch.Tensor]]:
    """Dense targets per level: each object goes to the level matching its size and the cell holding its centre.
    ``cls`` (N, nc, H, W) one-hot at positives, ``ltrb`` (N, 4, H, W) distances in stride units, ``pos`` mask."""
    S = spec.image_size
    out = []
    n = len(boxes)
    for s in spec.strides:
        H = W = S // s
        out.append({"cls": torch.zeros(n, spec.nc, H, W), "ltrb": torch.zeros(n, 4, H, W),
                    "pos": torch.zeros(n, H, W, dtype=torch.bool), "stride": torch.tensor(s)})
    for i, b in enumerate(boxes):
        for cls, x1, y1, x2, y2 in b.tolist():
            size = max(x2 - x1, y2 - y1)
            lvl = 0 if size < 2 * spec.strides[0] * 1.5 else (1 if size < 2 * spec.strides[1] * 1.5 else 2)
            lvl = min(lvl, len(spec.strides) - 1)
            s = spec.strides[lvl]
            t = out[lvl]
            H, W = t["pos"].shape[1:]
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            gx, gy = min(int(cx // s), W - 1), min(int(cy // s), H - 1)
            ax, ay = (gx + 0.5) * s, (gy + 0.5) * s
            ltrb = torch.tensor([ax - x1, ay - y1, x2 - ax, y2 - ay]) / s
            t["cls"][i, int(cls), gy, gx] = 1.0
            t["ltrb"][i, :, gy, gx] = ltrb.clamp(0, spec.reg_max - 1.01)
            t["pos"][i, gy, gx] = True
    return out


class DetectionData:
    """Batches of (images, per-level targets), reshuffled each epoch with a seeded generator."""

    def __init__(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]], batch_size: int = 16,
                 shuffle: bool = True, seed: int = 0):
        self.images, self.targets, self.bs, self.shuffle = images, targets, batch_size, shuffle
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self):
        n = self.images.shape[0]
        idx = torch.randperm(n, generator=self.g) if self.shuffle else torch.arange(n)
        for k in range(0, n, self.bs):
            j = idx[k:k + self.bs]
            yield self.images[j], [{key: (v[j] if v.dim() else v) for key, v in t.items()} for t in self.targets]

    def __len__(self):
        return math.ceil(self.images.shape[0] / self.bs)


def make_data(spec: DetSpec, n_train: int, n_val: int, batch_size: int = 16, seed: int = 0):
    xtr, btr = synthetic_detection(n_train, spec.image_size, seed=seed)
    xva, bva = synthetic_detection(n_val, spec.image_size, seed=seed + 1000)
    return (DetectionData(xtr, build_targets(btr, spec), batch_size, True, seed),
            DetectionData(xva, build_targets(bva, spec), batch_size, False, seed))


def _split(out: torch.Tensor, spec: DetSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return out[:, :4 * spec.reg_max], out[:, 4 * spec.reg_max:]


def _expected_ltrb(box: torch.Tensor, reg_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, h, w = box.shape
    logits = box.view(n, 4, reg_max, h, w)
    prob = logits.softmax(2)
    bins = torch.arange(reg_max, dtype=box.dtype).view(1, 1, reg_max, 1, 1)
    return logits, (prob * bins).sum(2)


def detection_loss(outs: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], spec: DetSpec) -> torch.Tensor:
    """Class BCE over every cell (normalised by the number of objects) + DFL and L1 on the box bins at positives."""
    npos = max(sum(int(t["pos"].sum()) for t in targets), 1)
    cls_loss = box_loss = outs[0].new_zeros(())
    for o, t in zip(outs, targets):
        box, cls = _split(o, spec)
        cls_loss = cls_loss + F.binary_cross_entropy_with_logits(cls, t["cls"], reduction="sum")
        pos = t["pos"]
        if pos.any():
            logits, ltrb = _expected_ltrb(box, spec.reg_max)
            tgt = t["ltrb"]
            lo = tgt.floor().long()
            wr = tgt - lo
            lg = logits.permute(0, 3, 4, 1, 2)[pos]  # (P, 4, reg_max)
            lo_p, wr_p = lo.permute(0, 2, 3, 1)[pos], wr.permute(0, 2, 3, 1)[pos]
            logp = lg.log_softmax(-1)
            dfl = -(logp.gather(-1, lo_p[..., None]).squeeze(-1) * (1 - wr_p)
                    + logp.gather(-1, (lo_p + 1).clamp(max=spec.reg_max - 1)[..., None]).squeeze(-1) * wr_p)
            l1 = (ltrb.permute(0, 2, 3, 1)[pos] - tgt.permute(0, 2, 3, 1)[pos]).abs()
            box_loss = box_loss + dfl.sum() + l1.sum()
    return (cls_loss + box_loss) / npos


@torch.no_grad()
def evaluate(model: nn.Module, data: DetectionData, spec: DetSpec) -> dict[str, float]:
    """Validation loss, centre recall (right class, probability > 0.5, at the object's cell) and mean IoU of the
    decoded box there."""
    was = model.training
    model.eval()
    losses, hits, ious, n = [], 0, [], 0
    for x, t in data:
        outs = model(x)
        losses.append(float(detection_loss(outs, t, spec)) * x.shape[0])
        for o, tt in zip(outs, t):
            box, cls = _split(o, spec)
            pos = tt["pos"]
            if not pos.any():
                continue
            p = cls.sigmoid().permute(0, 2, 3, 1)[pos]
            gt = tt["cls"].permute(0, 2, 3, 1)[pos].argmax(-1)
            hits += int(((p.argmax(-1) == gt) & (p.max(-1).values > 0.5)).sum())
            n += int(pos.sum())
            _, pred = _expected_ltrb(box, spec.reg_max)
            a, b = pred.permute(0, 2, 3, 1)[pos], tt["ltrb"].permute(0, 2, 3, 1)[pos]
            inter = (torch.minimum(a[:, 0], b[:, 0]) + torch.minimum(a[:, 2], b[:, 2])).clamp(min=0) * \
                    (torch.minimum(a[:, 1], b[:, 1]) + torch.minimum(a[:, 3], b[:, 3])).clamp(min=0)
            union = (a[:, 0] + a[:, 2]) * (a[:, 1] + a[:, 3]) + (b[:, 0] + b[:, 2]) * (b[:, 1] + b[:, 3]) - inter
            ious.append(inter / union.clamp(min=1e-9))
    model.train(was)
    total = data.images.shape[0]
    return {"val_loss": round(sum(losses) / max(total, 1), 4), "recall": round(hits / max(n, 1), 4),
            "mean_iou": round(float(torch.cat(ious).mean()) if ious else 0.0, 4)}


def default_taps(gm: Any) -> list[str]:
    """Distillation taps: the feature map entering the head at each level, as FX node names of the traced model
    (``fxprune.trace(model, (x,))``).

    Each output map of a decoupled head is ``cat([box_branch(x), cls_branch(x)])``; its level feature ``x`` is the
    latest node that both branches depend on. Node names survive pruning (Shrink keeps them)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def ancestors(node: Any) -> set:
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if a not in seen and a.op == "call_function":
                    seen.add(a)
                    stack.append(a)
        return seen

    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    maps = [a for a in out_node.all_input_nodes]
    taps = []
    for m in maps:
        if "cat" not in str(m.target) or len(m.all_input_nodes) < 2:
            continue
        common = set.intersection(*(ancestors(a) | {a} for a in m.all_input_nodes))
        if common:
            taps.append(max(common, key=order.__getitem__).name)
    return taps


def absorb_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The AbsorbBNShift stats without the per-layer lists."""
    return {"layers_absorbed": stats["layers_absorbed"], "approximate (zero padding)": len(stats["approximate"]),
            "skipped": len(stats["skipped"]), "max_removed_gamma": round(stats["max_removed_gamma"], 5),
            "max_change": stats.get("max_change"), "max_change_without": stats.get("max_change_without")}


# ---------------------------------------------------------------------------------------------------- pipeline
PRESETS = {
    "tiny": dict(size="tiny", n_train=64, n_val=32, batch=16, dense_epochs=1, sparse_epochs=1, ft_epochs=1),
    "small": dict(size="small", n_train=768, n_val=256, batch=32, dense_epochs=6, sparse_epochs=6, ft_epochs=4),
}


def run(preset: str = "small", *, ratio: float = 0.5, s: float = 3e-2, tau: float = 4.0, cwd_weight: float = 1.0,
        seed: int = 0, log=print) -> dict[str, Any]:
    from fxprune.passes.bn_prune import BNScalePrune
    from fxprune.passes.bn_absorb import AbsorbBNShift
    from fxprune.passes import Shrink

    cfg = PRESETS[preset]
    torch.manual_seed(seed)
    model, spec, source = get_detector(cfg["size"], seed=seed)
    train, val = make_data(spec, cfg["n_train"], cfg["n_val"], cfg["batch"], seed)
    x0 = train.images[:2]
    loss = lambda out, t: detection_loss(out, t, spec)  # noqa: E731
    t0 = time.perf_counter()
    log(f"[yolov8] detector: {source}, {sum(p.numel() for p in model.parameters()):,} params")

    # 1. dense training, 2. sparsity-aware training (L1 on prunable BN gammas, lambda0 * (1 - 0.9 e/E))
    fit(model, train, loss, epochs=cfg["dense_epochs"], lr=2e-3, seed=seed)
    dense_metrics = evaluate(model, val, spec)
    # the distillation teacher: the dense model as trained without sparsity (the papers' teacher), frozen here
    teacher = fxprune.trace(copy.deepcopy(model), (x0,), copy_model=False)
    # a graph view of the live model (shares its parameters): groups for the regularizer and the tap names
    view = fxprune.trace(model, (x0,), copy_model=False)
    reg = SparsityRegularizer(view, module=model, s=s, schedule="decay", epochs=cfg["sparse_epochs"])
    fit(model, train, loss, epochs=cfg["sparse_epochs"], lr=1e-3, regularizer=reg, seed=seed + 1)
    reg.detach()
    sparse_metrics = evaluate(model, val, spec)
    log(f"[yolov8] dense {dense_metrics}, after sparse training {sparse_metrics}, {reg.summary()}")

    # 3. BN-scale pruning (network slimming per layer), BN shift absorbed, shrink
    out = fxprune.compile(model, (x0,), passes=[BNScalePrune(ratio, scope="layer"), AbsorbBNShift(), Shrink()],
                          seed=seed)
    student = out.module
    pruned_metrics = evaluate(student, val, spec)
    log(f"[yolov8] pruned: MACs {out.report.macs_before:,} -> {out.report.macs_after:,}, {pruned_metrics}")

    # 4. fine-tune with channel-wise distillation from the dense teacher
    taps = default_taps(view)
    cwd = ChannelWiseLoss(teacher, student, taps=taps, tau=tau, weight=cwd_weight, seed=seed)
    fit(student, train, loss, epochs=cfg["ft_epochs"], lr=1e-3, distiller=cwd, seed=seed + 2)
    final_metrics = evaluate(student, val, spec)
    log(f"[yolov8] after CWD fine-tune {final_metrics} ({time.perf_counter() - t0:.1f} s)")
    return {"pipeline": "yolov8", "detector": source, "image_size": spec.image_size, "strides": spec.strides,
            "taps": taps, "dense": dense_metrics, "sparse": sparse_metrics,
            "pruned": pruned_metrics, "final": final_metrics, "macs_before": out.report.macs_before,
            "macs_after": out.report.macs_after, "params_before": out.report.params_before,
            "params_after": out.report.params_after, "verified": out.report.verified,
            "adapters": len(cwd.adapters),
            "absorb": absorb_summary(next(h["stats"] for h in out.report.passes if h["pass"] == "absorb_bn_shift")),
            "module": student, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (tests)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = run("tiny" if a.tiny else "small", ratio=a.ratio, seed=a.seed)
    res.pop("module")
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
