"""Peak memory of one compile: ChannelPrune(0.5) + NMSparsity(2:4) + Shrink on the ~1B LLaMA-style reference.

Each measurement runs in a fresh subprocess: build the model, record RSS, compile, record peak RSS (ru_maxrss).
``copies`` = (peak - RSS after building the model) / model bytes: how many model-sized copies compile held at once.

    python benchmarks/peak_rss_pipeline.py [--size full] [--label after] [--src DIR]

``--src DIR`` runs the compile from another checkout (e.g. a ``git worktree`` of an older commit) to compare.
Writes benchmarks/results/peak_rss_pipeline.json (one row per label, merged with earlier rows).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, os, resource, sys, time
src = os.environ.get("FXPRUNE_SRC")
if src:  # import fxprune from another checkout: drop the editable install's finder, put the checkout first
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, src)
import torch
torch.set_num_threads(2)
import fxprune
from fxprune.passes import ChannelPrune, NMSparsity, Shrink
from fxprune.models import llama
def rss_gb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 2**20
model = llama.build(sys.argv[1], seed=0).eval()
args = llama.example_inputs(sys.argv[1], batch=1)
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
base = rss_gb()
t0 = time.perf_counter()
out = fxprune.compile(model, args, [ChannelPrune(ratio=0.5), NMSparsity(2, 4), Shrink()], count_flops=False)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"model_gb": nbytes / 2**30, "rss_after_build_gb": base, "peak_rss_gb": peak, "seconds": dt,
                  "verified": out.report.verified, "params_after": out.report.params_after,
                  "copies": (peak - base) / (nbytes / 2**30), "fxprune": fxprune.__file__}))
"""


def run(size: str, src: str | None) -> dict:
    env = dict(os.environ)
    if src:
        env["FXPRUNE_SRC"] = src
    p = subprocess.run([sys.executable, "-c", CHILD, size], capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="full")
    ap.add_argument("--label", default="current")
    ap.add_argument("--src", default=None, help="checkout to import fxprune from (default: this one)")
    a = ap.parse_args()
    row = {"label": a.label, "size": a.size, "src": a.src or "this checkout", **run(a.size, a.src)}
    print(json.dumps(row, indent=1))
    out = HERE / "results" / "peak_rss_pipeline.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    rows = [r for r in rows if not (r["label"] == a.label and r["size"] == a.size)] + [row]
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
