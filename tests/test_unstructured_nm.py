"""Unstructured and N:M weight masks: exact counts, TensorRT layout, persistence through training, save/load, ONNX."""
import io

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import InputError
from fxprune.passes import ChannelPrune, Shrink
from fxprune.passes.nm_sparsity import NMSparsity
from fxprune.passes.sparse_kernels import (bake, check_nm, check_nm_onnx, current_masks, enforce_masks,
                                           load_masked_state_dict, nm_mask, sparsifiable_weights)
from fxprune.passes.unstructured import Unstructured
from fxprune.utils import get_tensor

torch.set_num_threads(1)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # 3 input channels: skipped by N:M
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=8)  # 4 input channels per group
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.dw(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN().eval(), (torch.randn(4, 3, 8, 8),)


def test_unstructured_layer_scope_exact_per_layer():
    m, x = _model()
    out = fxprune.compile(m, x, passes=[Unstructured(0.75)])
    wm = out.program.weight_masks
    assert set(wm) == {"stem.weight", "conv.weight", "dw.weight", "fc1.weight", "fc2.weight"}
    for name, mask in wm.items():
        keep = mask.numel() - round(0.75 * mask.numel())
        assert int(mask.sum()) == keep
        w = out.module.get_parameter(name)
        assert torch.equal(w != 0, mask)  # the compiled module carries exact zeros in the pattern
        # magnitude: every kept weight is at least as large as every removed one (in the original model)
        orig = m.get_parameter(name).detach().abs()
        assert orig[mask].min() >= orig[~mask].max()
    assert out.report.passes[0]["stats"]["sparsity"] == pytest.approx(0.75, abs=1e-3)


def test_unstructured_global_scope_and_callable_and_random():
    m, x = _model()
    out = fxprune.compile(m, x, passes=[Unstructured(0.6, scope="global")])
    wm = out.program.weight_masks
    total = sum(v.numel() for v in wm.values())
    removed = sum(int((~v).sum()) for v in wm.values())
    assert removed == round(0.6 * total)
    per = [float((~v).float().mean()) for v in wm.values()]
    assert max(per) - min(per) > 0.05  # one global threshold: layers end at different sparsities
    # a callable importance: keep the *smallest* weights
    out2 = fxprune.compile(m, x, passes=[Unstructured(0.5, importance=lambda name, w: -w.abs())])
    mask = out2.program.weight_masks["fc1.weight"]
    w = m.fc1.weight.detach().abs()
    assert w[mask].max() <= w[~mask].min()
    # random importance is seeded
    r1 = fxprune.compile(m, x, passes=[Unstructured(0.5, importance="random")], seed=3).program.weight_masks
    r2 = fxprune.compile(m, x, passes=[Unstructured(0.5, importance="random")], seed=3).program.weight_masks
    r3 = fxprune.compile(m, x, passes=[Unstructured(0.5, importance="random")], seed=4).program.weight_masks
    assert all(torch.equal(r1[k], r2[k]) for k in r1)
    assert not all(torch.equal(r1[k], r3[k]) for k in r1)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_groups_have_exactly_n_survivors_along_input_dim(n, m):
    model, x = _model()
    out = fxprune.compile(model, x, passes=[NMSparsity(n, m)])
    st = out.report.passes[0]["stats"]
    assert "stem.weight" in st["skipped"] and "3 input channels" in st["skipped"]["stem.weight"]
    if m == 8:  # the grouped conv has 4 input channels per group: skipped for M=8
        assert "dw.weight" in st["skipped"]
    for name in st["layers"]:
        mask = out.program.weight_masks[name]
        dim = 1
        g = mask.movedim(dim, -1)
        counts = g.reshape(*g.shape[:-1], g.shape[-1] // m, m).sum(-1)
        assert bool((counts == n).all()), name  # exactly N per run of M input channels (per (o, kh, kw))
        assert check_nm(out.module.get_parameter(name), n, m, dim)
        # the survivors are the N largest of each group
        w = model.get_parameter(name).detach().abs().movedim(dim, -1)
        gw = w.reshape(*w.shape[:-1], w.shape[-1] // m, m)
        gm_ = g.reshape(gw.shape)
        kept_min = torch.where(gm_, gw, torch.full_like(gw, float("inf"))).min(-1).values
        drop_max = torch.where(~gm_, gw, torch.full_like(gw, -1.0)).max(-1).values
        assert bool((kept_min >= drop_max).all())


def test_nm_conv_layout_is_over_cin_per_kernel_position():
    w = torch.randn(2, 8, 3, 3)
    mask = nm_mask(w.abs(), 2, 4, dim=1)
    for o in range(2):
        for i in range(3):
            for j in range(3):
                col = mask[o, :, i, j]
                assert int(col[:4].sum()) == 2 and int(col[4:].sum()) == 2


def test_masks_persist_through_training_and_save_load():
    model, x = _model()
    out = fxprune.compile(model, x, passes=[NMSparsity(2, 4), Unstructured(0.5, ignore=["fc2"])])
    masks = out.program.weight_masks
    gm = enforce_masks(out.module, masks)
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(1)
    for _ in range(20):
        loss = gm(torch.randn(4, 3, 8, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, mask in masks.items():
        w = get_tensor(gm, name)  # the effective (parametrized) weight
        assert bool((w[~mask] == 0).all()), name
        assert bool((w[mask] != 0).all()), name  # trained weights stay alive
    assert check_nm(gm.conv.weight, 2, 4, 1)
    xt = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = gm(xt)
    # save/load 1: the parametrized state dict into a fresh compile of the same model
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    fresh = fxprune.compile(model, x, passes=[]).module
    load_masked_state_dict(fresh, sd)
    assert set(current_masks(fresh)) == set(masks)
    with torch.no_grad():
        assert torch.allclose(fresh(xt), ref, atol=1e-6)
    # save/load 2: baked (plain) weights keep exact zeros
    bake(gm)
    assert not current_masks(gm)
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    plain = fxprune.compile(model, x, passes=[]).module
    plain.load_state_dict(torch.load(buf))
    for name, mask in masks.items():
        assert torch.equal(plain.get_parameter(name) != 0, mask)
    with torch.no_grad():
        assert torch.allclose(plain(xt), ref, atol=1e-6)


def test_weight_masks_follow_shrink():
    model, x = _model()
    out = fxprune.compile(model, x, passes=[Unstructured(0.8), ChannelPrune(0.25), Shrink()])
    assert out.report.verified is True
    for name, mask in out.program.weight_masks.items():
        w = out.module.get_parameter(name)
        assert mask.shape == w.shape
        assert bool((w[~mask] == 0).all())
    assert out.module.conv.weight.shape[0] < 32


def test_onnx_initializers_carry_the_24_pattern(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model, x = _model()
    out = fxprune.compile(model, x, passes=[NMSparsity(2, 4)])
    enforce_masks(out.module, out.program.weight_masks)
    for _ in range(3):  # train a little through the masks, then bake for export
        loss = out.module(*x).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            for p in out.module.parameters():
                if p.grad is not None:
                    p -= 0.01 * p.grad
                    p.grad = None
    gm = bake(out.module)
    path = tmp_path / "m.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(gm, x, str(path), dynamo=True, verbose=False)
    rep = check_nm_onnx(str(path), 2, 4)
    assert rep.ok, rep.layers
    assert len(rep.sparse_layers) == len(out.report.passes[0]["stats"]["layers"])
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    for name, mask in out.program.weight_masks.items():
        arr = torch.from_numpy(inits[name].copy())
        assert torch.equal(arr != 0, mask)  # exact zeros, exactly where the mask says
    # a dense model is reported as not in the pattern
    dense = fxprune.compile(model, x, passes=[]).module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(dense, x, str(tmp_path / "d.onnx"), dynamo=True, verbose=False)
    assert not check_nm_onnx(str(tmp_path / "d.onnx")).ok


def test_sparsifiable_weights_skip_tied_and_non_matmul_uses():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight
            self.fc = nn.Linear(8, 8)

        def forward(self, i):
            return self.head(self.fc(self.emb(i)))

    gm = fxprune.trace(Tied(), (torch.randint(0, 16, (2, 3)),))
    w = sparsifiable_weights(gm)
    assert list(w) == ["fc.weight"]
    assert w["fc.weight"].kind == "linear" and w["fc.weight"].reduction_dim == 1


@pytest.mark.parametrize("bad", [
    lambda: Unstructured(1.0), lambda: Unstructured(-0.1), lambda: Unstructured(0.5, scope="net"),
    lambda: Unstructured(0.5, importance="l7"), lambda: Unstructured(0.5, ignore=[3]),
    lambda: NMSparsity(4, 4), lambda: NMSparsity(0, 4), lambda: NMSparsity(2.0, 4),
])
def test_bad_options_raise_input_error(bad):
    with pytest.raises(InputError):
        bad()


def test_enforce_masks_rejects_wrong_shapes():
    model, x = _model()
    gm = fxprune.compile(model, x, passes=[]).module
    with pytest.raises(InputError):
        enforce_masks(gm, {"fc2.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(InputError):
        enforce_masks(gm, {"nope.weight": torch.ones(3, 3, dtype=torch.bool)})
