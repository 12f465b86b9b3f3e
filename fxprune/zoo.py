"""One model-zoo resolver: a model name -> ``(model in eval mode, example inputs, label)``.

    from fxprune import zoo
    model, inputs, label = zoo.resolve("torchvision:resnet18", batch=2)
    model, inputs, label = zoo.resolve("hf:llama", overrides=["num_hidden_layers=4"])
    model, inputs, label = zoo.resolve("my_model.py:build", input_shape="2,3,32,32")

Specs:

* a reference model name (``fxprune.models.names()``: ``resnet56``, ``resnet50``, ...): ``fxprune.models.get(name,
  size=size, seed=seed, batch=batch)``;
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **overrides)``; input
  ``batch x 3 x 224 x 224`` (299 for inception_v3);
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **overrides)``; input ``batch x`` the model's
  pretrained ``input_size`` (or ``img_size`` when overridden);
* ``hf:NAME``: a transformers model type (``llama``, ``gpt2``, ``bert``, ``vit``, ...) built with ``from_config`` from
  its default config **made small** (:data:`HF_SMALL`: 2 layers, hidden 128, 4 heads, 2 key/value heads, intermediate
  256, vocabulary 1000, where the config takes them), random init, ``use_cache=False``; ``overrides`` set config
  fields. A name that is not a model type is read with ``AutoConfig.from_pretrained`` (a local folder or the cache;
  ``HF_HUB_OFFLINE=1`` is set, nothing is downloaded). The model class: ``task`` (:data:`HF_TASKS`), by default
  ``AutoModelForCausalLM``, else ``...ForMaskedLM``, else ``AutoModel``. Input: ``input_ids`` ``batch x seq`` (random
  ids below the vocabulary size), or ``pixel_values`` ``batch x channels x image_size x image_size`` for vision
  models;
* ``path/to/file.py:factory``: ``factory(**overrides)`` from that file (it runs the file's code); it returns a module
  or ``(module, example_inputs)``.

``input_shape`` (``"2,3,224,224"``, several inputs ``"2,3,32,32;2,4"``, or a list of shapes) replaces the default
inputs: random N(0, 1) floats, or random integers below the example's maximum + 1 where the model's own example is
integer (token ids). ``input_dtype`` (``"int64"``, one per input ``"float32;int64"``, or ``torch`` dtypes) sets their
dtypes; integer inputs without an integer example are drawn below the smallest ``nn.Embedding`` size of the model
(else below 2). A shape may carry its dtype: ``"2,16:int64"`` (:func:`parse_inputs`). Every build is seeded with ``seed`` and leaves the caller's global RNG state unchanged.

:func:`build` returns the same as :func:`resolve` plus ``weights``: where the weights came from, ``"random init
(seed 0)"`` for every generated model, ``"loaded from FOLDER/model.safetensors"`` for an ``hf:`` folder that has
one, ``"from the factory"`` for a file factory (fxprune cannot tell).

Unknown names raise :class:`fxprune.errors.InputError` with a "did you mean"; a missing optional package raises
:class:`fxprune.errors.BackendUnavailableError`. This is a front-door module (the CLI, benchmarks and tests use it);
the compiler core never imports it.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

from .errors import BackendUnavailableError, InputError

__all__ = ["resolve", "build", "Resolved", "parse_shape", "parse_inputs", "parse_dtype", "parse_dtypes", "parse_overrides",
           "random_inputs", "HF_SMALL", "HF_TASKS", "KINDS", "RANDOM_INIT"]

#: the spec prefixes :func:`resolve` understands (besides reference names and ``file.py:factory``)
KINDS = ("torchvision", "timm", "hf")

#: defaults that make a transformers config small (a random-init model that compiles in seconds); each is applied
#: when the config class has that field
HF_SMALL: dict[str, Any] = {
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2,
    "hidden_size": 128, "n_embd": 128, "d_model": 128,
    "intermediate_size": 256, "n_inner": 256, "ffn_dim": 256, "d_ff": 256,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 512, "n_positions": 512,
}

#: ``task`` of an ``hf:`` model -> transformers auto class
HF_TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "base": "AutoModel",
}
_HF_DEFAULT_TASKS = ("causal-lm", "masked-lm", "base")

Shapes = list[tuple[int, ...]]

#: how :func:`build` reports generated weights (the CLI prints it and writes it into the report)
RANDOM_INIT = "random init"


class Resolved(NamedTuple):
    """What :func:`build` returns: :func:`resolve`'s triple plus where the weights came from."""
    model: Any
    inputs: tuple
    label: str
    weights: str


# ============================================================================================ helpers
def did_you_mean(name: str, valid: Iterable[str], n: int = 3) -> str:
    """``" (did you mean a, b?)"`` for the names of ``valid`` close to ``name``, else ``""``."""
    m = difflib.get_close_matches(name, list(valid), n=n)
    return f" (did you mean {', '.join(m)}?)" if m else ""


def parse_shape(text: Any) -> Shapes:
    """``"2,3,224,224"`` -> ``[(2, 3, 224, 224)]``; several inputs separated by ``;`` or ``:``. A tuple of ints or a
    list of such tuples is accepted as is (checked)."""
    if isinstance(text, str):
        shapes = []
        for part in re.split(r"[;:]", text.strip()):
            part = part.strip().strip("()[]")
            if not part:
                continue
            try:
                shapes.append(tuple(int(x) for x in part.split(",")))
            except ValueError:
                raise InputError(f"bad input shape {text!r}: expected integers like 2,3,224,224") from None
    elif isinstance(text, Sequence) and text and all(isinstance(d, int) for d in text):
        shapes = [tuple(text)]
    elif isinstance(text, Sequence):
        shapes = [tuple(s) for s in text]
    else:
        raise InputError(f"bad input shape {text!r}: expected e.g. '2,3,224,224' or [(2, 3, 224, 224)]")
    if not shapes:
        raise InputError(f"bad input shape {text!r}: expected e.g. 2,3,224,224")
    for s in shapes:
        if not s or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in s):
            raise InputError(f"bad input shape {text!r}: every dim must be a positive integer")
    return shapes


_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "long": "int64", "int": "int32",
                  "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "f32": "float32", "i64": "int64"}


def parse_dtype(text: Any) -> Any:
    """``"int64"`` (or ``"long"``, ``"fp16"``, a ``torch.dtype``) -> ``torch.int64``; an unknown name is an
    :class:`InputError` listing the valid ones."""
    import torch

    if isinstance(text, torch.dtype):
        return text
    name = str(text).strip().lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in _DTYPES:
        raise InputError(f"unknown dtype {text!r}{did_you_mean(name, _DTYPES)}", fix=f"use one of {', '.join(_DTYPES)}")
    return getattr(torch, name)


def parse_dtypes(text: Any) -> list[Any]:
    """``"int64"`` -> ``[torch.int64]``; one per input: ``"float32;int64"`` (or ``,``-separated, or a list)."""
    if isinstance(text, str):
        parts = [p for p in re.split(r"[;,]", text) if p.strip()]
    elif isinstance(text, Sequence):
        parts = list(text)
    else:
        parts = [text]
    if not parts:
        raise InputError(f"bad dtype list {text!r}: expected e.g. int64 or float32;int64")
    return [parse_dtype(p) for p in parts]


def parse_inputs(text: Any) -> list[tuple[tuple[int, ...], Any]]:
    """Typed inputs: ``"2,3,32,32"`` -> ``[((2, 3, 32, 32), None)]``; a dtype after a shape types that input:
    ``"2,16:int64"`` -> ``[((2, 16), torch.int64)]``, ``"2,16:int64;2,16:bool"`` two inputs. Shapes are separated
    by ``;`` (or ``:``, as in :func:`parse_shape`); the dtype ``None`` means "as the model's example"."""
    if not isinstance(text, str):
        return [(s, None) for s in parse_shape(text)]
    out: list[tuple[tuple[int, ...], Any]] = []
    for tok in re.split(r"[;:]", text.strip()):
        t = tok.strip().strip("()[]")
        if not t:
            continue
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9_.]*", t):
            if not out or out[-1][1] is not None:
                raise InputError(f"bad input shape {text!r}: the dtype {t!r} must follow a shape",
                                 fix="write SHAPE:DTYPE, e.g. 2,16:int64")
            out[-1] = (out[-1][0], parse_dtype(t))
        else:
            out.append((parse_shape(t)[0], None))
    if not out:
        raise InputError(f"bad input shape {text!r}: expected e.g. 2,3,224,224")
    return out


def _coerce(v: str) -> Any:
    for f in (int, float):
        try:
            return f(v)
        except ValueError:
            pass
    low = v.lower()
    if low in ("true", "false", "none", "null"):
        return {"true": True, "false": False, "none": None, "null": None}[low]
    if v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            pass
    return v


def parse_overrides(overrides: Mapping[str, Any] | Iterable[Any] | None) -> dict[str, Any]:
    """``["k=v", ...]`` (values read as int, float, true/false/none or JSON lists, else strings), ``(key, value)``
    pairs or a mapping -> ``{key: value}``."""
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    if isinstance(overrides, str):
        overrides = [overrides]
    out: dict[str, Any] = {}
    for item in overrides:
        if isinstance(item, str):
            k, sep, v = item.partition("=")
            if not sep or not k.strip():
                raise InputError(f"an override is KEY=VALUE, got {item!r}", fix="e.g. num_hidden_layers=4")
            out[k.strip()] = _coerce(v.strip())
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out[item[0]] = item[1]
        else:
            raise InputError(f"an override is 'KEY=VALUE' or (key, value), got {item!r}")
    return out


def random_inputs(shapes: Shapes, seed: int = 0, *, int_high: int | None = None) -> tuple:
    """Random tensors of ``shapes`` (N(0, 1), or integers in ``[0, int_high)``), from a generator seeded ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if int_high is not None:
        return tuple(torch.randint(0, int_high, s, generator=g) for s in shapes)
    return tuple(torch.randn(s, generator=g) for s in shapes)


def _embedding_size(model: Any) -> int | None:
    """The smallest ``num_embeddings`` of the model's ``nn.Embedding`` modules (a safe range for token ids)."""
    import torch.nn as nn

    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)] if model is not None else []
    return min(sizes) if sizes else None


def _like(example: tuple | None, shapes: Shapes, seed: int, *, dtypes: Sequence[Any] | None = None,
          model: Any = None) -> tuple:
    """Random inputs of ``shapes``: the dtypes (and integer ranges) of ``example`` unless ``dtypes`` says
    otherwise; floats N(0, 1), integers in ``[0, high)`` (high: the example's maximum + 1, else the model's
    smallest embedding size, else 2), bools 0/1."""
    import torch

    if example is not None and len(shapes) != len(example):
        raise InputError(f"the input shape gives {len(shapes)} input(s), the model takes {len(example)}")
    if dtypes is not None and len(dtypes) == 1 and len(shapes) > 1:
        dtypes = list(dtypes) * len(shapes)
    if dtypes is not None and len(dtypes) != len(shapes):
        raise InputError(f"{len(dtypes)} input dtype(s) for {len(shapes)} input(s)",
                         fix="give one dtype for all inputs or one per input (int64;float32)")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        x = example[i] if example is not None and isinstance(example[i], torch.Tensor) else None
        dt = dtypes[i] if dtypes is not None and dtypes[i] is not None else (x.dtype if x is not None
                                                                             else torch.float32)
        if dt.is_floating_point:
            out.append(torch.randn(s, generator=g).to(dt))
        elif dt == torch.bool:
            out.append(torch.randint(0, 2, s, generator=g).bool())
        else:
            high = None
            if x is not None and not x.is_floating_point() and x.dtype != torch.bool and x.numel():
                high = int(x.max()) + 1
            if high is None:
                high = _embedding_size(model) or 2
            out.append(torch.randint(0, high, s, generator=g).to(dt))
    return tuple(out)


def _need(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(f"{module} is not installed", fix="pip install 'fxprune[zoo]'") from e


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for a build and restore the caller's state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ============================================================================================ resolve
def resolve(spec: str, *, batch: int = 1, seq: int = 16, size: str = "full", input_shape: Any = None,
            seed: int = 0, overrides: Mapping[str, Any] | Iterable[Any] = (), task: str | None = None,
            max_image_size: int | None = None, input_dtype: Any = None) -> tuple[Any, tuple, str]:
    """``(model in eval mode, example positional inputs, label)`` for ``spec`` (see the module doc).

    ``batch``: batch of the default inputs; ``seq``: sequence length of ``hf:`` token inputs; ``size``: reference
    model size (``"tiny"``/``"full"``); ``input_shape``: replaces the default inputs (a shape may carry its dtype,
    ``"2,16:int64"``); ``input_dtype``: the inputs' dtype(s) (``"int64"``, ``"float32;int64"``, torch dtypes);
    ``overrides``: builder options (``hf:`` config fields, ``timm``/``torchvision`` constructor keywords, factory
    keywords), as ``KEY=VALUE`` strings, pairs or a mapping; ``task``: the ``hf:`` head (:data:`HF_TASKS`);
    ``max_image_size``: cap the side of a default torchvision/timm image input (a timm model that refuses the
    smaller input is rebuilt with ``img_size=max_image_size``, else keeps its native size).
    :func:`build` returns the same and where the weights came from.
    """
    r = build(spec, batch=batch, seq=seq, size=size, input_shape=input_shape, seed=seed, overrides=overrides,
              task=task, max_image_size=max_image_size, input_dtype=input_dtype)
    return r.model, r.inputs, r.label


def build(spec: str, *, batch: int = 1, seq: int = 16, size: str = "full", input_shape: Any = None,
          seed: int = 0, overrides: Mapping[str, Any] | Iterable[Any] = (), task: str | None = None,
          max_image_size: int | None = None, input_dtype: Any = None) -> Resolved:
    """:func:`resolve` as a :class:`Resolved` ``(model, inputs, label, weights)``: ``weights`` says where the
    weights came from (``"random init (seed 0)"``, ``"loaded from ..."``, ``"from the factory"``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"a model spec is a non-empty string, got {spec!r}")
    if not isinstance(batch, int) or batch < 1 or not isinstance(seq, int) or seq < 1:
        raise InputError(f"batch and seq must be positive integers, got batch={batch!r}, seq={seq!r}")
    spec = spec.strip()
    typed = parse_inputs(input_shape) if input_shape is not None else None
    shapes = [s for s, _ in typed] if typed is not None else None
    dtypes: list[Any] | None = None
    if input_dtype is not None:
        dtypes = parse_dtypes(input_dtype)
        if typed is not None and any(d is not None for _, d in typed):
            raise InputError("give the dtypes either in the input shape (2,16:int64) or as input_dtype, not both")
    elif typed is not None and any(d is not None for _, d in typed):
        dtypes = [d for _, d in typed]
    opts = parse_overrides(overrides)
    if task is not None and task not in HF_TASKS:
        raise InputError(f"unknown task {task!r}{did_you_mean(task, HF_TASKS)}",
                         fix=f"use one of {', '.join(HF_TASKS)}")
    kind, colon, name = spec.partition(":")
    if task is not None and kind != "hf":
        raise InputError(f"task= applies to hf: models, not {spec!r}")
    from . import models

    if spec in models.names():
        if opts:
            raise InputError(f"reference model {spec!r} takes no overrides (got {', '.join(opts)})",
                             fix="use size='tiny'|'full', or build it yourself with fxprune.models")
        r = _reference(spec, size, seed, batch, shapes)
    elif kind in KINDS and colon:
        if not name:
            raise InputError(f"{spec!r}: name the model after '{kind}:', e.g. {kind}:{_EXAMPLE[kind]}")
        fn = {"torchvision": _torchvision, "timm": _timm, "hf": _hf}[kind]
        r = fn(name, batch=batch, seq=seq, shapes=shapes, seed=seed, opts=opts, task=task,
               max_image_size=max_image_size)
    elif ".py:" in spec or spec.endswith(".py"):
        r = _file(spec, shapes, seed, opts)
    else:
        raise InputError(f"unknown model {spec!r}{_unknown_hint(spec)}: use a reference model "
                         f"({', '.join(models.names())}), torchvision:NAME, timm:NAME, hf:NAME or "
                         f"path/to/file.py:factory")
    if dtypes is not None:
        example = r.inputs if r.inputs else None
        inputs = _like(example, [tuple(x.shape) for x in r.inputs], seed, dtypes=dtypes, model=r.model)
        r = r._replace(inputs=inputs)
    return r


def _random(seed: int) -> str:
    return f"{RANDOM_INIT} (seed {seed})"


_EXAMPLE = {"torchvision": "resnet18", "timm": "resnet18", "hf": "llama"}


def _unknown_hint(spec: str) -> str:
    """A did-you-mean for an unknown bare name: the same name under a zoo prefix, else a close reference name."""
    from . import models

    if ":" in spec or "/" in spec or spec.endswith(".py"):
        kind, _, name = spec.partition(":")
        close = difflib.get_close_matches(kind, KINDS, n=1)
        return f" (did you mean {close[0]}:{name}?)" if close and name and "/" not in kind else ""
    try:  # only on the error path: the zoo packages are imported to look the name up
        if importlib.util.find_spec("torchvision") is not None:
            import torchvision

            if spec in torchvision.models.list_models():
                return f" (did you mean torchvision:{spec}?)"
        if importlib.util.find_spec("timm") is not None:
            import timm

            if timm.is_model(spec):
                return f" (did you mean timm:{spec}?)"
        if importlib.util.find_spec("transformers") is not None:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            if spec in CONFIG_MAPPING:
                return f" (did you mean hf:{spec}?)"
    except Exception:  # noqa: BLE001 - a hint must never hide the real error
        pass
    return did_you_mean(spec, models.names())


def _reference(name: str, size: str, seed: int, batch: int, shapes: Shapes | None) -> Resolved:
    from . import models

    if shapes:
        batch = shapes[0][0]
    try:
        model, inputs = models.get(name, size=size, seed=seed, batch=batch)
    except ValueError as e:
        raise InputError(str(e)) from None
    inputs = tuple(inputs)
    if shapes:
        inputs = _like(inputs, shapes, seed, model=model)
    return Resolved(model.eval(), inputs, f"{name} ({size})", _random(seed))


def _torchvision(name: str, *, batch: int, shapes: Shapes | None, seed: int, opts: dict,
                 max_image_size: int | None, **_: Any) -> Resolved:
    torchvision = _need("torchvision")
    valid = torchvision.models.list_models()
    if name not in valid:
        raise InputError(f"unknown torchvision model {name!r}{did_you_mean(name, valid)}",
                         fix="see torchvision.models.list_models()")
    with _seeded(seed):
        model = torchvision.models.get_model(name, weights=None, **opts)
    if shapes is None:
        side = 299 if name == "inception_v3" else 224
        if max_image_size:
            side = min(side, max_image_size)
        shapes = [(batch, 3, side, side)]
    return Resolved(model.eval(), random_inputs(shapes, seed), f"torchvision:{name}", _random(seed))


def _timm(name: str, *, batch: int, shapes: Shapes | None, seed: int, opts: dict, max_image_size: int | None,
          **_: Any) -> Resolved:
    r = _timm_build(name, batch=batch, shapes=shapes, seed=seed, opts=opts, max_image_size=max_image_size)
    return Resolved(*r, _random(seed))


def _timm_build(name: str, *, batch: int, shapes: Shapes | None, seed: int, opts: dict,
                max_image_size: int | None) -> tuple[Any, tuple, str]:
    timm = _need("timm")
    if not timm.is_model(name):
        raise InputError(f"unknown timm model {name!r}{did_you_mean(name, timm.list_models())}",
                         fix="see timm.list_models()")
    label = f"timm:{name}"
    with _seeded(seed):
        model = timm.create_model(name, pretrained=False, **opts).eval()
        if shapes is not None:
            return model, random_inputs(shapes, seed), label
        c, h, w = _timm_input_size(name, model, opts)
        if not max_image_size or max(h, w) <= max_image_size:
            return model, random_inputs([(batch, c, h, w)], seed), label
        x = random_inputs([(batch, c, min(h, max_image_size), min(w, max_image_size))], seed)
        if _runs(model, x):
            return model, x, label
        try:  # models with a fixed grid (position embeddings, windows) often take img_size
            smaller = timm.create_model(name, pretrained=False, **{**opts, "img_size": max_image_size}).eval()
        except Exception:  # noqa: BLE001 - it does not take img_size: keep the native size
            smaller = None
        if smaller is not None and _runs(smaller, x):
            return smaller, x, label
        model = timm.create_model(name, pretrained=False, **opts).eval()
        return model, random_inputs([(batch, c, h, w)], seed), label


def _timm_input_size(name: str, model: Any, opts: dict) -> tuple[int, int, int]:
    img = opts.get("img_size")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or ())
    if not size:
        try:
            import timm

            pc = timm.models.get_pretrained_cfg(name)
            size = tuple(pc.input_size) if pc is not None and pc.input_size else ()
        except Exception:  # noqa: BLE001
            size = ()
    c, h, w = size if len(size) == 3 else (3, 224, 224)
    c = int(opts.get("in_chans", c))
    if isinstance(img, int):
        h = w = img
    elif isinstance(img, (tuple, list)) and len(img) == 2:
        h, w = img
    return int(c), int(h), int(w)


def _runs(model: Any, inputs: tuple) -> bool:
    import torch

    try:
        with torch.no_grad():
            model(*inputs)
        return True
    except Exception:  # noqa: BLE001
        return False


def _hf_config(name: str, opts: dict) -> Any:
    """The config of ``hf:name``: a model type's config class built with the :data:`HF_SMALL` fields it takes as
    constructor arguments and ``opts`` on top (so derived fields such as ``head_dim`` follow them), or
    ``AutoConfig.from_pretrained(name)`` with ``opts`` set on it."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if name in CONFIG_MAPPING:
        cls = CONFIG_MAPPING[name]
        default = cls()
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        alias = dict(getattr(cls, "attribute_map", None) or {})  # e.g. gpt2: hidden_size -> n_embd

        def field(k: str) -> str:
            return alias.get(k, k)

        ctor: dict[str, Any] = {}
        for k, v in HF_SMALL.items():  # the small defaults the constructor takes (under their own or an alias name)
            f = field(k)
            if f in params and f not in ctor and not isinstance(getattr(default, f, None), (list, tuple, dict)):
                ctor[f] = v
        late: dict[str, Any] = {}
        for k, v in opts.items():
            f = field(k)
            if f in params:
                ctor[f] = v
            elif hasattr(default, k):
                late[k] = v
            else:
                raise InputError(f"hf:{name}: {cls.__name__} has no field {k!r}"
                                 f"{did_you_mean(k, sorted(params | set(alias)))}")
        try:
            cfg = cls(**ctor)
        except (TypeError, ValueError) as e:
            raise InputError(f"hf:{name}: {cls.__name__} rejects {ctor}: {str(e).splitlines()[0]}") from None
        for k, v in late.items():  # fields the constructor does not take
            setattr(cfg, k, v)
        # head_dim as an explicit field (gemma, t5's d_kv) does not follow a smaller hidden size by itself
        if field("head_dim") not in {field(k) for k in opts} and getattr(cfg, "head_dim", None):
            heads, hidden = getattr(cfg, "num_attention_heads", None), getattr(cfg, "hidden_size", None)
            if isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
                cfg.head_dim = hidden // heads
    else:
        try:
            cfg = AutoConfig.from_pretrained(name)
        except Exception:
            raise InputError(f"unknown transformers model type {name!r}{did_you_mean(name, list(CONFIG_MAPPING))}",
                             fix="a model type such as llama, gpt2, bert, vit, or a local config folder") from None
        for k, v in opts.items():
            setattr(cfg, k, v)
    if hasattr(cfg, "use_cache") and "use_cache" not in opts:
        cfg.use_cache = False
    return cfg


def _hf_folder(name: str) -> Path | None:
    """The local folder an ``hf:`` name points at, if it is one."""
    p = Path(name).expanduser()
    return p if p.is_dir() else None


@contextlib.contextmanager
def _hf_quiet() -> Iterator[None]:
    """No transformers progress bars or load reports (they print ANSI codes) while loading weights."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _hf_load(transformers: Any, auto: str, folder: Path, cfg: Any) -> tuple[Any, str]:
    """``auto.from_pretrained(folder)`` from its safetensors weights only (no pickle), float32, offline; returns
    the model and a sentence on what was loaded."""
    import torch

    with _hf_quiet():
        model, info = getattr(transformers, auto).from_pretrained(
            str(folder), config=cfg, use_safetensors=True, local_files_only=True, dtype=torch.float32,
            output_loading_info=True)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    what = f"loaded from {folder / files[0]}" if len(files) == 1 else f"loaded from {folder} ({len(files)} files)"
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        what += f"; {len(missing)} tensor(s) not in the file are {RANDOM_INIT} (e.g. {missing[0]})"
    return model, what


def _hf(name: str, *, batch: int, seq: int, shapes: Shapes | None, seed: int, opts: dict, task: str | None,
        **_: Any) -> Resolved:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = _need("transformers")
    cfg = _hf_config(name, opts)
    folder = _hf_folder(name)
    safetensors = sorted(folder.glob("*.safetensors")) if folder is not None else []
    model = None
    weights = _random(seed)
    if folder is not None and not safetensors:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        weights += (f"; {folder} has no *.safetensors weights" +
                    (f" ({', '.join(sorted(pickled)[:2])} not read: pickle files)" if pickled else ""))
    errors = []
    with _seeded(seed):
        for t in ((task,) if task else _HF_DEFAULT_TASKS):
            auto = HF_TASKS[t]
            try:
                if safetensors:
                    model, weights = _hf_load(transformers, auto, folder, cfg)
                else:
                    model = getattr(transformers, auto).from_config(cfg)
                break
            except (ValueError, KeyError) as e:
                errors.append(f"{auto}: {_first_line(e)}")
            except (OSError, RuntimeError) as e:  # a damaged file, or shapes the config does not match
                raise InputError(f"hf:{name}: cannot load the weights in {folder}: {_first_line(e)}",
                                 fix="check the folder's config.json and *.safetensors (and --hf-config "
                                     "overrides that change shapes)") from None
    if model is None:
        raise InputError(f"transformers cannot build a model for hf:{name}: {'; '.join(errors)}",
                         fix=f"choose another task ({', '.join(HF_TASKS)})" if task else None)
    model.eval()
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        vocab = int(getattr(cfg, "vocab_size", 1000) or 1000)
        inputs = random_inputs((shapes or [(batch, seq)])[:1], seed, int_high=vocab)
    elif shapes is not None:
        inputs = random_inputs(shapes[:1], seed)
    elif main == "pixel_values":
        side = getattr(cfg, "image_size", 224)
        h, w = (side, side) if isinstance(side, int) else tuple(side)[:2]
        inputs = random_inputs([(batch, int(getattr(cfg, "num_channels", 3)), int(h), int(w))], seed)
    else:
        raise InputError(f"hf:{name} takes {main!r}: give its shape", fix="input_shape='2,...' (--input-shape)")
    return Resolved(model, inputs, f"hf:{name} ({type(model).__name__})", weights)


_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (colours, bold: torch and transformers put them in messages)."""
    return _ANSI.sub("", text)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in strip_ansi(str(e)).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _file(spec: str, shapes: Shapes | None, seed: int, opts: dict) -> Resolved:
    import torch
    import torch.nn as nn

    path, _, factory = spec.rpartition(":") if not spec.endswith(".py") else (spec, ":", "")
    if not factory:
        raise InputError(f"{spec!r}: name the factory function, e.g. {spec}:build")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model file {path!r} does not exist")
    mod_name = f"_fxprune_user_{re.sub(r'[^0-9a-zA-Z_]', '_', p.stem)}"
    loaded = importlib.util.spec_from_file_location(mod_name, p)
    module = importlib.util.module_from_spec(loaded)
    sys.modules[mod_name] = module  # dataclasses and pickling need the module registered
    sys.path.insert(0, str(p.resolve().parent))
    try:
        loaded.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    fn = getattr(module, factory, None)
    if fn is None or not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == mod_name]
        raise InputError(f"{path} has no callable {factory!r}{did_you_mean(factory, names)}; it defines "
                         f"{', '.join(names[:12]) or 'none'}")
    with _seeded(seed):
        res = fn(**opts)
    inputs = None
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[0], nn.Module):
        res, inputs = res
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not isinstance(res, nn.Module):
        raise InputError(f"{spec} returned {type(res).__name__}; a factory returns an nn.Module or "
                         f"(module, example_inputs)")
    if shapes:
        inputs = _like(inputs, shapes, seed, model=res) if inputs else random_inputs(shapes, seed)
    if inputs is None:
        raise InputError(f"{spec} returned no example inputs",
                         fix="give an input shape (--input-shape 2,3,32,32; token ids: --input-shape 2,16:int64)")
    return Resolved(res.eval(), inputs, f"{p.name}:{factory} ({type(res).__name__})", "from the factory")
