"""The compile report: params and MACs before/after, verification, and a per-group table.

:class:`Report` is what :func:`fxprune.compile` returns in ``Compiled.report``; :meth:`Report.to_dict` /
:meth:`Report.from_dict` are its JSON form (``"schema": 1``), the core of a saved ``report.json``.
:func:`report_json` adds what a save writes next to it (recipe, per-layer sparsity from :func:`layer_sparsity`,
versions, extra keys), and :func:`graph_facts` reads conv/GroupNorm group counts off a graph (for replay).
"""
from __future__ import annotations

import copy
import json
import platform
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import LoadError
from .version import __version__

#: version of :meth:`Report.to_dict`'s layout (``"schema"`` in report.json); :meth:`Report.from_dict` reads up to it
REPORT_SCHEMA = 1


@dataclass
class GroupRow:
    id: int
    label: str
    kind: str
    members: int
    before: int
    after: int
    frozen: str | None = None
    importance: tuple[float, float, float] | None = None  # min, mean, max of the scores used


@dataclass
class Report:
    model: str
    tracer: str
    dynamic_batch: bool
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    verified: bool | None = None  # None: no Shrink ran (nothing to verify)
    max_abs_diff: float | None = None
    observable: bool | None = None
    groups: list[GroupRow] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    unknown_ops: dict[str, list[str]] = field(default_factory=dict)
    frozen_by: list[dict[str, str]] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: trace, analyze, <pass>, report
    #: the pruned module's dynamic input dims: {input name: {dim (as a string): dim name ("batch", "seq", ...)}}
    dynamic_dims: dict[str, dict[str, str]] = field(default_factory=dict)
    #: what the user should know about how the model was traced (static dims and why, HF cache disabled, ...)
    notes: list[str] = field(default_factory=list)
    #: True when a Shrink is approximate by design (norms="renormalize"): max_abs_diff is then the measured
    #: deviation from the masked program, and verified stays None
    approximate: bool | None = None
    norms: dict[str, str] = field(default_factory=dict)  # normalisation node -> "exact" | "renormalize"

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def to_dict(self) -> dict[str, Any]:
        """Every field (groups as dicts), ``params_ratio``, ``macs_ratio`` and ``"schema"``
        (:data:`REPORT_SCHEMA`); :meth:`from_dict` reads it back."""
        d: dict[str, Any] = {"schema": REPORT_SCHEMA}
        d.update(asdict(self))
        d["params_ratio"] = self.params_ratio
        d["macs_ratio"] = self.macs_ratio
        return d

    as_dict = to_dict  # the older name

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "report") -> "Report":
        """A Report from :meth:`to_dict`'s content (e.g. a saved ``report.json``; keys that are not fields, such as
        ``recipe`` or ``layer_sparsity``, are ignored). A missing ``schema`` reads as 1 (saves before it existed).
        Raises :class:`~fxprune.errors.LoadError` naming ``source`` and the field when the shape is wrong."""
        fix = "the file is damaged or was not written by fxprune: re-save it with fxprune.save / `fxprune compile`"
        if not isinstance(data, Mapping):
            raise LoadError(f"{source}: expected a JSON object, got {_kind(data)}", fix=fix)
        schema = data.get("schema", 1)
        if not _is_int(schema) or schema < 1:
            raise LoadError(f"{source}: field 'schema' must be a positive integer, got {_show(schema)}", fix=fix)
        if schema > REPORT_SCHEMA:
            raise LoadError(f"{source}: report schema {schema} is newer than this fxprune reads ({REPORT_SCHEMA})",
                            fix="upgrade fxprune")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise LoadError(f"{source}: field {f.name!r} is missing", fix=fix)
                continue
            check = _REPORT_FIELDS[f.name]
            value = data[f.name]
            err = check(value)
            if err:
                raise LoadError(f"{source}: field {f.name!r} must be {err}, got {_show(value)}", fix=fix)
            kwargs[f.name] = value
        rows = []
        for i, g in enumerate(kwargs.pop("groups", [])):
            row = {}
            for f in fields(GroupRow):
                if f.name not in g:
                    if f.default is MISSING:
                        raise LoadError(f"{source}: field 'groups[{i}].{f.name}' is missing", fix=fix)
                    continue
                err = _GROUP_FIELDS[f.name](g[f.name])
                if err:
                    raise LoadError(f"{source}: field 'groups[{i}].{f.name}' must be {err}, got {_show(g[f.name])}",
                                    fix=fix)
                row[f.name] = g[f.name]
            if row.get("importance") is not None:
                row["importance"] = tuple(float(v) for v in row["importance"])
            rows.append(GroupRow(**row))
        copied = {k: copy.deepcopy(v) for k, v in kwargs.items()}
        return cls(groups=rows, **copied)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def summary(self) -> str:
        v = {None: "not run", True: "yes", False: "NO"}[self.verified]
        if self.approximate:
            v = "no: APPROXIMATE by design (norms renormalized over the kept width), measured deviation"
        lines = [
            f"fxprune report: {self.model}  (traced with {self.tracer}, "
            f"{'dynamic' if self.dynamic_batch else 'static'} batch, {self.seconds:.2f} s)",
            f"  {'':<10}{'before':>16}{'after':>16}{'ratio':>10}",
            f"  {'params':<10}{self.params_before:>16,}{self.params_after:>16,}{self.params_ratio:>10.3f}",
            f"  {'MACs':<10}{self.macs_before:>16,}{self.macs_after:>16,}{self.macs_ratio:>10.3f}",
            f"  verified (shrunk == masked): {v}" + (f", max abs diff {self.max_abs_diff:.3g}"
                                                     if self.max_abs_diff is not None else "")
            + ("" if self.observable in (None, True) else "  [unobservable: pruning did not change the output]"),
        ]
        if self.dynamic_dims:
            lines.append("  dynamic dims: " + ", ".join(f"{k}[{', '.join(f'{d}: {n}' for d, n in v.items())}]"
                                                       for k, v in self.dynamic_dims.items()))
        lines += [f"  note: {n}" for n in self.notes]
        if self.norms:
            modes: dict[str, list[str]] = {}
            for n, m in self.norms.items():
                modes.setdefault(m, []).append(n)
            lines.append("  normalisations pruned: " + "; ".join(
                f"{m} x{len(ns)} ({', '.join(ns[:4])}{', ...' if len(ns) > 4 else ''})" for m, ns in modes.items()))
        for k, val in self.latency.items():
            lines.append(f"  latency {k}: {val}")
        return "\n".join(lines)

    def table(self, max_rows: int = 60) -> str:
        head = (f"  {'group':>5}  {'kind':<8}  {'channels':>13}  {'members':>7}  {'layer':<40}  "
                f"{'importance min/mean/max':<24}  note")
        rows = [head, "  " + "-" * (len(head) - 2)]
        shown = sorted(self.groups, key=lambda g: (g.frozen is not None, g.id))
        for g in shown[:max_rows]:
            ch = f"{g.before} -> {g.after}"
            note = f"frozen: {g.frozen}" if g.frozen else ""  # the last column: never cut
            imp = "/".join(f"{v:.3g}" for v in g.importance) if g.importance else ""
            # a long label keeps its end (the parameter and dim) behind an ellipsis; report.md has it in full
            label = g.label if len(g.label) <= 40 else "…" + g.label[-39:]
            rows.append(f"  {g.id:>5}  {g.kind:<8}  {ch:>13}  {g.members:>7}  {label:<40}  {imp:<24}  "
                        f"{note}".rstrip())
        if len(shown) > max_rows:
            rows.append(f"  ... {len(shown) - max_rows} more groups (Report.to_dict() has all)")
        if self.unknown_ops:
            rows.append("  ops without a rule (channels touching them are frozen): " +
                        ", ".join(f"{k} at {', '.join(v[:3])}" for k, v in self.unknown_ops.items()))
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()


# ================================================================================================ from_dict checks
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    r = repr(v)
    return f"{_kind(v)} {r[:60] + '...' if len(r) > 60 else r}"


def _check(pred: Callable[[Any], bool], what: str) -> Callable[[Any], str | None]:
    return lambda v: None if pred(v) else what


def _opt(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or check(v) is None else f"{check(v)} or null"


_STR = _check(lambda v: isinstance(v, str), "a string")
_INT = _check(lambda v: _is_int(v) and v >= 0, "a non-negative integer")
_BOOL = _check(lambda v: isinstance(v, bool), "true or false")
_NUM = _check(_is_num, "a number")
_REPORT_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "model": _STR, "tracer": _STR, "dynamic_batch": _BOOL,
    "params_before": _INT, "params_after": _INT, "macs_before": _INT, "macs_after": _INT,
    "verified": _opt(_BOOL), "max_abs_diff": _opt(_NUM), "observable": _opt(_BOOL), "approximate": _opt(_BOOL),
    "norms": _check(lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                    "an object of strings"),
    "groups": _check(lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v), "a list of objects"),
    "passes": _check(lambda v: isinstance(v, list) and all(isinstance(p, dict) for p in v), "a list of objects"),
    "unknown_ops": _check(lambda v: isinstance(v, dict) and all(
        isinstance(x, list) and all(isinstance(n, str) for n in x) for x in v.values()),
        "an object of lists of node names"),
    "frozen_by": _check(lambda v: isinstance(v, list) and all(
        isinstance(r, dict) and all(isinstance(x, str) for x in r.values()) for r in v),
        "a list of objects of strings"),
    "latency": _check(lambda v: isinstance(v, dict), "an object"),
    "seconds": _NUM,
    "dynamic_dims": _check(lambda v: isinstance(v, dict) and all(
        isinstance(d, dict) and all(isinstance(x, str) for x in d.values()) for d in v.values()),
        "an object {input: {dim: name}}"),
    "notes": _check(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "timings": _check(lambda v: isinstance(v, dict) and all(_is_num(x) for x in v.values()), "an object of numbers"),
}
_GROUP_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "id": _INT, "label": _STR, "kind": _STR, "members": _INT, "before": _INT, "after": _INT,
    "frozen": _opt(_STR),
    "importance": _opt(_check(lambda v: isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v),
                              "a list of 3 numbers (min, mean, max)")),
}


# ================================================================================================ report.json
def jsonable(x: Any) -> Any:
    """``x`` with tuples/sets as lists, numpy and small tensors as numbers/lists, other objects as ``repr``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 64 else f"Tensor{tuple(x.shape)}"
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def versions() -> dict[str, str]:
    """fxprune, torch and Python versions."""
    return {"fxprune": __version__, "torch": torch.__version__, "python": platform.python_version()}


def recipe_from_history(history: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A recipe rebuilt from a program's history (``Program.history``: pass names and JSON-able options)."""
    return [{"pass": h["pass"], **dict(h.get("options", {}))} for h in history]


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` under every name it has (tied tensors appear under each name)."""
    out: dict[str, torch.Tensor] = {}
    for n, t in module.named_parameters(remove_duplicate=False):
        out[n] = t
    for n, t in module.named_buffers(remove_duplicate=False):
        out.setdefault(n, t)
    return out


def report_json(compiled: Any, recipe: list[dict[str, Any]] | None = None,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``report.json``'s content for ``compiled`` (a :class:`~fxprune.Compiled`): :meth:`Report.to_dict` plus
    ``recipe`` (default: rebuilt from the program's history), ``layer_sparsity`` (with the original shape and kept
    fraction of each layer when the original model is known), ``versions`` and the keys of ``extra``."""
    d = compiled.report.to_dict()
    d["recipe"] = recipe if recipe is not None else recipe_from_history(compiled.program.history)
    rows = layer_sparsity(compiled.module)
    source = getattr(compiled.program, "source", None)
    if source is not None:
        orig = named_tensors(source)
        for r in rows:
            o = orig.get(r["name"])
            if o is not None:
                r["orig_shape"] = list(o.shape)
                r["kept_fraction"] = r["numel"] / max(o.numel(), 1)
    d["layer_sparsity"] = rows
    d["versions"] = versions()
    for k, v in (extra or {}).items():
        d[k] = v
    return jsonable(d)


# ================================================================================================ graph facts
_CONV_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "_convolution"}
_LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "bmm", "baddbmm"}


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _arg(node: fx.Node, i: int, key: str) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key)


def graph_facts(module: nn.Module) -> dict[str, Any]:
    """From a GraphModule's graph: conv weights with their ``groups`` (``conv_groups``), GroupNorm weights with
    ``num_groups`` (``group_norm_groups``), and the op consuming each conv/linear weight (``weights``)."""
    conv_groups: dict[str, int] = {}
    gn_groups: dict[str, int] = {}
    weights: dict[str, str] = {}
    graph = getattr(module, "graph", None)
    for n in (graph.nodes if graph is not None else ()):
        if n.op != "call_function":
            continue
        op = _target_name(n)
        if op in _CONV_OPS:
            w = _arg(n, 1, "weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                weights[w.target] = op
                if op in ("convolution", "_convolution"):
                    g = _arg(n, 8, "groups")
                else:
                    g = _arg(n, 7 if op.startswith("conv_transpose") else 6, "groups")
                conv_groups[w.target] = int(g) if isinstance(g, int) else 1
        elif op == "linear":
            w = _arg(n, 1, "weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                weights[w.target] = op
        elif op in ("group_norm", "native_group_norm"):
            g = _arg(n, 1, "num_groups") if op == "group_norm" else _arg(n, 6, "group")
            w = _arg(n, 2, "weight") if op == "group_norm" else _arg(n, 1, "weight")
            if isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(g, int):
                gn_groups[w.target] = g
        elif op in _LINEAR_OPS:
            for a in n.args:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    weights.setdefault(a.target, op)
    return {"conv_groups": conv_groups, "group_norm_groups": gn_groups, "weights": weights}


def _named_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def layer_sparsity(module: nn.Module) -> list[dict[str, Any]]:
    """Per conv/linear weight of ``module``: its shape and the fraction of exactly-zero weights.

    Weights are found from the graph of a GraphModule (the second argument of conv/linear ops); for other
    modules, the ``weight`` of every ``nn.Conv*``/``nn.Linear``."""
    rows: list[dict[str, Any]] = []
    facts = graph_facts(module)["weights"]
    if facts:
        items = [(n, op, _named_tensor(module, n)) for n, op in facts.items()]
    else:
        items = [(f"{mn}.weight" if mn else "weight", type(m).__name__, m.weight) for mn, m in module.named_modules()
                 if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(m.weight, torch.Tensor)]
    for name, op, t in items:
        if t is None or t.dim() < 2 or t.is_meta:
            continue
        zeros = int((t.detach() == 0).sum())
        rows.append({"name": name, "op": op, "shape": list(t.shape), "numel": t.numel(), "zeros": zeros,
                     "sparsity": zeros / max(t.numel(), 1)})
    return rows
