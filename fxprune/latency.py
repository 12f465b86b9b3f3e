"""Dense vs pruned latency of a :class:`~fxprune.compile.Compiled` (ONNX Runtime or eager torch) and its ONNX export.

    res = fxprune.latency.benchmark(out, batch=8, threads=2)   # also ``out.benchmark(...)``
    print(fxprune.latency.latency_line(res))                     # dense 12.3 ms, pruned 4.5 ms, speedup 2.73x ...
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .errors import ExportError, InputError

__all__ = ["benchmark", "BenchmarkResult", "export_onnx", "latency_line", "example_inputs", "batched", "batch_size"]

log = logging.getLogger("fxprune")
#: onnxruntime timing rounds take the fastest of this many runs (after two untimed settle runs): a run preempted by
#: another process is only ever slower, and LatencyPrune measures its selections the same way
INNER = 3


class BenchmarkResult(dict):
    """What :func:`benchmark` returns: the dict of measurements (keys as documented there), printable as one line
    (``print(out.benchmark())`` -> ``onnxruntime, batch 8, 2 threads: dense 12.3 ms, pruned 4.5 ms, ...``)."""

    def __str__(self) -> str:
        return f"{self['backend']}, batch {self['batch']}, {self['threads']} threads: {latency_line(self)}"


def _export_cache(compiled: Any) -> dict:
    """Per-``Compiled`` record of the ONNX files :func:`benchmark` exported into a temporary folder, so a second
    call times the same files instead of exporting both models again. The folder is removed with the object."""
    cache = compiled.__dict__.get("_fxprune_onnx_cache")
    if cache is None:
        folder = tempfile.mkdtemp(prefix="fxprune-onnx-")
        weakref.finalize(compiled, shutil.rmtree, folder, True)
        cache = compiled.__dict__["_fxprune_onnx_cache"] = {"folder": Path(folder)}
    return cache


def example_inputs(compiled: Any) -> Any:
    args, kwargs = tuple(compiled.program.args), dict(compiled.program.kwargs)
    if args and kwargs:
        raise InputError("the program takes positional and keyword inputs; the ONNX backend takes one kind",
                         fix="call fxprune.backends.onnx.export yourself with a dict of keyword inputs")
    return dict(kwargs) if kwargs else args


def export_onnx(compiled: Any, path: str | os.PathLike, **kw: Any) -> Any:
    """``fxprune.backends.onnx.export(compiled, <its example inputs>, path, **kw)`` -> ExportResult."""
    from fxprune.backends import onnx as onnx_backend

    return onnx_backend.export(compiled, example_inputs(compiled), path, **kw)


def batched(example: Any, batch: int | None) -> Any:
    if batch is None:
        return example

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        reps = -(-batch // x.shape[0])
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch].contiguous()

    if isinstance(example, dict):
        return {k: one(v) for k, v in example.items()}
    return tuple(one(v) for v in example)


def benchmark(compiled: Any, *, backend: str = "onnxruntime", batch: int | None = None, threads: int = 2,
              warmup: int = 3, repeats: int = 20, folder: str | os.PathLike | None = None,
              dense: nn.Module | None = None, record: bool = True,
              onnx_files: tuple[str | os.PathLike, str | os.PathLike] | None = None) -> BenchmarkResult:
    """Latency of the dense model (``dense``, default ``compiled.program.source``) vs the pruned one, timed in
    one run (interleaved rounds). ``backend``: ``"onnxruntime"`` (both exported to ONNX in ``folder``, default a
    temporary folder; needs a dynamic-batch export when ``batch`` differs from the example's) or ``"torch"``
    (eager). Without ``folder`` the ONNX files are exported once per ``compiled`` and re-used by later calls.
    Returns a printable :class:`BenchmarkResult` dict ``{"backend", "batch", "threads", "dense_ms", "pruned_ms", "speedup", "ideal_speedup"
    (1 / MACs ratio), "dense", "pruned"}`` (the last two: LatencyStats as dicts, over rounds that each take the
    fastest of ``INNER`` runs, as LatencyPrune's end-to-end measurements do). Without a dense model only the
    pruned one is timed. ``record``: also put a one-line summary in ``compiled.report.latency``. ``onnx_files``:
    ``(dense.onnx, pruned.onnx)`` already exported (e.g. by the CLI, with its own options): timed as they are."""
    from fxprune import backends

    dense = dense if dense is not None else getattr(compiled.program, "source", None)
    example = example_inputs(compiled)
    x = batched(example, batch)
    b = batch or batch_size(example)
    res = BenchmarkResult(backend=backend, batch=b, threads=threads)
    if backend == "onnxruntime" and onnx_files is not None:
        c = backends.onnxruntime.compare(*onnx_files, x, warmup=warmup, repeats=repeats, threads=threads,
                                         inner=INNER)
        res.update(dense=c["dense"].as_dict(), pruned=c["pruned"].as_dict())
    elif backend == "onnxruntime":
        ort = backends.onnxruntime
        if folder is not None:  # the user's folder: export there (every call; the user may have changed files)
            tmp, cache = Path(folder), {}
            tmp.mkdir(parents=True, exist_ok=True)
        else:  # exported once per Compiled and re-used by later calls
            cache = _export_cache(compiled)
            tmp = cache["folder"]
        pruned_path = tmp / "pruned.onnx"
        if "pruned" not in cache:
            log.info("benchmark: exporting the pruned model to ONNX (%s)", pruned_path)
            cache["pruned"] = export_onnx(compiled, pruned_path)
        pr = cache["pruned"]
        if batch not in (None, batch_size(example)) and not pr.dynamic_batch:
            raise ExportError(f"the pruned ONNX file has a static batch; cannot time batch {batch}",
                              fix="compile with example inputs of batch >= 2 (dynamic batch), or batch=None")
        if dense is not None:
            dense_path = tmp / "dense.onnx"
            key = ("dense", id(dense))
            if key not in cache:
                log.info("benchmark: exporting the dense model to ONNX (%s)", dense_path)
                backends.onnx.export(dense, example, dense_path)
                cache[key] = True
            log.info("benchmark: timing dense vs pruned in onnxruntime (batch %s, %d threads, %d repeats)",
                     b, threads, repeats)
            c = ort.compare(dense_path, pruned_path, x, warmup=warmup, repeats=repeats, threads=threads,
                            inner=INNER)
            res.update(dense=c["dense"].as_dict(), pruned=c["pruned"].as_dict())
        else:
            log.info("benchmark: timing the pruned model in onnxruntime (batch %s, %d threads)", b, threads)
            res["pruned"] = ort.benchmark(pruned_path, x, warmup=warmup, repeats=repeats,
                                          threads=threads).as_dict()
    elif backend == "torch":
        tb = backends.torch
        if dense is not None:
            td, tp = [], []
            for i in range(max(1, repeats // 5)):  # interleave blocks so load drift hits both
                order = [(dense, td), (compiled.module, tp)] if i % 2 == 0 else [(compiled.module, tp), (dense, td)]
                for m, acc in order:
                    acc.append(tb.benchmark(m, x, warmup=warmup if i == 0 else 1, repeats=5, threads=threads))
            res["dense"] = _merge_stats(td, threads)
            res["pruned"] = _merge_stats(tp, threads)
        else:
            res["pruned"] = tb.benchmark(compiled.module, x, warmup=warmup, repeats=repeats,
                                         threads=threads).as_dict()
    else:
        raise InputError(f"backend must be 'onnxruntime' or 'torch', got {backend!r}")
    res["pruned_ms"] = res["pruned"]["median_ms"]
    if "dense" in res:
        res["dense_ms"] = res["dense"]["median_ms"]
        res["speedup"] = res["dense_ms"] / res["pruned_ms"] if res["pruned_ms"] > 0 else float("inf")
    mr = compiled.report.macs_ratio if compiled.report.macs_before else None
    res["ideal_speedup"] = 1.0 / mr if mr else None
    if record:
        compiled.report.latency[f"{backend} (batch {b}, {threads} threads)"] = latency_line(res)
    return res


def latency_line(res: Mapping[str, Any]) -> str:
    """``dense 12.3 ms, pruned 4.5 ms, speedup 2.73x (ideal 3.98x from MACs)``."""
    ideal = f" (ideal {res['ideal_speedup']:.2f}x from MACs)" if res.get("ideal_speedup") else ""
    if "dense_ms" in res:
        return (f"dense {res['dense_ms']:.3f} ms, pruned {res['pruned_ms']:.3f} ms, speedup "
                f"{res['speedup']:.2f}x{ideal}")
    return f"pruned {res['pruned_ms']:.3f} ms{ideal}"


def _merge_stats(stats: list[Any], threads: int) -> dict[str, Any]:
    from fxprune.backends import LatencyStats

    # each block's median stands for the block; summary over block medians
    return LatencyStats.from_times([s.median_ms for s in stats], threads).as_dict()


def batch_size(example: Any) -> int | None:
    for t in tree_flatten(example)[0]:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None
