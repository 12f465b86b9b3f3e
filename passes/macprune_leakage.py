"""Evaluation tools for MACPruning (:class:`fxprune.passes.macprune.MACPruneGate`): accuracy vs ``p`` and a
simulated side-channel attack on the first layer, with the mitigation ratio ``R = traces(gated) / traces(dense)``.

Leakage model (simulated, not measured on hardware). The device computes the first layer one output neuron at a
time (neuron ``o`` of the attacked output channel: for every output position, for every input channel and kernel
tap inside the image, one multiply-accumulate ``x * w`` on 8-bit operands: uint8 pixels, int8 weights
``round(127 w / max|w|)``). Each executed MAC leaks ``HW(x * w)`` (Hamming weight of the 16-bit two's-complement
product) plus Gaussian noise ``N(0, sigma^2)``, one sample per MAC. MACPruning skips the MACs of gated pixels:

* ``timing="compact"`` (MACPruning's design: a skipped MAC takes no time): the executed MACs move forward, so
  the sample at a MAC's dense position holds another MAC (desynchronisation); the tail is idle (noise only).
* ``timing="constant"`` (a branch-free variant: a dummy MAC on a zero operand): the sample stays in place and
  leaks ``HW(0) = 0`` plus noise when skipped.

Attackers (known inputs: the attacker chooses random images by default, as in CPA on DNNs):

* ``"cpa"``: correlation power analysis at the dense positions of the target weight's MACs; for each hypothesis
  ``h`` in [-128, 127] the Pearson correlation ``rho_s(h)`` between ``HW(x_s * h)`` and the sample at position
  ``s``; the score is ``max_s rho_s(h)``.
* ``"window"`` (the attacker reported by the benchmark): a windowed-integration, re-aligning CPA, as an attacker
  facing random skipping would run it. Profiling (on a clone of the device with the same gate, ``profile`` gate
  draws) gives, per target slot ``s``, the compacted position of the target MAC as a linear function of the trace's
  execution length ``N`` (the number of executed MACs, visible as the duration of the computation):
  ``pos_s ~ a_s + b_s N`` (a linear time warp: traces are re-aligned by their duration, so slots near the start
  *and* near the end of the neuron stay nearly aligned), with residual spread ``sd_s``. The attacker integrates
  (sums) each trace over ``a_s + b_s N_i +- (ceil(f * sd_s) + window_min)`` samples for every ``f`` in
  :data:`WINDOW_WIDTHS` up to ``window_k`` (default 0 and 1 sd, nested windows: a rectangular stand-in for the
  matched filter, whose best width depends on the slot; ``window_k=0``: re-alignment only), correlates the sums
  with ``HW(x_s * h)`` and scores ``max`` over slots and widths of ``rho(h)``. Without a gate (or with ``timing="constant"``) the
  window is one sample and the attack is ``"cpa"``. The noise of a window is drawn with its exact variance
  (``sigma^2`` times the window length; the nested windows of one slot share it) independently per slot
  (overlapping windows of different slots share noise on a device; each slot's marginal is exact).
* ``"double_strike"``: Casalino et al. (arXiv 2601.08698, 2026): MACPruning's branch (important / executed /
  skipped) leaves distinct control-flow patterns, so the attacker labels every MAC, re-aligns the traces and
  correlates each target MAC only over the traces where it executed. Simulated by giving the attacker the
  executed pattern (an idealised pattern classifier).

``HW(x * h) == HW(x * 2^k h)`` for every ``x`` (a shift), so hypotheses with identical predictions over all pixel
values are one leakage-equivalence class; the attack succeeds when its best hypothesis is in the true weight's
class (another step, e.g. the sign/magnitude of the next layer, resolves the scale; out of scope here).
``traces_needed`` is the first checkpoint from which the attack succeeds at every later checkpoint; ``R`` is the
ratio of the medians over ``repeats`` independent experiments (different inputs, noise and gate draws).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import InputError
from fxprune.utils import get_tensor, int_list

from .macprune import CONV_OPS, MACPruneGate, MaskedMACConv2d, MaskedMACLinear, PixelGate, gates, reseed, set_p

TIMINGS = ("compact", "constant")
ATTACKERS = ("cpa", "window", "double_strike")
HYPOTHESES = np.arange(-128, 128)
_HW16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.int8)


def hamming_weight16(v: np.ndarray) -> np.ndarray:
    """Hamming weight of the 16-bit two's-complement representation of integer ``v``."""
    return _HW16[np.asarray(v, dtype=np.int64) & 0xFFFF]


def quantize_int8(w: Any) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor int8 quantisation: ``(round(127 w / max|w|), scale)``."""
    a = np.asarray(w.detach().cpu() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
    m = float(np.abs(a).max()) or 1.0
    return np.clip(np.round(a / m * 127.0), -127, 127).astype(np.int64), m / 127.0


def prediction_table(values: np.ndarray | None = None) -> np.ndarray:
    """``T[v, k] = HW16(v * HYPOTHESES[k])`` for pixel values ``v`` (default 0..255), float64."""
    v = np.arange(256) if values is None else np.asarray(values)
    return hamming_weight16(v[:, None] * HYPOTHESES[None, :]).astype(np.float64)


# ----------------------------------------------------------------------------------------------- MAC schedule
@dataclass
class MACSchedule:
    """The first layer's MAC sequence for one output neuron: per MAC, the input element it reads (flat index into
    ``(C, H, W)``), the gate-map index of that element, and the weight (flat index into ``(C, K, K)``)."""

    pixel: np.ndarray
    map_index: np.ndarray
    weight_index: np.ndarray
    n_pixels: int

    def __len__(self) -> int:
        return len(self.pixel)


def conv_schedule(in_shape: tuple[int, int, int], kernel: tuple[int, int], stride: Sequence[int] = (1, 1),
                  padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), pixel_map: bool = True
                  ) -> MACSchedule:
    """Row-major output positions, then input channels, then kernel taps; taps outside the image are not
    executed (zero padding costs nothing)."""
    c, h, w = in_shape
    kh, kw = kernel
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    oi, oj, cc, di, dj = np.meshgrid(np.arange(ho), np.arange(wo), np.arange(c), np.arange(kh), np.arange(kw),
                                     indexing="ij")
    i = oi * stride[0] - padding[0] + di * dilation[0]
    j = oj * stride[1] - padding[1] + dj * dilation[1]
    ok = (i >= 0) & (i < h) & (j >= 0) & (j < w)
    i, j, cc, di, dj = i[ok], j[ok], cc[ok], di[ok], dj[ok]
    pixel = (cc * h + i) * w + j
    map_index = i * w + j if pixel_map else pixel
    return MACSchedule(pixel.ravel(), map_index.ravel(), ((cc * kh + di) * kw + dj).ravel(), c * h * w)


def linear_schedule(n_features: int) -> MACSchedule:
    """One MAC per input feature (a first-layer neuron of an MLP, as attacked by Double Strike)."""
    a = np.arange(n_features)
    return MACSchedule(a, a, a, n_features)


# ----------------------------------------------------------------------------------------------- the attack
@dataclass
class AttackResult:
    traces_needed: int | None  # None: not reached within n_traces
    checkpoints: list[int]
    rank: list[int]  # rank of the true weight's class at each checkpoint (1 = recovered)
    true_weight: int
    recovered: int  # best hypothesis at the last checkpoint
    timing: str
    attacker: str
    p: float | None
    sigma: float
    slots: int
    mean_executed: float  # mean fraction of the neuron's MACs executed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate_attack(weights: Any, schedule: MACSchedule, *, target: int, important: Any = None,
                    p: float | None = None, n_traces: int = 20000, sigma: float = 4.0, timing: str = "compact",
                    attacker: str = "cpa", inputs: Any = "random", seed: int = 0,
                    checkpoints: Sequence[int] | None = None, chunk: int = 1000, ghost_corr: float = 0.99,
                    confirm: int | None = 3, window_k: float = 1.0, window_min: int = 0, profile: int = 256,
                    realign: bool = True) -> AttackResult:
    """Simulate ``n_traces`` traces of one neuron's MAC sequence and run the attack at ``checkpoints``.

    ``weights``: the neuron's int8 weights, flat in ``schedule.weight_index`` order (``(C*K*K,)``) or
    float (quantised here). ``target``: flat index of the attacked weight. ``important`` / ``p``: the gate
    (``p=None``: ungated, the dense baseline). ``inputs``: ``"random"`` (uniform uint8 pixels) or a uint8 array
    ``(N, n_pixels)`` sampled with replacement. ``checkpoints``: trace counts where the attack is scored (default
    20 geometric steps from 10 to ``n_traces``); with ``confirm=k`` the simulation stops once the true class has
    ranked first at ``k`` checkpoints in a row (``None``: run all). ``ghost_corr``: see
    :func:`equivalent_hypotheses`. ``window_k`` / ``window_min`` / ``profile`` / ``realign``: the ``"window"``
    attacker's half-width (in residual standard deviations of the target's position, plus ``window_min`` samples),
    number of profiling gate draws, and whether positions are predicted from the trace's duration (``False``: from
    the start of the trace only).
    """
    if timing not in TIMINGS:
        raise InputError(f"timing must be one of {TIMINGS}, got {timing!r}")
    if attacker not in ATTACKERS:
        raise InputError(f"attacker must be one of {ATTACKERS}, got {attacker!r}")
    if p is not None and not 0.0 <= float(p) <= 1.0:
        raise InputError(f"p must be in [0, 1] or None, got {p!r}")
    if window_k < 0 or window_min < 0 or profile < 2:
        raise InputError("window_k and window_min must be >= 0 and profile >= 2")
    if n_traces < 2 or sigma < 0:
        raise InputError("n_traces must be >= 2 and sigma >= 0")
    w = np.asarray(weights)
    if not np.issubdtype(w.dtype, np.integer):
        w, _ = quantize_int8(w)
    w = w.reshape(-1).astype(np.int64)
    if not 0 <= target < w.size:
        raise InputError(f"target {target} out of range for {w.size} weights")
    if w[target] == 0:
        raise InputError("the target weight quantises to 0: nothing leaks", fix="pick another target")
    rng = np.random.default_rng(seed)
    n_map = int(schedule.map_index.max()) + 1
    imp = np.zeros(n_map, dtype=bool)
    if important is not None:
        imp = np.asarray(important.cpu() if isinstance(important, torch.Tensor) else important, dtype=bool)
        imp = imp.reshape(-1)
        if imp.size != n_map:
            raise InputError(f"important map has {imp.size} entries, the schedule's gate map {n_map}")
    if isinstance(inputs, str):
        if inputs != "random":
            raise InputError(f"inputs must be 'random' or a uint8 array, got {inputs!r}")
        data = None
    else:
        data = np.asarray(inputs).reshape(len(inputs), -1)
        if data.shape[1] != schedule.n_pixels or data.min() < 0 or data.max() > 255:
            raise InputError(f"inputs must be uint8 values of shape (N, {schedule.n_pixels})")
        data = data.astype(np.int64)
    slots = np.nonzero(schedule.weight_index == target)[0]
    if checkpoints is None:
        checkpoints = sorted({int(round(v)) for v in np.geomspace(10, n_traces, 20)})
    checkpoints = [c for c in sorted(set(int(c) for c in checkpoints)) if 2 <= c <= n_traces]
    wm = w[schedule.weight_index]  # weight of each MAC
    table = prediction_table()
    table2 = table * table
    equiv = equivalent_hypotheses(int(w[target]), ghost_corr, table)

    macs_per_map = np.bincount(schedule.map_index, minlength=n_map).astype(np.float64)
    S = len(slots)
    windowed = attacker == "window" and timing == "compact"
    if windowed:
        prof_rng = np.random.default_rng([seed, 0x5EED])  # the attacker's clone device: its own gate draws
        w_center_a, w_center_b, w_half = _profile_positions(schedule, slots, imp, p, profile, prof_rng, realign,
                                                            window_k, window_min)
    K = len(w_half) if windowed else 1  # candidate window widths per slot
    S_all = S * K
    cnt = np.zeros((S_all, 256))
    sum_l_v = np.zeros((S_all, 256))
    n_s = np.zeros(S_all)
    sum_l = np.zeros(S_all)
    sum_l2 = np.zeros(S_all)
    ranks: list[int] = []
    recovered = 0
    executed_total = 0.0
    done = 0
    pending = list(checkpoints)
    while pending:
        stop = pending[0]
        while done < stop:
            n = min(chunk, stop - done)
            x = data[rng.integers(0, len(data), n)] if data is not None else rng.integers(0, 256, (n, schedule.n_pixels))
            if p is None:
                keep = np.ones((n, n_map), dtype=bool)
            else:
                keep = imp[None, :] | (rng.random((n, n_map)) < p)
            v_slot = x[:, schedule.pixel[slots]]  # pixel values the attacker predicts with
            if windowed:
                ex = keep[:, schedule.map_index]  # (n, M): executed MACs
                executed_total += float(ex.mean()) * n
                leak = _window_leak(x, ex, schedule, wm, slots, w_center_a, w_center_b, w_half, sigma, rng)
                use = np.ones((n, S_all), dtype=bool)
                v_slot = np.tile(v_slot, (1, K))
            elif timing == "compact" and attacker == "cpa" and p is not None:
                ex = keep[:, schedule.map_index]  # (n, M): executed MACs
                executed_total += float(ex.mean()) * n
                # the MAC at compacted position s is the one whose running count of executed MACs reaches s + 1
                M = ex.shape[1]
                cums = ex.astype(np.int64)
                np.cumsum(cums, axis=1, out=cums)
                cums += (np.arange(n, dtype=np.int64) * (M + 1))[:, None]
                want = (slots[None, :] + 1) + (np.arange(n) * (M + 1))[:, None]
                idx = np.searchsorted(cums.ravel(), want.ravel()).reshape(n, S) - (np.arange(n) * M)[:, None]
                filled = slots[None, :] < ex.sum(1, keepdims=True)  # beyond the last executed MAC: idle
                idx = np.clip(idx, 0, M - 1)
                rows = np.arange(n)[:, None]
                hw = hamming_weight16(x[rows, schedule.pixel[idx]] * wm[idx]).astype(np.float64)
                leak = hw * filled + rng.normal(0.0, sigma, (n, S))
                use = np.ones((n, S), dtype=bool)
            else:
                ex = keep[:, schedule.map_index[slots]]  # (n, S): did the target MAC execute?
                hw = hamming_weight16(v_slot * w[target]).astype(np.float64)
                leak = hw * ex + rng.normal(0.0, sigma, (n, S))  # in place (constant timing) or re-aligned
                use = ex if attacker == "double_strike" else np.ones_like(ex)
                executed_total += float((keep @ macs_per_map).sum()) / len(schedule)
            # per-slot sufficient statistics, binned by pixel value
            lw = leak * use
            flat = (np.arange(S_all)[None, :] * 256 + v_slot).ravel()
            cnt += np.bincount(flat, weights=use.ravel().astype(np.float64),
                               minlength=S_all * 256).reshape(S_all, 256)
            sum_l_v += np.bincount(flat, weights=lw.ravel(), minlength=S_all * 256).reshape(S_all, 256)
            n_s += use.sum(0)
            sum_l += lw.sum(0)
            sum_l2 += (lw * leak).sum(0)
            done += n
        pending.pop(0)
        score = _scores(cnt, sum_l_v, n_s, sum_l, sum_l2, table, table2)
        best_true = score[equiv].max()
        ranks.append(int(1 + (score[~equiv] >= best_true).sum()))
        recovered = int(HYPOTHESES[int(np.argmax(score))])
        if confirm and len(ranks) >= confirm and all(r == 1 for r in ranks[-confirm:]):
            break  # stable for `confirm` checkpoints in a row: stop early
    checkpoints = checkpoints[:len(ranks)]
    needed = None
    for i in range(len(checkpoints)):
        if all(r == 1 for r in ranks[i:]):
            needed = checkpoints[i]
            break
    return AttackResult(needed, checkpoints, ranks, int(w[target]), recovered, timing, attacker,
                        None if p is None else float(p), float(sigma), S, executed_total / max(done, 1))


WINDOW_WIDTHS = (0.0, 1.0, 2.0)  # the "window" attacker's half-widths, in residual sds of the target's position


def _profile_positions(schedule: MACSchedule, slots: np.ndarray, imp: np.ndarray, p: float | None, n: int,
                       rng: np.random.Generator, realign: bool, k: float, extra: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Profiled position model of the target MAC at each slot: ``pos ~ a + b * N`` (least squares over ``n`` gate
    draws; ``N`` = executed MACs of the trace; ``b = 0`` without ``realign``) and the candidate window
    half-widths ``(K, S)``: ``ceil(f * residual sd) + extra`` for ``f`` in :data:`WINDOW_WIDTHS` up to ``k``
    (nested windows; the attacker keeps the best, as CPA keeps the best sample)."""
    S = len(slots)
    fs = [f for f in WINDOW_WIDTHS if f <= k] or [0.0]
    if p is None:
        return slots.astype(np.float64), np.zeros(S), np.full((1, S), extra, dtype=np.int64)
    keep = imp[None, :] | (rng.random((n, imp.size)) < p)
    ex = keep[:, schedule.map_index]
    before = np.cumsum(ex, axis=1)[:, slots] - ex[:, slots]  # executed MACs before the slot = its position
    pos = before.astype(np.float64)
    N = ex.sum(1).astype(np.float64)
    b = np.zeros(S)
    vn = N.var()
    if realign and vn > 0:
        b = ((pos - pos.mean(0)) * (N - N.mean())[:, None]).mean(0) / vn
    a = pos.mean(0) - b * N.mean()
    sd = (pos - (a[None, :] + b[None, :] * N[:, None])).std(0)
    half = np.stack([np.ceil(f * sd - 1e-9).astype(np.int64) + int(extra) for f in fs])
    return a, b, np.maximum(half, 0)


def _window_leak(x: np.ndarray, ex: np.ndarray, schedule: MACSchedule, wm: np.ndarray, slots: np.ndarray,
                 a: np.ndarray, b: np.ndarray, half: np.ndarray, sigma: float, rng: np.random.Generator
                 ) -> np.ndarray:
    """Window sums ``(n, K * S)`` (width-major) of compacted traces (executed MACs' Hamming weights moved
    forward, idle tail 0) plus window noise of variance ``sigma^2 * length``, nested windows of one slot sharing
    their noise."""
    n, M = ex.shape
    hw = hamming_weight16(x[:, schedule.pixel] * wm[None, :]).astype(np.int32)
    pos = np.cumsum(ex, axis=1) - 1
    trace = np.zeros((n, M), dtype=np.int32)
    rows = np.broadcast_to(np.arange(n)[:, None], (n, M))
    trace[rows[ex], pos[ex]] = hw[ex]
    cs = np.zeros((n, M + 1), dtype=np.int64)
    np.cumsum(trace, axis=1, out=cs[:, 1:])
    N = ex.sum(1).astype(np.float64)
    center = np.rint(a[None, :] + b[None, :] * N[:, None]).astype(np.int64)
    out = []
    noise = np.zeros(center.shape)
    prev_len = np.zeros(center.shape)
    for h in half:  # increasing half-widths: nested windows
        start = np.clip(center - h[None, :], 0, M)
        end = np.clip(center + h[None, :] + 1, 0, M)
        length = np.maximum((end - start).astype(np.float64), 1.0)
        noise = noise + rng.normal(0.0, 1.0, noise.shape) * sigma * np.sqrt(np.maximum(length - prev_len, 0.0))
        prev_len = np.maximum(prev_len, length)
        sig = (np.take_along_axis(cs, end, 1) - np.take_along_axis(cs, start, 1)).astype(np.float64)
        out.append(sig + noise)
    return np.concatenate(out, axis=1)


def equivalent_hypotheses(weight: int, ghost_corr: float = 0.99, table: np.ndarray | None = None) -> np.ndarray:
    """Bool mask over :data:`HYPOTHESES`: those whose predictions correlate with the true weight's at
    ``>= ghost_corr`` over uniform pixels (``w * 2^k``: identical, or off by a constant for negative weights)."""
    t = prediction_table() if table is None else table
    c = t - t.mean(0, keepdims=True)
    true = c[:, weight + 128]
    den = np.sqrt((c * c).sum(0) * (true * true).sum())
    corr = np.where(den > 0, (c * true[:, None]).sum(0) / np.where(den > 0, den, 1.0), 0.0)
    eq = corr >= ghost_corr
    eq[weight + 128] = True
    return eq


def _scores(cnt, sum_l_v, n_s, sum_l, sum_l2, table, table2) -> np.ndarray:
    """max over slots of the Pearson correlation of each hypothesis' prediction with the leak."""
    sh = cnt @ table  # (S, Hyp)
    sh2 = cnt @ table2
    shl = sum_l_v @ table
    n = n_s[:, None]
    num = n * shl - sh * sum_l[:, None]
    var_h = n * sh2 - sh * sh
    var_l = (n_s * sum_l2 - sum_l * sum_l)[:, None]
    den = np.sqrt(np.clip(var_h, 0, None) * np.clip(var_l, 0, None))
    rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return rho.max(0)


def traces_needed(results: Sequence[AttackResult]) -> dict[str, Any]:
    """Median traces needed over repeats (``inf`` for repeats that never succeeded) and how many succeeded."""
    vals = [r.traces_needed if r.traces_needed is not None else math.inf for r in results]
    med = float(np.median(vals))
    return {"median": med, "all": [None if math.isinf(v) else int(v) for v in vals],
            "succeeded": int(sum(not math.isinf(v) for v in vals)), "max_traces": max(r.checkpoints[-1]
                                                                                   for r in results)}


def dense_baseline(weights: Any, schedule: MACSchedule, *, target: int, repeats: int = 3, seed: int = 0,
                   n_traces: int = 20000, **kw: Any) -> list[AttackResult]:
    """The ungated attack, ``repeats`` times (timing and attacker do not matter without a gate)."""
    kw = {k: v for k, v in kw.items() if k not in ("timing", "attacker", "important", "p")}
    return [simulate_attack(weights, schedule, target=target, p=None, seed=seed + 7919 * r, n_traces=n_traces,
                            **kw) for r in range(repeats)]


def mitigation_ratio(weights: Any, schedule: MACSchedule, *, target: int, important: Any, p: float,
                     repeats: int = 3, seed: int = 0, n_traces: int = 20000, dense_traces: int | None = None,
                     dense: Sequence[AttackResult] | None = None, **kw: Any) -> dict[str, Any]:
    """``R = median traces(gated) / median traces(dense)`` for one gate (``important``, ``p``) and attacker.

    Returns the ratio, both medians, and the per-repeat results. ``censored=True`` whenever *any* gated repeat
    hit the cap (did not succeed within ``n_traces``): the median then counts those repeats at ``n_traces``, so
    ``R`` is a lower bound (``uncensored_repeats`` says how many succeeded). ``dense``: a precomputed
    :func:`dense_baseline` (same seeds) to share between calls.
    """
    if dense is None:
        dense = dense_baseline(weights, schedule, target=target, repeats=repeats, seed=seed,
                               n_traces=dense_traces or n_traces, **kw)
    gated = [simulate_attack(weights, schedule, target=target, important=important, p=p, seed=seed + 7919 * r,
                             n_traces=n_traces, **kw) for r in range(repeats)]
    return ratio_of(dense, gated, n_traces)


def ratio_of(dense: Sequence[AttackResult], gated: Sequence[AttackResult], n_traces: int) -> dict[str, Any]:
    """``R`` from finished attacks: median gated traces (repeats at the cap counted as ``n_traces``) over the
    median dense traces; ``censored`` when any gated repeat hit the cap (``R`` is then a lower bound)."""
    nd, ng = traces_needed(dense), traces_needed(gated)
    censored = ng["succeeded"] < len(gated)
    if math.isinf(nd["median"]):
        raise InputError("the ungated attack did not succeed within n_traces: the baseline is undefined",
                         fix="lower sigma or raise n_traces")
    capped = [n_traces if v is None else v for v in ng["all"]]
    ratio = float(np.median(capped)) / nd["median"]
    return {"R": ratio, "censored": censored, "uncensored_repeats": ng["succeeded"], "dense": nd, "gated": ng,
            "executed_fraction": float(np.mean([g.mean_executed for g in gated]))}


# ----------------------------------------------------------------------------------------------- model side
@dataclass
class ProtectedLayer:
    gate: nn.Module
    weight: torch.Tensor
    in_shape: tuple[int, ...]  # one sample's input (C, H, W) or (F,)
    kind: str  # "conv" or "linear"
    stride: list[int] = field(default_factory=lambda: [1, 1])
    padding: list[int] = field(default_factory=lambda: [0, 0])
    dilation: list[int] = field(default_factory=lambda: [1, 1])

    def schedule(self) -> MACSchedule:
        if self.kind == "linear":
            return linear_schedule(self.in_shape[-1])
        pixel_map = self.gate.important.dim() == 2
        return conv_schedule(tuple(self.in_shape), tuple(self.weight.shape[2:]), self.stride, self.padding,
                             self.dilation, pixel_map=pixel_map)


def protected_layers(module: fx.GraphModule) -> list[ProtectedLayer]:
    """The layers guarded by MACPruning gates in a compiled module (zero or masked-MAC mode)."""
    out: list[ProtectedLayer] = []
    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        mod = module.get_submodule(node.target)
        xv = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        in_shape = tuple(int(s) for s in xv.shape[1:]) if isinstance(xv, torch.Tensor) else None
        if isinstance(mod, MaskedMACConv2d):
            out.append(ProtectedLayer(mod.gate, get_tensor(module, node.args[1].target), in_shape, "conv",
                                      mod.stride, mod.padding, mod.dilation))
        elif isinstance(mod, MaskedMACLinear):
            out.append(ProtectedLayer(mod.gate, get_tensor(module, node.args[1].target), in_shape, "linear"))
        elif isinstance(mod, PixelGate):
            for user in node.users:
                if user.op != "call_function" or user.args[0] is not node:
                    continue
                w = get_tensor(module, user.args[1].target)
                if user.target in CONV_OPS:
                    a = list(user.args) + [None] * (7 - len(user.args))
                    nd = w.dim() - 2
                    pad = a[4] if not isinstance(a[4], str) else None
                    if pad is None:
                        continue  # string padding ('same'): not simulated
                    out.append(ProtectedLayer(mod, w, in_shape, "conv", int_list(a[3], nd, 1),
                                              int_list(pad, nd, 0), int_list(a[5], nd, 1)))
                else:
                    out.append(ProtectedLayer(mod, w, in_shape, "linear"))
    return out


def _evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    from fxprune.train import accuracy

    return accuracy(module, ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)))


def accuracy_vs_p(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ps: Iterable[float] = (1.0, 0.9, 0.7, 0.5,
                  0.3, 0.1, 0.0), *, important_fraction: float = 0.1, calib: Any = None, repeats: int = 1,
                  seed: int = 0, batch_size: int = 500, layers: Any = "first", importance: Any = "saliency"
                  ) -> list[dict[str, Any]]:
    """Test accuracy of the gated model at each ``p`` (mean and std over ``repeats`` draws of the gate).

    ``model``: a module already compiled with :class:`MACPruneGate` (its gates are re-used), or a plain model
    (compiled here once; saliency from ``calib``). Each repeat reseeds the gates from ``seed``.
    """
    if not gates(model):
        from fxprune.compile import compile

        model = compile(model, (x[:2],), passes=[MACPruneGate(
            p=1.0, important_fraction=important_fraction, importance=importance, calib=calib, layers=layers,
            seed=seed)], seed=seed, count_flops=False).module
    dense_acc = None
    saved = [g.p for g in gates(model)]
    rows = []
    try:
        for p in ps:
            set_p(model, p)
            accs = []
            for r in range(repeats):
                reseed(model, seed + r)
                accs.append(_evaluate(model, x, y, batch_size))
            keep = float(np.mean([float(g.important.float().mean()) * (1 - p) + p for g in gates(model)]))
            rows.append({"p": float(p), "accuracy": float(np.mean(accs)), "std": float(np.std(accs)),
                         "keep_rate": keep, "important_fraction": float(np.mean(
                             [float(g.important.float().mean()) for g in gates(model)]))})
            if p == 1.0:
                dense_acc = rows[-1]["accuracy"]
    finally:
        for g, p0 in zip(gates(model), saved):
            g.p = p0
    for r in rows:
        r["dense_accuracy"] = dense_acc
    return rows


def attack_model(module: fx.GraphModule, *, p: float | None = None, output_channel: int = 0,
                 target: tuple[int, ...] | int | None = None, layer: int = 0, **kw: Any) -> dict[str, Any]:
    """:func:`mitigation_ratio` on the ``layer``-th protected layer of a compiled module: its real (int8
    quantised) weights of ``output_channel``, its gate's important map, and ``p`` (default: the gate's).
    ``target``: flat index or ``(c, di, dj)`` of the weight (default: the largest-magnitude weight)."""
    layers = protected_layers(module)
    if not layers:
        raise InputError("no MACPruning-protected layer in this module",
                         fix="compile with passes=[MACPruneGate(...)] first")
    pl = layers[layer]
    wq, _ = quantize_int8(pl.weight)
    w = wq[output_channel].reshape(-1)
    if target is None:
        target = int(np.argmax(np.abs(w)))
    elif isinstance(target, tuple):
        target = int(np.ravel_multi_index(target, wq.shape[1:]))
    sched = pl.schedule()
    res = mitigation_ratio(w, sched, target=target, important=pl.gate.important, p=pl.gate.p if p is None else p,
                           **kw)
    res.update({"target": target, "true_weight": int(w[target]), "output_channel": output_channel,
                "macs_per_neuron": len(sched)})
    return res


def plot_accuracy_vs_r(rows: Sequence[dict[str, Any]], path: str, *, title: str = "") -> str | None:
    """Accuracy vs mitigation ratio (log x), one line per (attacker, important_fraction); PNG at ``path``.
    Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({(r["attacker"], r["timing"], r["important_fraction"]) for r in rows})
    for key in keys:
        pts = sorted((r["R"], r["accuracy"], r["p"], r.get("censored", False)) for r in rows
                     if (r["attacker"], r["timing"], r["important_fraction"]) == key)
        ax.plot([a[0] for a in pts], [a[1] for a in pts], marker="o",
                label=f"{key[0]} ({key[1]}), important {key[2]:.0%}")
        for rr, acc, p, cens in pts:
            ax.annotate(f"p={p:g}" + ("+" if cens else ""), (rr, acc), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("mitigation ratio R = traces(gated) / traces(ungated)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "MACPruning: accuracy vs side-channel mitigation (simulated)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=lambda o: None if isinstance(o, float) and math.isinf(o) else str(o))


__all__ = ["WINDOW_WIDTHS", "hamming_weight16", "quantize_int8", "prediction_table", "MACSchedule", "conv_schedule", "linear_schedule",
           "AttackResult", "simulate_attack", "traces_needed", "dense_baseline", "mitigation_ratio", "ProtectedLayer",
           "protected_layers", "accuracy_vs_p", "attack_model", "plot_accuracy_vs_r", "TIMINGS", "ATTACKERS"]
