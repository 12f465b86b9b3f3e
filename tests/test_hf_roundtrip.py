"""Stock HuggingFace round trip (issue 13): ``fxprune.hf.save_pretrained`` writes config.json + safetensors that
``AutoModelForCausalLM.from_pretrained`` loads in a fresh process *without fxprune*, with the same greedy tokens
(and logits) as the compiled module; shapes a stock config cannot express are refused with the reason."""
import json
import subprocess
import sys

import pytest
import torch

import fxprune
from fxprune.errors import ExportError
from fxprune.passes import ChannelPrune, Shrink

pytest.importorskip("transformers")


def _llama(tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=tie, initializer_range=0.15, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


def _compile(m, **kw):
    ids = torch.randint(0, 96, (2, 12))
    return fxprune.compile(m, {"input_ids": ids, "use_cache": False}, passes=[ChannelPrune(**kw), Shrink()])


_FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "fxprune" not in sys.modules
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
p = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = m(input_ids=p, use_cache=False).logits
m.generation_config.eos_token_id = None  # compare a fixed number of tokens (fxprune.hf.greedy never stops early)
gen = m.generate(p, max_new_tokens=int(sys.argv[3]), do_sample=False)
assert "fxprune" not in sys.modules
print(json.dumps({"tokens": gen.tolist(), "logits": logits.tolist(), "hidden": m.config.hidden_size,
                  "inter": m.config.intermediate_size, "heads": m.config.num_attention_heads,
                  "kv": m.config.num_key_value_heads, "eps": m.config.rms_norm_eps}))
"""


def _fresh(folder, prompt, n):
    r = subprocess.run([sys.executable, "-c", _FRESH, str(folder), json.dumps(prompt.tolist()), str(n)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["exact", "renormalize"])
def test_save_pretrained_round_trip_in_a_fresh_process(tmp_path, mode):
    m = _llama()
    out = _compile(m, ratio=0.25, scope="uniform", heads=True, norms=mode)
    assert out.module.model.embed_tokens.weight.shape[1] == 48
    fxprune.hf.save_pretrained(out, tmp_path)
    prompt = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    got = _fresh(tmp_path, prompt, 10)
    assert (got["hidden"], got["inter"], got["heads"], got["kv"]) == (48, 72, 6, 3)
    # exact: sqrt(D/Dk) folded into the norm weights and eps scaled by D/Dk; renormalize: eps unchanged
    assert got["eps"] == pytest.approx(1e-5 * (64 / 48 if mode == "exact" else 1.0))
    with torch.no_grad():
        mine = out.module(input_ids=prompt, use_cache=False).logits
    torch.testing.assert_close(torch.tensor(got["logits"]), mine, rtol=1e-4, atol=1e-4)
    tokens = fxprune.hf.greedy(out.module, prompt, 10)
    assert got["tokens"] == tokens.tolist()
    assert len(set(tokens[0, 6:].tolist())) > 1  # a generation that actually varies


def test_untied_lm_head_round_trip(tmp_path):
    out = _compile(_llama(tie=False), ratio=0.3, scope="uniform", norms="exact", round_to=8)
    fxprune.hf.save_pretrained(out, tmp_path)
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    assert _fresh(tmp_path, prompt, 6)["tokens"] == fxprune.hf.greedy(out.module, prompt, 6).tolist()


def test_what_a_stock_config_cannot_express(tmp_path):
    out = _compile(_llama(), ratio=0.3, scope="uniform", norms="exact")  # hidden 64 -> 45 with 8 heads
    with pytest.raises(ExportError, match="multiple of num_attention_heads"):
        fxprune.hf.save_pretrained(out, tmp_path)
    # local scope prunes the rotary head_dim too: a stock config recomputes inv_freq from head_dim
    out = _compile(_llama(), ratio=0.25, norms="exact")
    with pytest.raises(ExportError, match="rotary frequencies were pruned"):
        fxprune.hf.save_pretrained(out, tmp_path)
    # different MLP widths per layer
    out = _compile(_llama(), ratio=0.25, ignore=["model.layers.0.mlp", "model.layers.0.self_attn",
                                                 "model.layers.1.self_attn"])
    assert [getattr(out.module.model.layers, str(i)).mlp.gate_proj.weight.shape[0] for i in range(2)] == [96, 72]
    with pytest.raises(ExportError, match="differs between layers"):
        fxprune.hf.save_pretrained(out, tmp_path)


def test_layernorm_exact_is_not_a_stock_layernorm(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    out = fxprune.compile(m, {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False},
                          passes=[ChannelPrune(ratio=0.25, norms="exact"), Shrink()])
    if not out.report.norms:
        pytest.skip("GPT-2's hidden size stayed frozen here")
    with pytest.raises(ExportError):
        fxprune.hf.save_pretrained(out, tmp_path)


def test_plain_input_ids_trace():
    """A stock causal LM traces with plain input_ids (no use_cache=False): the tracer handles the cache."""
    m = _llama()
    out = fxprune.compile(m, {"input_ids": torch.randint(0, 96, (2, 12))},
                          passes=[ChannelPrune(ratio=0.25, scope="uniform", norms="exact"), Shrink()])
    assert out.report.verified is True
    assert out.module(input_ids=torch.randint(0, 96, (2, 12))).logits.shape == (2, 12, 96)


def test_fxprune_load_of_a_stock_causal_lm_in_a_fresh_process(tmp_path):
    """A stock causal LM compiled with plain ``input_ids`` returns a ``CausalLMOutputWithPast``; a fresh process
    that has not imported transformers' modeling modules used to fail in ``torch.export.load`` ("Deserializing
    transformers.modeling_outputs.CausalLMOutputWithPast in pytree is not registered"). The loaded program is
    static: it runs at the example's shape (shapes other than the example are a known limitation)."""
    m = _llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    out = fxprune.compile(m, {"input_ids": ids}, passes=[ChannelPrune(ratio=0.25), Shrink()])
    out.save(tmp_path / "c")
    with torch.no_grad():
        ref = out.module(input_ids=ids).logits
    torch.save({"ids": ids, "ref": ref}, tmp_path / "ref.pt")
    code = f"""
import sys, torch, fxprune
assert "transformers.modeling_outputs" not in sys.modules
z = torch.load({str(tmp_path / 'ref.pt')!r})
c = fxprune.load({str(tmp_path / 'c')!r})
o = c.module(input_ids=z["ids"])
print(type(o).__name__, float((o.logits - z["ref"]).abs().max()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    name, diff = r.stdout.strip().splitlines()[-1].split()
    assert name == "CausalLMOutputWithPast" and float(diff) == 0.0
