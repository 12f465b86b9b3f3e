"""The README's main job, `fxprune demo`, end to end in a subprocess (random init said in the progress, the printed
report and report.json/report.md); usage errors exit 2 with one line."""
import json
import os
import subprocess
import sys

import pytest


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fxprune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_demo_tiny(tmp_path):
    r = _run("demo", "--size", "tiny", "--out", str(tmp_path / "out"), "--no-latency", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verified (shrunk == masked): yes" in r.stdout
    assert "warning: weights: random init (seed 0), made observable" in r.stderr
    assert "weights: random init" in r.stdout and "\x1b" not in r.stdout + r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["verified"] is True and rep["params_after"] < rep["params_before"]
    assert rep["weights"].startswith("random init") and rep["onnx"]["pruned"]["path"] == "pruned.onnx"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| weights | random init" in md and "| group | kind | channels |" in md
    listed = r.stdout.split("files written to")[1]
    assert "dense.onnx" in listed and "report.md" in listed
    r2 = _run("report", str(tmp_path / "out"), cwd=tmp_path)
    assert r2.returncode == 0 and "params" in r2.stdout and "weights: random init" in r2.stdout


def test_usage_errors(tmp_path):
    r = _run("demo", "--model", "nope", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = _run("bogus-command", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "usage:" not in r.stderr
    r = _run("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("fxprune ")
    r = _run("report", str(tmp_path / "missing"), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    for bad in (("--target-latency", "1.5"), ("--target-latency", "0.5", "--no-latency")):
        r = _run("demo", *bad, "--out", str(tmp_path / "o"), cwd=tmp_path)
        assert r.returncode == 2 and "--target-latency" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_demo_with_a_latency_target(tmp_path):
    """`fxprune demo --target-latency`: LatencyPrune at the timed batch, its prediction and the run's measurement
    printed side by side, the deployable files written."""
    env = {**os.environ, "FXPRUNE_LATENCY_CACHE": str(tmp_path / "cache")}  # a fresh table, not the user's
    r = subprocess.run([sys.executable, "-m", "fxprune", "demo", "--size", "tiny", "--target-latency", "0.6",
                        "--batch", "4", "--repeats", "5", "--out", str(tmp_path / "out")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "latency predicted: LatencyPrune target 0.60 of dense: predicted" in r.stdout
    assert "latency onnxruntime: batch 4" in r.stdout and "verified (shrunk == masked): yes" in r.stdout
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    st = rep["passes"][0]["stats"]
    assert rep["passes"][0]["pass"] == "latency_prune" and st["measured_ms"] > 0 and st["predicted_ms"] > 0
    assert (tmp_path / "out" / "pruned.onnx").is_file() and (tmp_path / "cache").is_dir()


def test_passes_lists_builtins(tmp_path):
    r = _run("passes", "--json", cwd=tmp_path)
    names = {p["name"] for p in json.loads(r.stdout)}
    assert {"channel_prune", "shrink", "apply_masks"} <= names
