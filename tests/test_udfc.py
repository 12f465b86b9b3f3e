"""UDFCompensate (passes/udfc.py): closed-form moments, exact restoration of scaled copies, error reduction on
random BN-ReLU CNNs for pruning and 4-bit weights, skipped groups with reasons, composition with Shrink."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import InputError
from fxprune.passes import ChannelPrune, Shrink, UDFCompensate
from fxprune.passes.udfc import UDFCRecord, act_moments, bvn_upper, quantize_weight, relu_cross_moment


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _compile(model, x, passes):
    return fxprune.compile(model, (x,), passes=passes, count_flops=False)


class SelectChannels(fxprune.Pass):
    """Remove exactly the given channels of the group whose label starts with ``param`` (test helper)."""

    name = "test_udfc_select"
    requires = frozenset({"groups"})

    def __init__(self, param, remove):
        self.param, self.remove = param, list(remove)

    def run(self, program, ctx):
        g = next(g for g in program.groups if g.label.startswith(self.param))
        keep = np.ones(g.size, bool)
        keep[self.remove] = False
        program.select_channels(g.id, keep)
        return fxprune.PassResult(program)


@torch.no_grad()
def _realistic_bn(model, shape, seed, batches=4):
    """BN affine params away from their init, running stats measured on random batches (cumulative average)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            m.momentum = None
            m.reset_running_stats()
    model.train()
    for _ in range(batches):
        model(torch.randn(64, *shape, generator=g))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model.eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------ moments
def test_bvn_upper_matches_quadrature():
    rng = np.random.default_rng(0)
    cases = [(h, k, r) for h, k in rng.normal(0, 1.3, (12, 2))
             for r in (-1.0, -0.999, -0.95, -0.4, 0.0, 0.3, 0.9, 0.96, 0.9999, 1.0)]
    h, k, r = (torch.tensor(v, dtype=torch.float64) for v in zip(*cases))
    got = bvn_upper(h, k, r)
    for (hh, kk, rr), v in zip(cases, got):
        # P(U > h, V > k) = int_h^inf phi(x) P(V > k | U = x) dx
        x = torch.linspace(hh, hh + 12, 200001, dtype=torch.float64)
        pdf = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        s = math.sqrt(max(1 - rr * rr, 0.0))
        cond = 0.5 * torch.special.erfc(-(rr * x - kk) / (s * math.sqrt(2))) if s > 0 else (rr * x > kk).double()
        ref = float(torch.trapezoid(pdf * cond, x))
        assert abs(float(v) - ref) < (1e-7 if s > 1e-3 else 1e-4), (hh, kk, rr, float(v), ref)


@pytest.mark.parametrize("rho", [-0.8, 0.0, 0.6, 0.97, 1.0])
def test_relu_cross_moment_matches_monte_carlo(rho):
    g = torch.Generator().manual_seed(1)
    n = 400_000
    mx, my, sx, sy = 0.3, -0.4, 1.2, 0.7
    u = torch.randn(n, generator=g, dtype=torch.float64)
    v = rho * u + math.sqrt(max(0.0, 1 - rho * rho)) * torch.randn(n, generator=g, dtype=torch.float64)
    prod = (mx + sx * u).clamp_min(0) * (my + sy * v).clamp_min(0)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = float(relu_cross_moment(t(mx), t(my), t(sx), t(sy), t(rho)))
    assert abs(got - float(prod.mean())) < 5 * float(prod.std()) / math.sqrt(n) + 1e-9


def test_moment_matrix_is_a_valid_second_moment_matrix():
    """E[f(y) f(y)^T] of a real random vector is PSD; a zero loading is the constant f(mu)."""
    g = torch.Generator().manual_seed(2)
    G = torch.randn(12, 6, generator=g, dtype=torch.float64)
    G[3] = 0.0
    mu = torch.randn(12, generator=g, dtype=torch.float64)
    M = act_moments(mu, G, mu, G, "relu")
    assert torch.allclose(M, M.T, atol=1e-12)
    assert float(torch.linalg.eigvalsh(M).min()) > -1e-9
    assert float(M[3, 3]) == pytest.approx(max(float(mu[3]), 0.0) ** 2, abs=1e-12)


def test_quantize_weight_levels_and_kept_column_scale():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, 3, 3, generator=g)
    keep = np.array([True, True, False, True, True])
    w[:, 2] *= 10  # a removed column with large weights must not set the scale
    q = quantize_weight(w, 4, keep)
    kept = q[:, torch.from_numpy(keep)]
    scale = w[:, torch.from_numpy(keep)].abs().amax(dim=(1, 2, 3)) / 7
    for o in range(6):
        levels = torch.unique(torch.round(kept[o] / scale[o]))
        assert len(levels) <= 15 and float(levels.abs().max()) <= 7
        err = (kept[o] - w[o, torch.from_numpy(keep)]).abs().max()
        assert float(err) <= float(scale[o]) / 2 + 1e-6


# ------------------------------------------------------------------------------------------------ exact copies
class SmallCNN(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.c2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(16) if bn else nn.Identity()
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        return self.fc(x.flatten(1))


def _copy_model(bn):
    """Filter 5 of c1 is 2x filter 2 (bias too); with BN its statistics match and its affine params are 1.5x, so
    post-ReLU channel 5 == 3 x channel 2 (without BN: 2x)."""
    torch.manual_seed(0)
    m = SmallCNN(bn)
    if bn:
        _realistic_bn(m, (3, 16, 16), seed=0)
    with torch.no_grad():
        m.c1.weight[5] = 2 * m.c1.weight[2]
        m.c1.bias[5] = 2 * m.c1.bias[2]
        if bn:
            m.b1.eps = 0.0
            m.b1.running_mean[5] = 2 * m.b1.running_mean[2]
            m.b1.running_var[5] = 4 * m.b1.running_var[2]
            m.b1.weight[5] = 1.5 * m.b1.weight[2]
            m.b1.bias[5] = 1.5 * m.b1.bias[2]
    return m.eval()


@pytest.mark.parametrize("bn,kw", [(True, {"mode": "lstsq"}), (True, {"mode": "single"}),
                                   (False, {"mode": "single", "no_bn": "merge"})])
def test_scaled_copy_is_restored_exactly(bn, kw):
    m = _copy_model(bn)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
    plain = _compile(m, x, [SelectChannels("c1.weight", [5]), Shrink()])
    comp = _compile(m, x, [SelectChannels("c1.weight", [5]), UDFCompensate(**kw), Shrink()])
    with torch.no_grad():
        assert _rel(plain.module(x), ref) > 1e-2  # removing the copy does change the output
        assert _rel(comp.module(x), ref) < 1e-5
    st = comp.program.history[1]["stats"]
    assert st["compensated"] >= 1 and st["rel_change"] < 1e-5 < st["rel_change_without"]


# ------------------------------------------------------------------------------------------------ random nets
class RandCNN(nn.Module):
    def __init__(self, w=16):
        super().__init__()
        self.c1 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(w)
        self.c2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(2 * w)
        self.c3 = nn.Conv2d(2 * w, 2 * w, 1, bias=False)
        self.b3 = nn.BatchNorm2d(2 * w)
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = F.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def _errors(m, ratio, bits, modes, seed):
    x, xt = torch.randn(8, 3, 16, 16), torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        ref = m(xt)
    out = {}
    for mode in modes:
        passes = [ChannelPrune(ratio, importance="l1")] if ratio else []
        if bits is not None or mode != "none":
            passes.append(UDFCompensate(bits=bits, mode=mode, measure=False))
        out[mode] = _rel(_compile(m, x, passes + [Shrink()]).module(xt).detach(), ref)
    return out


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_random_bn_cnns_pruning_error_below_uncompensated(ratio):
    for seed in range(3):
        torch.manual_seed(seed)
        m = _realistic_bn(RandCNN(), (3, 16, 16), seed)
        e = _errors(m, ratio, None, ("none", "lstsq", "single"), seed)
        assert e["lstsq"] < e["none"], (seed, e)
        assert e["single"] < e["none"], (seed, e)


@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_random_bn_cnns_4bit_error_below_uncompensated(ratio):
    for seed in range(3):
        torch.manual_seed(seed)
        m = _realistic_bn(RandCNN(), (3, 16, 16), seed)
        e = _errors(m, ratio, 4, ("none", "lstsq"), seed)
        assert e["lstsq"] < e["none"], (seed, e)


# ------------------------------------------------------------------------------------------------ skipping
class NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


class GeluBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.gelu(self.b1(self.c1(x))))


class PostActResidual(nn.Module):
    """ReLU(BN(conv(x)) + x): the stream channels reach the consumer through a sum before the ReLU."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.b1(self.c1(x)) + x)
        return self.c2(x)


@pytest.mark.parametrize("cls,param,reason", [(NoBN, "c1.weight", "no BatchNorm"), (GeluBN, "c1.weight", "gelu")])
def test_group_outside_the_closed_form_is_skipped_with_reason(cls, param, reason):
    torch.manual_seed(0)
    m = cls()
    if any(isinstance(x, nn.BatchNorm2d) for x in m.modules()):
        _realistic_bn(m, (3, 8, 8), seed=0)
    x = torch.randn(4, 3, 8, 8)
    plain = _compile(m, x, [SelectChannels(param, [1, 4]), Shrink()])
    comp = _compile(m, x, [SelectChannels(param, [1, 4]), UDFCompensate(), Shrink()])
    st = comp.program.history[1]["stats"]
    skipped = [s for s in st["skipped"] if s["label"].startswith(param)]
    assert skipped and reason in skipped[0]["reason"], st["skipped"]
    rec = comp.program.records_of(UDFCRecord)[0]
    assert any(reason in r for r in rec.skipped.values())
    with torch.no_grad():  # nothing was folded: identical to plain pruning
        assert torch.equal(comp.module(x), plain.module(x))


def test_post_activation_residual_stream_is_partial_with_reason():
    """The stream group's first consumer (c1) reads ReLU(BN(c0)) and is compensated; the identity path and c2
    read ReLU(BN + x), a sum before the ReLU: listed as reasons, the group is 'partial'."""
    torch.manual_seed(0)
    m = _realistic_bn(PostActResidual(), (3, 8, 8), seed=0)
    x = torch.randn(4, 3, 8, 8)
    comp = _compile(m, x, [SelectChannels("c0.weight", [1, 4]), UDFCompensate(), Shrink()])
    st = comp.program.history[1]["stats"]
    info = next(v for v in st["groups"].values() if v["label"].startswith("c0.weight"))
    assert info["status"] == "partial"
    assert any("sum before the activation" in r for r in info["reasons"])
    assert any("add" in r for r in info["also_reaches"])


class PreActResidual(nn.Module):
    """A residual stream (c0 + c2 outputs, coupled by the add) read by two BN-ReLU sites: bn1 (input: c0) and
    bn3 (input: the sum c0 + c2, modelled with concatenated loadings)."""

    def __init__(self, w=16):
        super().__init__()
        self.c0 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.b1, self.c1 = nn.BatchNorm2d(w), nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.b2, self.c2 = nn.BatchNorm2d(w), nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.b3, self.fc = nn.BatchNorm2d(w), nn.Linear(w, 10)

    def forward(self, x):
        s = self.c0(x)
        h = self.c1(torch.relu(self.b1(s)))
        s = s + self.c2(torch.relu(self.b2(h)))
        return self.fc(torch.relu(self.b3(s)).mean((2, 3)))


def test_residual_coupled_group_is_compensated():
    torch.manual_seed(0)
    m = _realistic_bn(PreActResidual(), (3, 12, 12), seed=0)
    x, xt = torch.randn(8, 3, 12, 12), torch.randn(64, 3, 12, 12)
    gs = fxprune.analyze(m, (x,))
    stream = next(g for g in gs if g.label.startswith("c0.weight"))
    assert any(mm.param == "c2.weight" and mm.dim == 0 for mm in stream.members)  # coupled by the add
    with torch.no_grad():
        ref = m(xt)
    plain = _compile(m, x, [SelectChannels("c0.weight", [0, 3, 5, 6, 9, 12]), Shrink()])
    comp = _compile(m, x, [SelectChannels("c0.weight", [0, 3, 5, 6, 9, 12]), UDFCompensate(), Shrink()])
    info = comp.program.history[1]["stats"]["groups"][stream.id]
    assert info["status"] == "compensated", info
    assert any("+" in s for s in info["model"])  # bn3 reads the sum c0 + c2: concatenated loadings
    with torch.no_grad():
        assert _rel(comp.module(xt), ref) < _rel(plain.module(xt), ref)


# ------------------------------------------------------------------------------------------------ pipeline
def test_composes_with_shrink_verified_and_recorded():
    torch.manual_seed(1)
    m = _realistic_bn(RandCNN(), (3, 16, 16), seed=1)
    x = torch.randn(4, 3, 16, 16)
    out = _compile(m, x, [ChannelPrune(0.5, importance="l1"), UDFCompensate(bits=6), Shrink()])
    assert out.report.verified is True
    assert sum(p.numel() for p in out.module.parameters()) < sum(p.numel() for p in m.parameters())
    rec = out.program.records_of(UDFCRecord)
    assert len(rec) == 1 and rec[0].bits == 6 and rec[0].compensated
    assert set(rec[0].quantized) == {"c1.weight", "c2.weight", "c3.weight", "fc.weight"}
    # the shrunk weights keep 6-bit levels per output channel (Shrink only slices)
    w = out.module.c2.weight if hasattr(out.module, "c2") else dict(out.module.named_parameters())["c2.weight"]
    for row in w.detach().reshape(w.shape[0], -1):
        s = row.abs().max() / 31
        assert torch.allclose(row / s, torch.round(row / s), atol=1e-3)


def test_quantisation_only_on_a_traced_program():
    torch.manual_seed(2)
    m = _realistic_bn(RandCNN(), (3, 16, 16), seed=2)
    out = _compile(m, torch.randn(4, 3, 16, 16), [UDFCompensate(bits=4)])
    st = out.program.history[0]["stats"]
    assert st["quantized"] and st["rel_change"] < st["rel_change_without"]


def test_options_are_validated():
    for kw in ({"bits": 1}, {"bits": 4.0}, {"mode": "pairs"}, {"no_bn": "fold"}, {"ridge": -1}):
        with pytest.raises(InputError):
            UDFCompensate(**kw)
