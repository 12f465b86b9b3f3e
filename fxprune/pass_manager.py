"""Passes and the pass manager.

A pass is a small object with a ``name``, the analyses it ``requires`` (registered names such as ``"groups"``, or
the precondition ``"masks"``), the analyses it ``preserves`` (default: all of them unless it ``changes_graph``), the
program :class:`~fxprune.program.Stage` s it ``accepts``, whether it ``modifies_weights`` (the manager then hands it
a deep copy) or ``changes_graph`` and ``run(program, ctx) -> PassResult``. Unknown names in ``requires`` /
``preserves`` are an error when the pass class is defined.

The manager runs passes in order: it checks the stage, computes required analyses, clones the program (the pass
never sees the caller's copy), appends the pass' typed record, drops analyses the pass does not preserve, checks
invariants, and turns any failure into an :mod:`fxprune.errors` exception naming the pass, leaving the previous
program untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch

from . import seeding
from .analysis import check_names
from .errors import FxPruneError, InputError, PassError, StageError
from .options import typed_init
from .program import ANY_STAGE, Program, Stage
from .records import Record


@dataclass
class PassResult:
    """What a pass returns: the new program, whether anything changed, stats for the report, and an optional typed
    record of what it decided (appended to ``program.records`` by the manager)."""

    program: Program
    changed: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    record: Record | None = None


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
        """A torch generator for the stream (run seed, ``salt``): see :func:`fxprune.seeding.torch_generator`."""
        return seeding.torch_generator(self.seed, salt)

    def rng(self, salt: str = "") -> np.random.Generator:
        """A numpy generator for the stream (run seed, ``salt``)."""
        return seeding.numpy_rng(self.seed, salt)

    def derive_seed(self, salt: str = "") -> int:
        """An int seed for the stream (run seed, ``salt``), for runtime modules that reseed themselves."""
        return seeding.derive_seed(self.seed, salt)


_STAGE_FIX = {
    Stage.SELECTED: "put a selection pass (e.g. ChannelPrune) before it",
    Stage.MASKED: "put ApplyMasks() before it",
}


class Pass:
    """Base class of all passes. Subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str] = "pass"
    requires: ClassVar[frozenset[str]] = frozenset()
    #: analyses still valid after the pass; None = all of them unless the pass changes the graph
    preserves: ClassVar[frozenset[str] | None] = None
    #: program stages the pass can run on
    accepts: ClassVar[frozenset[Stage]] = ANY_STAGE
    modifies_weights: ClassVar[bool] = False
    changes_graph: ClassVar[bool] = False
    #: the pass never mutates ``program.gm``: it builds a new module (copy-on-write) and assigns it, so the manager
    #: skips the deep copy it makes for ``modifies_weights``/``changes_graph`` passes (Shrink: one model less).
    builds_new_module: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__fxprune_typed__", False):
            cls.__init__ = typed_init(cls, init)  # type: ignore[method-assign]
        cls.requires = check_names(cls.requires, "requires", cls.__name__)
        if cls.preserves is not None:
            cls.preserves = check_names(cls.preserves, "preserves", cls.__name__)
        accepts = frozenset(cls.accepts)
        if not accepts or not all(isinstance(s, Stage) for s in accepts):
            raise TypeError(f"{cls.__name__}.accepts must be a non-empty set of fxprune.Stage values")
        cls.accepts = accepts

    def preserved(self) -> frozenset[str] | None:
        """Analyses valid after this pass (None: all)."""
        if self.preserves is not None:
            return self.preserves
        return frozenset() if self.changes_graph else None

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
    """Graph lints; every group mask has the group's size, keeps >= 1 channel, respects its divisor and keeps frozen
    groups whole; weight masks match their parameters; the stage agrees with the pending masks."""
    try:
        program.gm.graph.lint()
    except Exception as e:
        raise PassError(f"graph lint failed: {e}", pass_name=pass_name) from e
    if program.masks and program.stage in (Stage.TRACED, Stage.SHRUNK):
        raise PassError(f"program is in stage {program.stage.value!r} but has pending channel masks",
                        pass_name=pass_name, fix="write masks with program.select_channels(...)")
    if not program.masks:
        pass
    else:
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
                raise PassError(f"group {gid} ({g.label}) would lose every channel", pass_name=pass_name,
                                node=g.label, fix="lower the ratio or raise round_to/min channels")
            div = program.divisors.get(gid)
            if div and int(mask.sum()) % div:
                raise PassError(f"group {gid} keeps {int(mask.sum())} channels, not a multiple of {div}",
                                pass_name=pass_name, node=g.label)
    for name, wm in program.weight_masks.items():
        p = program.param(name)
        if tuple(wm.shape) != tuple(p.shape):
            raise PassError(f"weight mask of {name} has shape {tuple(wm.shape)}, parameter has {tuple(p.shape)}",
                            pass_name=pass_name, node=name)


class PassManager:
    """Runs passes in order with analysis caching, stage and invariant checks and all-or-nothing failure semantics.

    ``on_pass(pass, result, seconds)`` is the instrumentation hook, called after each successful pass.
    """

    def __init__(self, passes: Iterable[Pass], *, check: bool = True,
                 on_pass: Callable[[Pass, PassResult, float], None] | None = None):
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise InputError(f"passes must be Pass instances, got {p!r} ({type(p).__name__})",
                                 fix="instantiate the pass, e.g. ChannelPrune(ratio=0.5) rather than ChannelPrune")
        self.check = check
        self.on_pass = on_pass

    def run(self, program: Program, ctx: PassContext) -> tuple[Program, list[tuple[str, PassResult, float]]]:
        results = []
        for p in self.passes:
            t0 = time.perf_counter()
            self._check_stage(p, program)
            if "masks" in p.requires and not program.has_selection():
                raise PassError("needs masks but no previous pass selected any channels", pass_name=p.name,
                                fix="put a selection pass (e.g. ChannelPrune) before it")
            work = program.clone(deep=(p.modifies_weights or p.changes_graph) and not p.builds_new_module)
            try:
                for name in p.requires:
                    if name != "masks":
                        work.analysis(name)  # compute (or reuse) before the pass runs
                result = p.run(work, ctx)
                if not isinstance(result, PassResult):
                    raise PassError(f"run() returned {type(result).__name__}, expected PassResult", pass_name=p.name)
                _settle_stage(program, result.program)
                if result.record is not None:
                    if not isinstance(result.record, Record):
                        raise PassError(f"PassResult.record must be a fxprune.records.Record, got "
                                        f"{type(result.record).__name__}", pass_name=p.name)
                    result.program.records = result.program.records + (result.record,)
                preserved = p.preserved()
                if preserved is not None:
                    result.program.analyses.keep_only(preserved)
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
                                           "stage": result.program.stage.value, "seconds": round(dt, 4)})
            results.append((p.name, result, dt))
            if self.on_pass is not None:
                self.on_pass(p, result, dt)
            program = result.program
        return program, results

    @staticmethod
    def _check_stage(p: Pass, program: Program) -> None:
        if program.stage in p.accepts:
            return
        wanted = sorted(s.value for s in p.accepts)
        if program.stage is Stage.SELECTED and Stage.MASKED in p.accepts:
            msg, fix = "the selection of an earlier pass is not applied", \
                "put Shrink() (or ApplyMasks()) before it, so the earlier selection is applied"
        elif Stage.SELECTED in p.accepts and program.stage is not Stage.SELECTED:
            msg = f"needs pending masks (a selection), but the program is {program.stage.value!r}"
            fix = ("put it after the selection pass and before ApplyMasks/Shrink" if program.stage is Stage.MASKED
                   else "put a selection pass (e.g. ChannelPrune) before it")
        else:
            msg = f"the program is {program.stage.value!r}"
            fix = "put ApplyMasks() before it" if Stage.MASKED in p.accepts else f"run it in stage {wanted}"
        raise StageError(f"runs on a program in stage {wanted}, but {msg}", pass_name=p.name, fix=fix)


def _settle_stage(before: Program, after: Program) -> None:
    """A pass that wrote masks directly (``program.masks[gid] = ...``, as user passes may) without setting the stage
    made a selection: the program is SELECTED."""
    if after.stage is not before.stage:
        return
    if set(after.masks) != set(before.masks) or any(not np.array_equal(m, before.masks[k])
                                                    for k, m in after.masks.items()):
        after.stage = Stage.SELECTED
        return
    if set(after.weight_masks) != set(before.weight_masks) or any(
            m.shape != before.weight_masks[k].shape or not torch.equal(m, before.weight_masks[k])
            for k, m in after.weight_masks.items()):
        after.stage = Stage.SELECTED


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
