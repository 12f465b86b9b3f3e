"""The README's main job, `fxprune demo`, end to end in a subprocess; usage errors exit 2."""
import json
import subprocess
import sys


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fxprune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_demo_tiny(tmp_path):
    r = _run("demo", "--size", "tiny", "--out", str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verified (shrunk == masked): yes" in r.stdout
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["verified"] is True and rep["params_after"] < rep["params_before"]
    r2 = _run("report", str(tmp_path / "out"), cwd=tmp_path)
    assert r2.returncode == 0 and "params" in r2.stdout


def test_usage_errors(tmp_path):
    assert _run("demo", "--model", "nope", cwd=tmp_path).returncode == 2
    assert _run("bogus-command", cwd=tmp_path).returncode == 2
    r = _run("report", str(tmp_path / "missing"), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_passes_lists_builtins(tmp_path):
    r = _run("passes", "--json", cwd=tmp_path)
    names = {p["name"] for p in json.loads(r.stdout)}
    assert {"channel_prune", "shrink", "apply_masks"} <= names
