"""The command line: `fxprune compile` end to end in a subprocess (files written, JSON output), exit codes 0/1/2
in-process, `passes` and `report`."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fxprune.cli import main

MODEL_PY = textwrap.dedent("""\
    import torch
    import torch.nn as nn


    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                                      nn.Conv2d(16, 24, 1), nn.ReLU())
            self.head = nn.Linear(24, 4)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))


    class Branchy(Small):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow: torch.export refuses it
                x = x * 2
            return super().forward(x)


    def build():
        return Small(), (torch.randn(2, 3, 16, 16),)


    def build_plain():
        return Small()


    def branchy():
        return Branchy(), (torch.randn(2, 3, 16, 16),)
""")

RECIPE = "passes:\n  - pass: channel_prune\n    ratio: 0.5\n  - pass: shrink\n"


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_PY)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fxprune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_compile_end_to_end_subprocess(files, capsys):
    out = files / "out"
    r = _run("compile", "model.py:build", "--recipe", "recipe.yaml", "--out", str(out), "--json",
             "--repeats", "3", "--warmup", "1", "--no-simplify", cwd=files)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)  # stdout: one JSON document
    events = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]  # stderr: JSON lines
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5]
    assert rep["verified"] is True and rep["params_after"] < rep["params_before"]
    assert rep["recipe"] == [json.loads(json.dumps(x)) for x in rep["recipe"]] and rep["recipe"][0]["ratio"] == 0.5
    assert rep["onnx"]["pruned"]["dynamic_batch"] is True and rep["benchmark"]["backend"] == "onnxruntime"
    assert rep["benchmark"]["speedup"] > 0 and any(k.startswith("onnxruntime") for k in rep["latency"])
    assert [r_["name"] for r_ in rep["layer_sparsity"]] == ["body.0.weight", "body.3.weight", "body.5.weight",
                                                           "head.weight"]
    for name in ("program.pt2", "weights.pt", "report.json", "report.md", "report.png", "recipe.yaml",
                 "dense.onnx", "pruned.onnx", "keep.json", "manifest.json"):
        assert (out / name).exists(), name
    assert "pass: channel_prune" in (out / "recipe.yaml").read_text()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "params" in printed and "recipe:" in printed and "onnxruntime (batch 2" in printed
    from fxprune.serialize import load

    c = load(out)
    x = torch.randn(3, 3, 16, 16)
    assert c.module(x).shape == (3, 4)


def test_usage_errors_exit_2(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    assert main(["bogus"]) == 2
    assert main(["compile", "model.py:build"]) == 2  # --recipe missing
    assert main(["demo", "--ratio", "abc"]) == 2
    capsys.readouterr()
    assert main(["compile", "no_such_model", "--recipe", "recipe.yaml"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(["compile", "torchvision:resnet5", "--recipe", "recipe.yaml"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["compile", "resnet18", "--recipe", "recipe.yaml"]) == 2  # fxprune.zoo's hint: the zoo prefix
    assert "did you mean torchvision:resnet18?" in capsys.readouterr().err
    assert main(["compile", "resnet56", "--recipe", "recipe.yaml", "--hf-config", "hidden_size=8"]) == 2
    assert "apply to hf: models" in capsys.readouterr().err
    assert main(["compile", "hf:llama", "--recipe", "recipe.yaml", "--hf-config", "num_hiden_layers=1"]) == 2
    assert "has no field 'num_hiden_layers'" in capsys.readouterr().err
    assert main(["compile", "resnet56", "--recipe", "recipe.yaml", "--input-shape", "2,x,3"]) == 2
    assert "bad --input-shape" in capsys.readouterr().err
    (files / "bad.yaml").write_text("passes:\n  - pass: chanel_prune\n    ratio: 0.5\n")
    assert main(["compile", "resnet56", "--recipe", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass 'chanel_prune'" in err and "shrink" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["compile", "resnet56", "--recipe", "missing.yaml"]) == 2
    assert main(["compile", "model.py:nope", "--recipe", "recipe.yaml"]) == 2
    assert "has no callable 'nope'" in capsys.readouterr().err
    assert main(["compile", "model.py:build_plain", "--recipe", "recipe.yaml"]) == 2  # no inputs, no --input-shape
    assert main(["passes", "no_such_pass"]) == 2
    assert main(["demo", "--model", "nope"]) == 2
    capsys.readouterr()
    assert main(["compile", "resnet56", "--recipe", "bad.yaml", "--json"]) == 2
    e = json.loads(capsys.readouterr().err)
    assert e["event"] == "error" and e["exit_code"] == 2 and e["type"] == "RecipeError"


def test_failures_exit_1_with_one_line(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    args = ["compile", "model.py:branchy", "--recipe", "recipe.yaml", "--no-onnx", "--no-latency", "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("fxprune: TraceError: could not trace Branchy") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(Exception, match="could not trace"):
        main(args + ["--debug"])  # --debug lets the exception (and its traceback) through
    assert main(["report", str(files / "missing")]) == 1
    assert "no report.json" in capsys.readouterr().err


def test_file_factory_with_weights_no_onnx(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    sys.path.insert(0, str(files))
    try:
        import model as user_model
    finally:
        sys.path.pop(0)
    m = user_model.Small()
    torch.save({"state_dict": m.state_dict()}, files / "w.pt")
    rc = main(["compile", "model.py:build_plain", "--recipe", "recipe.yaml", "--input-shape", "2,3,16,16",
               "--weights", "w.pt", "--out", "o", "--no-onnx", "--no-latency", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert "verified (shrunk == masked): yes" in printed.out and printed.err == ""
    rep = json.loads((files / "o" / "report.json").read_text())
    assert "onnx" not in rep and rep["source"].startswith("model.py:build_plain")
    torch.save({"other.weight": torch.ones(1)}, files / "bad.pt")
    assert main(["compile", "model.py:build", "--recipe", "recipe.yaml", "--weights", "bad.pt", "--no-onnx",
                 "--quiet"]) == 1
    assert "does not match the model" in capsys.readouterr().err


def test_passes_lists_options_with_docs(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "channel_prune" in out and "- ratio (default None): fraction of channels removed" in out
    assert main(["passes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"channel_prune", "shrink", "apply_masks"} <= set(rows)
    opts = {o["name"]: o for o in rows["channel_prune"]["options"]}
    assert opts["round_to"]["default"] == 1 and not opts["round_to"]["required"]
    assert rows["shrink"]["modifies_weights"] is True
    assert main(["passes", "shrink"]) == 0
    assert "verify" in capsys.readouterr().out
