"""Type checks of pass options from the constructor's annotations, the same in Python and in recipes.

``Pass`` subclasses get their ``__init__`` wrapped (see :meth:`fxprune.Pass.__init_subclass__`): every argument
whose parameter is annotated must conform to the annotation, or :class:`fxprune.errors.InputError` names the pass,
the option, the value and the expected type. No coercion: ``"false"`` is not a bool, ``True`` is not an int, a
string is not a list of names. Ranges stay the job of each pass' constructor.
"""
from __future__ import annotations

import collections.abc as cabc
import functools
import inspect
import numbers
import types
import typing
from typing import Any, Callable

from .errors import InputError

_ITERABLES = (cabc.Iterable, cabc.Sequence, cabc.Collection, list, tuple, set, frozenset, cabc.Set)


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` matches the annotation ``hint`` (unknown or unresolvable hints accept anything)."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.ForwardRef, typing.TypeVar)):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, (bool,)) or type(value).__name__ == "bool_"
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is type or hint is type:
        return isinstance(value, type)
    if origin in (cabc.Callable,) or hint is cabc.Callable or hint is typing.Callable:
        return callable(value)
    if origin in (dict, cabc.Mapping, cabc.MutableMapping) or hint in (dict, cabc.Mapping):
        if not isinstance(value, cabc.Mapping):
            return False
        if len(args) == 2:
            return all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
        return True
    if origin in _ITERABLES or hint in _ITERABLES:
        if isinstance(value, (str, bytes)) or not isinstance(value, cabc.Iterable):
            return False
        container = origin or hint
        if container in (list, tuple, set, frozenset) and not isinstance(value, container):
            # a declared list/tuple also accepts the other concrete sequence type (YAML gives lists)
            if not isinstance(value, (list, tuple)):
                return False
        if isinstance(value, (list, tuple, set, frozenset)) and args:
            if origin is tuple and len(args) != 2 or (origin is tuple and args[-1] is not Ellipsis):
                if origin is tuple and args[-1] is not Ellipsis:
                    return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
            elem = args[0]
            return all(conforms(v, elem) for v in value)
        return True
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if isinstance(hint, type) else None
    return text or str(hint).replace("typing.", "").replace("collections.abc.", "")


def typed_init(cls: type, init: Callable) -> Callable:
    """Wrap ``init`` so its annotated arguments are type-checked (hints resolved on first call)."""
    sig = inspect.signature(init)
    hints: dict[str, Any] | None = None

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal hints
        if hints is None:
            try:
                hints = typing.get_type_hints(init)
            except Exception:  # noqa: BLE001 - unresolvable forward references: check nothing rather than guess
                hints = {}
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as e:
            raise InputError(f"{cls.__name__}: {e}", fix=f"see help({cls.__name__}) for its options") from None
        for name, value in list(bound.arguments.items())[1:]:
            hint = hints.get(name)
            if hint is None or sig.parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                              inspect.Parameter.VAR_KEYWORD):
                continue
            if not conforms(value, hint):
                raise InputError(f"{cls.__name__}: option {name}={value!r} ({type(value).__name__}) must be "
                                 f"{describe(hint)}",
                                 fix=f"pass a {describe(hint)} (no coercion: 'false' is not a bool, a string is not "
                                     f"a list)")
        init(self, *args, **kwargs)

    __init__.__fxprune_typed__ = True  # type: ignore[attr-defined]
    return __init__
