"""Compiled.benchmark / fxprune.latency: dense vs pruned in one run, exporting or timing given ONNX files."""
import pytest

import fxprune
from fxprune import latency, models
from fxprune.passes import ChannelPrune, Shrink

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def compiled():
    m, x = models.get("resnet56", "tiny")
    return fxprune.compile(m, x, passes=[ChannelPrune(0.5), Shrink()])


def test_benchmark_exports_and_records(compiled):
    res = compiled.benchmark(repeats=3, warmup=1, threads=1)
    assert res["backend"] == "onnxruntime" and res["batch"] == 2
    assert res["dense_ms"] > 0 and res["pruned_ms"] > 0
    assert res["speedup"] == pytest.approx(res["dense_ms"] / res["pruned_ms"])
    assert res["ideal_speedup"] == pytest.approx(1 / compiled.report.macs_ratio)
    assert any(k.startswith("onnxruntime (batch 2") for k in compiled.report.latency)


def test_benchmark_times_given_files_at_another_batch(compiled, tmp_path):
    from fxprune.backends import onnx

    ex = latency.example_inputs(compiled)
    onnx.export(compiled.program.source, ex, tmp_path / "d.onnx")
    compiled.export_onnx(tmp_path / "p.onnx")
    res = latency.benchmark(compiled, batch=5, repeats=3, warmup=1, threads=1, record=False,
                            onnx_files=(tmp_path / "d.onnx", tmp_path / "p.onnx"))
    assert res["batch"] == 5 and res["dense_ms"] > 0 and res["pruned_ms"] > 0
    assert latency.batched(ex, 5)[0].shape[0] == 5
    assert "speedup" in latency.latency_line(res)


def test_benchmark_reuses_its_exports_and_prints_one_line(compiled, monkeypatch, caplog):
    from fxprune.backends import onnx

    calls = []
    real_latency_export, real_backend_export = latency.export_onnx, onnx.export
    monkeypatch.setattr(latency, "export_onnx", lambda *a, **k: calls.append("pruned") or real_latency_export(*a, **k))
    monkeypatch.setattr(onnx, "export", lambda *a, **k: calls.append("any") or real_backend_export(*a, **k))
    fresh = fxprune.compile(compiled.program.source, latency.example_inputs(compiled),
                            passes=[ChannelPrune(0.5), Shrink()])
    with caplog.at_level("INFO", logger="fxprune"):
        first = fresh.benchmark(repeats=2, warmup=1, threads=1)
    n_first = len(calls)
    assert n_first >= 2 and "exporting the dense model" in caplog.text  # both models exported once, and said so
    second = fresh.benchmark(repeats=2, warmup=1, threads=1, batch=3)
    assert len(calls) == n_first  # nothing exported again
    assert second["batch"] == 3 and second["dense_ms"] > 0
    line = str(first)
    assert line.startswith("onnxruntime, batch 2, 1 threads: dense ") and "speedup" in line and "\n" not in line
    assert isinstance(first, dict) and first["pruned_ms"] > 0
