"""Analyze + prune + shrink time: fxprune vs Torch-Pruning (DependencyGraph build + pruner.step), one run, one machine.

Models (random init, ``make_observable`` applied, batch 1):
  resnet50   torchvision ResNet-50, 1x3x224x224
  vit_b_16   torchvision ViT-B/16, 1x3x224x224
  llama1b    HF LlamaForCausalLM from LlamaConfig(hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192,
             vocab 32000, use_cache=False), input_ids 1x16  (~1.24B parameters)
  llama1b_fx the same shape as fxprune's own reference LLaMA (``fxprune.models.get("llama", "full")``), which
             Torch-Pruning can trace (it hangs in get_all_groups on transformers' Llama; see README)

Every (model, measurement) runs in a fresh subprocess (caches and memory of one do not help the other):
  fx-e2e    ``fxprune.compile(m, x, [ChannelPrune(0.5), Shrink(verify=False)], count_flops=False)`` -- like for like
            with Torch-Pruning, which neither verifies nor counts FLOPs
  fx-phases trace / analyze (Program.groups) / select (ChannelPrune) / shrink (Shrink(verify=False)) / verify
            (fxprune.verify.verify of the shrunk against the masked module), each timed separately
  tp        Torch-Pruning's recipe of benchmarks/_common.tp_prune: BasePruner(GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5, head ignored, num_heads for attention): graph_s = constructor (DependencyGraph build +
            group enumeration), step_s = pruner.step()
  fx-e2e-warm / tp-warm  the same, run twice in one process (fresh model each time), the second timed: one-time
            costs (lazy imports, torch.export/dynamo initialisation) excluded
Ratio = fx-e2e total / tp total (goal <= 0.5); ratio_warm = the warm pair. Threads: --threads (default 2) for both.

    python benchmarks/analysis_speed.py [--models resnet50,vit_b_16,llama1b,llama1b_fx] [--timeout 600]
Writes results/analysis_speed.json (rows are merged by model, so models can be run one at a time).
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
                intermediate_size=8192, vocab_size=32000, use_cache=False)


def build(name: str):
    """(model, args, kwargs, num_classes)"""
    import torch

    from fxprune.testing import make_observable

    torch.manual_seed(0)
    if name in ("resnet50", "vit_b_16"):
        m, args, kwargs, ncls = C.build_torchvision(name)
    elif name == "llama1b":
        import transformers as T

        m = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA_1B)).eval()
        args, kwargs, ncls = (), {"input_ids": torch.randint(0, 32000, (1, 16))}, None
    elif name == "llama1b_fx":
        from fxprune import models

        m, args = models.get("llama", size="full", batch=1)
        kwargs, ncls = {}, None
    else:
        raise ValueError(name)
    make_observable(m, 0)
    return m.eval(), tuple(args), kwargs, ncls


def fx_e2e(name: str) -> dict:
    import fxprune
    from fxprune.passes import ChannelPrune, Shrink

    m, args, kwargs, _ = build(name)
    t = time.perf_counter()
    out = fxprune.compile(m, args, example_kwargs=kwargs, passes=[ChannelPrune(ratio=0.5), Shrink(verify=False)],
                          count_flops=False)
    dt = time.perf_counter() - t
    r = out.report
    return {"total_s": dt, "params_before": r.params_before, "params_after": r.params_after,
            "params_removed": 1 - r.params_after / max(r.params_before, 1)}


def fx_phases(name: str) -> dict:
    from fxprune.masking import apply_channel_masks, apply_weight_masks
    from fxprune.pass_manager import PassContext, PassManager
    from fxprune.passes import ChannelPrune, Shrink
    from fxprune.program import Program
    from fxprune.trace import normalize_inputs, trace
    from fxprune.verify import verify

    m, args, kwargs, _ = build(name)
    args, kwargs = normalize_inputs(args, kwargs)
    t0 = time.perf_counter()
    gm = trace(m, args, kwargs)
    t1 = time.perf_counter()
    del m
    gc.collect()
    prog = Program(gm, args, kwargs)
    gs = prog.groups
    t2 = time.perf_counter()
    ctx = PassContext(seed=0, verify=False)
    sel, _ = PassManager([ChannelPrune(ratio=0.5)]).run(prog, ctx)
    t3 = time.perf_counter()
    shr, _ = PassManager([Shrink(verify=False)]).run(sel, ctx)
    t4 = time.perf_counter()
    # the masked module, in place on the selection's graph (no further copy of a 1B model)
    apply_channel_masks(sel.gm, sel.groups, sel.leaf_keep())
    apply_weight_masks(sel.gm, sel.weight_masks)
    t5 = time.perf_counter()
    res = verify(sel.gm, shr.gm, args, kwargs, seed=1, rtol=1e-4)
    t6 = time.perf_counter()
    return {"trace_s": t1 - t0, "analyze_s": t2 - t1, "select_s": t3 - t2, "shrink_s": t4 - t3,
            "mask_s": t5 - t4, "verify_s": t6 - t5, "total_no_verify_s": t4 - t0, "total_with_verify_s": t6 - t0,
            "groups": len(gs), "prunable_groups": len(gs.prunable()), "verified": bool(res.ok),
            "max_abs_diff": res.max_abs_diff}


def tp_run(name: str) -> dict:
    m, args, kwargs, ncls = build(name)
    p0 = C.count_params(m)
    info = C.tp_prune(m, args, kwargs, ncls, ratio=0.5)
    return {"graph_s": info["graph_s"], "step_s": info["step_s"], "total_s": info["tp_seconds"],
            "params_before": p0, "params_after": C.count_params(m),
            "params_removed": 1 - C.count_params(m) / max(p0, 1), "tp_options": info["tp_options"]}


def _warm(fn, name: str) -> dict:
    """Run ``fn`` twice in this process (fresh model each time) and keep the second: one-time costs (lazy imports,
    torch.export / dynamo initialisation, autograd warm-up) excluded, as for a user pruning several models."""
    first = fn(name)
    gc.collect()
    row = fn(name)
    row["first_total_s"] = first["total_s"]
    return row


KINDS = {"fx-e2e": fx_e2e, "fx-phases": fx_phases, "tp": tp_run,
         "fx-e2e-warm": lambda n: _warm(fx_e2e, n), "tp-warm": lambda n: _warm(tp_run, n)}


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
    ap.add_argument("--kinds", default="fx-e2e,tp,fx-e2e-warm,tp-warm,fx-phases")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per (model, measurement)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    old = {r["model"]: r for r in json.loads(OUT.read_text()).get("rows", [])} if OUT.exists() else {}
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
        ph = res.get("fx-phases", {})
        if ph.get("total_with_verify_s") and tp_total:
            row["ratio_with_verify"] = ph["total_with_verify_s"] / tp_total
        old[name] = row
        print(f"== {name}: fxprune {fx} s, torch-pruning {tp_total} s"
              f"{' (timeout, lower bound)' if tp_.get('status') == 'timeout' else ''}, "
              f"ratio {row.get('ratio_fxprune_over_tp')}", flush=True)
        C.RESULTS.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps({"goal": "fxprune / torch-pruning <= 0.5", "rows": list(old.values())},
                                  indent=1, default=str))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
