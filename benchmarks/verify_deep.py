"""Verification on deep models (issue 20): SmolLM2-135M (real weights, 30 layers) at ratios 0.1/0.2/0.3 with a
512-token example (``use_cache=False``), bfloat16 SmolLM2 at 0.2, and the LLaMA-style reference at 30 layers
(random init through ``make_observable``, SmolLM2's widths).

Per configuration (one subprocess each): trace, ChannelPrune, Shrink(verify=False), the masked program
(``masking.masked_view``, what Shrink verifies against), then

* ``legacy_fp32``: the verification fxprune shipped before (native dtype, shared inputs, bound 1e-4 x scale), kept
  verbatim below for the comparison;
* ``default``: ``fxprune.verify.verify`` with the defaults Shrink uses (float64, bound from the arithmetic);
* ``float32``: the same rule evaluated in float32 (the fallback precision), to calibrate ``SAFETY``;
* ``swap25`` / ``zero25``: the default check on a shrunk module whose ``layers.25.mlp.down_proj.weight`` has two
  kept input channels swapped / one kept input column zeroed (a private copy: the shrunk and masked modules share
  tensors copy-on-write). Both must fail as a structural mismatch naming layer 25 (``legacy_fp32_ok``: what the old
  check said); ``*_float32``: the same in the float32 fallback precision.

Each check reports verdict, max|shrunk - masked|, bound, margin (bound / diff), measured amplification A,
R = diff / (u (A + 1) scale) (the SAFETY factor a check used up), seconds and peak extra RSS while it ran (sampled
every 2 ms, above the RSS before the check). Runs with 1 intra-op thread (a shared 2-core machine).

    .venv/bin/python benchmarks/verify_deep.py                 # all configurations -> results/verify_deep.json
    .venv/bin/python benchmarks/verify_deep.py --only smol-0.1 --seq 128
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

CONFIGS = {
    "smol-0.1": ("smollm2", "float32", 0.1),
    "smol-0.2": ("smollm2", "float32", 0.2),
    "smol-0.3": ("smollm2", "float32", 0.3),
    "smol-bf16-0.2": ("smollm2", "bfloat16", 0.2),
    "llama30-0.1": ("llama30", "float32", 0.1),
    "llama30-0.2": ("llama30", "float32", 0.2),
    "llama30-0.3": ("llama30", "float32", 0.3),
}
CORRUPT_PARAM = "layers.25.mlp.down_proj.weight"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measured(fn):
    """(result, seconds, peak RSS above the start in MB) of fn(). Freed heap is handed back to the system first
    (glibc malloc_trim), so an earlier check's retained pages do not hide this one's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base, peak, stop = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    try:
        res = fn()
    finally:
        dt = time.perf_counter() - t
        stop.set()
        th.join()
    return res, dt, max(peak[0], _rss_mb()) - base


def legacy_verify(reference, candidate, args, kwargs, *, seed=0, rtol=1e-4, dense=None, trials=2):
    """fxprune.verify.verify as shipped before issue 20 (commit 05f8fb2), for the time/memory/verdict comparison."""
    import torch

    from fxprune.verify import _leaves, random_like

    with torch.no_grad():
        worst, scale, shapes_equal, observable = 0.0, 0.0, True, None
        for k in range(trials):
            a, kw = random_like(args, kwargs, seed + k)
            ref, cand = _leaves(reference(*a, **kw)), _leaves(candidate(*a, **kw))
            for r, c in zip(ref, cand):
                if r.shape != c.shape:
                    shapes_equal = False
                    continue
                if r.is_floating_point():
                    worst = max(worst, float((r.float() - c.float()).abs().max()) if r.numel() else 0.0)
                    scale = max(scale, float(r.float().abs().max()) if r.numel() else 0.0)
            if dense is not None:
                d = _leaves(dense(*a, **kw))
                same = all(x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=0,
                                                                 atol=rtol * max(scale, 1e-30))
                           for x, y in zip(d, ref) if x.is_floating_point())
                observable = (observable or False) or not same
        return {"ok": shapes_equal and worst <= rtol * max(scale, 1e-12), "max_abs_diff": worst,
                "output_scale": scale, "bound": rtol * scale, "observable": observable}


def build(name: str, dtype):
    import torch

    import fxprune

    if name == "smollm2":
        model, tok = fxprune.data.smollm2()
        return model.to(dtype), tok
    from fxprune.models import llama
    from fxprune.testing import make_observable

    model = make_observable(llama.build("tiny", vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3,
                                        inter=1536), 0)
    return model.to(dtype), None


def worker(key: str, seq: int) -> None:
    _common.setup_worker(threads=1)
    import torch
    import torch.nn as nn

    import fxprune
    from fxprune import verify as V
    from fxprune.masking import masked_view
    from fxprune.pass_manager import PassContext, PassManager
    from fxprune.passes import ChannelPrune, Shrink
    from fxprune.program import Program
    from fxprune.trace import trace

    name, dtype_name, ratio = CONFIGS[key]
    dtype = getattr(torch, dtype_name)
    model, tok = build(name, dtype)
    if tok is not None:
        ids = tok(fxprune.data.english_text(), return_tensors="pt").input_ids[:, :seq]
        args, kwargs = (), {"input_ids": ids, "use_cache": False}
        prefix = "model."
    else:
        ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(0))
        args, kwargs = (ids,), {}
        prefix = ""
    t = time.perf_counter()
    gm = trace(model, args, kwargs)
    prog = Program(gm, args, kwargs, source=model)
    ctx = PassContext(seed=0, verify=False)
    sel, _ = PassManager([ChannelPrune(ratio)]).run(prog, ctx)
    shr, _ = PassManager([Shrink(verify=False)]).run(sel, ctx)
    groups, leaf_keep = sel.groups, sel.leaf_keep()
    masked = masked_view(sel.gm, groups, leaf_keep, sel.weight_masks)
    shrunk = shr.gm
    prep_s = time.perf_counter() - t

    def keep():
        return V.node_keep(groups, leaf_keep)

    def corrupted(how: str):
        import copy

        # a structural copy sharing every tensor, then one private corrupted parameter (shrunk and masked share
        # tensors copy-on-write: never write to them)
        memo = {id(t): t for t in list(shrunk.parameters()) + list(shrunk.buffers())}
        bad = copy.deepcopy(shrunk, memo)
        path, attr = (prefix + CORRUPT_PARAM).rsplit(".", 1)
        mod = bad.get_submodule(path)
        w = getattr(mod, attr).detach().clone()
        if how == "swap":
            idx = torch.arange(w.shape[1])
            idx[[3, 5]] = idx[[5, 3]]
            w = w.index_select(1, idx)
        else:
            w[:, 4] = 0
        setattr(mod, attr, nn.Parameter(w, requires_grad=False))
        return bad

    rows = []
    u = {"float64": 2.0 ** -53, "float32": 2.0 ** -24}

    def new_row(check, res, dt, mb):
        scale = res.output_scale
        R = res.max_abs_diff / (u.get(res.precision, 2.0 ** -24) * (res.amplification + 1) * scale) if scale else 0
        m = res.margin
        rows.append({"check": check, "ok": res.ok, "kind": res.kind, "precision": res.precision,
                     "max_abs_diff": res.max_abs_diff, "bound": res.bound, "output_scale": scale,
                     "margin": None if math.isinf(m) else m, "amplification": res.amplification, "R": R,
                     "observable": res.observable, "seconds": round(dt, 2), "peak_extra_mb": round(mb, 1),
                     "message": res.explain()[0][:600] if not res.ok else ""})
        print(key, rows[-1], file=sys.stderr, flush=True)

    res, dt, mb = measured(lambda: legacy_verify(masked, shrunk, args, kwargs, seed=1, dense=gm))
    rows.append({"check": "legacy_fp32", **res, "margin": res["bound"] / res["max_abs_diff"]
                 if res["max_abs_diff"] else None, "seconds": round(dt, 2), "peak_extra_mb": round(mb, 1)})
    print(key, rows[-1], file=sys.stderr, flush=True)
    res, dt, mb = measured(lambda: V.verify(masked, shrunk, args, kwargs, seed=1, dense=gm, keep=keep))
    new_row("default", res, dt, mb)
    res, dt, mb = measured(lambda: V.verify(masked, shrunk, args, kwargs, seed=1, dense=gm, keep=keep,
                                            precision=torch.float32))
    new_row("float32", res, dt, mb)
    for how in ("swap", "zero"):
        bad = corrupted(how)
        res, dt, mb = measured(lambda: V.verify(masked, bad, args, kwargs, seed=1, dense=gm, keep=keep))
        new_row(f"{how}25", res, dt, mb)
        lres, ldt, lmb = measured(lambda: legacy_verify(masked, bad, args, kwargs, seed=1, dense=gm))
        rows[-1]["legacy_fp32_ok"] = lres["ok"]
        res, dt, mb = measured(lambda: V.verify(masked, bad, args, kwargs, seed=1, dense=gm, keep=keep,
                                                precision=torch.float32))
        new_row(f"{how}25_float32", res, dt, mb)
        del bad
    _common.emit({"config": key, "model": name, "dtype": dtype_name, "ratio": ratio, "seq": seq,
                  "layers": 30, "prepare_s": round(prep_s, 1), "load_avg": os.getloadavg()[0], "checks": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help="comma-separated configuration keys (default: all)")
    ap.add_argument("--seq", type=int, default=512, help="tokens in the example (default 512)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=str(_common.RESULTS / "verify_deep.json"))
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.seq)
        return
    keys = [k for k in a.only.split(",") if k] or list(CONFIGS)
    out = Path(a.out)
    done = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = [r for r in done.get("rows", []) if r.get("config") not in keys or r.get("seq") != a.seq]
    for k in keys:
        row = _common.spawn(__file__, ["--worker", k, "--seq", str(a.seq)], a.timeout)
        row.setdefault("config", k)
        row.setdefault("seq", a.seq)
        rows.append(row)
        print(json.dumps(row)[:2000], flush=True)
        out.write_text(json.dumps({"script": "benchmarks/verify_deep.py", "safety": None, "rows": rows},
                                  indent=1, default=str))
    from fxprune import verify as V

    clean = [c for r in rows for c in r.get("checks", []) if c["check"] in ("default", "float32")]
    summary = {"safety": V.SAFETY, "structural_factor": V.STRUCTURAL,
               "max_R_clean": max((c["R"] for c in clean), default=None),
               "min_margin_default": min((c["margin"] for r in rows for c in r.get("checks", [])
                                          if c["check"] == "default" and c["margin"]), default=None),
               "all_clean_default_pass": all(c["ok"] for r in rows for c in r.get("checks", [])
                                             if c["check"] == "default"),
               "all_corrupted_fail_structural": all(not c["ok"] and c["kind"] == "structural"
                                                    for r in rows for c in r.get("checks", [])
                                                    if "25" in c["check"])}
    out.write_text(json.dumps({"script": "benchmarks/verify_deep.py", **summary, "rows": rows}, indent=1,
                              default=str))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
