"""Passes and the pass manager.

A pass is a small object: a ``name``, what it ``requires`` (analyses such as ``"groups"``, or ``"masks"``), whether
it ``modifies_weights`` (the manager then hands it a deep copy) or ``changes_graph`` (cached analyses are dropped
afterwards), and ``run(program, ctx) -> PassResult``. The manager runs passes in order, computes required analyses,
checks invariants after each pass, and turns any failure into :class:`fxprune.errors.PassError` naming the pass,
leaving the previous program untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch

from .errors import FxPruneError, PassError
from .program import Program


@dataclass
class PassResult:
    """What a pass returns: the new program, whether anything changed, and stats for the report."""

    program: Program
    changed: bool = True
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """Shared, explicit inputs of a pipeline run: the seed, optional data, and a log."""

    seed: int = 0
    data: Any = None  # calibration / training loader where a pass needs one
    verify: bool = True
    rtol: float = 1e-4
    dense: Any = None  # the unpruned traced module, for observability checks
    log: list[str] = field(default_factory=list)

    def generator(self, salt: str = "") -> torch.Generator:
        """A torch generator seeded from the run seed and ``salt`` (stable across runs)."""
        h = int.from_bytes(salt.encode()[:8].ljust(8, b"\0"), "little") % (2 ** 31)
        return torch.Generator().manual_seed((self.seed * 1_000_003 + h) % (2 ** 63))


class Pass:
    """Base class of all passes. Subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str] = "pass"
    requires: ClassVar[frozenset[str]] = frozenset()
    modifies_weights: ClassVar[bool] = False
    changes_graph: ClassVar[bool] = False
    #: the pass never mutates ``program.gm``: it builds a new module (copy-on-write) and assigns it, so the manager
    #: skips the deep copy it makes for ``modifies_weights``/``changes_graph`` passes (Shrink: one model less).
    builds_new_module: ClassVar[bool] = False

    def run(self, program: Program, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The pass' options, for reports and recipes (default: public attributes)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if not callable(v))
        return f"{type(self).__name__}({opts})"


PASS_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under ``cls.name``."""
    PASS_REGISTRY[cls.name] = cls
    return cls


# ----------------------------------------------------------------------------------------------------- invariants
def check_invariants(program: Program, pass_name: str) -> None:
    """Graph lints; every group mask has the group's size, keeps >= 1 channel, and keeps frozen groups whole."""
    try:
        program.gm.graph.lint()
    except Exception as e:
        raise PassError(f"graph lint failed: {e}", pass_name=pass_name) from e
    if not program.masks:
        return
    gs = program.groups
    for gid, mask in program.masks.items():
        if gid >= len(gs):
            raise PassError(f"mask for unknown group {gid}", pass_name=pass_name)
        g = gs[gid]
        if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.shape != (g.size,):
            raise PassError(f"mask of group {gid} ({g.label}) must be a bool array of shape ({g.size},), got "
                            f"{getattr(mask, 'shape', type(mask))}", pass_name=pass_name, node=g.label)
        if not mask.all() and not g.prunable:
            raise PassError(f"group {gid} ({g.label}) is frozen ({g.frozen}) but the mask removes channels",
                            pass_name=pass_name, node=g.label)
        if not mask.any():
            raise PassError(f"group {gid} ({g.label}) would lose every channel", pass_name=pass_name, node=g.label,
                            fix="lower the ratio or raise round_to/min channels")
        div = program.meta.get("divisors", {}).get(gid)
        if div and int(mask.sum()) % div:
            raise PassError(f"group {gid} keeps {int(mask.sum())} channels, not a multiple of {div}",
                            pass_name=pass_name, node=g.label)
    for name, wm in program.weight_masks.items():
        p = program.param(name)
        if tuple(wm.shape) != tuple(p.shape):
            raise PassError(f"weight mask of {name} has shape {tuple(wm.shape)}, parameter has {tuple(p.shape)}",
                            pass_name=pass_name, node=name)


class PassManager:
    """Runs passes in order with analysis caching, invariant checks and all-or-nothing failure semantics."""

    def __init__(self, passes: Iterable[Pass], *, check: bool = True,
                 on_pass: Callable[[Pass, PassResult, float], None] | None = None):
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                from .errors import InputError

                raise InputError(f"passes must be Pass instances, got {p!r} ({type(p).__name__})",
                                 fix="instantiate the pass, e.g. ChannelPrune(ratio=0.5) rather than ChannelPrune")
        self.check = check
        self.on_pass = on_pass

    def run(self, program: Program, ctx: PassContext) -> tuple[Program, list[tuple[str, PassResult, float]]]:
        results = []
        for p in self.passes:
            t0 = time.perf_counter()
            work = program.clone(deep=(p.modifies_weights or p.changes_graph) and not p.builds_new_module)
            try:
                if "groups" in p.requires:
                    work.groups  # noqa: B018 - compute (or reuse) the analysis before the pass runs
                if "masks" in p.requires and not work.masks and not work.weight_masks:
                    raise PassError("needs masks but no previous pass selected any channels", pass_name=p.name,
                                    fix="put a selection pass (e.g. ChannelPrune) before it")
                result = p.run(work, ctx)
                if not isinstance(result, PassResult):
                    raise PassError(f"run() returned {type(result).__name__}, expected PassResult", pass_name=p.name)
                if p.changes_graph:
                    result.program.invalidate()
                if self.check:
                    check_invariants(result.program, p.name)
            except PassError:
                raise
            except FxPruneError as e:  # keep the specific type (BudgetError, VerificationError...), name the pass
                msg = str(e).split("\n  fix: ")[0]
                try:
                    err = type(e)(f"pass {p.name!r}: {msg}", fix=e.fix)
                except TypeError:
                    err = PassError(msg, pass_name=p.name, fix=e.fix)
                err.pass_name = p.name  # type: ignore[attr-defined]
                raise err from e
            except Exception as e:
                raise PassError(f"{type(e).__name__}: {e}", pass_name=p.name) from e
            dt = time.perf_counter() - t0
            result.program.history.append({"pass": p.name, "options": _jsonable(p.options()), "stats": result.stats,
                                           "seconds": round(dt, 4)})
            results.append((p.name, result, dt))
            if self.on_pass is not None:
                self.on_pass(p, result, dt)
            program = result.program
        return program, results


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v):
            out[k] = list(v)
        else:
            out[k] = repr(v) if not callable(v) else getattr(v, "__name__", type(v).__name__)
    return out
