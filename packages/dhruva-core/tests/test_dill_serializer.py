"""The dill serializer: functions in persistent objects, and version notes."""

from __future__ import annotations

import platform
from typing import Any

import pytest
from dhruva.connection import Connection
from dhruva.persistent import Persistent
from dhruva.record import unpack_record
from dhruva.serializer import RestrictedLoadError, SerializationError
from dhruva.storage import MemoryStorage

dill = pytest.importorskip("dill")


class Holder(Persistent):
    pass


def test_lambdas_and_closures_round_trip() -> None:
    def make_adder(n: int) -> Any:
        return lambda x: x + n

    storage = MemoryStorage()
    connection = Connection(storage, serializer="dill")
    connection.get_root()["holder"] = holder = Holder()
    holder.add = make_adder(5)
    holder.other = Holder()
    holder.other.name = "other"
    holder.name_of_other = lambda: holder.other.name
    connection.commit()

    holder = Connection(storage).get_root()["holder"]
    assert holder.add(1) == 6
    assert holder.name_of_other() == "other"
    assert type(holder.other) is Holder


def test_records_note_the_dill_and_python_versions() -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="dill")
    connection.get_root()["f"] = len
    connection.commit()
    data = unpack_record(storage.load(b"\0" * 8))[1]
    line = f"dill {dill.__version__} python {platform.python_version()}\n"
    assert line.encode() in data


def test_a_record_that_cannot_load_names_the_versions_that_wrote_it() -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="dill")
    connection.get_root()["f"] = lambda: 1
    connection.commit()
    oid, data, refs = unpack_record(storage.load(b"\0" * 8))
    line = f"dill {dill.__version__} python {platform.python_version()}".encode()
    # As if written elsewhere: older versions, and a pickle this Python refuses.
    forged = data.replace(line, b"dill 0.2.9 python 2.7.18").split(b"\n")[0]
    forged += b"\n\x80\x09garbage"
    storage.records[oid] = oid + len(forged).to_bytes(4, "big") + forged + refs

    with pytest.raises(SerializationError) as raised:
        Connection(storage).get_root().keys()
    message = str(raised.value)
    assert "written by dill 0.2.9 under Python 2.7.18" in message
    assert f"this is dill {dill.__version__} under Python" in message


def test_restricted_connections_refuse_dill_records() -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="dill")
    connection.get_root()["f"] = lambda: 1
    connection.commit()
    with pytest.raises(RestrictedLoadError, match="dill records can run code"):
        Connection(storage, restricted=True)


def test_a_damaged_record_of_the_running_versions_does_not_blame_versions() -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="dill")
    connection.get_root()["f"] = lambda: 1
    connection.commit()
    oid, data, refs = unpack_record(storage.load(b"\0" * 8))
    damaged = data.split(b"\n")[0] + b"\n\x80\x04garbage"
    storage.records[oid] = oid + len(damaged).to_bytes(4, "big") + damaged + refs

    with pytest.raises(SerializationError) as raised:
        Connection(storage).get_root().keys()
    message = str(raised.value)
    assert "written by the running versions" in message
    assert "damaged" in message
    assert "Load it with the versions" not in message


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents


def test_a_value_of_a_missing_class_loads_as_a_placeholder() -> None:
    from dhruva.broken import is_broken

    storage = MemoryStorage()
    connection = Connection(storage, serializer="dill")
    connection.get_root()["holder"] = holder = Holder()
    holder.price = Money(250)
    holder.name = "kept"
    connection.commit()
    for oid, record in list(storage.records.items()):
        oid, data, refs = unpack_record(record)
        data = data.replace(b"\x05Money", b"\x05Mone_")  # a class that is gone
        storage.records[oid] = oid + len(data).to_bytes(4, "big") + data + refs

    holder = Connection(storage).get_root()["holder"]
    assert holder.name == "kept"
    assert is_broken(holder.price)
    assert holder.price.broken_name == f"{__name__}.Mone_"
    assert holder.price.broken_state == {"cents": 250}
