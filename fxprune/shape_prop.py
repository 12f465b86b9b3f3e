"""Re-derive every node's ``meta["val"]`` (FakeTensors) after a pass rewrote a graph or resized its weights."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .errors import PassError
from .program import Program


class _NodeNamingProp(FakeTensorProp):
    """FakeTensorProp that tags an exception with the node (name and op) that raised it."""

    def run_node(self, n):  # type: ignore[override]
        try:
            return super().run_node(n)
        except Exception as e:
            if not hasattr(e, "fxprune_node"):
                e.fxprune_node = f"{n.name} ({n.target})" if n.op == "call_function" else n.name
            raise


def propagate_shapes(gm: fx.GraphModule, program: Program, *, pass_name: str, what: str = "after the rewrite",
                     fix: str | None = None) -> None:
    """Run ``gm`` on FakeTensor copies of ``program``'s example inputs, refreshing ``node.meta["val"]``.

    A failure raises :class:`PassError` naming ``pass_name``, the node that failed and ``what`` was propagated.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in program.flat_inputs()]
    try:
        _NodeNamingProp(gm, mode).propagate_dont_convert_inputs(*fake)
    except Exception as e:
        raise PassError(f"shape propagation failed {what}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}", pass_name=pass_name,
                        node=getattr(e, "fxprune_node", None), fix=fix) from e
