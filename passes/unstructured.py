"""Unstructured: element-wise weight masks (magnitude or a custom score), per layer or with one global threshold.

Unstructured sparsity saves memory only where the zeros are stored compressed (sparse formats, zip-compressed
checkpoints); dense kernels on CPU and GPU run exactly as fast as before. Measure before claiming speed.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from fxprune.errors import InputError
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program
from fxprune.utils import get_tensor, ignore_filter

from .sparse_kernels import WeightInfo, sparsifiable_weights

IMPORTANCES = ("magnitude", "random")


def validate_importance(importance: Any) -> None:
    if isinstance(importance, str):
        if importance not in IMPORTANCES:
            raise InputError(f"unknown importance {importance!r}",
                             fix=f"use one of {', '.join(IMPORTANCES)} or a callable fn(name, weight) -> scores")
    elif not callable(importance):
        raise InputError(f"importance must be a name or a callable, got {type(importance).__name__}",
                         fix="e.g. importance='magnitude' or importance=lambda name, w: w.abs()")


def validate_ignore(ignore: Iterable[Any]) -> list[Any]:
    items = list(ignore)
    for it in items:
        if not isinstance(it, (str, torch.nn.Module)):
            raise InputError(f"ignore entries must be modules or names, got {type(it).__name__}",
                             fix="e.g. ignore=['head'] or ignore=[model.head]")
    return items


def weight_scores(importance: Any, name: str, w: torch.Tensor, ctx: PassContext) -> torch.Tensor:
    """Element scores of weight ``name`` (higher = keep)."""
    if w.is_meta:
        raise InputError(f"importance needs weight values, but {name} is on the meta device",
                         fix="load real weights before fine-grained pruning")
    w = w.detach()
    if importance == "magnitude":
        return w.abs().float()
    if importance == "random":
        return torch.rand(w.shape, generator=ctx.generator(f"unstructured-{name}"))
    s = importance(name, w)
    s = torch.as_tensor(s).detach().float()
    if tuple(s.shape) != tuple(w.shape):
        raise InputError(f"importance callable returned shape {tuple(s.shape)} for {name}, expected "
                         f"{tuple(w.shape)}", fix="return one score per weight element")
    return s


def targets(program: Program, ignore: list[Any]) -> dict[str, WeightInfo]:
    ignored = ignore_filter(program, ignore)
    return {n: i for n, i in sparsifiable_weights(program.gm).items()
            if not ignored(n) and not any(ignored(a) for a in i.aliases)}


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        mask[flat.topk(k).indices] = True
    return mask.reshape(scores.shape)


@register_pass
class Unstructured(Pass):
    """Zero a fraction ``sparsity`` of the conv/linear/matmul weights by importance.

    ``importance``: ``"magnitude"`` (|w|), ``"random"`` (seeded) or ``fn(name, weight) -> scores`` (same shape,
    higher = keep). ``scope="layer"`` removes ``round(sparsity * numel)`` elements of every weight;
    ``scope="global"`` ranks all weights together (one threshold). Weights already masked by an earlier pass stay
    masked. Writes ``program.weight_masks``; ``ApplyMasks``/``Shrink``/``compile`` multiply them in.
    """

    name = "unstructured"

    def __init__(self, sparsity: float, importance: str | Callable = "magnitude", scope: str = "layer",
                 ignore: Iterable[Any] = ()):
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
            raise InputError(f"sparsity must be in [0, 1), got {sparsity!r}",
                             fix="sparsity is the fraction of weights set to zero, e.g. 0.9")
        if scope not in ("layer", "global"):
            raise InputError(f"scope must be 'layer' or 'global', got {scope!r}", fix="use scope='layer'")
        validate_importance(importance)
        self.sparsity = float(sparsity)
        self.importance = importance
        self.scope = scope
        self.ignore = validate_ignore(ignore)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        infos = targets(program, self.ignore)
        scores: dict[str, torch.Tensor] = {}
        for name in infos:
            w = get_tensor(program.gm, name)
            s = weight_scores(self.importance, name, w, ctx)
            old = program.weight_masks.get(name)
            if old is not None:
                s = torch.where(old.bool(), s, torch.full_like(s, -float("inf")))
            scores[name] = s
        masks: dict[str, torch.Tensor] = {}
        if self.scope == "layer":
            for name, s in scores.items():
                masks[name] = _topk_mask(s, s.numel() - int(round(self.sparsity * s.numel())))
        elif scores:
            flat = torch.cat([s.reshape(-1) for s in scores.values()])
            keep = _topk_mask(flat, flat.numel() - int(round(self.sparsity * flat.numel())))
            off = 0
            for name, s in scores.items():
                masks[name] = keep[off: off + s.numel()].reshape(s.shape)
                off += s.numel()
        per_layer = {}
        for name, m in masks.items():
            old = program.weight_masks.get(name)
            m = m if old is None else (m & old.bool())
            program.weight_masks[name] = m
            per_layer[name] = round(1.0 - float(m.float().mean()), 4)
        total = sum(m.numel() for m in masks.values())
        zeros = sum(int((~program.weight_masks[n]).sum()) for n in masks)
        return PassResult(program, changed=zeros > 0, stats={
            "layers": len(masks), "sparsity": round(zeros / max(total, 1), 4), "per_layer": per_layer,
            "speed": "none: unstructured zeros save memory only in a sparse/compressed format"})
