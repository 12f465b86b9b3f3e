"""MACs and parameter counting, with torch's own FLOP counter (``torch.utils.flop_counter``)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_macs(module: Any, args: tuple, kwargs: dict | None = None) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2 as counted by FlopCounterMode). Works on meta tensors."""
    with FlopCounterMode(display=False) as counter:
        module(*args, **(kwargs or {}))
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
