"""PreCrop: structured pruning at initialization (PreCropping, arXiv 2203.02549; ICLR 2023 version "Structured
pruning of CNNs at initialization").

The paper's finding: what a pruning-at-initialization (PAI) method really decides is the *layer-wise density*
(fraction of each layer's weights kept), not which weights. So PreCrop

1. runs a PAI scorer on the conv/linear weights (every parameter with >= 2 dims) at the target density (global
   threshold): ``"synflow"`` (data-free, iterative with the exponential schedule, 100 rounds), ``"snip"`` (|g . w| on
   one batch) or ``"grasp"`` (Hg . w, temperature 200) - the Synaptic-Flow repository's definitions - and reads the
   per-layer densities ``d_l``; the unstructured mask is discarded;
2. converts densities into channel keep ratios ``rho_g``, one per coupled channel group (so residual chains, concat
   pieces and depthwise pairs share theirs): a layer with output group ``a`` and input group ``b`` keeps
   ``rho_a rho_b`` of its weights, so ``rho`` is fit to ``log(rho_a rho_b) ~ log d_l`` by weighted least squares
   (``allocation="ratio"``); or, with ``allocation="convex"``, the densities come from the paper's convex program
   instead of a scorer: maximise ``sum_l log d_l(rho)`` subject to the parameter budget (a geometric program in
   ``log rho``; solved by a Lagrange multiplier bisection) [derived: our reading of the ICLR version];
   ``allocation="uniform"`` (no scorer) is uniform width scaling, the baseline;
3. fits the integer channel counts to the parameter budget (``density x`` the dense parameter count; a common
   scale on all ratios, bisection) and keeps the *first* ``k_g`` channels of every group;
4. re-initialises the weights for the narrower network (``init="default"``: PyTorch's default rule at the cropped
   fan-in, BatchNorm to identity) so that, after ``Shrink``, the cropped network starts like a freshly built narrow
   model. PreCrop is a selection pass: put ``Shrink()`` after it.

``min_width``: the smallest kept fraction of a group (a float) or channel count (an int).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from fxprune.errors import InputError
from fxprune.groups import GroupSet
from fxprune.masking import param_keep
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program, Stage
from fxprune.records import SelectionRecord

SCORERS = ("synflow", "snip", "grasp")
ALLOCATIONS = ("ratio", "convex", "uniform")


@dataclass(frozen=True)
class PreCropRecord(SelectionRecord):
    """What PreCrop decided: the per-layer densities it read (or solved), the channel ratio per group and the
    parameter budget it met."""

    scorer: str = ""
    allocation: str = ""
    densities: Mapping[str, float] = field(default_factory=dict)  # weight name -> density d_l
    ratios: Mapping[int, float] = field(default_factory=dict)  # group id -> kept fraction
    target_params: int = 0
    params: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "densities", MappingProxyType(dict(self.densities)))
        object.__setattr__(self, "ratios", MappingProxyType(dict(self.ratios)))


# --------------------------------------------------------------------------------------------------- scorers
def prunable_weights(program: Program) -> list[str]:
    """Canonical names of the weights a PAI scorer prunes: parameters with >= 2 dims (conv, linear, embedding)."""
    out = []
    for name in program.groups.analysis.param_spaces:
        t = program.param(name)
        if isinstance(t, nn.Parameter) and t.dim() >= 2 and t.is_floating_point():
            out.append(name)
    return out


def _state(gm: fx.GraphModule, dtype: torch.dtype | None = None, absolute: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        t = v.detach()
        if t.is_floating_point():
            if dtype is not None:
                t = t.to(dtype)
            if absolute:
                t = t.abs()
        out[k] = t
    return out


def _outputs_sum(out: Any) -> torch.Tensor:
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.stack([t.sum() for t in leaves]).sum()


def _first_tensor(out: Any) -> torch.Tensor:
    return next(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


def _global_keep(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep masks of the top ``density`` fraction of all scores (ties at the threshold are removed)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int((1.0 - density) * flat.numel())
    if k < 1:
        return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    thr = torch.kthvalue(flat, k).values
    return {n: s > thr for n, s in scores.items()}


#: elementwise activations SynFlow's linearised network replaces by the identity (on its all-positive signals ReLU
#: already is one; saturating ones such as ReLU6 would otherwise zero the gradient of everything before them)
_ACTIVATIONS = ("relu", "relu_", "hardtanh", "hardtanh_", "relu6", "clamp", "clamp_", "sigmoid", "sigmoid_", "tanh",
                "tanh_", "silu", "silu_", "gelu", "gelu_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_",
                "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "mish_")


def linearized(gm: fx.GraphModule) -> fx.GraphModule:
    """A module sharing ``gm``'s parameters whose graph skips elementwise activations (SynFlow's linear network)."""
    import copy

    graph = copy.deepcopy(gm.graph)
    for n in list(graph.nodes):
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and \
                n.target.overloadpacket.__name__ in _ACTIVATIONS and n.args and isinstance(n.args[0], fx.Node):
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)
    out = fx.GraphModule(gm, graph)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out


def synflow_masks(gm: fx.GraphModule, args: tuple, names: list[str], density: float,
                  iterations: int = 100) -> dict[str, torch.Tensor]:
    """SynFlow (Tanaka et al. 2020): data-free. All parameters and buffers made positive (float64), an all-ones
    input, ``R = sum(outputs)`` of the linearised network (:func:`linearized`), score ``|dR/dw . w|``, pruned
    globally to ``density ** (k / iterations)`` at round ``k``. Never reads data."""
    state = _state(gm, torch.float64, absolute=True)
    gm = linearized(gm)
    inputs = tuple(torch.ones_like(a, dtype=torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point()
                   else a for a in args)
    masks = {n: torch.ones_like(state[n], dtype=torch.bool) for n in names}
    for k in range(1, iterations + 1):
        params = {n: (state[n] * masks[n]).requires_grad_(True) for n in names}
        out = functional_call(gm, {**state, **params}, inputs)
        grads = torch.autograd.grad(_outputs_sum(out), [params[n] for n in names], allow_unused=True)
        scores = {n: ((g if g is not None else torch.zeros_like(params[n])) * params[n]).detach().abs()
                  for n, g in zip(names, grads)}
        masks = _global_keep(scores, density ** (k / iterations))
    return masks


def _batches(data: Any, n: int) -> list[tuple[tuple, Any]]:
    out = []
    for x, y in data:
        out.append((x if isinstance(x, tuple) else (x,), y))
        if len(out) >= n:
            break
    if not out:
        raise InputError("the scorer needs data but the loader yielded no batches",
                         fix="pass data= a loader of (inputs, targets), or use scorer='synflow' (data-free)")
    return out


def snip_masks(gm: fx.GraphModule, names: list[str], density: float, batches: list, loss: Callable
               ) -> dict[str, torch.Tensor]:
    """SNIP (Lee et al. 2019): score ``|dL/dw . w|`` summed over the batches; one shot."""
    state = _state(gm)
    params = {n: state[n].clone().requires_grad_(True) for n in names}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for args, y in batches:
        out = functional_call(gm, {**state, **params}, args)
        grads = torch.autograd.grad(loss(out, y), [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                acc[n] += g
    scores = {n: (acc[n] * params[n]).detach().abs() for n in names}
    return _global_keep(scores, density)


def grasp_masks(gm: fx.GraphModule, names: list[str], density: float, batches: list, loss: Callable,
                temperature: float = 200.0) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al. 2020), as in Synaptic-Flow: ``g`` = gradient (no graph) of the loss of logits / T, then
    ``Hg`` = gradient of ``g . grad(L)``; score ``Hg . w``, the highest kept; one shot."""
    state = _state(gm)
    params = {n: state[n].clone().requires_grad_(True) for n in names}
    plist = [params[n] for n in names]

    def scaled(out: Any) -> Any:
        return tuple(o / temperature for o in out) if isinstance(out, (tuple, list)) else out / temperature

    stopped = [torch.zeros_like(p) for p in plist]
    for args, y in batches:
        out = functional_call(gm, {**state, **params}, args)
        gs = torch.autograd.grad(loss(scaled(out), y), plist, allow_unused=True)
        for s, g in zip(stopped, gs):
            if g is not None:
                s += g
    hg = [torch.zeros_like(p) for p in plist]
    for args, y in batches:
        out = functional_call(gm, {**state, **params}, args)
        gs = torch.autograd.grad(loss(scaled(out), y), plist, create_graph=True, allow_unused=True)
        z = sum((s * g).sum() for s, g in zip(stopped, gs) if g is not None)
        hs = torch.autograd.grad(z, plist, allow_unused=True)
        for acc, h in zip(hg, hs):
            if h is not None:
                acc += h
    scores = {n: (h * p).detach() for n, h, p in zip(names, hg, plist)}
    return _global_keep(scores, density)


def default_loss(out: Any, y: Any) -> torch.Tensor:
    """Cross-entropy of the first output tensor."""
    return F.cross_entropy(_first_tensor(out), y)


# --------------------------------------------------------------------------------------------- ratio solvers
class _ParamModel:
    """Parameters kept as a function of per-group channel ratios, vectorised: every (parameter, dim) row keeps
    ``(fixed + counts . rho) / size`` of its positions; a parameter keeps the product over its dims."""

    def __init__(self, program: Program, free: list[int]):
        gs = program.groups
        self.free = free
        col = {gid: j for j, gid in enumerate(free)}
        names = [n for n in gs.analysis.param_spaces if isinstance(program.param(n), nn.Parameter)]
        self.names = names
        rows: dict[tuple[str, int], int] = {}
        sizes, fixed, counts, owner = [], [], [], []
        for pi, name in enumerate(names):
            shape = gs.param_shapes.get(name, tuple(program.param(name).shape))
            for d, n in enumerate(shape):
                rows[(name, d)] = len(sizes)
                sizes.append(float(n))
                fixed.append(float(n))
                counts.append(np.zeros(len(free)))
                owner.append(pi)
        for gid in free:
            for m in gs[gid].members:
                r = rows.get((m.param, m.dim))
                if r is None:
                    continue
                c = float((m.coords >= 0).sum())
                counts[r][col[gid]] += c
                fixed[r] -= c
        self.size = torch.tensor(sizes, dtype=torch.float64)
        self.fixed = torch.tensor(fixed, dtype=torch.float64)
        self.A = torch.tensor(np.stack(counts) if counts else np.zeros((0, len(free))), dtype=torch.float64)
        self.owner = torch.tensor(owner, dtype=torch.long)
        self.numel = torch.tensor([float(np.prod(gs.param_shapes.get(n, tuple(program.param(n).shape))))
                                   for n in names], dtype=torch.float64)
        self.index = {n: i for i, n in enumerate(names)}

    def log_density(self, rho: torch.Tensor) -> torch.Tensor:
        """log of the kept fraction of every parameter."""
        f = (self.fixed + self.A @ rho) / self.size
        out = torch.zeros(len(self.names), dtype=torch.float64)
        return out.index_add(0, self.owner, torch.log(f.clamp_min(1e-12)))

    def params(self, rho: torch.Tensor) -> torch.Tensor:
        return (self.numel * torch.exp(self.log_density(rho))).sum()


def _fit(model: _ParamModel, lo: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor],
         init: torch.Tensor, steps: int) -> torch.Tensor:
    """Minimise ``objective(rho)`` over ``rho`` in [lo, 1] (sigmoid parameterisation, Adam)."""
    x0 = ((init - lo) / (1 - lo)).clamp(1e-4, 1 - 1e-4)
    theta = torch.log(x0 / (1 - x0)).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(steps):
        rho = lo + (1 - lo) * torch.sigmoid(theta)
        loss = objective(rho)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (lo + (1 - lo) * torch.sigmoid(theta)).detach()


# ------------------------------------------------------------------------------------------------------ pass
@register_pass
class PreCrop(Pass):
    """Structured pruning at initialization (see the module docstring): a PAI scorer's layer densities (or the
    convex allocation) -> per-group channel ratios -> the first channels of every group kept, weights re-initialised
    for the narrower network. ``density``: the kept fraction of the parameters (the budget is ``density x`` the dense
    parameter count). ``data``/``loss``/``batches``: for SNIP and GraSP (default: ``compile(data=...)``,
    cross-entropy of the first output, one batch). ``iterations``: SynFlow rounds. ``round_to``: kept channel counts
    are multiples of it. ``init``: ``"default"`` (PyTorch's default init at the cropped fan-in, BN identity),
    ``"kaiming"`` (He normal, fan-out) or ``"keep"`` (the initial weights, cropped). ``scorer``: the pruning-at-
    initialization criterion whose layer densities drive the crop, ``"synflow"`` (data-free), ``"snip"`` or
    ``"grasp"``. ``allocation``: how densities become channel ratios, ``"ratio"`` (rho_{l-1} rho_l ~ d_l), ``"convex"``
    (the convex budget allocation) or ``"uniform"`` (one width factor, the baseline). ``steps``: iterations of the
    ratio fit to the parameter budget. ``min_width``: the smallest kept fraction (a float) or channel count (an int) of any group."""

    name = "precrop"
    requires = frozenset({"groups"})
    accepts = frozenset({Stage.TRACED})
    modifies_weights = True  # re-initialisation

    def __init__(self, density: float, scorer: Literal["synflow", "snip", "grasp"] = "synflow",
                 allocation: Literal["ratio", "convex", "uniform"] = "ratio", min_width: float | int = 0.05, *,
                 data: Any = None, loss: Callable[..., Any] | None = None, batches: int = 1, iterations: int = 100,
                 round_to: int = 1, init: Literal["default", "kaiming", "keep"] = "default", steps: int = 400):
        if not (isinstance(density, (int, float)) and 0 < density <= 1):
            raise InputError(f"density must be in (0, 1], got {density!r}",
                             fix="the kept fraction of the parameters, e.g. 0.3")
        if scorer not in SCORERS:
            raise InputError(f"unknown scorer {scorer!r}", fix=f"use one of {', '.join(SCORERS)}")
        if allocation not in ALLOCATIONS:
            raise InputError(f"unknown allocation {allocation!r}", fix="use 'ratio', 'convex' or 'uniform'")
        if isinstance(min_width, float) and not 0 < min_width <= 1 or isinstance(min_width, int) and min_width < 1:
            raise InputError(f"min_width must be a fraction in (0, 1] or a channel count >= 1, got {min_width!r}",
                             fix="e.g. min_width=0.05 or min_width=4")
        if not (iterations >= 1 and batches >= 1 and round_to >= 1 and steps >= 1):
            raise InputError("iterations, batches, round_to and steps must be >= 1", fix="e.g. iterations=100")
        self.density = float(density)
        self.scorer = scorer
        self.allocation = allocation
        self.min_width = min_width
        self.data = data
        self.loss = loss
        self.batches = batches
        self.iterations = iterations
        self.round_to = round_to
        self.init = init
        self.steps = steps

    def options(self) -> dict[str, Any]:
        opts = super().options()
        opts.pop("data", None)
        return opts

    # ------------------------------------------------------------------ densities
    def layer_densities(self, program: Program, ctx: PassContext | None = None) -> dict[str, float]:
        """The scorer's per-layer densities at ``self.density`` (its mask discarded)."""
        names = prunable_weights(program)
        gm = program.gm
        if self.scorer == "synflow":
            masks = synflow_masks(gm, program.args, names, self.density, self.iterations)
        else:
            data = self.data if self.data is not None else (ctx.data if ctx is not None else None)
            if data is None:
                raise InputError(f"scorer {self.scorer!r} needs a batch of data",
                                 fix="PreCrop(..., data=loader) or compile(data=...); scorer='synflow' needs none")
            batches = _batches(data, self.batches)
            loss = self.loss or default_loss
            if self.scorer == "snip":
                masks = snip_masks(gm, names, self.density, batches, loss)
            else:
                masks = grasp_masks(gm, names, self.density, batches, loss)
        return {n: float(m.float().mean()) for n, m in masks.items()}

    # ------------------------------------------------------------------ run
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gs = program.groups
        free = [g.id for g in gs.prunable() if g.kind == "channels"]
        if not free:
            return PassResult(program, changed=False, stats={"groups": 0})
        pm = _ParamModel(program, free)
        sizes = torch.tensor([float(gs[g].size) for g in free], dtype=torch.float64)
        if isinstance(self.min_width, float):
            lo_count = torch.clamp(torch.ceil(sizes * self.min_width), min=1.0)
        else:
            lo_count = torch.full_like(sizes, float(self.min_width))
        lo_count = torch.minimum(lo_count, sizes)
        lo = (lo_count / sizes).clamp(max=1 - 1e-6)
        dense = float(pm.params(torch.ones(len(free), dtype=torch.float64)))
        target = self.density * dense
        init = torch.full((len(free),), math.sqrt(self.density), dtype=torch.float64)
        init = torch.minimum(torch.maximum(init, lo + 1e-3), torch.ones_like(init))
        weights = prunable_weights(program)
        widx = torch.tensor([pm.index[n] for n in weights], dtype=torch.long)
        if self.allocation == "ratio":
            dens = self.layer_densities(program, ctx)
            logd = torch.tensor([math.log(max(dens[n], 1e-4)) for n in weights], dtype=torch.float64)
            w = pm.numel[widx] / pm.numel[widx].sum()

            def objective(rho: torch.Tensor) -> torch.Tensor:
                return (w * (pm.log_density(rho)[widx] - logd) ** 2).sum()

            rho = _fit(pm, lo, objective, init, self.steps)
        elif self.allocation == "convex":
            dens = {}
            rho = self._convex(pm, lo, init, widx, target)
        else:  # uniform width scaling: one ratio for every group (the baseline PreCrop is compared with)
            dens = {}
            rho = torch.ones(len(free), dtype=torch.float64)
        counts = self._fit_budget(pm, rho, sizes, lo_count, target)
        ratios = counts / sizes
        achieved = float(pm.params(ratios))
        final_dens = torch.exp(pm.log_density(ratios))
        densities = dens or {n: float(final_dens[pm.index[n]]) for n in weights}
        for j, gid in enumerate(free):
            k = int(counts[j])
            if k < gs[gid].size:
                mask = np.zeros(gs[gid].size, dtype=bool)
                mask[:k] = True  # the first k channels: the network is re-initialised, which ones is immaterial
                program.select_channels(gid, mask)
        if self.init != "keep":
            reinit(program, program.leaf_keep(), self.init, ctx.generator("precrop-init"))
        record = PreCropRecord({}, self.scorer if self.allocation == "ratio" else "", self.allocation, densities,
                               {gid: float(ratios[j]) for j, gid in enumerate(free)}, int(round(target)),
                               int(round(achieved)))
        stats = {"scorer": record.scorer or None, "allocation": self.allocation, "target_params": int(round(target)),
                 "params_estimate": int(round(achieved)), "params_dense": int(round(dense)),
                 "budget_error": round(achieved / target - 1, 5), "groups_cropped": len(program.masks),
                 "mean_ratio": round(float(ratios.mean()), 4)}
        if program.masks:
            program.stage = Stage.SELECTED
        return PassResult(program, changed=bool(program.masks), stats=stats, record=record)

    def _convex(self, pm: _ParamModel, lo: torch.Tensor, init: torch.Tensor, widx: torch.Tensor,
                target: float) -> torch.Tensor:
        """max sum_l log d_l(rho) s.t. params(rho) <= target: bisection on the multiplier of the budget."""
        n_layers = max(len(widx), 1)
        rho = init

        def solve(mu: float, start: torch.Tensor) -> torch.Tensor:
            def objective(r: torch.Tensor) -> torch.Tensor:
                return -pm.log_density(r)[widx].sum() / n_layers + mu * pm.params(r) / target
            return _fit(pm, lo, objective, start, max(self.steps // 4, 50))

        lo_mu, hi_mu = 1e-4, 1.0
        r = solve(hi_mu, rho)
        while float(pm.params(r)) > target and hi_mu < 1e6:
            hi_mu *= 4
            r = solve(hi_mu, r)
        best = r
        for _ in range(18):
            mid = math.sqrt(lo_mu * hi_mu)
            r = solve(mid, best)
            if float(pm.params(r)) > target:
                lo_mu = mid
            else:
                hi_mu, best = mid, r
        return best

    def _fit_budget(self, pm: _ParamModel, rho: torch.Tensor, sizes: torch.Tensor, lo_count: torch.Tensor,
                    target: float) -> torch.Tensor:
        """Integer channel counts closest to the budget: a common factor ``exp(s)`` on all ratios (bisection)."""
        def counts_at(s: float) -> torch.Tensor:
            c = torch.round(rho * math.exp(s) * sizes)
            if self.round_to > 1:
                c = torch.ceil(c / self.round_to) * self.round_to
            return torch.minimum(torch.maximum(c, lo_count), sizes)

        def params_at(s: float) -> float:
            return float(pm.params(counts_at(s) / sizes))

        a, b = -12.0, 12.0
        for _ in range(60):
            m = (a + b) / 2
            if params_at(m) > target:
                b = m
            else:
                a = m
        ca, cb = counts_at(a), counts_at(b)
        pa, pb = params_at(a), params_at(b)
        counts = ca if abs(pa - target) <= abs(pb - target) else cb
        # small networks: one scale cannot hit the budget closely; move single groups by round_to channels while
        # that brings the count closer (the group whose kept fraction deviates least from its solved ratio first)
        step = float(self.round_to)
        for _ in range(4 * len(counts)):
            cur = abs(float(pm.params(counts / sizes)) - target)
            best, best_err = None, cur
            for j in range(len(counts)):
                for dlt in (step, -step):
                    c = counts.clone()
                    c[j] = torch.clamp(c[j] + dlt, min=float(lo_count[j]), max=float(sizes[j]))
                    if c[j] == counts[j]:
                        continue
                    err = abs(float(pm.params(c / sizes)) - target)
                    dev = abs(float(c[j] / sizes[j] - rho[j]))
                    if err < best_err - 1e-9 or (best is not None and err == best_err and dev < best[1]):
                        best, best_err = (c, dev), err
            if best is None:
                break
            counts = best[0]
        return counts


# ------------------------------------------------------------------------------------------------ re-initialise
_CONV = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default")


@torch.no_grad()
def reinit(program: Program, leaf_keep: dict[int, np.ndarray], mode: str, gen: torch.Generator) -> None:
    """Re-draw conv/linear weights and biases at the fan-in (``"default"``) or fan-out (``"kaiming"``) they will have
    after cropping, and reset BatchNorms to identity. Entries of removed channels are drawn too (they are sliced
    away by Shrink); i.i.d. draws stay i.i.d. under slicing, so the cropped network is a correctly initialised
    narrow network."""
    gs: GroupSet = program.groups
    keep = param_keep(gs, leaf_keep)
    alias = gs.analysis.param_alias

    def cropped(name: str) -> tuple[int, ...]:
        t = program.param(name)
        dims = keep.get(alias.get(name, name), [None] * t.dim())
        return tuple(int(k.sum()) if k is not None else n for k, n in zip(dims, t.shape))

    done: set[str] = set()
    for n in program.gm.graph.nodes:
        if n.op != "call_function":
            continue
        op = str(n.target)
        attr = [a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None for a in n.args]
        if op in _CONV and len(attr) > 1 and attr[1] is not None:
            wname = attr[1]
            w = program.param(wname)
            if wname in done or not isinstance(w, torch.Tensor) or not w.is_floating_point():
                continue
            shape = cropped(wname)
            fan_in = int(np.prod(shape[1:])) or 1
            if mode == "kaiming" and "linear" not in op:
                fan_out = shape[0] * int(np.prod(shape[2:]))
                w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * math.sqrt(2.0 / max(fan_out, 1)))
            else:  # PyTorch default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                bound = 1.0 / math.sqrt(fan_in)
                w.copy_((torch.rand(w.shape, generator=gen, dtype=w.dtype) * 2 - 1) * bound)
            done.add(wname)
            if len(attr) > 2 and attr[2] is not None:
                b = program.param(attr[2])
                bound = 1.0 / math.sqrt(fan_in)
                if mode == "kaiming" and "linear" not in op:
                    b.zero_()
                else:
                    b.copy_((torch.rand(b.shape, generator=gen, dtype=b.dtype) * 2 - 1) * bound)
                done.add(attr[2])
        elif "batch_norm" in op:
            names = attr[1:5] + [None] * max(0, 4 - len(attr[1:5]))
            w, b, rm, rv = names[:4]
            for nm, val in ((w, 1.0), (b, 0.0), (rm, 0.0), (rv, 1.0)):
                if nm is not None and nm not in done:
                    program.param(nm).fill_(val)
                    done.add(nm)
