"""Shared helpers for the reference models (not part of the public registry)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic init from ``seed`` without disturbing the caller's global (CPU) RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_on(device, ctor: Callable[..., nn.Module], *args, **kwargs) -> nn.Module:
    """Construct ``ctor(*args, **kwargs)`` for ``device``.

    ``None``/CPU: built on the CPU. ``"meta"``: constructed under ``torch.device("meta")`` so no parameter or buffer
    storage is ever allocated. Any other device: built (and initialised) on the CPU, then moved, so a seed gives the
    same weights on every device.
    """
    if device is None:
        return ctor(*args, **kwargs)
    dev = torch.device(device)
    if dev.type == "meta":
        with torch.device("meta"):
            return ctor(*args, **kwargs)
    model = ctor(*args, **kwargs)
    return model if dev.type == "cpu" else model.to(dev)


def check_size(size: str, sizes: dict) -> dict:
    """A copy of ``sizes[size]``; ``ValueError`` naming the valid sizes otherwise."""
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(sizes)}")
    return dict(sizes[size])


def image_inputs(img: int, batch: int, seed: int, channels: int = 3) -> tuple[torch.Tensor]:
    """``(x,)`` with ``x ~ N(0, 1)`` of shape (batch, channels, img, img), from its own generator."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, img, img, generator=g),)
