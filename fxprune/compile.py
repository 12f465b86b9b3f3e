"""``fxprune.compile`` and ``fxprune.analyze``: the public entry points.

The core never imports pass families or backends. ``compile(passes=None)`` resolves its default pipeline by
registered pass name, and ``Compiled.benchmark``/``export_onnx``/``save`` reach the front-door modules through
:func:`_plugin` (an import by module name at call time, so ``import fxprune`` stays free of them).
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import InputError, TraceError
from .flops import count_macs, count_params
from .groups import GroupSet
from .log import get_logger
from .masking import masked_copy
from .module import PrunedModule
from .pass_manager import PASS_REGISTRY, Pass, PassContext, PassManager, PassResult
from .program import Program, Stage
from .records import SelectionRecord, ShrinkRecord
from .report import GroupRow, Report
from .trace import TRACER, InputSpec, normalize_inputs, trace

#: the pipeline ``compile(passes=None)`` runs: (registered pass name, options)
DEFAULT_PIPELINE: tuple[tuple[str, dict[str, Any]], ...] = (("channel_prune", {"ratio": 0.5}), ("shrink", {}))
log = get_logger("compile")

#: where the built-in passes register themselves (imported by name when the registry lacks a default pass)
BUILTIN_PASSES_MODULE = "fxprune.passes"


def _plugin(module: str) -> Any:
    """Import a front-door or family module by name at call time (never at import time of the core)."""
    return importlib.import_module(module)


def default_passes() -> list[Pass]:
    """Fresh instances of :data:`DEFAULT_PIPELINE`."""
    if any(name not in PASS_REGISTRY for name, _ in DEFAULT_PIPELINE):
        _plugin(BUILTIN_PASSES_MODULE)
    return [PASS_REGISTRY[name](**opts) for name, opts in DEFAULT_PIPELINE]


@dataclass
class Compiled:
    """The result of :func:`compile`: a runnable module, its report and the final program.

    ``module`` is a :class:`~fxprune.module.PrunedModule` (a GraphModule, returned in eval mode): ``.train()``
    switches BatchNorm and dropout to training behaviour for fine-tuning, ``torch.save``/``torch.load`` (with
    ``weights_only=False``) and ``state_dict()`` (the original model's parameter names) work, and its inputs are
    checked with readable errors (dynamic dims: ``report.dynamic_dims``). ``program.gm`` is the final program's
    graph module; it shares the module's parameters and buffers."""

    module: fx.GraphModule
    report: Report
    program: Program

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @property
    def groups(self) -> GroupSet:
        return self.program.groups

    def save(self, dir: Any, **kw: Any) -> Any:
        """Write program, weights, recipe and report to the folder ``dir`` (atomically); see
        :func:`fxprune.archive.save`."""
        return _plugin("fxprune.archive").save(self, dir, **kw)

    def benchmark(self, **kw: Any) -> Any:
        """Dense vs pruned latency; see :func:`fxprune.latency.benchmark`."""
        return _plugin("fxprune.latency").benchmark(self, **kw)

    def export_onnx(self, path: Any, **kw: Any) -> Any:
        """Export the pruned module to ONNX; see :func:`fxprune.latency.export_onnx`."""
        return _plugin("fxprune.latency").export_onnx(self, path, **kw)


def analyze(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None) -> GroupSet:
    """Trace ``model`` and return its coupled-channel groups (printable; ``as_dict()``/``to_json()``).

    Works on meta-device models: nothing is materialised, so pruning of models larger than RAM can be planned.
    """
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    gm = trace(model, args, kwargs, copy_model=False)  # analysis never writes to parameters: no copy needed
    t0 = time.perf_counter()
    groups = Program(gm, args, kwargs, source=model).groups
    log.info("analyze: %.2f s, %d groups (%d prunable)", time.perf_counter() - t0, len(groups),
             len(groups.prunable()))
    return groups


def _own_tensors(gm: nn.Module, model: nn.Module) -> int:
    """Give ``gm`` private copies of every tensor it still shares with the user's ``model`` (ties preserved).

    compile traces the user's model without copying it: the traced program reads the user's weights, passes that
    write weights work on copies (the pass manager) or build new tensors (Shrink), so only what no pass touched is
    still shared at the end, and only that is copied here. Returns the number of tensors copied."""
    def ptr(t: Any) -> int | None:
        if not isinstance(t, torch.Tensor) or t.is_meta or not t.numel() or t.layout != torch.strided:
            return None  # sparse layouts (e.g. BSR weights) are always new tensors
        return t.untyped_storage().data_ptr()

    user = {p for p in map(ptr, list(model.parameters()) + list(model.buffers())) if p is not None}
    if not user:
        return 0
    memo: dict[int, torch.Tensor] = {}
    copied = 0
    with torch.no_grad():
        for mod in gm.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if ptr(t) not in user:
                        continue
                    if id(t) not in memo:
                        c = t.detach().clone()
                        memo[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                            else c
                        copied += 1
                    store[name] = memo[id(t)]
            for name, t in list(vars(mod).items()):  # lifted constants (plain tensor attributes)
                if ptr(t) in user:
                    if id(t) not in memo:
                        memo[id(t)] = t.detach().clone()
                        copied += 1
                    setattr(mod, name, memo[id(t)])
    return copied


def _check_run_options(seed: Any, verify: Any, rtol: Any) -> None:
    """``seed``: an int >= 0; ``verify``: a bool; ``rtol``: None (bound derived from the arithmetic, see
    docs/verification.md) or a finite number in (0, 1)."""
    import math
    import numbers
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"seed must be an int >= 0, got {seed!r}", fix="pass e.g. seed=0")
    if not isinstance(verify, bool):
        raise InputError(f"verify must be True or False, got {verify!r}", fix="pass verify=True or verify=False")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float))
                             or not math.isfinite(rtol) or not 0 < rtol < 1):
        raise InputError(f"rtol must be None or a number in (0, 1), got {rtol!r}",
                         fix="leave rtol=None (bound from the arithmetic) or pass e.g. rtol=1e-3")


def compile(model: nn.Module, example_inputs: Any, passes: Iterable[Pass] | None = None, *,
            example_kwargs: dict | None = None, seed: int = 0, verify: bool = True, rtol: float | None = None,
            data: Any = None, count_flops: bool = True, dynamic: Any = None, regions: Any = None) -> Compiled:
    """Trace ``model``, run ``passes`` (default: ``[ChannelPrune(ratio=0.5), Shrink()]``) and return a
    :class:`Compiled` with the new module and a report. The user's model is never modified.

    ``example_inputs``: a tensor, a tuple of positional args, or a dict of keyword args (``example_kwargs`` adds
    keyword args to positional ones). ``seed`` drives every random choice. ``verify`` checks shrunk == masked.
    ``report.timings`` gives the seconds of each phase (trace, analyze, each pass by name, report).
    ``dynamic``: which input dims the pruned module accepts at any size. Default (``None``): the batch (dim 0 of
    the inputs of the example's batch size, also from a batch-1 example) and the sequence length of integer
    ``(B, T)`` inputs, where the model allows it (if not, a logged warning and ``report.notes`` say so);
    ``False``: the example's shapes only; a dict ``{input name: {dim: name}}`` (e.g.
    ``{"input_ids": {0: "batch", 1: "seq"}}``): exactly those dims (a :class:`~fxprune.errors.TraceError` if the
    model fixes one). Progress is logged to the ``"fxprune"`` logger (quiet unless logging is configured).
    ``regions``: ``None`` (default) traces the whole model; ``"auto"`` does too, and where that fails on
    data-dependent code (detectors' anchors, matching, NMS) prunes the largest traceable submodules and keeps the
    rest eager; a list of submodule names prunes exactly those (see :mod:`fxprune.regions`; the result's
    ``module`` is then a pruned copy of the user's model, of its class).
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}",
                         fix="pass an nn.Module instance (wrap plain functions in a Module)")
    _check_run_options(seed, verify, rtol)
    passes = default_passes() if passes is None else list(passes)
    timings: dict[str, float] = {}

    def timed(p: Pass, r: PassResult, dt: float) -> None:
        timings[p.name] = timings.get(p.name, 0.0) + dt
        log.info("pass %s: %.2f s%s", p.name, dt, _pass_details(r))

    pm = PassManager(passes, on_pass=timed)  # validates pass objects before the (slow) trace
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    region_opts = dict(passes=passes, example_kwargs=example_kwargs, seed=seed, verify=verify, rtol=rtol, data=data,
                       count_flops=count_flops)
    if regions is not None and regions != "auto":  # named regions: fxprune.regions (a front door, by name)
        return _plugin("fxprune.regions").compile_regions(model, example_inputs, regions=regions, **region_opts)
    try:
        gm = trace(model, args, kwargs, copy_model=False, dynamic=dynamic)  # shares the user's weights (read only)
    except TraceError as e:
        if regions != "auto" or getattr(e, "cause", None) not in ("control_flow", "unsupported_op", "other"):
            raise
        log.warning("%s does not trace as a whole (%s): pruning its traceable regions", type(model).__name__,
                    getattr(e, "cause", None))
        return _plugin("fxprune.regions").compile_regions(model, example_inputs, regions="auto", **region_opts)
    t1 = time.perf_counter()
    timings["trace"] = t1 - t0
    program = Program(gm, args, kwargs, source=model)
    initial_groups = program.groups
    timings["analyze"] = time.perf_counter() - t1
    log.info("analyze: %.2f s, %d groups (%d prunable); running %d passes: %s", timings["analyze"],
             len(initial_groups), len(initial_groups.prunable()), len(passes), ", ".join(p.name for p in passes))
    ctx = PassContext(seed=seed, data=data, verify=verify, rtol=rtol, dense=gm)
    params_before = count_params(gm)
    macs_before = count_macs(gm, args, kwargs) if count_flops else 0
    final, results = pm.run(program, ctx)
    t2 = time.perf_counter()
    if final.stage is Stage.SELECTED:  # selection without Shrink: return the masked module (copy-on-write)
        final = final.clone(deep=False)
        final.gm = masked_copy(final.gm, final.groups, final.leaf_keep(), final.weight_masks)
        final.stage = Stage.MASKED
    _own_tensors(final.gm, model)
    spec = gm.meta.get("fxprune_inputs")
    module = PrunedModule.from_graph_module(final.gm, spec=spec, source=model)
    report = _report(model, initial_groups, program, final, results, params_before, macs_before, count_flops)
    if isinstance(spec, InputSpec):
        report.dynamic_dims = {k: {str(d): n for d, n in v.items()} for k, v in spec.dynamic_dims().items()}
        report.notes = list(spec.notes) + list(report.notes)
    timings["report"] = time.perf_counter() - t2
    report.timings = {k: round(v, 4) for k, v in timings.items()}
    report.seconds = time.perf_counter() - t0
    log.info("compiled %s in %.2f s: params %s -> %s, MACs %s -> %s%s", type(model).__name__, report.seconds,
             f"{report.params_before:,}", f"{report.params_after:,}", f"{report.macs_before:,}",
             f"{report.macs_after:,}", "" if report.verified is None else
             f", verified {'yes' if report.verified else 'NO'}")
    return Compiled(module, report, final)


def _pass_details(r: PassResult) -> str:
    """``, verified (max abs diff 3e-07)`` etc. from a pass's stats, for the log."""
    st = r.stats or {}
    parts = []
    if st.get("verified") is not None:
        parts.append(("verified" if st["verified"] else "NOT verified")
                     + (f" (max abs diff {float(st['max_abs_diff']):.3g})" if st.get("max_abs_diff") is not None
                        else ""))
    for k in ("groups", "pruned", "kept"):
        if isinstance(st.get(k), (int, float)) and not isinstance(st.get(k), bool):
            parts.append(f"{k} {st[k]}")
    return (", " + ", ".join(parts)) if parts else ""


def _report(model: nn.Module, groups: GroupSet, initial: Program, final: Program, results: list,
            params_before: int, macs_before: int, count_flops: bool) -> Report:
    kept: dict[int, int] = {}
    shrinks = final.records_of(ShrinkRecord)
    if shrinks:
        kept = dict(shrinks[0].kept_channels)  # group ids of the first Shrink are the initial graph's
    elif final.analyses.cached("groups") is groups:
        kept = {gid: int(m.sum()) for gid, m in final.masks.items()}
    importance: dict[int, tuple[float, float, float]] = {}
    for rec in final.records:
        if isinstance(rec, ShrinkRecord):
            break  # later selections index the shrunk graph's groups
        if isinstance(rec, SelectionRecord):
            importance.update(rec.importance)
    used = _groups_used(results, groups)  # e.g. ChannelPrune(norms="exact") unfreezes the normalised dims
    rows = [GroupRow(g.id, g.label, g.kind, len(g.members), g.size, kept.get(g.id, g.size),
                     None if used[g.id].prunable else used[g.id].frozen, importance.get(g.id)) for g in groups]
    verified = max_diff = observable = approximate = None
    norms: dict[str, str] = {}
    for name, r, _ in results:
        if r.stats.get("verified") is not None:
            verified = bool(r.stats["verified"]) if verified is None else (verified and bool(r.stats["verified"]))
            max_diff = max(max_diff or 0.0, float(r.stats["max_abs_diff"]))
            observable = r.stats.get("observable")
        if r.stats.get("approximate") is True and "max_abs_diff" in r.stats:  # renormalized norms (Shrink): a
            # measured deviation, never "verified" (other passes' "approximate" lists are their own notes)
            approximate, verified = True, None
            max_diff = max(max_diff or 0.0, float(r.stats["max_abs_diff"]))
            observable = r.stats.get("observable")
        norms.update(r.stats.get("norms") or {})
    if approximate:
        verified = None
    return Report(
        model=type(model).__name__,
        tracer=str(initial.gm.meta.get("fxprune_tracer", TRACER)),
        dynamic_batch=bool(initial.gm.meta.get("fxprune_dynamic_batch", False)),
        params_before=params_before,
        params_after=count_params(final.gm),
        macs_before=macs_before,
        macs_after=count_macs(final.gm, final.args, final.kwargs) if count_flops else 0,
        verified=verified,
        max_abs_diff=max_diff,
        observable=observable,
        groups=rows,
        passes=[h for h in final.history],
        unknown_ops=dict(groups.analysis.unknown_ops),
        frozen_by=[{"node": n, "op": o, "reason": why} for n, o, why in groups.analysis.frozen_nodes],
        approximate=approximate,
        norms=norms,
    )


def _groups_used(results: list, groups: GroupSet) -> GroupSet:
    """The groups analysis the first Shrink pruned with: a selection pass may have replaced the initial one by an
    analysis of the same groups with other freezes (``ChannelPrune(norms=...)``)."""
    used = groups
    for _, r, _ in results:
        if r.program.records_of(ShrinkRecord):
            break
        g = r.program.analyses.cached("groups")
        if g is not None and len(g) == len(groups):
            used = g
    return used
