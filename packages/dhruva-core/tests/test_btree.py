from __future__ import annotations

import json
import pickle
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from dhruva.btree import (
    BNode,
    BNode4,
    BNode8,
    BNode16,
    BNode32,
    BNode64,
    BNode128,
    BNode256,
    BNode512,
    BTree,
    EmptyBTreeError,
)
from dhruva.connection import Connection
from dhruva.error import DhruvaError
from dhruva.record import pack_record
from dhruva.storage import MemoryStorage
from hypothesis import given, settings
from hypothesis import strategies as st

NODE_CLASSES = [
    BNode,
    BNode4,
    BNode8,
    BNode16,
    BNode32,
    BNode64,
    BNode128,
    BNode256,
    BNode512,
]


# ---- helpers ------------------------------------------------------------


def all_nodes(tree: BTree) -> list[BNode]:
    found = [tree.root]
    for node in found:
        found.extend(node.nodes or [])
    return found


def mark_saved(tree: BTree) -> None:
    """Pretend the tree was just committed: every object SAVED."""
    tree._p_set_status_saved()
    for node in all_nodes(tree):
        node._p_set_status_saved()


def strip_counts(tree: BTree) -> None:
    """Make every node look as Durus 4.3 stored it: no ``_count``."""
    for node in all_nodes(tree):
        node.__setstate__({"items": node.items, "nodes": node.nodes})


def check_tree(tree: BTree, expected: dict[Any, Any], counts: bool = True) -> None:
    """Check contents, order, len and the B-tree invariants.

    :param counts: when True every node must hold a correct count; when False
        a count may be absent, but one that is present must be correct.
    """
    root = tree.root
    degree = type(root).minimum_degree
    leaf_depths: set[int] = set()

    def walk(node: BNode, depth: int, low: Any, high: Any) -> int:
        assert type(node) is type(root)
        items = node.items
        keys = [item[0] for item in items]
        assert all(type(item) is tuple and len(item) == 2 for item in items)
        assert keys == sorted(set(keys)), "keys in a node must be strictly sorted"
        assert all(
            (low is None or low < key) and (high is None or key < high) for key in keys
        ), "a key lies outside the range its parent gives it"
        assert len(items) <= 2 * degree - 1, "node overfull"
        if node is not root:
            assert len(items) >= degree - 1, "node underfull"
        if node.nodes is None:
            leaf_depths.add(depth)
            total = len(items)
        else:
            assert items, "an inner node must hold at least one item"
            assert len(node.nodes) == len(items) + 1
            bounds = [low, *keys, high]
            total = len(items)
            for i, child in enumerate(node.nodes):
                total += walk(child, depth + 1, bounds[i], bounds[i + 1])
        try:
            stored = object.__getattribute__(node, "_count")
        except AttributeError:
            assert not counts, "node lacks its count"
        else:
            assert stored == total, f"count {stored} != {total} items below"
        return total

    assert walk(root, 0, None, None) == len(expected)
    assert len(leaf_depths) == 1, f"leaves at depths {sorted(leaf_depths)}"
    assert len(tree) == len(expected)
    assert bool(tree) == bool(expected)
    assert list(tree.items()) == sorted(expected.items())
    assert list(reversed(tree)) == sorted(expected, reverse=True)


class KeyBag:
    """The keys present, with O(1) random choice and removal."""

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.where: dict[int, int] = {}

    def add(self, key: int) -> None:
        if key not in self.where:
            self.where[key] = len(self.keys)
            self.keys.append(key)

    def remove(self, key: int) -> None:
        position = self.where.pop(key)
        last = self.keys.pop()
        if position < len(self.keys):
            self.keys[position] = last
            self.where[last] = position


# ---- fuzzing against a dict, for every node class -------------------------


@pytest.mark.parametrize("node_class", NODE_CLASSES, ids=lambda c: c.__name__)
def test_random_inserts_and_deletes_match_a_dict(node_class: type[BNode]) -> None:
    degree = node_class.minimum_degree
    peak = min(max(600, 100 * degree), 3000)
    batch = max(50, peak // 12)
    rng = random.Random(2026 + degree)
    tree = BTree(node_class)
    expected: dict[int, float] = {}
    bag = KeyBag()
    deepest = 0

    # Two cycles of growing to the peak and shrinking to (almost) empty, so
    # that splits, borrows, merges and root collapses happen at every level.
    for cycle in range(2):
        for growing in (True, False):
            steps = 0
            while (len(expected) < peak) if growing else (len(expected) > cycle):
                action = rng.random()
                insert = action < 0.7 if growing else action < 0.3
                if insert or not bag.keys:
                    key = rng.randrange(3 * peak)
                    tree[key] = expected[key] = rng.random()
                    bag.add(key)
                elif action < 0.8:
                    key = rng.choice(bag.keys)
                    del tree[key]
                    del expected[key]
                    bag.remove(key)
                else:
                    key = rng.randrange(3 * peak)
                    if key in expected:
                        assert tree.pop(key) == expected.pop(key)
                        bag.remove(key)
                    else:
                        with pytest.raises(KeyError):
                            del tree[key]
                steps += 1
                if steps % batch == 0:
                    check_tree(tree, expected)
                    deepest = max(deepest, tree.get_depth())
            check_tree(tree, expected)

    assert deepest >= (3 if degree <= 16 else 2)


@settings(max_examples=150, deadline=None)
@given(
    node_class=st.sampled_from([BNode, BNode4]),
    operations=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=0, max_value=80)),
        max_size=300,
    ),
)
def test_any_sequence_of_changes_keeps_the_tree_valid(
    node_class: type[BNode], operations: list[tuple[bool, int]]
) -> None:
    tree = BTree(node_class)
    expected: dict[int, int] = {}
    for insert, key in operations:
        if insert:
            tree[key] = expected[key] = key * 10
        elif key in expected:
            del tree[key]
            del expected[key]
        else:
            with pytest.raises(KeyError):
                del tree[key]
    check_tree(tree, expected)


# ---- ordered queries ---------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    keys=st.sets(st.integers(min_value=0, max_value=200), max_size=120),
    start=st.integers(min_value=-5, max_value=205),
    end=st.integers(min_value=-5, max_value=205),
    closed_start=st.booleans(),
    closed_end=st.booleans(),
)
def test_range_queries_match_a_sorted_list(
    keys: set[int], start: int, end: int, closed_start: bool, closed_end: bool
) -> None:
    tree = BTree(BNode)
    tree.update((key, -key) for key in keys)
    ordered = [(key, -key) for key in sorted(keys)]

    assert list(tree.items_from(start)) == [i for i in ordered if i[0] >= start]
    assert list(tree.items_from(start, closed=False)) == [
        i for i in ordered if i[0] > start
    ]
    backward = ordered[::-1]
    assert list(tree.items_backward_from(start)) == [
        i for i in backward if i[0] < start
    ]
    assert list(tree.items_backward_from(start, closed=True)) == [
        i for i in backward if i[0] <= start
    ]

    got = list(tree.items_range(start, end, closed_start, closed_end))
    if start <= end:
        want = [
            i
            for i in ordered
            if (i[0] >= start if closed_start else i[0] > start)
            and (i[0] <= end if closed_end else i[0] < end)
        ]
    else:
        want = [
            i
            for i in backward
            if (i[0] <= start if closed_start else i[0] < start)
            and (i[0] >= end if closed_end else i[0] > end)
        ]
    assert got == want


def test_iteration_in_both_directions() -> None:
    tree = BTree(BNode4)
    for key in random.Random(5).sample(range(1000), 1000):
        tree[key] = str(key)
    assert list(tree) == list(range(1000))
    assert list(tree.iterkeys()) == list(range(1000))
    assert list(tree.itervalues()) == [str(k) for k in range(1000)]
    assert list(tree.iteritems()) == [(k, str(k)) for k in range(1000)]
    assert list(reversed(tree)) == list(range(999, -1, -1))
    assert list(tree.items_backward()) == [(k, str(k)) for k in range(999, -1, -1)]
    assert list(reversed(tree.items())) == list(tree.items_backward())
    assert list(reversed(tree.values()))[:2] == ["999", "998"]
    assert list(reversed(tree.keys()))[:2] == [999, 998]


def test_views_are_live_and_sized() -> None:
    tree = BTree()
    keys = tree.keys()
    items = tree.items()
    values = tree.values()
    tree.update({"b": 2, "a": 1})
    assert len(keys) == 2 and "a" in keys and "z" not in keys
    assert ("b", 2) in items and ("b", 3) not in items
    assert list(values) == [1, 2]
    assert list(items) == [("a", 1), ("b", 2)]


def test_min_and_max_items() -> None:
    tree = BTree(BNode)
    tree.update((k, k * k) for k in range(50, 0, -1))
    assert tree.get_min_item() == (1, 1)
    assert tree.get_max_item() == (50, 2500)


@pytest.mark.parametrize("method", ["get_min_item", "get_max_item"])
def test_min_and_max_of_an_empty_tree_raise_what_durus_raised(method: str) -> None:
    tree = BTree()
    with pytest.raises(AssertionError, match="empty BTree"):
        getattr(tree, method)()
    with pytest.raises(DhruvaError):
        getattr(tree, method)()
    with pytest.raises(EmptyBTreeError) as raised:
        getattr(tree, method)()
    copy = pickle.loads(pickle.dumps(raised.value))
    assert type(copy) is EmptyBTreeError and str(copy) == str(raised.value)


# ---- the mapping API ---------------------------------------------------


def test_mapping_api() -> None:
    tree = BTree()
    assert not tree and len(tree) == 0
    tree["x"] = 1
    tree.add("y")
    assert tree["y"] is True
    assert tree.get("x") == 1 and tree.get("nope") is None and tree.get("n", 5) == 5
    assert "x" in tree and tree.has_key("x") and not tree.has_key("z")
    with pytest.raises(KeyError):
        tree["z"]
    assert tree.setdefault("z", 3) == 3 and tree.setdefault("z", 4) == 3
    tree.update([("a", 0)], b=9)
    assert tree.pop("b") == 9 and tree.pop("b", None) is None
    assert tree.popitem() == ("a", 0)
    assert dict(tree) == {"x": 1, "y": True, "z": 3}
    assert tree == {"x": 1, "y": True, "z": 3}
    tree["x"] = 2
    assert tree["x"] == 2 and len(tree) == 3
    tree.clear()
    assert len(tree) == 0 and list(tree) == [] and type(tree.root) is BNode64
    with pytest.raises(TypeError, match="at most 1"):
        tree.update({}, {})


def test_update_from_another_btree_and_a_keys_only_mapping() -> None:
    source = BTree(BNode4)
    source.update((k, k) for k in range(100))

    class KeysOnly:
        def keys(self) -> list[int]:
            return [1000]

        def __getitem__(self, key: int) -> str:
            return str(key)

    tree = BTree()
    tree.update(source)
    tree.update(KeysOnly())
    assert len(tree) == 101 and tree[1000] == "1000" and tree[99] == 99


def test_node_class_must_be_a_bnode() -> None:
    with pytest.raises(TypeError, match="BNode subclass"):
        BTree(dict)  # type: ignore[arg-type]


def test_attributes_are_fixed_like_durus() -> None:
    tree = BTree()
    with pytest.raises(AttributeError):
        tree.bogus = 1
    with pytest.raises(AttributeError):
        tree.root.bogus = 1


def test_depth_node_count_and_node_class_change() -> None:
    tree = BTree(BNode)
    assert tree.get_depth() == 1 and tree.get_node_count() == 1
    tree.update((k, k) for k in range(200))
    assert tree.get_depth() > 3
    small_nodes = tree.get_node_count()
    assert tree.set_bnode_class(BNode64) is True
    assert tree.set_bnode_class(BNode64) is False
    assert type(tree.root) is BNode64 and tree.get_depth() == 2
    assert tree.get_node_count() < small_nodes
    check_tree(tree, {k: k for k in range(200)})
    assert tree.set_bnode_minimum_degree(4) is True
    assert type(tree.root) is BNode4
    assert tree.set_bnode_minimum_degree(3) is False
    check_tree(tree, {k: k for k in range(200)})


def test_class_names_match_durus() -> None:
    for node_class in NODE_CLASSES:
        assert node_class.__module__ == "dhruva.btree"
        degree = node_class.minimum_degree
        assert node_class.__name__ == ("BNode" if degree == 2 else f"BNode{degree}")


# ---- change tracking ---------------------------------------------------


def test_reading_marks_nothing_changed() -> None:
    tree = BTree(BNode4)
    tree.update((k, k) for k in range(500))
    mark_saved(tree)
    assert tree[250] == 250 and 3 in tree and tree.get(-1) is None
    assert len(tree) == 500 and list(tree)[:2] == [0, 1]
    assert list(tree.items_range(10, 20))[0] == (10, 10)
    list(tree.items_backward_from(400))
    tree.get_min_item(), tree.get_max_item(), tree.get_depth(), tree.get_node_count()
    assert not any(node._p_is_unsaved() for node in all_nodes(tree))
    assert not tree._p_is_unsaved()


def test_changes_mark_the_nodes_on_their_path() -> None:
    tree = BTree(BNode4)
    tree.update((k, k) for k in range(0, 1000, 2))
    mark_saved(tree)

    tree[501] = "new"
    changed = [node for node in all_nodes(tree) if node._p_is_unsaved()]
    assert tree.root in changed
    assert any(node.nodes is None and (501, "new") in node.items for node in changed)

    mark_saved(tree)
    tree[500] = "replaced"
    changed = [node for node in all_nodes(tree) if node._p_is_unsaved()]
    assert len(changed) == 1 and (500, "replaced") in changed[0].items

    mark_saved(tree)
    del tree[500]
    assert tree.root._p_is_unsaved()

    mark_saved(tree)
    tree.note_change_of_bnode_containing_key(2)
    changed = [node for node in all_nodes(tree) if node._p_is_unsaved()]
    assert len(changed) == 1 and (2, 2) in changed[0].items
    with pytest.raises(KeyError):
        tree.note_change_of_bnode_containing_key(3)


# ---- stored state and Durus 4.3 nodes ------------------------------------


def test_state_is_the_durus_layout() -> None:
    tree = BTree(BNode4)
    tree.update((k, str(k)) for k in range(20))
    assert tree.__getstate__() == {"root": tree.root}
    state = tree.root.__getstate__()
    assert set(state) == {"items", "nodes", "_count"}
    assert state["_count"] == 20
    assert tree.root.nodes is not None
    leaf = tree.root.nodes[0]
    assert leaf.__getstate__() == {
        "items": leaf.items,
        "nodes": None,
        "_count": len(leaf.items),
    }


def test_pickle_round_trip_copies_the_tree() -> None:
    tree = BTree(BNode)
    tree.update((k, [k]) for k in range(300))
    copy = pickle.loads(pickle.dumps(tree))
    assert type(copy) is BTree and type(copy.root) is BNode
    assert list(copy.items()) == list(tree.items()) and len(copy) == 300
    check_tree(copy, dict(tree.items()))


def test_nodes_without_counts_answer_len_without_being_changed() -> None:
    tree = BTree(BNode4)
    tree.update((k, k) for k in range(3000))
    strip_counts(tree)
    mark_saved(tree)

    assert len(tree) == 3000
    assert tree.root.get_count() == 3000
    assert not any(node._p_is_unsaved() for node in all_nodes(tree))
    check_tree(tree, {k: k for k in range(3000)})


@pytest.mark.parametrize("compute_first", [False, True])
def test_changing_a_tree_without_counts_keeps_answers_right(
    compute_first: bool,
) -> None:
    rng = random.Random(43)
    tree = BTree(BNode)
    expected = {k: k for k in rng.sample(range(5000), 800)}
    tree.update(expected)
    strip_counts(tree)
    mark_saved(tree)
    if compute_first:
        assert len(tree) == 800

    for step in range(3000):
        key = rng.randrange(5000)
        if rng.random() < 0.5:
            tree[key] = expected[key] = step
        elif key in expected:
            del tree[key]
            del expected[key]
        if step % 300 == 0:
            check_tree(tree, expected, counts=False)
    check_tree(tree, expected, counts=False)
    check_tree(tree, expected, counts=True)  # len() above filled every count in


def test_inserting_into_a_tree_without_counts_marks_the_whole_path() -> None:
    # Other connections may have computed counts for these nodes; writing the
    # whole path makes them reload instead of trusting a stale count.
    tree = BTree(BNode)
    tree.update((k, k) for k in range(0, 400, 2))
    strip_counts(tree)
    mark_saved(tree)
    tree[201] = "x"
    node = tree.root
    while node.nodes is not None:
        assert node._p_is_unsaved()
        node = _child_towards(node, 201)
    assert node._p_is_unsaved() and (201, "x") in node.items


def _child_towards(node: BNode, key: int) -> BNode:
    keys = [item[0] for item in node.items]
    position = sum(1 for k in keys if k < key)
    assert node.nodes is not None
    return node.nodes[position]


# ---- through a Connection ----------------------------------------------

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"
FIXTURES = SHARED / "fixtures" / "durus-4"


def test_a_big_tree_survives_commit_and_reopen() -> None:
    storage = MemoryStorage()
    connection = Connection(storage)
    tree = BTree()
    expected = {key: f"value {key}" for key in range(10_000)}
    tree.update(expected)
    connection.get_root()["tree"] = tree
    connection.commit()

    fresh = Connection(storage)
    loaded = fresh.get_root()["tree"]
    assert type(loaded) is BTree and type(loaded.root) is BNode64
    assert len(loaded) == 10_000
    assert loaded[1234] == "value 1234" and 10_000 not in loaded
    assert loaded.get_min_item() == (0, "value 0")
    assert loaded.get_max_item() == (9999, "value 9999")
    assert list(loaded.items_range(10, 13)) == [(k, f"value {k}") for k in (10, 11, 12)]
    check_tree(loaded, expected)

    # Changes made through the second connection reach a third one.
    del loaded[5]
    loaded[10_000] = "new"
    fresh.commit()
    del expected[5]
    expected[10_000] = "new"
    check_tree(Connection(storage).get_root()["tree"], expected)


def open_durus_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Load the Durus 4.3 SQLite fixture's records into a MemoryStorage."""
    if not FIXTURES.is_dir():
        pytest.skip(f"the shared Durus fixtures are not at {FIXTURES}")
    for name in ("legacy-sqlite.sqlite", "legacy_model.py", "manifest.json"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    monkeypatch.syspath_prepend(str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())

    storage = MemoryStorage()
    database = sqlite3.connect(tmp_path / "legacy-sqlite.sqlite")
    try:
        rows = database.execute("select id, data, refs from objects").fetchall()
    finally:
        database.close()
    storage.begin()
    for number, data, refs in rows:
        oid = number.to_bytes(8, "big")
        storage.store(oid, pack_record(oid, bytes(data), bytes(refs or b"")))
    storage.end()
    highest = max(number for number, _, _ in rows)
    while int.from_bytes(storage.new_oid(), "big") < highest:
        pass
    return storage, manifest["legacy-sqlite.sqlite"]


def test_durus_4_3_trees_read_right_without_being_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, expected = open_durus_fixture(tmp_path, monkeypatch)
    connection = Connection(storage)
    root = connection.get_root()
    numbers = root["numbers"]
    assert type(numbers) is BTree
    assert "_count" not in numbers.root.__getstate__()  # Durus 4.3 wrote none

    assert len(numbers) == expected["numbers_len"]
    assert numbers.get_min_item()[0] == expected["numbers_min"]
    assert numbers.get_max_item()[0] == expected["numbers_max"]
    assert sum(numbers.values()) == pytest.approx(expected["numbers_sum"])
    assert len(root["people"]) == expected["people_len"]
    assert len(root["by_name"]) == expected["by_name_len"]
    assert sorted(root["evens"]) == expected["evens"]
    assert list(root["log"]) == expected["log"]
    check_tree(numbers, dict(numbers.items()))
    assert not any(node._p_is_unsaved() for node in all_nodes(numbers))


def test_durus_4_3_trees_stay_right_after_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, expected_values = open_durus_fixture(tmp_path, monkeypatch)
    connection = Connection(storage)
    numbers = connection.get_root()["numbers"]
    expected = dict(numbers.items())
    rng = random.Random(7)

    # Change the tree before anything computed its counts.
    for key in rng.sample(sorted(expected), 700):
        del numbers[key]
        del expected[key]
    for key in range(-500, 0):
        numbers[key] = float(key)
        expected[key] = float(key)
    connection.commit()

    reopened = Connection(storage).get_root()["numbers"]
    assert len(reopened) == expected_values["numbers_len"] - 200
    check_tree(reopened, expected, counts=False)
    check_tree(reopened, expected)


def test_changes_through_a_small_cache_that_ghosts_nodes() -> None:
    storage = MemoryStorage()
    connection = Connection(storage, cache_size=10)
    tree = BTree(BNode4)
    connection.get_root()["tree"] = tree
    expected: dict[int, int] = {}
    rng = random.Random(11)
    for _ in range(15):
        for _ in range(150):
            key = rng.randrange(1500)
            if rng.random() < 0.6:
                tree[key] = expected[key] = rng.randrange(100)
            elif key in expected:
                del tree[key]
                del expected[key]
        connection.commit()  # shrinks the cache: most nodes become ghosts
        assert any(obj._p_is_ghost() for obj in connection.get_cache())
        probe = rng.randrange(1500)
        assert tree.get(probe) == expected.get(probe)
        assert len(tree) == len(expected)
    check_tree(Connection(storage).get_root()["tree"], expected)


def test_a_node_stored_with_a_len_count_loads():
    from dhruva.btree import BNode16

    node = BNode16.__new__(BNode16)
    node.__setstate__({"items": [(1, "a"), (2, "b")], "nodes": None, "_len": 2})
    assert node.items == [(1, "a"), (2, "b")]
    assert node.get_count() == 2
