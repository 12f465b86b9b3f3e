"""The README's main job, `fxprune demo`, end to end in a subprocess (random init said in the progress, the printed
report and report.json/report.md); usage errors exit 2 with one line."""
import json
import subprocess
import sys


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


def test_passes_lists_builtins(tmp_path):
    r = _run("passes", "--json", cwd=tmp_path)
    names = {p["name"] for p in json.loads(r.stdout)}
    assert {"channel_prune", "shrink", "apply_masks"} <= names
