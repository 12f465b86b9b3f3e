"""PDP soft masks: exact keep fraction, m(+-t) = 0.5, gradients through pruned weights, N:M, channel, finalize."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
import fxprune.data
from fxprune.errors import BackendUnavailableError, InputError
from fxprune.passes.pdp import PDP, soft_mask
from fxprune.passes.sparse_kernels import check_nm, current_masks, enforce_masks, load_masked_state_dict
from fxprune.utils import get_tensor

torch.set_num_threads(1)


def _mlp(seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), act(), nn.Linear(64, 40), act(), nn.Linear(40, 8)), \
        (torch.randn(8, 16),)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.b2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("r", [0.75, 0.9, 0.5])
def test_soft_mask_fraction_is_exactly_1_minus_r_and_half_at_t(r):
    m, x = _mlp()
    pdp = PDP(r, allocation="uniform")
    out = fxprune.compile(m, x, passes=[pdp])
    masks, ts = pdp.soft_masks(), pdp.thresholds()
    assert set(masks) == {"0.weight", "2.weight", "4.weight"}
    for name, sm in masks.items():
        n = sm.numel()
        assert int((sm > 0.5).sum()) == n - round(r * n)
        assert int((sm > 0.5).sum()) == round((1 - r) * n)  # r * n is integral for these layers: exactly 1 - r
        w = get_tensor(out.module, name)
        assert torch.allclose(w, sm * pdp._original(name))  # the forward uses m(w) * w
        t = ts[name]
        scale = pdp._original(name).detach().pow(2).mean()
        vals = soft_mask(torch.stack([t, -t]), t, pdp.tau, scale)
        assert vals.tolist() == [0.5, 0.5]
        a = pdp._original(name).detach().abs()
        k = n - round(r * n)
        srt = a.reshape(-1).sort(descending=True).values
        assert float(t) == pytest.approx(float((srt[k - 1] + srt[k]) / 2))  # between W_h and W_t


def test_global_allocation_at_the_end_of_warmup():
    """Paper (Appendix D): per-layer targets from one global magnitude sort when the warm-up ends."""
    m, x = _mlp()
    with torch.no_grad():
        m[2].weight.mul_(0.5)  # a layer of small weights: the global sort prunes it harder
    names = ["0.weight", "2.weight", "4.weight"]
    pdp = PDP(0.75, warmup=3, ramp=4)
    out = fxprune.compile(m, x, passes=[pdp])
    assert pdp.layer_targets == {n: 0.75 for n in names}  # not allocated during the warm-up
    with torch.no_grad():
        pdp._original("4.weight").mul_(0.5)  # weights move during the warm-up: the allocation must see it
    for _ in range(3):
        pdp.step()
    rt = pdp.layer_targets
    w = {n: pdp._original(n).detach().abs() for n in names}
    flat = torch.cat([w[n].reshape(-1) for n in names])
    drop = round(0.75 * flat.numel())
    thr = flat.sort().values[drop - 1]
    for n in names:
        assert rt[n] == pytest.approx(float((w[n] <= thr).float().mean()))
    assert sum(rt[n] * w[n].numel() for n in names) == pytest.approx(drop)
    assert rt["2.weight"] > 0.9 > rt["4.weight"] > 0.7 > 0.3 > rt["0.weight"]
    assert out.report.passes[-1]["stats"]["allocation"] == "global"
    # linear ramp of every layer towards its own target; exact keep counts at every step
    for k in range(1, 6):
        pdp.step()
        frac = min(k / 4, 1.0)
        assert pdp.ratio == pytest.approx(0.75 * frac)
        for n, sm in pdp.soft_masks().items():
            assert int((sm > 0.5).sum()) == sm.numel() - round(rt[n] * frac * sm.numel()), (n, k)
    fin = pdp.finalize()
    zeros = sum(int((~mk).sum()) for mk in fin.program.weight_masks.values())
    assert zeros == drop
    # uniform allocation keeps every layer at the target
    u = PDP(0.75, allocation="uniform")
    fxprune.compile(_mlp()[0], x, passes=[u])
    assert set(u.layer_targets.values()) == {0.75}


def test_pruned_weights_still_get_gradient():
    m, x = _mlp()
    pdp = PDP(0.9)
    out = fxprune.compile(m, x, passes=[pdp])
    masks = pdp.soft_masks()
    loss = out.module(torch.randn(32, 16)).pow(2).mean()
    loss.backward()
    for name, sm in masks.items():
        g = pdp._original(name).grad
        pruned = sm < 0.5
        assert pruned.sum() > 0
        assert bool((g[pruned] != 0).all()), name  # soft: every pruned weight still learns


def test_schedule_warmup_and_ramp():
    m, x = _mlp()
    pdp = PDP(0.8, warmup=2, ramp=4, schedule="linear")
    out = fxprune.compile(m, x, passes=[pdp])
    seen = [pdp.ratio]
    sm = pdp.soft_masks()["2.weight"]
    assert torch.equal(sm, torch.ones_like(sm))  # dense warm-up: the mask is exactly 1
    assert torch.equal(get_tensor(out.module, "2.weight"), pdp._original("2.weight"))
    for _ in range(8):
        seen.append(pdp.step())
    assert seen == pytest.approx([0, 0, 0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert PDP(0.8).schedule == "linear"  # the paper's ramp is linear
    cubic = PDP(0.8, ramp=4, schedule="cubic")
    fxprune.compile(m, x, passes=[cubic])
    assert cubic.step(2) == pytest.approx(0.8 * (1 - 0.5 ** 3))


@pytest.mark.parametrize("n,mm", [(2, 4), (1, 4)])
def test_nm_groups_have_exactly_n_survivors(n, mm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 12))
    x = (torch.randn(2, 8, 4, 4),)
    pdp = PDP(structure="nm", n=n, m=mm)
    out = fxprune.compile(model, x, passes=[pdp])
    assert pdp.target == pytest.approx(1 - n / mm)
    for name, sm in pdp.soft_masks().items():
        g = (sm > 0.5).movedim(1, -1)
        counts = g.reshape(*g.shape[:-1], g.shape[-1] // mm, mm).sum(-1)
        assert bool((counts == n).all()), name
    opt = torch.optim.SGD(out.module.parameters(), lr=0.05)
    for _ in range(5):
        loss = out.module(torch.randn(4, 8, 4, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pdp.step()
    fin = pdp.finalize()
    for name, mask in fin.program.weight_masks.items():
        g = mask.movedim(1, -1)
        assert bool((g.reshape(*g.shape[:-1], g.shape[-1] // mm, mm).sum(-1) == n).all())
        assert check_nm(fin.module.get_parameter(name), n, mm, 1)


def test_channel_structure_gives_group_masks_that_shrink_removes():
    torch.manual_seed(0)
    model = CNN().eval()
    x = (torch.randn(4, 3, 8, 8),)
    for m_ in model.modules():
        if isinstance(m_, nn.BatchNorm2d):
            m_.running_mean.uniform_(-0.3, 0.3)
            m_.running_var.uniform_(0.5, 2.0)
            m_.weight.data.uniform_(0.5, 1.5)
            m_.bias.data.uniform_(-0.3, 0.3)
    pdp = PDP(0.5, structure="channel", tau=0.1, allocation="uniform")
    out = fxprune.compile(model, x, passes=[pdp])
    sm = pdp.soft_masks()
    groups = {g.id: g for g in out.program.groups}
    assert sm and all(groups[gid].kind == "channels" for gid in sm)
    for gid, m in sm.items():
        assert int((m > 0.5).sum()) == groups[gid].size - round(0.5 * groups[gid].size)
    # each soft channel is scaled once, after its BatchNorm (not on the conv output, BN and consumer: ~m^3)
    assert out.report.passes[-1]["stats"]["scaled"] == {"b1.weight": "norm", "b1.bias": "norm",
                                                         "b2.weight": "norm", "b2.bias": "norm"}
    by_param = {}
    for gid, m in sm.items():
        for mem in groups[gid].members:
            by_param[mem.param] = m
    m1, m2 = by_param["c1.weight"], by_param["c2.weight"]
    assert 0.0 < float(m1.min()) < 0.5 < float(m1.max())
    with torch.no_grad():
        xe = torch.randn(4, 3, 8, 8)
        h = torch.relu(model.b1(model.c1(xe)) * m1[:, None, None])
        h = torch.relu(model.b2(model.c2(h)) * m2[:, None, None])
        torch.testing.assert_close(out.module(xe), model.fc(h.mean((2, 3))), atol=1e-5, rtol=1e-5)
    # gradients reach every parameter slice, including those of channels being pruned
    loss = out.module(torch.randn(4, 3, 8, 8)).pow(2).mean()
    loss.backward()
    g = out.module.get_parameter("c1.weight").grad  # scored, not scaled: a plain parameter
    assert bool((g.flatten(1).abs().sum(1) > 0).all())
    fin = pdp.finalize()
    assert fin.report.verified is True
    assert fin.module.get_parameter("c1.weight").shape[0] == 8
    assert fin.module.get_parameter("c2.weight").shape == (16, 8, 3, 3)
    assert fin.report.params_after < 0.5 * fin.report.params_before
    # global allocation over the channel groups: 24 of 48 channels removed in all, split unevenly
    with torch.no_grad():
        model.c2.weight.mul_(0.3)
        model.b2.weight.mul_(0.3)
    glob = PDP(0.5, structure="channel", tau=0.1)
    gout = fxprune.compile(model, x, passes=[glob])
    rt = glob.layer_targets
    sizes = {g.id: g.size for g in gout.program.groups if g.id in rt}
    assert sum(round(rt[k] * sizes[k]) for k in rt) == 24 and len(set(rt.values())) == 2
    gfin = glob.finalize()
    assert gfin.report.verified is True


def test_attach_to_user_model_train_finalize_and_persist():
    torch.manual_seed(0)
    model, x = _mlp(act=nn.ReLU)
    X = torch.randn(256, 16)
    Y = (X[:, :8].argmax(1))
    pdp = PDP(0.8, warmup=5, ramp=30).attach(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        idx = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        pdp.step()
    assert pdp.ratio == pytest.approx(0.8)
    rt = pdp.layer_targets
    assert len(set(rt.values())) > 1
    fin = pdp.finalize()
    assert not any(hasattr(mod, "parametrizations") for mod in model.modules())  # user model is plain again
    total = sum(mk.numel() for mk in fin.program.weight_masks.values())
    assert sum(int((~mk).sum()) for mk in fin.program.weight_masks.values()) == round(0.8 * total)
    for name, mask in fin.program.weight_masks.items():  # global allocation: each layer at its own target
        assert float((~mask).float().mean()) == pytest.approx(rt[name], abs=1 / mask.numel())
        assert torch.equal(fin.module.get_parameter(name) != 0, mask)
        assert torch.equal(model.get_parameter(name) != 0, mask)
    # fine-tune the finalized module: masks hold through 20 optimizer steps and a save/load
    gm = enforce_masks(fin.module, fin.program.weight_masks)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(20):
        loss = F.cross_entropy(gm(X[:64]), Y[:64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, mask in fin.program.weight_masks.items():
        assert bool((get_tensor(gm, name)[~mask] == 0).all())
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    fresh = fxprune.compile(model, x, passes=[]).module
    load_masked_state_dict(fresh, torch.load(buf))
    assert set(current_masks(fresh)) == set(fin.program.weight_masks)
    with torch.no_grad():
        assert torch.allclose(fresh(X[:8]), gm(X[:8]), atol=1e-6)


def test_small_mlp_reaches_target_with_small_accuracy_drop():
    try:
        xtr, ytr = fxprune.data.fashion_mnist("train", limit=6000)
        xte, yte = fxprune.data.fashion_mnist("test", limit=2000)
    except BackendUnavailableError:
        pytest.skip("Fashion-MNIST not installed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))

    def acc(mod):
        with torch.no_grad():
            return float((mod(xte).argmax(1) == yte).float().mean())

    def epochs(mod, k, lr, hook=None):
        opt = torch.optim.Adam(mod.parameters(), lr=lr)
        for e in range(k):
            for xb, yb in fxprune.data.loader(xtr, ytr, batch_size=128, seed=e):
                loss = F.cross_entropy(mod(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if hook:
                    hook()

    epochs(model, 2, 2e-3)
    dense = acc(model)
    pdp = PDP(0.9, ramp=60, ignore=["3"])  # keep the small classifier dense
    out = fxprune.compile(model, (xtr[:2],), passes=[pdp])
    epochs(out.module, 3, 1e-3, pdp.step)
    fin = pdp.finalize()
    mask = fin.program.weight_masks["1.weight"]
    assert float((~mask).float().mean()) == pytest.approx(0.9, abs=1e-4)
    assert acc(fin.module) >= dense - 0.03, (acc(fin.module), dense)


def test_bad_options():
    for bad in (lambda: PDP(), lambda: PDP(1.0), lambda: PDP(0.5, structure="block"), lambda: PDP(0.5, tau=0),
                lambda: PDP(0.5, warmup=-1), lambda: PDP(0.5, ramp=1.5), lambda: PDP(0.5, schedule="exp"),
                lambda: PDP(0.5, allocation="layer"),
                lambda: PDP(0.3, structure="nm"), lambda: PDP(structure="nm", n=4, m=4)):
        with pytest.raises(InputError):
            bad()
    with pytest.raises(InputError):
        PDP(0.5).step()  # not attached
    m, x = _mlp()
    pdp = PDP(0.5)
    fxprune.compile(m, x, passes=[pdp])
    with pytest.raises(InputError):
        pdp.attach(m, x)  # one PDP object per module
