"""Export to ONNX, simplify, check and verify against torch.

:func:`export` writes one self-contained ``.onnx`` file (weights inline; external data only for models over
~1.8 GB) and, by default, checks it numerically in ONNX Runtime against the torch module on fresh random inputs.
:func:`check_parity` runs that check alone on any file.

Exporter: ``torch.onnx.export(..., dynamo=True)`` first. It re-exports through ``torch.export``, so it accepts the
GraphModules that ``torch.export.ExportedProgram.module()`` returns (which is what :func:`fxprune.compile` gives);
the TorchScript exporter (``dynamo=False``) cannot export those (it has to toggle ``train()``, which they refuse),
so it is only the fallback for plain modules the dynamo exporter rejects. :attr:`ExportResult.exporter` says which
one wrote the file and :attr:`ExportResult.notes` why the fallback was taken.

Names: the file's inputs are named after the forward parameters (``x``, ``input_ids``, ``attention_mask``; nested
inputs get a suffix) and its outputs after the model's output structure (``ModelOutput``/dict keys such as
``logits``, else ``output_0``, ``output_1``, ... or ``output`` for a single tensor); ``input_names=`` /
``output_names=`` override them. Dynamic dims are named as in the module: ``batch`` and, for token inputs of a
pruned module with a dynamic sequence length, ``seq`` (``fxprune.compile``'s ``report.dynamic_dims``).
Progress goes to the ``"fxprune.onnx"`` logger.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from fxprune.errors import ExportError, InputError
from fxprune.log import get_logger, timed

from . import eval_mode, require, resolve_module

__all__ = ["export", "check_parity", "ExportResult", "ParityResult", "default_atol"]

_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a single file at 2 GiB
log = get_logger("onnx")


@dataclass
class ParityResult:
    """ONNX Runtime vs torch on fresh random inputs: worst |difference| and tolerance per output (by ONNX name)."""

    max_abs_diff: dict[str, float]
    tolerance: dict[str, float]
    batch_sizes: list[int]
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rows = ", ".join(f"{k}: {v:.3g} (tol {self.tolerance[k]:.3g})" for k, v in self.max_abs_diff.items())
        return f"parity ok at batch {self.batch_sizes}: {rows}"


@dataclass
class ExportResult:
    """What :func:`export` wrote and verified."""

    path: str
    opset: int
    exporter: str  # "dynamo" or "torchscript"
    dynamic_batch: bool  # dim 0 of every tensor input is symbolic in the written file
    simplified: bool  # onnxsim's output was kept
    max_abs_diff: dict[str, float]  # per output; empty when check_parity=False
    inputs: list[str]
    outputs: list[str]
    tolerance: dict[str, float] = field(default_factory=dict)
    parity_batch_sizes: list[int] = field(default_factory=list)
    simplify_skipped: str | None = None  # the reason, when simplify=True but the simplified model was not kept
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.path}: opset {self.opset}, exporter {self.exporter}, "
                 f"{'dynamic' if self.dynamic_batch else 'static'} batch, "
                 f"{'simplified' if self.simplified else 'not simplified'}",
                 f"  inputs {self.inputs} -> outputs {self.outputs}"]
        if self.max_abs_diff:
            lines.append(f"  parity (batch {self.parity_batch_sizes}): " + ", ".join(
                f"{k} {v:.3g}" for k, v in self.max_abs_diff.items()))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- inputs
def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputError(f"example_inputs must be a tuple of tensors (or a dict of keyword inputs), "
                     f"got {type(example_inputs).__name__}", fix="wrap a single tensor as (x,)")


def _tensor_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]


def _batch_of(args: tuple, kwargs: dict) -> int | None:
    for t in _tensor_leaves(args, kwargs):
        if t.dim() >= 1:
            return int(t.shape[0])
    return None


def _dynamic_shapes(args: tuple, kwargs: dict) -> Any:
    """dim 0 of every tensor input dynamic; tensors that share the first input's batch share one ``Dim('batch')``."""
    from torch.export import Dim

    batch = _batch_of(args, kwargs)
    shared = Dim("batch")
    count = [0]

    def spec(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        if int(v.shape[0]) == batch:
            return {0: shared}
        count[0] += 1
        return {0: Dim(f"dim0_{count[0]}")}

    if kwargs:  # keyword inputs (``_split_inputs`` never yields both kinds): specs keyed by parameter name
        return {k: pytree.tree_map(spec, v) for k, v in kwargs.items()}
    return tuple(pytree.tree_map(spec, a) for a in args)


def _fresh_inputs(args: tuple, kwargs: dict, batch: int | None, dynamic: bool, gen: torch.Generator,
                  seq: int | None = None) -> tuple[tuple, dict]:
    """Random inputs like the examples: floats ~ N(0, 1); integers uniform in [min(0, min(x)), max(x)];
    bools tile the example along dim 0. With ``dynamic``, dim 0 of inputs whose dim 0 is the batch becomes
    ``batch``; with ``seq``, dim 1 of integer/bool ``(B, T)`` inputs of the example's length becomes ``seq``."""
    example_batch = _batch_of(args, kwargs)
    example_seq = _seq_of(args, kwargs)

    def fresh(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        shape = list(x.shape)
        resize = dynamic and x.dim() >= 1 and shape[0] == example_batch and batch is not None
        if resize:
            shape[0] = batch
        if (seq is not None and x.dim() == 2 and not (x.dtype.is_floating_point or x.dtype.is_complex)
                and shape[1] == example_seq):
            shape[1] = seq
        if (x.dtype == torch.bool or _is_mask(x)) and x.dim() >= 1 and x.shape[0] and all(x.shape):
            # masks (bool, or integers all 0/1) keep the example's pattern, tiled to the new sizes
            rows = x[torch.arange(shape[0]) % x.shape[0]]
            if x.dim() == 2:
                rows = rows[:, torch.arange(shape[1]) % x.shape[1]]
            return rows.clone() if tuple(rows.shape) == tuple(shape) else x.clone()
        if x.dtype == torch.bool:
            if not resize or x.shape[0] == 0:
                return x.clone()
            return x[torch.arange(batch) % x.shape[0]].clone()
        if x.dtype.is_floating_point or x.dtype.is_complex:
            return torch.randn(shape, generator=gen, dtype=torch.float32).to(x.dtype)
        if x.numel() == 0:
            return torch.zeros(shape, dtype=x.dtype)
        lo, hi = min(0, int(x.min())), int(x.max()) + 1
        return torch.randint(lo, max(hi, lo + 1), shape, generator=gen, dtype=torch.int64).to(x.dtype)

    return tuple(pytree.tree_map(fresh, a) for a in args), {k: pytree.tree_map(fresh, v) for k, v in kwargs.items()}


def _seq_of(args: tuple, kwargs: dict) -> int | None:
    for t in _tensor_leaves(args, kwargs):
        if t.dim() == 2 and not (t.dtype.is_floating_point or t.dtype.is_complex):
            return int(t.shape[1])
    return None


def _is_mask(x: torch.Tensor) -> bool:
    """An integer tensor of 0/1 values only (an attention mask): resized by tiling, not redrawn."""
    return (not (x.dtype.is_floating_point or x.dtype.is_complex) and x.numel() > 0 and not x.is_meta
            and bool(((x == 0) | (x == 1)).all()))


def _dynamic_seq_inputs(proto: Any) -> bool:
    """Whether an integer rank-2 graph input has a symbolic dim 1 (a dynamic sequence length)."""
    inits = {i.name for i in proto.graph.initializer}
    ints = {6, 7, 9, 3, 2, 5, 4, 12, 13}  # INT32, INT64, BOOL, INT8, UINT8, INT16, UINT16, UINT32, UINT64
    for i in proto.graph.input:
        if i.name in inits or not i.type.HasField("tensor_type"):
            continue
        tt = i.type.tensor_type
        if tt.elem_type in ints and tt.HasField("shape") and len(tt.shape.dim) == 2 \
                and not tt.shape.dim[1].HasField("dim_value"):
            return True
    return False


def _ort_feed(sess: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Inputs by ONNX name: keyword inputs by their name, the other tensors positionally in pytree order."""
    names = [i.name for i in sess.get_inputs()]
    by_name = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k in names}
    rest = [t for t in _tensor_leaves(args, {k: v for k, v in kwargs.items() if k not in by_name})]
    positional = [n for n in names if n not in by_name]
    if len(positional) != len(rest):
        raise ExportError(
            f"the ONNX model has inputs {names} but the example inputs hold {len(_tensor_leaves(args, kwargs))} "
            f"tensors", fix="pass the same example inputs that were exported (unused inputs may have been dropped)")
    feed = dict(zip(positional, rest))
    feed.update(by_name)
    return {n: feed[n].detach().cpu().numpy() for n in names}


# ------------------------------------------------------------------------------------------------- parity
def default_atol(dtype: torch.dtype, ref_abs_max: float) -> float:
    """The default absolute tolerance: ``1e-4 * max(1, |ref|max)`` for float32 (1e-2 for 16-bit floats, 1e-7 for
    float64, 0 for integers and bools)."""
    if dtype in (torch.float16, torch.bfloat16):
        base = 1e-2
    elif dtype == torch.float64:
        base = 1e-7
    elif dtype.is_floating_point or dtype.is_complex:
        base = 1e-4
    else:
        return 0.0
    return base * max(1.0, ref_abs_max if math.isfinite(ref_abs_max) else 1.0)


def _diff(ref: Any, got: Any, rtol: float, atol: float) -> tuple[float, bool, tuple]:
    """(max |ref - got| with matching NaN/inf treated as equal, any element out of tolerance, first bad index)."""
    import numpy as np

    r = np.asarray(ref, dtype=np.float64)
    g = np.asarray(got, dtype=np.float64)
    same = (r == g) | (np.isnan(r) & np.isnan(g))
    d = np.where(same, 0.0, np.abs(r - g))
    d = np.where(np.isnan(d), np.inf, d)
    bad = d > atol + rtol * np.where(np.isfinite(r), np.abs(r), 0.0)
    first = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else ()
    return (float(d.max()) if d.size else 0.0), bool(bad.any()), first


_NOISE_FACTOR = 4.0  # an ONNX float32 output may differ from torch by this many times torch's own float32 error


def _float64_outputs(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The module's tensor outputs computed in float64 (a copy; float inputs upcast) as numpy arrays, or a
    string saying why that was not possible (graphs with float32 constants or casts baked in, ...)."""
    import copy

    np = require("numpy")
    try:
        m64 = copy.deepcopy(module).double()
        up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t  # noqa: E731
        with torch.no_grad(), eval_mode(m64):
            out = m64(*pytree.tree_map(up, args), **{k: pytree.tree_map(up, v) for k, v in kwargs.items()})
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.dtype != torch.float64 for t in outs if t.is_floating_point()):
            return "the module does not compute in float64 throughout"
        return [np.asarray(t.detach().cpu().numpy(), dtype=np.float64) for t in outs]
    except Exception as e:  # noqa: BLE001 - best effort: the default tolerance stands
        return _first_line(e)


def check_parity(path: str | os.PathLike, module_or_compiled: Any, example_inputs: Any, *,
                 atol: float | None = None, rtol: float = 0.0, seed: int = 0,
                 batch_sizes: Sequence[int] | None = None, threads: int = 1) -> ParityResult:
    """Run the ONNX file in ONNX Runtime and the module in torch on the same fresh random inputs (seeded, shaped
    and typed like ``example_inputs``) and compare every output.

    Batch sizes: ``batch_sizes`` if given, else the example batch and, when dim 0 of the file's inputs is
    symbolic, also the example batch + 3 (with the sequence length + 2 when integer inputs have a symbolic dim 1). An element fails when ``|ort - torch| > atol + rtol * |torch|``;
    ``atol`` defaults to :func:`default_atol` per output. Raises :class:`ExportError` naming the first
    mismatching output, its diff and the batch size. The module is run in eval mode and left unchanged.
    """
    onnx = require("onnx")
    np = require("numpy")
    from .onnxruntime import session

    module = resolve_module(module_or_compiled)
    args, kwargs = _split_inputs(example_inputs)
    proto = onnx.load(os.fspath(path), load_external_data=False)
    dyn = _dynamic_batch_inputs(proto)
    dyn_seq = _dynamic_seq_inputs(proto)
    b0 = _batch_of(args, kwargs)
    s0 = _seq_of(args, kwargs)
    if batch_sizes is None:
        batch_sizes = [b0] if b0 is not None else [1]
        if dyn and b0 is not None:
            batch_sizes.append(b0 + 3)
    sess = session(path, threads)
    out_names = [o.name for o in sess.get_outputs()]
    gen = torch.Generator().manual_seed(seed)
    worst: dict[str, float] = {n: 0.0 for n in out_names}
    tol: dict[str, float] = {n: 0.0 for n in out_names}
    notes: list[str] = []
    checked: list[int] = []
    f64: dict[int, Any] = {}
    for b in batch_sizes:
        seq = s0 + 2 if dyn_seq and s0 is not None and b != b0 else None
        fa, fk = _fresh_inputs(args, kwargs, b, dyn, gen, seq)
        try:
            with torch.no_grad(), eval_mode(module):
                ref_out = module(*fa, **fk)
        except Exception as e:
            if b == b0:
                raise ExportError(f"the torch module failed on fresh inputs of the example's shape: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from e
            notes.append(f"torch module rejects batch {b} ({type(e).__name__}); parity checked at the other sizes")
            continue
        refs = [t for t in pytree.tree_leaves(ref_out) if isinstance(t, torch.Tensor)]
        try:
            got = sess.run(None, _ort_feed(sess, fa, fk))
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"ONNX Runtime failed to run {os.fspath(path)!r} at batch {b}: "
                              f"{type(e).__name__}: {str(e).strip()[:400]}") from e
        if len(got) != len(refs):
            raise ExportError(f"the ONNX model has {len(got)} outputs {out_names}, the torch module returns "
                              f"{len(refs)} tensors")
        for i, (name, r, g) in enumerate(zip(out_names, refs, got)):
            rn = r.detach().cpu()
            if tuple(rn.shape) != tuple(g.shape):
                raise ExportError(f"ONNX output {name!r} (output {i}) has shape {tuple(g.shape)}, torch gives "
                                  f"{tuple(rn.shape)} at batch {b}")
            rnp = rn.float().numpy() if rn.dtype == torch.bfloat16 else rn.numpy()
            finite = rnp[np.isfinite(rnp)] if rnp.dtype.kind in "fc" else rnp
            ref_max = float(abs(finite).max()) if finite.size else 0.0
            a = atol if atol is not None else default_atol(rn.dtype, ref_max)
            d, bad, where = _diff(rnp, g, rtol, a)
            if rnp.dtype.kind in "fc" and rnp.size > 1 and b == batch_sizes[0] \
                    and (not finite.size or float(finite.max()) == float(finite.min())):
                value = float(finite.max()) if finite.size else float("nan")
                notes.append(f"output {name!r} is constant on random inputs ({value:.3g}): its parity says "
                             f"nothing about the network (e.g. a zero-initialised classifier head)")
            if bad and atol is None and rtol == 0.0 and rn.dtype == torch.float32:
                if b not in f64:
                    f64[b] = _float64_outputs(module, fa, fk)
                ref64 = f64[b]
                if isinstance(ref64, list) and i < len(ref64) and tuple(ref64[i].shape) == tuple(rnp.shape):
                    noise = float(np.abs(rnp.astype(np.float64) - ref64[i]).max())
                    a_noise = _NOISE_FACTOR * noise
                    if a_noise > a:
                        d, bad, where = _diff(rnp, g, 0.0, a_noise)
                        notes.append(f"output {name!r} at batch {b}: max abs diff {d:.3g} is over the default "
                                     f"tolerance {a:.3g}; torch's own float32 error on it (vs a float64 run) is "
                                     f"{noise:.3g}, so the tolerance is {_NOISE_FACTOR:g}x that: {a_noise:.3g}"
                                     f"{'' if not bad else ' (still exceeded)'}")
                        a = a_noise
                elif isinstance(ref64, str):
                    notes.append(f"output {name!r}: float64 noise floor unavailable ({ref64})")
            worst[name] = max(worst[name], d)
            tol[name] = max(tol[name], a)
            if bad:
                raise ExportError(
                    f"ONNX output {name!r} (output {i}) differs from torch: max abs diff {d:.4g} > tolerance "
                    f"{a:.3g}{f' + {rtol:g}*|ref|' if rtol else ''} at batch {b} (first bad element {list(where)})"
                    + (f"; {notes[-1]}" if notes and name in notes[-1] else ""),
                    fix="the exported graph computes something else; re-export, or check for ops whose ONNX "
                        "translation differs (and raise atol/rtol only if the difference is expected)")
        checked.append(b)
    return ParityResult(worst, tol, checked, notes)


# ------------------------------------------------------------------------------------------------- export
def _dynamic_batch_inputs(proto: Any) -> bool:
    """Whether dim 0 of every graph input of rank >= 1 is symbolic (and there is at least one such input)."""
    inits = {i.name for i in proto.graph.initializer}
    ranked = [i for i in proto.graph.input if i.name not in inits and i.type.HasField("tensor_type")
              and i.type.tensor_type.HasField("shape") and len(i.type.tensor_type.shape.dim) >= 1]
    return bool(ranked) and all(not i.type.tensor_type.shape.dim[0].HasField("dim_value") for i in ranked)


def _opset(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of ``e``, naming the root cause too (torch.onnx wraps it in a long help text)."""
    import re

    def one(x: BaseException) -> str:
        s = re.sub(r"\x1b\[[0-9;]*m", "", str(x)).strip()
        return f"{type(x).__name__}: {s.splitlines()[0][:300] if s else ''}"

    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return one(e) if root is e else f"{type(e).__name__} caused by {one(root)}"


@contextlib.contextmanager
def _captured_native_output() -> Iterator[list[str]]:
    """Capture what native code (onnxsim's C++) prints to the stdout/stderr file descriptors; lines are appended
    to the yielded list after the block."""
    import sys

    lines: list[str] = []
    try:
        fds = [sys.__stdout__.fileno(), sys.__stderr__.fileno()]
    except (AttributeError, OSError, ValueError):  # no real fds (embedded interpreters): do not capture
        yield lines
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        saved = [os.dup(fd) for fd in fds]
        try:
            for fd in fds:
                os.dup2(tmp.fileno(), fd)
            yield lines
        finally:
            for s in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    s.flush()
            for fd, sv in zip(fds, saved):
                os.dup2(sv, fd)
                os.close(sv)
            tmp.seek(0)
            lines.extend(ln.strip() for ln in tmp.read().decode(errors="replace").splitlines() if ln.strip())


def _save(onnx: Any, model: Any, path: str, external: bool) -> None:
    """Save ``model`` to ``path``; with ``external``, tensors of >= 1 KiB go to ``<path>.data`` (replaced)."""
    if external:
        from onnx.external_data_helper import set_external_data

        data = path + ".data"
        if os.path.exists(data):  # the weights are in memory; appending to the old file would keep stale bytes
            os.remove(data)
        for t in model.graph.initializer:
            if t.HasField("raw_data") and len(t.raw_data) >= 1024:
                set_external_data(t, os.path.basename(data))
    onnx.save(model, path)


def _forward_arg_names(module: nn.Module, n: int) -> list[str]:
    import inspect

    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"input_{i}" for i in range(len(names), n)]


# ------------------------------------------------------------------------------------------------- translations
_SDPA = "aten.scaled_dot_product_attention.default"
_SDPA_4D_ONLY = "only 4D query, key, and value are supported"


def _sdpa_any_rank(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Any:
    """ONNX translation of ``aten.scaled_dot_product_attention`` for q/k/v of any rank >= 3 (torch.onnx's own
    translation asserts 4-D inputs; timm Hiera's windowed attention is 5-D ``[B, heads, windows, N, head_dim]``).

    torch's math kernel, traced with onnxscript (a ``custom_translation_table`` entry of ``torch.onnx.export``):
    ``softmax((q*sqrt(s)) @ (k*sqrt(s))^T + mask) @ v`` with ``s = scale or 1/sqrt(E)``; MatMul, Add, Where and
    Softmax broadcast over all leading dims like torch. A bool (or causal) mask puts -inf where it is False; a
    float mask is added. GQA repeats each key/value head along dim -3. Inference only: ``dropout_p`` must be 0."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    if dropout_p:
        raise NotImplementedError(f"{_SDPA} with dropout_p={dropout_p} (training) has no inference translation")
    if is_causal and attn_mask is not None:
        raise NotImplementedError(f"{_SDPA}: is_causal and attn_mask cannot both be set")
    e = query.shape[-1] if query.shape is not None else None
    if scale is not None:
        s = op.Constant(value_float=float(scale))
    elif isinstance(e, int):
        s = op.Constant(value_float=1.0 / math.sqrt(e))
    else:
        s = op.Reciprocal(op.Sqrt(op.Cast(op.Shape(query, start=-1), to=ir.DataType.FLOAT)))
    root = op.Sqrt(s)
    if enable_gqa:
        hq, hk = query.shape[-3], key.shape[-3]
        if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
            raise NotImplementedError(f"{_SDPA} with enable_gqa needs static head counts, q {hq} a multiple "
                                      f"of k/v {hk}")
        if hq != hk:
            key, value = (_repeat_heads(op, t, hq // hk) for t in (key, value))
    rank_k = len(key.shape)
    perm = list(range(rank_k))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    w = op.MatMul(op.Mul(query, op.CastLike(root, query)), op.Mul(op.Transpose(key, perm=perm), op.CastLike(root, key)))
    bool_mask = is_causal
    if is_causal:
        ls = op.Concat(op.Shape(query, start=-2, end=-1), op.Shape(key, start=-2, end=-1), axis=0)
        ones = op.ConstantOfShape(ls, value=ir.tensor([1.0], dtype=ir.DataType.FLOAT))
        attn_mask = op.Cast(op.Trilu(ones, upper=0), to=ir.DataType.BOOL)
    elif attn_mask is not None:
        bool_mask = attn_mask.dtype == ir.DataType.BOOL
    if attn_mask is not None:
        if bool_mask:
            w = op.Where(attn_mask, w, op.CastLike(op.Constant(value_float=float("-inf")), w))
        else:
            w = op.Add(w, op.CastLike(attn_mask, w))
    return op.MatMul(op.Softmax(w, axis=-1), value)


def _repeat_heads(op: Any, t: Any, g: int) -> Any:
    """``t.repeat_interleave(g, dim=-3)`` in ONNX: ``[..., H, S, E] -> [..., H*g, S, E]``."""
    rank = len(t.shape)
    u = op.Unsqueeze(t, op.Constant(value_ints=[rank - 2]))  # [..., H, 1, S, E]
    reps = [1] * (rank + 1)
    reps[rank - 2] = g
    x = op.Expand(u, op.Constant(value_ints=reps))
    shape = op.Concat(op.Shape(t, start=0, end=rank - 3), op.Constant(value_ints=[-1]),
                      op.Shape(t, start=rank - 2), axis=0)
    return op.Reshape(x, shape)


def _nd_sdpa_nodes(module: nn.Module) -> list[str]:
    """The SDPA nodes of a GraphModule (and GraphModule submodules) whose q, k or v is not 4-D, as
    ``"node (q shape)"``; empty for plain modules (their graph is unknown until export)."""
    found: list[str] = []
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for n in sub.graph.nodes:
            if n.op != "call_function" or str(n.target) != _SDPA:
                continue
            vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in n.args[:3]]
            ranks = [v.dim() for v in vals if isinstance(v, torch.Tensor)]
            if any(r != 4 for r in ranks):
                q = vals[0]
                found.append(f"{n.name} (q {list(q.shape) if isinstance(q, torch.Tensor) else '?'})")
    return found


def _dynamo_failure(e: BaseException) -> tuple[str | None, str | None, str]:
    """(ATen op, fx node, root message) of a failed dynamo export, from torch.onnx's "Error when translating
    node %name : ... target=torch.ops.aten.x.y ..." wrapper and the root exception; None where unknown."""
    import re

    texts = []
    x: BaseException | None = e
    seen = set()
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        texts.append(re.sub(r"\x1b\[[0-9;]*m", "", str(x)))
        x = x.__cause__ or x.__context__
    allt = "\n".join(texts)
    node = re.search(r"translating node %(\w+)", allt)
    op = re.search(r"target=torch\.ops\.([\w.]+)", allt)
    root = texts[-1].strip().splitlines()[0][:300] if texts and texts[-1].strip() else ""
    return (op.group(1) if op else None), (node.group(1) if node else None), root


def _export_dynamo(module: nn.Module, args: tuple, kwargs: dict, path: str, *, opset: int | None, dynamic: bool,
                   input_names: Any, output_names: Any, external: bool,
                   translations: dict[Any, Any] | None = None) -> None:
    shapes = None
    if dynamic:
        export_inputs = getattr(module, "export_inputs", None)
        if callable(export_inputs):  # fxprune's PrunedModule: its own dynamic dims, named (batch, seq, ...)
            args, kwargs, shapes = export_inputs(args, kwargs)
        else:
            shapes = _dynamic_shapes(args, kwargs)
    with warnings.catch_warnings():  # inputs sharing a Dim: torch says so once per input
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        torch.onnx.export(module, args, path, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                          dynamic_shapes=shapes, input_names=input_names, output_names=output_names,
                          external_data=external, verbose=False, optimize=True,
                          custom_translation_table=translations or None)


def default_names(module: nn.Module, args: tuple, kwargs: dict) -> tuple[list[str] | None, list[str] | None]:
    """The ONNX input and output names :func:`export` gives by default (None: the exporter's own names):
    inputs after the forward parameters, outputs after the output structure (:func:`fxprune.module.names_of`)."""
    from fxprune.module import input_names as gm_inputs, names_of, output_names as gm_outputs

    n_in = len(_tensor_leaves(args, kwargs))
    if isinstance(module, torch.fx.GraphModule) and getattr(module, "_in_spec", None) is not None:
        ins = gm_inputs(module)
        outs = gm_outputs(module)
    else:
        ins = None
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            ins = _forward_arg_names(module, n_in)
        elif not args and all(isinstance(v, torch.Tensor) for v in kwargs.values()):
            ins = list(kwargs)
        try:
            with torch.no_grad(), eval_mode(module):
                outs = names_of(module(*args, **kwargs))
        except Exception:  # noqa: BLE001 - the exporter reports the failure itself
            outs = None
    if ins is not None and len(ins) != n_in:
        ins = None
    return ins, outs


def _export_torchscript(module: nn.Module, args: tuple, kwargs: dict, path: str, *, opset: int | None,
                        dynamic: bool, input_names: Any, output_names: Any) -> None:
    if kwargs:
        raise ExportError("the TorchScript exporter takes positional inputs only")
    n_in = len(_tensor_leaves(args, {}))
    names = list(input_names) if input_names else _forward_arg_names(module, n_in)
    if output_names is None:
        with torch.no_grad():
            n_out = len([t for t in pytree.tree_leaves(module(*args)) if isinstance(t, torch.Tensor)])
        output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    axes = None
    if dynamic:
        batch = _batch_of(args, {})
        axes = {n: {0: "batch" if int(t.shape[0]) == batch else f"{n}_dim0"}
                for n, t in zip(names, _tensor_leaves(args, {})) if t.dim() >= 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, args, path, dynamo=False, opset_version=opset, input_names=names,
                          output_names=list(output_names), dynamic_axes=axes, do_constant_folding=True)


@contextlib.contextmanager
def _stride_free_graph(module: nn.Module) -> Iterator[int]:
    """Temporarily make the module's GraphModules independent of strides: ``aten.view`` becomes
    ``aten.reshape`` and ``aten.contiguous`` becomes ``aten.clone(memory_format=contiguous_format)`` (same
    values; a copy where the original was a no-op). The graph is restored afterwards; yields the count.

    ``torch.onnx`` re-traces the graph, and a ``contiguous`` that the re-trace sees as a no-op is dropped, so the
    ``view`` after it relies on the traced strides. Its decomposition step then re-runs ops with other fake
    kernels (SDPA kept whole gives a contiguous ``[B, H, L, E]`` output where CPU flash attention gave
    ``[B, L, H, E]`` in memory; HF BEiT with a relative position bias) and fails with "Cannot view a tensor with
    shape ..." although the module runs. A clone is always kept, so the view after it is valid under any
    strides."""
    changed: list[tuple[Any, Any, tuple, dict]] = []
    aten = torch.ops.aten
    subs = [m for m in module.modules() if isinstance(m, torch.fx.GraphModule)]
    try:
        for gm in subs:
            for n in gm.graph.nodes:
                if n.op != "call_function":
                    continue
                if n.target is aten.view.default:
                    changed.append((n, n.target, n.args, dict(n.kwargs)))
                    n.target = aten.reshape.default
                elif n.target is aten.contiguous.default:
                    changed.append((n, n.target, n.args, dict(n.kwargs)))
                    n.target = aten.clone.default
                    n.kwargs = {"memory_format": n.kwargs.get("memory_format", torch.contiguous_format)}
            gm.recompile()
        yield len(changed)
    finally:
        for n, target, a, kw in changed:
            n.target, n.args, n.kwargs = target, a, kw
        for gm in subs:
            gm.recompile()


def _where(failure: tuple[str | None, str | None, str]) -> str:
    op, node, _ = failure
    return (f" at {op}" if op else "") + (f" (node %{node})" if node else "")


def _fix_for(failure: tuple[str | None, str | None, str]) -> str:
    """The fix for a failed dynamo export: specific for the ops we know, else the generic advice."""
    op, node, root = failure
    if op and op.startswith("aten.grid_sampler") or "grid_sampler" in root:
        return ("ONNX GridSample (opset 16+) takes 4-D input with bilinear/nearest/bicubic modes and 5-D only from "
                "opset 20 (ONNX Runtime: linear/nearest); pass opset=20 or newer, or replace the sampling")
    if op and op.startswith("aten.scaled_dot_product_attention"):
        return ("reshape q/k/v to 4-D [batch, heads, seq, head_dim] around the attention, or pass your own "
                "custom_translation_table={torch.ops.aten.scaled_dot_product_attention.default: fn}")
    target = f"torch.ops.{op}" if op else "the op"
    return (f"check that the module runs on example_inputs; for data-dependent control flow use torch.cond; "
            f"an op torch.onnx cannot translate needs custom_translation_table={{{target}: onnxscript_fn}} "
            f"(torch.onnx docs)")


def export(module_or_compiled: Any, example_inputs: tuple, path: str | os.PathLike, *, opset: int | None = None,
           dynamic_batch: bool = True, simplify: bool = True, check_parity: bool = True,
           atol: float | None = None, rtol: float = 0.0, seed: int = 0, input_names: Sequence[str] | None = None,
           output_names: Sequence[str] | None = None,
           custom_translation_table: dict[Any, Any] | None = None) -> ExportResult:
    """Export ``module_or_compiled`` (an nn.Module, a ``torch.export`` GraphModule or fxprune's ``Compiled``) to
    the ONNX file ``path`` and return what was written.

    Steps: export (dynamo exporter, TorchScript exporter as fallback; ``opset`` None = the exporter's default),
    with dim 0 of every tensor input symbolic if ``dynamic_batch`` (if the module only traces with a static batch
    the file is static and ``dynamic_batch`` of the result is False, with a note and a warning); onnxsim (if it
    fails or changes the interface, the unsimplified model is kept and ``simplify_skipped`` says why);
    ``onnx.checker.check_model``; then, if ``check_parity``, :func:`check_parity` with ``atol``/``rtol``/``seed``
    (raises :class:`ExportError` on a mismatch). The module is not modified (its training flags are restored).
    """
    onnx = require("onnx")
    require("onnxscript")
    module = resolve_module(module_or_compiled)
    args, kwargs = _split_inputs(example_inputs)
    if not _tensor_leaves(args, kwargs):
        raise InputError("example_inputs hold no tensor", fix="pass the model's example inputs, e.g. (x,)")
    max_opset = onnx.defs.onnx_opset_version()
    if opset is not None and not 7 <= int(opset) <= max_opset:
        raise InputError(f"opset {opset} is outside what onnx {onnx.__version__} supports (7..{max_opset})")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nbytes = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    external = nbytes > _EXTERNAL_DATA_BYTES
    notes: list[str] = []

    if input_names is None or output_names is None:
        ins, outs = default_names(module, args, kwargs)
        input_names = list(input_names) if input_names is not None else ins
        output_names = list(output_names) if output_names is not None else outs
    exporter = "dynamo"
    translations = dict(custom_translation_table or {})
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    nd = _nd_sdpa_nodes(module)
    if nd and sdpa not in translations:
        translations[sdpa] = _sdpa_any_rank
        notes.append(f"{_SDPA} with non-4-D q/k/v at {', '.join(nd[:3])}{' ...' if len(nd) > 3 else ''}: "
                     f"translated by fxprune's any-rank SDPA (MatMul/Softmax; torch.onnx's own is 4-D only)")
    dyn_failure: tuple[str | None, str | None, str] | None = None
    log.info("exporting %s to %s", type(module).__name__, path)
    with timed("onnx export", log), eval_mode(module) as switched, warnings.catch_warnings():
        if not switched:  # torch.export GraphModule: its graph was captured in eval mode already
            warnings.filterwarnings("ignore", message=".*training mode.*")
        dyn_kw = dict(opset=opset, dynamic=dynamic_batch, input_names=input_names, output_names=output_names,
                      external=external)
        try:
            try:
                _export_dynamo(module, args, kwargs, path, translations=translations, **dyn_kw)
            except Exception as e_first:
                root = _dynamo_failure(e_first)[2]
                if _SDPA_4D_ONLY in root and sdpa not in translations:
                    # a plain module's graph is only known once exported: retry 5-D attention with our translation
                    translations[sdpa] = _sdpa_any_rank
                    _export_dynamo(module, args, kwargs, path, translations=translations, **dyn_kw)
                    notes.append(f"{_SDPA} with non-4-D q/k/v: translated by fxprune's any-rank SDPA "
                                 f"(MatMul/Softmax; torch.onnx's own is 4-D only)")
                elif "Cannot view a tensor" in root and any(
                        isinstance(m, torch.fx.GraphModule) for m in module.modules()):
                    with _stride_free_graph(module) as n_rewritten:
                        _export_dynamo(module, args, kwargs, path, translations=translations, **dyn_kw)
                    notes.append(f"dynamo exporter: a view was impossible under its fake strides ({root[:160]}); "
                                 f"exported with the graph's {n_rewritten} aten.view/contiguous as "
                                 f"reshape/clone (same values; the module itself is unchanged)")
                else:
                    raise
        except Exception as e_dyn:
            dyn_failure = _dynamo_failure(e_dyn)
            where = _where(dyn_failure)
            notes.append(f"dynamo exporter failed{where} ({_first_line(e_dyn)}); used the TorchScript exporter")
            exporter = "torchscript"
            try:
                _export_torchscript(module, args, kwargs, path, opset=opset, dynamic=dynamic_batch,
                                    input_names=input_names, output_names=output_names)
            except Exception as e_ts:
                raise ExportError(
                    f"could not export {type(module).__name__} to ONNX. dynamo exporter{where}: "
                    f"{_first_line(e_dyn)}; TorchScript exporter: {_first_line(e_ts)}",
                    fix=_fix_for(dyn_failure),
                ) from e_dyn

    model = onnx.load(path)
    if opset is not None and _opset(model) != int(opset):  # torch.onnx keeps its own opset when conversion fails
        notes.append(f"opset {opset} was requested; the exporter wrote opset {_opset(model)} (its version "
                     f"conversion to {opset} failed or is unsupported)")
    is_dynamic = _dynamic_batch_inputs(model)
    if dynamic_batch and not is_dynamic:
        msg = ("the module only exports with a static batch (dim 0 specialised to the example's size); the file "
               "accepts only that batch size")
        notes.append(msg)
        warnings.warn(msg, stacklevel=2)

    simplified, skipped = False, None
    if simplify:
        try:
            onnxsim = require("onnxsim")
            with _captured_native_output() as native:
                simp, check_ok = onnxsim.simplify(model)
            if native:
                notes.append("onnxsim: " + "; ".join(native[:5]) + (" ..." if len(native) > 5 else ""))
            if not check_ok:
                skipped = "onnxsim's own check of the simplified model failed"
            elif ([i.name for i in simp.graph.input] != [i.name for i in model.graph.input]
                  or [o.name for o in simp.graph.output] != [o.name for o in model.graph.output]):
                skipped = "onnxsim changed the model's inputs or outputs"
            elif is_dynamic and not _dynamic_batch_inputs(simp):
                skipped = "onnxsim made the batch dimension static"
            else:
                model, simplified = simp, True
        except Exception as e:  # onnxsim raises plain RuntimeErrors/ValueErrors from C++ on unsupported graphs
            skipped = f"onnxsim failed: {_first_line(e)}"
        if skipped:
            notes.append(f"simplification skipped: {skipped}")
            warnings.warn(f"{path}: simplification skipped: {skipped}", stacklevel=2)
        if simplified:
            _save(onnx, model, path, external)
    try:
        onnx.checker.check_model(path)
    except Exception as e:
        raise ExportError(f"onnx.checker rejects {path!r}: {_first_line(e)}") from e

    parity = ParityResult({}, {}, [])
    if check_parity:
        with timed("onnx parity check (onnxruntime vs torch)", log) as t:
            try:
                parity = check_parity_fn(path, module, example_inputs, atol=atol, rtol=rtol, seed=seed)
            except ExportError as e:
                if dyn_failure is None:
                    raise
                raise ExportError(
                    f"the dynamo exporter failed{_where(dyn_failure)} ({dyn_failure[2]}), and the file the "
                    f"TorchScript fallback wrote is wrong: {str(e).splitlines()[0]}",
                    fix=_fix_for(dyn_failure)) from e
            t["details"] = str(parity)
        notes += parity.notes
    return ExportResult(path=path, opset=_opset(model), exporter=exporter, dynamic_batch=is_dynamic,
                        simplified=simplified, max_abs_diff=parity.max_abs_diff,
                        inputs=[i.name for i in model.graph.input if i.name not in
                                {t.name for t in model.graph.initializer}],
                        outputs=[o.name for o in model.graph.output], tolerance=parity.tolerance,
                        parity_batch_sizes=parity.batch_sizes, simplify_skipped=skipped, notes=notes)


check_parity_fn = check_parity  # ``export``'s keyword argument shadows the function's name inside it
