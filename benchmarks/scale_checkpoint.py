"""Scale: prune a ~3B-parameter Llama-shaped bf16 checkpoint bigger than one process should hold, by streaming
(``fxprune.prune_checkpoint``), and calibrate across processes with torch.distributed (gloo).

Streaming part (each measurement in a fresh subprocess; peak RSS = ru_maxrss of that process):
1. generate a random Llama-3.2-3B-shaped checkpoint (hidden 3072, MLP 8192, 28 layers, 24/8 heads, vocab 128256,
   tied embeddings; 3.2B parameters, ~6.4 GB bf16) in /tmp, streamed one chunk at a time (linear weights
   N(0, 0.02), norm weights 1 + N(0, 0.1)), 4 shards + index + config.json;
2. ``prune_checkpoint(config, ckpt, [ChannelPrune(ratio=0.3, scope="uniform"), Shrink()], out)``: MLP width to
   70%, layer-wise verification on; wall time, peak RSS, output size;
3. the in-memory comparison (``from_pretrained`` in bf16 + ``fxprune.compile`` with the same passes, its own
   shrunk == masked verification) on the largest checkpoint that safely fits this shared machine (``--inmem-layers``
   of the same widths, checked against ``free`` first), streamed too in the same run; every written tensor is
   compared bit for bit with the in-memory result.
Distributed part: activation importance (``ActivationImportance`` via ``calibration_scores``) of SmolLM2-135M on
``--batches`` sequences of ``--seq`` tokens of the ``music21`` English text, 1 process vs 2 gloo processes (each
rank its shard of the batches): max relative score difference and wall times.

    python benchmarks/scale_checkpoint.py [--layers 28] [--inmem-layers 2] [--skip-dist] [--keep]
Writes benchmarks/results/scale_checkpoint.json. Goal: streaming peak RSS < 1.5 GB and >= 4x below the checkpoint
size, output identical to the in-memory path; distributed scores equal to the single process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "scale_checkpoint.json"
LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True, use_cache=False,
                rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192)
RATIO = 0.3


def _peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _config(layers: int):
    import transformers as T

    return T.LlamaConfig(**{**LLAMA_3B, "num_hidden_layers": layers})


def _passes():
    from fxprune.passes import ChannelPrune, Shrink

    return [ChannelPrune(ratio=RATIO, scope="uniform"), Shrink()]


# ------------------------------------------------------------------------------------------------ workers


def gen_worker(layers: int, folder: str) -> dict:
    """Write the random checkpoint tensor by tensor, chunk by chunk (nothing model-sized in memory)."""
    import torch

    cfg = _config(layers)
    import transformers as T

    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    names = [(k, tuple(v.shape)) for k, v in model.state_dict().items()
             if k != "lm_head.weight" and "rotary" not in k]
    d = Path(folder)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    nbytes = {k: 2 * int(torch.Size(s).numel()) for k, s in names}
    shards, cur, size = [], [], 0
    for k, _ in names:
        if cur and size + nbytes[k] > 2 << 30:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nbytes[k]
    shards.append(cur)
    shapes = dict(names)
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for k in keys:
            header[k] = {"dtype": "BF16", "shape": list(shapes[k]), "data_offsets": [off, off + nbytes[k]]}
            off += nbytes[k]
            weight_map[k] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(tmp / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for k in keys:
                n = nbytes[k] // 2
                norm = len(shapes[k]) == 1
                for a in range(0, n, 1 << 24):
                    x = torch.randn(min(1 << 24, n - a), generator=g)
                    x = (1 + 0.1 * x) if norm else 0.02 * x
                    f.write(x.to(torch.bfloat16).view(torch.uint8).numpy().data)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(str(tmp))
    shutil.rmtree(d, ignore_errors=True)
    tmp.replace(d)
    return {"layers": layers, "params": sum(nbytes.values()) // 2, "bytes": sum(nbytes.values()),
            "shards": len(shards), "seconds": time.perf_counter() - t0, "peak_rss_gb": _peak_gb()}


def stream_worker(layers: int, ckpt: str, out: str) -> dict:
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    import fxprune

    r = fxprune.prune_checkpoint(_config(layers), ckpt, _passes(), out, end_to_end=False, overwrite=True)
    segs = r.verification.get("segments", [])
    return {"layers": layers, "seconds": time.perf_counter() - t0, "timings": r.timings,
            "peak_rss_gb": _peak_gb(), "params_before": r.params_before, "params_after": r.params_after,
            "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "files": len(r.files),
            "config_written": r.config_written, "verified": r.verification.get("verified"),
            "segments_checked": sum("ok" in s for s in segs), "segments_ok": sum(bool(s.get("ok")) for s in segs),
            "segments_observable": sum(bool(s.get("observable")) for s in segs),
            "worst_segment_rel_diff": max((s["max_abs_diff"] / max(s["output_scale"], 1e-30) for s in segs
                                           if "ok" in s), default=None),
            "untouched_tensors_byte_equal": r.verification.get("untouched_tensors"), "notes": r.notes}


def inmem_worker(ckpt: str, streamed: str) -> dict:
    import torch
    import transformers as T

    torch.set_num_threads(2)
    import fxprune
    from fxprune.streaming import CheckpointReader

    t0 = time.perf_counter()
    model = T.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.bfloat16).eval()
    t1 = time.perf_counter()
    rss_loaded = _peak_gb()
    out = fxprune.compile(model, {"input_ids": torch.zeros(1, 16, dtype=torch.long)}, _passes(), count_flops=False)
    t2 = time.perf_counter()
    peak = _peak_gb()
    sd = out.module.state_dict()
    written = CheckpointReader(streamed)
    same = [k for k in written.names()
            if k in sd and sd[k].shape == written.read(k).shape
            and torch.equal(sd[k].contiguous().view(-1).view(torch.uint8),
                            written.read(k).contiguous().view(-1).view(torch.uint8))]
    return {"load_seconds": t1 - t0, "compile_seconds": t2 - t1, "seconds": t2 - t0, "peak_rss_gb": peak,
            "peak_rss_gb_after_load": rss_loaded, "verified": out.report.verified,
            "params_after": out.report.params_after, "tensors_written": len(written.names()),
            "tensors_bit_identical": len(same), "identical": len(same) == len(written.names())}


def dist_worker(rank: int, world: int, port: int, batches: int, seq: int, out: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1 if world > 1 else 2)
    from fxprune.calibration import shard
    from fxprune.data import english_text, smollm2
    from fxprune.passes.activation_importance import calibration_scores
    from fxprune.program import Program
    from fxprune.trace import trace

    t0 = time.perf_counter()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, tok = smollm2()
    ids = tok(english_text()[:200_000], return_tensors="pt").input_ids[0]
    data = [{"input_ids": ids[i * seq:(i + 1) * seq].unsqueeze(0)} for i in range(batches)]
    x = {"input_ids": data[0]["input_ids"]}
    program = Program(trace(model, (), x, copy_model=False), (), x, source=model)
    t1 = time.perf_counter()
    scores = calibration_scores(program, None, criterion="activation", data=list(shard(data)))
    t2 = time.perf_counter()
    if world > 1:
        dist.barrier()  # all ranks done before teardown (gloo can abort at exit otherwise)
        dist.destroy_process_group()
    np.savez(out, **{str(k): v for k, v in scores.items()},
             _times=np.array([t1 - t0, t2 - t1, _peak_gb()]))


# ------------------------------------------------------------------------------------------------ driver


def _spawn(args: list[str], timeout: int) -> dict:
    p = subprocess.run(["nice", "-n", "5", sys.executable, __file__, *args], capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode:
        return {"error": p.stderr[-3000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed(batches: int, seq: int, tmp: Path) -> dict:
    import numpy as np

    rows = {}
    for world in (1, 2):
        port = _free_port()
        outs = [tmp / f"dist_w{world}_r{r}.npz" for r in range(world)]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["nice", "-n", "5", sys.executable, __file__, "--dist-worker", str(r), str(world),
                                   str(port), str(batches), str(seq), str(outs[r])], stderr=subprocess.PIPE,
                                  text=True) for r in range(world)]
        errs = [p.communicate(timeout=1800)[1] for p in procs]
        wall = time.perf_counter() - t0
        if any(p.returncode for p in procs):
            return {"error": "\n".join(errs)[-3000:]}
        res = [dict(np.load(o)) for o in outs]
        times = [r.pop("_times") for r in res]
        rows[world] = {"wall_seconds": wall, "setup_seconds": [float(t[0]) for t in times],
                       "calibration_seconds": [float(t[1]) for t in times],
                       "peak_rss_gb": [float(t[2]) for t in times], "scores": res}
    one, two = rows[1]["scores"][0], rows[2]["scores"]
    rel = 0.0
    for r in two:
        assert sorted(r) == sorted(one)
        for k in one:
            rel = max(rel, float(np.max(np.abs(r[k] - one[k]) / np.maximum(np.abs(one[k]), 1e-300))))
    ranks_equal = all(np.array_equal(two[0][k], two[1][k]) for k in one)
    for w in rows.values():
        w.pop("scores")
    return {"model": "SmolLM2-135M (fp32)", "criterion": "activation", "batches": batches, "seq": seq,
            "groups_scored": len(one), "max_rel_diff_1_vs_2": rel, "ranks_hold_equal_scores": ranks_equal,
            "one_process": rows[1], "two_gloo_processes": rows[2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--inmem-layers", type=int, default=2)
    ap.add_argument("--tmp", default="/tmp/fxprune_scale_checkpoint")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--skip-dist", action="store_true")
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--dist-worker", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.dist_worker:
        r, w, port, b, s, out = a.dist_worker
        dist_worker(int(r), int(w), int(port), int(b), int(s), out)
        return
    if a.worker:
        kind, *rest = a.worker
        fn = {"gen": lambda: gen_worker(int(rest[0]), rest[1]),
              "stream": lambda: stream_worker(int(rest[0]), rest[1], rest[2]),
              "inmem": lambda: inmem_worker(rest[0], rest[1])}[kind]
        print(json.dumps(fn()))
        return
    tmp = Path(a.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    row: dict = json.loads(OUT.read_text()) if OUT.exists() else {}
    row["machine"] = f"{os.cpu_count()} CPU cores, shared with other jobs (nice 5)"
    try:
        if not a.skip_stream:
            free = shutil.disk_usage(tmp).free / 2**30
            row["disk_free_gb_at_start"] = round(free, 1)
            big, small = tmp / f"ckpt_{a.layers}", tmp / f"ckpt_{a.inmem_layers}"
            row["generate"] = _spawn(["--worker", "gen", str(a.layers), str(big)], 3600)
            print("generate", row["generate"], flush=True)
            row["streaming"] = _spawn(["--worker", "stream", str(a.layers), str(big), str(tmp / "out_big")], 3600)
            print("streaming", row["streaming"], flush=True)
            shutil.rmtree(tmp / "out_big", ignore_errors=True)
            if not a.keep:
                shutil.rmtree(big, ignore_errors=True)
            row["generate_small"] = _spawn(["--worker", "gen", str(a.inmem_layers), str(small)], 3600)
            row["streaming_small"] = _spawn(["--worker", "stream", str(a.inmem_layers), str(small),
                                             str(tmp / "out_small")], 3600)
            print("streaming_small", row["streaming_small"], flush=True)
            avail = _mem_available_gb()
            need = 5 * row["generate_small"]["bytes"] / 2**30 + 0.5  # measured: 4.9 GB peak for a 1 GB checkpoint
            row["in_memory_mem_available_gb"] = round(avail, 1)
            row["in_memory_mem_needed_gb_estimate"] = round(need, 1)
            if avail > need + 4:
                row["in_memory_small"] = _spawn(["--worker", "inmem", str(small), str(tmp / "out_small")], 3600)
            else:
                row["in_memory_small"] = {"skipped": f"MemAvailable {avail:.1f} GB < needed {need:.1f} GB + 4 GB "
                                                     "left for the other jobs"}
            print("in_memory_small", row["in_memory_small"], flush=True)
            row["in_memory_note"] = (f"the in-memory path was run on the {a.inmem_layers}-layer checkpoint of the "
                                     f"same widths, not on the {a.layers}-layer one: its bf16 weights alone "
                                     f"({row['generate']['bytes'] / 2**30:.1f} GB) exceed the ~6 GB per-job memory "
                                     "allowance of this shared 24 GB machine")
            s, g = row["streaming"], row["generate"]
            if "peak_rss_gb" in s:
                row["goal"] = "streaming peak RSS < 1.5 GB and >= 4x below the checkpoint size; identical output"
                row["checkpoint_gb"] = g["bytes"] / 2**30
                row["rss_ratio"] = row["checkpoint_gb"] / s["peak_rss_gb"]
                ims = row["in_memory_small"]
                row["goal_met"] = bool(s["peak_rss_gb"] < 1.5 and row["rss_ratio"] >= 4 and ims.get("identical"))
        if not a.skip_dist:
            row["distributed"] = distributed(a.batches, a.seq, tmp)
            print("distributed", json.dumps(row["distributed"])[:2000], flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(row, indent=1, default=str) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
