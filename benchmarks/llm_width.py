"""LLM width pruning on real weights (issue 13): SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

SmolLM2 (``fxprune.data.smollm2``, fp32): perplexity on the second half of the music21 English text (Austen's *Lady
Susan*; ``--windows`` non-overlapping windows of 512 tokens, 30 = the whole second half, 15,330 predicted tokens);
calibration data from the first half only. Rows, at 10/20/30% fewer parameters (``--targets``):

* ``fxprune``: ``ChannelPrune(target_params=..., scope="uniform")`` + ``Shrink`` with magnitude (``l2``) or activation
  importance (Minitron's criterion, ``ActivationImportance`` over the calibration windows), norms ``exact`` (verified
  shrunk == masked) or ``renormalize`` (approximate), the hidden size pruned at ``norm_scale`` (0.25) times the MLP
  ratio; plus ``mlp`` rows (activation importance, hidden size kept, ``norm_scale=0``). Heads and head_dim are kept
  (a stock config: ``fxprune.hf.save_pretrained`` writes them).
* ``torch-pruning``: Torch-Pruning's own LLM recipe (examples/LLMs/prune_llm.py: BasePruner, group magnitude
  importance p=2, hidden size, MLP and whole heads pruned at one ratio, head_dim kept, lm_head ignored, round_to=4;
  ``attn_implementation="eager"`` as its GQA grouping needs, embed/lm_head re-tied before counting), its ratio
  searched so its parameter count matches the fxprune activation/exact row of the same target.

Then a short recovery for the best fxprune row and the Torch-Pruning row of each target: logit distillation (KL to
the dense model's next-token distribution, T=1) on random windows of the first half, the same budget for every row
(``--recover-steps`` AdamW steps of ``--recover-batch`` x ``--recover-seq`` tokens), and perplexity again.
Each row runs in its own process (its peak RSS is its own); results are cached per row in the JSON, so an
interrupted run resumes (``--force`` recomputes).

MiniLM (``fxprune.data.minilm``): mean cosine similarity of sentence embeddings (mean pooling) of the text's
second-half sentences to the dense model after pruning 20/30% of the widths (MLP neurons and head_dim; the hidden
size is the output, so it stays), magnitude vs activation importance (calibration: first-half sentences).

    python benchmarks/llm_width.py                      # everything (hours on 2 busy cores)
    python benchmarks/llm_width.py --part minilm
    python benchmarks/llm_width.py --windows 30 --targets 0.2 --recover-steps 200
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SCORES = Path(os.environ.get("FXPRUNE_CACHE", os.path.expanduser("~/.cache/fxprune"))) / "llm_width"

import numpy as np  # noqa: E402
import torch  # noqa: E402

NORM_SCALE = 0.25


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ================================================================================================ data
def smollm_data(calib_windows: int):
    from fxprune.data import english_text, smollm2

    model, tok = smollm2()
    ids = tok(english_text(), return_tensors="pt").input_ids[0]
    half = ids.numel() // 2
    first, second = ids[:half], ids[half:]
    calib = [{"input_ids": first[i * 512:(i + 1) * 512].unsqueeze(0)} for i in range(calib_windows)]
    example = {"input_ids": first[:512].unsqueeze(0), "use_cache": False}
    return model, tok, first, second, calib, example


def ppl(model, second, windows: int) -> dict:
    from fxprune.evaluate import perplexity

    t = time.perf_counter()
    p = perplexity(model, second, window=512, max_windows=windows)
    return {"ppl": round(p.value, 3), "tokens": p.tokens, "eval_s": round(time.perf_counter() - t, 1)}


def count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ================================================================================================ fxprune rows
def activation_scores(args) -> dict[int, np.ndarray]:
    """Activation importance of every group, computed once over the calibration windows and cached on disk."""
    path = SCORES / f"smollm2_activation_calib{args.calib_windows}.npz"
    if path.exists():
        z = np.load(path)
        return {int(k): z[k] for k in z.files}
    import fxprune
    from fxprune.passes.activation_importance import ActivationImportance, ImportanceRecord

    model, _, _, _, calib, example = smollm_data(args.calib_windows)
    t = time.perf_counter()
    c = fxprune.compile(model, example, passes=[ActivationImportance("activation")], data=calib, verify=False,
                        count_flops=False)
    rec = c.program.records_of(ImportanceRecord)[0]
    print(f"activation importance over {args.calib_windows} x 512 tokens: {time.perf_counter() - t:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{str(k): v for k, v in rec.scores.items()})
    return {int(k): np.asarray(v) for k, v in rec.scores.items()}


def fxprune_compile(model, example, target: float, importance: str, norms: str, policy: str, scores):
    import fxprune
    from fxprune.passes import ChannelPrune, Shrink

    imp: Any = "l2"
    if importance == "activation":
        def imp(g, prog, scores=scores):  # noqa: E306 - the cached Minitron scores, by group id
            return scores[g.id]
    scale = 0.0 if policy == "mlp" else NORM_SCALE
    return fxprune.compile(model, example, passes=[
        ChannelPrune(target_params=1.0 - target, scope="uniform", importance=imp, norms=norms, norm_scale=scale),
        Shrink()], count_flops=False)


def widths(module) -> dict:
    m = module.model
    l0 = getattr(m.layers, "0")  # a ModuleList in HF, a plain submodule in an exported GraphModule
    return {"hidden": int(m.embed_tokens.weight.shape[1]),
            "intermediate": int(l0.mlp.gate_proj.weight.shape[0]),
            "q_heads": int(l0.self_attn.q_proj.weight.shape[0]) // 64,
            "kv_heads": int(l0.self_attn.k_proj.weight.shape[0]) // 64}


def row_fxprune(args, key: str, spec: dict) -> dict:
    scores = activation_scores(args) if spec["importance"] == "activation" else None
    model, _, first, second, _, example = smollm_data(args.calib_windows)
    dense = count(model)
    t = time.perf_counter()
    out = fxprune_compile(model, example, spec["target"], spec["importance"], spec["norms"], spec["policy"], scores)
    compile_s = time.perf_counter() - t
    del model
    r = out.report
    row = {**spec, "params": count(out.module), "params_frac": round(count(out.module) / dense, 4),
           "compile_s": round(compile_s, 1), "verified": r.verified, "approximate": r.approximate,
           "max_abs_diff": r.max_abs_diff, "norms_pruned": len(r.norms), "widths": widths(out.module)}
    row.update(ppl(out.module, second, args.windows))
    if spec.get("recover"):
        row.update(recover(args, out.module, first, second))
    row["peak_rss_mb"] = round(peak_rss_mb())
    return row


# ================================================================================================ Torch-Pruning rows
def tp_prune(ratio: float):
    """Torch-Pruning's examples/LLMs/prune_llm.py recipe on a fresh SmolLM2 (eager attention)."""
    import torch_pruning as tp
    from fxprune.data import smollm2

    model, _ = smollm2(attn_implementation="eager")
    cfg = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    example = torch.randint(0, cfg.vocab_size, (1, 64))
    pruner = tp.pruner.BasePruner(
        model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, output_transform=lambda x: x.logits, pruning_ratio=ratio,
        ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, round_to=4)
    with torch.no_grad():
        pruner.step()
    # the recipe's config update (TP prunes tensors, not attributes)
    cfg.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            nq, nkv = m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim
            cfg.num_attention_heads, cfg.num_key_value_heads = nq, nkv
            m.num_key_value_groups = nq // nkv
        elif name.endswith("mlp"):
            cfg.intermediate_size = m.gate_proj.out_features
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    if emb.shape == head.shape and torch.equal(emb, head):
        model.lm_head.weight = emb  # TP returns them untied: re-tie (same values) before counting
    return model.eval()


def row_tp(args, key: str, spec: dict) -> dict:
    from fxprune.data import english_text, smollm2

    model, tok = smollm2()
    ids = tok(english_text(), return_tensors="pt").input_ids[0]
    half = ids.numel() // 2
    first, second = ids[:half], ids[half:]
    dense = count(model)
    del model
    want = spec["params_target"]
    t = time.perf_counter()
    # ratio search: params(ratio) is smooth and decreasing; secant steps from the quadratic guess
    r = 1 - math.sqrt(want / dense)
    tried = []
    for _ in range(6):
        m = tp_prune(r)
        n = count(m)
        tried.append((round(r, 5), n))
        if abs(n - want) / dense < 0.003:
            break
        if len(tried) >= 2:
            (r0, n0), (r1, n1) = tried[-2], tried[-1]
            r = r1 + (want - n1) * (r1 - r0) / (n1 - n0) if n1 != n0 else r1 + 0.01
        else:
            r = r + (n - want) / dense / 1.6
        del m
    prune_s = time.perf_counter() - t
    w = {"hidden": m.config.hidden_size, "intermediate": m.config.intermediate_size,
         "q_heads": m.config.num_attention_heads, "kv_heads": m.config.num_key_value_heads}
    row = {**spec, "ratio": round(r, 4), "ratio_search": tried, "params": count(m),
           "params_frac": round(count(m) / dense, 4), "compile_s": round(prune_s, 1), "verified": None,
           "widths": w}
    row.update(ppl(m, second, args.windows))
    if spec.get("recover"):
        row.update(recover(args, m, first, second))
    row["peak_rss_mb"] = round(peak_rss_mb())
    return row


# ================================================================================================ recovery
def recover(args, student, first: torch.Tensor, second: torch.Tensor) -> dict:
    """Logit distillation from the dense model: the same steps, batch and sequence length for every row."""
    from fxprune.data import smollm2
    from fxprune.evaluate import _logits

    teacher, _ = smollm2()
    teacher.eval()
    g = torch.Generator().manual_seed(0)
    params = [p for n, p in student.named_parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.recover_lr, weight_decay=0.0)
    _mode(student, True)
    B, L, steps = args.recover_batch, args.recover_seq, args.recover_steps
    cpu0, t0 = time.process_time(), time.perf_counter()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, first.numel() - L - 1, (B,), generator=g)
        x = torch.stack([first[s:s + L] for s in starts.tolist()])
        with torch.no_grad():
            pt = torch.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1)
        ps = torch.log_softmax(_logits(student(input_ids=x, use_cache=False)).float(), -1)
        loss = torch.nn.functional.kl_div(ps.flatten(0, 1), pt.flatten(0, 1), log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss))
        if step % 20 == 0:
            print(f"  recover step {step}: kl {float(loss):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    _mode(student, False)
    for p in params:
        p.grad = None
    out = {"recover_steps": steps, "recover_tokens": steps * B * L, "recover_cpu_s": round(time.process_time() - cpu0, 1),
           "recover_wall_s": round(time.perf_counter() - t0, 1), "recover_kl_first": round(np.mean(losses[:10]), 4),
           "recover_kl_last": round(np.mean(losses[-10:]), 4)}
    with torch.no_grad():
        r = ppl(student, second, args.windows)
    out.update({"ppl_recovered": r["ppl"], "eval_recovered_s": r["eval_s"]})
    return out


def _mode(model, train: bool) -> None:
    """train()/eval() for HF models; an exported GraphModule has no dropout here and refuses train()."""
    try:
        model.train(train)
    except (NotImplementedError, RuntimeError):
        pass


# ================================================================================================ MiniLM
def sentences(text: str) -> list[str]:
    import re

    out = [s.strip().replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in out if 20 <= len(s) <= 400]


def minilm_part(args) -> dict:
    import fxprune
    from fxprune.data import english_text, mean_pool, minilm
    from fxprune.evaluate import embedding_cosine
    from fxprune.passes import ChannelPrune, Shrink

    model, tok = minilm()
    sents = sentences(english_text())
    half = len(sents) // 2
    calib_s, eval_s = sents[:half][:args.minilm_calib], sents[half:][:args.minilm_eval]

    def enc(batch):
        e = tok(batch, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    def embed(mod, batch):
        with torch.no_grad():
            e = enc(batch)
            out = mod(**e)
            h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
            return mean_pool(h, e["attention_mask"])

    ref = torch.cat([embed(model, eval_s[i:i + 32]) for i in range(0, len(eval_s), 32)])
    calib = [enc(calib_s[i:i + 16]) for i in range(0, len(calib_s), 16)]
    example = enc(eval_s[:4])
    dense = count(model)
    rows = []
    for ratio in (0.2, 0.3):
        for importance in ("l2", "activation"):
            t = time.perf_counter()
            out = fxprune.compile(model, example, passes=[ChannelPrune(ratio=ratio, importance=importance), Shrink()],
                                  data=calib, count_flops=False)
            dt = time.perf_counter() - t
            cand = torch.cat([embed(out.module, eval_s[i:i + 32]) for i in range(0, len(eval_s), 32)])
            rows.append({"ratio": ratio, "importance": importance, "params": count(out.module),
                         "params_frac": round(count(out.module) / dense, 4),
                         "cosine": round(embedding_cosine(ref, cand), 5), "verified": out.report.verified,
                         "compile_s": round(dt, 1)})
            print(rows[-1], flush=True)
    return {"model": "all-MiniLM-L6-v2", "params_dense": dense, "calib_sentences": len(calib_s),
            "eval_sentences": len(eval_s), "max_length": 64, "rows": rows, "peak_rss_mb": round(peak_rss_mb())}


# ================================================================================================ driver
def specs(args, results: dict) -> list[tuple[str, dict]]:
    out = [("dense", {"method": "dense"})]
    for t in args.targets:
        for importance in ("l2", "activation"):
            for norms in ("exact", "renormalize"):
                out.append((f"fxprune/{importance}/{norms}/hidden+mlp/{t}", {
                    "method": "fxprune", "target": t, "importance": importance, "norms": norms,
                    "policy": "hidden+mlp"}))
        out.append((f"fxprune/activation/exact/mlp/{t}", {
            "method": "fxprune", "target": t, "importance": "activation", "norms": "exact", "policy": "mlp"}))
    return out


def run_row(args, key: str, spec: dict) -> dict:
    """Run one row in a fresh process (own peak RSS), returning its JSON."""
    cmd = [sys.executable, __file__, "--row", json.dumps({"key": key, "spec": spec}), "--windows", str(args.windows),
           "--calib-windows", str(args.calib_windows), "--recover-steps", str(args.recover_steps),
           "--recover-batch", str(args.recover_batch), "--recover-seq", str(args.recover_seq),
           "--recover-lr", str(args.recover_lr), "--threads", str(args.threads)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-4000:], flush=True)
        return {**spec, "error": r.stderr.strip().splitlines()[-1][:500] if r.stderr.strip() else "failed"}
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["row_wall_s"] = round(time.perf_counter() - t, 1)
    return row


def one_row(args, key: str, spec: dict) -> dict:
    if spec["method"] == "dense":
        model, _, _, second, _, _ = smollm_data(args.calib_windows)
        row = {**spec, "params": count(model), "params_frac": 1.0}
        row.update(ppl(model, second, args.windows))
        row["peak_rss_mb"] = round(peak_rss_mb())
        return row
    if spec["method"] == "fxprune":
        return row_fxprune(args, key, spec)
    return row_tp(args, key, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("smollm", "minilm", "all"), default="all")
    ap.add_argument("--windows", type=int, default=30)
    ap.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.2, 0.3])
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--recover-steps", type=int, default=200)
    ap.add_argument("--recover-batch", type=int, default=4)
    ap.add_argument("--recover-seq", type=int, default=64)
    ap.add_argument("--recover-lr", type=float, default=5e-5)
    ap.add_argument("--no-recover", action="store_true")
    ap.add_argument("--minilm-calib", type=int, default=128)
    ap.add_argument("--minilm-eval", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "llm_width.json"))
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.row:
        job = json.loads(args.row)
        print(json.dumps(one_row(args, job["key"], job["spec"])))
        return
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    settings = {"windows": args.windows, "window": 512, "calib_windows": args.calib_windows, "norm_scale": NORM_SCALE,
                "recover_steps": args.recover_steps, "recover_batch": args.recover_batch,
                "recover_seq": args.recover_seq, "recover_lr": args.recover_lr, "threads": args.threads}
    if results.get("settings", settings) != settings and not args.force:
        print(f"settings changed {results.get('settings')} -> {settings}: starting a new table", flush=True)
        results = {}
    results["settings"] = settings
    results.setdefault("rows", {})
    results["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__,
                          "note": "shared 2-core machine: wall times include contention from other jobs"}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    if args.part in ("smollm", "all"):
        todo = specs(args, results)
        for key, spec in todo:
            if key in results["rows"] and "error" not in results["rows"][key] and not args.force:
                continue
            print(f"== {key}", flush=True)
            results["rows"][key] = run_row(args, key, spec)
            print(json.dumps(results["rows"][key]), flush=True)
            save()
        for t in args.targets:
            ref = results["rows"].get(f"fxprune/activation/exact/hidden+mlp/{t}", {})
            key = f"torch-pruning/{t}"
            if "params" in ref and (key not in results["rows"] or "error" in results["rows"][key] or args.force):
                print(f"== {key}", flush=True)
                results["rows"][key] = run_row(args, key, {"method": "torch-pruning", "target": t,
                                                           "params_target": ref["params"]})
                print(json.dumps(results["rows"][key]), flush=True)
                save()
        if not args.no_recover:
            for t in args.targets:
                cands = [(v["ppl"], k) for k, v in results["rows"].items()
                         if v.get("method") == "fxprune" and v.get("target") == t and "ppl" in v]
                picks = ([min(cands)[1]] if cands else []) + [f"torch-pruning/{t}"]
                for k in picks:
                    rk = k + "/recovered"
                    base = results["rows"].get(k)
                    if base is None or "ppl" not in base or (rk in results["rows"] and "error" not in
                                                              results["rows"][rk] and not args.force):
                        continue
                    spec = {x: base[x] for x in ("method", "target", "importance", "norms", "policy", "params_target")
                            if x in base}
                    print(f"== {rk}", flush=True)
                    results["rows"][rk] = run_row(args, rk, {**spec, "recover": True})
                    print(json.dumps(results["rows"][rk]), flush=True)
                    save()
    if args.part in ("minilm", "all"):
        results["minilm"] = minilm_part(args)
        save()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
