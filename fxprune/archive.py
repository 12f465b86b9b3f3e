"""Save and load compiled (pruned) programs: the save folder. Replay onto your own class: :mod:`fxprune.replay`.

    out.save("pruned/")                       # = fxprune.archive.save(out, "pruned/"); out = fxprune.compile(...)
    out2 = fxprune.load("pruned/")            # a Compiled, in a fresh process, without the model's class
    model = fxprune.replay(MyNet(), "pruned/")  # your own class with the pruned shapes and the saved weights

A save folder holds:

* ``program.pt2``: the shrunk GraphModule re-exported with ``torch.export`` (the compiled program's dynamic dims:
  batch, sequence length; the batch alone or static shapes where torch.export refuses them) and written with
  ``torch.export.save``; :func:`load` gives it back as ``Compiled.module``, whose inputs are checked with
  fxprune's readable errors (a dim the program fixes is named, not torch's bare guard failure).
* ``weights.pt``: every parameter and buffer of the pruned module by its qualified name (the names of the
  original model, tied tensors under each of their names); ``inputs.pt`` / ``outputs.pt``: the example inputs
  and the pruned module's outputs on them. Plain tensor containers, read with ``torch.load(weights_only=True)``.
* ``keep.json``: for each parameter/buffer the pruning resized (under every name a tied tensor has), its original
  and pruned shape and, per dim, the original indices that survive (``null`` for dims left whole), exactly as
  Shrink recorded them (``"method": "recorded"``; several Shrinks are composed). :func:`~fxprune.replay.replay`
  with ``weights="model"`` slices your model's own weights with these indices.
* ``recipe.yaml`` (the pipeline), ``history.json`` (every pass with its options and stats), ``report.json``
  (:meth:`fxprune.Report.to_dict` with ``"schema"``, plus recipe, per-layer sparsity and anything passed as
  ``extra``), ``report.md`` and ``report.png`` (:mod:`fxprune.plot`).
* ``manifest.json``, written last: format, versions, model class, conv/GroupNorm group counts, and ``files``:
  the name, size and SHA-256 of every file this save wrote. :func:`load` and ``replay`` check each file they read
  against it, so a folder that loads is always one complete save.

Saving is atomic: everything is written to a hidden temporary folder next to ``folder`` (``.NAME.fxprune-*``)
and renamed into place; an error or interruption while writing leaves ``folder`` as it was (an older save in it
still loads). Re-used folders: fxprune owns only the file names above. Saving into a folder that holds a previous
save replaces those files (and deletes the ones this save does not write, e.g. ``report.png`` with
``plot=False``); other files (``dense.onnx``, your notes) are left alone. A folder that holds one of those names
without a previous save's ``manifest.json`` is refused (:class:`~fxprune.errors.InputError`) instead of
overwritten.

Safety: nothing here unpickles Python objects. Every ``torch.load`` passes ``weights_only=True``; ``program.pt2``
is checked before ``torch.export.load`` sees it (from the same bytes in memory): only the entries a plain exported
program has, every payload a raw tensor (no pickled weights or constants, no custom/opaque objects, no compiled
AOTInductor libraries, sample inputs readable with ``weights_only=True``), and after loading every graph node must
call an ATen/registered operator, a higher-order operator or a symbolic-shape helper. No process-global state is
changed. Only load folders you trust all the same: a program is code that runs.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import math
import operator
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .compile import Compiled
from .errors import ExportError, InputError, LoadError
from .program import Program, Stage
from .records import ShrinkRecord, compose_kept_indices
from .report import Report, graph_facts, jsonable, named_tensors, report_json, versions

__all__ = ["save", "load", "read_report", "kept_indices", "load_program", "SaveFolder", "FILES", "FORMAT_VERSION"]

FORMAT_VERSION = 2  # 2: manifest.json written last with the SHA-256 of every file; 1: no checksums (still read)
FILES = {
    "program": "program.pt2", "weights": "weights.pt", "inputs": "inputs.pt", "outputs": "outputs.pt",
    "keep": "keep.json", "manifest": "manifest.json", "recipe": "recipe.yaml", "history": "history.json",
    "report": "report.json", "markdown": "report.md", "plot": "report.png",
}
_OWNED = frozenset(FILES.values())
_RESAVE = "the folder is damaged or was not written by fxprune.save: save the compiled program again"


# ================================================================================================ small helpers
def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:300]}" if s else type(e).__name__


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


# ================================================================================================ reading a folder
class SaveFolder:
    """A save folder being read: its validated manifest, and reads of its files that are checked against the
    manifest's checksums and turned into :class:`LoadError` (naming file, field and a fix) when malformed."""

    def __init__(self, folder: str | os.PathLike):
        d = Path(folder)
        if not d.is_dir():
            raise LoadError(f"{str(folder)!r} is not a folder" + (" (it is a file)" if d.exists() else ""),
                            fix="pass the folder written by fxprune.save / `fxprune compile --out DIR`")
        self.dir = d
        self.manifest = _read_manifest(d)
        self.format = int(self.manifest["format"])
        self.sums: dict[str, dict[str, Any]] | None = self.manifest["files"] if self.format >= 2 else None
        self._read: dict[str, tuple[int, str]] = {}

    def path(self, key: str) -> Path:
        return self.dir / FILES[key]

    def exists(self, key: str) -> bool:
        if self.sums is not None:
            return FILES[key] in self.sums
        return self.path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        """The file's bytes; their size and SHA-256 are kept for :meth:`verify` (content errors are reported
        first, by the typed readers; the checksum says whether the file belongs to this save)."""
        p = self.path(key)
        if p.is_dir():
            raise LoadError(f"{p} is a directory, not a file", fix=_RESAVE)
        if not p.is_file():
            raise LoadError(f"{p} is missing", fix=_RESAVE)
        data = p.read_bytes()
        self._read[p.name] = (len(data), _sha256(data))
        return data

    def verify(self) -> None:
        """Every file read so far must be the one manifest.json lists (format 2): else :class:`LoadError`."""
        if self.sums is None:
            return
        for name, (size, sha) in self._read.items():
            want = self.sums.get(name)
            if want is None:
                raise LoadError(f"{self.dir / name} is not listed in {FILES['manifest']}: it is not part of the save",
                                fix=_RESAVE)
            if size != want["bytes"] or sha != want["sha256"]:
                raise LoadError(f"{self.dir / name} does not match its checksum in {FILES['manifest']} (a save into "
                                f"this folder was interrupted, or the file was changed afterwards)", fix=_RESAVE)

    def json(self, key: str) -> Any:
        return _parse_json(self.read_bytes(key), self.path(key))

    def tensors(self, key: str) -> Any:
        p = self.path(key)
        try:
            return torch.load(io.BytesIO(self.read_bytes(key)), map_location="cpu", weights_only=True)
        except LoadError:
            raise
        except Exception as e:
            raise LoadError(f"cannot read {p} as plain tensors (torch.load with weights_only=True): "
                            f"{_first_line(e)}", fix=_RESAVE) from e

    # ---------------------------------------------------------------- typed reads
    def inputs(self) -> tuple[tuple, dict]:
        p = self.path("inputs")
        obj = self.tensors("inputs")
        if not isinstance(obj, dict) or not isinstance(obj.get("args"), (list, tuple)):
            raise LoadError(f"{p}: expected {{'args': [...], 'kwargs': {{...}}}}, got {type(obj).__name__}",
                            fix=_RESAVE)
        kwargs = obj.get("kwargs") or {}
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise LoadError(f"{p}: field 'kwargs' must map argument names to values, got {type(kwargs).__name__}",
                            fix=_RESAVE)
        args = tuple(obj["args"])
        leaves = tree_flatten((args, kwargs))[0]
        if not any(isinstance(t, torch.Tensor) for t in leaves):
            raise LoadError(f"{p}: the example inputs hold no tensor", fix=_RESAVE)
        return args, dict(kwargs)

    def outputs(self) -> list[torch.Tensor]:
        p = self.path("outputs")
        obj = self.tensors("outputs")
        if not isinstance(obj, (list, tuple)):
            raise LoadError(f"{p}: expected a list of tensors, got {type(obj).__name__}", fix=_RESAVE)
        for i, t in enumerate(obj):
            if not isinstance(t, torch.Tensor):
                raise LoadError(f"{p}: item {i} must be a tensor, got {type(t).__name__}", fix=_RESAVE)
        return list(obj)

    def weights(self) -> dict[str, torch.Tensor]:
        p = self.path("weights")
        obj = self.tensors("weights")
        if not isinstance(obj, dict):
            raise LoadError(f"{p}: expected a mapping of parameter names to tensors, got {type(obj).__name__}",
                            fix=_RESAVE)
        for k, t in obj.items():
            if not isinstance(k, str) or not isinstance(t, torch.Tensor):
                raise LoadError(f"{p}: entry {k!r} must be a tensor, got {type(t).__name__}", fix=_RESAVE)
        return obj

    def history(self) -> list[dict[str, Any]]:
        if not self.exists("history"):
            return []
        h = self.json("history")
        if not isinstance(h, list) or not all(isinstance(x, dict) for x in h):
            bad = type(h).__name__ if not isinstance(h, list) else next(type(x).__name__ for x in h
                                                                         if not isinstance(x, dict))
            raise LoadError(f"{self.path('history')}: expected a list of pass objects, got {bad}", fix=_RESAVE)
        return h

    def report(self) -> Report:
        return Report.from_dict(self.json("report"), source=str(self.path("report")))

    def keep(self, recorded_only: bool | None = None) -> dict[str, Any]:
        """keep.json's ``params``, every entry checked (shapes, integer indices in range, strictly increasing).
        ``recorded_only`` (default: format 2 folders): refuse entries whose status is not ``"recorded"``."""
        p = self.path("keep")
        data = self.json("keep")
        if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
            raise LoadError(f"{p}: expected an object with 'params' (an object by parameter name)", fix=_RESAVE)
        if recorded_only is None:
            recorded_only = self.format >= 2
        for name, entry in data["params"].items():
            check_keep_entry(name, entry, str(p), recorded_only=recorded_only)
        return data["params"]


def _parse_json(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON: {e}", fix=_RESAVE) from e


def _read_manifest(d: Path) -> dict[str, Any]:
    p = d / FILES["manifest"]
    if p.is_dir():
        raise LoadError(f"{p} is a directory, not a file", fix=_RESAVE)
    if not p.is_file():
        raise LoadError(f"{str(d)!r} has no {FILES['manifest']}: not a folder written by fxprune.save (or a save "
                        f"into it was interrupted)", fix="save with out.save(dir) or `fxprune compile ... --out dir`")
    m = _parse_json(p.read_bytes(), p)

    def bad(field: str, want: str) -> LoadError:
        return LoadError(f"{p}: field {field!r} must be {want}, got {m.get(field)!r:.80}", fix=_RESAVE)

    if not isinstance(m, dict):
        raise LoadError(f"{p}: expected a JSON object, got {type(m).__name__}", fix=_RESAVE)
    fmt = m.get("format")
    if not _is_int(fmt) or fmt < 1:
        raise bad("format", "a positive integer")
    if fmt > FORMAT_VERSION:
        raise LoadError(f"{d} uses save format {fmt}, this fxprune reads up to {FORMAT_VERSION}",
                        fix="upgrade fxprune")
    if m.get("model_class") is not None and not isinstance(m["model_class"], str):
        raise bad("model_class", "a class name")
    for field in ("conv_groups", "group_norm_groups"):
        v = m.setdefault(field, {})
        if not isinstance(v, dict) or not all(_is_int(g) and g >= 1 for g in v.values()):
            raise bad(field, "an object of positive integers by parameter name")
    if not isinstance(m.setdefault("dynamic_batch", False), bool):
        raise bad("dynamic_batch", "true or false")
    if fmt >= 2:
        files = m.get("files")
        ok = isinstance(files, dict) and all(
            name in _OWNED and isinstance(e, dict) and _is_int(e.get("bytes"))
            and isinstance(e.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])
            for name, e in files.items())
        if not ok:
            raise bad("files", f"an object {{file name: {{'bytes': int, 'sha256': hex}}}} over {sorted(_OWNED)}")
    return m


def check_keep_entry(name: str, entry: Any, where: str = "keep.json", *, recorded_only: bool = True) -> None:
    """Raise :class:`LoadError` naming ``name`` unless ``entry`` (one parameter of keep.json) is well formed:
    ``orig_shape`` non-negative ints, ``keep`` one item per dim, each ``null`` or strictly increasing integer
    indices within the dim, ``shape`` (when given) the kept counts, and (``recorded_only``) status ``recorded``."""
    def fail(what: str) -> LoadError:
        return LoadError(f"{where}: parameter {name!r}: {what}", fix=_RESAVE)

    if not isinstance(entry, dict):
        raise fail(f"expected an object, got {type(entry).__name__}")
    orig = entry.get("orig_shape")
    if not isinstance(orig, list) or not all(_is_int(s) and s >= 0 for s in orig):
        raise fail(f"'orig_shape' must be a list of non-negative integers, got {orig!r:.80}")
    if recorded_only and entry.get("status", "recorded") != "recorded":
        raise LoadError(f"{where}: parameter {name!r}: status {entry.get('status')!r}: the indices were not recorded "
                        f"by Shrink (a save of an older fxprune, which guessed them by matching values)",
                        fix="save the compiled program again with this fxprune, or replay with weights='saved'")
    keep = entry.get("keep")
    if keep is None and not recorded_only:
        return  # an older save could not find this parameter's indices; weights='saved' needs only the shapes
    if not isinstance(keep, list) or len(keep) != len(orig):
        raise fail(f"'keep' must be a list with one item per dim ({len(orig)}), got {keep!r:.80}")
    for d, k in enumerate(keep):
        if k is None:
            continue
        if not isinstance(k, list) or not all(_is_int(i) for i in k):
            raise fail(f"'keep[{d}]' must be null or a list of integer indices, got {k!r:.80}")
        bad = [i for i in k if not 0 <= i < orig[d]]
        if bad:
            raise fail(f"index {bad[0]} of dim {d} is out of range for size {orig[d]}")
        seen: set[int] = set()
        for i in k:
            if i in seen:
                raise fail(f"index {i} of dim {d} is listed twice")
            seen.add(i)
        if any(a >= b for a, b in zip(k, k[1:])):
            raise fail(f"the indices of dim {d} are not in increasing order")
    shape = entry.get("shape")
    if shape is not None:
        want = [s if k is None else len(k) for s, k in zip(orig, keep)]
        if shape != want:
            raise fail(f"'shape' {shape!r:.80} differs from the kept indices' {want}")


def read_report(folder: str | os.PathLike) -> dict[str, Any]:
    """The content of ``folder/report.json`` (a dict, checked with :meth:`Report.from_dict`; LoadError if absent
    or malformed). A folder without manifest.json (a lone report) is read without checksums."""
    d = Path(folder)
    p = d / FILES["report"]
    if not p.exists():
        raise LoadError(f"no {FILES['report']} in {str(folder)!r}",
                        fix="pass the output folder of `fxprune demo` / `fxprune compile` / fxprune.save")
    if (d / FILES["manifest"]).exists():
        f = SaveFolder(d)
        data = f.json("report")
        Report.from_dict(data, source=str(p))
        f.verify()
        return data
    else:
        if p.is_dir():
            raise LoadError(f"{p} is a directory, not a file", fix=_RESAVE)
        data = _parse_json(p.read_bytes(), p)
    Report.from_dict(data, source=str(p))
    return data


# ================================================================================================ program.pt2
_ALLOWED_META = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_PAYLOAD = re.compile(r"[A-Za-z0-9_.\-]+")


def _pt2_names() -> dict[str, Any]:
    from torch.export.pt2_archive import constants as c

    return {"models": c.MODELS_DIR, "weights_dir": c.WEIGHTS_DIR, "constants_dir": c.CONSTANTS_DIR,
            "weights_cfg": c.WEIGHTS_CONFIG_FILENAME_FORMAT, "constants_cfg": c.CONSTANTS_CONFIG_FILENAME_FORMAT,
            "sample_inputs": c.SAMPLE_INPUTS_FILENAME_FORMAT, "extra": c.EXTRA_DIR,
            "weight_prefix": c.WEIGHT_FILENAME_PREFIX, "tensor_prefix": c.TENSOR_CONSTANT_FILENAME_PREFIX}


def _check_pt2(data: bytes, path: Path) -> None:
    """Refuse ``program.pt2`` unless every entry ``torch.export.load`` would read is a raw tensor, JSON, or sample
    inputs that ``torch.load(weights_only=True)`` reads (so torch's pickle fallbacks never run)."""
    from torch.export.pt2_archive import PT2ArchiveReader

    fix = "re-save the program with fxprune.save from a module without custom (pickled) objects"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if "version" in z.namelist():  # torch's pre-2.8 layout, read through a pickle fallback
                raise LoadError(f"{path} uses torch's old archive layout, which fxprune does not load", fix=fix)
        reader = PT2ArchiveReader(io.BytesIO(data))
        records = set(reader.get_file_names())
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"{path} is not a torch.export archive: {_first_line(e)}", fix=_RESAVE) from e
    n = _pt2_names()
    models = sorted(r for r in records if r.startswith(n["models"]))
    if models != [n["models"] + "model.json"]:
        raise LoadError(f"{path} must hold exactly one program, {n['models']}model.json; it has {models[:4]}",
                        fix=fix)
    allowed = set(_ALLOWED_META) | set(models) | {n["sample_inputs"].format("model")}
    for kind, cfg_fmt, base, prefix in (("weights", n["weights_cfg"], n["weights_dir"], n["weight_prefix"]),
                                        ("constants", n["constants_cfg"], n["constants_dir"], n["tensor_prefix"])):
        cfg_name = cfg_fmt.format("model")
        if cfg_name not in records:
            raise LoadError(f"{path} lacks {cfg_name}", fix=_RESAVE)
        allowed.add(cfg_name)
        try:
            cfg = json.loads(reader.read_string(cfg_name))
        except Exception as e:
            raise LoadError(f"{path}: {cfg_name} is not valid JSON: {_first_line(e)}", fix=_RESAVE) from e
        entries = cfg.get("config") if isinstance(cfg, dict) else None
        if not isinstance(entries, dict):
            raise LoadError(f"{path}: {cfg_name} has no 'config' object", fix=_RESAVE)
        for fqn, meta in entries.items():
            where = f"{path}: {kind} entry {fqn!r} ({cfg_name})"
            if not isinstance(meta, dict):
                raise LoadError(f"{where} is not an object", fix=_RESAVE)
            if meta.get("use_pickle", False) is not False:
                raise LoadError(f"{where} is a pickled Python object (use_pickle); fxprune refuses to load pickled "
                                f"Python objects", fix=fix)
            pn = meta.get("path_name")
            if not isinstance(pn, str) or not pn.startswith(prefix) or not _PAYLOAD.fullmatch(pn):
                raise LoadError(f"{where}: payload {pn!r} is not a raw tensor file ({prefix}N); custom and opaque "
                                f"objects are pickled Python objects, which fxprune refuses to load", fix=fix)
            if not isinstance(meta.get("tensor_meta"), dict):
                raise LoadError(f"{where} has no tensor_meta", fix=_RESAVE)
            if base + pn not in records:
                raise LoadError(f"{where}: payload {base + pn} is missing", fix=_RESAVE)
            allowed.add(base + pn)
    extra = [r for r in records if r not in allowed and not r.startswith(n["extra"])]
    if extra:
        raise LoadError(f"{path} holds entries that are not part of a plain exported program (pickled Python objects, "
                        f"compiled libraries, ...): {', '.join(sorted(extra)[:4])}; fxprune refuses to load them",
                        fix=fix)
    sample = n["sample_inputs"].format("model")
    if sample in records:
        raw = reader.read_bytes(sample)
        if raw:
            try:
                obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            except Exception as e:
                raise LoadError(f"{path}: {sample} holds pickled Python objects, not plain tensors "
                                f"({_first_line(e)})", fix=fix) from e
            if not isinstance(obj, (tuple, dict)):
                raise LoadError(f"{path}: {sample} must hold a tuple or dict, got {type(obj).__name__}", fix=_RESAVE)


def _allowed_target(t: Any) -> bool:
    if isinstance(t, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return True
    try:
        from torch._export.serde.serialize import _SYM_OPS
    except ImportError:  # pragma: no cover - other torch versions
        _SYM_OPS = set()
    if t in _SYM_OPS or t is operator.getitem:
        return True
    return getattr(t, "__module__", None) == "math" and getattr(math, getattr(t, "__name__", ""), None) is t


def _check_graph(ep: Any, path: Path) -> None:
    """Every node of every graph must call an operator (ATen/registered op, higher-order op, symbolic-shape
    helper). A crafted ``models/model.json`` can name any callable reachable from ``torch`` (e.g.
    ``torch.serialization.os.system``) as a node target; torch's own verifier refuses those today, and this check
    keeps refusing them whatever verifier the archive asks for, before the module ever runs."""
    fix = "the program was not written by torch.export.save from an exported program; do not run it"
    for owner, gm in ep.graph_module.named_modules():
        if not isinstance(gm, fx.GraphModule):
            raise LoadError(f"{path}: submodule {owner!r} is a {type(gm).__name__}, not a graph", fix=fix)
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), fx.GraphModule):
                continue
            if node.op == "call_function" and _allowed_target(node.target):
                continue
            raise LoadError(f"{path}: node {node.name!r} calls {node.op} {node.target!r}, which is not an operator; "
                            f"fxprune refuses to load it", fix=fix)


def load_program(data: bytes, path: str | os.PathLike = FILES["program"]) -> Any:
    """``torch.export.load`` of ``program.pt2``'s bytes, refusing anything that is not plain tensors and operators
    (see the module doc); :class:`LoadError` otherwise. Returns the ExportedProgram."""
    path = Path(path)
    _check_pt2(data, path)
    _import_hf_output_types(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(io.BytesIO(data))
    except Exception as e:
        raise LoadError(f"torch.export.load({str(path)!r}) failed: {_first_line(e)}",
                        fix=f"the program was saved by torch {_saved_torch(path.parent)}; load it with the same "
                            f"torch version (this is {torch.__version__})") from e
    _check_graph(ep, path)
    return ep


_HF_NAME = re.compile(rb"transformers\.(?:[A-Za-z_][A-Za-z0-9_]*\.)+[A-Za-z_][A-Za-z0-9_]*")


def _import_hf_output_types(data: bytes) -> None:
    """A HuggingFace model's program returns a ``ModelOutput`` (e.g. ``CausalLMOutputWithPast``), which
    ``torch.export.load`` can rebuild only once transformers has registered that class as a pytree node, i.e. once
    the module that defines it is imported. Import the ``transformers.*`` modules whose classes the program names
    (only modules of the installed transformers package: no other name in the file is imported)."""
    names = {m.decode() for m in _HF_NAME.findall(data)}
    if not names or importlib.util.find_spec("transformers") is None:
        return
    for mod in sorted({n.rsplit(".", 1)[0] for n in names}):
        try:
            if importlib.util.find_spec(mod) is not None:
                importlib.import_module(mod)
        except (ImportError, ValueError):  # a class path, not a module: its parent was imported already
            continue


def _saved_torch(d: Path) -> str:
    try:
        return str(json.loads((d / FILES["manifest"]).read_text())["versions"]["torch"])
    except Exception:  # noqa: BLE001
        return "?"


# ================================================================================================ keep indices
def _alias_classes(compiled: Any) -> dict[str, list[str]]:
    """Name -> every name of the same tensor (tied / aliased parameters), in the pruned module and in the original
    model (their names are the same qualified names)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    modules = [compiled.module, getattr(compiled.program, "source", None)]
    for m in modules:
        if not isinstance(m, nn.Module):
            continue
        first: dict[int, str] = {}
        for name, t in named_tensors(m).items():
            find(name)
            if id(t) in first:
                parent[find(name)] = find(first[id(t)])
            else:
                first[id(t)] = name
    classes: dict[str, list[str]] = {}
    for name in list(parent):
        classes.setdefault(find(name), []).append(name)
    return {name: sorted(members) for members in classes.values() for name in members}


def kept_indices(compiled: Any) -> dict[str, Any]:
    """``keep.json``'s content for ``compiled``: per resized parameter/buffer (under every name of a tied tensor),
    the original and pruned shape and the original indices each dim keeps, as recorded by Shrink."""
    program = compiled.program
    shrinks = program.records_of(ShrinkRecord)
    final = named_tensors(compiled.module)
    aliases = _alias_classes(compiled)
    canon = {name: members[0] for name, members in aliases.items()}
    renamed, first_shapes = [], {}
    for rec in shrinks:
        idx = {canon.get(n, n): v for n, v in rec.kept_indices.items()}
        for n, shp in rec.original_shapes.items():
            first_shapes.setdefault(canon.get(n, n), shp)
        renamed.append(ShrinkRecord(idx, {}, {}))
    params: dict[str, Any] = {}
    for name, dims in compose_kept_indices(renamed).items():
        keep = [None if k is None else [int(i) for i in k] for k in dims]
        orig = [int(s) for s in first_shapes.get(name, ())]
        for n in aliases.get(name, [name]):
            params[n] = {"orig_shape": orig, "shape": list(final[n].shape) if n in final else None,
                         "keep": [None if k is None else list(k) for k in keep], "status": "recorded"}
    return {"format": FORMAT_VERSION, "method": "recorded", "params": params}


def _record_from_keep(params: Mapping[str, Any]) -> ShrinkRecord | None:
    if not params:
        return None
    return ShrinkRecord({n: tuple(None if k is None else np.asarray(k, dtype=np.int64) for k in e["keep"])
                         for n, e in params.items()},
                        {n: tuple(e["orig_shape"]) for n, e in params.items()})


class _LoadedInputs:
    """Forward pre-hook of a loaded program: its inputs checked against the shapes program.pt2 accepts, with an
    :class:`InputError` naming the input and dim (torch.export's own guard fails with a bare AssertionError)."""

    def __init__(self, check: nn.Module, keys: list[str]):
        self.check, self.keys = check, keys

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ordered = {k: kwargs[k] for k in self.keys if k in kwargs}
        if len(ordered) != len(kwargs):
            return None  # an unexpected keyword: torch's own check names it
        flat = tree_flatten((tuple(args), ordered))[0]
        if len(flat) == len(self.check.spec.inputs):
            self.check(*flat)
        return None


def check_loaded_inputs(module: nn.Module, ep: Any, args: tuple, kwargs: dict) -> None:
    """Give ``module`` (``ep.module()`` of a saved program) the readable input checks of a compiled module: the
    dims program.pt2 fixed and the ranges of those it keeps dynamic, from its placeholders (no check is added when
    they cannot be matched to the saved example inputs)."""
    from .module import LoadedInputCheck
    from .trace import _Attempt, _sym_name_map

    leaves = tree_flatten((tuple(args), dict(kwargs)))[0]
    try:
        spec = _sym_name_map(module, ep, _Attempt("loaded", tuple(args), dict(kwargs), None, {}), leaves)
    except Exception:  # noqa: BLE001 - a program whose placeholders we cannot read keeps torch's checks only
        return
    if len(spec.inputs) != len(leaves):
        return
    module.register_forward_pre_hook(_LoadedInputs(LoadedInputCheck(spec), list(kwargs)), with_kwargs=True)


# ================================================================================================ save
def _reexport(module: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> tuple[Any, bool]:
    """``torch.export`` of the pruned module for program.pt2, and whether its batch is dynamic: every dynamic
    dim of a :class:`~fxprune.module.PrunedModule` (batch, sequence length, ... named as in the report) when
    torch.export accepts them, else the batch alone (``dynamic``), else static shapes."""
    from .trace import _batch_dynamic_shapes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_inputs = getattr(module, "export_inputs", None)
        if callable(export_inputs):
            try:
                a, k, shapes = export_inputs(args, kwargs)
                if shapes is not None:
                    ep = torch.export.export(module, a, k, strict=False, dynamic_shapes=shapes)
                    return ep, any(0 in dims for dims in module.dynamic_shapes().values())
            except Exception:  # noqa: BLE001 - fall back to the batch alone
                pass
        if dynamic:
            try:
                return torch.export.export(module, args, kwargs, strict=False,
                                           dynamic_shapes=_batch_dynamic_shapes(args, kwargs)), True
            except Exception:  # noqa: BLE001 - fall back to the static program
                pass
        return torch.export.export(module, args, kwargs, strict=False), False


def _check_target(d: Path) -> None:
    """The re-used folder policy (module doc): refuse a file, or a folder holding fxprune's file names that no
    previous save wrote."""
    if d.exists() and not d.is_dir():
        raise InputError(f"{str(d)!r} is a file; fxprune saves into a folder",
                         fix="pass a folder path (created if needed), e.g. out.save('pruned/')")
    if not d.is_dir():
        return
    dirs = sorted(n for n in _OWNED if (d / n).is_dir())
    if dirs:
        raise InputError(f"{d} holds folders with names of fxprune's files ({', '.join(dirs)})",
                         fix="save into a new or empty folder, or move those folders away")
    previous = False
    try:
        previous = bool(_read_manifest(d))
    except LoadError:
        pass
    if not previous:
        clash = sorted(n for n in _OWNED if (d / n).exists())
        if clash:
            raise InputError(f"{d} holds {', '.join(clash)} but no manifest.json of an fxprune save: fxprune does "
                             f"not overwrite files it did not write",
                             fix="save into a new or empty folder, or remove those files")


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tensor_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _json_bytes(obj: Any, indent: int | None = 1) -> bytes:
    return (json.dumps(jsonable(obj), indent=indent) + "\n").encode()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, d: Path, written: list[str]) -> None:
    """Move a complete save from ``tmp`` to ``d``: one rename when ``d`` does not exist; otherwise the old
    manifest goes first (the old save stops loading), then each file, then the new manifest (the new save loads).
    (An existing folder, even empty, is never replaced as a whole: it may be someone's working directory.)"""
    if not d.exists():
        try:
            os.rename(tmp, d)
            _fsync_dir(d.parent)
            return
        except OSError:
            if not d.is_dir():  # not a race with another process creating it
                raise
    manifest = FILES["manifest"]
    with_manifest = d / manifest
    if with_manifest.exists():
        os.unlink(with_manifest)
    for name in written:
        if name != manifest:
            os.replace(tmp / name, d / name)
    for name in sorted(_OWNED - set(written)):
        if (d / name).is_file():
            os.unlink(d / name)  # a file of the previous save that this one does not write
    os.replace(tmp / manifest, with_manifest)
    _fsync_dir(d)


def save(compiled: Any, folder: str | os.PathLike, *, recipe: Sequence[Any] | None = None,
         extra: Mapping[str, Any] | None = None, plot: bool = True, check: bool = True,
         progress: Any = None) -> Path:
    """Write ``compiled`` (the result of :func:`fxprune.compile`) to ``folder`` and return the folder's path; see
    the module doc for the files.

    ``recipe``: the passes (or recipe dicts) that produced it, default: rebuilt from the program's history.
    ``extra``: more keys for report.json (e.g. ONNX and latency results). ``plot``: write report.png (skipped with a
    note when matplotlib is missing). ``check``: load program.pt2 back and require the same outputs as
    ``compiled.module`` on the example inputs (else :class:`ExportError`).

    The save is atomic: files are written to a temporary sibling folder and renamed into place, so ``folder``
    holds either its previous content or this complete save, never a mix (an error or interruption while writing
    leaves it as it was). fxprune owns only its own file names in ``folder`` (:data:`FILES`): a previous save's
    files are replaced and those this save does not write are deleted; other files are left alone, and a folder
    holding one of those names without a previous save's manifest is refused with :class:`InputError`.
    ``manifest.json``'s ``files`` lists exactly what this save wrote (name, size, SHA-256)."""
    from .pass_manager import Pass
    from .plot import plot_report, write_markdown
    from .recipe import dump_recipe, recipe_from_history, save_recipe

    module = getattr(compiled, "module", None)
    program = getattr(compiled, "program", None)
    if not isinstance(module, nn.Module) or program is None:
        raise InputError(f"save() needs the result of fxprune.compile, got {type(compiled).__name__}",
                         fix="out = fxprune.compile(model, inputs, passes); out.save('dir')")
    if any(t.is_meta for t in named_tensors(module).values()):
        raise InputError("the compiled program lives on the meta device: it has no weights to save",
                         fix="compile a model with real weights to save it (meta models are for analysis; "
                             "fxprune.replay(model, compiled, weights='model') applies their pruning)")
    d = Path(folder)
    _check_target(d)
    real = d.resolve()  # a symlink to a folder: save into its target (the temporary folder is the target's sibling)
    args, kwargs = tuple(program.args), dict(program.kwargs)
    if recipe is None:
        rec = recipe_from_history(program.history)
    else:
        items = list(recipe)
        rec = dump_recipe(items) if items and isinstance(items[0], Pass) else [dict(i) for i in items]

    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.fxprune-", suffix=".tmp", dir=real.parent))
    written: list[str] = []
    sums: dict[str, dict[str, Any]] = {}

    def put(key: str, data: bytes) -> None:
        name = FILES[key]
        _write_bytes(tmp / name, data)
        written.append(name)
        sums[name] = {"bytes": len(data), "sha256": _sha256(data)}

    def put_file(key: str) -> None:  # a file another writer (plot, markdown, yaml) created in tmp
        put(key, (tmp / FILES[key]).read_bytes())

    try:
        ref = _out_leaves(_run(module, args, kwargs))
        dynamic = bool(getattr(compiled.report, "dynamic_batch", False))
        try:
            ep, dynamic_saved = _reexport(module, args, kwargs, dynamic)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.export.save(ep, str(tmp / FILES["program"]))  # by path: the archive's root is "program/"
        except Exception as e:
            raise ExportError(f"cannot export the pruned module with torch.export: {_first_line(e)}") from e
        program_bytes = (tmp / FILES["program"]).read_bytes()
        if check:
            back = load_program(program_bytes, d / FILES["program"]).module()
            ok, diff = _close(ref, _out_leaves(_run(back, args, kwargs)))
            if not ok:
                raise ExportError(f"{d / FILES['program']} does not reproduce the pruned module's outputs "
                                  f"(max abs diff {diff:.3g})", fix="report this model to fxprune")
        put("program", program_bytes)
        put("weights", _tensor_bytes({n: t.detach().cpu().clone() for n, t in named_tensors(module).items()}))
        put("inputs", _tensor_bytes({"args": args, "kwargs": kwargs}))
        put("outputs", _tensor_bytes([t.detach().cpu() for t in ref]))
        put("keep", _json_bytes(kept_indices(compiled), indent=None))
        facts = graph_facts(module)
        source = program.source
        manifest = {
            "format": FORMAT_VERSION,
            "versions": versions(),
            "model_class": type(source).__name__ if source is not None else compiled.report.model,
            "model_module": type(source).__module__ if source is not None else None,
            "dynamic_batch": dynamic_saved,
            "input_shapes": [list(t.shape) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)],
            "conv_groups": facts["conv_groups"],
            "group_norm_groups": facts["group_norm_groups"],
        }
        header = (f"fxprune recipe for {manifest['model_class']} (fxprune {manifest['versions']['fxprune']}); "
                  f"reload with fxprune.recipe.load_recipe")
        save_recipe(rec, tmp / FILES["recipe"], header=header)
        put_file("recipe")
        put("history", _json_bytes(program.history))
        rep = report_json(compiled, rec, {"dynamic_batch_saved": dynamic_saved, **(extra or {})})
        png = None
        if plot:
            try:
                png = plot_report(rep, tmp / FILES["plot"])
            except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the saved program
                rep.setdefault("notes", []).append(f"no plot: {_first_line(e)}")
                (tmp / FILES["plot"]).unlink(missing_ok=True)
        put("report", _json_bytes(rep))
        if png is not None:
            put_file("plot")
        write_markdown(rep, tmp / FILES["markdown"], plot=png.name if png else None)
        put_file("markdown")
        manifest["files"] = dict(sums)
        put("manifest", _json_bytes(manifest))
        _commit(tmp, real, written)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


# ================================================================================================ load
def load(folder: str | os.PathLike, *, check: bool = True) -> Compiled:
    """A :class:`~fxprune.Compiled` from a folder written by :func:`save`, in any process: ``.module`` is the
    pruned program (a GraphModule from ``torch.export.load(...).module()``), ``.report`` the saved report,
    ``.program`` a Program over it (example inputs, history, a ShrinkRecord from keep.json; ``source`` is None).
    ``check``: the module must reproduce the saved outputs on the saved inputs (else :class:`LoadError`).
    Every file read must match manifest.json's checksum; malformed files raise :class:`LoadError` naming them."""
    f = SaveFolder(folder)
    ep = load_program(f.read_bytes("program"), f.path("program"))
    args, kwargs = f.inputs()
    rep = f.report()
    history = f.history()
    record = None
    if f.exists("keep"):
        try:
            record = _record_from_keep(f.keep(recorded_only=True))
        except LoadError:
            if f.format >= 2:
                raise
            # format 1 (an older fxprune) could hold indices guessed by value matching: load without them
    ref = f.outputs() if check else None
    f.verify()
    module = ep.module()
    check_loaded_inputs(module, ep, args, kwargs)
    if ref is not None:
        try:
            got = _out_leaves(_run(module, args, kwargs))
        except Exception as e:
            raise LoadError(f"the loaded program fails on its saved inputs: {_first_line(e)}", fix=_RESAVE) from e
        ok, diff = _close(ref, got)
        if not ok:
            raise LoadError(f"the loaded program does not reproduce the saved outputs (max abs diff {diff:.3g})",
                            fix=_RESAVE)
    module.meta["fxprune_dynamic_batch"] = bool(f.manifest.get("dynamic_batch"))
    module.meta["fxprune_tracer"] = rep.tracer
    module.meta["fxprune_loaded_from"] = str(f.dir)
    program = Program(module, args, kwargs, history=history, source=None, stage=Stage.SHRUNK,
                      records=(record,) if record is not None else ())
    return Compiled(module, rep, program)
