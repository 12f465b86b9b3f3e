"""MACPruneGate: MACPruning's randomized, importance-aware pixel gating of the first layer (Ding et al., HOST'25,
arXiv 2502.15020) as a graph rewrite.

A side-channel defence against weight extraction by power/EM analysis of the first layer's multiply-accumulates.
At *every* inference (eval mode included: it is a deployment-time defence) a pixel map is drawn::

    keep = important | (U < p),      U ~ Uniform[0, 1) per sample and pixel, fresh at each call

and the multiply-accumulates of the pixels with ``keep == 0`` are skipped. ``important`` is a fixed set, the top
``important_fraction`` of pixels by importance, so accuracy is kept; the others run with probability ``p``.
Skipping a MAC both removes its leakage and (in a sequential implementation) shifts every later MAC in time, so a
correlation power analysis (CPA) loses its alignment. :mod:`fxprune.passes.macprune_leakage` simulates that and
measures the traces an attacker needs with and without the gate.

Importance (``importance=``):

* ``"saliency"`` (default): the first-order (Taylor) estimate of the loss change when a pixel is skipped,
  ``mean over samples |x * dL/dx|`` of the protected layer's input ``x`` over calibration data (``calib=`` or the
  compile call's ``data=``), summed over channels for a pixel map. ``L`` is the cross-entropy when batches carry
  labels, else the log-probability of the predicted class. On Fashion-MNIST it keeps far more accuracy at low
  ``p`` than ``"gradient"`` (``mean |dL/dx|``, blind to pixels that are already zero), which is no better than a
  random important set there (tests/test_macprune.py, benchmarks/results/macprune_security.json).
* ``"gradient"``: ``mean |dL/dx|``.
* a tensor (or ``{layer: tensor}``): given importance scores, shaped like one sample's input of the layer without
  the channel dim (a pixel map, ``(H, W)``) or with it (a per-element map, ``(C, H, W)``; ``(F,)`` for a linear
  layer).

A skipped pixel contributes zero to the layer, so feed raw (unnormalised) pixels to the protected layer, or fold
the input normalisation into it: zero must mean "black"/background, as on the device, not the dataset mean.

Modes (``mode=``):

* ``"zero"``: a :class:`PixelGate` module before the layer multiplies its input by the map (the simulation form:
  numerically what skipping does). Exports to ONNX as ``RandomUniformLike -> Less -> Or -> Mul``.
* ``"mac"``: the layer itself is replaced by :class:`MaskedMACConv2d` / :class:`MaskedMACLinear`, which compute
  only the multiply-accumulates of kept pixels (per kernel tap, one ``mm`` over the kept pixels: the MAC count
  really falls, and :func:`fxprune.flops.count_macs` / ``FlopCounterMode`` measures it). The result equals
  ``conv(x * keep)`` up to float summation order. This is an eager execution path; under ``torch.export`` /
  ONNX export it lowers to the ``"zero"`` form (same distribution, dense MACs), since data-dependent gathers do
  not export.

Randomness: each gate owns a ``torch.Generator`` seeded from ``seed`` (or the compile seed); same seed, same
sequence of maps. :func:`reseed` restarts it, :func:`set_p` changes ``p`` in place. In an exported ONNX graph the
random op is ``RandomUniformLike``; onnxruntime draws fresh values per run from its own generator (seed it with
:func:`seed_onnx_random`): the *statistics* match torch (tests/test_macprune.py), the bits do not.

Place the gate last in a pipeline (after ``Shrink``): later analyses see the gate as an opaque module and freeze
the channels it touches.

Security caveat (read before relying on it). Double Strike (Casalino, Méndez Real, Prévotet, Salvador, arXiv
2601.08698, January 2026) breaks MACPruning: the branch that decides whether a MAC is important, executed or
skipped leaves distinct control-flow patterns in the trace (on an ARM Cortex-M4, taken vs not-taken branches
differ in cycles). An attacker identifies the pattern of every MAC, re-synchronises the traces and runs CPA only
on traces where the target MAC executed; on a ChipWhisperer-Lite MLP they recovered 96% of the important weights
(and, with microarchitectural leakage, up to all of the non-important ones). Important pixels are never skipped,
so their weights get no protection once traces are re-aligned; the others keep only a ``1/p`` factor.
:func:`fxprune.passes.macprune_leakage.simulate_attack` has this attacker (``attacker="double_strike"``). A
deployment needs a constant-time, branch-free gate (dummy MACs on a zero operand) for the defence to hold, and then
the mitigation falls from desynchronisation to the ``~1/p^2`` of a hiding countermeasure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.errors import InputError, PassError
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program, Stage
from fxprune.records import Record
from fxprune.seeding import derive_seed
from fxprune.shape_prop import propagate_shapes
from fxprune.utils import first_tensor, int_list, is_symbolic, iter_batches

aten = torch.ops.aten
MODES = ("zero", "mac")
IMPORTANCES = ("saliency", "gradient")
CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv2d.padding,
            aten.conv1d.padding, aten.conv3d.padding, aten.convolution.default}
LINEAR_OPS = {aten.linear.default}


# ----------------------------------------------------------------------------------------------- shared helpers
def sub_seed(seed: int, salt: str) -> int:
    """A stable 63-bit seed derived from ``seed`` and a string (:func:`fxprune.seeding.derive_seed`)."""
    return derive_seed(seed, salt)


def settle_channel_masks(program: Program, pass_name: str) -> int:
    """Gating rewrites change the graph, so earlier channel masks (keyed by group ids of the old graph) must already
    be applied (the pass manager only runs gating passes on TRACED/MASKED/SHRUNK programs): masked programs drop
    them, their zeros are in the weights."""
    if program.stage is Stage.SELECTED:  # the manager's stage check makes this unreachable through compile
        raise InputError(f"{pass_name} rewrites the graph, but the channel masks of an earlier pass are not applied",
                         fix="put Shrink() (or ApplyMasks()) before the gating pass")
    n = len(program.masks)
    program.masks = {}
    program.divisors = {}
    return n


# ----------------------------------------------------------------------------------------------- modules
@dataclass(frozen=True)
class MACPruneRecord(Record):
    """Where MACPruneGate put its gates: protected layers (node names), gate module names, mode and rates."""

    layers: tuple[str, ...]
    modules: tuple[str, ...]
    mode: str
    p: float
    important_fraction: float


class PixelGate(nn.Module):
    """``x -> x * keep`` with ``keep = important | (U < p)`` drawn fresh for every sample at every call.

    ``important``: bool buffer shaped like one sample of ``x`` without the batch dim, or without batch and
    channel dims (a pixel map shared by all channels). The generator is owned by the module and seeded (``seed``).
    While ``calibrating`` the gate is the identity and records ``|dL/dx|`` for :class:`MACPruneGate`.
    """

    def __init__(self, map_shape: tuple[int, ...], p: float, seed: int):
        super().__init__()
        self.register_buffer("important", torch.zeros(map_shape, dtype=torch.bool))
        self.p = float(p)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.calibrating = False
        self.saliency_sum: torch.Tensor | None = None
        self.saliency_count = 0
        self._calib_inputs: list[torch.Tensor] = []
        self.last_mask: torch.Tensor | None = None

    # -- randomness
    def reseed(self, seed: int | None = None) -> None:
        """Restart the generator (from ``seed``, or the gate's own seed)."""
        if seed is not None:
            self.seed = int(seed)
        self.generator.manual_seed(self.seed)

    def mask_shape(self, x: torch.Tensor) -> tuple:
        k = self.important.dim()
        return (x.shape[0],) + (1,) * (x.dim() - 1 - k) + tuple(self.important.shape)

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh bool keep-map broadcastable to ``x``: ``(N, [1,] *important.shape)``."""
        k = self.important.dim()
        if is_symbolic(x):  # torch.export / ONNX: RandomUniformLike, no generator object in the graph
            index = (slice(None),) + (slice(0, 1),) * (x.dim() - 1 - k)
            u = torch.rand_like(x[index])
        else:
            u = torch.rand(self.mask_shape(x), generator=self.generator, dtype=x.dtype)
            if u.device != x.device:
                u = u.to(x.device)
        keep = (u < self.p) | self.important
        if not is_symbolic(x):
            self.last_mask = keep.detach()
        return keep

    # -- calibration (saliency)
    def _calibrate(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        self._calib_inputs.append(x)
        return x

    def add_saliency(self, grad: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Accumulate ``|x * dL/dx|`` (or ``|dL/dx|`` when ``x`` is None) per map entry over the batch."""
        k = self.important.dim()
        g = grad.detach() if x is None else grad.detach() * x.detach()
        g = g.abs()
        g = g.sum(dim=tuple(range(1, g.dim() - k))) if g.dim() - 1 > k else g
        s = g.sum(0).double()
        self.saliency_sum = s if self.saliency_sum is None else self.saliency_sum + s
        self.saliency_count += int(grad.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            return self._calibrate(x)
        return x * self.sample(x).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"map={tuple(self.important.shape)}, p={self.p}, important={int(self.important.sum())}, "
                f"seed={self.seed}")


class MaskedMACConv2d(nn.Module):
    """A conv2d that performs only the multiply-accumulates of the pixels its :class:`PixelGate` keeps.

    For each kernel tap ``(di, dj)``: the kept pixels whose output position is inside the output are gathered into
    ``V (n, C)`` and ``out[pos] += V @ W[:, :, di, dj].T`` (one ``mm`` of ``n * C * Cout`` MACs). The MACs done in
    the last call are in :attr:`last_macs`; the dense conv's are ``N * Cout * Ho * Wo * C * K * K``.
    Needs a pixel map (``important`` of shape ``(H, W)``) and ``groups == 1``.
    """

    def __init__(self, gate: PixelGate, stride: list[int], padding: list[int], dilation: list[int]):
        super().__init__()
        self.gate = gate
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.last_macs = 0
        self.last_dense_macs = 0

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gate.calibrating:
            return F.conv2d(self.gate(x), weight, bias, self.stride, self.padding, self.dilation)
        keep = self.gate.sample(x)
        if is_symbolic(x):  # export: the simulation form
            return F.conv2d(x * keep.to(x.dtype), weight, bias, self.stride, self.padding, self.dilation)
        return masked_mac_conv2d(x, keep[:, 0], weight, bias, self.stride, self.padding, self.dilation, self)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


def masked_mac_conv2d(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      stride: list[int], padding: list[int], dilation: list[int], record: Any = None
                      ) -> torch.Tensor:
    """``conv2d(x * keep[:, None], weight, bias)`` computed from the kept pixels only (``keep``: bool (N, H, W))."""
    n_, c, h, w_ = x.shape
    cout, cin, kh, kw = weight.shape
    if cin != c:
        raise InputError(f"masked-MAC conv needs groups == 1 (input {c} channels, weight {cin})",
                         fix="use MACPruneGate(mode='zero') for grouped convolutions")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w_ + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = x.new_zeros(n_ * ho * wo, cout)
    b_idx, i_idx, j_idx = keep.nonzero(as_tuple=True)
    v = x[b_idx, :, i_idx, j_idx]  # (n, C): the kept pixels' values
    macs = 0
    for di in range(kh):
        num_i = i_idx + ph - di * dh
        oi = torch.div(num_i, sh, rounding_mode="floor")
        ok_i = (num_i >= 0) & (num_i - oi * sh == 0) & (oi < ho)
        for dj in range(kw):
            num_j = j_idx + pw - dj * dw
            oj = torch.div(num_j, sw, rounding_mode="floor")
            ok = ok_i & (num_j >= 0) & (num_j - oj * sw == 0) & (oj < wo)
            sel = ok.nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            contrib = v[sel] @ weight[:, :, di, dj].t()  # (n_t, Cout): n_t * C * Cout MACs
            macs += int(sel.numel()) * c * cout
            pos = (b_idx[sel] * ho + oi[sel]) * wo + oj[sel]
            out.index_add_(0, pos, contrib)
    y = out.view(n_, ho, wo, cout).permute(0, 3, 1, 2)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    if record is not None:
        record.last_macs = macs
        record.last_dense_macs = n_ * cout * ho * wo * c * kh * kw
    return y.contiguous()


class MaskedMACLinear(nn.Module):
    """A linear layer that multiplies only the kept input features of each sample (``y_n = x_n[a] @ W[:, a].T``)."""

    def __init__(self, gate: PixelGate):
        super().__init__()
        self.gate = gate
        self.last_macs = 0
        self.last_dense_macs = 0

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gate.calibrating:
            return F.linear(self.gate(x), weight, bias)
        keep = self.gate.sample(x)
        if is_symbolic(x) or x.dim() != 2:
            return F.linear(x * keep.to(x.dtype), weight, bias)
        rows = []
        macs = 0
        for n in range(x.shape[0]):
            a = keep[n].nonzero(as_tuple=True)[0]
            rows.append(x[n, a].unsqueeze(0) @ weight[:, a].t())
            macs += int(a.numel()) * weight.shape[0]
        y = torch.cat(rows, 0) if rows else x.new_zeros(0, weight.shape[0])
        if bias is not None:
            y = y + bias
        self.last_macs = macs
        self.last_dense_macs = x.shape[0] * weight.shape[0] * weight.shape[1]
        return y


# ----------------------------------------------------------------------------------------------- the pass
@register_pass
class MACPruneGate(Pass):
    """Insert MACPruning's randomized importance-aware pixel gate before the protected layer(s).

    ``p``: keep probability of non-important pixels, in [0, 1]. ``important_fraction``: share of pixels always
    kept (top by importance), in [0, 1]. ``importance``: ``"saliency"`` or a tensor / ``{layer: tensor}`` of
    scores. ``calib``: loader for saliency (defaults to the compile call's ``data``); ``calib_batches`` caps it.
    ``layers``: ``"first"`` (the first conv/linear in graph order) or a list of module names (``"features.0"``)
    or node names. ``mode``: ``"zero"`` or ``"mac"`` (see the module docstring). ``seed``: the gates' generator
    seed (default: the compile seed).
    """

    name = "macprune_gate"
    accepts = frozenset({Stage.TRACED, Stage.MASKED, Stage.SHRUNK})
    modifies_weights = True
    changes_graph = True

    def __init__(self, p: float = 0.5, important_fraction: float = 0.1, importance: Any = "saliency",
                 calib: Any = None, layers: str | Iterable[str] = "first", seed: int | None = None,
                 mode: str = "zero", calib_batches: int | None = 16):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise InputError(f"p must be a probability in [0, 1], got {p!r}",
                             fix="p is the keep rate of non-important pixels, e.g. p=0.5")
        if (isinstance(important_fraction, bool) or not isinstance(important_fraction, (int, float))
                or not 0.0 <= float(important_fraction) <= 1.0):
            raise InputError(f"important_fraction must be in [0, 1], got {important_fraction!r}",
                             fix="the share of pixels that are always kept, e.g. 0.1")
        if isinstance(importance, str):
            if importance not in IMPORTANCES:
                raise InputError(f"importance must be one of {IMPORTANCES} or a tensor of scores, got "
                                 f"{importance!r}", fix="importance='saliency' (needs calib data) or "
                                                        "importance=torch.tensor(...)")
        elif not isinstance(importance, (torch.Tensor, dict)) and not hasattr(importance, "__array__"):
            raise InputError(f"importance must be 'saliency', a tensor or a dict of tensors, got "
                             f"{type(importance).__name__}", fix="pass a (H, W) tensor of pixel scores")
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}",
                             fix="'zero' multiplies pixels by the map; 'mac' skips their multiply-accumulates")
        if isinstance(layers, str):
            if layers != "first":
                raise InputError(f"layers must be 'first' or a list of layer names, got {layers!r}",
                                 fix="layers='first' or layers=['conv1']")
        else:
            layers = list(layers)
            if not layers or not all(isinstance(s, str) for s in layers):
                raise InputError(f"layers must be a non-empty list of names, got {layers!r}",
                                 fix="give module names (e.g. 'features.0') or node names (e.g. 'conv2d')")
        if calib_batches is not None and (not isinstance(calib_batches, int) or calib_batches < 1):
            raise InputError(f"calib_batches must be a positive int or None, got {calib_batches!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InputError(f"seed must be an int or None, got {seed!r}")
        self.p = float(p)
        self.important_fraction = float(important_fraction)
        self.importance = importance if isinstance(importance, (str, dict)) else torch.as_tensor(importance)
        self.calib = calib
        self.layers = layers
        self.seed = seed
        self.mode = mode
        self.calib_batches = calib_batches

    def options(self) -> dict[str, Any]:
        d = super().options()
        d["importance"] = self.importance if isinstance(self.importance, str) else "tensor"
        d["calib"] = None if self.calib is None else type(self.calib).__name__
        return d

    # -------------------------------------------------------------------------------------- selection
    def _select(self, gm: fx.GraphModule) -> list[fx.Node]:
        cands = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_OPS | LINEAR_OPS
                 and len(n.args) > 1 and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"]
        if not cands:
            raise InputError("the model has no conv or linear layer to protect",
                             fix="MACPruning gates the input of a conv/linear layer")
        if self.layers == "first":
            return cands[:1]
        out = []
        for name in self.layers:
            hit = [n for n in cands if n.name == name or n.args[1].target == name + ".weight"
                   or n.args[1].target == name]
            if not hit:
                known = ", ".join(n.args[1].target.rsplit(".", 1)[0] for n in cands[:12])
                raise InputError(f"no conv/linear layer named {name!r}", fix=f"layers are named like: {known}")
            out.extend(h for h in hit if h not in out)
        return out

    @staticmethod
    def _map_shape(node: fx.Node, importance: torch.Tensor | None) -> tuple[int, ...]:
        xv = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(xv, torch.Tensor):
            raise PassError("the protected layer's input has no shape metadata", pass_name="macprune_gate",
                            node=node.name)
        sample = tuple(int(s) for s in xv.shape[1:])
        if importance is not None:
            shp = tuple(importance.shape)
            if shp == sample or (len(sample) >= 2 and shp == sample[1:]):
                return shp
            raise InputError(f"importance map of shape {shp} does not fit the input {tuple(xv.shape)} of "
                             f"{node.name}", fix=f"give {sample[1:] if len(sample) >= 2 else sample} (a pixel "
                                                 f"map) or {sample} (one score per input element)")
        return sample[1:] if node.target in CONV_OPS and len(sample) >= 2 else sample

    # -------------------------------------------------------------------------------------- run
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        settle_channel_masks(program, self.name)
        gm = program.gm
        seed = ctx.seed if self.seed is None else self.seed
        nodes = self._select(gm)
        names = [n.args[1].target.rsplit(".", 1)[0] if n.args[1].target.endswith(".weight") else n.name
                 for n in nodes]
        given: dict[str, torch.Tensor] = {}
        if isinstance(self.importance, dict):
            for k, v in self.importance.items():
                given[k] = torch.as_tensor(v)
            missing = [nm for nm, n in zip(names, nodes) if nm not in given and n.name not in given]
            if missing:
                raise InputError(f"importance dict has no map for {missing}", fix="give one map per layer")
        elif isinstance(self.importance, torch.Tensor):
            given = {nm: self.importance for nm in names}

        gates: list[PixelGate] = []
        inserted: list[tuple[str, fx.Node]] = []
        for i, (node, lname) in enumerate(zip(nodes, names)):
            imp = given.get(lname, given.get(node.name))
            shape = self._map_shape(node, imp)
            gate = PixelGate(shape, self.p, sub_seed(seed, f"macprune/{lname}"))
            gates.append(gate)
            x = node.args[0]
            if self.mode == "zero":
                mod_name = f"macprune_gate_{i}"
                gm.add_submodule(mod_name, gate)
                with gm.graph.inserting_before(node):
                    g = gm.graph.call_module(mod_name, (x,))
                node.replace_input_with(x, g)
                inserted.append((mod_name, g))
            else:
                mod_name = f"macprune_{'conv' if node.target in CONV_OPS else 'linear'}_{i}"
                mod = self._mac_module(node, gate, shape)
                gm.add_submodule(mod_name, mod)
                bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_module(mod_name, (x, node.args[1], bias))
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                inserted.append((mod_name, new))
        gm.graph.lint()
        gm.recompile()

        source = {}
        if any(imp is None for imp in (given.get(nm, given.get(n.name)) for nm, n in zip(names, nodes))):
            data = self.calib if self.calib is not None else ctx.data
            if data is None:
                raise InputError(f"importance={self.importance!r} needs calibration data",
                                 fix="pass calib=loader to MACPruneGate or data=loader to fxprune.compile, or "
                                     "give importance=<tensor>")
            n_samples = self._saliency(gm, gates, data)
            source = {"saliency_samples": n_samples}
        for gate, node, lname in zip(gates, nodes, names):
            imp = given.get(lname, given.get(node.name))
            if imp is None:
                imp = (gate.saliency_sum / max(gate.saliency_count, 1)).float()
                gate.saliency_sum, gate.saliency_count = None, 0
            gate.important.copy_(important_map(imp, self.important_fraction))
            gate.register_buffer("importance", imp.detach().float().clone().reshape(gate.important.shape),
                                 persistent=False)
            gate.reseed()
        propagate_shapes(gm, program, pass_name=self.name)
        record = MACPruneRecord(layers=tuple(names), modules=tuple(m for m, _ in inserted), mode=self.mode,
                                p=self.p, important_fraction=self.important_fraction)
        stats = {"layers": names, "mode": self.mode, "p": self.p,
                 "important": [int(g.important.sum()) for g in gates],
                 "pixels": [int(g.important.numel()) for g in gates],
                 "expected_keep_rate": [round(float(g.important.float().mean()) * (1 - self.p) + self.p, 4)
                                        for g in gates], **source}
        return PassResult(program, changed=True, stats=stats, record=record)

    @staticmethod
    def _mac_module(node: fx.Node, gate: PixelGate, shape: tuple[int, ...]) -> nn.Module:
        if node.target in LINEAR_OPS:
            return MaskedMACLinear(gate)
        if node.target is not aten.conv2d.default:
            raise InputError(f"mode='mac' supports conv2d with integer padding and linear layers, not {node.target}",
                             fix="use mode='zero' for this layer")
        a = list(node.args) + [None] * (7 - len(node.args))
        stride, padding, dilation = (int_list(a[3], 2, 1), int_list(a[4], 2, 0), int_list(a[5], 2, 1))
        groups = a[6] if a[6] is not None else node.kwargs.get("groups", 1)
        if groups != 1:
            raise InputError(f"mode='mac' needs groups == 1, {node.name} has groups={groups}",
                             fix="use mode='zero' for grouped/depthwise convolutions")
        if len(shape) != 2:
            raise InputError(f"mode='mac' needs a pixel map (H, W), got an importance map of shape {shape}",
                             fix="give a (H, W) importance map, or use mode='zero' for per-element maps")
        return MaskedMACConv2d(gate, stride, padding, dilation)

    def _saliency(self, gm: fx.GraphModule, gates: list[PixelGate], data: Any) -> int:
        for g in gates:
            g.calibrating = True
            g.saliency_sum, g.saliency_count = None, 0
        n = 0
        try:
            with torch.enable_grad():
                for x, y in iter_batches(data, self.calib_batches):
                    for g in gates:
                        g._calib_inputs = []
                    out = first_tensor(gm(x))
                    if y is not None and out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
                        loss = F.cross_entropy(out.float(), y, reduction="sum")
                    else:
                        flat = out.float().reshape(out.shape[0], -1)
                        loss = flat.log_softmax(-1).max(-1).values.sum()
                    ins = [t for g in gates for t in g._calib_inputs]
                    grads = torch.autograd.grad(loss, ins, allow_unused=True)
                    k = 0
                    for g in gates:
                        for t in g._calib_inputs:
                            if grads[k] is not None:
                                g.add_saliency(grads[k], t if self.importance == "saliency" else None)
                            k += 1
                    n += int(x.shape[0])
        finally:
            for g in gates:
                g.calibrating = False
                g._calib_inputs = []
        if n == 0:
            raise InputError("the calibration data yielded no batch", fix="pass a non-empty loader")
        for g in gates:
            if g.saliency_sum is None:
                raise PassError("no gradient reached the gate during calibration", pass_name=self.name,
                                fix="the protected layer must influence the output")
        return n


def important_map(importance: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool map of the top ``round(fraction * numel)`` entries of ``importance`` (ties: lower flat index first)."""
    flat = importance.detach().reshape(-1).double()
    k = int(round(fraction * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(-flat, stable=True).indices
        keep[order[:k]] = True
    return keep.reshape(importance.shape)


# ----------------------------------------------------------------------------------------------- utilities
def gates(module: nn.Module) -> list[PixelGate]:
    """The pixel gates inside a (compiled) module, in module order."""
    return [m for m in module.modules() if isinstance(m, PixelGate)]


def set_p(module: nn.Module, p: float) -> None:
    """Set the keep probability of every pixel gate in ``module``."""
    if not 0.0 <= float(p) <= 1.0:
        raise InputError(f"p must be in [0, 1], got {p!r}")
    found = gates(module)
    if not found:
        raise InputError("no PixelGate in this module", fix="compile with passes=[MACPruneGate(...)] first")
    for g in found:
        g.p = float(p)


def reseed(module: nn.Module, seed: int | None = None) -> None:
    """Restart every gate's generator (from ``seed`` mixed with the gate's position, or from its own seed)."""
    for i, g in enumerate(gates(module)):
        g.reseed(None if seed is None else sub_seed(seed, f"gate{i}"))


def seed_onnx_random(model: Any, seed: int) -> Any:
    """Give every random op (RandomUniform[Like], RandomNormal[Like], Bernoulli) of an ONNX model a ``seed``
    attribute (``seed + i``), so an onnxruntime session draws a reproducible sequence. Accepts a ModelProto or a
    path (rewritten in place); returns the ModelProto."""
    import onnx

    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    ops = {"RandomUniformLike", "RandomUniform", "RandomNormalLike", "RandomNormal", "Bernoulli"}
    k = 0
    for graph in _onnx_graphs(proto.graph):
        for node in graph.node:
            if node.op_type in ops:
                for a in list(node.attribute):
                    if a.name == "seed":
                        node.attribute.remove(a)
                node.attribute.append(onnx.helper.make_attribute("seed", float(seed + k)))
                k += 1
    if not isinstance(model, onnx.ModelProto):
        onnx.save(proto, str(model))
    return proto


def _onnx_graphs(graph: Any) -> Iterator[Any]:
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.g is not None and len(a.g.node):
                yield from _onnx_graphs(a.g)
            for g in a.graphs:
                yield from _onnx_graphs(g)


def expected_keep_rate(gate: PixelGate) -> float:
    f = float(gate.important.float().mean())
    return f + (1.0 - f) * gate.p


__all__ = ["MACPruneGate", "PixelGate", "MaskedMACConv2d", "MaskedMACLinear", "masked_mac_conv2d", "important_map",
           "gates", "set_p", "reseed", "seed_onnx_random", "expected_keep_rate"]
