"""passes/, backends/, models/ install as fxprune.passes / .backends / .models (wheel and editable)."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_subpackages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    (whl,) = tmp_path.glob("fxprune-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for pkg in ("fxprune", "fxprune/passes", "fxprune/backends", "fxprune/models"):
        assert f"{pkg}/__init__.py" in names, pkg
    assert "fxprune/passes/shrink.py" in names
    # a non-editable install of the wheel imports the mapped packages
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(whl)],
                   check=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fxprune, fxprune.passes, fxprune.backends, "
            "fxprune.models; assert fxprune.__file__.startswith(sys.argv[1]), fxprune.__file__; "
            "print(fxprune.passes.Shrink)")
    out = subprocess.run([sys.executable, "-c", code, str(target)], check=True, capture_output=True, text=True,
                         cwd=tmp_path)
    assert "Shrink" in out.stdout


def test_editable_import():
    import fxprune.backends
    import fxprune.models
    import fxprune.passes

    assert fxprune.passes.ChannelPrune is not None
    assert Path(fxprune.passes.__file__).parent.name == "passes"
