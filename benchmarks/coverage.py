"""Model coverage: fxprune vs Torch-Pruning on torchvision, a timm sample and HF transformers, in one run.

For every model (random init, made observable with ``fxprune.testing.make_observable``):
  fxprune: ``compile(model, x, [ChannelPrune(0.5), Shrink()])`` -> traced? verified? params/MACs reduction, time.
  Torch-Pruning: its standard recipe (MagnitudePruner, GroupMagnitudeImportance(p=2), pruning_ratio=0.5, the final
  classifier ignored as its docs recommend) -> ran? output shape kept? params/MACs reduction, time. TP has no
  numerical verification.
Status: ok (fxprune: verified and >= 10% params removed; TP: ran, output shapes kept, >= 10% removed),
frozen-too-much (< 10% removed), trace-fail, error, timeout.

Each model runs in its own subprocess (timeout, isolation from crashes/OOM); rows are appended to
``results/coverage.jsonl`` (resumable) and the summary goes to ``results/coverage.json``.

    python benchmarks/coverage.py --corpus all --jobs 2
    python benchmarks/coverage.py --corpus hf --only llama
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
JSONL = RESULTS / "coverage.jsonl"
SUMMARY = RESULTS / "coverage.json"

# --------------------------------------------------------------------------------------------------- model lists


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


_SMALL_HINTS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "b0", "s0", "lite0", "18", "_s", "050",
                "100", "t0", "t8", "a0", "12", "s12", "mini")


def timm_names(n: int = 110) -> list[str]:
    """One small variant per timm family (family = module the model is defined in)."""
    import timm

    by_family: dict[str, list[str]] = {}
    for name in timm.list_models():
        try:
            fam = timm.models.get_pretrained_cfg(name) and timm.models._registry._model_to_module.get(name, name)
        except Exception:
            fam = None
        fam = fam or timm.models._registry._model_to_module.get(name, name.split("_")[0])
        by_family.setdefault(fam, []).append(name)

    big = ("large", "huge", "giant", "gigantic", "xlarge", "xxlarge", "512", "448", "384", "_l_", "_h_", "_g_", "1k",
           "deepseek", "gemma", "siglip", "clip", "nasnetalarge")

    def score(name: str) -> tuple:
        hint = next((i for i, h in enumerate(_SMALL_HINTS) if h in name), len(_SMALL_HINTS))
        return (sum(b in name for b in big), hint, len(name), name)

    ranked = {fam: sorted(v, key=score) for fam, v in by_family.items()}
    picks = sorted(v[0] for v in ranked.values())
    # fill up to n with the second-smallest model of the largest families
    for fam in sorted(ranked, key=lambda f: -len(ranked[f])):
        if len(picks) >= n:
            break
        if len(ranked[fam]) > 1:
            picks.append(ranked[fam][1])
    return sorted(picks)[:n]


HF_NAMES = ["llama", "mistral", "qwen2", "gpt2", "opt", "bert", "vit", "swin", "convnext", "mobilevit"]


def build(corpus: str, name: str):
    """(model, args, kwargs, head modules for Torch-Pruning's ignored_layers)."""
    import torch

    if corpus == "torchvision":
        import torchvision

        m = torchvision.models.get_model(name, weights=None).eval()
        return m, (_small_input(m, [96, 299 if "inception" in name else 224]),), {}, _last_linear(m)
    if corpus == "timm":
        import timm

        m = timm.create_model(name, pretrained=False).eval()
        native = tuple(m.pretrained_cfg.get("input_size", (3, 224, 224)))
        return m, (_small_input(m, [96, native[1]], channels=native[0]),), {}, _last_linear(m)
    if corpus == "hf":
        import transformers as T

        small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
        ids = torch.randint(0, 128, (2, 8))
        img = torch.randn(2, 3, 64, 64)
        cfgs = {
            "llama": (T.LlamaConfig(vocab_size=128, num_key_value_heads=2, use_cache=False, **small),
                      T.AutoModelForCausalLM, {"input_ids": ids}),
            "mistral": (T.MistralConfig(vocab_size=128, num_key_value_heads=2, use_cache=False, **small),
                        T.AutoModelForCausalLM, {"input_ids": ids}),
            "qwen2": (T.Qwen2Config(vocab_size=128, num_key_value_heads=2, use_cache=False, **small),
                      T.AutoModelForCausalLM, {"input_ids": ids}),
            "gpt2": (T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, use_cache=False),
                     T.AutoModelForCausalLM, {"input_ids": ids}),
            "opt": (T.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                ffn_dim=128, word_embed_proj_dim=64, use_cache=False), T.AutoModelForCausalLM,
                    {"input_ids": ids}),
            "bert": (T.BertConfig(vocab_size=128, **small), T.AutoModel, {"input_ids": ids}),
            "vit": (T.ViTConfig(image_size=64, patch_size=16, **small), T.AutoModel, {"pixel_values": img}),
            "swin": (T.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                                  window_size=4), T.AutoModel, {"pixel_values": img}),
            "convnext": (T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2), T.AutoModel,
                         {"pixel_values": img}),
            "mobilevit": (T.MobileViTConfig(image_size=64, hidden_sizes=[32, 48, 64],
                                            neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160]), T.AutoModel,
                          {"pixel_values": img}),
        }
        cfg, auto, kw = cfgs[name]
        m = auto.from_config(cfg).eval()
        heads = [mod for n, mod in m.named_modules() if n.endswith("lm_head")]
        return m, (), kw, heads
    raise ValueError(corpus)


def _small_input(m, sizes: list[int], channels: int = 3):
    """The smallest of ``sizes`` that the model accepts (a smaller image keeps the sweep affordable on CPU)."""
    import torch

    for size in sizes[:-1]:
        x = torch.randn(2, channels, size, size)
        try:
            with torch.no_grad():
                m(x)
            return x
        except Exception:
            continue
    return torch.randn(2, channels, sizes[-1], sizes[-1])


def _last_linear(m):
    import torch.nn as nn

    last = None
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            last = mod
    return [last] if last is not None else []


# --------------------------------------------------------------------------------------------------- one model


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:240] if s else ''}"


def _leaves(out):
    import torch
    from torch.utils._pytree import tree_flatten

    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


def run_fxprune(corpus: str, name: str) -> dict:
    import torch

    import fxprune
    from fxprune.errors import TraceError
    from fxprune.flops import count_params
    from fxprune.passes import ChannelPrune, Shrink
    from fxprune.testing import make_observable

    torch.manual_seed(0)
    m, args, kwargs, _ = build(corpus, name)
    make_observable(m, 0)
    t = time.perf_counter()
    row = {"lib": "fxprune"}
    try:
        out = fxprune.compile(m, args, example_kwargs=kwargs, passes=[ChannelPrune(0.5), Shrink()])
    except TraceError as e:
        return {**row, "status": "trace-fail", "error": _first_line(e), "seconds": time.perf_counter() - t}
    except Exception as e:
        return {**row, "status": "error", "error": _first_line(e), "seconds": time.perf_counter() - t}
    r = out.report
    removed = 1 - r.params_after / max(r.params_before, 1)
    status = "ok" if (r.verified and removed >= 0.10) else ("frozen-too-much" if r.verified else "error")
    return {**row, "status": status, "verified": r.verified, "observable": r.observable,
            "max_abs_diff": r.max_abs_diff, "params_before": r.params_before, "params_after": r.params_after,
            "macs_before": r.macs_before, "macs_after": r.macs_after, "params_removed": removed,
            "unknown_ops": sorted(r.unknown_ops), "dynamic_batch": r.dynamic_batch,
            "seconds": time.perf_counter() - t}


def run_torch_pruning(corpus: str, name: str) -> dict:
    import torch
    import torch_pruning as tp

    from fxprune.flops import count_macs, count_params
    from fxprune.testing import make_observable

    torch.manual_seed(0)
    m, args, kwargs, heads = build(corpus, name)
    make_observable(m, 0)
    row = {"lib": "torch-pruning"}
    with torch.no_grad():
        ref = [x.shape for x in _leaves(m(*args, **kwargs))]
    p0, c0 = count_params(m), count_macs(m, args, kwargs)
    t = time.perf_counter()
    try:
        example = args if not kwargs else kwargs
        pruner = tp.pruner.MagnitudePruner(m, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=heads)
        pruner.step()
    except Exception as e:
        return {**row, "status": "error", "error": _first_line(e), "seconds": time.perf_counter() - t}
    dt = time.perf_counter() - t
    try:
        with torch.no_grad():
            got = [x.shape for x in _leaves(m(*args, **kwargs))]
    except Exception as e:
        return {**row, "status": "error", "error": "pruned model fails to run: " + _first_line(e), "seconds": dt}
    p1, c1 = count_params(m), count_macs(m, args, kwargs)
    removed = 1 - p1 / max(p0, 1)
    if got != ref:
        return {**row, "status": "error", "error": f"output shapes changed {ref} -> {got}", "seconds": dt}
    return {**row, "status": "ok" if removed >= 0.10 else "frozen-too-much", "verified": None,
            "params_before": p0, "params_after": p1, "macs_before": c0, "macs_after": c1, "params_removed": removed,
            "seconds": dt}


def worker(corpus: str, name: str, lib: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    try:
        row = run_fxprune(corpus, name) if lib == "fxprune" else run_torch_pruning(corpus, name)
    except Exception as e:  # building the model itself failed
        row = {"lib": lib, "status": "error", "error": "setup: " + _first_line(e), "trace": traceback.format_exc()[-800:]}
    print("@@ROW@@" + json.dumps(row, default=str))


# --------------------------------------------------------------------------------------------------- driver


def _spawn(corpus: str, name: str, lib: str, timeout: int) -> dict:
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", corpus, name, lib], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        return {"lib": lib, "status": "timeout", "error": f"over {timeout} s", "seconds": timeout}
    for line in p.stdout.splitlines():
        if line.startswith("@@ROW@@"):
            return json.loads(line[len("@@ROW@@"):])
    tail = (p.stderr or "").strip().splitlines()[-1:] or [f"exit code {p.returncode}"]
    return {"lib": lib, "status": "error", "error": f"worker died (rc {p.returncode}): {tail[0][:200]}",
            "seconds": time.perf_counter() - t}


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        c = out.setdefault(r["corpus"], {}).setdefault(r["lib"], {"models": 0})
        c["models"] += 1
        c[r["status"]] = c.get(r["status"], 0) + 1
    for corpus, libs in out.items():
        for lib, c in libs.items():
            c["ok_rate"] = round(c.get("ok", 0) / max(c["models"], 1), 3)
    return out


def print_table(summary: dict) -> None:
    cols = ["models", "ok", "frozen-too-much", "trace-fail", "error", "timeout", "ok_rate"]
    print(f"{'corpus':<12}{'library':<15}" + "".join(f"{c:>17}" for c in cols))
    for corpus, libs in summary.items():
        for lib, c in libs.items():
            print(f"{corpus:<12}{lib:<15}" + "".join(f"{c.get(k, 0)!s:>17}" for k in cols))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="all", choices=["torchvision", "timm", "hf", "all"])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--only", default=None, help="run a single model name")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--timm-sample", type=int, default=110)
    ap.add_argument("--libs", default="fxprune,torch-pruning")
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in coverage.jsonl")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    corpora = ["torchvision", "timm", "hf"] if a.corpus == "all" else [a.corpus]
    todo = []
    for corpus in corpora:
        names = {"torchvision": torchvision_names, "timm": lambda: timm_names(a.timm_sample),
                 "hf": lambda: HF_NAMES}[corpus]()
        if a.only:
            names = [n for n in names if n == a.only]
        todo += [(corpus, n) for n in names[: a.limit]]
    done: dict[tuple, dict] = {}
    if JSONL.exists() and not a.fresh:
        for line in JSONL.read_text().splitlines():
            r = json.loads(line)
            done[(r["corpus"], r["model"], r["lib"])] = r
    libs = a.libs.split(",")
    jobs = [(c, n, lib) for c, n in todo for lib in libs if (c, n, lib) not in done]
    print(f"{len(todo)} models, {len(jobs)} runs to do ({len(done)} cached)", flush=True)

    def one(job):
        c, n, lib = job
        r = _spawn(c, n, lib, a.timeout)
        r.update({"corpus": c, "model": n})
        with JSONL.open("a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        print(f"{c:<12}{n:<40}{lib:<15}{r['status']:<16}{r.get('params_removed', 0):>7.3f}  "
              f"{r.get('seconds', 0):6.1f}s  {r.get('error', '')[:90]}", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        list(ex.map(one, jobs))
    rows = []
    for line in JSONL.read_text().splitlines():
        r = json.loads(line)
        if (r["corpus"], r["model"]) in set(todo) or not a.only:
            rows.append(r)
    # keep the newest row per (corpus, model, lib)
    latest = {(r["corpus"], r["model"], r["lib"]): r for r in rows}
    rows = list(latest.values())
    summary = summarize(rows)
    print_table(summary)
    fx_ok = [r for r in rows if r["lib"] == "fxprune" and r["status"] == "ok"]
    summary["all_fxprune_ok_verified"] = all(r.get("verified") is True for r in fx_ok)
    SUMMARY.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=str))
    print(f"wrote {SUMMARY}")


if __name__ == "__main__":
    main()
