"""Scale: ``fxprune.analyze`` on a Llama-3-8B-shaped HF model built on the meta device (no weights materialised).

Config: LlamaConfig(32 layers, hidden 4096, 32 q heads, 8 kv heads, intermediate 14336, vocab 128256,
use_cache=False), built under ``torch.device("meta")``; input_ids 1x16 (long) on meta.
Runs in a fresh subprocess and reports wall times (import, build, analyze) and the process' peak RSS
(resource.getrusage ru_maxrss), the number of groups, prunable groups and head groups.
Goal: analyze < 60 s and peak RSS < 2 GB.

    python benchmarks/scale_meta.py [--timeout 900] [--layers 32]
Writes results/scale_meta.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

OUT = C.RESULTS / "scale_meta.json"
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, use_cache=False)


def worker(layers: int) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers as T

    import fxprune

    t1 = time.perf_counter()
    cfg = T.LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    rss_before = C.peak_rss_gb()
    t2 = time.perf_counter()
    groups = fxprune.analyze(model, {"input_ids": ids})
    t3 = time.perf_counter()
    prunable = groups.prunable()
    frozen = [g for g in groups if not g.prunable]
    return {"config": {**LLAMA3_8B, "num_hidden_layers": layers}, "params": n_params,
            "all_params_on_meta": all(p.is_meta for p in model.parameters()),
            "import_s": t1 - t0, "build_s": t2 - t1, "analyze_s": t3 - t2, "total_s": t3 - t0,
            "peak_rss_gb_before_analyze": rss_before, "peak_rss_gb": C.peak_rss_gb(),
            "groups": len(groups), "prunable_groups": len(prunable),
            "head_groups": sum(g.kind == "heads" for g in prunable),
            "channel_groups": sum(g.kind == "channels" for g in prunable),
            "frozen_groups": {g.label: (g.frozen or "")[:120] for g in frozen},
            "unknown_ops": sorted(groups.analysis.unknown_ops)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        C.setup_worker(threads=2)
        C.main_guard(lambda: worker(a.layers), "fxprune")
        return
    row = C.spawn(__file__, ["--worker", "--layers", str(a.layers)], a.timeout)
    if "analyze_s" in row:
        row["goal"] = "analyze < 60 s and peak RSS < 2 GB"
        row["goal_met"] = row["analyze_s"] < 60 and row["peak_rss_gb"] < 2
    print(json.dumps(row, indent=1, default=str))
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(row, indent=1, default=str))
    print(f"wrote {OUT}")
    if not row.get("goal_met"):
        sys.exit(1)


if __name__ == "__main__":
    main()
