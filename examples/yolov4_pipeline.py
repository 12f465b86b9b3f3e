"""YOLOv4 compression pipeline (arXiv 2306.01526): dynamic sparse training -> group channel pruning -> spatial
attention distillation, on the YOLOv8-style detector with synthetic detection data (see ``yolov8_pipeline.py``).

    .venv/bin/python examples/yolov4_pipeline.py            # the default (small) run, ~1-2 min on 2 cores
    .venv/bin/python examples/yolov4_pipeline.py --tiny     # seconds (what tests/test_examples_tiny.py runs)

Dynamic sparse training: L1 on prunable BN gammas at rate ``s``; after 40% of the epochs the channels above the
65th percentile of |gamma| get ``0.01 s`` (they are kept anyway, the rest is pushed to zero faster). Group channel
pruning: prunable groups are partitioned automatically by feature-map stride and block type (``s8/C2f``, ...), and
each partition gets its own quantile threshold. Spatial attention distillation from the unpruned model on the three
feature maps entering the detection head.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxprune  # noqa: E402
from fxprune.distill import SpatialAttentionLoss  # noqa: E402
from fxprune.train import SparsityRegularizer, fit  # noqa: E402


def _shared():
    spec = importlib.util.spec_from_file_location("fxprune_example_yolov8", Path(__file__).with_name(
        "yolov8_pipeline.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fxprune_example_yolov8", mod)
    spec.loader.exec_module(mod)
    return mod


Y8 = _shared()

# per-stride quantiles (fraction of channels removed in each partition): shallow, high-resolution layers keep more
QUANTILES = {"s2/*": 0.3, "s4/*": 0.4, "s8/*": 0.5, "s16/*": 0.6, "s32/*": 0.6}


def run(preset: str = "small", *, s: float = 3e-2, quantiles: Any = None, betas: float = 100.0, seed: int = 0,
        min_channels: int = 4, log=print) -> dict[str, Any]:
    from fxprune.passes import Shrink
    from fxprune.passes.bn_absorb import AbsorbBNShift
    from fxprune.passes.bn_prune import GroupChannelPrune

    cfg = Y8.PRESETS[preset]
    torch.manual_seed(seed)
    model, spec, source = Y8.get_detector(cfg["size"], seed=seed)
    train, val = Y8.make_data(spec, cfg["n_train"], cfg["n_val"], cfg["batch"], seed)
    x0 = train.images[:2]
    loss = lambda out, t: Y8.detection_loss(out, t, spec)  # noqa: E731
    t0 = time.perf_counter()
    log(f"[yolov4] detector: {source}, {sum(p.numel() for p in model.parameters()):,} params")

    fit(model, train, loss, epochs=cfg["dense_epochs"], lr=2e-3, seed=seed)
    dense_metrics = Y8.evaluate(model, val, spec)
    # the distillation teacher: the dense model as trained without sparsity (the papers' teacher), frozen here
    teacher = fxprune.trace(copy.deepcopy(model), (x0,), copy_model=False)
    view = fxprune.trace(model, (x0,), copy_model=False)  # graph view sharing the model's parameters
    reg = SparsityRegularizer(view, module=model, s=s, schedule="variable", epochs=cfg["sparse_epochs"])
    fit(model, train, loss, epochs=cfg["sparse_epochs"], lr=1e-3, regularizer=reg, seed=seed + 1)
    reg.detach()
    sparse_metrics = Y8.evaluate(model, val, spec)
    log(f"[yolov4] dense {dense_metrics}, after dynamic sparse training {sparse_metrics}, {reg.summary()}")

    gcp = GroupChannelPrune("auto", quantiles or QUANTILES, min_channels=min_channels, default_quantile=0.5)
    out = fxprune.compile(model, (x0,), passes=[gcp, AbsorbBNShift(), Shrink()], seed=seed)
    student = out.module
    parts = next(h["stats"]["partitions"] for h in out.report.passes if h["pass"] == "group_channel_prune")
    pruned_metrics = Y8.evaluate(student, val, spec)
    log(f"[yolov4] partitions: " + ", ".join(f"{k}: {len(v['groups'])} groups, q={v['quantile']}, "
                                             f"removed {v['ratio']:.2f}" for k, v in parts.items()))
    log(f"[yolov4] pruned: MACs {out.report.macs_before:,} -> {out.report.macs_after:,}, {pruned_metrics}")

    taps = Y8.default_taps(view)
    sad = SpatialAttentionLoss(teacher, student, taps=taps, betas=betas)
    fit(student, train, loss, epochs=cfg["ft_epochs"], lr=1e-3, distiller=sad, seed=seed + 2)
    final_metrics = Y8.evaluate(student, val, spec)
    log(f"[yolov4] after SAD fine-tune {final_metrics} ({time.perf_counter() - t0:.1f} s)")
    absorb = next(h["stats"] for h in out.report.passes if h["pass"] == "absorb_bn_shift")
    return {"pipeline": "yolov4", "detector": source, "taps": taps, "partitions": parts, "dense": dense_metrics,
            "sparse": sparse_metrics, "pruned": pruned_metrics, "final": final_metrics,
            "macs_before": out.report.macs_before, "macs_after": out.report.macs_after,
            "params_before": out.report.params_before, "params_after": out.report.params_after,
            "verified": out.report.verified, "absorb": Y8.absorb_summary(absorb), "module": student,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (tests)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = run("tiny" if a.tiny else "small", seed=a.seed)
    res.pop("module")
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
