"""FTWT (Fire Together Wire Together, Elkerdawy et al., CVPR'22, arXiv 2110.08232): per-sample dynamic channel
gating with self-supervised mask predictors, as a graph rewrite.

:class:`FTWTGates` inserts, after every gated block (a conv and the BatchNorm / activation ops that follow it), an
:class:`FTWTGate` module::

    logits = conv1x1(avg_pool(block_input))            # the mask predictor, on the block's *input*
    mask   = 1[sigmoid(logits) > 0.5]                  # hard, per sample and channel, built without gradient
    out    = block_output * mask

so a sample's inactive channels are zero and their MACs (in the block's conv and in the next conv's input) can be
skipped. :class:`FTWTLoss` trains the predictors with self-supervised targets from the block's own (pre-mask)
activations: the heat-map score of channel ``c`` is ``s_c = max over space |a_c|``, normalised to a mass
``p_c = s_c / sum(s)``; the target is the smallest top set of channels whose mass reaches ``m`` (:func:`ftwt_targets`;
a different number of channels per input). Loss = task loss + ``mask_weight`` x BCE(logits, target) (batch mean,
summed over channels and blocks as in the authors' code); the mask term is switched off after ``cooldown`` (half)
of training, as in the authors' code.

Modes (authors' code, ``utils/layers.py``: ``apply_predictor`` builds the binary mask under ``torch.no_grad``):
``"decoupled"``: the predictor reads ``block_input.detach()`` and the mask carries no gradient, so the predictors
learn only from the mask loss and the mask loss never changes the backbone (the paper's "decoupled" claim);
``"joint"``: it reads ``block_input``, so the mask loss also trains the backbone (the mask still carries no
gradient). ``ste=True`` (not in the authors' code, an explicit option) makes the mask ``hard + p - p.detach()``
(``p = sigmoid(logits)``), a straight-through estimator through which the task loss also trains the predictors.
The authors' targets keep the channels whose cumulative mass stays within ``m``; ours include the channel that
crosses ``m`` (the minimal set with mass >= m, as the issue specifies), one channel more at most.

Residual blocks (``residual=True``): a conv whose output channels are coupled to other producers by a residual add
(``conv -> [bn] -> add -> [activations]``, ResNet's second conv) is gated at the block *output*, after the add and
its activations, as the authors' ``ConvWithMask(..., residual=...)`` does. The gate is a per-sample multiply, so it
never needs the coupled channels to agree (nothing is removed from the weights); a masked channel's conv output,
residual and activation are all dead for that sample. When several convs feed the same add (a projection
shortcut), the main-branch conv is gated: the one whose input has the fewest other users (ties: the later one).

Blocks (``blocks=``): ``"auto"`` takes every ``conv2d`` whose output channels form a prunable channel group
(``program.groups``) produced by that conv alone (residual-coupled channels, grouped/depthwise convs and frozen
groups such as the logits are left dense); the block runs through the single-use chain of BatchNorm / activation
ops after the conv (with ``residual=True``, also the residual-coupled convs described above). Or a list of conv
module names (``"features.3"``) or node names.

Dynamic MACs: :func:`fxprune.passes.ftwt_flops.dynamic_macs` counts per-sample MACs from the active channels.
Execution: the gated module computes every channel and multiplies (exportable; ONNX lowers the gate to
GlobalAveragePool/Conv/Sigmoid/Greater/Mul). :func:`gather_module` builds an eager batch-1 module that computes
only the active channels (index_select of weights and inputs) -- ``benchmarks/ftwt_dynamic.py`` times it.

Defaults follow the paper: mass 0.8-0.92 (0.9 here), predictor lr 0.1 (SGD, see the tests). Predictors start at
"all channels on" (zero weights, bias +3), so the gated model equals the dense one before training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.errors import InputError
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program, Stage
from fxprune.records import Record
from fxprune.shape_prop import propagate_shapes
from fxprune.utils import first_tensor, int_list, is_symbolic, iter_batches

from .macprune import settle_channel_masks

aten = torch.ops.aten
MODES = ("decoupled", "joint")
BN_OPS = {aten.batch_norm.default}
ACT_OPS = {aten.relu.default, aten.relu_.default, aten.silu.default, aten.silu_.default, aten.gelu.default,
           aten.hardswish.default, aten.hardswish_.default, aten.leaky_relu.default, aten.leaky_relu_.default,
           aten.hardtanh.default, aten.hardtanh_.default, aten.mish.default, aten.elu.default,
           aten.dropout.default, aten.clone.default}
UNIT_OPS = BN_OPS | ACT_OPS
# ops that map a zero channel to a zero channel (and keep dim 1 as the channel dim, or flatten it outermost)
ZERO_PRESERVING = {aten.relu.default, aten.relu_.default, aten.max_pool2d.default, aten.avg_pool2d.default,
                   aten.adaptive_avg_pool2d.default, aten.flatten.using_ints, aten.view.default,
                   aten.reshape.default, aten.dropout.default, aten.clone.default, aten.contiguous.default,
                   aten.hardtanh.default, aten.leaky_relu.default, aten.silu.default, aten.gelu.default,
                   aten.mish.default, aten.hardswish.default, aten.elu.default}


# ----------------------------------------------------------------------------------------------- targets
def ftwt_targets(activation: torch.Tensor, mass: float) -> torch.Tensor:
    """Self-supervised FTWT target: bool ``(N, C)``, per sample the smallest set of channels whose share of the
    heat-map mass reaches ``mass``.

    ``s_c = max over space |a_c|`` (``a``: ``(N, C, *spatial)`` or ``(N, C)``), ``p = s / sum_c s``; channels are
    taken in decreasing ``p`` (ties: lower index first) while the mass taken so far is below ``mass``. A sample whose
    activations are all zero gets an empty set.
    """
    if not 0.0 < float(mass) <= 1.0:
        raise InputError(f"mass must be in (0, 1], got {mass!r}", fix="the FTWT paper uses 0.8-0.92")
    a = activation.detach()
    s = a.abs().flatten(2).amax(-1) if a.dim() > 2 else a.abs()
    s = s.double()
    total = s.sum(1, keepdim=True)
    prob = torch.where(total > 0, s / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(s))
    order = torch.sort(-prob, dim=1, stable=True).indices
    sorted_p = prob.gather(1, order)
    before = sorted_p.cumsum(1) - sorted_p  # mass of the channels taken before this one
    take = (before < float(mass) - 1e-12) & (sorted_p > 0)
    out = torch.zeros_like(take)
    out.scatter_(1, order, take)
    return out


# ----------------------------------------------------------------------------------------------- module
class FTWTGate(nn.Module):
    """Mask predictor + gate of one block: ``forward(block_input, block_output) -> block_output * mask``.

    ``last_mask`` (bool ``(N, C)``) and ``last_logits`` (``(N, C)``, with grad) hold the latest call's values (eager
    mode only). ``enabled=False`` passes the block output through (a dense reference).
    """

    def __init__(self, in_channels: int, out_channels: int, mode: str = "decoupled", mass: float = 0.9,
                 init_bias: float = 3.0, ste: bool = False):
        super().__init__()
        self.predictor = nn.Conv2d(in_channels, out_channels, 1, bias=True)
        nn.init.zeros_(self.predictor.weight)
        nn.init.constant_(self.predictor.bias, init_bias)
        self.mode = mode
        self.mass = float(mass)
        self.ste = bool(ste)
        self.enabled = True
        self.last_mask: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None

    def logits(self, block_input: torch.Tensor) -> torch.Tensor:
        """``conv1x1(avg_pool(block_input))`` as ``linear(mean over space)`` (same parameters, less overhead)."""
        z = block_input.detach() if self.mode == "decoupled" else block_input
        z = z.mean(tuple(range(2, z.dim()))) if z.dim() > 2 else z
        w = self.predictor.weight
        return F.linear(z, w.reshape(w.shape[0], -1), self.predictor.bias)

    def forward(self, block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return block_output
        logits = self.logits(block_input)
        prob = torch.sigmoid(logits)
        hard = (prob > 0.5).to(prob.dtype).detach()  # no gradient (authors' code: built under no_grad)
        mask = hard + prob - prob.detach() if self.ste else hard  # ste: straight through to the sigmoid
        if not is_symbolic(block_output):
            self.last_mask = hard.detach().bool()
            self.last_logits = logits
        return block_output * mask.reshape(mask.shape + (1,) * (block_output.dim() - 2))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, mass={self.mass}, ste={self.ste}"

    def __getstate__(self) -> dict:
        # the latest call's records (logits carry autograd history) are not part of the module: copies and
        # pickles drop them
        state = self.__dict__.copy()
        state["last_mask"] = None
        state["last_logits"] = None
        return state


# ----------------------------------------------------------------------------------------------- graph helpers
def unit_chain(conv: fx.Node) -> list[fx.Node]:
    """``[conv, bn?, act?, ...]``: the conv and the single-use BatchNorm/activation ops that follow it."""
    chain = [conv]
    cur = conv
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if user.op == "call_function" and user.target in UNIT_OPS and user.args and user.args[0] is cur:
            chain.append(user)
            cur = user
        else:
            break
    return chain


def gate_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, FTWTGate]]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, FTWTGate):
                out.append((n, mod))
    return out


ADD_OPS = {aten.add.Tensor, aten.add_.Tensor}
CONV_OPS = (aten.conv2d.default, aten.conv1d.default, aten.conv3d.default)


def _conv_above(node: Any) -> fx.Node | None:
    cur = node
    while isinstance(cur, fx.Node) and cur.op == "call_function":
        if cur.target in CONV_OPS:
            return cur
        if cur.target in UNIT_OPS:
            cur = cur.args[0]
            continue
        return None
    return None


def gate_conv(gate_node: fx.Node) -> fx.Node | None:
    """The conv of a gate's block (walking back from the gated output through BN/activation ops and, for a
    residual gate, through the add to the operand whose conv reads the gate's predictor input)."""
    cur = gate_node.args[1]
    while isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in UNIT_OPS:
        cur = cur.args[0]
    if isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in ADD_OPS:
        for operand in cur.args[:2]:
            conv = _conv_above(operand)
            if conv is not None and conv.args[0] is gate_node.args[0]:
                return conv
        return None
    return _conv_above(cur)


def residual_tail(conv: fx.Node) -> tuple[fx.Node, Any, list[fx.Node]] | None:
    """For ``conv -> [bn/act] -> add(., other) -> [activations]``: ``(add, other, [activation nodes])``, else None.
    The add must be the conv chain's only user and take it as one of its two tensor operands."""
    chain = unit_chain(conv)
    end = chain[-1]
    if len(end.users) != 1:
        return None
    add = next(iter(end.users))
    if add.op != "call_function" or add.target not in ADD_OPS or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args
    if end not in (a, b) or a is b or not isinstance(b if a is end else a, fx.Node):
        return None
    post = []
    cur = add
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if user.op == "call_function" and user.target in ACT_OPS and user.args and user.args[0] is cur:
            post.append(user)
            cur = user
        else:
            break
    return add, (b if a is end else a), post


def source_gate(node: fx.Node, gates: dict[fx.Node, Any]) -> fx.Node | None:
    """The gate whose zeros reach ``node`` through channel-preserving, zero-preserving ops only, if any."""
    cur = node
    while isinstance(cur, fx.Node):
        if cur in gates:
            return cur
        if cur.op == "call_function" and cur.target in ZERO_PRESERVING and cur.args:
            cur = cur.args[0]
            continue
        return None
    return None


# ----------------------------------------------------------------------------------------------- the pass
@dataclass(frozen=True)
class FTWTRecord(Record):
    """Where FTWTGates put its gates: per gate, its module name, conv node, weight, gated block nodes and widths."""

    gates: tuple[dict[str, Any], ...]


@register_pass
class FTWTGates(Pass):
    """Insert an FTWT mask predictor and gate after every selected block (see the module docstring).

    ``blocks``: ``"auto"`` or conv names. ``mass``: the target's heat-map mass ``m`` in (0, 1]. ``mode``:
    ``"decoupled"`` or ``"joint"``. ``init_bias``: predictor bias at start (> 0: all channels on). ``ste``: let the
    task loss train the predictors through a straight-through estimator (off: the authors' gradient-free mask).
    ``residual``: also gate residual-coupled convs at the block output, after the add (the authors' ResNet gating).
    """

    name = "ftwt_gates"
    requires = frozenset({"groups"})
    accepts = frozenset({Stage.TRACED, Stage.MASKED, Stage.SHRUNK})
    modifies_weights = True
    changes_graph = True

    def __init__(self, blocks: str | Iterable[str] = "auto", mass: float = 0.9, mode: str = "decoupled",
                 init_bias: float = 3.0, ste: bool = False, residual: bool = False):
        if isinstance(blocks, str):
            if blocks != "auto":
                raise InputError(f"blocks must be 'auto' or a list of conv names, got {blocks!r}",
                                 fix="blocks='auto' or blocks=['features.0', 'features.3']")
        else:
            blocks = list(blocks)
            if not blocks or not all(isinstance(b, str) for b in blocks):
                raise InputError(f"blocks must be a non-empty list of names, got {blocks!r}")
        if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0.0 < float(mass) <= 1.0:
            raise InputError(f"mass must be in (0, 1], got {mass!r}", fix="the FTWT paper uses 0.8-0.92")
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}",
                             fix="'decoupled' (predictor input detached) or 'joint'")
        if isinstance(init_bias, bool) or not isinstance(init_bias, (int, float)):
            raise InputError(f"init_bias must be a number, got {init_bias!r}")
        for flag, val in (("ste", ste), ("residual", residual)):
            if not isinstance(val, bool):
                raise InputError(f"{flag} must be True or False, got {val!r}")
        self.blocks = blocks
        self.mass = float(mass)
        self.mode = mode
        self.init_bias = float(init_bias)
        self.ste = ste
        self.residual = residual

    def _convs(self, gm: fx.GraphModule) -> list[fx.Node]:
        return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.conv2d.default
                and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"]

    def _auto(self, program: Program) -> tuple[list[fx.Node], dict[str, str]]:
        gs = program.groups
        shapes = program.param_shapes()
        chosen, skipped = [], {}
        residual_cands: list[fx.Node] = []
        for conv in self._convs(program.gm):
            wname = conv.args[1].target
            canon = gs.analysis.param_alias.get(wname, wname)
            cout = shapes[wname][0]
            grp = [g for g in gs.containing(wname) if any(m.param == canon and m.dim == 0 for m in g.members)]
            if len(grp) != 1:
                skipped[wname] = "output channels split over several groups"
                continue
            g = grp[0]
            if not g.prunable or g.kind != "channels":
                skipped[wname] = f"group {g.id} frozen: {g.frozen}" if g.frozen else f"group {g.id} not prunable"
                continue
            producers = {m.param for m in g.members if m.dim == 0 and len(shapes.get(m.param, ())) >= 3}
            if producers != {canon}:
                if self.residual and residual_tail(conv) is not None:
                    residual_cands.append(conv)
                    continue
                skipped[wname] = f"channels shared with {sorted(producers - {canon})} (residual/grouped coupling)"
                continue
            if g.size != cout:
                skipped[wname] = "group size differs from the conv's output channels"
                continue
            chosen.append(conv)
        # residual gates: one per add; the main-branch conv (input with fewest users, then the later one)
        order = {n: i for i, n in enumerate(program.gm.graph.nodes)}
        by_add: dict[fx.Node, list[fx.Node]] = {}
        for conv in residual_cands:
            by_add.setdefault(residual_tail(conv)[0], []).append(conv)
        for add, convs in by_add.items():
            convs.sort(key=lambda c: (len(c.args[0].users), -order[c]))
            chosen.append(convs[0])
            for c in convs[1:]:
                skipped[c.args[1].target] = f"feeds the same add ({add.name}) as the gated {convs[0].name}"
        chosen.sort(key=lambda c: order[c])
        return chosen, skipped

    def _named(self, gm: fx.GraphModule) -> list[fx.Node]:
        convs = self._convs(gm)
        out = []
        for name in self.blocks:
            hit = [c for c in convs if c.name == name or c.args[1].target in (name, name + ".weight")]
            if not hit:
                known = ", ".join(c.args[1].target.rsplit(".", 1)[0] for c in convs[:12])
                raise InputError(f"no conv2d block named {name!r}", fix=f"conv blocks are named like: {known}")
            out.extend(h for h in hit if h not in out)
        return out

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        settle_channel_masks(program, self.name)
        gm = program.gm
        if self.blocks == "auto":
            convs, skipped = self._auto(program)
        else:
            convs, skipped = self._named(gm), {}
        if not convs:
            raise InputError("no block to gate: no conv2d has a prunable output-channel group of its own",
                             fix="name the convs with blocks=[...]; " + "; ".join(f"{k}: {v}" for k, v in
                                                                                list(skipped.items())[:4]))
        dims = []
        for conv in convs:  # shapes first: the rewrite inserts nodes without metadata until re-propagation
            xv, yv = conv.args[0].meta.get("val"), conv.meta.get("val")
            if not isinstance(xv, torch.Tensor) or xv.dim() != 4 or not isinstance(yv, torch.Tensor):
                raise InputError(f"FTWT gates 2-d convs with (N, C, H, W) inputs; {conv.name} has "
                                 f"{getattr(xv, 'shape', None)}")
            dims.append((int(xv.shape[1]), int(yv.shape[1])))
        info = []
        for i, (conv, (cin, cout)) in enumerate(zip(convs, dims)):
            chain = unit_chain(conv)
            tail = residual_tail(conv) if self.residual else None
            if tail is not None:
                chain = chain + [tail[0]] + tail[2]
            out_node = chain[-1]
            mod_name = f"ftwt_gate_{i}"
            gm.add_submodule(mod_name, FTWTGate(cin, cout, self.mode, self.mass, self.init_bias, self.ste))
            with gm.graph.inserting_after(out_node):
                g = gm.graph.call_module(mod_name, (conv.args[0], out_node))
            out_node.replace_all_uses_with(g, delete_user_cb=lambda u, g=g: u is not g)
            info.append({"gate": mod_name, "conv": conv.name, "weight": conv.args[1].target,
                         "block": [n.name for n in chain], "in_channels": cin, "channels": cout,
                         "residual": tail is not None})
        gm.graph.lint()
        gm.recompile()
        propagate_shapes(gm, program, pass_name=self.name)
        stats = {"gates": len(info), "blocks": [d["weight"].rsplit(".", 1)[0] for d in info],
                 "channels": [d["channels"] for d in info], "skipped": skipped, "mass": self.mass,
                 "mode": self.mode, "ste": self.ste, "residual": [d["residual"] for d in info]}
        return PassResult(program, changed=True, stats=stats, record=FTWTRecord(tuple(info)))


# ----------------------------------------------------------------------------------------------- the loss
class FTWTLoss:
    """Task loss + FTWT mask loss for a module gated by :class:`FTWTGates` (any training loop)::

        crit = FTWTLoss(compiled.module, mass=0.9)
        for epoch in range(E):
            crit.set_epoch(epoch, E)                      # mask loss off from cooldown * E on
            for x, y in loader:
                loss = crit(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        crit.last  # {"task": ..., "mask": ..., "mask_accuracy": ...}

    Forward hooks on the gates record each block's pre-mask activation and the predictor logits; targets come from
    :func:`ftwt_targets`. ``mass`` defaults to each gate's own. ``task_loss``: callable ``(outputs, y)``
    (default cross-entropy). ``mask_weight``: weight of the mask loss. ``reduction="sum"`` (the authors'
    ``compute_mask_loss_per_input``): the batch-mean BCE summed over channels and blocks, so every predictor
    logit gets a gradient of order 1/N whatever the width (their predictor lr 0.1 assumes it); ``"mean"``
    averages over channels and blocks instead.
    """

    def __init__(self, module: nn.Module, mass: float | None = None, mask_weight: float = 1.0,
                 task_loss: Callable | None = None, cooldown: float = 0.5, reduction: str = "sum"):
        mod = getattr(module, "module", module)  # a Compiled works too
        self.gates = [(n, m) for n, m in mod.named_modules() if isinstance(m, FTWTGate)]
        if not self.gates:
            raise InputError("no FTWT gate in this module", fix="compile with passes=[FTWTGates(...)] first")
        if mass is not None and not 0.0 < float(mass) <= 1.0:
            raise InputError(f"mass must be in (0, 1], got {mass!r}")
        if not 0.0 <= float(cooldown) <= 1.0:
            raise InputError(f"cooldown must be a fraction of training in [0, 1], got {cooldown!r}")
        if reduction not in ("sum", "mean"):
            raise InputError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.mass = mass
        self.mask_weight = float(mask_weight)
        self.weight_now = float(mask_weight)
        self.cooldown = float(cooldown)
        self.task_loss = task_loss or F.cross_entropy
        self._records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.gates]
        self.last: dict[str, float] = {}

    def _hook(self, name: str):
        def hook(mod: FTWTGate, inputs: tuple, output: torch.Tensor) -> None:
            if mod.enabled and mod.last_logits is not None and not is_symbolic(output):
                self._records[name] = (inputs[1].detach(), mod.last_logits)
        return hook

    def set_epoch(self, epoch: float, epochs: float) -> None:
        """Mask loss on before ``cooldown * epochs``, off after (the authors' schedule)."""
        self.weight_now = 0.0 if epoch >= self.cooldown * epochs else self.mask_weight

    def targets(self) -> dict[str, torch.Tensor]:
        """The latest forward's targets per gate (bool ``(N, C)``)."""
        return {n: ftwt_targets(a, self.mass if self.mass is not None else dict(self.gates)[n].mass)
                for n, (a, _) in self._records.items()}

    def mask_loss(self) -> tuple[torch.Tensor, float]:
        if not self._records:
            raise InputError("no gate ran since the last loss", fix="call the gated module before the loss")
        losses, correct, total = [], 0, 0
        for n, tgt in self.targets().items():
            logits = self._records[n][1]
            bce = F.binary_cross_entropy_with_logits(logits, tgt.to(logits.dtype), reduction="none").mean(0)
            losses.append(bce.sum() if self.reduction == "sum" else bce.mean())
            correct += int(((logits.detach() > 0) == tgt).sum())
            total += tgt.numel()
        stacked = torch.stack(losses)
        return (stacked.sum() if self.reduction == "sum" else stacked.mean()), correct / max(total, 1)

    def __call__(self, outputs: Any, y: torch.Tensor) -> torch.Tensor:
        task = self.task_loss(first_tensor(outputs), y)
        mloss, acc = self.mask_loss()
        self._records = {}
        self.last = {"task": float(task.detach()), "mask": float(mloss.detach()), "mask_accuracy": acc,
                     "mask_weight": self.weight_now}
        return task + self.weight_now * mloss if self.weight_now else task + 0.0 * mloss

    def clear(self) -> None:
        self._records = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def predictor_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of the FTWT mask predictors (for their own optimizer / learning rate)."""
    return [p for m in module.modules() if isinstance(m, FTWTGate) for p in m.predictor.parameters()]


def backbone_parameters(module: nn.Module) -> list[nn.Parameter]:
    ids = {id(p) for p in predictor_parameters(module)}
    return [p for p in module.parameters() if id(p) not in ids]


@torch.no_grad()
def mask_accuracy(module: nn.Module, data: Iterable, mass: float | None = None, max_batches: int | None = None
                  ) -> dict[str, Any]:
    """Agreement of the predicted masks with the FTWT targets on ``data``: overall, per gate, and the mean
    fraction of active channels (predicted and target)."""
    crit = FTWTLoss(module, mass=mass)
    agree: dict[str, list[int]] = {n: [0, 0, 0, 0] for n, _ in crit.gates}
    try:
        for x, _ in iter_batches(data, max_batches):
            module(x)
            for n, t in crit.targets().items():
                pred = dict(crit.gates)[n].last_mask
                a = agree[n]
                a[0] += int((pred == t).sum())
                a[1] += t.numel()
                a[2] += int(pred.sum())
                a[3] += int(t.sum())
            crit.clear()
    finally:
        crit.remove()
    tot = sum(a[0] for a in agree.values()), sum(a[1] for a in agree.values())
    return {"accuracy": tot[0] / max(tot[1], 1),
            "per_gate": {n: a[0] / max(a[1], 1) for n, a in agree.items()},
            "predicted_active": {n: a[2] / max(a[1], 1) for n, a in agree.items()},
            "target_active": {n: a[3] / max(a[1], 1) for n, a in agree.items()}}


# ----------------------------------------------------------------------------------------------- gather path
@dataclass
class _ConvCfg:
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


def _conv_cfg(node: fx.Node) -> _ConvCfg:
    a = list(node.args) + [None] * (7 - len(node.args))
    return _ConvCfg(int_list(a[3], 2, 1), int_list(a[4], 2, 0), int_list(a[5], 2, 1), int(a[6] or 1))


class GatherUnit(nn.Module):
    """Batch-1 execution of a gated block computing only its active output channels (and, when its input comes
    from another gated block, only that block's active input channels). BatchNorm (eval statistics) is folded into
    the conv at build time; the predictor runs as a linear layer on the pooled input. Output: full size, zeros in
    the inactive channels."""

    def __init__(self, gate: FTWTGate, conv: _ConvCfg, weight: torch.Tensor, bias: torch.Tensor,
                 acts: list[tuple[Any, tuple]], post: list[tuple[Any, tuple]] | None = None):
        super().__init__()
        self.conv = conv
        self.acts = acts
        self.post = post or []  # residual block: activations after the add
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        pw = gate.predictor.weight.detach()
        self.register_buffer("pred_weight", pw.reshape(pw.shape[0], -1).clone())
        self.register_buffer("pred_bias", gate.predictor.bias.detach().clone())
        self.active: torch.Tensor | None = None
        object.__setattr__(self, "src", None)  # upstream GatherUnit (not a registered submodule)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] != 1:
            raise InputError(f"the gather path runs batch 1, got a batch of {x.shape[0]}",
                             fix="use the gated module itself for batches")
        logits = F.linear(x.mean((2, 3)), self.pred_weight, self.pred_bias)  # = conv1x1(avg_pool(x))
        idx = (logits[0] > 0).nonzero().flatten()  # sigmoid > 0.5
        self.active = idx
        src = self.src.active if self.src is not None else None
        if src is not None:
            x = x.index_select(1, src)
            w = self.weight[idx[:, None], src]
        else:
            w = self.weight.index_select(0, idx)
        y = F.conv2d(x, w, self.bias.index_select(0, idx), self.conv.stride, self.conv.padding, self.conv.dilation)
        for op, extra in self.acts:
            y = op(y, *extra)
        if residual is not None:  # residual block: add the shortcut's active channels, then the activations
            y = y + residual.index_select(1, idx)
            for op, extra in self.post:
                y = op(y, *extra)
        out = y.new_zeros((1, self.weight.shape[0]) + tuple(y.shape[2:]))
        return out.index_copy_(1, idx, y)


class GatherConsumer(nn.Module):
    """A dense conv/linear whose input comes from a gated block: reads only that block's active channels."""

    def __init__(self, kind: str, conv: _ConvCfg | None, src: GatherUnit):
        super().__init__()
        self.kind = kind
        self.conv = conv
        object.__setattr__(self, "src", src)

    def forward(self, x, w, b=None):
        idx = self.src.active
        if idx is None:
            raise InputError("the gated block feeding this layer has not run", fix="call the whole module")
        if self.kind == "conv":
            return F.conv2d(x.index_select(1, idx), w.index_select(1, idx), b, self.conv.stride, self.conv.padding,
                            self.conv.dilation)
        c_src = self.src.weight.shape[0]
        per = x.shape[1] // c_src  # features per channel (channel-major flatten)
        f = (idx[:, None] * per + torch.arange(per, device=idx.device)[None, :]).reshape(-1)
        return F.linear(x.index_select(1, f), w.index_select(1, f), b)


def _get(gm: nn.Module, name: str) -> torch.Tensor:
    obj: Any = gm
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def gather_module(module: fx.GraphModule) -> fx.GraphModule:
    """An eager batch-1 copy of an FTWT-gated module that computes only the active channels of each sample.

    Every gated block ``conv -> [batch_norm] -> [activations] -> gate`` becomes a :class:`GatherUnit` (predictor
    first, then the conv with BatchNorm folded in, on the active output channels only); a conv (groups 1) or linear whose input comes
    from a gated block through zero-preserving ops (ReLU, pooling, flatten) reads only that block's active
    channels (:class:`GatherConsumer`). Same outputs as the gated module (up to float order); not exportable
    (data-dependent shapes). Count its MACs with :func:`fxprune.flops.count_macs`.
    """
    import copy

    gm = copy.deepcopy(module)
    graph = gm.graph
    gates = dict(gate_nodes(gm))
    units: dict[fx.Node, GatherUnit] = {}
    k = 0
    for gnode, gate in list(gates.items()):
        conv = gate_conv(gnode)
        if conv is None or conv.target is not aten.conv2d.default or gnode.args[0] is not conv.args[0]:
            continue
        cfg = _conv_cfg(conv)
        if cfg.groups != 1:
            continue
        chain = unit_chain(conv)
        tail = None
        if chain[-1] is not gnode.args[1]:
            tail = residual_tail(conv)
            if tail is None or (tail[2][-1] if tail[2] else tail[0]) is not gnode.args[1]:
                continue
        bn = next((n for n in chain if n.target in BN_OPS), None)
        if bn is not None and chain.index(bn) != 1:
            continue  # BN must directly follow the conv to be folded into it
        acts = [(n.target, tuple(n.args[1:])) for n in chain[2 if bn is not None else 1:]]
        post = [(n.target, tuple(n.args[1:])) for n in tail[2]] if tail is not None else None
        w = _get(gm, conv.args[1].target).detach()
        b_node = conv.args[2] if len(conv.args) > 2 else None
        b = _get(gm, b_node.target).detach() if isinstance(b_node, fx.Node) else torch.zeros(w.shape[0])
        if bn is not None:
            bw, bb, rm, rv = (None if a is None else _get(gm, a.target).detach() for a in bn.args[1:5])
            scale = (rv + float(bn.args[7])).rsqrt() * (bw if bw is not None else 1.0)
            w = w * scale.reshape(-1, 1, 1, 1)
            b = (b - rm) * scale + (bb if bb is not None else 0.0)
        unit = GatherUnit(gate, cfg, w, b, acts, post)
        name = f"ftwt_gather_{k}"
        k += 1
        gm.add_submodule(name, unit)
        with graph.inserting_before(gnode):
            new = graph.call_module(name, (conv.args[0],) if tail is None else (conv.args[0], tail[1]))
        new.meta = dict(gnode.meta)
        gnode.replace_all_uses_with(new)
        graph.erase_node(gnode)
        for n in reversed([tail[0]] + tail[2] if tail is not None else []):
            if not n.users:
                graph.erase_node(n)
        for n in reversed(chain):
            if not n.users:
                graph.erase_node(n)
        units[new] = unit
    # consumers: gated inputs read through zero-preserving ops
    for node in list(graph.nodes):
        if node.op == "call_module" and node in units:
            src = source_gate(node.args[0], units)
            if src is not None:
                object.__setattr__(units[node], "src", units[src])
            continue
        if node.op != "call_function" or not node.args:
            continue
        is_conv = node.target is aten.conv2d.default and _conv_cfg(node).groups == 1
        is_lin = node.target is aten.linear.default
        if not (is_conv or is_lin):
            continue
        src = source_gate(node.args[0], units)
        if src is None:
            continue
        if is_lin:
            xv = node.args[0].meta.get("val")
            c = units[src].weight.shape[0]
            if not isinstance(xv, torch.Tensor) or xv.dim() != 2 or int(xv.shape[1]) % c:
                continue
        cons = GatherConsumer("conv" if is_conv else "linear", _conv_cfg(node) if is_conv else None, units[src])
        name = f"ftwt_consumer_{k}"
        k += 1
        gm.add_submodule(name, cons)
        bias = node.args[2] if len(node.args) > 2 else None
        with graph.inserting_before(node):
            new = graph.call_module(name, (node.args[0], node.args[1], bias))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


__all__ = ["FTWTGates", "FTWTGate", "FTWTLoss", "ftwt_targets", "mask_accuracy", "gather_module", "GatherUnit",
           "GatherConsumer", "predictor_parameters", "backbone_parameters", "unit_chain", "gate_nodes",
           "gate_conv", "source_gate", "residual_tail"]
