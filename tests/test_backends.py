"""fxprune.backends: ONNX export + parity, ONNX Runtime timing, TensorRT readiness checks, torch backend."""
import os
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fxprune.backends import onnx as fxonnx  # noqa: E402
from fxprune.backends import onnxruntime as fxort  # noqa: E402
from fxprune.backends import tensorrt as fxtrt  # noqa: E402
from fxprune.backends import torch as fxtorch  # noqa: E402
from fxprune.errors import BackendUnavailableError, ExportError  # noqa: E402


class ConvNet(nn.Module):
    """conv-BN-ReLU-pool, conv-ReLU, global pool, linear. c2 has 8 input channels (2:4-able), c1 has 3."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.c1(x))), 2)
        x = F.relu(self.c2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Attention(nn.Module):
    """Token embedding + fused-qkv causal SDPA attention + output projection."""

    def __init__(self, vocab=50, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, ids):
        x = self.emb(ids)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def make_2_4(w: torch.Tensor) -> None:
    """Zero the 2 smallest of every 4 weights along dim 1 (input channels), in place."""
    with torch.no_grad():
        s = w.movedim(1, -1)
        g = s.reshape(*s.shape[:-1], s.shape[-1] // 4, 4)
        idx = g.abs().argsort(-1)[..., :2]
        g.scatter_(-1, idx, 0.0)
        w.copy_(g.reshape(s.shape).movedim(-1, 1))


def exported(model: nn.Module, args: tuple) -> nn.Module:
    """What fxprune.compile returns: the GraphModule of torch.export (dynamic batch)."""
    dyn = tuple({0: torch.export.Dim.AUTO} for _ in args)
    return torch.export.export(model.eval(), args, strict=False, dynamic_shapes=dyn).module()


@pytest.fixture(scope="module")
def conv_export(tmp_path_factory):
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():  # non-trivial BN statistics so folding is exercised
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    make_2_4(model.c2.weight)
    x = torch.randn(2, 3, 16, 16)
    gm = exported(model, (x,))
    path = tmp_path_factory.mktemp("conv") / "conv.onnx"
    res = fxonnx.export(gm, (x,), path)
    return types.SimpleNamespace(res=res, gm=gm, model=model, x=x, path=str(path))


def _init_shapes(path):
    return {t.name: list(t.dims) for t in onnx.load(path).graph.initializer}


# ------------------------------------------------------------------------------------------------- ONNX export
def test_export_compiled_conv_dynamic_batch(conv_export):
    res, gm = conv_export.res, conv_export.gm
    assert res.exporter == "dynamo" and res.dynamic_batch and res.simplified and res.simplify_skipped is None
    assert res.opset >= 17 and res.inputs == ["x"] and len(res.outputs) == 1
    assert res.parity_batch_sizes == [2, 5]
    out = res.outputs[0]
    assert 0 <= res.max_abs_diff[out] <= res.tolerance[out] and res.tolerance[out] >= 1e-4  # default atol
    onnx.checker.check_model(res.path)
    sess = fxort.session(res.path)
    for b in (2, 5):
        x = torch.randn(b, 3, 16, 16)
        (y,) = fxort.run(sess, (x,))
        assert y.shape == (b, 10)
        np.testing.assert_allclose(y, gm(x).detach().numpy(), atol=1e-4)
    assert res.outputs[0] in str(res) and "dynamic batch" in str(res)


def test_export_plain_module_static_batch_leaves_module_unchanged(tmp_path):
    model = ConvNet()
    model.train()
    model.bn.eval()  # mixed flags must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    res = fxonnx.export(model, (x,), tmp_path / "static.onnx", dynamic_batch=False)
    assert res.exporter == "dynamo" and not res.dynamic_batch and res.parity_batch_sizes == [2]
    assert model.training and not model.bn.training and model.c1.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    (y,) = fxort.run(res.path, (x.numpy(),))
    with torch.no_grad():
        model.eval()
        np.testing.assert_allclose(y, model(x).numpy(), atol=1e-4)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        fxort.run(res.path, (torch.randn(5, 3, 16, 16),))


def test_export_attention_compiled_dynamic_batch(tmp_path):
    model = Attention().eval()
    ids = torch.randint(0, 50, (2, 8))
    compiled = types.SimpleNamespace(module=exported(model, (ids,)))  # like fxprune.compile's result
    res = fxonnx.export(compiled, (ids,), tmp_path / "attn.onnx", input_names=["ids"], output_names=["hidden"])
    assert res.exporter == "dynamo" and res.dynamic_batch and res.parity_batch_sizes == [2, 5]
    assert res.inputs == ["ids"] and res.outputs == ["hidden"]
    assert res.max_abs_diff["hidden"] <= res.tolerance["hidden"]
    for b in (2, 5):
        ids_b = torch.randint(0, 50, (b, 8))
        (y,) = fxort.run(res.path, {"ids": ids_b})
        assert y.shape == (b, 8, 32)
        np.testing.assert_allclose(y, model(ids_b).detach().numpy(), atol=1e-4)


def test_static_graph_module_is_reported_not_silently_static(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    gm = torch.export.export(model, (x,), strict=False).module()  # traced with a static batch
    with pytest.warns(UserWarning, match="static batch"):
        res = fxonnx.export(gm, (x,), tmp_path / "static_gm.onnx")
    assert not res.dynamic_batch and res.parity_batch_sizes == [2]
    assert any("static batch" in n for n in res.notes)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.abs().sum() >= 0:  # data-dependent branch: torch.export refuses it, TorchScript traces one side
            return y * 2
        return y


def test_export_falls_back_to_torchscript_and_records_why(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's TracerWarning about the Python bool
        res = fxonnx.export(DataDependent(), (torch.randn(3, 4),), tmp_path / "dd.onnx")
    assert res.exporter == "torchscript"
    assert any("dynamo exporter failed" in n for n in res.notes)
    assert res.dynamic_batch and res.parity_batch_sizes == [3, 6]


def test_corrupted_initializer_fails_parity(conv_export, tmp_path):
    ok = fxonnx.check_parity(conv_export.path, conv_export.gm, (conv_export.x,))
    assert ok.batch_sizes == [2, 5] and all(v <= ok.tolerance[k] for k, v in ok.max_abs_diff.items())
    model = onnx.load(conv_export.path)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    init = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    w = numpy_helper.to_array(init).copy()
    w[0, 0] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / "corrupt.onnx"
    onnx.save(model, bad)
    out = conv_export.res.outputs[0]
    with pytest.raises(ExportError, match=f"output '{out}'.*max abs diff"):
        fxonnx.check_parity(bad, conv_export.gm, (conv_export.x,))


# ------------------------------------------------------------------------------------------------- ONNX Runtime
def _matmul_model(path, k, n, seed=0):
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("Relu", ["H"], ["Y"])],
                          "mm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", n])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_ort_benchmark_and_compare(tmp_path):
    dense = _matmul_model(tmp_path / "dense.onnx", 256, 512)
    pruned = _matmul_model(tmp_path / "pruned.onnx", 256, 128)
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    st = fxort.benchmark(dense, (x,), warmup=2, repeats=30, threads=1)
    assert st.repeats == 30 and st.threads == 1
    assert 0 < st.p10_ms <= st.median_ms <= st.p90_ms and st.mean_ms > 0 and st.std_ms >= 0
    cmp = fxort.compare(dense, pruned, {"X": x}, warmup=2, repeats=20)
    assert cmp["dense"].repeats == cmp["pruned"].repeats == 20
    assert cmp["speedup"] == pytest.approx(cmp["dense"].median_ms / cmp["pruned"].median_ms)
    assert np.isfinite(cmp["speedup"]) and cmp["speedup"] > 0
    sess = fxort.session(dense, threads=2)
    (y,) = fxort.run(sess, [x])
    assert y.shape == (64, 512) and (y >= 0).all()


# ------------------------------------------------------------------------------------------------- TensorRT
def test_trt_check_passes_on_exported_model(conv_export):
    rep = fxtrt.check(conv_export.path)
    assert rep.ok, str(rep)
    assert rep.unsupported_ops == {} and not rep.unsupported_dtypes
    assert rep.tensorrt_version.startswith("10") and "Conv" in rep.op_counts
    assert list(rep.dynamic_inputs) == ["x"] and rep.dynamic_inputs["x"][1:] == [3, 16, 16]
    assert rep.raise_if_failed() is rep
    strict = fxtrt.check(conv_export.path, require_static_shapes=True)
    assert not strict.ok and any("dynamic" in e for e in strict.errors)
    with pytest.raises(ExportError, match="dynamic"):
        strict.raise_if_failed()
    assert "FAILED" in str(strict) and "OK" in str(rep)


def test_trt_check_flags_unsupported_ops_in_graph_functions_and_dtypes(tmp_path):
    # main graph: Relu (ok) -> local function (body: Det, unsupported) -> Unique (unsupported) -> custom-domain op
    fn = helper.make_function("local", "SquareDet", ["a"], ["d"], [helper.make_node("Det", ["a"], ["d"])],
                              [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Relu", ["X"], ["r"]),
             helper.make_node("SquareDet", ["r"], ["det"], domain="local"),
             helper.make_node("Unique", ["det"], ["u"]),
             helper.make_node("Foo", ["u"], ["Y"], domain="com.example")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 3]),
                                       helper.make_tensor_value_info("S", TensorProto.STRING, [1])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid("local", 1),
                                                                 helper.make_opsetid("com.example", 1)])
    path = tmp_path / "unsupported.onnx"
    onnx.save(model, path)
    rep = fxtrt.check(path)
    assert not rep.ok
    assert rep.unsupported_ops == {"Det": 1, "Unique": 1, "com.example::Foo": 1}
    assert rep.op_counts["Relu"] == 1 and "SquareDet" not in str(rep.unsupported_ops)
    assert any("Det" in e and "function SquareDet" in e for e in rep.errors)
    assert rep.unsupported_dtypes == {"S": "STRING"}
    with pytest.raises(ExportError, match="Unique"):
        rep.raise_if_failed()


def test_trt_check_restrictions(tmp_path):
    # Squeeze axes computed at run time, and a Resize with cubic mode: both rejected by the parser
    nodes = [helper.make_node("Shape", ["X"], ["s"]),
             helper.make_node("Slice", ["s", "zero", "one"], ["ax"]),
             helper.make_node("Sub", ["ax", "one"], ["ax0"]),
             helper.make_node("Squeeze", ["X", "ax0"], ["sq"]),
             helper.make_node("Resize", ["X", "", "scales"], ["Y"], mode="cubic")]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("sq", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "restr.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    rep = fxtrt.check(path)
    assert not rep.ok and rep.unsupported_ops == {}
    assert any("Squeeze" in e and "initializer" in e for e in rep.errors)
    assert any("cubic" in e for e in rep.errors)


def test_trt_check_sparse_2_4_on_export(conv_export):
    shapes = _init_shapes(conv_export.path)
    rep = fxtrt.check(conv_export.path, sparse_weights=True)
    assert rep.sparse_checked
    assert [shapes[n] for n in rep.sparse_ok] == [[16, 8, 3, 3]]  # c2 was made 2:4 along its input channels
    assert [v["shape"] for v in rep.sparse_violations] == [[10, 16]]  # fc is dense
    v = rep.sparse_violations[0]
    assert v["op"] == "Gemm" and v["bad_groups"] == v["groups"] == 40 and v["first"] == "[0, 0:4]"
    assert [s["shape"] for s in rep.sparse_skipped] == [[8, 3, 3, 3]] and "multiple of 4" in rep.sparse_skipped[0][
        "reason"]
    assert not rep.ok and any(v["tensor"] in e for e in rep.errors)
    assert "1 ok, 1 violating, 1 skipped" in str(rep)


def test_trt_sparse_check_honours_transB(tmp_path):
    w = np.tile(np.array([1, 1, 0, 0, 1, 0, 1, 0], np.float32), (4, 1))  # [4, 8]: 2:4 along dim 1 only
    nodes = [helper.make_node("Gemm", ["A", "W1"], ["Y1"], transB=1),  # B^T: reduction along dim 1 -> ok
             helper.make_node("Gemm", ["B", "W2"], ["Y2"], transB=0)]  # reduction along dim 0 (4 rows of ones)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 8]),
                                       helper.make_tensor_value_info("B", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("Y1", TensorProto.FLOAT, [1, 4]),
                           helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [1, 8])],
                          [numpy_helper.from_array(w, "W1"), numpy_helper.from_array(w, "W2")])
    path = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    rep = fxtrt.check(path, sparse_weights=True)
    assert rep.sparse_ok == ["W1"]
    assert [v["tensor"] for v in rep.sparse_violations] == ["W2"]
    assert rep.sparse_violations[0]["bad_groups"] == 4  # columns 0, 1, 4, 6 have 4 non-zeros out of 8 groups
    assert rep.sparse_violations[0]["groups"] == 8


def test_build_engine_without_tensorrt_raises(conv_export, tmp_path):
    if fxtrt.is_available():
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(BackendUnavailableError, match="(?s)TensorRT.*pip install tensorrt"):
        fxtrt.build_engine(conv_export.path, tmp_path / "m.engine")


@pytest.mark.skipif(not fxtrt.is_available(), reason="needs TensorRT and an NVIDIA GPU")
def test_build_engine_real(conv_export, tmp_path):
    info = fxtrt.build_engine(conv_export.path, tmp_path / "m.engine", precision="fp16",
                              min_shapes={"x": (1, 3, 16, 16)}, opt_shapes={"x": (2, 3, 16, 16)},
                              max_shapes={"x": (8, 3, 16, 16)})
    assert os.path.getsize(info.path) > 0 and info.profile["x"][2] == [8, 3, 16, 16]


# ------------------------------------------------------------------------------------------------- torch, packaging
def test_torch_backend_benchmark_and_compile():
    model = ConvNet()
    model.train()
    x = torch.randn(2, 3, 16, 16)
    threads = torch.get_num_threads()
    st = fxtorch.benchmark(types.SimpleNamespace(module=model), (x,), warmup=1, repeats=5, threads=2)
    assert st.repeats == 5 and st.threads == 2 and 0 < st.p10_ms <= st.median_ms <= st.p90_ms
    assert torch.get_num_threads() == threads and model.training
    compiled = fxtorch.compile(model.eval(), backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_import_is_light_and_missing_onnx_names_the_extra(monkeypatch):
    import ast
    from pathlib import Path

    import fxprune.backends as b

    heavy = {"onnx", "onnxruntime", "onnxsim", "onnxscript", "tensorrt"}
    for f in Path(b.__file__).parent.glob("*.py"):  # no module-level import of an optional dependency
        for node in ast.parse(f.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not {n.split(".")[0] for n in names} & heavy, (f.name, names)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the onnx extra were not installed
    with pytest.raises(BackendUnavailableError, match=r"fxprune\[onnx\]"):
        fxonnx.export(nn.Linear(2, 2), (torch.randn(2, 2),), "never.onnx")
    with pytest.raises(BackendUnavailableError, match=r"fxprune\[onnx\]"):
        fxtrt.check("never.onnx")
