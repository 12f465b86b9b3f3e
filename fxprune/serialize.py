"""Save, load and replay compiled (pruned) programs (latency and ONNX helpers: :mod:`fxprune.latency`).

    fxprune.save(out, "pruned/")              # out = fxprune.compile(...)
    out2 = fxprune.load("pruned/")            # a Compiled, in a fresh process, without the model's class
    model = fxprune.replay(MyNet(), "pruned/")  # your own class, shrunk in place of a copy, saved weights loaded

A save folder holds:

* ``program.pt2``: the shrunk GraphModule re-exported with ``torch.export`` (dynamic batch when the compiled
  program has one) and written with ``torch.export.save``; :func:`load` gives it back as ``Compiled.module``.
* ``weights.pt``: every parameter and buffer of the pruned module by its qualified name (the names of the
  original model); ``inputs.pt`` / ``outputs.pt``: the example inputs and the pruned module's outputs on them.
  Plain tensor containers only: read back with ``torch.load(..., weights_only=True)``.
* ``keep.json``: for each parameter the pruning resized, its original and pruned shape and, per dim, the
  original indices that survive (``null`` for dims left whole). Found by matching the pruned tensor's slices
  against the original model's (exact, because Shrink only selects); ``status`` is ``exact``, ``ambiguous``
  (equal slices, e.g. untrained BatchNorm ones, made the choice arbitrary) or ``unmatched`` (a pass changed the
  values). :func:`replay` with ``weights="model"`` slices your model's own weights with these indices.
* ``manifest.json`` (format, versions, model class, conv/GroupNorm group counts), ``recipe.yaml`` (the pipeline),
  ``history.json`` (every pass with its options and stats), ``report.json`` (the report plus recipe, per-layer
  sparsity and anything passed as ``extra``), ``report.md`` and ``report.png`` (:mod:`fxprune.plot`).

Safety: nothing here unpickles arbitrary objects. ``torch.load`` always runs with ``weights_only=True``;
``program.pt2`` is refused if it carries pickled Python objects (custom/opaque constants), and while
``torch.export.load`` reads it, ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` keeps torch's own fallbacks weights-only.
Only load folders you trust all the same: a program is code that runs.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import warnings
import zipfile
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .errors import ExportError, InputError, LoadError
from .records import ShrinkRecord, compose_kept_indices

__all__ = ["save", "load", "replay", "layer_sparsity", "report_from_dict",
           "read_report", "FORMAT_VERSION"]

FORMAT_VERSION = 1
FILES = {
    "program": "program.pt2", "weights": "weights.pt", "inputs": "inputs.pt", "outputs": "outputs.pt",
    "keep": "keep.json", "manifest": "manifest.json", "recipe": "recipe.yaml", "history": "history.json",
    "report": "report.json", "markdown": "report.md", "plot": "report.png",
}
_MATCH_MAX_NUMEL = 16_000_000  # larger tensors are not index-matched (memory); their keep entry says so
_CONV_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "_convolution"}
_LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "bmm", "baddbmm"}


# ================================================================================================ small helpers
def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 64 else f"Tensor{tuple(x.shape)}"
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def _write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=indent) + "\n")


def _versions() -> dict[str, str]:
    from . import __version__

    return {"fxprune": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _out_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _close(ref: Sequence[torch.Tensor], got: Sequence[torch.Tensor], rtol: float = 1e-4) -> tuple[bool, float]:
    """Same number of leaves and shapes, and ``max|ref - got| <= rtol * max(1, max|ref|)`` for every leaf."""
    if len(ref) != len(got):
        return False, float("inf")
    worst = 0.0
    for a, b in zip(ref, got):
        if tuple(a.shape) != tuple(b.shape):
            return False, float("inf")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return False, float("inf")
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        d = float((a64 - b64).abs().max()) if a.numel() else 0.0
        scale = max(1.0, float(a64.abs().max())) if a.numel() else 1.0
        worst = max(worst, d)
        if d > rtol * scale or d != d:
            return False, worst
    return True, worst


def _run(module: Any, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return module(*args, **kwargs)


def _safe_torch_load(path: Path) -> Any:
    if not path.exists():
        raise LoadError(f"{path} is missing", fix="pass a folder written by fxprune.save / `fxprune compile`")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"cannot read {path} as plain tensors (weights_only=True): {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}",
                        fix="the file is damaged or was not written by fxprune.save") from e


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _export_load(path: Path) -> Any:
    """``torch.export.load`` restricted to tensor data: refuse pickled objects, force weights-only loads."""
    if not path.exists():
        raise LoadError(f"{path} is missing", fix="pass a folder written by fxprune.save / `fxprune compile`")
    try:
        from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX
        prefixes = (CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)
    except ImportError:  # pragma: no cover - other torch versions
        prefixes = ("custom_obj_", "opaque_obj_")
    try:
        with zipfile.ZipFile(path) as z:
            bad = [n for n in z.namelist() if "/constants/" in n and os.path.basename(n).startswith(prefixes)]
    except zipfile.BadZipFile as e:
        raise LoadError(f"{path} is not a torch.export archive ({e})") from e
    if bad:
        raise LoadError(f"{path} holds pickled Python objects ({', '.join(bad[:3])}); fxprune refuses to load them",
                        fix="re-save the program from a module without custom script/opaque objects")
    try:
        with _env("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except Exception as e:
        raise LoadError(f"torch.export.load({str(path)!r}) failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}",
                        fix=f"the program was saved by torch {_saved_torch(path.parent)}; load it with the same "
                            f"torch version (this is {torch.__version__})") from e


def _saved_torch(d: Path) -> str:
    try:
        return json.loads((d / FILES["manifest"]).read_text())["versions"]["torch"]
    except Exception:  # noqa: BLE001
        return "?"


# ================================================================================================ graph facts
def _target_name(node: fx.Node) -> str:
    t = node.target
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0]


def _attr_arg(node: fx.Node, i: int, key: str) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key)


def graph_facts(module: nn.Module) -> dict[str, Any]:
    """From a GraphModule's graph: conv weights with their ``groups``, GroupNorm weights with ``num_groups``,
    and which op consumes each conv/linear weight (for per-layer sparsity)."""
    conv_groups: dict[str, int] = {}
    gn_groups: dict[str, int] = {}
    weights: dict[str, str] = {}
    graph = getattr(module, "graph", None)
    if graph is None:
        return {"conv_groups": conv_groups, "group_norm_groups": gn_groups, "weights": weights}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        op = _target_name(n)
        if op in _CONV_OPS:
            w = _attr_arg(n, 1, "weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                weights[w.target] = op
                if op == "convolution":
                    g = _attr_arg(n, 8, "groups")
                elif op == "_convolution":
                    g = _attr_arg(n, 8, "groups")
                else:
                    g = _attr_arg(n, 7 if op.startswith("conv_transpose") else 6, "groups")
                conv_groups[w.target] = int(g) if isinstance(g, int) else 1
        elif op == "linear":
            w = _attr_arg(n, 1, "weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                weights[w.target] = op
        elif op in ("group_norm", "native_group_norm"):
            g = _attr_arg(n, 1, "num_groups") if op == "group_norm" else _attr_arg(n, 6, "group")
            w = _attr_arg(n, 2, "weight") if op == "group_norm" else _attr_arg(n, 1, "weight")
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


# ================================================================================================ keep indices
def _fingerprints(t: torch.Tensor, dims: list[int]) -> np.ndarray:
    """An exact uint64 fingerprint of every slice of ``t`` indexed by ``dims`` (shape: ``t.shape[dims]``)."""
    x = t.detach().cpu()
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    others = [d for d in range(x.dim()) if d not in dims]
    x = x.permute(*dims, *others).contiguous().reshape(*[t.shape[d] for d in dims], -1)
    itemsize = x.element_size()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    bits = x.view(view).numpy().astype(np.int64).view(np.uint64)
    n = bits.shape[-1]
    w = np.random.default_rng(12345).integers(1, 2 ** 62, size=n, dtype=np.int64).view(np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (bits * w).sum(axis=-1, dtype=np.uint64) + np.uint64(n)


def _match_keep(orig: torch.Tensor, new: torch.Tensor) -> tuple[list[list[int] | None] | None, str]:
    """Per dim of ``orig``, the indices selected to give ``new`` (None for whole dims), and a status."""
    if orig.dim() != new.dim():
        return None, "unmatched"
    changed = [d for d in range(orig.dim()) if orig.shape[d] != new.shape[d]]
    if not changed:
        return [None] * orig.dim(), "unchanged"
    if any(new.shape[d] > orig.shape[d] for d in changed):
        return None, "unmatched"
    if orig.numel() > _MATCH_MAX_NUMEL or orig.is_meta or new.is_meta:
        return None, "skipped"
    fo, fn = _fingerprints(orig, changed), _fingerprints(new, changed)
    flat = fo.ravel()
    uniq, first, counts = np.unique(flat, return_index=True, return_counts=True)
    fnf = fn.ravel()
    pos = np.clip(np.searchsorted(uniq, fnf), 0, len(uniq) - 1)
    hit = (uniq[pos] == fnf) & (counts[pos] == 1)
    src = np.unravel_index(first[pos], fo.shape)  # original multi-index per pruned slice (valid where hit)
    dst = np.unravel_index(np.arange(fnf.size), fn.shape)
    keep: list[list[int] | None] = [None] * orig.dim()
    status = "exact"
    for k, d in enumerate(changed):
        idx = np.full(new.shape[d], -1, dtype=np.int64)
        s, t_ = src[k][hit], dst[k][hit]
        if s.size:
            idx[t_] = s
            if np.any(idx[t_] != s):  # two pruned slices claim different sources: not a selection
                return None, "unmatched"
        if (idx < 0).any():
            if len(changed) != 1:
                return None, "ambiguous"
            idx = _greedy_subsequence(flat, fnf)
            if idx is None:
                return None, "unmatched"
            status = "ambiguous"
        keep[d] = [int(i) for i in idx]
    sel = orig.detach()
    for d, k in enumerate(keep):
        if k is not None:
            sel = sel.index_select(d, torch.tensor(k, dtype=torch.long))
    if not torch.equal(sel, new.detach().to(sel.dtype)):
        return None, "unmatched"
    return keep, status


def _greedy_subsequence(orig_fp: np.ndarray, new_fp: np.ndarray) -> np.ndarray | None:
    out, i = [], 0
    for v in new_fp:
        while i < len(orig_fp) and orig_fp[i] != v:
            i += 1
        if i == len(orig_fp):
            return None
        out.append(i)
        i += 1
    return np.asarray(out, dtype=np.int64)


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for n, t in module.named_parameters(remove_duplicate=False):
        out[n] = t
    for n, t in module.named_buffers(remove_duplicate=False):
        out.setdefault(n, t)
    return out


def kept_indices(compiled: Any) -> dict[str, Any]:
    """``keep.json``'s content for ``compiled``: which original indices each resized parameter keeps."""
    final = _named_tensors(compiled.module)
    program = getattr(compiled, "program", None)
    shrinks = program.records_of(ShrinkRecord) if program is not None else []
    source = getattr(program, "source", None) if program is not None else None
    params: dict[str, Any] = {}
    if shrinks:
        first_shapes = {}
        for rec in shrinks:
            for n, shp in rec.original_shapes.items():
                first_shapes.setdefault(n, shp)
        for name, dims in compose_kept_indices(shrinks).items():
            params[name] = {"orig_shape": list(first_shapes.get(name, ())),
                            "shape": list(final[name].shape) if name in final else None,
                            "keep": [None if k is None else [int(i) for i in k] for k in dims], "status": "recorded"}
        return {"format": FORMAT_VERSION, "method": "recorded", "params": params}
    if source is None:
        return {"format": FORMAT_VERSION, "method": "none (no original model)", "params": {}}
    orig = _named_tensors(source)
    for name, new in final.items():
        o = orig.get(name)
        if o is None or tuple(o.shape) == tuple(new.shape):
            continue
        keep, status = _match_keep(o, new)
        params[name] = {"orig_shape": list(o.shape), "shape": list(new.shape), "keep": keep, "status": status}
    if any(v["status"] == "ambiguous" for v in params.values()):
        with contextlib.suppress(Exception):  # best effort: the indices stay marked ambiguous otherwise
            _resolve_by_groups(compiled, params, orig, final)
    return {"format": FORMAT_VERSION, "method": "value matching against the original model", "params": params}


def _resolve_by_groups(compiled: Any, params: dict[str, Any], orig: dict[str, torch.Tensor],
                       final: dict[str, torch.Tensor]) -> None:
    """Coupled dims keep the same channels: an ambiguous dim (equal slices, e.g. an untrained BatchNorm) takes the
    indices of an exactly matched dim in the same group of the pruned graph (the selection is then re-checked)."""
    gs = compiled.program.groups
    for g in gs:
        members = [m for m in g.members if m.param in params and len(m.coords) == g.size
                   and np.array_equal(m.coords, np.arange(g.size))]
        ref = None
        for m in members:
            e = params[m.param]
            if e["status"] == "exact" and e["keep"] is not None and e["keep"][m.dim] is not None:
                ref = (e["orig_shape"][m.dim], e["keep"][m.dim])
                break
        if ref is None:
            continue
        for m in members:
            e = params[m.param]
            if e["status"] != "ambiguous" or e["orig_shape"][m.dim] != ref[0] or e["shape"][m.dim] != len(ref[1]):
                continue
            keep = list(e["keep"])
            keep[m.dim] = list(ref[1])
            sel = orig[m.param].detach()
            for d, k in enumerate(keep):
                if k is not None:
                    sel = sel.index_select(d, torch.tensor(k, dtype=torch.long))
            if torch.equal(sel, final[m.param].detach().to(sel.dtype)):
                e["keep"], e["status"] = keep, "exact"


# ================================================================================================ reports
def report_dict(compiled: Any, recipe: list[dict[str, Any]] | None = None,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``report.json``'s content: the report, the recipe, per-layer sparsity, versions and ``extra``."""
    from .recipe import recipe_from_history

    d = compiled.report.as_dict()
    d["recipe"] = recipe if recipe is not None else recipe_from_history(compiled.program.history)
    rows = layer_sparsity(compiled.module)
    source = getattr(compiled.program, "source", None)
    if source is not None:
        orig = _named_tensors(source)
        for r in rows:
            o = orig.get(r["name"])
            if o is not None:
                r["orig_shape"] = list(o.shape)
                r["kept_fraction"] = r["numel"] / max(o.numel(), 1)
    d["layer_sparsity"] = rows
    d["versions"] = _versions()
    for k, v in (extra or {}).items():
        d[k] = v
    return _jsonable(d)


def report_from_dict(data: Mapping[str, Any]) -> Any:
    """A :class:`~fxprune.report.Report` from ``report.json``'s content (unknown keys are ignored)."""
    from .report import GroupRow, Report

    fields = {k: v for k, v in data.items() if k in Report.__dataclass_fields__ and k != "groups"}
    missing = [k for k, f in Report.__dataclass_fields__.items()
               if k not in fields and k != "groups" and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise LoadError(f"report.json lacks {missing}", fix="pass a folder written by fxprune")
    groups = []
    for g in data.get("groups", []):
        row = {k: v for k, v in g.items() if k in GroupRow.__dataclass_fields__}
        if isinstance(row.get("importance"), list):
            row["importance"] = tuple(row["importance"])
        groups.append(GroupRow(**row))
    return Report(groups=groups, **fields)


def read_report(folder: str | os.PathLike) -> dict[str, Any]:
    """The content of ``folder/report.json`` (LoadError if absent or not JSON)."""
    p = Path(folder) / FILES["report"]
    if not p.exists():
        raise LoadError(f"no report.json in {str(folder)!r}",
                        fix="pass the output folder of `fxprune demo` / `fxprune compile` / fxprune.save")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{p} is not valid JSON: {e}") from e


# ================================================================================================ save
def _reexport(module: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> tuple[Any, bool]:
    from .trace import _batch_dynamic_shapes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamic:
            try:
                return torch.export.export(module, args, kwargs, strict=False,
                                           dynamic_shapes=_batch_dynamic_shapes(args, kwargs)), True
            except Exception:  # noqa: BLE001 - fall back to the static program
                pass
        return torch.export.export(module, args, kwargs, strict=False), False


def save(compiled: Any, folder: str | os.PathLike, *, recipe: Sequence[Any] | None = None,
         extra: Mapping[str, Any] | None = None, plot: bool = True, check: bool = True,
         progress: Any = None) -> Path:
    """Write ``compiled`` (the result of :func:`fxprune.compile`) to ``folder`` (created if needed); see the
    module doc for the files. ``recipe``: the passes (or recipe dicts) that produced it, default: rebuilt from the
    program's history. ``extra``: more keys for report.json (e.g. ONNX and latency results). ``plot``: write
    report.png (skipped with a note when matplotlib is missing). ``check``: load program.pt2 back and require
    the same outputs as ``compiled.module`` on the example inputs (else :class:`ExportError`).
    Returns the folder."""
    from .pass_manager import Pass
    from .recipe import dump_recipe, recipe_from_history, save_recipe

    module = getattr(compiled, "module", None)
    program = getattr(compiled, "program", None)
    if not isinstance(module, nn.Module) or program is None:
        raise InputError(f"save() needs the result of fxprune.compile, got {type(compiled).__name__}",
                         fix="out = fxprune.compile(model, inputs, passes); fxprune.save(out, 'dir')")
    if any(t.is_meta for t in _named_tensors(module).values()):
        raise InputError("the compiled program lives on the meta device: it has no weights to save",
                         fix="compile a model with real weights to save it (meta models are for analysis)")
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    args, kwargs = tuple(program.args), dict(program.kwargs)

    if recipe is None:
        rec = recipe_from_history(program.history)
    else:
        items = list(recipe)
        rec = dump_recipe(items) if items and isinstance(items[0], Pass) else [dict(i) for i in items]

    outputs = _run(module, args, kwargs)
    ref = _out_leaves(outputs)
    dynamic = bool(getattr(compiled.report, "dynamic_batch", False))
    try:
        ep, dynamic_saved = _reexport(module, args, kwargs, dynamic)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.save(ep, str(d / FILES["program"]))
    except Exception as e:
        raise ExportError(f"cannot export the pruned module with torch.export: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if check:
        back = _export_load(d / FILES["program"]).module()
        ok, diff = _close(ref, _out_leaves(_run(back, args, kwargs)))
        if not ok:
            raise ExportError(f"{d / FILES['program']} does not reproduce the pruned module's outputs "
                              f"(max abs diff {diff:.3g})", fix="report this model to fxprune")

    tensors = {n: t.detach().cpu().clone() for n, t in _named_tensors(module).items()}
    torch.save(tensors, d / FILES["weights"])
    torch.save({"args": args, "kwargs": kwargs}, d / FILES["inputs"])
    torch.save([t.detach().cpu() for t in ref], d / FILES["outputs"])
    _write_json(d / FILES["keep"], kept_indices(compiled), indent=None)
    facts = graph_facts(module)
    source = program.source
    manifest = {
        "format": FORMAT_VERSION,
        "versions": _versions(),
        "model_class": type(source).__name__ if source is not None else compiled.report.model,
        "model_module": type(source).__module__ if source is not None else None,
        "dynamic_batch": dynamic_saved,
        "input_shapes": [list(t.shape) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)],
        "conv_groups": facts["conv_groups"],
        "group_norm_groups": facts["group_norm_groups"],
        "files": {k: v for k, v in FILES.items()},
    }
    _write_json(d / FILES["manifest"], manifest)
    header = (f"fxprune recipe for {manifest['model_class']} (fxprune {manifest['versions']['fxprune']}); "
              f"reload with fxprune.recipe.load_recipe")
    save_recipe(rec, d / FILES["recipe"], header=header)
    _write_json(d / FILES["history"], program.history)
    rep = report_dict(compiled, rec, {"dynamic_batch_saved": dynamic_saved, **(extra or {})})
    _write_json(d / FILES["report"], rep)
    from . import plot as _plot

    png = None
    if plot:
        try:
            png = _plot.plot_report(rep, d / FILES["plot"])
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the saved program
            rep.setdefault("notes", []).append(f"no plot: {type(e).__name__}: {e}")
            _write_json(d / FILES["report"], rep)
    _plot.write_markdown(rep, d / FILES["markdown"], plot=png.name if png else None)
    return d


# ================================================================================================ load
def load(folder: str | os.PathLike, *, check: bool = True) -> Any:
    """A :class:`~fxprune.Compiled` from a folder written by :func:`save`, in any process: ``.module`` is the
    pruned program (a GraphModule from ``torch.export.load(...).module()``), ``.report`` the saved report,
    ``.program`` a Program over it (example inputs, history; ``source`` is None). ``check``: the module must
    reproduce the saved outputs on the saved inputs (else :class:`LoadError`)."""
    from .compile import Compiled
    from .program import Program, Stage

    d = Path(folder)
    if not d.is_dir():
        raise LoadError(f"{str(folder)!r} is not a folder", fix="pass the folder written by fxprune.save")
    manifest = _read_manifest(d)
    ep = _export_load(d / FILES["program"])
    module = ep.module()
    inputs = _safe_torch_load(d / FILES["inputs"])
    if not isinstance(inputs, dict) or "args" not in inputs:
        raise LoadError(f"{d / FILES['inputs']} does not hold example inputs")
    args, kwargs = tuple(inputs["args"]), dict(inputs.get("kwargs") or {})
    if check:
        ref = _safe_torch_load(d / FILES["outputs"])
        try:
            got = _out_leaves(_run(module, args, kwargs))
        except Exception as e:
            raise LoadError(f"the loaded program fails on its saved inputs: {type(e).__name__}: {e}") from e
        ok, diff = _close(list(ref), got)
        if not ok:
            raise LoadError(f"the loaded program does not reproduce the saved outputs (max abs diff {diff:.3g})")
    rep = report_from_dict(read_report(d))
    history = json.loads((d / FILES["history"]).read_text()) if (d / FILES["history"]).exists() else []
    module.meta["fxprune_dynamic_batch"] = bool(manifest.get("dynamic_batch"))
    module.meta["fxprune_tracer"] = rep.tracer
    module.meta["fxprune_loaded_from"] = str(d)
    program = Program(module, args, kwargs, history=history, source=None, stage=Stage.SHRUNK)
    return Compiled(module, rep, program)


def _read_manifest(d: Path) -> dict[str, Any]:
    p = d / FILES["manifest"]
    if not p.exists():
        raise LoadError(f"{str(d)!r} has no {FILES['manifest']}: not a folder written by fxprune.save",
                        fix="save with fxprune.save(out, dir) or `fxprune compile ... --out dir`")
    m = json.loads(p.read_text())
    if int(m.get("format", 0)) > FORMAT_VERSION:
        raise LoadError(f"{d} uses save format {m.get('format')}, this fxprune reads up to {FORMAT_VERSION}",
                        fix="upgrade fxprune")
    return m


# ================================================================================================ replay
_HEAD_ATTRS = ("heads", "num_heads", "n_heads", "num_attention_heads", "kv_heads", "num_kv_heads",
               "num_key_value_heads", "n_kv_heads", "head_dim", "head_size", "attention_head_size")


def _update_conv(m: nn.Module, name: str, facts: dict[str, Any], old: dict[str, tuple]) -> None:
    w = m.weight
    groups = facts["conv_groups"].get(f"{name}.weight" if name else "weight")
    if groups is None:
        og = m.groups
        if og == 1:
            groups = 1
        elif og == m.in_channels and (m.out_channels % og == 0):  # depthwise: groups follow the channels
            mult = m.out_channels // og if not m.transposed else 1
            groups = (w.shape[0] // mult) if not m.transposed else w.shape[0]
        else:
            groups = og
    m.groups = int(groups)
    if m.transposed:
        m.in_channels, m.out_channels = int(w.shape[0]), int(w.shape[1] * m.groups)
    else:
        m.out_channels, m.in_channels = int(w.shape[0]), int(w.shape[1] * m.groups)


def _update_module(m: nn.Module, name: str, facts: dict[str, Any]) -> bool:
    """Set the size attributes of a standard module from its (resized) tensors. False: type not handled."""
    if isinstance(m, nn.modules.conv._ConvNd):
        _update_conv(m, name, facts, {})
        return True
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = int(m.weight.shape[0]), int(m.weight.shape[1])
        return True
    if isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
        t = m.weight if m.weight is not None else m.running_mean
        m.num_features = int(t.shape[0])
        return True
    if isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            m.normalized_shape = tuple(int(s) for s in m.weight.shape)
        return True
    if isinstance(m, nn.GroupNorm):
        c = int(m.weight.shape[0])
        g = facts["group_norm_groups"].get(f"{name}.weight" if name else "weight", m.num_groups)
        if c % g:
            raise LoadError(f"GroupNorm {name!r}: {c} channels are not divisible into {g} groups")
        m.num_channels, m.num_groups = c, int(g)
        return True
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        m.num_embeddings, m.embedding_dim = int(m.weight.shape[0]), int(m.weight.shape[1])
        return True
    if isinstance(m, nn.PReLU):
        m.num_parameters = int(m.weight.numel())
        return True
    if type(m).__name__.lower().endswith("rmsnorm"):
        for attr in ("normalized_shape", "dim", "hidden_size"):
            v = getattr(m, attr, None)
            if isinstance(v, int):
                setattr(m, attr, int(m.weight.shape[-1]))
            elif isinstance(v, tuple):
                setattr(m, attr, tuple(int(s) for s in m.weight.shape))
        return True
    return False


def replay(model: nn.Module, folder: str | os.PathLike, *, weights: str = "saved", inplace: bool = False,
           check: bool = True, rtol: float = 1e-4,
           adapters: Mapping[type, Callable[[nn.Module, str], None]] | None = None) -> nn.Module:
    """Re-apply a saved pruning to an instance of the original model class and return it (your class, pruned).

    Every parameter/buffer the pruning resized is replaced by one of the saved shape, and the size attributes of
    standard modules are updated (``nn.Conv*``: channels and ``groups``; ``nn.Linear``; BatchNorm/InstanceNorm;
    LayerNorm; GroupNorm; Embedding; PReLU; ``*RMSNorm``). ``weights="saved"`` (default) loads the saved pruned
    weights; ``weights="model"`` keeps ``model``'s own values, sliced with the indices of ``keep.json`` (apply a
    pruning plan to another checkpoint of the same architecture). ``inplace=False`` works on a deep copy.
    ``adapters``: ``{ModuleClass: fn(module, qualified_name)}`` to update attributes of your own module types
    after their tensors were resized (e.g. a head count).

    ``check``: run the result on the saved example inputs; with saved weights it must reproduce the saved
    outputs (``rtol`` relative to the output scale), with the model's weights the output shapes must match.
    Otherwise :class:`LoadError` names the modules whose attributes fxprune could not update (custom modules
    owning resized tensors, attention modules with head counts): pruning that changes a head count or a
    head dim generally cannot be replayed into a class whose forward hard-codes them; use :func:`load`.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"replay needs an nn.Module instance, got {type(model).__name__}")
    if weights not in ("saved", "model"):
        raise InputError(f"weights must be 'saved' or 'model', got {weights!r}")
    d = Path(folder)
    manifest = _read_manifest(d)
    want_cls = manifest.get("model_class")
    if want_cls and type(model).__name__ != want_cls:
        raise LoadError(f"{d} was saved from a {want_cls}, got a {type(model).__name__}",
                        fix=f"pass a fresh instance of {want_cls} built with the same configuration")
    saved: dict[str, torch.Tensor] = _safe_torch_load(d / FILES["weights"])
    keep = json.loads((d / FILES["keep"]).read_text()).get("params", {}) if weights == "model" else {}
    if not inplace:
        model = copy.deepcopy(model)
    facts = {"conv_groups": manifest.get("conv_groups", {}), "group_norm_groups": manifest.get("group_norm_groups", {})}

    current = _named_tensors(model)
    missing = [n for n in current if n not in saved]
    if missing:
        raise LoadError(f"the saved program has no tensor for {len(missing)} of the model's parameters/buffers "
                        f"(e.g. {missing[:3]})", fix=f"pass an instance of {want_cls} with the same configuration")
    extra = [n for n in saved if n not in current]
    if extra:
        raise LoadError(f"the model lacks {len(extra)} saved tensors (e.g. {extra[:3]})",
                        fix=f"pass an instance of {want_cls} with the same configuration")

    replaced: dict[int, torch.Tensor] = {}  # id(old) -> new, so tied tensors stay tied
    resized_modules: dict[str, nn.Module] = {}
    with torch.no_grad():
        for mname, mod in model.named_modules(remove_duplicate=False):
            for kind, store in (("param", mod._parameters), ("buffer", mod._buffers)):
                for attr, old in list(store.items()):
                    if old is None:
                        continue
                    full = f"{mname}.{attr}" if mname else attr
                    s = saved[full]
                    if id(old) in replaced:
                        store[attr] = replaced[id(old)]
                        if tuple(s.shape) != tuple(old.shape):
                            resized_modules[mname] = mod
                        continue
                    resized = tuple(s.shape) != tuple(old.shape)
                    if weights == "saved":
                        val = s.to(dtype=old.dtype, device=old.device)
                    elif resized:
                        entry = keep.get(full)
                        if not entry or entry.get("keep") is None:
                            raise LoadError(f"{full}: the saved folder has no kept indices for it "
                                            f"({(entry or {}).get('status', 'absent')})",
                                            fix="use weights='saved'")
                        val = old.detach()
                        for dim, k in enumerate(entry["keep"]):
                            if k is not None:
                                val = val.index_select(dim, torch.tensor(k, dtype=torch.long, device=old.device))
                        if tuple(val.shape) != tuple(s.shape):
                            raise LoadError(f"{full}: slicing gives {tuple(val.shape)}, the saved program has "
                                            f"{tuple(s.shape)}")
                    else:
                        val = old.detach()
                    if not resized and weights == "saved":
                        old.copy_(val)
                        replaced[id(old)] = old
                        continue
                    if not resized:
                        replaced[id(old)] = old
                        continue
                    new = (nn.Parameter(val.clone(), requires_grad=old.requires_grad) if isinstance(old, nn.Parameter)
                           else val.clone())
                    store[attr] = new
                    replaced[id(old)] = new
                    resized_modules[mname] = mod
        unhandled = []
        for mname, mod in resized_modules.items():
            fn = next((f for c, f in (adapters or {}).items() if isinstance(mod, c)), None)
            if fn is not None:
                fn(mod, mname)
            elif not _update_module(mod, mname, facts):
                unhandled.append(f"{mname or '(root)'} ({type(mod).__name__})")
    heads = [f"{n} ({type(m).__name__}: " + ", ".join(f"{a}={getattr(m, a)}" for a in _HEAD_ATTRS
                                                       if isinstance(getattr(m, a, None), int)) + ")"
             for n, m in model.named_modules()
             if any(isinstance(getattr(m, a, None), int) for a in _HEAD_ATTRS)
             and any(k == n or k.startswith(n + ".") for k in resized_modules)]

    if check:
        inputs = _safe_torch_load(d / FILES["inputs"])
        args, kwargs = tuple(inputs["args"]), dict(inputs.get("kwargs") or {})
        ref = list(_safe_torch_load(d / FILES["outputs"]))
        suspects = unhandled + heads
        hint = (f"; fxprune could not update: {', '.join(suspects[:6])}" if suspects else "")
        was = model.training
        model.eval()
        try:
            got = _out_leaves(_run(model, args, kwargs))
        except Exception as e:
            raise LoadError(f"the replayed {type(model).__name__} fails on the saved example inputs: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}",
                            fix="pass adapters={YourModule: fn} to update their attributes, or use fxprune.load"
                            ) from e
        finally:
            model.train(was)
        if weights == "saved":
            ok, diff = _close(ref, got, rtol)
        else:
            ok, diff = (len(ref) == len(got) and all(a.shape == b.shape for a, b in zip(ref, got))), 0.0
        if not ok:
            raise LoadError(f"the replayed {type(model).__name__} does not reproduce the saved program "
                            f"(max abs diff {diff:.3g}){hint}",
                            fix="pass adapters={YourModule: fn} to update their attributes, or use fxprune.load")
    elif unhandled:
        warnings.warn(f"replay: module types fxprune does not know were resized: {', '.join(unhandled[:6])}",
                      stacklevel=2)
    return model
