"""fxprune: a compiler for pruning neural networks, built as a pass framework on torch.fx / torch.export.

    import fxprune
    from fxprune.passes import ChannelPrune, Shrink
    out = fxprune.compile(model, (x,), passes=[ChannelPrune(ratio=0.5), Shrink()])
    out.module, out.report

``fxprune.prune`` is the same function as ``fxprune.compile`` (the name users look for next to ``torch.compile``).

``fxprune.passes``, ``fxprune.backends``, ``fxprune.models`` (and the other submodules) load on first attribute
access, so ``import fxprune`` stays light and ``fxprune.backends.onnx.export(...)`` works without an extra import.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import errors
from .compile import Compiled, analyze, compile
from .groups import Group, GroupSet
from .pass_manager import Pass, PassContext, PassManager, PassResult, register_pass, PASS_REGISTRY
from .program import Program, Stage
from .recipe import dump_recipe, load_recipe
from .report import Report
from .archive import load
from .replay import replay
from .trace import trace

prune = compile  # the same function: fxprune.prune(model, inputs, passes) == fxprune.compile(...)

from .version import __version__
__all__ = ["compile", "prune", "analyze", "trace", "Compiled", "Program", "Stage", "Pass", "PassResult",
           "PassContext", "PassManager", "register_pass", "PASS_REGISTRY", "Group", "GroupSet", "Report", "errors",
           "load", "replay", "load_recipe", "dump_recipe"]

_LAZY_SUBMODULES = frozenset({"passes", "backends", "models", "train", "distill", "data", "latency", "plot",
                              "testing", "zoo", "hf", "cli", "records", "seeding", "analysis", "streaming",
                              "calibration"})
#: functions that load their module on first access: name -> submodule
_LAZY_NAMES = {"prune_checkpoint": "streaming"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
        globals()[name] = value
        return value
    if name in _LAZY_SUBMODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                raise AttributeError(f"module 'fxprune' has no attribute {name!r}") from None
            raise
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'fxprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES | set(_LAZY_NAMES))
