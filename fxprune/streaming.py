"""Streaming checkpoint pruning: prune a safetensors checkpoint larger than RAM, one tensor at a time.

    result = fxprune.prune_checkpoint(config_or_meta_model, "ckpt_dir", [ChannelPrune(ratio=0.3), Shrink()], "out")

1. The model is built (from an HF config) or given on the meta device and traced there (no weight is loaded).
2. The selection passes run on the meta program. Magnitude importance (``"l1"``/``"l2"``) reads each member
   parameter of a group from the checkpoint when the group is scored (memory-mapped by safetensors, released right
   after) and computes exactly what :func:`fxprune.passes.importance.magnitude` computes on a loaded model, so the
   keep indices equal the in-memory compile's. ``"random"`` and callables need no weights; calibration criteria
   need the model loaded (docs/scale.md).
3. ``Shrink`` runs on the meta program (shape rewrites, :class:`~fxprune.records.ShrinkRecord` with the exact kept
   indices of every parameter). Each checkpoint tensor is then written to new safetensors shards in row chunks:
   the chunk is a memory-mapped view of the input, the kept slices (``index_select`` per pruned dim, in index
   order: the same values as the in-memory Shrink) are written straight to the shard file. Peak memory is the
   largest scored tensor (float32 copies for the importance) plus one chunk, not the model.
4. Verification without loading the model: every segment (a direct child module of a repeated block such as
   ``model.layers.3.mlp``, or the nodes outside the blocks) whose parameters were pruned is cut out of the traced
   graph and run twice on random inputs (float32): with the masked original weights (removed slices zeroed) and
   with the written shrunk weights; outputs must agree on the kept positions. Tensors left untouched are compared
   byte for byte with the input. ``end_to_end="auto"`` also compiles the whole model in memory when it fits (a
   config or a builder is needed to materialise it) and compares every written tensor bitwise.
5. Everything is written to a temporary folder beside ``out_dir`` and renamed into place only once complete and
   verified; a failure leaves ``out_dir`` absent.

For HF causal LMs (a config as first argument, or a meta model with ``.config``) whose pruned shapes a stock
config expresses (``ChannelPrune(scope="uniform")``), ``config.json`` is written with :func:`fxprune.hf.stock_config`
(exact norms folded as there), so ``from_pretrained(out_dir)`` loads the result.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import ExportError, InputError, LoadError, VerificationError
from .pass_manager import Pass, PassContext, PassManager
from .program import Program, Stage
from .records import ShrinkRecord, compose_kept_indices

_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_DTYPE = {v: k for k, v in _DTYPES.items()}
CHUNK_BYTES = 64 << 20  # one write chunk (a memory-mapped view of the input)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class TensorInfo:
    """One checkpoint tensor: where it is and what it holds (from the safetensors header)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # start of its bytes in the file's data section

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(path: Path) -> dict[str, Any]:
    """The safetensors header of ``path``, after checking the file holds every byte the header declares."""
    if not path.is_file():
        raise LoadError(f"checkpoint shard {str(path)!r} is missing", fix="copy or download the complete checkpoint "
                                                                          "(every shard the index names)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"checkpoint shard {str(path)!r} is truncated ({size} bytes, no safetensors header)",
                            fix="re-download or re-copy this shard")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise LoadError(f"checkpoint shard {str(path)!r} is truncated: its header needs {8 + n} bytes, the file "
                            f"has {size}", fix="re-download or re-copy this shard")
        try:
            hdr = json.loads(f.read(n))
        except ValueError as e:
            raise LoadError(f"checkpoint shard {str(path)!r} has no valid safetensors header ({e})",
                            fix="re-download or re-copy this shard") from None
    end = max((v["data_offsets"][1] for k, v in hdr.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise LoadError(f"checkpoint shard {str(path)!r} is truncated: its header declares {8 + n + end} bytes, the "
                        f"file has {size}", fix="re-download or re-copy this shard")
    return hdr


class CheckpointReader:
    """A safetensors checkpoint (a folder with ``model.safetensors`` or ``model.safetensors.index.json`` and its
    shards, or one ``.safetensors`` file), read one tensor at a time through safetensors' memory mapping.

    Every shard is checked when the reader is made (present, complete), so a broken checkpoint fails before anything
    is computed, with the file named. Tensors returned by :meth:`read`/:meth:`rows` are views of the mapping: their
    pages count as resident only while the tensor lives."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if p.is_dir():
            if (p / INDEX).is_file():
                index = json.loads((p / INDEX).read_text())
                files = sorted({p / f for f in index.get("weight_map", {}).values()})
                expected = dict(index.get("weight_map", {}))
            elif (p / SINGLE).is_file():
                files, expected = [p / SINGLE], None
            else:
                found = sorted(x.name for x in p.glob("*.safetensors"))
                if len(found) != 1:
                    raise LoadError(f"{str(p)!r} has no {INDEX} or {SINGLE}" + (f" (found {found})" if found else ""),
                                    fix="point at a safetensors checkpoint folder (as save_pretrained writes)")
                files, expected = [p / found[0]], None
        elif p.suffix == ".safetensors" or p.is_file():
            files, expected = [p], None
        else:
            raise LoadError(f"checkpoint {str(p)!r} does not exist", fix="pass a safetensors file or folder")
        self.path = p
        self.infos: dict[str, TensorInfo] = {}
        for f in files:
            for name, v in _header(f).items():
                if name == "__metadata__":
                    continue
                if v["dtype"] not in _DTYPES:
                    raise LoadError(f"{str(f)!r}: tensor {name!r} has dtype {v['dtype']} that fxprune cannot slice",
                                    fix="convert the checkpoint to a torch dtype (bf16/f16/f32)")
                self.infos[name] = TensorInfo(name, f, _DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"][0])
        if expected is not None:
            for name, fname in expected.items():
                info = self.infos.get(name)
                if info is None or info.file.name != fname:
                    raise LoadError(f"the index names tensor {name!r} in {str(p / fname)!r}, which does not hold it",
                                    fix="re-download the checkpoint (the index and its shards disagree)")

    def names(self) -> list[str]:
        """Tensor names in file and offset order (the order they are stored)."""
        return sorted(self.infos, key=lambda n: (str(self.infos[n].file), self.infos[n].offset))

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor (a memory-mapped view)."""
        from safetensors import safe_open

        with safe_open(str(self.infos[name].file), framework="pt") as f:
            return f.get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of dim 0 (a memory-mapped view; a 0-d tensor is returned whole)."""
        from safetensors import safe_open

        with safe_open(str(self.infos[name].file), framework="pt") as f:
            if not self.infos[name].shape:
                return f.get_tensor(name)
            return f.get_slice(name)[start:stop]

    def chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows)`` in chunks of about ``chunk_bytes``."""
        info = self.infos[name]
        if not info.shape or info.shape[0] == 0:
            yield 0, self.read(name)
            return
        row = max(1, info.nbytes // info.shape[0])
        step = max(1, chunk_bytes // row)
        for a in range(0, info.shape[0], step):
            yield a, self.rows(name, a, min(a + step, info.shape[0]))


# ------------------------------------------------------------------------------------------------ planning


class CheckpointMagnitude:
    """Magnitude importance (``p=1``/``2``) over weights read from a checkpoint, one member parameter at a time.

    Same arithmetic as :func:`fxprune.passes.importance.magnitude` on the loaded model (it calls the same per-member
    routine on the read tensor), hence the same scores and keep indices."""

    def __init__(self, reader: CheckpointReader, names: dict[str, str], p: int):
        self.reader, self.names, self.p = reader, names, p

    def __call__(self, group: Any, program: Program) -> np.ndarray:
        from fxprune.passes import importance as imp

        view = _CheckpointParams(program, self.reader, self.names)
        scores = imp._member_scores(view, group, self.p)  # the in-memory criterion's own per-member arithmetic
        return np.ones(group.size) if not scores else np.mean(scores, axis=0)


class _CheckpointParams:
    """The part of a Program that the magnitude criterion reads (``groups``, ``param``), with values from disk."""

    def __init__(self, program: Program, reader: CheckpointReader, names: dict[str, str]):
        self.groups, self._program, self._reader, self._names = program.groups, program, reader, names

    def param(self, name: str) -> torch.Tensor:
        meta = self._program.param(name)
        key = self._names.get(name)
        if key is None:
            return meta
        t = self._reader.read(key)
        return nn.Parameter(t, requires_grad=False) if isinstance(meta, nn.Parameter) else t


@dataclass
class StreamPlan:
    """What :func:`plan_checkpoint` decided: the selected and the shrunk meta programs, the kept indices per
    canonical parameter, and the checkpoint name of every canonical parameter."""

    selected: Program
    shrunk: Program
    kept: dict[str, tuple[np.ndarray | None, ...]]
    names: dict[str, str]  # canonical parameter -> checkpoint tensor name
    canonical: dict[str, str]  # checkpoint tensor name -> canonical parameter
    results: list = field(default_factory=list)


def _meta_model(model: Any, example_inputs: Any) -> tuple[nn.Module, Any, Callable[[], nn.Module] | None]:
    """(model on meta, example inputs, builder of the real model or None) from a config, builder or meta module."""
    if isinstance(model, nn.Module):
        if any(not t.is_meta for t in list(model.parameters()) + list(model.buffers())):
            raise InputError("prune_checkpoint needs the model on the meta device (its weights come from the "
                             "checkpoint)", fix="build it under `with torch.device('meta'):`, or pass its config")
        build = None
    elif callable(model) and not hasattr(model, "to_dict"):
        build = model
        with torch.device("meta"):
            model = build()
    elif hasattr(model, "to_dict"):  # a transformers PretrainedConfig
        import transformers as T

        cfg = copy.deepcopy(model)
        cfg.use_cache = False

        def build() -> nn.Module:
            return T.AutoModelForCausalLM.from_config(cfg).eval()

        with torch.device("meta"):
            model = build()
    else:
        raise InputError(f"prune_checkpoint's first argument must be a meta-device nn.Module, a transformers config "
                         f"or a zero-argument builder, got {type(model).__name__}",
                         fix="e.g. prune_checkpoint(AutoConfig.from_pretrained(dir), dir, passes, out)")
    model.eval()
    if example_inputs is None:
        if not hasattr(getattr(model, "config", None), "vocab_size"):
            raise InputError("example_inputs are needed for a model that is not an HF language model",
                             fix="pass example_inputs=... (meta tensors of the input shapes)")
        example_inputs = {"input_ids": torch.zeros(1, 16, dtype=torch.long, device="meta")}
    return model, example_inputs, build


def plan_checkpoint(model: nn.Module, example_inputs: Any, passes: Iterable[Pass], reader: CheckpointReader, *,
                    seed: int = 0, strict: bool = True) -> StreamPlan:
    """Trace ``model`` (meta) and run ``passes`` (ending with one ``Shrink``) with weights read from ``reader``."""
    from fxprune.passes import ChannelPrune, Shrink
    from .trace import normalize_inputs, trace

    passes = list(passes)
    if not passes or not isinstance(passes[-1], Shrink) or any(isinstance(p, Shrink) for p in passes[:-1]):
        raise InputError("prune_checkpoint needs the passes to end with exactly one Shrink()",
                         fix="e.g. passes=[ChannelPrune(ratio=0.3), Shrink()]")
    args, kwargs = normalize_inputs(example_inputs, None)
    gm = trace(model, args, kwargs, copy_model=False)
    program = Program(gm, args, kwargs, source=model)
    alias = program.groups.analysis.param_alias
    canon_params = set(program.groups.analysis.param_spaces)
    canonical: dict[str, str] = {}
    unknown = []
    for key in reader.names():
        c = alias.get(key, key)
        if c in canon_params:
            canonical[key] = c
        else:
            unknown.append(key)
    if unknown and strict:
        raise LoadError(f"checkpoint {str(reader.path)!r} holds tensors the model does not have: {unknown[:5]}"
                        + (" ..." if len(unknown) > 5 else ""),
                        fix="build the model from the checkpoint's own config, or pass strict=False to copy them "
                            "unchanged")
    names: dict[str, str] = {}
    for key, c in canonical.items():
        names.setdefault(c, key)
    missing = [c for c in canon_params if c not in names and isinstance(program.param(c), nn.Parameter)]
    if missing:
        raise LoadError(f"checkpoint {str(reader.path)!r} lacks parameters of the model: {sorted(missing)[:5]}",
                        fix="build the model from the checkpoint's own config")
    for key, c in canonical.items():
        want = tuple(program.param(c).shape)
        if reader.infos[key].shape != want:
            raise LoadError(f"checkpoint tensor {key!r} in {str(reader.infos[key].file)!r} has shape "
                            f"{reader.infos[key].shape}, the model's {c!r} has {want}",
                            fix="build the model from the checkpoint's own config")
    work = []
    for p in passes[:-1]:
        if isinstance(p, ChannelPrune) and p.importance in ("l1", "l2"):
            p = copy.copy(p)
            p.importance = CheckpointMagnitude(reader, names, 1 if p.importance == "l1" else 2)
        work.append(p)
    ctx = PassContext(seed=seed, data=None, verify=False, dense=gm)
    selected, results = PassManager(work).run(program, ctx) if work else (program, [])
    if selected.weight_masks:
        raise InputError("fine-grained masks (N:M, unstructured) are not supported by prune_checkpoint",
                         fix="use structured selection passes (ChannelPrune, HeadPrune) before Shrink")
    shrunk, r2 = PassManager([passes[-1]]).run(selected, ctx)
    if shrunk.stage is not Stage.SHRUNK:
        raise InputError("the passes did not produce a shrunk program", fix="end the passes with Shrink()")
    kept = compose_kept_indices(shrunk.records_of(ShrinkRecord))
    return StreamPlan(selected, shrunk, kept, names, canonical, list(results) + list(r2))


# ------------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class _Out:
    name: str  # checkpoint (and output) tensor name
    dtype: torch.dtype
    shape: tuple[int, ...]
    keep: tuple[np.ndarray | None, ...] | None
    scale: float | None = None  # exact-norm fold for a stock HF config (float32 multiply, cast back)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _outputs(plan: StreamPlan, reader: CheckpointReader, scales: dict[str, float]) -> list[_Out]:
    outs = []
    for key in reader.names():
        info = reader.infos[key]
        c = plan.canonical.get(key)
        keep = plan.kept.get(c) if c is not None else None
        shape = info.shape if keep is None else tuple(n if k is None else len(k) for n, k in zip(info.shape, keep))
        outs.append(_Out(key, info.dtype, shape, keep, scales.get(c) if c is not None else None))
    return outs


def _shards(outs: list[_Out], max_shard_bytes: int) -> list[list[_Out]]:
    shards: list[list[_Out]] = [[]]
    size = 0
    for o in outs:
        if shards[-1] and size + o.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    return shards


def _kept_chunk(x: torch.Tensor, start: int, o: _Out) -> torch.Tensor:
    """The kept part of rows ``start:start+len(x)`` of the tensor ``o`` (index order: as the in-memory Shrink)."""
    if o.keep is None:
        return x
    for d, k in enumerate(o.keep):
        if k is None:
            continue
        if d == 0 and x.dim() > 0:
            sel = k[(k >= start) & (k < start + x.shape[0])] - start
            x = x.index_select(0, torch.from_numpy(sel))
        else:
            x = x.index_select(d, torch.from_numpy(np.array(k)))
    return x


def _write_shard(path: Path, entries: list[_Out], reader: CheckpointReader, chunk_bytes: int) -> None:
    """One safetensors file written in a single pass: header first (shapes are known), then each tensor's kept
    slices chunk by chunk."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for o in entries:
        header[o.name] = {"dtype": _ST_DTYPE[o.dtype], "shape": list(o.shape), "data_offsets": [off, off + o.nbytes]}
        off += o.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for o in entries:
            written = 0
            for start, x in reader.chunks(o.name, chunk_bytes):
                x = _kept_chunk(x, start, o)
                if o.scale is not None:
                    x = (x.float() * o.scale).to(o.dtype)
                x = x.contiguous().reshape(-1)
                if x.numel():
                    f.write(x.view(torch.uint8).numpy().data)
                written += x.numel() * x.element_size()
                del x
            if written != o.nbytes:
                raise ExportError(f"{o.name}: wrote {written} bytes, expected {o.nbytes} (a keep index outside the "
                                  "tensor?)", fix="report this model")


def write_pruned(plan: StreamPlan, reader: CheckpointReader, folder: Path, *, max_shard_bytes: int = 2 << 30,
                 chunk_bytes: int = CHUNK_BYTES, scales: dict[str, float] | None = None) -> list[Path]:
    """Write the pruned checkpoint into ``folder`` (shards + index when several). Returns the shard paths."""
    shards = _shards(_outputs(plan, reader, scales or {}), max_shard_bytes)
    n = len(shards)
    paths = [folder / (SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors") for i in range(n)]
    for path, entries in zip(paths, shards):
        _write_shard(path, entries, reader, chunk_bytes)
    if n > 1:
        index = {"metadata": {"total_size": sum(o.nbytes for s in shards for o in s)},
                 "weight_map": {o.name: p.name for p, s in zip(paths, shards) for o in s}}
        (folder / INDEX).write_text(json.dumps(index, indent=1))
    return paths


# ------------------------------------------------------------------------------------------------ verification


_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def _block_of(name: str) -> str | None:
    m = _BLOCK.match(name)
    return m.group(1) if m else None


def _segments(gm: fx.GraphModule, blocks: set[str]) -> dict[str, list[str]]:
    """Node names per segment: the direct child module of a block that ran the node (``model.layers.3.mlp``), the
    block itself for its own glue ops; outside the blocks the innermost module (``lm_head``), ``""`` for none."""
    out: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        paths = [v[0] for v in (n.meta.get("nn_module_stack") or {}).values()]
        key = paths[-1] if paths and paths[-1] else ""
        for p in paths:
            b = _block_of(p + ".")
            if b in blocks:
                key = b
                rest = [q for q in paths if q.startswith(b + ".")]
                if rest:
                    key = b + "." + rest[0][len(b) + 1:].split(".")[0]
                break
        out.setdefault(key, []).append(n.name)
    return out


def _subgraph(gm: fx.GraphModule, names: set[str]) -> tuple[fx.Graph, list[str], list[str], list[str]]:
    """The nodes ``names`` of ``gm`` as a graph: (graph, input node names, get_attr targets, output node names)."""
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    inputs: list[str] = []
    targets: list[str] = []
    outputs: list[str] = []
    for n in gm.graph.nodes:
        if n.name not in names:
            continue
        for a in n.all_input_nodes:
            if a.name in env:
                continue
            if a.op == "get_attr":
                env[a.name] = g.get_attr(a.target)
                targets.append(a.target)
            else:
                env[a.name] = g.placeholder(f"in_{len(inputs)}")  # node names may clash with op argument names
                inputs.append(a.name)
        new = env[n.name] = g.node_copy(n, lambda x: env[x.name])
        # the graph was traced on meta: device arguments (aten.to, _assert_tensor_metadata) now mean the CPU
        new.args, new.kwargs = fx.node.map_aggregate((new.args, new.kwargs), _cpu_device)
        if any(u.name not in names for u in n.users):
            outputs.append(n.name)
    g.output(tuple(env[o] for o in outputs))
    return g, inputs, targets, outputs


def _with_new_nodes(gm: fx.GraphModule, old: dict[str, fx.Node], names: set[str]) -> set[str]:
    """``names`` plus the nodes Shrink's rewrites added next to them (e.g. a pinned norm statistic)."""
    names = set(names)
    grew = True
    while grew:
        grew = False
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.name not in old and n.name not in names and (
                    any(a.name in names for a in n.all_input_nodes) or any(u.name in names for u in n.users)):
                names.add(n.name)
                grew = True
    return names


def _cpu_device(x: Any) -> Any:
    return torch.device("cpu") if isinstance(x, torch.device) and x.type == "meta" else x


def _hint_shape(v: Any) -> tuple[int, ...]:
    from .analyzer import size_hint

    return tuple(int(size_hint(s)) for s in v.shape)


def _removed(k: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.nonzero(~k)[0])


def _slice_kept(x: torch.Tensor, keep: list[np.ndarray | None] | None) -> torch.Tensor:
    for d, k in enumerate(keep or []):
        if k is not None:
            x = x.index_select(d, torch.from_numpy(np.nonzero(k)[0]))
    return x


def _kept_from_source(reader: CheckpointReader, key: str, keep: tuple[np.ndarray | None, ...] | None
                      ) -> torch.Tensor:
    """The kept slices of checkpoint tensor ``key``, computed from the input (the unfolded shrunk weight)."""
    x = reader.read(key)
    for d, k in enumerate(keep or ()):
        if k is not None:
            x = x.index_select(d, torch.from_numpy(np.array(k)))
    return x


def verify_layerwise(plan: StreamPlan, reader: CheckpointReader, written: CheckpointReader, *, seed: int = 0,
                     rtol: float = 1e-4, scales: dict[str, float] | None = None) -> dict[str, Any]:
    """Check the written checkpoint without loading the model (module docstring, step 4).

    ``scales``: norm weights written multiplied by a factor (exact norms folded for a stock config, by canonical
    name): the segments run on their unfolded kept slices, and the written tensors must equal
    ``(kept.float() * factor).to(dtype)`` bit for bit.

    Returns ``{"segments": [...], "untouched_tensors": n, "untouched_bytes": b}``; raises
    :class:`~fxprune.errors.VerificationError` naming the segment and the written files on the first mismatch."""
    from .verify import node_keep

    scales = scales or {}
    sel = plan.selected
    gs = sel.groups
    roles = gs.analysis.param_roles
    alias = gs.analysis.param_alias
    nkeep = node_keep(gs, sel.leaf_keep())
    gm0, gm1 = sel.gm, plan.shrunk.gm
    nodes0 = {n.name: n for n in gm0.graph.nodes}
    nodes1 = {n.name: n for n in gm1.graph.nodes}
    blocks = {b for b in map(_block_of, plan.names) if b}
    pruned = {c for c, dims in plan.kept.items() if any(k is not None for k in dims)}
    rows = []
    for seg, names in _segments(gm0, blocks).items():
        g0, inputs, targets, outputs = _subgraph(gm0, set(names))
        canon = [alias.get(t, t) for t in targets]
        if not outputs or not any(c in pruned for c in canon):
            continue
        missing = [t for t, c in zip(targets, canon) if c not in plan.names]
        if missing:
            rows.append({"segment": seg or "<outside blocks>", "skipped": f"tensors not in the checkpoint: {missing}"})
            continue
        g1, inputs1, _, outputs1 = _subgraph(gm1, _with_new_nodes(gm1, nodes0, set(names)))
        if inputs1 != inputs or outputs1 != outputs:
            raise VerificationError(f"segment {seg or '<outside blocks>'!r} has other inputs/outputs after Shrink "
                                    f"({inputs1}/{outputs1} vs {inputs}/{outputs})", fix="report this model")
        gen = torch.Generator().manual_seed(seed + len(rows))
        xin0, xin1 = [], []
        for name in inputs:
            v = nodes0[name].meta.get("val")
            if not isinstance(v, torch.Tensor):  # a symbolic size (dynamic batch/sequence): its example value
                from .analyzer import size_hint

                xin0.append(size_hint(v))
                xin1.append(size_hint(v))
                continue
            shape = _hint_shape(v)
            if v.dtype.is_floating_point:
                x = torch.randn(shape, generator=gen, dtype=torch.float32)
                for d, k in enumerate(nkeep.get(name) or []):
                    if k is not None:
                        x = x.index_fill(d, _removed(k), 0.0)  # the masked program's removed activations are 0
                x = x.to(v.dtype)
            else:
                x = (torch.ones if v.dtype == torch.bool else torch.zeros)(shape, dtype=v.dtype)
            xin0.append(x)
            xin1.append(_slice_kept(x, nkeep.get(name)))
        weights0: dict[str, torch.Tensor] = {}
        for t, c in zip(targets, canon):
            w = reader.read(plan.names[c]).to(nodes0_dtype(gm0, t))
            weights0[t] = w
        with torch.no_grad():
            dense = _run(g0, weights0, xin0)
            for t, c in zip(targets, canon):
                if "no_zero" in roles.get(c, set()) or not weights0[t].is_floating_point():
                    continue
                for d, k in enumerate(plan.kept.get(c, ())):
                    if k is not None:
                        rm = np.setdiff1d(np.arange(weights0[t].shape[d]), k)
                        weights0[t] = weights0[t].index_fill(d, torch.from_numpy(rm), 0.0)
            masked = _run(g0, weights0, xin0)
            del weights0
            weights1 = {t: (written.read(plan.names[c]) if c not in scales else _kept_from_source(
                reader, plan.names[c], plan.kept.get(c))).to(nodes0_dtype(gm0, t)) for t, c in zip(targets, canon)}
            shrunk = _run(g1, weights1, xin1)
            del weights1
        diff = scale = moved = 0.0
        for o, m, s, d0 in zip(outputs, masked, shrunk, dense):
            if not isinstance(m, torch.Tensor) or not m.is_floating_point():
                continue
            ms = _slice_kept(m, nkeep.get(o))
            if tuple(ms.shape) != tuple(s.shape) or tuple(s.shape) != _hint_shape(nodes1[o].meta["val"]):
                raise VerificationError(f"segment {seg or '<outside blocks>'!r}: output {o!r} has shape "
                                        f"{tuple(s.shape)}, the masked program's kept positions {tuple(ms.shape)}",
                                        fix="report this model (a shape rewrite is wrong)")
            diff = max(diff, float((ms.double() - s.double()).abs().max()) if s.numel() else 0.0)
            scale = max(scale, float(ms.abs().max()) if ms.numel() else 0.0)
            moved = max(moved, float((m.double() - d0.double()).abs().max()) if m.numel() else 0.0)
        ok = bool(np.isfinite(diff)) and diff <= rtol * max(scale, 1e-12)
        row = {"segment": seg or "<outside blocks>", "params": len(targets), "max_abs_diff": diff,
               "output_scale": scale, "observable": moved > rtol * max(scale, 1e-12), "ok": ok}
        rows.append(row)
        if not ok:
            files = sorted({str(written.infos[plan.names[c]].file) for c in canon})
            raise VerificationError(
                f"layer-wise check failed for segment {row['segment']!r}: max |shrunk - masked| = {diff:.3g} on "
                f"kept outputs of scale {scale:.3g} (rtol {rtol:g}); its tensors are in {files}",
                fix="the written weights of this segment are not the kept slices of the input: re-run "
                    "prune_checkpoint (a corrupted or modified shard)")
    for c, factor in scales.items():
        key = plan.names[c]
        want = (_kept_from_source(reader, key, plan.kept.get(c)).float() * factor).to(reader.infos[key].dtype)
        got = written.read(key)
        if got.shape != want.shape or not torch.equal(_bytes(got), _bytes(want)):
            raise VerificationError(f"folded norm weight {key!r} in {str(written.infos[key].file)!r} is not the kept "
                                    f"slice times {factor:.6g}", fix="re-run prune_checkpoint")
    untouched = bytes_ = 0
    for key, info in reader.infos.items():
        c = plan.canonical.get(key)
        if c in pruned or c in scales:
            continue
        if key not in written:
            raise VerificationError(f"{key!r} is missing from the written checkpoint", fix="re-run prune_checkpoint")
        for (a, x), (_, y) in zip(reader.chunks(key), written.chunks(key)):
            if x.shape != y.shape or not torch.equal(_bytes(x), _bytes(y)):
                raise VerificationError(f"untouched tensor {key!r} differs from the input at rows {a}+ in "
                                        f"{str(written.infos[key].file)!r}", fix="re-run prune_checkpoint")
        untouched += 1
        bytes_ += info.nbytes
    return {"segments": rows, "untouched_tensors": untouched, "untouched_bytes": bytes_}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def nodes0_dtype(gm: fx.GraphModule, target: str) -> torch.dtype:
    """The dtype the traced graph holds ``target`` in (the meta model's dtype)."""
    mod = gm
    *path, attr = target.split(".")
    for p in path:
        mod = getattr(mod, p)
    return getattr(mod, attr).dtype


def _run(graph: fx.Graph, weights: dict[str, torch.Tensor], inputs: list[torch.Tensor]) -> tuple:
    root = nn.Module()
    for t, w in weights.items():
        *path, attr = t.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        mod.register_buffer(attr, w, persistent=False)
    gm = fx.GraphModule(root, copy.deepcopy(graph))
    try:
        return tuple(gm(*inputs))
    finally:  # a GraphModule sits in a reference cycle (graph <-> owning module): free its weights now, not at gc
        for m in list(gm.modules()) + list(root.modules()):
            m._buffers.clear()
        del gm, root
        gc.collect()


# ------------------------------------------------------------------------------------------------ front door


@dataclass
class StreamResult:
    """What :func:`prune_checkpoint` wrote and checked."""

    out_dir: Path
    files: list[Path]
    params_before: int
    params_after: int
    bytes_in: int
    bytes_out: int
    kept_channels: dict[int, int]
    verification: dict[str, Any]
    end_to_end: dict[str, Any] | None
    config_written: bool
    notes: list[str]
    timings: dict[str, float]
    plan: StreamPlan

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "files": [p.name for p in self.files], "params_before":
                self.params_before, "params_after": self.params_after, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "verification": self.verification, "end_to_end": self.end_to_end,
                "config_written": self.config_written, "notes": self.notes, "timings": self.timings}


def _hf_config(plan: StreamPlan) -> tuple[Any, dict[str, float]] | None:
    """(stock config, norm-weight scale per canonical name) for an HF source, or None when a stock config cannot
    express the pruned shapes (the reason is raised as ExportError by the caller's choice)."""
    from .hf import stock_config

    class _View:  # what stock_config reads: the program (source, records) and the module's tensors (meta shapes)
        program = plan.shrunk
        module = plan.shrunk.gm

    cfg, _ = stock_config(_View())
    scales: dict[str, float] = {}
    for rec in plan.shrunk.records_of(ShrinkRecord):
        for s in rec.norms.values():
            if s["mode"] == "exact" and s.get("weight"):
                scales[plan.shrunk.groups.analysis.param_alias.get(s["weight"], s["weight"])] = \
                    math.sqrt(s["before"] / s["after"])
    return cfg, scales


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def end_to_end_check(build: Callable[[], nn.Module], example_inputs: Any, passes: list[Pass],
                     reader: CheckpointReader, written: CheckpointReader, plan: StreamPlan, *, seed: int = 0,
                     scales: dict[str, float] | None = None) -> dict[str, Any]:
    """Materialise the model from the checkpoint, compile it in memory with the same passes (verified there), and
    compare every written tensor bitwise with the compiled module's (cast to the checkpoint dtype)."""
    from .compile import compile as compile_

    t0 = time.perf_counter()
    model = build()
    sd = model.state_dict()
    with torch.no_grad():
        for key, c in plan.canonical.items():
            for name in (key, c):
                if name in sd:
                    sd[name].copy_(reader.read(key))
                    break
    out = compile_(model, example_inputs, passes, seed=seed, count_flops=False)
    mine = dict(out.module.named_parameters(remove_duplicate=False))
    mine.update(dict(out.module.named_buffers(remove_duplicate=False)))
    alias = plan.shrunk.groups.analysis.param_alias
    by_canon = {alias.get(k, k): v for k, v in mine.items()}
    compared = 0
    for key in written.names():
        ref = mine.get(key, by_canon.get(plan.canonical.get(key, key)))
        if ref is None:
            continue
        w = written.read(key)
        factor = (scales or {}).get(plan.canonical.get(key, key))
        ref = (ref.detach().float() * factor if factor is not None else ref.detach()).to(w.dtype)
        if ref.shape != w.shape or not torch.equal(ref.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)):
            raise VerificationError(f"{key!r} differs from the in-memory compile's tensor "
                                    f"({tuple(w.shape)} vs {tuple(ref.shape)})", fix="report this model")
        compared += 1
    return {"tensors_compared": compared, "in_memory_verified": out.report.verified,
            "seconds": time.perf_counter() - t0}


def prune_checkpoint(model: Any, checkpoint: str | os.PathLike, passes: Iterable[Pass], out_dir: str | os.PathLike,
                     *, example_inputs: Any = None, seed: int = 0, verify: bool = True,
                     end_to_end: bool | str = "auto", max_shard_bytes: int = 2 << 30,
                     chunk_bytes: int = CHUNK_BYTES, strict: bool = True, overwrite: bool = False,
                     rtol: float = 1e-4) -> StreamResult:
    """Prune the safetensors ``checkpoint`` without loading it, writing the result to ``out_dir``.

    ``model``: the model on the meta device, a transformers config (an ``AutoModelForCausalLM`` is built on meta),
    or a zero-argument builder (called under the meta device; called for real only by the end-to-end check).
    ``passes``: selection passes ending with ``Shrink()`` (magnitude, random or callable importance; see the module
    docstring). ``example_inputs``: meta tensors (default for HF LMs: ``input_ids`` of shape 1x16).
    ``verify``: the layer-wise check (module docstring). ``end_to_end``: also compile in memory and compare bitwise
    (``"auto"``: when a builder or config is given and about 6x the checkpoint fits in available memory).
    Nothing appears at ``out_dir`` unless everything was written and checked."""
    t0 = time.perf_counter()
    passes = list(passes)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{str(out_dir)!r} exists", fix="choose a new folder or pass overwrite=True")
    reader = CheckpointReader(checkpoint)
    meta_model, example_inputs, build = _meta_model(model, example_inputs)
    timings: dict[str, float] = {}
    plan = plan_checkpoint(meta_model, example_inputs, passes, reader, seed=seed, strict=strict)
    timings["plan"] = time.perf_counter() - t0
    notes: list[str] = []
    cfg = None
    scales: dict[str, float] = {}
    if hasattr(getattr(meta_model, "config", None), "to_dict"):
        try:
            cfg, scales = _hf_config(plan)
        except ExportError as e:
            notes.append(f"no config.json: {str(e).splitlines()[0]}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        t1 = time.perf_counter()
        files = write_pruned(plan, reader, tmp, max_shard_bytes=max_shard_bytes, chunk_bytes=chunk_bytes,
                             scales=scales)
        if cfg is not None:
            cfg.save_pretrained(str(tmp))
        timings["write"] = time.perf_counter() - t1
        written = CheckpointReader(tmp)
        t2 = time.perf_counter()
        report: dict[str, Any] = {"verified": None}
        if verify:
            report = verify_layerwise(plan, reader, written, seed=seed, rtol=rtol, scales=scales)
            report["verified"] = True
        timings["verify"] = time.perf_counter() - t2
        e2e = None
        fits = 6 * sum(i.nbytes for i in reader.infos.values()) < _mem_available()  # f32 model + compile copies
        if end_to_end is True or (end_to_end == "auto" and build is not None and fits):
            if build is None:
                raise InputError("end_to_end=True needs a config or a builder to materialise the model",
                                 fix="pass the config (or a builder) as the first argument")
            t3 = time.perf_counter()
            e2e = end_to_end_check(build, _concrete_like(example_inputs), passes, reader, written, plan, seed=seed,
                                   scales=scales)
            timings["end_to_end"] = time.perf_counter() - t3
        elif end_to_end == "auto":
            notes.append("end-to-end check skipped: " + ("no config or builder to materialise the model"
                                                         if build is None else "the model does not fit in memory"))
        params_before = sum(math.prod(i.shape) for i in reader.infos.values())
        params_after = sum(math.prod(i.shape) for i in written.infos.values())
        info = {"pruned_by": "fxprune.prune_checkpoint", "source": str(reader.path),
                "params_before": params_before, "params_after": params_after,
                "kept_indices": {k: [None if d is None else d.tolist() for d in v] for k, v in plan.kept.items()
                                 if any(d is not None for d in v)},
                "verification": report, "end_to_end": e2e, "notes": notes}
        (tmp / "fxprune_pruning.json").write_text(json.dumps(info))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kept_channels: dict[int, int] = {}
    for rec in plan.shrunk.records_of(ShrinkRecord):
        kept_channels.update(rec.kept_channels)
    timings["total"] = time.perf_counter() - t0
    files = [out_dir / p.name for p in files]
    return StreamResult(out_dir, files, params_before, params_after, sum(i.nbytes for i in reader.infos.values()),
                        sum(p.stat().st_size for p in files), kept_channels, report, e2e, cfg is not None, notes,
                        {k: round(v, 3) for k, v in timings.items()}, plan)


def _concrete_like(example_inputs: Any) -> Any:
    """Zero CPU tensors shaped like the (meta) example inputs."""
    def one(x: Any) -> Any:
        return torch.zeros(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) else x

    if isinstance(example_inputs, dict):
        return {k: one(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(one(v) for v in example_inputs)
    return one(example_inputs)
