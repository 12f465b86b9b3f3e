"""Training-time channel pruning on Fashion-MNIST at equal MACs, SGD at the papers' sparsity rates, several seeds.

The recipe under test (YOLOv8 pipeline, arXiv 2509.12918; network slimming, arXiv 1708.06519): sparsity training
with an L1 penalty on the BatchNorm gammas (``SparsityRegularizer``: ``s * sign(gamma)`` added to the gamma's
gradient, as the authors' ``updateBN``), BN-scale channel pruning (``BNScalePrune(scope="global")``: one |gamma|
threshold, network slimming), then fine-tuning with channel-wise distillation (``ChannelWiseLoss``) from the
**dense** model (trained without sparsity, the papers' teacher). Rows, per seed, all from the same initialisation
and data order, every pruned row at >= ``--macs-removed`` of the dense MACs (the compile report's count):

* ``dense``: ``--epochs`` of plain training + ``--ft-epochs`` more at the fine-tuning rate (the same budget).
  The model after ``--epochs`` is the teacher of every distilled row.
* ``l1``: L1-norm filter pruning of the dense model (``ChannelPrune(target_macs, importance="l1")``) + plain
  fine-tune (the baseline to beat).
* ``l1+cwd``: the same pruned model, fine-tuned with the same CWD from the same teacher (separates the effect of
  distillation from that of sparsity training).
* ``bn_dense+cwd``: BN-scale pruning of the dense model (no sparsity training) + CWD.
* ``sparse+bn``: sparsity training (``--schedule``, rate ``--s``) -> BN-scale pruning -> plain fine-tune.
* ``sparse+bn+cwd``: the recipe.
* ``yolov4``: dynamic sparse training (``schedule="variable"``) -> ``GroupChannelPrune("auto")`` with per-stride
  quantiles scaled to the MACs budget -> spatial attention distillation (``SpatialAttentionLoss``) from the dense
  teacher.

Optimiser everywhere: SGD, momentum 0.9, weight decay ``--wd``, cosine learning rate per step (``--lr`` for
training, ``--ft-lr`` for fine-tuning), batch 64. With SGD the added ``s * sign(gamma)`` is an L1 (sub)gradient
step: a gamma the task does not hold up moves towards 0 by ``lr * s / (1 - momentum)`` per step.

Accuracy on the full 10k test split; mean and sample standard deviation over the seeds. JSON:
``benchmarks/results/training_pruning.json``.

    .venv/bin/python benchmarks/training_pruning.py                        # the recorded run (~15 min, 2 threads)
    # 30 epochs of (sparsity) training, a few rows; seeds in two runs merged (~8 min per seed):
    .venv/bin/python benchmarks/training_pruning.py --epochs 30 --seeds 0 --rows dense l1 sparse+bn sparse+bn+cwd \
        --out a.json   # then the same with --seeds 1 2 --out b.json, and
    .venv/bin/python benchmarks/training_pruning.py --merge a.json b.json \
        --out benchmarks/results/training_pruning_long.json
    .venv/bin/python benchmarks/training_pruning.py --train-limit 2000 --epochs 1 --ft-epochs 1 --seeds 0  # smoke
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import fashion_mnist_pipeline as fm  # noqa: E402

import fxprune  # noqa: E402
from fxprune.distill import ChannelWiseLoss, SpatialAttentionLoss  # noqa: E402
from fxprune.passes import ChannelPrune, Shrink  # noqa: E402
from fxprune.passes.bn_absorb import AbsorbBNShift  # noqa: E402
from fxprune.passes.bn_prune import BNScalePrune, GroupChannelPrune  # noqa: E402
from fxprune.train import SparsityRegularizer, accuracy, fit  # noqa: E402

YOLOV4_QUANTILES = {"s1/*": 0.4, "s2/*": 0.5, "s4/*": 0.6}
ROWS = {
    "dense": "dense (teacher + the same extra epochs)",
    "l1": "L1-norm prune (dense) + fine-tune",
    "l1+cwd": "L1-norm prune (dense) + CWD fine-tune",
    "bn_dense+cwd": "BN-scale prune (dense, no sparsity training) + CWD fine-tune",
    "sparse+bn": "sparsity training + BN-scale prune + fine-tune",
    "sparse+bn+cwd": "sparsity training + BN-scale prune + CWD fine-tune (YOLOv8 recipe)",
    "yolov4": "dynamic sparsity training + group channel prune + SAD (YOLOv4 recipe)",
}


def removed_fraction(out) -> float:
    return 1 - out.report.macs_after / out.report.macs_before


def sgd(params, lr: float, wd: float, steps: int):
    opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=0.9, weight_decay=wd)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))


def l1_prune(model, example, macs_removed: float, scope: str, seed: int):
    """ChannelPrune(importance="l1") to a MACs budget; the target is lowered in 0.25% steps should the compile
    report count fewer MACs removed than asked."""
    target = 1.0 - macs_removed
    for _ in range(40):
        out = fxprune.compile(model, (example,), seed=seed,
                              passes=[ChannelPrune(target_macs=target, importance="l1", scope=scope), Shrink()])
        if removed_fraction(out) >= macs_removed - 1e-12:
            return out, {"pass": "ChannelPrune", "importance": "l1", "scope": scope, "target_macs": round(target, 4)}
        target -= 0.0025
    raise RuntimeError(f"l1: could not reach {macs_removed:.0%} MACs removed")


def bisect(build, hi: float, macs_removed: float, iters: int = 11):
    """Smallest knob k in [0, hi] (bisection) whose compile removes >= macs_removed of the MACs."""
    lo, best = 0.0, None
    cand = build(hi)
    if removed_fraction(cand[0]) < macs_removed:
        raise RuntimeError(f"cannot remove {macs_removed:.0%} of the MACs (at most {removed_fraction(cand[0]):.1%})")
    best = cand
    for _ in range(iters):
        mid = (lo + hi) / 2
        cand = build(mid)
        if removed_fraction(cand[0]) >= macs_removed:
            hi, best = mid, cand
        else:
            lo = mid
    return best


def bn_prune(model, example, macs_removed: float, seed: int):
    """BNScalePrune(ratio, scope="global") with the smallest channel ratio that removes the MACs budget."""
    def build(r):
        out = fxprune.compile(model, (example,), seed=seed,
                              passes=[BNScalePrune(r, scope="global"), AbsorbBNShift(), Shrink()])
        return out, {"pass": "BNScalePrune", "scope": "global", "ratio": round(r, 4)}
    return bisect(build, 0.95, macs_removed)


def group_prune(model, example, macs_removed: float, seed: int):
    """GroupChannelPrune("auto") with YOLOV4_QUANTILES scaled by the smallest common factor reaching the budget."""
    def build(k):
        q = {p: min(0.999, v * k) for p, v in YOLOV4_QUANTILES.items()}
        out = fxprune.compile(model, (example,), seed=seed,
                              passes=[GroupChannelPrune("auto", q, min_channels=2), AbsorbBNShift(), Shrink()])
        return out, {"pass": "GroupChannelPrune", "quantiles": {p: round(v, 4) for p, v in q.items()}}
    return bisect(build, 0.999 / max(YOLOV4_QUANTILES.values()), macs_removed)


def gamma_stats(model, example) -> dict:
    """|gamma| statistics of the prunable BNs (the regularized positions) and a log10 histogram."""
    reg = SparsityRegularizer(fm.graph_view(model, example), module=model, s=0.0, mode="loss")
    g = reg.gammas().numpy()
    edges = [0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, math.inf]
    hist = np.histogram(g, bins=edges)[0]
    return {"channels": int(g.size), "frac_below_1e-2": round(float((g < 1e-2).mean()), 4),
            "frac_below_1e-3": round(float((g < 1e-3).mean()), 4),
            "quantiles": {str(q): round(float(np.quantile(g, q)), 5) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
            "max": round(float(g.max()), 4),
            "histogram": {f"[{lo:g}, {hi:g})": int(c) for lo, hi, c in zip(edges[:-1], edges[1:], hist)}}


def removed_gammas(model, out) -> dict:
    """Largest |gamma| removed and smallest kept, over every BN channel of the pruned groups (raw, per BN)."""
    sel = next(h["stats"] for h in out.report.passes if h["pass"] == "absorb_bn_shift")
    kept = {n: p.shape[0] for n, p in out.module.named_parameters() if n.endswith(".weight") and p.dim() == 1}
    removed_max = sel.get("max_removed_gamma")
    return {"max_removed_gamma": None if removed_max is None else round(float(removed_max), 5),
            "absorb_max_change": sel.get("max_change"), "absorb_max_change_without": sel.get("max_change_without"),
            "bn_widths": kept}


def _ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"mean": round(statistics.mean(vals), 3),
            "sd": round(statistics.stdev(vals), 3) if len(vals) > 1 else None, "n": len(vals)}


def summarize(per_seed: list[dict]) -> tuple[dict, dict, dict]:
    """Mean and sample sd over seeds of every row, of the gamma fractions, and paired differences of the recipe."""
    summary = {}
    for key in ROWS:
        rs = [s["rows"][key] for s in per_seed if key in s["rows"]]
        if not rs:
            continue
        summary[key] = {"name": ROWS[key], "accuracy": _ms([r["accuracy"] for r in rs]),
                        "acc_before_ft": _ms([r.get("acc_before_ft") for r in rs]),
                        "macs_removed_pct": _ms([r.get("macs_removed_pct") for r in rs]),
                        "max_removed_gamma": _ms([r.get("max_removed_gamma") for r in rs])}
    gsum = {k: {"frac_below_1e-2": _ms([s["gammas"][k]["frac_below_1e-2"] for s in per_seed if k in s["gammas"]])}
            for k in ("dense", "sparse", "sparse_variable")}
    diffs = {}
    if "sparse+bn+cwd" in summary:
        for base in ("l1", "l1+cwd", "bn_dense+cwd", "sparse+bn", "dense"):
            if base in summary:
                d = [s["rows"]["sparse+bn+cwd"]["accuracy"] - s["rows"][base]["accuracy"] for s in per_seed]
                diffs[f"sparse+bn+cwd - {base}"] = _ms(d)
    if "sparse+bn" in summary and "l1" in summary:
        diffs["sparse+bn - l1"] = _ms([s["rows"]["sparse+bn"]["accuracy"] - s["rows"]["l1"]["accuracy"]
                                       for s in per_seed])
    return summary, gsum, diffs


def merge(paths: list[str], out: str) -> dict:
    """One JSON from runs of the same settings on different seeds (``--merge a.json b.json --out c.json``)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keep = ("seeds", "threads")
    base = {k: v for k, v in runs[0]["settings"].items() if k not in keep}
    for r, p in zip(runs[1:], paths[1:]):
        if {k: v for k, v in r["settings"].items() if k not in keep} != base:
            raise SystemExit(f"{p}: different settings, not merged")
    result = dict(runs[0])
    result["per_seed"] = sorted((s for r in runs for s in r["per_seed"]), key=lambda s: s["seed"])
    result["settings"] = dict(runs[0]["settings"], seeds=[s["seed"] for s in result["per_seed"]])
    result["summary"], result["gamma_summary"], result["paired_differences"] = summarize(result["per_seed"])
    result["seconds"] = [r["seconds"] for r in runs]
    result["merged_from"] = [Path(p).name for p in paths]
    Path(out).write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-limit", type=int, default=20000, help="training images (of 60000)")
    ap.add_argument("--epochs", type=int, default=8, help="(sparsity) training epochs before pruning")
    ap.add_argument("--ft-epochs", type=int, default=2, help="fine-tuning epochs after pruning")
    ap.add_argument("--macs-removed", type=float, default=0.5, help="fraction of the dense MACs every pruned row "
                                                                     "removes (at least)")
    ap.add_argument("--scope", choices=("global", "local"), default="global", help="ChannelPrune scope of the L1 rows")
    ap.add_argument("--s", type=float, default=1e-3, help="sparsity rate (L1 on BN gammas)")
    ap.add_argument("--schedule", default="constant", help="SparsityRegularizer schedule of the sparse rows")
    ap.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (cosine to 0) for training")
    ap.add_argument("--ft-lr", type=float, default=0.01, help="SGD learning rate (cosine to 0) for fine-tuning")
    ap.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cwd-weight", type=float, default=3.0)
    ap.add_argument("--tau", type=float, default=4.0)
    ap.add_argument("--sad-beta", type=float, default=100.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training_pruning.json"))
    ap.add_argument("--merge", nargs="+", default=None, help="merge these result JSONs (same settings, other seeds) "
                    "into --out instead of running")
    a = ap.parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    per_seed = []
    for seed in a.seeds:
        train, test = fm.data(a.train_limit, None, batch=a.batch, seed=seed)
        example = next(iter(test))[0][:2]
        steps, ft_steps = a.epochs * len(train), a.ft_epochs * len(train)
        rows: dict[str, dict] = {}
        gammas: dict[str, dict] = {}

        def train_from(init, reg_schedule=None, trajectory=None):
            model = copy.deepcopy(init)
            reg = None
            if reg_schedule is not None:
                reg = SparsityRegularizer(fm.graph_view(model, example), module=model, s=a.s, schedule=reg_schedule,
                                          epochs=a.epochs)

            def per_epoch(msg):  # fit logs once per epoch: record the gamma distribution
                if reg is not None and trajectory is not None:
                    g = reg.gammas()
                    trajectory.append({"frac_below_1e-2": round(float((g < 1e-2).float().mean()), 4),
                                       "median": round(float(g.median()), 4),
                                       "q10": round(float(torch.quantile(g, 0.1)), 4)})
            opt, sch = sgd(model.parameters(), a.lr, a.wd, steps)
            fit(model, train, fm.ce, epochs=a.epochs, optimizer=opt, scheduler=sch, regularizer=reg, seed=seed,
                log=per_epoch)
            if reg is not None:
                reg.detach()
            return model

        def finetune(student, distill=None):
            d = None
            if distill == "cwd":
                d = ChannelWiseLoss(teacher, student, taps=fm.TAPS, tau=a.tau, weight=a.cwd_weight, seed=seed)
            elif distill == "sad":
                d = SpatialAttentionLoss(teacher, student, taps=fm.TAPS, betas=a.sad_beta)
            params = list(student.parameters()) + (list(d.parameters()) if d is not None else [])
            opt, sch = sgd(params, a.ft_lr, a.wd, ft_steps)
            fit(student, train, fm.ce, epochs=a.ft_epochs, optimizer=opt, scheduler=sch, distiller=d, seed=seed)
            return student

        def row(key, module, out=None, **extra):
            acc = round(100 * accuracy(module, test), 2)
            r = {"accuracy": acc, **extra}
            if out is not None:
                r["macs_removed_pct"] = round(100 * removed_fraction(out), 2)
                r["macs_per_image"] = out.report.macs_after // example.shape[0]
                r["params"] = out.report.params_after
            rows[key] = r
            log(f"seed {seed} {key}: {acc:.2f}%" + (f" (-{r['macs_removed_pct']}% MACs, before fine-tune "
                                                     f"{extra.get('acc_before_ft')}%)" if out is not None else ""))

        torch.manual_seed(seed)
        init = fm.SmallCNN()
        dense = train_from(init)
        teacher_acc = round(100 * accuracy(dense, test), 2)
        teacher = fm.graph_view(dense, example)  # frozen from here on: the teacher of every distilled row
        gammas["dense"] = gamma_stats(dense, example)
        log(f"seed {seed} dense teacher ({a.epochs} epochs): {teacher_acc}%, gammas < 1e-2: "
            f"{gammas['dense']['frac_below_1e-2']}")
        if "dense" in a.rows:
            extra = finetune(copy.deepcopy(dense))
            row("dense", extra, teacher_accuracy=teacher_acc)
            rows["dense"]["macs_per_image"] = None
        if "l1" in a.rows or "l1+cwd" in a.rows:
            out, sel = l1_prune(dense, example, a.macs_removed, a.scope, seed)
            acc0 = round(100 * accuracy(out.module, test), 2)
            for key, dist in (("l1", None), ("l1+cwd", "cwd")):
                if key in a.rows:
                    row(key, finetune(copy.deepcopy(out.module), dist), out, acc_before_ft=acc0, selection=sel)
        if "bn_dense+cwd" in a.rows:
            out, sel = bn_prune(dense, example, a.macs_removed, seed)
            acc0 = round(100 * accuracy(out.module, test), 2)
            row("bn_dense+cwd", finetune(copy.deepcopy(out.module), "cwd"), out, acc_before_ft=acc0, selection=sel,
                **removed_gammas(dense, out))
        if "sparse+bn" in a.rows or "sparse+bn+cwd" in a.rows:
            traj: list = []
            sparse = train_from(init, a.schedule, traj)
            sparse_acc = round(100 * accuracy(sparse, test), 2)
            gammas["sparse"] = gamma_stats(sparse, example)
            gammas["sparse"]["per_epoch"] = traj
            log(f"seed {seed} sparse-trained: {sparse_acc}%, gammas {gammas['sparse']}")
            out, sel = bn_prune(sparse, example, a.macs_removed, seed)
            acc0 = round(100 * accuracy(out.module, test), 2)
            rg = removed_gammas(sparse, out)
            log(f"seed {seed} BN-scale prune of the sparse model: {sel}, before fine-tune {acc0}%, {rg}")
            for key, dist in (("sparse+bn", None), ("sparse+bn+cwd", "cwd")):
                if key in a.rows:
                    row(key, finetune(copy.deepcopy(out.module), dist), out, acc_before_ft=acc0, selection=sel,
                        sparse_accuracy=sparse_acc, **rg)
        if "yolov4" in a.rows:
            sparse4 = train_from(init, "variable")
            sparse4_acc = round(100 * accuracy(sparse4, test), 2)
            gammas["sparse_variable"] = gamma_stats(sparse4, example)
            log(f"seed {seed} variable-rate sparse-trained: {sparse4_acc}%, gammas < 1e-2: "
                f"{gammas['sparse_variable']['frac_below_1e-2']}")
            out, sel = group_prune(sparse4, example, a.macs_removed, seed)
            acc0 = round(100 * accuracy(out.module, test), 2)
            row("yolov4", finetune(copy.deepcopy(out.module), "sad"), out, acc_before_ft=acc0, selection=sel,
                sparse_accuracy=sparse4_acc, **removed_gammas(sparse4, out))
        per_seed.append({"seed": seed, "teacher_accuracy": teacher_acc, "gammas": gammas, "rows": rows})
        log(f"seed {seed} done")

    summary, gsum, diffs = summarize(per_seed)
    result = {
        "benchmark": "training_pruning", "dataset": "Fashion-MNIST",
        "train_images": a.train_limit, "test_images": 10000, "model": "SmallCNN (examples/fashion_mnist_pipeline.py)",
        "settings": {k: v for k, v in vars(a).items() if k not in ("out",)},
        "optimizer": f"SGD momentum 0.9, weight decay {a.wd}, cosine lr per step from {a.lr} (training) / "
                     f"{a.ft_lr} (fine-tune), batch {a.batch}", "taps": fm.TAPS,
        "summary": summary, "gamma_summary": gsum, "paired_differences": diffs, "per_seed": per_seed,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": a.threads,
                    "cpu": platform.processor() or platform.machine()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    print(f"wrote {a.out}")
    return result


def table(result: dict) -> str:
    def f(m):
        if m is None:
            return ""
        return f"{m['mean']:.2f}" + (f" ± {m['sd']:.2f}" if m.get("sd") is not None else "")

    st = result["settings"]
    lines = [f"| pipeline ({st['epochs']}+{st['ft_epochs']} epochs, {len(st['seeds'])} seeds) | top-1 % | "
             "before FT % | MACs removed % | largest removed gamma |", "|---|---:|---:|---:|---:|"]
    for key, s in result["summary"].items():
        lines.append(f"| {s['name']} | {f(s['accuracy'])} | {f(s['acc_before_ft'])} | {f(s['macs_removed_pct'])} | "
                     f"{f(s['max_removed_gamma'])} |")
    lines.append("")
    for k, v in result["gamma_summary"].items():
        if v["frac_below_1e-2"] is not None:
            m = v["frac_below_1e-2"]
            lines.append(f"fraction of gammas < 1e-2 ({k}): {m['mean']:.4f}" + (f" ± {m['sd']:.4f}" if m.get("sd")
                                                                                 is not None else ""))
    for k, v in result["paired_differences"].items():
        lines.append(f"{k}: {f(v)} points")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
