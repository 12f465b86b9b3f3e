"""ApplyMasks: produce the masked program (removed channels and masked weights exactly zero)."""
from __future__ import annotations

from fxprune.masking import apply_channel_masks, apply_weight_masks
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program


@register_pass
class ApplyMasks(Pass):
    """Zero every parameter slice of removed channels (weights, biases, BN scale and shift) and multiply
    fine-grained weight masks in. The graph is unchanged; masks stay on the program for Shrink."""

    name = "apply_masks"
    requires = frozenset({"groups"})
    modifies_weights = True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        n = apply_channel_masks(program.gm, program.groups, program.leaf_keep())
        apply_weight_masks(program.gm, program.weight_masks)
        program.meta["masked"] = True
        return PassResult(program, changed=n > 0 or bool(program.weight_masks),
                          stats={"zeroed_slices": n, "weight_masks": len(program.weight_masks)})
