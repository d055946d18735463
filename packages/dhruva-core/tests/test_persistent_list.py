from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from dhruva.connection import Connection
from dhruva.persistent_list import PersistentList
from dhruva.storage import MemoryStorage
from hypothesis import given, settings
from hypothesis import strategies as st


def saved(*items: Any) -> PersistentList:
    """A list that looks freshly committed."""
    result = PersistentList(items)
    result._p_set_status_saved()
    return result


def test_state_is_the_durus_layout() -> None:
    assert PersistentList([1, 2]).__getstate__() == {"data": [1, 2]}
    assert vars(PersistentList("ab")) == {"data": ["a", "b"]}
    assert PersistentList().data == []


def test_behaves_like_a_list() -> None:
    p = PersistentList([3, 1, 2])
    assert p == [3, 1, 2] and p == [3, 1, 2] and p != [3, 1]
    assert len(p) == 3 and 1 in p and 9 not in p
    assert p[0] == 3 and p[-1] == 2
    assert p.index(2) == 2 and p.count(1) == 1
    with pytest.raises(ValueError):
        p.index(9)
    assert list(reversed(p)) == [2, 1, 3]

    p.append(4)
    p.insert(0, 0)
    p.extend([5])
    p.extend(PersistentList([6]))
    assert p == [0, 3, 1, 2, 4, 5, 6]
    assert p.pop() == 6 and p.pop(0) == 0
    p.remove(3)
    with pytest.raises(ValueError):
        p.remove(3)
    p[0] = 10
    del p[0]
    assert p == [2, 4, 5]
    p.sort(reverse=True)
    assert p == [5, 4, 2]
    p.sort(key=lambda x: x % 3)
    assert p == [4, 5, 2]
    p.reverse()
    assert p == [2, 5, 4]
    p.clear()
    assert p == [] and not p
    with pytest.raises(IndexError):
        p.pop()


def test_slices() -> None:
    p = PersistentList(range(10))
    part = p[2:5]
    assert type(part) is PersistentList and part == [2, 3, 4]
    assert p[::3] == [0, 3, 6, 9]
    p[0:2] = PersistentList(["a", "b", "c"])
    p[-2:] = (x for x in "yz")
    del p[3:5]
    assert p == ["a", "b", "c", 4, 5, 6, 7, "y", "z"]
    p[::2] = [0, 0, 0, 0, 0]
    assert p[::2] == [0] * 5


def test_concatenation_and_repetition() -> None:
    p = PersistentList([1])
    assert type(p + [2]) is PersistentList and p + [2] == [1, 2]
    assert p + PersistentList([3]) == [1, 3]
    assert p + (4,) == [1, 4]
    assert [0] + p == [0, 1] and type([0] + p) is PersistentList
    assert (0,) + p == [0, 1]
    assert p * 3 == [1, 1, 1] and 2 * p == [1, 1]
    p += [2]
    p += PersistentList([3])
    p += (4,)
    assert p == [1, 2, 3, 4]
    p *= 2
    assert p == [1, 2, 3, 4] * 2


def test_comparisons() -> None:
    small = PersistentList([1, 2])
    big = PersistentList([1, 3])
    assert small < big and small <= big and big > small and big >= small
    assert small < [1, 3] and small < [1, 3] and small <= [1, 2]
    assert small == PersistentList([1, 2]) and small != big
    assert small != (1, 2)
    with pytest.raises(TypeError):
        small < (1, 3)  # noqa: B015
    with pytest.raises(TypeError):
        hash(small)


def test_copies_are_unsaved_and_independent() -> None:
    original = saved([1], 2)
    for duplicate in (original.copy(), copy.copy(original), original[:]):
        assert duplicate == original and duplicate._p_is_unsaved()
        duplicate.append(3)
        assert len(original) == 2
    assert original._p_is_saved()


def test_pickle_round_trip() -> None:
    p = PersistentList([1, [2]])
    assert pickle.loads(pickle.dumps(p)) == p


@settings(deadline=None)
@given(
    items=st.lists(st.integers(), max_size=12),
    start=st.integers(-15, 15) | st.none(),
    stop=st.integers(-15, 15) | st.none(),
    step=st.sampled_from([None, 1, 2, -1, -3]),
    other=st.lists(st.integers(), max_size=6),
)
def test_slice_operations_match_list(
    items: list[int],
    start: int | None,
    stop: int | None,
    step: int | None,
    other: list[int],
) -> None:
    index = slice(start, stop, step)
    p = PersistentList(items)
    assert p[index] == items[index]

    expected = list(items)
    try:
        expected[index] = other
    except ValueError:
        with pytest.raises(ValueError):
            p[index] = other
    else:
        p[index] = other
        assert p == expected

    del expected[index]
    del p[index]
    assert p == expected


MUTATIONS: list[tuple[str, Callable[[PersistentList], Any]]] = [
    ("setitem", lambda p: p.__setitem__(0, 9)),
    ("set slice", lambda p: p.__setitem__(slice(0, 1), [9])),
    ("delitem", lambda p: p.__delitem__(0)),
    ("del slice", lambda p: p.__delitem__(slice(0, 1))),
    ("iadd", lambda p: p.__iadd__([9])),
    ("imul", lambda p: p.__imul__(2)),
    ("append", lambda p: p.append(9)),
    ("insert", lambda p: p.insert(0, 9)),
    ("extend", lambda p: p.extend([9])),
    ("pop", lambda p: p.pop()),
    ("remove", lambda p: p.remove(1)),
    ("clear", lambda p: p.clear()),
    ("reverse", lambda p: p.reverse()),
    ("sort", lambda p: p.sort()),
]

READS: list[tuple[str, Callable[[PersistentList], Any]]] = [
    ("getitem", lambda p: p[0]),
    ("slice", lambda p: p[0:1]),
    ("contains", lambda p: 1 in p),
    ("len", len),
    ("iterate", list),
    ("reversed", lambda p: list(reversed(p))),
    ("count index", lambda p: (p.count(1), p.index(1))),
    ("compare", lambda p: (p == [1], p < [5], p >= [0])),
    ("add mul", lambda p: (p + [1], p * 2, [0] + p)),
    ("copy", lambda p: p.copy()),
    ("repr", repr),
    ("failed remove", lambda p: pytest.raises(ValueError, p.remove, 99)),
    ("failed pop", lambda p: pytest.raises(IndexError, p.pop, 99)),
]


@pytest.mark.parametrize(
    "change", [m[1] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_every_change_marks_the_list_changed(
    change: Callable[[PersistentList], Any],
) -> None:
    p = saved(3, 1, 2)
    change(p)
    assert p._p_is_unsaved()


@pytest.mark.parametrize("read", [r[1] for r in READS], ids=[r[0] for r in READS])
def test_reading_does_not_mark_the_list_changed(
    read: Callable[[PersistentList], Any],
) -> None:
    p = saved(3, 1, 2)
    read(p)
    assert p._p_is_saved()


def test_survives_commit_and_reopen() -> None:
    storage = MemoryStorage()
    connection = Connection(storage)
    p = PersistentList([1, "two"])
    connection.get_root()["p"] = p
    connection.commit()
    p += [3.0]
    connection.commit()

    loaded = Connection(storage).get_root()["p"]
    assert type(loaded) is PersistentList and loaded == [1, "two", 3.0]
