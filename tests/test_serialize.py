"""save / load / replay: round trips give identical outputs, in this process and in a fresh one."""
import json
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import models
from fxprune.errors import InputError, LoadError
from fxprune.passes import ChannelPrune, Shrink
from fxprune.archive import FILES, load, save
from fxprune.replay import replay
from fxprune.report import Report, layer_sparsity
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


# ============================================================================================ recorded indices
class Twin(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _twin(seed=0):
    """conv1's filters 0 and 1 are identical, with identical BatchNorm parameters and statistics: only the
    recorded indices can tell which one the pruning kept (conv2 reads them with different weights)."""
    torch.manual_seed(seed)
    m = make_observable(Twin().eval(), seed=seed)
    with torch.no_grad():
        for t in (m.conv1.weight, m.conv1.bias, m.bn1.weight, m.bn1.bias, m.bn1.running_mean, m.bn1.running_var):
            t[1] = t[0]
    return m


def _keep_channel_1(group, program):
    scores = np.arange(group.size, dtype=np.float64)
    scores[1] = group.size + 1.0  # channel 1 is the most important, channel 0 the least
    return scores


def test_two_identical_channels_keep_the_recorded_one(tmp_path):
    model = _twin()
    x = torch.randn(2, 3, 8, 8)
    out = fxprune.compile(model, (x,), passes=[ChannelPrune(ratio=0.5, importance=_keep_channel_1), Shrink()])
    d = save(out, tmp_path / "twin", plot=False)
    keep = json.loads((d / "keep.json").read_text())
    assert keep["method"] == "recorded"
    k = keep["params"]["conv1.weight"]
    assert k["status"] == "recorded" and 1 in k["keep"][0] and 0 not in k["keep"][0]
    assert keep["params"]["conv2.weight"]["keep"][1] == k["keep"][0]
    assert keep["params"]["bn1.running_mean"]["keep"][0] == k["keep"][0]
    y = torch.randn(3, 3, 8, 8)
    for source in (d, out):  # a folder, or the Compiled in memory
        mine = replay(_twin(), source, weights="model")
        with torch.no_grad():
            assert torch.equal(mine.eval()(y), out.module(y))


class Tied(nn.Module):
    """An embedding tied to the output projection (embedding == lm_head)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.fc = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, i):
        return self.head(self.fc2(torch.relu(self.fc(self.emb(i)))))


def test_tied_parameters_have_keep_entries_under_every_name(tmp_path):
    ids = torch.tensor([[4, 9, 3, 0, 3], [9, 7, 3, 7, 1]])
    torch.manual_seed(0)
    out = fxprune.compile(Tied(), (ids,), passes=[ChannelPrune(ratio=0.5), Shrink()])
    d = save(out, tmp_path / "tied", plot=False)
    params = json.loads((d / "keep.json").read_text())["params"]
    assert params["emb.weight"] == params["head.weight"] and params["emb.weight"]["keep"][1] is not None
    assert params["head.weight"]["shape"] == list(out.module.head.weight.shape)
    torch.manual_seed(0)
    same = Tied()
    for weights in ("saved", "model"):
        for source in (d, out):
            pruned = replay(same, source, weights=weights)
            assert pruned.head.weight is pruned.emb.weight and pruned.emb.embedding_dim == pruned.head.in_features
            with torch.no_grad():
                assert torch.equal(pruned(ids), out.module(ids))


def test_replay_accepts_a_compiled_in_memory(net_saved):
    out, _, _ = net_saved
    pruned = replay(_net(seed=3), out)
    y = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(y), out.module(y), atol=1e-6, rtol=1e-5)
    with pytest.raises(LoadError, match="was made from a Net"):
        replay(models.get("resnet56", size="tiny")[0], out)
    with pytest.raises(InputError, match="save folder or a Compiled"):
        replay(_net(), 42)


def test_two_shrinks_compose_their_indices(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    passes = [ChannelPrune(ratio=0.25, importance=_keep_channel_1), Shrink(),
              ChannelPrune(ratio=0.25, importance=_keep_channel_1), Shrink()]
    out = fxprune.compile(_twin(), (x,), passes=passes)
    assert out.module.conv1.weight.shape[0] < 6
    d = save(out, tmp_path / "twice", plot=False)
    k = json.loads((d / "keep.json").read_text())["params"]["conv1.weight"]
    # the first Shrink keeps 1, 3..7 (drops the lowest scores, 0 and 2); the second drops its own channel 0 (= 1)
    assert k["orig_shape"][0] == 8 and k["keep"][0] == [3, 4, 5, 6, 7]
    assert len(k["keep"][0]) == out.module.conv1.weight.shape[0]
    loaded = load(d)  # a loaded program carries the indices too: it saves and replays the same way
    assert fxprune.archive.kept_indices(loaded)["params"]["conv1.weight"] == k
    y = torch.randn(3, 3, 8, 8)
    for source in (d, out, loaded):
        with torch.no_grad():
            assert torch.equal(replay(_twin(), source, weights="model").eval()(y), out.module(y))


def test_report_to_dict_and_back(net_saved):
    out, d, _ = net_saved
    data = json.loads((d / "report.json").read_text())
    assert data["schema"] == 1 and out.report.to_dict()["schema"] == 1
    assert out.report.as_dict() == out.report.to_dict()
    back = Report.from_dict(data)
    assert back.summary() == out.report.summary() and back.table() == out.report.table()
    assert Report.from_dict(json.loads(out.report.to_json())).groups == out.report.groups
    with pytest.raises(LoadError, match="report: field 'verified' must be true or false or null"):
        Report.from_dict({**data, "verified": "yes"})
    with pytest.raises(LoadError, match="report: field 'model' is missing"):
        Report.from_dict({k: v for k, v in data.items() if k != "model"})


def test_replay_applies_a_meta_device_plan_to_a_real_model():
    with torch.device("meta"):
        planned = Twin()
    out = fxprune.compile(planned, (torch.randn(2, 3, 8, 8, device="meta"),),
                          passes=[ChannelPrune(ratio=0.5, importance=_keep_channel_1), Shrink()])
    real = _twin()
    mine = replay(real, out, weights="model")
    assert mine.conv1.out_channels == out.module.conv1.weight.shape[0] == 4 and real.conv1.out_channels == 8
    keep = fxprune.archive.kept_indices(out)["params"]["conv1.weight"]["keep"][0]
    assert torch.equal(mine.conv1.weight, real.conv1.weight[keep])
    with pytest.raises(InputError, match="meta device"):
        replay(_twin(), out)
