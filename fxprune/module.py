"""The module :func:`fxprune.compile` returns: :class:`PrunedModule`, a GraphModule users keep working with.

``torch.export`` gives a GraphModule (``ExportedProgram.module()``) whose graph was captured in eval mode:
``aten.batch_norm(..., training=False)``, ``aten.dropout(..., train=False)``. Its ``.train()`` changes nothing
but a flag, it cannot be pickled (local hooks and a generated guard function), and it rejects a call at another
batch size with ``Guard failed: ...``. :class:`PrunedModule` is the same graph, with:

* **modes that work**: ``.train()``/``.eval()`` rewrite the training flag of every BatchNorm / InstanceNorm /
  dropout-like node (``aten.batch_norm`` arg 5, ``aten.dropout``/``feature_dropout``/``alpha_dropout``/
  ``native_dropout`` arg 2, ``aten.rrelu`` arg 3, ...). In training mode BatchNorm uses batch statistics, updates
  its running statistics in place (momentum as traced) and counts ``num_batches_tracked``; dropout is active. Each
  node follows the ``training`` flag of the submodule that owns it (``module.layer1[0].bn1.eval()`` freezes that
  BatchNorm only), checked before every call, so flags set directly (``m.training = False``) work as well. A
  ``PrunedModule`` is returned in eval mode.
* **pickling**: ``torch.save(module, f)`` / ``torch.load(f, weights_only=False)`` (in a process that can
  ``import fxprune``; the graph is stored as Python source and re-traced, as torch does for GraphModules), and
  ``state_dict()`` / ``load_state_dict()`` with the original model's qualified names (``layer1.0.conv1.weight``).
* **input checks with readable errors**: the input structure (positional or keyword, nested) is the exported
  one; each tensor input's static dims and dynamic dims (by name: ``batch``, ``seq``, ...) are checked before the
  graph runs (:class:`~fxprune.errors.InputError` naming the input and dim), instead of torch's guard asserts.

:func:`input_names` / :func:`output_names` give the names of the flat inputs (forward parameters) and outputs
(``ModelOutput``/dict keys, else ``output_0``, ...), used by the ONNX backend.
"""
from __future__ import annotations

import copy
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

from .errors import InputError
from .log import get_logger
from .trace import InputSpec, flat_input_names

log = get_logger("module")

__all__ = ["PrunedModule", "input_names", "output_names"]

#: ops whose behaviour depends on the training mode: str(target) -> (arg index, kwarg name, kind)
MODE_OPS: dict[str, tuple[int, str, str]] = {
    "aten.batch_norm.default": (5, "training", "norm"),
    "aten.native_batch_norm.default": (5, "training", "norm"),
    "aten._native_batch_norm_legit.default": (5, "training", "norm"),
    "aten.instance_norm.default": (5, "use_input_stats", "norm"),
    "aten.dropout.default": (2, "train", "dropout"),
    "aten.feature_dropout.default": (2, "train", "dropout"),
    "aten.alpha_dropout.default": (2, "train", "dropout"),
    "aten.feature_alpha_dropout.default": (2, "train", "dropout"),
    "aten.native_dropout.default": (2, "train", "dropout"),
    "aten.rrelu.default": (3, "training", "dropout"),
}
#: inference-only ops that cannot switch to training behaviour (reported when training starts)
_FROZEN_OPS = ("aten._native_batch_norm_legit_no_training.default",)
_CHECK = "_fxprune_input_check"
_MODE_NODE = "fxprune_mode_node"  # node.meta key of nodes inserted for training mode (num_batches_tracked += 1)


@dataclass
class ModeSite:
    """One mode-dependent node: its op, the flag it was traced with (the eval behaviour), the qualified name of
    the submodule whose ``training`` flag drives it ("" = the root) and its ``num_batches_tracked`` buffer."""

    op: str
    traced: Any
    owner: str
    counter: str | None = None


# ================================================================================================ input checks
class InputCheck(nn.Module):
    """Checks the flat inputs of a :class:`PrunedModule` against its :class:`~fxprune.trace.InputSpec` (called
    from the graph right after the inputs are flattened; does nothing while the module is being traced)."""

    _is_impure = True  # never removed by dead-code elimination

    def __init__(self, spec: InputSpec | None):
        super().__init__()
        self.spec = spec

    def forward(self, *flat: Any) -> None:
        spec = self.spec
        if spec is None or _tracing(flat):
            return None
        env: dict[str, int] = {}
        derived: list[tuple[str, int, int, str]] = []
        for pos, (want, x) in enumerate(zip(spec.inputs, flat)):
            if want is None or not isinstance(x, torch.Tensor):
                continue
            shape = tuple(int(s) for s in x.shape)
            if len(shape) != len(want.dims):
                raise InputError(f"input {want.name!r} has {len(shape)} dims {shape}; this module takes "
                                 f"{len(want.dims)} dims {_show(want.dims)}", fix=self._fix())
            for d, (w, got) in enumerate(zip(want.dims, shape)):
                if isinstance(w, int):
                    if w != got:
                        raise InputError(f"input {want.name!r} has shape {shape}; this module takes "
                                         f"{_show(want.dims)}: dim {d} is fixed at {w}" + self._why(d), fix=self._fix())
                elif w.isidentifier():
                    if w in env and env[w] != got:
                        other = next(i.name for i in spec.inputs if i is not None and w in i.dims)
                        raise InputError(f"input {want.name!r} dim {d} ({w}) is {got} but {env[w]} in input "
                                         f"{other!r}: inputs sharing the dim {w!r} must agree",
                                         fix=f"give every input the same {w}")
                    env[w] = got
                    lo, hi = spec.ranges.get(w, (1, None))
                    if got < lo or (hi is not None and got > hi):
                        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                        raise InputError(f"input {want.name!r} dim {d} ({w}) is {got}; this module takes {w} "
                                         f"{rng}", fix=f"use a {w} in {rng}")
                else:
                    derived.append((want.name, d, got, w))
        for name, d, got, expr in derived:
            val = _eval_dim(expr, env)
            if val is not None and val != got:
                raise InputError(f"input {name!r} dim {d} is {got}; this module needs {expr} = {val} there",
                                 fix="give the inputs consistent sizes")
        return None

    def _why(self, d: int) -> str:
        notes = [n for n in (self.spec.notes if self.spec else []) if "static" in n]
        return f" ({notes[0]})" if notes else ""

    def _fix(self) -> str:
        return ("pass inputs shaped like the example given to fxprune.compile (only the dims named above vary); "
                "compile with dynamic={...} to make more dims dynamic")


class LoadedInputCheck(InputCheck):
    """:class:`InputCheck` for a program loaded with :func:`fxprune.load` (a forward pre-hook there)."""

    def _fix(self) -> str:
        return ("pass inputs shaped like the example the program was compiled with (only the dims named above "
                "vary); for other shapes compile with an example of that shape, or with dynamic={...}, and save "
                "again")


def _tracing(flat: tuple) -> bool:
    from .utils import is_symbolic

    try:
        if torch.compiler.is_compiling():
            return True
    except Exception:  # pragma: no cover - old torch
        pass
    return any(isinstance(x, torch.Tensor) and is_symbolic(x) for x in flat) or \
        any(isinstance(x, torch.SymInt) for x in flat)


def _show(dims: tuple) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


_DIM_EXPRS: dict[str, Any] = {}


def _eval_dim(expr: str, env: dict[str, int]) -> int | None:
    import sympy

    try:
        e = _DIM_EXPRS.get(expr)
        if e is None:
            e = _DIM_EXPRS[expr] = sympy.sympify(expr)
        v = e.subs({sympy.Symbol(k, integer=True, positive=True): val for k, val in env.items()})
        v = v.subs({sympy.Symbol(k): val for k, val in env.items()})
        return int(v) if v.is_number else None
    except Exception:  # noqa: BLE001 - an expression we cannot evaluate is not checked
        return None


# ================================================================================================ names
def input_names(gm: fx.GraphModule) -> list[str]:
    """The names of ``gm``'s flat inputs: the forward parameters (``x``, ``input``, ``input_ids``), with a suffix
    ``_<i>`` per tensor of a nested input; the placeholder names where the structure is unknown."""
    return flat_input_names(gm)


def output_names(gm: fx.GraphModule, n: int | None = None) -> list[str]:
    """Names of ``gm``'s flat outputs from its output structure: ``ModelOutput``/dict keys (``logits``,
    ``b_0`` for ``{"b": (t0, t1)}``), ``output_0``, ``output_1``, ... for tuples, ``output`` for a single tensor.
    ``n``: the number of flat outputs when ``gm`` has no output structure."""
    spec = getattr(gm, "_out_spec", None)
    if spec is None:
        count = n if n is not None else _n_outputs(gm)
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    try:
        tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    except Exception:  # noqa: BLE001 - unusual containers: numbered names
        return [f"output_{i}" for i in range(spec.num_leaves)]
    return names_of(tree)


def names_of(value: Any, *, leaf: Any = None) -> list[str]:
    """Names of the tensor leaves of a (nested) output ``value``: dict/``ModelOutput`` keys joined by ``_``
    (``logits``, ``b_0``), ``output_<i>`` for positions of a top-level tuple/list, ``output`` for a single
    tensor. ``leaf``: the leaf type to name (default: tensors, or every leaf when none is a tensor)."""
    try:
        flat = pytree.tree_flatten_with_path(value)[0]
    except Exception:  # noqa: BLE001 - unusual containers: numbered names
        return ["output"]
    if leaf is None and any(isinstance(v, torch.Tensor) for _, v in flat):
        leaf = torch.Tensor
    paths = [p for p, v in flat if leaf is None or isinstance(v, leaf)]
    if len(paths) == 1 and not paths[0]:
        return ["output"]
    names = []
    for i, path in enumerate(paths):
        parts = []
        for k in path:
            if isinstance(k, pytree.MappingKey):
                parts.append(str(k.key))
            elif isinstance(k, pytree.SequenceKey):
                parts.append(str(k.idx))
            elif isinstance(k, pytree.GetAttrKey):
                parts.append(str(k.name))
            else:
                parts.append(str(i))
        if parts and parts[0].isdigit():
            parts.insert(0, "output")
        name = re.sub(r"[^0-9A-Za-z_.]", "_", "_".join(parts)) or f"output_{i}"
        names.append(name)
    seen: dict[str, int] = {}
    out = []
    for nm in names:
        seen[nm] = seen.get(nm, 0) + 1
        out.append(nm if seen[nm] == 1 else f"{nm}_{seen[nm]}")
    return out


def _n_outputs(gm: fx.GraphModule) -> int:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    a = out.args[0]
    return len(a) if isinstance(a, (list, tuple)) else 1


# ================================================================================================ the module
class PrunedModule(fx.GraphModule):
    """A GraphModule whose ``train()``/``eval()`` switch BatchNorm and dropout, which pickles, and which checks
    its inputs with readable errors (module doc). Build one with :meth:`from_graph_module`."""

    def __init__(self, root: nn.Module | dict[str, Any], graph: fx.Graph, class_name: str = "PrunedModule"):
        super().__init__(root, graph, class_name)
        self._fxprune_sites: list[ModeSite] = []
        self._fxprune_nodes: list[fx.Node] = []
        self._fxprune_applied: tuple | None = None
        self._fxprune_warned = False

    # --------------------------------------------------------------------------------------------- building
    @classmethod
    def from_graph_module(cls, gm: fx.GraphModule, *, spec: InputSpec | None = None,
                          source: nn.Module | None = None) -> "PrunedModule":
        """A PrunedModule running ``gm``'s graph (copied) on ``gm``'s parameters and buffers (shared, not copied:
        every submodule of ``gm`` becomes one of the result). ``spec``: the inputs it accepts (default:
        ``gm.meta["fxprune_inputs"]``). ``source``: the original model, to read BatchNorm options the graph does
        not keep. The result is in eval mode."""
        graph = copy.deepcopy(gm.graph)
        for node in list(graph.nodes):  # torch.export's generated guard function: replaced by InputCheck
            if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
                graph.erase_node(node)
        mod = cls(gm, graph)
        _adopt_state(mod, gm)
        mod.meta = dict(getattr(gm, "meta", {}))
        spec = spec if spec is not None else mod.meta.get("fxprune_inputs")
        mod._install_check(spec)
        mod._fxprune_sites = mod._find_sites()
        mod._check_momentum(source)
        mod.train(False)
        mod._sync_mode()
        return mod

    def _install_check(self, spec: InputSpec | None) -> None:
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if spec is not None and len(spec.inputs) != len(placeholders):
            spec = None  # the graph's inputs changed since tracing: nothing reliable to check against
        if _CHECK in self._modules:
            for n in list(self.graph.nodes):
                if n.op == "call_module" and n.target == _CHECK:
                    self.graph.erase_node(n)
        self.add_submodule(_CHECK, InputCheck(spec))
        if spec is not None and placeholders:
            with self.graph.inserting_after(placeholders[-1]):
                self.graph.call_module(_CHECK, tuple(placeholders))
        self.recompile()

    @property
    def input_spec(self) -> InputSpec | None:
        """What the module accepts: an :class:`~fxprune.trace.InputSpec` (dims by name, ranges, notes)."""
        chk = self._modules.get(_CHECK)
        return getattr(chk, "spec", None)

    def input_names(self) -> list[str]:
        return input_names(self)

    def output_names(self) -> list[str]:
        return output_names(self)

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """``{input name: {dim: dim name}}`` of the dynamic dims (empty when static)."""
        spec = self.input_spec
        return spec.dynamic_dims() if spec is not None else {}

    def export_inputs(self, args: tuple, kwargs: dict | None = None) -> tuple[tuple, dict, Any]:
        """``(args, kwargs, dynamic_shapes)`` to re-export this module with ``torch.export`` (or the ONNX dynamo
        exporter) keeping its dynamic dims: one ``Dim`` per dim name (``batch``, ``seq``, ... with its range),
        keyed by forward parameter; an example of size 1 in a dynamic dim is repeated to size 2 (torch.export
        specialises sizes 0 and 1). ``dynamic_shapes`` is None when the module is static."""
        from torch.export import Dim

        kwargs = dict(kwargs or {})
        spec = self.input_spec
        if spec is None or not spec.dynamic_dims():
            return tuple(args), kwargs, None
        dims: dict[str, Any] = {}
        for name, (lo, hi) in spec.ranges.items():
            dims[name] = Dim(name, min=max(int(lo), 1)) if hi is None else Dim(name, min=max(int(lo), 1), max=hi)
        import inspect

        sig = inspect.signature(self.forward)
        bound = sig.bind(*args, **kwargs)
        flat = iter(spec.inputs)
        shapes: dict[str, Any] = {}
        values: dict[str, Any] = {}
        for pname, value in bound.arguments.items():
            leaves, tree = pytree.tree_flatten(value)
            specs, new = [], []
            for leaf in leaves:
                want = next(flat, None)
                one: dict[int, Any] | None = None
                if want is not None and isinstance(leaf, torch.Tensor) and leaf.dim() == len(want.dims):
                    one = {}
                    for d, w in want.dynamic().items():
                        one[d] = dims[w] if w in dims else Dim.AUTO
                        if int(leaf.shape[d]) == 1:
                            leaf = torch.cat([leaf, leaf], dim=d)
                    one = one or None
                specs.append(one)
                new.append(leaf)
            shapes[pname] = pytree.tree_unflatten(specs, tree)
            values[pname] = pytree.tree_unflatten(new, tree)
        new_args = tuple(values[n] for n in list(bound.arguments)[:len(args)])
        new_kwargs = {k: values[k] for k in kwargs}
        return new_args, new_kwargs, shapes

    # --------------------------------------------------------------------------------------------- modes
    def _find_sites(self) -> list[ModeSite]:
        sites: list[ModeSite] = []
        self._fxprune_nodes = []
        for node in self.graph.nodes:
            if node.op != "call_function" or node.meta.get(_MODE_NODE):
                continue
            key = str(node.target)
            if key not in MODE_OPS:
                continue
            idx, kw, kind = MODE_OPS[key]
            traced = node.args[idx] if len(node.args) > idx else node.kwargs.get(kw, False)
            owner, counter = "", None
            stat = node.args[3] if kind == "norm" and len(node.args) > 3 else None
            if isinstance(stat, fx.Node) and stat.op == "get_attr" and "." in stat.target:
                owner = stat.target.rsplit(".", 1)[0]
                cnt = f"{owner}.num_batches_tracked"
                if key != "aten.instance_norm.default" and _has_buffer(self, cnt):
                    counter = cnt
            else:
                owner = _stack_owner(self, node)
            sites.append(ModeSite(key, traced, owner, counter))
            self._fxprune_nodes.append(node)
        return sites

    def _check_momentum(self, source: nn.Module | None) -> None:
        if source is None:
            return
        for s in self._fxprune_sites:
            if s.op.endswith("batch_norm.default") and s.owner:
                try:
                    m = source.get_submodule(s.owner)
                except AttributeError:
                    continue
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None:
                    log.warning("%s: BatchNorm with momentum=None (cumulative average) updates its running "
                                "statistics with momentum 0 in the pruned module's training mode (frozen)", s.owner)

    def norm_modules(self) -> list[nn.Module]:
        """The submodules whose ``training`` flag drives a BatchNorm/InstanceNorm node: ``m.eval()`` on them (after
        ``module.train()``) keeps those statistics frozen while the rest trains."""
        out: list[nn.Module] = []
        for s in self._fxprune_sites:
            if MODE_OPS[s.op][2] == "norm" and s.owner:
                m = self.get_submodule(s.owner)
                if all(m is not o for o in out):
                    out.append(m)
        return out

    def train(self, mode: bool = True) -> "PrunedModule":
        """Training (``True``) or eval mode for every submodule, and the graph's BatchNorm/dropout nodes."""
        super().train(mode)
        if getattr(self, "_fxprune_sites", None) is not None:
            self._sync_mode()
        return self

    def _owner_flags(self) -> tuple:
        flags = []
        for s in self._fxprune_sites:
            m = self
            if s.owner:
                try:
                    m = self.get_submodule(s.owner)
                except AttributeError:
                    m = self
            flags.append(bool(m.training))
        return tuple(flags)

    def _sync_mode(self) -> None:
        """Rewrite the mode-dependent nodes to the owners' current ``training`` flags (recompile if changed)."""
        if not self._fxprune_sites:
            return
        want = self._owner_flags()
        if want == self._fxprune_applied:
            return
        _apply_modes(self.graph, self._fxprune_sites, self._fxprune_nodes, want)
        if any(want) and not self._fxprune_warned:
            frozen = [n.name for n in self.graph.nodes if str(n.target) in _FROZEN_OPS]
            if frozen:
                log.warning("inference-only batch norm nodes keep their running statistics in training mode: %s",
                            ", ".join(frozen[:5]))
            self._fxprune_warned = True
        self.recompile()
        self._fxprune_applied = want

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fxprune_sites:
            self._sync_mode()
        return super().__call__(*args, **kwargs)

    # --------------------------------------------------------------------------------------------- copying
    def __deepcopy__(self, memo: dict[int, Any]) -> "PrunedModule":
        holder = nn.Module()
        memo[id(self)] = holder  # references back to the module itself (rare) land on the copy's state holder
        state = {k: v for k, v in self.__dict__.items()
                 if k in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")}
        holder.__dict__.update(copy.deepcopy(state, memo))
        holder.training = self.training
        res = PrunedModule(holder, copy.deepcopy(self.graph))
        memo[id(self)] = res
        _adopt_state(res, holder)
        res.meta = {}
        for k, v in getattr(self, "meta", {}).items():
            try:
                res.meta[k] = copy.deepcopy(v, memo)
            except Exception:  # noqa: BLE001 - FakeTensor metadata cannot be copied: shared instead
                res.meta[k] = v
        res.training = self.training
        res._adopt_sites(self._fxprune_sites, self._fxprune_applied)
        return res

    def _adopt_sites(self, sites: list[ModeSite], applied: tuple | None) -> None:
        """Find this graph's mode sites and take the traced flags and owners of ``sites`` (the same nodes in
        order, from the module this one was copied or pickled from); ``applied``: the modes its graph is in."""
        found = self._find_sites()
        if len(found) == len(sites):
            for s, old in zip(found, sites):
                s.traced, s.owner, s.counter = old.traced, old.owner, old.counter
            self._fxprune_applied = applied
        self._fxprune_sites = found
        self._sync_mode()

    # --------------------------------------------------------------------------------------------- pickling
    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (self._state(),)

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        return self.__reduce__()

    def _state(self) -> dict[str, Any]:
        """A picklable description: the graph as flat Python source in eval mode (re-traced on load), the
        module tree (parameters, buffers, constants, training flags), the input/output structure, mode sites."""
        from torch.fx.graph_module import _format_import_block
        from torch.package import sys_importer

        graph = copy.deepcopy(self.graph)
        nodes = [n for n in graph.nodes if n.op == "call_function" and not n.meta.get(_MODE_NODE)
                 and str(n.target) in MODE_OPS]
        _apply_modes(graph, self._fxprune_sites, nodes, (False,) * len(self._fxprune_sites))
        codegen = graph._codegen
        info = codegen.pytree_info if isinstance(codegen, _PyTreeCodeGen) else None
        graph._codegen = CodeGen()
        code = graph.python_code(root_module="self")
        holder = nn.Module()
        holder.__dict__.update({k: v for k, v in self.__dict__.items()
                                if k in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")})
        holder.training = self.training
        constants = {n.target: _get_attr(self, n.target) for n in graph.nodes if n.op == "get_attr"
                     and "." not in n.target and n.target not in self._parameters and n.target not in self._buffers
                     and n.target not in self._modules}
        meta = {}
        for k, v in getattr(self, "meta", {}).items():
            if not str(k).startswith("fxprune_"):
                continue
            try:
                pickle.dumps(v)
            except Exception:  # noqa: BLE001 - what cannot be pickled is left out
                continue
            meta[k] = v
        return {"format": 1, "code": code.src, "imports": _format_import_block(code.globals, sys_importer),
                "root": holder, "constants": constants,
                "pytree": None if info is None else (list(info.orig_args), info.in_spec, info.out_spec),
                "sites": list(self._fxprune_sites), "meta": meta, "training": self.training}


def _rebuild(state: dict[str, Any]) -> PrunedModule:
    """Unpickle a :class:`PrunedModule` (see :meth:`PrunedModule._state`)."""
    from torch.fx.graph_module import _forward_from_src

    if state.get("format") != 1:
        raise InputError(f"this pickled PrunedModule has format {state.get('format')!r}; this fxprune reads 1",
                         fix="pickle it again with this fxprune version (or save the state_dict)")
    forward = _forward_from_src(state["imports"] + state["code"], {})
    holder: nn.Module = state["root"]
    for k, v in state["constants"].items():
        setattr(holder, k, v)
    code_cls = type("_FxpruneCode", (nn.Module,), {"forward": forward})
    com = code_cls.__new__(code_cls)
    com.__dict__ = holder.__dict__
    graph = _Retracer().trace(com)
    if state["pytree"] is not None:
        orig_args, in_spec, out_spec = state["pytree"]
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(orig_args, in_spec, out_spec))
    mod = PrunedModule(holder, graph)
    _adopt_state(mod, holder)
    for k, v in state["constants"].items():
        setattr(mod, k, v)
    mod.meta = dict(state["meta"])
    mod.training = bool(state["training"])  # submodules keep their own pickled flags
    # the pickled graph is in eval mode; owners found from module stacks are not in the source: take the saved ones
    mod._adopt_sites(state["sites"], (False,) * len(state["sites"]))
    return mod


class _Retracer(fx.Tracer):
    """Re-traces generated code: every submodule is a leaf, buffers are graph attributes (never folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


# ================================================================================================ helpers
def _adopt_state(mod: nn.Module, src: nn.Module) -> None:
    """Give ``mod`` every submodule, parameter and buffer of ``src`` (shared; GraphModule's constructor keeps
    only what the graph reads, which would drop e.g. ``num_batches_tracked`` from the state_dict)."""
    for name, sub in src._modules.items():
        if name.startswith("_guards_fn") or name == _CHECK:
            continue
        mod._modules[name] = sub
    for name, p in src._parameters.items():
        mod._parameters[name] = p
    for name, b in src._buffers.items():
        mod._buffers[name] = b
    mod._non_persistent_buffers_set = set(getattr(src, "_non_persistent_buffers_set", set()))


def _has_buffer(mod: nn.Module, name: str) -> bool:
    try:
        mod.get_buffer(name)
        return True
    except AttributeError:
        return False


def _get_attr(mod: nn.Module, target: str) -> Any:
    obj: Any = mod
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def _stack_owner(mod: nn.Module, node: fx.Node) -> str:
    """The innermost submodule of ``mod`` on ``node``'s module stack (nearest existing ancestor; "" = root)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]
    if not paths:
        return ""
    path = _normalize_path(paths[-1])
    parts = path.split(".") if path else []
    while parts:
        try:
            mod.get_submodule(".".join(parts))
            return ".".join(parts)
        except AttributeError:
            parts.pop()
    return ""


def _normalize_path(path: str) -> str:
    """``L['self'].layer1[0].drop`` / ``layer1.0.drop`` -> ``layer1.0.drop``."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _apply_modes(graph: fx.Graph, sites: list[ModeSite], nodes: list[fx.Node], want: tuple) -> None:
    """Set each site's training flag (``True`` when its owner trains, else the traced value) and insert/remove
    the ``num_batches_tracked += 1`` nodes of BatchNorms in training mode."""
    for site, node, on in zip(sites, nodes, want):
        idx, kw, _ = MODE_OPS[site.op]
        value = True if on else site.traced
        if len(node.args) > idx:
            node.update_arg(idx, value)
        else:
            node.update_kwarg(kw, value)
        existing = _prev_mode_nodes(node)
        if on and site.counter and site.traced is False and not existing:
            with graph.inserting_before(node), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # get_attr on a graph without its module (a pickling copy)
                attr = graph.get_attr(site.counter)
                add = graph.call_function(torch.ops.aten.add_.Tensor, (attr, 1))
            attr.meta[_MODE_NODE] = add.meta[_MODE_NODE] = node.name
        elif not on:
            for n in existing:
                graph.erase_node(n)


def _prev_mode_nodes(node: fx.Node) -> list[fx.Node]:
    """The ``num_batches_tracked`` nodes inserted right before ``node`` (add_ first, then its get_attr)."""
    out: list[fx.Node] = []
    p = node.prev
    while p.op != "root" and p.meta.get(_MODE_NODE) == node.name:
        out.append(p)
        p = p.prev
    return out  # erase order: the add_ (a user of the get_attr) comes first
