"""Report rendering: report.md as Markdown tables with every label in full, report.png with heads and channels as
fractions kept, report.json with folder-relative paths and latency under a stable key."""
import json
import os

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.plot import group_fractions, markdown, plot_report
from fxprune.report import GroupRow, Report

LONG = "encoder.layers.11.attention.self_attention_with_a_very_long_name.query_projection.weight[0]"


def _report() -> Report:
    groups = [GroupRow(0, LONG, "channels", 5, 512, 256, importance=(0.5, 1.0, 1.5)),
              GroupRow(1, "encoder.layers.0.attn.q.weight[0]", "heads", 2, 4, 2),
              GroupRow(2, "head.weight[0]", "channels", 1, 10, 10, frozen="graph output | with a pipe")]
    return Report(model="Net", tracer="torch.export(strict=False)", dynamic_batch=True, params_before=1000,
                  params_after=400, macs_before=10_000, macs_after=3_000, verified=True, max_abs_diff=1e-7,
                  groups=groups, latency={"onnxruntime": "batch 8, 2 threads: dense 2.000 ms, pruned 1.000 ms"})


def test_markdown_tables_keep_full_labels():
    d = _report().to_dict()
    d.update(weights="random init (seed 0)", source="my|model.py:build (Net)",
             files={"report.md": "the report (Markdown)"}, notes=["a note"])
    md = markdown(d, plot="report.png")
    assert "```\n" not in md.split("## Recipe")[0]  # no fixed-width text blocks: Markdown tables
    assert "| params | 1,000 | 400 | 0.400 |" in md
    assert f"`{LONG}`" in md  # the whole label, not cut
    assert "graph output \\| with a pipe" in md  # a '|' inside a cell does not break the table
    assert "| weights | random init (seed 0) |" in md and "`my\\|model.py:build (Net)`" in md
    assert "![fraction of each group kept and per-layer sparsity](report.png)" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| 0 |") or ln.startswith("| 1 |")]
    assert rows[0].count(" | ") == rows[1].count(" | ") == 6  # 7 columns per group row
    assert "| onnxruntime | batch 8, 2 threads" in md  # latency without a benchmark dict: by its key


def test_heads_and_channels_are_plotted_as_fractions(tmp_path):
    pytest.importorskip("matplotlib")
    rep = _report()
    fr = group_fractions(rep)
    assert [(f["id"], f["kind"], f["kept"]) for f in fr] == [(0, "channels", 0.5), (1, "heads", 0.5)]
    png = plot_report(rep, tmp_path / "r.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_saved_report_json_paths_and_latency_key(tmp_path, monkeypatch):
    """What the CLI writes into report.json through fxprune.archive.save: ONNX paths relative to the folder (the
    folder can move), latency keyed by the backend."""
    from fxprune.cli import _export_info, _latency_entry

    class R:  # an onnx ExportResult as the CLI sees it, exported into a staging folder
        path, exporter, opset, dynamic_batch, simplified, max_abs_diff = "/tmp/x/pruned.onnx", "dynamo", 20, True, \
            True, {"out": 0.0}
        notes = ["\x1b[1mbold\x1b[0m note"]

    info = _export_info(R(), "pruned.onnx")
    assert info["path"] == "pruned.onnx" and info["notes"] == ["bold note"]
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    from fxprune.passes import ChannelPrune, Shrink

    out = fxprune.compile(model, (torch.randn(2, 3, 12, 12),), passes=[ChannelPrune(ratio=0.5), Shrink()])
    bench = {"backend": "onnxruntime", "batch": 2, "threads": 2, "dense_ms": 2.0, "pruned_ms": 1.0, "speedup": 2.0,
             "ideal_speedup": 2.5}
    out.report.latency[bench["backend"]] = _latency_entry(bench, "dense 2.000 ms, pruned 1.000 ms")
    monkeypatch.chdir(tmp_path)
    out.save("sub/folder", extra={"onnx": {"pruned": info}, "files": {"pruned.onnx": "x"}, "benchmark": bench})
    rep = json.loads((tmp_path / "sub" / "folder" / "report.json").read_text())
    assert list(rep["latency"]) == ["onnxruntime"] and rep["latency"]["onnxruntime"].startswith("batch 2, 2 threads")
    assert rep["onnx"]["pruned"]["path"] == "pruned.onnx" and not os.path.isabs(rep["onnx"]["pruned"]["path"])
    assert all(os.sep not in name for name in rep["files"])
    md = (tmp_path / "sub" / "folder" / "report.md").read_text()
    assert "| onnxruntime | 2 | 2 | 2.000 | 1.000 | 2.000x | 2.500x |" in md


def test_text_table_cuts_labels_with_an_ellipsis_only():
    table = _report().table()
    row = next(ln for ln in table.splitlines() if ln.strip().startswith("0 "))
    assert "…" + LONG[-39:] in row and LONG not in row  # the end (parameter and dim) stays readable
    assert "encoder.layers.0.attn.q.weight[0]" in table  # short labels whole
    assert "frozen: graph output | with a pipe" in table  # the note, the last column, whole
    assert all(ln == ln.rstrip() for ln in table.splitlines())
