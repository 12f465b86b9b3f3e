"""Torch-Pruning and fxprune find the same coupled layers (torchvision ResNet-18, a small torchvision ViT).

Both sides are turned into sets of parameter names:

* TP: ``DependencyGraph.get_all_groups(ignored_layers=[head], root_module_types=[nn.Conv2d, nn.Linear])``; every
  dependency whose target is a module with a ``weight`` contributes ``<module>.weight`` (out- or in-dim pruned),
  ``nn.MultiheadAttention`` contributes ``in_proj_weight`` and ``out_proj.weight``, an unwrapped parameter
  (``class_token``, ``pos_embedding``) its own name. TP's internal op nodes (_ElementWiseOp, _ReshapeOp, ...) carry
  no parameters and are skipped.
* fxprune: ``g.params()`` of each group, without biases and buffers (TP's module view folds them into the module).

A TP group is matched to the fxprune group holding its root layer's output dim (``(root.weight, dim 0)``), and where
both consider the group prunable the two name sets must be *equal*.

Structural differences (by design, listed by ``test_small_vit_groups_agree`` when run with ``-s``):

1. ViT residual stream (conv_proj out, class_token, pos_embedding, every ln_1/ln_2/encoder.ln, MHA in_proj in-dim
   and out_proj out-dim, mlp.0 in / mlp.3 out, head in): both libraries find the *same* coupled set, but fxprune
   freezes it because LayerNorm's mean/variance are taken over these channels: removing channels changes the
   statistics of the kept ones, so the shrunk model is not the masked model (fxprune's verification contract).
   TP prunes it (and the accuracy change is left to fine-tuning).
2. nn.MultiheadAttention internals: fxprune has a ``channels`` group (head_dim, coupled across q, k, v, out_proj
   in-dim) and a ``heads`` group per block. TP has no group for them: its MHA pruner only removes channels along
   ``embed_dim``, i.e. together with the residual stream (TP's q/k/v rows are pruned with the residual group).
3. Groups that reach a graph input or output (ResNet's 3 input channels, the classifier's classes) are frozen
   automatically by fxprune; TP does not offer them as groups (no producer / the head is in ignored_layers).
"""
import warnings

import pytest
import torch
import torch.nn as nn

import fxprune

tp = pytest.importorskip("torch_pruning")
tv = pytest.importorskip("torchvision")


def _tp_groups(model, x, ignored):
    """[(root weight name, set of parameter names)] for every TP group rooted at a conv/linear output dim."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        groups = DG.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear])
    mod_names = {m: n for n, m in model.named_modules()}
    par_names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        root, names = None, set()
        for dep, _ in group:
            mod = dep.target.module
            if isinstance(mod, nn.Parameter):
                names.add(par_names[id(mod)])
                continue
            n = mod_names.get(mod)
            if n is None:
                continue  # TP's op nodes
            if isinstance(mod, nn.MultiheadAttention):
                names |= {f"{n}.in_proj_weight", f"{n}.out_proj.weight"}
            elif isinstance(getattr(mod, "weight", None), torch.Tensor):
                names.add(f"{n}.weight")
            if root is None and isinstance(mod, (nn.Conv2d, nn.Linear)):
                root = f"{n}.weight"
        out.append((root, names))
    return out


def _fx_groups(model, x):
    """[(group, set of parameter names without biases/buffers, weights whose dim 0 the group owns)]."""
    params = {n for n, _ in model.named_parameters()}
    out = []
    for g in fxprune.analyze(model, (x,)):
        names = {p for p in g.params() if p in params and not p.endswith("bias")}
        outs = {m.param for m in g.members if m.dim == 0 and m.param.endswith("weight")}
        out.append((g, names, outs))
    return out


def _compare(model, x, head):
    tpg, fxg = _tp_groups(model, x, [head]), _fx_groups(model, x)
    agreed, frozen_diff, unmatched = [], [], []
    matched_fx = set()
    for root, names in tpg:
        cands = [(g, fn) for g, fn, outs in fxg if root in outs and g.kind == "channels"]
        assert cands, f"fxprune has no channels group owning the output dim of {root} (TP group {sorted(names)})"
        g, fn = cands[0]
        matched_fx.add(g.id)
        if g.prunable:
            assert fn == names, (f"group of {root}: only TP {sorted(names - fn)}, only fxprune {sorted(fn - names)}")
            agreed.append(root)
        else:
            frozen_diff.append({"root": root, "fxprune_frozen": g.frozen, "same_layers": fn == names,
                                "only_tp": sorted(names - fn), "only_fxprune": sorted(fn - names)})
    for g, fn, _ in fxg:
        if g.prunable and g.id not in matched_fx:
            unmatched.append((g.kind, g.label, sorted(fn)))
    return agreed, frozen_diff, unmatched


def test_resnet18_groups_agree():
    m = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    agreed, frozen_diff, unmatched = _compare(m, x, m.fc)
    # 20 convs: 1 stem/layer1 residual + 3 residual streams (layer2-4, each shared with its downsample) + 16 inner
    # 4 residual streams (stem+layer1, layer2-4 with their downsample convs) + 8 inner block convs
    assert len(agreed) == 12, agreed
    assert not frozen_diff, frozen_diff  # nothing TP prunes is frozen by fxprune
    assert not unmatched, unmatched  # every prunable fxprune group is a TP group


def test_small_vit_groups_agree():
    m = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                                    mlp_dim=128, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    agreed, frozen_diff, unmatched = _compare(m, x, m.heads.head)
    print("\nagreed (prunable in both):", agreed)
    print("frozen by fxprune, pruned by TP:", frozen_diff)
    print("prunable in fxprune only:", [(k, lbl) for k, lbl, _ in unmatched])
    # the two MLP groups agree exactly
    assert sorted(agreed) == [f"encoder.layers.encoder_layer_{i}.mlp.0.weight" for i in range(2)]
    # difference 1: the residual stream, same coupled layers, frozen by fxprune for LayerNorm
    assert len(frozen_diff) == 1
    d = frozen_diff[0]
    assert d["same_layers"], d
    assert "normalisation" in d["fxprune_frozen"] or "layer_norm" in d["fxprune_frozen"], d
    # difference 2: fxprune's MHA head_dim and head groups (TP has none)
    assert sorted(k for k, _, _ in unmatched) == ["channels", "channels", "heads", "heads"], unmatched
    for _, _, names in unmatched:
        assert all("self_attention" in n for n in names), names
