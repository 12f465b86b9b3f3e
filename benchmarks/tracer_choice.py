"""Which front-end traces more real models: torch.fx.symbolic_trace or torch.export(strict=False)?

Runs both tracers (tracing only, no pruning) on every torchvision classification model and on HF transformers built
from small configs (models from ``fxprune.zoo``), in one run. Writes benchmarks/results/tracer_choice.json (or
``--out``) and prints the counts.

    python benchmarks/tracer_choice.py [--limit N] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


_SMALL = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
_DEC = dict(vocab_size=128, num_key_value_heads=2, use_cache=False, **_SMALL)
HF = {  # name -> (task, config overrides) for fxprune.zoo's hf:NAME
    "llama": ("causal-lm", _DEC),
    "mistral": ("causal-lm", _DEC),
    "qwen2": ("causal-lm", _DEC),
    "gpt2": ("causal-lm", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, use_cache=False)),
    "opt": ("causal-lm", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              ffn_dim=128, word_embed_proj_dim=64, use_cache=False)),
    "bert": ("base", dict(vocab_size=128, **_SMALL)),
}


def hf_models():
    """(name, build) with build() -> (model, args, kwargs): input_ids 2x8 by keyword."""
    from fxprune import zoo

    def build(name, task, overrides):
        m, (ids,), _ = zoo.resolve(f"hf:{name}", task=task, overrides=overrides, batch=2, seq=8)
        return m, (), {"input_ids": ids}

    for name, (task, overrides) in HF.items():
        yield f"hf:{name}", (lambda n=name, t=task, o=overrides: build(n, t, o))


def tv_models(limit):
    """(name, build): every torchvision classifier at batch 2, 224x224 (299 for inception_v3)."""
    import torchvision

    from fxprune import zoo

    names = torchvision.models.list_models(module=torchvision.models)[:limit]
    for n in names:
        yield f"torchvision:{n}", (lambda n=n: zoo.resolve(f"torchvision:{n}", batch=2)[:2] + ({},))


def try_trace(fn):
    t = time.perf_counter()
    try:
        fn()
        return True, time.perf_counter() - t, ""
    except Exception as e:  # record, never crash the sweep
        return False, time.perf_counter() - t, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="first N torchvision models")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tracer_choice.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, build in list(tv_models(args.limit)) + list(hf_models()):
        model, a, kw = build()
        fx_ok, fx_t, fx_err = try_trace(lambda: torch.fx.symbolic_trace(model) if not kw else
                                        torch.fx.symbolic_trace(model, concrete_args=None))
        ex_ok, ex_t, ex_err = try_trace(lambda: torch.export.export(model, a, kw, strict=False))
        rows.append({"model": name, "symbolic_trace": fx_ok, "symbolic_trace_s": round(fx_t, 3), "fx_error": fx_err,
                     "export": ex_ok, "export_s": round(ex_t, 3), "export_error": ex_err})
        print(f"{name:40s} symbolic_trace={fx_ok!s:5} export={ex_ok!s:5}", flush=True)
    summary = {
        "models": len(rows),
        "symbolic_trace_ok": sum(r["symbolic_trace"] for r in rows),
        "export_ok": sum(r["export"] for r in rows),
        "hf_symbolic_trace_ok": sum(r["symbolic_trace"] for r in rows if r["model"].startswith("hf:")),
        "hf_export_ok": sum(r["export"] for r in rows if r["model"].startswith("hf:")),
    }
    print(json.dumps(summary, indent=1))
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
