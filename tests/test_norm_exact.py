"""Hidden-size pruning through normalisations (issue 13): ``ChannelPrune(norms=...)``.

exact: shrunk == masked, verified and observable, with the normalised (hidden) dim pruned: HF Llama (decomposed
RMSNorm), HF BERT (fused LayerNorm), timm ViT (fused LayerNorm), torch RMSNorm (fused rms_norm). renormalize: the
report says approximate with the measured deviation, never verified. The fold/pin formulas are checked on their
own, and observers that are not provably exact stay frozen.
"""
import math

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.passes import ChannelPrune, Shrink
from fxprune.testing import make_observable


def _compile(model, inputs, mode, ratio=0.25, **kw):
    return fxprune.compile(model, inputs, passes=[ChannelPrune(ratio=ratio, norms=mode, **kw), Shrink()])


def _hidden_row(report, param):
    rows = [g for g in report.groups if g.label.startswith(param)]
    assert rows, [g.label for g in report.groups]
    return rows[0]


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _check_exact(out, hidden_param, n_norms):
    r = out.report
    assert r.verified is True and r.observable is True and not r.approximate, str(r)
    row = _hidden_row(r, hidden_param)
    assert row.frozen is None and row.after < row.before, row
    assert len(r.norms) == n_norms and set(r.norms.values()) == {"exact"}, r.norms
    assert "exact x" in r.summary()


def _check_renormalize(out, n_norms):
    r = out.report
    assert r.verified is None and r.approximate is True, str(r)
    assert r.max_abs_diff > 0 and math.isfinite(r.max_abs_diff)
    assert set(r.norms.values()) == {"renormalize"} and len(r.norms) == n_norms
    assert "APPROXIMATE" in r.summary() and "yes" not in r.summary().split("verified")[1].split("\n")[0]
    stats = out.program.history[-1]["stats"]
    assert stats["approximate"] and stats["relative_deviation"] > 0


# ------------------------------------------------------------------------------------------------- HF Llama
def test_llama_rmsnorm_exact_prunes_hidden_and_verifies():
    pytest.importorskip("transformers")
    m = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    out = _compile(m, {"input_ids": ids, "use_cache": False}, "exact")
    _check_exact(out, "model.embed_tokens.weight[1]", 5)  # 2 layers x 2 norms + final norm
    assert out.module.model.embed_tokens.weight.shape[1] == 48
    # the user's model is untouched and the pruned module runs on fresh data
    assert m.model.embed_tokens.weight.shape[1] == 64
    assert out.module(input_ids=torch.randint(0, 128, (2, 16)), use_cache=False).logits.shape == (2, 16, 128)


def test_llama_rmsnorm_renormalize_is_approximate():
    pytest.importorskip("transformers")
    out = _compile(_tiny_llama(), {"input_ids": torch.randint(0, 128, (2, 16)), "use_cache": False}, "renormalize")
    _check_renormalize(out, 5)


def test_freeze_is_the_default():
    pytest.importorskip("transformers")
    out = fxprune.compile(_tiny_llama(), {"input_ids": torch.randint(0, 128, (2, 16)), "use_cache": False},
                          passes=[ChannelPrune(ratio=0.25), Shrink()])
    row = _hidden_row(out.report, "model.embed_tokens.weight[1]")
    assert row.frozen and "observes the channel count" in row.frozen and row.after == row.before
    assert out.report.norms == {} and out.report.verified is True


# ------------------------------------------------------------------------------------------------- HF BERT
def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return make_observable(BertForSequenceClassification(cfg).eval())


@pytest.mark.parametrize("mode", ["exact", "renormalize"])
def test_bert_layernorm(mode):
    pytest.importorskip("transformers")
    inputs = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    out = _compile(_tiny_bert(), inputs, mode)
    if mode == "exact":
        _check_exact(out, "bert.embeddings.word_embeddings.weight[1]", 5)  # embeddings + 2 x 2 layers
        assert out.module.bert.embeddings.word_embeddings.weight.shape[1] == 24
    else:
        _check_renormalize(out, 5)


# ------------------------------------------------------------------------------------------------- timm ViT
@pytest.mark.parametrize("mode", ["exact", "renormalize"])
def test_timm_vit_layernorm(mode):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = make_observable(timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5).eval())
    out = _compile(m, torch.randn(2, 3, 32, 32), mode)
    if mode == "exact":
        _check_exact(out, "cls_token[2]", 5)  # 2 x 2 block norms + final norm
    else:
        _check_renormalize(out, 5)


# ------------------------------------------------------------------------------------------------- fused rms_norm
class RMSNet(nn.Module):
    def __init__(self, eps=None):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.norm = nn.RMSNorm(16, eps=eps)
        self.mlp = nn.Linear(16, 16)
        self.norm2 = nn.RMSNorm(16, eps=1e-3, elementwise_affine=False)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.mlp(self.norm(h))
        return self.out(self.norm2(h))


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_fused_rms_norm_exact_fold(eps):
    out = _compile(make_observable(RMSNet(eps).eval()), torch.randn(3, 5, 6), "exact", ratio=0.5)
    _check_exact(out, "inp.weight[0]", 2)
    ops = [n.target for n in out.module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.rms_norm.default in ops  # the fused op stays, with eps' and a sqrt(D/Dk) factor


def test_fused_rms_norm_without_eps_stays_frozen_in_exact_mode():
    """eps=None means the runtime dtype's epsilon: no constant rescaling reproduces it in every dtype."""
    out = _compile(make_observable(RMSNet(None).eval()), torch.randn(3, 5, 6), "exact", ratio=0.5)
    row = _hidden_row(out.report, "inp.weight[0]")
    assert row.after == row.before and "eps=None" in row.frozen


def test_rms_fold_and_layernorm_pin_formulas():
    """The identities the exact rewrites rely on, on a zero-padded vector (D=16, Dk=10)."""
    torch.manual_seed(0)
    D, Dk, eps = 16, 10, 1e-2
    xk = torch.randn(4, Dk, dtype=torch.float64)
    x = torch.cat([xk, torch.zeros(4, D - Dk, dtype=torch.float64)], -1)
    c = D / Dk
    masked = nn.functional.rms_norm(x, (D,), eps=eps)[:, :Dk]
    folded = nn.functional.rms_norm(xk, (Dk,), eps=eps * c) * math.sqrt(c)
    pinned = xk * torch.rsqrt(xk.pow(2).sum(-1, keepdim=True) / D + eps)
    torch.testing.assert_close(folded, masked, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pinned, masked, rtol=1e-12, atol=1e-12)
    # LayerNorm: the zero-padded mean is sum/D, and the variance picks up (D - Dk) * mu^2 from the padding
    ln = nn.functional.layer_norm(x, (D,), eps=eps)[:, :Dk]
    mu = xk.sum(-1, keepdim=True) / D
    var = ((xk - mu).pow(2).sum(-1, keepdim=True) + (D - Dk) * mu * mu) / D
    torch.testing.assert_close((xk - mu) * torch.rsqrt(var + eps), ln, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(nn.functional.layer_norm(xk, (Dk,), eps=eps), ln)  # renormalize differs


# ------------------------------------------------------------------------------------------------- stays frozen
class Offset(nn.Module):
    """LayerNorm of an input that is not zero in removed channels (a constant offset): exact is impossible."""

    def __init__(self):
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.ln(self.a(x) + 1.0))


class Observers(nn.Module):
    """Softmax over channels and a mean of a sigmoid: channel-count observers that stay frozen in exact mode."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        g = self.c(x)
        return self.b(torch.softmax(h, -1)) + self.d(g) * torch.sigmoid(g).mean(-1, keepdim=True)


def test_exact_keeps_unprovable_norms_and_other_observers_frozen():
    out = _compile(make_observable(Offset().eval()), torch.randn(2, 4), "exact", ratio=0.5)
    row = _hidden_row(out.report, "a.weight[0]")
    assert row.after == row.before and "not provably zero" in row.frozen, row
    out = _compile(Observers().eval(), torch.randn(2, 4), "exact", ratio=0.5)
    assert "softmax" in _hidden_row(out.report, "a.weight[0]").frozen
    assert "mean" in _hidden_row(out.report, "c.weight[0]").frozen
    assert out.report.norms == {}


def test_norms_option_is_checked():
    from fxprune.errors import InputError

    with pytest.raises(InputError, match="norms must be one of"):
        ChannelPrune(ratio=0.5, norms="approx")
