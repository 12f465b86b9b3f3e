"""Scale: ``fxprune.analyze`` on a Llama-3-8B-shaped HF config built on the meta device (no weights materialised).

Config: 32 layers, hidden 4096, 32 q heads, 8 kv heads, intermediate 14336, vocab 128256; input_ids 1x16 on meta.
Runs in a fresh subprocess and reports wall time and peak RSS (ru_maxrss). Goal: < 60 s and < 2 GB.

    python benchmarks/scale_meta.py
Writes results/scale_meta.json.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def worker() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers as T

    import fxprune

    t0 = time.perf_counter()
    cfg = T.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, use_cache=False)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    t1 = time.perf_counter()
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    groups = fxprune.analyze(model, {"input_ids": ids})
    t2 = time.perf_counter()
    heads = [g for g in groups.prunable() if g.kind == "heads"]
    row = {"params": n_params, "build_s": t1 - t0, "analyze_s": t2 - t1,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
           "groups": len(groups), "prunable_groups": len(groups.prunable()), "head_groups": len(heads),
           "unknown_ops": sorted(groups.analysis.unknown_ops)}
    print("@@ROW@@" + json.dumps(row))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker()
        return
    p = subprocess.run([sys.executable, __file__, "--worker"], capture_output=True, text=True, timeout=900)
    line = next((x for x in p.stdout.splitlines() if x.startswith("@@ROW@@")), None)
    if line is None:
        print(p.stderr[-3000:])
        sys.exit(1)
    row = json.loads(line[7:])
    row["goal_met"] = row["analyze_s"] < 60 and row["peak_rss_gb"] < 2
    print(json.dumps(row, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale_meta.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
