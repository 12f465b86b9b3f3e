"""TAS: transformable architecture search for network pruning (Dong & Yang, NeurIPS 2019, arXiv 1905.09717).

``TASearch`` rewrites a traced program into a *supernet* (a GraphModule; the pass returns it as the program's
module), ``TASTrainer`` trains it, :func:`materialize` turns the arg-max architecture into a pruned, shrunk and
verified network, and :func:`kd_finetune` trains that network with knowledge distillation, as in the authors' code
(``xautodl/models/shape_searchs/SearchCifarResNet.py``, ``SoftSelect.py``, ``procedures/search_main.py``).

The supernet, per searched channel group ``g`` of ``C`` channels (a group is fxprune's set of coupled channels:
one residual chain shares one width):

* width candidates ``floor(C f)`` for ``f`` in ``widths`` and architecture logits ``alpha_g``;
* every producer of ``g`` (conv/linear whose output channels are ``g``) runs at full width; for each of two widths
  sampled with the Gumbel-softmax trick (``select2withP``: log-softmax plus Gumbel noise over ``tau``, two indices
  drawn without replacement, their weights a softmax of the two perturbed logits) the first ``w`` channels go
  through the BatchNorm of *that width* (per-width BN, initialised from the original BN), are interpolated along
  channels to the larger width (channel-wise interpolation, CWI: adaptive average pooling over the channel dim,
  ``ChannelWiseInterV2``), weighted and summed, then zero-padded to ``C`` (consumers read zeros beyond it);
* depth: chains of identity-shortcut residual units ``y = act(x + F(x))`` (``F`` reading only ``x``) form a stage
  with logits ``beta_s`` over how many units to keep (TAS's choices, ``get_depth_choices``, counting the stage's
  entry block); the stage output is the Gumbel-softmax (over all choices) weighted sum of the candidate outputs;
* expected MACs: every MAC term of the analyzer (``const x prod(size of its spaces)``) with each searched group's
  size replaced by its expected width under ``softmax(alpha_g)``, times the probability that its unit is kept
  (``softmax(beta_s)`` summed over the choices that keep it) - differentiable in ``alpha`` and ``beta``;
* cost loss (``get_flop_loss``): ``log E[MACs]`` when the arg-max architecture is above the target,
  ``-log E[MACs]`` when it is more than ``tolerance`` below, else 0; weighted by ``lambda_cost``.

Supported (the restriction of the rewrite, checked per group; unsupported groups keep their width and are
reported in the stats): a group is searched when every parameter slice it owns is a conv/linear output dim (the
producer; channels in order), a conv/linear input dim, a producer's bias, or the BatchNorm applied directly and only
to a producer's output. This covers post-activation ResNets (BasicBlock and Bottleneck, projection and identity
shortcuts), VGG-style chains, MobileNet-style depthwise pairs and MLPs; pre-activation ResNets (BN after an add) and
concat-coupled pieces keep their width. Depth search needs identity-shortcut units; blocks with a projection
shortcut are never skipped.

Departures from the authors' code, which searches one width per *conv* and lets residual adds and the inferred
network absorb width mismatches with padding and extra 1x1 shortcut convs: widths are per coupled group, so the
pruned network keeps the original topology and is verified shrunk == masked; depth mixing needs no CWI (all unit
outputs of a stage share their group's width); ``tau`` follows the cosine schedule per step rather than per epoch
(short budgets); widths are the *first* channels of each group, as in TAS.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from fxprune.errors import InputError, PassError
from fxprune.groups import GroupSet
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program, Stage
from fxprune.records import Record

DEFAULT_WIDTHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # TAS's get_width_choices
_CONV = {"aten.conv1d.default": 1, "aten.conv2d.default": 1, "aten.conv3d.default": 1}
_LINEAR = "aten.linear.default"
_BN = "aten.batch_norm.default"
_INPLACE = ("relu_", "silu_", "hardtanh_", "sigmoid_", "gelu_", "hardswish_", "leaky_relu_", "elu_", "mish_")
_UNARY = ("relu", "relu_", "silu", "silu_", "hardtanh", "hardtanh_", "gelu", "hardswish", "hardswish_", "leaky_relu",
          "leaky_relu_", "elu", "elu_", "mish", "mish_", "sigmoid", "sigmoid_")
_ADD = ("aten.add.Tensor", "aten.add_.Tensor")


def tas_depth_choices(n: int) -> tuple[int, ...]:
    """TAS's depth candidates for a stage of ``n`` blocks (``get_depth_choices``)."""
    if n <= 0:
        return ()
    if n <= 3:
        return tuple(range(1, n + 1))
    c = list(range(1, n + 1, 2))
    if c[-1] < n:
        c.append(n)
    return tuple(c)


def channel_interp(x: torch.Tensor, size: int, dim: int = 1) -> torch.Tensor:
    """Channel-wise interpolation: adaptive average pooling of ``x`` along ``dim`` to ``size`` entries (TAS's
    ``ChannelWiseInterV2``; the identity when the size already matches)."""
    if x.shape[dim] == size:
        return x
    moved = x.movedim(dim, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1])
    out = F.adaptive_avg_pool1d(flat, size).reshape(*moved.shape[:-1], size)
    return out.movedim(-1, dim)


def _pad(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim)


# ------------------------------------------------------------------------------------------------- runtime modules
class TASState:
    """One forward's sampled architecture: per group (indices, weights), per stage weights over its choices."""

    def __init__(self) -> None:
        self.width: dict[int, tuple[list[int], torch.Tensor]] = {}
        self.depth: dict[int, tuple[list[int], torch.Tensor]] = {}


def _gumbel_logits(logits: torch.Tensor, tau: float, gen: torch.Generator) -> torch.Tensor:
    while True:  # TAS's guard against inf/nan Gumbel draws
        u = torch.empty(logits.shape, dtype=logits.dtype).exponential_(generator=gen)
        g = -u.log()
        new = (logits.log_softmax(-1) + g) / tau
        p = new.softmax(-1)
        if torch.isfinite(g).all() and torch.isfinite(p).all():
            return new


class TASController(nn.Module):
    """The architecture parameters (``alpha`` per searched group, ``beta`` per depth stage), the sampling mode and
    the expected-MACs model. Called once per forward by the supernet's graph (``tas_state``)."""

    def __init__(self, cands: Mapping[int, Sequence[int]], stages: Sequence[Sequence[int]], mac_model: "_MacModel",
                 seed: int = 0):
        super().__init__()
        self.cands = {int(g): tuple(int(w) for w in ws) for g, ws in cands.items()}
        self.stage_choices = [tuple(int(c) for c in cs) for cs in stages]
        gen = torch.Generator().manual_seed(seed)
        self.alpha = nn.ParameterDict({str(g): nn.Parameter(torch.randn(len(ws), generator=gen) * 0.01)
                                       for g, ws in self.cands.items()})
        self.beta = nn.ParameterDict({str(s): nn.Parameter(torch.randn(len(cs), generator=gen) * 0.01)
                                      for s, cs in enumerate(self.stage_choices)})
        self.tau = 5.0
        self.mode = "argmax"  # "search" (Gumbel-sampled), "argmax", or "fixed" (self.fixed)
        self.fixed: dict[str, dict[int, int]] = {"width": {}, "depth": {}}
        self._gen = torch.Generator().manual_seed(seed + 1)
        self._macs = mac_model

    # ------------------------------------------------------------------ sampling
    def forward(self) -> TASState:
        st = TASState()
        for g, ws in self.cands.items():
            a = self.alpha[str(g)]
            if self.mode == "search":
                new = _gumbel_logits(a, self.tau, self._gen)
                with torch.no_grad():
                    idx = torch.multinomial(new.softmax(-1).detach() + 1e-7, 2, replacement=False,
                                            generator=self._gen).tolist()
                st.width[g] = (idx, new[idx].softmax(-1))
            else:
                i = self.fixed["width"].get(g, int(a.argmax())) if self.mode == "fixed" else int(a.argmax())
                st.width[g] = ([i], a.new_ones(1))
        for s, cs in enumerate(self.stage_choices):
            b = self.beta[str(s)]
            if self.mode == "search":
                st.depth[s] = (list(range(len(cs))), _gumbel_logits(b, self.tau, self._gen).softmax(-1))
            else:
                i = self.fixed["depth"].get(s, int(b.argmax())) if self.mode == "fixed" else int(b.argmax())
                st.depth[s] = ([i], b.new_ones(1))
        return st

    def set_tau(self, tau_max: float, tau_min: float, progress: float) -> float:
        """TAS's cosine schedule from ``tau_max`` (progress 0) to ``tau_min`` (progress 1)."""
        p = min(max(float(progress), 0.0), 1.0)
        self.tau = tau_min + (tau_max - tau_min) * (1 + math.cos(math.pi * p)) / 2
        return self.tau

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.alpha.values()) + list(self.beta.values())

    # ------------------------------------------------------------------ architecture
    def argmax_widths(self) -> dict[int, int]:
        return {g: self.cands[g][int(self.alpha[str(g)].argmax())] for g in self.cands}

    def argmax_depths(self) -> dict[int, int]:
        return {s: cs[int(self.beta[str(s)].argmax())] for s, cs in enumerate(self.stage_choices)}

    def expected_macs(self) -> torch.Tensor:
        """E[MACs] under softmax(alpha), softmax(beta): differentiable in both."""
        ew = {g: (self.alpha[str(g)].softmax(-1) * torch.tensor(ws, dtype=torch.float32)).sum()
              for g, ws in self.cands.items()}
        keep = {}
        for s, cs in enumerate(self.stage_choices):
            p = self.beta[str(s)].softmax(-1)
            keep[s] = [sum(p[i] for i, c in enumerate(cs) if c >= k) for k in range(1, max(cs) + 1)]
        return self._macs.evaluate(ew, keep)

    @torch.no_grad()
    def macs_of(self, widths: Mapping[int, int] | None = None, depths: Mapping[int, int] | None = None) -> int:
        """Exact MACs of one architecture (default: the arg-max one)."""
        widths = self.argmax_widths() if widths is None else widths
        depths = self.argmax_depths() if depths is None else depths
        keep = {s: [1.0 if depths[s] >= k else 0.0 for k in range(1, max(cs) + 1)]
                for s, cs in enumerate(self.stage_choices)}
        return int(round(float(self._macs.evaluate({g: float(w) for g, w in widths.items()}, keep))))


class TASWidthMix(nn.Module):
    """The supernet at one producer of a searched group: per-width BatchNorm (optional), CWI, weighted sum, pad."""

    def __init__(self, group: int, widths: Sequence[int], size: int, dim: int,
                 bn: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None,
                 momentum: float = 0.1, eps: float = 1e-5, bn_names: tuple[str | None, ...] = ()):
        super().__init__()
        self.group, self.widths, self.size, self.dim = int(group), tuple(int(w) for w in widths), int(size), int(dim)
        self.has_bn = bn is not None
        self.momentum, self.eps, self.bn_names = float(momentum), float(eps), tuple(bn_names)
        if bn is not None:
            w, b, rm, rv = bn
            self.weights = nn.ParameterList([nn.Parameter(w.detach()[:k].clone()) for k in self.widths])
            self.biases = nn.ParameterList([nn.Parameter((b.detach()[:k] if b is not None else torch.zeros(k)).clone())
                                            for k in self.widths])
            for i, k in enumerate(self.widths):
                self.register_buffer(f"running_mean_{i}", rm.detach()[:k].clone())
                self.register_buffer(f"running_var_{i}", rv.detach()[:k].clone())

    def _one(self, y: torch.Tensor, i: int) -> torch.Tensor:
        z = y.narrow(self.dim, 0, self.widths[i])
        if self.has_bn:
            z = F.batch_norm(z, getattr(self, f"running_mean_{i}"), getattr(self, f"running_var_{i}"),
                             self.weights[i], self.biases[i], self.training, self.momentum, self.eps)
        return z

    def forward(self, y: torch.Tensor, state: TASState) -> torch.Tensor:
        idx, probs = state.width[self.group]
        if len(idx) == 1:  # arg-max / fixed: exactly the pruned network's computation
            return _pad(self._one(y, idx[0]), self.size, self.dim)
        m = max(self.widths[i] for i in idx)
        out = sum(channel_interp(self._one(y, i), m, self.dim) * p for i, p in zip(idx, probs))
        return _pad(out, self.size, self.dim)


class TASDepthMix(nn.Module):
    """A stage's output: the weighted sum of the candidate depths' outputs (or the chosen one)."""

    def __init__(self, stage: int):
        super().__init__()
        self.stage = int(stage)

    def forward(self, *args: Any) -> torch.Tensor:
        *ys, state = args
        idx, w = state.depth[self.stage]
        if len(idx) == 1:
            return ys[idx[0]]
        return sum(ys[i] * w[k] for k, i in enumerate(idx))


# ---------------------------------------------------------------------------------------------- expected MACs
class _MacModel:
    """MAC terms as expressions over group widths and unit-keep probabilities."""

    def __init__(self, groups: GroupSet, searched: Mapping[int, int], term_unit: Mapping[str, tuple[int, int]]):
        a = groups.analysis
        t = a.table
        leaf_group = {groups[g].space: g for g in searched}
        self.terms = []

        def expr(s: int) -> Any:
            r = t.find(s)
            kind, parts = t.definition(r)
            if kind == "leaf":
                return ("g", leaf_group[r]) if r in leaf_group else ("c", float(t.size(r)))
            sub = [expr(p) for p in parts]
            if all(e[0] == "c" for e in sub):
                return ("c", float(t.size(r)))
            return ("sum" if kind == "concat" else "prod", sub)

        for term in a.mac_terms:
            self.terms.append((float(term.const), [expr(s) for s in term.spaces], term_unit.get(term.node)))

    @staticmethod
    def _eval(e: Any, w: Mapping[int, Any]) -> Any:
        if e[0] == "c":
            return e[1]
        if e[0] == "g":
            return w[e[1]]
        vals = [_MacModel._eval(x, w) for x in e[1]]
        out = vals[0]
        for v in vals[1:]:
            out = out + v if e[0] == "sum" else out * v
        return out

    def evaluate(self, widths: Mapping[int, Any], keep: Mapping[int, Sequence[Any]]) -> Any:
        total: Any = 0.0
        for const, exprs, unit in self.terms:
            v: Any = const
            for e in exprs:
                v = v * self._eval(e, widths)
            if unit is not None:
                s, k = unit
                v = v * keep[s][k - 1]
            total = total + v
        return total if isinstance(total, torch.Tensor) else torch.tensor(float(total))


# ------------------------------------------------------------------------------------------------ graph analysis
def _param_of(n: Any) -> str | None:
    return n.target if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _find_units(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Identity-shortcut residual units ``out = act*(x + F(x))`` with ``F`` reading only ``x`` (and parameters),
    nothing of ``F`` used outside the unit, and at least one conv/linear in ``F``."""
    units = []
    for add in gm.graph.nodes:
        if add.op != "call_function" or str(add.target) not in _ADD or len(add.args) < 2:
            continue
        a0, a1 = add.args[0], add.args[1]
        if not (isinstance(a0, fx.Node) and isinstance(a1, fx.Node)):
            continue
        for x, f in ((a1, a0), (a0, a1)):
            body: set[fx.Node] = set()
            stack, ok = [f], True
            while stack and ok:
                n = stack.pop()
                if n is x or n in body or n.op == "get_attr":
                    continue
                if n.op in ("placeholder", "output") or n is add:
                    ok = False
                    break
                body.add(n)
                stack.extend(i for i in n.all_input_nodes)
            if not ok or not body or x in body:
                continue
            if any(u not in body and u is not add for n in body for u in n.users):
                continue
            if not any(str(n.target) in _CONV or str(n.target) == _LINEAR for n in body):
                continue
            out = add
            while len(out.users) == 1:
                u = next(iter(out.users))
                if u.op == "call_function" and isinstance(u.target, torch._ops.OpOverload) and \
                        u.target.overloadpacket.__name__ in _UNARY and u.args[0] is out:
                    out = u
                else:
                    break
            units.append({"x": x.name, "out": out.name, "add": add.name, "body": {n.name for n in body},
                          "macs": {n.name for n in body if str(n.target) in _CONV or str(n.target) == _LINEAR}})
            break
    # chain them into stages: unit k+1 reads unit k's output, which nothing else reads
    by_x = {u["x"]: u for u in units}
    nodes = {n.name: n for n in gm.graph.nodes}
    heads = [u for u in units if not any(v["out"] == u["x"] for v in units)]
    stages = []
    for h in heads:
        chain = [h]
        while True:
            nxt = by_x.get(chain[-1]["out"])
            if nxt is None:
                break
            users = {u.name for u in nodes[chain[-1]["out"]].users}
            if not users <= (nxt["body"] | {nxt["add"]}):
                break
            chain.append(nxt)
        stages.append(chain)
    return [s for s in stages if s]


@dataclass(frozen=True)
class TASRecord(Record):
    """The search space the supernet was built with."""

    widths: Mapping[int, tuple[int, ...]] = field(default_factory=dict)  # group id -> candidate widths
    stages: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...] = ()  # (unit outputs, choices) per stage
    unsupported: Mapping[int, str] = field(default_factory=dict)  # prunable groups kept at full width, why
    dense_macs: int = 0
    target_macs: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", MappingProxyType(dict(self.widths)))
        object.__setattr__(self, "unsupported", MappingProxyType(dict(self.unsupported)))


# ----------------------------------------------------------------------------------------------------- the pass
@register_pass
class TASearch(Pass):
    """Rewrite the program into a TAS supernet (see the module docstring). The result's module is the supernet;
    train it with :class:`TASTrainer`, then :func:`materialize` it.

    ``flops_target``: the MACs budget as a fraction of the dense MACs. ``widths``: width fractions of every searched
    group. ``depth``: also search the number of identity-shortcut units per stage. ``tau``: (start, end) of the
    Gumbel temperature's cosine schedule. ``lambda_cost``: weight of the cost loss; ``tolerance``: the band below
    the target (fraction of dense MACs) where the cost loss is zero. ``ignore``: parameter-name prefixes whose groups
    are not searched."""

    name = "tas_search"
    requires = frozenset({"groups"})
    accepts = frozenset({Stage.TRACED})
    modifies_weights = True
    changes_graph = True

    def __init__(self, flops_target: float, widths: Sequence[float] = DEFAULT_WIDTHS, depth: bool = True,
                 tau: tuple[float, float] = (5.0, 0.1), lambda_cost: float = 2.0, tolerance: float = 0.05,
                 ignore: Sequence[str] = ()):
        if not (isinstance(flops_target, (int, float)) and 0 < flops_target <= 1):
            raise InputError(f"flops_target must be a fraction in (0, 1], got {flops_target!r}", fix="e.g. 0.5")
        widths = tuple(float(w) for w in widths)
        if not widths or any(not 0 < w <= 1 for w in widths):
            raise InputError(f"widths must be fractions in (0, 1], got {widths}", fix="e.g. (0.3, 0.5, 0.7, 1.0)")
        if not (len(tau) == 2 and tau[0] >= tau[1] > 0):
            raise InputError(f"tau must be (start, end) with start >= end > 0, got {tau}", fix="e.g. (5, 0.1)")
        if lambda_cost < 0 or not 0 <= tolerance < 1:
            raise InputError("lambda_cost must be >= 0 and tolerance in [0, 1)", fix="e.g. lambda_cost=2")
        self.flops_target = float(flops_target)
        self.widths = widths
        self.depth = depth
        self.tau = (float(tau[0]), float(tau[1]))
        self.lambda_cost = float(lambda_cost)
        self.tolerance = float(tolerance)
        self.ignore = [ignore] if isinstance(ignore, str) else list(ignore)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gm = program.gm
        gs = program.groups
        a = gs.analysis
        alias = a.param_alias
        nodes = {n.name: n for n in gm.graph.nodes}
        getattr_nodes: dict[str, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                getattr_nodes.setdefault(alias.get(n.target, n.target), []).append(n)
        ign = {c for p, c in alias.items() for pre in self.ignore if p == pre or p.startswith(pre + ".")}
        units = _find_units(gm) if self.depth else []
        searched: dict[int, tuple[int, ...]] = {}
        plans: dict[int, list[tuple[fx.Node, fx.Node | None, int]]] = {}
        unsupported: dict[int, str] = {}
        for g in gs.prunable():
            if g.kind != "channels" or (ign and any(m.param in ign for m in g.members)):
                continue
            why, plan = self._plan(g, gm, a, getattr_nodes)
            if why:
                unsupported[g.id] = why
                continue
            cands = tuple(sorted({max(1, int(g.size * f)) for f in self.widths}))
            if len(cands) < 2:
                unsupported[g.id] = "fewer than two distinct candidate widths"
                continue
            searched[g.id] = cands
            plans[g.id] = plan
        if not searched:
            raise PassError("no channel group fits the TAS supernet rewrite", pass_name=self.name,
                            fix="see the supported structures in the TASearch docstring; stats list why")
        # depth stages (a stage with no unit choice is not searched)
        stage_units: list[list[dict[str, Any]]] = []
        stage_choices: list[tuple[int, ...]] = []
        for chain in units:
            choices = tuple(c - 1 for c in tas_depth_choices(len(chain) + 1))  # the entry block always stays
            if len(choices) >= 2:
                stage_units.append(chain)
                stage_choices.append(choices)
        term_unit = {}
        for s, chain in enumerate(stage_units):
            for k, u in enumerate(chain, start=1):
                for name in u["macs"]:
                    term_unit[name] = (s, k)
        macs = _MacModel(gs, searched, term_unit)
        ctrl = TASController(searched, stage_choices, macs, seed=ctx.derive_seed("tas"))
        ctrl.example = (program.args, program.kwargs)
        ctrl.record_stages = [([u["out"] for u in chain], [chain[0]["x"]]) for chain in stage_units]
        # ---- rewrite the graph
        graph = gm.graph
        first = next(n for n in graph.nodes if n.op != "placeholder")
        gm.add_submodule("tas", ctrl)
        with graph.inserting_before(first):
            state = graph.call_module("tas", ())
        k = 0
        for gid, plan in plans.items():
            g = gs[gid]
            for prod, bn, dim in plan:
                name = f"tas_w{k}"
                k += 1
                if bn is not None:
                    pw = [_param_of(x) for x in bn.args[1:5]]
                    tens = [program.param(p) if p is not None else None for p in pw]
                    mod = TASWidthMix(gid, searched[gid], g.size, dim, bn=tuple(tens),  # type: ignore[arg-type]
                                      momentum=float(bn.args[6]), eps=float(bn.args[7]), bn_names=tuple(pw))
                    gm.add_submodule(name, mod)
                    with graph.inserting_before(bn):
                        new = graph.call_module(name, (bn.args[0], state))
                    new.meta = dict(bn.meta)
                    bn.replace_all_uses_with(new)
                    graph.erase_node(bn)
                else:
                    mod = TASWidthMix(gid, searched[gid], g.size, dim)
                    gm.add_submodule(name, mod)
                    with graph.inserting_after(prod):
                        new = graph.call_module(name, (prod, state))
                    new.meta = dict(prod.meta)
                    prod.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
        for n in graph.nodes:  # in-place activations read by the depth mix must not be overwritten later
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and \
                    n.target.overloadpacket.__name__ in _INPLACE and isinstance(n.args[0], fx.Node) and \
                    len(n.args[0].users) == 1:  # nothing else reads the overwritten tensor: same values
                pk = getattr(torch.ops.aten, n.target.overloadpacket.__name__[:-1])
                n.target = getattr(pk, n.target._overloadname)
        for s, chain in enumerate(stage_units):
            outs = [nodes[chain[0]["x"]]] + [nodes[u["out"]] for u in chain]
            last = outs[-1]
            gm.add_submodule(f"tas_d{s}", TASDepthMix(s))
            with graph.inserting_after(last):
                mix = graph.call_module(f"tas_d{s}", tuple(outs[c] for c in stage_choices[s]) + (state,))
            mix.meta = dict(last.meta)
            last.replace_all_uses_with(mix, delete_user_cb=lambda u, mix=mix: u is not mix)
        for plist in getattr_nodes.values():  # the replaced BatchNorms' parameters: no longer read
            for n in plist:
                if not n.users:
                    graph.erase_node(n)
        graph.lint()
        gm.recompile()
        dense = gs.macs()
        ctrl.dense_macs = dense
        ctrl.target_macs = int(round(self.flops_target * dense))
        ctrl.tolerance_macs = int(round(self.tolerance * dense))
        ctrl.lambda_cost, ctrl.tau_schedule = self.lambda_cost, self.tau
        ctrl.tau = self.tau[0]
        record = TASRecord(searched, tuple((tuple(u["out"] for u in ch), ch_c)
                                           for ch, ch_c in zip(stage_units, stage_choices)),
                           unsupported, dense, ctrl.target_macs)
        stats = {"groups_searched": len(searched), "width_mixers": k, "depth_stages": len(stage_units),
                 "depth_units": sum(len(c) for c in stage_units), "groups_unsupported": len(unsupported),
                 "unsupported": {str(g): why for g, why in list(unsupported.items())[:10]},
                 "dense_macs": dense, "target_macs": ctrl.target_macs,
                 "expected_macs_init": int(float(ctrl.expected_macs().detach()))}
        return PassResult(program, changed=True, stats=stats, record=record)

    @staticmethod
    def _plan(g: Any, gm: fx.GraphModule, a: Any, getattr_nodes: Mapping[str, list[fx.Node]]
              ) -> tuple[str | None, list[tuple[fx.Node, fx.Node | None, int]]]:
        """Where to mix group ``g``: (reason it is unsupported or None, [(producer, its BN or None, channel dim)])."""
        roles: dict[tuple[str, int], str] = {}
        plan = []
        bn_params: set[str] = set()
        in_order = {(m.param, m.dim): m.covers == len(m.coords) and
                    np.array_equal(m.coords, np.arange(len(m.coords))) for m in g.members}
        member_dims = set(in_order)
        for (param, dim) in member_dims:
            for n in getattr_nodes.get(param, []):
                for u in n.users:
                    op = str(u.target) if u.op == "call_function" else ""
                    if op in _CONV or op == _LINEAR:
                        if u.args[1] is n and dim == 0:
                            roles[(param, dim)] = "producer"
                            cdim = 1 if op in _CONV else len(u.meta["val"].shape) - 1
                            bn = None
                            if len(u.users) == 1:
                                v = next(iter(u.users))
                                if v.op == "call_function" and str(v.target) == _BN and v.args[0] is u and \
                                        _param_of(v.args[1]) is not None and \
                                        (a.param_alias.get(_param_of(v.args[1]), _param_of(v.args[1])), 0) \
                                        in member_dims:
                                    bn = v
                                    bn_params.update(a.param_alias.get(p, p) for p in
                                                     (_param_of(x) for x in v.args[1:5]) if p is not None)
                            plan.append((u, bn, cdim))
                        elif u.args[1] is n and dim == 1:
                            roles[(param, dim)] = "consumer"
                        elif len(u.args) > 2 and u.args[2] is n:
                            roles[(param, dim)] = "bias"
                        else:
                            return f"{param} is used by {u.name} in an unsupported position", []
                    elif op == _BN:
                        roles.setdefault((param, dim), "bn")
                    else:
                        return f"{param} is read by {u.name} ({op or u.op}), which the rewrite does not model", []
        for (param, dim), role in roles.items():
            if role != "consumer" and not in_order[(param, dim)]:  # prefix slicing needs the channels in order
                return f"{param}[{dim}] holds the group's channels partially or out of order (concat/split)", []
            if role == "bn" and param not in bn_params:
                return f"BatchNorm {param} does not directly follow a producer of the group (pre-activation?)", []
        if not plan:
            return "no conv/linear produces these channels", []
        return None, plan


# ------------------------------------------------------------------------------------------------- training
def _split_halves(data: Any, seed: int) -> tuple[Any, Any]:
    """Two disjoint halves of a DataLoader's dataset (seeded), same batch size; else alternating batches."""
    ds = getattr(data, "dataset", None)
    if ds is not None and hasattr(ds, "__len__"):
        n = len(ds)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        bs = getattr(data, "batch_size", None) or 64
        mk = lambda idx, s: torch.utils.data.DataLoader(  # noqa: E731
            torch.utils.data.Subset(ds, idx), batch_size=bs, shuffle=True,
            generator=torch.Generator().manual_seed(seed + s))
        return mk(perm[: n // 2], 1), mk(perm[n // 2:], 2)

    class _Alt:
        def __init__(self, parity: int):
            self.parity = parity

        def __iter__(self):
            for i, b in enumerate(data):
                if i % 2 == self.parity:
                    yield b
    return _Alt(0), _Alt(1)


class TASTrainer:
    """TAS's search loop (``search_main.search_train``): per step one weight update on a batch of the first half of
    the data (sampled architecture, task loss) and one architecture update on a batch of the second half (task loss
    + ``lambda_cost`` x the cost loss). ``supernet``: the module :class:`TASearch` produced (``compile(...).module``).
    ``loss_fn(outputs, targets)``: the task loss. ``optimizer``: for the weights (default Adam, ``lr``);
    architecture: Adam(``arch_lr``, betas (0.5, 0.999), weight decay ``arch_decay``) as in TAS.
    """

    def __init__(self, supernet: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], *, lr: float = 1e-3,
                 optimizer: torch.optim.Optimizer | None = None, arch_lr: float = 1e-3, arch_decay: float = 1e-3,
                 lambda_cost: float | None = None, seed: int = 0):
        ctrl = getattr(supernet, "tas", None)
        if not isinstance(ctrl, TASController):
            raise InputError("TASTrainer needs the supernet that TASearch built (compile(..., [TASearch(...)]).module)",
                             fix="fxprune.compile(model, inputs, passes=[TASearch(flops_target=0.5)]).module")
        self.net, self.ctrl, self.loss_fn, self.seed = supernet, ctrl, loss_fn, seed
        arch = {id(p) for p in ctrl.arch_parameters()}
        self.weights = [p for p in supernet.parameters() if id(p) not in arch and p.requires_grad]
        self.w_opt = optimizer or torch.optim.Adam(self.weights, lr=lr)
        self.a_opt = torch.optim.Adam(ctrl.arch_parameters(), lr=arch_lr, betas=(0.5, 0.999), weight_decay=arch_decay)
        self.lambda_cost = ctrl.lambda_cost if lambda_cost is None else float(lambda_cost)
        self.history: list[dict[str, float]] = []

    def cost_loss(self) -> tuple[torch.Tensor, float]:
        """``get_flop_loss``: log E[MACs] above the target, -log E[MACs] below target - tolerance, else 0."""
        e = self.ctrl.expected_macs() / 1e6
        cur = self.ctrl.macs_of()
        if cur > self.ctrl.target_macs:
            return torch.log(e), cur
        if cur < self.ctrl.target_macs - self.ctrl.tolerance_macs:
            return -torch.log(e), cur
        return e.new_zeros(()), cur

    def in_band(self) -> bool:
        """Whether the arg-max architecture's MACs are in [target - tolerance, target]."""
        cur = self.ctrl.macs_of()
        return self.ctrl.target_macs - self.ctrl.tolerance_macs <= cur <= self.ctrl.target_macs

    def settle(self, max_steps: int = 300) -> int:
        """Architecture-only steps on the cost loss until the arg-max MACs are in the band (or ``max_steps``).
        Returns the steps taken. Not in TAS: short searches end with nearly flat logits whose arg-max can sit
        outside the band; these steps move only ``alpha``/``beta`` (weights untouched)."""
        lr = self.a_opt.param_groups[0]["lr"]
        opt = torch.optim.Adam(self.ctrl.arch_parameters(), lr=lr, betas=(0.5, 0.999))
        n, side = 0, 0
        while n < max_steps and not self.in_band():
            closs, cur = self.cost_loss()
            if not closs.requires_grad:
                break
            s = 1 if cur > self.ctrl.target_macs else -1
            if side and s != side:  # jumped over the band: smaller steps (the arg-max moves in discrete jumps)
                for g in opt.param_groups:
                    g["lr"] *= 0.5
            side = s
            opt.zero_grad(set_to_none=True)
            closs.backward()
            opt.step()
            n += 1
        return n

    def fit(self, data: Any, arch_data: Any = None, *, epochs: int = 1, max_steps: int | None = None,
            settle: int = 300, log: Callable[[str], None] | None = None) -> list[dict[str, float]]:
        """Search for ``epochs`` passes over the data (``arch_data`` default: the second half of ``data``); then
        :meth:`settle` for at most ``settle`` architecture-only steps (0: off) so the arg-max meets the budget."""
        from fxprune.train import train_mode

        torch.manual_seed(self.seed)
        wdata, adata = (data, arch_data) if arch_data is not None else _split_halves(data, self.seed)
        n_steps = epochs * max(len(wdata), 1) if hasattr(wdata, "__len__") else None
        if max_steps is not None:
            n_steps = min(n_steps or max_steps, max_steps)
        step = 0
        self.ctrl.mode = "search"
        t0 = time.perf_counter()
        try:
            with train_mode(self.net):
                for epoch in range(epochs):
                    for (xb, yb), (xa, ya) in zip(wdata, adata):
                        tmax, tmin = self.ctrl.tau_schedule
                        self.ctrl.set_tau(tmax, tmin, step / max((n_steps or 1) - 1, 1))
                        out = self.net(*(xb if isinstance(xb, tuple) else (xb,)))
                        wloss = self.loss_fn(out, yb)
                        self.w_opt.zero_grad(set_to_none=True)
                        self.a_opt.zero_grad(set_to_none=True)
                        wloss.backward()
                        self.w_opt.step()
                        out = self.net(*(xa if isinstance(xa, tuple) else (xa,)))
                        aloss = self.loss_fn(out, ya)
                        closs, cur = self.cost_loss()
                        total = aloss + self.lambda_cost * closs
                        self.w_opt.zero_grad(set_to_none=True)
                        self.a_opt.zero_grad(set_to_none=True)
                        total.backward()
                        self.a_opt.step()
                        step += 1
                        self.history.append({"step": step, "tau": self.ctrl.tau, "weight_loss": float(wloss.detach()),
                                             "arch_loss": float(aloss.detach()), "cost_loss": float(closs.detach()),
                                             "argmax_macs": cur,
                                             "expected_macs": float(self.ctrl.expected_macs().detach())})
                        if log is not None and step % 20 == 0:
                            log(f"step {step}: w {float(wloss.detach()):.3f} a {float(aloss.detach()):.3f} argmax MACs "
                                f"{cur / self.ctrl.dense_macs:.3f} of dense, tau {self.ctrl.tau:.2f}")
                        if max_steps is not None and step >= max_steps:
                            break
                    if max_steps is not None and step >= max_steps:
                        break
        finally:
            self.ctrl.mode = "argmax"
        self.settle_steps = self.settle(settle) if settle else 0
        self.seconds = time.perf_counter() - t0
        return self.history


# ------------------------------------------------------------------------------------------------- materialise
class _SelectFirst(Pass):
    """Keep the first ``w`` channels of the group holding each (parameter, dim) (not registered: materialize's)."""

    name = "tas_select"
    requires = frozenset({"groups"})

    def __init__(self, keep: Any):
        self.keep = keep

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gs = program.groups
        n = 0
        for (param, dim), w in self.keep.items():
            hit = [g for g in gs.containing(param) if any(m.param == param and m.dim == dim for m in g.members)]
            for g in hit:
                if w < g.size:
                    mask = np.zeros(g.size, dtype=bool)
                    mask[:w] = True
                    program.select_channels(g.id, mask)
                    n += 1
        return PassResult(program, changed=n > 0, stats={"groups": n})


def _representatives(gm: fx.GraphModule, record_widths: Mapping[int, int]) -> dict[tuple[str, int], int]:
    """(producer weight, 0) -> chosen width for every width mixer of the supernet."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target.startswith("tas_w"):
            mod = gm.get_submodule(n.target)
            prod = n.args[0]  # the producer (a BN mixer's input is the producer's output too)
            w = _param_of(prod.args[1]) if isinstance(prod, fx.Node) and prod.op == "call_function" else None
            if w is not None and mod.group in record_widths:
                out[(w, 0)] = record_widths[mod.group]
    return out


@torch.no_grad()
def arch_graph(supernet: nn.Module, widths: Mapping[int, int] | None = None,
               depths: Mapping[int, int] | None = None) -> tuple[fx.GraphModule, dict[tuple[str, int], int]]:
    """The supernet's graph with one architecture fixed (default: arg-max): per-width BatchNorms folded back into
    the original BatchNorm parameters (the chosen width's values in their first channels), depth mixes replaced by
    the chosen unit output, the dropped units removed. Returns the dense-width GraphModule and the kept width per
    (producer weight, dim 0)."""
    ctrl: TASController = supernet.tas
    widths = ctrl.argmax_widths() if widths is None else dict(widths)
    depths = ctrl.argmax_depths() if depths is None else dict(depths)
    gm = copy.deepcopy(supernet)
    graph = gm.graph
    reps = _representatives(gm, widths)
    for n in list(graph.nodes):
        if n.op == "call_module" and n.target.startswith("tas_w"):
            mod: TASWidthMix = gm.get_submodule(n.target)
            y = n.args[0]
            if mod.has_bn:
                i = mod.widths.index(widths[mod.group])
                k = mod.widths[i]
                src = (mod.weights[i], mod.biases[i], getattr(mod, f"running_mean_{i}"),
                       getattr(mod, f"running_var_{i}"))
                args = []
                with graph.inserting_before(n):
                    for name, val in zip(mod.bn_names, src):
                        if name is None:
                            args.append(None)
                            continue
                        owner, attr = gm, name
                        *path, leaf = name.split(".")
                        for p in path:
                            owner = getattr(owner, p)
                        t = getattr(owner, leaf)
                        t[:k] = val.detach()
                        args.append(graph.get_attr(name))
                    bn = graph.call_function(torch.ops.aten.batch_norm.default,
                                             (y, *args, False, mod.momentum, mod.eps, False))
                bn.meta = dict(n.meta)
                n.replace_all_uses_with(bn)
            else:
                n.replace_all_uses_with(y)
            graph.erase_node(n)
        elif n.op == "call_module" and n.target.startswith("tas_d"):
            s = gm.get_submodule(n.target).stage
            choice = ctrl.stage_choices[s].index(depths[s])
            n.replace_all_uses_with(n.args[choice])
            graph.erase_node(n)
    for n in list(graph.nodes):
        if n.op == "call_module" and n.target == "tas":
            graph.erase_node(n)
    graph.eliminate_dead_code()
    for name in [m for m, _ in gm.named_children() if m.startswith("tas")]:
        delattr(gm, name)
    # the dropped units' parameters: no longer read, so not part of the network
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            *path, leaf = name.split(".")
            owner = gm
            for p in path:
                owner = getattr(owner, p)
            if hasattr(owner, leaf):
                delattr(owner, leaf)
    gm.delete_all_unused_submodules()
    reps = {k: v for k, v in reps.items() if k[0] in used}
    graph.lint()
    gm.recompile()
    return gm, reps


def materialize(supernet: Any, *, widths: Mapping[int, int] | None = None, depths: Mapping[int, int] | None = None,
                verify: bool = True, seed: int = 0) -> Any:
    """The arg-max architecture (or the given ``widths``/``depths``) as a pruned network: :func:`arch_graph`, then
    the first ``w`` channels of every searched group selected and ``Shrink`` (verified: shrunk == masked). Returns a
    :class:`fxprune.compile.Compiled` (``.module``, ``.report``)."""
    import fxprune
    from .shrink import Shrink

    module = supernet.module if hasattr(supernet, "module") and hasattr(supernet, "report") else supernet
    ctrl: TASController = module.tas
    gm, reps = arch_graph(module, widths, depths)
    args, kwargs = ctrl.example
    return fxprune.compile(gm, args, passes=[_SelectFirst(reps), Shrink()], example_kwargs=kwargs or None,
                           seed=seed, verify=verify)


# --------------------------------------------------------------------------------------------------- KD fine-tune
class LogitKD(nn.Module):
    """Student forward plus TAS's KD loss ``alpha T^2 KL(softmax(t / T) || softmax(s / T))`` from a frozen teacher
    (the first tensor of each output); use with ``fxprune.train.fit(..., distiller=LogitKD(...))`` and a task loss
    scaled by ``1 - alpha``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, alpha: float = 0.9, temperature: float = 4.0):
        super().__init__()
        self._student = [student]  # not submodules: fit() optimises the student's parameters itself, the teacher's
        self._teacher = [teacher]  # never
        self.alpha, self.T = float(alpha), float(temperature)

    def forward(self, *args: Any) -> tuple[Any, torch.Tensor]:
        out = self._student[0](*args)
        teacher = self._teacher[0]
        modes = [(m, m.training) for m in teacher.modules()]
        for m, _ in modes:  # eval mode (exported modules refuse .eval(): set the flags)
            m.training = False
        try:
            with torch.no_grad():
                t = teacher(*args)
        finally:
            for m, was in modes:
                m.training = was
        s_logits = next(x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor))
        t_logits = next(x for x in tree_flatten(t)[0] if isinstance(x, torch.Tensor))
        kd = F.kl_div(F.log_softmax(s_logits / self.T, -1), F.softmax(t_logits / self.T, -1),
                      reduction="batchmean") * (self.alpha * self.T ** 2)
        return out, kd


def kd_finetune(student: nn.Module, teacher: nn.Module, data: Iterable, *, epochs: int = 1, lr: float = 1e-3,
                alpha: float = 0.9, temperature: float = 4.0, max_steps: int | None = None, seed: int = 0,
                loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> dict[str, Any]:
    """Train ``student`` on ``data`` with TAS's distillation loss from ``teacher`` (defaults: alpha 0.9, T 4):
    ``(1 - alpha) CE + alpha T^2 KL``. Returns :func:`fxprune.train.fit`'s history."""
    from fxprune.train import fit

    task = loss_fn or (lambda out, y: F.cross_entropy(
        next(x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)), y))
    kd = LogitKD(student, teacher, alpha, temperature)
    return fit(student, data, lambda out, y: (1 - alpha) * task(out, y), epochs=epochs, lr=lr, distiller=kd,
               max_steps=max_steps, seed=seed)
