"""fxprune.train: the BN-gamma sparsity regularizer (schedules, modes, prunable-only) and train_mode."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import InputError
from fxprune.passes import Shrink
from fxprune.passes.bn_prune import BNScalePrune
from fxprune.testing import make_observable
from fxprune.train import SparsityRegularizer, fit, prunable_gammas, train_mode


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops on a shared 2-core machine: one intra-op thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cbr(cin, cout, s=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Net(nn.Module):
    """Two prunable conv-BN groups, a residual pair, and a BN whose output is the graph output (frozen)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 16, 2)
        self.r = nn.Sequential(cbr(16, 16), nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.out = nn.Conv2d(16, 4, 1, bias=False)
        self.out_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.b(self.a(x))
        x = F.relu(x + self.r(x))
        return self.out_bn(self.out(x)).mean((2, 3))


def data(n_batches=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_batches, 8, 3, 8, 8, generator=g)
    ys = torch.randint(0, 4, (n_batches, 8), generator=g)
    return list(zip(xs, ys))


def make(seed=0):
    torch.manual_seed(seed)
    return Net(), (torch.randn(2, 3, 8, 8),)


def test_prunable_gammas_skip_frozen_groups():
    m, x = make()
    reg = SparsityRegularizer(m, example_inputs=x, s=1e-2)
    names = set(reg.params)
    assert {"a.1.weight", "b.1.weight", "r.0.1.weight", "r.2.weight"} <= names
    assert "out_bn.weight" not in names  # its channels are the graph output: frozen
    assert reg.summary()["channels"] == 8 + 16 + 16 + 16
    # the frozen gamma's gradient is untouched by the hooks
    loss = F.cross_entropy(m(x[0]), torch.tensor([0, 1]))
    ref = copy.deepcopy(m)
    loss.backward()
    reg.detach()
    loss2 = F.cross_entropy(ref(x[0]), torch.tensor([0, 1]))
    loss2.backward()
    assert torch.equal(m.out_bn.weight.grad, ref.out_bn.weight.grad)
    assert not torch.equal(m.a[1].weight.grad, ref.a[1].weight.grad)


def test_regularized_gammas_fall_faster_than_unregularized():
    m, x = make()
    plain = copy.deepcopy(m)
    reg = SparsityRegularizer(m, example_inputs=x, s=3e-2)
    before = reg.gammas().clone()
    fit(m, data(20), F.cross_entropy, epochs=1, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), regularizer=reg)
    reg.detach()
    fit(plain, data(20), F.cross_entropy, epochs=1, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1))
    plain_g = torch.cat([plain.get_parameter(n).detach().abs().flatten() for n in reg.params])
    after = reg.gammas()
    assert after.mean() < plain_g.mean() - 0.02
    drop_reg, drop_plain = (before - after).mean(), (before - plain_g).mean()
    assert drop_reg > drop_plain + 0.02  # 20 steps x lr 0.1 x s 0.03 = 0.06 extra drop per gamma, minus noise


def test_hook_grad_and_loss_modes_agree():
    results = []
    for mode in ("hook", "grad", "loss"):
        m, x = make()
        reg = SparsityRegularizer(m, example_inputs=x, s=1e-2, mode=mode, schedule="decay", epochs=2)
        fit(m, data(5), F.cross_entropy, epochs=2, optimizer=torch.optim.SGD(m.parameters(), lr=0.05),
            regularizer=reg)
        reg.detach()
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)
    assert torch.allclose(results[0], results[2], atol=1e-5)


def test_schedule_values_at_the_ends():
    m, x = make()
    decay = SparsityRegularizer(m, example_inputs=x, s=1e-4, schedule="yolov8", epochs=100, mode="loss")
    assert decay.value(0) == pytest.approx(1e-4)
    assert decay.value(100) == pytest.approx(1e-5)
    assert decay.value(50) == pytest.approx(1e-4 * (1 - 0.9 * 0.5))
    assert decay.value(1000) == pytest.approx(1e-5)  # clamped past the end
    const = SparsityRegularizer(m, example_inputs=x, s=1e-3, mode="loss")
    assert const.value(0) == const.value(123) == 1e-3
    custom = SparsityRegularizer(m, example_inputs=x, s=1.0, schedule=lambda e, E: 0.5 ** e, epochs=3, mode="loss")
    assert custom.value(0) == 1.0 and custom.value(3) == 0.125


def test_variable_rate_after_the_switch():
    m, x = make()
    make_observable(m, seed=3)  # spread gammas in [0.5, 1.5]
    reg = SparsityRegularizer(m, example_inputs=x, s=1e-3, schedule="yolov4", epochs=10, mode="loss")
    reg.step(3.9)  # before 40% of the epochs: every prunable channel at s
    rates = torch.cat([reg.rates[n].flatten()[reg._masks[n]] for n in reg.params])
    assert torch.allclose(rates, torch.full_like(rates, 1e-3)) and reg.threshold is None
    reg.step(4)  # at the switch: channels above the 65th percentile get 0.01 s
    rates = torch.cat([reg.rates[n].flatten()[reg._masks[n]] for n in reg.params])
    g = reg.gammas()
    thr = float(np.percentile(g.numpy(), 65))
    assert reg.threshold == pytest.approx(thr)
    assert torch.allclose(rates[g > thr], torch.full_like(rates[g > thr], 1e-5))
    assert torch.allclose(rates[g <= thr], torch.full_like(rates[g <= thr], 1e-3))
    assert abs(float((g > thr).float().mean()) - 0.35) < 0.05
    assert reg.value(10) == 1e-3  # the base rate itself stays s


def test_regularizer_from_compiled_and_program():
    m, x = make()
    out = fxprune.compile(m, x, passes=[BNScalePrune(0.5), Shrink()])
    reg = SparsityRegularizer(out, s=1e-2)  # the pruned module, by qualified names
    assert reg.module is out.module
    assert reg.params["a.1.weight"].shape[0] == 4
    y = out.module(torch.randn(4, 3, 8, 8))
    y.sum().backward()
    assert out.module.get_parameter("a.1.weight").grad is not None
    reg.detach()
    dense = fxprune.compile(m, x, passes=[])
    reg2 = SparsityRegularizer(dense.program, s=1e-2, mode="loss")
    assert reg2.module is m  # the user's model: train it, then compile
    assert float(reg2.loss().detach()) > 0
    with pytest.raises(InputError):
        SparsityRegularizer(out.program, s=1e-2, module=m)  # shrunk program vs dense model: shapes differ


def test_train_mode_on_compiled_module_updates_bn_stats_and_restores():
    m, x = make()
    out = fxprune.compile(m, x, passes=[BNScalePrune(0.5), Shrink()])
    gm = out.module
    rm = gm.get_buffer("a.1.running_mean").clone()
    with torch.no_grad():
        e1 = gm(x[0] + 3)
    assert torch.equal(gm.get_buffer("a.1.running_mean"), rm)  # eval graph: stats frozen
    with train_mode(gm):
        gm(torch.randn(8, 3, 8, 8) + 3)
    assert not torch.equal(gm.get_buffer("a.1.running_mean"), rm)
    bn_flags = [n.args[5] for n in gm.graph.nodes if str(n.target) == "aten.batch_norm.default"]
    assert bn_flags and not any(bn_flags)  # restored to eval behaviour
    with torch.no_grad():
        assert gm(x[0] + 3).shape == e1.shape


def test_bad_options_raise_input_errors():
    m, x = make()
    with pytest.raises(InputError, match="example_inputs"):
        SparsityRegularizer(m, s=1e-3)
    with pytest.raises(InputError, match="schedule"):
        SparsityRegularizer(m, example_inputs=x, schedule="cosine")
    with pytest.raises(InputError, match="epochs"):
        SparsityRegularizer(m, example_inputs=x, schedule="decay")
    with pytest.raises(InputError, match="mode"):
        SparsityRegularizer(m, example_inputs=x, mode="optimizer")
    with pytest.raises(InputError, match="non-negative"):
        SparsityRegularizer(m, example_inputs=x, s=-1.0)
    with pytest.raises(InputError, match="percentile"):
        SparsityRegularizer(m, example_inputs=x, schedule="variable", epochs=3, percentile=100)
    reg = SparsityRegularizer(m, example_inputs=x)
    with pytest.raises(InputError, match="twice"):
        reg.loss()
    with pytest.raises(InputError):
        SparsityRegularizer("model")


def test_prunable_gammas_ignore():
    m, x = make()
    gs = fxprune.analyze(m, x)
    assert "a.1.weight" not in prunable_gammas(gs, ignore=["a"])
    assert "a.1.weight" in prunable_gammas(gs)


def _zero_task_loss(out, y):
    return out.sum() * 0.0  # the gammas get no task gradient: only the regularizer moves them


def test_l1_step_is_exact_under_plain_sgd():
    """Under SGD the added ``s * sign(gamma)`` is an L1 subgradient step: every regularized gamma moves towards 0 by
    exactly ``lr * s`` per step (the authors' updateBN), whatever its size."""
    m, x = make()
    reg = SparsityRegularizer(m, example_inputs=x, s=1e-2)
    with torch.no_grad():
        for p in reg.params.values():
            p.copy_(torch.linspace(-1.0, 1.5, p.numel()).reshape(p.shape))
            p[p.abs() < 0.2] = 0.5
    before = {n: p.detach().clone() for n, p in reg.params.items()}
    fit(m, data(10), _zero_task_loss, epochs=1, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), regularizer=reg)
    reg.detach()
    for n, p in reg.params.items():
        moved = before[n].abs() - p.detach().abs()
        assert torch.allclose(moved, torch.full_like(moved, 10 * 0.1 * 1e-2), atol=1e-6), n


def test_l1_step_under_sgd_momentum_and_adam():
    """With momentum 0.9 the L1 step grows to ``lr * s / (1 - 0.9)`` per step and scales with s; Adam divides the
    sign term by its own running magnitude, so a gamma moves ~``lr`` per step whatever s is (not an L1 step)."""
    moved = {}
    for opt_name in ("sgd", "adam"):
        for s in (1e-3, 1e-2):
            m, x = make()
            reg = SparsityRegularizer(m, example_inputs=x, s=s)
            g0 = reg.gammas().clone()
            opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
                   else torch.optim.Adam(m.parameters(), lr=1e-3))
            fit(m, data(20), _zero_task_loss, epochs=1, optimizer=opt, regularizer=reg)
            reg.detach()
            moved[opt_name, s] = float((g0 - reg.gammas()).mean())
    k, m_ = 20, 0.9
    expect = sum((1 - m_ ** j) / (1 - m_) for j in range(1, k + 1))  # heavy-ball partial sums
    assert moved["sgd", 1e-3] == pytest.approx(0.1 * 1e-3 * expect, rel=1e-4)
    assert moved["sgd", 1e-2] == pytest.approx(10 * moved["sgd", 1e-3], rel=1e-4)
    assert moved["adam", 1e-3] == pytest.approx(20 * 1e-3, rel=1e-3)
    assert moved["adam", 1e-2] == pytest.approx(moved["adam", 1e-3], rel=1e-3)


def test_fit_steps_the_scheduler_per_optimizer_step():
    m, _ = make()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    hist = fit(m, data(6), F.cross_entropy, epochs=2, optimizer=opt, scheduler=sch)
    assert hist["steps"] == 12 and opt.param_groups[0]["lr"] == pytest.approx(0.1 / 13)
