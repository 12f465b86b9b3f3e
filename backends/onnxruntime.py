"""Run and time ONNX models in ONNX Runtime on the CPU.

``session`` sets the thread counts explicitly (ONNX Runtime's default uses every core, which makes timings of
small models noisy and unrepeatable); ``compare`` times a dense and a pruned model in interleaved rounds so that
drift in machine load hits both alike.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

from fxprune.errors import InputError

from . import LatencyStats, check_timing_args, require

__all__ = ["session", "run", "benchmark", "compare", "time_burst", "LatencyStats"]


def session(path: str | os.PathLike, threads: int = 1, *, inter_threads: int = 1,
            providers: Sequence[str] | None = None, spin: bool = True, stop_spinning: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` with ``threads`` intra-op and ``inter_threads`` inter-op
    threads, sequential execution, all graph optimisations, on ``providers`` (default: CPUExecutionProvider).

    ``spin``: idle intra-op threads spin-wait before sleeping (onnxruntime's default, what a deployment runs). A
    session timed right after another one in the same process shares the cores with the other one's still
    spinning threads; the timing helpers here (:func:`compare`, ``LatencyTable``) therefore run a few untimed
    "settle" runs after every switch rather than turning spinning off, which would time a slower configuration
    than the one deployed (measured, ResNet-56 at batch 8, 2 threads: pruned/dense 0.41 alone with spinning,
    0.53 without spinning, 0.75 alternating single runs with spinning and no settle runs).

    ``stop_spinning``: the threads still spin between the ops of a run but stop when it returns
    (``session.force_spinning_stop``), so an idle session no longer competes with the one being timed. The
    timing helpers that alternate sessions (:func:`compare`, ``LatencyTable``) use it: measured on a 3.4 ms
    Fashion-MNIST CNN (batch 64, 2 threads, 2 cores), an idle session's spinning threads, which keep spinning
    long after its run (settle runs do not stop them), slowed the other to 7.4 ms and made the per-round
    pruned/dense ratio jump between 0.35 and 0.67 from round to round; with ``stop_spinning`` each model timed
    within 4% of its time alone and the ratio repeated within 0.02."""
    ort = require("onnxruntime")
    if threads < 1 or inter_threads < 1:
        raise InputError(f"threads must be >= 1, got threads={threads}, inter_threads={inter_threads}")
    if not os.path.exists(os.fspath(path)):
        raise InputError(f"ONNX file {os.fspath(path)!r} does not exist")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = int(inter_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    if stop_spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(os.fspath(path), sess_options=so,
                                providers=list(providers or ["CPUExecutionProvider"]))


def _as_session(path_or_session: Any, threads: int = 1, stop_spinning: bool = False) -> Any:
    if isinstance(path_or_session, (str, os.PathLike)):
        return session(path_or_session, threads, stop_spinning=stop_spinning)
    if hasattr(path_or_session, "run") and hasattr(path_or_session, "get_inputs"):
        return path_or_session
    raise InputError(f"expected a path to an .onnx file or an InferenceSession, got {type(path_or_session).__name__}")


def _to_numpy(x: Any) -> Any:
    np = require("numpy")
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch.Tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


def feed(sess: Any, inputs: Any) -> dict[str, Any]:
    """The input dict for ``sess.run``: ``inputs`` is a dict by name, or a sequence (or one array) in the order of
    the session's inputs. Torch tensors are converted to numpy."""
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InputError(f"inputs lack {missing}; the model's inputs are {names}")
        return {n: _to_numpy(inputs[n]) for n in names}
    if not isinstance(inputs, (list, tuple)):
        inputs = (inputs,)
    if len(inputs) != len(names):
        raise InputError(f"got {len(inputs)} inputs, the model has {len(names)}: {names}",
                         fix="pass one array per model input, in order, or a dict by input name")
    return {n: _to_numpy(v) for n, v in zip(names, inputs)}


def run(path_or_session: Any, inputs: Any) -> list[Any]:
    """Run the model once; ``inputs`` as for :func:`feed`. Returns the outputs as numpy arrays, in graph order."""
    sess = _as_session(path_or_session)
    return list(sess.run(None, feed(sess, inputs)))


def _timed(sess: Any, fd: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    sess.run(None, fd)
    return (time.perf_counter() - t0) * 1e3


def time_burst(sess: Any, fd: dict[str, Any], inner: int = 1, settle: int = 0) -> float:
    """The fastest (ms) of ``inner`` individually timed runs after ``settle`` untimed ones: a run preempted by
    another process is slower, never faster, so the minimum of a short burst is the least disturbed estimate; the
    settle runs let a previously timed session's spin-waiting threads leave the cores (see :func:`session`)."""
    for _ in range(settle):
        sess.run(None, fd)
    return min(_timed(sess, fd) for _ in range(inner))


def benchmark(path: Any, inputs: Any, *, warmup: int = 5, repeats: int = 30, threads: int = 1) -> LatencyStats:
    """Latency of one ``session.run`` on ``inputs``: ``warmup`` untimed runs, then ``repeats`` timed ones.
    ``path`` may also be a ready InferenceSession (then ``threads`` only labels the result)."""
    check_timing_args(warmup, repeats, threads)
    sess = _as_session(path, threads)
    fd = feed(sess, inputs)
    for _ in range(warmup):
        sess.run(None, fd)
    return LatencyStats.from_times([_timed(sess, fd) for _ in range(repeats)], threads)


def compare(dense_path: Any, pruned_path: Any, inputs: Any, *, pruned_inputs: Any = None, warmup: int = 5,
            repeats: int = 30, threads: int = 1, settle: int = 2, inner: int = 1) -> dict[str, Any]:
    """Time the dense and the pruned model in one run, alternating which goes first in each of ``repeats`` rounds;
    every round of a model is ``settle`` untimed runs (after a switch, the other session's threads are still
    spin-waiting on the cores: see :func:`session`), then the fastest of ``inner`` timed runs (``inner > 1``
    filters out runs preempted by other processes on a shared machine).

    Returns ``{"dense": LatencyStats, "pruned": LatencyStats, "speedup": dense median / pruned median,
    "threads": threads}``. ``pruned_inputs`` defaults to ``inputs`` (pruning keeps the model's interface).
    """
    check_timing_args(warmup, repeats, threads)
    if not (isinstance(settle, int) and settle >= 0):
        raise InputError(f"settle must be an int >= 0, got {settle!r}", fix="e.g. settle=2")
    if not (isinstance(inner, int) and inner >= 1):
        raise InputError(f"inner must be an int >= 1, got {inner!r}", fix="e.g. inner=3")
    dense = _as_session(dense_path, threads, stop_spinning=True)  # two sessions: see session(stop_spinning=)
    pruned = _as_session(pruned_path, threads, stop_spinning=True)
    fd_d = feed(dense, inputs)
    fd_p = feed(pruned, inputs if pruned_inputs is None else pruned_inputs)
    for _ in range(warmup):
        dense.run(None, fd_d)
        pruned.run(None, fd_p)
    td: list[float] = []
    tp: list[float] = []
    for i in range(repeats):
        if i % 2 == 0:
            td.append(time_burst(dense, fd_d, inner, settle))
            tp.append(time_burst(pruned, fd_p, inner, settle))
        else:
            tp.append(time_burst(pruned, fd_p, inner, settle))
            td.append(time_burst(dense, fd_d, inner, settle))
    sd, sp = LatencyStats.from_times(td, threads), LatencyStats.from_times(tp, threads)
    return {"dense": sd, "pruned": sp, "speedup": sd.median_ms / sp.median_ms if sp.median_ms > 0 else float("inf"),
            "threads": threads}
