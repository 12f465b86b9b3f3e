"""The "fxprune" logger (issue 12): progress of trace, analyze, each pass (with its time), verification and export at
INFO; warnings for what users must know; quiet by default (NullHandler); plain text."""
import logging
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.passes import ChannelPrune, Shrink


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


class Fixed(Net):
    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).reshape(2, 8, -1).mean(-1))


def _messages(caplog):
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("fxprune")]


def test_compile_logs_each_long_step_with_its_time(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="fxprune"):
        out = fxprune.compile(Net().eval(), (torch.randn(2, 3, 8, 8),), passes=[ChannelPrune(0.5), Shrink()])
    msgs = [m for _, _, m in _messages(caplog)]
    text = "\n".join(msgs)
    assert re.search(r"tracing Net\(Tensor\(2, 3, 8, 8\):float32\)", text)
    assert re.search(r"traced Net in \d+\.\d\d s: \d+ nodes, dynamic x\[\(0, 'batch'\)\]", text)
    assert re.search(r"analyze: \d+\.\d\d s, \d+ groups \(\d+ prunable\); running 2 passes: channel_prune, shrink",
                     text)
    assert re.search(r"pass channel_prune: \d+\.\d\d s", text)
    assert re.search(r"pass shrink: \d+\.\d\d s, verified \(max abs diff [^)]+\)", text)
    assert re.search(r"compiled Net in \d+\.\d\d s: params [\d,]+ -> [\d,]+, MACs [\d,]+ -> [\d,]+, verified yes",
                     text)
    assert out.report.verified
    assert all(lvl == logging.INFO for _, lvl, _ in _messages(caplog))
    assert not any("\x1b" in m for m in msgs)


def test_analyze_logs(caplog):
    with caplog.at_level(logging.INFO, logger="fxprune"):
        fxprune.analyze(Net().eval(), (torch.randn(2, 3, 8, 8),))
    assert any(m.startswith("analyze: ") for _, _, m in _messages(caplog))


def test_static_fallback_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        out = fxprune.compile(Fixed().eval(), (torch.randn(2, 3, 8, 8),), passes=[ChannelPrune(0.5), Shrink()])
    warns = [(n, m) for n, lvl, m in _messages(caplog) if lvl == logging.WARNING]
    assert warns and warns[0][0] == "fxprune.trace" and "static batch" in warns[0][1]
    assert out.report.notes and out.report.notes[0] in warns[0][1]


def test_library_is_quiet_by_default():
    """No logging configured: nothing from fxprune on stderr, not even the static-batch warning."""
    script = textwrap.dedent("""
        import logging, torch, torch.nn as nn, fxprune
        assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("fxprune").handlers)
        class Fixed(nn.Module):
            def __init__(self):
                super().__init__(); self.c = nn.Conv2d(3, 4, 3)
            def forward(self, x):
                return self.c(x).reshape(2, -1)
        out = fxprune.compile(Fixed().eval(), (torch.randn(2, 3, 8, 8),), passes=[])
        assert out.report.notes
        print("done")
    """)
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]
    assert "static batch" not in r.stderr and "fxprune" not in r.stderr


def test_onnx_export_logs(caplog, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fxprune.backends import onnx as fxonnx

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    out = fxprune.compile(Net().eval(), (x,), passes=[ChannelPrune(0.5), Shrink()])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fxprune"):
        fxonnx.export(out, (x,), tmp_path / "m.onnx")
    text = "\n".join(m for n, _, m in _messages(caplog) if n == "fxprune.onnx")
    assert re.search(r"exporting PrunedModule to .*m\.onnx", text)
    assert re.search(r"onnx export: \d+\.\d\d s", text)
    assert re.search(r"onnx parity check \(onnxruntime vs torch\): \d+\.\d\d s, parity ok at batch \[2, 5\]", text)
