"""LatencyPrune and its latency tables (issue 17): cache round trip and invalidation, selection against known
(synthetic) tables, widths that respect coupled groups and divisors, and clear errors for failed or noisy
measurements."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import fxprune
from fxprune.errors import BudgetError, InputError, MeasurementError
from fxprune.passes import Shrink
from fxprune.passes.latency_prune import (LatencyModel, LatencyPrune, LatOp, Width, _next_budget,
                                          calibrate_selection,
                                          extract_ops, group_levels, select_widths)
from fxprune.passes.latency_table import TABLE_FORMAT, LatencyTable, OpSpec, _median_spread, drift_cancelled

pytest.importorskip("onnxruntime")

TINY = OpSpec("linear", 1, (), bias=True)


def _table(tmp_path, **kw) -> LatencyTable:
    return LatencyTable("onnxruntime", 1, cache_dir=tmp_path, repeats=3, warmup=1, min_time_ms=0.05,
                        max_spread=50.0, **kw)


# ------------------------------------------------------------------------------------------------ the cache
def test_cache_round_trip_and_rebuild(tmp_path):
    t = _table(tmp_path)
    pts = [(TINY, 8, 8), (TINY, 8, 16), (TINY, 16, 8)]
    assert t.ensure(pts) == 3
    assert t.ensure(pts) == 0  # nothing missing: nothing measured
    assert t.path.exists() and t.path.parent == tmp_path
    again = _table(tmp_path)
    assert len(again) == 3
    for spec, a, b in pts:
        assert again.lookup(spec, a, b) == t.lookup(spec, a, b) > 0
    with pytest.raises(KeyError):
        again.lookup(TINY, 32, 32)
    fresh = _table(tmp_path, rebuild=True)
    assert len(fresh) == 0 and fresh.ensure(pts[:1]) == 1
    assert len(_table(tmp_path)) == 1  # the rebuilt table replaced the file


def test_cache_invalidated_by_another_version_or_thread_count(tmp_path):
    t = _table(tmp_path)
    t.ensure([(TINY, 8, 8)])
    data = json.loads(t.path.read_text())
    data["header"]["version"] = "0.0.1"
    t.path.write_text(json.dumps(data))
    stale = _table(tmp_path)
    assert len(stale) == 0 and "version" in stale.invalidated
    other = LatencyTable("onnxruntime", 2, cache_dir=tmp_path)
    assert other.path != t.path  # thread count is part of the file name and of the header
    t.path.write_text("{not json")
    assert len(_table(tmp_path)) == 0 and "unreadable" in _table(tmp_path).invalidated


# ------------------------------------------------------------------------------------------------ measurement errors
def test_noisy_measurement_raises_instead_of_a_silent_table(tmp_path):
    t = LatencyTable("onnxruntime", 1, cache_dir=tmp_path, repeats=5, warmup=0, min_time_ms=0.0,
                     max_spread=1e-12, retries=1)
    with pytest.raises(MeasurementError, match="too noisy") as e:
        t.ensure([(OpSpec("linear", 4, (), bias=True), 64, 64)])
    assert "max_spread" in str(e.value) and e.value.fix
    assert len(t) == 0 and not t.path.exists()


def test_table_points_cancel_a_machine_that_changes_speed_mid_measurement():
    """A machine that runs 3x slower for a while (another tenant) while one op's widths are timed: rounds 0-1 slow
    for every width, round 2 slow only for the first width timed. The medians of each width's own times order a
    1 ms and a 2 ms width the wrong way round (the table this produced made a ViT's MLP look cheapest at 82% of
    its width); the per-round ratios to the widest point keep the true ratios."""
    true = {"narrow": 1.0, "mid": 2.0, "wide": 4.0}
    slow = {"narrow": [3, 3, 3, 1, 1], "mid": [3, 3, 1, 1, 1], "wide": [3, 3, 1, 1, 1]}
    times = {k: [true[k] * f for f in slow[k]] for k in true}
    naive = {k: _median_spread(v)[0] for k, v in times.items()}
    assert naive["narrow"] > naive["mid"]  # the failure this guards against
    est = drift_cancelled(times, "wide")
    assert est["narrow"][0] == pytest.approx(0.25) and est["mid"][0] == pytest.approx(0.5)
    assert est["wide"][0] == 1.0 and est["wide"][1] > 0  # the widest point's own spread is still checked
    assert est["mid"][1] == 0.0  # its ratio never moved


def test_table_points_of_one_op_keep_their_ratios_through_a_slow_spell(tmp_path, monkeypatch):
    """The table build itself (``ensure``) with a timer whose machine is 3x slower for a spell of 7 timings in the
    middle of the rounds: the points of one op keep their true ratios (cost ~ w_in * w_out here)."""
    import fxprune.passes.latency_table as lt

    calls = []

    def fake_burst(sess, feed, inner=1, settle=0):
        w_in, w_out = feed["x"].shape[-1], sess.get_outputs()[0].shape[-1]
        calls.append((w_in, w_out))
        return 1e-3 * w_in * w_out * (3.0 if 6 <= len(calls) - 1 <= 12 else 1.0)  # rounds 1-2 and one timing of 3

    monkeypatch.setattr(lt, "time_burst", fake_burst)
    t = LatencyTable("onnxruntime", 1, cache_dir=tmp_path, repeats=5, warmup=0, max_spread=50.0)
    spec = OpSpec("linear", 8, (16,), bias=True)
    t.ensure([(spec, 64, 64), (spec, 64, 256), (spec, 256, 256)])
    ms = {(a, b): t.lookup(spec, a, b) for a, b in ((64, 64), (64, 256), (256, 256))}
    assert ms[(64, 256)] / ms[(256, 256)] == pytest.approx(0.25, rel=1e-9)
    assert ms[(64, 64)] / ms[(256, 256)] == pytest.approx(1 / 16, rel=1e-9)
    assert len(calls) == 3 + 5 * 3  # one sizing run per width, then 5 interleaved rounds of all three
    assert t.header["format"] == TABLE_FORMAT >= 4


def test_failed_measurement_names_the_op(tmp_path):
    bad = OpSpec("conv", 1, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), groups=4)
    with pytest.raises(MeasurementError, match=r"conv\|b1\|s8x8.*in6\|out8 failed"):
        _table(tmp_path).ensure([(bad, 6, 8)])  # 6 channels in 4 groups


def test_options_are_checked():
    with pytest.raises(InputError, match="exactly one"):
        LatencyPrune()
    with pytest.raises(InputError, match="target_latency"):
        LatencyPrune(target_latency=1.5)
    with pytest.raises(InputError, match="backend"):
        LatencyTable("tensorrt-nope", 2)
    with pytest.raises(InputError, match="confirm"):
        LatencyPrune(target_latency=0.5, confirm="yes")


# ------------------------------------------------------------------------------------------------ selection
def _chain(levels: dict[int, list[int]], fn) -> LatencyModel:
    """Linear ops x -> g0 -> g1 -> g2 -> 10 outputs (input 32 wide), on a synthetic table."""
    ops, prev = [], Width(32.0)
    for g in levels:
        out = Width(0.0, {g: 1.0})
        ops.append(LatOp(f"fc{g}", OpSpec("linear", 1, (), bias=True), prev, out))
        prev = out
    ops.append(LatOp("head", OpSpec("linear", 1, (), bias=True), prev, Width(10.0)))
    return LatencyModel(ops, LatencyTable.synthetic(fn), levels, grid=4)


def _staircase(spec, a, b):
    """MLAS-like: cost grows with padded widths (multiples of 16), plus a per-op overhead."""
    pad = lambda w: -(-w // 16) * 16  # noqa: E731
    return 0.01 + 1e-4 * pad(a) * pad(b)


def test_selection_meets_a_synthetic_target_and_is_maximal():
    levels = {g: list(range(64, 0, -8)) for g in range(3)}
    model = _chain(levels, lambda s, a, b: 0.01 + 1e-4 * a * b)
    rng = np.random.default_rng(0)
    cum = {g: np.concatenate([[0.0], np.cumsum(np.sort(rng.random(64))[::-1])]) for g in levels}
    dense = model.total({g: 64 for g in levels})
    for frac in (0.7, 0.5, 0.3):
        target = frac * dense
        counts = select_widths(model, cum, target)
        total = model.total(counts)
        assert total <= target + 1e-12
        assert all(c in levels[g] for g, c in counts.items())
        for g in levels:  # maximal: no group can take one more level and still fit
            i = levels[g].index(counts[g])
            if i > 0:
                assert model.total({**counts, g: levels[g][i - 1]}) > target
        # and close to the best reachable: the exhaustive optimum keeps at most a little more importance
        best = max(sum(cum[g][c[i]] for i, g in enumerate(levels))
                   for c in itertools.product(*levels.values())
                   if model.total(dict(zip(levels, c))) <= target)
        assert sum(cum[g][counts[g]] for g in levels) >= 0.97 * best


def test_selection_skips_widths_the_hardware_does_not_reward():
    levels = {g: list(range(64, 7, -8)) for g in range(3)}  # 64, 56, ..., 8: half of them not multiples of 16
    model = _chain(levels, _staircase)
    cum = {g: np.arange(65, dtype=np.float64) for g in levels}  # equal importance per channel
    dense = model.total({g: 64 for g in levels})
    counts = select_widths(model, cum, 0.5 * dense)
    assert model.total(counts) <= 0.5 * dense
    assert all(c % 16 == 0 for c in counts.values()), counts  # 56/40/24/8 cost as much as 64/48/32/16


def test_unreachable_target_is_a_budget_error():
    levels = {0: [64, 32]}
    model = _chain(levels, lambda s, a, b: 0.01 + 1e-4 * a * b)
    cum = {0: np.arange(65, dtype=np.float64)}
    with pytest.raises(BudgetError, match="lowest widths"):
        select_widths(model, cum, 0.01)


def test_selection_when_no_single_group_move_is_faster():
    """A measured table need not be monotone: here shrinking either group alone makes the op between them slower
    (misaligned widths), and only both together are faster. The greedy used to stop with a BudgetError; it now
    takes the lowest widths, which meet the target, and climbs back from there."""
    fc0, fc1, head = (OpSpec("linear", b, (), bias=True) for b in (1, 2, 3))
    ms = {(1, 32, 64): 1.0, (1, 32, 32): 0.9, (2, 64, 64): 1.0, (2, 32, 64): 1.5, (2, 64, 32): 1.5,
          (2, 32, 32): 0.5, (3, 64, 10): 1.0, (3, 32, 10): 0.9}
    g0, g1 = Width(0.0, {0: 1.0}), Width(0.0, {1: 1.0})
    ops = [LatOp("fc0", fc0, Width(32.0), g0), LatOp("fc1", fc1, g0, g1), LatOp("head", head, g1, Width(10.0))]
    model = LatencyModel(ops, LatencyTable.synthetic(lambda sp, a, b: ms[(sp.batch, a, b)]), {0: [64, 32],
                                                                                             1: [64, 32]}, grid=2)
    cum = {g: np.arange(65, dtype=np.float64) for g in (0, 1)}
    assert model.total({0: 64, 1: 64}) == pytest.approx(3.0)
    assert model.total({0: 32, 1: 64}) > 3.0 and model.total({0: 64, 1: 32}) > 3.0
    counts = select_widths(model, cum, 2.5)
    assert counts == {0: 32, 1: 32} and model.total(counts) == pytest.approx(2.3)


# ------------------------------------------------------------------------------------------------ calibration
def _true_ratio(model: LatencyModel, share: float, noise: list[float] | None = None, power: float = 1.0):
    """An end-to-end 'machine': ratio = (1 - share) * f + share * f**power with f = table_sum / dense_sum
    (``share`` of the dense latency is outside the table and scales as ``f**power``: constant overheads at 0,
    attention matmuls that shrink faster than the table at 2), times a scripted noise factor per round."""
    dense = model.total({g: lv[0] for g, lv in model.levels.items()})

    def measure(counts, r):
        f = model.total(counts) / dense
        q = (1 - share) * f + share * f ** power
        q *= (noise[r] if noise and r < len(noise) else 1.0)
        return 100.0, 100.0 * q, q
    return measure


@pytest.mark.parametrize("share", [0.0, 0.15, 0.3])
def test_calibration_reaches_the_target_when_part_of_the_latency_is_outside_the_table(share):
    """The table sums only the modelled ops; the loop fits alpha * sum + beta and meets the measured target."""
    levels = {g: list(range(64, 0, -4)) for g in range(6)}  # enough groups that the table is not too coarse
    model = _chain(levels, lambda s, a, b: 0.01 + 1e-4 * a * b)
    cum = {g: np.arange(65, dtype=np.float64) for g in levels}
    for target in (0.7, 0.5):
        rounds, counts = calibrate_selection(model, cum, target, _true_ratio(model, share), rounds=4,
                                             tolerance=0.03)
        assert rounds[-1]["miss"] <= 0.03, rounds
        assert len(rounds) <= (1 if share == 0 else 3)
        assert all(c in levels[g] for g, c in counts.items())


def test_a_noisy_first_round_does_not_turn_into_an_impossible_target():
    """A first measurement 40% too slow made the old straight-line fit ask for a negative table-ms budget (the
    BudgetError the benchmark once hit): budgets stay within [floor, dense] and later rounds get close (the
    outlier itself is never re-measured, so the next selectable widths above it may stay out of reach)."""
    levels = {g: list(range(64, 0, -4)) for g in range(6)}
    model = _chain(levels, lambda s, a, b: 0.01 + 1e-4 * a * b)
    cum = {g: np.arange(65, dtype=np.float64) for g in levels}
    rounds, _ = calibrate_selection(model, cum, 0.5, _true_ratio(model, 0.2, noise=[1.4]), rounds=4,
                                    tolerance=0.03)
    assert all(r["table_sum_ms"] > 0 for r in rounds) and len(rounds) == 4
    assert min(r["miss"] for r in rounds[1:]) < min(0.25, rounds[0]["miss"]), rounds
    assert 0 < _next_budget([(10.0, 1.0), (4.0, 0.9)], 0.5) < 4.0  # extrapolates down, never negative
    assert _next_budget([(10.0, 1.0), (4.0, 0.6), (2.0, 0.2)], 0.5) == pytest.approx(3.5)  # bracketing secant


def test_calibration_when_the_unmodelled_share_shrinks_faster_than_the_table():
    """ViT at a 0.3 target (measured): the lowest widths ran at 0.19 of dense (attention, outside the table, shrank
    with the heads) and a straight line through that point and dense overshot to 0.52 twice. The bracketing
    secant converges instead."""
    levels = {g: list(range(64, 0, -4)) for g in range(6)}
    model = _chain(levels, lambda s, a, b: 0.01 + 1e-4 * a * b)
    cum = {g: np.arange(65, dtype=np.float64) for g in levels}
    rounds, _ = calibrate_selection(model, cum, 0.3, _true_ratio(model, 0.6, power=2.0), rounds=5, tolerance=0.05)
    assert rounds[-1]["miss"] <= 0.05, rounds


def test_a_lucky_measurement_is_confirmed_before_it_ends_the_calibration():
    """The first timing of the first selection comes out right on the target by luck (its true ratio is 0.65:
    30% of the latency is outside the table); every later timing is the truth. Without confirmation the loop
    stops on the lucky number; with it, the mean of the two timings misses, the loop goes on and ends on a
    selection whose two timings agree with the target."""
    levels = {g: list(range(64, 0, -4)) for g in range(6)}
    model = _chain(levels, lambda s, a, b: 0.01 + 1e-4 * a * b)
    cum = {g: np.arange(65, dtype=np.float64) for g in levels}
    truth = _true_ratio(model, 0.3, power=0.0)  # 70% in the table, 30% constant
    calls = []

    def measure(counts, r):
        calls.append(r)
        d, p, q = truth(counts, r)
        return (d, 0.5 * p / q, 0.5) if len(calls) == 1 else (d, p, q)

    rounds, _ = calibrate_selection(model, cum, 0.5, measure, rounds=4, tolerance=0.05, confirm=False)
    assert len(rounds) == 1 and rounds[0]["measured_ratio"] == 0.5  # the lucky timing ends the loop
    calls.clear()
    rounds, counts = calibrate_selection(model, cum, 0.5, measure, rounds=4, tolerance=0.05, confirm=True)
    assert rounds[0]["first_ratio"] == 0.5 and rounds[0]["confirm_ratio"] > 0.6 and rounds[0]["miss"] > 0.05
    assert len(rounds) >= 2 and rounds[-1]["miss"] <= 0.05
    assert rounds[-1]["first_ratio"] == rounds[-1]["confirm_ratio"]  # both timings of the last one: the truth
    assert abs(truth(counts, 0)[2] / 0.5 - 1) <= 0.05


def test_a_timing_taken_while_the_machine_was_disturbed_is_taken_again():
    """YOLOv8 at batch 1 (measured): one calibration round timed dense at 6.1 ms where every other round saw
    3.3-3.7 ms, and its ratio (0.376 for a selection that measures 0.27-0.30) was off with it. A timing whose dense
    latency is more than 1.15x the fastest so far is taken again; without the check the loop stops on the
    disturbed number or is misled by it."""
    levels = {g: list(range(64, 0, -4)) for g in range(6)}
    model = _chain(levels, lambda s, a, b: 0.01 + 1e-4 * a * b)
    cum = {g: np.arange(65, dtype=np.float64) for g in levels}
    truth = _true_ratio(model, 0.0)
    calls = []

    def measure(counts, r):
        calls.append(r)
        d, p, q = truth(counts, r)
        if len(calls) == 1:  # a burst of load during the first timing: dense 1.8x slower, ratio off by 30%
            return 1.8 * d, 1.8 * p * 1.3, q * 1.3
        return d, p, q

    rounds, counts = calibrate_selection(model, cum, 0.5, measure, rounds=3, tolerance=0.03, dense_ms=100.0)
    assert rounds[0]["disturbed_dense_ms"] == [180.0] and rounds[0]["dense_ms"] == 100.0
    assert rounds[0]["miss"] <= 0.03 and len(rounds) == 1
    calls.clear()  # without the reference dense timing the first round has nothing to compare with
    rounds, _ = calibrate_selection(model, cum, 0.5, measure, rounds=3, tolerance=0.03)
    assert "disturbed_dense_ms" not in rounds[0] and rounds[0]["miss"] > 0.2
    calls.clear()  # a machine that stays slow: the last retiming is kept (the loop never stalls)
    slow = lambda counts, r: tuple(v * k for v, k in zip(truth(counts, r), (2.0, 2.0, 1.0)))  # noqa: E731
    rounds, _ = calibrate_selection(model, cum, 0.5, slow, rounds=1, tolerance=0.03, dense_ms=100.0, retimes=2)
    assert rounds[0]["disturbed_dense_ms"] == [200.0, 200.0] and rounds[0]["dense_ms"] == 200.0


def test_an_unreachable_measured_target_stops_at_the_floor():
    levels = {0: [64, 32]}
    model = _chain(levels, lambda s, a, b: 0.01 + 1e-4 * a * b)
    cum = {0: np.arange(65, dtype=np.float64)}
    rounds, counts = calibrate_selection(model, cum, 0.2, _true_ratio(model, 0.6), rounds=5, tolerance=0.05)
    assert counts == {0: 32} and rounds[-1]["clipped_to"] == "floor" and rounds[-1]["measured_ratio"] > 0.2
    assert len(rounds) <= 3


def test_group_levels_respect_step_divisor_and_floor():
    lv = group_levels(96, step=8, levels=8, max_ratio=0.75, divisor=3)
    assert lv[0] == 96 and all(k % 24 == 0 for k in lv) and min(lv) >= 24 and lv == sorted(lv, reverse=True)
    assert group_levels(6, step=8, levels=8, max_ratio=0.5) == [6, 5, 4, 3]  # small group: unit 1
    lv = group_levels(512, step=8, levels=6, max_ratio=0.9)
    assert len(lv) == 6 and lv[0] == 512 and all(k % 8 == 0 for k in lv)


# ------------------------------------------------------------------------------------------------ on a model
def _flops_table(spec, a, b):
    hw = int(np.prod(spec.spatial)) if spec.spatial else 1
    k = int(np.prod(spec.kernel)) if spec.kernel else 1
    per = b if spec.depthwise else a * b // max(spec.groups, 1)
    return 0.002 + 1e-7 * spec.batch * hw * k * -(-per // 16) * 16


def test_on_a_residual_cnn_widths_respect_coupled_groups_and_shrink_verifies():
    from fxprune import models

    model, x = models.get("resnet50", size="tiny", seed=0, batch=1)
    p = LatencyPrune(target_latency=0.5, table=LatencyTable.synthetic(_flops_table), measure=False, step=4)
    out = fxprune.compile(model, x, passes=[p, Shrink()])
    st = out.report.passes[0]["stats"]
    assert st["predicted_ratio"] <= 0.5 and st["groups_pruned"] > 0
    assert out.report.verified is True
    assert 0 < st["importance_retained"] < 1
    groups = fxprune.analyze(model, x)
    for gid, k in st["kept"].items():
        assert k % 4 == 0 or k == groups[gid].size, (gid, k)
    # coupled: every parameter of a group shrank to the group's kept count along the group's dim
    sd = dict(out.module.named_parameters())
    for gid, k in st["kept"].items():
        for m in groups[gid].members:
            if m.param in sd and m.covers == groups[gid].size:
                assert sd[m.param].shape[m.dim] == k, (m, k)


def test_ops_of_a_depthwise_cnn():
    from fxprune import models

    model, x = models.get("mobilenetv2", size="tiny", seed=0, batch=1)
    prog_gm = fxprune.trace(model, x, {})
    from fxprune.program import Program

    program = Program(prog_gm, tuple(x), {}, source=model)
    cand = {g.id for g in program.groups.prunable()}
    ops = extract_ops(program, cand)
    assert any(o.spec.depthwise for o in ops) and any(o.spec.kind == "linear" for o in ops)
    assert sum(1 for n in prog_gm.graph.nodes if "conv2d" in str(n.target)) == sum(o.spec.kind == "conv" for o in ops)
    counts = {g.id: g.size for g in program.groups.prunable()}
    nodes = {n.name: n for n in prog_gm.graph.nodes}
    for o in ops:  # at full width the modelled widths are the traced shapes
        shape = nodes[o.node].meta["val"].shape
        assert o.w_out.at(counts) == shape[1 if o.spec.kind == "conv" else -1]
        xin = nodes[o.node].args[0].meta["val"].shape
        assert o.w_in.at(counts) == xin[1 if o.spec.kind == "conv" else -1]


@pytest.mark.slow
def test_a_measured_target_miss_is_an_error_not_a_silent_result():
    """End to end (ONNX export + interleaved timing): an impossible tolerance after one round raises BudgetError
    with the measured and predicted ratios; strict=False keeps the selection and reports the miss."""
    from fxprune import models

    model, x = models.get("resnet50", size="tiny", seed=0, batch=1)
    kw = dict(target_latency=0.8, table=LatencyTable.synthetic(_flops_table), step=4, calibrate=1,
              tolerance=1e-9, max_spread=10.0, repeats_e2e=5)
    with pytest.raises(BudgetError, match=r"misses the target 0\.800 by .*predicted"):
        fxprune.compile(model, x, passes=[LatencyPrune(**kw)])
    out = fxprune.compile(model, x, passes=[LatencyPrune(**kw, strict=False), Shrink()])
    st = out.report.passes[0]["stats"]
    assert st["target_miss"] > 0 and st["measured_ratio"] > 0 and len(st["rounds"]) == 1
    assert st["measured_ms"] > 0 and st["predicted_ms"] > 0


def test_reported_importance_matches_the_recomputed_one():
    """The pass' importance_retained counts every candidate group (kept whole or not) like importance_retained()."""
    from fxprune import models
    from fxprune.passes.latency_prune import importance_retained

    model, x = models.get("resnet50", size="tiny", seed=0, batch=1)
    p = LatencyPrune(target_latency=0.6, table=LatencyTable.synthetic(_flops_table), measure=False, step=4)
    out = fxprune.compile(model, x, passes=[p])
    st = out.report.passes[0]["stats"]
    assert st["importance_retained"] == pytest.approx(importance_retained(model, x, st["kept"]), abs=1e-3)


# ------------------------------------------------------------------------------------------------ torch.compile
def test_torch_compile_tables_are_measured_cached_and_keyed_by_torch_version(tmp_path):
    t = LatencyTable("torch.compile", 1, cache_dir=tmp_path, repeats=3, warmup=1, min_time_ms=0.05,
                     max_spread=50.0)
    conv = OpSpec("conv", 2, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1))
    pts = [(conv, 8, 16), (conv, 16, 16), (TINY, 8, 8)]
    assert t.ensure(pts) == 3 and all(t.lookup(*p) > 0 for p in pts)
    assert "torch.compile" in t.path.name and t.header["version"] == torch.__version__
    again = LatencyTable("torch.compile", 1, cache_dir=tmp_path)
    assert len(again) == 3 and again.lookup(*pts[0]) == t.lookup(*pts[0])
    assert len(LatencyTable("onnxruntime", 1, cache_dir=tmp_path)) == 0  # another backend: another table
    with pytest.raises(InputError, match="backend"):
        LatencyPrune(target_latency=0.5, backend="tensorrt")
    with pytest.raises(InputError, match="dense_onnx"):
        LatencyPrune(target_latency=0.5, backend="torch.compile", dense_onnx=str(t.path))


def test_latency_prune_calibrates_against_torch_compile(tmp_path):
    """The torch.compile backend end to end on a small CNN: eager kernel tables, then calibration rounds that
    torch.compile the dense and the selected model and time them against each other."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x = torch.randn(4, 3, 32, 32)
    p = LatencyPrune(target_latency=0.5, backend="torch.compile", threads=1, calibrate=2, strict=False,
                     cache_dir=str(tmp_path), repeats=3, repeats_e2e=5, max_spread=10.0, levels=4)
    out = fxprune.compile(model, (x,), passes=[p, Shrink()])
    st = out.report.passes[0]["stats"]
    assert out.report.verified is True and st["groups_pruned"] > 0
    assert 1 <= len(st["rounds"]) <= 2 and 0 < st["measured_ratio"] < 1.0
    assert "torch.compile" in st["table_file"]
    assert out.module(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def _blocked(block):
    def fn(spec, a, b):
        pad = lambda w: -(-w // block) * block  # noqa: E731
        pixels = spec.spatial[0] * spec.spatial[1] if spec.kind == "conv" else 1
        taps = spec.kernel[0] * spec.kernel[1] if spec.kind == "conv" else 1
        per = pad(b) if spec.depthwise else pad(a) * pad(b) // spec.groups
        return 0.001 + 1e-7 * spec.batch * pixels * taps * per
    return fn


@pytest.mark.parametrize("block, want", [(16, 16), (8, 8), (1, 8), (32, 32)])
def test_the_step_is_the_measured_channel_granularity(block, want):
    """ONNX Runtime's NCHWc convolutions on this AVX-512 machine cost the same at 56 channels as at 64 (measured:
    0.573 vs 0.567 ms for a 3x3 conv at 40x40), 48 and 40 alike, 32 half: widths of 8 buy nothing there, and
    LatencyPrune at step 16 kept 0.43 of the detector's MACs at 0.51 of its latency where step 8 kept 0.39 at 0.49.
    step='auto' measures the granularity on the model's costliest op."""
    from fxprune.passes.latency_prune import probe_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 96, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(96, 128, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(128, 96, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(96, 10, 1)).eval()
    x = (torch.randn(1, 3, 16, 16),)
    table = LatencyTable.synthetic(_blocked(block))
    out = fxprune.compile(model, x, passes=[LatencyPrune(target_latency=0.5, table=table, measure=False), Shrink()])
    st = out.report.passes[0]["stats"]
    assert st["step"] == want and st["step_probe"]["width"] == 128, st["step_probe"]
    assert st["predicted_ratio"] <= 0.5
    groups = fxprune.analyze(model, x)
    assert all(k % want == 0 or k == groups[gid].size for gid, k in st["kept"].items()), st["kept"]
    assert out.report.verified
    ops = [LatOp("fc", OpSpec("linear", 1, (), bias=True), Width(48.0), Width(48.0))]  # too narrow to probe
    step, rec = probe_step(ops, table, {})
    assert step == 8 and "no conv/linear op" in rec["note"]


def test_step_is_validated():
    with pytest.raises(InputError, match="step must be 'auto' or an int"):
        LatencyPrune(target_latency=0.5, step="fast")
    with pytest.raises(InputError, match="step must be 'auto' or an int"):
        LatencyPrune(target_latency=0.5, step=0)


def test_rounds_timed_in_a_slow_spell_are_dropped_once_it_ends():
    """MobileNetV2 at batch 8 (measured): the pass started inside one of the machine's slow spells (dense 14.3 ms
    instead of 9.5) where its selections measured 0.63-0.67 of dense; the same kind of selection measured 0.78 once
    the spell ended. A faster dense timing later in the pass shows the earlier rounds ran in a spell: they are
    marked, left out of the fit and never chosen."""
    levels = {g: list(range(64, 0, -4)) for g in range(6)}
    model = _chain(levels, lambda s, a, b: 0.01 + 1e-4 * a * b)
    cum = {g: np.arange(65, dtype=np.float64) for g in levels}
    truth = _true_ratio(model, 0.0)
    calls = []

    def measure(counts, r):
        calls.append(r)
        d, p, q = truth(counts, r)
        if len(calls) <= 2:  # inside the spell: dense 1.5x slower, the ratio 20% lower
            return 1.5 * d, 1.5 * d * 0.8 * q, 0.8 * q
        return d, p, q

    rounds, counts = calibrate_selection(model, cum, 0.5, measure, rounds=5, tolerance=0.03, confirm=True)
    assert rounds[0]["slow_spell"] and rounds[0]["dense_ms"] == 150.0, rounds
    assert not rounds[-1].get("slow_spell") and rounds[-1]["miss"] <= 0.03, rounds
    assert abs(truth(counts, 0)[2] / 0.5 - 1) <= 0.03
