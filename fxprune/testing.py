"""Helpers for tests and benchmarks on randomly initialised models.

Random init hides channels from the output (zero-init last BN gammas, zero-init heads, layer scales of 1e-6), and
then a wrong shrink still "verifies". :func:`make_observable` redraws such parameters so that every channel moves
the output, deterministically from a seed.
"""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def make_observable(model: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw all-zero or tiny parameters and give norm layers non-trivial statistics (in place; returns model).

    * BatchNorm/GroupNorm/LayerNorm/InstanceNorm affine params: scale ~ U(0.5, 1.5), shift ~ N(0, 0.1);
      BatchNorm running stats: mean ~ N(0, 0.1), var ~ U(0.5, 1.5).
    * any other parameter whose largest magnitude is below 1e-3 (zero-init heads, layer-scale gammas):
      vectors ~ U(0.5, 1.5), matrices/kernels ~ N(0, 1/fan_in).
    Meta-device parameters are left alone.
    """
    g = torch.Generator().manual_seed(seed)

    def uni(t: torch.Tensor) -> torch.Tensor:
        return (torch.rand(t.shape, generator=g) + 0.5).to(t.dtype)

    def nrm(t: torch.Tensor, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=g) * std).to(t.dtype)

    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    done: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, norm_types) or type(mod).__name__.lower().endswith(("rmsnorm", "layernorm2d")):
            w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
            if isinstance(w, torch.Tensor) and not w.is_meta:
                w.copy_(uni(w))
                done.add(id(w))
            if isinstance(b, torch.Tensor) and not b.is_meta:
                b.copy_(nrm(b, 0.1))
                done.add(id(b))
            rm, rv = getattr(mod, "running_mean", None), getattr(mod, "running_var", None)
            if isinstance(rm, torch.Tensor) and not rm.is_meta:
                rm.copy_(nrm(rm, 0.1))
            if isinstance(rv, torch.Tensor) and not rv.is_meta:
                rv.copy_(uni(rv))
    for p in model.parameters():
        if id(p) in done or p.is_meta or not p.is_floating_point() or p.numel() == 0:
            continue
        if float(p.abs().max()) < 1e-3:
            if p.dim() <= 1 or all(s == 1 for s in p.shape[:-1]):
                p.copy_(uni(p))
            else:
                fan_in = p[0].numel()
                p.copy_(nrm(p, fan_in ** -0.5))
    return model
