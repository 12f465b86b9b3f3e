"""fxprune.passes.macprune_leakage: leakage model, CPA attack, mitigation ratio (with/without gate, Double Strike), accuracy vs p."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import InputError
from fxprune.passes.macprune import MACPruneGate, gates
from fxprune.passes.macprune_leakage import (HYPOTHESES, accuracy_vs_p, attack_model, conv_schedule,
                                             equivalent_hypotheses, hamming_weight16, linear_schedule,
                                             mitigation_ratio, prediction_table, protected_layers, quantize_int8,
                                             simulate_attack, traces_needed)

torch.set_num_threads(1)


def _weights(seed=0):
    w, _ = quantize_int8(np.random.default_rng(seed).normal(0, 1, (1, 3, 3)))
    return w.reshape(-1)


SCHED = conv_schedule((1, 16, 16), (3, 3), padding=(1, 1))


def test_hamming_weight_and_quantisation():
    vals = np.array([0, 1, -1, 255, -128, 127 * 255, -127 * 255, 32767, -32768])
    want = [bin(int(v) & 0xFFFF).count("1") for v in vals]
    assert hamming_weight16(vals).tolist() == want
    q, scale = quantize_int8(torch.tensor([0.5, -1.0, 0.25]))
    assert q.tolist() == [64, -127, 32] and scale == pytest.approx(1 / 127)
    t = prediction_table()
    assert t.shape == (256, 256) and t[3, 1 + 128] == 2  # HW(3 * 1)


def test_equivalence_classes_are_the_shift_ghosts():
    eq = equivalent_hypotheses(13)
    assert set(HYPOTHESES[eq].tolist()) == {13, 26, 52, 104}  # x * 2^k w: same Hamming weight
    eq = equivalent_hypotheses(-52)
    assert {-13, -26, -52, -104} <= set(HYPOTHESES[eq].tolist())
    assert 53 not in HYPOTHESES[eq] and -51 not in HYPOTHESES[eq]


def test_conv_schedule_counts_valid_taps_in_order():
    s = conv_schedule((2, 6, 5), (3, 3), stride=(2, 1), padding=(1, 1))
    ones = torch.ones(1, 2, 6, 5)
    taps = F.conv2d(ones, torch.ones(1, 2, 3, 3), stride=(2, 1), padding=1)
    assert len(s) == int(taps.sum())
    assert s.n_pixels == 60 and s.map_index.max() < 30  # pixel map shared by the channels
    assert s.weight_index.max() == 17
    first = (s.pixel[0], s.weight_index[0])  # output (0, 0): first in-bounds tap (c 0, di 1, dj 1) -> pixel (0, 0)
    assert first == (0, 4)
    assert len(linear_schedule(7)) == 7


def test_dense_attack_recovers_the_weight():
    w = _weights()
    r = simulate_attack(w, SCHED, target=4, p=None, sigma=2.0, n_traces=2000, seed=1)
    assert r.traces_needed is not None and r.traces_needed <= 300
    assert r.rank[-1] == 1 and r.recovered in HYPOTHESES[equivalent_hypotheses(int(w[4]))]
    # more noise, more traces
    r4 = simulate_attack(w, SCHED, target=4, p=None, sigma=6.0, n_traces=4000, seed=1)
    assert r4.traces_needed is not None and r4.traces_needed > r.traces_needed


def test_gate_raises_the_traces_needed_and_double_strike_undoes_it():
    w = _weights()
    imp = np.zeros((16, 16), bool)
    imp[5:11, 5:11] = True
    kw = dict(target=4, important=imp, p=0.5, sigma=4.0, n_traces=6000, repeats=3, seed=0)
    compact = mitigation_ratio(w, SCHED, timing="compact", attacker="cpa", **kw)
    ds = mitigation_ratio(w, SCHED, timing="compact", attacker="double_strike", **kw)
    assert compact["R"] > 3, compact  # desynchronisation: above 1 / p
    assert ds["R"] < compact["R"] / 2, (ds, compact)  # re-aligned traces: most of the protection is gone
    assert ds["R"] < 3
    assert 0.5 < compact["executed_fraction"] < 1.0
    # constant-time gate without important pixels: hiding only (correlation scaled by ~p): a smaller gain
    const = mitigation_ratio(w, SCHED, timing="constant", attacker="cpa", **{**kw, "important": None})
    assert 1.2 <= const["R"] <= 12, const
    assert const["R"] < compact["R"]


def test_censored_ratio_is_a_lower_bound():
    w = _weights()
    res = mitigation_ratio(w, SCHED, target=4, important=None, p=0.05, sigma=2.0, n_traces=300, repeats=1,
                           timing="compact", dense_traces=2000)
    assert res["censored"] and res["R"] == pytest.approx(300 / res["dense"]["median"])
    assert traces_needed([simulate_attack(w, SCHED, target=4, p=0.05, n_traces=100)])["succeeded"] == 0
    # censored as soon as one repeat hits the cap, even when the median itself is finite (the old rule flagged
    # only an infinite median, so R = cap / dense was reported uncensored whenever half the repeats succeeded)
    from fxprune.passes.macprune_leakage import AttackResult, ratio_of

    def run(n):
        return AttackResult(n, [300], [1], 5, 5, "compact", "cpa", 0.5, 2.0, 9, 1.0)

    res = ratio_of([run(100)], [run(100), run(None), run(120)], 300)
    assert res["censored"] and res["uncensored_repeats"] == 2 and res["R"] == pytest.approx(120 / 100)
    res = ratio_of([run(100)], [run(None), run(None), run(120)], 300)
    assert res["censored"] and res["R"] == pytest.approx(300 / 100)
    assert not ratio_of([run(100)], [run(150)] * 3, 300)["censored"]


def test_attack_on_a_compiled_model_uses_its_weights_and_gate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 3)).eval()
    x = torch.rand(2, 1, 12, 12)
    imp = torch.zeros(12, 12)
    imp[4:8, 4:8] = 1
    for mode in ("zero", "mac"):
        out = fxprune.compile(model, (x,), passes=[MACPruneGate(p=0.5, important_fraction=16 / 144,
                                                               importance=imp, mode=mode)])
        (pl,) = protected_layers(out.module)
        assert pl.kind == "conv" and pl.in_shape == (1, 12, 12) and pl.padding == [1, 1]
        assert torch.equal(pl.weight, out.module.get_parameter("0.weight"))
        assert bool(pl.gate.important[4:8, 4:8].all()) and int(pl.gate.important.sum()) == 16
    res = attack_model(out.module, output_channel=1, sigma=1.0, n_traces=3000, repeats=1)
    wq, _ = quantize_int8(model[0].weight)
    assert res["true_weight"] == int(wq[1].reshape(-1)[res["target"]])
    assert abs(res["true_weight"]) == int(np.abs(wq[1]).max())
    assert res["macs_per_neuron"] == len(conv_schedule((1, 12, 12), (3, 3), padding=(1, 1)))
    assert res["R"] >= 1 or res["censored"]


def test_accuracy_vs_p_at_one_equals_the_model():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 8, 8, generator=g)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    with torch.no_grad():
        y = model(x).argmax(1)  # labels = the model's own predictions: accuracy 1 at p = 1
    rows = accuracy_vs_p(model, x, y, [1.0, 0.5, 0.0], important_fraction=0.25, calib=[(x[:64], y[:64])],
                         repeats=2)
    assert [r["p"] for r in rows] == [1.0, 0.5, 0.0]
    assert rows[0]["accuracy"] == 1.0 and rows[0]["std"] == 0.0
    assert rows[-1]["accuracy"] < 1.0
    assert rows[0]["dense_accuracy"] == 1.0
    assert rows[1]["keep_rate"] == pytest.approx(0.25 + 0.75 * 0.5, abs=0.01)


@pytest.mark.parametrize("kw,match", [({"timing": "late"}, "timing"), ({"attacker": "dpa"}, "attacker"),
                                      ({"p": 2.0}, "p must be"), ({"target": 99}, "out of range"),
                                      ({"inputs": "images"}, "inputs")])
def test_bad_attack_options(kw, match):
    with pytest.raises(InputError, match=match):
        simulate_attack(_weights(), SCHED, **{"target": 4, **kw})


def test_zero_target_weight_is_rejected():
    w = _weights().copy()
    w[2] = 0
    with pytest.raises(InputError, match="quantises to 0"):
        simulate_attack(w, SCHED, target=2)
    assert math.isinf(traces_needed([simulate_attack(_weights(), SCHED, target=4, p=0.0, n_traces=50)])["median"])
