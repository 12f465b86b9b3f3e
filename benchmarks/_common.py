"""Shared helpers of the benchmark scripts: subprocess workers, the corpora (models built by ``fxprune.zoo``),
Torch-Pruning's standard recipe.

Everything here is random-init (weights=None / pretrained=False / ``from_config``) and offline (HF_HUB_OFFLINE=1).
Models for fxprune are passed through ``fxprune.testing.make_observable`` so verification can see pruned channels.
MACs and parameters are counted by the library (``fxprune.flops.count_macs`` / ``count_params``).
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
ROW_MARK = "@@ROW@@"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}

# --------------------------------------------------------------------------------------------------- workers


def setup_worker(threads: int = 1) -> None:
    """Call first in a worker process: offline, quiet, ``threads`` intra-op threads."""
    warnings.filterwarnings("ignore")
    os.environ.update(OFFLINE_ENV)
    import logging

    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(threads)


def emit(row: dict) -> None:
    """Send a result row from a worker to its driver (one marked line on stdout)."""
    row.setdefault("peak_rss_gb", peak_rss_gb())
    print(ROW_MARK + json.dumps(row, default=str), flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def spawn(script: str | Path, argv: list[str], timeout: float, extra_env: dict | None = None) -> dict:
    """Run ``python script argv...`` in a fresh process (own process group), return the row it emitted.

    A timeout kills the whole group and returns ``{"status": "timeout", ...}``; a worker that dies without a row
    (segfault, OOM kill, uncaught error) returns ``{"status": "error", "error": "worker died ..."}``.
    """
    t = time.perf_counter()
    env = {**os.environ, **OFFLINE_ENV, **(extra_env or {})}
    p = subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.communicate()
        return {"status": "timeout", "error": f"Timeout: no result within {timeout:.0f} s (killed)",
                "seconds": timeout, "wall_s": time.perf_counter() - t}
    for line in out.splitlines():
        if line.startswith(ROW_MARK):
            row = json.loads(line[len(ROW_MARK):])
            row["wall_s"] = time.perf_counter() - t
            return row
    tail = [x for x in (err or "").strip().splitlines() if x.strip()][-3:] or [f"exit code {p.returncode}"]
    why = "killed by signal %d (OOM?)" % -p.returncode if p.returncode < 0 else f"rc {p.returncode}"
    return {"status": "error", "error": f"WorkerDied: {why}: {' | '.join(tail)[:300]}",
            "seconds": time.perf_counter() - t, "wall_s": time.perf_counter() - t}


def first_line(e: BaseException) -> str:
    s = [x for x in str(e).strip().splitlines() if x.strip()]
    return f"{type(e).__name__}: {s[0].strip()[:300] if s else ''}"


def where(e: BaseException, roots: tuple[str, ...] = ("fxprune", "passes", "torch_pruning")) -> str:
    """The innermost frame of the traceback inside one of ``roots`` (package dirs): 'path:line in func'."""
    best = ""
    for fr in traceback.extract_tb(e.__traceback__):
        parts = Path(fr.filename).parts
        for r in roots:
            if r in parts:
                i = len(parts) - 1 - parts[::-1].index(r)
                best = f"{'/'.join(parts[i:])}:{fr.lineno} in {fr.name}"
    if not best:
        tb = traceback.extract_tb(e.__traceback__)
        if tb:
            best = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name}"
    return best


def graph_context(e: BaseException) -> dict:
    """For errors raised while running an FX graph: the node (``While executing %x``) and the model source line
    (last frame of the node's ``Original traceback``), searched along the ``__cause__`` chain."""
    out: dict = {}
    seen = 0
    while e is not None and seen < 8:
        text = str(e)
        m = re.search(r"While executing (%\S+)", text)
        if m and "graph_node" not in out:
            out["graph_node"] = m.group(1)
        if "Original traceback:" in text and "model_source" not in out:
            tail = text.split("Original traceback:", 1)[1]
            frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', tail)
            if frames:
                f, line, fn, code = frames[-1]
                parts = Path(f).parts
                short = "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else f
                out["model_source"] = f"{short}:{line} in {fn}: {code.strip()[:120]}"
        node = getattr(e, "node", None) or getattr(e, "fxprune_node", None)
        if isinstance(node, str) and "fxprune_node" not in out:
            out["fxprune_node"] = node
        e, seen = e.__cause__ or e.__context__, seen + 1
    return out


def error_key(msg: str) -> str:
    """Normalise an error line for grouping: quoted names -> '…', numbers -> N, shapes -> [..]."""
    s = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", msg)
    s = re.sub(r"\[[0-9, ]+\]|\([0-9, ]+\)", "[..]", s)
    s = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", s)
    return s[:200]


def leaves(out: Any) -> list:
    import torch
    from torch.utils._pytree import tree_flatten

    if hasattr(out, "to_tuple"):  # HF ModelOutput
        out = out.to_tuple()
    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


# --------------------------------------------------------------------------------------------------- torchvision


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


# --------------------------------------------------------------------------------------------------- timm

_BIG = ("gigantic", "enormous", "giant", "huge", "xxlarge", "xlarge", "large", "big", "base", "medium", "plus")
_SMALL = ("atto", "zepto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "small", "lite", "b0", "s0", "a0",
          "t0", "m0", "_s", "_t", "_xs", "_ti", "18", "26", "050", "035", "100")


def timm_family(name: str) -> str:
    """Family = the name's prefix before the first '_' or digit ('resnet18' -> 'resnet', 'vit_tiny_..' -> 'vit')."""
    m = re.match(r"[A-Za-z]+", name)
    return m.group(0) if m else name


def _timm_input_size(name: str) -> tuple:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
        return tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
    except Exception:
        return (3, 224, 224)


def _timm_name_score(name: str) -> tuple:
    """Cheap size heuristic on the name (lower = smaller), then resolution (prefer <= 224), then length."""
    low = name.lower()
    big = sum(b in low for b in _BIG) + 3 * bool(re.search(r"(^|_)\d+(\.\d+)?[bm]_|(^|_)\d+b$", low))
    small = next((i for i, h in enumerate(_SMALL) if h in low), len(_SMALL))
    # numeric size hints: depth (resnet18 < resnet50) / width multiplier (050 < 100)
    nums = [int(x) for x in re.findall(r"\d+", low)]
    res = _timm_input_size(name)[-1]
    return (big, res > 224, small, nums[0] if nums else 0, len(name), name)


def timm_sample(n: int | None = None, cache: Path | None = None) -> list[dict]:
    """One small variant per timm family: [{"name", "family", "input_size"}], sorted by name.

    The smallest variant is chosen by a name heuristic among all variants, then the 4 best-scored candidates are
    built on the meta device and the one with the fewest parameters wins. Cached in ``cache`` (JSON) because the meta
    builds take a minute.
    """
    if cache is not None and cache.exists():
        picks = json.loads(cache.read_text())
        return picks[:n] if n else picks
    import timm
    import torch

    fams: dict[str, list[str]] = {}
    for name in timm.list_models():
        fams.setdefault(timm_family(name), []).append(name)
    picks = []
    for fam, names in sorted(fams.items()):
        cands = sorted(names, key=_timm_name_score)[:4]
        sizes = []
        for c in cands:
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = timm.create_model(c, pretrained=False)
                sizes.append((sum(p.numel() for p in m.parameters()), c))
            except Exception:
                sizes.append((10 ** 12, c))
        nparams, best = min(sizes)
        picks.append({"name": best, "family": fam, "variants": len(names), "params_est": nparams,
                      "input_size": list(_timm_input_size(best))})
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(picks, indent=1))
    return picks[:n] if n else picks


# --------------------------------------------------------------------------------------------------- HF transformers

# The small HF configs of the sweeps (2 layers, hidden 64, 4 heads, GQA 2 kv heads for decoders, 10-label heads for
# classifiers, 64x64 images): fxprune.zoo builds them as ``hf:NAME`` with these config overrides and this task.
_HF_SMALL = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
_HF_DEC = dict(vocab_size=256, num_key_value_heads=2, use_cache=False, max_position_embeddings=128, **_HF_SMALL)
HF_SPECS: dict[str, tuple[str, dict]] = {  # name -> (task, config overrides)
    "llama": ("causal-lm", _HF_DEC),
    "mistral": ("causal-lm", dict(sliding_window=None, **_HF_DEC)),
    "qwen2": ("causal-lm", _HF_DEC),
    "gpt2": ("causal-lm", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, use_cache=False)),
    "opt": ("causal-lm", dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128, use_cache=False)),
    "bert": ("sequence-classification", dict(vocab_size=256, max_position_embeddings=128, num_labels=10,
                                             **_HF_SMALL)),
    "vit": ("image-classification", dict(image_size=64, patch_size=16, num_labels=10, **_HF_SMALL)),
    "swin": ("image-classification", dict(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1],
                                          num_heads=[2, 4], window_size=4, num_labels=10)),
    "convnext": ("image-classification", dict(image_size=64, hidden_sizes=[32, 64], depths=[1, 1], num_stages=2,
                                              num_labels=10)),
    "mobilevit": ("image-classification", dict(image_size=64, hidden_sizes=[32, 48, 64],
                                               neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160], num_labels=10)),
}
HF_NAMES = list(HF_SPECS)


def build(corpus: str, name: str, batch: int = 1, seed: int = 0):
    """(model, args, kwargs, num_classes) through ``fxprune.zoo.resolve``: torchvision 224x224 (299 for
    inception_v3); timm at its pretrained input size capped at 224 where the model accepts it (else native); HF from
    :data:`HF_SPECS` (``input_ids`` batch x 16 or ``pixel_values`` 64x64, by keyword). ``num_classes`` is for
    Torch-Pruning's ignored heads."""
    from fxprune import zoo

    if corpus == "torchvision":
        m, args, _ = zoo.resolve(f"torchvision:{name}", batch=batch, seed=seed)
        return m, args, {}, 1000
    if corpus == "timm":
        m, args, _ = zoo.resolve(f"timm:{name}", batch=batch, seed=seed, max_image_size=224)
        return m, args, {}, getattr(m, "num_classes", 1000)
    if corpus == "hf":
        task, overrides = HF_SPECS[name]
        m, args, _ = zoo.resolve(f"hf:{name}", batch=batch, seq=16, seed=seed, task=task, overrides=overrides)
        return m, (), {m.main_input_name: args[0]}, getattr(m.config, "num_labels", None)  # by keyword, as HF
    raise ValueError(f"unknown corpus {corpus!r}")


# --------------------------------------------------------------------------------------------------- Torch-Pruning


def tp_heads(model, num_classes: int | None) -> list:
    """The final classifier(s) to ignore, as Torch-Pruning's examples do: ``lm_head`` / ``classifier`` of HF models,
    and every Linear (or 1x1 conv classifier) whose output size is the number of classes."""
    import torch.nn as nn

    heads = []
    for n, mod in model.named_modules():
        leaf = n.rsplit(".", 1)[-1]
        if leaf in ("lm_head",) and isinstance(mod, nn.Module):
            heads.append(mod)
        elif num_classes and isinstance(mod, nn.Linear) and mod.out_features == num_classes:
            heads.append(mod)
        elif num_classes and isinstance(mod, nn.Conv2d) and mod.out_channels == num_classes and \
                mod.kernel_size == (1, 1) and n.split(".")[0] in ("classifier", "head", "fc", "heads"):
            heads.append(mod)
        elif leaf == "classifier" and isinstance(mod, nn.Linear):
            heads.append(mod)
    return list({id(h): h for h in heads}.values())


def tp_attention(model) -> tuple[dict, dict, Callable[[], None]]:
    """Torch-Pruning's attention handling from its examples: ``num_heads`` for fused/separate q,k,v projections, the
    pruner options that go with it, and a fix-up that updates the modules' head-size attributes after pruning
    (TP prunes tensors, not Python attributes).

    * timm (``m.qkv`` + ``m.num_heads``): num_heads[qkv]; head_dim shrinks (examples/timm_models).
    * HF encoders (``query/key/value`` + ``num_attention_heads``): head dims shrink (examples/transformers/prune_hf_vit).
    * HF decoders (``q_proj/k_proj/v_proj``): whole heads pruned, head_dim kept for RoPE (examples/LLMs/prune_llm.py).
    * torchvision VisionTransformer: round_to = num_heads, ``hidden_dim`` updated (examples/torchvision_models).
    """
    import torch.nn as nn

    num_heads: dict = {}
    opts: dict = {}
    fixes: list[Callable[[], None]] = []
    cfg = getattr(model, "config", None)
    for m in model.modules():
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            num_heads[m.qkv] = m.num_heads
            if hasattr(m, "head_dim"):
                fixes.append(lambda m=m: setattr(m, "head_dim", m.qkv.out_features // (3 * m.num_heads)))
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")) and \
                isinstance(getattr(m, "num_attention_heads", None), int):
            for a in ("query", "key", "value"):
                num_heads[getattr(m, a)] = m.num_attention_heads

            def fix(m=m):
                m.attention_head_size = m.query.out_features // m.num_attention_heads
                m.all_head_size = m.query.out_features
            fixes.append(fix)
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj")):
            hq = _int_attr(m, cfg, ("num_heads", "num_attention_heads"))
            hkv = _int_attr(m, cfg, ("num_key_value_heads",)) or hq
            if not hq:
                continue
            num_heads[m.q_proj] = hq
            num_heads[m.k_proj] = hkv
            num_heads[m.v_proj] = hkv
            rope = cfg is not None and any(hasattr(cfg, a) for a in ("rope_theta", "rope_parameters", "rope_scaling"))
            if rope or hkv != hq:
                # LLM recipe: whole heads, head_dim kept (RoPE)
                opts.update(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5)

                def fix(m=m):
                    hd = m.head_dim
                    nq, nkv = m.q_proj.out_features // hd, m.k_proj.out_features // hd
                    for a, v in (("num_heads", nq), ("num_attention_heads", nq), ("num_key_value_heads", nkv),
                                 ("num_key_value_groups", max(nq // max(nkv, 1), 1))):
                        if hasattr(m, a):
                            setattr(m, a, v)
            else:
                # encoder recipe (prune_hf_vit.py): head dims shrink, number of heads kept

                def fix(m=m, hq=hq):
                    for a in ("head_dim", "attention_head_size"):
                        if hasattr(m, a):
                            setattr(m, a, m.q_proj.out_features // hq)
                    for a in ("all_head_size", "embed_dim"):
                        if hasattr(m, a):
                            setattr(m, a, m.q_proj.out_features)
            fixes.append(fix)
    try:
        from torchvision.models.vision_transformer import VisionTransformer

        if isinstance(model, VisionTransformer):
            opts["round_to"] = model.encoder.layers[0].num_heads
            fixes.append(lambda: setattr(model, "hidden_dim", model.conv_proj.out_channels))
    except ImportError:
        pass

    def fix_all() -> None:
        for f in fixes:
            f()
    return num_heads, opts, fix_all


def _int_attr(m, cfg, names: tuple[str, ...]) -> int | None:
    for src in (m, cfg):
        for a in names:
            v = getattr(src, a, None) if src is not None else None
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def tp_prune(model, args: tuple, kwargs: dict, num_classes: int | None, ratio: float = 0.5) -> dict:
    """Torch-Pruning's standard recipe in place: BasePruner (= MagnitudePruner) + GroupMagnitudeImportance(p=2),
    uniform ``pruning_ratio``, the classifier head(s) ignored, num_heads for attention. Returns timings; raises on
    failure with attribute ``tp_phase`` = "graph" (DependencyGraph build) or "step"."""
    import torch_pruning as tp

    example = dict(kwargs) if kwargs else (args[0] if len(args) == 1 else tuple(args))
    heads = tp_heads(model, num_classes)
    num_heads, opts, fix = tp_attention(model)
    out_tf = (lambda o: o.to_tuple()[0]) if hasattr(model, "config") else None
    t0 = time.perf_counter()
    try:
        pruner = tp.pruner.BasePruner(model, example_inputs=example,
                                      importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                      ignored_layers=heads, num_heads=num_heads, output_transform=out_tf, **opts)
    except Exception as e:
        e.tp_phase = "graph"  # type: ignore[attr-defined]
        raise
    t1 = time.perf_counter()
    try:
        pruner.step()
        fix()
    except Exception as e:
        e.tp_phase = "step"  # type: ignore[attr-defined]
        raise
    t2 = time.perf_counter()
    return {"graph_s": t1 - t0, "step_s": t2 - t1, "tp_seconds": t2 - t0, "ignored_layers": len(heads),
            "num_heads_layers": len(num_heads), "tp_options": {k: v for k, v in opts.items()}}


def main_guard(fn: Callable[[], dict], lib: str) -> None:
    """Run ``fn`` in a worker and emit its row; any escaping exception becomes an error row."""
    try:
        row = fn()
    except BaseException as e:  # noqa: BLE001 - a worker must always report
        row = {"lib": lib, "status": "error", "error": "setup: " + first_line(e), "where": where(e),
               "trace": traceback.format_exc()[-1500:]}
    emit(row)
