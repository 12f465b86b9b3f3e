"""PDP: parameter-free differentiable pruning (Cho et al., arXiv 2305.11203) as parametrizations.

Each pruned weight ``w`` is reparametrized as ``m(w) * w`` with the soft mask

    m(w) = sigmoid((w^2 - t^2) / (tau * mean(w^2)))

where ``t = (W_h + W_t) / 2`` lies between the smallest kept magnitude ``W_h`` (the ``round((1 - r_l) n)``-th
largest) and the largest pruned one ``W_t``, recomputed from the current weights at every forward. ``tau`` is
relative to ``mean(w^2)`` of the layer (the paper's absolute tau depends on the weight scale). The mask has no
parameters and every weight, pruned or not, keeps a gradient, so weights can move across the threshold while
training.

Per-layer targets ``r_l`` (``allocation="global"``, the default; paper, Appendix D): when the dense warm-up ends
(``warmup`` ``pdp.step()`` calls; at install time when ``warmup=0``), all pruned weights are sorted by magnitude
together and each layer's target is the fraction of its weights below the global threshold that removes ``target``
of them (capped so every layer keeps one weight). ``allocation="uniform"`` prunes every layer at ``target``. After
the warm-up each layer's ratio ramps from 0 to ``r_l`` over ``ramp`` steps, linearly by default (the paper's
schedule; ``schedule="cubic"`` is Zhu & Gupta's). N:M has no allocation (the pattern fixes every layer).

Structures:
* ``"unstructured"``: one threshold per layer (conv/linear/matmul weights).
* ``"nm"``: ``t`` inside every run of ``m`` weights along the input dim, between the ``n``-th and ``n+1``-th
  largest magnitude (the TensorRT layout of :class:`~fxprune.passes.nm_sparsity.NMSparsity`).
* ``"channel"``: one soft mask value per channel of every prunable channel group, from the channel's squared L2
  norm over all parameter slices it owns (each member normalised by its mean). The mask scales the channel *once*:
  on its producers' output slices (conv/linear weight rows and biases) or, where a producer feeds a normalisation
  directly (conv -> BatchNorm), on that norm's weight and bias instead (a BN in training mode would undo a scale on
  its input). Consumers' input slices are scored but not scaled, so a soft channel contributes ``m * channel``
  downstream (not ``m^2`` or ``m^3``). Global allocation compares channels across groups by their squared norm
  relative to their group's mean [derived: the paper allocates channels per layer without giving the rule].
  ``finalize()`` turns the masks into group keep-masks that ``Shrink`` removes.

Workflow (the user's own training loop)::

    pdp = PDP(0.9, warmup=100, ramp=1000)                 # global allocation at step 100, linear ramp
    out = fxprune.compile(model, (x,), passes=[pdp])      # out.module now carries the soft masks; PDP goes last
    for xb, yb in loader:                                 # any loop, any optimizer
        loss = F.cross_entropy(out.module(xb), yb); opt.zero_grad(); loss.backward(); opt.step(); pdp.step()
    final = pdp.finalize()                                # a Compiled: hard masks (channel: shrunk)

``pdp.attach(model, (x,))`` does the same on the user's own ``nn.Module`` (parametrizations on its submodules).
Parametrized modules can not be pickled whole (torch limitation) and should not be deep-copied while PDP is
attached; ``finalize()`` first.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from fxprune.errors import InputError
from fxprune.groups import Group
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program
from fxprune.utils import get_tensor, ignore_filter, owner

from .shrink import Shrink
from .sparse_kernels import nm_mask
from .unstructured import targets, validate_ignore

STRUCTURES = ("unstructured", "nm", "channel")
_MIN_LOGIT = 1e-6  # |z| floor away from the threshold, so a kept weight never rounds to m == 0.5 in float32


def ramp_fraction(step: int, warmup: int, ramp: int, schedule: str = "linear") -> float:
    """Fraction of the final ratio reached after ``step`` optimizer steps: 0 during the warm-up, then rising to 1
    over ``ramp`` steps (``"linear"``: ``x``; ``"cubic"``: ``1 - (1 - x)^3``)."""
    s = step - warmup
    if s < 0:
        return 0.0
    if ramp <= 0 or s >= ramp:
        return 1.0
    x = s / ramp
    return x if schedule == "linear" else 1.0 - (1.0 - x) ** 3


def global_allocation(scores: dict[Any, torch.Tensor], target: float) -> dict[Any, float]:
    """Per-layer ratios from one global threshold: sort all ``scores`` (e.g. ``|w|``) together, remove the
    ``round(target * total)`` smallest (ties by layer order, then index); each layer's ratio is the fraction of its
    entries removed, capped at ``(n - 1) / n`` so every layer keeps one."""
    keys = list(scores)
    flat = torch.cat([scores[k].detach().reshape(-1).double() for k in keys])
    drop = int(round(target * flat.numel()))
    removed = torch.zeros(flat.numel(), dtype=torch.bool)
    removed[torch.argsort(flat, stable=True)[:drop]] = True
    out, i = {}, 0
    for k in keys:
        n = scores[k].numel()
        out[k] = min(float(removed[i:i + n].sum()) / n, (n - 1) / n)
        i += n
    return out


class _Schedule:
    """Step counter and per-layer targets shared by all masks of one PDP (kept shared by deepcopy)."""

    def __init__(self, target: float, warmup: int, ramp: int, schedule: str):
        self.target, self.warmup, self.ramp, self.schedule = target, warmup, ramp, schedule
        self.step = 0
        self.hard = False  # finalize() computes masks at the (per-layer) target ratio
        self.layer_targets: dict[Any, float] | None = None  # set when global allocation runs

    def final(self, key: Any = None) -> float:
        if self.layer_targets is not None and key in self.layer_targets:
            return self.layer_targets[key]
        return self.target

    def ratio(self, key: Any = None) -> float:
        r = self.final(key)
        if self.hard:
            return r
        return r * ramp_fraction(self.step, self.warmup, self.ramp, self.schedule)

    def __deepcopy__(self, memo: dict) -> "_Schedule":
        return self


def _logit(a: torch.Tensor, t2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    z = (a - t2) / scale
    return torch.where(z == 0, z, torch.sign(z) * torch.clamp(z.abs(), min=_MIN_LOGIT))


def soft_mask(w: torch.Tensor, t: torch.Tensor | float, tau: float, scale: torch.Tensor | float | None = None
              ) -> torch.Tensor:
    """``sigmoid((w^2 - t^2) / (tau * scale))`` with ``scale = mean(w^2)`` by default (exactly 0.5 at ``|w| = t``)."""
    t = torch.as_tensor(t, dtype=w.dtype)
    if scale is None:
        scale = w.detach().pow(2).mean().clamp_min(1e-30)
    return torch.sigmoid(_logit(w.pow(2), t.pow(2), tau * torch.as_tensor(scale, dtype=w.dtype)))


def layer_threshold(w: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """``t`` between the ``keep``-th and ``keep+1``-th largest ``|w|`` (``keep = n - round(ratio n)``); None if
    nothing is pruned."""
    a = w.detach().abs().reshape(-1)
    n = a.numel()
    drop = int(round(ratio * n))
    if drop <= 0:
        return None
    drop = min(drop, n - 1)
    w_t = torch.kthvalue(a, drop).values  # largest pruned magnitude
    w_h = torch.kthvalue(a, drop + 1).values  # smallest kept magnitude
    return (w_h + w_t) / 2


def nm_threshold(w: torch.Tensor, keep: int, m: int, dim: int) -> torch.Tensor | None:
    """Per-group ``t`` (broadcast to ``w.shape``) between the ``keep``-th and ``keep+1``-th largest ``|w|``."""
    if keep >= m:
        return None
    s = w.detach().abs().movedim(dim, -1)
    shp = s.shape
    g = s.reshape(*shp[:-1], shp[-1] // m, m)
    top = g.topk(keep + 1, dim=-1).values
    t = (top[..., keep - 1] + top[..., keep]) / 2
    return t.unsqueeze(-1).expand(g.shape).reshape(shp).movedim(-1, dim)


class PDPMask(nn.Module):
    """Parametrization ``w -> m(w) * w`` for the unstructured and N:M structures."""

    def __init__(self, sched: _Schedule, structure: str, tau: float, n: int = 2, m: int = 4, dim: int = 1,
                 key: str = ""):
        super().__init__()
        self.sched, self.structure, self.tau, self.n, self.m, self.dim = sched, structure, tau, n, m, dim
        self.key = key  # the weight's name: its per-layer target in the schedule

    def threshold(self, w: torch.Tensor) -> torch.Tensor | None:
        r = self.sched.ratio(self.key)
        if self.structure == "unstructured":
            return layer_threshold(w, r)
        keep = self.m - int(round(r / self.sched.target * (self.m - self.n))) if self.sched.target > 0 else self.m
        return nm_threshold(w, keep, self.m, self.dim)

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        t = self.threshold(w)
        if t is None:
            return torch.ones_like(w)
        scale = w.detach().pow(2).mean().clamp_min(1e-30)
        return torch.sigmoid(_logit(w.pow(2), t.pow(2), self.tau * scale))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.mask(w) * w


class _ChannelState:
    """Computes the soft channel masks of the groups from the current (original) parameters."""

    def __init__(self, sched: _Schedule, tau: float, root: nn.Module, groups: list[Group], pnames: set[str]):
        self.sched, self.tau, self.root = sched, tau, root
        self.groups = groups
        self.pnames = pnames

    def __deepcopy__(self, memo: dict) -> "_ChannelState":
        return self

    def original(self, name: str) -> torch.Tensor:
        mod, attr = owner(self.root, name)
        if parametrize.is_parametrized(mod, attr):
            return mod.parametrizations[attr].original
        return getattr(mod, attr)

    def sq_norms(self, g: Group, override: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        total = None
        for mem in g.members:
            if mem.param not in self.pnames:
                continue
            w = (override or {}).get(mem.param)
            w = self.original(mem.param) if w is None else w
            x = w.movedim(mem.dim, 0).reshape(w.shape[mem.dim], -1).pow(2).sum(1)
            coords = torch.as_tensor(mem.coords, dtype=torch.long)
            sel = coords >= 0
            s = torch.zeros(g.size, dtype=x.dtype).index_add(0, coords[sel], x[sel])
            cnt = torch.zeros(g.size, dtype=x.dtype).index_add(0, coords[sel], torch.ones_like(x[sel]))
            s = s / cnt.clamp_min(1)
            s = s / s.detach().mean().clamp_min(1e-30)
            total = s if total is None else total + s
        return total if total is not None else torch.ones(g.size)

    def keep_count(self, g: Group, ratio: float) -> int:
        return max(1, g.size - int(round(ratio * g.size)))

    def mask(self, g: Group, override: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        s = self.sq_norms(g, override)
        r = self.sched.ratio(g.id)
        keep = self.keep_count(g, r)
        if keep >= g.size:
            return torch.ones_like(s)
        norms = s.detach().clamp_min(0).sqrt()
        top = norms.topk(keep + 1).values
        t = (top[keep - 1] + top[keep]) / 2
        scale = s.detach().mean().clamp_min(1e-30)
        return torch.sigmoid(_logit(s, t.pow(2), self.tau * scale))


class PDPChannelMask(nn.Module):
    """Parametrization multiplying every slice of a parameter by the soft mask of the channel owning it."""

    def __init__(self, state: _ChannelState, name: str, links: list[tuple[int, int, np.ndarray]]):
        super().__init__()
        self.state, self.name, self.links = state, name, links  # (group index, dim, coords)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = w
        for gi, dim, coords in self.links:
            m = self.state.mask(self.state.groups[gi], {self.name: w})
            c = torch.as_tensor(coords, dtype=torch.long)
            full = torch.where(c >= 0, m[c.clamp_min(0)], torch.ones((), dtype=m.dtype))
            shape = [1] * w.dim()
            shape[dim] = -1
            out = out * full.reshape(shape)
        return out


_NORM_AFFINE = {torch.ops.aten.batch_norm.default: (1, 2), torch.ops.aten.instance_norm.default: (1, 2),
                torch.ops.aten.layer_norm.default: (2, 3), torch.ops.aten.group_norm.default: (2, 3)}
_PRODUCERS = {torch.ops.aten.conv1d.default: 0, torch.ops.aten.conv2d.default: 0, torch.ops.aten.conv3d.default: 0,
              torch.ops.aten.linear.default: 0, torch.ops.aten.conv_transpose1d.default: 1,
              torch.ops.aten.conv_transpose2d.input: 1, torch.ops.aten.conv_transpose3d.input: 1}


def channel_output_slices(gm: Any) -> tuple[set[tuple[str, int]], set[tuple[str, int]], set[str]]:
    """From the graph: ``outputs`` = (param, dim) of every conv/linear weight's output dim and its bias (dim 0);
    ``norms`` = (param, 0) of every normalisation's weight and bias; ``absorbed`` = the weights and biases of the
    producers whose only user is a normalisation (their channel scale goes on the norm instead)."""
    outputs, norms, absorbed = set(), set(), set()

    def attr(n: Any) -> str | None:
        return n.target if getattr(n, "op", None) == "get_attr" else None

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _PRODUCERS:
            w = attr(n.args[1]) if len(n.args) > 1 else None
            b = attr(n.args[2]) if len(n.args) > 2 else None
            if w is not None:
                outputs.add((w, _PRODUCERS[n.target]))
            if b is not None:
                outputs.add((b, 0))
        elif n.target in _NORM_AFFINE:
            names = [attr(n.args[i]) if len(n.args) > i else None for i in _NORM_AFFINE[n.target]]
            norms.update((a, 0) for a in names if a is not None)
            src = n.args[0]
            if getattr(src, "op", None) == "call_function" and src.target in _PRODUCERS and len(src.users) == 1 \
                    and any(a is not None for a in names):
                absorbed.update(a for a in (attr(src.args[1]), attr(src.args[2]) if len(src.args) > 2 else None)
                                if a is not None)
    return outputs, norms, absorbed


@register_pass
class PDP(Pass):
    """Parameter-free differentiable pruning: soft masks trained through by the user's loop.

    ``target``: final sparsity (fraction removed; for ``"nm"`` it is ``1 - n/m`` and may be omitted).
    ``structure``: ``"unstructured"`` | ``"nm"`` | ``"channel"``. ``tau``: temperature relative to ``mean(w^2)``
    (channel: to the mean normalised squared norm). ``warmup``: dense steps; ``ramp``: steps over which the ratio
    grows to its target (``schedule="linear"``, the paper's, or ``"cubic"``). ``allocation``: ``"global"`` (per-layer
    targets from one magnitude threshold when the warm-up ends, the paper's) or ``"uniform"`` (every layer at
    ``target``). ``n``, ``m``: the N:M pattern. ``ignore``: module
    names / modules left alone. After ``compile``, call :meth:`step` once per optimizer step and
    :meth:`finalize` at the end.
    """

    name = "pdp"
    requires = frozenset({"groups"})
    modifies_weights = True

    def __init__(self, target: float | None = None, structure: str = "unstructured", *, tau: float = 0.05,
                 warmup: int = 0, ramp: int = 0, schedule: str = "linear", allocation: str = "global", n: int = 2,
                 m: int = 4, ignore: Iterable[Any] = ()):
        if structure not in STRUCTURES:
            raise InputError(f"structure must be one of {', '.join(STRUCTURES)}, got {structure!r}",
                             fix="e.g. PDP(0.9, structure='unstructured')")
        if structure == "nm":
            for k, v in (("n", n), ("m", m)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise InputError(f"{k} must be a positive int, got {v!r}", fix="e.g. n=2, m=4")
            if n >= m:
                raise InputError(f"n must be smaller than m, got {n}:{m}", fix="e.g. 2:4")
            implied = 1.0 - n / m
            if target is None:
                target = implied
            elif abs(float(target) - implied) > 1e-9:
                raise InputError(f"target={target} contradicts {n}:{m} (sparsity {implied})",
                                 fix="omit target for structure='nm'")
        if target is None or not isinstance(target, (int, float)) or isinstance(target, bool) \
                or not 0.0 < target < 1.0:
            raise InputError(f"target must be in (0, 1), got {target!r}",
                             fix="target is the final fraction of weights (or channels) removed, e.g. 0.9")
        if not isinstance(tau, (int, float)) or tau <= 0:
            raise InputError(f"tau must be > 0, got {tau!r}", fix="e.g. tau=0.05 (relative to mean(w^2))")
        for k, v in (("warmup", warmup), ("ramp", ramp)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InputError(f"{k} must be an int >= 0 (optimizer steps), got {v!r}", fix=f"e.g. {k}=100")
        if schedule not in ("cubic", "linear"):
            raise InputError(f"schedule must be 'cubic' or 'linear', got {schedule!r}", fix="use 'linear'")
        if allocation not in ("global", "uniform"):
            raise InputError(f"allocation must be 'global' or 'uniform', got {allocation!r}",
                             fix="'global' (the paper's per-layer targets) or 'uniform'")
        self.target = float(target)
        self.structure = structure
        self.tau = float(tau)
        self.warmup = warmup
        self.ramp = ramp
        self.schedule = schedule
        self.allocation = allocation if structure != "nm" else "uniform"
        self.n = n
        self.m = m
        self.ignore = validate_ignore(ignore)
        self._sched = _Schedule(self.target, warmup, ramp, schedule)
        self._module: nn.Module | None = None
        self._program: Program | None = None
        self._params: dict[str, Any] = {}  # name -> parametrization
        self._skipped: dict[str, str] = {}
        self._channel: _ChannelState | None = None
        self._scaled: dict[str, str] = {}  # channel structure: how each parametrized weight is scaled

    # ------------------------------------------------------------------ setup
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if self._module is not None:
            raise InputError("this PDP object is already attached to a module",
                             fix="create a new PDP(...) for every compile/attach")
        self._install(program, program.gm)
        return PassResult(program, changed=True, stats=self._stats())

    def attach(self, model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None) -> "PDP":
        """Register the soft masks on the user's own ``model`` (in place) instead of a compiled copy."""
        from fxprune.trace import normalize_inputs, trace

        if self._module is not None:
            raise InputError("this PDP object is already attached to a module",
                             fix="create a new PDP(...) for every compile/attach")
        args, kwargs = normalize_inputs(example_inputs, example_kwargs)
        gm = trace(model, args, kwargs, copy_model=False)
        self._install(Program(gm, args, kwargs, source=model), model)
        return self

    def _install(self, program: Program, module: nn.Module) -> None:
        self._program, self._module = program, module
        if self.structure == "channel":
            self._install_channel(program, module)
        else:
            for name, info in targets(program, self.ignore).items():
                if info.aliases:
                    self._skipped[name] = "tied weight (used under several names)"
                    continue
                if self.structure == "nm":
                    red = info.reduction_size
                    if info.kind == "conv_transpose" or red < self.m or red % self.m:
                        self._skipped[name] = f"reduction dim {red} not a multiple of {self.m}" \
                            if info.kind != "conv_transpose" else "transposed conv"
                        continue
                p = PDPMask(self._sched, self.structure, self.tau, self.n, self.m, info.reduction_dim, key=name)
                mod, attr = owner(module, name)
                parametrize.register_parametrization(mod, attr, p)
                self._params[name] = p
        if not self._params and self._channel is None:
            raise InputError(f"PDP({self.structure}) found nothing to prune", fix="check ignore= and the model")
        if self.warmup == 0:
            self._allocate()

    @torch.no_grad()
    def _allocate(self) -> None:
        """Per-layer targets from the current weights (once, when the warm-up ends)."""
        if self.allocation != "global" or self._sched.layer_targets is not None:
            return
        if self._channel is not None:
            scores = {}
            for g in self._channel.groups:
                s = self._channel.sq_norms(g).detach()
                scores[g.id] = s / s.mean().clamp_min(1e-30)
        else:
            scores = {name: self._original(name).abs() for name in self._params}
        self._sched.layer_targets = global_allocation(scores, self.target) if scores else {}

    @property
    def layer_targets(self) -> dict[Any, float]:
        """Final ratio per weight name (channel: per group id); ``target`` everywhere until the global allocation
        has run (at the end of the warm-up) or with ``allocation="uniform"``."""
        if self._channel is not None:
            return {g.id: self._sched.final(g.id) for g in self._channel.groups}
        return {name: self._sched.final(name) for name in self._params}

    def _install_channel(self, program: Program, module: nn.Module) -> None:
        gs = program.groups
        ignored = ignore_filter(program, self.ignore)
        roles = gs.analysis.param_roles
        groups = []
        pnames: set[str] = set()
        for g in gs.prunable():
            if g.kind != "channels" or any(ignored(p) for p in g.params()):
                continue
            groups.append(g)
        links: dict[str, list[tuple[int, int, np.ndarray]]] = {}
        outputs, norms, absorbed = channel_output_slices(program.gm)
        for gi, g in enumerate(groups):
            scored = []
            for mem in g.members:
                t = get_tensor(module, mem.param)
                if not isinstance(t, nn.Parameter) or not t.is_floating_point() or \
                        "no_zero" in roles.get(mem.param, set()):
                    continue
                pnames.add(mem.param)
                scored.append(mem)
            # scale the channel once: its producers' outputs, or the norm right after a producer
            scaled = [m for m in scored if (m.param, m.dim) in norms
                      or ((m.param, m.dim) in outputs and m.param not in absorbed)]
            if not scaled:  # no recognised producer: fall back to every slice (reported)
                scaled = scored
                self._skipped[f"group {g.id}"] = "no producer slice recognised: every slice scaled"
            for mem in scaled:
                self._scaled[mem.param] = "norm" if (mem.param, mem.dim) in norms else "output"
                links.setdefault(mem.param, []).append((gi, mem.dim, mem.coords.copy()))
        self._channel = _ChannelState(self._sched, self.tau, module, groups, pnames)
        for name, lk in links.items():
            p = PDPChannelMask(self._channel, name, lk)
            mod, attr = owner(module, name)
            parametrize.register_parametrization(mod, attr, p)
            self._params[name] = p

    def _stats(self) -> dict[str, Any]:
        st = {"structure": self.structure, "target": self.target, "parametrized": len(self._params),
              "skipped": dict(self._skipped),
              "next": "train the module, call pdp.step() after every optimizer step, then pdp.finalize()"}
        st["allocation"] = self.allocation
        st["schedule"] = self.schedule
        if self._channel is not None:
            st["groups"] = len(self._channel.groups)
            st["scaled"] = dict(self._scaled)
        return st

    # ------------------------------------------------------------------ training-time API
    def _require(self) -> nn.Module:
        if self._module is None:
            raise InputError("PDP is not attached", fix="run it in fxprune.compile(..., passes=[pdp]) or call "
                             "pdp.attach(model, example_inputs) first")
        return self._module

    @property
    def module(self) -> nn.Module:
        """The module carrying the soft masks (``Compiled.module`` or the attached model)."""
        return self._require()

    def step(self, k: int = 1) -> float:
        """Advance the schedule by ``k`` optimizer steps; returns the current ratio."""
        self._require()
        self._sched.step += int(k)
        if self._sched.step >= self.warmup:
            self._allocate()
        return self._sched.ratio()

    @property
    def ratio(self) -> float:
        """The overall sparsity the soft masks currently aim at (0 during warm-up, ``target`` after the ramp;
        per layer: ``layer_targets`` times the same ramp fraction)."""
        return self._sched.ratio()

    def _original(self, name: str) -> torch.Tensor:
        mod, attr = owner(self._require(), name)
        return mod.parametrizations[attr].original

    @torch.no_grad()
    def soft_masks(self) -> dict[str, torch.Tensor]:
        """Current soft mask of every parametrized weight (channel structure: per group id)."""
        self._require()
        if self._channel is not None:
            return {g.id: self._channel.mask(g).detach() for g in self._channel.groups}
        return {name: p.mask(self._original(name)).detach() for name, p in self._params.items()}

    @torch.no_grad()
    def thresholds(self) -> dict[str, torch.Tensor | None]:
        """Current ``t`` of every weight (unstructured: a scalar; N:M: per element of the weight)."""
        self._require()
        if self._channel is not None:
            raise InputError("thresholds() is for the unstructured/nm structures", fix="use soft_masks()")
        return {name: p.threshold(self._original(name)) for name, p in self._params.items()}

    @torch.no_grad()
    def hard_masks(self) -> dict[Any, Any]:
        """The masks ``finalize`` would apply now, at the *target* ratio: ``{param: bool tensor}`` or, for
        ``"channel"``, ``{group id: bool array}``. Ties are broken by index so counts are exact."""
        self._require()
        old = self._sched.hard
        self._sched.hard = True
        try:
            if self._channel is not None:
                out = {}
                for g in self._channel.groups:
                    s = self._channel.sq_norms(g)
                    keep = self._channel.keep_count(g, self._sched.final(g.id))
                    mask = np.zeros(g.size, dtype=bool)
                    mask[torch.argsort(-s, stable=True)[:keep].numpy()] = True
                    out[g.id] = mask
                return out
            out = {}
            for name, p in self._params.items():
                w = self._original(name)
                if self.structure == "nm":
                    out[name] = nm_mask(w.abs(), self.n, self.m, p.dim)
                else:
                    a = w.abs().reshape(-1)
                    keep = a.numel() - int(round(self._sched.final(name) * a.numel()))
                    mask = torch.zeros(a.numel(), dtype=torch.bool)
                    mask[torch.argsort(-a, stable=True)[:keep]] = True
                    out[name] = mask.reshape(w.shape)
            return out
        finally:
            self._sched.hard = old

    # ------------------------------------------------------------------ finalize
    def finalize(self, passes: Iterable[Pass] | None = None, *, seed: int = 0, verify: bool = True):
        """Turn the soft masks into hard masks and return a :class:`fxprune.Compiled`.

        The trained effective weights ``m(w) * w`` are baked in, the parametrizations removed, the hard masks
        applied; then the module is compiled again with ``passes`` (default: ``[Shrink()]`` for ``"channel"``,
        nothing for the fine-grained structures, whose masks stay in ``Compiled.program.weight_masks``; use
        :func:`fxprune.passes.sparse_kernels.enforce_masks` on ``Compiled.module`` to keep them through further
        training). The attached module itself is left without parametrizations (weights = baked, masked values).

        A helper the user calls after training, outside any pass run: it compiles the trained module through the
        core's public :func:`fxprune.compile.compile` (no pass runs a nested compile).
        """
        from fxprune.compile import compile

        module = self._require()
        program = self._program
        self._allocate()
        masks = self.hard_masks()
        self._sched.hard = True  # bake at the target ratio
        with torch.no_grad():  # all effective weights first: channel masks read the other originals
            effective = {name: get_tensor(module, name).detach().clone() for name in self._params}
        for name in list(self._params):
            mod, attr = owner(module, name)
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
            with torch.no_grad():
                getattr(mod, attr).copy_(effective[name])
        self._params = {}
        self._module = None
        weight_masks: dict[str, torch.Tensor] = {}
        group_masks: dict[tuple, np.ndarray] = {}
        if self.structure == "channel":
            gs = program.groups
            for gid, mk in masks.items():
                group_masks[_signature(gs[gid])] = mk
        else:
            weight_masks = masks
            with torch.no_grad():
                for name, mk in masks.items():
                    get_tensor(module, name).mul_(mk.to(get_tensor(module, name).dtype))
        if passes is None:
            passes = [Shrink()] if self.structure == "channel" else []
        preset = _PresetMasks(weight_masks, group_masks, source=f"pdp-{self.structure}")
        return compile(module, program.args, [preset, *passes], example_kwargs=program.kwargs, seed=seed,
                               verify=verify)


def _signature(g: Group) -> tuple:
    return tuple(sorted((m.param, m.dim, m.coords.tobytes()) for m in g.members))


class _PresetMasks(Pass):
    """Writes precomputed masks (weight masks by name, group masks by group membership) into the program."""

    name = "preset_masks"
    requires = frozenset({"groups"})

    def __init__(self, weight_masks: dict[str, torch.Tensor], group_masks: dict[tuple, np.ndarray],
                 source: str = ""):
        self._weight_masks = weight_masks
        self._group_masks = group_masks
        self.source = source

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        for name, mk in self._weight_masks.items():
            old = program.weight_masks.get(name)
            program.weight_masks[name] = mk if old is None else (mk & old)
        found = 0
        if self._group_masks:
            by_sig = {_signature(g): g for g in program.groups}
            for sig, mk in self._group_masks.items():
                g = by_sig.get(sig)
                if g is None:
                    raise InputError("a channel group of the trained module is missing after re-tracing",
                                     fix="report this model")
                program.masks[g.id] = mk
                found += 1
        zeros = sum(int((~m).sum()) for m in self._weight_masks.values())
        total = sum(m.numel() for m in self._weight_masks.values())
        return PassResult(program, changed=bool(zeros or found), stats={
            "source": self.source, "weight_masks": len(self._weight_masks),
            "weight_sparsity": round(zeros / total, 4) if total else 0.0, "group_masks": found,
            "channels_removed": int(sum((~m).sum() for m in self._group_masks.values()))})
