"""Numerical verification: the shrunk program must compute what the masked program computes.

``verify(reference, candidate, args, kwargs)`` runs both on *fresh* random inputs shaped like the examples (never the
examples themselves; every module call gets its own copy, so a forward that modifies its inputs in place cannot
leak into the other module's run) and compares every output leaf.

The rule (docs/verification.md):

* **Precision.** Both graphs are interpreted node by node in float64 (``precision="auto"``): each parameter is cast
  when an op reads it and dropped after, floating inputs are cast, and the graph's floating dtype arguments
  (``x.float()``, ``.to(bfloat16)``, ``_assert_tensor_metadata``) are rewritten to float64. No copy of either module
  is made and the modules are never modified (Shrink's modules share tensors copy-on-write), so the module handed
  back keeps the user's dtype. On a device without float64 (MPS), or if an op has no float64 kernel, the check runs in
  float32 and says so in ``precision``.
* **Bound from the arithmetic.** In exact arithmetic shrunk == masked; they differ only by rounding at reductions
  whose length or blocking changed, propagated through the rest of the model. How much rounding-sized errors grow
  is measured on the model itself: the masked program is run once more with every parameter and floating input
  multiplied by ``1 + delta*U(-1, 1)`` (``delta`` far above the unit roundoff ``u``, far below non-linearity), which
  gives the amplification ``A = max|masked_perturbed - masked| / (delta * scale)`` per output. The bound is
  ``SAFETY * u * (A + 1) * scale`` (``scale`` = max |masked output|). ``SAFETY`` was chosen by measurement
  (benchmarks/verify_deep.py): float32 SmolLM2-135M at 512 tokens and 30-layer LLaMA-style models stay well inside
  the same rule evaluated with float32's ``u``.
* **Failures say what kind they are.** Non-finite values in either output fail. When the outputs differ by more
  than the bound, the three programs (masked, masked perturbed, shrunk) are re-run in lockstep and compared node by
  node, the masked activations sliced to the kept channels (node names are shared by both graphs). A node whose
  difference exceeds its own rounding estimate by :data:`STRUCTURAL` or more is a *structural mismatch* (the first
  such node in execution order is named with its module and parameters); otherwise the failure is *numerical noise
  above the bound* and is never reported as a rules bug.

When the dense (unpruned) module is given too, it also reports whether pruning changed the output at all: if the
masked output equals the dense output within the bound, the comparison could not see the pruned channels (zero-init
branches, tiny layer scales), and ``observable`` is False.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

#: unit roundoff of each floating dtype (half the distance from 1 to the next number)
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
                 torch.float16: 2.0 ** -11}
#: relative parameter perturbation that measures error growth, per check precision (>> u, << 1)
DELTA = {torch.float64: 2.0 ** -26, torch.float32: 2.0 ** -12}
#: bound = SAFETY * u * (A + 1) * scale; chosen by measurement (docs/verification.md): correct shrinks used at
#: most 12 of it (SmolLM2-135M, 512 tokens, float32), 8 in float64
SAFETY = 256.0
#: a node whose difference is >= STRUCTURAL[precision] x its rounding estimate u * (A_node + 1) * scale_node diverges
#: structurally. float64: 2^12 (rounding measured <= 12x, one wrong channel ~1e12x); float32 fallback: SAFETY (one
#: wrong channel is only ~1e3-1e4x there)
STRUCTURAL = {torch.float64: 2.0 ** 12}

_LOW_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_CHUNK = 1 << 22  # elements per chunk of the element-wise work on big tensors (perturbation, differences)


@dataclass
class Divergence:
    """Where masked and shrunk first differ by more than rounding explains."""

    node: str
    op: str
    module: str | None
    params: list[str]
    max_abs_diff: float
    estimate: float  # rounding estimate of this node: u * (A_node + 1) * scale
    scale: float

    @property
    def ratio(self) -> float:
        return self.max_abs_diff / self.estimate if self.estimate > 0 else math.inf

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op}" + (f" in {self.module}" if self.module else "") + ")"
        ps = f", parameters {', '.join(self.params)}" if self.params else ""
        return (f"{where}{ps}: max|shrunk - masked| = {self.max_abs_diff:.3g} at activation scale "
                f"{self.scale:.3g}, {_times(self.ratio)} its rounding estimate {self.estimate:.3g}")


@dataclass
class VerifyResult:
    ok: bool
    max_abs_diff: float
    output_scale: float
    rtol: float | None  # explicit relative bound; None: derived from the arithmetic
    shapes_equal: bool
    observable: bool | None = None  # None: not checked; False: masked == dense, so the check saw nothing
    message: str = ""
    bound: float = 0.0  # the accepted max|shrunk - masked| of the output leaf that came closest to it
    precision: str = "float64"
    amplification: float = 0.0  # A: measured growth of rounding-sized relative errors (max over outputs)
    kind: str = "ok"  # ok | noise | structural | nonfinite | shape
    divergence: Divergence | None = None
    bad_params: list[str] = field(default_factory=list)  # shrunk params differing from the masked kept slice

    @property
    def margin(self) -> float:
        """bound / max|shrunk - masked| of the closest output leaf: > 1 passes; inf when bit-identical."""
        if self.max_abs_diff == 0:
            return math.inf
        if not math.isfinite(self.max_abs_diff):
            return 0.0
        return self.bound / self.max_abs_diff

    def stats(self) -> dict[str, Any]:
        """JSON-friendly fields for pass stats (margin None when the outputs are bit-identical)."""
        m = self.margin
        return {"verified": self.ok, "max_abs_diff": self.max_abs_diff, "output_scale": self.output_scale,
                "observable": self.observable, "verify_bound": self.bound,
                "verify_margin": None if math.isinf(m) else m, "verify_precision": self.precision,
                "verify_amplification": self.amplification, "verify_kind": self.kind,
                **({"verify_divergence": str(self.divergence)} if self.divergence else {})}

    def explain(self) -> tuple[str, str]:
        """(message, fix) for a failed verification, by kind; never calls rounding noise a rules bug."""
        if self.kind == "shape":
            return (f"the shrunk module's outputs do not have the masked module's shapes{self.message}",
                    "this is a bug in fxprune's rules (a shape constant was not rewritten); report it, and meanwhile "
                    "exclude the affected layers with ignore=[...]")
        if self.kind == "nonfinite":
            return (f"non-finite output (NaN/Inf){self.message}",
                    "check the model's weights and the pass that produced them; NaN/Inf outputs never verify")
        if self.kind == "structural":
            return (f"structural mismatch: shrunk module differs from the masked module: {self}",
                    "this is a bug in fxprune's rules or in the pass that produced the weights; report it, and "
                    "meanwhile exclude the layers around the named node with ignore=[...]")
        return (f"numerical noise above the bound: {self}",
                "no node diverges structurally, so this is floating-point rounding, not a rules bug; accept a larger "
                f"difference explicitly with Shrink(rtol=...) (e.g. rtol={_suggest(self):.1e}), or verify=False")

    def __str__(self) -> str:
        state = "ok" if self.ok else "FAILED"
        obs = "" if self.observable is None else ("" if self.observable else " (unobservable: pruning did not change "
                                                                            "the output, so this check saw nothing)")
        how = f"rtol {self.rtol:g}" if self.rtol is not None else f"rounding bound, amplification {self.amplification:.3g}"
        m = self.margin
        mtxt = "bit-identical" if math.isinf(m) else f"margin {m:.3g}x"
        return (f"verification {state} ({self.precision}): max|shrunk - masked| = {self.max_abs_diff:.3g}, bound "
                f"{self.bound:.3g} ({mtxt}; output scale {self.output_scale:.3g}, {how}){obs}{self.message}")


def _times(r: float) -> str:
    return "inf x" if math.isinf(r) else f"{r:.3g}x"


def _suggest(res: VerifyResult) -> float:
    return min(0.5, 2 * res.max_abs_diff / max(res.output_scale, 1e-30))


def random_like(args: tuple, kwargs: dict, seed: int) -> tuple[tuple, dict]:
    """Fresh inputs with the examples' shapes and dtypes: normal floats, integers in [0, max(example)]."""
    g = torch.Generator().manual_seed(seed)

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_meta:
            return x
        if x.is_floating_point():
            return torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype).to(x.device)
        if x.dtype == torch.bool:
            return x.clone()
        hi = int(x.max().item()) + 1 if x.numel() else 1
        lo = int(x.min().item()) if x.numel() else 0
        if lo == hi - 1:
            return x.clone()  # constant integer input (e.g. an all-ones attention mask): keep it
        return torch.randint(max(lo, 0), max(hi, 1), x.shape, generator=g, dtype=x.dtype).to(x.device)

    return tree_map(one, args), tree_map(one, kwargs)


def _copy(tree: Any) -> Any:
    """A private copy of every tensor in ``tree`` (each module call gets its own, in-place forwards included)."""
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _leaves(out: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


def node_keep(groups: Any, leaf_keep: dict[int, np.ndarray]) -> dict[str, list[np.ndarray | None]]:
    """For every tensor node of the graph ``groups`` was built on: a keep mask per dim (None: nothing removed).
    The shrunk node of the same name equals the masked node indexed by these masks."""
    t = groups.analysis.table
    cache: dict[int, np.ndarray | None] = {}

    def keep(s: int) -> np.ndarray | None:
        r = t.find(s)
        if r not in cache:
            k = np.asarray(t.keep_positions(r, leaf_keep), dtype=bool)
            cache[r] = None if k.all() else k
        return cache[r]

    out = {}
    for name, sp in groups.analysis.node_spaces.items():
        if isinstance(sp, list) and (not sp or isinstance(sp[0], int)):
            out[name] = [keep(s) for s in sp]
    return out


# ------------------------------------------------------------------------------------------------------------------
# the interpreter: runs a GraphModule in a chosen precision, optionally perturbed, without touching its tensors


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The graph's placeholder values for forward(*args, **kwargs), as its generated forward computes them."""
    spec = getattr(gm, "_in_spec", None)
    sig = inspect.signature(gm.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    vals = [bound.arguments[n] for n in sig.parameters]
    if spec is not None and spec.num_children == 2:
        import torch.fx._pytree as fx_pytree

        npos = spec.child(0).num_children
        names = list(sig.parameters)
        return list(fx_pytree.tree_flatten_spec((vals[:npos], dict(zip(names[npos:], vals[npos:]))), spec))
    return vals


def _mutated(gm: fx.GraphModule) -> set[str]:
    """get_attr targets some op writes to in place (cloned before use in the native precision)."""
    out = set()
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        for u in n.users:
            schema = getattr(u.target, "_schema", None)
            if schema is None:
                continue
            for a, v in zip(schema.arguments, u.args):
                if v is n and a.alias_info is not None and a.alias_info.is_write:
                    out.add(n.target)
    return out


class _Run:
    """How one forward is evaluated: precision (None = the graph's own) and relative perturbation ``delta``."""

    def __init__(self, dtype: torch.dtype | None, delta: float = 0.0, seed: int = 0):
        self.dtype, self.delta, self.seed = dtype, delta, seed
        self._gen: torch.Generator | None = None
        self._patterns: dict[tuple, torch.Tensor] = {}

    def cast(self, x: Any, clone: bool = False) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x.clone() if clone and isinstance(x, torch.Tensor) else x
        y = x.detach()
        if self.dtype is not None and y.dtype != self.dtype:
            y = y.to(self.dtype)
        elif clone:
            y = y.clone()
        if self.delta:
            if y is x or y.data_ptr() == x.data_ptr():
                y = y.clone()
            if not y.is_contiguous():
                y = y.contiguous()
            pattern = self._pattern(y)
            flat = y.view(-1)
            for c in flat.split(_CHUNK):  # in place: peak = the cast tensor itself
                off = int(torch.randint(0, _CHUNK, (1,), generator=self._gen).item())
                c.mul_(pattern[off:off + c.numel()])
        return y

    def _pattern(self, y: torch.Tensor) -> torch.Tensor:
        """1 + delta * U(-1, 1), 2 * _CHUNK long, drawn once per (dtype, device); each chunk of a perturbed tensor
        uses it from a random offset (cheap: drawing fresh numbers for every weight doubled the check's time)."""
        key = (y.dtype, str(y.device))
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        if key not in self._patterns:
            r = torch.rand(2 * _CHUNK, generator=self._gen, dtype=torch.float64)
            self._patterns[key] = (1 + self.delta * (2 * r - 1)).to(device=y.device, dtype=y.dtype)
        return self._patterns[key]

    def retype(self, a: Any) -> Any:
        if self.dtype is None:
            return a
        if isinstance(a, torch.dtype):
            return self.dtype if a in _LOW_FLOATS else a
        if isinstance(a, (list, tuple)):
            return type(a)(self.retype(v) for v in a)
        if isinstance(a, dict):
            return {k: self.retype(v) for k, v in a.items()}
        return a


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def _interpret(gm: fx.GraphModule, flat: list[Any], run: _Run) -> Iterator[tuple[fx.Node, Any]]:
    """Yield (node, value) for every call node, then (output node, flat output leaves). Values are freed after
    their last use; parameters are cast/perturbed when read and never kept, so peak memory is one layer's worth."""
    nodes = list(gm.graph.nodes)
    last: dict[fx.Node, fx.Node] = {}
    for n in reversed(nodes):
        for a in n.all_input_nodes:
            last.setdefault(a, n)
    frees: dict[fx.Node, list[fx.Node]] = {}
    for a, n in last.items():
        frees.setdefault(n, []).append(a)
    mutated = _mutated(gm)
    env: dict[fx.Node, Any] = {}

    def look(a: fx.Node) -> Any:
        if a.op == "get_attr":
            v = _fetch(gm, a.target)
            return run.cast(v, clone=a.target in mutated) if isinstance(v, torch.Tensor) else v
        return env[a]

    it = iter(flat)
    default = torch.get_default_dtype()
    try:
        if run.dtype is not None:
            torch.set_default_dtype(run.dtype)  # factory ops without a dtype argument
        for n in nodes:
            if n.op == "placeholder":
                env[n] = run.cast(next(it, None))
                continue
            if n.op == "get_attr":
                continue
            args = run.retype(fx.node.map_arg(n.args, look))
            kwargs = run.retype(fx.node.map_arg(n.kwargs, look))
            if n.op == "output":
                yield n, _leaves(args[0] if len(args) == 1 else args)
                return
            if n.op == "call_function":
                v = n.target(*args, **kwargs)
            elif n.op == "call_module":
                v = gm.get_submodule(n.target)(*args, **kwargs)
            else:  # call_method
                v = getattr(args[0], n.target)(*args[1:], **kwargs)
            env[n] = v
            yield n, v
            for a in frees.get(n, ()):
                env.pop(a, None)
    finally:
        torch.set_default_dtype(default)


def _forward(module: Callable, args: tuple, kwargs: dict, run: _Run) -> list[torch.Tensor]:
    """Output leaves of one forward on private copies of the inputs."""
    args, kwargs = _copy(args), _copy(kwargs)
    if isinstance(module, fx.GraphModule):
        out = None
        for n, v in _interpret(module, _flat_inputs(module, args, kwargs), run):
            if n.op == "output":
                out = v
        return out
    if run.delta and isinstance(module, torch.nn.Module):
        params = {k: run.cast(v) for k, v in list(module.named_parameters()) + list(module.named_buffers())}
        return _leaves(torch.func.functional_call(module, params, tuple(run.cast(a) for a in args),
                                                  {k: run.cast(v) for k, v in kwargs.items()}))
    return _leaves(module(*args, **kwargs))


# ------------------------------------------------------------------------------------------------------------------
# comparisons


def _absmax(x: torch.Tensor) -> float:
    """max |x| over the finite entries."""
    if x.numel() == 0:
        return 0.0
    x = x.detach()
    if not x.is_floating_point():
        return float(x.abs().max())
    out = 0.0
    for c in x.reshape(-1).split(_CHUNK):
        m = float(c.abs().max())
        if not math.isfinite(m):
            m = float(torch.where(torch.isfinite(c), c, torch.zeros_like(c)).abs().max())
        out = max(out, m)
    return out


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| over finite pairs; inf where exactly one side (or both, unequally) is non-finite."""
    if a.numel() == 0:
        return 0.0
    if not (a.is_floating_point() or b.is_floating_point()):
        return 0.0 if torch.equal(a, b) else math.inf
    out = 0.0
    for x, y in zip(a.detach().reshape(-1).split(_CHUNK), b.detach().reshape(-1).split(_CHUNK)):
        if x.dtype != y.dtype:
            x, y = x.to(torch.float64), y.to(torch.float64)
        d = float((x - y).abs().max())
        if not math.isfinite(d):
            fx_, fy = torch.isfinite(x), torch.isfinite(y)
            both = fx_ & fy
            if not torch.equal(fx_, fy) or not torch.equal(x[~both], y[~both]):
                return math.inf  # NaN != NaN too: a NaN anywhere counts as a difference
            d = float((x[both] - y[both]).abs().max()) if both.any() else 0.0
        out = max(out, d)
    return out


def _slice(x: torch.Tensor, keep: list[np.ndarray | None] | None) -> torch.Tensor:
    if keep is None or x.dim() != len(keep):
        return x
    for d, k in enumerate(keep):
        if k is not None and len(k) == x.shape[d]:
            x = x.index_select(d, torch.from_numpy(np.nonzero(k)[0]).to(x.device))
    return x


def _estimate(u: float, delta: float, resp: float, scale: float) -> float:
    """The rounding estimate u * (A + 1) * scale of one tensor, A from its perturbation response."""
    return u * (resp / delta + scale)


def _structural(dtype: torch.dtype | None) -> float:
    return STRUCTURAL.get(dtype, SAFETY)


def _precision(modules: list[Callable], args: tuple, kwargs: dict, precision: Any) -> torch.dtype | None:
    if precision == "native":
        return None
    if isinstance(precision, torch.dtype):
        return precision
    if not all(isinstance(m, fx.GraphModule) for m in modules):
        return None
    devs = {t.device.type for m in modules for t in list(m.parameters()) + list(m.buffers())}
    devs |= {t.device.type for t in _leaves((args, kwargs))}
    return torch.float32 if "mps" in devs else torch.float64


@torch.no_grad()
def verify(reference: Callable, candidate: Callable, args: tuple, kwargs: dict, *, seed: int = 0,
           rtol: float | None = None, dense: Callable | None = None, trials: int = 2, precision: Any = "auto",
           keep: Any = None) -> VerifyResult:
    """Compare ``candidate`` (shrunk) against ``reference`` (masked) on ``trials`` fresh random inputs (seeded).

    ``rtol=None``: the bound is derived from the arithmetic (module docstring); a number: ``rtol * output scale``
    instead, still evaluated in the check precision. ``precision``: "auto" (float64 where the device has it),
    "native" (the graph's own dtypes) or a torch dtype. ``keep``: the :func:`node_keep` masks (or a callable
    returning them) used to compare activations node by node when the check fails.
    """
    _check_options(seed, rtol, trials)
    mods = [reference, candidate] + ([dense] if dense is not None else [])
    dtype = _precision(mods, args, kwargs, precision)
    note, err = "", None
    # float64, else float32 (an op without a float64 kernel, out of memory), else the graph's own dtypes
    chain = [dtype] if dtype is None or precision != "auto" else \
        [d for d in (dtype, torch.float32, None) if d is None or d.itemsize <= dtype.itemsize]
    for d in chain:
        try:
            return _verify(reference, candidate, args, kwargs, seed, rtol, dense, trials, d, keep, note)
        except Exception as e:
            if d is None or d is chain[-1]:
                raise
            err = err or e
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            note = f" ({str(dtype).replace('torch.', '')} check failed: {type(err).__name__}: {why})"
    raise AssertionError("unreachable")


def _check_options(seed: Any, rtol: Any, trials: Any) -> None:
    import numbers

    from .errors import InputError

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"verification seed must be an int >= 0, got {seed!r}", fix="pass e.g. seed=0")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, numbers.Real)
                             or not math.isfinite(rtol) or not 0 < rtol < 1):
        raise InputError(f"rtol must be None (bound from the arithmetic) or a number in (0, 1), got {rtol!r}",
                         fix="leave rtol=None, or pass e.g. Shrink(rtol=1e-3)")
    if isinstance(trials, bool) or not isinstance(trials, numbers.Integral) or trials < 1:
        raise InputError(f"trials must be an int >= 1, got {trials!r}", fix="pass e.g. trials=2")


def _verify(reference: Callable, candidate: Callable, args: tuple, kwargs: dict, seed: int, rtol: float | None,
            dense: Callable | None, trials: int, dtype: torch.dtype | None, keep: Any, note: str) -> VerifyResult:
    name = str(dtype).replace("torch.", "") if dtype is not None else "native"
    worst_ratio, res_diff, res_bound, res_scale, amp = -1.0, 0.0, 0.0, 0.0, 0.0
    shapes_equal, observable, nonfinite = True, None, ""
    amps: list[float] | None = None
    for k in range(max(trials, 1)):
        a, kw = random_like(args, kwargs, seed + k)
        ref = _forward(reference, a, kw, _Run(dtype))  # at most two output sets are alive at any time
        u = UNIT_ROUNDOFF.get(dtype or _dtype_of(ref), 2.0 ** -24)
        delta = DELTA.get(dtype or torch.float32, 2.0 ** -12)
        if amps is None:  # error growth, measured once on the masked program
            pert = _forward(reference, a, kw, _Run(dtype, delta=delta, seed=seed + 7919))
            amps = []
            for r, p in zip(ref, pert):
                s = _absmax(r) if r.is_floating_point() else 0.0
                amps.append(_diff(r, p) / (delta * s) if s > 0 and r.shape == p.shape else 0.0)
            amps = [x if math.isfinite(x) else 0.0 for x in amps]
            amp = max(amps, default=0.0)
            del pert
        cand = _forward(candidate, a, kw, _Run(dtype))
        if len(ref) != len(cand):
            return VerifyResult(False, math.inf, 0.0, rtol, False, kind="shape", precision=name,
                                message=f": {len(cand)} outputs instead of {len(ref)}{note}")
        for i, (r, c) in enumerate(zip(ref, cand)):
            if r.shape != c.shape:
                shapes_equal = False
                continue
            if r.is_floating_point() and not bool(torch.isfinite(r).all()):
                nonfinite = nonfinite or f": the masked (reference) module's output {i} contains NaN/Inf"
            if c.is_floating_point() and not bool(torch.isfinite(c).all()):
                nonfinite = nonfinite or f": the shrunk module's output {i} contains NaN/Inf"
            d = _diff(r, c)
            s = _absmax(r) if r.is_floating_point() else 0.0
            b = rtol * s if rtol is not None else SAFETY * u * (amps[i] + 1) * s
            ratio = d / b if b > 0 else (0.0 if d == 0 else math.inf)
            if ratio > worst_ratio:
                worst_ratio, res_diff, res_bound, res_scale = ratio, d, b, s
        del cand
        if dense is not None and k == 0:
            dd = _forward(dense, a, kw, _Run(dtype))
            same = True
            for i, (x, r) in enumerate(zip(dd, ref)):
                if x.is_floating_point() and x.shape == r.shape:
                    s = _absmax(r)
                    tol = max(SAFETY * u * (amps[i] + 1) * s, (rtol or 0.0) * s)
                    same = same and _diff(x, r) <= tol
            observable = not same
            del dd
        del ref
    kind = "ok"
    if not shapes_equal:
        kind = "shape"
    elif nonfinite:
        kind = "nonfinite"
    elif res_diff > res_bound:
        kind = "noise"
    res = VerifyResult(kind == "ok", res_diff, res_scale, rtol, shapes_equal, observable,
                       message=nonfinite + note if kind == "nonfinite" else note, bound=res_bound, precision=name,
                       amplification=amp, kind=kind)
    if kind in ("noise", "nonfinite") and isinstance(reference, fx.GraphModule) \
            and isinstance(candidate, fx.GraphModule):
        a, kw = random_like(args, kwargs, seed)
        km = keep() if callable(keep) else keep
        div, ratios, bad = diagnose(reference, candidate, a, kw, keep=km, dtype=dtype, seed=seed + 7919)
        res.bad_params = bad
        if div is not None and (div.ratio >= _structural(dtype) or kind == "nonfinite"):
            res.divergence = div
            if kind == "noise":
                res.kind = "structural"
            extra = f"; first diverges at {div}"
            if bad:
                extra += f"; shrunk parameters that differ from the masked ones' kept slices: {', '.join(bad[:5])}"
            res.message = extra + res.message
        elif bad:
            res.kind = "structural" if kind == "noise" else kind
            res.message = (f"; shrunk parameters that differ from the masked ones' kept slices: {', '.join(bad[:5])}"
                           + res.message)
        elif ratios:
            top = max(ratios, key=lambda t: t[1])
            res.message = (f"; no node exceeds its rounding estimate by {_structural(dtype):g}x (largest: "
                           f"{_times(top[1])} at "
                           f"node {top[0]!r})" + res.message)
    return res


def _dtype_of(leaves: list[torch.Tensor]) -> torch.dtype:
    for x in leaves:
        if x.is_floating_point():
            return x.dtype
    return torch.float32


def _module_of(n: fx.Node) -> str | None:
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else path
    return path if path and not path.startswith("_empty") else None


def _op_name(n: fx.Node) -> str:
    t = n.target
    return str(t) if not callable(t) else getattr(t, "__name__", str(t)) if not isinstance(
        t, torch._ops.OpOverload) else str(t)


@torch.no_grad()
def diagnose(reference: fx.GraphModule, candidate: fx.GraphModule, args: tuple, kwargs: dict, *,
             keep: dict[str, list[np.ndarray | None]] | None = None, dtype: torch.dtype | None = torch.float64,
             seed: int = 0) -> tuple[Divergence | None, list[tuple[str, float]], list[str]]:
    """Run masked, masked-perturbed and shrunk in lockstep and compare every node the two graphs share (masked
    activations sliced with ``keep``). Returns (first node whose difference is >= STRUCTURAL x its rounding estimate,
    or the first non-finite one; else None), [(node, diff/bound)] for every compared node, and the shrunk
    parameters whose values differ from the masked parameter's kept slice."""
    keep = keep or {}
    u = UNIT_ROUNDOFF.get(dtype or torch.float32, 2.0 ** -24)
    delta = DELTA.get(dtype or torch.float32, 2.0 ** -12)
    bad = []
    for n in candidate.graph.nodes:
        if n.op != "get_attr":
            continue
        try:
            s, m = _fetch(candidate, n.target), _fetch(reference, n.target)
        except AttributeError:
            continue
        if isinstance(s, torch.Tensor) and isinstance(m, torch.Tensor) and not s.is_meta:
            ms = _slice(m, keep.get(n.name))
            if ms.shape == s.shape and _diff(ms, s) != 0:
                bad.append(n.target)
    gm = _interpret(reference, _flat_inputs(reference, *_copy((args, kwargs))), _Run(dtype))
    gp = _interpret(reference, _flat_inputs(reference, *_copy((args, kwargs))), _Run(dtype, delta, seed))
    gs = _interpret(candidate, _flat_inputs(candidate, *_copy((args, kwargs))), _Run(dtype))
    pending: dict[str, tuple[Any, Any]] = {}
    ratios: list[tuple[str, float]] = []
    first: Divergence | None = None
    nonfinite: Divergence | None = None
    for sn, sv in gs:
        if sn.name not in pending:
            for (mn, mv), (_, pv) in zip(gm, gp):
                pending[mn.name] = (mv, pv)
                if mn.name == sn.name:
                    break
        mv, pv = pending.pop(sn.name, (None, None))
        if sn.op == "output":
            mv, pv, sv = (mv or []), (pv or []), sv
            pairs = list(zip(mv, pv, sv))
        else:
            pairs = [(mv, pv, sv)]
        for m, p, s in pairs:
            if not (isinstance(m, torch.Tensor) and isinstance(s, torch.Tensor)):
                continue
            kp = keep.get(sn.name) if sn.op != "output" else None
            m, p = _slice(m, kp), _slice(p, kp) if isinstance(p, torch.Tensor) else p
            if m.shape != s.shape:
                continue
            d = _diff(m, s)
            if d == 0:
                ratios.append((sn.name, 0.0))
                continue
            sc = _absmax(m) if m.is_floating_point() else 0.0
            resp = _diff(m, p) if isinstance(p, torch.Tensor) and p.shape == m.shape else 0.0
            b = _estimate(u, delta, resp if math.isfinite(resp) else 0.0, sc)
            r = d / b if b > 0 else math.inf
            ratios.append((sn.name, r))
            if first is None and r >= _structural(dtype):
                first = Divergence(sn.name, _op_name(sn), _module_of(sn),
                                   [a.target for a in sn.all_input_nodes if a.op == "get_attr"], d, b, sc)
            if nonfinite is None and not math.isfinite(d):
                nonfinite = first if first is not None and first.node == sn.name else Divergence(
                    sn.name, _op_name(sn), _module_of(sn),
                    [a.target for a in sn.all_input_nodes if a.op == "get_attr"], d, b, sc)
        if first is not None:
            break
    for g in (gm, gp, gs):
        g.close()
    return first or nonfinite, ratios, bad
