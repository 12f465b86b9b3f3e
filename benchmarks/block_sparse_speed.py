"""Block-sparse (BSR) vs dense latency on this CPU: one ViT-B MLP layer and a whole ViT-S/16, one run.

Rows:

* ``layer``: the two linear layers of a ViT-B/16 MLP block (768 -> 3072 -> 768, 197 tokens, batch 1), 32x32
  tiles, 50/70/90% of the tiles dropped at random (seeded); dense ``F.linear`` vs
  :class:`fxprune.passes.sparse_kernels.BlockSparseLinear` (``torch.addmm`` with a ``to_sparse_bsr`` weight).
* ``vit_small``: our ViT-S/16 (``fxprune.models.get("vit", size="full")``, 224x224, batch 1, random init),
  ``BlockSparsity(block, sparsity=s, allocation="uniform")`` on all linear layers of the blocks, then
  (a) dense kernels on the masked weights, (b) every layer on BSR (``BlockSparseRewrite(force="bsr")``),
  (c) ``BlockSparseRewrite()`` choosing per layer by measurement. 16x16 tiles (DeiT-S setting) and 32x32.

Median of ``--repeats`` timed runs after one warm-up, ``torch.set_num_threads(--threads)``. JSON in
``benchmarks/results/block_sparse_speed.json``. Timings are from a shared machine: treat differences under ~10%
as noise.

    .venv/bin/python benchmarks/block_sparse_speed.py            # ~3 min on 2 shared cores
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

import fxprune  # noqa: E402
from fxprune import models  # noqa: E402
from fxprune.passes.block_sparsity import BlockSparseRewrite, BlockSparsity  # noqa: E402
from fxprune.passes.sparse_kernels import BlockSparseLinear  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def timed(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def layer_rows(sparsities, repeats: int, seed: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(197, 768, generator=g)
    for name, (out_f, in_f) in {"vitb_fc1": (3072, 768), "vitb_fc2": (768, 3072)}.items():
        xin = x if in_f == 768 else torch.randn(197, 3072, generator=g)
        w0 = torch.randn(out_f, in_f, generator=g) * in_f ** -0.5
        b = torch.randn(out_f, generator=g) * 0.01
        dense_ms = timed(lambda: torch.nn.functional.linear(xin, w0, b), repeats)
        for s in sparsities:
            tiles = torch.rand(out_f // 32, in_f // 32, generator=g) >= s
            w = w0 * tiles.repeat_interleave(32, 0).repeat_interleave(32, 1)
            lin = BlockSparseLinear(w, b, (32, 32))
            err = float((lin(xin) - torch.nn.functional.linear(xin, w, b)).abs().max())
            bsr_ms = timed(lambda: lin(xin), repeats)
            rows.append({"row": "layer", "layer": name, "shape": [out_f, in_f], "tokens": 197, "block": [32, 32],
                         "sparsity": s, "density": round(lin.density, 4), "dense_ms": round(dense_ms, 3),
                         "bsr_ms": round(bsr_ms, 3), "speedup": round(dense_ms / bsr_ms, 3),
                         "max_abs_err": err})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def vit_rows(sparsities, blocks, repeats: int, seed: int) -> list[dict]:
    rows = []
    m, _ = models.get("vit", size="full", seed=seed, batch=1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 224, 224, generator=g)
    calib = [torch.randn(2, 3, 224, 224, generator=g)]
    dense = fxprune.compile(m, (x,), passes=[], count_flops=False).module
    dense_ms = timed(lambda: dense(x), repeats)
    for blk in blocks:
        for s in sparsities:
            sel = dict(block=blk, sparsity=s, allocation="uniform", hardware=0, calib_batches=1, fisher_batch=0,
                       ignore=["head"])
            masked = fxprune.compile(m, (x,), passes=[BlockSparsity(**sel)], data=calib, count_flops=False)
            masked_ms = timed(lambda: masked.module(x), repeats)
            forced = fxprune.compile(m, (x,), passes=[BlockSparsity(**sel), BlockSparseRewrite(force="bsr")],
                                     data=calib, count_flops=False)
            forced_ms = timed(lambda: forced.module(x), repeats)
            chosen = fxprune.compile(m, (x,), passes=[BlockSparsity(**sel), BlockSparseRewrite(repeats=3)],
                                     data=calib, count_flops=False)
            chosen_ms = timed(lambda: chosen.module(x), repeats)
            st = chosen.report.passes[-1]["stats"]
            with torch.no_grad():
                ref = masked.module(x)
                err = max(float((forced.module(x) - ref).abs().max()), float((chosen.module(x) - ref).abs().max()))
            rows.append({"row": "vit_small", "block": [blk, blk], "sparsity": s,
                         "achieved_sparsity": masked.report.passes[0]["stats"]["sparsity"],
                         "dense_ms": round(dense_ms, 2), "masked_dense_kernels_ms": round(masked_ms, 2),
                         "all_bsr_ms": round(forced_ms, 2), "measured_choice_ms": round(chosen_ms, 2),
                         "layers_on_bsr": st["rewritten"], "layers": len(st["layers"]),
                         "speedup_all_bsr": round(dense_ms / forced_ms, 3),
                         "speedup_measured_choice": round(dense_ms / chosen_ms, 3), "max_abs_err": err})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "block_sparse_speed.json"))
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    rows = layer_rows(a.sparsities, a.repeats, a.seed)
    if not a.skip_vit:
        rows += vit_rows(a.sparsities, a.blocks, a.repeats, a.seed)
    wins = [r for r in rows if r.get("speedup", r.get("speedup_measured_choice", 0)) > 1.1]
    result = {
        "benchmark": "block_sparse_speed", "torch": torch.__version__, "threads": a.threads,
        "cpu": platform.processor() or platform.machine(), "repeats": a.repeats, "seed": a.seed,
        "seconds": round(time.time() - t0, 1), "rows": rows,
        "wins": [{k: r[k] for k in ("row", "block", "sparsity") if k in r} | {"layer": r.get("layer")}
                 for r in wins],
        "note": "one run on a shared 2-core machine; BSR = torch.addmm with a to_sparse_bsr weight",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out} in {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
