"""Channel spaces: the dimension algebra of the dependency analyzer.

Every dimension of every tensor in the graph is labelled with a *space* (an integer id). Two dimensions with the
same space must be indexed the same way: removing channel ``i`` of the space removes position ``i`` of both.

A space is either a **leaf** (an atomic set of channels that can be pruned on its own) or is *defined* as

* ``Concat(a, b, ...)``: positions are the positions of ``a`` followed by those of ``b`` (``torch.cat``, ``split``);
* ``Product(a, b, ...)``: position ``i*|b| + j`` is the pair (``a[i]``, ``b[j]``), row-major (``view``/``reshape``
  merging or factoring dims, e.g. channels -> heads x head_dim, grouped convolutions).

A position of a Product is removed when any of its coordinates is removed, so pruning head ``h`` removes the rows of
every head-dim channel of ``h`` and pruning head-dim ``d`` removes ``d`` in every head.

``unify(a, b)`` declares that two spaces index the same positions. Leaves are merged with a union-find; defined
spaces are reconciled structurally, *refining* leaves into concats or products when needed (a leaf unified with
``Concat(x, y)`` becomes that concat). When no consistent refinement exists (e.g. a reshape whose factors do not
line up) both spaces are *frozen*: their channels are never pruned, and the reason is recorded.

The final leaf classes are the prunable channel spaces; :mod:`fxprune.groups` turns them into groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

LEAF, CONCAT, PRODUCT = "leaf", "concat", "product"


@dataclass
class _Def:
    kind: str
    parts: tuple[int, ...] = ()


class SpaceConflict(Exception):
    """Two spaces cannot be unified consistently (internal: the analyzer freezes them instead)."""


class SpaceTable:
    """Union-find over spaces with concat/product refinement, frozen flags and reasons."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._def: list[_Def] = []
        self._frozen: dict[int, str] = {}  # root -> first reason
        self.origin: list[str] = []  # where each space was created (for reports)

    # ------------------------------------------------------------------ creation
    def new(self, size: int, origin: str = "", frozen: str | None = None) -> int:
        """A fresh leaf space of ``size`` channels. ``frozen`` (a reason) marks it unprunable."""
        sid = len(self._parent)
        self._parent.append(sid)
        self._size.append(int(size))
        self._def.append(_Def(LEAF))
        self.origin.append(origin)
        if frozen is not None or size <= 1:
            self._frozen[sid] = frozen or "size-1 dimension"
        return sid

    def concat(self, parts: Iterable[int], origin: str = "") -> int:
        parts = [p for p in parts if self.size(p) > 0]
        if len(parts) == 1:
            return parts[0]
        sid = self.new(sum(self.size(p) for p in parts), origin)
        self._frozen.pop(sid, None)
        self._def[sid] = _Def(CONCAT, tuple(parts))
        return sid

    def product(self, parts: Iterable[int], origin: str = "") -> int:
        parts = [p for p in parts if self.size(p) != 1]
        if len(parts) == 1:
            return parts[0]
        size = int(np.prod([self.size(p) for p in parts])) if parts else 1
        sid = self.new(size, origin)
        if size == 1:
            return sid
        self._frozen.pop(sid, None)
        self._def[sid] = _Def(PRODUCT, tuple(parts))
        return sid

    # ------------------------------------------------------------------ queries
    def find(self, s: int) -> int:
        parent = self._parent
        root = s
        while parent[root] != root:
            root = parent[root]
        while parent[s] != root:
            parent[s], s = root, parent[s]
        return root

    def size(self, s: int) -> int:
        return self._size[s]

    def definition(self, s: int) -> tuple[str, tuple[int, ...]]:
        d = self._def[self.find(s)]
        return d.kind, d.parts

    def __len__(self) -> int:
        return len(self._parent)

    # ------------------------------------------------------------------ freezing
    def freeze(self, s: int, reason: str) -> None:
        r = self.find(s)
        self._frozen.setdefault(r, reason)

    def frozen_leaves(self) -> dict[int, str]:
        """Leaf root -> reason, propagating frozen flags from defined spaces down to their leaves."""
        out: dict[int, str] = {}
        stack = [(r, why) for r, why in self._frozen.items() if self.find(r) == r]
        seen: set[int] = set()
        while stack:
            s, why = stack.pop()
            r = self.find(s)
            if r in seen:
                continue
            seen.add(r)
            kind, parts = self.definition(r)
            if kind == LEAF:
                out.setdefault(r, why)
            else:
                stack.extend((p, why) for p in parts)
        return out

    def leaves(self, s: int) -> list[int]:
        """The leaf roots a space is built from (with repetition removed, order kept)."""
        out: list[int] = []
        seen: set[int] = set()
        stack = [s]
        while stack:
            r = self.find(stack.pop())
            kind, parts = self.definition(r)
            if kind == LEAF:
                if r not in seen:
                    seen.add(r)
                    out.append(r)
            else:
                stack.extend(reversed(parts))
        return out

    # ------------------------------------------------------------------ unification
    def unify(self, a: int, b: int) -> None:
        """Declare that spaces ``a`` and ``b`` index the same positions. Raises SpaceConflict if impossible."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            raise SpaceConflict(f"size {self._size[ra]} vs {self._size[rb]}")
        da, db = self._def[ra], self._def[rb]
        if da.kind == LEAF:
            self._link(ra, rb)  # rb keeps its definition
            return
        if db.kind == LEAF:
            self._link(rb, ra)
            return
        # both defined: reconcile structure first, then link
        if da.kind == CONCAT and db.kind == CONCAT:
            self._unify_concats(da.parts, db.parts)
        elif da.kind == PRODUCT and db.kind == PRODUCT:
            self._unify_products(da.parts, db.parts)
        elif da.kind == PRODUCT:
            self._unify_product_concat(da.parts, db.parts)
        else:
            self._unify_product_concat(db.parts, da.parts)
        ra, rb = self.find(ra), self.find(rb)
        if ra != rb:
            self._link(ra, rb)

    def _link(self, child: int, root: int) -> None:
        self._parent[child] = root
        why = self._frozen.pop(child, None)
        if why is not None:
            self._frozen.setdefault(root, why)

    def _refine(self, s: int, kind: str, parts: tuple[int, ...]) -> None:
        """Turn leaf ``s`` into a defined space (used when a leaf meets structure)."""
        r = self.find(s)
        assert self._def[r].kind == LEAF
        self._def[r] = _Def(kind, parts)

    def _pieces(self, parts: Iterable[int]) -> list[int]:
        """Flatten nested concats into a list of non-concat pieces."""
        out: list[int] = []
        for p in parts:
            kind, sub = self.definition(p)
            if kind == PRODUCT and self.definition(sub[0])[0] == CONCAT:
                # Product(Concat(a, b), inner) == Concat(Product(a, inner), Product(b, inner))
                inner = sub[1:]
                inner_space = self.product(inner) if len(inner) > 1 else inner[0]
                dist = tuple(self.product((o, inner_space)) for o in self.definition(sub[0])[1])
                self._def[self.find(p)] = _Def(CONCAT, dist)
                kind, sub = CONCAT, dist
            if kind == CONCAT:
                out.extend(self._pieces(sub))
            else:
                out.append(self.find(p))
        return out

    def _split(self, s: int, offset: int) -> tuple[int, int]:
        """Split a non-concat space at ``offset`` into two spaces (refining it into a concat)."""
        r = self.find(s)
        size = self._size[r]
        kind, parts = self._def[r].kind, self._def[r].parts
        if kind == LEAF:
            left, right = self.new(offset, self.origin[r]), self.new(size - offset, self.origin[r])
            for x in (left, right):
                self._frozen.pop(x, None)
            self._refine(r, CONCAT, (left, right))
            return left, right
        if kind == PRODUCT:
            outer, inner = parts[0], parts[1:]
            inner_size = size // self._size[self.find(outer)]
            if offset % inner_size:
                raise SpaceConflict("split inside a product factor")
            inner_space = self.product(inner) if len(inner) > 1 else inner[0]
            k = offset // inner_size
            o_kind, _ = self.definition(outer)
            if o_kind == CONCAT:
                raise SpaceConflict("nested concat in product")  # pragma: no cover - normalised before
            lo, hi = self._split(outer, k)
            left, right = self.product((lo, inner_space)), self.product((hi, inner_space))
            # r is now Concat(Product(lo, inner), Product(hi, inner))
            self._def[r] = _Def(CONCAT, (left, right))
            return left, right
        raise SpaceConflict("cannot split")  # pragma: no cover

    def _unify_concats(self, pa: tuple[int, ...], pb: tuple[int, ...]) -> None:
        a, b = self._pieces(pa), self._pieces(pb)
        i = j = 0
        while i < len(a) and j < len(b):
            sa, sb = self._size[self.find(a[i])], self._size[self.find(b[j])]
            if sa == sb:
                self.unify(a[i], b[j])
                i += 1
                j += 1
            elif sa > sb:
                left, right = self._split(a[i], sb)
                self.unify(left, b[j])
                a[i] = right
                j += 1
            else:
                left, right = self._split(b[j], sa)
                self.unify(a[i], left)
                b[j] = right
                i += 1

    def _unify_products(self, pa: tuple[int, ...], pb: tuple[int, ...]) -> None:
        a, b = list(pa), list(pb)
        i = j = 0
        while i < len(a) and j < len(b):
            sa, sb = self._size[self.find(a[i])], self._size[self.find(b[j])]
            if sa == sb:
                self.unify(a[i], b[j])
                i += 1
                j += 1
                continue
            # the bigger factor must be the product of a run of the other side's factors
            big, small, bi, si = (a, b, i, j) if sa > sb else (b, a, j, i)
            target, acc, k = self._size[self.find(big[bi])], 1, si
            while k < len(small) and acc < target:
                acc *= self._size[self.find(small[k])]
                k += 1
            if acc != target:
                raise SpaceConflict("incompatible factorisations")
            self.unify(big[bi], self.product(small[si:k]))
            if sa > sb:
                i, j = i + 1, k
            else:
                j, i = j + 1, k

    def _unify_product_concat(self, prod: tuple[int, ...], cat: tuple[int, ...]) -> None:
        """Product(outer, *inner) against Concat: split the outer factor at the concat's boundaries."""
        outer, inner = prod[0], prod[1:]
        inner_size = int(np.prod([self._size[self.find(p)] for p in inner]))
        pieces = self._pieces(cat)
        sizes = [self._size[self.find(p)] for p in pieces]
        if any(s % inner_size for s in sizes):
            raise SpaceConflict("concat boundaries do not align with product rows")
        inner_space = self.product(inner) if len(inner) > 1 else inner[0]
        o_kind, _ = self.definition(outer)
        if o_kind == LEAF:
            subs = [self.new(s // inner_size, self.origin[self.find(outer)]) for s in sizes]
            for x in subs:
                self._frozen.pop(x, None)
            if len(subs) > 1:
                self._refine(outer, CONCAT, tuple(subs))
            else:
                subs = [outer]
        elif o_kind == CONCAT:
            tmp = self.concat([self.new(s // inner_size) for s in sizes])
            for x in self._pieces((tmp,)):
                self._frozen.pop(x, None)
            self.unify(outer, tmp)
            subs = self._pieces((tmp,))
        else:
            raise SpaceConflict("product of products against concat")
        for sub, piece in zip(subs, pieces):
            self.unify(piece, self.product((sub, inner_space)))

    # ------------------------------------------------------------------ numeric views
    def coords(self, s: int) -> list[tuple[int, np.ndarray]]:
        """For each leaf ``L`` in ``s``: (L, idx) where ``idx[p]`` is the channel of ``L`` at position ``p`` or -1."""
        size = self._size[self.find(s)]
        acc: dict[int, np.ndarray] = {}

        # iterative expansion: each item is (space, positions array into the full dim, index within space)
        stack: list[tuple[int, np.ndarray, np.ndarray]] = [(s, np.arange(size), np.arange(size))]
        while stack:
            space, pos, idx = stack.pop()
            r = self.find(space)
            kind, parts = self._def[r].kind, self._def[r].parts
            if kind == LEAF:
                arr = acc.get(r)
                if arr is None:
                    arr = np.full(size, -1, dtype=np.int64)
                    acc[r] = arr
                arr[pos] = idx
            elif kind == CONCAT:
                off = 0
                for p in parts:
                    n = self._size[self.find(p)]
                    sel = (idx >= off) & (idx < off + n)
                    stack.append((p, pos[sel], idx[sel] - off))
                    off += n
            else:
                sizes = [self._size[self.find(p)] for p in parts]
                rem = idx.copy()
                strides = np.cumprod([1] + sizes[::-1][:-1])[::-1]
                for p, st, n in zip(parts, strides, sizes):
                    stack.append((p, pos, (rem // st) % n))
        return list(acc.items())

    def keep_positions(self, s: int, leaf_keep: dict[int, np.ndarray]) -> np.ndarray:
        """Boolean keep mask over the positions of ``s`` given keep masks for (some) leaves; others keep all."""
        size = self._size[self.find(s)]
        keep = np.ones(size, dtype=bool)
        for leaf, idx in self.coords(s):
            mask = leaf_keep.get(leaf)
            if mask is None:
                continue
            sel = idx >= 0
            keep[sel] &= mask[idx[sel]]
        return keep
