"""Reference architectures (plain torch, random init, deterministic from a seed).

    from fxprune import models
    model, inputs = models.get("resnet56", size="tiny")     # model in eval mode, example inputs
    models.names()                                           # resnet56, resnet50, mobilenetv2, yolov8, vit, ...

Each entry has ``build(size, seed, device=None, **overrides)`` and ``example_inputs(size, batch, seed)``; sizes are
"tiny" (unit tests) and "full" (the real configuration; ViT also has "base" = ViT-B/16). ``device="meta"`` builds
without allocating weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from . import llama, mobilenetv2, multitask, resnet, vit, yolov8


@dataclass(frozen=True)
class Entry:
    build: Callable[..., nn.Module]
    example_inputs: Callable[..., tuple]
    sizes: tuple[str, ...]


REGISTRY: dict[str, Entry] = {
    "resnet56": Entry(resnet.build_resnet56, resnet.example_inputs_resnet56, tuple(resnet.RESNET56_SIZES)),
    "resnet50": Entry(resnet.build_resnet50, resnet.example_inputs_resnet50, tuple(resnet.RESNET50_SIZES)),
    "mobilenetv2": Entry(mobilenetv2.build, mobilenetv2.example_inputs, tuple(mobilenetv2.SIZES)),
    "yolov8": Entry(yolov8.build, yolov8.example_inputs, tuple(yolov8.SIZES)),
    "vit": Entry(vit.build, vit.example_inputs, tuple(vit.SIZES)),
    "llama": Entry(llama.build, llama.example_inputs, tuple(llama.SIZES)),
    "multitask": Entry(multitask.build, multitask.example_inputs, tuple(multitask.SIZES)),
}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str, size: str = "tiny", seed: int = 0, batch: int = 2, device=None) -> tuple[nn.Module, tuple]:
    """(model in eval mode, example inputs) for a registered reference model."""
    if name not in REGISTRY:
        raise ValueError(f"unknown reference model {name!r}; valid names: {', '.join(REGISTRY)}")
    e = REGISTRY[name]
    model = e.build(size=size, seed=seed, device=device).eval()
    return model, e.example_inputs(size=size, batch=batch, seed=seed)
