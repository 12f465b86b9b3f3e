"""Hostile and malformed save folders, interrupted saves, re-used folders, mismatched models (issue 11)."""
import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import archive
from fxprune.archive import FILES, load, save
from fxprune.errors import InputError, LoadError
from fxprune.passes import ChannelPrune, Shrink
from fxprune.replay import replay
from fxprune.testing import make_observable


class Small(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _small(c=8, seed=0):
    torch.manual_seed(seed)
    return make_observable(Small(c).eval(), seed=seed)


X = torch.randn(2, 3, 8, 8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = fxprune.compile(_small(), (X,), passes=[ChannelPrune(ratio=0.5), Shrink()])
    d = save(out, tmp_path_factory.mktemp("small") / "saved", plot=False)
    return out, d


@pytest.fixture()
def copy(saved, tmp_path):
    """A private copy of the saved folder."""
    dst = tmp_path / "copy"
    shutil.copytree(saved[1], dst)
    return dst


def _reseal(d: Path) -> None:
    """Recompute manifest.json's checksums, so that a mutated file fails on its content, not its checksum."""
    m = json.loads((d / "manifest.json").read_text())
    m["files"] = {n: {"bytes": (d / n).stat().st_size, "sha256": hashlib.sha256((d / n).read_bytes()).hexdigest()}
                  for n in m["files"] if (d / n).is_file()}
    (d / "manifest.json").write_text(json.dumps(m))


def _rewrite_pt2(path: Path, fn) -> None:
    """Rewrite program.pt2's zip entries with ``fn(entries: dict[name, bytes], root: str)``."""
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    root = next(iter(entries)).split("/")[0]
    fn(entries, root)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, b in entries.items():
            z.writestr(n, b)


class _CreatesFile:
    """Unpickling this creates ``path`` (what an attacker's payload would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_CreatesFile(marker))


# ============================================================================================ code execution
def _opaque_in_subfolder(entries, root, marker):
    cfg_name = f"{root}/data/constants/model_constants_config.json"
    cfg = json.loads(entries[cfg_name])
    cfg["config"]["evil"] = {"path_name": "opaque_obj_x/payload", "is_param": False, "use_pickle": True,
                             "tensor_meta": None}
    entries[cfg_name] = json.dumps(cfg).encode()
    entries[f"{root}/data/constants/opaque_obj_x/payload"] = _payload(marker)


def _pickled_weight(entries, root, marker):
    cfg_name = f"{root}/data/weights/model_weights_config.json"
    cfg = json.loads(entries[cfg_name])
    fqn, meta = next(iter(cfg["config"].items()))
    meta["use_pickle"] = True
    entries[f"{root}/data/weights/{meta['path_name']}"] = _payload(marker)
    entries[cfg_name] = json.dumps(cfg).encode()


def _pickled_sample_inputs(entries, root, marker):
    entries[f"{root}/data/sample_inputs/model.pt"] = _payload(marker)  # torch retries with weights_only=False


def _legacy_weights_file(entries, root, marker):
    entries[f"{root}/data/weights/model.pt"] = _payload(marker)


def _custom_obj_by_prefix(entries, root, marker):
    entries[f"{root}/data/constants/custom_obj_0"] = _payload(marker)


def _aoti_library(entries, root, marker):
    entries[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF not really"


def _os_system_node(entries, root, marker):
    name = f"{root}/models/model.json"
    m = json.loads(entries[name])
    node = m["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.serialization.os.system"
    node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]
    entries[name] = json.dumps(m).encode()


def _old_layout(entries, root, marker):
    entries["version"] = b"8.0"  # torch's pre-2.8 layout, which it reads through a pickle fallback


CRAFTED = {"opaque object in a sub-folder": _opaque_in_subfolder, "pickled weight": _pickled_weight,
           "pickled sample inputs": _pickled_sample_inputs, "legacy weights file": _legacy_weights_file,
           "custom object": _custom_obj_by_prefix, "AOTInductor library": _aoti_library,
           "os.system as an op": _os_system_node, "old archive layout": _old_layout}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_crafted_program_is_refused_without_running_its_payload(copy, tmp_path, kind):
    marker = tmp_path / "created-by-payload"
    _rewrite_pt2(copy / "program.pt2", lambda e, r: CRAFTED[kind](e, r, marker))
    _reseal(copy)  # the checksums match: only the content check stands in the way
    with pytest.raises(LoadError, match="program.pt2"):
        load(copy)
    assert not marker.exists()
    with pytest.raises(LoadError):
        load(copy, check=False)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["opaque object in a sub-folder", "pickled weight", "pickled sample inputs"])
def test_the_crafted_programs_do_run_code_in_plain_torch_export_load(copy, tmp_path, kind):
    """What the checks above prevent (torch 2.14): torch.export.load unpickles these payloads."""
    marker = tmp_path / "created-by-payload"
    _rewrite_pt2(copy / "program.pt2", lambda e, r: CRAFTED[kind](e, r, marker))
    try:
        torch.export.load(str(copy / "program.pt2"))
    except Exception:  # noqa: BLE001 - the payload ran before whatever failed afterwards
        pass
    assert marker.exists()


def test_load_and_replay_use_per_call_weights_only(copy, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    seen = []
    real_load, real_export_load = torch.load, torch.export.load

    def spy_load(*a, **k):
        seen.append(("torch.load", k.get("weights_only"), os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")))
        return real_load(*a, **k)

    def spy_export_load(*a, **k):
        seen.append(("torch.export.load", None, os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")))
        return real_export_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(torch.export, "load", spy_export_load)
    load(copy)
    replay(_small(seed=5), copy)
    assert any(s[0] == "torch.export.load" for s in seen)
    assert [s for s in seen if s[0] == "torch.load" and s[1] is not True] == []
    assert all(s[2] is None for s in seen)  # no process-global switch
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# ============================================================================================ atomic saves
def _temp_folders(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".fxprune-" in p.name]


def test_interrupted_save_leaves_the_old_complete_save(saved, tmp_path, monkeypatch):
    out, _ = saved
    d = tmp_path / "out"
    save(out, d, plot=False)
    before = json.loads((d / "manifest.json").read_text())
    out2 = fxprune.compile(_small(), (X,), passes=[ChannelPrune(ratio=0.75), Shrink()])
    writes = []

    def boom(module):  # called by the writer after keep.json (building the manifest)
        writes.append(sorted(p.name for p in tmp_path.glob(".out.fxprune-*/*")))
        raise RuntimeError("interrupted")

    monkeypatch.setattr(archive, "graph_facts", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        save(out2, d, plot=False)
    assert "keep.json" in writes[0]
    assert json.loads((d / "manifest.json").read_text()) == before
    c = load(d)
    assert c.report.params_after == out.report.params_after != out2.report.params_after
    assert _temp_folders(tmp_path) == []
    with pytest.raises(RuntimeError, match="interrupted"):  # into a new folder: nothing appears
        save(out2, tmp_path / "fresh", plot=False)
    assert not (tmp_path / "fresh").exists() and _temp_folders(tmp_path) == []


def test_reused_folder_keeps_foreign_files_and_drops_stale_ones(saved, tmp_path):
    out, _ = saved
    d = tmp_path / "out"
    d.mkdir()
    (d / "dense.onnx").write_bytes(b"user's")
    (d / "notes.txt").write_text("mine")
    save(out, d, plot=True)
    assert (d / "report.png").exists()
    save(out, d, plot=False)  # the second save does not write report.png: the first one's is removed
    assert not (d / "report.png").exists()
    assert (d / "dense.onnx").read_bytes() == b"user's" and (d / "notes.txt").read_text() == "mine"
    listed = set(json.loads((d / "manifest.json").read_text())["files"])
    assert listed == set(FILES.values()) - {"report.png", "manifest.json"}
    load(d)


def test_a_foreign_folder_is_not_overwritten(saved, tmp_path):
    out, _ = saved
    d = tmp_path / "theirs"
    d.mkdir()
    (d / "weights.pt").write_bytes(b"someone else's weights")
    with pytest.raises(InputError, match="weights.pt"):
        save(out, d)
    assert (d / "weights.pt").read_bytes() == b"someone else's weights"
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        out.save(f)
    with pytest.raises(InputError, match="is a file"):
        save(out, f)
    assert f.read_text() == "x" and _temp_folders(tmp_path) == []


def test_a_file_from_another_save_is_detected(saved, copy, tmp_path):
    out2 = fxprune.compile(_small(seed=1), (X,), passes=[ChannelPrune(ratio=0.5), Shrink()])
    other = save(out2, tmp_path / "other", plot=False)
    shutil.copy(other / "outputs.pt", copy / "outputs.pt")
    with pytest.raises(LoadError, match="outputs.pt does not match its checksum"):
        load(copy)


# ============================================================================================ malformed folders
def _set_json(name, fn):
    def mutate(d):
        p = d / name
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return mutate


def _write(name, data):
    def mutate(d):
        (d / name).write_bytes(data)
    return mutate


def _torch_save(name, obj):
    def mutate(d):
        torch.save(obj, d / name)
    return mutate


def _program_dir(d):
    (d / "program.pt2").unlink()
    (d / "program.pt2").mkdir()


def _keep(fn):
    def edit(k):
        fn(k["params"]["conv1.weight"]["keep"])
        return k
    return _set_json("keep.json", edit)


def _group0(k):
    def edit(r):
        del r["groups"][0][k]
        return r
    return edit


MALFORMED = {
    "manifest not JSON": (_write("manifest.json", b"{"), r"manifest.json is not valid JSON"),
    "manifest a list": (_write("manifest.json", b"[]"), r"manifest.json: expected a JSON object"),
    "manifest format a string": (_set_json("manifest.json", lambda m: {**m, "format": "2"}),
                                 r"manifest.json: field 'format' must be a positive integer"),
    "manifest files escape": (_set_json("manifest.json", lambda m: {**m, "files": {"../x": {"bytes": 1}}}),
                              r"manifest.json: field 'files'"),
    "manifest newer": (_set_json("manifest.json", lambda m: {**m, "format": 99}), r"(?s)format 99.*upgrade fxprune"),
    "history not JSON": (_write("history.json", b"not json"), r"history.json is not valid JSON"),
    "history an object": (_set_json("history.json", lambda h: {"passes": h}),
                          r"history.json: expected a list of pass objects"),
    "report not JSON": (_write("report.json", b"\xff\xfe"), r"report.json is not valid JSON"),
    "report a list": (_set_json("report.json", lambda r: [r]), r"report.json: expected a JSON object"),
    "report field type": (_set_json("report.json", lambda r: {**r, "params_after": "many"}),
                          r"report.json: field 'params_after' must be a non-negative integer"),
    "report group field": (_set_json("report.json", _group0("before")), r"report.json: field 'groups\[0\]\.before'"),
    "report schema newer": (_set_json("report.json", lambda r: {**r, "schema": 7}), r"report schema 7 is newer"),
    "program.pt2 a directory": (_program_dir, r"program.pt2 is a directory"),
    "program.pt2 not a zip": (_write("program.pt2", b"PK not a zip"), r"program.pt2 is not a torch.export archive"),
    "outputs are ints": (_torch_save("outputs.pt", [1, 2]), r"outputs.pt: item 0 must be a tensor"),
    "inputs are an int": (_torch_save("inputs.pt", {"args": 3}), r"inputs.pt: expected"),
    "inputs hold no tensor": (_torch_save("inputs.pt", {"args": [1, 2]}), r"inputs.pt: the example inputs hold no"),
    "keep index out of range": (_keep(lambda k: k[0].__setitem__(-1, 99)),
                                r"keep.json: parameter 'conv1.weight': index 99 of dim 0 is out of range"),
    "keep index negative": (_keep(lambda k: k[0].__setitem__(0, -1)), r"index -1 of dim 0 is out of range"),
    "keep index not an integer": (_keep(lambda k: k[0].__setitem__(0, 0.5)),
                                  r"'conv1.weight': 'keep\[0\]' must be null or a list of integer indices"),
    "keep index a string": (_keep(lambda k: k[0].__setitem__(0, "0")), r"integer indices"),
    "keep index twice": (_keep(lambda k: k[0].__setitem__(1, k[0][0])), r"'conv1.weight': index \d+ of dim 0 is "
                                                                       r"listed twice"),
    "keep status guessed": (_set_json("keep.json", lambda k: {**k, "params": {
        n: {**e, "status": "ambiguous"} for n, e in k["params"].items()}}), r"not recorded by Shrink"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_folder_gives_load_error_naming_the_file(copy, case):
    mutate, pattern = MALFORMED[case]
    mutate(copy)
    if not case.startswith("manifest"):
        _reseal(copy)
    with pytest.raises(LoadError, match=pattern) as e:
        load(copy)
    assert e.value.fix
    if case.startswith(("keep", "manifest", "outputs", "inputs")):
        with pytest.raises(LoadError, match=pattern):
            replay(_small(seed=2), copy, weights="model")


def test_weights_that_are_not_tensors(copy):
    torch.save({"conv1.weight": 3}, copy / "weights.pt")
    _reseal(copy)
    with pytest.raises(LoadError, match=r"weights.pt: entry 'conv1.weight' must be a tensor"):
        replay(_small(), copy)
    torch.save([torch.ones(1)], copy / "weights.pt")
    _reseal(copy)
    with pytest.raises(LoadError, match=r"weights.pt: expected a mapping"):
        replay(_small(), copy)


def test_not_a_folder(tmp_path):
    with pytest.raises(LoadError, match="not a folder"):
        load(tmp_path / "absent")
    (tmp_path / "f").write_text("x")
    with pytest.raises(LoadError, match=r"not a folder \(it is a file\)"):
        load(tmp_path / "f")
    with pytest.raises(LoadError, match="no manifest.json"):
        load(tmp_path)


# ============================================================================================ replay mismatches
@pytest.mark.parametrize("weights", ["saved", "model"])
def test_replay_onto_a_model_of_another_width(saved, weights):
    _, d = saved
    wide = _small(c=12)
    with pytest.raises(LoadError, match=r"parameter 'conv1.weight': the model has shape \(12, 3, 3, 3\), the "
                                        r"pruning was recorded on \(8, 3, 3, 3\)"):
        replay(wide, d, weights=weights)
    assert wide.conv1.out_channels == 12  # untouched


def test_replay_checks_the_kept_indices_of_a_compiled(saved):
    out, _ = saved
    with pytest.raises(LoadError, match="conv1.weight"):
        replay(_small(c=6), out, weights="model")


# ============================================================================================ training flags
class Tower(nn.Module):
    def __init__(self, meta=False):
        super().__init__()
        self.a = nn.Linear(4, 4, device="meta" if meta else None)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Linear(4, 2, device="meta" if meta else None)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


class NoParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.act(x)) * 2


def _flags(m):
    return {n: s.training for n, s in m.named_modules()}


@pytest.mark.parametrize("make", [lambda: Tower(meta=True), NoParams])
def test_analyze_keeps_every_submodules_training_flag(make):
    m = make()
    m.train()
    m.drop.eval()  # a submodule whose flag differs from the root's
    want = _flags(m)
    x = torch.randn(2, 4, device="meta") if isinstance(m, Tower) else torch.randn(2, 4)
    fxprune.analyze(m, (x,))
    assert _flags(m) == want


def test_replay_inplace_keeps_every_submodules_training_flag(saved):
    _, d = saved
    m = _small(seed=4)
    m.train()
    m.bn2.eval()
    want = _flags(m)
    assert replay(m, d, inplace=True) is m
    assert _flags(m) == want
