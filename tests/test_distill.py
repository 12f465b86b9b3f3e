"""fxprune.distill: SAD and CWD losses, taps resolved by name on the dense and the pruned program."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.distill import (ChannelWiseLoss, FeatureTaps, SpatialAttentionLoss, cwd_loss, resolve_tap, sad_loss,
                             spatial_attention)
from fxprune.errors import InputError
from fxprune.passes import Shrink
from fxprune.passes.bn_prune import BNScalePrune
from fxprune.testing import make_observable
from fxprune.train import fit


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
    def __init__(self):
        super().__init__()
        self.stem, self.stage = cbr(3, 8), cbr(8, 16, 2)
        self.block = nn.Sequential(cbr(16, 16), nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stage(self.stem(x))
        x = F.relu(x + self.block(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = make_observable(Net().eval())
    x = (torch.randn(2, 3, 8, 8),)
    dense = fxprune.trace(m, x)
    out = fxprune.compile(m, x, passes=[BNScalePrune(0.5), Shrink()])
    return m, x, dense, out


def test_sad_zero_for_identical_and_gradient_otherwise():
    torch.manual_seed(0)
    t = torch.randn(2, 8, 5, 5)
    assert float(sad_loss([t], [t.clone()], [1.0])) == 0.0
    # identical attention maps from different channel counts: still zero (no adapter needed)
    t2 = torch.cat([t, t], 1)
    assert float(sad_loss([t], [t2], [1.0])) == pytest.approx(0.0, abs=1e-12)
    s = torch.randn(2, 4, 5, 5, requires_grad=True)
    loss = sad_loss([t], [s], [2.0])
    assert float(loss.detach()) > 0
    loss.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    a = spatial_attention(t)
    assert a.shape == (2, 25) and torch.allclose(a.norm(dim=1), torch.ones(2))
    # betas scale linearly
    with torch.no_grad():
        assert float(sad_loss([t], [s], [2.0])) == pytest.approx(2 * float(sad_loss([t], [s], [1.0])))


def test_cwd_zero_identical_positive_otherwise_scales_with_tau_squared():
    torch.manual_seed(0)
    t, s = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    assert float(cwd_loss(t, t.clone(), 4.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(cwd_loss(t, s, 4.0)) > 0
    # softmax(2y / 2tau) == softmax(y / tau): the KL is unchanged, so the loss grows exactly by (2tau)^2 / tau^2
    for tau in (1.0, 4.0):
        assert float(cwd_loss(2 * t, 2 * s, 2 * tau)) == pytest.approx(4 * float(cwd_loss(t, s, tau)), rel=1e-5)
    # matches the per-channel KL definition
    n, c = t.shape[:2]
    kl = F.kl_div(F.log_softmax(s.reshape(n * c, -1) / 4, 1), F.softmax(t.reshape(n * c, -1) / 4, 1),
                  reduction="sum")
    assert float(cwd_loss(t, s, 4.0)) == pytest.approx(float(kl) * 16 / (n * c), rel=1e-5)


def test_taps_resolve_by_name_after_shrinking(setup):
    m, x, dense, out = setup
    pruned = out.module
    for tap in ("relu_1", "relu_3", "stage", "block.2"):
        a, b = resolve_tap(dense, tap), resolve_tap(pruned, tap)
        assert a.name == b.name
    assert resolve_tap(pruned, "stage").name == "relu_1"  # a module tap is its output node
    ta, _ = FeatureTaps(dense, ["relu_1"])(*x)[1]["relu_1"].shape, None
    tb = FeatureTaps(pruned, ["relu_1"])(*x)[1]["relu_1"].shape
    assert ta[1] == 16 and tb[1] == 8 and ta[2:] == tb[2:]
    with pytest.raises(InputError, match="neither a node nor a module"):
        resolve_tap(pruned, "nope")
    # module-name taps on a plain nn.Module use hooks and give the same values as the traced node
    eager = FeatureTaps(m, ["stage"])(*x)[1]["stage"]
    traced = FeatureTaps(dense, ["stage"])(*x)[1]["stage"]
    assert torch.allclose(eager, traced, atol=1e-5)
    with pytest.raises(InputError, match="node-name taps"):
        FeatureTaps(m, ["relu_1"])  # a plain module student cannot resolve node names


def test_cwd_adapters_and_teacher_frozen(setup):
    m, x, dense, out = setup
    student = out.module
    cwd = ChannelWiseLoss(dense, student, taps=["relu_1", "stem"], tau=4.0, weight=[1.0, 2.0])
    assert set(cwd.adapters) == {"0", "1"}  # 16 -> 8 and 8 -> 4 channels differ: 1x1 adapters
    assert cwd.adapters["0"].weight.shape == (16, 8, 1, 1)
    y, loss = cwd(torch.randn(4, 3, 8, 8))
    assert y.shape == (4, 4) and float(loss.detach()) > 0
    loss.backward()
    assert cwd.adapters["0"].weight.grad is not None
    assert student.get_parameter("stage.0.weight").grad is not None
    assert all(p.grad is None for p in dense.parameters())  # teacher under no_grad
    student.zero_grad()
    # identical models: zero loss (no adapter)
    same = ChannelWiseLoss(dense, dense, taps=["relu_3"])
    with torch.no_grad():
        assert len(same.adapters) == 0 and float(same(*x)[1]) == pytest.approx(0.0, abs=1e-6)
    # eager teacher with node-name taps: traced on the first call, same value as the traced teacher
    lazy = ChannelWiseLoss(m, student, taps=["relu_1"], example_inputs=x, seed=0)
    ref = ChannelWiseLoss(dense, student, taps=["relu_1"], seed=0)
    with torch.no_grad():
        assert float(lazy(*x)[1]) == pytest.approx(float(ref(*x)[1]), rel=1e-5)


def test_sad_training_step_reduces_the_loss(setup):
    m, x, dense, out = setup
    import copy

    student = copy.deepcopy(out.module)
    sad = SpatialAttentionLoss(dense, student, taps=["relu_1", "relu_3"], betas=[10.0, 10.0])
    assert sad.resolved_taps()["student"] == {"relu_1": "relu_1", "relu_3": "relu_3"}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), None) for _ in range(10)]
    with torch.no_grad():
        before = float(sum(sad(b)[1] for b, _ in batches))
    fit(student, batches, lambda out, y: out.new_zeros(()), epochs=3, lr=1e-2, distiller=sad)
    with torch.no_grad():
        after = float(sum(sad(b)[1] for b, _ in batches))
    assert after < before


def test_bad_options(setup):
    m, x, dense, out = setup
    with pytest.raises(InputError):
        SpatialAttentionLoss(dense, out.module, taps=[])
    with pytest.raises(InputError):
        SpatialAttentionLoss(dense, out.module, taps=["relu_1"], betas=[1.0, 2.0])
    with pytest.raises(InputError):
        ChannelWiseLoss(dense, out.module, taps=["relu_1"], tau=0)
    with pytest.raises(InputError):
        ChannelWiseLoss("teacher", out.module, taps=["relu_1"])
    with pytest.raises(InputError):
        SpatialAttentionLoss(dense, out.module, taps=[("relu_1",)])
    with pytest.raises(InputError, match="spatial"):
        sad_loss([torch.randn(1, 2, 4, 4)], [torch.randn(1, 2, 2, 2)], [1.0])
