"""Per-op latency lookup tables measured on the target backend (the runtime part of :mod:`LatencyPrune`).

An *op* is one conv2d or linear node of a traced program with everything that sets its cost except its channel
widths (:class:`OpSpec`: batch, spatial size / tokens, kernel, stride, padding, dilation, depthwise, groups,
bias). :class:`LatencyTable` holds the measured latency of ``(spec, in width, out width)`` points:

* measured with ONNX Runtime on the CPU (``backend="onnxruntime"``, ``threads`` intra-op threads, one inter-op
  thread, sequential execution, all graph optimisations): each point is a one-node ONNX micro-graph (Conv, or
  MatMul + Add), all points of one spec are timed in interleaved rounds (a seeded shuffle per round, so load drift
  hits every width alike), each round takes the fastest of a burst of individually timed runs (3 to 25, enough to
  last ``min_time_ms``; a preempted run is slower, never faster); the value of the spec's widest point is its
  median over ``repeats`` rounds, and every other point is that median times the point's median per-round ratio
  to the widest point (:func:`drift_cancelled`: a machine that slows down for a while slows every width of the
  round alike, so the widths of one op stay in the right order);
* noise is checked: a point whose relative spread (interquartile range / median over the rounds, of its per-round
  ratios for all but the widest point) is above
  ``max_spread`` is measured again (``retries`` times); if it stays noisy, or a micro-graph fails to run,
  :class:`fxprune.errors.MeasurementError` names the op and the numbers (never a silently wrong table);
* or measured with torch on the CPU (``backend="torch.compile"``: each point is the op as an eval-mode torch
  module, timed eagerly with ``threads`` torch threads; torch.compile's CPU code calls these same aten/oneDNN
  kernels for convolutions and matmuls, and the fused elementwise code around them is left to LatencyPrune's
  end-to-end calibration, which times ``torch.compile``'d models); the same rounds, estimator and noise check;
* cached on disk as JSON under ``~/.cache/fxprune/latency/<host>-<backend>-<version>-t<threads>.json`` (override the
  folder with ``cache_dir`` or ``FXPRUNE_LATENCY_CACHE``). The file records host, CPU, backend version and thread
  count; a file whose header differs (another machine, an upgraded onnxruntime, another format) is ignored and
  rewritten, and ``rebuild=True`` discards it on purpose.

``LatencyTable.synthetic(fn)`` is a table whose "measurements" are ``fn(spec, w_in, w_out) -> ms`` (an analytic
model, or a test's known table); it never touches a backend or the disk.
"""
from __future__ import annotations

import json
import math
import os
import platform
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from fxprune.backends.onnxruntime import time_burst
from fxprune.errors import BackendUnavailableError, InputError, MeasurementError

__all__ = ["OpSpec", "LatencyTable", "TABLE_FORMAT", "default_cache_dir", "drift_cancelled"]

#: 5: sessions stop spinning after each run (an idle session's spinning threads slowed the timed one up to 2.5x);
#: 4: each point is its median per-round ratio to its op's widest point times that point's median (drift cancelled);
#: 3: an untimed settle run before each burst; 2: a round is the fastest of its burst (1: median)
TABLE_FORMAT = 5
BACKENDS = ("onnxruntime", "torch.compile")


@dataclass(frozen=True)
class OpSpec:
    """Everything that sets one op's latency except its channel widths.

    ``kind``: ``"conv"`` (input ``(batch, w_in, *spatial)``) or ``"linear"`` (input ``(batch, *spatial, w_in)``,
    ``spatial`` being the token dims). ``depthwise``: a conv with ``groups == w_in == w_out`` (one width).
    ``groups``: the group count of a non-depthwise grouped conv (constant under channel pruning)."""

    kind: str
    batch: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    depthwise: bool = False
    bias: bool = True

    def key(self, w_in: int, w_out: int) -> str:
        """The table key of this op at widths ``(w_in, w_out)``."""
        j = lambda xs: "x".join(map(str, xs)) or "-"  # noqa: E731
        return (f"{self.kind}|b{self.batch}|s{j(self.spatial)}|k{j(self.kernel)}|st{j(self.stride)}|"
                f"p{j(self.padding)}|d{j(self.dilation)}|g{self.groups}|dw{int(self.depthwise)}|"
                f"bias{int(self.bias)}|in{int(w_in)}|out{int(w_out)}")


def default_cache_dir() -> Path:
    env = os.environ.get("FXPRUNE_LATENCY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fxprune" / "latency"


def _backend_version(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputError(f"latency tables support backend in {BACKENDS}, got {backend!r}",
                         fix="use backend='onnxruntime' or 'torch.compile' (TensorRT tables are not implemented)")
    if backend == "torch.compile":
        import torch

        return str(torch.__version__)
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency of the onnx extra
        raise BackendUnavailableError("onnxruntime is not installed", fix="pip install onnxruntime") from e
    return str(onnxruntime.__version__)


class LatencyTable:
    """Measured (or synthetic) latency of ops at given widths, in milliseconds; see the module docstring.

    ``lookup(spec, w_in, w_out)`` reads one point (KeyError if it was never measured); ``ensure(points)``
    measures the missing ones (and saves the file); ``predict(spec, w_in, w_out, grid_in, grid_out)``
    interpolates bilinearly between measured grid points."""

    def __init__(self, backend: str = "onnxruntime", threads: int = 2, *, cache_dir: str | os.PathLike | None = None,
                 rebuild: bool = False, repeats: int = 7, warmup: int = 2, min_time_ms: float = 1.0,
                 max_spread: float = 0.5, retries: int = 2, seed: int = 0, persist: bool = True,
                 fn: Callable[[OpSpec, int, int], float] | None = None):
        if not (isinstance(threads, int) and threads >= 1):
            raise InputError(f"threads must be a positive int, got {threads!r}", fix="e.g. threads=2")
        if not (isinstance(repeats, int) and repeats >= 3):
            raise InputError(f"repeats must be an int >= 3, got {repeats!r}",
                             fix="medians and spreads need at least 3 rounds, e.g. repeats=7")
        if not (max_spread > 0):
            raise InputError(f"max_spread must be > 0, got {max_spread!r}", fix="e.g. max_spread=0.5")
        self.backend, self.threads, self.fn = backend, threads, fn
        self.repeats, self.warmup, self.min_time_ms = repeats, warmup, min_time_ms
        self.max_spread, self.retries, self.seed = max_spread, retries, seed
        self.entries: dict[str, dict[str, float]] = {}
        self.models: dict[str, dict[str, Any]] = {}  # end-to-end dense measurements by model fingerprint
        self.measured_now = 0
        if fn is not None:
            self.header = {"format": TABLE_FORMAT, "backend": "synthetic"}
            self.path = None
            return
        self.header = {"format": TABLE_FORMAT, "host": socket.gethostname(), "cpu": _cpu_name(),
                       "backend": backend, "version": _backend_version(backend), "threads": threads}
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        name = f"{self.header['host']}-{backend}-{self.header['version']}-t{threads}.json"
        self.path = folder / name if persist else None
        self.invalidated: str | None = None
        if self.path is not None and self.path.exists() and not rebuild:
            self._load()

    @classmethod
    def synthetic(cls, fn: Callable[[OpSpec, int, int], float]) -> "LatencyTable":
        """A table whose points are ``fn(spec, w_in, w_out)`` (ms): no backend, no file."""
        return cls(fn=fn)

    # ------------------------------------------------------------------ cache
    def _load(self) -> None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            self.invalidated = f"unreadable cache ({type(e).__name__}: {e})"
            return
        head = data.get("header", {})
        diff = [k for k in self.header if head.get(k) != self.header[k]]
        if diff:  # another machine / version / thread count / format: start over
            self.invalidated = "header differs in " + ", ".join(f"{k} ({head.get(k)!r} != {self.header[k]!r})"
                                                               for k in diff)
            return
        self.entries = {k: dict(v) for k, v in data.get("entries", {}).items()}
        self.models = {k: dict(v) for k, v in data.get("models", {}).items()}

    def save(self) -> None:
        """Write the table (atomically) to its cache file; no-op for synthetic or non-persistent tables."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"header": self.header, "entries": self.entries, "models": self.models}, f, indent=0,
                      sort_keys=True)
        os.replace(tmp, self.path)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.entries)

    def has(self, spec: OpSpec, w_in: int, w_out: int) -> bool:
        return self.fn is not None or spec.key(w_in, w_out) in self.entries

    def lookup(self, spec: OpSpec, w_in: int, w_out: int) -> float:
        """Latency (ms) of ``spec`` at ``(w_in, w_out)``; KeyError if the point was never measured."""
        if self.fn is not None:
            return float(self.fn(spec, int(w_in), int(w_out)))
        return float(self.entries[spec.key(w_in, w_out)]["ms"])

    def predict(self, spec: OpSpec, w_in: float, w_out: float, grid_in: np.ndarray, grid_out: np.ndarray) -> float:
        """Bilinear interpolation of the measured grid ``grid_in x grid_out`` (ascending ints) at ``(w_in, w_out)``
        (exact at grid points; clamped to the grid's range)."""
        def bracket(g: np.ndarray, w: float) -> tuple[int, int, float]:
            w = min(max(w, float(g[0])), float(g[-1]))
            j = int(np.searchsorted(g, w))
            if j < len(g) and g[j] == w:
                return j, j, 0.0
            lo = max(j - 1, 0)
            hi = min(j, len(g) - 1)
            return lo, hi, 0.0 if hi == lo else (w - g[lo]) / (g[hi] - g[lo])

        i0, i1, fi = bracket(grid_in, w_in)
        o0, o1, fo = bracket(grid_out, w_out)
        f = lambda a, b: self.lookup(spec, int(grid_in[a]), int(grid_out[b]))  # noqa: E731
        top = f(i0, o0) * (1 - fo) + (f(i0, o1) * fo if fo else 0.0)
        bot = (f(i1, o0) * (1 - fo) + (f(i1, o1) * fo if fo else 0.0)) if fi else 0.0
        return top * (1 - fi) + bot * fi

    # ------------------------------------------------------------------ measurement
    def ensure(self, points: Iterable[tuple[OpSpec, int, int]], *, progress: Callable[[str], None] | None = None
               ) -> int:
        """Measure every point not in the table yet (grouped by spec, interleaved), saving after each spec. Returns how many
        points were measured. Raises MeasurementError on a failing micro-graph or a spread above ``max_spread``."""
        if self.fn is not None:
            return 0
        todo: dict[OpSpec, list[tuple[int, int]]] = {}
        for spec, wi, wo in points:
            if spec.key(wi, wo) not in self.entries:
                lst = todo.setdefault(spec, [])
                if (wi, wo) not in lst:
                    lst.append((int(wi), int(wo)))
        n = 0
        try:
            for i, (spec, widths) in enumerate(todo.items()):
                if progress is not None:
                    progress(f"latency table: op {i + 1}/{len(todo)} ({spec.kind}, {len(widths)} widths)")
                for (wi, wo), rec in self._measure_spec(spec, widths).items():
                    self.entries[spec.key(wi, wo)] = rec
                    n += 1
                self.save()  # per op: an interrupted or failed build keeps what it measured
        finally:
            if n:
                self.measured_now += n
                self.save()
        return n

    def _measure_spec(self, spec: OpSpec, widths: list[tuple[int, int]]) -> dict[tuple[int, int], dict[str, float]]:
        if self.backend == "onnxruntime":
            return self._measure_runners(spec, self._ort_runners(spec, widths))
        with torch_threads(self.threads):
            return self._measure_runners(spec, self._torch_runners(spec, widths))

    def _ort_runners(self, spec: OpSpec, widths: list[tuple[int, int]]) -> dict[tuple[int, int], Burst]:
        """Per width: a timer of its one-node ONNX model in an onnxruntime session (this table's threads)."""
        import onnxruntime as rt

        so = rt.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.force_spinning_stop", "1")  # idle sessions must not spin: ort.session
        rng = np.random.default_rng(self.seed)
        out: dict[tuple[int, int], Burst] = {}
        for wi, wo in widths:
            try:
                model, x = micro_graph(spec, wi, wo, rng)
                sess = rt.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - any failure of the micro-graph is a failed measurement
                raise _failed(spec, wi, wo, e) from e
            out[(wi, wo)] = lambda inner, settle, sess=sess, feed={"x": x}: time_burst(sess, feed, inner,
                                                                                        settle=settle)
        return out

    def _torch_runners(self, spec: OpSpec, widths: list[tuple[int, int]]) -> dict[tuple[int, int], Burst]:
        """Per width: a timer of the op as a torch module on the CPU (eager aten kernels: what torch.compile's
        CPU code calls for convolutions and matmuls, its extern kernels; the fused elementwise code around them
        is outside the table and left to the end-to-end calibration)."""
        import torch

        gen = torch.Generator().manual_seed(self.seed)
        out: dict[tuple[int, int], Burst] = {}
        for wi, wo in widths:
            try:
                mod, x = micro_module(spec, wi, wo, gen)
            except Exception as e:  # noqa: BLE001
                raise _failed(spec, wi, wo, e) from e
            out[(wi, wo)] = lambda inner, settle, mod=mod, x=x: torch_burst(mod, (x,), inner, settle=settle)
        return out

    def _measure_runners(self, spec: OpSpec, runners: dict[tuple[int, int], Burst]
                         ) -> dict[tuple[int, int], dict[str, float]]:
        """Time every width of one op in interleaved rounds (see the module docstring) and estimate its points."""
        rng = np.random.default_rng(self.seed)
        sessions: dict[tuple[int, int], tuple[Burst, int]] = {}
        for (wi, wo), run in runners.items():
            try:
                t = run(1, 0)
                for _ in range(self.warmup):
                    t = min(t, run(1, 0))
            except Exception as e:  # noqa: BLE001 - any failure of the micro-graph is a failed measurement
                raise _failed(spec, wi, wo, e) from e
            inner = int(min(25, max(3, math.ceil(self.min_time_ms / max(t, 1e-4)))))
            sessions[(wi, wo)] = (run, inner)
        ref = max(sessions, key=lambda k: (k[0] * k[1], k))  # the widest point: timed in every round
        accepted: dict[tuple[int, int], tuple[float, float, int]] = {}  # key -> (ratio to ref, spread, rounds)
        ref_times: list[float] = []
        pending = list(sessions)
        for attempt in range(self.retries + 1):
            keys = list(dict.fromkeys(pending + [ref]))
            times: dict[tuple[int, int], list[float]] = {k: [] for k in keys}
            for _ in range(self.repeats):
                order = list(keys)
                rng.shuffle(order)
                for k in order:
                    run, inner = sessions[k]
                    times[k].append(run(inner, 1))
            ref_times += times[ref]
            estimates = drift_cancelled(times, ref)
            still = []
            for k in pending:
                ratio, spread = estimates[k]
                if ratio <= 0 or not math.isfinite(ratio):
                    raise MeasurementError(f"timing {spec.key(*k)} gave a non-positive median ({ratio})",
                                           fix="the timer failed; rebuild the table with rebuild=True")
                if spread > self.max_spread:
                    still.append(k)
                    if attempt < self.retries:
                        continue
                    raise MeasurementError(
                        f"timing {spec.key(*k)} is too noisy: relative spread {spread:.2f} (interquartile range / "
                        f"median over {self.repeats} rounds, {attempt + 1} attempts"
                        f"{'' if k == ref else ', of its per-round ratios to the widest point'}) is above "
                        f"max_spread={self.max_spread}",
                        fix="measure on a quieter machine (load average now "
                            f"{_loadavg()}), raise repeats=, or accept more noise with max_spread=")
                accepted[k] = (ratio, spread, self.repeats * (attempt + 1))
            pending = still
            if not pending:
                break
        ref_ms = float(np.median(ref_times))
        return {k: {"ms": round(r * ref_ms, 6), "spread": round(sp, 4), "rounds": n, "inner": sessions[k][1]}
                for k, (r, sp, n) in accepted.items()}

    def time_model(self, path: str | os.PathLike, inputs: dict[str, np.ndarray], *, repeats: int = 9,
                   inner: int = 3) -> float:
        """Median latency (ms) of a whole ONNX model under this table's settings (``repeats`` rounds, each the
        fastest of ``inner`` runs); MeasurementError if the rounds spread more than ``max_spread``."""
        return self.compare_models([path], inputs, repeats=repeats, inner=inner)[0]

    def compare_models(self, paths: list[str | os.PathLike], inputs: dict[str, np.ndarray], *, repeats: int = 9,
                       inner: int = 3) -> list[float]:
        """Median latency (ms) of each model, timed in interleaved rounds (the order rotates every round; each
        round takes the fastest of ``inner`` runs per model). With two or more models the noise check is on the
        per-round ratios to the first model (drift that hits both cancels); MeasurementError if their relative
        interquartile range stays above ``max_spread`` after ``retries`` more attempts. Each burst follows two
        untimed settle runs (see :func:`fxprune.backends.onnxruntime.session` on spin-waiting threads)."""
        return self.compare_ratios(paths, inputs, repeats=repeats, inner=inner)[0]

    def compare_ratios(self, paths: list[str | os.PathLike], inputs: dict[str, np.ndarray], *, repeats: int = 9,
                       inner: int = 3) -> tuple[list[float], list[float]]:
        """:meth:`compare_models`, also returning each model's median per-round ratio to the first model (1.0 for
        the first): the latency ratio with slow drift of the machine's load cancelled round by round, a steadier
        estimate than the ratio of the medians."""
        from fxprune.backends import onnxruntime as ort

        sessions = [ort.session(p, self.threads, stop_spinning=True) for p in paths]  # see ort.session
        for sess in sessions:
            sess.run(None, inputs)
        bursts = [lambda inner, settle, sess=sess: time_burst(sess, inputs, inner, settle=settle) for sess in sessions]
        return self._interleaved(bursts, [os.path.basename(os.fspath(p)) for p in paths], repeats, inner)

    def compare_callables(self, modules: list[Callable[..., Any]], args: tuple, *, repeats: int = 9,
                          inner: int = 3) -> tuple[list[float], list[float]]:
        """:meth:`compare_ratios` for torch callables (e.g. ``torch.compile``'d modules) run on ``args`` under
        ``torch.inference_mode`` with this table's thread count: medians (ms) and median per-round ratios to the
        first. Each is called once untimed first (a compiled module compiles on its first call)."""
        with torch_threads(self.threads):
            import torch

            with torch.inference_mode():
                for m in modules:
                    m(*args)
            bursts = [lambda inner, settle, m=m: torch_burst(m, args, inner, settle=settle) for m in modules]
            return self._interleaved(bursts, [type(m).__name__ for m in modules], repeats, inner)

    def _interleaved(self, bursts: list[Burst], labels: list[str], repeats: int, inner: int
                     ) -> tuple[list[float], list[float]]:
        worst = float("inf")
        for attempt in range(self.retries + 1):
            rounds = [[0.0] * len(bursts) for _ in range(repeats)]
            for r in range(repeats):
                k = r % len(bursts)
                for i in list(range(k, len(bursts))) + list(range(k)):
                    rounds[r][i] = bursts[i](inner, 2)
            arr = np.asarray(rounds)
            if len(bursts) == 1:
                worst = _median_spread(list(arr[:, 0]))[1]
            else:
                worst = max(_median_spread(list(arr[:, i] / arr[:, 0]))[1] for i in range(1, len(bursts)))
            if worst <= self.max_spread:
                return ([float(np.median(arr[:, i])) for i in range(len(bursts))],
                        [float(np.median(arr[:, i] / arr[:, 0])) for i in range(len(bursts))])
        what = "ratios to the first model" if len(bursts) > 1 else "times"
        raise MeasurementError(f"timing {', '.join(labels)} is too noisy: "
                               f"relative spread {worst:.2f} of the per-round {what}"
                               f" is above max_spread={self.max_spread} after {self.retries + 1} attempts",
                               fix=f"measure on a quieter machine (load average now {_loadavg()}), raise repeats, or "
                                   "accept more noise with max_spread=")


Burst = Callable[[int, int], float]  # (inner, settle) -> the fastest of `inner` timed runs after `settle` untimed


def _failed(spec: OpSpec, wi: int, wo: int, e: Exception) -> MeasurementError:
    return MeasurementError(f"timing {spec.key(wi, wo)} failed: {type(e).__name__}: {e}",
                            fix="check the backend install; exclude this layer with ignore=[...] or rebuild the "
                                "table with rebuild=True")


class torch_threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous count restored after."""

    def __init__(self, n: int):
        self.n, self.old = n, None

    def __enter__(self) -> "torch_threads":
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.set_num_threads(self.old)


def torch_burst(fn: Callable[..., Any], args: tuple, inner: int = 1, settle: int = 0) -> float:
    """The fastest (ms) of ``inner`` timed calls ``fn(*args)`` after ``settle`` untimed ones, under
    ``torch.inference_mode`` (CPU: no synchronisation needed)."""
    import time

    import torch

    with torch.inference_mode():
        for _ in range(settle):
            fn(*args)
        best = float("inf")
        for _ in range(inner):
            t0 = time.perf_counter()
            fn(*args)
            best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def _checked_widths(spec: OpSpec, w_in: int, w_out: int) -> tuple[int, int]:
    """``(groups, w_out)`` of ``spec`` at these widths (a depthwise conv's output width is its input width);
    InputError for widths below 1 or not divisible by a conv's groups."""
    if w_in < 1 or w_out < 1:
        raise InputError(f"widths must be >= 1, got ({w_in}, {w_out}) for {spec.kind}")
    if spec.kind != "conv":
        return 1, w_out
    groups = w_in if spec.depthwise else spec.groups
    if spec.depthwise:
        w_out = w_in
    if w_in % groups or w_out % groups:
        raise InputError(f"conv widths ({w_in}, {w_out}) are not multiples of groups={groups}")
    return groups, w_out


def micro_module(spec: OpSpec, w_in: int, w_out: int, gen: Any) -> tuple[Any, Any]:
    """The op of ``spec`` at ``(w_in, w_out)`` as an eval-mode torch module, and a random input for it (the same
    shapes as :func:`micro_graph`)."""
    import torch

    groups, w_out = _checked_widths(spec, w_in, w_out)
    if spec.kind == "conv":
        conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[len(spec.kernel)]
        mod = conv(w_in, w_out, spec.kernel, spec.stride, spec.padding, spec.dilation, groups, bias=spec.bias)
        x = torch.randn((spec.batch, w_in, *spec.spatial), generator=gen)
    elif spec.kind == "linear":
        mod = torch.nn.Linear(w_in, w_out, bias=spec.bias)
        x = torch.randn((spec.batch, *spec.spatial, w_in), generator=gen)
    else:
        raise InputError(f"unknown op kind {spec.kind!r}", fix="'conv' or 'linear'")
    return mod.eval().requires_grad_(False), x


def micro_graph(spec: OpSpec, w_in: int, w_out: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """A one-op ONNX model (serialized) for ``spec`` at ``(w_in, w_out)`` and a random input for it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    groups, w_out = _checked_widths(spec, w_in, w_out)
    f32 = np.float32
    inits, nodes = [], []
    if spec.kind == "conv":
        x = rng.standard_normal((spec.batch, w_in, *spec.spatial)).astype(f32)
        w = (rng.standard_normal((w_out, w_in // groups, *spec.kernel)) * 0.1).astype(f32)
        inits.append(numpy_helper.from_array(w, "w"))
        ins = ["x", "w"]
        if spec.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(w_out).astype(f32), "b"))
            ins.append("b")
        nodes.append(helper.make_node("Conv", ins, ["y"], kernel_shape=list(spec.kernel), strides=list(spec.stride),
                                      pads=list(spec.padding) * 2, dilations=list(spec.dilation), group=groups))
    elif spec.kind == "linear":
        x = rng.standard_normal((spec.batch, *spec.spatial, w_in)).astype(f32)
        inits.append(numpy_helper.from_array((rng.standard_normal((w_in, w_out)) * 0.1).astype(f32), "w"))
        if spec.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(w_out).astype(f32), "b"))
            nodes += [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
        else:
            nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
    else:
        raise InputError(f"unknown op kind {spec.kind!r}", fix="kind is 'conv' or 'linear'")
    graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), x


def drift_cancelled(times: dict[Any, list[float]], ref: Any) -> dict[Any, tuple[float, float]]:
    """Per key, its latency relative to ``ref`` and the noise of that estimate, from interleaved rounds
    (``times[k][r]``: key ``k`` in round ``r``; every key timed in every round).

    For ``ref``: ``(1.0, spread of its times)``. For every other key: the median over the rounds of its ratio to
    ``ref`` in the same round, and the relative spread of those ratios. A machine whose speed drifts or jumps
    between states (other tenants, frequency changes) slows every op of a round alike, so the per-round ratio
    cancels it; medians of each point's own times do not, and under a machine that alternates between a fast and a
    slow state they can order two widths the wrong way round (a wider layer "faster" than a narrower one)."""
    r = np.asarray(times[ref], dtype=np.float64)
    out: dict[Any, tuple[float, float]] = {ref: (1.0, _median_spread(list(r))[1])}
    for k, ts in times.items():
        if k != ref:
            out[k] = _median_spread(list(np.asarray(ts, dtype=np.float64) / r))
    return out


def _median_spread(ts: list[float]) -> tuple[float, float]:
    """Median and relative interquartile range (IQR / median) of timings."""
    xs = np.asarray(ts, dtype=np.float64)
    med = float(np.median(xs))
    q1, q3 = np.percentile(xs, [25, 75])
    return med, float((q3 - q1) / med) if med > 0 else float("inf")


def _loadavg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def spec_dict(spec: OpSpec) -> dict[str, Any]:
    return asdict(spec)

