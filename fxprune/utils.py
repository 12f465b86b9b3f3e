"""Small generic helpers shared by several pass families (part of the core: imports nothing but the core).

* :func:`owner`, :func:`get_tensor`: a module's attribute by qualified name.
* :func:`ignore_filter`: the ``ignore=[...]`` option of the passes (names or submodules) as a predicate on
  parameter names.
* :func:`is_exporting`, :func:`is_symbolic`: whether a runtime module is being traced (torch.export, ONNX export,
  FakeTensor shape propagation), so gates switch to their export-friendly form.
* :func:`iter_batches`, :func:`first_tensor`: calibration data and model outputs in the forms users pass them.
* :func:`int_list`: an aten conv argument (``None``, an int or a list) as a list of ``n`` ints.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from .errors import InputError


# ----------------------------------------------------------------------------------------------- attributes
def owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding attribute ``name`` (a qualified name) and the attribute's last component."""
    *path, attr = name.split(".")
    mod = module
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


def get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The attribute (parameter, buffer or constant) ``name`` of ``module`` by qualified name."""
    mod, attr = owner(module, name)
    return getattr(mod, attr)


def ignore_filter(program: Any, ignore: Iterable[Any]) -> Callable[[str], bool]:
    """``ignore`` entries (qualified-name prefixes or submodules of the source model) -> ``fn(param name) -> bool``."""
    prefixes: list[str] = []
    by_id = {}
    src = getattr(program, "source", None)
    for n, mod in (src.named_modules() if src is not None else []):
        by_id[id(mod)] = n
    for item in ignore:
        if isinstance(item, str):
            prefixes.append(item)
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise InputError(f"ignore[...] module {type(item).__name__} is not part of the model",
                                 fix="pass a submodule of the compiled model or its qualified name")
            prefixes.append(by_id[id(item)])
        else:
            raise InputError(f"ignore entries must be modules or names, got {type(item).__name__}",
                             fix="e.g. ignore=[model.fc] or ignore=['fc']")

    def ignored(name: str) -> bool:
        return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)

    return ignored


# ----------------------------------------------------------------------------------------------- tracing
def is_exporting() -> bool:
    """True while torch.export / the ONNX exporter traces the module (gates then use export-friendly ops)."""
    try:
        if torch.compiler.is_exporting():
            return True
    except Exception:  # pragma: no cover - very old torch
        pass
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except Exception:  # pragma: no cover
        return False


def is_symbolic(x: torch.Tensor) -> bool:
    """True for a tensor without real values: a FakeTensor, a meta tensor, or any tensor while exporting."""
    return isinstance(x, FakeTensor) or is_exporting() or x.is_meta


# ----------------------------------------------------------------------------------------------- data
def iter_batches(data: Any, max_batches: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x, y or None) from a loader of tensors, (x, y) pairs or (x,) tuples, or from one (x, y) tuple of tensors."""
    if isinstance(data, torch.Tensor):
        data = [data]
    elif (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
          and data[0].shape[:1] == data[1].shape[:1] and data[1].dim() == 1):
        data = [tuple(data)]
    for i, b in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        if isinstance(b, torch.Tensor):
            yield b, None
        elif isinstance(b, (tuple, list)) and b and isinstance(b[0], torch.Tensor):
            y = b[1] if len(b) > 1 and isinstance(b[1], torch.Tensor) else None
            yield b[0], y
        elif isinstance(b, dict) and "x" in b:
            yield b["x"], b.get("y")
        else:
            raise InputError(f"calibration batches must be tensors or (x, y) tuples, got {type(b).__name__}",
                             fix="pass e.g. fxprune.data.loader(x, y) or a list of input tensors")


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor leaf of a model output (logits of a multi-output model)."""
    from torch.utils._pytree import tree_flatten

    for leaf in tree_flatten(out)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise InputError("the model returned no tensor", fix="the gate's calibration needs logits as output")


# ----------------------------------------------------------------------------------------------- aten args
def int_list(v: Any, n: int, default: int) -> list[int]:
    """An aten conv argument (stride/padding/dilation: ``None``, an int or a list) as ``n`` ints."""
    if v is None:
        return [default] * n
    if isinstance(v, int):
        return [v] * n
    v = [int(a) for a in v]
    return v * n if len(v) == 1 else v


__all__ = ["owner", "get_tensor", "ignore_filter", "is_exporting", "is_symbolic", "iter_batches", "first_tensor",
           "int_list"]
