"""save / load / replay: round trips give identical outputs, in this process and in a fresh one."""
import json
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import models
from fxprune.errors import InputError, LoadError
from fxprune.passes import ChannelPrune, Shrink
from fxprune.archive import FILES, load, save
from fxprune.replay import replay
from fxprune.report import layer_sparsity
from fxprune.testing import make_observable


class Scale(nn.Module):
    """A custom module owning a per-channel parameter; its forward adapts to the parameter's size."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class Net(nn.Module):
    """conv-BN, depthwise conv, GroupNorm, custom Scale, pointwise conv, Linear-LayerNorm-Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.gn = nn.GroupNorm(4, 16)
        self.scale = Scale(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc1 = nn.Linear(24, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = self.scale(self.gn(self.dw(self.stem(x))))
        x = torch.relu(self.pw(x)).mean((2, 3))
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


class Rigid(Net):
    """Hard-codes a channel count in forward: replay cannot make it work, and must say so."""

    def forward(self, x):
        x = self.scale(self.gn(self.dw(self.stem(x))))
        b = x.shape[0]
        x = torch.relu(self.pw(x)).reshape(b, 24, -1).mean(2)
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


def _net(cls=Net, seed=0):
    torch.manual_seed(seed)
    return make_observable(cls().eval(), seed=seed)


@pytest.fixture(scope="module")
def resnet_saved(tmp_path_factory):
    model, inputs = models.get("resnet56", size="tiny")
    make_observable(model)
    out = fxprune.compile(model, inputs, passes=[ChannelPrune(ratio=0.5), Shrink()])
    d = save(out, tmp_path_factory.mktemp("resnet") / "saved", recipe=[ChannelPrune(ratio=0.5), Shrink()])
    return out, d, inputs


@pytest.fixture(scope="module")
def net_saved(tmp_path_factory):
    x = torch.randn(2, 3, 8, 8)
    out = fxprune.compile(_net(), (x,), passes=[ChannelPrune(ratio=0.5), Shrink()])
    d = out.save(tmp_path_factory.mktemp("net") / "saved", plot=False)
    return out, d, x


def test_save_writes_everything(resnet_saved):
    out, d, _ = resnet_saved
    for name in FILES.values():
        assert (d / name).exists(), name
    rep = json.loads((d / "report.json").read_text())
    assert rep["recipe"][0]["pass"] == "channel_prune" and rep["recipe"][0]["ratio"] == 0.5
    assert rep["verified"] is True and rep["params_after"] == out.report.params_after
    assert {r["name"] for r in rep["layer_sparsity"]} >= {"conv1.weight", "fc.weight"}
    assert all(0.0 <= r["sparsity"] <= 1.0 and 0 < r["kept_fraction"] <= 1.0 for r in rep["layer_sparsity"])
    assert "pass: channel_prune" in (d / "recipe.yaml").read_text()
    assert "![" in (d / "report.md").read_text() and (d / "report.png").read_bytes()[:4] == b"\x89PNG"
    keep = json.loads((d / "keep.json").read_text())["params"]
    assert keep and all(v["status"] == "recorded" for v in keep.values())


def test_load_round_trip_in_a_fresh_process(resnet_saved, tmp_path):
    out, d, inputs = resnet_saved
    loaded = load(d)
    x = torch.randn(5, *inputs[0].shape[1:])  # another batch size: the program keeps its dynamic batch
    with torch.no_grad():
        want = out.module(x)
        assert torch.equal(loaded.module(x), want)
    assert loaded.report.params_after == out.report.params_after and loaded.program.source is None
    torch.save(x, tmp_path / "x.pt")
    torch.save(want, tmp_path / "want.pt")
    code = textwrap.dedent(f"""
        import torch
        from fxprune.archive import load
        c = load({str(d)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(c.module(x), want)
        print("OK", type(c.module).__name__, c.report.model)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout and "CifarResNet" in r.stdout, r.stderr[-2000:]


def test_replay_gives_the_users_class_with_identical_outputs(resnet_saved):
    out, d, inputs = resnet_saved
    fresh, _ = models.get("resnet56", size="tiny", seed=1)  # other weights: replay loads the saved ones
    pruned = replay(fresh, d)
    assert type(pruned) is type(fresh) and pruned is not fresh
    assert fresh.conv1.out_channels == 8 and pruned.conv1.out_channels == 4  # the argument is untouched
    x = torch.randn(3, *inputs[0].shape[1:])
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), out.module(x))
    # weights="model": the user's own weights, sliced with the kept indices (same weights here -> same outputs)
    same, _ = models.get("resnet56", size="tiny")
    make_observable(same)
    mine = replay(same, d, weights="model", inplace=True)
    assert mine is same
    with torch.no_grad():
        assert torch.equal(mine.eval()(x), out.module(x))


def test_replay_updates_standard_module_attributes(net_saved):
    out, d, x = net_saved
    pruned = replay(_net(seed=3), d)
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels == pruned.dw.weight.shape[0] < 16
    assert pruned.gn.num_channels == pruned.dw.out_channels and pruned.gn.num_channels % pruned.gn.num_groups == 0
    assert pruned.stem[1].num_features == pruned.stem[0].out_channels == pruned.stem[0].weight.shape[0]
    assert pruned.fc1.in_features == pruned.pw.out_channels and pruned.ln.normalized_shape == (pruned.fc1.out_features,)
    assert pruned.scale.gamma.shape[0] == pruned.dw.out_channels
    y = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(y), out.module(y), atol=1e-6, rtol=1e-5)
    assert [r["sparsity"] for r in layer_sparsity(pruned)] == [0.0] * 5  # conv x3 + linear x2, no zeros


def test_replay_refuses_what_it_cannot_rebuild(net_saved, resnet_saved, tmp_path):
    out, d, x = net_saved
    with pytest.raises(LoadError, match="was saved from a Net"):
        replay(models.get("resnet56", size="tiny")[0], d)
    rigid = _net(Rigid)  # same architecture, but forward hard-codes 24 channels
    out_r = fxprune.compile(rigid, (x,), passes=[ChannelPrune(ratio=0.5), Shrink()])
    dr = save(out_r, tmp_path / "rigid", plot=False)
    with pytest.raises(LoadError, match="fails on the saved example inputs"):
        replay(_net(Rigid), dr)
    with pytest.raises(LoadError, match="not a folder"):
        load(tmp_path / "nothing")
    with pytest.raises(InputError):
        save(object(), tmp_path / "x")


def test_load_refuses_pickled_objects(resnet_saved, tmp_path):
    _, d, _ = resnet_saved
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    with zipfile.ZipFile(bad / "program.pt2", "a") as z:
        z.writestr("program/data/constants/custom_obj_0", b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(LoadError, match="pickled Python objects"):
        load(bad)
    torch.save({"x": torch.ones(1)}, bad / "weights.pt")  # damaged weights: replay refuses
    with pytest.raises(LoadError, match="model has no tensor|saved program has no tensor"):
        replay(models.get("resnet56", size="tiny")[0], bad)
