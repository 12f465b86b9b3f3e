"""ApplyMasks: produce the masked program (removed channels and masked weights exactly zero)."""
from __future__ import annotations

from fxprune.masking import apply_channel_masks, apply_weight_masks
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program, Stage


@register_pass
class ApplyMasks(Pass):
    """Zero every parameter slice of removed channels (weights, biases, BN scale and shift) and multiply
    fine-grained weight masks in. The graph is unchanged; masks stay on the program for Shrink. On a program with
    nothing pending (not SELECTED) it changes nothing."""

    name = "apply_masks"
    requires = frozenset({"groups"})
    modifies_weights = True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if program.stage is not Stage.SELECTED:
            return PassResult(program, changed=False, stats={"zeroed_slices": 0, "weight_masks": 0})
        n = apply_channel_masks(program.gm, program.groups, program.leaf_keep())
        apply_weight_masks(program.gm, program.weight_masks)
        program.stage = Stage.MASKED
        return PassResult(program, changed=n > 0 or bool(program.weight_masks),
                          stats={"zeroed_slices": n, "weight_masks": len(program.weight_masks)})
