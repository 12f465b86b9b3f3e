"""fxprune: a compiler for pruning neural networks, built as a pass framework on torch.fx / torch.export.

    import fxprune
    from fxprune.passes import ChannelPrune, Shrink
    out = fxprune.compile(model, (x,), passes=[ChannelPrune(ratio=0.5), Shrink()])
    out.module, out.report
"""
from __future__ import annotations

from . import errors
from .compile import Compiled, analyze, compile
from .groups import Group, GroupSet
from .pass_manager import Pass, PassContext, PassManager, PassResult, register_pass, PASS_REGISTRY
from .program import Program
from .recipe import dump_recipe, load_recipe
from .report import Report
from .serialize import load, replay
from .trace import trace

__version__ = "0.1.0"
__all__ = ["compile", "analyze", "trace", "Compiled", "Program", "Pass", "PassResult", "PassContext",
           "PassManager", "register_pass", "PASS_REGISTRY", "Group", "GroupSet", "Report", "errors",
           "load", "replay", "load_recipe", "dump_recipe"]
