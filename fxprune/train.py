"""Training-time pieces that work in any training loop: the BN-gamma sparsity regularizer and small helpers.

``SparsityRegularizer`` puts an L1 penalty on the BatchNorm scales (gammas) of the channels the analyzer can remove
(prunable ``"channels"`` groups; frozen groups and channels shared with frozen spaces are never touched). It is
built from a :class:`~fxprune.program.Program` (or a model plus example inputs, or a compiled result) and applied,
by parameter name, to the module you train: the user's original ``nn.Module`` or a compiled/pruned GraphModule
(``fxprune.compile`` keeps qualified parameter names). Three ways to apply it:

* ``mode="hook"`` (default): a gradient hook on every regularized gamma adds ``rate * sign(gamma)`` during
  ``backward()``; nothing else to call but ``reg.step(epoch)``.
* ``mode="grad"``: call ``reg.update_grads()`` after ``loss.backward()`` and before ``optimizer.step()`` (the
  YOLOv4 code's ``updateBN``).
* ``mode="loss"``: add ``reg.loss()`` (``sum(rate * |gamma|)``) to your loss.

Schedules (``reg.step(epoch)`` picks the rate of the epoch; epochs may be fractional):

* ``"constant"``: ``s``.
* ``"decay"`` (alias ``"yolov8"``): ``s * (1 - 0.9 * e / E)``, from ``s`` at ``e = 0`` to ``0.1 s`` at ``e = E``.
* ``"variable"`` (alias ``"yolov4"``): ``s`` until ``switch * E``; afterwards channels whose ``|gamma|`` is above
  the global ``percentile`` of all regularized gammas get ``reduced * s`` (the rest keep ``s``). The percentile is
  recomputed at every ``step``.
* a callable ``f(epoch, epochs) -> float``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import InputError

SCHEDULES = ("constant", "decay", "yolov8", "variable", "yolov4")
MODES = ("hook", "grad", "loss")


# ----------------------------------------------------------------------------------------------- gamma discovery
@dataclass
class GammaInfo:
    """A BatchNorm scale parameter and which of its positions belong to prunable channel groups."""

    name: str  # canonical qualified parameter name
    mask: np.ndarray  # bool (numel,): positions the regularizer acts on
    groups: list[int]  # ids of the prunable groups these positions belong to


def prunable_gammas(groups: Any, *, ignore: Iterable[str] = ()) -> dict[str, GammaInfo]:
    """BN gammas of the prunable channel groups of a :class:`~fxprune.groups.GroupSet`.

    A position of a BN weight is included when its channel belongs to a prunable group of kind ``"channels"``;
    positions in frozen groups (graph outputs, unknown ops, ...) are left out. ``ignore``: parameter-name prefixes
    (module names) whose gammas are skipped.
    """
    roles = groups.analysis.param_roles
    prefixes = [p for p in ignore]
    out: dict[str, GammaInfo] = {}
    for g in groups.prunable():
        if g.kind != "channels":
            continue
        for m in g.members:
            if m.dim != 0 or "bn_weight" not in roles.get(m.param, set()):
                continue
            if any(m.param == p or m.param.startswith(p + ".") for p in prefixes):
                continue
            n = len(m.coords)
            info = out.setdefault(m.param, GammaInfo(m.param, np.zeros(n, dtype=bool), []))
            info.mask |= m.coords >= 0
            if g.id not in info.groups:
                info.groups.append(g.id)
    return out


def _resolve_groups(target: Any, example_inputs: Any) -> tuple[Any, nn.Module | None]:
    """(GroupSet, default module to regularize) for a Program, Compiled, GroupSet or nn.Module."""
    from .compile import Compiled
    from .groups import GroupSet
    from .program import Program

    if isinstance(target, Compiled):
        return target.program.groups, target.module
    if isinstance(target, Program):
        src = target.source
        if src is not None:  # the user's model, unless the program's parameters no longer match it (shrunk)
            shapes = dict(src.named_parameters(remove_duplicate=False))
            if all(n in shapes and tuple(shapes[n].shape) == tuple(s) for n, s in target.param_shapes().items()
                   if n in shapes or isinstance(target.param(n), nn.Parameter)):
                return target.groups, src
        return target.groups, target.gm
    if isinstance(target, GroupSet):
        return target, None
    if isinstance(target, nn.Module):
        if isinstance(target, fx.GraphModule) and any(n.op == "get_attr" for n in target.graph.nodes) and all(
                "val" in n.meta for n in target.graph.nodes if n.op == "call_function"):
            return Program(target, (), {}).groups, target  # an exported/compiled module: analyse its graph as is
        if example_inputs is None:
            raise InputError(f"{type(target).__name__} is a plain nn.Module: the regularizer needs example_inputs "
                             "to find its prunable BatchNorms",
                             fix="SparsityRegularizer(model, example_inputs=(x,)), or pass a Program / "
                                 "fxprune.analyze(model, (x,)) result")
        from .compile import analyze

        return analyze(target, example_inputs), target
    raise InputError(f"SparsityRegularizer needs a Program, Compiled, GroupSet or nn.Module, got "
                     f"{type(target).__name__}", fix="pass the model (with example_inputs=) or a Program")


class SparsityRegularizer:
    """L1 on the BN gammas of prunable groups, with a schedule; usable in any training loop.

    ``target``: a Program, a Compiled, a GroupSet (then ``module=`` is required) or an ``nn.Module`` (then
    ``example_inputs=`` is required, unless it is an fxprune-compiled GraphModule). ``module``: the module whose
    parameters are regularized (default: the model itself / the compiled module / for a Program its source model
    while the parameter shapes still match, else the program's graph module);
    parameters are matched by qualified name. ``s``: base rate (1e-3 for the YOLOv4 recipe, 1e-4 for YOLOv8).
    ``epochs``: total epochs E (needed by ``"decay"`` and ``"variable"``). ``ignore``: module names to skip.
    """

    def __init__(self, target: Any, *, s: float = 1e-3, schedule: str | Callable[[float, float], float] = "constant",
                 epochs: float | None = None, mode: str = "hook", module: nn.Module | None = None,
                 example_inputs: Any = None, switch: float = 0.4, percentile: float = 65.0, reduced: float = 0.01,
                 final_ratio: float = 0.1, ignore: Iterable[str] = ()):
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s < 0:
            raise InputError(f"s must be a non-negative number, got {s!r}", fix="e.g. s=1e-3 (YOLOv4) or 1e-4 "
                                                                                "(YOLOv8)")
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}",
                             fix="'hook' adds to gradients automatically, 'grad' needs reg.update_grads() after "
                                 "backward, 'loss' needs loss + reg.loss()")
        if isinstance(schedule, str):
            if schedule not in SCHEDULES:
                raise InputError(f"unknown schedule {schedule!r}",
                                 fix=f"use one of {', '.join(SCHEDULES)} or a callable f(epoch, epochs) -> rate")
            schedule = {"yolov8": "decay", "yolov4": "variable"}.get(schedule, schedule)
            if schedule != "constant" and (epochs is None or not isinstance(epochs, (int, float)) or epochs <= 0):
                raise InputError(f"schedule {schedule!r} needs the total number of epochs, got epochs={epochs!r}",
                                 fix="e.g. SparsityRegularizer(model, schedule='decay', epochs=100, ...)")
        elif not callable(schedule):
            raise InputError(f"schedule must be a name or a callable, got {type(schedule).__name__}",
                             fix=f"use one of {', '.join(SCHEDULES)}")
        if not 0.0 <= switch <= 1.0:
            raise InputError(f"switch must be a fraction of the epochs in [0, 1], got {switch!r}", fix="e.g. 0.4")
        if not 0.0 < percentile < 100.0:
            raise InputError(f"percentile must be in (0, 100), got {percentile!r}", fix="e.g. 65")
        if not 0.0 <= reduced <= 1.0:
            raise InputError(f"reduced must be in [0, 1], got {reduced!r}", fix="e.g. 0.01")
        if not 0.0 <= final_ratio <= 1.0:
            raise InputError(f"final_ratio must be in [0, 1], got {final_ratio!r}", fix="e.g. 0.1")
        self.s = float(s)
        self.schedule = schedule
        self.epochs = epochs
        self.mode = mode
        self.switch = float(switch)
        self.percentile = float(percentile)
        self.reduced = float(reduced)
        self.final_ratio = float(final_ratio)
        groups, default_module = _resolve_groups(target, example_inputs)
        self.groups = groups
        self.gamma_info = prunable_gammas(groups, ignore=ignore)
        self.module = module if module is not None else default_module
        if self.module is None:
            raise InputError("no module to regularize", fix="pass module=the nn.Module you train")
        self.params: dict[str, nn.Parameter] = {}
        self._masks: dict[str, torch.Tensor] = {}
        for name, info in self.gamma_info.items():
            try:
                p = self.module.get_parameter(name)
            except AttributeError as e:
                raise InputError(f"the module has no parameter {name!r} (a prunable BatchNorm weight of the "
                                 f"analysed program)", fix="pass module= the model the program was traced from, "
                                                           "or build the regularizer from the module you train") from e
            if p.numel() != info.mask.size:
                raise InputError(f"parameter {name!r} has {p.numel()} elements, the program's has {info.mask.size}",
                                 fix="build the regularizer from the module you train (after pruning, from the "
                                     "compiled result)")
            self.params[name] = p
            self._masks[name] = torch.from_numpy(info.mask.copy()).to(p.device)
        self.epoch: float = 0.0
        self.rates: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.threshold: float | None = None
        self.step(0)
        if self.mode == "hook":
            self.attach()

    # ------------------------------------------------------------------ schedule
    def value(self, epoch: float) -> float:
        """The base rate lambda(epoch) of the schedule (for ``"variable"``: the rate of the low-gamma channels)."""
        if callable(self.schedule):
            return float(self.schedule(epoch, self.epochs))
        if self.schedule == "decay":
            e = min(max(float(epoch), 0.0), float(self.epochs))
            return self.s * (1.0 - (1.0 - self.final_ratio) * e / float(self.epochs))
        return self.s

    def variable_active(self, epoch: float) -> bool:
        return self.schedule == "variable" and float(epoch) >= self.switch * float(self.epochs)

    @torch.no_grad()
    def step(self, epoch: float) -> float:
        """Set the epoch (call at the start of each epoch, or each iteration with a fractional epoch) and
        recompute the per-channel rates. Returns the base rate."""
        self.epoch = float(epoch)
        lam = self.value(epoch)
        self.threshold = None
        if self.variable_active(epoch) and self.params:
            allg = torch.cat([p.detach().abs().flatten()[self._masks[n]].float().cpu() for n, p in self.params.items()])
            if allg.numel():
                self.threshold = float(np.percentile(allg.numpy(), self.percentile))
        for name, p in self.params.items():
            rate = torch.full(p.shape, lam, dtype=p.dtype, device=p.device)
            if self.threshold is not None:
                rate = torch.where(p.detach().abs() > self.threshold, rate * self.reduced, rate)
            rate = rate * self._masks[name].reshape(p.shape).to(p.dtype)
            self.rates[name] = rate
        return lam

    # ------------------------------------------------------------------ applying it
    def attach(self) -> "SparsityRegularizer":
        """Register the gradient hooks (``mode="hook"``; done by the constructor)."""
        self.detach()
        for name, p in self.params.items():
            self._handles.append(p.register_hook(self._hook(name, p)))
        return self

    def _hook(self, name: str, p: nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad + self.rates[name] * torch.sign(p.detach())

        return hook

    def detach(self) -> None:
        """Remove the gradient hooks (training without the regularizer afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def update_grads(self) -> None:
        """Add ``rate * sign(gamma)`` to each regularized gamma's gradient (``mode="grad"``)."""
        if self.mode == "hook":
            raise InputError("update_grads() with mode='hook' would apply the penalty twice",
                             fix="use mode='grad' to call update_grads() yourself, or rely on the hooks")
        for name, p in self.params.items():
            upd = self.rates[name] * torch.sign(p)
            if p.grad is None:
                p.grad = upd.clone()
            else:
                p.grad.add_(upd)

    def loss(self) -> torch.Tensor:
        """``sum(rate * |gamma|)`` over regularized gammas (``mode="loss"``: add it to your loss)."""
        if self.mode == "hook":
            raise InputError("loss() with mode='hook' would apply the penalty twice",
                             fix="use mode='loss' to add reg.loss() yourself, or rely on the hooks")
        terms = [(self.rates[n] * p.abs()).sum() for n, p in self.params.items()]
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).sum()

    # ------------------------------------------------------------------ inspection
    def gammas(self) -> torch.Tensor:
        """|gamma| of all regularized positions, concatenated (a copy)."""
        vals = [p.detach().abs().flatten()[self._masks[n]].float().cpu() for n, p in self.params.items()]
        return torch.cat(vals) if vals else torch.zeros(0)

    def summary(self) -> dict[str, Any]:
        g = self.gammas()
        return {"epoch": self.epoch, "rate": self.value(self.epoch), "params": len(self.params),
                "channels": int(g.numel()), "mean_abs_gamma": float(g.mean()) if g.numel() else 0.0,
                "frac_below_1e-2": float((g < 1e-2).float().mean()) if g.numel() else 0.0,
                "threshold": self.threshold}

    def __repr__(self) -> str:
        sch = self.schedule if isinstance(self.schedule, str) else getattr(self.schedule, "__name__", "callable")
        return (f"SparsityRegularizer(s={self.s}, schedule={sch!r}, mode={self.mode!r}, "
                f"{len(self.params)} BN weights, {int(sum(m.sum() for m in self._masks.values()))} channels)")


# ----------------------------------------------------------------------------------------------- training helpers
_BN_OPS = ("aten.batch_norm.default",)
_DROPOUT_OPS = ("aten.dropout.default",)


@contextlib.contextmanager
def train_mode(module: nn.Module, *, batchnorm: bool = True, dropout: bool = True) -> Iterator[nn.Module]:
    """Put ``module`` in training mode for the ``with`` block and restore it afterwards.

    Exported GraphModules (what ``fxprune.compile`` returns) bake BatchNorm and dropout into eval behaviour
    (``aten.batch_norm(..., training=False)``); inside this block their ``training`` flags are switched on, so
    fine-tuning a pruned module updates BN statistics as the original model would. ``batchnorm=False`` keeps BN
    statistics frozen (BN then acts as a learnable affine layer).
    """
    was = module.training
    flipped: list[tuple[fx.Node, int]] = []
    gms = [m for m in module.modules() if isinstance(m, fx.GraphModule)]
    for gm in gms:
        changed = False
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            name = str(n.target)
            if batchnorm and name in _BN_OPS and len(n.args) > 5 and n.args[5] is False:
                n.update_arg(5, True)
                flipped.append((n, 5))
                changed = True
            elif batchnorm and name == "aten._native_batch_norm_legit_no_training.default":
                warnings.warn(f"{n.name}: an inference-only batch norm op; its statistics stay frozen in train_mode",
                              stacklevel=3)
            elif dropout and name in _DROPOUT_OPS and len(n.args) > 2 and n.args[2] is False:
                n.update_arg(2, True)
                flipped.append((n, 2))
                changed = True
        if changed:
            gm.recompile()
    _set_mode(module, True)
    if not batchnorm:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    try:
        yield module
    finally:
        for n, i in flipped:
            n.update_arg(i, False)
        for gm in gms:
            gm.recompile()
        _set_mode(module, was)


def fit(model: nn.Module, data: Iterable, loss_fn: Callable[[Any, Any], torch.Tensor], *, epochs: int = 1,
        lr: float = 1e-3, optimizer: torch.optim.Optimizer | None = None,
        regularizer: SparsityRegularizer | None = None,
        distiller: nn.Module | None = None, batchnorm: bool = True, max_steps: int | None = None, seed: int = 0,
        scheduler: Any = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A minimal training loop (examples and benchmarks use it; any loop of your own works the same way).

    ``data`` yields ``(inputs, targets)`` (``inputs`` a tensor or a tuple of forward args). With a ``distiller``
    (``fxprune.distill``) the student forward goes through it and its loss is added. With a ``regularizer``,
    ``regularizer.step(epoch)`` is called each epoch (and ``update_grads``/``loss`` used per its mode).
    ``scheduler``: a learning-rate scheduler of ``optimizer``, stepped after every optimizer step (size it in steps,
    e.g. ``CosineAnnealingLR(opt, T_max=epochs * len(data))``). Without ``optimizer``, Adam at ``lr``: the pruning
    papers train with SGD (momentum 0.9), under which the regularizer's ``s * sign(gamma)`` acts as an L1 step; Adam
    divides it by the running gradient magnitude (see docs/training.md).
    Returns ``{"losses": [mean loss per epoch], "steps": n}``.
    """
    torch.manual_seed(seed)
    params = list(p for p in model.parameters() if p.requires_grad)
    if distiller is not None:
        params += [p for p in distiller.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    steps = 0
    with train_mode(model, batchnorm=batchnorm):
        for epoch in range(epochs):
            if regularizer is not None:
                regularizer.step(epoch)
            total, count = 0.0, 0
            for batch in data:
                x, y = batch
                args = x if isinstance(x, tuple) else (x,)
                if distiller is not None:
                    out, dloss = distiller(*args)
                else:
                    out, dloss = model(*args), None
                loss = loss_fn(out, y)
                if dloss is not None:
                    loss = loss + dloss
                if regularizer is not None and regularizer.mode == "loss":
                    loss = loss + regularizer.loss()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if regularizer is not None and regularizer.mode == "grad":
                    regularizer.update_grads()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                total += float(loss.detach())
                count += 1
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            losses.append(total / max(count, 1))
            if log is not None:
                log(f"epoch {epoch}: loss {losses[-1]:.4f}")
            if max_steps is not None and steps >= max_steps:
                break
    return {"losses": losses, "steps": steps}


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable) -> float:
    """Top-1 accuracy of a classifier over ``(inputs, labels)`` batches (model in eval mode). For models that
    return several outputs, the first tensor is the logits."""
    from torch.utils._pytree import tree_flatten

    was = model.training
    _set_mode(model, False)
    correct = total = 0
    for x, y in data:
        out = model(*(x if isinstance(x, tuple) else (x,)))
        if not isinstance(out, torch.Tensor):
            out = next(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        correct += int((out.argmax(-1) == y).sum())
        total += int(y.numel())
    _set_mode(model, was)
    return correct / max(total, 1)


def _set_mode(module: nn.Module, training: bool) -> None:
    """``module.train(training)``; modules from ``torch.export`` refuse it (their graph fixes the mode), then the
    flags of their submodules are set directly."""
    try:
        module.train(training)
    except NotImplementedError:
        for m in module.modules():
            m.training = training


def __getattr__(name: str) -> Any:
    """``fxprune.train.FTWTLoss``: the FTWT self-supervised mask loss lives beside its gates in ``passes/ftwt.py``."""
    if name == "FTWTLoss":
        from fxprune.passes.ftwt import FTWTLoss

        return FTWTLoss
    if name == "fit_lowrank_kv":  # CSKV's layer-wise K/V fitting lives beside its cache in passes/lowrank_kv.py
        from fxprune.passes.lowrank_kv import fit_lowrank_kv

        return fit_lowrank_kv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
