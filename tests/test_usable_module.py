"""The module fxprune.compile returns is one users keep working with (issue 12): train()/eval() switch BatchNorm and
dropout, fine-tuning updates running statistics and lowers the loss, torch.save/torch.load round-trips in a fresh
process, state_dict keys are the original model's, inputs keep their positional/keyword/nested structure."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import InputError
from fxprune.module import PrunedModule
from fxprune.passes import ChannelPrune, Shrink


class BNNet(nn.Module):
    def __init__(self, p: float = 0.3):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(self.c2(y))) + y
        return self.fc(self.drop(y.mean((2, 3))))


def _compiled(p: float = 0.3, batch: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    m = BNNet(p)
    with torch.no_grad():  # observable BN statistics
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    m.eval()
    x = torch.randn(batch, 3, 8, 8)
    out = fxprune.compile(m, (x,), passes=[ChannelPrune(0.5), Shrink()])
    return m, x, out


def test_module_is_a_pruned_module_in_eval_mode():
    m, x, out = _compiled()
    assert isinstance(out.module, PrunedModule) and isinstance(out.module, torch.fx.GraphModule)
    assert not out.module.training
    flags = [n.args[5] for n in out.module.graph.nodes if str(n.target) == "aten.batch_norm.default"]
    assert flags and not any(flags)


def test_fine_tune_updates_bn_statistics_and_lowers_the_loss():
    _, x, out = _compiled()
    mod = out.module
    torch.manual_seed(1)
    data = torch.randn(32, 3, 8, 8)
    target = torch.randint(0, 4, (32,))
    rm, rv = mod.bn1.running_mean.clone(), mod.bn1.running_var.clone()
    nbt = int(mod.bn1.num_batches_tracked)
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    mod.train()
    flags = [n.args[5] for n in mod.graph.nodes if str(n.target) == "aten.batch_norm.default"]
    assert flags and all(flags)
    with torch.no_grad():
        mod.eval()
        first = nn.functional.cross_entropy(mod(data), target).item()
        mod.train()
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(mod(data), target)
        loss.backward()
        opt.step()
    assert not torch.equal(mod.bn1.running_mean, rm) and not torch.equal(mod.bn1.running_var, rv)
    assert int(mod.bn1.num_batches_tracked) == nbt + 25
    mod.eval()
    with torch.no_grad():
        last = nn.functional.cross_entropy(mod(data), target).item()
    assert last < first
    rm2 = mod.bn1.running_mean.clone()
    with torch.no_grad():
        mod(data)
    assert torch.equal(mod.bn1.running_mean, rm2)  # eval: statistics frozen again


def test_train_mode_matches_eager_batchnorm():
    """Unpruned (no passes): train-mode outputs and running-statistics updates equal the eager model's."""
    torch.manual_seed(0)
    m = BNNet(p=0.0).eval()
    x = torch.randn(8, 3, 8, 8)
    out = fxprune.compile(m, (x,), passes=[])
    mod = out.module
    eager = copy.deepcopy(m).train()
    mod.train()
    y = torch.randn(8, 3, 8, 8)
    torch.testing.assert_close(mod(y), eager(y))
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.num_batches_tracked"):
        torch.testing.assert_close(mod.get_buffer(name), eager.get_buffer(name))


def test_dropout_active_in_train_mode_only():
    _, x, out = _compiled(p=0.5)
    mod = out.module
    with torch.no_grad():
        e1, e2 = mod(x), mod(x)
        assert torch.equal(e1, e2)  # eval: deterministic
        mod.train()
        torch.manual_seed(3)
        t1 = mod(x)
        t2 = mod(x)
    assert not torch.equal(t1, t2)  # dropout draws a new mask each call
    drop = [n.args[2] for n in mod.graph.nodes if str(n.target) == "aten.dropout.default"]
    assert drop == [True]
    mod.eval()
    assert [n.args[2] for n in mod.graph.nodes if str(n.target) == "aten.dropout.default"] == [False]


def test_submodule_flags_drive_their_nodes():
    _, x, out = _compiled()
    mod = out.module
    mod.train()
    mod.bn1.eval()  # the usual way to freeze one BatchNorm
    rm1, rm2 = mod.bn1.running_mean.clone(), mod.bn2.running_mean.clone()
    with torch.no_grad():
        mod(x)
    assert torch.equal(mod.bn1.running_mean, rm1)
    assert not torch.equal(mod.bn2.running_mean, rm2)
    mod.train()
    for m in mod.norm_modules():  # every BatchNorm frozen, the rest (dropout) trains
        m.eval()
    assert mod.norm_modules() == [mod.bn1, mod.bn2]
    rm1, rm2 = mod.bn1.running_mean.clone(), mod.bn2.running_mean.clone()
    with torch.no_grad():
        mod(x)
    assert torch.equal(mod.bn1.running_mean, rm1) and torch.equal(mod.bn2.running_mean, rm2)
    assert [n.args[2] for n in mod.graph.nodes if str(n.target) == "aten.dropout.default"] == [True]
    mod.train()
    for m in mod.modules():  # flags set directly (no train() call) are honoured at the next call
        m.training = False
    rm2 = mod.bn2.running_mean.clone()
    with torch.no_grad():
        mod(x)
    assert torch.equal(mod.bn2.running_mean, rm2)


def test_state_dict_has_the_original_names_and_smaller_shapes():
    m, x, out = _compiled()
    sd, orig = out.module.state_dict(), m.state_dict()
    assert set(sd) == set(orig)
    assert any(sd[k].shape != orig[k].shape for k in sd)
    assert all(sd[k].dim() == orig[k].dim() and all(a <= b for a, b in zip(sd[k].shape, orig[k].shape))
               for k in sd)


def test_state_dict_round_trip_into_a_fresh_compile():
    _, x, out = _compiled()
    mod = out.module
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "fine-tuned" weights
    sd = copy.deepcopy(mod.state_dict())
    _, _, again = _compiled()  # the same pruning, the original weights
    assert not torch.equal(again.module(x), mod(x))
    again.module.load_state_dict(sd)
    torch.testing.assert_close(again.module(x), mod(x), rtol=0, atol=0)


def test_torch_save_and_load_in_a_fresh_process(tmp_path):
    _, x, out = _compiled()
    mod = out.module
    path, xin, ref = tmp_path / "pruned.pt", tmp_path / "x.pt", tmp_path / "ref.pt"
    torch.save(mod, path)
    torch.save(x, xin)
    with torch.no_grad():
        torch.save(mod(x), ref)
    script = textwrap.dedent(f"""
        import torch
        m = torch.load({str(path)!r}, weights_only=False)
        x = torch.load({str(xin)!r})
        ref = torch.load({str(ref)!r})
        assert type(m).__name__ in ("PrunedModule", "GraphModuleImpl"), type(m)
        assert not m.training
        with torch.no_grad():
            assert torch.equal(m(x), ref), (m(x) - ref).abs().max()
        n = int(m.bn1.num_batches_tracked)
        m.train()
        m(x)
        assert int(m.bn1.num_batches_tracked) == n + 1
        m.eval()
        torch.save(m, {str(tmp_path / "again.pt")!r})
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    back = torch.load(tmp_path / "again.pt", weights_only=False)  # and back again
    assert isinstance(back, PrunedModule)
    with torch.no_grad():
        assert back(x).shape == mod(x).shape


def test_pickled_in_train_mode_comes_back_in_train_mode(tmp_path):
    _, x, out = _compiled()
    mod = out.module.train()
    torch.save(mod, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    assert back.training
    assert all(n.args[5] for n in back.graph.nodes if str(n.target) == "aten.batch_norm.default")
    back.eval()
    mod.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), mod(x), rtol=0, atol=0)


def test_deepcopy_keeps_modes_and_state():
    _, x, out = _compiled()
    mod = out.module
    c = copy.deepcopy(mod)
    assert isinstance(c, PrunedModule) and set(c.state_dict()) == set(mod.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(c(x), mod(x), rtol=0, atol=0)
    c.train()
    c(x)
    assert int(c.bn1.num_batches_tracked) == int(mod.bn1.num_batches_tracked) + 1
    assert not mod.training


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3)
        self.c = nn.Linear(12, 2)

    def forward(self, x, scale=None):
        h = torch.relu(self.a(x))
        if scale is not None:
            h = h * scale
        return {"logits": self.b(h), "aux": (self.c(h), h.sum(-1))}


def test_keyword_inputs_and_nested_outputs_keep_their_structure():
    torch.manual_seed(0)
    m = DictNet().eval()
    x, s = torch.randn(4, 6), torch.rand(4, 1) + 0.5
    out = fxprune.compile(m, {"x": x, "scale": s}, passes=[ChannelPrune(0.5), Shrink()])
    mod = out.module
    y = mod(x=x, scale=s)
    assert set(y) == {"logits", "aux"} and isinstance(y["aux"], tuple) and y["logits"].shape == (4, 3)
    y2 = mod(x, s)  # positional works too
    torch.testing.assert_close(y2["logits"], y["logits"])
    assert mod.output_names() == ["logits", "aux_0", "aux_1"]
    assert mod.input_names() == ["x", "scale"]
    y3 = mod(x=torch.randn(7, 6), scale=torch.rand(7, 1))  # keyword inputs: dynamic batch too
    assert y3["logits"].shape == (7, 3)


def test_input_errors_name_the_input_and_dim():
    _, x, out = _compiled()
    with pytest.raises(InputError, match=r"input 'x'.*dim 1 is fixed at 3") as e:
        out.module(torch.randn(2, 4, 8, 8))
    assert "\x1b" not in str(e.value)
    with pytest.raises(InputError, match="4 dims"):
        out.module(torch.randn(3, 8, 8))
    assert out.module(torch.randn(5, 3, 8, 8)).shape == (5, 4)  # the batch is free
