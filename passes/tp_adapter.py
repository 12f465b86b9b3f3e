"""Adapter: use a Torch-Pruning importance object (Taylor, Hessian, LAMP, FPGM, ...) inside fxprune.

Torch-Pruning scores its own groups. For an fxprune group we find a member that is the output dim of a Conv or
Linear weight, ask Torch-Pruning's dependency graph (built once on a copy of the user's model, gradients included,
so Taylor/Hessian criteria see what the user accumulated) for the pruning group of that layer's output channels,
score it with the importance object, and map the per-output-channel scores onto the fxprune group's channels.
Groups with no such member are not ranked by this importance (reported as unscored).
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fxprune.errors import InputError
from fxprune.groups import Group
from fxprune.program import Program


def is_tp_importance(obj: Any) -> bool:
    try:
        import torch_pruning as tp
    except ImportError:
        return False
    return isinstance(obj, tp.importance.Importance)


class TorchPruningImportance:
    def __init__(self, importance: Any):
        self.importance = importance
        self._dg = None
        self._model = None

    def _graph(self, program: Program):
        import torch_pruning as tp

        if self._dg is None:
            if program.source is None:
                raise InputError("Torch-Pruning importances need the original nn.Module",
                                 fix="use fxprune.compile(model, ...) rather than building a Program by hand")
            model = copy.deepcopy(program.source).eval()
            for (_, src), (_, dst) in zip(program.source.named_parameters(), model.named_parameters()):
                dst.grad = None if src.grad is None else src.grad.detach().clone()  # Taylor/Hessian need them
            for name, p in model.named_parameters():
                try:
                    cur = program.param(name)
                except AttributeError:
                    continue
                if tuple(cur.shape) != tuple(p.shape):
                    raise InputError(f"Torch-Pruning importance must run before Shrink (parameter {name} changed "
                                     f"shape)", fix="put the ChannelPrune with a torch_pruning importance first")
            self._model = model
            self._dg = tp.DependencyGraph().build_dependency(model, example_inputs=program.args if not program.kwargs
                                                             else program.kwargs)
        return self._dg, self._model

    def __call__(self, program: Program, group: Group) -> np.ndarray | None:
        import torch_pruning as tp

        dg, model = self._graph(program)
        modules = dict(model.named_modules())
        for m in group.members:
            mod_name, _, attr = m.param.rpartition(".")
            mod = modules.get(mod_name)
            if attr != "weight" or m.dim != 0 or mod is None:
                continue
            if isinstance(mod, nn.Conv2d | nn.Conv1d) and mod.groups == 1:
                fn, n = tp.prune_conv_out_channels, mod.out_channels
            elif isinstance(mod, nn.Linear):
                fn, n = tp.prune_linear_out_channels, mod.out_features
            else:
                continue
            tp_group = dg.get_pruning_group(mod, fn, idxs=list(range(n)))
            try:
                with torch.enable_grad():
                    s = self.importance(tp_group)
            except AttributeError as e:
                if "grad" in str(e) or "NoneType" in str(e):
                    raise InputError(f"{type(self.importance).__name__} needs gradients on the model's parameters",
                                     fix="run a forward and loss.backward() on the model (or accumulate "
                                         "importance as Torch-Pruning documents) before fxprune.compile") from e
                raise
            if s is None:
                continue
            s = s.detach().double().cpu().numpy()
            if s.shape[0] != m.coords.shape[0]:
                continue
            out = np.zeros(group.size)
            cnt = np.zeros(group.size)
            sel = m.coords >= 0
            np.add.at(out, m.coords[sel], s[sel])
            np.add.at(cnt, m.coords[sel], 1)
            return out / np.maximum(cnt, 1)
        return None
