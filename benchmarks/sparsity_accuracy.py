"""Fine-grained sparsity on Fashion-MNIST: test accuracy dense vs PDP, magnitude one-shot, N:M and LPViT blocks.

Two models trained from scratch (``--epochs``, Adam, seeded): a small CNN (3 conv + BN, 2 linear; ~1.4 M MACs)
and a small ViT (our reference ViT: 28x28 grey images repeated to 3 channels, patch 7, dim 64, depth 4, 4 heads).
Then, from the same dense weights and with the same budget of ``--ft-epochs`` epochs for every row:

* ``dense``: the trained model; ``dense+ft``: trained ``--ft-epochs`` more (same budget, no pruning)
* ``magnitude_90``: ``Unstructured(0.9, scope="global")`` one-shot, then fine-tuned with the masks enforced
* ``gmp_90``: gradual magnitude pruning with PDP's per-layer targets (one global magnitude sort of the dense
  weights) and PDP's linear ramp over the first half of the budget: after every optimizer step each layer's
  smallest-|w| fraction ``r_l * ramp`` is set to zero (Zhu & Gupta style, masks recomputed every step)
* ``pdp_90``: ``PDP(0.9)`` soft masks (global allocation, linear ramp over the first half), then ``finalize``
* ``magnitude_2:4``: ``NMSparsity(2, 4)`` one-shot + fine-tune
* ``gmp_2:4``: gradual N:M magnitude pruning with PDP's N:M ramp (4 -> 3 -> 2 kept of 4)
* ``pdp_2:4``: ``PDP(structure="nm")`` trained for the budget, then ``finalize``
* ``lpvit_50macs``: ``BlockSparsity(target_macs=0.5)`` (ViT: 16x16 tiles of the linear layers; CNN: 8x8 tiles,
  convs included) + fine-tune

The first conv (1 or 3 input channels) has too few input channels for N:M and is left dense there (reported).
Every pruned row reports its weight sparsity over the pruned layers and its MACs (``macs``: one forward of the
2-image example batch, dense MACs minus the MACs of the masked weights; only ``lpvit_50macs`` targets MACs).
BatchNorm statistics stay frozen during fine-tuning (the same for every row). Accuracy on the full 10k test
split. ``--seeds``: the whole pipeline (dense training included) per seed; the summary gives mean +- sd.
JSON in ``benchmarks/results/sparsity_accuracy.json``.

    .venv/bin/python benchmarks/sparsity_accuracy.py                         # ~10 min on 2 shared cores
    .venv/bin/python benchmarks/sparsity_accuracy.py --train-limit 5000 --epochs 1 --ft-epochs 1   # smoke run
"""
from __future__ import annotations

import argparse
import json
import math
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
from fxprune.models.vit import ViT  # noqa: E402
from fxprune.passes.block_sparsity import BlockSparsity  # noqa: E402
from fxprune.passes.nm_sparsity import NMSparsity  # noqa: E402
from fxprune.passes.pdp import PDP, global_allocation, ramp_fraction  # noqa: E402
from fxprune.passes.unstructured import targets as sparsifiable_targets  # noqa: E402
from fxprune.passes.sparse_kernels import bake, enforce_masks  # noqa: E402
from fxprune.passes.unstructured import Unstructured  # noqa: E402
from fxprune.utils import get_tensor  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class SmallCNN(nn.Module):
    """~1.4 M MACs per image: conv 1-16 (stride 2), 16-32, 32-32 (3x3, BN, ReLU; 2x2 max-pool after the last two),
    linear 288-128-10."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 3 * 3, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))  # 14x14
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)  # 7x7
        x = F.max_pool2d(F.relu(self.b3(self.c3(x))), 2)  # 3x3
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class GreyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.vit = ViT(img=28, patch=7, dim=64, depth=4, heads=4, num_classes=10)

    def forward(self, x):
        return self.vit(x.expand(-1, 3, -1, -1))


def accuracy(model, x, y, bs=1000) -> float:
    """Test accuracy with fxprune.train.accuracy (eval mode, unshuffled batches)."""
    return fxprune.train.accuracy(model, fxprune.data.loader(x, y, batch_size=bs, shuffle=False))


def train(model, x, y, epochs, lr, seed, step_hook=None, batch_size=128):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = 0
    for e in range(epochs):
        for xb, yb in fxprune.data.loader(x, y, batch_size=batch_size, seed=seed * 1000 + e):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if step_hook is not None:
                step_hook()
    return steps


def mask_stats(out, masks) -> dict:
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m.bool()).sum()) for m in masks.values())
    return {"weight_sparsity": round(zeros / max(total, 1), 4), "masked_layers": len(masks)}


def macs_after(out, masks, dense_macs) -> int:
    """Dense MACs minus the MACs of the masked weights (per weight element: the layer's MACs / numel)."""
    from fxprune.passes.sparse_kernels import sparsifiable_weights

    infos = sparsifiable_weights(out.program.gm) if out.program.gm is not None else {}
    removed = 0.0
    for name, m in masks.items():
        info = infos.get(name)
        if info is not None:
            removed += info.macs * float((~m.bool()).sum()) / m.numel()
    return int(round(dense_macs - removed))


@torch.no_grad()
def gmp_masks(gm, infos, structure, ratios, frac) -> dict:
    """Magnitude masks at ``frac`` of the final per-layer ratios (unstructured) or of the 2:4 ramp (nm)."""
    masks = {}
    for name, info in infos.items():
        w = get_tensor(gm, name)
        if structure == "nm":
            keep = 4 - int(round(frac * 2))
            s = w.abs().movedim(info.reduction_dim, -1)
            g = s.reshape(*s.shape[:-1], s.shape[-1] // 4, 4)
            idx = g.topk(keep, dim=-1).indices
            mk = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
            masks[name] = mk.reshape(s.shape).movedim(-1, info.reduction_dim)
        else:
            a = w.abs().reshape(-1)
            drop = int(round(ratios[name] * frac * a.numel()))
            mk = torch.ones(a.numel(), dtype=torch.bool)
            mk[torch.argsort(a, stable=True)[:drop]] = False
            masks[name] = mk.reshape(w.shape)
    return masks


def run_model(label, build, data, a, seed) -> list[dict]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = build()
    t0 = time.time()
    model.train()
    train(model, xtr, ytr, a.epochs, a.lr, seed)
    model.eval()
    example = (xtr[:2],)
    rows = []
    base = fxprune.compile(model, example, passes=[])
    dense_macs = base.report.macs_before
    dense_acc = accuracy(model, xte, yte)
    rows.append({"model": label, "row": "dense", "acc": dense_acc, "macs": dense_macs,
                 "params": base.report.params_before, "train_s": round(time.time() - t0, 1)})
    print(json.dumps(rows[-1]), flush=True)
    ft_steps = math.ceil(len(xtr) / 128) * a.ft_epochs

    def finish(row, out, masks, t):
        row.update(mask_stats(out, masks))
        row["macs"] = macs_after(out, masks, dense_macs)
        row["seconds"] = round(time.time() - t, 1)
        row["drop_vs_dense"] = round(dense_acc - row["acc"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)

    # same budget without pruning
    t = time.time()
    cont = fxprune.compile(model, example, passes=[]).module
    train(cont, xtr, ytr, a.ft_epochs, a.ft_lr, seed + 1)
    rows.append({"model": label, "row": "dense+ft", "acc": accuracy(cont, xte, yte), "macs": dense_macs,
                 "seconds": round(time.time() - t, 1)})
    print(json.dumps(rows[-1]), flush=True)

    def one_shot(name, passes, data_for_pass=None):
        t = time.time()
        out = fxprune.compile(model, example, passes=passes, data=data_for_pass)
        masks = {k: v.clone() for k, v in out.program.weight_masks.items()}
        acc0 = accuracy(out.module, xte, yte)
        gm = enforce_masks(out.module, masks)
        train(gm, xtr, ytr, a.ft_epochs, a.ft_lr, seed + 1)
        bake(gm)
        held = all(bool((get_tensor(gm, k)[~m] == 0).all()) for k, m in masks.items())
        row = {"model": label, "row": name, "acc_before_ft": acc0, "acc": accuracy(gm, xte, yte),
               "masks_held": held}
        if out.report.passes and "macs_after" in out.report.passes[0]["stats"]:
            row["selection_macs_ratio"] = out.report.passes[0]["stats"]["macs_ratio"]
        if out.report.passes and "skipped" in out.report.passes[0]["stats"]:
            row["skipped"] = out.report.passes[0]["stats"]["skipped"]
        finish(row, out, masks, t)

    def pdp_row(name, pdp):
        t = time.time()
        out = fxprune.compile(model, example, passes=[pdp])
        train(out.module, xtr, ytr, a.ft_epochs, a.ft_lr, seed + 1, step_hook=pdp.step)
        targets_l = {k: round(v, 4) for k, v in pdp.layer_targets.items()}
        fin = pdp.finalize()
        masks = fin.program.weight_masks
        row = {"model": label, "row": name, "acc": accuracy(fin.module, xte, yte), "tau": pdp.tau,
               "ramp_steps": pdp.ramp, "schedule": pdp.schedule, "allocation": pdp.allocation,
               "layer_targets": targets_l, "skipped": out.report.passes[0]["stats"]["skipped"]}
        finish(row, fin, masks, t)

    def gmp_row(name, structure, ramp):
        """Gradual magnitude pruning: the same per-layer targets and ramp as PDP, hard masks every step."""
        t = time.time()
        out = fxprune.compile(model, example, passes=[])
        gm = out.module
        infos = sparsifiable_targets(out.program, [])
        if structure == "nm":
            infos = {k: i for k, i in infos.items() if i.kind != "conv_transpose"
                     and i.reduction_size >= 4 and i.reduction_size % 4 == 0}
        ratios = global_allocation({k: get_tensor(gm, k).detach().abs() for k in infos}, 0.9) \
            if structure != "nm" else {}
        state = {"step": 0}

        def hook():
            state["step"] += 1
            frac = ramp_fraction(state["step"], 0, ramp, "linear")
            with torch.no_grad():
                for k, mk in gmp_masks(gm, infos, structure, ratios, frac).items():
                    get_tensor(gm, k).mul_(mk.to(get_tensor(gm, k).dtype))

        train(gm, xtr, ytr, a.ft_epochs, a.ft_lr, seed + 1, step_hook=hook)
        masks = gmp_masks(gm, infos, structure, ratios, 1.0)
        with torch.no_grad():
            for k, mk in masks.items():
                get_tensor(gm, k).mul_(mk.to(get_tensor(gm, k).dtype))
        row = {"model": label, "row": name, "acc": accuracy(gm, xte, yte), "ramp_steps": ramp,
               "schedule": "linear"}
        if ratios:
            row["layer_targets"] = {k: round(v, 4) for k, v in ratios.items()}
        finish(row, out, masks, t)

    one_shot("magnitude_90", [Unstructured(0.9, scope="global")])
    gmp_row("gmp_90", "unstructured", ft_steps // 2)
    pdp_row("pdp_90", PDP(0.9, ramp=ft_steps // 2, tau=a.tau))
    one_shot("magnitude_2:4", [NMSparsity(2, 4)])
    gmp_row("gmp_2:4", "nm", ft_steps // 2)
    pdp_row("pdp_2:4", PDP(structure="nm", ramp=ft_steps // 2, tau=a.tau))
    calib = fxprune.data.loader(xtr[:256], ytr[:256], batch_size=64, shuffle=False)
    blk = dict(block=16) if label == "vit" else dict(block=8, include_conv=True)
    one_shot("lpvit_50macs", [BlockSparsity(target_macs=0.5, calib_batches=4, fisher_batch=4, **blk)],
             data_for_pass=calib)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=20000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--tau", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["cnn", "vit"])
    ap.add_argument("--out", default=str(RESULTS / "sparsity_accuracy.json"))
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    xtr, ytr = fxprune.data.fashion_mnist("train", limit=a.train_limit)
    xte, yte = fxprune.data.fashion_mnist("test")
    builders = {"cnn": SmallCNN, "vit": GreyViT}
    rows = []
    for seed in a.seeds:
        for name in a.models:
            for r in run_model(name, builders[name], (xtr, ytr, xte, yte), a, seed):
                r["seed"] = seed
                rows.append(r)

    def ms(vals):
        vals = [float(v) for v in vals]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return {"mean": round(statistics.mean(vals), 4), "sd": round(sd, 4), "n": len(vals)}

    summary = {}
    for name in a.models:
        by = {}
        for x in rows:
            if x["model"] == name:
                by.setdefault(x["row"], {})[x["seed"]] = x
        acc = {row: ms([v["acc"] for v in d.values()]) for row, d in by.items()}

        def diff(r1, r2):
            return ms([100 * (by[r1][sd]["acc"] - by[r2][sd]["acc"]) for sd in a.seeds])

        summary[name] = {
            "accuracy": acc,
            "pdp_90_minus_gmp_90_points": diff("pdp_90", "gmp_90"),
            "pdp_90_minus_magnitude_90_points": diff("pdp_90", "magnitude_90"),
            "gmp_90_minus_magnitude_90_points": diff("gmp_90", "magnitude_90"),
            "pdp_2:4_minus_gmp_2:4_points": diff("pdp_2:4", "gmp_2:4"),
            "pdp_2:4_minus_magnitude_2:4_points": diff("pdp_2:4", "magnitude_2:4"),
            "lpvit_50macs_minus_dense_ft_points": diff("lpvit_50macs", "dense+ft"),
            "pdp_beats_gmp_90_in_seeds": sum(by["pdp_90"][sd]["acc"] > by["gmp_90"][sd]["acc"] for sd in a.seeds),
            "pdp_beats_gmp_2:4_in_seeds": sum(by["pdp_2:4"][sd]["acc"] > by["gmp_2:4"][sd]["acc"]
                                              for sd in a.seeds),
        }
    result = {"benchmark": "sparsity_accuracy", "dataset": "Fashion-MNIST", "torch": torch.__version__,
              "threads": a.threads, "cpu": platform.processor() or platform.machine(), "args": vars(a),
              "seconds": round(time.time() - t0, 1), "rows": rows, "summary": summary,
              "note": "seeds: the whole pipeline per seed (dense training included); mean +- sample sd; speed: "
                      "none of these rows is faster on CPU (see docs/sparsity.md)"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {a.out} in {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
