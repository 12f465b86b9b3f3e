"""Analyze + prune + shrink time: fxprune vs Torch-Pruning (DependencyGraph build + pruner.step), one run, one machine.

Models (built by ``fxprune.zoo``, random init, ``make_observable`` applied, batch 1):
  resnet50   torchvision:resnet50, 1x3x224x224
  vit_b_16   torchvision:vit_b_16, 1x3x224x224
  llama1b    hf:llama (LlamaForCausalLM) with LlamaConfig(hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate
             8192, vocab 32000, use_cache=False), input_ids 1x16  (~1.24B parameters)
  llama1b_fx the same shape as fxprune's own reference LLaMA (``llama``, size "full"), which Torch-Pruning can trace
             (it hangs in get_all_groups on transformers' Llama; see README)

Every (model, measurement) runs in a fresh subprocess (caches and memory of one do not help the other):
  fx-e2e    ``fxprune.compile(m, x, [ChannelPrune(0.5), Shrink(verify=False)], count_flops=False)`` -- like for like
            with Torch-Pruning, which neither verifies nor counts FLOPs: wall time, and the phases from the report's
            ``timings``: trace_s / analyze_s / select_s (channel_prune) / shrink_s / report_s (``fx-phases`` is an
            alias kept for old command lines)
  fx-verify the same with ``Shrink()`` (verifies shrunk == masked on fresh random inputs); verify_cost_s = its
            shrink_s - fx-e2e's
  tp        Torch-Pruning's recipe of benchmarks/_common.tp_prune: BasePruner(GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5, head ignored, num_heads for attention): graph_s = constructor (DependencyGraph build +
            group enumeration), step_s = pruner.step()
  fx-e2e-warm / tp-warm  the same, run twice in one process (fresh model each time), the second timed: one-time
            costs (lazy imports, torch.export/dynamo initialisation) excluded
Ratio = fx-e2e total / tp total (goal <= 0.5); ratio_warm = the warm pair; ratio_with_verify = fx-verify / tp.
Threads: --threads (default 2) for both.

    python benchmarks/analysis_speed.py [--models resnet50,vit_b_16,llama1b,llama1b_fx] [--timeout 600]
Writes results/analysis_speed.json (rows are merged by model, so models can be run one at a time; ``--out`` writes
elsewhere).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

OUT = C.RESULTS / "analysis_speed.json"
MODELS = ["resnet50", "vit_b_16", "llama1b", "llama1b_fx"]
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=32000, max_position_embeddings=2048, use_cache=False)


def build(name: str):
    """(model, args, kwargs, num_classes), seed 0, through fxprune.zoo."""
    from fxprune import zoo
    from fxprune.testing import make_observable

    kwargs: dict = {}
    ncls = None
    if name in ("resnet50", "vit_b_16"):
        m, args, _ = zoo.resolve(f"torchvision:{name}", batch=1, seed=0)
        ncls = 1000
    elif name == "llama1b":
        m, (ids,), _ = zoo.resolve("hf:llama", task="causal-lm", overrides=LLAMA_1B, batch=1, seq=16, seed=0)
        args, kwargs = (), {"input_ids": ids}
    elif name == "llama1b_fx":
        m, args, _ = zoo.resolve("llama", size="full", batch=1, seed=0)
    else:
        raise ValueError(name)
    make_observable(m, 0)
    return m.eval(), tuple(args), kwargs, ncls


def _compile(name: str, verify: bool) -> dict:
    """``fxprune.compile(m, x, [ChannelPrune(0.5), Shrink(verify=verify)], count_flops=False)``: wall time, the
    report's phase timings (trace, analyze, select = channel_prune, shrink, report) and what it pruned."""
    import fxprune
    from fxprune.passes import ChannelPrune, Shrink

    m, args, kwargs, _ = build(name)
    t = time.perf_counter()
    out = fxprune.compile(m, args, example_kwargs=kwargs, passes=[ChannelPrune(ratio=0.5), Shrink(verify=verify)],
                          count_flops=False)
    dt = time.perf_counter() - t
    r = out.report
    timings = r.timings
    return {"total_s": dt, "trace_s": timings.get("trace"), "analyze_s": timings.get("analyze"),
            "select_s": timings.get("channel_prune"), "shrink_s": timings.get("shrink"),
            "report_s": timings.get("report"), "timings": dict(timings),
            "params_before": r.params_before, "params_after": r.params_after,
            "params_removed": 1 - r.params_after / max(r.params_before, 1), "verified": r.verified,
            "max_abs_diff": r.max_abs_diff, "groups": len(r.groups),
            "prunable_groups": sum(1 for g in r.groups if g.frozen is None)}


def fx_e2e(name: str) -> dict:
    return _compile(name, verify=False)


def fx_verify(name: str) -> dict:
    return _compile(name, verify=True)


def tp_run(name: str) -> dict:
    from fxprune.flops import count_params

    m, args, kwargs, ncls = build(name)
    p0 = count_params(m)
    info = C.tp_prune(m, args, kwargs, ncls, ratio=0.5)
    p1 = count_params(m)
    return {"graph_s": info["graph_s"], "step_s": info["step_s"], "total_s": info["tp_seconds"],
            "params_before": p0, "params_after": p1, "params_removed": 1 - p1 / max(p0, 1),
            "tp_options": info["tp_options"]}


def _warm(fn, name: str) -> dict:
    """Run ``fn`` twice in this process (fresh model each time) and keep the second: one-time costs (lazy imports,
    torch.export / dynamo initialisation, autograd warm-up) excluded, as for a user pruning several models."""
    first = fn(name)
    gc.collect()
    row = fn(name)
    row["first_total_s"] = first["total_s"]
    return row


KINDS = {"fx-e2e": fx_e2e, "fx-verify": fx_verify, "tp": tp_run,
         "fx-e2e-warm": lambda n: _warm(fx_e2e, n), "tp-warm": lambda n: _warm(tp_run, n),
         "fx-phases": fx_e2e}  # fx-phases: the old name of the phase breakdown, now part of every fx-e2e row


def worker(name: str, kind: str, threads: int) -> None:
    C.setup_worker(threads)
    load = os.getloadavg()[0]

    def go() -> dict:
        row = KINDS[kind](name)
        row.update(ok=True, loadavg_1m_at_start=load)
        return row
    C.main_guard(go, kind)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--kinds", default="fx-e2e,tp,fx-e2e-warm,tp-warm,fx-verify")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per (model, measurement)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON path (default {OUT})")
    a = ap.parse_args()
    out_path = a.out
    old = {r["model"]: r for r in json.loads(out_path.read_text()).get("rows", [])} if out_path.exists() else {}
    for name in a.models.split(","):
        res: dict = {}
        for kind in a.kinds.split(","):
            r = C.spawn(__file__, ["--worker", name, kind, str(a.threads)], a.timeout)
            if r.get("status") == "timeout":
                r["note"] = f"did not finish in {a.timeout} s: the time is a lower bound"
            res[kind] = r
            print(f"{name:<12}{kind:<10}{json.dumps(r, default=str)[:400]}", flush=True)
        fx = res.get("fx-e2e", {}).get("total_s")
        tp_ = res.get("tp", {})
        tp_total = tp_.get("total_s") or (a.timeout if tp_.get("status") == "timeout" else None)
        row = {"model": name, **res, "threads": a.threads}
        if fx and tp_total:
            row["ratio_fxprune_over_tp"] = fx / tp_total
            row["ratio_is_upper_bound"] = tp_.get("status") == "timeout"
            row["goal_met"] = fx / tp_total <= 0.5
        fw, tw = res.get("fx-e2e-warm", {}).get("total_s"), res.get("tp-warm", {}).get("total_s")
        if fw and tw:
            row["ratio_warm"] = fw / tw
        fv, fe = res.get("fx-verify", {}), res.get("fx-e2e", {})
        if fv.get("total_s") and tp_total:
            row["ratio_with_verify"] = fv["total_s"] / tp_total
        if fv.get("shrink_s") is not None and fe.get("shrink_s") is not None:
            row["verify_cost_s"] = fv["shrink_s"] - fe["shrink_s"]  # Shrink() - Shrink(verify=False), both cold
        old[name] = row
        print(f"== {name}: fxprune {fx} s, torch-pruning {tp_total} s"
              f"{' (timeout, lower bound)' if tp_.get('status') == 'timeout' else ''}, "
              f"ratio {row.get('ratio_fxprune_over_tp')}", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"goal": "fxprune / torch-pruning <= 0.5", "rows": list(old.values())},
                                       indent=1, default=str))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
