"""Planning on the meta device: analyze and compile without materialising weights."""
import pytest
import torch

import fxprune
from fxprune.passes import ChannelPrune, Shrink


def _meta_llama():
    T = pytest.importorskip("transformers")
    with torch.device("meta"):
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                use_cache=False))


def test_analyze_and_compile_on_meta():
    m = _meta_llama()
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    groups = fxprune.analyze(m, {"input_ids": ids})
    assert len(groups.prunable()) > 4
    assert any(g.kind == "heads" for g in groups.prunable())
    out = fxprune.compile(m, {"input_ids": ids}, passes=[ChannelPrune(0.5, importance="random"), Shrink()])
    assert out.report.verified is None  # nothing to compare on meta: reported as not run, never as a pass
    assert out.report.params_after < out.report.params_before
    assert all(p.is_meta for p in out.module.parameters())


def test_magnitude_importance_needs_values():
    m = _meta_llama()
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    with pytest.raises(fxprune.errors.InputError, match="meta device"):
        fxprune.compile(m, {"input_ids": ids}, passes=[ChannelPrune(0.5, importance="l2"), Shrink()])
