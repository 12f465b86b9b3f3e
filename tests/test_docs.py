"""Every code block in README.md and docs/*.md runs as written, so the docs cannot rot.

Per page, the ```python blocks run in order in one namespace, in a fresh temporary working directory (a page may
build a model in one block and use it in the next); the ``fxprune ...`` lines of its ```bash blocks run as
commands (``python -m fxprune ...``) in the same folder and must exit 0. ``pip install`` and ``python -m pytest``
lines are not run here: ``test_quick_start_*`` check the README's two commands instead. A block right after the
HTML comment ``<!-- docs-test: file NAME -->`` (invisible on the rendered page) is written to ``NAME`` in that
folder instead of being run: the recipe or model file the next blocks use.

Pages whose blocks take minutes run only with ``-m slow`` (the project's default run deselects it). Fast checks on
every page that is not excluded, slow or not: Python blocks parse, and no template placeholder (``RESULTS_TABLE``,
``{{ ... }}``) is left in the prose.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Pages written by other engineers right now: neither run nor checked yet (docs/udfc.md still holds a
#: RESULTS_PLACEHOLDER, for one). Remove a page from this list to add it to every check; test_exclusions_are_current
#: keeps the list honest.
EXCLUDED = {
    "docs/ARCHITECTURE.md": "the one-page map: no code blocks",
    "docs/analyzer.md": "its block is an excerpt of a rule module (relative imports), not a runnable script",
    "docs/kv_cache.md": "its blocks are API fragments over a user's hf_model/ids (not yet made self-contained)",
}

#: Pages whose blocks take minutes on 2 shared cores: run with -m slow
SLOW = {
    "README.md": "ResNet-50 at 224x224: compile, ONNX export of both models, latency, save",
    "docs/sparsity.md": "PDP training loop, LPViT calibration and BSR timing on a ViT, ONNX export",
    "docs/training.md": "sparse training, pruning and distillation loops",
    "docs/gating.md": "MACPruning saliency calibration and an FTWT training loop",
    "docs/cli.md": "five commands in subprocesses, ONNX export and latency, six zoo models",
    "docs/llm.md": "SmolLM2-135M: activation calibration over 4 x 512 tokens, verified compile, save_pretrained",
    "docs/scale.md": "streams three checkpoints, a 2-process torchrun calibration, in-memory compiles",
}

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)
#: a template name left in the prose (RESULTS_TABLE, MACS_LINE), or {{ ... }}; code spans and blocks are not prose
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b|\{\{[^}]*\}\}")


def prose(text: str) -> str:
    """``text`` without fenced blocks and code spans (where ALL_CAPS names are real: HF_HUB_OFFLINE, ...)."""
    return re.sub(r"(`+)(?:(?!\1).)*?\1", "", FENCE.sub("", text), flags=re.S)


def pages() -> list[str]:
    return ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))


FILE_MARK = re.compile(r"<!--\s*docs-test:\s*file\s+(?P<name>[\w./-]+)\s*-->\s*$")


def blocks(page: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block of ``page`` (indented fences dedented); a block after a
    ``<!-- docs-test: file NAME -->`` comment has the language ``file:NAME``."""
    text = (ROOT / page).read_text()
    out = []
    for m in FENCE.finditer(text):
        lang = m.group("lang").lower()
        mark = FILE_MARK.search(text[:m.start()].rstrip("\n"))
        if mark:
            lang = f"file:{mark.group('name')}"
        out.append((lang, textwrap.dedent(m.group("body")), text.count("\n", 0, m.start()) + 2))
    return out


def commands(code: str) -> list[str]:
    """The ``fxprune ...`` commands of a shell block (``&&`` chains split; pip/pytest parts left out)."""
    out = []
    for line in code.splitlines():
        line = line.strip().removeprefix("$ ")
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith("fxprune ") or part == "fxprune":
                out.append(part)
    return out


def _params(slow_pages: bool) -> list:
    out = []
    for page in pages():
        if page in EXCLUDED or (page in SLOW) != slow_pages:
            continue
        marks = [pytest.mark.slow] if page in SLOW else []
        out.append(pytest.param(page, marks=marks, id=page))
    return out


def run_page(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__main__"}
    found = False
    for lang, code, line in blocks(page):
        if lang.startswith("file:"):
            path = tmp_path / lang[len("file:"):]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(code)
        elif lang == "python":
            found = True
            try:
                exec(compile(code, f"{page}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own code
            except BaseException as e:
                raise AssertionError(f"{page}, the python block at line {line} fails: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}") from e
        elif lang in ("bash", "sh", "shell", "console"):
            for cmd in commands(code):
                found = True
                args = shlex.split(cmd)[1:]
                r = subprocess.run([sys.executable, "-m", "fxprune", *args], cwd=tmp_path, capture_output=True,
                                   text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
                assert r.returncode == 0, f"{page}, line {line}: `{cmd}` exits {r.returncode}: {r.stderr[-2000:]}"
    assert found or page in ("docs/CONTRIBUTING.md",), f"{page} has no runnable block: list it or add one"


@pytest.mark.parametrize("page", _params(slow_pages=False))
def test_page_runs(page, tmp_path, monkeypatch):
    run_page(page, tmp_path, monkeypatch)


@pytest.mark.parametrize("page", _params(slow_pages=True))
def test_slow_page_runs(page, tmp_path, monkeypatch):
    run_page(page, tmp_path, monkeypatch)


def test_placeholder_check_sees_template_names():
    assert PLACEHOLDER.findall(prose("Results:\n\nRESULTS_TABLE\n\nMACs fall: MACS_LINE. Set `HF_HUB_OFFLINE=1`.")) \
        == ["RESULTS_TABLE", "MACS_LINE"]


@pytest.mark.parametrize("page", [p for p in pages() if p not in EXCLUDED])
def test_blocks_parse_and_no_placeholders(page):
    text = (ROOT / page).read_text()
    left = [m.group(0).strip() for m in PLACEHOLDER.finditer(prose(text))]
    assert not left, f"{page}: unfilled template placeholders {left}"
    for lang, code, line in blocks(page):
        if lang == "python":
            compile(code, f"{page}:{line}", "exec")  # a SyntaxError names the page and line


def test_exclusions_are_current():
    """The exclusion and slow lists name pages that exist (an excluded page may not be written yet) and every
    non-excluded page is either fast or slow, never silently skipped."""
    for page in SLOW:
        assert (ROOT / page).exists(), f"SLOW lists {page}, which does not exist"
        assert page not in EXCLUDED, f"{page} is both excluded and slow"
    for page in EXCLUDED:
        assert page.startswith("docs/") and page.endswith(".md")
    run = {p.values[0] for p in _params(False) + _params(True)}
    assert run == {p for p in pages() if p not in EXCLUDED}  # every other page runs, fast or slow


def test_quick_start_is_two_commands():
    """README "Quick start": exactly two commands, one installs and runs the main job with a printed report, one
    installs the test extras and runs the tests (what .ci/run runs)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    bash = [code for lang, code, _ in ((m.group("lang"), m.group("body"), 0) for m in FENCE.finditer(section))
            if lang == "bash"]
    assert len(bash) == 1
    lines = [ln for ln in bash[0].splitlines() if ln.strip()]
    assert lines == ["pip install -e '.[onnx,plot]' && fxprune demo", "pip install -e '.[dev]' && python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[dev]'" in ci and "python -m pytest -q" in ci
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"onnx", "plot", "dev"} <= set(extras)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(reqs: list[str]) -> set[str]:
    """The distributions ``reqs`` install, with everything they require (extras of dependencies left out)."""
    from importlib import metadata

    def name_of(req: str) -> str:
        return _norm(re.split(r"[\s<>=!~\[(;]", req.strip(), maxsplit=1)[0])

    seen: set[str] = set()
    todo = [name_of(r) for r in reqs]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            sub = metadata.requires(n) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [name_of(r) for r in sub if "extra ==" not in r.partition(";")[2]]
    return seen


@pytest.mark.slow
def test_quick_start_needs_only_the_declared_dependencies(tmp_path):
    """`fxprune demo` works with only what `pip install -e '.[onnx,plot]'` brings (the base dependencies and those
    two extras, with everything they require): every other installed distribution is hidden from the import system
    while the demo runs, so the first command of the quick start works on a fresh machine."""
    import json
    import tomllib
    from importlib import metadata

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    allowed = _closure(project["dependencies"] + extras["onnx"] + extras["plot"]) | {"fxprune"}
    hidden = sorted({m for m, dists in metadata.packages_distributions().items()
                     if m.isidentifier() and not any(_norm(d) in allowed for d in dists)})
    assert "transformers" in hidden or "timm" in hidden or "pytest" in hidden  # the check hides something real
    probe = textwrap.dedent("""\
        import json, sys
        from importlib.machinery import PathFinder
        HIDDEN = set(json.loads(sys.argv[1]))
        class Hide:  # PathFinder that does not see the hidden distributions (find_spec -> None: "not installed")
            def find_spec(self, name, path=None, target=None):
                return None if name.partition(".")[0] in HIDDEN else PathFinder.find_spec(name, path, target)
            def __getattr__(self, attr):
                return getattr(PathFinder, attr)
        sys.meta_path[:] = [Hide() if f is PathFinder else f for f in sys.meta_path]
        assert not HIDDEN & {m.partition(".")[0] for m in sys.modules}
        from fxprune.cli import main
        rc = main(["demo", "--size", "tiny", "--out", "out", "--repeats", "2", "--warmup", "1"])
        print(json.dumps({"rc": rc}))
    """)
    r = subprocess.run([sys.executable, "-c", probe, json.dumps(hidden)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=1800)
    lines = r.stdout.strip().splitlines()
    assert lines and json.loads(lines[-1])["rc"] == 0, r.stderr[-3000:]
    assert "verified (shrunk == masked): yes" in r.stdout and (tmp_path / "out" / "report.md").exists()
    # the whole job, not a fallback: ONNX export and onnxruntime timing (onnx extra), the plot (plot extra)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["benchmark"]["backend"] == "onnxruntime" and not rep.get("notes"), rep.get("notes")
    assert (tmp_path / "out" / "pruned.onnx").exists() and (tmp_path / "out" / "report.png").exists()
