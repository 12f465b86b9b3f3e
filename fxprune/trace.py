"""Front-end: capture a model as an FX graph of ATen ops with shape metadata on every node.

We use ``torch.export.export(strict=False)`` (the training IR). It traces far more real models than
``torch.fx.symbolic_trace`` (HuggingFace and timm models with Python-level shape logic), gives one canonical ATen
vocabulary for the analyzer, keeps parameter names (``get_attr`` nodes with the module's qualified names) and puts a
FakeTensor in ``node.meta["val"]`` of every node. It works on meta-device models, so big models can be analysed
without materialising weights. ``benchmarks/coverage.py`` measures the choice.

Dynamic shapes (:func:`trace`'s ``dynamic``): by default dim 0 of every input that shares the example's batch size
is exported as dynamic, and so is dim 1 (the sequence) of integer ``(B, T)`` inputs (token ids, attention masks),
where the model allows it. torch.export specialises sizes 0 and 1, so a batch-1 (or length-1) example is traced
from a copy repeated to size 2 along that dim (the model's size checks are then decided as for sizes >= 2, which is
what a dynamic batch means); the nodes' shape metadata is then re-derived from the user's example, so the analysis
and every pass see the example the user gave (as for a static trace) while the graph's code stays dynamic. Models that
cannot be dynamic fall back to static shapes with a logged warning and a note (``gm.meta["fxprune_inputs"]``, an
:class:`InputSpec`, says which dims are dynamic, under which names, and why some are not).

Errors: a failed trace raises :class:`TraceError` whose ``cause`` classifies it (``"device"``, ``"dtype"``,
``"shape"``, ``"inputs"``, ``"control_flow"``, ``"unsupported_op"``, ``"dynamic_shapes"``, ``"other"``), with the
user's ``file:line`` (``where``) and the matching fix.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import linecache
import os
import re
import sysconfig
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .errors import InputError, TraceError
from .log import get_logger

TRACER = "torch.export(strict=False)"
log = get_logger("trace")


def _example_summary(args: tuple, kwargs: dict) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}"
        return type(x).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def normalize_inputs(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of args, or a dict of kwargs; return (args, kwargs)."""
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, torch.Tensor):
        args: tuple = (example_inputs,)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), {**example_inputs, **kwargs}
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    elif example_inputs is None:
        args = ()
    else:
        raise InputError(
            f"example_inputs must be a tensor, a tuple of forward args or a dict of kwargs, got "
            f"{type(example_inputs).__name__}",
            fix="pass e.g. (torch.randn(1, 3, 224, 224),) or {'input_ids': ids}",
        )
    if not args and not kwargs:
        raise InputError("no example inputs given", fix="pass the model's forward arguments as example_inputs")
    return args, kwargs


# ================================================================================================ input spec
@dataclass
class InputDims:
    """One flat tensor input of a traced graph: its name (the forward parameter; nested inputs get a suffix), dtype
    and, per dim, a size (static) or a dim name (``"batch"``, ``"seq"``, ...; an expression of names for derived
    dims)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def dynamic(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}


@dataclass
class InputSpec:
    """What the traced graph accepts: one :class:`InputDims` per flat graph input (``None`` for non-tensor
    inputs), the range ``(min, max or None)`` of every dim name, and notes on dims that could not be dynamic."""

    inputs: list[InputDims | None]
    ranges: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dynamic_batch: bool = False

    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        """``{input name: {dim: dim name}}`` for every input with a dynamic dim."""
        return {i.name: i.dynamic() for i in self.inputs if i is not None and i.dynamic()}


def _batch_dynamic_shapes(args: tuple, kwargs: dict) -> Any:
    """Dim 0 of every tensor input (of size > 1) as ``Dim.AUTO``, in the flat form torch.export takes for
    ``export(mod, args, kwargs, dynamic_shapes=...)`` (one spec per positional arg, then one per kwarg)."""
    from torch.export import Dim

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] > 1:
            return {0: Dim.AUTO}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    return tuple(spec(a) for a in args) + tuple(spec(v) for v in kwargs.values())


def _signature_names(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """``{forward parameter name: value}`` for the call ``model(*args, **kwargs)`` (None if it does not bind)."""
    try:
        return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return None


def _repeat(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` repeated to size 2 along ``dim`` (size 1 -> 2)."""
    return torch.cat([x, x], dim=dim)


_INT_TYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


@dataclass
class _Attempt:
    label: str  # "batch+seq", "batch", "dynamic=", "static"
    args: tuple
    kwargs: dict
    shapes: Any  # dynamic_shapes for torch.export (None: static)
    names: dict[tuple[str, int], str]  # (top-level input, dim) -> the name the user gave (explicit dynamic=)
    explicit: bool = False
    tiled: bool = False  # a dynamic dim had example size 1: args/kwargs hold copies repeated to size 2 there


def _auto_attempts(model: nn.Module, args: tuple, kwargs: dict) -> list[_Attempt]:
    """Dynamic batch (dim 0 of inputs of the example's batch size) and sequence (dim 1 of integer (B, T) inputs),
    then batch alone, then static."""
    from torch.export import Dim

    bound = _signature_names(model, args, kwargs)
    static = _Attempt("static", args, kwargs, None, {})
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if bound is None or not leaves:
        return [static]
    batch = int(leaves[0].shape[0])
    tokens = [t for t in leaves if t.dim() == 2 and t.dtype in _INT_TYPES and int(t.shape[0]) == batch]
    seq = int(tokens[0].shape[1]) if tokens else None

    named = {"batch": Dim("batch", min=1), "seq": Dim("seq", min=1)}

    def build(with_seq: bool, shared: bool) -> tuple[dict, dict, int, bool] | None:
        shapes: dict[str, Any] = {}
        values: dict[str, Any] = {}
        any_dyn = ones = False
        count = 0

        def one(x: Any) -> tuple[Any, Any]:
            nonlocal any_dyn, count, ones
            if isinstance(x, torch.Tensor):
                spec: dict[int, Any] = {}
                if x.dim() >= 1 and int(x.shape[0]) == batch and batch >= 1:
                    spec[0] = named["batch"] if shared else Dim.AUTO
                    if batch == 1:
                        x, ones = _repeat(x, 0), True
                if (with_seq and x.dim() == 2 and x.dtype in _INT_TYPES and seq is not None
                        and int(x.shape[1]) == seq and seq >= 1):
                    spec[1] = named["seq"] if shared else Dim.AUTO
                    if seq == 1:
                        x, ones = _repeat(x, 1), True
                any_dyn = any_dyn or bool(spec)
                count += bool(spec)
                return x, (spec or None)
            if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
                pairs = [one(v) for v in x]
                return type(x)(p[0] for p in pairs), type(x)(p[1] for p in pairs)
            if isinstance(x, dict) and type(x) is dict:
                pairs = {k: one(v) for k, v in x.items()}
                return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
            return x, None

        for name, v in bound.items():
            values[name], shapes[name] = one(v)
        return (values, shapes, count, ones) if any_dyn else None

    # inputs sharing the example's batch (and sequence) size first get one shared Dim("batch") (Dim("seq")), so
    # the module checks they agree and ONNX names them alike; Dim.AUTO (one symbol per dim unless the model ties
    # them, sizes the model fixes specialised silently) next, then the batch alone, then static shapes
    plan = [("batch+seq", True, True), ("batch+seq", True, False), ("batch", False, False)] if seq is not None \
        else [("batch", False, True), ("batch", False, False)]
    out: list[_Attempt] = []
    for label, with_seq, shared in plan:
        built = build(with_seq, shared)
        if built is None or (shared and built[2] < 2):  # a single dynamic input: nothing to share
            continue
        values, shapes, _, ones = built
        a, k = _rebind(model, args, kwargs, values) if ones else (args, kwargs)
        out.append(_Attempt(label, a, k, shapes, {}, tiled=ones))
    return out + [static]


def _rebind(model: nn.Module, args: tuple, kwargs: dict, values: dict[str, Any]) -> tuple[tuple, dict]:
    """The same call (positional stays positional, keywords stay keywords) with each forward parameter's value
    replaced by ``values[name]``."""
    params = list(inspect.signature(model.forward).parameters.values())
    new_args: list[Any] = []
    i = 0
    for p in params:
        if i >= len(args):
            break
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            new_args.append(values.get(p.name, args[i]))
            i += 1
        elif p.kind is p.VAR_POSITIONAL:
            new_args.extend(values.get(p.name, tuple(args[i:])))
            i = len(args)
        else:
            break
    new_args.extend(args[i:])
    by_name = {p.name: p for p in params}
    varkw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    new_kwargs: dict[str, Any] = {}
    for k, v in kwargs.items():
        if k in by_name and by_name[k].kind is not by_name[k].VAR_KEYWORD:
            new_kwargs[k] = values.get(k, v)
        elif varkw is not None and isinstance(values.get(varkw), dict):
            new_kwargs[k] = values[varkw].get(k, v)
        else:
            new_kwargs[k] = v
    return tuple(new_args), new_kwargs


def _explicit_attempts(model: nn.Module, args: tuple, kwargs: dict, dynamic: dict) -> list[_Attempt]:
    """``dynamic={"input_ids": {0: "batch", 1: "seq"}, ...}``: exactly those dims, as named ``Dim``s (shared by
    name), each at least 1; inputs not named are static."""
    from torch.export import Dim

    bound = _signature_names(model, args, kwargs)
    if bound is None:
        raise InputError("dynamic= needs the example inputs to bind to the model's forward signature",
                         fix="pass the inputs by the names forward() declares, or dynamic=False")
    unknown = [k for k in dynamic if k not in bound]
    if unknown:
        raise InputError(f"dynamic= names inputs {unknown} that are not among the forward arguments given "
                         f"({', '.join(bound)})", fix="use the names of forward()'s parameters")
    dims: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    names: dict[tuple[str, int], str] = {}
    values = dict(bound)
    ones = False
    for key, spec in dynamic.items():
        x = bound[key]
        if spec is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise InputError(f"dynamic=: input {key!r} is a {type(x).__name__}, not a tensor",
                             fix="give dims of tensor inputs only (nested inputs are static)")
        if not isinstance(spec, dict) or not all(isinstance(d, int) and not isinstance(d, bool) for d in spec):
            raise InputError(f"dynamic[{key!r}] must be a dict {{dim: name}}, got {spec!r}",
                             fix="e.g. dynamic={'input_ids': {0: 'batch', 1: 'seq'}}")
        one: dict[int, Any] = {}
        for d, nm in spec.items():
            if not -x.dim() <= d < x.dim():
                raise InputError(f"dynamic[{key!r}]: dim {d} is out of range for a {x.dim()}-d input",
                                 fix=f"use dims 0..{x.dim() - 1}")
            d = d % x.dim()
            if isinstance(nm, str):
                if not nm.isidentifier():
                    raise InputError(f"dynamic[{key!r}][{d}]: dim name {nm!r} is not an identifier",
                                     fix="use names such as 'batch' or 'seq'")
                dims.setdefault(nm, Dim(nm, min=1))
                one[d] = dims[nm]
                names[(key, d)] = nm
            elif nm is None:
                continue
            else:
                one[d] = nm  # a torch.export Dim / hint given as is
                names[(key, d)] = getattr(nm, "__name__", f"{key}_{d}")
            if int(x.shape[d]) == 0:
                raise InputError(f"dynamic[{key!r}][{d}]: the example has size 0 there",
                                 fix="pass an example of size >= 1 in every dynamic dim")
            if int(x.shape[d]) == 1:
                x, ones = _repeat(x, d), True
        values[key] = x
        shapes[key] = one or None
    for key in bound:
        shapes.setdefault(key, None)
    a, k = _rebind(model, args, kwargs, values) if ones else (args, kwargs)
    return [_Attempt("dynamic=", a, k, shapes, names, explicit=True, tiled=ones)]


def _sym_name_map(gm: fx.GraphModule, ep: Any, attempt: _Attempt, leaves: list[Any]) -> InputSpec:
    """The :class:`InputSpec` of ``gm`` (placeholders in flat order, ``leaves`` the user's example per placeholder)."""
    import sympy

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names: dict[Any, str] = {}
    used: set[str] = set()

    def fresh(base: str) -> str:
        nm, i = base, 2
        while nm in used:
            nm, i = f"{base}_{i}", i + 1
        used.add(nm)
        return nm

    flat_names = flat_input_names(gm)
    inputs: list[InputDims | None] = []
    exprs: list[list[Any]] = []
    for p, pname in zip(placeholders, flat_names):
        val = p.meta.get("val")
        if not isinstance(val, torch.Tensor):
            inputs.append(None)
            exprs.append([])
            continue
        row = []
        for d, s in enumerate(val.shape):
            e = s.node.expr if isinstance(s, torch.SymInt) else int(s)
            row.append(e)
            if isinstance(e, sympy.Symbol) and e not in names:
                given = attempt.names.get((pname, d))
                if given:
                    names[e] = given
                    used.add(given)
                elif d == 0:
                    names[e] = fresh("batch")
                elif d == 1 and val.dtype in _INT_TYPES and val.dim() == 2:
                    names[e] = fresh("seq")
                else:
                    names[e] = fresh(f"{pname}_dim{d}")
        exprs.append(row)
        inputs.append(InputDims(pname, str(val.dtype).replace("torch.", ""), ()))
    subs = {s: sympy.Symbol(n, integer=True, positive=True) for s, n in names.items()}
    for i, row in enumerate(exprs):
        if inputs[i] is None:
            continue
        dims: list[int | str] = []
        for e in row:
            if isinstance(e, int):
                dims.append(e)
            elif getattr(e, "is_number", False):
                dims.append(int(e))
            else:
                dims.append(str(e.xreplace(subs)))
        inputs[i].dims = tuple(dims)
    ranges: dict[str, tuple[int, int | None]] = {}
    for sym, vr in getattr(ep, "range_constraints", {}).items():
        if sym in names:
            lo, hi = _bound(vr.lower), _bound(vr.upper)
            lo = 1 if lo is None else lo
            ranges[names[sym]] = (1 if lo <= 2 else lo, hi)  # 0/1 specialisation: a lower bound of 2 admits 1
    for n in names.values():
        ranges.setdefault(n, (1, None))
    return InputSpec(inputs, ranges)


def _bound(x: Any) -> int | None:
    """A finite sympy/int bound as an int, infinities (torch's ``int_oo``) as None."""
    try:
        return int(x) if getattr(x, "is_finite", True) is True or isinstance(x, int) else None
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def flat_input_names(gm: fx.GraphModule) -> list[str]:
    """The names of ``gm``'s flat inputs: the forward parameters (``x``, ``input``, ``input_ids``), with a suffix
    ``_<i>`` per tensor of a nested input; the placeholder names where the structure is unknown."""
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    codegen = getattr(gm.graph, "_codegen", None)
    info = getattr(codegen, "pytree_info", None)
    spec = getattr(gm, "_in_spec", None)
    if info is None or spec is None:
        return placeholders
    try:
        if spec.type is tuple and spec.num_children == 2 and spec.child(1).type is dict:
            children = [spec.child(0).child(i) for i in range(spec.child(0).num_children)] + \
                [spec.child(1).child(i) for i in range(spec.child(1).num_children)]
        else:
            children = [spec.child(i) for i in range(spec.num_children)]
        names: list[str] = []
        for arg, child in zip(info.orig_args, children):
            n = child.num_leaves
            names += [arg] if n == 1 and child.is_leaf() else [f"{arg}_{i}" for i in range(n)]
    except Exception:  # noqa: BLE001 - an unusual structure: the placeholder names
        return placeholders
    return names if len(names) == len(placeholders) and len(set(names)) == len(names) else placeholders


def _dynamic_batch(spec: InputSpec, leaves: list[Any]) -> bool:
    """Dim 0 is dynamic in every rank >= 1 tensor input whose example dim 0 is the batch size (and there is one)."""
    rows = [(i, x) for i, x in zip(spec.inputs, leaves) if i is not None and isinstance(x, torch.Tensor)
            and x.dim() >= 1]
    if not rows:
        return False
    batch = int(rows[0][1].shape[0])
    cand = [i for i, x in rows if int(x.shape[0]) == batch]
    return all(isinstance(i.dims[0], str) for i in cand)


# ================================================================================================ HF caches
@contextlib.contextmanager
def _hf_without_cache(model: nn.Module, kwargs: dict, notes: list[str]) -> Iterator[None]:
    """HuggingFace models return a ``DynamicCache`` by default (``config.use_cache=True``), which torch.export
    cannot return: trace them with ``config.use_cache=False`` (restored afterwards) unless the call sets
    ``use_cache`` itself."""
    cfg = getattr(model, "config", None)
    if cfg is None or "use_cache" in kwargs or getattr(cfg, "use_cache", None) is not True:
        yield
        return
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        yield
        return
    cfg.use_cache = False
    notes.append("traced with config.use_cache=False: HuggingFace models return a DynamicCache by default, "
                 "which torch.export cannot return; the pruned module returns no past_key_values")
    try:
        yield
    finally:
        cfg.use_cache = True


# ================================================================================================ trace
def trace(model: nn.Module, args: tuple, kwargs: dict | None = None, *, copy_model: bool = True,
          dynamic_batch: bool = True, dynamic: Any = None) -> fx.GraphModule:
    """Export ``model`` (in eval mode) to a GraphModule of ATen ops whose ``get_attr`` nodes name the parameters.

    ``dynamic``: ``None``/``True`` (default) makes dim 0 of every input of the example's batch size dynamic, and
    dim 1 of integer ``(B, T)`` inputs (token ids, masks), where the model allows it (a size-1 example dim is
    traced from a copy repeated to size 2, see the module doc); models that do not trace that way fall back to fewer dynamic dims and
    then to static shapes, with a logged warning and a note. ``False`` (or ``dynamic_batch=False``): static shapes.
    A dict ``{input name: {dim: name}}`` makes exactly those dims dynamic (dims sharing a name are equal) and fails
    with :class:`TraceError` if the model cannot trace that way. ``gm.meta["fxprune_inputs"]`` holds the resulting
    :class:`InputSpec` and ``gm.meta["fxprune_dynamic_batch"]`` whether the batch is dynamic.

    The model is deep-copied first (unless ``copy_model=False``) so that the returned module owns its parameters
    and pruning it never touches the user's model. Raises :class:`TraceError` with the classified reason.
    """
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}",
            fix="wrap your function in an nn.Module whose forward calls it",
        )
    kwargs = dict(kwargs or {})
    if dynamic is None or dynamic is True:
        dynamic = bool(dynamic_batch)
    if not (isinstance(dynamic, (bool, dict))):
        raise InputError(f"dynamic must be None, True, False or a dict {{input: {{dim: name}}}}, got "
                         f"{type(dynamic).__name__}", fix="e.g. dynamic={'input_ids': {0: 'batch', 1: 'seq'}}")
    _check_devices(model, args, kwargs)
    if isinstance(dynamic, dict):
        attempts = _explicit_attempts(model, args, kwargs, dynamic)
    elif dynamic:
        attempts = _auto_attempts(model, args, kwargs)
    else:
        attempts = [_Attempt("static", args, kwargs, None, {})]
    work = copy.deepcopy(model) if copy_model else model
    flags = [(m, m.training) for m in work.modules()]  # each submodule's own flag, restored below
    work.eval()
    notes: list[str] = []
    failures: list[tuple[_Attempt, BaseException]] = []
    ep = used = None
    t0 = time.perf_counter()
    log.info("tracing %s%s with %s", type(model).__name__, _example_summary(args, kwargs), TRACER)
    try:
        with _hf_without_cache(work, kwargs, notes):
            for attempt in attempts:
                try:
                    ep = torch.export.export(work, attempt.args, attempt.kwargs, strict=False,
                                             dynamic_shapes=attempt.shapes)
                    gm = ep.module()
                    inline_wrapper_hops(gm)
                    leaves = _user_leaves(gm, args, kwargs)
                    spec = _sym_name_map(gm, ep, attempt, leaves)  # before _static_meta drops the symbols
                    if attempt.tiled:  # metadata of the size-2 copy: re-derive it from the user's example
                        try:  # (graph code stays dynamic)
                            _static_meta(gm, leaves)
                        except Exception as e:  # noqa: BLE001 - size 1 takes another path: try the next attempt
                            failures.append((attempt, e))
                            ep = None
                            log.debug("trace attempt %s: the graph does not re-run on the size-1 example: %s",
                                      attempt.label, _first_line(e))
                            continue
                    used = attempt
                    break
                except Exception as e:  # torch raises many types here; classified below
                    ep = None
                    failures.append((attempt, e))
                    log.debug("trace attempt %s failed: %s", attempt.label, _first_line(e))
                    if attempt.explicit or _shape_independent(e):
                        break  # static shapes would fail the same way: do not trace again
            if ep is None:
                attempt, err = failures[-1]
                raise _trace_error(model, work, args, kwargs, err, explicit=attempt.explicit) from err
            if _dtype_suspect(work, args, kwargs):  # fake tensors let e.g. float64 x float32 conv through
                eager = _eager_error(work, args, kwargs)
                if eager is not None:
                    raise _trace_error(model, work, args, kwargs, eager) from eager
    finally:
        if not copy_model:
            for m, was in flags:
                m.training = was
    spec.dynamic_batch = bool(used.shapes is not None and _dynamic_batch(spec, leaves))
    spec.notes = notes + _shape_notes(spec, leaves, failures, used)
    for n in spec.notes:
        log.warning("%s: %s", type(model).__name__, n)
    dims = spec.dynamic_dims()
    log.info("traced %s in %.2f s: %d nodes, %s", type(model).__name__, time.perf_counter() - t0,
             len(gm.graph.nodes), "dynamic " + ", ".join(f"{k}{sorted(v.items())}" for k, v in dims.items())
             if dims else "static shapes")
    gm.meta["fxprune_tracer"] = TRACER
    gm.meta["fxprune_dynamic_batch"] = spec.dynamic_batch
    gm.meta["fxprune_inputs"] = spec
    gm.meta["fxprune_root_class"] = type(model).__name__
    return gm


class _MetaProp(fx.Interpreter):
    """FakeTensor propagation refreshing ``node.meta["val"]``. torch.export's guard module runs first (on the same
    fake inputs, whose sizes are the example's): a guard the example violates means the graph was traced for
    other sizes (a size-2 copy taking another path than size 1) and raises."""

    def __init__(self, gm: fx.GraphModule, mode: Any):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and str(n.target).startswith("_guards_fn"):
            guards = self.module.get_submodule(str(n.target))
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            guards(*args, **kwargs)  # AssertionError "Guard failed: ..." on a violated guard
            return None
        out = super().run_node(n)
        if n.op not in ("output",):
            n.meta["val"] = out
        return out


def _static_meta(gm: fx.GraphModule, leaves: list[Any]) -> None:
    """Re-derive every node's ``meta["val"]`` from FakeTensors of the user's example ``leaves`` (static sizes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in leaves]
    with mode:
        _MetaProp(gm, mode).run(*fake)


def _user_leaves(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The user's example value of each placeholder of ``gm`` (flattened as its forward flattens its inputs)."""
    spec = getattr(gm, "_in_spec", None)
    try:
        if spec is not None:
            import torch.fx._pytree as fx_pytree

            if spec.num_children == 2 and spec.child(1).type is dict:
                return list(fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), spec))
            return list(fx_pytree.tree_flatten_spec(list(args), spec))
    except Exception:  # noqa: BLE001 - fall back to pytree order
        pass
    return list(pytree.tree_leaves((args, kwargs)))


def _shape_notes(spec: InputSpec, leaves: list[Any], failures: list[tuple[_Attempt, BaseException]],
                 used: _Attempt) -> list[str]:
    """Why requested dynamic dims are static (the model's code fixed them, or the dynamic trace failed)."""
    notes: list[str] = []
    if used.label == "static" and failures:
        first = failures[0][1]
        notes.append(f"static shapes: the model could not be traced with a dynamic batch ({_first_line(first)}); "
                     f"the pruned module accepts only the example's shapes")
        return notes
    if used.shapes is None:
        return notes
    if used.label == "batch" and any(a.label == "batch+seq" for a, _ in failures):
        notes.append(f"the sequence length is static: the model could not be traced with a dynamic sequence "
                     f"length ({_first_line(failures[0][1])})")
    rows = [(i, x) for i, x in zip(spec.inputs, leaves) if i is not None and isinstance(x, torch.Tensor)
            and x.dim() >= 1]
    if rows:
        batch = int(rows[0][1].shape[0])
        fixed = [i.name for i, x in rows if int(x.shape[0]) == batch and not isinstance(i.dims[0], str)]
        if fixed and not used.explicit:
            notes.append(f"static batch: the model's code fixes dim 0 of {', '.join(fixed)} to {batch} "
                         f"(torch.export specialised it); the pruned module accepts only batch {batch}")
    return notes


# ================================================================================================ errors
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TORCH_DIR = os.path.dirname(torch.__file__)
_FXPRUNE_DIR = os.path.dirname(os.path.abspath(__file__))
_STDLIB = sysconfig.get_paths().get("stdlib", "")


def _clean(s: str) -> str:
    return _ANSI.sub("", s)


def _first_line(e: BaseException) -> str:
    s = _clean(str(e)).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:300]}" if s else type(e).__name__


def _user_frame(e: BaseException) -> tuple[str, int, str] | None:
    """The deepest traceback frame (through the exception's causes) outside torch, fxprune, the standard library
    and pytest: (file, line, source line)."""
    best = None
    seen: set[int] = set()
    exc: BaseException | None = e
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            f = os.path.abspath(tb.tb_frame.f_code.co_filename)
            if not (f.startswith(_TORCH_DIR) or f.startswith(_FXPRUNE_DIR) or (_STDLIB and f.startswith(_STDLIB))
                    or "/_pytest/" in f or "/pluggy/" in f or f.startswith("<")):
                best = (f, tb.tb_lineno, linecache.getline(f, tb.tb_lineno).strip())
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return best


def _devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in list(model.parameters()) + list(model.buffers())}


def _device_mismatch(model: nn.Module, args: tuple, kwargs: dict) -> str | None:
    devs = _devices(model)
    if len(devs) != 1:
        return None
    dev = next(iter(devs))
    bound = _signature_names(model, args, kwargs) or {f"input {i}": a for i, a in enumerate(args)} | kwargs
    for name, v in bound.items():
        for t in pytree.tree_leaves(v):
            if isinstance(t, torch.Tensor) and t.device != dev and t.dim() > 0:
                return (f"device mismatch: the model's parameters are on {dev} but input {name!r} is on {t.device}")
    return None


def _dtype_suspect(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a floating example input has another floating dtype than the model's (single-dtype) parameters.
    Export's fake tensors do not check dtypes for every op, so such an example can trace and then fail on the
    first real run; the caller runs the model once eagerly to tell a real mismatch from a model that casts."""
    dts = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    if len(dts) != 1:
        return False
    dt = next(iter(dts))
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dt
               for t in pytree.tree_leaves((tuple(args), dict(kwargs))))


def _check_devices(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse inputs on another device than the model's (all parameters on one device) before the slow trace."""
    msg = _device_mismatch(model, args, kwargs)
    if msg is None:
        return
    dev = next(iter(_devices(model)))
    fix = (f"create the example inputs on the model's device, e.g. x.to('{dev}')" if dev.type != "meta" else
           "a model on the meta device needs example inputs on it too, e.g. torch.zeros(2, 8, dtype=torch.long, "
           "device='meta')")
    err = TraceError(f"cannot trace {type(model).__name__}: {msg}", fix=fix + " (or move the model: model.to(...))")
    err.cause, err.where = "device", None
    raise err


_DTYPE = re.compile(r"scalar type|dtype|Expected tensor for argument|expected .*(Long|Int|Float|Half|Double)|"
                    r"should be the same|must have the same type|Input type \(|not implemented for '(Long|Int|Bool)|"
                    r"'(Float|Half|Long|Int)'", re.I)
_SHAPE = re.compile(r"channels|shape|size mismatch|must match the size|cannot be multiplied|dimension|"
                    r"Expected .*-dimensional|expected input|out of range|index out of", re.I)
_DATA_DEP = re.compile(r"data-dependent|data dependent|GuardOnDataDependent|DataDependentOutput|\.item\(\)|"
                       r"_local_scalar_dense|numpy\(\) is not supported|Cannot access data pointer|tolist|"
                       r"DynamicOutputShape", re.I)
_UNSUPPORTED = re.compile(r"no fake impl|UnsupportedOperator|fake impl|register_fake|Could not run '|"
                          r"NotImplementedError|not implemented for|no kernel|unsupported", re.I)


def _shape_independent(e: BaseException) -> bool:
    """A failure that no choice of dynamic dims changes: data-dependent values (``.item()``, branches on tensor
    values: unbacked symbols), ops without a fake implementation, tensors on different devices."""
    name = type(e).__name__
    text = _clean(str(e))
    return (name.startswith(("GuardOnDataDependent", "DataDependent", "UnsupportedOperator"))
            or "no fake impl" in text or "same device" in text)


def _trace_error(model: nn.Module, work: nn.Module, args: tuple, kwargs: dict, e: BaseException, *,
                 explicit: bool = False) -> TraceError:
    """A :class:`TraceError` for the failed export ``e``: classified cause, the user's file:line, the fix."""
    name = type(model).__name__
    head = f"could not trace {name}{_example_summary(args, kwargs)} with {TRACER}"
    text = _clean(str(e))
    where = _user_frame(e)
    dev = _device_mismatch(model, args, kwargs)
    cause, fix, shown = "other", None, e
    if dev is not None or "same device" in text:
        cause = "device"
        fix = "create the example inputs on the model's device (x.to(device)), or move the model there"
    elif explicit and ("Constraints violated" in text or "specialized" in text or "specialised" in text
                       or "conflicts" in text):
        cause = "dynamic_shapes"
        fix = ("the model fixes a dim that dynamic= marks as dynamic: drop it from dynamic= (or pass "
               "dynamic=False); the message above names the dim")
    else:
        eager = _eager_error(work, args, kwargs)
        if eager is not None:  # the inputs do not fit the model at all: not a tracing problem
            shown, text, where = eager, _clean(str(eager)), _user_frame(eager) or where
            if _DTYPE.search(text):
                cause = "dtype"
                fix = ("give each example input the dtype the model expects: integer token ids (torch.long, e.g. "
                       "torch.randint(0, vocab_size, (B, T))) for embeddings, float32 tensors for images and "
                       "features")
            elif _SHAPE.search(text):
                cause = "shape"
                fix = ("give the example inputs the shape the model expects (e.g. (N, C, H, W) with the channel "
                       "count of the first layer); check model(*example_inputs) runs")
            else:
                cause = "inputs"
                fix = "the model fails on these example inputs without fxprune too: make model(*args, **kwargs) run"
        elif _DATA_DEP.search(text) or type(e).__name__.startswith(("GuardOnDataDependent", "DataDependent")):
            cause = "control_flow"
            fix = ("the model branches on (or converts to Python/numpy) the value of a tensor, which a graph "
                   "cannot capture: compute it with tensor ops (torch.where, masks), use torch.cond for "
                   "branches, or move that logic out of forward")
        elif _UNSUPPORTED.search(text):
            cause = "unsupported_op"
            fix = ("an operator has no implementation for tracing (FakeTensor/meta): register one with "
                   "torch.library.register_fake, or replace the op in forward")
        else:
            fix = "make sure model(*args, **kwargs) runs on the example inputs; the cause above says what failed"
    at = ""
    if where is not None:
        at = f" at {where[0]}:{where[1]}" + (f" ({where[2][:120]})" if where[2] else "")
    kind = {"device": "device mismatch between model and inputs", "dtype": "example input dtype mismatch",
            "shape": "example input shape mismatch", "inputs": "the model fails on the example inputs",
            "control_flow": "data-dependent control flow", "unsupported_op": "unsupported operator",
            "dynamic_shapes": "the requested dynamic dims cannot be dynamic", "other": "trace failed"}[cause]
    err = TraceError(f"{head}: {kind}{at}: {_first_line(shown)}", fix=fix)
    err.cause, err.where = cause, (f"{where[0]}:{where[1]}" if where else None)
    return err


def _eager_error(model: nn.Module, args: tuple, kwargs: dict) -> BaseException | None:
    """Run ``model`` eagerly (no grad, on copies of the inputs) and return the exception it raises, if any."""
    def clone(x: Any) -> Any:
        return x.clone() if isinstance(x, torch.Tensor) else x

    try:
        with torch.no_grad():
            model(*pytree.tree_map(clone, tuple(args)), **pytree.tree_map(clone, dict(kwargs)))
    except Exception as err:  # noqa: BLE001 - classified by the caller
        return err
    return None


_WRAPPER_HOPS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


def inline_wrapper_hops(gm: fx.GraphModule) -> int:
    """Inline ``wrap_with_set_grad_enabled`` / ``wrap_with_autocast`` regions (e.g. HF rotary embeddings computed
    under ``torch.no_grad``/``autocast(enabled=False)``) so the analyzer sees their ops. In float32 inference and
    fine-tuning of the pruned model these wrappers do not change values. Returns the number inlined."""
    import operator

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "__name__", "") not in _WRAPPER_HOPS:
            continue
        sub_node = next((a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"
                         and isinstance(getattr(gm, a.target, None), fx.GraphModule)), None)
        if sub_node is None:
            continue
        sub = getattr(gm, sub_node.target)
        if any(n.op in ("get_attr", "call_module") for n in sub.graph.nodes):
            continue
        inputs = node.args[node.args.index(sub_node) + 1:]
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(inputs):
            continue
        env.update(zip(placeholders, inputs))
        outs: Any = None
        with gm.graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    outs = n.args[0]
                    break
                env[n] = gm.graph.node_copy(n, lambda x: env[x])
        outs = [env.get(o, o) if isinstance(o, fx.Node) else o for o in (outs if isinstance(outs, (list, tuple))
                                                                          else [outs])]
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outs[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:
            continue
        gm.graph.erase_node(node)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
            delattr(gm, sub_node.target)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def node_vals(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """The FakeTensor (or structure of them) recorded on each node."""
    return {n: n.meta.get("val") for n in gm.graph.nodes}
