"""Feature distillation from an unpruned teacher to a pruned student, with taps named on the graph.

Taps are FX node names of the traced program (``"relu_3"``, as printed by ``out.module.graph``) or module names
(``"backbone.2"``: the module's output). ``Shrink`` keeps node names and module paths, so the same tap names
resolve on the original (dense) program and on the pruned one. A tap may also be a ``(teacher_tap, student_tap)``
pair when the two sides differ.

* Compiled / exported modules (``fx.GraphModule``) are run by an :class:`torch.fx.Interpreter` that records the
  tapped nodes (the module itself is not modified).
* Plain ``nn.Module`` students need module-name taps (recorded by forward hooks); a plain ``nn.Module`` teacher
  with node-name taps is traced once, on the first call (a frozen snapshot of the teacher at that moment).

In the YOLOv4 / YOLOv8 recipes the teacher is the dense model trained without the sparsity penalty (not the
sparse-trained net that was pruned); keep a copy of it before sparsity training.

The teacher runs under ``torch.no_grad()`` and in eval mode. Calling a distiller returns ``(student_output, loss)``;
add the loss to your task loss. ``SpatialAttentionLoss`` (SAD, YOLOv4 recipe) compares normalised spatial attention
maps and needs no adapters; ``ChannelWiseLoss`` (CWD, YOLOv8 recipe) compares per-channel spatial distributions and
adds learnable 1x1 adapters (student -> teacher channels) where counts differ: optimise ``distiller.parameters()``
together with the student's.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx._pytree import tree_flatten_spec

from .errors import InputError


# ----------------------------------------------------------------------------------------------------------- taps
def _module_path_of(node: fx.Node) -> list[str]:
    return [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]


def resolve_tap(gm: fx.GraphModule, tap: str) -> fx.Node:
    """The node a tap names on ``gm``: a node of that name, else the last node computed inside module ``tap``."""
    if not isinstance(tap, str) or not tap:
        raise InputError(f"taps must be non-empty strings (node or module names), got {tap!r}",
                         fix="e.g. taps=['relu_3', 'backbone.2']")
    last = None
    for n in gm.graph.nodes:
        if n.name == tap and n.op not in ("output",):
            return n
        if n.op == "call_function" and tap in _module_path_of(n):
            last = n
    if last is not None:
        return last
    names = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    mods = sorted({p for n in gm.graph.nodes for p in _module_path_of(n) if p})
    raise InputError(f"tap {tap!r} is neither a node nor a module of the graph",
                     fix=f"use a node name (e.g. {', '.join(names[-5:])}) or a module name "
                         f"(e.g. {', '.join(mods[:5])})")


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: dict[str, list[str]]):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = wanted  # node name -> tap names
        self.found: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        for tap in self.wanted.get(n.name, ()):
            self.found[tap] = out
        return out


class FeatureTaps:
    """Run a module and capture named intermediate values: ``out, feats = FeatureTaps(module, taps)(*args)``."""

    def __init__(self, module: nn.Module, taps: Sequence[str], *, allow_trace: bool = False):
        if not isinstance(module, nn.Module):
            raise InputError(f"expected an nn.Module, got {type(module).__name__}", fix="pass the model")
        self.module = module
        self.taps = list(taps)
        self.allow_trace = allow_trace
        self._gm: fx.GraphModule | None = None
        self._nodes: dict[str, list[str]] = {}
        if _is_graph(module):
            self._bind(module)
        else:
            missing = [t for t in self.taps if not _is_submodule(module, t)]
            if missing and not allow_trace:
                raise InputError(f"taps {missing} are not module names of {type(module).__name__}; node-name taps "
                                 "need a traced program",
                                 fix="use module names for a plain nn.Module student, or distil into the compiled "
                                     "module (fxprune.compile(...).module), whose node names are the taps")
            self._hooks_only = not missing

    def _bind(self, gm: fx.GraphModule) -> None:
        self._gm = gm
        self._nodes = {}
        for t in self.taps:
            self._nodes.setdefault(resolve_tap(gm, t).name, []).append(t)

    def resolved(self) -> dict[str, str]:
        """tap -> node name (for graph modules; module-hooked taps map to themselves)."""
        if self._gm is None:
            return {t: t for t in self.taps}
        return {t: n for n, ts in self._nodes.items() for t in ts}

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        if self._gm is None and not getattr(self, "_hooks_only", True):
            from .trace import trace

            self._bind(trace(self.module, args, kwargs))  # a teacher snapshot for node-name taps
        if self._gm is not None:
            return self._run_graph(self._gm, args, kwargs)
        return self._run_hooks(args, kwargs)

    def _run_graph(self, gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]]:
        spec = getattr(gm, "_in_spec", None)
        flat = list(tree_flatten_spec((args, kwargs), spec)) if spec is not None else list(args) + list(
            kwargs.values())
        rec = _Recorder(gm, self._nodes)
        out = rec.run(*flat, enable_io_processing=False)
        out = gm.graph.process_outputs(out)
        return out, {t: rec.found[t] for t in self.taps}

    def _run_hooks(self, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]]:
        found: dict[str, Any] = {}
        handles = []
        for t in self.taps:
            mod = self.module.get_submodule(t)
            handles.append(mod.register_forward_hook(lambda m, i, o, t=t: found.__setitem__(t, o)))
        try:
            out = self.module(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        missing = [t for t in self.taps if t not in found]
        if missing:
            raise InputError(f"modules {missing} did not run in forward", fix="tap modules that forward() calls")
        return out, found


def _set_mode(m: nn.Module, training: bool) -> None:
    try:
        m.train(training)
    except NotImplementedError:  # torch.export modules refuse train()/eval(); their graph fixes the mode anyway
        pass


def _is_graph(m: nn.Module) -> bool:
    return isinstance(m, fx.GraphModule)


def _is_submodule(m: nn.Module, name: str) -> bool:
    try:
        m.get_submodule(name)
        return True
    except AttributeError:
        return False


def _tensor(x: Any, tap: str) -> torch.Tensor:
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise InputError(f"tap {tap!r} is not a tensor ({type(x).__name__})", fix="tap a node producing a tensor")
    return x


# ---------------------------------------------------------------------------------------------------- distillers
class FeatureDistiller(nn.Module):
    """Base class: runs teacher (no_grad, eval) and student, collects taps, returns ``(student_out, loss)``.

    Its own parameters are only the adapters (if any); teacher and student are not registered as submodules.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, taps: Sequence[Any] | dict[str, str]):
        super().__init__()
        if isinstance(taps, dict):
            pairs = list(taps.items())
        elif isinstance(taps, (list, tuple)) and taps:
            pairs = []
            for t in taps:
                if isinstance(t, str):
                    pairs.append((t, t))
                elif isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(s, str) for s in t):
                    pairs.append((t[0], t[1]))
                else:
                    raise InputError(f"bad tap {t!r}", fix="taps are names, or (teacher_tap, student_tap) pairs")
        else:
            raise InputError(f"taps must be a non-empty list of node/module names, got {taps!r}",
                             fix="e.g. taps=['relu_3', 'relu_5']")
        for m, what in ((teacher, "teacher"), (student, "student")):
            if not isinstance(m, nn.Module):
                raise InputError(f"{what} must be an nn.Module, got {type(m).__name__}",
                                 fix="pass the unpruned model as teacher and the pruned module as student")
        self.pairs = pairs
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "student", student)
        self._t = FeatureTaps(teacher, [p[0] for p in pairs], allow_trace=True)
        self._s = FeatureTaps(student, [p[1] for p in pairs], allow_trace=False)

    def features(self, *args: Any, **kwargs: Any) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
        """``(student_out, teacher_feats, student_feats)`` for one batch (teacher under no_grad, eval mode)."""
        was = self.teacher.training
        _set_mode(self.teacher, False)
        try:
            with torch.no_grad():
                _, tf = self._t(*args, **kwargs)
        finally:
            _set_mode(self.teacher, was)
        out, sf = self._s(*args, **kwargs)
        t = [_tensor(tf[a], a).detach() for a, _ in self.pairs]
        s = [_tensor(sf[b], b) for _, b in self.pairs]
        return out, t, s

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        out, t, s = self.features(*args, **kwargs)
        return out, self.loss(t, s)

    def loss(self, teacher_feats: list[torch.Tensor], student_feats: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def resolved_taps(self) -> dict[str, dict[str, str]]:
        """Where each tap resolved: ``{"teacher": {tap: node}, "student": {tap: node}}``."""
        return {"teacher": self._t.resolved(), "student": self._s.resolved()}


def _weights(values: Any, n: int, what: str, default: float) -> list[float]:
    if values is None:
        return [default] * n
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return [float(values)] * n
    vals = list(values)
    if len(vals) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        raise InputError(f"{what} must be a number or one number per tap ({n}), got {values!r}",
                         fix=f"e.g. {what}=1.0 or {what}=[1.0] * {n}")
    return [float(v) for v in vals]


def spatial_attention(f: torch.Tensor) -> torch.Tensor:
    """``a(F) = L2-normalise(flatten(mean_c F^2))`` per sample: (N, H*W)."""
    if f.dim() < 3:
        raise InputError(f"spatial attention needs (N, C, ...) feature maps, got shape {tuple(f.shape)}",
                         fix="tap a convolutional feature map")
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def sad_loss(teacher_feats: Sequence[torch.Tensor], student_feats: Sequence[torch.Tensor],
             betas: Sequence[float]) -> torch.Tensor:
    """``sum_i beta_i * mean((a(T_i) - a(S_i))^2)``."""
    total = None
    for t, s, b in zip(teacher_feats, student_feats, betas):
        if t.shape[2:] != s.shape[2:] or t.shape[0] != s.shape[0]:
            raise InputError(f"teacher and student maps differ in batch/spatial shape: {tuple(t.shape)} vs "
                             f"{tuple(s.shape)}", fix="tap layers whose spatial size pruning does not change")
        term = b * (spatial_attention(t.float()) - spatial_attention(s.float())).pow(2).mean()
        total = term if total is None else total + term
    return total


class SpatialAttentionLoss(FeatureDistiller):
    """Spatial attention distillation (YOLOv4 recipe): ``L = sum_i beta_i mean((a_T,i - a_S,i)^2)`` with
    ``a(F) = normalise(mean_c F^2)``. Works across channel counts. ``betas``: a number or one per tap."""

    def __init__(self, teacher: nn.Module, student: nn.Module, taps: Sequence[Any] | dict[str, str], *,
                 betas: float | Sequence[float] | None = None):
        super().__init__(teacher, student, taps)
        self.betas = _weights(betas, len(self.pairs), "betas", 1.0)

    def loss(self, teacher_feats: list[torch.Tensor], student_feats: list[torch.Tensor]) -> torch.Tensor:
        return sad_loss(teacher_feats, student_feats, self.betas)


def cwd_loss(teacher_map: torch.Tensor, student_map: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation: ``tau^2 / (N C) * sum_{n,c} KL(softmax(T_nc / tau) || softmax(S_nc / tau))``
    with the softmax over spatial positions. Maps must have the same shape."""
    if teacher_map.shape != student_map.shape:
        raise InputError(f"CWD needs equal shapes, got {tuple(teacher_map.shape)} and {tuple(student_map.shape)}",
                         fix="ChannelWiseLoss adds 1x1 adapters for channel mismatches; spatial sizes must match")
    n, c = teacher_map.shape[:2]
    t = teacher_map.float().reshape(n * c, -1) / tau
    s = student_map.float().reshape(n * c, -1) / tau
    pt = t.softmax(1)
    kl = (pt * (t.log_softmax(1) - s.log_softmax(1))).sum()
    return kl * (tau ** 2) / (n * c)


class ChannelWiseLoss(FeatureDistiller):
    """Channel-wise distillation (CWD; YOLOv8 recipe): per tap ``weight * cwd_loss(T, adapter(S), tau)``.

    Where teacher and student channel counts differ, a learnable 1x1 conv adapter maps the student map to the
    teacher's channels (seeded init). Channel counts come from the graphs' shape metadata, or from one forward on
    ``example_inputs`` for plain modules; otherwise adapters are created on the first call (then build your
    optimizer after it). ``weight``: a number or one per tap.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, taps: Sequence[Any] | dict[str, str], *,
                 tau: float = 4.0, weight: float | Sequence[float] = 3.0, example_inputs: Any = None, seed: int = 0):
        super().__init__(teacher, student, taps)
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or tau <= 0:
            raise InputError(f"tau must be > 0, got {tau!r}", fix="e.g. tau=4.0")
        self.tau = float(tau)
        self.weights = _weights(weight, len(self.pairs), "weight", 3.0)
        self.seed = seed
        self.adapters = nn.ModuleDict()
        chans = self._channels_from_meta()
        if chans is None and example_inputs is not None:
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            with torch.no_grad():
                _, t, s = self.features(*args)
            chans = [(int(a.shape[1]), int(b.shape[1])) for a, b in zip(t, s)]
        if chans is not None:
            self._make_adapters(chans)
        self._ready = chans is not None

    def _channels_from_meta(self) -> list[tuple[int, int]] | None:
        if self._t._gm is None or self._s._gm is None:
            return None
        out = []
        tn, sn = self._t.resolved(), self._s.resolved()
        tnodes = {n.name: n for n in self._t._gm.graph.nodes}
        snodes = {n.name: n for n in self._s._gm.graph.nodes}
        for a, b in self.pairs:
            tv, sv = tnodes[tn[a]].meta.get("val"), snodes[sn[b]].meta.get("val")
            if not (isinstance(tv, torch.Tensor) and isinstance(sv, torch.Tensor)) or tv.dim() < 2 or sv.dim() < 2:
                return None
            out.append((int(tv.shape[1]), int(sv.shape[1])))
        return out

    def _make_adapters(self, chans: list[tuple[int, int]]) -> None:
        g = torch.Generator().manual_seed(self.seed)
        for i, (ct, cs) in enumerate(chans):
            if ct != cs:
                conv = nn.Conv2d(cs, ct, 1)
                with torch.no_grad():
                    bound = 1.0 / cs ** 0.5
                    conv.weight.copy_(torch.empty_like(conv.weight).uniform_(-bound, bound, generator=g))
                    conv.bias.zero_()
                self.adapters[str(i)] = conv

    def loss(self, teacher_feats: list[torch.Tensor], student_feats: list[torch.Tensor]) -> torch.Tensor:
        if not self._ready:
            self._make_adapters([(int(t.shape[1]), int(s.shape[1])) for t, s in zip(teacher_feats, student_feats)])
            self._ready = True
        total = None
        for i, (t, s, w) in enumerate(zip(teacher_feats, student_feats, self.weights)):
            if str(i) in self.adapters:
                a = self.adapters[str(i)]
                if s.dim() != 4:
                    raise InputError(f"tap {self.pairs[i][1]!r}: channel adapters need (N, C, H, W) maps, got "
                                     f"{tuple(s.shape)}", fix="tap 2D feature maps")
                s = a(s)
            term = w * cwd_loss(t, s, self.tau)
            total = term if total is None else total + term
        return total
