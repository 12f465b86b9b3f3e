"""HuggingFace front door: write a pruned causal LM as a *stock* checkpoint, and greedy decoding helpers.

``save_pretrained(compiled, dir)`` writes ``config.json`` + ``model.safetensors`` (and the tokenizer when given)
that ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads in a fresh process without fxprune. The new
config is read off the pruned shapes (``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``) and the norms' mode (``rms_norm_eps``):

* ``norms="exact"`` pins every RMSNorm statistic to the original width D (masked == shrunk). A stock RMSNorm
  normalises over the kept width Dk, and
  ``w * x / sqrt(sum(x^2)/D + eps) == (w * sqrt(D/Dk)) * x / sqrt(sum(x^2)/Dk + eps * D/Dk)``,
  so the checkpoint folds ``sqrt(D/Dk)`` into each norm weight and writes ``rms_norm_eps = eps * D/Dk``: the stock
  model computes what the compiled module computes (up to float rounding). This needs one ``D/Dk`` for all norms
  (true when they all normalise the hidden size) and a known weight for each.
* ``norms="renormalize"``: the compiled module already normalises over the kept width; weights are written as is.

What a stock Llama-family config cannot express raises :class:`~fxprune.errors.ExportError` naming the parameter
and why: per-layer widths that differ (use ``ChannelPrune(scope="uniform")``), a pruned head_dim (rotary
frequencies are recomputed from ``head_dim`` and ``rope_theta``; q/k/v share one head_dim), a LayerNorm in exact
mode (its pinned variance has a zero-padding term no stock LayerNorm computes), query heads that no longer form
equal groups per key/value head.
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import ExportError, InputError
from .records import ShrinkRecord

_LAYER = re.compile(r"^(.*\.layers)\.(\d+)\.(.*)$")


def _source_and_config(compiled: Any) -> tuple[nn.Module, Any]:
    src = getattr(compiled.program, "source", None)
    cfg = getattr(src, "config", None)
    if src is None or cfg is None or not hasattr(cfg, "to_dict"):
        raise InputError("save_pretrained needs a compiled HuggingFace model (program.source with a .config)",
                         fix="compile a transformers PreTrainedModel, e.g. LlamaForCausalLM")
    return src, cfg


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(dict(module.named_buffers(remove_duplicate=False)))
    return out


def _uniform(values: dict[str, int], what: str, why: str) -> int:
    distinct = sorted(set(values.values()))
    if len(distinct) != 1:
        per = ", ".join(f"{k}={v}" for k, v in list(values.items())[:6])
        raise ExportError(f"{what} differs between layers ({per}{', ...' if len(values) > 6 else ''}): a stock config "
                          f"has one value", fix=why)
    return distinct[0]


def stock_config(compiled: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The stock config of the pruned model and its state dict (norm weights folded for exact norms).

    Raises :class:`ExportError` naming what a stock config cannot express (see the module docstring)."""
    src, cfg0 = _source_and_config(compiled)
    cfg = copy.deepcopy(cfg0)
    sd = {k: v.detach() for k, v in _tensors(compiled.module).items()}
    fix_uniform = "prune with ChannelPrune(scope='uniform') so every layer keeps the same width"
    embed = next((k for k in sd if k.endswith("embed_tokens.weight")), None)
    if embed is None:
        raise ExportError(f"{type(src).__name__}: no embed_tokens.weight; only Llama-family causal LMs "
                          "(embed_tokens, layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj) are supported",
                          fix="save with compiled.save(dir) and load with fxprune.load")
    hidden = int(sd[embed].shape[1])
    per: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _LAYER.match(k)
        if m:
            per.setdefault(m.group(3), {})[f"layers.{m.group(2)}"] = v
    n_heads0 = int(cfg0.num_attention_heads)
    n_kv0 = int(getattr(cfg0, "num_key_value_heads", None) or n_heads0)
    head_dim0 = int(getattr(cfg0, "head_dim", None) or cfg0.hidden_size // n_heads0)
    inv = next((v for k, v in sd.items() if k.endswith("rotary_emb.inv_freq")), None)
    if inv is not None and 2 * int(inv.shape[0]) != head_dim0:
        raise ExportError(f"the rotary frequencies were pruned ({head_dim0 // 2} -> {int(inv.shape[0])}): a stock "
                          "config recomputes inv_freq from head_dim and rope_theta, so a pruned q/k head_dim with a "
                          "subset of frequencies cannot be expressed", fix=fix_uniform + " (it keeps head_dim)")
    head_dim = head_dim0
    rows = {name: {l: int(t.shape[0]) for l, t in per.get(f"self_attn.{name}.weight", {}).items()}
            for name in ("q_proj", "k_proj", "v_proj")}
    q = _uniform(rows["q_proj"], "q_proj width", fix_uniform) if rows["q_proj"] else n_heads0 * head_dim
    kv = _uniform(rows["k_proj"], "k_proj width", fix_uniform) if rows["k_proj"] else n_kv0 * head_dim
    v = _uniform(rows["v_proj"], "v_proj width", fix_uniform) if rows["v_proj"] else n_kv0 * head_dim
    if q % head_dim or kv % head_dim or v != kv:
        raise ExportError(f"attention widths q={q}, k={kv}, v={v} are not whole heads of head_dim={head_dim} (the "
                          "per-head width was pruned, or v differs from k): a stock config has one head_dim",
                          fix=fix_uniform + " (it keeps head_dim)")
    n_heads, n_kv = q // head_dim, kv // head_dim
    if n_heads % n_kv:
        raise ExportError(f"{n_heads} query heads do not form equal groups over {n_kv} key/value heads",
                          fix="prune query groups uniformly (ChannelPrune(scope='uniform', heads=True))")
    if hidden % n_heads:
        raise ExportError(f"hidden_size {hidden} is not a multiple of num_attention_heads {n_heads}: transformers "
                          "refuses such a config (even with an explicit head_dim)",
                          fix=f"prune with ChannelPrune(round_to={n_heads}) or a ratio that keeps a multiple")
    inter = {l: int(t.shape[0]) for l, t in per.get("mlp.gate_proj.weight", per.get("mlp.up_proj.weight", {})).items()}
    cfg.hidden_size = hidden
    cfg.num_attention_heads = n_heads
    cfg.num_key_value_heads = n_kv
    if hasattr(cfg0, "head_dim") or hidden // n_heads != head_dim:
        cfg.head_dim = head_dim
    if inter:
        cfg.intermediate_size = _uniform(inter, "MLP width (intermediate_size)", fix_uniform)
    _fold_norms(compiled, cfg, sd)
    return cfg, sd


def _fold_norms(compiled: Any, cfg: Any, sd: dict[str, torch.Tensor]) -> None:
    norms: dict[str, Any] = {}
    for rec in compiled.program.records_of(ShrinkRecord):
        norms.update(rec.norms)
    exact = {n: s for n, s in norms.items() if s["mode"] == "exact"}
    if not exact:
        return
    bad = [n for n, s in exact.items() if s["kind"] == "layer_norm"]
    if bad:
        raise ExportError(f"LayerNorm {bad[0]!r} is pruned in exact mode: its pinned statistics (mean and variance "
                          "over the original width, with the zero-padding term) are not what a stock LayerNorm of "
                          "the smaller width computes", fix="prune with norms='renormalize' (approximate) for a stock "
                          "checkpoint, or save with compiled.save(dir)")
    factors = {n: s["before"] / s["after"] for n, s in exact.items()}
    if len({round(c, 12) for c in factors.values()}) != 1:
        raise ExportError(f"exact norms shrank by different factors D/Dk {sorted(set(factors.values()))}: one "
                          "rms_norm_eps cannot fold them all", fix="prune with norms='renormalize'")
    c = next(iter(factors.values()))
    eps = {s.get("eps") for s in exact.values()}
    if len(eps) != 1 or None in eps:
        raise ExportError(f"exact norms have epsilons {eps}: a stock config has one rms_norm_eps",
                          fix="prune with norms='renormalize'")
    for n, s in exact.items():
        w = s.get("weight")
        if w is None or w not in sd:
            raise ExportError(f"exact norm {n!r}: its scale parameter is unknown, so sqrt(D/Dk) cannot be folded "
                              "into it", fix="prune with norms='renormalize'")
        sd[w] = sd[w] * math.sqrt(c)
    cfg.rms_norm_eps = float(next(iter(eps))) * c


def save_pretrained(compiled: Any, dir: Any, *, tokenizer: Any = None, safe_serialization: bool = True) -> Path:
    """Write the pruned model as a stock HuggingFace checkpoint (see the module docstring); returns the folder.

    The weights are checked against a fresh ``type(model)(config)``: every tensor of the stock model must come from
    the compiled module with the same shape (buffers it recomputes, such as rotary frequencies, excepted)."""
    src, _ = _source_and_config(compiled)
    cfg, sd = stock_config(compiled)
    with torch.device("meta"):
        stock = type(src)(cfg)
    want = stock.state_dict()
    missing = [k for k in want if k not in sd]
    persistent_missing = [k for k in missing if not k.endswith(("inv_freq", "original_inv_freq"))]
    if persistent_missing:
        raise ExportError(f"the stock {type(src).__name__} has tensors the compiled module lacks: "
                          f"{persistent_missing[:5]}", fix="save with compiled.save(dir) and load with fxprune.load")
    wrong = [(k, tuple(sd[k].shape), tuple(t.shape)) for k, t in want.items() if k in sd and sd[k].shape != t.shape]
    if wrong:
        k, got, exp = wrong[0]
        raise ExportError(f"{k}: pruned shape {got} is not what the stock config gives {exp}",
                          fix="prune with ChannelPrune(scope='uniform') (equal per-layer widths, head_dim kept)")
    model = type(src)(cfg)
    model.load_state_dict({k: sd[k].contiguous() for k in want if k in sd}, strict=False)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=safe_serialization)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    info = {"pruned_by": "fxprune", "params_before": compiled.report.params_before,
            "params_after": compiled.report.params_after, "norms": dict(compiled.report.norms),
            "approximate": bool(compiled.report.approximate), "verified": compiled.report.verified}
    (out / "fxprune_pruning.json").write_text(json.dumps(info, indent=1))
    return out


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    return out[0]


@torch.no_grad()
def greedy(model: Any, input_ids: torch.Tensor, max_new_tokens: int, *, pad_to: int | None = None,
           pad_id: int = 0) -> torch.Tensor:
    """Greedy decoding without a KV cache for any callable that maps ``input_ids`` to logits (a compiled module,
    or an HF model), returning the prompt plus ``max_new_tokens`` tokens. ``pad_to``: a module traced with a static
    sequence length gets right-padded inputs of that length (causal attention: padding after the last token does not
    change its logits)."""
    ids = input_ids.clone()
    for _ in range(max_new_tokens):
        n = ids.shape[1]
        x = ids if pad_to is None else torch.cat(
            [ids, torch.full((ids.shape[0], pad_to - n), pad_id, dtype=ids.dtype)], 1)
        logits = _logits(model(input_ids=x, use_cache=False))
        nxt = logits[:, n - 1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt.to(ids.dtype)], 1)
    return ids
