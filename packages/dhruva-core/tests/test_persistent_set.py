from __future__ import annotations

import copy
import operator
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from dhruva.connection import Connection
from dhruva.persistent_set import PersistentSet
from dhruva.storage import MemoryStorage
from hypothesis import given, settings
from hypothesis import strategies as st


def saved(*items: Any) -> PersistentSet:
    """A set that looks freshly committed."""
    result = PersistentSet(items)
    result._p_set_status_saved()
    return result


def test_state_is_the_durus_layout() -> None:
    assert PersistentSet([1]).__getstate__() == {"s": {1}}
    assert vars(PersistentSet()) == {"s": set()}


def test_behaves_like_a_set() -> None:
    s = PersistentSet([1, 2])
    assert s == {1, 2} and {1, 2} == s and s == frozenset({1, 2}) and s != {1}
    assert s == PersistentSet([2, 1]) and s != [1, 2]
    assert len(s) == 2 and 1 in s and 3 not in s and sorted(s) == [1, 2]
    s.add(3)
    s.discard(9)
    s.discard(3)
    s.remove(2)
    with pytest.raises(KeyError):
        s.remove(2)
    assert s.pop() == 1
    with pytest.raises(KeyError):
        s.pop()
    s.update([1, 2], {3})
    s.difference_update([3])
    s.intersection_update({1, 2, 5}, PersistentSet([1, 2]))
    s.symmetric_difference_update([2, 4])
    assert s == {1, 4}
    s.clear()
    assert not s
    with pytest.raises(TypeError):
        hash(s)


def test_repr_shows_the_elements() -> None:
    assert repr(PersistentSet([7])).endswith(" [7]>")
    assert repr(PersistentSet()).startswith("<PersistentSet @")


def test_named_methods_accept_any_iterable_and_return_persistent_sets() -> None:
    s = PersistentSet([1, 2, 3])
    for result, expected in [
        (s.union([4], PersistentSet([5])), {1, 2, 3, 4, 5}),
        (s.intersection([2, 3, 4], (3,)), {3}),
        (s.difference([1], PersistentSet([2])), {3}),
        (s.symmetric_difference([3, 4]), {1, 2, 4}),
    ]:
        assert type(result) is PersistentSet and result == expected
    assert s.issubset(range(5)) and s.issuperset([1]) and s.isdisjoint([9])
    assert s.issubset(PersistentSet([1, 2, 3])) and not s.isdisjoint(PersistentSet([1]))


def test_comparisons() -> None:
    small = PersistentSet([1])
    big = PersistentSet([1, 2])
    assert small < big and small <= big and big > small and big >= small
    assert small < {1, 2} and {1, 2} > small and small <= frozenset({1})
    with pytest.raises(TypeError):
        small < [1, 2]  # noqa: B015


def test_copies_are_unsaved_and_independent() -> None:
    original = saved(1, 2)
    for duplicate in (original.copy(), copy.copy(original)):
        assert duplicate == original and duplicate._p_is_unsaved()
        duplicate.add(3)
        assert 3 not in original
    assert original._p_is_saved()


def test_pickle_round_trip() -> None:
    s = PersistentSet(["a", (1, 2)])
    assert pickle.loads(pickle.dumps(s)) == s


OPERATORS = [operator.and_, operator.or_, operator.sub, operator.xor]
IN_PLACE = [operator.iand, operator.ior, operator.isub, operator.ixor]


@settings(deadline=None)
@given(
    left=st.sets(st.integers(0, 20), max_size=10),
    right=st.sets(st.integers(0, 20), max_size=10),
    wrap=st.sampled_from(["persistent", "set", "frozenset"]),
)
def test_operators_match_set(left: set[int], right: set[int], wrap: str) -> None:
    other: Any = {"persistent": PersistentSet, "set": set, "frozenset": frozenset}[
        wrap
    ](right)
    for op in OPERATORS:
        result = op(PersistentSet(left), other)
        assert type(result) is PersistentSet and result == op(left, right)
        flipped = op(other, PersistentSet(left))
        assert flipped == op(right, left)
    for op, plain in zip(IN_PLACE, OPERATORS, strict=True):
        target = saved(*left)
        result = op(target, other)
        assert result is target and target == plain(left, right)
        assert target._p_is_unsaved()
    for op in (operator.lt, operator.le, operator.gt, operator.ge, operator.eq):
        assert op(PersistentSet(left), other) == op(left, right)


def test_operators_refuse_non_sets() -> None:
    s = PersistentSet([1])
    with pytest.raises(TypeError):
        s | [2]
    with pytest.raises(TypeError):
        s |= [2]
    assert s == {1}


MUTATIONS: list[tuple[str, Callable[[PersistentSet], Any]]] = [
    ("add", lambda s: s.add(9)),
    ("discard", lambda s: s.discard(1)),
    ("remove", lambda s: s.remove(1)),
    ("pop", lambda s: s.pop()),
    ("clear", lambda s: s.clear()),
    ("update", lambda s: s.update([9])),
    ("intersection_update", lambda s: s.intersection_update([1])),
    ("difference_update", lambda s: s.difference_update([1])),
    ("symmetric_difference_update", lambda s: s.symmetric_difference_update([1])),
    ("ior", lambda s: s.__ior__({9})),
    ("iand", lambda s: s.__iand__({1})),
    ("isub", lambda s: s.__isub__({1})),
    ("ixor", lambda s: s.__ixor__({1})),
]

READS: list[tuple[str, Callable[[PersistentSet], Any]]] = [
    ("contains", lambda s: 1 in s),
    ("len", len),
    ("iterate", list),
    ("operators", lambda s: (s | {5}, s & {1}, s - {1}, s ^ {1}, {1} - s)),
    ("methods", lambda s: (s.union([5]), s.difference([1]), s.issubset([1]))),
    ("compare", lambda s: (s == {1}, s < {1, 2, 3, 4}, s >= {1})),
    ("copy", lambda s: s.copy()),
    ("repr", repr),
    ("add present", lambda s: s.add(1)),
    ("discard absent", lambda s: s.discard(99)),
    ("failed remove", lambda s: pytest.raises(KeyError, s.remove, 99)),
]


@pytest.mark.parametrize(
    "change", [m[1] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_every_change_marks_the_set_changed(
    change: Callable[[PersistentSet], Any],
) -> None:
    s = saved(1, 2, 3)
    change(s)
    assert s._p_is_unsaved()


@pytest.mark.parametrize("read", [r[1] for r in READS], ids=[r[0] for r in READS])
def test_reading_does_not_mark_the_set_changed(
    read: Callable[[PersistentSet], Any],
) -> None:
    s = saved(1, 2, 3)
    read(s)
    assert s._p_is_saved()


def test_survives_commit_and_reopen() -> None:
    storage = MemoryStorage()
    connection = Connection(storage)
    s = PersistentSet([1, 2])
    connection.get_root()["s"] = s
    connection.commit()
    s |= {3}
    connection.commit()

    loaded = Connection(storage).get_root()["s"]
    assert type(loaded) is PersistentSet and loaded == {1, 2, 3}
