"""Evaluation helpers shared by tests and benchmarks: perplexity of a causal LM on a token stream, and the cosine
similarity of sentence embeddings to a reference model."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Perplexity:
    value: float
    tokens: int  # predicted tokens
    windows: int
    window: int
    stride: int

    def __str__(self) -> str:
        return (f"perplexity {self.value:.3f} over {self.tokens} predicted tokens "
                f"({self.windows} windows of {self.window}, stride {self.stride})")


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "logits"):
        return out["logits"] if isinstance(out, dict) else out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in a {type(out).__name__}")


@torch.no_grad()
def perplexity(model: Callable, ids: torch.Tensor, *, window: int = 512, stride: int | None = None,
               max_windows: int | None = None, call: Callable[[Callable, torch.Tensor], Any] | None = None
               ) -> Perplexity:
    """Perplexity of ``model`` on the 1-D (or (1, N)) token stream ``ids`` in fixed windows.

    ``stride`` defaults to ``window`` (non-overlapping windows; every token after the first of a window is predicted
    once). With ``stride < window`` only the last ``stride`` tokens of each window are scored (the rest is context).
    ``call(model, window_ids)`` returns the logits (default: ``model(input_ids=..., use_cache=False)`` for HF models,
    ``model(ids)`` otherwise). Deterministic.
    """
    ids = ids.reshape(-1)
    stride = window if stride is None else int(stride)
    if not (0 < stride <= window):
        raise ValueError(f"stride must be in (0, window], got {stride}")
    nll, count, n_win = 0.0, 0, 0
    start = 0
    while start + 1 < ids.numel():
        if max_windows is not None and n_win >= max_windows:
            break
        w = ids[start:start + window].unsqueeze(0)
        if w.shape[1] < 2:
            break
        if call is not None:
            logits = _logits(call(model, w))
        else:
            try:
                logits = _logits(model(input_ids=w, use_cache=False))
            except TypeError:
                logits = _logits(model(w))
        logp = torch.log_softmax(logits[0, :-1].float(), -1)
        tgt = w[0, 1:]
        tok_nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        scored = tok_nll if start == 0 or stride == window else tok_nll[-stride:]
        nll += float(scored.sum())
        count += scored.numel()
        n_win += 1
        start += stride
    if count == 0:
        raise ValueError("no tokens to score: give at least 2 tokens")
    return Perplexity(math.exp(nll / count), count, n_win, window, stride)


@torch.no_grad()
def embedding_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean cosine similarity of two (N, D) embedding sets row by row."""
    return float(torch.nn.functional.cosine_similarity(reference.float(), candidate.float(), dim=-1).mean())
