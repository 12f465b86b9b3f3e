"""Deployment backends: ONNX export, ONNX Runtime, TensorRT and plain PyTorch.

    from fxprune.backends import onnx, onnxruntime, tensorrt
    res = onnx.export(out, (x,), "model.onnx")          # out: fxprune.compile(...) result or any nn.Module
    onnxruntime.benchmark(res.path, (x,))                 # LatencyStats
    print(tensorrt.check(res.path, sparse_weights=True))  # TensorRT readiness, no TensorRT needed

Importing this package imports no optional dependency: ``onnx``, ``onnxruntime``, ``onnxsim`` and ``tensorrt`` are
imported inside the functions that need them; a missing one raises :class:`~fxprune.errors.BackendUnavailableError`
naming the extra to install. The submodules are loaded on first attribute access.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch.nn as nn

from fxprune.errors import BackendUnavailableError, InputError

__all__ = ["onnx", "onnxruntime", "tensorrt", "torch", "LatencyStats", "resolve_module"]

_SUBMODULES = ("onnx", "onnxruntime", "tensorrt", "torch", "trt_support")

# python package -> (pip distribution, fxprune extra)
_EXTRAS = {
    "onnx": ("onnx", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "onnxsim": ("onnxsim", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        mod = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = mod
        return mod
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require(package: str) -> Any:
    """Import and return an optional dependency; raise BackendUnavailableError naming the extra if missing."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        dist, extra = _EXTRAS.get(package, (package, None))
        fix = f"pip install 'fxprune[{extra}]'" if extra else f"pip install {dist}"
        raise BackendUnavailableError(f"the optional dependency {package!r} is not installed ({e})", fix=fix) from e


def resolve_module(module_or_compiled: Any) -> nn.Module:
    """Return the nn.Module of ``module_or_compiled``: the object itself or its ``.module`` (a ``Compiled``)."""
    if isinstance(module_or_compiled, nn.Module):
        return module_or_compiled
    inner = getattr(module_or_compiled, "module", None)
    if isinstance(inner, nn.Module):
        return inner
    raise InputError(
        f"expected an nn.Module or an object with a .module attribute (fxprune.compile's result), "
        f"got {type(module_or_compiled).__name__}",
        fix="pass the model itself or the result of fxprune.compile",
    )


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[bool]:
    """Put ``module`` in eval mode for the block and restore every submodule's training flag afterwards.

    Yields whether eval mode could be set. GraphModules from ``torch.export`` (``ExportedProgram.module()``)
    refuse ``.eval()``; their graph is fixed at export time, so they are left as they are (yields False).
    """
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        switched = True
    except NotImplementedError:  # torch.export's _StatefulGraphModule: "Calling eval() is not supported yet"
        switched = False
    try:
        yield switched
    finally:
        if switched:
            for m, was in flags:
                m.training = was


@dataclass
class LatencyStats:
    """Latency of one model over ``repeats`` timed runs, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    repeats: int
    threads: int

    @classmethod
    def from_times(cls, times_ms: list[float], threads: int) -> "LatencyStats":
        if not times_ms:
            raise InputError("no timings to summarise", fix="use repeats >= 1")
        xs = sorted(times_ms)
        return cls(
            median_ms=statistics.median(xs),
            p10_ms=_quantile(xs, 0.10),
            p90_ms=_quantile(xs, 0.90),
            mean_ms=statistics.fmean(xs),
            std_ms=statistics.pstdev(xs) if len(xs) > 1 else 0.0,
            repeats=len(xs),
            threads=threads,
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"median {self.median_ms:.3f} ms (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, "
                f"mean {self.mean_ms:.3f} +- {self.std_ms:.3f}; {self.repeats} runs, {self.threads} thread(s))")


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default method)."""
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def check_timing_args(warmup: int, repeats: int, threads: int) -> None:
    if warmup < 0 or repeats < 1 or threads < 1:
        raise InputError(f"need warmup >= 0, repeats >= 1, threads >= 1; got warmup={warmup}, "
                         f"repeats={repeats}, threads={threads}")
