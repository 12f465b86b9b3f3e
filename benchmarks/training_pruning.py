"""Training-time channel pruning on Fashion-MNIST, one run, the same epoch budget for every row.

Rows (a ~100k-parameter CNN, ``examples/fashion_mnist_pipeline.py``; budget = ``--epochs`` of training then
``--ft-epochs`` of fine-tuning, or ``epochs + ft_epochs`` of plain training for the dense row):

* dense
* magnitude pruning (L2, 50% of the channels of every layer) + plain fine-tune      (the baseline to beat)
* BN-scale pruning (50% per layer), no sparse training, + plain fine-tune
* sparse training -> BN-scale pruning (50% per layer) -> plain fine-tune / SAD / CWD
* YOLOv4 recipe: dynamic sparse training (variable rate) -> group channel pruning (auto partitions) -> SAD

``--macs-removed F`` prunes to a MACs budget instead of a per-layer channel ratio: the magnitude and BN-scale rows
select channels with ``ChannelPrune(target_macs=1 - F, importance="l2" / "bn_scale", scope=--scope)`` (the same
scope for both, global by default: one threshold over the per-group-mean-normalised scores, at most 90% of a group
removed), and the YOLOv4 row scales its per-partition quantiles (0.4 / 0.5 / 0.6) by the smallest common factor
that removes F of the MACs. Every pruned row removes at least F of the MACs as counted by the compile report.

Accuracy on the full 10k test split, MACs from the compile report. JSON in
``benchmarks/results/training_pruning.json`` (``training_pruning_macs<100F>.json`` with ``--macs-removed``).

    .venv/bin/python benchmarks/training_pruning.py                      # ~13 min on one busy core
    .venv/bin/python benchmarks/training_pruning.py --macs-removed 0.5   # 50% of the MACs instead of the channels
    .venv/bin/python benchmarks/training_pruning.py --train-limit 10000  # quicker, less accurate
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import fashion_mnist_pipeline as fm  # noqa: E402

import fxprune  # noqa: E402
from fxprune.passes import ChannelPrune, Shrink  # noqa: E402
from fxprune.passes.bn_absorb import AbsorbBNShift  # noqa: E402
from fxprune.passes.bn_prune import GroupChannelPrune  # noqa: E402
from fxprune.train import accuracy  # noqa: E402

YOLOV4_QUANTILES = {"s1/*": 0.4, "s2/*": 0.5, "s4/*": 0.6}


def removed_fraction(out) -> float:
    return 1 - out.report.macs_after / out.report.macs_before


def prune_to_macs(model, example, method: str, macs_removed: float, scope: str, seed: int):
    """ChannelPrune to a MACs budget (l2 for "magnitude", BN |gamma| + AbsorbBNShift for "bn_scale").

    ChannelPrune meets ``target_macs`` on its analytic MACs model; should the compile report count slightly more,
    the target is lowered in 0.25% steps until the report shows at least ``macs_removed`` removed."""
    target = 1.0 - macs_removed
    for _ in range(40):
        if method == "magnitude":
            passes = [ChannelPrune(target_macs=target, importance="l2", scope=scope), Shrink()]
        elif method == "bn_scale":
            passes = [ChannelPrune(target_macs=target, importance="bn_scale", scope=scope), AbsorbBNShift(), Shrink()]
        else:
            raise ValueError(method)
        out = fxprune.compile(model, (example,), passes=passes, seed=seed)
        if removed_fraction(out) >= macs_removed - 1e-12:
            return out, target
        target -= 0.0025
    raise RuntimeError(f"{method}: could not reach {macs_removed:.0%} MACs removed")


def group_prune_to_macs(model, example, macs_removed: float, seed: int):
    """The YOLOv4 row's GroupChannelPrune with its quantiles scaled by the smallest factor k (bisection) that
    removes at least ``macs_removed`` of the MACs (the report's count)."""
    def at(k: float):
        q = {p: min(0.999, v * k) for p, v in YOLOV4_QUANTILES.items()}
        return fxprune.compile(model, (example,), seed=seed, passes=[
            GroupChannelPrune("auto", q, min_channels=4), AbsorbBNShift(), Shrink()]), q

    lo, hi = 0.0, 0.999 / max(YOLOV4_QUANTILES.values())
    best = at(hi)
    if removed_fraction(best[0]) < macs_removed:
        return best  # cannot reach it: the caller reports the achieved fraction
    for _ in range(14):
        mid = (lo + hi) / 2
        cand = at(mid)
        if removed_fraction(cand[0]) >= macs_removed:
            hi, best = mid, cand
        else:
            lo = mid
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-limit", type=int, default=None, help="training images (default: all 60000)")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs before pruning")
    ap.add_argument("--ft-epochs", type=int, default=1, help="fine-tuning epochs after pruning")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed per layer")
    ap.add_argument("--macs-removed", type=float, default=None,
                    help="prune to this fraction of the dense MACs removed instead of --ratio per layer (e.g. 0.5)")
    ap.add_argument("--scope", choices=("global", "local"), default="global",
                    help="with --macs-removed: ChannelPrune scope of the magnitude and BN-scale rows (same for both)")
    ap.add_argument("--s", type=float, default=3e-2, help="sparsity rate (L1 on BN gammas)")
    ap.add_argument("--opt", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--lr", type=float, default=2e-3, help="training learning rate")
    ap.add_argument("--ft-lr", type=float, default=1e-3, help="fine-tuning learning rate")
    ap.add_argument("--sad-beta", type=float, default=100.0)
    ap.add_argument("--cwd-weight", type=float, default=1.0)
    ap.add_argument("--tau", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/training_pruning.json, or "
                    "training_pruning_macs<100F>.json with --macs-removed)")
    a = ap.parse_args(argv)
    if a.macs_removed is not None and not 0 < a.macs_removed < 1:
        ap.error("--macs-removed must be in (0, 1)")
    if a.out is None:
        stem = "training_pruning" if a.macs_removed is None else f"training_pruning_macs{round(100 * a.macs_removed)}"
        a.out = str(ROOT / "benchmarks" / "results" / f"{stem}.json")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    train, test = fm.data(a.train_limit, None, seed=a.seed)
    example = next(iter(test))[0][:2]
    rows: list[dict] = []
    budget = a.epochs + a.ft_epochs

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    def prune(model, method: str):
        """Per-layer channel ratio (the default), or a MACs budget with --macs-removed."""
        if a.macs_removed is None:
            return fm.prune(model, example, method, a.ratio, a.seed), {}
        out, target = prune_to_macs(model, example, method, a.macs_removed, a.scope, a.seed)
        stats = next(h["stats"] for h in out.report.passes if h["pass"] == "channel_prune")
        return out, {"selection": {"pass": "ChannelPrune", "importance": "l2" if method == "magnitude" else
                                   "bn_scale", "scope": a.scope, "target_macs": round(target, 4),
                                   "ratio": stats["ratio"], "channels_removed": stats["channels_removed"]}}

    def row(name: str, module, report=None, **extra) -> None:
        acc = accuracy(module, test)
        r = {"name": name, "accuracy": round(100 * acc, 2),
             "macs": report.macs_after if report is not None else dense_macs,
             "params": report.params_after if report is not None else dense_params, **extra}
        r["macs_per_image"] = r["macs"] // example.shape[0]  # the report counts the 2-image example batch
        r["macs_removed_pct"] = round(100 * (1 - r["macs"] / dense_macs), 1)
        r["macs_removed_exact_pct"] = round(100 * (1 - r["macs"] / dense_macs), 3)
        r["conv_out_channels"] = {n.removesuffix(".weight"): p.shape[0] for n, p in module.named_parameters()
                                  if p.dim() == 4}
        rows.append(r)
        log(f"{name}: acc {r['accuracy']:.2f}%  MACs {r['macs']:,} (-{r['macs_removed_pct']}%)")

    # plain training (shared by the dense row and the no-sparse-training rows)
    torch.manual_seed(a.seed)
    init = fm.SmallCNN()
    plain = copy.deepcopy(init)
    fm.train_model(plain, train, a.epochs, seed=a.seed, opt=a.opt, lr=a.lr)
    ref, sel = prune(plain, "magnitude")
    dense_macs, dense_params = ref.report.macs_before, ref.report.params_before
    dense = copy.deepcopy(plain)
    fm.fit(dense, train, fm.ce, epochs=a.ft_epochs, optimizer=fm.optimizer(dense.parameters(), a.opt, a.ft_lr),
           seed=a.seed)  # the same budget: + ft epochs
    row("dense", dense, epochs=budget)

    out = ref
    acc0 = accuracy(out.module, test)
    fm.finetune(plain, out.module, train, a.ft_epochs, seed=a.seed, opt=a.opt, lr=a.ft_lr)
    row("magnitude L2 prune + fine-tune", out.module, out.report, acc_before_ft=round(100 * acc0, 2),
        epochs=budget, **sel)

    out, sel = prune(plain, "bn_scale")
    acc0 = accuracy(out.module, test)
    fm.finetune(plain, out.module, train, a.ft_epochs, seed=a.seed, opt=a.opt, lr=a.ft_lr)
    row("BN-scale prune (no sparse training) + fine-tune", out.module, out.report,
        acc_before_ft=round(100 * acc0, 2), epochs=budget, **sel)

    # sparse training (YOLOv8 schedule), then three fine-tunes of the same pruned model
    sparse = copy.deepcopy(init)
    view = fm.graph_view(sparse, example)
    hist = fm.train_model(sparse, train, a.epochs, sparse="decay", s=a.s, seed=a.seed, view=view, opt=a.opt,
                          lr=a.lr)
    acc_sparse = accuracy(sparse, test)
    log(f"sparse-trained (unpruned): acc {100 * acc_sparse:.2f}%, gammas {hist['gammas']}")
    out, sel = prune(sparse, "bn_scale")
    absorb = next(h["stats"] for h in out.report.passes if h["pass"] == "absorb_bn_shift")
    acc0 = accuracy(out.module, test)
    for distill in (None, "sad", "cwd"):
        student = copy.deepcopy(out.module)
        fm.finetune(view, student, train, a.ft_epochs, distill=distill, seed=a.seed, tau=a.tau,
                    cwd_weight=a.cwd_weight, sad_beta=a.sad_beta, opt=a.opt, lr=a.ft_lr)
        label = {None: "plain fine-tune", "sad": "SAD fine-tune", "cwd": "CWD fine-tune"}[distill]
        row(f"sparse training + BN-scale prune + {label}", student, out.report, acc_before_ft=round(100 * acc0, 2),
            teacher_accuracy=round(100 * acc_sparse, 2), epochs=budget,
            absorb={"max_change": absorb.get("max_change"), "max_change_without": absorb.get("max_change_without"),
                    "max_removed_gamma": absorb["max_removed_gamma"]}, **sel)

    # the YOLOv4 recipe end to end
    sparse4 = copy.deepcopy(init)
    view4 = fm.graph_view(sparse4, example)
    fm.train_model(sparse4, train, a.epochs, sparse="variable", s=a.s, seed=a.seed, view=view4, opt=a.opt,
                   lr=a.lr)
    acc_sparse4 = accuracy(sparse4, test)
    if a.macs_removed is None:
        quantiles = YOLOV4_QUANTILES
        out = fm.prune(sparse4, example, "group", seed=a.seed, quantiles=quantiles)
    else:
        out, quantiles = group_prune_to_macs(sparse4, example, a.macs_removed, a.seed)
    parts = next(h["stats"]["partitions"] for h in out.report.passes if h["pass"] == "group_channel_prune")
    acc0 = accuracy(out.module, test)
    fm.finetune(view4, out.module, train, a.ft_epochs, distill="sad", seed=a.seed, sad_beta=a.sad_beta,
                opt=a.opt, lr=a.ft_lr)
    row("dynamic sparse training + group channel prune + SAD (YOLOv4 recipe)", out.module, out.report,
        acc_before_ft=round(100 * acc0, 2), teacher_accuracy=round(100 * acc_sparse4, 2), epochs=budget,
        quantiles={k: round(v, 4) for k, v in quantiles.items()},
        partitions={k: {"quantile": v["quantile"], "ratio": round(v["ratio"], 3), "groups": len(v["groups"])}
                    for k, v in parts.items()})

    dense_acc = rows[0]["accuracy"]
    mag = rows[1]["accuracy"]
    best = max(rows[4:6], key=lambda r: r["accuracy"])
    goals = {
        "sparse+distillation within 1 point of dense": {
            "SAD": round(dense_acc - rows[4]["accuracy"], 2) <= 1.0, "CWD": round(dense_acc - rows[5]["accuracy"], 2)
            <= 1.0, "gap_SAD": round(dense_acc - rows[4]["accuracy"], 2),
            "gap_CWD": round(dense_acc - rows[5]["accuracy"], 2)},
        ">= 50% MACs removed": all(r["macs"] <= 0.5 * dense_macs for r in rows[3:6]),
        "beats magnitude + fine-tune": {"SAD": rows[4]["accuracy"] > mag, "CWD": rows[5]["accuracy"] > mag},
        "best_distilled": best["name"],
    }
    result = {
        "benchmark": "training_pruning", "dataset": "Fashion-MNIST", "train_images": len(train.dataset),
        "test_images": len(test.dataset), "model": "SmallCNN (examples/fashion_mnist_pipeline.py)",
        "dense_params": dense_params, "dense_macs": dense_macs,
        "settings": {"epochs": a.epochs, "ft_epochs": a.ft_epochs,
                     **({"ratio": a.ratio} if a.macs_removed is None else
                        {"macs_removed": a.macs_removed, "scope": a.scope}), "s": a.s,
                     "sad_beta": a.sad_beta, "cwd_weight": a.cwd_weight, "tau": a.tau, "seed": a.seed,
                     "optimizer": f"{a.opt} lr {a.lr} (training), {a.ft_lr} (fine-tune), batch 128",
                     "taps": fm.TAPS},
        "rows": rows, "goals": goals,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                    "cpu": platform.processor() or platform.machine()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {a.out}")
    return result


def table(result: dict) -> str:
    lines = [f"| pipeline ({result['settings']['epochs']}+{result['settings']['ft_epochs']} epochs) | top-1 % | "
             f"before FT % | MACs / image | MACs removed |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['accuracy']:.2f} | {r.get('acc_before_ft', '')} | {r['macs_per_image']:,} | "
                     f"{r['macs_removed_pct']}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
