"""Latency-aware pruning on Fashion-MNIST: accuracy after the same short fine-tune, at equal measured latency.

The accuracy part of ``benchmarks/latency_aware.py`` (issue 17). The CNN the Fashion-MNIST benchmarks already train
(``SmallCNN`` of ``examples/fashion_mnist_pipeline.py``: 28x28 -> 14x14 -> 7x7, one residual block), per seed:

1. dense training: ``--epochs`` of SGD (momentum 0.9, weight decay 1e-4, lr 0.1 cosine to 0 per step, batch 64,
   ``fxprune.train.fit``; as ``benchmarks/training_pruning.py``);
2. pruning the trained model for ONNX Runtime CPU (``--threads`` threads, batch ``--batch``; the example is the
   first ``--batch`` test images) with, per target t in 0.7 / 0.5 / 0.3:
   ``LatencyPrune(target_latency=t)`` (l2 importance, closed-loop calibration as in the main benchmark);
   ``ChannelPrune(target_macs=t, round_to=8)`` (l2); Torch-Pruning (BasePruner + GroupMagnitudeImportance(p=2),
   round_to=8, classifier ignored, uniform ratio ``1 - sqrt(t)``);
3. every pruned model timed against the dense one, one pair at a time (``LatencyTable.compare_ratios``, as the
   main benchmark), so each row has a measured latency ratio;
4. the same fine-tune for every pruned model: ``--ft-epochs`` of the same SGD at lr 0.01, same data order; test
   accuracy on the full 10k split;
5. "at equal latency": the MACs-driven rows' accuracy interpolated along their measured latency curve at
   LatencyPrune's measured latency (per seed), then mean and standard deviation over the seeds.

    .venv/bin/python benchmarks/latency_aware_fmnist.py                  # 3 seeds (~25 min on a quiet 2-core box)
    .venv/bin/python benchmarks/latency_aware_fmnist.py --seeds 0 --train-limit 4000 --epochs 1  # smoke

JSON: ``benchmarks/results/latency_aware_fmnist.json``. Timings are only as quiet as the machine (the load average
is recorded per seed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from _common import RESULTS, first_line, setup_worker  # noqa: E402
from latency_aware import MAX_SPREAD, TARGETS, _interp, _load, _tp_at_macs  # noqa: E402

METHODS = ("latency_prune", "channel_prune_macs_r8", "torch_pruning_r8")


def sgd(params, lr: float, steps: int):
    """SGD as the Fashion-MNIST benchmarks train (training_pruning.py): momentum 0.9, weight decay 1e-4, cosine to 0
    over ``steps``."""
    import torch

    opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=0.9, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))


def one_seed(seed: int, a: argparse.Namespace) -> dict:
    import torch

    import fashion_mnist_pipeline as fm
    import fxprune
    from fxprune.backends import onnx as onnx_backend
    from fxprune.backends import onnxruntime as ort
    from fxprune.passes import ChannelPrune, Shrink
    from fxprune.passes.latency_prune import LatencyPrune, importance_retained, kept_counts
    from fxprune.passes.latency_table import LatencyTable
    from fxprune.train import accuracy, fit

    out: dict = {"seed": seed, "load_before": _load()}
    torch.manual_seed(seed)
    model = fm.SmallCNN()
    train, test = fm.data(a.train_limit, None, batch=64, seed=seed)
    t = time.perf_counter()
    opt, sched = sgd(model.parameters(), a.lr, a.epochs * len(train))
    fit(model, train, fm.ce, epochs=a.epochs, optimizer=opt, scheduler=sched, seed=seed)
    model.eval()
    out["dense_train_s"] = round(time.perf_counter() - t, 1)
    out["dense_acc"] = round(accuracy(model, test), 4)
    x = (next(iter(test))[0][: a.batch].contiguous(),)
    groups = fxprune.analyze(model, x)
    tmp = Path(tempfile.mkdtemp(prefix=f"fxprune-la-fmnist-s{seed}-"))
    paths = {"dense": tmp / "dense.onnx"}
    onnx_backend.export(fxprune.trace(model, x, {}), x, paths["dense"], dynamic_batch=False, check_parity=False)
    rows: list[dict] = []
    pruned: dict[str, torch.nn.Module] = {}
    n_dense = sum(p.numel() for p in model.parameters())
    macs_dense = groups.macs()
    for meth in METHODS:
        for tgt in TARGETS:
            r: dict = {"method": meth, "target": tgt}
            t = time.perf_counter()
            try:
                if meth == "latency_prune":
                    c = fxprune.compile(model, x, passes=[
                        LatencyPrune(target_latency=tgt, threads=a.threads, calibrate=a.calibrate, strict=False,
                                     levels=a.levels, repeats=5, max_spread=MAX_SPREAD,
                                     dense_onnx=str(paths["dense"])), Shrink()], seed=seed)
                    st = c.report.passes[0]["stats"]
                    r.update(pass_measured_ratio=st.get("measured_ratio"), pass_predicted_ratio=st.get(
                        "predicted_ratio"), verified=c.report.verified)
                    m = c.module
                elif meth == "channel_prune_macs_r8":
                    c = fxprune.compile(model, x, passes=[ChannelPrune(target_macs=tgt, round_to=8), Shrink()],
                                        seed=seed)
                    r["verified"] = c.report.verified
                    m = c.module
                else:
                    m = _tp_at_macs(model, x[0], tgt, num_classes=10)[0]
                counts = kept_counts(groups, m)
                r.update(status="ok", compile_s=round(time.perf_counter() - t, 1),
                         macs_kept=round(fxprune.analyze(m, x).macs() / macs_dense, 4),
                         params_kept=round(sum(p.numel() for p in m.parameters()) / n_dense, 4),
                         importance_retained=round(importance_retained(model, x, counts), 4),
                         widths={str(g): int(k) for g, k in counts.items()})
                key = f"{meth}@{tgt}"
                paths[key] = tmp / f"{meth}{tgt}.onnx"
                onnx_backend.export(m, x, paths[key], dynamic_batch=False, check_parity=False)
                pruned[key] = m
            except Exception as e:  # noqa: BLE001 - a failed row is a result too
                r.update(status="error", error=first_line(e))
            rows.append(r)
    # --- every pruned model timed against the dense one, one pair at a time (before any fine-tuning)
    table = LatencyTable("onnxruntime", a.threads, persist=False, max_spread=MAX_SPREAD, retries=2)
    feed = ort.feed(ort.session(paths["dense"], 1), x)
    dense_ms = []
    for key in list(paths)[1:]:
        meth, tgt = key.split("@")
        r = next(r for r in rows if r["method"] == meth and r["target"] == float(tgt))
        try:
            (d, _), (ms, q) = table.compare_ratios([paths["dense"], paths[key]], feed, repeats=a.repeats, inner=2)
            dense_ms.append(d)
            r.update(measured_ms=round(ms, 4), measured_ratio=round(q, 4),
                     realized_over_ideal=round(r["macs_kept"] / q, 4))
            if meth == "latency_prune":
                r["target_miss"] = round(q / float(tgt) - 1, 4)
                r["within_7pct"] = abs(r["target_miss"]) <= 0.07
        except Exception as e:  # noqa: BLE001 - too noisy: say so
            r["timing_error"] = first_line(e)
    out["dense_ms"] = round(statistics.median(dense_ms), 4) if dense_ms else None
    out["load_after_timing"] = _load()
    # --- the same fine-tune for every pruned model
    for r in rows:
        key = f"{r['method']}@{r['target']}"
        if key not in pruned:
            continue
        m = pruned[key]
        opt, sched = sgd(m.parameters(), a.ft_lr, a.ft_epochs * len(train))
        r["acc_one_shot"] = round(accuracy(m, test), 4)
        t = time.perf_counter()
        fit(m, train, fm.ce, epochs=a.ft_epochs, optimizer=opt, scheduler=sched, seed=seed)
        r["ft_s"] = round(time.perf_counter() - t, 1)
        r["acc"] = round(accuracy(m, test), 4)
    out["rows"] = rows
    out["equal_latency"] = equal_latency_acc(rows)
    out["load_after"] = _load()
    for p in paths.values():
        p.unlink(missing_ok=True)
    return out


def equal_latency_acc(rows: list[dict]) -> list[dict]:
    """For each LatencyPrune row: the MACs-driven rows' accuracy and MACs interpolated at its measured latency."""
    res = []
    for lp in (r for r in rows if r["method"] == "latency_prune" and "measured_ratio" in r and "acc" in r):
        item = {"target": lp["target"], "latency_ratio": lp["measured_ratio"],
                "latency_prune": {"acc": lp["acc"], "macs_kept": lp["macs_kept"]}}
        for meth in METHODS[1:]:
            pts = sorted((r["measured_ratio"], r["acc"], r["macs_kept"]) for r in rows
                         if r["method"] == meth and "measured_ratio" in r and "acc" in r)
            v = _interp(pts, lp["measured_ratio"])
            if v and "macs_kept" in v:  # _interp names its two values macs_kept/importance_retained
                v = {"acc": v["macs_kept"], "macs_kept": v["importance_retained"]}
            item[meth] = v
        res.append(item)
    return res


def summarize(seeds: list[dict]) -> dict:
    """Mean and sample standard deviation over the seeds, per method and target, and at equal latency."""
    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        return {"mean": round(statistics.mean(vals), 4), "std": round(statistics.stdev(vals), 4) if len(vals) > 1
                else 0.0, "n": len(vals)}

    out: dict = {"dense_acc": ms([s["dense_acc"] for s in seeds]), "rows": {}, "equal_latency": {}}
    for meth in METHODS:
        for tgt in TARGETS:
            rs = [r for s in seeds for r in s["rows"] if r["method"] == meth and r["target"] == tgt]
            out["rows"][f"{meth}@{tgt}"] = {k: ms([r.get(k) for r in rs]) for k in
                                            ("acc", "acc_one_shot", "measured_ratio", "macs_kept", "params_kept",
                                             "importance_retained")}
    for tgt in TARGETS:
        items = [i for s in seeds for i in s["equal_latency"] if i["target"] == tgt]
        e: dict = {"latency_ratio": ms([i["latency_ratio"] for i in items]),
                   "latency_prune_acc": ms([i["latency_prune"]["acc"] for i in items])}
        for meth in METHODS[1:]:
            vals = [(i[meth] or {}).get("acc") for i in items]
            e[f"{meth}_acc"] = ms(vals)
            e[f"{meth}_outside_range"] = sum(v is None for v in vals)
            d = [i["latency_prune"]["acc"] - v for i, v in zip(items, vals) if v is not None]
            e[f"latency_prune_minus_{meth}"] = ms(d)
        out["equal_latency"][str(tgt)] = e
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--calibrate", type=int, default=5)
    ap.add_argument("--levels", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(RESULTS / "latency_aware_fmnist.json"))
    a = ap.parse_args()
    setup_worker(a.threads)
    seeds = []
    for s in (int(v) for v in a.seeds.split(",")):
        t = time.perf_counter()
        r = one_seed(s, a)
        r["wall_s"] = round(time.perf_counter() - t, 1)
        seeds.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "rows"}, default=str), flush=True)
        for row in r["rows"]:
            print(f"  {row['method']:<22} {row['target']:>4} lat {row.get('measured_ratio', float('nan')):.3f} "
                  f"MACs {row.get('macs_kept', float('nan')):.3f} acc {row.get('acc', float('nan')):.4f} "
                  f"{row.get('error', row.get('timing_error', ''))}", flush=True)
    data = {"description": "Fashion-MNIST accuracy after the same fine-tune: LatencyPrune vs ChannelPrune(target_macs,"
                           " round_to=8) vs Torch-Pruning (round_to=8), ONNX Runtime CPU latency measured per row",
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "config": {k: v for k, v in vars(a).items() if k != "out"} | {"model": "SmallCNN "
                       "(examples/fashion_mnist_pipeline.py)", "targets": list(TARGETS), "max_spread": MAX_SPREAD},
            "seeds": seeds, "summary": summarize(seeds)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(json.dumps(data["summary"], indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
