"""Shrink: physically remove the masked channels, rewrite shape constants, and verify against the masked program."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fxprune.analyzer import size_hint
from fxprune.errors import PassError, VerificationError
from fxprune.masking import (apply_weight_masks, expected_shapes, masked_copy, masked_view, norm_sites, param_keep,
                             rewrite_shape_constants, shrunk_copy)
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program, Stage
from fxprune.records import ShrinkRecord
from fxprune.shape_prop import propagate_shapes
from fxprune.verify import node_keep, verify


@register_pass
class Shrink(Pass):
    """Slice parameters and buffers of removed channels and rewrite view/reshape/expand sizes, split sizes, conv
    and GroupNorm group counts, slice bounds and SDPA's default scale. Then (``verify=True``, the default) the
    shrunk module must equal the masked module on fresh random inputs, or the pass fails."""

    name = "shrink"
    requires = frozenset({"groups"})
    modifies_weights = True
    changes_graph = True
    builds_new_module = True  # program.gm is never modified: shrunk and masked modules are copy-on-write copies

    def __init__(self, verify: bool = True, rtol: float | None = None):
        self.verify = verify
        self.rtol = rtol

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gs = program.groups
        leaf_keep = program.leaf_keep()
        src = program.gm  # shared with the previous program: read only
        if not leaf_keep or all(m.all() for m in leaf_keep.values()):
            if program.weight_masks and program.stage is Stage.SELECTED:
                program.gm = masked_copy(src, gs, leaf_keep, program.weight_masks)
            program.masks, program.divisors = {}, {}
            program.stage = Stage.SHRUNK
            return PassResult(program, changed=False, stats={"removed_channels": 0})
        keep = param_keep(gs, leaf_keep)  # once: slicing, masking and the record all use it
        alias = gs.analysis.param_alias
        # slice the unmasked weights: the kept slices are exactly the masked module's (masking only zeroes removed
        # channels); fine-grained masks follow their parameters and are applied to private copies
        shrunk = shrunk_copy(src, gs, leaf_keep, private=[alias.get(n, n) for n in program.weight_masks], keep=keep)
        new_wm = {}
        for name, wm in program.weight_masks.items():
            for d, k in enumerate(keep.get(alias.get(name, name), [])):
                if k is not None:
                    wm = wm.index_select(d, torch.from_numpy(np.nonzero(k)[0]))
            new_wm[name] = wm
        apply_weight_masks(shrunk, new_wm)
        rewritten = rewrite_shape_constants(shrunk, gs, leaf_keep)
        self._propagate_and_check(shrunk, program, gs, leaf_keep)
        kept_channels = {gid: int(m.sum()) for gid, m in program.masks.items()}
        record = ShrinkRecord.from_keep_masks(
            keep, {n: tuple(program.param(n).shape) for n, dims in keep.items() if any(k is not None for k in dims)},
            kept_channels)
        stats = {"kept": kept_channels,
                 "removed_channels": int(sum((~m).sum() for m in leaf_keep.values())),
                 "rewritten_nodes": len(rewritten)}
        norms = norm_sites(gs, leaf_keep)  # normalisations whose width shrank, with their mode
        approx = sorted(n for n, s in norms.items() if s["mode"] == "renormalize")
        if norms:
            stats["norms"] = {(s["module"] or n) + f" ({n})": s["mode"] for n, s in norms.items()}
            record = dataclasses.replace(record, norms=norms)
        on_meta = any(t.is_meta for t in list(shrunk.parameters()) + list(shrunk.buffers()))
        if on_meta:
            stats.update({"verified": None, "verify_skipped": "meta-device model: no values to compare"})
        elif approx:  # norms over the kept width are not the masked program by design: measure, never "verified"
            if self.verify and ctx.verify:
                stats.update(approximate_deviation(src, shrunk, gs, leaf_keep, program, ctx, keep, approx))
        elif self.verify and ctx.verify:
            masked = masked_view(src, gs, leaf_keep, program.weight_masks, keep=keep)  # no weight copies
            rtol = self.rtol if self.rtol is not None else ctx.rtol
            res = verify(masked, shrunk, program.args, program.kwargs, seed=ctx.seed + 1, rtol=rtol, dense=ctx.dense,
                         keep=lambda: node_keep(gs, leaf_keep))
            del masked
            stats.update(res.stats())
            if not res.ok:
                message, fix = res.explain()  # structural mismatch, noise above the bound, NaN/Inf or shapes
                err = VerificationError(message, fix=fix)
                err.result = res
                raise err
        program.gm = shrunk
        program.masks, program.divisors = {}, {}
        program.weight_masks = new_wm
        program.stage = Stage.SHRUNK
        return PassResult(program, changed=True, stats=stats, record=record)

    @staticmethod
    def _propagate_and_check(gm, program: Program, gs, leaf_keep) -> None:
        """Re-derive shape metadata on the shrunk graph and compare with the shapes the masks imply."""
        propagate_shapes(gm, program, pass_name="shrink", what="on the shrunk graph",
                         fix="a rule coupled or rewrote this op's dims wrongly; report this model and exclude the "
                             "layers around the node with ignore=[...]")
        want = expected_shapes(gs, leaf_keep)
        for n in gm.graph.nodes:
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor) and n.name in want:
                got = tuple(size_hint(s) for s in v.shape)
                if got != want[n.name]:
                    raise PassError(f"shrunk shape {got} differs from the expected {want[n.name]}",
                                    pass_name="shrink", node=n.name,
                                    fix="an op's shape constants were not rewritten; report this model")


def approximate_deviation(src, shrunk, gs, leaf_keep, program: Program, ctx: PassContext, keep,
                          norms: list[str]) -> dict:
    """Stats of a shrink that is approximate by design (``norms="renormalize"``): max|shrunk - masked| on the
    verification inputs and its size relative to the output scale; ``verified`` stays None (nothing was verified)."""
    masked = masked_view(src, gs, leaf_keep, program.weight_masks, keep=keep)
    res = verify(masked, shrunk, program.args, program.kwargs, seed=ctx.seed + 1, dense=ctx.dense)
    rel = res.max_abs_diff / res.output_scale if res.output_scale else float("inf")
    return {"verified": None, "approximate": True, "approximate_norms": norms, "max_abs_diff": res.max_abs_diff,
            "output_scale": res.output_scale, "relative_deviation": rel, "observable": res.observable}
