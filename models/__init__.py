"""Reference architectures in plain torch (random init, deterministic from a seed), test cases for the analyzer.

    from fxprune import models
    model, inputs = models.get("resnet56", size="tiny")     # model in eval mode, example positional inputs
    out = model(*inputs)
    models.names()   # ['resnet56', 'resnet50', 'mobilenetv2', 'yolov8', 'vit', 'llama', 'multitask']

``REGISTRY`` maps each name to its module, which exposes ``build(size="tiny", seed=0, device=None, **overrides)``,
``example_inputs(size="tiny", batch=2, seed=0)`` and ``SIZES``. Sizes: "tiny" (unit tests: < 2M parameters, small
inputs) and "full" (the real configuration); ViT also has "base" (ViT-B/16). ``device="meta"`` builds without
allocating any weight storage. Building never changes the caller's global RNG state.

Outputs (B = batch): resnet56/resnet50/mobilenetv2/vit -> logits (B, classes); yolov8 -> list of 3 maps
(B, 64 + nc, H/8|16|32, W/8|16|32); llama -> logits (B, S, vocab); multitask -> (logits (B, 10), regression (B, 4)).
"""
from __future__ import annotations

from types import ModuleType

import torch.nn as nn

from . import llama, mobilenetv2, multitask, resnet, resnet50, resnet56, vit, yolov8

REGISTRY: dict[str, ModuleType] = {
    "resnet56": resnet56,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "yolov8": yolov8,
    "vit": vit,
    "llama": llama,
    "multitask": multitask,
}

__all__ = ["REGISTRY", "names", "get", "llama", "mobilenetv2", "multitask", "resnet", "resnet50", "resnet56", "vit",
           "yolov8"]


def names() -> list[str]:
    """The registered model names, in registry order."""
    return list(REGISTRY)


def get(name: str, size: str = "tiny", seed: int = 0, batch: int = 2, device=None) -> tuple[nn.Module, tuple]:
    """(model in eval mode, example positional inputs) for a registered reference model.

    Raises ``ValueError`` listing the valid names for an unknown ``name`` (and the valid sizes for an unknown
    ``size``). The inputs are always CPU tensors; ``device`` only places the model (``"meta"``: no storage).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown reference model {name!r}; valid names: {', '.join(REGISTRY)}")
    mod = REGISTRY[name]
    model = mod.build(size=size, seed=seed, device=device).eval()
    return model, mod.example_inputs(size=size, batch=batch, seed=seed)
