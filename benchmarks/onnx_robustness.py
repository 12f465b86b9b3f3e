"""ONNX export robustness (issue 19): fxprune.compile(ChannelPrune(0.3), Shrink()) then
``fxprune.backends.onnx.export`` on the models that broke it (timm Hiera: 5-D attention; torchvision RAFT-small:
correlation lookup by grid_sample; HF BEiT: parity tolerance, relative position bias) and on ordinary ones
(resnet18, timm ViT-Tiny). Random init, CPU, one subprocess per model, 1 intra-op thread.

Per row: compiled / verified, exported, exporter, dynamic batch, parity max abs diff and tolerance per output (the
worst output: max diff / tolerance), the batch sizes checked, export notes, the error text where it failed.

Hiera's and BEiT's classifier heads are zero-initialised in timm/HF; they get N(0, 0.02) weights here, else every
logit is 0 and the parity check compares constants (export notes it). RAFT runs at batch 2: at batch 1 its
``cat`` of the two images then ``chunk(2)`` traces a guard (second chunk != 1) that fxprune.compile's
dynamic-batch trace then fails on the example itself (a trace issue, recorded in the row ``raft_small_b1``).

    .venv/bin/python benchmarks/onnx_robustness.py            # all -> results/onnx_robustness.json
    .venv/bin/python benchmarks/onnx_robustness.py --only hiera_tiny_224
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, emit, setup_worker, spawn  # noqa: E402

MODELS = ["hiera_tiny_224", "raft_small", "raft_small_b1", "beit_base_relpos", "beit_small", "resnet18",
          "vit_tiny_patch16_224"]
TIMEOUT = 1500


def build(name: str):
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    if name == "hiera_tiny_224":
        import timm

        m = timm.create_model("hiera_tiny_224", pretrained=False)
        nn.init.normal_(m.head.fc.weight, std=0.02)
        return m, (torch.randn(1, 3, 224, 224),)
    if name.startswith("raft_small"):
        from torchvision.models.optical_flow import raft_small

        b = 1 if name.endswith("_b1") else 2
        return raft_small(weights=None), (torch.randn(b, 3, 128, 128), torch.randn(b, 3, 128, 128))
    if name.startswith("beit"):
        from transformers import BeitConfig, BeitForImageClassification

        if name == "beit_base_relpos":  # microsoft/beit-base-patch16-224's architecture (relative position bias)
            cfg = BeitConfig(use_relative_position_bias=True, use_mean_pooling=True, num_labels=1000)
            x = torch.randn(1, 3, 224, 224)
        else:
            cfg = BeitConfig(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                             intermediate_size=768, num_labels=100)
            x = torch.randn(1, 3, 64, 64)
        m = BeitForImageClassification(cfg)
        nn.init.normal_(m.classifier.weight, std=0.02)
        return m, (x,)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),)
    if name == "vit_tiny_patch16_224":
        import timm

        m = timm.create_model(name, pretrained=False)
        nn.init.normal_(m.head.weight, std=0.02)
        return m, (torch.randn(1, 3, 224, 224),)
    raise KeyError(name)


def worker(name: str) -> None:
    setup_worker(1)
    import fxprune
    from fxprune.backends import onnx as fxonnx
    from fxprune.passes import ChannelPrune, Shrink

    row: dict = {"model": name, "status": "error"}
    t = time.perf_counter()
    try:
        model, ex = build(name)
        model.eval()
        row["input_shapes"] = [list(x.shape) for x in ex]
        out = fxprune.compile(model, ex, passes=[ChannelPrune(ratio=0.3), Shrink()])
        row.update(compiled=True, verified=bool(out.report.verified), dynamic_batch_traced=out.report.dynamic_batch,
                   params_before=out.report.params_before, params_after=out.report.params_after,
                   compile_s=round(time.perf_counter() - t, 1))
    except Exception as e:  # noqa: BLE001
        row.update(compiled=False, exported=False, stage="compile",
                   error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}")
        emit(row)
        return
    t = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as d:
            res = fxonnx.export(out, ex, f"{d}/{name}.onnx")
        worst = max(res.max_abs_diff, key=lambda k: res.max_abs_diff[k] / max(res.tolerance[k], 1e-30))
        row.update(status="ok", exported=True, exporter=res.exporter, opset=res.opset,
                   dynamic_batch=res.dynamic_batch, simplified=res.simplified,
                   parity_batch_sizes=res.parity_batch_sizes, n_outputs=len(res.outputs),
                   worst_output=worst, max_abs_diff=res.max_abs_diff[worst], tolerance=res.tolerance[worst],
                   max_abs_diff_all=res.max_abs_diff, tolerance_all=res.tolerance, notes=res.notes)
    except Exception as e:  # noqa: BLE001
        row.update(exported=False, stage="export", error=f"{type(e).__name__}: {str(e).strip()[:900]}",
                   fix=getattr(e, "fix", None))
    row["export_s"] = round(time.perf_counter() - t, 1)
    emit(row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--out", default=str(RESULTS / "onnx_robustness.json"))
    a = ap.parse_args()
    if a.worker:
        worker(a.worker)
        return
    import fxprune
    import torch

    rows = []
    for name in a.only or MODELS:
        row = spawn(__file__, ["--worker", name], TIMEOUT)
        row.setdefault("model", name)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("model", "status", "exporter", "dynamic_batch", "worst_output",
                                                   "max_abs_diff", "tolerance", "error")}, default=str), flush=True)
    doc = {"benchmark": "onnx_robustness", "torch": torch.__version__, "fxprune": fxprune.__version__,
           "passes": "ChannelPrune(ratio=0.3), Shrink()", "threads": 1, "rows": rows}
    Path(a.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
