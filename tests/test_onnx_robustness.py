"""ONNX export robustness (issue 19): 5-D attention (timm Hiera), correlation lookup by grid_sample (RAFT),
stride-dependent graphs (HF BEiT with a relative position bias), the float32 noise-floor tolerance, and errors
that name the op and node. Tiny modules that reproduce each pattern; the real models are in
benchmarks/onnx_robustness.py."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import numpy_helper  # noqa: E402

from fxprune.backends import onnx as fxonnx  # noqa: E402
from fxprune.backends import onnxruntime as fxort  # noqa: E402
from fxprune.errors import ExportError  # noqa: E402


def exported(model: nn.Module, args: tuple) -> nn.Module:
    """What fxprune.compile returns: the GraphModule of torch.export (dynamic batch)."""
    dyn = tuple({0: torch.export.Dim.AUTO} if a.dim() else None for a in args)
    return torch.export.export(model.eval(), args, strict=False, dynamic_shapes=dyn).module()


class WindowAttention5D(nn.Module):
    """Hiera's mask-unit attention: q, k, v of shape [B, heads, windows, N, head_dim] into SDPA."""

    def __init__(self, d=16, heads=2, windows=4, mode="plain"):
        super().__init__()
        self.heads, self.windows, self.mode = heads, windows, mode
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.tensor(0.1))  # a float-mask term

    def forward(self, x):
        b, t, d = x.shape
        n = t // self.windows
        qkv = self.qkv(x).reshape(b, n, self.windows, 3, self.heads, d // self.heads).permute(3, 0, 4, 2, 1, 5)
        q, k, v = qkv.unbind(0)  # [B, heads, windows, n, hd]
        if self.mode == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mode == "float_mask":
            mask = torch.triu(torch.ones(n, n), 1) * -3.0 + self.bias.reshape(())
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        elif self.mode == "bool_mask":
            keep = torch.ones(n, n, dtype=torch.bool).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        elif self.mode == "gqa":
            y = F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.permute(0, 3, 2, 1, 4).reshape(b, t, d))


@pytest.mark.parametrize("mode", ["plain", "causal", "float_mask", "bool_mask", "gqa"])
def test_5d_sdpa_graph_module_exports_with_dynamo(tmp_path, mode):
    torch.manual_seed(0)
    model = WindowAttention5D(mode=mode).eval()
    x = torch.randn(2, 24, 16)
    gm = exported(model, (x,))
    res = fxonnx.export(gm, (x,), tmp_path / "w5.onnx")
    assert res.exporter == "dynamo" and res.dynamic_batch and res.parity_batch_sizes == [2, 5]
    assert any("non-4-D" in n and "scaled_dot_product_attention" in n for n in res.notes)
    out = res.outputs[0]
    assert res.max_abs_diff[out] <= 1e-5
    for b in (1, 3):
        xb = torch.randn(b, 24, 16)
        (y,) = fxort.run(res.path, (xb,))
        np.testing.assert_allclose(y, model(xb).detach().numpy(), atol=1e-5)


def test_5d_sdpa_plain_module_retries_with_the_translation(tmp_path):
    torch.manual_seed(0)
    model = WindowAttention5D().eval()
    x = torch.randn(2, 24, 16)
    res = fxonnx.export(model, (x,), tmp_path / "w5p.onnx")  # the graph is unknown before export: retried
    assert res.exporter == "dynamo" and res.dynamic_batch
    assert any("non-4-D" in n for n in res.notes)


def test_4d_sdpa_keeps_torch_onnx_translation(tmp_path):
    class A(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(2, 2, 5, 8)
    res = fxonnx.export(exported(A(), (q, q, q)), (q, q, q), tmp_path / "a4.onnx")
    assert res.exporter == "dynamo" and not any("non-4-D" in n for n in res.notes)


class CorrLookup(nn.Module):
    """RAFT's correlation lookup: an all-pairs correlation volume sampled around coordinates by grid_sample."""

    def __init__(self, mode="bilinear"):
        super().__init__()
        self.mode = mode
        self.f = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, im1, im2, coords):
        f1, f2 = self.f(im1), self.f(im2)
        b, c, h, w = f1.shape
        corr = torch.einsum("bchw,bcij->bhwij", f1, f2).reshape(b * h * w, 1, h, w) / c ** 0.5
        d = torch.linspace(-1, 1, 3)
        delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1).view(1, 3, 3, 2)
        grid = coords.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 2) + delta * 0.2
        out = F.grid_sample(corr, grid, mode=self.mode, padding_mode="zeros", align_corners=True)
        return out.view(b, h, w, 9).permute(0, 3, 1, 2)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_correlation_lookup_grid_sample_exports(tmp_path, mode):
    torch.manual_seed(0)
    model = CorrLookup(mode).eval()
    ex = (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6), torch.rand(2, 2, 6, 6) * 1.6 - 0.8)
    res = fxonnx.export(exported(model, ex), ex, tmp_path / "corr.onnx")
    assert res.exporter == "dynamo" and res.dynamic_batch and res.parity_batch_sizes == [2, 5]
    assert "GridSample" in {n.op_type for n in onnx.load(res.path).graph.node}


class MaskedAttentionView(nn.Module):
    """HF BEiT's pattern: SDPA with a float mask (relative position bias), then transpose + contiguous + reshape;
    torch.export records a no-op contiguous and a view that only holds for CPU flash attention's strides."""

    def __init__(self, d=12, heads=3, t=5):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.rel = nn.Parameter(torch.randn(heads, t, t))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel.unsqueeze(0))
        return y.transpose(1, 2).contiguous().reshape(b, t, d)


def test_stride_dependent_view_is_retried_without_touching_the_module(tmp_path):
    torch.manual_seed(0)
    model = MaskedAttentionView().eval()
    x = torch.randn(2, 5, 12)
    gm = exported(model, (x,))
    before = [(n.name, n.target, n.args, dict(n.kwargs)) for n in gm.graph.nodes]
    res = fxonnx.export(gm, (x,), tmp_path / "view.onnx")
    assert res.exporter == "dynamo" and res.dynamic_batch
    assert [(n.name, n.target, n.args, dict(n.kwargs)) for n in gm.graph.nodes] == before  # restored
    torch.testing.assert_close(gm(x), model(x))
    if any("view was impossible" in n for n in res.notes):  # torch versions that record the view
        assert any("reshape/clone" in n for n in res.notes)


def test_untranslatable_op_error_names_op_node_and_fix(tmp_path):
    class KwOnly(nn.Module):  # keyword inputs: the TorchScript fallback cannot take them either
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x=None):
            return torch.relu(self.lin(x))

    def refuse(x):
        raise NotImplementedError("no ONNX translation in this test")

    with pytest.raises(ExportError, match=r"aten\.relu\.default.*node %relu") as ei:
        fxonnx.export(KwOnly(), {"x": torch.randn(2, 4)}, tmp_path / "r.onnx",
                      custom_translation_table={torch.ops.aten.relu.default: refuse})
    assert ei.value.fix and "custom_translation_table" in ei.value.fix


# ------------------------------------------------------------------------------------------------- tolerance
class Cancel(nn.Module):
    """Output of scale ~1 computed through values of 1e8: float32 rounds x*1e4 + 1e8 to a multiple of 8, so torch's
    own float32 error on the output is ~4e-4, over the default 1e-4 absolute tolerance (BEiT-like: error set by
    the intermediate scale, not the output's)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("big", torch.tensor(1e8))

    def forward(self, x):
        h = self.lin(x) * 1e4 + self.big
        return (h - self.big) * 1e-4


def _set_initializer(path, out_path, pick, edit):
    model = onnx.load(path)
    init = next(t for t in model.graph.initializer if pick(numpy_helper.to_array(t)))
    init.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init).copy()), init.name))
    onnx.save(model, out_path)


@pytest.fixture(scope="module")
def cancel_export(tmp_path_factory):
    torch.manual_seed(0)
    model = Cancel().eval()
    x = torch.randn(4, 8)
    path = tmp_path_factory.mktemp("cancel") / "cancel.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxonnx.export(model, (x,), path, dynamic_batch=False)
    return model, x, str(path), res


def test_noise_floor_tolerance_accepts_float32_noise(cancel_export, tmp_path):
    model, x, path, res = cancel_export
    # an ONNX file whose 1e8 constant is off by one float32 ulp (8): output shifted by ~8e-4, the size of torch's
    # own float32 error here, over the default 1e-4
    off = tmp_path / "ulp.onnx"
    proto = onnx.load(path)
    inits = {t.name: t for t in proto.graph.initializer}
    add = next(n for n in proto.graph.node if n.op_type == "Add" and n.input[1] in inits)  # h + big (Sub keeps big)
    big = numpy_helper.to_array(inits[add.input[1]])
    assert float(big) == 1e8
    proto.graph.initializer.append(numpy_helper.from_array(np.nextafter(big, np.float32(np.inf)), "big_off"))
    add.input[1] = "big_off"
    onnx.save(proto, off)
    r = fxonnx.check_parity(off, model, (x,))
    (out,) = r.max_abs_diff
    assert r.max_abs_diff[out] > fxonnx.default_atol(torch.float32, 1.0)
    assert r.max_abs_diff[out] <= r.tolerance[out]
    assert any("float64" in n and "4x" in n for n in r.notes)
    with pytest.raises(ExportError, match="max abs diff"):  # an explicit atol is taken as given
        fxonnx.check_parity(off, model, (x,), atol=1e-4)


def test_noise_floor_tolerance_still_catches_a_wrong_initializer(cancel_export, tmp_path):
    model, x, path, _ = cancel_export
    bad = tmp_path / "bad.onnx"
    _set_initializer(path, bad, lambda a: a.ndim == 2, lambda w: w + np.eye(*w.shape, dtype=w.dtype) * 0.05)
    with pytest.raises(ExportError, match="max abs diff.*still exceeded"):
        fxonnx.check_parity(bad, model, (x,))


def test_constant_output_is_noted(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    res = fxonnx.export(model.eval(), (torch.randn(2, 4),), tmp_path / "zero.onnx")
    assert any("constant on random inputs" in n for n in res.notes)


def test_requested_opset_that_was_not_written_is_noted(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxonnx.export(nn.Sequential(nn.Linear(4, 3)).eval(), (torch.randn(2, 4),), tmp_path / "o.onnx",
                            opset=15)  # torch.onnx implements opset >= 18 and down-converts when it can
    if res.opset != 15:
        assert any("opset 15 was requested" in n for n in res.notes)
