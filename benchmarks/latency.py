"""ONNX Runtime CPU latency, dense vs pruned, in one run: realized speedup vs the ideal (MACs ratio).

    .venv/bin/python benchmarks/latency.py                          # everything (resumable), ~30-60 min on 2 cores
    .venv/bin/python benchmarks/latency.py --only resnet50 --ratios 0.5 --batches 8
    .venv/bin/python benchmarks/latency.py --round-to 8 --tag r8       # channel counts multiples of 8
    .venv/bin/python benchmarks/latency.py --summary-only

Models (random init, ``fxprune.models``, passed through ``make_observable``): resnet50 ("full": 224x224),
mobilenetv2 ("full": width 1.0, 224x224), vit ("full" = ViT-S/16, 224x224), yolov8 ("full": width 0.25, 320x320).
For each model and channel ratio (default 0.3/0.5/0.7), one worker subprocess compiles
``ChannelPrune(ratio, round_to) -> Shrink()`` (verified) at batch 2 (dynamic batch), exports the pruned program to
ONNX (dynamo exporter, onnxsim, parity-checked), and times it against the dense ONNX file with
``fxprune.backends.onnxruntime.compare`` (interleaved rounds, ``--threads`` intra-op threads, one inter-op thread)
at each batch size (default 1 and 8). The dense file is exported once per model from the *traced* dense program
(``fxprune.trace``, the same IR and exporter path as the pruned one), so the two files differ by pruning alone.

Per row: dense and pruned median latency (with p10/p90), realized speedup = dense / pruned median, ideal speedup =
dense MACs / pruned MACs (torch.utils.flop_counter, batch-independent), and efficiency = realized / ideal; plus
(unless ``--no-profile``) ONNX Runtime's per-op-type kernel time, dense vs pruned, at the largest batch, which
shows where the speedup falls short (layout reorders, elementwise ops, memory-bound depthwise convs, softmax). The goal
is efficiency >= 0.85 for the CNNs at batch 8. Output: ``benchmarks/results/latency.json`` (``--tag`` appends a
suffix). Timings are only as quiet as the machine: the JSON records the load average before and after each row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, emit, first_line, setup_worker, spawn  # noqa: E402

MODELS = {  # name -> (size, family)
    "resnet50": ("full", "cnn"),
    "mobilenetv2": ("full", "cnn"),
    "vit": ("full", "transformer"),
    "yolov8": ("full", "cnn"),
}
WORK = Path(os.environ.get("FXPRUNE_LATENCY_WORK", "/tmp/fxprune-latency"))


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


# ------------------------------------------------------------------------------------------------ worker
def op_profile(dense_path: Path, pruned_path: Path, x, threads: int, runs: int = 3) -> dict:
    """ONNX Runtime's profiler: total kernel time per op type (ms per run), dense vs pruned, sorted by the
    dense time. Shows where the realized speedup falls short of the MACs ratio (ops whose cost does not shrink
    with the channels: layout reorders, elementwise ops, memory-bound depthwise convs, softmax...)."""
    import onnxruntime as rt

    out: dict[str, dict[str, float]] = {}
    for tag, path in (("dense", dense_path), ("pruned", pruned_path)):
        so = rt.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_profiling = True
        so.profile_file_prefix = str(WORK / f"profile-{tag}")
        so.log_severity_level = 3
        sess = rt.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        sess.run(None, feed)
        for _ in range(runs):
            sess.run(None, feed)
        prof = Path(sess.end_profiling())
        events = json.loads(prof.read_text())
        prof.unlink(missing_ok=True)
        acc: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                acc[op] = acc.get(op, 0.0) + e.get("dur", 0) / 1e3 / (runs + 1)
        for op, ms in acc.items():
            out.setdefault(op, {"dense_ms": 0.0, "pruned_ms": 0.0})[f"{tag}_ms"] = round(ms, 3)
    for v in out.values():
        v["speedup"] = round(v["dense_ms"] / v["pruned_ms"], 2) if v["pruned_ms"] else None
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["dense_ms"]))


def worker(model_name: str, ratio: float, batches: list[int], threads: int, repeats: int, warmup: int,
           round_to: int, profile: bool = False) -> dict:
    setup_worker(threads)
    import torch

    import fxprune
    from fxprune import models
    from fxprune.backends import onnx as onnx_backend
    from fxprune.backends import onnxruntime as ort
    from fxprune.passes import ChannelPrune, Shrink
    from fxprune.testing import make_observable

    size, family = MODELS[model_name]
    row: dict = {"model": model_name, "size": size, "family": family, "ratio": ratio, "round_to": round_to,
                 "threads": threads, "load_before": _load()}
    model, inputs = models.get(model_name, size=size, seed=0, batch=2)
    make_observable(model, seed=0)
    row["input_shape"] = list(inputs[0].shape[1:])
    WORK.mkdir(parents=True, exist_ok=True)
    dense_path = WORK / f"{model_name}-{size}-dense.onnx"
    if not dense_path.exists():
        t = time.perf_counter()
        gm = fxprune.trace(model, inputs, {})
        tmp = dense_path.with_suffix(".tmp.onnx")
        res = onnx_backend.export(gm, inputs, tmp)
        if not res.dynamic_batch:
            raise RuntimeError("dense export has a static batch")
        tmp.rename(dense_path)
        row["dense_export_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    out = fxprune.compile(model, inputs, passes=[ChannelPrune(ratio=ratio, round_to=round_to), Shrink()])
    row["compile_s"] = round(time.perf_counter() - t, 1)
    rep = out.report
    row.update(verified=rep.verified, dynamic_batch=rep.dynamic_batch, params_before=rep.params_before,
               params_after=rep.params_after, macs_before=rep.macs_before, macs_after=rep.macs_after,
               ideal_speedup=rep.macs_before / max(rep.macs_after, 1))
    pruned_path = WORK / f"{model_name}-{size}-r{ratio}-q{round_to}-pruned.onnx"
    t = time.perf_counter()
    pres = onnx_backend.export(out, inputs, pruned_path)
    row["pruned_export_s"] = round(time.perf_counter() - t, 1)
    row["pruned_dynamic_batch"] = pres.dynamic_batch
    row["batches"] = {}
    for b in batches:
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, *inputs[0].shape[1:], generator=g)
        c = ort.compare(dense_path, pruned_path, (x,), threads=threads, warmup=warmup,
                        repeats=repeats if b > 1 else repeats * 2)
        d, p = c["dense"], c["pruned"]
        row["batches"][str(b)] = {
            "dense_ms": d.median_ms, "pruned_ms": p.median_ms,
            "dense_p10_p90": [d.p10_ms, d.p90_ms], "pruned_p10_p90": [p.p10_ms, p.p90_ms],
            "speedup": c["speedup"], "efficiency": c["speedup"] / row["ideal_speedup"], "repeats": d.repeats}
    if profile:
        b = max(batches)
        x = torch.randn(b, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(b))
        row["profile_batch"] = b
        row["profile"] = op_profile(dense_path, pruned_path, x, threads)
    row["load_after"] = _load()
    pruned_path.unlink(missing_ok=True)
    row["status"] = "ok"
    return row


def worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--ratio", type=float, required=True)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    try:
        row = worker(a.worker, a.ratio, [int(b) for b in a.batches.split(",")], a.threads, a.repeats, a.warmup,
                     a.round_to, a.profile)
    except Exception as e:  # noqa: BLE001 - a failed row is a result too
        row = {"model": a.worker, "ratio": a.ratio, "round_to": a.round_to, "status": "error",
               "error": first_line(e)}
    emit(row)


# ------------------------------------------------------------------------------------------------ driver
def summary(rows: list[dict]) -> str:
    head = (f"{'model':<12} {'ratio':>5} {'MACs':>6} {'ideal':>6} | {'batch':>5} {'dense ms':>9} {'pruned ms':>9} "
            f"{'speedup':>7} {'eff.':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['model']:<12} {r['ratio']:>5} {r.get('status')}: {r.get('error', '')[:80]}")
            continue
        for b, m in r["batches"].items():
            lines.append(f"{r['model']:<12} {r['ratio']:>5} {r['macs_after'] / r['macs_before']:>6.3f} "
                         f"{r['ideal_speedup']:>5.2f}x | {b:>5} {m['dense_ms']:>9.2f} {m['pruned_ms']:>9.2f} "
                         f"{m['speedup']:>6.2f}x {m['efficiency']:>5.2f}")
    return "\n".join(lines)


def main() -> None:
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(MODELS), help="comma-separated models")
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds at batch > 1 (batch 1: twice as many)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true", help="skip the per-op-type profile at the largest batch")
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("--tag", default="", help="suffix of the output file (latency_TAG.json)")
    ap.add_argument("--rerun", action="store_true", help="recompute rows already in the output file")
    ap.add_argument("--summary-only", action="store_true")
    a = ap.parse_args()
    out = RESULTS / (f"latency_{a.tag}.json" if a.tag else "latency.json")
    data = json.loads(out.read_text()) if out.exists() else {}
    rows: list[dict] = data.get("rows", [])
    if a.summary_only:
        print(summary(rows))
        return
    key = lambda r: (r["model"], float(r["ratio"]), int(r.get("round_to", 1)))  # noqa: E731
    for m in a.only.split(","):
        for ratio in (float(x) for x in a.ratios.split(",")):
            k = (m, ratio, a.round_to)
            old = next((r for r in rows if key(r) == k), None)
            if old is not None and old.get("status") == "ok" and not a.rerun:
                continue
            t = time.perf_counter()
            print(f"{m} ratio {ratio} (round_to {a.round_to}) ...", flush=True)
            row = spawn(__file__, ["--worker", m, "--ratio", str(ratio), "--batches", a.batches, "--threads",
                                   str(a.threads), "--repeats", str(a.repeats), "--warmup", str(a.warmup),
                                   "--round-to", str(a.round_to)] + ([] if a.no_profile else ["--profile"]),
                        timeout=a.timeout)
            row.setdefault("model", m)
            row.setdefault("ratio", ratio)
            row.setdefault("round_to", a.round_to)
            rows = [r for r in rows if key(r) != k] + [row]
            rows.sort(key=lambda r: (list(MODELS).index(r["model"]) if r["model"] in MODELS else 99, key(r)))
            data = {
                "description": "ONNX Runtime CPU latency, dense vs pruned (ChannelPrune(ratio, round_to) -> Shrink),"
                               " interleaved in one run; ideal speedup = MACs ratio; efficiency = realized / ideal",
                "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "python": platform.python_version()},
                "config": {"threads": a.threads, "repeats": a.repeats, "warmup": a.warmup, "batches": a.batches,
                           "timing": "fxprune.backends.onnxruntime.compare (median of interleaved rounds)"},
                "goal": "efficiency >= 0.85 for the CNNs at batch 8",
                "rows": rows,
            }
            try:
                import onnxruntime
                import torch

                data["machine"].update(torch=torch.__version__, onnxruntime=onnxruntime.__version__)
            except ImportError:  # pragma: no cover
                pass
            RESULTS.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=1, default=str) + "\n")
            print(f"  {row.get('status')} in {time.perf_counter() - t:.0f} s", flush=True)
    print(summary(rows))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
