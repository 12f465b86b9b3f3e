"""Numerical verification: the shrunk program must compute what the masked program computes.

``verify(reference, candidate, args, kwargs)`` runs both on *fresh* random inputs shaped like the examples (never the
examples themselves) and compares every output leaf. When the dense (unpruned) module is given too, it also reports
whether pruning changed the output at all: if the masked output equals the dense output the comparison could not
see the pruned channels (zero-init branches, tiny layer scales), and ``observable`` is False.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map


@dataclass
class VerifyResult:
    ok: bool
    max_abs_diff: float
    output_scale: float
    rtol: float
    shapes_equal: bool
    observable: bool | None = None  # None: not checked; False: masked == dense, so the check saw nothing
    message: str = ""

    def __str__(self) -> str:
        state = "ok" if self.ok else "FAILED"
        obs = "" if self.observable is None else ("" if self.observable else " (unobservable: pruning did not change "
                                                                            "the output, so this check saw nothing)")
        return (f"verification {state}: max|shrunk - masked| = {self.max_abs_diff:.3g} "
                f"(output scale {self.output_scale:.3g}, rtol {self.rtol:g}){obs}{self.message}")


def random_like(args: tuple, kwargs: dict, seed: int) -> tuple[tuple, dict]:
    """Fresh inputs with the examples' shapes and dtypes: normal floats, integers in [0, max(example)]."""
    g = torch.Generator().manual_seed(seed)

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_meta:
            return x
        if x.is_floating_point():
            return torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype).to(x.device)
        if x.dtype == torch.bool:
            return x.clone()
        hi = int(x.max().item()) + 1 if x.numel() else 1
        lo = int(x.min().item()) if x.numel() else 0
        if lo == hi - 1:
            return x.clone()  # constant integer input (e.g. an all-ones attention mask): keep it
        return torch.randint(max(lo, 0), max(hi, 1), x.shape, generator=g, dtype=x.dtype).to(x.device)

    return tree_map(one, args), tree_map(one, kwargs)


def _leaves(out: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


@torch.no_grad()
def verify(reference: Callable, candidate: Callable, args: tuple, kwargs: dict, *, seed: int = 0,
           rtol: float = 1e-4, dense: Callable | None = None, trials: int = 2) -> VerifyResult:
    """Compare ``candidate`` against ``reference`` on ``trials`` fresh random inputs (seeded)."""
    worst, scale, shapes_equal, observable = 0.0, 0.0, True, None
    for k in range(trials):
        a, kw = random_like(args, kwargs, seed + k)
        ref, cand = _leaves(reference(*a, **kw)), _leaves(candidate(*a, **kw))
        if len(ref) != len(cand):
            return VerifyResult(False, float("inf"), 0.0, rtol, False,
                                message=f": {len(cand)} outputs instead of {len(ref)}")
        for r, c in zip(ref, cand):
            if r.shape != c.shape:
                shapes_equal = False
                continue
            if r.is_floating_point():
                worst = max(worst, float((r.float() - c.float()).abs().max()) if r.numel() else 0.0)
                scale = max(scale, float(r.float().abs().max()) if r.numel() else 0.0)
            elif not torch.equal(r, c):
                worst = float("inf")
        if dense is not None:
            d = _leaves(dense(*a, **kw))
            same = all(x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=0, atol=rtol * max(scale, 1e-30))
                       for x, y in zip(d, ref) if x.is_floating_point())
            observable = (observable or False) or not same
    ok = shapes_equal and worst <= rtol * max(scale, 1e-12)
    return VerifyResult(ok, worst, scale, rtol, shapes_equal, observable)
