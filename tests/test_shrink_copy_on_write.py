"""Shrink never modifies the program it is given: the shrunk and the masked modules are copy-on-write copies (no
deep copy of the whole model), and fine-grained masks are applied to private copies only."""
import torch

from fxprune.pass_manager import PassContext, PassManager
from fxprune.passes import ChannelPrune, NMSparsity, Shrink
from fxprune.program import Program
from fxprune.trace import trace

from hard_cases import build


def _snapshot(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def test_shrink_leaves_the_selected_program_untouched_and_shares_untouched_tensors():
    model, inputs = build("residual_chain")
    prog = Program(trace(model, inputs, {}), inputs, {})
    ctx = PassContext(seed=0)
    selected, _ = PassManager([ChannelPrune(0.5), NMSparsity(2, 4)]).run(prog, ctx)
    assert selected.weight_masks
    before = _snapshot(selected.gm)
    shrunk, results = PassManager([Shrink()]).run(selected, ctx)
    assert results[0][1].stats["verified"] is True
    after = selected.gm.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"Shrink modified the input program's {k}"
    src = {id(t) for t in list(selected.gm.parameters()) + list(selected.gm.buffers())}
    new = list(shrunk.gm.parameters()) + list(shrunk.gm.buffers())
    assert any(id(t) in src for t in new), "untouched tensors should be shared, not copied"
    # every weight-masked tensor is private and carries its mask
    for name, wm in shrunk.weight_masks.items():
        t = shrunk.gm.get_parameter(name)
        assert id(t) not in src
        assert torch.all(t[~wm] == 0)
