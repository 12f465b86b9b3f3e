"""Stay in PyTorch: ``torch.compile`` the pruned module and time it."""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from . import LatencyStats, check_timing_args, eval_mode, resolve_module

__all__ = ["compile", "benchmark", "LatencyStats"]


def compile(module_or_compiled: Any, **torch_compile_kwargs: Any) -> nn.Module:
    """``torch.compile`` the module of ``module_or_compiled`` (nn.Module or fxprune's ``Compiled``) with the given
    keyword arguments (``mode``, ``backend``, ``dynamic``, ...). The module itself is not changed; the returned
    wrapper shares its parameters."""
    return torch.compile(resolve_module(module_or_compiled), **torch_compile_kwargs)


def _call(module: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, torch.Tensor):
        return module(inputs)
    return module(*inputs)


def benchmark(module: Any, inputs: Any, warmup: int = 5, repeats: int = 30, threads: int = 1) -> LatencyStats:
    """Latency of ``module(*inputs)`` (``inputs``: tuple, one tensor, or a dict of keyword inputs) under
    ``torch.inference_mode`` and eval mode with ``torch.set_num_threads(threads)``; the previous thread count and
    the module's training flags are restored afterwards. ``module`` may be fxprune's ``Compiled``."""
    check_timing_args(warmup, repeats, threads)
    mod = module if isinstance(module, nn.Module) else resolve_module(module)
    old = torch.get_num_threads()
    cuda = any(t.is_cuda for t in (inputs.values() if isinstance(inputs, dict) else
                                   (inputs,) if isinstance(inputs, torch.Tensor) else inputs)
               if isinstance(t, torch.Tensor))
    times: list[float] = []
    try:
        torch.set_num_threads(threads)
        with eval_mode(mod), torch.inference_mode():
            for _ in range(warmup):
                _call(mod, inputs)
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                _call(mod, inputs)
                if cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
    return LatencyStats.from_times(times, threads)
