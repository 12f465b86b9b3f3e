"""FTWT: mass targets (brute force), gradient-free masks (STE optional), residual gates, auto block discovery, dynamic MACs, gather path, training."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
import fxprune.data
from fxprune.errors import BackendUnavailableError, InputError
from fxprune.flops import count_macs
from fxprune.passes.ftwt import (FTWTGate, FTWTGates, FTWTLoss, FTWTRecord, backbone_parameters, ftwt_targets, gather_module,
                                 mask_accuracy, predictor_parameters)
from fxprune.passes.ftwt_flops import dynamic_macs, layer_costs

torch.set_num_threads(1)


class CNN(nn.Module):
    def __init__(self, c=(8, 16, 16)):
        super().__init__()
        self.c1 = nn.Conv2d(1, c[0], 3, padding=1)
        self.b1 = nn.BatchNorm2d(c[0])
        self.c2 = nn.Conv2d(c[0], c[1], 3, padding=1)
        self.b2 = nn.BatchNorm2d(c[1])
        self.c3 = nn.Conv2d(c[1], c[2], 3, padding=1)
        self.b3 = nn.BatchNorm2d(c[2])
        self.fc = nn.Linear(c[2] * 7 * 7, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.b2(self.c2(x)))
        x = F.max_pool2d(F.relu(self.b3(self.c3(x))), 2)
        return self.fc(x.flatten(1))


class ResBlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 12, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + self.b(F.relu(self.bn_a(self.a(h))))
        return self.head(h.mean((2, 3)))


def _randomize_predictors(module, seed=0, std=2.0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FTWTGate):
            with torch.no_grad():
                m.predictor.weight.copy_(torch.randn(m.predictor.weight.shape, generator=g) * std)
                m.predictor.bias.zero_()


# ----------------------------------------------------------------------------------------------- targets
def _brute_force(p_row, mass):
    c = len(p_row)
    for k in range(c + 1):
        best = None
        for sub in itertools.combinations(range(c), k):
            s = sum(p_row[i] for i in sub)
            if s >= mass - 1e-12 and (best is None or s > best[0]):
                best = (s, set(sub))
        if best is not None:
            return best[1]
    return set(range(c))


@pytest.mark.parametrize("mass", [0.5, 0.8, 0.9, 0.97, 1.0])
def test_targets_are_the_minimal_set_reaching_the_mass(mass):
    g = torch.Generator().manual_seed(int(mass * 100))
    for c in range(1, 8):
        a = torch.randn(6, c, 3, 4, generator=g) * torch.rand(6, c, 1, 1, generator=g) * 3
        tgt = ftwt_targets(a, mass)
        assert tgt.shape == (6, c) and tgt.dtype == torch.bool
        s = a.abs().amax((2, 3)).double()
        prob = (s / s.sum(1, keepdim=True)).numpy()
        for n in range(6):
            want = _brute_force(prob[n].tolist(), mass)
            got = set(torch.nonzero(tgt[n]).flatten().tolist())
            assert got == want, (c, n, prob[n], got, want)
            assert prob[n][list(got)].sum() >= mass - 1e-9
    # heat-map score is max over space of |a|: a single strong pixel makes a channel dominant
    a = torch.zeros(1, 3, 5, 5)
    a[0, 0, 2, 2] = -10.0
    a[0, 1] = 0.5
    a[0, 2] = 0.4
    assert ftwt_targets(a, 0.9).tolist() == [[True, False, False]]
    assert ftwt_targets(a, 0.95).tolist() == [[True, True, False]]
    assert ftwt_targets(torch.zeros(2, 4), 0.9).sum() == 0  # dead block: empty set
    with pytest.raises(InputError, match="mass"):
        ftwt_targets(a, 0.0)


# ----------------------------------------------------------------------------------------------- rewrite
def test_auto_blocks_use_the_graph_and_start_dense():
    torch.manual_seed(0)
    model = CNN().eval()
    x = torch.randn(4, 1, 28, 28)
    out = fxprune.compile(model, (x,), passes=[FTWTGates()])
    st = out.report.passes[-1]["stats"]
    assert st["blocks"] == ["c1", "c2", "c3"] and st["channels"] == [8, 16, 16]
    assert out.program.records_of(FTWTRecord)[-1].gates[0]["block"] == ["conv2d", "batch_norm", "relu"]
    with torch.no_grad():
        torch.testing.assert_close(out.module(x), model(x))  # predictors start "all on"
    # shapes stay valid for later passes
    for n in out.module.graph.nodes:
        if n.op == "call_module" and n.target.startswith("ftwt_gate"):
            assert tuple(n.meta["val"].shape) == tuple(n.args[1].meta["val"].shape)
    # residual net: the conv feeding the add shares its channels with the stem -> left dense
    res = fxprune.compile(ResBlockNet().eval(), (torch.randn(2, 3, 8, 8),), passes=[FTWTGates()])
    st = res.report.passes[-1]["stats"]
    assert st["blocks"] == ["a"]
    assert "b.weight" in st["skipped"] and "stem.weight" in st["skipped"]
    named = fxprune.compile(ResBlockNet().eval(), (torch.randn(2, 3, 8, 8),), passes=[FTWTGates(blocks=["b"])])
    assert named.report.passes[-1]["stats"]["blocks"] == ["b"]


def test_gate_multiplies_block_output_per_sample():
    torch.manual_seed(0)
    model = CNN().eval()
    x = torch.randn(5, 1, 28, 28)
    out = fxprune.compile(model, (x,), passes=[FTWTGates(blocks=["c2"])])
    _randomize_predictors(out.module)
    gate = out.module.get_submodule("ftwt_gate_0")
    with torch.no_grad():
        y = out.module(x)
        m = gate.last_mask
        assert m.shape == (5, 16) and 0 < int(m.sum()) < m.numel()
        h = F.max_pool2d(F.relu(model.b1(model.c1(x))), 2)
        pooled = F.adaptive_avg_pool2d(h, 1)
        assert torch.equal(m, gate.predictor(pooled).flatten(1) > 0)
        h2 = F.relu(model.b2(model.c2(h))) * m[:, :, None, None]
        ref = model.fc(F.max_pool2d(F.relu(model.b3(model.c3(h2))), 2).flatten(1))
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_predictors_learn_only_from_the_mask_loss_unless_ste():
    """Authors' code (utils/layers.py): the binary mask is built under no_grad, so the task loss never reaches the
    predictors (both modes); the mask loss reaches the backbone only in joint mode. ste=True is the explicit
    straight-through option, through which the task loss does reach them."""
    torch.manual_seed(0)
    model = CNN()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for mode in ("decoupled", "joint"):
        for ste in (False, True):
            out = fxprune.compile(model, (x,), passes=[FTWTGates(mode=mode, init_bias=0.1, ste=ste)])
            gm = out.module
            _randomize_predictors(gm, std=0.05)  # (zero-initialised predictors pass no gradient to their input)
            F.cross_entropy(gm(x), y).backward()  # task loss alone
            got = [p.grad is not None and float(p.grad.abs().sum()) > 0 for p in predictor_parameters(gm)]
            assert all(got) if ste else not any(got), (mode, ste, got)
            assert float(gm.get_parameter("c1.weight").grad.abs().sum()) > 0  # the backbone still trains
            gm.zero_grad()
            crit = FTWTLoss(gm, mass=0.9)
            gm(x)
            crit.mask_loss()[0].backward()  # mask loss alone: reaches the backbone only in joint mode
            assert all(float(p.grad.abs().sum()) > 0 for p in predictor_parameters(gm))
            c1 = gm.get_parameter("c1.weight")
            touched = c1.grad is not None and float(c1.grad.abs().sum()) > 0
            assert touched == (mode == "joint"), mode
            crit.remove()
    assert len(backbone_parameters(gm)) == len(list(model.parameters()))


class ResNetish(nn.Module):
    """Two basic blocks: an identity one and a projection one (stride 2, 1x1 shortcut conv)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.a1, self.ba1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a2, self.ba2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b1, self.bb1 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.b2, self.bb2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.down, self.bd = nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.ba2(self.a2(F.relu(self.ba1(self.a1(h))))) + h)
        h = F.relu(self.bb2(self.b2(F.relu(self.bb1(self.b1(h))))) + self.bd(self.down(h)))
        return self.head(h.mean((2, 3)))


def test_residual_blocks_are_gated_after_the_add():
    torch.manual_seed(0)
    model = ResNetish().eval()
    for m in model.modules():  # non-trivial BN statistics, so folding is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(6, 3, 12, 12)
    plain = fxprune.compile(model, (x[:2],), passes=[FTWTGates()])
    assert plain.report.passes[-1]["stats"]["blocks"] == ["a1", "b1"]  # residual-coupled convs left dense
    out = fxprune.compile(model, (x[:2],), passes=[FTWTGates(residual=True)])
    st = out.report.passes[-1]["stats"]
    assert st["blocks"] == ["a1", "a2", "b1", "b2"] and st["residual"] == [False, True, False, True]
    assert "down.weight" in st["skipped"] and "same add" in st["skipped"]["down.weight"]
    rec = out.program.records_of(FTWTRecord)[-1].gates
    assert rec[1]["block"][-2:] == ["add", "relu_2"]  # gate after the add and its ReLU
    gm = out.module
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))  # starts all on
    _randomize_predictors(gm, seed=3)
    g = {n: m for n, m in gm.named_modules() if isinstance(m, FTWTGate)}
    with torch.no_grad():
        y = gm(x)
        m = {k: v.last_mask[:, :, None, None].float() for k, v in g.items()}
        h = F.relu(model.bn0(model.stem(x)))
        t = F.relu(model.ba1(model.a1(h))) * m["ftwt_gate_0"]
        h = F.relu(model.ba2(model.a2(t)) + h) * m["ftwt_gate_1"]
        t = F.relu(model.bb1(model.b1(h))) * m["ftwt_gate_2"]
        h = F.relu(model.bb2(model.b2(t)) + model.bd(model.down(h))) * m["ftwt_gate_3"]
        torch.testing.assert_close(y, model.head(h.mean((2, 3))), atol=1e-5, rtol=1e-5)
    assert 0 < float(m["ftwt_gate_1"].mean()) < 1
    layers, _ = layer_costs(gm)
    io = {l.weight: (l.in_gate, l.out_gate) for l in layers}
    assert io["a2.weight"] == ("ftwt_gate_0", "ftwt_gate_1") and io["b1.weight"] == ("ftwt_gate_1", "ftwt_gate_2")
    assert io["down.weight"] == ("ftwt_gate_1", None) and io["b2.weight"] == ("ftwt_gate_2", "ftwt_gate_3")
    dm = dynamic_macs(gm, [x])
    gathered = gather_module(gm)
    assert sum(type(mm).__name__ == "GatherUnit" for mm in gathered.modules()) == 4
    with torch.no_grad():
        for i in range(len(x)):
            xi = x[i:i + 1]
            torch.testing.assert_close(gathered(xi), gm(xi), atol=1e-5, rtol=1e-5)
            assert count_macs(gathered, (xi,)) == int(dm.per_sample[i])
    assert (dm.per_sample < dm.dense).all()


# ----------------------------------------------------------------------------------------------- MACs + gather
def test_dynamic_macs_per_sample_below_dense_and_match_the_gather_path():
    torch.manual_seed(0)
    model = CNN().eval()
    x = torch.randn(16, 1, 28, 28)
    out = fxprune.compile(model, (x[:2],), passes=[FTWTGates()])
    _randomize_predictors(out.module, seed=1)
    dm = dynamic_macs(out.module, [x[:8], x[8:]])
    assert dm.dense == count_macs(model, (x[:1],))  # the dense reference is torch's count for one sample
    layers, overhead = layer_costs(out.module)
    assert overhead == 1 * 8 + 8 * 16 + 16 * 16
    assert [(l.in_gate, l.out_gate) for l in layers] == [(None, "ftwt_gate_0"), ("ftwt_gate_0", "ftwt_gate_1"),
                                                         ("ftwt_gate_1", "ftwt_gate_2"), ("ftwt_gate_2", None)]
    assert dm.per_sample.shape == (16,)
    assert (dm.per_sample < dm.dense).all()
    summ = dm.summary()
    assert summ["mean_macs"] < dm.dense and summ["min_macs"] <= summ["percentiles"]["p50"] <= summ["max_macs"]
    assert sum(summ["histogram"]["counts"]) == 16
    g1 = gather_module(out.module)
    kinds = sorted(type(m).__name__ for m in g1.modules() if type(m).__name__.startswith("Gather"))
    assert kinds == ["GatherConsumer", "GatherUnit", "GatherUnit", "GatherUnit"]
    with torch.no_grad():
        for i in range(6):
            xi = x[i:i + 1]
            torch.testing.assert_close(g1(xi), out.module(xi), atol=1e-5, rtol=1e-5)
            assert count_macs(g1, (xi,)) == int(dm.per_sample[i])  # computes exactly the active channels
    with pytest.raises(InputError, match="batch 1"):
        g1(x[:2])


# ----------------------------------------------------------------------------------------------- training
def test_mask_accuracy_after_short_training_on_fashion_mnist():
    try:
        xtr, ytr = fxprune.data.fashion_mnist("train", 4096)
        xte, yte = fxprune.data.fashion_mnist("test", 1000)
    except BackendUnavailableError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    torch.manual_seed(0)
    model = CNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for xb, yb in fxprune.data.loader(xtr, ytr, batch_size=64, seed=0):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    # mass 0.6: about half of the channels are targets, so "all on" scores ~0.5 and 0.8 needs real predictions
    out = fxprune.compile(model, (xtr[:2],), passes=[FTWTGates(mass=0.6)], seed=0)
    gm = out.module
    before = mask_accuracy(gm, [(xte, yte)])
    crit = FTWTLoss(gm, mask_weight=1.0)
    opt_m = torch.optim.SGD(predictor_parameters(gm), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(backbone_parameters(gm), lr=1e-3, momentum=0.9)
    epochs = 2
    for e in range(epochs):
        crit.set_epoch(e, 2 * epochs)  # mask loss on in the first half of a (longer) schedule
        for xb, yb in fxprune.data.loader(xtr, ytr, batch_size=64, seed=e + 1):
            loss = crit(gm(xb), yb)
            opt_m.zero_grad()
            opt_b.zero_grad()
            loss.backward()
            opt_m.step()
            opt_b.step()
    crit.remove()
    after = mask_accuracy(gm, [(xte, yte)])
    assert before["accuracy"] < 0.6
    assert after["accuracy"] > 0.8, after
    assert all(0.2 < v < 0.9 for v in after["predicted_active"].values()), after  # per-sample, not constant
    dm = dynamic_macs(gm, [xte])
    assert dm.mean < 0.6 * dm.dense and dm.per_sample.std() > 0  # dynamic: cost varies per input
    with torch.no_grad():
        acc = float((gm(xte).argmax(1) == yte).float().mean())
        acc_dense = float((model(xte).argmax(1) == yte).float().mean())
    assert acc > acc_dense - 0.05
    crit.set_epoch(3, 4)
    assert crit.weight_now == 0.0


# ----------------------------------------------------------------------------------------------- export + errors
def test_gated_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import warnings

    torch.manual_seed(0)
    model = CNN().eval()
    x = torch.randn(3, 1, 28, 28)
    out = fxprune.compile(model, (x,), passes=[FTWTGates()])
    _randomize_predictors(out.module, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.onnx.export(out.module, (x,), dynamo=True, verbose=False)
    ep.save(str(tmp_path / "ftwt.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "ftwt.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, out.module(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw,match", [({"mass": 0}, "mass"), ({"mass": 1.2}, "mass"), ({"mode": "both"}, "mode"),
                                      ({"blocks": "all"}, "blocks"), ({"blocks": []}, "blocks"),
                                      ({"ste": 1}, "ste"), ({"residual": "yes"}, "residual")])
def test_bad_options(kw, match):
    with pytest.raises(InputError, match=match):
        FTWTGates(**kw)


def test_errors_at_run_time():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(InputError, match="no conv2d block named"):
        fxprune.compile(CNN().eval(), (x,), passes=[FTWTGates(blocks=["conv9"])])
    with pytest.raises(InputError, match="no block to gate"):
        fxprune.compile(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (x,), passes=[FTWTGates()])
    with pytest.raises(InputError, match="no FTWT gate"):
        FTWTLoss(CNN())
    with pytest.raises(InputError, match="no FTWT gate"):
        dynamic_macs(fxprune.compile(CNN().eval(), (x,), passes=[]).module, [x])


def test_gating_after_shrink_and_pending_masks_are_refused():
    from fxprune.passes import ApplyMasks, ChannelPrune, Shrink
    from fxprune.passes.macprune import MACPruneGate

    torch.manual_seed(0)
    model = CNN().eval()
    x = torch.randn(2, 1, 28, 28)
    out = fxprune.compile(model, (x,), passes=[ChannelPrune(ratio=0.5), Shrink(), FTWTGates(),
                                               MACPruneGate(importance=torch.rand(28, 28), mode="mac")])
    assert out.report.passes[-2]["stats"]["channels"] == [4, 8, 8]  # gates on the shrunk convs
    assert out.report.macs_after < out.report.macs_before
    with torch.no_grad():
        assert out.module(x).shape == (2, 10)
    with pytest.raises(InputError, match="not applied"):
        fxprune.compile(model, (x,), passes=[ChannelPrune(ratio=0.5), FTWTGates()])
    masked = fxprune.compile(model, (x,), passes=[ChannelPrune(ratio=0.5), ApplyMasks(), FTWTGates()])
    assert masked.program.masks == {}
