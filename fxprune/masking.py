"""From group keep-masks to parameter slices: zeroing (the masked program) and slicing (the shrunk program).

Masked program: every parameter slice indexed by a removed channel is set to exactly zero, producers (conv/linear
rows, biases, BN scale *and* shift) and consumers (input columns) alike. Removed activations are then exactly zero
after each producer and can never leak into a kept channel through a parametrised op, which is what makes the
masked program the numerical reference for the shrunk one. BN running variances are left alone (zeroing them would
only risk 0/0) since the zeroed scale already silences the channel.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import PassError
from .groups import GroupSet


def param_keep(groups: GroupSet, leaf_keep: dict[int, np.ndarray]) -> dict[str, list[np.ndarray | None]]:
    """For each canonical parameter: a keep mask per dim (None where nothing is removed)."""
    t = groups.analysis.table
    out: dict[str, list[np.ndarray | None]] = {}
    for name, spaces in groups.analysis.param_spaces.items():
        dims: list[np.ndarray | None] = []
        for s in spaces:
            keep = t.keep_positions(s, leaf_keep)
            dims.append(None if keep.all() else keep)
        out[name] = dims
    return out


def _owner(gm: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    mod = gm
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


ParamKeep = dict[str, list[np.ndarray | None]]


@torch.no_grad()
def apply_channel_masks(gm: fx.GraphModule, groups: GroupSet, leaf_keep: dict[int, np.ndarray], *,
                        keep: ParamKeep | None = None) -> int:
    """Zero every parameter slice of removed channels in ``gm`` (in place). Returns the number of zeroed slices.
    ``keep``: the :func:`param_keep` of (groups, leaf_keep) when the caller has it already."""
    n = 0
    roles = groups.analysis.param_roles
    keep = param_keep(groups, leaf_keep) if keep is None else keep
    for name, dims in keep.items():
        if "no_zero" in roles.get(name, set()):
            continue
        mod, attr = _owner(gm, name)
        t = getattr(mod, attr)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.is_meta:
            continue
        for d, k in enumerate(dims):
            if k is None:
                continue
            idx = torch.from_numpy(np.nonzero(~k)[0]).to(t.device)
            t.index_fill_(d, idx, 0.0)
            n += int(idx.numel())
    return n


@torch.no_grad()
def apply_weight_masks(gm: fx.GraphModule, weight_masks: dict[str, torch.Tensor]) -> None:
    """Multiply fine-grained masks into their parameters (in place)."""
    for name, mask in weight_masks.items():
        mod, attr = _owner(gm, name)
        t = getattr(mod, attr)
        t.mul_(mask.to(t.dtype))


def _private(t: torch.Tensor) -> torch.Tensor:
    c = t.detach().clone()
    return nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c


@torch.no_grad()
def masked_copy(gm: fx.GraphModule, groups: GroupSet, leaf_keep: dict[int, np.ndarray],
                weight_masks: dict[str, torch.Tensor], *, keep: ParamKeep | None = None) -> fx.GraphModule:
    """A copy of ``gm`` with the removed channels zeroed and the fine-grained masks applied; ``gm`` is not modified.

    Copy-on-write: only tensors that masking changes are copied; the others are shared with ``gm``.
    """
    keep = param_keep(groups, leaf_keep) if keep is None else keep
    names = [n for n, dims in keep.items() if any(k is not None and not k.all() for k in dims)] + list(weight_masks)
    memo: dict[int, Any] = {}
    for name in names:
        mod, attr = _owner(gm, name)
        t = getattr(mod, attr)
        if isinstance(t, torch.Tensor) and id(t) not in memo:
            memo[id(t)] = _private(t)
    for t in list(gm.parameters()) + list(gm.buffers()):
        memo.setdefault(id(t), t)
    out = copy.deepcopy(gm, memo)
    apply_channel_masks(out, groups, leaf_keep, keep=keep)
    apply_weight_masks(out, weight_masks)
    return out


@torch.no_grad()
def shrunk_copy(gm: fx.GraphModule, groups: GroupSet, leaf_keep: dict[int, np.ndarray],
                private: Iterable[str] = (), *, keep: ParamKeep | None = None) -> fx.GraphModule:
    """A copy of ``gm`` whose parameters/buffers have the removed channels physically sliced out.

    Only the module structure is copied: sliced tensors are new, untouched tensors are *shared* with ``gm`` (``gm``
    is not modified), so peak memory stays near one model. Tensors named in ``private`` are copied even when
    untouched (the caller will modify them in place, e.g. to apply fine-grained masks).
    """
    keep = param_keep(groups, leaf_keep) if keep is None else keep
    memo: dict[int, Any] = {}
    seen: set[int] = set()
    for name in private:
        mod, attr = _owner(gm, name)
        t = getattr(mod, attr)
        if isinstance(t, torch.Tensor) and all(k is None for k in keep.get(name, [None])):
            memo[id(t)] = _private(t)
            seen.add(id(t))
    for name, dims in keep.items():
        mod, attr = _owner(gm, name)
        t = getattr(mod, attr)
        if not isinstance(t, torch.Tensor) or id(t) in seen:
            continue
        seen.add(id(t))
        if all(k is None for k in dims):
            memo[id(t)] = t
            continue
        new = t.detach()
        for d, k in enumerate(dims):
            if k is not None:
                idx = torch.from_numpy(np.nonzero(k)[0]).to(t.device)
                new = new.index_select(d, idx) if not new.is_meta else new.new_empty(
                    tuple(len(idx) if i == d else n for i, n in enumerate(new.shape)))
        new = new.contiguous()
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    for t in list(gm.parameters()) + list(gm.buffers()):
        memo.setdefault(id(t), t)  # parameters outside any group (none expected) are shared, not copied
    return copy.deepcopy(gm, memo)


class RewriteContext:
    """What a shape-constant rewrite sees (``fxprune.rules.REWRITES``)."""

    def __init__(self, groups: GroupSet, leaf_keep: dict[int, np.ndarray], old_shapes: dict[str, Any]):
        self._a = groups.analysis
        self._keep = leaf_keep
        self._old_shapes = old_shapes
        self._cache: dict[int, np.ndarray] = {}

    def keep(self, space: int) -> np.ndarray:
        r = self._a.table.find(space)
        k = self._cache.get(r)
        if k is None:
            k = self._a.table.keep_positions(r, self._keep)
            self._cache[r] = k
        return k

    def new(self, space: int) -> int:
        return int(self.keep(space).sum())

    def old_size(self, space: int) -> int:
        return self._a.table.size(self._a.table.find(space))

    def spaces(self, node: fx.Node) -> Any:
        return self._a.node_spaces[node.name]

    def aux(self, node: fx.Node) -> dict[str, Any]:
        return self._a.aux.get(node.name, {})

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return self._old_shapes[node.name]


def rewrite_shape_constants(gm: fx.GraphModule, groups: GroupSet, leaf_keep: dict[int, np.ndarray]) -> list[str]:
    """Apply each op's rewrite (view sizes, split sizes, groups, SDPA scale, ...). Returns rewritten node names."""
    from .analyzer import size_hint
    from .rules import REWRITES

    old_shapes = {}
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            old_shapes[n.name] = tuple(size_hint(s) for s in v.shape)
    R = RewriteContext(groups, leaf_keep, old_shapes)
    changed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        fn = REWRITES.get(node.target)
        if fn is None and isinstance(node.target, torch._ops.OpOverload):
            fn = REWRITES.get(node.target.overloadpacket)
        if fn is None:
            continue
        before = (node.target, node.args, dict(node.kwargs))
        try:
            fn(R, node)
        except Exception as e:
            raise PassError(f"could not rewrite shape constants: {type(e).__name__}: {e}", pass_name="shrink",
                            node=node.name) from e
        if (node.target, node.args, dict(node.kwargs)) != before:
            changed.append(node.name)
    gm.recompile()
    return changed


def expected_shapes(groups: GroupSet, leaf_keep: dict[int, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shape every tensor node must have after shrinking."""
    t = groups.analysis.table
    cache: dict[int, int] = {}

    def new(s: int) -> int:
        r = t.find(s)
        if r not in cache:
            cache[r] = int(t.keep_positions(r, leaf_keep).sum())
        return cache[r]

    out = {}
    for name, sp in groups.analysis.node_spaces.items():
        if isinstance(sp, list) and (not sp or isinstance(sp[0], int)):
            out[name] = tuple(new(s) for s in sp)
    return out


class masked_in_place:
    """Context manager: ``gm`` becomes the masked program *in place* (removed channel slices zeroed, fine-grained
    masks applied) and is restored exactly on exit, even when the body raises.

    Only the values masking overwrites are saved (the removed slices and the masked-out weights), so verifying a
    shrunk module against the masked one costs a fraction of the model instead of a second full copy. The caller
    must own ``gm`` for the duration (no other thread may read it).
    """

    def __init__(self, gm: fx.GraphModule, groups: GroupSet, leaf_keep: dict[int, np.ndarray],
                 weight_masks: dict[str, torch.Tensor], *, keep: ParamKeep | None = None):
        self.gm, self.groups, self.leaf_keep, self.weight_masks = gm, groups, leaf_keep, weight_masks
        self.keep = param_keep(groups, leaf_keep) if keep is None else keep
        self._saved: list[tuple[torch.Tensor, str, Any, torch.Tensor]] = []

    @torch.no_grad()
    def __enter__(self) -> fx.GraphModule:
        roles = self.groups.analysis.param_roles
        try:
            for name, dims in self.keep.items():
                if "no_zero" in roles.get(name, set()):
                    continue
                mod, attr = _owner(self.gm, name)
                t = getattr(mod, attr)
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.is_meta:
                    continue
                for d, k in enumerate(dims):
                    if k is None:
                        continue
                    idx = torch.from_numpy(np.nonzero(~k)[0]).to(t.device)
                    self._saved.append((t, "dim", (d, idx), t.index_select(d, idx)))
                    t.index_fill_(d, idx, 0.0)
            for name, mask in self.weight_masks.items():
                mod, attr = _owner(self.gm, name)
                t = getattr(mod, attr)
                off = ~mask.to(torch.bool).to(t.device)
                self._saved.append((t, "mask", off, t[off].clone()))
                t[off] = 0
        except BaseException:
            self._restore()
            raise
        return self.gm

    @torch.no_grad()
    def _restore(self) -> None:
        for t, kind, where, values in reversed(self._saved):
            if kind == "dim":
                d, idx = where
                t.index_copy_(d, idx, values)
            else:
                t[where] = values
        self._saved.clear()

    def __exit__(self, *exc: Any) -> None:
        self._restore()


@torch.no_grad()
def masked_view(gm: fx.GraphModule, groups: GroupSet, leaf_keep: dict[int, np.ndarray],
                weight_masks: dict[str, torch.Tensor], *, keep: ParamKeep | None = None) -> fx.GraphModule:
    """A module computing exactly what :func:`masked_copy` computes, without copying any weight.

    It shares every parameter and buffer with ``gm``; its graph multiplies each masked parameter by 0/1 keep
    vectors (one per pruned dim, shaped to broadcast) and by its fine-grained mask where it is read (``w * 1 == w``
    and ``w * 0 == 0`` exactly for finite weights, so the values equal the zeroed copy's). Extra memory: the
    masks, plus one masked weight at a time while it runs. For verification of a shrunk module against the masked
    program on models too large to copy.
    """
    keep = param_keep(groups, leaf_keep) if keep is None else keep
    roles = groups.analysis.param_roles
    alias = groups.analysis.param_alias
    graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph)  # shares gm's submodules, parameters and buffers
    out.meta = dict(gm.meta)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    n_masks = 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        canon = alias.get(node.target, node.target)
        t = getattr(_owner(gm, node.target)[0], node.target.rsplit(".", 1)[-1], None)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        factors: list[torch.Tensor] = []
        dims = keep.get(canon, [])
        if "no_zero" not in roles.get(canon, set()):
            for d, k in enumerate(dims):
                if k is None or k.all():
                    continue
                shape = [1] * t.dim()
                shape[d] = len(k)
                factors.append(torch.from_numpy(k.astype(np.float32)).to(t.dtype).reshape(shape))
        wm = weight_masks.get(node.target, weight_masks.get(canon))
        if wm is not None:
            factors.append(wm if wm.dtype == torch.bool else wm.to(t.dtype))  # bool: 1 byte per weight
        if not factors or not node.users:
            continue
        users = list(node.users)
        # multiply right before the first reader, so each masked weight lives only while it is used (the exported
        # graph reads every parameter at its top, which would materialise all masked weights at once)
        first = min(users, key=order.__getitem__)
        cur: fx.Node = node
        for f in factors:
            name = f"_fxprune_mask_{n_masks}"
            n_masks += 1
            out.register_buffer(name, f, persistent=False)
            with graph.inserting_before(first):
                mnode = graph.get_attr(name)
                cur = graph.call_function(torch.ops.aten.mul.Tensor, (cur, mnode))
        for u in users:
            u.replace_input_with(node, cur)
    graph.lint()
    out.recompile()
    return out


def norm_sites(groups: GroupSet, leaf_keep: dict[int, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The normalisations whose normalised dims lose channels under ``leaf_keep``, by node name: ``mode``
    (``"exact"``: shrunk == masked, the statistic's original divisor is pinned; ``"renormalize"``: statistics over
    the kept width, approximate), ``kind`` (``layer_norm``, ``rms_norm``, or ``mean`` for a decomposed RMSNorm
    statistic), ``weight`` (its scale parameter when known), ``eps``, ``before``/``after`` (normalised width),
    ``module`` (the module that ran it).
    Modes come from the analysis (``ChannelPrune(norms=...)``, :func:`fxprune.rules.norm.norm_rules`)."""
    t = groups.analysis.table
    out: dict[str, dict[str, Any]] = {}
    for name, aux in groups.analysis.aux.items():
        info = aux.get("norm") if isinstance(aux, dict) else None
        if info is None:
            continue
        after = 1
        for s in info["dims"]:
            after *= int(t.keep_positions(s, leaf_keep).sum())
        if after == info["size"]:
            continue
        out[name] = {"mode": info["mode"], "kind": info["kind"], "weight": info.get("weight"),
                     "eps": info.get("eps"), "before": int(info["size"]), "after": after,
                     "module": info.get("module")}
    return out
