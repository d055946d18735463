"""Restricted mode for pickle records: only what is known to be safe loads."""

from __future__ import annotations

import datetime as dt
import pickle
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from dhruva.btree import BTree
from dhruva.connection import Connection
from dhruva.persistent import Persistent
from dhruva.persistent_list import PersistentList
from dhruva.persistent_set import PersistentSet
from dhruva.record import ROOT_OID, pack_record
from dhruva.restricted import SAFE_GLOBALS
from dhruva.serializer import RestrictedLoadError
from dhruva.storage import MemoryStorage


class Account(Persistent):
    pass


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and other.cents == self.cents


def store_root_state(state_pickle: bytes) -> MemoryStorage:
    storage = MemoryStorage()
    storage.new_oid()
    storage.begin()
    data = b"\x80\x02cdurus.persistent_dict\nPersistentDict\nq\x00." + state_pickle
    storage.store(ROOT_OID, pack_record(ROOT_OID, data, b""))
    storage.end()
    return storage


def test_collections_persistent_classes_and_safe_values_load() -> None:
    storage = MemoryStorage()
    connection = Connection(storage)
    root = connection.get_root()
    root["tree"] = tree = BTree()
    for i in range(300):
        tree[i] = Account()
    root["values"] = [
        {1, 2}, frozenset([3]), bytearray(b"b"), b"bytes", (1, 2.5, None),
        dt.datetime(2020, 1, 1, tzinfo=dt.UTC), dt.date(2020, 1, 1),
        dt.timedelta(1), Decimal("1.1"), uuid.UUID(int=1), 1j, 2**100,
    ]  # fmt: skip
    root["list"] = PersistentList([1])
    root["set"] = PersistentSet([1])
    connection.commit()

    root = Connection(storage, restricted=True).get_root()
    assert type(root["tree"][7]) is Account
    assert root["values"][5] == dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    assert list(root["list"]) == [1] and set(root["set"]) == {1}


def test_other_classes_are_refused_by_name_unless_allowed() -> None:
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["price"] = Money(250)
    connection.commit()

    with pytest.raises(RestrictedLoadError) as raised:
        Connection(storage, restricted=True).get_root()["price"]
    assert f"refused to load {__name__}.Money" in str(raised.value)
    assert "allowed_classes" in str(raised.value)

    for allowed in (Money, f"{__name__}.Money"):
        root = Connection(storage, restricted=True, allowed_classes=[allowed])
        assert root.get_root()["price"] == Money(250)


class Attack:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_calling_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    storage = store_root_state(pickle.dumps({"data": {"x": Attack(marker)}}, 2))
    with pytest.raises(RestrictedLoadError, match=r"refused to load posix\.system"):
        Connection(storage, restricted=True).get_root().keys()
    assert not marker.exists()

    Connection(storage).get_root().keys()  # unrestricted, it does run
    assert marker.exists()


def test_getattr_and_import_module_only_reach_dhruva_collections(
    tmp_path: Path,
) -> None:
    # getattr(importlib.import_module("os"), "system")("touch marker")
    marker = tmp_path / "marker"
    evil = (
        b"\x80\x02}q\x00X\x04\x00\x00\x00dataq\x01}q\x02X\x01\x00\x00\x00x"
        b"cbuiltins\ngetattr\ncimportlib\nimport_module\nX\x02\x00\x00\x00os"
        b"\x85R"
        b"X\x06\x00\x00\x00system\x86R"
        + b"X"
        + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode()
        + b"\x85Rss."
    )
    storage = store_root_state(evil)
    with pytest.raises(RestrictedLoadError, match="refused to import module os"):
        Connection(storage, restricted=True).get_root().keys()
    assert not marker.exists()


def test_safe_globals_are_values_not_functions() -> None:
    modules = {module for module, _name in SAFE_GLOBALS}
    assert modules <= {
        "builtins", "datetime", "decimal", "uuid", "fractions", "collections",
        "copyreg", "zoneinfo",
    }  # fmt: skip
    assert ("builtins", "eval") not in SAFE_GLOBALS
    assert ("builtins", "getattr") not in SAFE_GLOBALS


def test_range_written_by_protocol_2_loads() -> None:
    # Protocol 2 names range as __builtin__.xrange; restricted mode maps it back.
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["span"] = range(2, 10, 3)
    connection.commit()

    root = Connection(storage, restricted=True).get_root()
    assert root["span"] == range(2, 10, 3)


@pytest.mark.parametrize("gone", ["module", "class"])
def test_a_persistent_class_that_cannot_be_found_loads_as_a_placeholder(
    gone: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys
    import types

    from dhruva.broken import is_broken

    module = types.ModuleType("restricted_app")
    exec(
        "from dhruva.persistent import Persistent\n"
        "class Customer(Persistent):\n"
        "    pass\n",
        vars(module),
    )
    monkeypatch.setitem(sys.modules, "restricted_app", module)
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["customer"] = customer = module.Customer()
    customer.name = "ann"
    connection.get_root()["other"] = "still readable"
    connection.commit()

    # Not imported in this process, or imported but no longer defining it.
    module.Customer.__module__ = "gone"
    if gone == "module":
        monkeypatch.delitem(sys.modules, "restricted_app")
    else:
        del module.Customer

    root = Connection(storage, restricted=True).get_root()
    assert root["other"] == "still readable"
    assert is_broken(root["customer"])
    assert root["customer"].broken_state == {"name": "ann"}
    assert "import the module that defines it" in caplog.text.lower()


def test_a_class_of_a_standard_module_not_imported_is_still_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "smtplib", raising=False)
    state = b"\x80\x02}q\x01X\x01\x00\x00\x00aq\x02csmtplib\nSMTP\nq\x03)\x81q\x04s."
    storage = store_root_state(state)
    with pytest.raises(RestrictedLoadError, match="refused to load smtplib.SMTP"):
        Connection(storage, restricted=True).get_root().keys()
    assert "smtplib" not in sys.modules
