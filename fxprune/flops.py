"""MACs and parameter counting, with torch's own FLOP counter (``torch.utils.flop_counter``)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_macs(module: Any, args: tuple, kwargs: dict | None = None) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2 as counted by FlopCounterMode). Works on meta tensors.

    FlopCounterMode's module tracker hooks the tensor inputs of every submodule for the backward pass. A view of a
    requires-grad parameter made under ``no_grad`` (timm CaiT's ``cls_token.expand(...)`` handed to its class-attention
    blocks) has ``requires_grad`` but no ``grad_fn``, and the tracker asserts on it. Counting needs no autograd, so
    the parameters' ``requires_grad`` is off while counting and restored afterwards (even if the forward fails).
    """
    params = [p for p in module.parameters() if p.requires_grad] if isinstance(module, torch.nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            module(*args, **(kwargs or {}))
    finally:
        for p in params:
            p.requires_grad_(True)
    return int(counter.get_total_flops()) // 2


def count_params(module: torch.nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    seen: set[int] = set()
    n = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
