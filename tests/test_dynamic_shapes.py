"""Dynamic shapes of the pruned module (issues 11 and 12): a dynamic batch from positional, keyword and batch-1
examples, a dynamic sequence length for token inputs, the dynamic= override, compile-time notes where a model
cannot be dynamic, HF models traced without their DynamicCache, and named ONNX inputs/outputs/dims."""
import logging

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import InputError, TraceError
from fxprune.passes import ChannelPrune, Shrink


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(y)).mean((2, 3)))


class FixedBatch(Small):
    def forward(self, x):  # reshapes with the example's batch size written in: cannot be dynamic
        y = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(y)).reshape(2, 8, -1).mean(-1))


def _tiny_llama(use_cache=False):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if not use_cache:
        cfg.use_cache = False
    return T.LlamaForCausalLM(cfg).eval()


def test_resnet18_from_a_batch1_example_runs_at_batch4():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.resnet18(num_classes=10).eval()
    out = fxprune.compile(m, (torch.randn(1, 3, 32, 32),), passes=[ChannelPrune(0.5), Shrink()])
    assert out.report.dynamic_batch is True
    assert out.report.dynamic_dims == {"x": {"0": "batch"}}
    assert out.report.macs_before == pytest.approx(
        fxprune.compile(m, (torch.randn(1, 3, 32, 32),), passes=[], dynamic=False).report.macs_before)
    x4 = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        y4 = out.module(x4)
        rows = torch.cat([out.module(x4[i:i + 1]) for i in range(4)])
    assert y4.shape == (4, 10)
    torch.testing.assert_close(y4, rows, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["positional", "keyword", "batch1"])
def test_dynamic_batch_for_every_input_form(form):
    torch.manual_seed(0)
    m = Small().eval()
    x = torch.randn(1 if form == "batch1" else 2, 3, 8, 8)
    ex = {"x": x} if form == "keyword" else (x,)
    out = fxprune.compile(m, ex, passes=[ChannelPrune(0.5), Shrink()])
    assert out.report.dynamic_batch and out.report.notes == []
    for b in (1, 3, 6):
        xb = torch.randn(b, 3, 8, 8)
        y = out.module(x=xb) if form == "keyword" else out.module(xb)
        assert y.shape == (b, 5)
    unpruned = fxprune.compile(m, ex, passes=[])
    xb = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(unpruned.module(xb), m(xb))


def test_a_model_that_fixes_its_batch_says_so_at_compile_time(caplog):
    torch.manual_seed(0)
    m = FixedBatch().eval()
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        out = fxprune.compile(m, (torch.randn(2, 3, 8, 8),), passes=[ChannelPrune(0.5), Shrink()])
    assert out.report.dynamic_batch is False
    assert out.report.notes and "static batch" in out.report.notes[0]
    assert any("static batch" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert "note: static batch" in out.report.summary()
    with pytest.raises(InputError, match=r"dim 0 is fixed at 2 \(static batch"):
        out.module(torch.randn(4, 3, 8, 8))


def test_dynamic_false_and_explicit_dims():
    torch.manual_seed(0)
    m = Small().eval()
    static = fxprune.compile(m, (torch.randn(2, 3, 8, 8),), passes=[], dynamic=False)
    assert not static.report.dynamic_batch and static.report.dynamic_dims == {}
    with pytest.raises(InputError, match="fixed at 2"):
        static.module(torch.randn(3, 3, 8, 8))
    hw = fxprune.compile(m, (torch.randn(1, 3, 8, 8),), passes=[],
                         dynamic={"x": {0: "n", 2: "height", 3: "width"}})
    assert hw.report.dynamic_dims == {"x": {"0": "n", "2": "height", "3": "width"}}
    with torch.no_grad():
        torch.testing.assert_close(hw.module(torch.ones(3, 3, 12, 6)), m(torch.ones(3, 3, 12, 6)))
    with pytest.raises(InputError, match="dynamic= names inputs"):
        fxprune.compile(m, (torch.randn(2, 3, 8, 8),), passes=[], dynamic={"y": {0: "batch"}})
    with pytest.raises(TraceError) as e:  # the model fixes dim 0: the explicit request cannot be met
        fxprune.compile(FixedBatch().eval(), (torch.randn(2, 3, 8, 8),), passes=[], dynamic={"x": {0: "batch"}})
    assert e.value.cause == "dynamic_shapes"


def test_llama_dynamic_batch_and_sequence_with_keyword_inputs():
    m = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    ex = {"input_ids": ids, "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    out = fxprune.compile(m, ex, passes=[ChannelPrune(0.5), Shrink()])
    assert out.report.dynamic_dims == {"input_ids": {"0": "batch", "1": "seq"},
                                       "attention_mask": {"0": "batch", "1": "seq"}}
    for b, t in ((3, 9), (1, 5), (4, 31)):
        ids = torch.randint(0, 128, (b, t))
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, : t // 3] = 0  # left padding in one row
        y = out.module(input_ids=ids, attention_mask=mask)
        assert y.logits.shape == (b, t, 128)
    with pytest.raises(InputError, match="must agree"):
        out.module(input_ids=torch.randint(0, 128, (3, 9)), attention_mask=torch.ones(3, 8, dtype=torch.long))
    same = fxprune.compile(m, ex, passes=[])  # unpruned: equals the eager model at other shapes
    ids, mask = torch.randint(0, 128, (3, 11)), torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        torch.testing.assert_close(same.module(input_ids=ids, attention_mask=mask).logits,
                                   m(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-5)


def test_llama_batch1_token_example_and_seq_override():
    m = _tiny_llama()
    out = fxprune.compile(m, (torch.randint(0, 128, (1, 16)),), passes=[ChannelPrune(0.5), Shrink()])
    assert out.report.dynamic_dims == {"input_ids": {"0": "batch", "1": "seq"}}
    assert out.module(torch.randint(0, 128, (3, 5))).logits.shape == (3, 5, 128)
    only_batch = fxprune.compile(m, (torch.randint(0, 128, (2, 16)),), passes=[],
                                 dynamic={"input_ids": {0: "batch"}})
    assert only_batch.report.dynamic_dims == {"input_ids": {"0": "batch"}}
    assert only_batch.module(torch.randint(0, 128, (5, 16))).logits.shape == (5, 16, 128)
    with pytest.raises(InputError, match="dim 1 is fixed at 16"):
        only_batch.module(torch.randint(0, 128, (5, 7)))


def test_stock_llama_with_its_default_cache_traces_and_says_so():
    m = _tiny_llama(use_cache=True)
    assert m.config.use_cache is True
    out = fxprune.compile(m, (torch.randint(0, 128, (2, 8)),), passes=[ChannelPrune(0.5), Shrink()])
    assert m.config.use_cache is True  # the user's config is left as it was
    assert any("use_cache=False" in n for n in out.report.notes)
    assert "DynamicCache" in out.report.summary()
    y = out.module(torch.randint(0, 128, (3, 6)))
    assert y.logits.shape == (3, 6, 128) and getattr(y, "past_key_values", None) is None


def test_onnx_names_and_dims_of_a_pruned_llama(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fxprune.backends import onnx as fxonnx

    m = _tiny_llama()
    ex = {"input_ids": torch.randint(0, 128, (1, 12)), "attention_mask": torch.ones(1, 12, dtype=torch.long)}
    out = fxprune.compile(m, ex, passes=[ChannelPrune(0.5), Shrink()])
    res = fxonnx.export(out, ex, tmp_path / "llm.onnx")
    assert res.inputs == ["input_ids", "attention_mask"] and res.outputs == ["logits"]
    assert res.dynamic_batch and len(res.parity_batch_sizes) == 2
    proto = onnx.load(res.path, load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in list(proto.graph.input) + list(proto.graph.output)}
    assert dims["input_ids"] == ["batch", "seq"] and dims["attention_mask"] == ["batch", "seq"]
    assert dims["logits"][:2] == ["batch", "seq"]


def test_onnx_names_of_a_batch1_cnn_and_overrides(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fxprune.backends import onnx as fxonnx

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    out = fxprune.compile(Small().eval(), (x,), passes=[ChannelPrune(0.5), Shrink()])
    res = fxonnx.export(out, (x,), tmp_path / "cnn.onnx")
    assert res.inputs == ["x"] and res.outputs == ["output"] and res.dynamic_batch
    res = fxonnx.export(out, (x,), tmp_path / "named.onnx", input_names=["image"], output_names=["scores"],
                        simplify=False)
    assert res.inputs == ["image"] and res.outputs == ["scores"] and res.dynamic_batch


class _PairNet(nn.Module):
    """RAFT's pattern: two images stacked on the batch dim, one encoder, then split back with chunk(2)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, a, b):
        f1, f2 = self.enc(torch.cat([a, b], 0)).chunk(2, 0)
        return self.head(f1 * f2)


def test_a_batch1_example_whose_size2_trace_guards_against_it_falls_back():
    """Traced from a size-2 copy, the graph guards ``2 * batch - ceil(batch) != 1`` (a size-1 chunk), which the
    batch-1 example violates: the trace must take the next attempt, not hand a graph that fails its own guard to
    the MACs counter (raw 'AssertionError: Guard failed' from torchvision's RAFT at batch 1)."""
    torch.manual_seed(0)
    model = _PairNet().eval()
    x = (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    out = fxprune.compile(model, x, passes=[ChannelPrune(ratio=0.5), Shrink()])
    assert out.report.verified
    assert out.module(*x).shape == model(*x).shape == (1, 4, 8, 8)  # and it runs at the example's batch


def test_a_saved_and_loaded_llama_keeps_its_dynamic_sequence_length(tmp_path):
    """program.pt2 was re-exported with the batch alone dynamic, so a pruned LM loaded with fxprune.load ran only at
    the example's sequence length (torch.export's bare 'AssertionError: Guard failed: input_ids.size()[1] == 16'
    at any other). Every dynamic dim of the compiled module is kept; dims the program fixes get fxprune's readable
    error."""
    m = _tiny_llama()
    out = fxprune.compile(m, (torch.randint(0, 128, (2, 16)),), passes=[ChannelPrune(0.5), Shrink()])
    out.save(tmp_path / "lm")
    back = fxprune.load(tmp_path / "lm")
    for b, t in ((3, 9), (1, 5), (2, 31)):
        ids = torch.randint(0, 128, (b, t))
        with torch.no_grad():
            torch.testing.assert_close(back.module(ids).logits, out.module(ids).logits, rtol=1e-4, atol=1e-5)
    only_batch = fxprune.compile(m, (torch.randint(0, 128, (2, 16)),), passes=[ChannelPrune(0.5), Shrink()],
                                 dynamic={"input_ids": {0: "batch"}})
    only_batch.save(tmp_path / "static_seq")
    fixed = fxprune.load(tmp_path / "static_seq")
    assert fixed.module(torch.randint(0, 128, (3, 16))).logits.shape == (3, 16, 128)
    with pytest.raises(InputError, match="dim 1 is fixed at 16") as e:
        fixed.module(torch.randint(0, 128, (3, 7)))
    assert "save again" in e.value.fix


def test_a_loaded_cnn_names_the_dim_it_fixes(tmp_path):
    torch.manual_seed(0)
    out = fxprune.compile(Small().eval(), (torch.randn(2, 3, 16, 16),), passes=[ChannelPrune(0.5), Shrink()])
    out.save(tmp_path / "cnn")
    back = fxprune.load(tmp_path / "cnn")
    assert back.module(torch.randn(5, 3, 16, 16)).shape == (5, 5)  # the batch stays dynamic
    with pytest.raises(InputError, match=r"dim 2 is fixed at 16"):
        back.module(torch.randn(2, 3, 20, 20))
    with pytest.raises(InputError, match="has 3 dims"):
        back.module(torch.randn(3, 16, 16))
