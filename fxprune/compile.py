"""``fxprune.compile`` and ``fxprune.analyze``: the public entry points."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch.fx as fx
import torch.nn as nn

from .errors import InputError
from .flops import count_macs, count_params
from .groups import GroupSet
from .masking import apply_channel_masks, apply_weight_masks
from .pass_manager import Pass, PassContext, PassManager
from .program import Program
from .report import GroupRow, Report
from .trace import TRACER, normalize_inputs, trace


@dataclass
class Compiled:
    """The result of :func:`compile`: a runnable module, its report and the final program."""

    module: fx.GraphModule
    report: Report
    program: Program

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @property
    def groups(self) -> GroupSet:
        return self.program.groups

    def save(self, dir: Any, **kw: Any) -> Any:
        """Write program, weights, recipe and report to ``dir``; see :func:`fxprune.serialize.save`."""
        from .serialize import save

        return save(self, dir, **kw)

    def benchmark(self, **kw: Any) -> dict:
        """Dense vs pruned latency; see :func:`fxprune.latency.benchmark`."""
        from .latency import benchmark

        return benchmark(self, **kw)

    def export_onnx(self, path: Any, **kw: Any) -> Any:
        """Export the pruned module to ONNX; see :func:`fxprune.latency.export_onnx`."""
        from .latency import export_onnx

        return export_onnx(self, path, **kw)


def analyze(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None) -> GroupSet:
    """Trace ``model`` and return its coupled-channel groups (printable; ``as_dict()``/``to_json()``).

    Works on meta-device models: nothing is materialised, so pruning of models larger than RAM can be planned.
    """
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    gm = trace(model, args, kwargs, copy_model=_needs_copy(model))
    return Program(gm, args, kwargs, source=model).groups


def _needs_copy(model: nn.Module) -> bool:
    # analysis never writes to parameters, so a meta-device model needs no (cheap anyway) copy; others are copied
    # to keep the user's module untouchable by later passes.
    return not all(p.is_meta for p in model.parameters())


def compile(model: nn.Module, example_inputs: Any, passes: Iterable[Pass] | None = None, *,
            example_kwargs: dict | None = None, seed: int = 0, verify: bool = True, rtol: float = 1e-4,
            data: Any = None, count_flops: bool = True) -> Compiled:
    """Trace ``model``, run ``passes`` (default: ``[ChannelPrune(ratio=0.5), Shrink()]``) and return a
    :class:`Compiled` with the new module and a report. The user's model is never modified.

    ``example_inputs``: a tensor, a tuple of positional args, or a dict of keyword args (``example_kwargs`` adds
    keyword args to positional ones). ``seed`` drives every random choice. ``verify`` checks shrunk == masked.
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}",
                         fix="pass an nn.Module instance (wrap plain functions in a Module)")
    if passes is None:
        from fxprune.passes import ChannelPrune, Shrink

        passes = [ChannelPrune(ratio=0.5), Shrink()]
    passes = list(passes)
    pm = PassManager(passes)  # validates pass objects before the (slow) trace
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    gm = trace(model, args, kwargs)
    program = Program(gm, args, kwargs, source=model, meta={"tracer": TRACER})
    initial_groups = program.groups
    ctx = PassContext(seed=seed, data=data, verify=verify, rtol=rtol, dense=gm)
    params_before = count_params(gm)
    macs_before = count_macs(gm, args, kwargs) if count_flops else 0
    final, results = pm.run(program, ctx)
    if final.meta.get("masked") is not True and (final.masks or final.weight_masks):
        final = final.clone(deep=True)  # selection without Shrink: return the masked module
        apply_channel_masks(final.gm, final.groups, final.leaf_keep())
        apply_weight_masks(final.gm, final.weight_masks)
        final.meta["masked"] = True
    report = _report(model, initial_groups, program, final, results, params_before, macs_before, count_flops)
    report.seconds = time.perf_counter() - t0
    return Compiled(final.gm, report, final)


def _report(model: nn.Module, groups: GroupSet, initial: Program, final: Program, results: list,
            params_before: int, macs_before: int, count_flops: bool) -> Report:
    kept: dict[int, int] = {}
    first_shrink = next((r for name, r, _ in results if name == "shrink" and "kept" in r.stats), None)
    if first_shrink is not None:
        kept = first_shrink.stats["kept"]
    elif final.analyses.get("groups") is groups:
        kept = {gid: int(m.sum()) for gid, m in final.masks.items()}
    importance = {}
    for _, r, _ in results:
        importance.update(r.program.meta.get("importance", {}) if "importance" in r.program.meta else {})
    rows = [GroupRow(g.id, g.label, g.kind, len(g.members), g.size, kept.get(g.id, g.size),
                     None if g.prunable else g.frozen, importance.get(g.id)) for g in groups]
    verified = max_diff = observable = None
    for name, r, _ in results:
        if r.stats.get("verified") is not None:
            verified = bool(r.stats["verified"]) if verified is None else (verified and bool(r.stats["verified"]))
            max_diff = max(max_diff or 0.0, float(r.stats["max_abs_diff"]))
            observable = r.stats.get("observable")
    return Report(
        model=type(model).__name__,
        tracer=initial.meta.get("tracer", TRACER),
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
    )
