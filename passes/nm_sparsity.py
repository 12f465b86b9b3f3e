"""NMSparsity: N:M semi-structured weight masks in the layout TensorRT's sparse tensor cores need.

In every run of M consecutive weights along the reduction (input) dimension, only N survive: for a linear weight
``(out, in)`` the runs go along ``in`` for each output row; for a conv weight ``(O, C_in/g, kh, kw)`` along
``C_in`` for each ``(o, kh, kw)``; for a matmul weight ``(K, N)`` along ``K``. Layers whose reduction size is not a
multiple of M (or smaller than M), transposed convs, and weights with non-matmul uses are skipped and reported.

Speed: only NVIDIA sparse tensor cores (Ampere and later, through TensorRT / cuSPARSELt) run 2:4 weights faster
(up to ~2x on the matmul). 1:4 weights also satisfy 2:4 (same speed as 2:4); 4:8 does not match TensorRT's 2:4
layout and is not accelerated by it. On CPU, or in dense kernels anywhere, N:M zeros change nothing in latency.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from fxprune.errors import InputError
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program
from fxprune.utils import get_tensor

from .sparse_kernels import check_nm, check_nm_onnx, nm_mask
from .unstructured import targets, validate_ignore, validate_importance, weight_scores

__all__ = ["NMSparsity", "check_nm", "check_nm_onnx"]


@register_pass
class NMSparsity(Pass):
    """Keep the ``n`` most important of every ``m`` consecutive weights along the input dimension.

    ``importance``: ``"magnitude"``, ``"random"`` or ``fn(name, weight) -> scores``. ``ignore``: module names /
    modules left dense. Stats list the layers made sparse and the skipped ones with the reason.
    """

    name = "nm_sparsity"

    def __init__(self, n: int = 2, m: int = 4, importance: str | Callable = "magnitude",
                 ignore: Iterable[Any] = ()):
        for k, v in (("n", n), ("m", m)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{k} must be a positive int, got {v!r}", fix="e.g. NMSparsity(n=2, m=4)")
        if n >= m:
            raise InputError(f"n must be smaller than m, got {n}:{m}", fix="e.g. 2:4, 1:4 or 4:8")
        validate_importance(importance)
        self.n = n
        self.m = m
        self.importance = importance
        self.ignore = validate_ignore(ignore)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        done: list[str] = []
        skipped: dict[str, str] = {}
        for name, info in targets(program, self.ignore).items():
            if info.kind == "conv_transpose":
                skipped[name] = "transposed conv (no sparse tensor core kernel for its layout)"
                continue
            red = info.reduction_size
            if red < self.m or red % self.m:
                skipped[name] = f"{red} input channels, not a multiple of {self.m}"
                continue
            w = get_tensor(program.gm, name)
            s = weight_scores(self.importance, name, w, ctx)
            old = program.weight_masks.get(name)
            if old is not None:  # already-pruned positions lose first; the result still has <= n per group
                s = torch.where(old.bool(), s, torch.full_like(s, -float("inf")))
            mask = nm_mask(s, self.n, self.m, info.reduction_dim)
            program.weight_masks[name] = mask if old is None else (mask & old.bool())
            done.append(name)
        return PassResult(program, changed=bool(done), stats={
            "pattern": f"{self.n}:{self.m} along the input dim", "layers": done, "skipped": skipped,
            "speed": ("2:4 (and 1:4) run faster only on NVIDIA sparse tensor cores via TensorRT; no speedup on CPU"
                      if (self.n, self.m) in ((2, 4), (1, 4)) else
                      f"{self.n}:{self.m} is not accelerated by TensorRT (it needs 2:4); memory/accuracy study only")})
