"""Front-end: capture a model as an FX graph of ATen ops with shape metadata on every node.

We use ``torch.export.export(strict=False)`` (the training IR). It traces far more real models than
``torch.fx.symbolic_trace`` (HuggingFace and timm models with Python-level shape logic), gives one canonical ATen
vocabulary for the analyzer, keeps parameter names (``get_attr`` nodes with the module's qualified names) and puts a
FakeTensor in ``node.meta["val"]`` of every node. It works on meta-device models, so big models can be analysed
without materialising weights. ``benchmarks/coverage.py`` measures the choice.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import InputError, TraceError

TRACER = "torch.export(strict=False)"


def _example_summary(args: tuple, kwargs: dict) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}"
        return type(x).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def normalize_inputs(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of args, or a dict of kwargs; return (args, kwargs)."""
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, torch.Tensor):
        args: tuple = (example_inputs,)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), {**example_inputs, **kwargs}
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    elif example_inputs is None:
        args = ()
    else:
        raise InputError(
            f"example_inputs must be a tensor, a tuple of forward args or a dict of kwargs, got "
            f"{type(example_inputs).__name__}",
            fix="pass e.g. (torch.randn(1, 3, 224, 224),) or {'input_ids': ids}",
        )
    if not args and not kwargs:
        raise InputError("no example inputs given", fix="pass the model's forward arguments as example_inputs")
    return args, kwargs


def _batch_dynamic_shapes(args: tuple, kwargs: dict) -> tuple:
    """Mark dim 0 of every tensor input as Dim.AUTO (dynamic where the model allows, specialised otherwise)."""
    from torch.export import Dim

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] > 1:
            return {0: Dim.AUTO}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    return (spec(tuple(args)), spec(dict(kwargs))) if kwargs else spec(tuple(args))


def trace(model: nn.Module, args: tuple, kwargs: dict | None = None, *, copy_model: bool = True,
          dynamic_batch: bool = True) -> fx.GraphModule:
    """Export ``model`` (in eval mode) to a GraphModule of ATen ops whose ``get_attr`` nodes name the parameters.

    With ``dynamic_batch`` (default) dim 0 of every input is exported as dynamic where the model allows it
    (``Dim.AUTO``; a batch of 1 is always specialised), so the pruned module and its ONNX export accept any batch
    size; models that do not trace that way fall back to static shapes. The model is deep-copied first (unless ``copy_model=False``) so that the returned module owns its parameters
    and pruning it never touches the user's model. Raises :class:`TraceError` with the underlying reason.
    """
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}",
            fix="wrap your function in an nn.Module whose forward calls it",
        )
    kwargs = dict(kwargs or {})
    work = copy.deepcopy(model) if copy_model else model
    flags = [(m, m.training) for m in work.modules()]  # each submodule's own flag, restored below
    work.eval()
    try:
        ep = None
        gm_dynamic = False
        if dynamic_batch:
            try:
                ep = torch.export.export(work, args, kwargs, strict=False,
                                         dynamic_shapes=_batch_dynamic_shapes(args, kwargs))
                gm_dynamic = any(isinstance(s, torch.SymInt) for n in ep.graph.nodes if n.op == "placeholder"
                                 for s in getattr(n.meta.get("val"), "shape", ()))
            except Exception:  # some models only trace with static shapes: fall back below
                ep = None
        if ep is None:
            ep = torch.export.export(work, args, kwargs, strict=False)
    except Exception as e:  # torch raises many types here; we re-raise one with the cause attached
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"could not trace {type(model).__name__}{_example_summary(args, kwargs)} with {TRACER}: "
            f"{type(e).__name__}: {first[:300]}",
            fix="remove data-dependent Python control flow from forward (or guard it with torch.cond), "
            "and make sure the example inputs run through model(*args, **kwargs)",
        ) from e
    finally:
        if not copy_model:
            for m, was in flags:
                m.training = was
    gm = ep.module()
    inline_wrapper_hops(gm)
    gm.meta["fxprune_tracer"] = TRACER
    gm.meta["fxprune_dynamic_batch"] = gm_dynamic
    gm.meta["fxprune_root_class"] = type(model).__name__
    return gm


_WRAPPER_HOPS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


def inline_wrapper_hops(gm: fx.GraphModule) -> int:
    """Inline ``wrap_with_set_grad_enabled`` / ``wrap_with_autocast`` regions (e.g. HF rotary embeddings computed
    under ``torch.no_grad``/``autocast(enabled=False)``) so the analyzer sees their ops. In float32 inference and
    fine-tuning of the pruned model these wrappers do not change values. Returns the number inlined."""
    import operator

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "__name__", "") not in _WRAPPER_HOPS:
            continue
        sub_node = next((a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"
                         and isinstance(getattr(gm, a.target, None), fx.GraphModule)), None)
        if sub_node is None:
            continue
        sub = getattr(gm, sub_node.target)
        if any(n.op in ("get_attr", "call_module") for n in sub.graph.nodes):
            continue
        inputs = node.args[node.args.index(sub_node) + 1:]
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(inputs):
            continue
        env.update(zip(placeholders, inputs))
        outs: Any = None
        with gm.graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    outs = n.args[0]
                    break
                env[n] = gm.graph.node_copy(n, lambda x: env[x])
        outs = [env.get(o, o) if isinstance(o, fx.Node) else o for o in (outs if isinstance(outs, (list, tuple))
                                                                          else [outs])]
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outs[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:
            continue
        gm.graph.erase_node(node)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
            delattr(gm, sub_node.target)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def node_vals(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """The FakeTensor (or structure of them) recorded on each node."""
    return {n: n.meta.get("val") for n in gm.graph.nodes}
