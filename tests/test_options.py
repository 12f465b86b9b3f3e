"""Strict pass options (Python and recipes), recipe hardening, ignore= and importance validation (issue 11)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import InputError, RecipeError
from fxprune.passes import ChannelPrune, NMSparsity, Shrink
from fxprune.recipe import load_recipe

from hard_cases import build


@pytest.mark.parametrize("cls,kw,bad", [
    (ChannelPrune, dict(ratio=0.5, heads="no"), "heads"),
    (ChannelPrune, dict(ratio="0.5"), "ratio"),
    (ChannelPrune, dict(ratio=0.5, round_to=True), "round_to"),
    (ChannelPrune, dict(ratio=0.5, scope="global", max_ratio=5), "max_ratio"),
    (Shrink, dict(verify="false"), "verify"),
    (NMSparsity, dict(n=2.0, m=4), "n"),
])
def test_wrong_option_types_and_ranges_are_rejected(cls, kw, bad):
    with pytest.raises(InputError, match=bad):
        cls(**kw)


def test_recipe_options_are_checked_like_python_and_class_names_work():
    with pytest.raises(RecipeError, match="heads"):
        load_recipe("passes:\n  - pass: channel_prune\n    ratio: 0.5\n    heads: 'no'\n")
    with pytest.raises(RecipeError, match="verify"):
        load_recipe([{"pass": "shrink", "verify": "false"}])
    (p,) = load_recipe("passes:\n  - pass: ChannelPrune\n    ratio: 0.5\n    ignore: conv1\n")
    assert isinstance(p, ChannelPrune) and p.ignore == ["conv1"]  # one string is one name


def test_recipe_alias_bomb_is_refused_quickly():
    bomb = ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\npasses: [*d]\n")
    with pytest.raises(RecipeError, match=r"line 2, column \d+: YAML aliases"):
        load_recipe(bomb)
    with pytest.raises(RecipeError, match="larger than"):
        load_recipe("passes:\n" + "  - pass: shrink\n" * 100_000)


def test_yaml_errors_keep_line_and_column():
    with pytest.raises(RecipeError, match=r"line 3, column 4"):
        load_recipe("passes:\n  - pass: shrink\n   verify: true\n")


def test_unknown_ignore_names_are_an_error_with_near_matches():
    model, x = build("residual_chain")
    with pytest.raises(InputError, match=r"ignore='stem\.O' matches no module.*did you mean.*'stem\.0'"):
        fxprune.compile(model, x, [ChannelPrune(ratio=0.5, ignore="stem.O"), Shrink()])
    out = fxprune.compile(model, x, [ChannelPrune(ratio=0.5, ignore="stem.0"), Shrink()])
    assert out.module.get_parameter("stem.0.weight").shape[0] == model.get_parameter("stem.0.weight").shape[0]


@pytest.mark.parametrize("scores,match", [
    (lambda g: np.full(g.size, np.nan), "NaN"),
    (lambda g: np.ones(g.size + 1), "shape"),
    (lambda g: "high", "not numbers"),
])
def test_malformed_importance_names_the_group(scores, match):
    model, x = build("residual_chain")
    with pytest.raises(InputError, match=match) as ei:
        fxprune.compile(model, x, [ChannelPrune(ratio=0.5, importance=lambda g, prog: scores(g)), Shrink()])
    assert "group" in str(ei.value)


def test_importance_callable_with_wrong_signature():
    with pytest.raises(InputError, match=r"must accept \(group, program\)"):
        ChannelPrune(ratio=0.5, importance=lambda prog, g, ctx: None)


def test_nan_weights_give_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[3, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        fxprune.compile(model, (torch.randn(2, 8),), [ChannelPrune(ratio=0.5), Shrink()])
