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
  ``attn_implementation="eager"`` as its GQA grouping needs, traced with ``use_cache=False`` (see ``tp_prune``: with
  transformers 5's KV cache its group traversal never terminates), embed/lm_head re-tied before counting), its ratio
  searched (bracketing, 3-12 prunes of ~10 s each) so its parameter count matches the fxprune ``exact/hidden+mlp``
  rows of the same target within 0.3% of the dense count; ``compile_s`` is the one prune at the chosen ratio,
  ``ratio_search_s`` the whole search.

Then a short recovery for the best fxprune row and the Torch-Pruning row of each target: logit distillation (KL to
the dense model's next-token distribution, T=1) on random windows of the first half, the same budget for every row
(``--recover-steps`` AdamW steps of ``--recover-batch`` x ``--recover-seq`` tokens), and perplexity again.
Each row runs in its own process (its peak RSS is its own); results are cached per row in the JSON, so an
interrupted run resumes (``--force`` recomputes).

MiniLM (``fxprune.data.minilm``): mean cosine similarity of sentence embeddings (mean pooling) of the text's
second-half sentences to the dense model after pruning 20/30% of the widths (MLP neurons and head_dim; the hidden
size is the output, so it stays), magnitude vs activation importance (calibration: first-half sentences).

    python benchmarks/llm_width.py --jobs 3 --threads 1  # everything (hours on 2 busy cores)
    # what results/llm_width.json holds (4 eval windows = 2,044 tokens; 30 and 0.3 were not run):
    python benchmarks/llm_width.py --part smollm --windows 4 --calib-windows 4 --jobs 3 --threads 1
    python benchmarks/llm_width.py --part minilm --out benchmarks/results/llm_width_minilm.json
    # its Torch-Pruning rows, added afterwards with the same settings (the cached fxprune rows are not re-run):
    python benchmarks/llm_width.py --part smollm --windows 4 --calib-windows 4 --targets 0.1,0.2 --no-recover \\
        --threads 1
    python benchmarks/llm_width.py --part smollm --windows 4 --calib-windows 4 --targets 0.2 --threads 1  # + recovered
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
def score_path(args) -> Path:
    return SCORES / f"smollm2_activation_calib{args.calib_windows}.npz"


def activation_scores(args) -> dict[int, np.ndarray]:
    """Activation importance of every group, computed once over the calibration windows and cached on disk."""
    path = score_path(args)
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
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{str(k): v for k, v in rec.scores.items()})
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
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
    if spec.get("recover"):  # the one-shot perplexity is the base row's (ppl_one_shot)
        row.update(recover(args, out.module, first, second))
    else:
        row.update(ppl(out.module, second, args.windows))
    row["peak_rss_mb"] = round(peak_rss_mb())
    return row


# ================================================================================================ Torch-Pruning rows
def _speed_up_tp() -> None:
    """Torch-Pruning 1.6's ``Group.has_pruning_op`` scans the whole group for every dependency it visits (quadratic
    in the group size, with a 576-index list comparison per step): collecting SmolLM2's hidden-size group alone took
    over 25 minutes. Index the group by (target node, handler) instead: the same answer, found without the scan, so
    the groups and the pruning are unchanged."""
    from torch_pruning.dependency.group import Group

    if getattr(Group, "_fxprune_indexed", False):
        return
    add_dep, has_op = Group.add_dep, Group.has_pruning_op

    def indexed_add_dep(self, dep, idxs):
        add_dep(self, dep, idxs)
        d = self.__dict__
        d.setdefault("_fx_index", {}).setdefault((id(dep.target), dep.handler), []).append(idxs)
        n = d.get("_fx_n", 0)
        d["_fx_n"] = None if n is None else n + 1  # None: invalidated, stays so

    def indexed_has_pruning_op(self, dep, idxs):
        d = self.__dict__
        if d.get("_fx_n") != len(self._group):  # the list was edited some other way: the original scan
            return has_op(self, dep, idxs)
        return any(i == idxs for i in d["_fx_index"].get((id(dep.target), dep.handler), ()))

    def invalidating(fn):  # in-place edits (merging, item assignment) keep the length: drop the index
        def wrapped(self, *a, **k):
            out = fn(self, *a, **k)
            self.__dict__["_fx_n"] = None
            return out
        return wrapped

    Group.add_dep, Group.has_pruning_op, Group._fxprune_indexed = indexed_add_dep, indexed_has_pruning_op, True
    Group.add_and_merge, Group.__setitem__ = invalidating(Group.add_and_merge), invalidating(Group.__setitem__)


def tp_prune(ratio: float):
    """Torch-Pruning's examples/LLMs/prune_llm.py recipe on a fresh SmolLM2 (eager attention).

    The traced example runs with ``use_cache=False``. With the cache on, transformers 5's ``DynamicLayer.update``
    appends the first keys/values to an empty cache tensor with ``torch.cat(..., dim=-2)``: 60 extra concat nodes in
    Torch-Pruning 1.6's graph (120 with the cache, 60 without: RoPE's rotate_half), 30 of them read as channel
    concats with offsets [0, 192, 384]. Its group traversal from the first ``k_proj`` root then never terminates:
    each lap of a cycle through that concat, RoPE's slices/neg/cat/mul/add, repeat_kv's unsqueeze/reshape and a
    transpose shifts the indices by the concat offset, so ``has_pruning_op`` never sees a repeat (measured: 26,500
    group items with indices past 460,000 on a 192-wide layer after 10 s, still growing; the earlier runs were
    stopped after 30-43 CPU minutes). transformers 4.x, which the recipe was written for, stored the first keys
    without a cat, and the cache plays no part in the logits of one forward pass. With it off, one call (trace,
    groups, importance, pruning) takes 8-14 s."""
    import torch_pruning as tp
    from fxprune.data import smollm2

    _speed_up_tp()

    model, _ = smollm2(attn_implementation="eager")
    cfg = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    example = {"input_ids": torch.randint(0, cfg.vocab_size, (1, 64)), "use_cache": False}  # see the docstring
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


def tp_check(dense: dict, m) -> dict:
    """Is Torch-Pruning's model the dense one restricted to one set of kept hidden channels, MLP channels and heads,
    with every kept query head still reading its own GQA key/value head? Compares every weight with that slice of
    the dense weight (the kept indices found by matching rows in order)."""
    P = m.state_dict()

    def kept(wd, wp):  # the rows of wd that wp keeps, in order (None: wp is not such a subset)
        out, j = [], 0
        for i in range(wd.shape[0]):
            if j < wp.shape[0] and torch.equal(wd[i], wp[j]):
                out.append(i)
                j += 1
        return torch.tensor(out) if j == wp.shape[0] else None

    hid = kept(dense["model.embed_tokens.weight"].T, P["model.embed_tokens.weight"].T)
    if hid is None:
        return {"slices_of_dense": False, "gqa_heads_consistent": False}
    want = {"model.norm.weight": (hid,), "lm_head.weight": (slice(None), hid)}
    gqa = True
    n_layers = sum(1 for k in dense if k.endswith("self_attn.q_proj.weight"))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        rows = {x: kept(dense[p + x + ".weight"][:, hid], P[p + x + ".weight"])
                for x in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj")}
        if any(v is None for v in rows.values()):
            return {"slices_of_dense": False, "gqa_heads_consistent": False}
        q, k, g = rows["self_attn.q_proj"], rows["self_attn.k_proj"], rows["mlp.gate_proj"]
        qh, kh = q.view(-1, 64)[:, 0] // 64, k.view(-1, 64)[:, 0] // 64  # whole heads (head_dim 64) kept
        rep0 = dense[p + "self_attn.q_proj.weight"].shape[0] // dense[p + "self_attn.k_proj.weight"].shape[0]
        rep1 = len(qh) // len(kh)
        gqa &= all(int(kh[j // rep1]) == int(h) // rep0 for j, h in enumerate(qh))
        want.update({p + "self_attn.q_proj.weight": (q, hid), p + "self_attn.k_proj.weight": (k, hid),
                     p + "self_attn.v_proj.weight": (rows["self_attn.v_proj"], hid),
                     p + "self_attn.o_proj.weight": (hid, q), p + "mlp.gate_proj.weight": (g, hid),
                     p + "mlp.up_proj.weight": (g, hid), p + "mlp.down_proj.weight": (hid, g),
                     p + "input_layernorm.weight": (hid,), p + "post_attention_layernorm.weight": (hid,)})
    ok = set(want) | {"model.embed_tokens.weight"} == set(P)
    for name, idx in want.items():
        w = dense[name][idx[0]]
        ok &= torch.equal(w[:, idx[1]] if len(idx) > 1 else w, P[name])
    return {"slices_of_dense": bool(ok), "gqa_heads_consistent": bool(gqa)}


def row_tp(args, key: str, spec: dict) -> dict:
    from fxprune.data import english_text, smollm2

    model, tok = smollm2()
    ids = tok(english_text(), return_tensors="pt").input_ids[0]
    half = ids.numel() // 2
    first, second = ids[:half], ids[half:]
    dense = count(model)
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}
    del model
    want, tol = spec["params_target"], 0.003 * dense
    t = time.perf_counter()
    # ratio search: params(ratio) is a decreasing staircase (round_to=4); keep a bracket [lo, hi] around the target,
    # interpolate inside it (bisect once it is narrow), stop within tol, keep the closest model
    tried: list = []
    best = None  # (|n - want|, ratio, params, model, seconds of that one tp_prune call)
    lo, hi = (0.0, dense), (0.5, None)  # (ratio, params): params(lo) >= want >= params(hi) once hi is known
    r = spec.get("ratio", 1 - math.sqrt(want / dense))  # a recovered row: the one-shot row's ratio, pruned once
    for _ in range(1 if "ratio" in spec else 12):
        t1 = time.perf_counter()
        m = tp_prune(r)
        n, dt = count(m), time.perf_counter() - t1
        tried.append((round(r, 6), n))
        print(f"  tp ratio {r:.6f}: {n} params ({(n - want) / dense:+.4f} of dense off the target, {dt:.0f} s)",
              flush=True)
        if best is None or abs(n - want) < best[0]:
            best = (abs(n - want), r, n, m, dt)
        del m
        if best[0] <= tol or "ratio" in spec:
            break
        if n > want:
            lo = (r, n)
        else:
            hi = (r, n)
        if hi[1] is None:  # no bracket yet: the quadratic guess, params falling ~1.6 x dense per unit ratio
            r = r + (n - want) / dense / 1.6
        else:
            (r0, n0), (r1, n1) = lo, hi
            r = r0 + (n0 - want) * (r1 - r0) / (n0 - n1) if n0 != n1 else (r0 + r1) / 2
            if not (r0 + 0.1 * (r1 - r0) <= r <= r1 - 0.1 * (r1 - r0)):
                r = (r0 + r1) / 2
        if any(abs(r - x) < 1e-7 for x, _ in tried):
            break
    search_s = time.perf_counter() - t
    _, r, _, m, prune_s = best
    w = {"hidden": m.config.hidden_size, "intermediate": m.config.intermediate_size,
         "q_heads": m.config.num_attention_heads, "kv_heads": m.config.num_key_value_heads}
    row = {**spec, "ratio": r, "ratio_search": tried, "params": count(m), "params_frac": round(count(m) / dense, 4),
           "compile_s": round(prune_s, 1), "ratio_search_s": round(search_s, 1), "verified": None, "widths": w,
           **tp_check(dense_sd, m)}
    del dense_sd
    if spec.get("recover"):
        row.update(recover(args, m, first, second))
    else:
        row.update(ppl(m, second, args.windows))
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
    B, L, steps = args.recover_batch, args.recover_seq, args.recover_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(args.recover_schedule, s, steps))
    _mode(student, True)
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
        sched.step()
        losses.append(float(loss))
        if step % 20 == 0:
            print(f"  recover step {step}: kl {float(loss):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    _mode(student, False)
    for p in params:
        p.grad = None
    out = {"recover_steps": steps, "recover_schedule": args.recover_schedule, "recover_tokens": steps * B * L, "recover_cpu_s": round(time.process_time() - cpu0, 1),
           "recover_wall_s": round(time.perf_counter() - t0, 1), "recover_kl_first": round(np.mean(losses[:10]), 4),
           "recover_kl_last": round(np.mean(losses[-10:]), 4)}
    with torch.no_grad():
        r = ppl(student, second, args.windows)
    out.update({"ppl_recovered": r["ppl"], "eval_recovered_s": r["eval_s"]})
    return out


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning-rate multiplier at ``step``: ``constant``, or ``cosine`` (linear warm-up over the first 5% of the
    steps, then cosine decay to 10% of the rate)."""
    if schedule == "constant":
        return 1.0
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


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
def specs_for_target(t: float) -> list[tuple[str, dict]]:
    out = []
    for importance in ("l2", "activation"):
        for norms in ("exact", "renormalize"):
            out.append((f"fxprune/{importance}/{norms}/hidden+mlp/{t}", {
                "method": "fxprune", "target": t, "importance": importance, "norms": norms, "policy": "hidden+mlp"}))
    out.append((f"fxprune/activation/exact/mlp/{t}", {
        "method": "fxprune", "target": t, "importance": "activation", "norms": "exact", "policy": "mlp"}))
    return out


def run_row(args, key: str, spec: dict) -> dict:
    """Run one row in a fresh process (own peak RSS), returning its JSON."""
    cmd = [sys.executable, __file__, "--row", json.dumps({"key": key, "spec": spec}), "--windows", str(args.windows),
           "--calib-windows", str(args.calib_windows), "--recover-steps", str(args.recover_steps),
           "--recover-batch", str(args.recover_batch), "--recover-seq", str(args.recover_seq),
           "--recover-lr", str(args.recover_lr),
           "--recover-schedule", args.recover_schedule, "--threads", str(args.threads)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    log = SCORES / "logs" / (key.replace("/", "_") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(r.stdout + r.stderr)
    try:
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip().splitlines()[-1][:500] if r.stderr.strip() else f"exit {r.returncode}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - recorded in the table
        print(r.stderr[-4000:], flush=True)
        return {**spec, "error": str(e)[:500], "row_wall_s": round(time.perf_counter() - t, 1)}
    row["row_wall_s"] = round(time.perf_counter() - t, 1)
    row["threads"] = args.threads
    return row


def one_row(args, key: str, spec: dict) -> dict:
    if spec["method"] == "dense":
        model, _, _, second, _, _ = smollm_data(args.calib_windows)
        row = {**spec, "params": count(model), "params_frac": 1.0}
        row.update(ppl(model, second, args.windows))
        row["peak_rss_mb"] = round(peak_rss_mb())
        return row
    if spec["method"] == "scores":
        t = time.perf_counter()
        activation_scores(args)
        return {**spec, "calib_tokens": 512 * args.calib_windows, "calib_s": round(time.perf_counter() - t, 1),
                "peak_rss_mb": round(peak_rss_mb())}
    if spec["method"] == "fxprune":
        return row_fxprune(args, key, spec)
    return row_tp(args, key, spec)


def jobs_for(args) -> list[tuple[str, dict]]:
    """Every SmolLM2 row in priority order (targets in the order given)."""
    out = [("dense", {"method": "dense"}), ("scores", {"method": "scores"})]
    for t in args.targets:
        out += [(k, s) for k, s in specs_for_target(t)]
        out.append((f"torch-pruning/{t}", {"method": "torch-pruning", "target": t}))
        if not args.no_recover:
            out.append((f"recovered/{t}/fxprune", {"method": "recover-pick", "target": t}))
            out.append((f"torch-pruning/{t}/recovered", {"method": "torch-pruning", "target": t, "recover": True}))
    return out


def ready(args, key: str, spec: dict, rows: dict, busy: set) -> tuple[str, dict] | None:
    """``(row key, full spec)`` when the row's inputs exist, else None."""
    done = lambda k: k in rows and k not in busy  # noqa: E731 - finished, with or without an error
    ok = lambda k: done(k) and "error" not in rows[k]  # noqa: E731
    m, t = spec["method"], spec.get("target")
    if m in ("dense", "scores"):
        return key, spec
    if m == "fxprune":
        if spec["importance"] == "activation" and not score_path(args).exists():
            return None
        return key, spec
    one_shot = [k for k, _ in specs_for_target(t)]
    if m == "torch-pruning" and not spec.get("recover"):
        refs = [k for k in one_shot if "/exact/hidden+mlp/" in k and ok(k)]  # same widths for any importance
        return (key, {**spec, "params_target": rows[refs[0]]["params"]}) if refs else None
    if m == "recover-pick":
        if not all(done(k) for k in one_shot):
            return None
        cands = [(rows[k]["ppl"], k) for k in one_shot if ok(k)]
        if not cands:
            return None
        base = rows[min(cands)[1]]
        rspec = {x: base[x] for x in ("method", "target", "importance", "norms", "policy")}
        return min(cands)[1] + "/recovered", {**rspec, "recover": True, "ppl_one_shot": base["ppl"]}
    base = f"torch-pruning/{t}"  # recovered Torch-Pruning row: its one-shot ratio, pruned once
    if not ok(base):
        return None
    b = rows[base]
    return key, {**spec, "params_target": b["params_target"], "ratio": b["ratio"], "ppl_one_shot": b["ppl"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("smollm", "minilm", "all"), default="all")
    ap.add_argument("--windows", type=int, default=30)
    ap.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.1, 0.3])
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--recover-steps", type=int, default=200)
    ap.add_argument("--recover-batch", type=int, default=2)
    ap.add_argument("--recover-seq", type=int, default=32)
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    ap.add_argument("--recover-schedule", choices=("constant", "cosine"), default="constant")
    ap.add_argument("--no-recover", action="store_true")
    ap.add_argument("--minilm-calib", type=int, default=128)
    ap.add_argument("--minilm-eval", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1, help="rows run at once, each in its own process")
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
    if args.part == "minilm":  # its own table: no SmolLM2 settings
        results["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads}
        results["minilm"] = minilm_part(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
        return
    one_shot = {"windows": args.windows, "window": 512, "calib_windows": args.calib_windows, "norm_scale": NORM_SCALE}
    recov = {"recover_steps": args.recover_steps, "recover_batch": args.recover_batch,
             "recover_seq": args.recover_seq, "recover_lr": args.recover_lr,
             "recover_schedule": args.recover_schedule}
    old = results.get("settings", {})
    if {k: old.get(k) for k in one_shot} != one_shot and old and not args.force:
        print(f"settings changed {old} -> {one_shot}: starting a new table", flush=True)
        results = {}
    elif {k: old.get(k, "constant" if k == "recover_schedule" else None) for k in recov} != recov and old:
        print(f"recovery settings changed: dropping the recovered rows", flush=True)
        results["rows"] = {k: v for k, v in results.get("rows", {}).items() if not v.get("recover")}
    results["settings"] = {**one_shot, **recov}
    results.setdefault("rows", {})
    results["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__,
                          "note": "shared 2-core machine (other jobs running): wall times include contention"}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    if args.part in ("smollm", "all"):
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        rows = results["rows"]
        if args.force:
            rows.clear()
        pending = [(k, s) for k, s in jobs_for(args)]
        pending = [(k, s) for k, s in pending if not (k in rows and "error" not in rows[k])]
        if score_path(args).exists():
            pending = [(k, s) for k, s in pending if s["method"] != "scores"]
        running: dict = {}
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            while pending or running:
                for item in list(pending):
                    if len(running) >= max(1, args.jobs):
                        break
                    r = ready(args, *item, rows, set(running.values()))
                    if r is None:
                        continue
                    pending.remove(item)
                    key, spec = r
                    if key in rows and "error" not in rows[key] and not args.force:
                        continue  # a recovered row picked and already there
                    print(f"== {key}", flush=True)
                    running[pool.submit(run_row, args, key, spec)] = key
                if not running:
                    if pending:
                        print(f"cannot run (inputs missing): {[k for k, _ in pending]}", flush=True)
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for f in done:
                    key = running.pop(f)
                    rows[key] = f.result()
                    print(f"== done {key}: {json.dumps(rows[key])}", flush=True)
                    save()
    if args.part in ("minilm", "all"):
        results["minilm"] = minilm_part(args)
        save()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
