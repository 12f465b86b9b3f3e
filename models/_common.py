"""Shared helpers for the reference models."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic init without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_on(device, ctor, *args, **kwargs) -> nn.Module:
    """Construct a module on ``device`` (``"meta"`` allocates nothing)."""
    if device is None:
        return ctor(*args, **kwargs)
    with torch.device(device):
        return ctor(*args, **kwargs)


def check_size(size: str, sizes: dict) -> dict:
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(sizes)}")
    return dict(sizes[size])
