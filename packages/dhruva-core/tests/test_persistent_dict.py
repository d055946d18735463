from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from dhruva.connection import Connection
from dhruva.persistent_dict import PersistentDict
from dhruva.storage import MemoryStorage


def saved(**items: Any) -> PersistentDict:
    """A dict that looks freshly committed."""
    d = PersistentDict(items)
    d._p_set_status_saved()
    return d


def test_state_is_the_durus_layout() -> None:
    d = PersistentDict(a=1)
    assert d.__getstate__() == {"data": {"a": 1}}
    assert vars(d) == {"data": {"a": 1}}


def test_behaves_like_a_dict() -> None:
    d = PersistentDict([("a", 1)], b=2)
    plain = {"a": 1, "b": 2}
    assert d == plain and plain == d and d != {"a": 1}
    assert len(d) == 2 and "a" in d and d.has_key("b") and "z" not in d
    assert d["a"] == 1 and d.get("z") is None and d.get("z", 0) == 0
    with pytest.raises(KeyError):
        d["z"]
    assert list(d) == ["a", "b"] and list(reversed(d)) == ["b", "a"]
    assert list(d.keys()) == ["a", "b"] and list(d.values()) == [1, 2]
    assert list(d.items()) == [("a", 1), ("b", 2)]
    assert list(d.iterkeys()) == ["a", "b"] and list(d.itervalues()) == [1, 2]
    assert list(d.iteritems()) == [("a", 1), ("b", 2)]
    assert d.keys() & {"b", "c"} == {"b"}

    d["c"] = 3
    del d["a"]
    assert d.setdefault("c", 9) == 3 and d.setdefault("d") is None
    assert d.pop("d") is None and d.pop("d", 7) == 7
    with pytest.raises(KeyError):
        d.pop("d")
    with pytest.raises(KeyError):
        del d["d"]
    assert d.popitem() == ("c", 3)
    d.update({"x": 1}, y=2)
    d.update([("z", 3)])
    d.update(PersistentDict(w=0))
    assert d == {"b": 2, "x": 1, "y": 2, "z": 3, "w": 0}
    with pytest.raises(TypeError, match="at most 1"):
        d.update({}, {})
    d.clear()
    assert d == {} and not d
    with pytest.raises(KeyError):
        d.popitem()


def test_equality_and_hashing() -> None:
    assert PersistentDict(a=1) == PersistentDict(a=1)
    assert PersistentDict(a=1) != PersistentDict(a=2)
    assert PersistentDict() != []
    assert (PersistentDict() == []) is False
    with pytest.raises(TypeError):
        hash(PersistentDict())


def test_union_operators() -> None:
    d = PersistentDict(a=1, b=2)
    merged = d | {"b": 3, "c": 4}
    assert type(merged) is PersistentDict and merged == {"a": 1, "b": 3, "c": 4}
    assert d == {"a": 1, "b": 2}
    assert d | PersistentDict(z=0) == {"a": 1, "b": 2, "z": 0}
    right = {"b": 9, "q": 0} | d
    assert type(right) is PersistentDict and list(right.items()) == [
        ("b", 2),
        ("q", 0),
        ("a", 1),
    ]
    d |= {"c": 5}
    assert d == {"a": 1, "b": 2, "c": 5}
    with pytest.raises(TypeError):
        d | [1]


def test_copy_and_fromkeys_give_unsaved_independent_dicts() -> None:
    class Tagged(PersistentDict):
        pass

    original = Tagged(a=[1])
    original.tag = "t"
    original._p_set_status_saved()
    for duplicate in (original.copy(), copy.copy(original)):
        assert type(duplicate) is Tagged and duplicate == original
        assert duplicate.tag == "t" and duplicate._p_is_unsaved()
        duplicate["b"] = 2
        assert "b" not in original
    assert not original._p_is_unsaved()

    made = Tagged.fromkeys("xy", 0)
    assert type(made) is Tagged and made == {"x": 0, "y": 0}
    assert PersistentDict.fromkeys([1]) == {1: None}


def test_missing_is_honoured_in_subclasses() -> None:
    class Counts(PersistentDict):
        def __missing__(self, key: Any) -> int:
            return 0

    counts = Counts()
    counts["a"] += 1
    assert counts["b"] == 0 and counts == {"a": 1}
    assert counts.get("b") is None  # as with dict, get() does not call it


def test_pickle_round_trip() -> None:
    d = PersistentDict(a=[1, 2])
    back = pickle.loads(pickle.dumps(d))
    assert type(back) is PersistentDict and back == d


MUTATIONS: list[tuple[str, Callable[[PersistentDict], Any]]] = [
    ("setitem", lambda d: d.__setitem__("n", 1)),
    ("delitem", lambda d: d.__delitem__("a")),
    ("clear", lambda d: d.clear()),
    ("update", lambda d: d.update(n=1)),
    ("ior", lambda d: d.__ior__({"n": 1})),
    ("setdefault new", lambda d: d.setdefault("n", 1)),
    ("pop", lambda d: d.pop("a")),
    ("popitem", lambda d: d.popitem()),
]

READS: list[tuple[str, Callable[[PersistentDict], Any]]] = [
    ("getitem", lambda d: d["a"]),
    ("get", lambda d: d.get("zz")),
    ("contains", lambda d: "a" in d),
    ("len", len),
    ("iterate", list),
    ("views", lambda d: (list(d.keys()), list(d.values()), list(d.items()))),
    ("iter spellings", lambda d: (list(d.iteritems()), d.has_key("a"))),
    ("eq", lambda d: d == {"a": 1}),
    ("copy", lambda d: d.copy()),
    ("or", lambda d: d | {"q": 1}),
    ("setdefault present", lambda d: d.setdefault("a", 5)),
    ("pop absent with default", lambda d: d.pop("zz", None)),
    ("repr", repr),
]


@pytest.mark.parametrize(
    "change", [m[1] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_every_change_marks_the_dict_changed(
    change: Callable[[PersistentDict], Any],
) -> None:
    d = saved(a=1, b=2)
    change(d)
    assert d._p_is_unsaved()


@pytest.mark.parametrize("read", [r[1] for r in READS], ids=[r[0] for r in READS])
def test_reading_does_not_mark_the_dict_changed(
    read: Callable[[PersistentDict], Any],
) -> None:
    d = saved(a=1, b=2)
    read(d)
    assert d._p_is_saved()


def test_survives_commit_and_reopen() -> None:
    storage = MemoryStorage()
    connection = Connection(storage)
    d = PersistentDict(a=[1], b={"c": 2})
    connection.get_root()["d"] = d
    connection.commit()
    d["e"] = 3
    connection.commit()

    loaded = Connection(storage).get_root()["d"]
    assert type(loaded) is PersistentDict
    assert loaded == {"a": [1], "b": {"c": 2}, "e": 3}
    assert loaded._p_is_saved()
