"""The msgspec serializer: exact types, refusals, and loading that runs nothing."""

from __future__ import annotations

import collections
import datetime as dt
import enum
import sys
import uuid
from decimal import Decimal
from typing import Any

import pytest
from dhruva.broken import is_broken
from dhruva.btree import BTree
from dhruva.connection import Connection
from dhruva.persistent import Persistent
from dhruva.persistent_list import PersistentList
from dhruva.persistent_set import PersistentSet
from dhruva.record import ROOT_OID, pack_record
from dhruva.serializer import SerializationError
from dhruva.storage import MemoryStorage

pytest.importorskip("msgspec")


class Thing(Persistent):
    pass


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


def reopen(storage: MemoryStorage) -> Any:
    return Connection(storage).get_root()


def test_values_come_back_with_their_exact_types() -> None:
    values: dict[str, Any] = {
        "big": [2**64, -(2**64) - 1, 2**1000],
        "edges": [2**63 - 1, -(2**63), 2**64 - 1],
        "bool_int": [True, 1, 0, False],
        "floats": [0.1, -0.0],
        "tuple_of_lists": ([1], [2, (3,)]),
        "bytes_kinds": [b"x", bytearray(b"x")],
        "sets": [{1, 2}, frozenset({1, 2})],
        "keys": {(1, "a"): 1, frozenset({"x"}): 2, 3: 3, "s": 4, b"b": 5},
        "when": [dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.date.max],
        "money": Decimal("19.99"),
        "id": uuid.UUID(int=7),
        "span": dt.timedelta(microseconds=-1),
    }
    storage = MemoryStorage()
    connection = Connection(storage, serializer="msgspec")
    connection.get_root().update(values)
    connection.commit()
    root = reopen(storage)
    assert dict(root) == values
    assert [type(x) for x in root["bool_int"]] == [bool, int, int, bool]
    assert type(root["tuple_of_lists"]) is tuple
    assert type(root["tuple_of_lists"][1][1]) is tuple
    assert [type(x) for x in root["bytes_kinds"]] == [bytes, bytearray]
    assert [type(x) for x in root["sets"]] == [set, frozenset]
    assert [type(k) for k in root["keys"]] == [tuple, frozenset, int, str, bytes]
    assert root["when"][0].tzinfo is dt.UTC


def test_collections_and_btrees_round_trip() -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="msgspec")
    root = connection.get_root()
    root["tree"] = tree = BTree()
    for i in range(500):
        tree[i] = (str(i), Thing())
    root["list"] = PersistentList([1, (2,)])
    root["set"] = PersistentSet({"a", (1, 2)})
    connection.commit()
    root = reopen(storage)
    assert len(root["tree"]) == 500
    assert root["tree"][42][0] == "42" and type(root["tree"][42][1]) is Thing
    assert list(root["list"]) == [1, (2,)]
    assert set(root["set"]) == {"a", (1, 2)}


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (Color.RED, f"{__name__}.Color"),
        (collections.OrderedDict(a=1), "collections.OrderedDict"),
        (collections.defaultdict(list), "collections.defaultdict"),
        ({Text("key"): 1}, f"{__name__}.Text"),
        (1 + 2j, "builtins.complex"),
        (range(2), "builtins.range"),
        (Thing, "builtins.type"),
        (len, "builtins.builtin_function_or_method"),
    ],
)
def test_other_types_are_refused_naming_object_attribute_and_type(
    value: Any, type_name: str
) -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="msgspec")
    connection.get_root()["thing"] = thing = Thing()
    connection.commit()
    before = dict(storage.records)

    thing.fine = [1, 2]
    thing.odd = [0, {"deep": value}]
    with pytest.raises(SerializationError) as raised:
        connection.commit()
    message = str(raised.value)
    oid = int.from_bytes(thing._p_oid, "big")
    assert f"cannot store {__name__}.Thing oid {oid} with the msgspec" in message
    assert "attribute 'odd' (at ['odd'][1]['deep']" in message
    assert f"holds a {type_name}" in message
    assert storage.records == before


def test_unsupported_time_zone_is_refused() -> None:
    class Zone(dt.tzinfo):
        def utcoffset(self, when: Any) -> dt.timedelta:
            return dt.timedelta(0)

        def dst(self, when: Any) -> dt.timedelta:
            return dt.timedelta(0)

        def tzname(self, when: Any) -> str:
            return "Z"

    connection = Connection(MemoryStorage(), serializer="msgspec")
    connection.get_root()["when"] = dt.datetime(2020, 1, 1, tzinfo=Zone())
    with pytest.raises(SerializationError, match="only datetime.timezone"):
        connection.commit()


def test_a_list_that_holds_itself_is_refused() -> None:
    connection = Connection(MemoryStorage(), serializer="msgspec")
    loop: list[Any] = [1]
    loop.append(loop)
    connection.get_root()["loop"] = loop
    with pytest.raises(SerializationError, match="holds itself"):
        connection.commit()


def test_loading_imports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A record naming a class in a module that is not imported: the module
    # stays unimported (even though it exists) and the object is a placeholder.
    storage = MemoryStorage()
    storage.new_oid()
    storage.begin()
    header = b"\0msgspec\0dhruva.persistent_dict:PersistentDict\0\0"
    other = b"\0msgspec\0json.decoder:JSONDecoder\0\0"
    storage.store(ROOT_OID, pack_record(ROOT_OID, header + b"\x80", b""))
    oid = storage.new_oid()
    storage.store(oid, pack_record(oid, other + b"\x80", b""))
    storage.end()
    monkeypatch.delitem(sys.modules, "json.decoder", raising=False)
    monkeypatch.delitem(sys.modules, "json", raising=False)
    connection = Connection(storage)
    obj = connection.get(oid)
    assert is_broken(obj)
    assert "json.decoder" not in sys.modules and "json" not in sys.modules


def test_damaged_msgspec_record_is_an_error_not_a_crash() -> None:
    storage = MemoryStorage()
    storage.new_oid()
    storage.begin()
    data = b"\0msgspec\0dhruva.persistent_dict:PersistentDict\0\0\xc7\x01\x63x"
    storage.store(ROOT_OID, pack_record(ROOT_OID, data, b""))
    storage.end()
    with pytest.raises(SerializationError, match="extension code 99"):
        Connection(storage).get_root().keys()


@pytest.mark.parametrize("where", ["value", "key"])
def test_a_string_with_a_lone_surrogate_is_refused(where: str) -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="msgspec")
    connection.get_root()["thing"] = thing = Thing()
    connection.commit()
    before = dict(storage.records)

    thing.name = ["ok", "bad \udc80"] if where == "value" else {"bad \udc80": 1}
    with pytest.raises(SerializationError) as raised:
        connection.commit()
    message = str(raised.value)
    assert f"cannot store {__name__}.Thing oid" in message
    assert "attribute 'name'" in message
    assert "lone surrogate" in message
    assert storage.records == before


def _rename_in_records(storage: MemoryStorage, old: bytes, new: bytes) -> None:
    from dhruva.record import unpack_record

    for oid, record in list(storage.records.items()):
        _oid, data, refs = unpack_record(record)
        storage.records[oid] = pack_record(oid, data.replace(old, new), refs)


def test_a_missing_class_is_logged_once_per_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="msgspec")
    things = [Thing() for _ in range(3)]
    connection.get_root()["things"] = PersistentList(things)
    connection.get_root()["first"] = things[0]
    connection.commit()
    _rename_in_records(storage, f"{__name__}:Thing".encode(), b"gone_app_mod:Thing")

    root = Connection(storage).get_root()
    loaded = list(root["things"]) + [root["first"]]
    for obj in loaded:
        obj._p_load_state()
    assert all(is_broken(obj) for obj in loaded)
    warnings = [
        r
        for r in caplog.records
        if "gone_app_mod.Thing" in r.getMessage()
        and r.name == "dhruva.msgspec_serializer"
    ]
    assert len(warnings) == 1
