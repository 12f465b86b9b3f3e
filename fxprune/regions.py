"""Region tracing: prune the traceable submodules of a model whose whole forward cannot be exported.

Detectors (torchvision Faster/Mask/Keypoint R-CNN, RetinaNet, SSD, FCOS, DETR-style models) compute anchors,
matching, top-k and NMS from tensor *values*, which ``torch.export`` cannot capture. ``compile(..., regions="auto")``
then prunes what does trace and keeps the rest eager and untouched::

    out = fxprune.compile(detector, ([img],), regions="auto")        # or regions=["backbone", "rpn.head"]
    out.module.eval()(images)                                       # the detector's own class: a list of dicts

How it works (one eager run, one combined analysis):

1. The model runs once eagerly (eval mode, no grad) with forward hooks on every module that owns parameters and a
   ``TorchFunctionMode`` that notes which module outputs later torch calls consume, and from where.
2. Regions, top-down: a child whose every call exports (``fxprune.trace``, static shapes, with the inputs it
   actually received) is a region; otherwise its children are tried. Modules without parameters are never regions
   (they are glue). ``regions=[names]`` takes the named submodules instead.
3. The region graphs are *stitched* into one GraphModule: a region input that is the very object another region
   returned (identity, recorded during the run) becomes an edge; any other input becomes a placeholder. Parameters
   keep the user's qualified names (``backbone.body.0.weight``). The stitched graph's outputs are the region
   outputs that no region consumes or that eager code consumes: outputs are never pruned, so channels that cross
   into eager code are frozen (and reported under ``frozen_by`` with op ``eager``). Shape reads (``.shape``,
   ``.size()``, ``.dtype``, ``len``) do not count as consumption: they do not observe channel values.
4. The usual analyzer, passes, Shrink and shrunk == masked verification run unchanged on the stitched program.
5. The pruned tensors are written into a deep copy of the user's model (sizes of standard modules updated as in
   :func:`fxprune.replay`), and the result is verified end to end on fresh inputs against the masked model (the
   same copy with the removed slices zeroed): every region output and the final outputs (eval mode).

:class:`RegionCompiled` is the result (``.module`` is the user's class); ``.save(folder)`` writes the stitched
program as a normal archive plus ``regions.pt`` (the full pruned state and the example inputs), and
:func:`fxprune.replay` rebuilds the pruned model from either.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .compile import Compiled, _check_run_options, _report, default_passes
from .errors import InputError, LoadError, TraceError, VerificationError
from .flops import count_macs, count_params
from .log import get_logger
from .pass_manager import Pass, PassContext, PassManager, PassResult
from .program import Program, Stage
from .records import ShrinkRecord, compose_kept_indices
from .report import graph_facts, named_tensors
from .trace import TRACER, normalize_inputs, trace
from .verify import random_like

__all__ = ["RegionCompiled", "RegionPlan", "compile_regions", "find_regions", "replay_regions", "REGIONS_FILE"]

log = get_logger("regions")

#: the extra file a region save writes next to the standard archive
REGIONS_FILE = "regions.pt"
#: metadata reads: do not observe channel values (``.shape`` etc. arrive as ``__get__`` of the property)
_META_FUNCS = frozenset({"size", "dim", "shape", "dtype", "device", "__len__", "is_floating_point", "ndim",
                         "requires_grad", "layout", "is_cuda", "get_device", "is_complex", "stride",
                         "data_ptr", "element_size", "is_contiguous"})
#: cause of a whole-model TraceError that region tracing may get around
FALLBACK_CAUSES = ("control_flow", "unsupported_op", "other")


# ================================================================================================ recording
@dataclass
class _Call:
    """One recorded forward call of a module that owns parameters."""

    id: int
    path: str
    module: nn.Module
    args: tuple
    kwargs: dict
    stack: tuple[int, ...]  # enclosing calls (ids), outermost first
    out: Any = None


@dataclass
class _Run:
    calls: list[_Call]
    #: (enclosing call ids, producer call id, producer output leaf index) for every non-metadata torch call that
    #: read a recorded module output
    uses: list[tuple[tuple[int, ...], int, int]]
    output: Any


def _owns_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


class _UseMode(TorchFunctionMode):
    """Notes which recorded module outputs torch calls read (outside metadata reads)."""

    def __init__(self, live: dict[int, list[tuple[int, int]]], stack: list[int], uses: list):
        super().__init__()
        self.live, self.stack, self.uses = live, stack, uses

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name not in _META_FUNCS and self.live:
            for leaf in tree_flatten((args, kwargs))[0]:
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.live:
                    for prod, idx in self.live[id(leaf)]:
                        self.uses.append((tuple(self.stack), prod, idx))
        return func(*args, **kwargs)


def _record(model: nn.Module, args: tuple, kwargs: dict) -> _Run:
    """Run ``model`` once (eval mode, no grad; every submodule's own flag restored) recording the calls of the
    modules that own parameters, their inputs/outputs, and the torch calls that read those outputs."""
    calls: list[_Call] = []
    stack: list[int] = []
    live: dict[int, list[tuple[int, int]]] = {}  # id(output leaf) -> [(call id, leaf index)] of every call that
    # returned it (nested calls return the same object); the leaves are kept alive by the calls
    uses: list[tuple[tuple[int, ...], int, int]] = []
    handles = []
    open_calls: dict[int, list[_Call]] = {}

    def pre(path: str):
        def hook(mod: nn.Module, a: tuple, kw: dict) -> None:
            c = _Call(len(calls), path, mod, a, dict(kw), tuple(stack))
            calls.append(c)
            open_calls.setdefault(id(mod), []).append(c)
            stack.append(c.id)
        return hook

    def post(mod: nn.Module, a: tuple, kw: dict, out: Any) -> None:
        c = open_calls[id(mod)].pop()
        stack.pop()
        c.out = out
        for i, leaf in enumerate(tree_flatten(out)[0]):
            if isinstance(leaf, torch.Tensor):
                live.setdefault(id(leaf), []).append((c.id, i))

    for path, mod in model.named_modules():
        if _owns_params(mod):
            handles.append(mod.register_forward_pre_hook(pre(path), with_kwargs=True))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), _UseMode(live, stack, uses):
            output = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, was in flags:
            m.training = was
    return _Run(calls, uses, output)


# ================================================================================================ discovery
@dataclass
class RegionPlan:
    """The regions of a model: submodule paths, how many calls each had, and what crosses into eager code."""

    regions: list[str]
    calls: dict[str, int] = field(default_factory=dict)
    #: stitched output name -> why its channels are frozen (eager code reads it / nothing reads it)
    eager_outputs: dict[str, str] = field(default_factory=dict)
    #: region input placeholders fed by eager code (name -> where from)
    eager_inputs: dict[str, str] = field(default_factory=dict)
    #: submodules that were tried and did not export: path -> first line of the reason
    untraceable: dict[str, str] = field(default_factory=dict)
    #: (region call ordinal, output leaf index) of the outputs crossing into eager code: checked end to end
    checked: list[tuple[int, int]] = field(default_factory=list)
    #: regions run as graphs carved from the shrunk program (their eager code keeps Python-side sizes)
    graph_regions: list[str] = field(default_factory=list)
    notes: str = ""
    #: per region call: (path, input leaves as stitched node names or constants, input spec, output leaves, spec)
    io: list[tuple[str, list[Any], Any, list[Any], Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"regions": list(self.regions), "calls": dict(self.calls), "eager_outputs": dict(self.eager_outputs),
                "eager_inputs": dict(self.eager_inputs), "untraceable": dict(self.untraceable),
                "graph_regions": list(self.graph_regions), "notes": self.notes}


def _trace_call(c: _Call) -> fx.GraphModule:
    return trace(c.module, tuple(c.args), dict(c.kwargs), copy_model=False, dynamic=False)


def find_regions(model: nn.Module, run: _Run, names: Sequence[str] | None = None
                 ) -> tuple[list[str], dict[int, fx.GraphModule], dict[str, str]]:
    """The region paths (top-down, or ``names``), the traced graph of every region call (by call id) and the
    submodules tried without success (path -> reason)."""
    by_path: dict[str, list[_Call]] = {}
    for c in run.calls:
        by_path.setdefault(c.path, []).append(c)
    graphs: dict[int, fx.GraphModule] = {}
    failed: dict[str, str] = {}

    def exports(path: str) -> bool:
        got: dict[int, fx.GraphModule] = {}
        for c in by_path[path]:
            try:
                got[c.id] = _trace_call(c)
            except TraceError as e:
                failed[path] = str(e).splitlines()[0][:300]
                return False
        graphs.update(got)
        return True

    if names is not None:
        mods = dict(model.named_modules())
        names = list(dict.fromkeys(names))
        for n in names:
            if not isinstance(n, str) or n not in mods or n == "":
                raise InputError(f"regions: {n!r} is not a submodule of {type(model).__name__}",
                                 fix="name submodules by their qualified names, e.g. regions=['backbone', "
                                     "'rpn.head'] (see model.named_modules())")
            if n not in by_path:
                raise InputError(f"regions: {n!r} owns no parameters or is never called on the example inputs",
                                 fix="name a submodule that runs in forward and has parameters")
        for a in names:
            for b in names:
                if a != b and b.startswith(a + "."):
                    raise InputError(f"regions: {b!r} lies inside {a!r}", fix="name disjoint submodules")
        for n in names:
            if not exports(n):
                raise TraceError(f"region {n!r} ({type(mods[n]).__name__}) cannot be traced: {failed[n]}",
                                 fix="name its traceable children instead, or use regions='auto'")
        regions = names
    else:
        regions = []

        def visit(path: str, mod: nn.Module) -> None:
            if path not in by_path:  # owns no parameters or never called
                return
            if path and exports(path):
                regions.append(path)
                return
            for child, sub in mod.named_children():
                visit(f"{path}.{child}" if path else child, sub)

        visit("", model)
    # a module inside a region must not also run outside it (its pruned weights would meet unpruned callers)
    inside = {c.id for c in run.calls if c.path in regions}
    region_params = {id(p) for r in regions for p in model.get_submodule(r).parameters()}
    for c in run.calls:
        if c.path in regions or any(s in inside for s in c.stack):
            continue
        shared = [n for n, p in c.module.named_parameters(recurse=False) if id(p) in region_params]
        if shared and not any(c.path.startswith(r + ".") for r in regions):
            raise TraceError(f"parameters of region modules ({c.path}.{shared[0]}) are also used by eager code",
                             fix="name regions that own their parameters alone")
    return regions, graphs, failed


# ================================================================================================ stitching
def _stitch(model: nn.Module, run: _Run, regions: list[str], graphs: dict[int, fx.GraphModule]
            ) -> tuple[fx.GraphModule, list[torch.Tensor], RegionPlan]:
    """One GraphModule over every region call (see the module doc), its example inputs and the plan."""
    region_calls = [c for c in run.calls if c.path in regions and graphs.get(c.id) is not None]
    region_ids = {c.id for c in region_calls}
    plan = RegionPlan(regions=list(regions), calls={r: sum(c.path == r for c in region_calls) for r in regions})
    graph = fx.Graph()
    root: dict[str, Any] = {}
    produced: dict[int, fx.Node] = {}  # id(eager output leaf) -> stitched node
    producer_of: dict[tuple[int, int], fx.Node] = {}  # (call id, leaf index) -> stitched node
    consumed_by_region: set[fx.Node] = set()
    inputs: list[torch.Tensor] = []
    user = dict(model.named_parameters(remove_duplicate=False))
    user.update(dict(model.named_buffers(remove_duplicate=False)))
    placeholders: list[fx.Node] = []
    body: list[tuple[_Call, fx.GraphModule]] = [(c, graphs[c.id]) for c in region_calls]

    # placeholders first (fx wants them at the top): pass 1 over the inputs
    env_inputs: dict[int, list[Any]] = {}
    pending_outputs: set[int] = set()
    for c, gm in body:
        leaves = tree_flatten((tuple(c.args), dict(c.kwargs)))[0]
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(phs) != len(leaves):
            raise TraceError(f"region {c.path!r}: {len(phs)} graph inputs for {len(leaves)} input leaves",
                             fix="report this model to fxprune")
        vals: list[Any] = []
        tag = (c.path or "root").replace(".", "_")
        for ph, leaf in zip(phs, leaves):
            if isinstance(leaf, torch.Tensor) and id(leaf) in pending_outputs:
                vals.append(("edge", id(leaf)))
            elif isinstance(leaf, torch.Tensor):
                node = graph.placeholder(f"{tag}__{ph.name}")
                node.meta = dict(ph.meta)
                placeholders.append(node)
                inputs.append(leaf.detach().clone())
                plan.eager_inputs[node.name] = f"input {ph.name} of {c.path}"
                vals.append(node)
            else:
                vals.append(leaf)  # a constant the region was specialised on
        env_inputs[c.id] = vals
        for leaf in tree_flatten(c.out)[0]:
            if isinstance(leaf, torch.Tensor):
                pending_outputs.add(id(leaf))

    for c, gm in body:
        prefix = f"{c.path}." if c.path else ""
        env: dict[fx.Node, Any] = {}
        in_leaves, in_spec = tree_flatten((tuple(c.args), dict(c.kwargs)))
        out_leaves_all, out_spec = tree_flatten(c.out)
        io_in: list[Any] = []
        io_out: list[Any] = []
        plan.io.append((c.path, io_in, in_spec, io_out, out_spec))
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for ph, v in zip(phs, env_inputs[c.id]):
            if isinstance(v, tuple) and len(v) == 2 and v[0] == "edge":
                node = produced[v[1]]
                consumed_by_region.add(node)
                env[ph] = node
            else:
                env[ph] = v
            io_in.append(_Ref(env[ph].name) if isinstance(env[ph], fx.Node) else env[ph])
        out_leaves = [leaf for leaf in tree_flatten(c.out)[0]]
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "call_module" and n.target == "_guards_fn":
                continue
            if n.op == "output":
                flat = n.args[0]
                flat = list(flat) if isinstance(flat, (list, tuple)) else [flat]
                if len(flat) != len(out_leaves):
                    raise TraceError(f"region {c.path!r}: {len(flat)} graph outputs for {len(out_leaves)} output "
                                     f"leaves", fix="report this model to fxprune")
                for i, (o, leaf) in enumerate(zip(flat, out_leaves)):
                    if isinstance(o, fx.Node) and isinstance(leaf, torch.Tensor):
                        produced[id(leaf)] = env[o]
                        producer_of[(c.id, i)] = env[o]
                    io_out.append(_Ref(env[o].name) if isinstance(o, fx.Node) else o)
                continue
            if n.op in ("get_attr", "call_module"):
                full = prefix + str(n.target)
                if full not in root:
                    root[full] = user.get(full, None)
                    if root[full] is None:
                        root[full] = _get(gm, str(n.target))
                new = graph.create_node(n.op, full, name=full.replace(".", "_"))
                new.meta = dict(n.meta)
                env[n] = new
                continue
            new = graph.node_copy(n, lambda a: env[a])
            new.meta = dict(n.meta)
            env[n] = new

    # outputs: region outputs no region consumes, or that eager code reads
    outs: list[fx.Node] = []
    names_of: dict[fx.Node, str] = {}
    ordinal = {c.id: k for k, c in enumerate(region_calls)}
    for (cid, i), node in producer_of.items():
        names_of.setdefault(node, f"{run.calls[cid].path} output {i}")
    eager_read: dict[fx.Node, str] = {}
    for stack, prod, idx in run.uses:
        node = producer_of.get((prod, idx))
        if node is None or any(s in region_ids for s in stack):
            continue
        where = next((run.calls[s].path for s in reversed(stack)), "") or type(model).__name__
        eager_read.setdefault(node, f"read by eager code in {where}")
    for node in dict.fromkeys(producer_of.values()):
        why = eager_read.get(node) or (None if node in consumed_by_region else "no region reads it (the model's "
                                       "result or eager code)")
        if why is not None:
            outs.append(node)
            plan.eager_outputs[node.name] = f"{names_of[node]}: {why}"
    tensor_leaf = {(c.id, j): j2 for c in region_calls
                   for j2, j in enumerate(i for i, x in enumerate(tree_flatten(c.out)[0]) if isinstance(x, torch.Tensor))}
    out_set = set(outs)
    plan.checked = sorted((ordinal[cid], tensor_leaf[(cid, i)]) for (cid, i), node in producer_of.items()
                          if node in out_set and (cid, i) in tensor_leaf)
    graph.output(tuple(outs))
    gm = fx.GraphModule(root, graph, class_name="Regions")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.meta["fxprune_tracer"] = TRACER + " (regions)"
    gm.meta["fxprune_dynamic_batch"] = False
    gm.meta["fxprune_root_class"] = type(model).__name__
    return gm, inputs, plan


@dataclass(frozen=True)
class _Ref:
    """A node of the stitched program, by name."""

    name: str


class RegionGraph(nn.Module):
    """A region run as a graph carved from the shrunk stitched program: takes the region's own (args, kwargs),
    returns its own output structure. Used where the region's eager code keeps Python-side channel counts (e.g. a
    ``split((self.c, self.c))``) that region pruning cannot update; shapes are those of the example."""

    def __init__(self, gm: fx.GraphModule, inputs: list[Any], in_spec: Any, outputs: list[Any], out_spec: Any,
                 cls: str):
        super().__init__()
        self.gm = gm
        self._inputs, self._in_spec, self._outputs, self._out_spec = inputs, in_spec, outputs, out_spec
        self.original_class = cls

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils._pytree import tree_unflatten
        leaves = tree_flatten((args, kwargs))[0]
        flat = [v for v, ref in zip(leaves, self._inputs) if isinstance(ref, _Ref)]
        got = iter(self.gm(*flat))
        return tree_unflatten([next(got) if isinstance(ref, _Ref) else ref for ref in self._outputs],
                              self._out_spec)


def _carve(gm: fx.GraphModule, io: tuple[str, list[Any], Any, list[Any], Any], cls: str) -> RegionGraph:
    """The part of the shrunk stitched ``gm`` computing one region call's outputs from its inputs."""
    path, ins, in_spec, outs, out_spec = io
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    seen_inputs: dict[str, fx.Node] = {}
    for k, ref in enumerate(ins):
        if isinstance(ref, _Ref):
            ph = graph.placeholder(f"in_{k}")
            src = nodes[ref.name]
            ph.meta = dict(src.meta)
            if ref.name in seen_inputs:  # the same tensor passed twice: one placeholder each, same value
                env.setdefault(src, ph)
            else:
                env[src] = ph
                seen_inputs[ref.name] = ph
    need: list[fx.Node] = []
    stack = [nodes[r.name] for r in outs if isinstance(r, _Ref)]
    mark: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in env or n in mark:
            continue
        if n.op == "placeholder":
            raise VerificationError(f"region {path!r}: its graph reads {n.name}, which is not one of its inputs",
                                    fix="report this model to fxprune")
        mark.add(n)
        stack.extend(a for a in n.all_input_nodes)
    for n in gm.graph.nodes:
        if n in mark:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[nodes[r.name]] for r in outs if isinstance(r, _Ref)))
    sub = fx.GraphModule(gm, graph, class_name=f"Region_{path.replace('.', '_')}")
    return RegionGraph(sub, list(ins), in_spec, list(outs), out_spec, cls)


def _get(mod: nn.Module, target: str) -> Any:
    obj: Any = mod
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ================================================================================================ pruned model
def _kept(program: Program) -> dict[str, tuple[np.ndarray | None, ...]]:
    return compose_kept_indices(program.records_of(ShrinkRecord))


def _write_back(model: nn.Module, tensors: dict[str, torch.Tensor], keep: dict[str, Any],
                facts: dict[str, Any], *, zero_fill: bool = False) -> nn.Module:
    """A deep copy of ``model`` whose tensors named in ``tensors`` are replaced (tied names stay tied), with the
    size attributes of resized standard modules updated. ``zero_fill``: embed each resized tensor into zeros of the
    original shape at its kept indices instead (the masked model)."""
    from .replay import _update_module

    out = copy.deepcopy(model)
    replaced: dict[int, torch.Tensor] = {}
    resized: dict[str, nn.Module] = {}
    with torch.no_grad():
        for mname, mod in out.named_modules(remove_duplicate=False):
            for store in (mod._parameters, mod._buffers):
                for attr, old in list(store.items()):
                    full = f"{mname}.{attr}" if mname else attr
                    if old is None or full not in tensors:
                        continue
                    if id(old) in replaced:
                        store[attr] = replaced[id(old)]
                        continue
                    val = tensors[full].detach().to(dtype=old.dtype, device=old.device)
                    entry = keep.get(full)
                    if entry is not None and zero_fill:
                        full_t = torch.zeros_like(old)
                        idx = [torch.arange(s) if k is None else torch.tensor(np.array(k), dtype=torch.long)
                               for s, k in zip(old.shape, entry)]
                        full_t[torch.meshgrid(*idx, indexing="ij")] = val
                        val = full_t
                    new = nn.Parameter(val.clone(), requires_grad=old.requires_grad) \
                        if isinstance(old, nn.Parameter) else val.clone()
                    store[attr] = new
                    replaced[id(old)] = new
                    if entry is not None and not zero_fill:
                        resized[mname] = mod
        unhandled = [f"{n} ({type(m).__name__})" for n, m in resized.items() if not _update_module(m, n, facts)]
    if unhandled:
        raise VerificationError(f"region pruning resized tensors of module types fxprune cannot update: "
                                f"{', '.join(unhandled[:6])}",
                                fix="name regions without those modules, or prune the model with fxprune.compile")
    return out


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _hooked(model: nn.Module, regions: list[str], args: tuple, kwargs: dict,
            substitute: dict[tuple[int, int], torch.Tensor] | None = None) -> tuple[list[list[torch.Tensor]], Any]:
    """Eval-mode output leaves of every region call (in call order) and the model's output. ``substitute``:
    {(region call ordinal, tensor leaf index): tensor} replaces those region output leaves as the model runs."""
    from torch.utils._pytree import tree_unflatten
    got: list[list[torch.Tensor]] = []

    def hook(m: nn.Module, a: Any, o: Any) -> Any:
        k = len(got)
        got.append(_leaves(o))
        if not substitute:
            return None
        flat, spec = tree_flatten(o)
        j = -1
        for i, leaf in enumerate(flat):
            if isinstance(leaf, torch.Tensor):
                j += 1
                if (k, j) in substitute:
                    flat[i] = substitute[(k, j)]
        return tree_unflatten(flat, spec)

    hs = [model.get_submodule(r).register_forward_hook(hook) for r in regions]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    finally:
        for h in hs:
            h.remove()
        for m, was in flags:
            m.training = was
    return got, out


def _close(ref: list[torch.Tensor], got: list[torch.Tensor], rtol: float) -> tuple[bool, float, str]:
    """``max|ref - got| <= rtol * max(1, max|ref|)`` per leaf (shapes equal, integer leaves exact)."""
    if len(ref) != len(got):
        return False, float("inf"), f"{len(ref)} vs {len(got)} tensors"
    worst = 0.0
    for i, (a, b) in enumerate(zip(ref, got)):
        if tuple(a.shape) != tuple(b.shape):
            return False, float("inf"), f"tensor {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if not a.numel():
            continue
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return False, float("inf"), f"tensor {i}: integer values differ"
            continue
        d = float((a.double() - b.double()).abs().max())
        worst = max(worst, d)
        if not d <= rtol * max(1.0, float(a.double().abs().max())):
            return False, worst, f"tensor {i}: max abs diff {d:.3g}"
    return True, worst, ""


def _runs_like(masked: nn.Module, pruned: nn.Module, plan: "RegionPlan", args: tuple, kwargs: dict, rtol: float
               ) -> tuple[bool, str]:
    """Whether the eagerly written-back model runs and matches the masked one on the example inputs."""
    try:
        r = verify_end_to_end(masked, pruned, plan, args, kwargs, seed=None, rtol=rtol)
    except Exception as e:  # noqa: BLE001 - any failure of the user's code on pruned sizes
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return bool(r["regions_ok"] and r["outputs_ok"]), r["why"]


def _graph_regions(pruned: nn.Module, gm: fx.GraphModule, plan: "RegionPlan") -> nn.Module:
    """Replace every region called once by its graph carved from the shrunk program (in place on ``pruned``)."""
    counts: dict[str, int] = {}
    for path, *_ in plan.io:
        counts[path] = counts.get(path, 0) + 1
    for io in plan.io:
        path = io[0]
        if counts[path] != 1:
            continue
        parent, _, leaf = path.rpartition(".")
        owner = pruned.get_submodule(parent) if parent else pruned
        setattr(owner, leaf, _carve(gm, io, type(owner.get_submodule(leaf)).__name__))
        plan.graph_regions.append(path)
    return pruned


def verify_end_to_end(masked: nn.Module, pruned: nn.Module, plan: "RegionPlan", args: tuple, kwargs: dict, *,
                      seed: int | None, rtol: float) -> dict[str, Any]:
    """Pruned vs masked model on fresh inputs (``seed=None``: the example inputs): the region outputs that cross into eager code (raw head outputs;
    those between regions are pruned) and the model's final outputs."""
    a, k = (args, kwargs) if seed is None else random_like(args, kwargs, seed)
    ref_r, ref_o = _hooked(masked, plan.regions, a, k)

    def pick(calls: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [calls[c][i] for c, i in plan.checked if c < len(calls) and i < len(calls[c])]

    # Top-k / NMS / thresholds in the eager glue are discontinuous: rounding-level differences of equal head outputs
    # can select other proposals, and then every later region sees other inputs. So the pruned model runs with the
    # masked model's values substituted for each region output that eager code reads (after recording its own):
    # each region is compared on the same eager state, and the glue must then reproduce the masked final outputs.
    sub = {(c, i): ref_r[c][i] for c, i in plan.checked if c < len(ref_r) and i < len(ref_r[c])}
    got_r, given = _hooked(pruned, plan.regions, a, k, substitute=sub)
    ok_r, d_r, why_r = (len(ref_r) == len(got_r), 0.0, f"{len(ref_r)} vs {len(got_r)} region calls")
    if ok_r:
        ok_r, d_r, why_r = _close(pick(ref_r), pick(got_r), rtol)
    ok_g, d_g, why_g = _close(_leaves(ref_o), _leaves(given), rtol)
    _, got_o = _hooked(pruned, plan.regions, a, k)  # and directly, as a user runs it
    ok_d, d_o, why_d = _close(_leaves(ref_o), _leaves(got_o), rtol)
    ok_o, why_o = ok_g, why_g
    res = {"regions_ok": ok_r, "regions_max_abs_diff": d_r, "outputs_ok": ok_o, "outputs_max_abs_diff": d_o,
           "outputs_direct_ok": ok_d, "outputs_given_heads_max_abs_diff": d_g,
           "region_tensors": len(pick(ref_r)), "output_tensors": len(_leaves(ref_o))}
    if ok_g and not ok_d:
        res["note"] = (f"final outputs differ directly ({why_d}: top-k/NMS select other boxes on rounding-level "
                       f"head differences) and agree given equal head outputs")
    res["why"] = (why_r if not ok_r else "") or (why_o if not ok_o else "")
    return res


# ================================================================================================ compile
@dataclass
class RegionCompiled(Compiled):
    """:class:`~fxprune.compile.Compiled` for region pruning: ``module`` is a pruned copy of the user's model (its
    own class), ``program`` the stitched region program, ``plan`` the regions, ``end_to_end`` the check."""

    plan: RegionPlan | None = None
    end_to_end: dict[str, Any] = field(default_factory=dict)
    example: tuple[tuple, dict] = ((), {})

    def save(self, dir: Any, **kw: Any) -> Any:
        """The stitched program as a standard archive (:func:`fxprune.archive.save`) plus :data:`REGIONS_FILE`
        (regions, the pruned model's full state, the model's example inputs and outputs)."""
        from .archive import save as save_archive

        proxy = Compiled(self.program.gm, self.report, self.program)
        folder = save_archive(proxy, dir, **kw)
        ref = _leaves(_hooked(self.module, [], *self.example)[1])
        torch.save({"format": 1, "plan": self.plan.to_dict() if self.plan else {},
                    "model_class": type(self.module).__name__,
                    "weights": {n: t.detach().cpu().clone() for n, t in named_tensors(self.module).items()},
                    "keep": {n: [None if k is None else [int(i) for i in k] for k in v]
                             for n, v in _kept(self.program).items()},
                    "facts": graph_facts(self.program.gm),
                    "args": self.example[0], "kwargs": self.example[1], "outputs": ref},
                   Path(folder) / REGIONS_FILE)
        return folder


def compile_regions(model: nn.Module, example_inputs: Any, passes: Iterable[Pass] | None = None, *,
                    regions: str | Sequence[str] = "auto", example_kwargs: dict | None = None, seed: int = 0,
                    verify: bool = True, rtol: float | None = None, data: Any = None, count_flops: bool = True,
                    e2e_rtol: float = 1e-3) -> RegionCompiled:
    """Prune the traceable regions of ``model`` (see the module doc); the arguments are :func:`fxprune.compile`'s.
    ``regions``: ``"auto"`` (top-down search) or submodule names. ``e2e_rtol``: bound of the end-to-end check
    (relative to each output's scale). The user's model is never modified."""
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}",
                         fix="pass an nn.Module instance")
    _check_run_options(seed, verify, rtol)
    if not (regions == "auto" or (isinstance(regions, (list, tuple)) and regions
                                  and all(isinstance(r, str) for r in regions))):
        raise InputError(f"regions must be 'auto' or a non-empty list of submodule names, got {regions!r}",
                         fix="e.g. regions='auto' or regions=['backbone', 'head']")
    passes = default_passes() if passes is None else list(passes)
    timings: dict[str, float] = {}

    def timed(p: Pass, r: PassResult, dt: float) -> None:
        timings[p.name] = timings.get(p.name, 0.0) + dt

    pm = PassManager(passes, on_pass=timed)
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    run = _record(model, args, kwargs)
    names, graphs, failed = find_regions(model, run, None if regions == "auto" else list(regions))
    if not names:
        raise TraceError(f"no submodule of {type(model).__name__} that owns parameters can be traced "
                         f"({len(failed)} tried; e.g. {next(iter(failed.items()), ('-', '-'))})",
                         fix="make the model's layers traceable (fxprune.trace explains each failure)")
    gm, inputs, plan = _stitch(model, run, names, graphs)
    plan.untraceable = failed
    t1 = time.perf_counter()
    timings["trace"] = t1 - t0
    log.info("regions of %s: %s", type(model).__name__, ", ".join(names))
    program = Program(gm, tuple(inputs), {}, source=model)
    initial_groups = program.groups
    timings["analyze"] = time.perf_counter() - t1
    ctx = PassContext(seed=seed, data=data, verify=verify, rtol=rtol, dense=gm)
    macs_before = count_macs(gm, tuple(inputs), {}) if count_flops else 0
    final, results = pm.run(program, ctx)
    t2 = time.perf_counter()
    if final.stage is Stage.SELECTED:
        raise InputError("region pruning needs a Shrink at the end of the passes",
                         fix="end the passes with Shrink() (the pruned model is built from its kept indices)")
    keep = _kept(final)
    tensors = {n: t for n, t in named_tensors(final.gm).items()}
    facts = graph_facts(final.gm)
    pruned = _write_back(model, tensors, keep, facts)
    masked = _write_back(model, tensors, keep, facts, zero_fill=True)
    e2e: dict[str, Any] = {}
    eager_ok, why = _runs_like(masked, pruned, plan, args, kwargs, e2e_rtol)
    if not eager_ok:  # the regions' Python code keeps sizes pruning changed: run them as carved graphs
        log.warning("%s: the pruned regions do not run eagerly (%s); running them as graphs", type(model).__name__,
                    why)
        pruned = _graph_regions(pruned, final.gm, plan)
        plan.notes = why
    if verify:
        e2e = verify_end_to_end(masked, pruned, plan, args, kwargs, seed=seed + 1, rtol=e2e_rtol)
        if not (e2e["regions_ok"] and e2e["outputs_ok"]):
            raise VerificationError(f"the pruned {type(model).__name__} differs from the masked model end to end "
                                    f"({e2e['why']})", fix="report this model to fxprune; regions: "
                                                          + ", ".join(names))
    report = _report(model, initial_groups, program, final, results, count_params(model), macs_before,
                     count_flops)
    report.params_before, report.params_after = count_params(model), count_params(pruned)
    report.tracer = TRACER + " (regions)"
    report.frozen_by = report.frozen_by + [{"node": n, "op": "eager", "reason": why}
                                           for n, why in plan.eager_outputs.items()]
    report.notes = [f"regions ({len(names)}): {', '.join(names)}; the rest of {type(model).__name__} runs eagerly, "
                    f"unchanged", f"{len(plan.eager_outputs)} region outputs cross into eager code: their channels "
                    f"are frozen (frozen_by, op 'eager')",
                    "MACs count the regions only"] + list(report.notes)
    if e2e:
        report.notes.append(f"end to end vs masked model: {e2e['region_tensors']} region outputs max abs diff "
                            f"{e2e['regions_max_abs_diff']:.3g}, {e2e['output_tensors']} model outputs max abs diff "
                            f"{e2e['outputs_max_abs_diff']:.3g}" + (f" ({e2e['note']})" if e2e.get("note") else ""))
    timings["report"] = time.perf_counter() - t2
    report.timings = {k: round(v, 4) for k, v in timings.items()}
    report.seconds = time.perf_counter() - t0
    pruned.eval()
    return RegionCompiled(pruned, report, final, plan=plan, end_to_end=e2e, example=(args, kwargs))


# ================================================================================================ replay
def replay_regions(model: nn.Module, pruned: Any, *, inplace: bool = False, check: bool = True,
                   rtol: float = 1e-4) -> nn.Module:
    """The pruned ``model`` from a :class:`RegionCompiled` or a folder a region save wrote (its
    :data:`REGIONS_FILE`); ``check`` reproduces the saved outputs on the saved example inputs."""
    graph_regions = pruned.plan.graph_regions if isinstance(pruned, RegionCompiled) and pruned.plan else None
    if isinstance(pruned, RegionCompiled):
        tensors = named_tensors(pruned.module)
        keep = {n: list(v) for n, v in _kept(pruned.program).items()}
        facts, cls = graph_facts(pruned.program.gm), type(pruned.module).__name__
        args, kwargs = pruned.example
        ref = _leaves(_hooked(pruned.module, [], args, kwargs)[1])
    else:
        path = Path(pruned) / REGIONS_FILE
        if not path.is_file():
            raise LoadError(f"{pruned} holds no {REGIONS_FILE}", fix="save a region pruning with out.save(folder)")
        d = torch.load(path, weights_only=True)
        tensors, keep, facts, cls = d["weights"], d["keep"], d["facts"], d["model_class"]
        graph_regions = d["plan"].get("graph_regions")
        args, kwargs, ref = d["args"], d["kwargs"], d["outputs"]
    if graph_regions:
        raise LoadError(f"regions {graph_regions} of this pruning run as graphs (their Python code keeps channel "
                        f"counts pruning changed), so the pruning cannot be replayed into {cls}'s own modules",
                        fix="keep the pruned model itself: torch.save(out.module, path) / "
                            "torch.load(path, weights_only=False)")
    if type(model).__name__ != cls:
        raise LoadError(f"the region pruning was made from a {cls}, got a {type(model).__name__}",
                        fix=f"pass a fresh instance of {cls} built with the same configuration")
    have = named_tensors(model)
    for n, entry in keep.items():
        if n in have and len(entry) != have[n].dim():
            raise LoadError(f"parameter {n!r}: the model has shape {tuple(have[n].shape)}, the pruning was recorded "
                            f"on a tensor of {len(entry)} dims", fix=f"pass an instance of {cls} of the same config")
    missing = [n for n in have if n not in tensors]
    if missing:
        raise LoadError(f"the region pruning has no tensor for {missing[:3]}", fix=f"pass an instance of {cls}")
    out = _write_back(model, tensors, keep, facts)
    if inplace:
        model.load_state_dict(out.state_dict(), strict=True, assign=True)
        for (n, m), (_, m2) in zip(model.named_modules(), out.named_modules()):
            for a in ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                      "normalized_shape", "num_channels", "num_groups"):
                if hasattr(m2, a):
                    setattr(m, a, getattr(m2, a))
        out = model
    if check:
        got = _leaves(_hooked(out, [], args, kwargs)[1])
        ok, diff, why = _close(ref, got, rtol)
        if not ok:
            raise LoadError(f"the replayed {cls} does not reproduce the saved outputs ({why})",
                            fix="save the region pruning again")
    out.eval()
    return out
