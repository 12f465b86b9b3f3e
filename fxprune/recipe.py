"""Recipes: a pass pipeline as data (YAML, or a Python list), by registered pass name with keyword options.

    # recipe.yaml
    passes:
      - pass: channel_prune
        ratio: 0.5
        round_to: 8
      - pass: shrink

    passes = load_recipe("recipe.yaml")                  # [ChannelPrune(ratio=0.5, ...), Shrink(...)]
    passes = load_recipe([{"pass": "channel_prune", "ratio": 0.5}, ("shrink", {})])
    dump_recipe(passes)                                  # [{"pass": "channel_prune", "ratio": 0.5, ...}, ...]

Accepted entry forms: ``{"pass": name, **options}``, ``(name, options)`` / ``[name, options]``, a bare ``name``,
a one-key mapping ``{name: options}``, or a ready :class:`~fxprune.Pass` instance (Python lists only). A YAML
file holds either that list or a mapping with ``passes:`` and, optionally, ``imports:`` (modules to import first
so that their ``@register_pass`` passes can be named; this runs their code, so only list modules you trust).

Names and options are checked before anything runs: an unknown pass or option raises
:class:`~fxprune.errors.RecipeError` listing the valid ones, and so does a value the pass constructor rejects.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import FxPruneError, RecipeError
from .pass_manager import PASS_REGISTRY, Pass
from .report import recipe_from_history

__all__ = ["load_recipe", "dump_recipe", "recipe_to_yaml", "save_recipe", "pass_options", "registry"]

_UNSERIALIZABLE = "_unserializable"
_TOP_KEYS = ("passes", "imports")


def registry() -> dict[str, type[Pass]]:
    """The pass registry with fxprune's built-in passes registered (and optional pass modules, when present)."""
    import fxprune.passes  # noqa: F401 - registers the built-in passes

    pkg_dir = Path(fxprune.passes.__file__).parent
    for mod in sorted(p.stem for p in pkg_dir.glob("*.py") if not p.stem.startswith("_")):
        # passes that are not (yet) imported by fxprune.passes still register on import; a module that fails to
        # import (a missing optional dependency) simply contributes nothing
        try:
            importlib.import_module(f"fxprune.passes.{mod}")
        except Exception:  # noqa: BLE001 - optional modules
            pass
    return PASS_REGISTRY


def pass_options(cls: type[Pass]) -> dict[str, inspect.Parameter]:
    """The keyword options of a pass class: the parameters of its ``__init__`` (none when it has no ``__init__``)."""
    if cls.__init__ is object.__init__:
        return {}
    sig = inspect.signature(cls.__init__)
    return {n: p for n, p in list(sig.parameters.items())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _accepts_any(cls: type[Pass]) -> bool:
    if cls.__init__ is object.__init__:
        return False
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def _suggest(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------------------------ loading
def _read(src: Any) -> tuple[list[Any], str]:
    """The list of entries of ``src`` and where it came from (for messages)."""
    where = "recipe"
    if isinstance(src, (str, os.PathLike)) and not (isinstance(src, str) and "\n" in src):
        path = Path(src)
        if not path.exists():
            raise RecipeError(f"recipe file {str(path)!r} does not exist",
                              fix="pass the path of a YAML recipe (see docs/cli.md) or a list of pass entries")
        where = str(path)
        text = path.read_text()
    elif isinstance(src, str):
        text = src  # YAML text
    else:
        text = None
    data: Any = src
    if text is not None:
        data = _parse_yaml(text, where)
    if isinstance(data, Mapping):
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise RecipeError(f"{where}: unknown top-level key(s) {unknown}; a recipe has {list(_TOP_KEYS)}",
                              fix="put the pipeline under 'passes:' (a list of {pass: name, option: value})")
        imports = data.get("imports") or []
        if isinstance(imports, str):
            imports = [imports]
        for mod in imports:
            try:
                importlib.import_module(str(mod))
            except Exception as e:
                raise RecipeError(f"{where}: cannot import {mod!r} listed under 'imports': {type(e).__name__}: {e}",
                                  fix="make the module importable (installed or on PYTHONPATH)") from e
        data = data.get("passes")
    if data is None:
        raise RecipeError(f"{where}: the recipe is empty", fix="list at least one pass, e.g. - pass: shrink")
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise RecipeError(f"{where}: a recipe is a list of pass entries, got {type(data).__name__}",
                          fix="e.g. [{'pass': 'channel_prune', 'ratio': 0.5}, {'pass': 'shrink'}]")
    return list(data), where


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a short list of passes; anything bigger is a mistake or an attack


def _parse_yaml(text: str, where: str) -> Any:
    """Safe YAML without aliases (``*name`` can expand a few bytes into gigabytes, and a pipeline never needs
    them); errors keep the line and column."""
    import yaml

    if len(text.encode("utf-8", errors="replace")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where}: the recipe is larger than {MAX_RECIPE_BYTES} bytes",
                          fix="a recipe lists a few passes with their options; check the file")

    class _NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.events.AliasEvent):
                mark = self.peek_event().start_mark
                raise RecipeError(f"{where}: line {mark.line + 1}, column {mark.column + 1}: YAML aliases "
                                  f"(*name) are not allowed in recipes",
                                  fix="write the options out in full instead of referring to an anchor")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML: {at}{problem}",
                          fix="check the indentation and the 'key: value' syntax at that position") from None


def _entry(item: Any, i: int, where: str) -> tuple[str, dict[str, Any]] | Pass:
    if isinstance(item, Pass):
        return item
    if isinstance(item, type) and issubclass(item, Pass):
        raise RecipeError(f"{where}: entry {i} is the class {item.__name__}, not an instance",
                          fix=f"instantiate it, e.g. {item.__name__}()")
    if isinstance(item, str):
        return item, {}
    if isinstance(item, (tuple, list)) and len(item) in (1, 2) and isinstance(item[0], str):
        opts = item[1] if len(item) == 2 else {}
        if opts is None:
            opts = {}
        if not isinstance(opts, Mapping):
            raise RecipeError(f"{where}: entry {i} ({item[0]!r}): options must be a mapping, got "
                              f"{type(opts).__name__}")
        return item[0], dict(opts)
    if isinstance(item, Mapping):
        if "pass" in item:
            name = item["pass"]
            opts = {k: v for k, v in item.items() if k != "pass"}
        elif len(item) == 1:
            name, opts = next(iter(item.items()))
            if opts is None:
                opts = {}
            if not isinstance(opts, Mapping):
                raise RecipeError(f"{where}: entry {i} ({name!r}): options must be a mapping, got "
                                  f"{type(opts).__name__}", fix=f"e.g. {{{name}: {{ratio: 0.5}}}}")
            opts = dict(opts)
        else:
            raise RecipeError(f"{where}: entry {i} has no 'pass' key: {dict(item)!r}",
                              fix="write each entry as {pass: NAME, OPTION: VALUE, ...}")
        if not isinstance(name, str):
            raise RecipeError(f"{where}: entry {i}: the pass name must be a string, got {name!r}")
        return name, opts
    raise RecipeError(f"{where}: entry {i} is a {type(item).__name__}; expected {{'pass': name, **options}}, "
                      f"(name, options), a name or a Pass instance")


def build_pass(name: str, options: Mapping[str, Any], *, where: str = "recipe", index: int | None = None) -> Pass:
    """Instantiate the registered pass ``name`` with ``options``; RecipeError on an unknown name or option."""
    reg = registry()
    at = f"{where}: " + (f"entry {index} " if index is not None else "")
    if name not in reg:  # class names work too: ChannelPrune == channel_prune
        by_class = {c.__name__: n for n, c in reg.items()}
        name = by_class.get(name, name)
    if name not in reg:
        raise RecipeError(f"{at}unknown pass {name!r}{_suggest(name, reg)}; registered passes: "
                          f"{', '.join(sorted(reg))} (or their class names)",
                          fix="use a registered name (`fxprune passes` lists them), or import the module that "
                              "registers your pass (recipe key 'imports:')")
    cls = reg[name]
    opts = dict(options)
    if _UNSERIALIZABLE in opts:
        bad = opts[_UNSERIALIZABLE]
        raise RecipeError(f"{at}({name}): option(s) {', '.join(bad)} held Python objects that a recipe cannot "
                          f"store ({bad})", fix=f"construct {cls.__name__} in Python with those options")
    valid = pass_options(cls)
    if not _accepts_any(cls):
        unknown = [k for k in opts if k not in valid]
        if unknown:
            hint = _suggest(unknown[0], valid)
            raise RecipeError(f"{at}({name}): unknown option(s) {', '.join(map(repr, unknown))}{hint}; valid "
                              f"options of {cls.__name__}: {', '.join(valid) or '(none)'}",
                              fix="`fxprune passes` lists every pass with its options")
    missing = [n for n, p in valid.items() if p.default is inspect.Parameter.empty and n not in opts]
    if missing:
        raise RecipeError(f"{at}({name}): missing required option(s) {', '.join(missing)} of {cls.__name__}",
                          fix=f"add e.g. {missing[0]}: VALUE to the entry")
    try:
        return cls(**opts)
    except FxPruneError as e:
        msg = str(e).split("\n  fix: ")[0]
        raise RecipeError(f"{at}({name}): {msg}", fix=e.fix) from e
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{at}({name}): {cls.__name__}({_fmt(opts)}) failed: {e}",
                          fix="check the option values (`fxprune passes` shows the defaults)") from e


def load_recipe(src: str | os.PathLike | Sequence[Any]) -> list[Pass]:
    """Build the pass list of a recipe: a YAML file path, YAML text, or a list of entries (see module doc).

    Raises :class:`RecipeError` (a ``ValueError``) for a missing file, bad YAML, an unknown pass name or option
    (listing the valid ones), a missing required option, or a value the pass rejects.
    """
    items, where = _read(src)
    if not items:
        raise RecipeError(f"{where}: the recipe lists no pass", fix="add e.g. - pass: channel_prune")
    out: list[Pass] = []
    for i, item in enumerate(items):
        e = _entry(item, i, where)
        out.append(e if isinstance(e, Pass) else build_pass(e[0], e[1], where=where, index=i))
    return out


# ------------------------------------------------------------------------------------------------ dumping
def _plain(v: Any) -> tuple[bool, Any]:
    """(serializable, YAML/JSON-plain value)."""
    try:
        import numpy as np

        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
    except ImportError:  # pragma: no cover
        pass
    if v is None or isinstance(v, (bool, int, float, str)):
        return True, v
    if isinstance(v, (list, tuple, set, frozenset)):
        seq = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else list(v)
        vals = [_plain(x) for x in seq]
        return all(ok for ok, _ in vals), [x for _, x in vals]
    if isinstance(v, Mapping):
        vals = {str(k): _plain(x) for k, x in v.items()}
        return all(ok for ok, _ in vals.values()) and all(isinstance(k, str) for k in v), \
            {k: x for k, (_, x) in vals.items()}
    return False, v


def dump_recipe(passes: Iterable[Pass]) -> list[dict[str, Any]]:
    """The recipe of ``passes``: ``[{"pass": name, **options}, ...]``, loadable by :func:`load_recipe`.

    Options are the constructor parameters found in ``Pass.options()`` (or as attributes). Values a recipe cannot
    hold (callables, modules, data loaders) are listed, by ``repr``, under ``_unserializable``; loading such an
    entry raises RecipeError saying so.
    """
    out = []
    for p in passes:
        if not isinstance(p, Pass):
            raise RecipeError(f"dump_recipe needs Pass instances, got {p!r}")
        cls = type(p)
        opts = p.options()
        names = list(pass_options(cls)) if not _accepts_any(cls) else list(opts)
        entry: dict[str, Any] = {"pass": p.name}
        bad: dict[str, str] = {}
        for n in names:
            if n in opts:
                v = opts[n]
            elif hasattr(p, n):
                v = getattr(p, n)
            else:
                continue  # not recoverable from the instance: the default applies
            ok, plain = _plain(v)
            if ok:
                entry[n] = plain
            else:
                bad[n] = repr(v)[:200]
        if bad:
            entry[_UNSERIALIZABLE] = bad
        out.append(entry)
    return out


def recipe_to_yaml(recipe: Sequence[Mapping[str, Any]] | Iterable[Pass], *, header: str | None = None) -> str:
    """YAML text (``passes:`` list) of a recipe given as dicts or as Pass instances."""
    import yaml

    items = list(recipe)
    if items and isinstance(items[0], Pass):
        items = dump_recipe(items)
    text = yaml.safe_dump({"passes": [dict(i) for i in items]}, sort_keys=False, default_flow_style=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return text


def save_recipe(recipe: Sequence[Mapping[str, Any]] | Iterable[Pass], path: str | os.PathLike, *,
                header: str | None = None) -> Path:
    """Write :func:`recipe_to_yaml` to ``path``."""
    p = Path(path)
    p.write_text(recipe_to_yaml(recipe, header=header))
    return p


def _fmt(opts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in opts.items())
