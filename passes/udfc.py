"""UDFCompensate: data-free compensation of pruned and quantised channels (UDFC, Bai et al., ICCV 2023,
arXiv 2308.07209), folded into the consumers' input columns. No data, no training.

Run it after a channel selection and before ``Shrink`` (or ``ApplyMasks``)::

    compile(model, x, passes=[ChannelPrune(0.3, importance="l1"), UDFCompensate(bits=6), Shrink()])

**Model.** A channel ``c`` that leaves ``BatchNorm`` reads ``y_c = gamma_c * z_c + beta_c`` with ``z_c`` standard
normal (the BN output per channel ~ N(beta, gamma^2)); after the activation ``a_c = f(y_c)``, ``f`` = ReLU or
identity. The paper assumes a damaged channel is a scaled copy of another one (``z_j = z_k``). To give every pair
of channels a correlation we derive one from the same premise: the producer (the conv/linear feeding the BN) sees
a white input ``v`` (zero mean, identity covariance after BN's centring), so ``z_c = w_c . v / ||w_c||`` and
``corr(z_i, z_j) = cos(w_i, w_j)``: a filter that is a scaled copy of another one (``cos = 1``) gives the paper's
``z_j = z_k`` exactly. Each channel is then ``y_c = g_c . v + beta_c`` with the loading ``g_c = gamma_c w_c /
||w_c||``; its quantised version (per-output-channel symmetric weights ``Q(w_c)``, same BN) is ``y^_c = gamma_c
Q(w_c) . v / ||w_c|| + beta_c``. Any two such variables are jointly Gaussian, and ``E[f(y_i) f(y_j)]`` has a
closed form: ``cov + mu mu`` for the identity; for ReLU the truncated bivariate-normal moments (Rosenbaum 1961)
with the orthant probability computed by Genz's algorithm (:func:`bvn_upper`). Where the BN input is a sum of
convs/linears (residual streams), their loadings are concatenated (independent white inputs); where it is anything
else, distinct channels are taken as independent (``corr = 0``; only the means couple them).

**Compensation.** For a group (the analyzer's coupled channels) and a BN site, targets ``T`` are the removed
channels (and, with ``bits``, every channel: its quantisation error is the damaged part), the basis ``B`` the kept
channels after quantisation. ``mode="lstsq"`` minimises ``E[(a_t - sum_b c_tb a^_b - c_t0)^2]`` for each target:
``C = E[a_T a^_B^T] (E[a^_B a^_B^T] + ridge)^-1`` (the intercept ``c_t0`` only where every consumer has a bias or
an eval-mode BN right after it to take it, no zero padding and no max pool in between: a constant is exact only
there). ``mode="single"`` is the paper's merge: the removed channel ``j`` goes
to the kept channel ``k`` with the most similar filter (cosine, signed by gamma) with
``s = E[a_j a^_k] / E[a^_k^2]`` under the paper's copy assumption ``z_j = z_k``; a kept quantised channel ``c``
gets ``s_c = E[a_c a^_c] / E[a^_c^2]``. ``mode="none"`` only quantises (the uncompensated baseline). The
coefficients fold into every consumer: ``W[:, b] <- sum_t C[t, b] W[:, t]`` (plus ``W[:, b]`` itself for a kept
channel that is not a target) and ``bias += sum_t c_t0 sum W[:, t]``. Since each consumer is linear in its input
channels, minimising each target's error independently minimises the consumer's output error under the model.

**Where it applies.** A consumer is a conv (``groups == 1``, not transposed) or a linear on a 2-D input whose
input channels come from ``BatchNorm`` through ReLU (or nothing), identity ops, average/adaptive pooling,
nearest/bilinear upsampling, flatten/view and channel concat; max pooling is accepted (it commutes with one
positive scale, so merges of copies stay exact; a combination of several channels is approximate there:
``inexact`` lists it). Residual-coupled groups work when their consumers read BN(+ReLU) outputs. Anything else
(no BN: ``no_bn="skip"``; another activation; a sum before the ReLU, as in post-activation ResNets; grouped or
transposed consumers) is skipped and listed with the reason. ``no_bn="merge"`` applies, at BN-free sites, the
weight-space single merge of Neuron Merging (Kim et al., 2020): ``k`` = most similar ``[w, b]`` (cosine),
``s = <u_j, u_k> / ||u_k||^2`` (only for ``cos > 0`` behind a ReLU); quantised channels get
``s_c = <u_c, u^_c> / ||u^_c||^2``.

With ``bits``, every conv/linear weight (not transposed) is quantised, each after the compensation folded into its
own columns (graph order), with the per-output-channel scale taken over the input columns that stay. Biases, BN
parameters and activations stay float. ``bias_correction`` (default on; not in the paper: DFQ's analytic bias
correction, Nagel et al. 2019) removes the mean shift ``dW . E[input]`` the rounding causes, with ``E[input]`` in
closed form from the BN(+ReLU) feeding the layer (through a max pool its input mean is used, a lower bound), into
the layer's bias or the running mean of the BN right after it. The white-input model has no input mean, so
without this the mean shift, the largest quantisation error behind a ReLU, is not compensated at all.

Derivation, measured accuracy and where this departs from the paper: ``docs/udfc.md``.

Stats: per group ``status`` (compensated / partial / skipped), targets, consumers, ``reasons``; ``skipped`` (group,
label, reason); ``quantized`` params; ``bias_corrected`` layers; ``inexact`` (approximations); and on the program's example inputs (``measure=True``) the max and relative
output change against the dense model with compensation (``max_change``, ``rel_change``) and without it
(``*_without``: same selection, same quantisation, no compensation).
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from fxprune.errors import InputError
from fxprune.masking import apply_channel_masks, apply_weight_masks, param_keep
from fxprune.pass_manager import Pass, PassContext, PassResult, register_pass
from fxprune.program import Program, Stage
from fxprune.records import Record

from .bn_absorb import _AVG_POOLS, _BN, _CONV, _IDENTITY, _following_bn, _val

_RELU = ("aten.relu.default", "aten.relu_.default")
_MAX_POOLS = ("aten.max_pool1d.default", "aten.max_pool2d.default", "aten.max_pool3d.default",
              "aten.max_pool2d_with_indices.default", "aten.adaptive_max_pool2d.default",
              "aten.adaptive_max_pool1d.default")
_LINEAR_POOLS = _AVG_POOLS + ("aten.adaptive_avg_pool1d.default", "aten.adaptive_avg_pool2d.default",
                              "aten.adaptive_avg_pool3d.default", "aten._adaptive_avg_pool2d.default",
                              "aten.upsample_nearest1d.default", "aten.upsample_nearest2d.default",
                              "aten.upsample_nearest2d.vec", "aten.upsample_nearest3d.default",
                              "aten.upsample_nearest3d.vec", "aten.upsample_bilinear2d.default",
                              "aten.upsample_bilinear2d.vec")
_RESHAPE = ("aten.view.default", "aten.reshape.default", "aten.flatten.using_ints", "aten._unsafe_view.default")
_MEAN = ("aten.mean.dim",)
_ADD = ("aten.add.Tensor", "aten.add_.Tensor")
_SQRT2 = math.sqrt(2.0)
_GL_X, _GL_W = (torch.tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(20))


# ============================================================================================ Gaussian moments
def _Phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.special.erfc(-x / _SQRT2)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def bvn_upper(h: torch.Tensor, k: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``P(U > h, V > k)`` for a standard bivariate normal with correlation ``r`` (elementwise, float64).

    Genz's algorithm (Drezner-Wesolowsky for ``|r| < 0.925``, Genz's expansion near ``|r| = 1``) with 20-point
    Gauss-Legendre; ``|r| = 1`` exactly is handled in closed form. Absolute error ~1e-10 (checked against
    quadrature in the tests)."""
    h, k, r = torch.broadcast_tensors(h.double(), k.double(), r.double())
    out = torch.empty_like(h)
    low = r.abs() < 0.925
    if bool(low.any()):
        hl, kl, rl = h[low], k[low], r[low]
        hk, hs = (hl * kl)[..., None], ((hl * hl + kl * kl) / 2)[..., None]
        asr = (torch.asin(rl) / 2)[..., None]
        sn = torch.sin(asr * (1 + _GL_X))
        s = (_GL_W * torch.exp((sn * hk - hs) / (1 - sn * sn))).sum(-1)
        out[low] = s * asr[..., 0] / (2 * math.pi) + _Phi(-hl) * _Phi(-kl)
    hi = ~low
    if bool(hi.any()):
        hh, kk, rr = h[hi], k[hi], r[hi]
        neg = rr < 0
        kk = torch.where(neg, -kk, kk)
        hk = hh * kk
        bvn = torch.zeros_like(hh)
        inner = rr.abs() < 1
        if bool(inner.any()):
            hi_, ki_, ri_, hki = hh[inner], kk[inner], rr[inner], hk[inner]
            as_ = (1 - ri_) * (1 + ri_)
            a = torch.sqrt(as_)
            bs = (hi_ - ki_) ** 2
            c = (4 - hki) / 8
            d = (12 - hki) / 16
            acc = a * torch.exp(-(bs / as_ + hki) / 2) * (1 - c * (bs - as_) * (1 - d * bs / 5) / 3
                                                          + c * d * as_ * as_ / 5)
            b = torch.sqrt(bs)
            tail = torch.exp(-hki / 2) * math.sqrt(2 * math.pi) * _Phi(-b / a) * b * (1 - c * bs * (1 - d * bs / 5) / 3)
            acc = acc - torch.where(hki > -160, tail, torch.zeros_like(tail))
            a2 = (a / 2)[..., None]
            xs = (a2 * (_GL_X + 1)) ** 2
            rs = torch.sqrt(1 - xs)
            bsx, hkx, cx, dx = bs[..., None], hki[..., None], c[..., None], d[..., None]
            term = (torch.exp(-bsx / (2 * xs) - hkx / (1 + rs)) / rs
                    - torch.exp(-(bsx / xs + hkx) / 2) * (1 + cx * xs * (1 + dx * xs)))
            acc = acc + (a2 * _GL_W * term).sum(-1)
            bvn[inner] = -acc / (2 * math.pi)
        out[hi] = torch.where(neg, torch.where(kk > hh, -bvn + _Phi(kk) - _Phi(hh), -bvn),
                              bvn + _Phi(-torch.maximum(hh, kk)))
    return out.clamp(0.0, 1.0)


def _q_ratio(num: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``Q(num / r)`` = P(N > num / r), with the limits at ``r = 0`` (0.5 where num = 0 too)."""
    safe = torch.where(r > 0, r, torch.ones_like(r))
    lim = torch.where(num > 0, 0.0, torch.where(num < 0, 1.0, 0.5)).to(num.dtype)
    return torch.where(r > 0, _Phi(-num / safe), lim)


def relu_cross_moment(mx: torch.Tensor, my: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor,
                      rho: torch.Tensor) -> torch.Tensor:
    """``E[max(X,0) max(Y,0)]`` for jointly normal X ~ N(mx, sx^2), Y ~ N(my, sy^2) with correlation ``rho``
    (elementwise; sx, sy > 0). Truncated bivariate normal moments (Rosenbaum 1961) with U, V standardised,
    h = -mx/sx, k = -my/sy, r = sqrt(1 - rho^2), P = P(U > h, V > k):
    E[U; U>h, V>k] = phi(h) Q((k - rho h)/r) + rho phi(k) Q((h - rho k)/r) (and symmetrically for V),
    E[UV; ...] = rho P + rho h phi(h) Q((k - rho h)/r) + rho k phi(k) Q((h - rho k)/r) + r phi(h) phi((k - rho h)/r),
    E = mx my P + mx sy E[V; .] + my sx E[U; .] + sx sy E[UV; .]."""
    h, k = -mx / sx, -my / sy
    rho = rho.clamp(-1.0, 1.0)
    r = torch.sqrt((1 - rho * rho).clamp_min(0.0))
    P = bvn_upper(h, k, rho)
    qk, qh = _q_ratio(k - rho * h, r), _q_ratio(h - rho * k, r)
    eu = _phi(h) * qk + rho * _phi(k) * qh
    ev = _phi(k) * qh + rho * _phi(h) * qk
    safe = torch.where(r > 0, r, torch.ones_like(r))
    last = torch.where(r > 0, r * _phi(h) * _phi((k - rho * h) / safe), torch.zeros_like(r))
    euv = rho * P + rho * h * _phi(h) * qk + rho * k * _phi(k) * qh + last
    return mx * my * P + mx * sy * ev + my * sx * eu + sx * sy * euv


def act_means(mu: torch.Tensor, sd: torch.Tensor, act: str) -> torch.Tensor:
    """``E[f(y)]`` for y ~ N(mu, sd^2), f = ReLU (rectified-Gaussian mean) or identity."""
    mu, sd = mu.double(), sd.double()
    if act == "identity":
        return mu
    safe = torch.where(sd > 0, sd, torch.ones_like(sd))
    return torch.where(sd > 0, mu * _Phi(mu / safe) + sd * _phi(mu / safe), mu.clamp_min(0.0))


def _pair_moments(ma: torch.Tensor, sa: torch.Tensor, mb: torch.Tensor, sb: torch.Tensor, cov: torch.Tensor,
                  act: str) -> torch.Tensor:
    """Elementwise ``E[f(y_a) f(y_b)]`` for jointly normal pairs (means, sds, covariances); a zero sd is a
    constant channel: ``E[f(c) f(Y)] = f(c) E[f(Y)]``."""
    if act == "identity":
        return cov + ma * mb
    ok = (sa > 0) & (sb > 0)
    one = torch.ones_like(sa)
    ssa, ssb = torch.where(ok, sa, one), torch.where(ok, sb, one)
    rho = torch.where(ok, cov / (ssa * ssb), torch.zeros_like(cov)).clamp(-1.0, 1.0)
    rho = torch.where(rho.abs() > 1 - 1e-12, rho.sign(), rho)
    zero = torch.zeros_like(ma)
    val = relu_cross_moment(torch.where(ok, ma, zero), torch.where(ok, mb, zero), ssa, ssb, rho)
    fa = torch.where(sa > 0, act_means(ma, sa, act), ma.clamp_min(0.0))
    fb = torch.where(sb > 0, act_means(mb, sb, act), mb.clamp_min(0.0))
    return torch.where(ok, val, fa * fb)


def act_moments(mu_a: torch.Tensor, G_a: torch.Tensor, mu_b: torch.Tensor, G_b: torch.Tensor, act: str, *,
                copy: bool = False, chunk: int = 128) -> torch.Tensor:
    """``E[f(y_a) f(y_b)^T]`` for ``y = G v + mu``, ``v ~ N(0, I)`` (rows of G: loadings), f = ReLU or identity.

    ``copy=True`` is the paper's scaled-copy assumption: every pair is perfectly correlated (rho = 1) with the
    standard deviations ``||g||``. A zero loading is a constant channel ``f(mu)``."""
    mu_a, G_a, mu_b, G_b = mu_a.double(), G_a.double(), mu_b.double(), G_b.double()
    sa, sb = G_a.norm(dim=1), G_b.norm(dim=1)
    cov = sa[:, None] * sb[None, :] if copy else G_a @ G_b.T
    out = torch.empty(len(mu_a), len(mu_b), dtype=torch.float64)
    for i0 in range(0, len(mu_a), chunk):
        sl = slice(i0, i0 + chunk)
        shape = (len(mu_a[sl]), len(mu_b))
        out[sl] = _pair_moments(mu_a[sl, None].expand(shape), sa[sl, None].expand(shape),
                                mu_b[None, :].expand(shape), sb[None, :].expand(shape), cov[sl], act)
    return out


def paired_moments(mu_a: torch.Tensor, G_a: torch.Tensor, mu_b: torch.Tensor, G_b: torch.Tensor,
                   act: str) -> torch.Tensor:
    """``E[f(y_a,i) f(y_b,i)]`` for the paired rows i (the diagonal of :func:`act_moments`)."""
    mu_a, G_a, mu_b, G_b = mu_a.double(), G_a.double(), mu_b.double(), G_b.double()
    return _pair_moments(mu_a, G_a.norm(dim=1), mu_b, G_b.norm(dim=1), (G_a * G_b).sum(1), act)


# ============================================================================================ quantisation
def quantize_weight(w: torch.Tensor, bits: int, col_keep: np.ndarray | None = None) -> torch.Tensor:
    """Symmetric per-output-channel (dim 0) uniform quantisation to ``bits`` (levels -(2^(b-1)-1)..2^(b-1)-1).
    The scale of each output channel is max |w| over the input columns (dim 1) in ``col_keep`` (the columns that
    stay after shrinking); removed columns are rounded with the same scale (and clamped)."""
    qmax = 2 ** (bits - 1) - 1
    wd = w.detach().double()
    ref = wd if col_keep is None else wd.index_select(1, torch.from_numpy(np.nonzero(col_keep)[0]))
    amax = ref.abs().reshape(ref.shape[0], -1).amax(dim=1) if ref.numel() else torch.zeros(w.shape[0], dtype=wd.dtype)
    scale = (amax / qmax).clamp_min(1e-30).reshape(-1, *([1] * (w.dim() - 1)))
    q = torch.round(wd / scale).clamp(-qmax, qmax) * scale
    q = torch.where(amax.reshape(scale.shape) > 0, q, torch.zeros_like(q))
    return q.to(w.dtype)


# ============================================================================================ graph helpers
@dataclass
class _Source:
    """Where a consumer's input channels come from: a BN node (``kind="bn"``) or, without BN, the producing
    conv/linear node (``kind="linear"``); the activation in between; whether a max pool lies in between."""

    kind: str
    node: fx.Node
    act: str
    maxpool: bool = False


@dataclass
class _Consumer:
    node: fx.Node
    weight: str  # canonical parameter name
    kind: str  # "conv" | "linear"
    bias: str | None  # canonical bias parameter name, or the running-mean buffer of a following BN (sign -1)
    bias_sign: float
    padded: bool
    maxpool: bool


def _getattr_name(n: Any) -> str | None:
    return n.target if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _conv_info(node: fx.Node) -> tuple[bool, int, Any]:
    """(transposed, groups, padding) of a conv node."""
    t = str(node.target)
    if t == "aten.convolution.default":
        return bool(node.args[6]), int(node.args[8]), node.args[4]
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    padding = node.args[4] if len(node.args) > 4 else node.kwargs.get("padding", 0)
    return False, int(groups), padding


def _is_linear_op(node: Any) -> bool:
    """A conv (any groups, not transposed) or linear node with a parameter weight."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return False
    t = str(node.target)
    if t not in _CONV and t != "aten.linear.default":
        return False
    if _getattr_name(node.args[1]) is None:
        return False
    return t == "aten.linear.default" or not _conv_info(node)[0]


def _bn_training(node: fx.Node) -> bool:
    t = str(node.target)
    if t == "aten.batch_norm.default":
        return bool(node.args[5]) if len(node.args) > 5 else bool(node.kwargs.get("training", False))
    return t != "aten._native_batch_norm_legit_no_training.default"


def _trace_back(x: Any) -> tuple[list[_Source], list[str]]:
    """Follow a consumer's input back to its BN (or BN-free conv/linear) sources through ops that commute with a
    per-channel linear recombination. Returns (sources, reasons for the channels that could not be traced)."""
    sources: list[_Source] = []
    reasons: list[str] = []

    def walk(n: Any, act: str | None, averaged: bool, maxpool: bool) -> None:
        if not isinstance(n, fx.Node):
            reasons.append(f"input {n!r} is not a graph value")
            return
        if n.op != "call_function":
            reasons.append(f"{n.name} ({n.op}) reaches the consumer directly: no BN or producer to model")
            return
        t = str(n.target)
        if n.target is operator.getitem:
            src = n.args[0]
            if isinstance(src, fx.Node) and str(src.target) in _BN + _MAX_POOLS and n.args[1] == 0:
                return walk(src, act, averaged, maxpool)
            reasons.append(f"{n.name}: getitem of {getattr(src, 'name', src)}")
            return
        if t in _BN:
            if _bn_training(n):
                reasons.append(f"{n.name}: BatchNorm in training mode (batch statistics)")
                return
            sources.append(_Source("bn", n, act or "identity", maxpool))
            return
        if _is_linear_op(n):
            sources.append(_Source("linear", n, act or "identity", maxpool))
            return
        if t in _RELU:
            return walk(n.args[0], "relu", averaged, maxpool)
        if t in _IDENTITY or t in _RESHAPE:
            return walk(n.args[0], act, averaged, maxpool)
        if t in _LINEAR_POOLS or t in _MEAN:
            if act == "relu":  # walking backwards: the ReLU comes after this average in the forward pass
                reasons.append(f"{n.name}: a ReLU follows this average (the average of a BN output is not modelled)")
                return
            return walk(n.args[0], act, True, maxpool)
        if t in _MAX_POOLS:
            return walk(n.args[0], act, averaged, True)
        if t in ("aten.cat.default", "aten.concat.default"):
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            v = _val(n)
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and dim % v.dim() == 1:
                for a in n.args[0]:
                    walk(a, act, averaged, maxpool)
                return
            reasons.append(f"{n.name}: concat along dim {dim}, not channels")
            return
        what = "a sum before the activation (residual add)" if t in _ADD else "an op the closed form does not cover"
        reasons.append(f"{n.name} ({t}) lies between the BN and the consumer: {what}; the closed form needs "
                       "BatchNorm followed by ReLU or identity")

    walk(x, None, False, False)
    return sources, reasons


def _linear_terms(n: Any) -> list[fx.Node] | None:
    """The conv/linear nodes whose sum is ``n`` (a single producer, or a residual add of producers, with parameter
    biases and constants ignored); None if another value takes part."""
    if _is_linear_op(n):
        return [n]
    if isinstance(n, fx.Node) and n.op == "call_function" and str(n.target) in _ADD:
        alpha = n.kwargs.get("alpha", 1)
        if alpha != 1:
            return None
        out: list[fx.Node] = []
        for a in n.args[:2]:
            if not isinstance(a, fx.Node) or a.op == "get_attr":
                continue
            sub = _linear_terms(a)
            if sub is None:
                return None
            out += sub
        return out or None
    return None


def _input_means(n: Any, param: Any) -> tuple[torch.Tensor | None, bool]:
    """Closed-form per-channel (dim 1) means of the value ``n`` where it is BN(+ReLU) output seen through the
    pass-through ops of :func:`_trace_back`: (means, approximate). ``approximate``: a max pool lies in between
    (its output mean is taken as its input mean, a lower bound). None where a channel is not modelled."""
    def walk(n: Any) -> tuple[str, Any, bool] | None:
        if not (isinstance(n, fx.Node) and n.op == "call_function"):
            return None
        t = str(n.target)
        if n.target is operator.getitem:
            src = n.args[0]
            if isinstance(src, fx.Node) and str(src.target) in _BN + _MAX_POOLS and n.args[1] == 0:
                return walk(src)
            return None
        if t in _BN:
            if _bn_training(n):
                return None
            v = _val(n)
            v = v[0] if isinstance(v, (tuple, list)) and v else v
            C = int(v.shape[1]) if isinstance(v, torch.Tensor) and v.dim() >= 2 else None
            if C is None:
                return None
            wn, bn_ = _getattr_name(n.args[1]), _getattr_name(n.args[2])
            gamma = param(wn).detach().double().reshape(-1) if wn else torch.ones(C, dtype=torch.float64)
            beta = param(bn_).detach().double().reshape(-1) if bn_ else torch.zeros(C, dtype=torch.float64)
            return "gauss", (beta, gamma.abs()), False
        if t in _RELU:
            r = walk(n.args[0])
            if r is None or r[0] != "gauss":
                return None
            return "mean", act_means(*r[1], "relu"), r[2]
        if t in _IDENTITY:
            return walk(n.args[0])
        if t in _LINEAR_POOLS or t in _MEAN or t in _MAX_POOLS:
            r = walk(n.args[0])
            if r is None:
                return None
            m = r[1][0] if r[0] == "gauss" else r[1]
            return "mean", m, r[2] or t in _MAX_POOLS
        if t in _RESHAPE:
            r = walk(n.args[0])
            vi, vo = _val(n.args[0]), _val(n)
            if r is None or not (isinstance(vi, torch.Tensor) and isinstance(vo, torch.Tensor)):
                return None
            m = r[1][0] if r[0] == "gauss" else r[1]
            if vi.dim() >= 2 and vo.dim() == 2 and vi.shape[0] == vo.shape[0]:  # flatten (N, C, ...) -> (N, C*...)
                return "mean", m.repeat_interleave(int(np.prod([int(s) for s in vi.shape[2:]]))), r[2]
            if vi.dim() >= 2 and vo.dim() >= 2 and vi.shape[:2] == vo.shape[:2]:
                return r
            return None
        if t in ("aten.cat.default", "aten.concat.default"):
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            v = _val(n)
            if not (isinstance(v, torch.Tensor) and v.dim() >= 2 and dim % v.dim() == 1):
                return None
            parts = [walk(a) for a in n.args[0]]
            if any(p is None for p in parts):
                return None
            ms = [p[1][0] if p[0] == "gauss" else p[1] for p in parts]
            return "mean", torch.cat(ms), any(p[2] for p in parts)
        return None

    r = walk(n)
    if r is None:
        return None, False
    return (r[1][0] if r[0] == "gauss" else r[1]), r[2]


def _users_beyond(node: fx.Node, consumers: set[fx.Node]) -> list[str]:
    """Uses of ``node``'s channels (through pass-through ops) that are not compensated consumers."""
    out: list[str] = []
    seen: set[fx.Node] = set()
    stack = [node]
    passthrough = _RELU + _IDENTITY + _RESHAPE + _LINEAR_POOLS + _MEAN + _MAX_POOLS + ("aten.cat.default",)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u in consumers:
                continue
            t = str(u.target)
            if u.target is operator.getitem or t in passthrough:
                stack.append(u)
            elif u.op == "output":
                out.append("graph output")
            else:
                out.append(f"{u.name} ({t})")
    return sorted(set(out))


# ============================================================================================ record
@dataclass(frozen=True)
class UDFCRecord(Record):
    """What UDFCompensate did: bits (None: no quantisation), mode, per group id the number of channels it
    reconstructed (targets), the groups it skipped with the reason, and the quantised parameters."""

    bits: int | None
    mode: str
    compensated: Mapping[int, int] = field(default_factory=dict)
    skipped: Mapping[int, str] = field(default_factory=dict)
    quantized: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "compensated", MappingProxyType(dict(self.compensated)))
        object.__setattr__(self, "skipped", MappingProxyType(dict(self.skipped)))
        object.__setattr__(self, "quantized", tuple(self.quantized))


# ============================================================================================ the pass
@register_pass
class UDFCompensate(Pass):
    """Data-free compensation of removed channels (and, with ``bits``, of weight quantisation) by the kept channels
    of their group, folded into the consumers' input columns (see the module docstring for the model).

    ``bits``: None (no quantisation) or 2..16 (symmetric per-output-channel weights, every conv/linear).
    ``mode``: ``"lstsq"`` (all kept channels, moment-weighted least squares), ``"single"`` (the paper's single
    most-similar-channel merge) or ``"none"`` (quantise only: the uncompensated baseline).
    ``intercept``: also fit a constant per target, folded into the consumer's bias (lstsq only).
    ``ridge``: Tikhonov term, relative to the mean diagonal of the basis moments.
    ``no_bn``: ``"skip"`` BN-free sites, or ``"merge"`` them with the weight-space single merge (Neuron Merging).
    ``bias_correction``: with ``bits``, remove each quantised layer's output mean shift (closed-form input means).
    ``measure``: output change against the dense model on the example inputs, with and without compensation.
    """

    name = "udfc"
    requires = frozenset({"groups"})
    accepts = frozenset({Stage.SELECTED, Stage.TRACED})  # TRACED: quantisation (and its compensation) only
    modifies_weights = True

    def __init__(self, bits: int | None = None, mode: str = "lstsq", *, intercept: bool = True,
                 ridge: float = 1e-6, no_bn: str = "skip", bias_correction: bool = True, measure: bool = True):
        if bits is not None and not (isinstance(bits, int) and 2 <= bits <= 16):
            raise InputError(f"bits must be None or an int in 2..16, got {bits!r}", fix="e.g. bits=6")
        if mode not in ("lstsq", "single", "none"):
            raise InputError(f"mode must be 'lstsq', 'single' or 'none', got {mode!r}",
                             fix="'lstsq' reconstructs from all kept channels; 'single' is the paper's merge")
        if no_bn not in ("skip", "merge"):
            raise InputError(f"no_bn must be 'skip' or 'merge', got {no_bn!r}",
                             fix="'merge' applies the weight-space single merge where there is no BatchNorm")
        if not (isinstance(ridge, (int, float)) and ridge >= 0):
            raise InputError(f"ridge must be >= 0, got {ridge!r}", fix="e.g. ridge=1e-6")
        self.bits = bits
        self.mode = mode
        self.intercept = bool(intercept)
        self.ridge = float(ridge)
        self.no_bn = no_bn
        self.bias_correction = bool(bias_correction)
        self.measure = bool(measure)

    # ------------------------------------------------------------------ run
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gs = program.groups
        leaf_keep = program.leaf_keep()
        dense = copy.deepcopy(program.gm) if self.measure else None
        work = _Work(self, program.gm, gs, program.masks, param_keep(gs, leaf_keep))
        work.run(self.mode)
        stats = work.stats()
        if self.measure and dense is not None:
            base = _Work(self, copy.deepcopy(dense), gs, program.masks, work.keep)
            base.run("none")
            stats.update(_measure(program, dense, work.gm, base.gm, gs, leaf_keep))
        record = UDFCRecord(self.bits, self.mode, {g: s["targets"] for g, s in work.groups.items()
                                                   if s["status"] != "skipped"},
                            {g: "; ".join(s["reasons"]) for g, s in work.groups.items() if s["status"] == "skipped"},
                            tuple(work.quantized))
        changed = bool(work.quantized) or any(s["status"] != "skipped" for s in work.groups.values())
        return PassResult(program, changed=changed, stats=stats, record=record)


class _Work:
    """One application of the pass to a module (the pass runs it twice when measuring: with and without
    compensation)."""

    def __init__(self, p: UDFCompensate, gm: fx.GraphModule, gs: Any, masks: dict[int, np.ndarray],
                 keep: dict[str, list[np.ndarray | None]]):
        self.p, self.gm, self.gs, self.masks, self.keep = p, gm, gs, masks, keep
        self.alias = gs.analysis.param_alias
        self.quantized: list[str] = []
        self.corrected: list[str] = []  # layers whose quantisation mean shift was corrected
        self.mode = "none"
        self.originals: dict[str, torch.Tensor] = {}  # weights before quantisation (the model's original channels)
        self.groups: dict[int, dict[str, Any]] = {}
        self.approximate: list[str] = []
        self.notes: list[str] = []
        # group membership: (canonical param, dim) -> [(group, coords)]
        self.members: dict[tuple[str, int], list[tuple[Any, np.ndarray]]] = {}
        for g in gs:
            for m in g.members:
                self.members.setdefault((m.param, m.dim), []).append((g, m.coords))
        self.uses: dict[str, int] = {}
        for n in gm.graph.nodes:
            if _is_linear_op(n):
                w = self._canon(n.args[1].target)
                self.uses[w] = self.uses.get(w, 0) + 1

    # ------------------------------------------------------------------ small helpers
    def _canon(self, name: str) -> str:
        return self.alias.get(name, name)

    def param(self, name: str) -> torch.Tensor:
        obj: Any = self.gm
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def _col_keep(self, wname: str) -> np.ndarray | None:
        k = self.keep.get(self._canon(wname), [])
        return k[1] if len(k) > 1 else None

    def _group_info(self, g: Any) -> dict[str, Any]:
        if g.id not in self.groups:
            mask = self.masks.get(g.id)
            removed = 0 if mask is None else int((~mask).sum())
            self.groups[g.id] = {"label": g.label, "size": g.size, "removed": removed, "targets": 0,
                                 "consumers": [], "reasons": [], "approximate": [], "also_reaches": [],
                                 "status": "skipped", "model": []}
        return self.groups[g.id]

    def _needs_work(self, g: Any) -> bool:
        mask = self.masks.get(g.id)
        return self.p.bits is not None or (mask is not None and not mask.all())

    def _quantize(self, node: fx.Node) -> None:
        wname = self._canon(node.args[1].target)
        if self.p.bits is None or wname in self.quantized:
            return
        w = self.param(wname)
        self.originals[wname] = w.detach().clone()
        ck = self._col_keep(wname)
        q = quantize_weight(w, self.p.bits, ck)
        if self.p.bias_correction and self.mode != "none":
            self._bias_correct(node, w, q, ck)
        with torch.no_grad():
            w.copy_(q)
        self.quantized.append(wname)

    def _bias_correct(self, node: fx.Node, w: torch.Tensor, q: torch.Tensor, ck: np.ndarray | None) -> None:
        """DFQ's analytic bias correction: the quantisation error shifts each output's mean by dW . E[input];
        E[input] in closed form from the BN(+ReLU) feeding this layer; the shift goes into the bias or the running
        mean of the BatchNorm right after."""
        m, approx = _input_means(node.args[0], self.param)
        t = str(node.target)
        groups = 1 if t == "aten.linear.default" else _conv_info(node)[1]
        if m is None or groups != 1 or m.numel() != w.shape[1]:
            return
        if ck is not None:
            m = m * torch.from_numpy(ck.astype(np.float64))
        dW = (q.double() - w.detach().double())
        delta = (dW.reshape(w.shape[0], w.shape[1], -1).sum(-1) * m[None, :]).sum(1)
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        target, sign = _getattr_name(b), -1.0
        if target is None:
            bn = _following_bn(node)
            if bn is None:
                self.notes.append(f"{node.name}: no bias or BatchNorm to take the bias correction")
                return
            target, sign = bn.args[3].target, 1.0
        with torch.no_grad():
            p = self.param(self._canon(target))
            p.add_((sign * delta).to(p.dtype).reshape(p.shape))
        self.corrected.append(node.name + (" (approximate: max pool)" if approx else ""))

    # ------------------------------------------------------------------ consumers
    def _consumer(self, node: fx.Node, src: _Source) -> _Consumer | str:
        t = str(node.target)
        w = self._canon(node.args[1].target)
        padded = False
        if t == "aten.linear.default":
            vx = _val(node.args[0])
            if not isinstance(vx, torch.Tensor) or vx.dim() != 2:
                return "linear on a non-2D input"
        else:
            transposed, groups, padding = _conv_info(node)
            if transposed or groups != 1:
                return "grouped or transposed conv: its input channels cannot be recombined"
            kernel = [int(s) for s in self.param(w).shape[2:]]
            if isinstance(padding, str):
                padded = padding == "same" and any(k > 1 for k in kernel)
            else:
                pads = padding if isinstance(padding, (list, tuple)) else [padding]
                padded = any(int(p) > 0 for p in pads) and any(k > 1 for k in kernel)
        if self.uses.get(w, 0) > 1:
            return "its weight is used by several nodes"
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias, sign = _getattr_name(b), 1.0
        if bias is None:
            bn = _following_bn(node)
            if bn is not None:
                bias, sign = bn.args[3].target, -1.0
        return _Consumer(node, w, "linear" if t == "aten.linear.default" else "conv",
                         None if bias is None else self._canon(bias), sign, padded, src.maxpool)

    # ------------------------------------------------------------------ main loop
    def run(self, mode: str) -> None:
        self.mode = mode
        if self.p.bits is not None and self.p.bits <= 2 and mode != "none":
            self.notes.append("bits <= 2: the white-input model overestimates the rounding noise and its shrinkage "
                              "compounds over layers (measured: compensation worse than none at 2 bits, "
                              "docs/udfc.md)")
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        sites: dict[tuple[fx.Node, str], list[_Consumer]] = {}
        cons_nodes: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            if not _is_linear_op(node):
                continue
            w = self._canon(node.args[1].target)
            groups = [g for g, _ in self.members.get((w, 1), []) if self._needs_work(g)]
            if not groups:
                continue
            sources, reasons = _trace_back(node.args[0])
            for g in groups:
                info = self._group_info(g)
                info["consumers"].append(node.name)
                info["reasons"] += [f"{node.name}: {r}" for r in reasons]
            for src in sources:
                if src.kind == "linear" and self.p.no_bn == "skip":
                    for g in groups:
                        self._group_info(g)["reasons"].append(
                            f"{node.name}: no BatchNorm after {src.node.name}: the closed form needs BN statistics "
                            "(no_bn='merge' applies the weight-space single merge)")
                    continue
                c = self._consumer(node, src)
                if isinstance(c, str):
                    for g in groups:
                        self._group_info(g)["reasons"].append(f"{node.name}: {c}")
                    continue
                sites.setdefault((src.node, src.act), []).append(c)
                cons_nodes.add(node)
        for (snode, act), consumers in sorted(sites.items(), key=lambda kv: order[kv[0][0]]):
            self._site(snode, act, consumers, mode, cons_nodes)
        for node in self.gm.graph.nodes:  # every weight not quantised at its site
            if _is_linear_op(node):
                self._quantize(node)
        for info in self.groups.values():
            if info["targets"] == 0:
                info["status"] = "skipped"
                if not info["reasons"]:
                    info["reasons"].append("nothing to compensate at any consumer")
            elif info["reasons"] or info["also_reaches"]:
                info["status"] = "partial"
            else:
                info["status"] = "compensated"

    # ------------------------------------------------------------------ one site
    def _site(self, snode: fx.Node, act: str, consumers: list[_Consumer], mode: str, cons_nodes: set) -> None:
        bn = snode if str(snode.target) in _BN else None
        producers = _linear_terms(bn.args[0]) if bn is not None else [snode]
        if producers is not None:
            for p in producers:
                self._quantize(p)
        # channel -> group mapping from the BN (or the BN-free producer's) parameters
        if bn is not None:
            names = [_getattr_name(a) for a in bn.args[1:5]]
        else:
            names = [_getattr_name(snode.args[1])]
        owners: list[tuple[Any, np.ndarray]] = []
        for nm in names:
            if nm is not None and (self._canon(nm), 0) in self.members:
                owners = self.members[(self._canon(nm), 0)]
                break
        v = _val(snode)
        v = v[0] if isinstance(v, (tuple, list)) and v else v  # _native_batch_norm_legit_* return tuples
        nchan = v.shape[1] if isinstance(v, torch.Tensor) and v.dim() >= 2 else None
        if not owners or nchan is None:
            for c in consumers:
                for g, _ in self.members.get((c.weight, 1), []):
                    if self._needs_work(g):
                        self._group_info(g)["reasons"].append(
                            f"{c.node.name}: the channels of {snode.name} are not indexed by any group parameter")
            return
        gamma, beta, G, Ghat, model = self._variables(bn, producers, snode, int(nchan))
        self.site = snode
        for g, coords in owners:
            if not self._needs_work(g):
                continue
            info = self._group_info(g)
            cons = [c for c in consumers if any(gg.id == g.id for gg, _ in self.members.get((c.weight, 1), []))]
            if not cons:
                continue
            info["model"].append(f"{snode.name}: {model}")
            reach = _users_beyond(snode, cons_nodes)
            info["also_reaches"] += [r for r in reach if r not in info["also_reaches"]]
            chans = np.nonzero(coords >= 0)[0]  # BN channel indices of this group
            gch = coords[chans]  # their group channel ids
            mask = self.masks.get(g.id)
            kept = np.ones(len(chans), bool) if mask is None else mask[gch]
            quantised = producers is not None and self.p.bits is not None
            target = ~kept if not quantised else np.ones(len(chans), bool)
            if mode == "none" or not target.any() or not kept.any():
                continue
            if bn is None and self.p.no_bn == "merge":
                C, c0 = self._merge_weights(producers[0], chans, kept, target, act)
            elif mode == "single":
                if producers is None:
                    info["reasons"].append(f"{snode.name}: single merge needs the producing filters (BN input is "
                                           "not a conv/linear)")
                    continue
                C, c0 = self._single(gamma, beta, G, Ghat, chans, kept, target, act), None
            else:
                # the intercept enters every output position; under zero padding the removed channel is 0 there
                # (and a max pool does not pass a constant's mean through unchanged)
                use_c0 = self.p.intercept and all(c.bias is not None and not c.padded and not c.maxpool for c in cons)
                C, c0 = self._lstsq(beta, G, Ghat, chans, kept, target, act, use_c0)
            for c in cons:
                self._fold(c, g, chans, gch, kept, target, C, c0, info)
            info["targets"] += int(target.sum())

    def _variables(self, bn: fx.Node | None, producers: list[fx.Node] | None, snode: fx.Node,
                   nchan: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
        """gamma, beta and loadings (original, quantised) of the site's channels."""
        if bn is not None:
            wn, bn_ = _getattr_name(bn.args[1]), _getattr_name(bn.args[2])
            gamma = self.param(wn).detach().double().reshape(-1) if wn else torch.ones(nchan, dtype=torch.float64)
            beta = self.param(bn_).detach().double().reshape(-1) if bn_ else torch.zeros(nchan, dtype=torch.float64)
        else:  # BN-free site: only the weight-space merge uses it
            gamma = torch.ones(nchan, dtype=torch.float64)
            beta = torch.zeros(nchan, dtype=torch.float64)
        if producers is None:
            G = torch.diag(gamma)
            return gamma, beta, G, G, "independent channels (the BN input is not a sum of conv/linear outputs)"
        rows, qrows = [], []
        for p in producers:
            w = self.param(self._canon(p.args[1].target))
            r, q = self._rows(p, w)
            rows.append(r)
            qrows.append(q)
        W, Wq = torch.cat(rows, 1), torch.cat(qrows, 1)
        nrm = W.norm(dim=1, keepdim=True)
        safe = torch.where(nrm > 0, nrm, torch.ones_like(nrm))
        G = gamma[:, None] * W / safe
        Gq = gamma[:, None] * Wq / safe
        names = "+".join(p.name for p in producers)
        return gamma, beta, G, Gq, f"white-input model over the filters of {names}"

    def _rows(self, p: fx.Node, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense rows (Cout, Cin * kernel) of a producer (grouped convs block-expanded), with the input columns that
        are removed zeroed, before and after quantisation (the quantised weight is the current one if quantised)."""
        wn = self._canon(p.args[1].target)
        ck = self._col_keep(wn)
        cur = w.detach().double()
        orig = self.originals[wn].double() if wn in self.originals else cur
        groups = 1 if str(p.target) == "aten.linear.default" else _conv_info(p)[1]

        def dense(t: torch.Tensor) -> torch.Tensor:
            if ck is not None and t.dim() >= 2 and t.shape[1] == len(ck):
                t = t * torch.from_numpy(ck.astype(np.float64)).reshape(1, -1, *([1] * (t.dim() - 2)))
            t = t.reshape(t.shape[0], -1)
            if groups == 1:
                return t
            cout, per = t.shape
            out = torch.zeros(cout, per * groups, dtype=t.dtype)
            og = cout // groups
            for q in range(groups):
                out[q * og:(q + 1) * og, q * per:(q + 1) * per] = t[q * og:(q + 1) * og]
            return out

        return dense(orig), dense(cur)

    # ------------------------------------------------------------------ solvers
    def _lstsq(self, beta: torch.Tensor, G: torch.Tensor, Ghat: torch.Tensor, chans: np.ndarray, kept: np.ndarray,
               target: np.ndarray, act: str, use_c0: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """C (targets x kept) and the intercepts c0 (targets) minimising E[(a_t - C a^_B - c0)^2]."""
        iB, iT = torch.from_numpy(chans[kept]), torch.from_numpy(chans[target])
        muB, GB, muT, GT = beta[iB], Ghat[iB], beta[iT], G[iT]
        Mbb = act_moments(muB, GB, muB, GB, act)
        Mtb = act_moments(muT, GT, muB, GB, act)
        nB = Mbb.shape[0]
        lam = self.p.ridge * float(Mbb.diagonal().mean().clamp_min(1e-30))
        A = Mbb + lam * torch.eye(nB, dtype=torch.float64)
        rhs = Mtb.T
        if use_c0:
            mB, mT = act_means(muB, GB.norm(dim=1), act), act_means(muT, GT.norm(dim=1), act)
            A = torch.cat([torch.cat([A, mB[:, None]], 1),
                           torch.cat([mB, torch.ones(1, dtype=torch.float64)])[None, :]], 0)
            rhs = torch.cat([rhs, mT[None, :]], 0)
        try:
            X = torch.linalg.solve(A, rhs)
        except RuntimeError:  # singular even with the ridge (e.g. ridge=0 and duplicate channels)
            X = torch.linalg.pinv(A) @ rhs
        return X[:nB].T, (X[nB] if use_c0 else None)

    def _single(self, gamma: torch.Tensor, beta: torch.Tensor, G: torch.Tensor, Ghat: torch.Tensor,
                chans: np.ndarray, kept: np.ndarray, target: np.ndarray, act: str) -> torch.Tensor:
        """The paper's merge: each removed channel onto its most similar kept filter, each quantised kept channel
        onto itself, with s = E[a_t a^_k] / E[a^_k^2] under the copy assumption (z_t = z_k)."""
        kidx = chans[kept]
        kpos = {int(c): i for i, c in enumerate(kidx)}
        tidx = chans[target]
        Gn = G / G.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos = Gn[torch.from_numpy(tidx)] @ Gn[torch.from_numpy(kidx)].T
        C = torch.zeros(len(tidx), len(kidx), dtype=torch.float64)
        for i, t in enumerate(tidx):
            b = kpos.get(int(t))
            if b is None:
                b = int(torch.argmax(cos[i]))
            k = int(kidx[b])
            num = act_moments(beta[[t]], G[[t]], beta[[k]], Ghat[[k]], act, copy=True)[0, 0]
            den = act_moments(beta[[k]], Ghat[[k]], beta[[k]], Ghat[[k]], act, copy=True)[0, 0]
            C[i, b] = num / den if den > 0 else 0.0
        return C

    def _merge_weights(self, producer: fx.Node, chans: np.ndarray, kept: np.ndarray, target: np.ndarray,
                       act: str) -> tuple[torch.Tensor, None]:
        """Neuron Merging at a BN-free site: weight-space similarity of [w, b] (projection scale)."""
        w = self.param(self._canon(producer.args[1].target))
        U, Uq = self._rows(producer, w)
        bname = _getattr_name(producer.args[2] if len(producer.args) > 2 else producer.kwargs.get("bias"))
        if bname is not None:
            b = self.param(self._canon(bname)).detach().double().reshape(-1, 1)
            U, Uq = torch.cat([U, b], 1), torch.cat([Uq, b], 1)
        kidx, tidx = chans[kept], chans[target]
        kpos = {int(c): i for i, c in enumerate(kidx)}
        Un = U / U.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos = Un[torch.from_numpy(tidx)] @ Un[torch.from_numpy(kidx)].T
        C = torch.zeros(len(tidx), len(kidx), dtype=torch.float64)
        for i, t in enumerate(tidx):
            b = kpos.get(int(t))
            if b is None:
                b = int(torch.argmax(cos[i]))
                if act == "relu" and cos[i, b] <= 0:
                    continue
            k = int(kidx[b])
            den = float(Uq[k] @ Uq[k])
            C[i, b] = float(U[t] @ Uq[k]) / den if den > 0 else 0.0
        return C, None

    # ------------------------------------------------------------------ folding
    def _fold(self, c: _Consumer, g: Any, chans: np.ndarray, gch: np.ndarray, kept: np.ndarray, target: np.ndarray,
              C: torch.Tensor, c0: torch.Tensor | None, info: dict[str, Any]) -> None:
        coords = next(cc for gg, cc in self.members[(c.weight, 1)] if gg.id == g.id)
        pos = [np.nonzero(coords == int(t))[0] for t in gch]
        L = len(pos[0])
        if L == 0 or any(len(p) != L for p in pos):
            info["reasons"].append(f"{c.node.name}: channels own unequal numbers of input columns")
            return
        W = self.param(c.weight)
        P = torch.from_numpy(np.stack(pos))  # (channels, L)
        nch = len(gch)
        Wd = W.detach().double()
        Wsel = Wd.index_select(1, P.reshape(-1)).reshape(W.shape[0], nch, L, *W.shape[2:])
        kidx = np.nonzero(kept)[0]
        Cfull = torch.zeros(nch, len(kidx), dtype=torch.float64)
        Cfull[torch.from_numpy(np.nonzero(target)[0])] = C
        keep_only = kept & ~target
        if keep_only.any():
            rows = np.nonzero(keep_only)[0]
            cols = np.searchsorted(kidx, rows)
            Cfull[torch.from_numpy(rows), torch.from_numpy(cols)] = 1.0
        new = torch.einsum("cb,ocl...->obl...", Cfull, Wsel)
        with torch.no_grad():
            W.index_copy_(1, P[torch.from_numpy(kidx)].reshape(-1),
                          new.reshape(W.shape[0], len(kidx) * L, *W.shape[2:]).to(W.dtype))
            if c0 is not None and c.bias is not None:
                tsum = Wsel[:, torch.from_numpy(np.nonzero(target)[0])].reshape(W.shape[0], int(target.sum()), -1)
                delta = (tsum.sum(-1) * c0).sum(1)
                bias = self.param(c.bias)
                bias.add_((c.bias_sign * delta).to(bias.dtype).reshape(bias.shape))
        big = Cfull.abs() > 1e-9 * max(1.0, float(Cfull.abs().max()))
        if c.maxpool and int(big.sum(0).max()) > 1:
            self._approx(info, f"{c.node.name}: a combination of channels passes a max pool")

    def _approx(self, info: dict[str, Any], note: str) -> None:
        if note not in info["approximate"]:
            info["approximate"].append(note)

    # ------------------------------------------------------------------ report
    def stats(self) -> dict[str, Any]:
        for g in self.gs:
            mask = self.masks.get(g.id)
            if g.id not in self.groups and mask is not None and not mask.all():
                info = self._group_info(g)
                info["reasons"].append("no conv/linear reads these channels through its input columns")
        skipped = [{"group": gid, "label": s["label"], "reason": "; ".join(s["reasons"])}
                   for gid, s in sorted(self.groups.items()) if s["status"] == "skipped"]
        return {"bits": self.p.bits, "mode": self.p.mode,
                "groups": {gid: s for gid, s in sorted(self.groups.items())},
                "compensated": sum(s["status"] == "compensated" for s in self.groups.values()),
                "partial": sum(s["status"] == "partial" for s in self.groups.values()),
                "skipped": skipped, "quantized": list(self.quantized), "bias_corrected": list(self.corrected),
                "notes": list(self.notes),
                "inexact": [a for s in self.groups.values() for a in s["approximate"]]}


@torch.no_grad()
def _measure(program: Program, dense: fx.GraphModule, comp: fx.GraphModule, base: fx.GraphModule, gs: Any,
             leaf_keep: dict) -> dict[str, float]:
    """Output change against the dense model on the example inputs, with (``comp``) and without (``base``)
    compensation, both masked."""
    def masked(gm: fx.GraphModule) -> fx.GraphModule:
        m = copy.deepcopy(gm)
        apply_channel_masks(m, gs, leaf_keep)
        apply_weight_masks(m, program.weight_masks)
        return m

    def flat(out: Any) -> torch.Tensor:
        ts = [o.double().reshape(-1) for o in tree_flatten(out)[0]
              if isinstance(o, torch.Tensor) and o.is_floating_point()]
        return torch.cat(ts) if ts else torch.zeros(0, dtype=torch.float64)

    ref = flat(dense(*program.args, **program.kwargs))
    w = flat(masked(comp)(*program.args, **program.kwargs))
    wo = flat(masked(base)(*program.args, **program.kwargs))
    nrm = float(ref.norm()) or 1.0

    def mx(a: torch.Tensor) -> float:
        return float((a - ref).abs().max()) if ref.numel() else 0.0

    return {"max_change": mx(w), "max_change_without": mx(wo), "rel_change": float((w - ref).norm()) / nrm,
            "rel_change_without": float((wo - ref).norm()) / nrm}
