"""Channel importance: one score per channel of a group (higher = more important).

Built-in criteria: ``"l1"``/``"l2"`` (magnitude of every parameter slice the channel owns, averaged over the
group's members after normalising each member by its mean), ``"bn_scale"`` (|gamma| of the group's BatchNorms),
``"random"`` (seeded). A callable ``fn(group, program) -> array`` and Torch-Pruning importance objects
(:mod:`fxprune.passes.tp_adapter`) are accepted too.

Calibration criteria (``"activation"``: Minitron's activation magnitude; ``"taylor"``: first-order Taylor on
activations) run the model over ``ctx.data`` once for all groups (:mod:`fxprune.passes.activation_importance`);
:func:`prepare` computes them before a selection pass scores its groups.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from fxprune.errors import InputError
from fxprune.groups import Group
from fxprune.program import Program

BUILTIN = ("l1", "l2", "bn_scale", "random")
CALIBRATION = ("activation", "taylor")


def _member_scores(program: Program, group: Group, p: int) -> list[np.ndarray]:
    out = []
    for m in group.members:
        t = program.param(m.param)
        if not isinstance(t, nn.Parameter) or t.is_meta or not t.is_floating_point():
            continue
        x = t.detach().float().movedim(m.dim, 0).reshape(t.shape[m.dim], -1)
        per_pos = (x.abs().sum(1) if p == 1 else x.pow(2).sum(1)).numpy()
        sel = m.coords >= 0
        score = np.zeros(group.size)
        count = np.zeros(group.size)
        np.add.at(score, m.coords[sel], per_pos[sel])
        np.add.at(count, m.coords[sel], 1)
        score = score / np.maximum(count, 1)
        mean = score.mean()
        out.append(score / mean if mean > 0 else score)
    return out


def _require_values(program: Program, group: Group, what: str) -> None:
    if any(program.param(m.param).is_meta for m in group.members):
        raise InputError(f"importance {what!r} needs weight values, but the model is on the meta device",
                         fix="load real weights first, or plan with importance='random' or a callable")


def magnitude(program: Program, group: Group, p: int = 2) -> np.ndarray:
    _require_values(program, group, f"l{p}")
    scores = _member_scores(program, group, p)
    if not scores:
        return np.ones(group.size)
    return np.mean(scores, axis=0)


def bn_scale(program: Program, group: Group) -> np.ndarray | None:
    _require_values(program, group, "bn_scale")
    roles = program.groups.analysis.param_roles
    scores = []
    for m in group.members:
        if "bn_weight" in roles.get(m.param, set()) and m.dim == 0:
            t = program.param(m.param).detach().float().abs().numpy()
            s = np.zeros(group.size)
            sel = m.coords >= 0
            np.add.at(s, m.coords[sel], t[sel])
            scores.append(s)
    if not scores:
        return None  # no BatchNorm in this group: bn_scale does not rank it
    return np.mean(scores, axis=0)


def resolve(importance: Any) -> Callable[[Program, Group, Any], np.ndarray | None]:
    """Turn the user's ``importance`` option into ``fn(program, group, ctx) -> scores | None``."""
    if isinstance(importance, str):
        if importance in CALIBRATION:
            return lambda prog, g, ctx: _calibrated(prog, ctx, importance).get(g.id)
        if importance == "l1":
            return lambda prog, g, ctx: magnitude(prog, g, 1)
        if importance == "l2":
            return lambda prog, g, ctx: magnitude(prog, g, 2)
        if importance == "bn_scale":
            return lambda prog, g, ctx: bn_scale(prog, g)
        if importance == "random":
            return lambda prog, g, ctx: torch.rand(g.size, generator=ctx.generator(f"random-importance-{g.id}"),
                                                   dtype=torch.float64).numpy()
        raise InputError(f"unknown importance {importance!r}",
                         fix=f"use one of {', '.join(BUILTIN + CALIBRATION)}, a callable fn(group, program) -> scores, "
                             "or a torch_pruning importance object")
    from .tp_adapter import is_tp_importance, TorchPruningImportance

    if is_tp_importance(importance):
        adapter = TorchPruningImportance(importance)
        return lambda prog, g, ctx: adapter(prog, g)
    if callable(importance):
        try:
            inspect.signature(importance).bind(None, None)
        except TypeError:
            raise InputError(f"the importance callable {getattr(importance, '__name__', importance)!r} must accept "
                             f"(group, program)", fix="define it as def importance(group, program) -> scores "
                                                      "(one float per channel, group.size of them)") from None
        except ValueError:  # builtins without a signature: try at call time
            pass

        def call(prog: Program, g: Group, ctx: Any) -> np.ndarray:
            s = importance(g, prog)
            try:
                s = np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError(f"importance callable returned a {type(s).__name__} for group {g.id} ({g.label}), "
                                 f"not numbers", fix="return one float score per channel") from None
            if s.shape != (g.size,):
                raise InputError(f"importance callable returned shape {s.shape} for group {g.id} ({g.label}); "
                                 f"expected ({g.size},)", fix="return one score per channel of the group")
            return s

        return call
    raise InputError(f"importance must be a name, a callable or a torch_pruning importance, got "
                     f"{type(importance).__name__}", fix=f"use one of {', '.join(BUILTIN)}")


def _calibrated(program: Program, ctx: Any, criterion: str) -> dict[int, np.ndarray]:
    """Scores of every group from a recorded ActivationImportance pass of this criterion, or computed now."""
    from .activation_importance import ImportanceRecord, calibration_scores

    for rec in reversed(program.records_of(ImportanceRecord)):
        if rec.criterion == criterion and rec.graph_id == id(program.gm):
            return dict(rec.scores)
    cache = getattr(ctx, "_fxprune_calibration", None)
    key = (id(program.gm), criterion)
    if cache is None or cache[0] != key:
        cache = (key, calibration_scores(program, ctx, criterion=criterion))
        try:
            ctx._fxprune_calibration = cache
        except AttributeError:  # pragma: no cover - a frozen context object
            pass
    return cache[1]


def prepare(importance: Any, program: Program, groups: list[Group], ctx: Any
            ) -> Callable[[Program, Group, Any], np.ndarray | None]:
    """:func:`resolve`, plus the one-off calibration run of ``"activation"``/``"taylor"`` for all groups (so that
    scoring the groups one by one does not rerun the data)."""
    fn = resolve(importance)
    if isinstance(importance, str) and importance in CALIBRATION:
        scores = _calibrated(program, ctx, importance)
        return lambda prog, g, c: scores.get(g.id)
    return fn
