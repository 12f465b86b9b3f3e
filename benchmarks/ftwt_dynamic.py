"""FTWT dynamic channel gating on Fashion-MNIST: accuracy, mask accuracy, per-sample MACs, batch-1 latency.

A VGG-style CNN (conv32-conv64-conv128-conv128, BN + ReLU, ~25 MMACs per image) is trained for ``--epochs`` on
``--train-limit`` images, once per seed in ``--seeds``. For each heat-map mass ``m`` in ``--mass``:
``FTWTGates(mass=m)`` (auto blocks: the four convs; the authors' gradient-free mask), then ``--ft-epochs`` of FTWT
training (predictors SGD lr 0.1, backbone SGD lr 1e-3, mask loss on). Baselines with the same fine-tune budget
(same steps, optimizer and BN mode): static channel pruning at FTWT's mean MACs (``ChannelPrune(target_macs=...)``
+ ``Shrink``) and the dense model trained the same extra epochs; ``--ste`` adds FTWT with ``ste=True``. Summary:
mean +- sd over seeds. Reported per mass, on ``--test-limit`` test images (execution checks on the first seed):

* accuracy (dense / gated), mask accuracy vs the self-supervised targets, active-channel fraction per gate;
* dynamic MACs per sample (``fxprune.passes.ftwt_flops.dynamic_macs``): mean, std, percentiles, histogram; checked
  against torch's FLOP counter on the gather module for the first images;
* an execution-path sweep on a wider random VGG (64-128-256-256) with fixed active fractions 1 / 0.5 / 0.25;
* batch-1 latency (10th percentile and median over ``--latency-samples`` images x 3, 1 thread, round-robin): the dense model, the gated module (computes
  every channel, then masks) and the gather module (``gather_module``: computes only the active channels).

JSON in ``benchmarks/results/ftwt_dynamic.json``.

    .venv/bin/python benchmarks/ftwt_dynamic.py --ste      # ~1 h on 2 heavily shared cores (3 seeds)
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxprune  # noqa: E402
import fxprune.data  # noqa: E402
import fxprune.train  # noqa: E402
from fxprune.passes.ftwt_flops import dynamic_macs  # noqa: E402
from fxprune.flops import count_macs  # noqa: E402
from fxprune.passes import ChannelPrune, Shrink  # noqa: E402
from fxprune.passes.ftwt import (FTWTGate, FTWTGates, FTWTLoss, backbone_parameters, gather_module, mask_accuracy,  # noqa: E402
                                 predictor_parameters)

RESULTS = ROOT / "benchmarks" / "results"


class VGG(nn.Module):
    def __init__(self, c=(32, 64, 128, 128)):
        super().__init__()
        chans = (1,) + tuple(c)
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(ch) for ch in c)
        self.fc = nn.Linear(c[3] * 7 * 7, 10)

    def forward(self, x):
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(conv(x)))
            if i in (0, 2):
                x = F.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


def accuracy(model, x, y, bs=500) -> float:
    """Test accuracy with fxprune.train.accuracy (eval mode, unshuffled batches)."""
    return fxprune.train.accuracy(model, fxprune.data.loader(x, y, batch_size=bs, shuffle=False))


def latencies_ms(fns: dict, xs, repeats: int = 3) -> dict:
    """Batch-1 latency of each function (min, p10, median over inputs x repeats), measured round-robin per input so
    that all see the same machine load. On shared cores the min/p10 are the stable numbers."""
    names = list(fns)
    times = {n: [] for n in names}
    with torch.no_grad():
        for x in xs[:5]:
            for n in names:
                fns[n](x)
        for i, x in enumerate(list(xs) * repeats):
            order = names[i % len(names):] + names[:i % len(names)]
            for n in order:
                t = time.perf_counter()
                fns[n](x)
                times[n].append(time.perf_counter() - t)
    return {n: {"min": 1000 * min(v), "p10": 1000 * float(np.percentile(v, 10)), "median": 1000 * statistics.median(v)}
            for n, v in times.items()}


def train_dense(seed: int, xtr, ytr, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = VGG()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for e in range(epochs):
        model.train()
        for xb, yb in fxprune.data.loader(xtr, ytr, batch_size=64, seed=seed + e):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def finetune(gm, xtr, ytr, epochs: int, seed: int, crit=None) -> int:
    """The shared fine-tune budget of every arm: ``epochs`` over the training set, batch 64, backbone SGD lr 1e-3
    momentum 0.9, BatchNorm in training mode (``fxprune.train.train_mode``). FTWT arms (``crit``) also train the
    predictors (SGD lr 0.1, momentum 0.9) with the mask loss on (the first half of a 2x schedule)."""
    opt_b = torch.optim.SGD(backbone_parameters(gm) if crit is not None else gm.parameters(), lr=1e-3, momentum=0.9)
    opt_m = torch.optim.SGD(predictor_parameters(gm), lr=0.1, momentum=0.9) if crit is not None else None
    steps = 0
    torch.manual_seed(seed)
    with fxprune.train.train_mode(gm):
        for e in range(epochs):
            if crit is not None:
                crit.set_epoch(e, 2 * epochs)
            for xb, yb in fxprune.data.loader(xtr, ytr, batch_size=64, seed=seed + 100 + e):
                out = gm(xb)
                loss = crit(out, yb) if crit is not None else F.cross_entropy(out, yb)
                opt_b.zero_grad()
                if opt_m is not None:
                    opt_m.zero_grad()
                loss.backward()
                opt_b.step()
                if opt_m is not None:
                    opt_m.step()
                steps += 1
    gm.eval()
    return steps


def ms(vals: list[float]) -> dict:
    return {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "values": [float(v) for v in vals]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-limit", type=int, default=8000)
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--mass", type=float, nargs="+", default=[0.6, 0.9])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ste", action="store_true", help="also run FTWT with ste=True (task loss into predictors)")
    ap.add_argument("--latency-samples", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS / "ftwt_dynamic.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    xtr, ytr = fxprune.data.fashion_mnist("train", args.train_limit)
    xte, yte = fxprune.data.fashion_mnist("test", args.test_limit)
    test_batches = [xte[i:i + 500] for i in range(0, len(xte), 500)]
    lat_x = [xte[i:i + 1] for i in range(args.latency_samples)]

    per_seed, dense_accs, detail = [], [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        model = train_dense(seed, xtr, ytr, args.epochs)
        dense_acc = accuracy(model, xte, yte)
        dense_macs = count_macs(model, (xte[:1],))
        dense_accs.append(dense_acc)
        # dense + the same extra epochs
        extra = fxprune.compile(copy.deepcopy(model), (xtr[:2],), passes=[], seed=seed).module
        finetune(extra, xtr, ytr, args.ft_epochs, seed)
        rec = {"seed": seed, "dense_accuracy": dense_acc, "dense_extra_accuracy": accuracy(extra, xte, yte),
               "rows": []}
        print(f"seed {seed}: dense {dense_acc:.4f}, dense + {args.ft_epochs} epochs {rec['dense_extra_accuracy']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for mass in args.mass:
            row = {"mass": mass}
            for arm, ste in (("ftwt", False),) + ((("ftwt_ste", True),) if args.ste else ()):
                t1 = time.perf_counter()
                gm = fxprune.compile(copy.deepcopy(model), (xtr[:2],), passes=[FTWTGates(mass=mass, ste=ste)],
                                     seed=seed).module
                crit = FTWTLoss(gm)
                steps = finetune(gm, xtr, ytr, args.ft_epochs, seed, crit)
                crit.remove()
                dm = dynamic_macs(gm, test_batches)
                macc = mask_accuracy(gm, [(xte[i:i + 500], yte[i:i + 500]) for i in range(0, len(xte), 500)])
                row[arm] = {"accuracy": accuracy(gm, xte, yte), "mean_macs_ratio": dm.summary()["mean_ratio"],
                            "mask_accuracy": macc["accuracy"], "ft_steps": steps,
                            "ft_seconds": round(time.perf_counter() - t1, 1)}
                if arm == "ftwt":
                    row["ftwt"]["predicted_active"] = macc["predicted_active"]
                    row["ftwt"]["target_active"] = macc["target_active"]
                    row["ftwt"]["dynamic_macs"] = dm.summary()
                    if seed == args.seeds[0]:
                        detail.append((mass, gm, dm))
            # static channel pruning at the FTWT arm's mean MACs, same fine-tune budget
            target = row["ftwt"]["mean_macs_ratio"]
            st = fxprune.compile(copy.deepcopy(model), (xtr[:2],),
                                 passes=[ChannelPrune(target_macs=target), Shrink()], seed=seed)
            static_ratio = st.report.macs_after / st.report.macs_before
            acc0 = accuracy(st.module, xte, yte)
            finetune(st.module, xtr, ytr, args.ft_epochs, seed)
            row["static"] = {"accuracy": accuracy(st.module, xte, yte), "accuracy_before_ft": acc0,
                             "macs_ratio": static_ratio, "target_macs_ratio": target}
            rec["rows"].append(row)
            print(f"  mass {mass}: FTWT acc {row['ftwt']['accuracy']:.4f} at {target:.3f} of dense MACs (mask acc "
                  f"{row['ftwt']['mask_accuracy']:.3f})"
                  + (f"; FTWT+STE {row['ftwt_ste']['accuracy']:.4f} at {row['ftwt_ste']['mean_macs_ratio']:.3f}"
                     if args.ste else "")
                  + f"; static {row['static']['accuracy']:.4f} at {static_ratio:.3f}", flush=True)
        per_seed.append(rec)

    summary = []
    for i, mass in enumerate(args.mass):
        rows = [r["rows"][i] for r in per_seed]
        srow = {"mass": mass,
                "ftwt_accuracy": ms([r["ftwt"]["accuracy"] for r in rows]),
                "ftwt_mean_macs_ratio": ms([r["ftwt"]["mean_macs_ratio"] for r in rows]),
                "ftwt_mask_accuracy": ms([r["ftwt"]["mask_accuracy"] for r in rows]),
                "static_accuracy": ms([r["static"]["accuracy"] for r in rows]),
                "static_macs_ratio": ms([r["static"]["macs_ratio"] for r in rows]),
                "dense_extra_accuracy": ms([r["dense_extra_accuracy"] for r in per_seed]),
                "ftwt_minus_static": ms([r["ftwt"]["accuracy"] - r["static"]["accuracy"] for r in rows])}
        if args.ste:
            srow["ftwt_ste_accuracy"] = ms([r["ftwt_ste"]["accuracy"] for r in rows])
            srow["ftwt_ste_mean_macs_ratio"] = ms([r["ftwt_ste"]["mean_macs_ratio"] for r in rows])
        summary.append(srow)
        print(f"mass {mass}: FTWT {srow['ftwt_accuracy']['mean']:.4f} +- {srow['ftwt_accuracy']['sd']:.4f} at "
              f"{srow['ftwt_mean_macs_ratio']['mean']:.3f} MACs; static {srow['static_accuracy']['mean']:.4f} +- "
              f"{srow['static_accuracy']['sd']:.4f}; dense+extra {srow['dense_extra_accuracy']['mean']:.4f}",
              flush=True)

    # execution checks and latency on the first seed's gated models
    rows = []
    for mass, gm, dm in detail:
        gathered = gather_module(gm)
        check = [(int(count_macs(gathered, (xte[i:i + 1],))), int(dm.per_sample[i])) for i in range(10)]
        with torch.no_grad():
            max_diff = max(float((gathered(x) - gm(x)).abs().max()) for x in lat_x[:20])
        lat = latencies_ms({"gated_masked": gm, "gather": gathered}, lat_x)
        row = {"mass": mass, "gather_flopcounter_check": {"first_10": check, "equal": all(a == b for a, b in check)},
               "gather_max_abs_diff": max_diff, "latency_ms_batch1": lat,
               "speedup_gather_vs_masked_p10": lat["gated_masked"]["p10"] / lat["gather"]["p10"]}
        rows.append(row)
        print(f"mass {mass}: gather == dynamic MACs {row['gather_flopcounter_check']['equal']}, max diff "
              f"{max_diff:.2e}, p10 masked {lat['gated_masked']['p10']:.2f} ms / gather {lat['gather']['p10']:.2f}",
              flush=True)

    # execution-path sweep: a wider VGG (random weights), predictors set to a fixed active fraction per layer
    sweep = []
    torch.manual_seed(args.seeds[0] + 1)
    wide = VGG((64, 128, 256, 256)).eval()
    wide_gm = fxprune.compile(wide, (xte[:2],), passes=[FTWTGates()], seed=args.seeds[0]).module
    gen = torch.Generator().manual_seed(args.seeds[0])
    xs = lat_x[:max(20, args.latency_samples // 4)]
    for frac in (1.0, 0.5, 0.25):
        with torch.no_grad():
            for m in wide_gm.modules():
                if isinstance(m, FTWTGate):
                    c = m.predictor.out_channels
                    on = torch.randperm(c, generator=gen)[:max(1, round(frac * c))]
                    m.predictor.weight.zero_()
                    m.predictor.bias.fill_(-3.0)
                    m.predictor.bias[on] = 3.0
        gathered = gather_module(wide_gm)
        dm = dynamic_macs(wide_gm, [xte[:8]])
        lat = latencies_ms({"dense": wide, "gated_masked": wide_gm, "gather": gathered}, xs)
        sweep.append({"active_fraction": frac, "macs_per_image": dm.mean, "dense_macs_per_image": dm.dense,
                      "latency_ms_batch1": lat, "speedup_gather_vs_dense_p10": lat["dense"]["p10"] /
                      lat["gather"]["p10"]})
        print(f"wide, active {frac}: MACs {dm.mean / 1e6:.1f}M of {dm.dense / 1e6:.1f}M, p10 dense "
              f"{lat['dense']['p10']:.2f} ms / masked {lat['gated_masked']['p10']:.2f} / gather "
              f"{lat['gather']['p10']:.2f}", flush=True)

    result = {
        "benchmark": "ftwt_dynamic", "dataset": "Fashion-MNIST", "train_images": len(xtr), "test_images": len(xte),
        "model": "VGG-style conv32-conv64-conv128-conv128 (BN, ReLU), fc10", "epochs": args.epochs,
        "ft_epochs": args.ft_epochs, "seeds": args.seeds, "dense_macs_per_image": dense_macs,
        "dense_accuracy": ms(dense_accs),
        "ftwt": {"mode": "decoupled", "ste": False,
                 "note": "authors' gradient-free binary mask: the predictors learn only from the mask loss"},
        "arms": {"ftwt": "FTWTGates(mass) + ft_epochs of FTWT training (mask loss on)",
                 "ftwt_ste": "same with ste=True (task loss into the predictors through a straight-through mask)",
                 "static": "ChannelPrune(target_macs = FTWT's mean MACs ratio of the same seed and mass, L2 "
                           "importance, local) + Shrink + the same ft_epochs",
                 "dense_extra": "the dense model + the same ft_epochs"},
        "summary": summary, "per_seed": per_seed, "execution": rows,
        "execution_sweep": {"model": "VGG-style conv64-conv128-conv256-conv256 (random weights)",
                            "masks": "fixed random channel subsets of the given fraction in every gated block "
                                     "(predictor weights 0, bias +-3): isolates the execution path from training",
                            "rows": sweep},
        "notes": ["every arm fine-tunes with the same budget: ft_epochs over the training images, batch 64, "
                  "backbone SGD lr 1e-3 momentum 0.9, BN in training mode; FTWT predictors SGD lr 0.1",
                  "accuracies are on the test_images; mean +- sd over the seeds (sample sd)",
                  "latency: batch-1 calls (inputs x 3), variants timed round-robin on each input; p10 is the stable "
                  "figure on shared cores; gated_masked = the compiled module (every channel computed, then "
                  "masked), gather = gather_module (only active channels computed)",
                  "dynamic MACs count conv/linear MACs plus the predictors' 1x1 convs"],
        "seconds": {"total": round(time.perf_counter() - t_start, 1)},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                    "note": "2 cores shared with other jobs"},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']['total']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
