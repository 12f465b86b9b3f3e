"""Detector coverage (issue 19): fxprune (region tracing where the whole forward does not export) vs Torch-Pruning.

Models (random init, ``fxprune.testing.make_observable(model, 0)`` for both libraries, eval mode, 1 image):

* every torchvision detection / instance-segmentation / keypoint model (``weights=None, weights_backbone=None``),
  bounded: one 3x256x256 image, ``min_size=max_size=256`` where the model resizes (R-CNNs, RetinaNet, FCOS; SSD
  resizes to its own 300/320), R-CNNs with ``rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100``;
* HF detection models from small configs (ResNet-18-like backbone of width 16-64 without timm, d_model 64, 1-2
  encoder/decoder layers, 10 queries): DETR, Conditional DETR, Deformable DETR, YOLOS, RT-DETR; pixel_values
  1x3x128x128;
* fxprune's YOLOv8-style detector (models/yolov8.py, "tiny", 128x128): raw maps, and wrapped with box decoding +
  score threshold + batched NMS (data-dependent post-processing: only region tracing prunes it).

fxprune: ``compile(model, inputs, passes=[ChannelPrune(0.5), Shrink()], regions="auto", dynamic=False)`` (the whole
model where it exports, else the traceable regions; static shapes: detectors run at one size here); ok = verified (shrunk == masked on the traced program and, for regions, end to
end: region outputs that cross into eager code and the final outputs) and >= 10 % of the parameters removed.

Torch-Pruning: its standard recipe (BasePruner + GroupMagnitudeImportance(p=2), pruning_ratio=0.5, ``num_heads``
for attention as in benchmarks/_common.tp_attention) with the heads' final predictors in ``ignored_layers``
(cls_logits, bbox_pred, bbox_reg, cls_score, mask_fcn_logits, kps_score, centerness, SSD's prediction convs, HF
class/box heads, YOLOv8's 1x1 outputs), ``output_transform`` = the sum of every output tensor. ok = the pruned model
runs, the final predictors' output channels/features are unchanged, and >= 10 % removed (TP verifies nothing
numerically).

Each (model, library) runs in its own subprocess (1 thread, time limit); rows are appended to
``results/detectors_rows.jsonl`` (resumable) and the summary + rows go to ``results/detectors.json``.

    python benchmarks/detectors.py --jobs 2                 # everything (resumes)
    python benchmarks/detectors.py --only fasterrcnn_mobilenet_v3_large_320_fpn --libs fxprune
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _common as C  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
JSONL = RESULTS / "detectors_rows.jsonl"
OUT = RESULTS / "detectors.json"
PROTOCOL = "detectors-v1"
SIDE = 256

TORCHVISION = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
               "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
               "fcos_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn",
               "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn"]
HF = ["detr", "conditional_detr", "deformable_detr", "yolos", "rt_detr"]
OURS = ["yolov8_tiny", "yolov8_tiny_nms"]
MODELS = [("torchvision", n) for n in TORCHVISION] + [("hf", n) for n in HF] + [("fxprune", n) for n in OURS]

#: final predictors (Torch-Pruning's ignored_layers), by the end of the module name
HEAD_SUFFIXES = ("cls_logits", "bbox_pred", "bbox_reg", "cls_score", "mask_fcn_logits", "kps_score", "centerness",
                 "class_labels_classifier", "bbox_predictor", "enc_score_head", "enc_bbox_head")


# ------------------------------------------------------------------------------------------------------ models
def _yolo_nms_class():
    import torch
    import torch.nn as nn
    from torchvision.ops import batched_nms

    class YOLOv8NMS(nn.Module):
        """YOLOv8 maps -> per-anchor class scores and (ltrb distance) boxes -> threshold -> batched NMS."""

        def __init__(self, model: nn.Module, reg_max: int = 16, conf: float = 0.25, iou: float = 0.5):
            super().__init__()
            self.model, self.reg_max, self.conf, self.iou = model, reg_max, conf, iou

        def forward(self, x):
            maps = self.model(x)
            outs = []
            for b in range(x.shape[0]):
                boxes, scores = [], []
                for f, s in zip(maps, (8, 16, 32)):
                    h, w = f.shape[-2:]
                    box, cls = f[b].split((4 * self.reg_max, f.shape[1] - 4 * self.reg_max), 0)
                    dist = box.view(4, self.reg_max, h * w).softmax(1)
                    dist = (dist * torch.arange(self.reg_max, dtype=f.dtype).view(1, -1, 1)).sum(1)  # (4, hw)
                    ys, xs = torch.meshgrid(torch.arange(h, dtype=f.dtype), torch.arange(w, dtype=f.dtype),
                                            indexing="ij")
                    cx, cy = (xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s
                    boxes.append(torch.stack([cx - dist[0] * s, cy - dist[1] * s, cx + dist[2] * s,
                                              cy + dist[3] * s], 1))
                    scores.append(cls.flatten(1).sigmoid().T)
                boxes, scores = torch.cat(boxes), torch.cat(scores)
                best, labels = scores.max(1)
                keep = best > min(self.conf, float(best.max()))  # data-dependent: not exportable
                boxes, best, labels = boxes[keep], best[keep], labels[keep]
                k = batched_nms(boxes, best, labels, self.iou)
                outs.append({"boxes": boxes[k], "scores": best[k], "labels": labels[k]})
            return outs

    return YOLOv8NMS


def build(corpus: str, name: str):
    """(model, args, kwargs) in eval mode, observable (fxprune.testing.make_observable)."""
    import torch

    from fxprune.testing import make_observable

    torch.manual_seed(0)
    if corpus == "torchvision":
        from torchvision.models import detection as D
        kw: dict = {"weights": None, "weights_backbone": None}
        if not name.startswith("ssd"):
            kw.update(min_size=SIDE, max_size=SIDE)
        if "rcnn" in name:
            kw.update(rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)
        m = getattr(D, name)(**kw)
        args: tuple = ([torch.rand(3, SIDE, SIDE)],)
        kwargs: dict = {}
    elif corpus == "hf":
        m = _hf(name)
        args, kwargs = (), {"pixel_values": torch.rand(1, 3, 128, 128)}
    elif corpus == "fxprune":
        from models import yolov8
        base = yolov8.build("tiny", seed=0)
        m = _yolo_nms_class()(base) if name.endswith("_nms") else base
        args, kwargs = (torch.rand(1, 3, 128, 128),), {}
    else:
        raise ValueError(corpus)
    make_observable(m, 0)
    return m.eval(), args, kwargs


def _hf(name: str):
    import transformers as T

    def rn_cfg(out: list[str]):
        return T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                              layer_type="basic", out_features=out)

    rn = rn_cfg(["stage2", "stage3", "stage4"])
    common = dict(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10,
                  use_timm_backbone=False, use_pretrained_backbone=False, num_labels=5)
    if name == "detr":
        cfg = T.DetrConfig(backbone_config=rn_cfg(["stage4"]), backbone=None, **common)
        return T.DetrForObjectDetection(cfg)
    if name == "conditional_detr":
        cfg = T.ConditionalDetrConfig(backbone_config=rn_cfg(["stage4"]), backbone=None, **common)
        return T.ConditionalDetrForObjectDetection(cfg)
    if name == "deformable_detr":
        cfg = T.DeformableDetrConfig(backbone_config=rn, backbone=None, num_feature_levels=3, encoder_n_points=2,
                                     decoder_n_points=2, **{**common, "decoder_layers": 2})
        return T.DeformableDetrForObjectDetection(cfg)
    if name == "yolos":
        cfg = T.YolosConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            image_size=[128, 128], patch_size=16, num_detection_tokens=10, num_labels=5)
        return T.YolosForObjectDetection(cfg)
    if name == "rt_detr":
        cfg = T.RTDetrConfig(backbone_config=T.RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64],
                                                                  depths=[1, 1, 1, 1], layer_type="basic",
                                                                  out_features=["stage2", "stage3", "stage4"]),
                             encoder_hidden_dim=64, encoder_in_channels=[32, 48, 64], d_model=64,
                             decoder_in_channels=[64, 64, 64],
                             encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10,
                             num_labels=5, use_pretrained_backbone=False, backbone=None, decoder_n_points=2,
                             num_feature_levels=3)
        return T.RTDetrForObjectDetection(cfg)
    raise ValueError(name)


def leaves(out) -> list:
    from torch.utils._pytree import tree_flatten
    import torch
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------------------------------------------ runs
def run_fxprune(corpus: str, name: str) -> dict:
    import torch

    import fxprune
    from fxprune.passes import ChannelPrune, Shrink

    m, args, kwargs = build(corpus, name)
    row: dict = {"lib": "fxprune"}
    t = time.perf_counter()
    try:
        out = fxprune.compile(m, args, [ChannelPrune(ratio=0.5), Shrink()], example_kwargs=kwargs or None,
                              regions="auto", dynamic=False)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "error", "error": C.first_line(e), "where": C.where(e),
                "seconds": time.perf_counter() - t}
    dt = time.perf_counter() - t
    rep = out.report
    plan = getattr(out, "plan", None)
    row.update(mode="regions" if plan is not None else "whole", verified=rep.verified, seconds=dt,
               params_before=rep.params_before, params_after=rep.params_after,
               params_removed=1 - rep.params_after / max(rep.params_before, 1),
               max_abs_diff=rep.max_abs_diff, observable=rep.observable)
    if plan is not None:
        row.update(regions=plan.regions, untraceable=sorted(plan.untraceable), eager_outputs=len(plan.eager_outputs),
                   graph_regions=plan.graph_regions, region_notes=plan.notes,
                   end_to_end=out.end_to_end)
    try:  # the result runs as the user's model does (a list of dicts for detectors)
        with torch.no_grad():
            res = out.module(*args, **kwargs)
        row["output_type"] = type(res).__name__ + (f"[{type(res[0]).__name__}]" if isinstance(res, list) and res
                                                   else "")
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "error", "error": "PrunedModelFails: " + C.first_line(e)}
    ok = bool(rep.verified) and row["params_removed"] >= 0.10
    row["status"] = "ok" if ok else ("frozen-too-much" if rep.verified else "error")
    if not rep.verified:
        row["error"] = "not verified"
    return row


def _heads(model) -> list:
    import torch.nn as nn
    from torchvision.models.detection.ssd import SSDHead
    out = []
    for n, mod in model.named_modules():
        if n.endswith(HEAD_SUFFIXES) and isinstance(mod, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            out.append(mod)
        elif n.endswith(HEAD_SUFFIXES) and len(list(mod.children())):  # an MLP head: its last layer
            lin = [x for x in mod.modules() if isinstance(x, (nn.Linear, nn.Conv2d))]
            out += lin[-1:]
        if isinstance(mod, SSDHead):
            out += [c for c in mod.modules() if isinstance(c, nn.Conv2d)]
        if n.endswith(("class_embed", "bbox_embed")) and isinstance(mod, nn.ModuleList):
            for sub in mod:
                lin = [x for x in sub.modules() if isinstance(x, nn.Linear)]
                out += lin[-1:]
        if ".cv2." in n or ".cv3." in n:  # YOLOv8 Detect: the final 1x1 conv of each branch
            if isinstance(mod, nn.Conv2d) and n.endswith(".2"):
                out.append(mod)
    return list(dict.fromkeys(out))


def run_torch_pruning(corpus: str, name: str) -> dict:
    import torch
    import torch_pruning as tp

    from fxprune.flops import count_params

    m, args, kwargs = build(corpus, name)
    row: dict = {"lib": "torch-pruning", "verified": "not verified"}
    heads = _heads(m)
    shapes: list = []
    # the predictors' channel/feature dim (dim 1 of conv maps, the last dim otherwise); the other dims count
    # detections, which change with the weights
    hs = [h.register_forward_hook(lambda mod, a, o: shapes.append((type(mod).__name__, o.dim(),
                                                                   o.shape[1] if o.dim() == 4 else o.shape[-1])))
          for h in heads]
    with torch.no_grad():
        m(*args, **kwargs)
    ref, shapes[:] = list(shapes), []
    p0 = count_params(m)
    num_heads, opts, fix = C.tp_attention(m)
    example = dict(kwargs) if kwargs else tuple(args)

    def out_tf(o):
        return sum(t.float().sum() for t in leaves(o) if t.is_floating_point())

    t = time.perf_counter()
    try:
        pruner = tp.pruner.BasePruner(m, example_inputs=example,
                                      importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                                      ignored_layers=heads, num_heads=num_heads, output_transform=out_tf, **opts)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "trace-fail", "error": C.first_line(e), "where": C.where(e),
                "seconds": time.perf_counter() - t}
    try:
        pruner.step()
        fix()
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "error", "error": C.first_line(e), "where": C.where(e),
                "seconds": time.perf_counter() - t}
    dt = time.perf_counter() - t
    p1 = count_params(m)
    removed = 1 - p1 / max(p0, 1)
    row.update(params_before=p0, params_after=p1, params_removed=removed, seconds=dt, ignored_layers=len(heads))
    try:
        shapes.clear()  # TP ran the model itself meanwhile
        with torch.no_grad():
            m.eval()(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "error", "error": "PrunedModelFails: " + C.first_line(e)}
    if sorted(set(shapes)) != sorted(set(ref)):
        return {**row, "status": "error", "error": f"HeadShapesChanged: {sorted(set(ref))[:4]} -> "
                                                   f"{sorted(set(shapes))[:4]}"}
    return {**row, "status": "ok" if removed >= 0.10 else "frozen-too-much"}


def worker(corpus: str, name: str, lib: str) -> None:
    C.setup_worker(threads=1)
    C.main_guard(lambda: run_fxprune(corpus, name) if lib == "fxprune" else run_torch_pruning(corpus, name), lib)


# ------------------------------------------------------------------------------------------------------ driver
def load_rows() -> dict:
    rows: dict = {}
    if JSONL.exists():
        for line in JSONL.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("protocol") == PROTOCOL:
                rows[(r["corpus"], r["model"], r["lib"])] = r
    return rows


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for lib in ("fxprune", "torch-pruning"):
        rs = [r for r in rows if r["lib"] == lib]
        counts: dict = {}
        for r in rs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        ok = [r for r in rs if r["status"] == "ok"]
        out[lib] = {"models": len(rs), "counts": counts, "ok_rate": round(len(ok) / max(len(rs), 1), 3),
                    "mean_params_removed_ok": round(sum(r["params_removed"] for r in ok) / max(len(ok), 1), 3)}
    return out


def write_summary() -> dict:
    rows = sorted(load_rows().values(), key=lambda r: (r["corpus"], r["model"], r["lib"]))
    known = {(c, n) for c, n in MODELS}
    rows = [r for r in rows if (r["corpus"], r["model"]) in known]
    summary = summarize(rows)
    OUT.write_text(json.dumps({"protocol": PROTOCOL, "doc": __doc__, "summary": summary, "rows": rows},
                              indent=1, default=str))
    print(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=3)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--only", default="")
    ap.add_argument("--libs", default="fxprune,torch-pruning")
    ap.add_argument("--fresh", action="store_true")
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker)
        return
    RESULTS.mkdir(exist_ok=True)
    done = {} if a.fresh else load_rows()
    only = set(filter(None, a.only.split(",")))
    todo = [(c, n, lib) for c, n in MODELS for lib in a.libs.split(",")
            if (not only or n in only) and (c, n, lib) not in done]
    print(f"{len(todo)} runs to do; rows -> {JSONL}", flush=True)
    lock = threading.Lock()

    def one(job):
        c, n, lib = job
        r = C.spawn(__file__, ["--worker", c, n, lib], a.timeout)
        if r.get("status") == "timeout":
            r.update(status="error", timeout=True, error=f"Timeout after {a.timeout:.0f} s")
        r.update({"corpus": c, "model": n, "lib": lib, "protocol": PROTOCOL, "timeout_s": a.timeout,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        with lock:
            with JSONL.open("a") as f:
                f.write(json.dumps(r, default=str) + "\n")
            print(f"{c:<12}{n:<40}{lib:<14}{r['status']:<16}{r.get('params_removed') or 0:>7.3f}"
                  f"{r.get('seconds') or 0:>8.1f}s  {(r.get('error') or '')[:120]}", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=max(a.jobs, 1)) as ex:
        list(ex.map(one, todo))
    write_summary()


if __name__ == "__main__":
    main()
