"""Analyze + prune + shrink time: fxprune vs Torch-Pruning (DependencyGraph + pruner.step), same machine, one run.

Models: torchvision ResNet-50 and ViT-B/16 (224x224, batch 1) and our ~1.2B-parameter LLaMA-style decoder
(``fxprune.models`` "llama" full: hidden 2048, 16 layers, 32 q / 8 kv heads, SwiGLU 8192, vocab 32000; 16 tokens).
Each (model, library) runs in a fresh subprocess (so one library's caches and memory don't help the other).
fxprune is timed in phases: trace, analyze, select (ChannelPrune), shrink (incl. verification) — and end to end
without verification for a like-for-like comparison (Torch-Pruning does not verify).

    python benchmarks/analysis_speed.py [--models resnet50,vit_b_16,llama1b] [--timeout 900]
Writes results/analysis_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def build(name: str):
    import torch

    if name in ("resnet50", "vit_b_16"):
        import torchvision

        m = torchvision.models.get_model(name, weights=None).eval()
        return m, (torch.randn(1, 3, 224, 224),), [m.fc if name == "resnet50" else m.heads.head]
    if name == "llama1b":
        from fxprune import models

        m, x = models.get("llama", size="full", batch=1)
        return m, x, [m.lm_head]
    raise ValueError(name)


def run_fxprune(name: str) -> dict:
    import torch

    import fxprune
    from fxprune.program import Program
    from fxprune.pass_manager import PassContext, PassManager
    from fxprune.passes import ChannelPrune, Shrink
    from fxprune.trace import trace

    m, x, _ = build(name)
    t0 = time.perf_counter()
    gm = trace(m, x, {})
    t1 = time.perf_counter()
    prog = Program(gm, x, {}, source=m)
    prog.groups  # noqa: B018
    t2 = time.perf_counter()
    pm = PassManager([ChannelPrune(0.5)])
    prog2, _ = pm.run(prog, PassContext(dense=gm))
    t3 = time.perf_counter()
    pm = PassManager([Shrink()])
    prog3, res = pm.run(prog2, PassContext(dense=gm))
    t4 = time.perf_counter()
    verified = res[0][1].stats.get("verified")
    del prog3, prog2, prog
    # like-for-like with Torch-Pruning: end to end, no verification, no FLOP counting
    t5 = time.perf_counter()
    out = fxprune.compile(m, x, passes=[ChannelPrune(0.5), Shrink(verify=False)], count_flops=False)
    t6 = time.perf_counter()
    return {"lib": "fxprune", "trace_s": t1 - t0, "analyze_s": t2 - t1, "select_s": t3 - t2,
            "shrink_and_verify_s": t4 - t3, "total_with_verify_s": t4 - t0, "total_s": t6 - t5,
            "verified": verified, "params_after": out.report.params_after, "params_before": out.report.params_before}


def run_tp(name: str) -> dict:
    import torch_pruning as tp

    m, x, heads = build(name)
    p0 = sum(p.numel() for p in m.parameters())
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(m, example_inputs=x[0] if len(x) == 1 else x,
                                       importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                                       ignored_layers=heads)
    t1 = time.perf_counter()
    pruner.step()
    t2 = time.perf_counter()
    return {"lib": "torch-pruning", "graph_s": t1 - t0, "step_s": t2 - t1, "total_s": t2 - t0,
            "params_before": p0, "params_after": sum(p.numel() for p in m.parameters())}


def worker(name: str, lib: str) -> None:
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(2)
    row = run_fxprune(name) if lib == "fxprune" else run_tp(name)
    print("@@ROW@@" + json.dumps(row))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,vit_b_16,llama1b")
    ap.add_argument("--timeout", type=int, default=900)
    a = ap.parse_args()
    rows = []
    for name in a.models.split(","):
        res = {}
        for lib in ("fxprune", "torch-pruning"):
            t = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, __file__, "--worker", name, lib], capture_output=True, text=True,
                                   timeout=a.timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                line = next((x for x in p.stdout.splitlines() if x.startswith("@@ROW@@")), None)
                res[lib] = json.loads(line[7:]) if line else {"lib": lib, "error": (p.stderr.strip().splitlines()
                                                                                  or ["?"])[-1][:200]}
            except subprocess.TimeoutExpired:
                res[lib] = {"lib": lib, "timeout": True, "total_s": a.timeout,
                            "error": f"did not finish in {a.timeout} s (time is a lower bound)"}
            res[lib]["wall_s"] = time.perf_counter() - t
            print(name, lib, json.dumps(res[lib]), flush=True)
        fx, tpr = res["fxprune"].get("total_s"), res["torch-pruning"].get("total_s")
        ratio = fx / tpr if fx and tpr else None
        rows.append({"model": name, **{f"{k}": v for k, v in res.items()}, "ratio_fxprune_over_tp": ratio})
        print(f"== {name}: fxprune {fx} s, torch-pruning {tpr} s, ratio {ratio}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "analysis_speed.json").write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
