"""Unit tests of the dimension algebra (fxprune.spaces.SpaceTable): union-find, concat/product refinement,
reconciling two structures, coordinates, keep masks, freezing and conflicts."""
import numpy as np
import pytest

from fxprune.spaces import CONCAT, LEAF, PRODUCT, SpaceConflict, SpaceTable


def _sizes(t, spaces):
    return [t.size(t.find(s)) for s in spaces]


# ------------------------------------------------------------------------------------------------ leaves, union-find
def test_new_leaf_and_size_one_is_frozen():
    t = SpaceTable()
    a, one = t.new(4, "a"), t.new(1, "one")
    assert t.definition(a) == (LEAF, ())
    assert t.size(a) == 4 and t.origin[a] == "a"
    assert t.frozen_leaves() == {one: "size-1 dimension"}


def test_new_with_reason_is_frozen():
    t = SpaceTable()
    a = t.new(4, "a", frozen="graph input")
    assert t.frozen_leaves() == {a: "graph input"}


def test_unify_leaves_is_transitive():
    t = SpaceTable()
    a, b, c, d = (t.new(3) for _ in range(4))
    t.unify(a, b)
    t.unify(c, b)
    assert t.find(a) == t.find(b) == t.find(c)
    assert t.find(d) != t.find(a)
    assert t.leaves(a) == t.leaves(c) == [t.find(a)]


def test_unify_size_mismatch_raises():
    t = SpaceTable()
    a, b = t.new(3), t.new(4)
    with pytest.raises(SpaceConflict, match="size 3 vs 4"):
        t.unify(a, b)
    assert t.find(a) != t.find(b)


def test_freeze_survives_union_from_either_side():
    t = SpaceTable()
    a, b = t.new(3), t.new(3)
    t.freeze(a, "a frozen")
    t.unify(a, b)  # a becomes the child: its reason moves to the root
    assert t.frozen_leaves() == {t.find(b): "a frozen"}
    c = t.new(3)
    t.unify(c, b)  # an unfrozen leaf joining a frozen class is frozen too
    assert t.frozen_leaves() == {t.find(c): "a frozen"}


def test_one_reason_per_class():
    t = SpaceTable()
    a, b = t.new(3), t.new(3)
    t.freeze(a, "first")
    t.freeze(b, "second")
    t.unify(a, b)
    assert list(t.frozen_leaves()) == [t.find(a)]
    assert t.frozen_leaves()[t.find(a)] in ("first", "second")


# ------------------------------------------------------------------------------------------------ concat and product
def test_concat_definition_and_size():
    t = SpaceTable()
    a, b = t.new(3), t.new(5)
    c = t.concat([a, b], "cat")
    assert t.size(c) == 8
    assert t.definition(c) == (CONCAT, (a, b))
    assert t.leaves(c) == [a, b]
    assert c not in t.frozen_leaves()


def test_concat_drops_empty_parts_and_collapses_single_part():
    t = SpaceTable()
    a, empty = t.new(3), t.new(0)
    assert t.concat([empty, a]) == a


def test_product_definition_drops_size_one_factors():
    t = SpaceTable()
    h, one, d = t.new(2), t.new(1), t.new(3)
    p = t.product([h, one, d])
    assert t.size(p) == 6
    assert t.definition(p) == (PRODUCT, (h, d))
    assert t.product([one, d]) == d


def test_leaf_unified_with_concat_is_refined():
    t = SpaceTable()
    x = t.new(8)
    a, b = t.new(3), t.new(5)
    t.unify(x, t.concat([a, b]))
    kind, parts = t.definition(x)
    assert kind == CONCAT
    assert [t.find(p) for p in parts] == [t.find(a), t.find(b)]
    assert t.leaves(x) == [t.find(a), t.find(b)]


def test_two_concats_with_different_boundaries_use_the_common_refinement():
    t = SpaceTable()
    a, b = t.new(3, "a"), t.new(5, "b")
    c, d = t.new(4, "c"), t.new(4, "d")
    ab, cd = t.concat([a, b]), t.concat([c, d])
    t.unify(ab, cd)
    assert t.find(ab) == t.find(cd)
    leaves = t.leaves(ab)
    assert _sizes(t, leaves) == [3, 1, 4]
    assert t.leaves(cd) == leaves
    # a is the first 3 of c, d is the last 4 of b
    assert t.find(a) == leaves[0] and t.find(d) == leaves[2]
    assert t.leaves(c) == leaves[:2] and t.leaves(b) == leaves[1:]


def test_two_products_reconcile_by_factor_runs():
    t = SpaceTable()
    a, b = t.new(2), t.new(6)
    c, d, e = t.new(2), t.new(2), t.new(3)
    t.unify(t.product([a, b]), t.product([c, d, e]))
    assert t.find(a) == t.find(c)
    kind, parts = t.definition(b)
    assert kind == PRODUCT and [t.find(p) for p in parts] == [t.find(d), t.find(e)]


def test_incompatible_factorisations_conflict():
    t = SpaceTable()
    p = t.product([t.new(2), t.new(3)])
    q = t.product([t.new(3), t.new(2)])
    with pytest.raises(SpaceConflict, match="incompatible factorisations"):
        t.unify(p, q)


def test_product_against_concat_splits_the_outer_factor():
    """(heads=5) x (head_dim=2) against Concat(4, 6): heads split 2 + 3, head_dim shared by both pieces."""
    t = SpaceTable()
    h, d = t.new(5, "h"), t.new(2, "d")
    x, y = t.new(4, "x"), t.new(6, "y")
    t.unify(t.product([h, d]), t.concat([x, y]))
    kind, parts = t.definition(h)
    assert kind == CONCAT and _sizes(t, parts) == [2, 3]
    for piece, outer in ((x, parts[0]), (y, parts[1])):
        k, factors = t.definition(piece)
        assert k == PRODUCT
        assert [t.find(f) for f in factors] == [t.find(outer), t.find(d)]


def test_product_against_misaligned_concat_conflicts():
    t = SpaceTable()
    p = t.product([t.new(2), t.new(4)])
    with pytest.raises(SpaceConflict, match="do not align"):
        t.unify(p, t.concat([t.new(3), t.new(5)]))


def test_product_of_concat_distributes_when_reconciled_with_a_concat():
    """Product(Concat(a, b), d) == Concat(Product(a, d), Product(b, d)), so it lines up with Concat(x, y)."""
    t = SpaceTable()
    a, b, d = t.new(2), t.new(3), t.new(2)
    x, y = t.new(4), t.new(6)
    t.unify(t.product([t.concat([a, b]), d]), t.concat([x, y]))
    for piece, outer in ((x, a), (y, b)):
        k, factors = t.definition(piece)
        assert k == PRODUCT and [t.find(f) for f in factors] == [t.find(outer), t.find(d)]


# ------------------------------------------------------------------------------------------------ numeric views
def test_coords_of_a_product_are_row_major():
    t = SpaceTable()
    h, d = t.new(2), t.new(3)
    coords = dict(t.coords(t.product([h, d])))
    np.testing.assert_array_equal(coords[h], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(coords[d], [0, 1, 2, 0, 1, 2])


def test_coords_of_a_concat_mark_other_pieces_minus_one():
    t = SpaceTable()
    a, b = t.new(2), t.new(3)
    coords = dict(t.coords(t.concat([a, b])))
    np.testing.assert_array_equal(coords[a], [0, 1, -1, -1, -1])
    np.testing.assert_array_equal(coords[b], [-1, -1, 0, 1, 2])


def test_keep_positions_of_product_removes_whole_heads_or_one_dim_in_every_head():
    t = SpaceTable()
    h, d = t.new(2), t.new(3)
    p = t.product([h, d])
    np.testing.assert_array_equal(t.keep_positions(p, {h: np.array([True, False])}),
                                  [True, True, True, False, False, False])
    np.testing.assert_array_equal(t.keep_positions(p, {d: np.array([False, True, True])}),
                                  [False, True, True, False, True, True])


def test_keep_positions_of_concat_and_unlisted_leaves_keep_all():
    t = SpaceTable()
    a, b = t.new(2), t.new(3)
    c = t.concat([a, b])
    np.testing.assert_array_equal(t.keep_positions(c, {b: np.array([True, False, True])}),
                                  [True, True, True, False, True])
    assert t.keep_positions(c, {}).all()


def test_keep_positions_follow_unification():
    """A mask on the leaf of one side of a unify applies to the other side (same positions, same index)."""
    t = SpaceTable()
    a, b = t.new(3), t.new(3)
    t.unify(a, b)
    keep = np.array([True, False, True])
    np.testing.assert_array_equal(t.keep_positions(b, {t.find(a): keep}), keep)


# ------------------------------------------------------------------------------------------------ freezing structure
def test_freezing_a_defined_space_freezes_its_leaves():
    t = SpaceTable()
    a, b, h, d = t.new(3), t.new(5), t.new(2), t.new(4)
    t.freeze(t.concat([a, b]), "cat frozen")
    t.freeze(t.product([h, d]), "prod frozen")
    assert t.frozen_leaves() == {a: "cat frozen", b: "cat frozen", h: "prod frozen", d: "prod frozen"}


def test_freezing_one_factor_leaves_the_others_prunable():
    t = SpaceTable()
    h, d = t.new(2), t.new(4)
    p = t.product([h, d])
    t.freeze(d, "head_dim observed")
    assert t.frozen_leaves() == {d: "head_dim observed"}
    assert t.leaves(p) == [h, d]
