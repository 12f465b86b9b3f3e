"""Replay a pruning onto the user's own model class.

    model = fxprune.replay(MyNet(), "pruned/")                  # a save folder (fxprune.archive.save)
    model = fxprune.replay(MyNet(), out)                        # or a Compiled in memory (out = fxprune.compile(...))
    model = fxprune.replay(MyNet(), out, weights="model")       # MyNet's own weights, sliced with the kept indices

The pruning is described by the kept indices Shrink recorded (``keep.json`` in a folder, the program's
:class:`~fxprune.records.ShrinkRecord` in memory), under every name a tied tensor has.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from .archive import SaveFolder, _close, _out_leaves, _run, check_keep_entry, kept_indices
from .errors import InputError, LoadError
from .report import graph_facts, named_tensors

__all__ = ["replay"]

_HEAD_ATTRS = ("heads", "num_heads", "n_heads", "num_attention_heads", "kv_heads", "num_kv_heads",
               "num_key_value_heads", "n_kv_heads", "head_dim", "head_size", "attention_head_size")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then every submodule gets back its own ``training`` flag (``train(was)``
    on the root would give all of them the root's)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in flags:
            m.training = was


@dataclass
class _Pruning:
    """What replay needs, from a save folder or a Compiled in memory."""

    where: str
    made_from: str  # "{where} {made_from} a {class}"
    model_class: str | None
    facts: dict[str, Any]
    weights: dict[str, torch.Tensor]
    keep: dict[str, dict[str, Any]]
    inputs: tuple[tuple, dict]
    _outputs: Callable[[], list[torch.Tensor]] = field(repr=False, default=list)
    verify: Callable[[], None] = field(repr=False, default=lambda: None)

    def outputs(self) -> list[torch.Tensor]:
        return self._outputs()


def _from_folder(folder: str | os.PathLike, weights: str) -> _Pruning:
    f = SaveFolder(folder)
    m = f.manifest
    outputs = f.outputs()
    return _Pruning(where=f"the saved program ({f.dir})", made_from="was saved from",
                    model_class=m.get("model_class"),
                    facts={"conv_groups": m["conv_groups"], "group_norm_groups": m["group_norm_groups"]},
                    weights=f.weights(), keep=f.keep(recorded_only=True if weights == "model" else None),
                    inputs=f.inputs(), _outputs=lambda: outputs,
                    verify=f.verify)


def _from_compiled(compiled: Any) -> _Pruning:
    module, program = compiled.module, compiled.program
    source = getattr(program, "source", None)
    args, kwargs = tuple(program.args), dict(program.kwargs)
    keep = kept_indices(compiled)["params"]
    for name, entry in keep.items():
        check_keep_entry(name, entry, "the compiled program's Shrink records")

    def outputs() -> list[torch.Tensor]:  # meta tensors for a meta-device program: only shapes are compared
        return _out_leaves(_run(module, args, kwargs))

    def real(t: Any) -> Any:  # a planned (meta-device) program: run the real model on zeros of the same shapes
        return torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) and t.is_meta else t

    run_args, run_kwargs = tree_map(real, (args, kwargs))
    return _Pruning(where="the compiled program", made_from="was made from",
                    model_class=type(source).__name__ if source is not None else compiled.report.model,
                    facts=graph_facts(module), weights={n: t.detach() for n, t in named_tensors(module).items()},
                    keep=keep, inputs=(tuple(run_args), dict(run_kwargs)), _outputs=outputs)


# ================================================================================================ module attributes
def _update_conv(m: nn.Module, name: str, facts: dict[str, Any]) -> None:
    w = m.weight
    groups = facts["conv_groups"].get(f"{name}.weight" if name else "weight")
    if groups is None:
        og = m.groups
        if og == 1:
            groups = 1
        elif og == m.in_channels and (m.out_channels % og == 0):  # depthwise: groups follow the channels
            mult = m.out_channels // og if not m.transposed else 1
            groups = (w.shape[0] // mult) if not m.transposed else w.shape[0]
        else:
            groups = og
    m.groups = int(groups)
    if m.transposed:
        m.in_channels, m.out_channels = int(w.shape[0]), int(w.shape[1] * m.groups)
    else:
        m.out_channels, m.in_channels = int(w.shape[0]), int(w.shape[1] * m.groups)


def _update_module(m: nn.Module, name: str, facts: dict[str, Any]) -> bool:
    """Set the size attributes of a standard module from its (resized) tensors. False: type not handled."""
    if isinstance(m, nn.modules.conv._ConvNd):
        _update_conv(m, name, facts)
        return True
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = int(m.weight.shape[0]), int(m.weight.shape[1])
        return True
    if isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
        t = m.weight if m.weight is not None else m.running_mean
        m.num_features = int(t.shape[0])
        return True
    if isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            m.normalized_shape = tuple(int(s) for s in m.weight.shape)
        return True
    if isinstance(m, nn.GroupNorm):
        c = int(m.weight.shape[0])
        g = facts["group_norm_groups"].get(f"{name}.weight" if name else "weight", m.num_groups)
        if c % g:
            raise LoadError(f"GroupNorm {name!r}: {c} channels are not divisible into {g} groups")
        m.num_channels, m.num_groups = c, int(g)
        return True
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        m.num_embeddings, m.embedding_dim = int(m.weight.shape[0]), int(m.weight.shape[1])
        return True
    if isinstance(m, nn.PReLU):
        m.num_parameters = int(m.weight.numel())
        return True
    if type(m).__name__.lower().endswith("rmsnorm"):
        for attr in ("normalized_shape", "dim", "hidden_size"):
            v = getattr(m, attr, None)
            if isinstance(v, int):
                setattr(m, attr, int(m.weight.shape[-1]))
            elif isinstance(v, tuple):
                setattr(m, attr, tuple(int(s) for s in m.weight.shape))
        return True
    return False


# ================================================================================================ replay
def _checked_shapes(p: _Pruning, model: nn.Module, cls: str) -> None:
    """Names and shapes must fit: every resized tensor has the shape the pruning was recorded on, every other
    tensor the saved shape."""
    current = named_tensors(model)
    fix = f"pass an instance of {cls} built with the configuration the pruning was made on"
    missing = [n for n in current if n not in p.weights]
    if missing:
        where = p.where.split(" (")[0]
        raise LoadError(f"{where} has no tensor for {len(missing)} of the model's parameters/buffers "
                        f"(e.g. {missing[:3]}) [{p.where}]", fix=fix)
    extra = [n for n in p.weights if n not in current]
    if extra:
        raise LoadError(f"the model lacks {len(extra)} tensors of {p.where} (e.g. {extra[:3]})", fix=fix)
    for name, t in current.items():
        saved = tuple(p.weights[name].shape)
        entry = p.keep.get(name)
        if entry is None:
            if saved != tuple(t.shape):
                raise LoadError(f"parameter {name!r}: the model has shape {tuple(t.shape)}, {p.where} has {saved} "
                                f"and no kept indices for it", fix=fix)
            continue
        orig = tuple(entry["orig_shape"])
        if orig != tuple(t.shape):
            raise LoadError(f"parameter {name!r}: the model has shape {tuple(t.shape)}, the pruning was recorded "
                            f"on {orig}", fix=fix)
        if entry.get("keep") is None:  # an older save without indices for it (weights='saved' only)
            continue
        want = tuple(s if k is None else len(k) for s, k in zip(orig, entry["keep"]))
        if saved != want:
            raise LoadError(f"parameter {name!r}: {p.where} has shape {saved}, its kept indices give {want}",
                            fix="the save is inconsistent: save the compiled program again")


def replay(model: nn.Module, pruned: Any, *, weights: str = "saved", inplace: bool = False,
           check: bool = True, rtol: float = 1e-4,
           adapters: Mapping[type, Callable[[nn.Module, str], None]] | None = None) -> nn.Module:
    """Re-apply a pruning to an instance of the original model class and return it (your class, pruned).

    ``pruned``: a folder written by :func:`fxprune.archive.save` or a :class:`~fxprune.Compiled` in memory.
    Every parameter/buffer the pruning resized is replaced by one of the pruned shape, and the size attributes of
    standard modules are updated (``nn.Conv*``: channels and ``groups``; ``nn.Linear``; BatchNorm/InstanceNorm;
    LayerNorm; GroupNorm; Embedding; PReLU; ``*RMSNorm``). ``weights="saved"`` (default) loads the pruned weights
    (the folder's, or the compiled module's); ``weights="model"`` keeps ``model``'s own values, sliced with the
    kept indices Shrink recorded (apply a pruning plan to another checkpoint of the same architecture; a Compiled
    from a meta-device model works here). ``inplace=False`` works on a deep copy; ``inplace=True`` changes
    ``model`` and leaves every submodule's ``training`` flag as it was.
    ``adapters``: ``{ModuleClass: fn(module, qualified_name)}`` to update attributes of your own module types
    after their tensors were resized (e.g. a head count).

    Before changing anything, the model must fit the pruning: the same parameter names, each resized tensor of the
    shape the pruning was recorded on (a model of another width raises :class:`LoadError` naming the parameter),
    the other tensors of the saved shape; kept indices must be integers in range and increasing.

    ``check``: run the result on the example inputs; with saved weights it must reproduce the pruned outputs
    (``rtol`` relative to the output scale), with the model's weights the output shapes must match.
    Otherwise :class:`LoadError` names the modules whose attributes fxprune could not update (custom modules
    owning resized tensors, attention modules with head counts): pruning that changes a head count or a
    head dim generally cannot be replayed into a class whose forward hard-codes them; use :func:`fxprune.load`.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"replay needs an nn.Module instance, got {type(model).__name__}")
    from .regions import REGIONS_FILE, RegionCompiled, replay_regions
    if isinstance(pruned, RegionCompiled) or (isinstance(pruned, (str, os.PathLike))
                                              and os.path.isfile(os.path.join(pruned, REGIONS_FILE))):
        if weights != "saved":
            raise InputError("a region pruning replays its saved weights only", fix="leave weights='saved'")
        return replay_regions(model, pruned, inplace=inplace, check=check, rtol=rtol)  # fxprune.regions
    if weights not in ("saved", "model"):
        raise InputError(f"weights must be 'saved' or 'model', got {weights!r}")
    if hasattr(pruned, "module") and hasattr(pruned, "program") and hasattr(pruned, "report"):
        p = _from_compiled(pruned)
        if weights == "saved" and any(t.is_meta for t in p.weights.values()):
            raise InputError("the compiled program lives on the meta device: it has no weights to replay",
                             fix="replay(model, compiled, weights='model') slices the model's own weights")
    elif isinstance(pruned, (str, os.PathLike)):
        p = _from_folder(pruned, weights)
    else:
        raise InputError(f"replay needs a save folder or a Compiled, got {type(pruned).__name__}",
                         fix="fxprune.replay(MyNet(), 'pruned/') or fxprune.replay(MyNet(), fxprune.compile(...))")
    want_cls = p.model_class
    if want_cls and type(model).__name__ != want_cls:
        raise LoadError(f"{p.where} {p.made_from} a {want_cls}, got a {type(model).__name__}",
                        fix=f"pass a fresh instance of {want_cls} built with the same configuration")
    _checked_shapes(p, model, want_cls or type(model).__name__)
    p.verify()
    if not inplace:
        model = copy.deepcopy(model)

    replaced: dict[int, torch.Tensor] = {}  # id(old) -> new, so tied tensors stay tied
    resized_modules: dict[str, nn.Module] = {}
    with torch.no_grad():
        for mname, mod in model.named_modules(remove_duplicate=False):
            for store in (mod._parameters, mod._buffers):
                for attr, old in list(store.items()):
                    if old is None:
                        continue
                    full = f"{mname}.{attr}" if mname else attr
                    entry = p.keep.get(full)
                    if id(old) in replaced:
                        store[attr] = replaced[id(old)]
                        if entry is not None:
                            resized_modules[mname] = mod
                        continue
                    if entry is None:  # not resized
                        if weights == "saved":
                            old.copy_(p.weights[full].to(dtype=old.dtype, device=old.device))
                        replaced[id(old)] = old
                        continue
                    if weights == "saved":
                        val = p.weights[full].to(dtype=old.dtype, device=old.device)
                    else:
                        val = old.detach()
                        for dim, k in enumerate(entry["keep"]):
                            if k is not None:
                                val = val.index_select(dim, torch.tensor(k, dtype=torch.long, device=old.device))
                    new = (nn.Parameter(val.clone(), requires_grad=old.requires_grad) if isinstance(old, nn.Parameter)
                           else val.clone())
                    store[attr] = new
                    replaced[id(old)] = new
                    resized_modules[mname] = mod
        unhandled = []
        for mname, mod in resized_modules.items():
            fn = next((f for c, f in (adapters or {}).items() if isinstance(mod, c)), None)
            if fn is not None:
                fn(mod, mname)
            elif not _update_module(mod, mname, p.facts):
                unhandled.append(f"{mname or '(root)'} ({type(mod).__name__})")
    heads = [f"{n} ({type(m).__name__}: " + ", ".join(f"{a}={getattr(m, a)}" for a in _HEAD_ATTRS
                                                       if isinstance(getattr(m, a, None), int)) + ")"
             for n, m in model.named_modules()
             if any(isinstance(getattr(m, a, None), int) for a in _HEAD_ATTRS)
             and any(k == n or k.startswith(n + ".") for k in resized_modules)]

    if check:
        args, kwargs = p.inputs
        ref = p.outputs()
        suspects = unhandled + heads
        hint = (f"; fxprune could not update: {', '.join(suspects[:6])}" if suspects else "")
        fix = "pass adapters={YourModule: fn} to update their attributes, or use fxprune.load"
        try:
            with eval_mode(model):
                got = _out_leaves(_run(model, args, kwargs))
        except Exception as e:
            raise LoadError(f"the replayed {type(model).__name__} fails on the saved example inputs: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}", fix=fix) from e
        if weights == "saved":
            ok, diff = _close(ref, got, rtol)
        else:
            ok, diff = (len(ref) == len(got) and all(a.shape == b.shape for a, b in zip(ref, got))), 0.0
        if not ok:
            raise LoadError(f"the replayed {type(model).__name__} does not reproduce {p.where} "
                            f"(max abs diff {diff:.3g}){hint}", fix=fix)
    elif unhandled:
        warnings.warn(f"replay: module types fxprune does not know were resized: {', '.join(unhandled[:6])}",
                      stacklevel=2)
    return model
