"""Which front-end traces more real models: torch.fx.symbolic_trace or torch.export(strict=False)?

Runs both tracers (tracing only, no pruning) on every torchvision classification model and on HF transformers built
from small configs, in one run. Writes benchmarks/results/tracer_choice.json and prints the counts.

    python benchmarks/tracer_choice.py [--limit N]
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


def hf_models():
    import transformers as T

    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
    cfgs = {
        "llama": (T.LlamaConfig(vocab_size=128, num_key_value_heads=2, use_cache=False, **small), T.AutoModelForCausalLM),
        "mistral": (T.MistralConfig(vocab_size=128, num_key_value_heads=2, use_cache=False, **small),
                    T.AutoModelForCausalLM),
        "qwen2": (T.Qwen2Config(vocab_size=128, num_key_value_heads=2, use_cache=False, **small), T.AutoModelForCausalLM),
        "gpt2": (T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, use_cache=False), T.AutoModelForCausalLM),
        "opt": (T.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                            word_embed_proj_dim=64, use_cache=False), T.AutoModelForCausalLM),
        "bert": (T.BertConfig(vocab_size=128, **small), T.AutoModel),
    }
    for name, (cfg, auto) in cfgs.items():
        yield f"hf:{name}", (lambda c=cfg, a=auto: a.from_config(c).eval()), {"input_ids": torch.randint(0, 128, (2, 8))}


def tv_models(limit):
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)[:limit]
    for n in names:
        size = 299 if "inception" in n else 224
        yield f"torchvision:{n}", (lambda n=n: torchvision.models.get_model(n, weights=None).eval()), \
            (torch.randn(2, 3, size, size),)


def try_trace(fn):
    t = time.perf_counter()
    try:
        fn()
        return True, time.perf_counter() - t, ""
    except Exception as e:  # record, never crash the sweep
        return False, time.perf_counter() - t, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, build, inputs in list(tv_models(args.limit)) + list(hf_models()):
        model = build()
        a, kw = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
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
    out = Path(__file__).parent / "results" / "tracer_choice.json"
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
