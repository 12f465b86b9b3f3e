"""Latency-aware pruning (LatencyPrune) vs MACs-driven pruning on ONNX Runtime CPU, in one run per model and batch.

    .venv/bin/python benchmarks/latency_aware.py                              # everything (resumable)
    .venv/bin/python benchmarks/latency_aware.py --only resnet50 --batches 1
    .venv/bin/python benchmarks/latency_aware.py --summary-only

For each model (random init, ``fxprune.models``, ``make_observable``; input sizes reduced to keep the run bounded on
a shared 2-core machine, see ``MODELS``) and batch (1, 8), one worker subprocess:

* ``LatencyPrune(target_latency=t, threads=2)`` for t in 0.7 / 0.5 / 0.3 (latency table measured or read from the
  cache, closed-loop calibration against end-to-end ONNX Runtime timings inside the pass), then Shrink (verified);
* ``ChannelPrune(target_macs=t, round_to=8)`` and Torch-Pruning (BasePruner + GroupMagnitudeImportance(p=2),
  round_to=8, classifier ignored, uniform ratio ``1 - sqrt(t)``, i.e. about t of the MACs; its exact MACs are
  reported, and the comparison is made along the measured latency curve);
* every pruned model exported to ONNX and timed against the dense one, one pair at a time (interleaved rounds,
  ``LatencyTable.compare_ratios``: settle runs, the fastest of a burst per round, the median per-round ratio to
  dense, noise check on those ratios), as LatencyPrune measures its own selections;
* per row: measured latency / dense (and vs the target for LatencyPrune), MACs and parameters kept, importance
  retained (the l2 importance LatencyPrune uses, mean-normalised per group; for the MACs-driven rows it assumes
  they keep each group's top channels by that score, an upper bound for Torch-Pruning);
* "at equal latency": the MACs-driven rows' MACs and importance, linearly interpolated along their measured
  latency curve at LatencyPrune's measured latency.

``--backend torch.compile`` measures everything with torch.compile on the CPU instead (LatencyPrune's torch.compile
tables and calibration; every row ``torch.compile``'d and timed against the compiled dense model), JSON
``benchmarks/results/latency_aware_torch_compile.json``. The Fashion-MNIST fine-tune accuracy of the issue is
``benchmarks/latency_aware_fmnist.py``. The JSON records the load average before and after every worker: timings
are only as quiet as the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, emit, first_line, setup_worker, spawn  # noqa: E402

MODELS = {  # name -> (zoo size, input side, build overrides)
    "resnet50": ("full", 112, {}),
    "mobilenetv2": ("full", 128, {}),
    "yolov8": ("full", 160, {}),
    "vit": ("full", 112, {"img": 112}),
}
TARGETS = (0.7, 0.5, 0.3)
#: largest relative spread (IQR / median of the rounds) accepted, tables and end to end: 1.0 rather than the
#: library's 0.5 because this machine ran at load averages of 15-50 on 2 cores while the numbers were taken
MAX_SPREAD = 1.0
#: final timing: a pair whose dense time is above DISTURBED x the fastest dense time of the run is timed again after
#: WAIT_S seconds, RETIMES times at most
DISTURBED, RETIMES, WAIT_S = 1.15, 6, 10.0


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def _build(name: str, batch: int):
    import torch

    from fxprune import models
    from fxprune.testing import make_observable

    size, side, over = MODELS[name]
    mod = models.REGISTRY[name]
    model = mod.build(size=size, seed=0, **over).eval()
    make_observable(model, seed=0)
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))
    return model, (x,)


def _tp_at_macs(model, x, frac: float, num_classes):
    """Torch-Pruning (round_to=8) on a copy of ``model`` at the uniform ratio ``1 - sqrt(frac)`` (about ``frac`` of
    the dense MACs; the actual fraction is measured and reported, and rows are compared along the measured latency
    curve, so an exact MACs match is not needed). Returns (model, MACs fraction by TP's counter, ratio)."""
    import copy
    import math

    import torch_pruning as tp
    from _common import tp_heads

    base, _ = tp.utils.count_ops_and_params(model, x)
    r = 1 - math.sqrt(frac)
    m = copy.deepcopy(model)
    pr = tp.pruner.BasePruner(m, example_inputs=x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                              pruning_ratio=r, round_to=8, ignored_layers=tp_heads(m, num_classes))
    pr.step()
    macs, _ = tp.utils.count_ops_and_params(m, x)
    return m, macs / base, r


LOG = Path(os.environ.get("FXPRUNE_LATENCY_AWARE_LOG", "/tmp/fxprune-latency-aware.log"))


def _log(msg: str) -> None:
    """Progress of a worker (its stdout/stderr are captured by the driver): one line in ``LOG``."""
    with LOG.open("a") as f:
        f.write(f"[{time.strftime('%H:%M:%S')}] {msg} (load {_load()})\n")


def worker(name: str, batch: int, threads: int, repeats: int, calibrate: int, levels: int,
           backend: str = "onnxruntime") -> dict:
    setup_worker(threads)
    import torch

    import fxprune
    from fxprune.backends import onnx as onnx_backend
    from fxprune.passes import ChannelPrune, Shrink
    from fxprune.passes.latency_prune import LatencyPrune, importance_retained, kept_counts
    from fxprune.passes.latency_table import LatencyTable

    model, x = _build(name, batch)
    row: dict = {"model": name, "batch": batch, "input_shape": list(x[0].shape[1:]), "threads": threads,
                 "backend": backend, "load_before": _load(), "rows": []}
    ort_backend = backend == "onnxruntime"
    mods: dict[str, torch.nn.Module] = {"dense": model}  # torch.compile: the modules to time
    groups = fxprune.analyze(model, x)
    num_classes = getattr(model, "num_classes", None) or (1000 if name != "yolov8" else None)
    tmp = Path(tempfile.mkdtemp(prefix=f"fxprune-la-{name}-b{batch}-"))
    paths = {"dense": tmp / "dense.onnx"}
    t = time.perf_counter()
    if ort_backend:
        onnx_backend.export(fxprune.trace(model, x, {}), x, paths["dense"], dynamic_batch=False, check_parity=False)
    row["dense_export_s"] = round(time.perf_counter() - t, 1)
    macs_dense = None
    for tgt in TARGETS:  # --- latency-aware
        r: dict = {"method": "latency_prune", "target": tgt}
        t = time.perf_counter()
        _log(f"{name} b{batch}: LatencyPrune({tgt})")
        try:
            out = fxprune.compile(model, x, passes=[
                LatencyPrune(target_latency=tgt, threads=threads, calibrate=calibrate, strict=False, levels=levels,
                             repeats=5, max_spread=MAX_SPREAD, backend=backend,
                             dense_onnx=str(paths["dense"]) if ort_backend else None), Shrink()])
        except Exception as e:  # noqa: BLE001 - a failed row is a result too
            r.update(status="error", error=first_line(e))
            row["rows"].append(r)
            continue
        st = out.report.passes[0]["stats"]
        macs_dense = out.report.macs_before
        r.update(status="ok", seconds=round(time.perf_counter() - t, 1), verified=out.report.verified,
                 macs_kept=out.report.macs_after / out.report.macs_before,
                 params_kept=out.report.params_after / out.report.params_before,
                 importance_retained=round(importance_retained(model, x, {int(g): k for g, k in st["kept"].items()}),
                                           4),
                 pass_importance_retained=st["importance_retained"], pass_predicted_ratio=st.get("predicted_ratio"),
                 pass_measured_ratio=st.get("measured_ratio"), pass_rounds=st.get("rounds"),
                 table_points=st["table_points"], table_points_measured=st["table_points_measured"],
                 kept=st["kept"])
        paths[f"latency_prune@{tgt}"] = tmp / f"lp{tgt}.onnx"
        mods[f"latency_prune@{tgt}"] = out.module
        if ort_backend:
            onnx_backend.export(out, x, paths[f"latency_prune@{tgt}"], dynamic_batch=False, check_parity=False)
        row["rows"].append(r)
    for tgt in TARGETS:  # --- ChannelPrune(target_macs, round_to=8)
        r = {"method": "channel_prune_macs_r8", "target": tgt}
        _log(f"{name} b{batch}: ChannelPrune(target_macs={tgt})")
        try:
            out = fxprune.compile(model, x, passes=[ChannelPrune(target_macs=tgt, round_to=8), Shrink()])
            counts = kept_counts(groups, out.module)
            r.update(status="ok", verified=out.report.verified,
                     macs_kept=out.report.macs_after / out.report.macs_before,
                     params_kept=out.report.params_after / out.report.params_before,
                     importance_retained=round(importance_retained(model, x, counts), 4))
            paths[f"channel_prune_macs_r8@{tgt}"] = tmp / f"cp{tgt}.onnx"
            mods[f"channel_prune_macs_r8@{tgt}"] = out.module
            if ort_backend:
                onnx_backend.export(out, x, paths[f"channel_prune_macs_r8@{tgt}"], dynamic_batch=False,
                                    check_parity=False)
        except Exception as e:  # noqa: BLE001
            r.update(status="error", error=first_line(e))
        row["rows"].append(r)
    for tgt in TARGETS:  # --- Torch-Pruning round_to=8 at the same MACs
        r = {"method": "torch_pruning_r8", "target": tgt}
        _log(f"{name} b{batch}: Torch-Pruning at ~{tgt} MACs")
        try:
            m, frac, ratio = _tp_at_macs(model, x[0], tgt, num_classes)
            with torch.no_grad():
                m(*x)
            counts = kept_counts(groups, m)
            n_dense = sum(p.numel() for p in model.parameters())
            r.update(status="ok", tp_ratio=round(ratio, 4), macs_kept_tp_count=frac,
                     params_kept=sum(p.numel() for p in m.parameters()) / n_dense,
                     importance_retained_upper_bound=round(importance_retained(model, x, counts), 4))
            if macs_dense:
                r["macs_kept"] = fxprune.analyze(m, x).macs() / macs_dense
            paths[f"torch_pruning_r8@{tgt}"] = tmp / f"tp{tgt}.onnx"
            mods[f"torch_pruning_r8@{tgt}"] = m
            if ort_backend:
                onnx_backend.export(m, x, paths[f"torch_pruning_r8@{tgt}"], dynamic_batch=False,
                                    check_parity=False)
        except Exception as e:  # noqa: BLE001
            r.update(status="error", error=first_line(e))
        row["rows"].append(r)
    _log(f"{name} b{batch}: timing {len(paths) - 1} models against dense, pairwise")
    # --- every model timed against the dense one, one pair at a time
    names = list(paths)
    table = LatencyTable(backend, threads, persist=False, max_spread=MAX_SPREAD, retries=2)
    from fxprune.backends import onnxruntime as ort

    if ort_backend:
        feed = ort.feed(ort.session(paths["dense"], 1), x)
    else:  # torch.compile: every module compiled once (its first call), dense shared by every pair
        compiled = {n: torch.compile(mods[n], dynamic=False) for n in names}
    t = time.perf_counter()
    def pair(n: str) -> tuple[float, float, float]:
        if ort_backend:
            (d, v), (_, q) = table.compare_ratios([paths["dense"], paths[n]], feed, repeats=repeats,
                                                  inner=3)  # as LatencyPrune times its selections
        else:
            (d, v), (_, q) = table.compare_callables([compiled["dense"], compiled[n]], x, repeats=repeats,
                                                     inner=3)  # as LatencyPrune times its selections
        return d, v, q

    row["retimed"] = {}
    seen = [pr["dense_ms"] for r in row["rows"] for pr in (r.get("pass_rounds") or [])]  # LatencyPrune's timings
    try:  # each pruned model against dense, two sessions at a time (as LatencyPrune measures its selections)
        ms, ratios, dense_ms = [None], [1.0], []
        for n in names[1:]:
            d, v, q = pair(n)
            # the machine has slow spells (the dense detector at batch 8 timed 28 ms for minutes where it times 22
            # otherwise; other tenants of the host) that do not slow two models alike: a pair whose dense time is
            # > DISTURBED x the fastest dense time of this run (LatencyPrune's included) waits and is timed again
            for attempt in range(RETIMES):
                if not dense_ms + seen or d <= DISTURBED * min(dense_ms + seen):
                    break
                row["retimed"].setdefault(n, []).append(round(d, 3))
                time.sleep(WAIT_S)
                d, v, q = pair(n)
            dense_ms.append(d)
            ms.append(v)
            ratios.append(q)
        ms[0] = float(sorted(dense_ms)[len(dense_ms) // 2])
        row["dense_ms_spread"] = [round(min(dense_ms), 3), round(max(dense_ms), 3)]
        row["timing_status"] = "ok"
    except Exception as e:  # noqa: BLE001 - too noisy: say so
        row["timing_status"] = "error: " + first_line(e)
        ms = None
    row["timing_s"] = round(time.perf_counter() - t, 1)
    if ms is not None:
        row["dense_ms"] = round(ms[0], 3)
        for n, v, q in zip(names[1:], ms[1:], ratios[1:]):
            meth, tgt = n.split("@")
            r = next(r for r in row["rows"] if r["method"] == meth and r["target"] == float(tgt))
            r["measured_ms"] = round(v, 3)
            r["measured_ratio"] = round(q, 4)  # median of the per-round ratios to dense (as LatencyPrune measures)
            if r.get("macs_kept"):
                r["realized_over_ideal"] = round(r["macs_kept"] / q, 4)  # (dense/pruned time) / (dense/pruned MACs)
            if meth == "latency_prune":
                r["target_miss"] = round(q / float(tgt) - 1, 4)
                r["within_7pct"] = abs(r["target_miss"]) <= 0.07
        row["equal_latency"] = equal_latency(row["rows"])
    row["load_after"] = _load()
    row["status"] = "ok"
    for p in paths.values():
        p.unlink(missing_ok=True)
    return row


def recompute_importance(data: list[dict]) -> None:
    """LatencyPrune rows of an earlier version of this script took ``importance_retained`` from the pass' stats,
    which left out the groups with a single level (a bug, fixed): recompute it from the recorded kept counts with
    the same function as the other rows."""
    from fxprune.passes.latency_prune import importance_retained

    for d in data:
        if d.get("status") != "ok":
            continue
        model, x = _build(d["model"], d["batch"])
        for r in d["rows"]:
            if r["method"] == "latency_prune" and r.get("status") == "ok" and "pass_importance_retained" not in r:
                r["pass_importance_retained"] = r["importance_retained"]
                r["importance_retained"] = round(importance_retained(
                    model, x, {int(g): k for g, k in r["kept"].items()}), 4)
        if "equal_latency" in d:
            d["equal_latency"] = equal_latency(d["rows"])


def equal_latency(rows: list[dict]) -> list[dict]:
    """For each LatencyPrune row: the MACs-driven rows' MACs and importance interpolated at its measured latency."""
    out = []
    for lp in (r for r in rows if r["method"] == "latency_prune" and "measured_ratio" in r):
        item = {"target": lp["target"], "latency_ratio": lp["measured_ratio"], "latency_prune": {
            "macs_kept": lp["macs_kept"], "importance_retained": lp["importance_retained"]}}
        for meth, imp_key in (("channel_prune_macs_r8", "importance_retained"),
                              ("torch_pruning_r8", "importance_retained_upper_bound")):
            pts = sorted((r["measured_ratio"], r.get("macs_kept"), r.get(imp_key)) for r in rows
                         if r["method"] == meth and "measured_ratio" in r and r.get("macs_kept") is not None)
            item[meth] = _interp(pts, lp["measured_ratio"])
        out.append(item)
    return out


def _interp(pts: list[tuple], x: float) -> dict | None:
    if len(pts) < 2 or not (pts[0][0] <= x <= pts[-1][0]):
        return {"outside_measured_range": [pts[0][0], pts[-1][0]] if pts else None}
    for (x0, m0, i0), (x1, m1, i1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            f = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return {"macs_kept": round(m0 + f * (m1 - m0), 4), "importance_retained": round(i0 + f * (i1 - i0), 4)}
    return None


def worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calibrate", type=int, default=3)
    ap.add_argument("--levels", type=int, default=6)
    ap.add_argument("--backend", default="onnxruntime")
    a = ap.parse_args(argv)
    try:
        row = worker(a.worker, a.batch, a.threads, a.repeats, a.calibrate, a.levels, a.backend)
    except Exception as e:  # noqa: BLE001 - a failed row is a result too
        row = {"model": a.worker, "batch": a.batch, "status": "error", "error": first_line(e)}
    emit(row)


# ------------------------------------------------------------------------------------------------ driver
def summary(data: list[dict]) -> str:
    head = (f"{'model':<12} {'b':>2} {'method':<22} {'tgt':>4} {'lat/dense':>9} {'miss':>7} {'MACs':>6} "
            f"{'params':>6} {'imp':>6}")
    lines = [head, "-" * len(head)]
    for d in data:
        if d.get("status") != "ok":
            lines.append(f"{d['model']:<12} {d['batch']:>2} {d.get('status')}: {d.get('error', '')[:90]}")
            continue
        lines.append(f"{d['model']:<12} {d['batch']:>2} dense {d.get('dense_ms')} ms, load {d['load_before']} -> "
                     f"{d['load_after']}, timing {d.get('timing_status')}")
        for r in d["rows"]:
            if r.get("status") != "ok":
                lines.append(f"{'':<15} {r['method']:<22} {r['target']:>4} {r.get('error', '')[:70]}")
                continue
            imp = r.get("importance_retained", r.get("importance_retained_upper_bound"))
            miss = f"{100 * r['target_miss']:+.1f}%" if "target_miss" in r else ""
            lines.append(f"{'':<15} {r['method']:<22} {r['target']:>4} {r.get('measured_ratio', float('nan')):>9.3f} "
                         f"{miss:>7} {r.get('macs_kept', float('nan')):>6.3f} {r['params_kept']:>6.3f} "
                         f"{imp if imp is not None else float('nan'):>6.3f}")
    return "\n".join(lines)


def main() -> None:
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds of the final timing")
    ap.add_argument("--calibrate", type=int, default=3, help="LatencyPrune's calibration rounds")
    ap.add_argument("--levels", type=int, default=6, help="LatencyPrune's widths per group")
    ap.add_argument("--timeout", type=float, default=2400)
    ap.add_argument("--backend", choices=("onnxruntime", "torch.compile"), default="onnxruntime",
                    help="where latency is measured (tables, calibration and the final pairwise timing)")
    ap.add_argument("--rerun", action="store_true")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--recompute-importance", action="store_true",
                    help="recompute LatencyPrune rows' importance_retained from their kept counts (see the function)")
    a = ap.parse_args()
    out = RESULTS / ("latency_aware.json" if a.backend == "onnxruntime" else "latency_aware_torch_compile.json")
    data = json.loads(out.read_text()) if out.exists() else {}
    rows: list[dict] = data.get("results", [])
    if a.recompute_importance:
        setup_worker(a.threads)
        recompute_importance(rows)
        data["results"] = rows
        out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    if a.summary_only or a.recompute_importance:
        print(summary(rows))
        return
    for b in (int(x) for x in a.batches.split(",")):
        for m in a.only.split(","):
            old = next((r for r in rows if (r["model"], r["batch"]) == (m, b)), None)
            if old is not None and old.get("status") == "ok" and not a.rerun:
                continue
            t = time.perf_counter()
            print(f"{m} batch {b} ...", flush=True)
            row = spawn(__file__, ["--worker", m, "--batch", str(b), "--threads", str(a.threads), "--repeats",
                                   str(a.repeats), "--calibrate", str(a.calibrate), "--levels", str(a.levels),
                                   "--backend", a.backend],
                        timeout=a.timeout)
            row.setdefault("model", m)
            row.setdefault("batch", b)
            row["wall_s"] = round(time.perf_counter() - t, 1)
            rows = [r for r in rows if (r["model"], r["batch"]) != (m, b)] + [row]
            data = {
                "description": "LatencyPrune(target_latency) vs ChannelPrune(target_macs, round_to=8) vs Torch-Pruning"
                               f" (round_to=8, same MACs), {a.backend} on the CPU, each row timed against dense in its"
                               " own interleaved pair",
                "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                "config": {"backend": a.backend, "threads": a.threads, "repeats": a.repeats, "calibrate": a.calibrate, "levels": a.levels,
                           "max_spread": MAX_SPREAD,
                           "table_repeats": 5, "torch_pruning": "uniform ratio 1 - sqrt(target), round_to=8",
                           "inputs": {k: v[1] for k, v in MODELS.items()}, "targets": list(TARGETS)},
                "goals": ["LatencyPrune measured latency within +-7% of every target",
                          "at equal measured latency LatencyPrune keeps more MACs and importance than both "
                          "MACs-driven rows"],
                "accuracy": "Fashion-MNIST fine-tune accuracy: benchmarks/latency_aware_fmnist.py",
                "results": rows,
            }
            RESULTS.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=1, default=str) + "\n")
            print(f"  {row.get('status')} in {row['wall_s']:.0f} s {row.get('error', '')}", flush=True)
    print(summary(rows))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
