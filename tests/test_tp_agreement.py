"""Torch-Pruning and fxprune find the same coupled layers (ResNet-18, a small ViT).

Compared as sets of (module, "out"|"in") over conv/linear weights, matched by a shared layer. Structural
differences by design: fxprune *freezes* groups that reach graph outputs automatically (TP needs ignored_layers)
and groups whose channels LayerNorm statistics observe (the ViT residual stream: TP prunes it, which changes the
normalisation, so masked != shrunk); both still find the same coupled layers for it, which is what we compare.
nn.MultiheadAttention's fused in_proj is split by fxprune into heads x head_dim spaces and by TP into its own
handler, so the attention internals are not compared here (tests/test_hard_cases.py checks them numerically).
"""
import pytest
import torch
import torch.nn as nn

import fxprune

tp = pytest.importorskip("torch_pruning")
tv = pytest.importorskip("torchvision")


def _tp_groups(model, x, ignored):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for group in DG.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        members = set()
        for dep, _ in group:
            mod = dep.target.module
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and names.get(mod) is not None:
                fn = dep.handler.__name__ if hasattr(dep.handler, "__name__") else str(dep.handler)
                members.add((names[mod], "out" if "out" in fn else "in"))
        out.append(members)
    return out


def _fx_groups(model, x):
    groups = fxprune.analyze(model, (x,))
    mods = dict(model.named_modules())
    out = []
    for g in groups:
        members = set()
        for m in g.members:
            mod_name, _, attr = m.param.rpartition(".")
            if attr == "weight" and isinstance(mods.get(mod_name), (nn.Conv2d, nn.Linear)) and m.dim in (0, 1):
                members.add((mod_name, "out" if m.dim == 0 else "in"))
        if members:
            out.append((g, members))
    return out


def _compare(tp_groups, fx_groups, skip=lambda layer: False):
    checked = 0
    for tg in tp_groups:
        tg = {x for x in tg if not skip(x[0])}
        if not tg:
            continue
        roots = [x for x in tg if x[1] == "out"]
        match = [fm for _, fm in fx_groups if roots and roots[0] in fm]
        assert match, f"fxprune has no group containing {roots[:1]}"
        fm = {x for x in match[0] if not skip(x[0])}
        assert fm == tg, f"difference: only TP {sorted(tg - fm)}, only fxprune {sorted(fm - tg)}"
        checked += 1
    return checked


def test_resnet18_groups_agree():
    m = tv.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    n = _compare(_tp_groups(m, x, [m.fc]), _fx_groups(m, x))
    assert n >= 12  # every prunable group of ResNet-18


def test_small_vit_groups_agree():
    m = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                                    mlp_dim=128, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    n = _compare(_tp_groups(m, x, [m.heads.head]), _fx_groups(m, x), skip=lambda layer: "self_attention" in layer)
    assert n >= 3  # the residual stream and one MLP group per block
    frozen = [g for g, fm in _fx_groups(m, x) if ("conv_proj", "out") in fm]
    assert frozen and frozen[0].frozen and "normalisation" in frozen[0].frozen
