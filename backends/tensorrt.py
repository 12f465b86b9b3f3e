"""TensorRT: check an ONNX file for TensorRT readiness (no TensorRT needed) and build engines (TensorRT 10 + GPU).

* :func:`check` reads the ONNX file only: operators against TensorRT's ONNX-parser table
  (:mod:`fxprune.backends.trt_support`, TensorRT 10.1), restrictions that can be seen statically, dynamic
  input dims, data types, and with ``sparse_weights=True`` the 2:4 layout of Conv/Gemm/MatMul weights.
* :func:`build_engine` is written against the TensorRT 10 Python API; it imports ``tensorrt`` lazily and raises
  :class:`~fxprune.errors.BackendUnavailableError` when TensorRT or a CUDA GPU is missing.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from fxprune.errors import BackendUnavailableError, ExportError, InputError

from . import require
from .trt_support import (BUILD_TIME_INPUTS, CONSTANT_INPUTS, DTYPE_NAMES, LIMITED_DTYPES, SUPPORTED_DTYPES,
                          SUPPORTED_OPS, TABLE_SOURCE, TRT_OPSET_RANGE, TRT_VERSION, UNSUPPORTED_OPS, op_note)

__all__ = ["check", "build_engine", "CheckReport", "EngineInfo", "is_available", "unavailable_reason",
           "TRT_VERSION"]

_INSTALL_FIX = ("on a machine with an NVIDIA GPU, CUDA driver and CUDA-enabled torch: pip install tensorrt "
                "--extra-index-url https://pypi.nvidia.com (NVIDIA's package index); "
                "fxprune.backends.tensorrt.check() needs neither")
_PRECISIONS = ("fp32", "fp16", "int8")


# ------------------------------------------------------------------------------------------------- availability
def unavailable_reason() -> str | None:
    """Why :func:`build_engine` cannot run here (TensorRT >= 10 not importable, or no CUDA GPU), or None."""
    reasons = []
    try:
        import tensorrt as trt  # noqa: F401

        major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
        if major < 10:
            reasons.append(f"TensorRT {trt.__version__} is installed but fxprune needs TensorRT 10")
    except ImportError as e:
        reasons.append(f"TensorRT (the 'tensorrt' Python package) is not installed ({e})")
    import torch

    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is available (torch.cuda.is_available() is False); TensorRT needs an NVIDIA GPU")
    return "; ".join(reasons) or None


def is_available() -> bool:
    """Whether TensorRT >= 10 is importable and a CUDA GPU is present."""
    return unavailable_reason() is None


def _require_tensorrt() -> Any:
    reason = unavailable_reason()
    if reason:
        raise BackendUnavailableError(f"cannot build a TensorRT engine: {reason}", fix=_INSTALL_FIX)
    import tensorrt as trt

    return trt


# ------------------------------------------------------------------------------------------------- check
@dataclass
class CheckReport:
    """Result of :func:`check`. ``ok`` is False when any ``error:`` message was recorded."""

    path: str
    ok: bool
    tensorrt_version: str
    opset: int
    op_counts: dict[str, int]
    unsupported_ops: dict[str, int]  # op (``domain::op`` outside the ONNX domain) -> occurrences
    dynamic_inputs: dict[str, list[int | str]]  # input -> its dims (symbolic ones by name, "?" if unknown)
    unsupported_dtypes: dict[str, str]  # tensor -> ONNX dtype name
    sparse_checked: bool = False
    sparse_ok: list[str] = field(default_factory=list)  # weights with <= 2 non-zeros in every group of 4
    sparse_violations: list[dict[str, Any]] = field(default_factory=list)
    sparse_skipped: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # "error: ...", "warning: ...", "note: ..."

    @property
    def errors(self) -> list[str]:
        return [m for m in self.messages if m.startswith("error:")]

    @property
    def warnings(self) -> list[str]:
        return [m for m in self.messages if m.startswith("warning:")]

    def raise_if_failed(self) -> "CheckReport":
        """Raise :class:`ExportError` listing the errors if not ``ok``; return self otherwise."""
        if not self.ok:
            errs = self.errors
            raise ExportError(
                f"{self.path} is not ready for TensorRT {self.tensorrt_version}: {len(errs)} error(s):\n  "
                + "\n  ".join(e[len('error: '):] for e in errs),
                fix="replace or remove the unsupported ops/dtypes (or export with another opset); pass "
                    "min/opt/max shapes for dynamic inputs; re-apply 2:4 sparsity to the listed weights")
        return self

    def __str__(self) -> str:
        n_ops = sum(self.op_counts.values())
        lines = [f"TensorRT {self.tensorrt_version} check of {self.path}: {'OK' if self.ok else 'FAILED'}",
                 f"  opset {self.opset}; {n_ops} nodes, {len(self.op_counts)} op types; "
                 f"unsupported: {dict(self.unsupported_ops) or 'none'}"]
        if self.dynamic_inputs:
            lines.append("  dynamic inputs: " + ", ".join(f"{k} {v}" for k, v in self.dynamic_inputs.items()))
        if self.unsupported_dtypes:
            lines.append(f"  unsupported dtypes: {self.unsupported_dtypes}")
        if self.sparse_checked:
            lines.append(f"  2:4 sparsity: {len(self.sparse_ok)} ok, {len(self.sparse_violations)} violating, "
                         f"{len(self.sparse_skipped)} skipped")
            if self.sparse_ok:
                lines.append(f"    ok: {self.sparse_ok}")
            for s in self.sparse_skipped:
                lines.append(f"    skipped: {s['tensor']} ({s['op']}, shape {s['shape']}): {s['reason']}")
        order = {"error": 0, "warning": 1}
        lines += [f"  {m}" for m in sorted(self.messages, key=lambda m: order.get(m.split(":", 1)[0], 2))]
        return "\n".join(lines)


def _dims(vi: Any) -> list[int | str] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


class _Checker:
    def __init__(self, model: Any, numpy_helper: Any):
        self.model = model
        self.nh = numpy_helper
        self.msgs: list[str] = []
        self.op_counts: Counter[str] = Counter()
        self.unsupported: Counter[str] = Counter()
        self.funcs = {(f.domain, f.name): f for f in model.functions}
        self.consts: dict[str, Any] = {}  # name -> TensorProto (initializers and Constant values)
        self.dtypes: dict[str, int] = {}
        self._seen: set[str] = set()

    def add(self, level: str, msg: str) -> None:
        m = f"{level}: {msg}"
        if m not in self._seen:
            self._seen.add(m)
            self.msgs.append(m)

    # ---- constants and dtypes
    def collect_graph(self, g: Any) -> None:
        for t in g.initializer:
            self.consts[t.name] = t
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                self.dtypes.setdefault(vi.name, vi.type.tensor_type.elem_type)
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value" and a.HasField("t"):
                        self.consts[n.output[0]] = a.t
                    elif a.name in ("value_int", "value_ints", "value_float", "value_floats"):
                        import numpy as np

                        v = {"value_int": lambda: np.array(a.i, np.int64),
                             "value_ints": lambda: np.array(list(a.ints), np.int64),
                             "value_float": lambda: np.array(a.f, np.float32),
                             "value_floats": lambda: np.array(list(a.floats), np.float32)}[a.name]()
                        self.consts[n.output[0]] = self.nh.from_array(v, n.output[0])
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    self.collect_graph(sub)

    def array(self, name: str) -> Any:
        t = self.consts.get(name)
        return None if t is None else self.nh.to_array(t)

    # ---- graph walk
    def walk(self, nodes: Iterable[Any], where: str, in_function: bool, stack: tuple = ()) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in self.funcs:  # a model-local function: TensorRT inlines it, so check its body
                if key in stack:
                    self.add("error", f"local function {node.domain}::{node.op_type} calls itself")
                    continue
                self.walk(self.funcs[key].node, f"function {node.op_type}", True, stack + (key,))
                continue
            dom = node.domain or ""
            if dom in ("", "ai.onnx"):
                op = node.op_type
                self.op_counts[op] += 1
                if op not in SUPPORTED_OPS:
                    self.unsupported[op] += 1
                    state = "listed as unsupported" if op in UNSUPPORTED_OPS else "not in the table"
                    self.add("error", f"op {op} ({state}) at node {node.name or '?'} in {where}")
                else:
                    self.restrictions(node, where, in_function)
            else:
                name = f"{dom}::{node.op_type}"
                self.op_counts[name] += 1
                self.unsupported[name] += 1
                self.add("error", f"op {name} at node {node.name or '?'} in {where} is outside the ONNX domain; "
                                  f"TensorRT parses it only if a plugin named {node.op_type!r} is registered")
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    self.walk(sub.node, f"subgraph {a.name!r} of {node.name or node.op_type}", in_function, stack)

    def restrictions(self, node: Any, where: str, in_function: bool) -> None:
        op, name = node.op_type, node.name or node.op_type
        attrs = {a.name: a for a in node.attribute}
        note = op_note(op)
        if note:
            self.add("note", f"{op}: {note}")
        if not in_function:  # inside a function body the inputs are parameters: unknown here
            for i in CONSTANT_INPUTS.get(op, ()):
                if len(node.input) > i and node.input[i] and node.input[i] not in self.consts:
                    if op == "Clip" and self.dtypes.get(node.input[0], 1) not in (1, 10, 16, 11):
                        continue  # the integer Clip path takes tensors
                    self.add("error", f"{op} node {name}: input {i} ({node.input[i]!r}) must be an initializer "
                                      f"or Constant for TensorRT's parser")
            for i in BUILD_TIME_INPUTS.get(op, ()):
                if len(node.input) > i and node.input[i] and node.input[i] not in self.consts:
                    self.add("warning", f"{op} node {name}: input {i} ({node.input[i]!r}) is computed; TensorRT "
                                        f"needs its value at build time")
        if op in ("AveragePool", "MaxPool", "LpPool") and "dilations" in attrs:
            if any(d != 1 for d in attrs["dilations"].ints):
                self.add("error", f"{op} node {name} in {where}: dilations {list(attrs['dilations'].ints)} "
                                  f"(TensorRT needs all 1)")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            self.add("error", f"MaxPool node {name} in {where}: the Indices output is not supported")
        if op == "TopK":
            if "sorted" in attrs and attrs["sorted"].i == 0:
                self.add("error", f"TopK node {name} in {where}: sorted=0 is not supported")
            k = self.array(node.input[1]) if len(node.input) > 1 else None
            if k is not None and k.size == 1 and int(k.reshape(-1)[0]) >= 3840:
                self.add("error", f"TopK node {name} in {where}: K={int(k.reshape(-1)[0])} (TensorRT needs < 3840)")
        if op == "ScatterND" and "reduction" in attrs and attrs["reduction"].s not in (b"", b"none"):
            self.add("error", f"ScatterND node {name} in {where}: reduction={attrs['reduction'].s.decode()} "
                              f"is not supported")
        if op == "LayerNormalization" and any(o for o in node.output[1:]):
            self.add("error", f"LayerNormalization node {name} in {where}: only output Y is supported")
        if op == "Resize":
            s = {k: attrs[k].s.decode() for k in ("mode", "coordinate_transformation_mode",
                                                  "keep_aspect_ratio_policy") if k in attrs}
            if attrs.get("antialias") is not None and attrs["antialias"].i:
                self.add("error", f"Resize node {name} in {where}: antialias is not supported")
            if s.get("mode") == "cubic":
                self.add("error", f"Resize node {name} in {where}: mode=cubic is not supported")
            if s.get("coordinate_transformation_mode") == "tf_crop_and_resize":
                self.add("error", f"Resize node {name} in {where}: coordinate_transformation_mode="
                                  f"tf_crop_and_resize is not supported")
            if s.get("keep_aspect_ratio_policy", "stretch") != "stretch":
                self.add("error", f"Resize node {name} in {where}: keep_aspect_ratio_policy="
                                  f"{s['keep_aspect_ratio_policy']} is not supported")
        if op == "LSTM":
            for a in ("input_forget", "layout"):
                if a in attrs and attrs[a].i:
                    self.add("error", f"LSTM node {name} in {where}: {a}={attrs[a].i} is not supported")
        if op == "Constant":
            for a in ("sparse_value", "value_string", "value_strings"):
                if a in attrs:
                    self.add("error", f"Constant node {name} in {where}: attribute {a} is not supported")
        if op == "Dropout" and len(node.input) > 2 and node.input[2]:
            tm = self.array(node.input[2])
            if tm is not None and bool(tm.reshape(-1)[0]):
                self.add("error", f"Dropout node {name} in {where}: training_mode=True is not supported")
        if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = self.array(node.input[2])
            if zp is not None and zp.astype("float64").any():
                self.add("error", f"{op} node {name} in {where}: non-zero zero point (TensorRT quantization is "
                                  f"symmetric)")

    # ---- dtypes
    def check_dtypes(self, graph_io: set[str]) -> dict[str, str]:
        bad: dict[str, str] = {}
        types = dict(self.dtypes)
        types.update({k: t.data_type for k, t in self.consts.items()})
        for name, dt in types.items():
            if dt == 0 or dt in SUPPORTED_DTYPES:
                continue
            dname = DTYPE_NAMES.get(dt, str(dt))
            if dt in LIMITED_DTYPES:
                if dt == 2 and name in graph_io:
                    continue
                self.add("warning", f"{LIMITED_DTYPES[dt]} (tensor {name!r})")
            else:
                bad[name] = dname
                self.add("error", f"tensor {name!r} has dtype {dname}, which TensorRT does not support")
        return bad


def _weight(ck: _Checker, name: str, depth: int = 0) -> tuple[str, Any] | None:
    """The initializer behind ``name`` (looking through Identity/Transpose/Cast/DequantizeLinear), as an array."""
    arr = ck.array(name)
    if arr is not None:
        return name, arr
    if depth >= 3:
        return None
    prod = ck.producers.get(name)  # type: ignore[attr-defined]
    if prod is None or prod.op_type not in ("Identity", "Transpose", "Cast", "DequantizeLinear"):
        return None
    src = _weight(ck, prod.input[0], depth + 1)
    if src is None:
        return None
    if prod.op_type == "Transpose":
        perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), None)
        return src[0], src[1].transpose(perm) if perm else src[1].T
    return src


def _sparse_check(ck: _Checker, n: int = 2, m: int = 4) -> tuple[list[str], list[dict], list[dict]]:
    import numpy as np

    graph = ck.model.graph
    ck.producers = {o: nd for nd in graph.node for o in nd.output}  # type: ignore[attr-defined]
    ok: list[str] = []
    bad: list[dict] = []
    skipped: list[dict] = []
    done: set[tuple[str, str]] = set()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        attrs = {a.name: a.i for a in node.attribute if a.type == 2}  # INT attributes
        cands: list[tuple[int, str]] = []  # (input index, role)
        if node.op_type == "Conv":
            cands = [(1, "conv")]
        elif node.op_type == "Gemm":
            cands = [(1, "gemm_b"), (0, "gemm_a")]
        else:
            cands = [(1, "matmul_b"), (0, "matmul_a")]
        for idx, role in cands:
            if len(node.input) <= idx:
                continue
            found = _weight(ck, node.input[idx])
            if found is None:
                continue
            tname, w = found
            if role == "conv":
                dim, label = 1, "input channels C of [K, C, R, S]"
            elif role == "gemm_b":
                dim, label = (1 if attrs.get("transB", 0) else 0), f"K of B (transB={attrs.get('transB', 0)})"
            elif role == "gemm_a":
                dim, label = (0 if attrs.get("transA", 0) else 1), f"K of A (transA={attrs.get('transA', 0)})"
            elif role == "matmul_b":
                dim, label = w.ndim - 2, "K of B [..., K, N]"
            else:
                dim, label = w.ndim - 1, "K of A [..., M, K]"
            if (tname, role) in done:
                continue
            done.add((tname, role))
            row = {"tensor": tname, "op": node.op_type, "node": node.name, "shape": list(w.shape), "dim": dim,
                   "along": label}
            if w.ndim < 2 or dim < 0:
                skipped.append({**row, "reason": f"rank {w.ndim} weight has no reduction dim"})
                continue
            c = w.shape[dim]
            if c % m:
                skipped.append({**row, "reason": f"reduction dim {c} is not a multiple of {m} (TensorRT's 2:4 "
                                                 f"kernels group along the input channels)"})
                continue
            s = np.moveaxis(w, dim, -1)
            g = (s != 0).reshape(*s.shape[:-1], c // m, m).sum(-1)
            viol = g > n
            if not viol.any():
                ok.append(tname)
                continue
            first = [int(i) for i in np.argwhere(viol)[0]]
            j = first.pop()  # group index along the reduction dim
            idx_full: list[Any] = first[:dim] + [f"{j * m}:{j * m + m}"] + first[dim:]
            bad.append({**row, "groups": int(g.size), "bad_groups": int(viol.sum()),
                        "first": "[" + ", ".join(str(i) for i in idx_full) + "]",
                        "max_nonzeros": int(g.max())})
    return ok, bad, skipped


def check(onnx_path: Any, *, sparse_weights: bool = False, require_static_shapes: bool = False) -> CheckReport:
    """Check an ONNX file (path or ``onnx.ModelProto``) for TensorRT's ONNX parser, without TensorRT.

    Errors (``ok`` False): ops not in the TensorRT table (nodes inside model-local functions and If/Loop/Scan
    subgraphs included; ops outside the ONNX domain need a plugin), restrictions visible in the file (e.g. axes
    inputs that are not initializers, pooling dilations, TopK sorted=0, Resize cubic/antialias), unsupported
    dtypes (STRING, complex, UINT16/32/64, INT16), opset below 9, and with ``require_static_shapes`` any dynamic
    input dim; with ``sparse_weights`` any Conv/Gemm/MatMul weight with more than 2 non-zeros in a group of 4
    along its input-channel (reduction) dim. Dynamic input dims are otherwise only reported (an optimization
    profile, ``build_engine(min_shapes=...)``, covers them); weights whose reduction dim is not a multiple of 4
    are listed in ``sparse_skipped`` (TensorRT runs them dense).
    """
    onnx = require("onnx")
    from onnx import numpy_helper

    if isinstance(onnx_path, onnx.ModelProto):
        model, path = onnx_path, "<ModelProto>"
    else:
        path = os.fspath(onnx_path)
        if not os.path.exists(path):
            raise InputError(f"ONNX file {path!r} does not exist")
        model = onnx.load(path)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # >2 GB protos or broken models: fall back to the declared types
        inferred = model
    ck = _Checker(model, numpy_helper)
    ck.collect_graph(inferred.graph)
    ck.collect_graph(model.graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    lo, hi = TRT_OPSET_RANGE
    if opset and opset < lo:
        ck.add("error", f"opset {opset} is below {lo}, the oldest TensorRT {TRT_VERSION} parses")
    elif opset > hi:
        ck.add("warning", f"opset {opset} is above {hi}, the newest the TensorRT {TRT_VERSION} table covers; "
                          f"newer TensorRT 10 parsers may accept it, or export with opset={hi}")
    ck.walk(model.graph.node, "main graph", False)

    inits = {t.name for t in model.graph.initializer}
    dynamic: dict[str, list[int | str]] = {}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims = _dims(vi)
        if dims is None:
            dynamic[vi.name] = ["?"]
        elif any(not isinstance(d, int) or d <= 0 for d in dims):
            dynamic[vi.name] = dims
    for name, dims in dynamic.items():
        if require_static_shapes:
            ck.add("error", f"input {name!r} has dynamic dims {dims} (static shapes required)")
        else:
            ck.add("note", f"input {name!r} has dynamic dims {dims}: build_engine needs min/opt/max shapes for it")
    io = {vi.name for vi in list(model.graph.input) + list(model.graph.output)}
    bad_dtypes = ck.check_dtypes(io)

    report = CheckReport(path=path, ok=False, tensorrt_version=TRT_VERSION, opset=opset,
                         op_counts=dict(ck.op_counts), unsupported_ops=dict(ck.unsupported),
                         dynamic_inputs=dynamic, unsupported_dtypes=bad_dtypes)
    if sparse_weights:
        ok, bad, skipped = _sparse_check(ck)
        report.sparse_checked = True
        report.sparse_ok, report.sparse_violations, report.sparse_skipped = ok, bad, skipped
        for v in bad:
            ck.add("error", f"weight {v['tensor']!r} ({v['op']} {v['node']}) is not 2:4 sparse along "
                            f"{v['along']}: {v['bad_groups']}/{v['groups']} groups have > 2 non-zeros "
                            f"(up to {v['max_nonzeros']}), first at {v['first']}")
        if not (ok or bad or skipped):
            ck.add("warning", "sparse_weights=True but no Conv/Gemm/MatMul weight initializer was found")
    ck.add("note", f"operator table: {TABLE_SOURCE}")
    report.messages = ck.msgs
    report.ok = not report.errors
    return report


# ------------------------------------------------------------------------------------------------- engine
@dataclass
class EngineInfo:
    """A serialized engine written by :func:`build_engine`."""

    path: str
    precision: str
    sparse_weights: bool
    tensorrt_version: str
    build_seconds: float
    size_bytes: int
    profile: dict[str, tuple[list[int], list[int], list[int]]]  # dynamic input -> (min, opt, max)


def _shape_for(shapes: Mapping[str, Sequence[int]] | None, name: str, which: str) -> list[int]:
    if not shapes or name not in shapes:
        raise InputError(f"input {name!r} has dynamic dims: give its shape in {which}",
                         fix="pass min_shapes/opt_shapes/max_shapes={name: shape} for every dynamic input")
    return [int(d) for d in shapes[name]]


def build_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, precision: str = "fp16",
                 sparse_weights: bool = False, workspace_mb: int = 1024,
                 min_shapes: Mapping[str, Sequence[int]] | None = None,
                 opt_shapes: Mapping[str, Sequence[int]] | None = None,
                 max_shapes: Mapping[str, Sequence[int]] | None = None, calibrator: Any = None) -> EngineInfo:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and write a serialized engine to ``out_path``.

    ``precision``: "fp32", "fp16" (BuilderFlag.FP16) or "int8" (BuilderFlag.INT8 + FP16 fallback; needs a
    ``calibrator`` such as a ``trt.IInt8EntropyCalibrator2`` unless the model has Q/DQ nodes).
    ``sparse_weights`` sets BuilderFlag.SPARSE_WEIGHTS (2:4 weights, see :func:`check`). Every input with dynamic
    dims needs an entry in ``min_shapes``/``opt_shapes``/``max_shapes`` (one optimization profile). Raises
    :class:`BackendUnavailableError` without TensorRT >= 10 or a CUDA GPU, :class:`ExportError` if parsing or
    building fails, :class:`InputError` for bad arguments.
    """
    if precision not in _PRECISIONS:
        raise InputError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if workspace_mb <= 0:
        raise InputError(f"workspace_mb must be positive, got {workspace_mb}")
    onnx_path, out_path = os.fspath(onnx_path), os.fspath(out_path)
    if not os.path.exists(onnx_path):
        raise InputError(f"ONNX file {onnx_path!r} does not exist")
    trt = _require_tensorrt()

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode (and the default) in TRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path!r}: " + "; ".join(errs[:10]),
                          fix="run fxprune.backends.tensorrt.check() on the file for a readable report")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        has_qdq = any(network.get_layer(i).type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
                      for i in range(network.num_layers))
        if calibrator is not None:
            config.int8_calibrator = calibrator
        elif not has_qdq:
            raise InputError("precision='int8' needs a calibrator (e.g. a trt.IInt8EntropyCalibrator2) or a model "
                             "with QuantizeLinear/DequantizeLinear nodes")
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)

    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for given in (min_shapes, opt_shapes, max_shapes):
        unknown = set(given or {}) - names
        if unknown:
            raise InputError(f"shapes given for unknown inputs {sorted(unknown)}; the inputs are {sorted(names)}")
    profile_shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        if all(d >= 0 for d in shape):
            continue
        mn, op, mx = (_shape_for(min_shapes, inp.name, "min_shapes"), _shape_for(opt_shapes, inp.name, "opt_shapes"),
                      _shape_for(max_shapes, inp.name, "max_shapes"))
        for s in (mn, op, mx):
            if len(s) != len(shape) or any(d >= 0 and d != v for d, v in zip(shape, s)):
                raise InputError(f"shape {s} for input {inp.name!r} does not match its dims {shape}")
        if not all(a <= b <= c for a, b, c in zip(mn, op, mx)):
            raise InputError(f"input {inp.name!r}: need min <= opt <= max per dim, got {mn}, {op}, {mx}")
        profile.set_shape(inp.name, mn, op, mx)
        profile_shapes[inp.name] = (mn, op, mx)
    if profile_shapes:
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path!r} (see the TensorRT log above)",
                          fix="try precision='fp32', a larger workspace_mb, or check() the file")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(serialized)
    return EngineInfo(path=out_path, precision=precision, sparse_weights=sparse_weights,
                      tensorrt_version=trt.__version__, build_seconds=time.perf_counter() - t0,
                      size_bytes=os.path.getsize(out_path), profile=profile_shapes)
