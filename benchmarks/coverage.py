"""Model coverage: fxprune vs Torch-Pruning on torchvision, a timm sample and small HF transformers, in one run.

For every model (random init, ``fxprune.testing.make_observable(model, 0)`` for both libraries):

* fxprune: ``fxprune.compile(model, inputs, passes=[ChannelPrune(ratio=0.5), Shrink()])`` -> traced? verified?
  params / MACs reduction, time, first error line (+ where in fxprune it was raised).
* Torch-Pruning: its standard recipe (``_common.tp_prune``: BasePruner = MagnitudePruner,
  GroupMagnitudeImportance(p=2), pruning_ratio=0.5, the classifier head(s) in ignored_layers, num_heads for attention
  as in TP's examples), then the pruned model runs on the example input and its output shapes must be unchanged.
  TP has no numerical verification: recorded as "not verified".

MACs of both are counted with torch.utils.flop_counter.FlopCounterMode (fxprune.flops.count_macs).

Status per (model, library):
  ok               fxprune: verified and >= 10% of the parameters removed;
                   TP: ran, output shapes unchanged, >= 10% removed
  frozen-too-much  ran (and verified, for fxprune) but < 10% of the parameters removed
  trace-fail       fxprune: TraceError; TP: DependencyGraph construction failed
  error            anything else (incl. "Timeout: ..." after --timeout s and crashed workers)

Models and inputs come from ``fxprune.zoo`` (``_common.build``): torchvision 1x3x224x224 (299 for inception_v3);
timm: the default input size of the pretrained cfg, capped at 224 where the model accepts it; HF: the small configs of
``_common.HF_SPECS`` (2 layers, hidden 64, 4 heads), input_ids 1x16 / 1x3x64x64.

Each (model, library) runs in its own subprocess with 1 thread and a time limit; rows are appended to
``results/coverage_rows.jsonl`` as they finish (resumable: done rows are skipped unless --fresh) and the summary
plus all rows go to ``results/coverage.json``.

    python benchmarks/coverage.py --corpus all --jobs 2              # everything (resumes)
    python benchmarks/coverage.py --corpus hf --only llama,gpt2      # a few models
    python benchmarks/coverage.py --summary-only                     # re-print table/failures from the JSONL
    python benchmarks/coverage.py --corpus torchvision --rerun timeout --timeout 600 --jobs 1

Observable mode (``--observable``, issue 21): fxprune only, every model redrawn with
``fxprune.testing.make_observable`` (same architecture, only values: zero-init last BNs, zero heads and tiny layer
scales get ordinary random values, BN statistics are set), small inputs (image side capped at ``--max-side``, 160 by
default, native size where the model refuses it), over the smallest model of **every** timm family (family = the
``timm.models.<module>`` that defines it; smallest by parameter count built on the meta device, see
:func:`timm_families`), every torchvision model and the HF small configs. Each row says whether pruning changed the
output at all (``observable``), and a verification refusal is its own status, ``refused``, classified by verify as
``structural`` (a rule couples, rewrites or freezes something wrongly) or ``noise`` (rounding above the bound), with
the first diverging node. Rows go to ``results/coverage_observable_rows.jsonl``, the summary to
``results/coverage_observable.json`` (``results/coverage.json`` stays the issue-10 record).

    python benchmarks/coverage.py --observable --corpus all --jobs 1 --timeout 240
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

JSONL = C.RESULTS / "coverage_rows.jsonl"
SUMMARY = C.RESULTS / "coverage.json"
TIMM_SAMPLE = C.RESULTS / "timm_sample.json"
LIBS = ("fxprune", "torch-pruning")
STATUSES = ("ok", "frozen-too-much", "trace-fail", "error")
PROTOCOL = "coverage-v2"  # bump when the measurement changes; rows of other protocols are ignored
HEAVY = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32"}  # > 250M params: run last, one at a time

# observable mode (issue 21): its own rows, summary and protocol; fxprune only; "refused" = verification refused
OBS_JSONL = C.RESULTS / "coverage_observable_rows.jsonl"
OBS_SUMMARY = C.RESULTS / "coverage_observable.json"
OBS_PROTOCOL = "coverage-observable-v1"
OBS_STATUSES = ("ok", "frozen-too-much", "refused", "trace-fail", "error")
TIMM_FAMILIES = C.RESULTS / "timm_families.json"
#: models named in issue 21 (refused in its corpus), run besides their family's smallest model
TIMM_EXTRA = ("halonet_h1", "naflexvit_base_patch16_parfac_gap")

# --------------------------------------------------------------------------------------------------- workers


def _frozen_summary(report) -> dict:
    reasons = Counter()
    for g in report.groups:
        if g.frozen:
            why = re.sub(r"^\S+ \(", "(", g.frozen)  # drop the node name: "mean_3 (aten.mean.dim): ..."
            reasons[why[:110]] += 1
    prunable = sum(1 for g in report.groups if g.frozen is None and g.before > 1)
    return {"groups": len(report.groups), "prunable_groups": prunable, "frozen_groups": sum(reasons.values()),
            "frozen_reasons": dict(reasons.most_common(6)),
            "frozen_by": [f"{f['node']} ({f['op']}): {f['reason']}"[:200] for f in report.frozen_by[:8]]}


def _small_inputs(corpus: str, name: str, side: int) -> tuple:
    """(model, args, kwargs) with the image side capped at ``side`` where the model runs at it (timm: rebuilt with
    ``img_size`` if needed, by ``fxprune.zoo``); torchvision models that refuse it keep 224 (299 for inception)."""
    import torch

    from fxprune import zoo

    if corpus == "timm":
        m, args, _ = zoo.resolve(f"timm:{name}", seed=0, max_image_size=side)
        return m, args, {}
    if corpus == "torchvision":
        m, args, _ = zoo.resolve(f"torchvision:{name}", seed=0, max_image_size=side)
        try:
            with torch.no_grad():
                m(*args)
            return m, args, {}
        except Exception:  # noqa: BLE001 - fixed-size models (ViT, MaxViT): their native size
            m, args, _ = zoo.resolve(f"torchvision:{name}", seed=0)
            return m, args, {}
    m, args, kwargs, _ = C.build(corpus, name)
    return m, args, kwargs


def _refusal(e: BaseException) -> dict:
    """What verify said about a refusal: kind (structural / noise / shape / nonfinite), the numbers, the node."""
    res = None
    while e is not None and res is None:
        res, e = getattr(e, "result", None), e.__cause__
    if res is None:
        return {}
    rel = res.max_abs_diff / res.output_scale if res.output_scale else float("inf")
    return {"refusal_kind": res.kind, "max_abs_diff": res.max_abs_diff, "output_scale": res.output_scale,
            "relative_diff": rel, "verify_bound": res.bound, "observable": res.observable,
            "divergence": str(res.divergence) if res.divergence else None,
            "diverging_node": res.divergence.node if res.divergence else None,
            "diverging_module": res.divergence.module if res.divergence else None}


def run_fxprune(corpus: str, name: str, observable: bool = False, side: int = 160) -> dict:
    import torch

    import fxprune
    from fxprune.errors import FxPruneError, TraceError, VerificationError
    from fxprune.passes import ChannelPrune, Shrink
    from fxprune.testing import make_observable

    torch.manual_seed(0)
    if observable:
        m, args, kwargs = _small_inputs(corpus, name, side)
    else:
        m, args, kwargs, _ = C.build(corpus, name)
    make_observable(m, 0)
    row: dict = {"lib": "fxprune", "inputs": {k: list(v.shape) for k, v in
                                              {**dict(enumerate(args)), **kwargs}.items() if hasattr(v, "shape")}}
    t = time.perf_counter()
    try:
        out = fxprune.compile(m, args, example_kwargs=kwargs, passes=[ChannelPrune(ratio=0.5), Shrink()])
    except TraceError as e:
        return {**row, "status": "trace-fail", "traced": False, "error": C.first_line(e), "where": C.where(e),
                **C.graph_context(e), "seconds": time.perf_counter() - t}
    except Exception as e:  # noqa: BLE001
        w = C.where(e)
        if observable and isinstance(e, VerificationError):
            return {**row, "status": "refused", "traced": True, "error": C.first_line(e), "where": w,
                    **_refusal(e), "seconds": time.perf_counter() - t}
        return {**row, "status": "error", "traced": not w.startswith("fxprune/trace.py"), "error": C.first_line(e),
                "where": w, "fxprune_error": isinstance(e, FxPruneError), **C.graph_context(e),
                "seconds": time.perf_counter() - t}
    r = out.report
    removed = 1 - r.params_after / max(r.params_before, 1)
    if r.verified is True or (r.verified is None and removed < 0.10):  # None: Shrink had nothing to remove
        status, err = ("ok" if removed >= 0.10 else "frozen-too-much"), None
    else:
        status, err = "error", f"NotVerified: report.verified={r.verified}"
    return {**row, "status": status, "traced": True, "verified": r.verified, "observable": r.observable,
            "max_abs_diff": r.max_abs_diff, "params_before": r.params_before, "params_after": r.params_after,
            "macs_before": r.macs_before, "macs_after": r.macs_after, "params_removed": removed,
            "macs_removed": 1 - r.macs_after / max(r.macs_before, 1), "dynamic_batch": r.dynamic_batch,
            "unknown_ops": {k: len(v) for k, v in r.unknown_ops.items()}, **_frozen_summary(r),
            "seconds": time.perf_counter() - t, **({"error": err} if err else {})}


def run_torch_pruning(corpus: str, name: str) -> dict:
    import torch

    from fxprune.flops import count_macs, count_params
    from fxprune.testing import make_observable

    torch.manual_seed(0)
    m, args, kwargs, ncls = C.build(corpus, name)
    make_observable(m, 0)
    row: dict = {"lib": "torch-pruning", "verified": "not verified"}
    with torch.no_grad():
        ref = [list(x.shape) for x in C.leaves(m(*args, **kwargs))]
    p0, c0 = count_params(m), count_macs(m, args, kwargs)
    t = time.perf_counter()
    try:
        info = C.tp_prune(m, args, kwargs, ncls, ratio=0.5)
    except Exception as e:  # noqa: BLE001
        phase = getattr(e, "tp_phase", "step")
        return {**row, "status": "trace-fail" if phase == "graph" else "error", "traced": phase != "graph",
                "error": C.first_line(e), "where": C.where(e), "seconds": time.perf_counter() - t}
    dt = time.perf_counter() - t
    row.update(traced=True, **info)
    try:
        with torch.no_grad():
            got = [list(x.shape) for x in C.leaves(m(*args, **kwargs))]
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "error", "error": "PrunedModelFails: " + C.first_line(e), "seconds": dt}
    p1, c1 = count_params(m), count_macs(m, args, kwargs)
    removed = 1 - p1 / max(p0, 1)
    base = {"params_before": p0, "params_after": p1, "macs_before": c0, "macs_after": c1, "params_removed": removed,
            "macs_removed": 1 - c1 / max(c0, 1), "seconds": dt}
    if got != ref:
        return {**row, **base, "status": "error", "error": f"OutputShapeChanged: {ref} -> {got}"}
    return {**row, **base, "status": "ok" if removed >= 0.10 else "frozen-too-much"}


def worker(corpus: str, name: str, lib: str, mode: str = "") -> None:
    """``mode``: "" (issue-10 protocol) or "observable:<max side>"."""
    C.setup_worker(threads=1)
    obs = mode.startswith("observable")
    side = int(mode.split(":")[1]) if obs and ":" in mode else 160
    C.main_guard(lambda: run_fxprune(corpus, name, obs, side) if lib == "fxprune" else run_torch_pruning(corpus, name),
                 lib)


# --------------------------------------------------------------------------------------------------- timm families


def _timm_module_of(name: str) -> str:
    import timm

    get = getattr(timm.models, "get_model_module", None) or timm.models._registry.get_model_module  # noqa: SLF001
    return get(name).split(".")[-1]


def timm_families(cache: Path = TIMM_FAMILIES, candidates: int = 6) -> list[dict]:
    """The smallest model of every timm family, family = the ``timm.models.<module>`` that defines it:
    ``[{"name", "family", "variants", "params", "input_size"}]`` sorted by family.

    Per module, the ``candidates`` names that look smallest (``_common._timm_name_score``: size words, resolution,
    depth/width numbers) are built on the meta device and the one with the fewest parameters wins (measured, not
    guessed; building all 1371 models on meta would take far longer for the same answer). Cached in ``cache``.
    """
    if cache.exists():
        return json.loads(cache.read_text())
    import warnings

    import timm
    import torch

    mods = timm.list_modules() if hasattr(timm, "list_modules") else timm.models.list_modules()
    picks = []
    for mod in sorted(mods):
        names = timm.list_models(module=mod)
        if not names:
            continue
        sizes = []
        for c in sorted(names, key=C._timm_name_score)[:candidates]:  # noqa: SLF001
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = timm.create_model(c, pretrained=False)
                sizes.append((sum(p.numel() for p in m.parameters()), c))
            except Exception:  # noqa: BLE001 - not buildable on meta: last resort
                sizes.append((10 ** 13, c))
        nparams, best = min(sizes)
        picks.append({"name": best, "family": mod, "variants": len(names),
                      "params": nparams if nparams < 10 ** 13 else None,
                      "input_size": list(C._timm_input_size(best))})  # noqa: SLF001
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(picks, indent=1))
    return picks


# --------------------------------------------------------------------------------------------------- summary


def load_rows() -> dict[tuple, dict]:
    """Newest row per (corpus, model, lib) of the current protocol."""
    latest: dict[tuple, dict] = {}
    if JSONL.exists():
        for line in JSONL.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("protocol") == PROTOCOL:
                latest[(r["corpus"], r["model"], r["lib"])] = r
    return latest


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        c = out.setdefault(r["corpus"], {}).setdefault(r["lib"], {"models": 0, **{s: 0 for s in STATUSES},
                                                                   "timeout": 0})
        c.setdefault(r["status"], 0)
        c["models"] += 1
        c[r["status"]] += 1
        c["timeout"] += r.get("timeout", False) is True
        if r["lib"] == "fxprune" and r["status"] == "ok" and r.get("observable") is False:
            c["ok_unobservable"] = c.get("ok_unobservable", 0) + 1
        if PROTOCOL == OBS_PROTOCOL:
            key = {True: "observable", False: "unobservable"}.get(r.get("observable"), "observable_unknown")
            c[key] = c.get(key, 0) + 1
            if r["status"] == "refused":
                k = f"refused_{r.get('refusal_kind', 'unknown')}"
                c[k] = c.get(k, 0) + 1
    for corpus, libs in out.items():
        for lib, c in libs.items():
            mine = [r for r in rows if r["corpus"] == corpus and r["lib"] == lib]
            ok = [r for r in mine if r["status"] == "ok"]
            c["ok_rate"] = round(c["ok"] / max(c["models"], 1), 3)
            if ok:
                c["median_params_removed_ok"] = round(statistics.median(r["params_removed"] for r in ok), 3)
                c["median_macs_removed_ok"] = round(statistics.median(r.get("macs_removed", 0) for r in ok), 3)
            secs = [r["seconds"] for r in mine if r.get("seconds") is not None and not r.get("timeout")]
            if secs:
                c["median_seconds"] = round(statistics.median(secs), 2)
    # head to head
    by_model = defaultdict(dict)
    for r in rows:
        by_model[(r["corpus"], r["model"])][r["lib"]] = r["status"]
    h2h: dict = {}
    for (corpus, _), st in by_model.items():
        if len(st) < 2:
            continue
        fx, tp_ = st.get("fxprune") == "ok", st.get("torch-pruning") == "ok"
        k = {(True, True): "both_ok", (True, False): "only_fxprune_ok", (False, True): "only_tp_ok",
             (False, False): "neither_ok"}[(fx, tp_)]
        h2h.setdefault(corpus, Counter())[k] += 1
    out["head_to_head"] = {k: dict(v) for k, v in h2h.items()}
    return out


def failures(rows: list[dict], lib: str = "fxprune") -> list[dict]:
    """Non-ok rows of ``lib`` grouped by normalised error (frozen-too-much grouped by top freeze reason)."""
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        if r["lib"] != lib or r["status"] == "ok":
            continue
        if r["status"] == "frozen-too-much":
            top = next(iter(r.get("frozen_reasons", {}) or {"?": 0}))
            key = f"[frozen-too-much] top freeze reason: {top}"
            detail = (f"removed {r.get('params_removed', 0):.1%}, {r.get('prunable_groups')} prunable / "
                      f"{r.get('groups')} groups; unknown ops {list(r.get('unknown_ops', {}))[:4]}")
        else:
            key = f"[{r['status']}] " + C.error_key(r.get("error", "?"))
            detail = r.get("error", "?") + (f"  @ {r['where']}" if r.get("where") else "") + \
                (f"  node {r['graph_node']}" if r.get("graph_node") else "") + \
                (f"  [{r['model_source']}]" if r.get("model_source") else "")
        groups[key].append({"corpus": r["corpus"], "model": r["model"], "detail": detail})
    return [{"key": k, "count": len(v), "models": v} for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))]


def print_table(summary: dict) -> None:
    cols = ["models", "ok", "frozen-too-much", *(["refused"] if PROTOCOL == OBS_PROTOCOL else []), "trace-fail",
            "error", "timeout", *(["observable", "unobservable"] if PROTOCOL == OBS_PROTOCOL else []), "ok_rate",
            "median_params_removed_ok", "median_seconds"]
    short = {"frozen-too-much": "frozen", "median_params_removed_ok": "med.removed", "median_seconds": "med.s",
             "trace-fail": "trace-fail", "unobservable": "unobserv."}
    print(f"{'corpus':<12}{'library':<15}" + "".join(f"{short.get(c, c):>12}" for c in cols))
    for corpus, libs in summary.items():
        if corpus == "head_to_head":
            continue
        for lib in LIBS:
            if lib in libs:
                print(f"{corpus:<12}{lib:<15}" + "".join(f"{libs[lib].get(k, '-')!s:>12}" for k in cols))
    print("head to head (both libraries ran):", json.dumps(summary.get("head_to_head", {})))


def print_failures(fails: list[dict]) -> None:
    print(f"\nfxprune non-ok rows grouped by error ({sum(f['count'] for f in fails)} rows, {len(fails)} groups):")
    for f in fails:
        print(f"\n  {f['count']:>3} x {f['key']}")
        for m in f["models"]:
            print(f"        {m['corpus']}/{m['model']}: {m['detail'][:260]}")


def write_summary(todo_keys: set | None = None) -> dict:
    rows = list(load_rows().values())
    summary = summarize(rows)
    fails = failures(rows)
    print_table(summary)
    print_failures(fails)
    extra: dict = {}
    if PROTOCOL == OBS_PROTOCOL:
        fam = {p["name"]: p["family"] for p in timm_families()} if TIMM_FAMILIES.exists() else {}
        extra["table"] = [{"corpus": r["corpus"], "model": r["model"], "family": fam.get(r["model"]),
                           "status": r["status"], "observable": r.get("observable"),
                           "params_removed": r.get("params_removed"), "refusal_kind": r.get("refusal_kind"),
                           "relative_diff": r.get("relative_diff"), "diverging_node": r.get("diverging_node"),
                           "diverging_module": r.get("diverging_module"), "inputs": r.get("inputs"),
                           "error": r.get("error") if r["status"] != "ok" else None}
                          for r in sorted(rows, key=lambda r: (r["corpus"], r["model"]))]
        refused = [t for t in extra["table"] if t["status"] == "refused"]
        print(f"\nrefused: {len(refused)} (structural {sum(t['refusal_kind'] == 'structural' for t in refused)})")
        for t in refused:
            print(f"  {t['corpus']}/{t['model']}: {t['refusal_kind']} rel {t['relative_diff']:.3g} at "
                  f"{t['diverging_node']} ({t['diverging_module']})")
    SUMMARY.write_text(json.dumps({"protocol": PROTOCOL, "summary": summary, "fxprune_failures": fails,
                                   **({} if PROTOCOL == OBS_PROTOCOL else
                                      {"tp_failures": failures(rows, "torch-pruning")}), **extra,
                                   "rows": sorted(rows, key=lambda r: (r["corpus"], r["model"], r["lib"]))},
                                  indent=1, default=str))
    print(f"\nwrote {SUMMARY} ({len(rows)} rows)")
    return summary


# --------------------------------------------------------------------------------------------------- driver


def model_list(corpus: str, timm_n: int | None, observable: bool = False) -> list[str]:
    if corpus == "torchvision":
        return C.torchvision_names()
    if corpus == "timm" and observable:
        names = [p["name"] for p in timm_families()][:timm_n]
        return names + [n for n in TIMM_EXTRA if n not in names]
    if corpus == "timm":
        return [p["name"] for p in C.timm_sample(timm_n, cache=TIMM_SAMPLE)]
    return list(C.HF_NAMES)


def is_heavy(corpus: str, name: str) -> bool:
    if corpus == "torchvision":
        return name in HEAVY
    if corpus == "timm" and PROTOCOL == OBS_PROTOCOL and TIMM_FAMILIES.exists():
        est = {p["name"]: p.get("params") or 0 for p in json.loads(TIMM_FAMILIES.read_text())}
        return est.get(name, 0) > 250e6
    if corpus == "timm" and TIMM_SAMPLE.exists():
        est = {p["name"]: p.get("params_est", 0) for p in json.loads(TIMM_SAMPLE.read_text())}
        return est.get(name, 0) > 250e6
    return False


def main() -> None:
    global JSONL, SUMMARY, PROTOCOL, STATUSES
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="all", choices=["torchvision", "timm", "hf", "all"])
    ap.add_argument("--limit", type=int, default=None, help="first N models of each corpus")
    ap.add_argument("--only", default=None, help="comma-separated model names")
    ap.add_argument("--jobs", type=int, default=2, help="parallel model subprocesses (1 thread each)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per (model, library)")
    ap.add_argument("--heavy-timeout", type=int, default=600, help="seconds for > 250M-param models (run last, alone)")
    ap.add_argument("--timm-sample", type=int, default=None, help="first N timm families (default: all, >= 100)")
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--fresh", action="store_true", help="recompute rows already in the JSONL")
    ap.add_argument("--rerun", default="", help="recompute rows with these statuses, e.g. 'timeout,error'")
    ap.add_argument("--rerun-error", default="", help="recompute rows whose error contains this text")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--observable", action="store_true",
                    help="issue-21 mode: fxprune only, every timm family, small inputs, 'refused' rows classified; "
                         "writes results/coverage_observable*.json*")
    ap.add_argument("--max-side", type=int, default=160, help="observable mode: cap of the image side")
    a = ap.parse_args()
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    mode = ""
    if a.observable:
        JSONL, SUMMARY, PROTOCOL, STATUSES = OBS_JSONL, OBS_SUMMARY, OBS_PROTOCOL, OBS_STATUSES
        a.libs = "fxprune"
        mode = f"observable:{a.max_side}"
    if a.summary_only:
        write_summary()
        return
    corpora = ["torchvision", "timm", "hf"] if a.corpus == "all" else [a.corpus]
    only = set(a.only.split(",")) if a.only else None
    todo = []
    for corpus in corpora:
        names = model_list(corpus, a.timm_sample, a.observable)
        if only:
            names = [n for n in names if n in only]
        todo += [(corpus, n) for n in names[: a.limit]]
    done = load_rows()
    rerun = set(filter(None, a.rerun.split(",")))

    def needed(k: tuple) -> bool:
        if a.fresh or k not in done:
            return True
        r = done[k]
        return (r["status"] in rerun or ("timeout" in rerun and bool(r.get("timeout")))
                or bool(a.rerun_error and a.rerun_error in (r.get("error") or "")))

    libs = a.libs.split(",")
    jobs = [(c, n, lib) for c, n in todo for lib in libs if needed((c, n, lib))]
    light = [j for j in jobs if not is_heavy(j[0], j[1])]
    heavy = [j for j in jobs if is_heavy(j[0], j[1])]
    print(f"{len(todo)} models, {len(jobs)} runs to do ({len(heavy)} heavy, run last one at a time); "
          f"rows -> {JSONL}", flush=True)
    lock = threading.Lock()

    def one(job, timeout):
        c, n, lib = job
        r = C.spawn(__file__, ["--worker", c, n, lib, mode], timeout)
        if r.get("status") == "timeout":
            r.update(status="error", timeout=True)
        r.update({"corpus": c, "model": n, "lib": lib, "protocol": PROTOCOL, "timeout_s": timeout,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        with lock:
            with JSONL.open("a") as f:
                f.write(json.dumps(r, default=str) + "\n")
            print(f"{c:<12}{n:<36}{lib:<14}{r['status']:<16}{r.get('params_removed') or 0:>7.3f}"
                  f"{r.get('seconds') or 0:>8.1f}s  {(r.get('error') or '')[:110]}", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=max(a.jobs, 1)) as ex:
        list(ex.map(lambda j: one(j, a.timeout), light))
    for j in heavy:
        one(j, a.heavy_timeout)
    write_summary()


if __name__ == "__main__":
    main()
