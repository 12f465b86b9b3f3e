"""Recipes: YAML and Python forms, round trip through dump_recipe, and RecipeError for every kind of mistake."""
import sys
import textwrap

import pytest

import fxprune
from fxprune.errors import RecipeError
from fxprune.passes import ChannelPrune, Shrink
from fxprune.recipe import dump_recipe, load_recipe, recipe_to_yaml, save_recipe


def test_yaml_file_and_python_forms_agree(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent("""\
        # prune half the channels, then remove them
        passes:
          - pass: channel_prune
            ratio: 0.5
            round_to: 4
          - pass: shrink
    """))
    from_file = load_recipe(p)
    forms = [
        [{"pass": "channel_prune", "ratio": 0.5, "round_to": 4}, {"pass": "shrink"}],
        [("channel_prune", {"ratio": 0.5, "round_to": 4}), ("shrink", {})],
        [{"channel_prune": {"ratio": 0.5, "round_to": 4}}, "shrink"],
        [ChannelPrune(ratio=0.5, round_to=4), Shrink()],
        "passes:\n  - {pass: channel_prune, ratio: 0.5, round_to: 4}\n  - shrink\n",  # YAML text
    ]
    for form in forms:
        got = load_recipe(form)
        assert [type(x) for x in got] == [ChannelPrune, Shrink]
        assert got[0].options() == from_file[0].options() and got[1].options() == from_file[1].options()
    # a bare list at the top of the file works too
    q = tmp_path / "list.yaml"
    q.write_text("- pass: shrink\n  verify: false\n")
    assert load_recipe(q)[0].verify is False


def test_dump_load_round_trip(tmp_path):
    passes = [ChannelPrune(target_macs=0.4, scope="global", ignore=["fc"]), Shrink(rtol=1e-3)]
    rec = dump_recipe(passes)
    assert rec[0]["pass"] == "channel_prune" and rec[0]["target_macs"] == 0.4 and rec[0]["ignore"] == ["fc"]
    again = load_recipe(rec)
    assert [p.options() for p in again] == [p.options() for p in passes]
    path = save_recipe(passes, tmp_path / "out.yaml", header="test")
    assert path.read_text().startswith("# test\npasses:")
    assert [p.options() for p in load_recipe(path)] == [p.options() for p in passes]
    assert "channel_prune" in recipe_to_yaml(rec)


def test_unknown_pass_lists_the_valid_ones():
    with pytest.raises(RecipeError) as e:
        load_recipe([{"pass": "chanel_prune", "ratio": 0.5}])
    msg = str(e.value)
    assert "unknown pass 'chanel_prune'" in msg and "did you mean 'channel_prune'" in msg
    assert "shrink" in msg and "apply_masks" in msg  # the registered names
    assert isinstance(e.value, ValueError)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(RecipeError) as e:
        load_recipe([{"pass": "channel_prune", "ratio": 0.5, "roundto": 8}])
    msg = str(e.value)
    assert "'roundto'" in msg and "round_to" in msg and "target_macs" in msg and "entry 0" in msg
    with pytest.raises(RecipeError, match="valid options of Shrink: verify, rtol"):
        load_recipe(["shrink", {"pass": "shrink", "tolerance": 1}])
    with pytest.raises(RecipeError, match=r"\(none\)"):
        load_recipe([{"pass": "apply_masks", "x": 1}])


def test_bad_values_and_shapes_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="ratio must be in"):  # the pass' own InputError, re-raised
        load_recipe([{"pass": "channel_prune", "ratio": 2.0}])
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [ {pass: shrink\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    top = tmp_path / "top.yaml"
    top.write_text("pipeline:\n  - shrink\n")
    with pytest.raises(RecipeError, match="unknown top-level key"):
        load_recipe(top)
    with pytest.raises(RecipeError, match="lists no pass"):
        load_recipe([])
    with pytest.raises(RecipeError, match="no 'pass' key"):
        load_recipe([{"ratio": 0.5, "scope": "local"}])
    with pytest.raises(RecipeError, match="not an instance"):
        load_recipe([Shrink])
    with pytest.raises(RecipeError, match="options must be a mapping"):
        load_recipe([("shrink", 3)])


def test_required_options_imports_and_unserializable(tmp_path, monkeypatch):
    mod = tmp_path / "my_recipe_passes.py"
    mod.write_text(textwrap.dedent("""\
        import fxprune

        @fxprune.register_pass
        class NeedsK(fxprune.Pass):
            '''Keeps ``k`` channels.'''
            name = "test_needs_k"

            def __init__(self, k, fn=None):
                self.k = k
                self.fn = fn

            def run(self, program, ctx):
                return fxprune.PassResult(program, changed=False)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_recipe_passes", raising=False)
    r = tmp_path / "r.yaml"
    r.write_text("imports: [my_recipe_passes]\npasses:\n  - pass: test_needs_k\n    k: 3\n")
    try:
        (p,) = load_recipe(r)
        assert p.k == 3
        with pytest.raises(RecipeError, match="missing required option"):
            load_recipe([{"pass": "test_needs_k"}])
        rec = dump_recipe([type(p)(k=2, fn=len)])
        assert rec[0]["_unserializable"] == {"fn": repr(len)} and "fn" not in rec[0]
        with pytest.raises(RecipeError, match="held Python objects"):
            load_recipe(rec)
        bad = tmp_path / "bad.yaml"
        bad.write_text("imports: [no_such_module_xyz]\npasses: [shrink]\n")
        with pytest.raises(RecipeError, match="cannot import 'no_such_module_xyz'"):
            load_recipe(bad)
    finally:
        fxprune.PASS_REGISTRY.pop("test_needs_k", None)
