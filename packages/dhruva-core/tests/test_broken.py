"""Missing classes load as placeholders; rename tables find moved classes."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from dhruva.broken import BrokenObjectError, BrokenPersistent, is_broken
from dhruva.connection import Connection
from dhruva.persistent import Persistent
from dhruva.persistent_dict import PersistentDict
from dhruva.storage import MemoryStorage


class Renamed(Persistent):
    pass


@pytest.fixture
def app_module() -> Iterator[types.ModuleType]:
    """A module ``oldapp`` with a persistent class and a plain one."""
    module = types.ModuleType("oldapp")
    exec(
        "from dhruva.persistent import Persistent\n"
        "class Gadget(Persistent):\n"
        "    pass\n"
        "class Point:\n"
        "    def __init__(self, x):\n"
        "        self.x = x\n",
        vars(module),
    )
    sys.modules["oldapp"] = module
    yield module
    sys.modules.pop("oldapp", None)
    module.Gadget.__module__ = "gone"  # no later test may find this class


@pytest.mark.parametrize("serializer", ["pickle", "msgspec", "dill"])
def test_a_missing_class_loads_as_a_placeholder_written_back_unchanged(
    app_module: Any, serializer: str
) -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer=serializer)
    root = connection.get_root()
    root["gadget"] = gadget = app_module.Gadget()
    gadget.size = 3
    gadget.part = PersistentDict(a=1)
    root["other"] = "still readable"
    connection.commit()
    record = storage.load(gadget._p_oid)

    del sys.modules["oldapp"]  # the class is gone
    app_module.Gadget.__module__ = "gone"  # and cannot be found as loaded
    connection = Connection(storage)
    root = connection.get_root()
    assert root["other"] == "still readable"
    broken = root["gadget"]
    assert is_broken(broken) and isinstance(broken, BrokenPersistent)
    assert broken.broken_name == "oldapp.Gadget"
    assert broken.broken_state["size"] == 3
    assert broken.broken_state["part"]["a"] == 1
    assert "broken oldapp.Gadget" in repr(broken)

    with pytest.raises(BrokenObjectError, match="missing class oldapp.Gadget"):
        broken.size = 4
    with pytest.raises(AttributeError, match=r"broken placeholder: its class oldapp"):
        broken.size  # noqa: B018
    with pytest.raises(
        AttributeError, match=r"'size'\. Its state as loaded is in obj\.broken_state"
    ):
        broken.size  # noqa: B018
    broken._p_note_change()
    root["other"] = "changed"
    connection.commit()
    assert storage.load(broken._p_oid) == record

    # The class comes back: the root, rewritten meanwhile, finds it again.
    sys.modules["oldapp"] = app_module
    app_module.Gadget.__module__ = "oldapp"
    root = Connection(storage).get_root()
    assert type(root["gadget"]) is app_module.Gadget
    assert root["gadget"].size == 3 and root["other"] == "changed"


def test_a_missing_plain_class_in_a_state_loads_but_is_not_stored_again(
    app_module: Any,
) -> None:
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["point"] = app_module.Point(5)
    connection.commit()
    del sys.modules["oldapp"]

    connection = Connection(storage)
    root = connection.get_root()
    assert is_broken(root["point"])
    assert root["point"].broken_state == {"x": 5}
    root["more"] = 1
    with pytest.raises(BrokenObjectError, match="oldapp.Point inside its state"):
        connection.commit()


def test_a_rename_table_loads_moved_classes(app_module: Any) -> None:
    storage = MemoryStorage()
    connection = Connection(storage)
    connection.get_root()["gadget"] = app_module.Gadget()
    connection.commit()
    del sys.modules["oldapp"]

    renames = {"oldapp.Gadget": f"{__name__}.Renamed"}
    for serializer in ("pickle", "msgspec"):
        connection = Connection(storage, renames=renames, serializer=serializer)
        assert type(connection.get_root()["gadget"]) is Renamed
        connection.get_root()._p_note_change()
        connection.commit()


@pytest.mark.parametrize("serializer", ["pickle", "msgspec", "dill"])
def test_a_reference_to_a_found_class_whose_record_names_a_missing_one(
    app_module: Any, serializer: str
) -> None:
    # What a half-done rename leaves: references name Gadget, the record does not.
    from dhruva.record import pack_record, unpack_record
    from dhruva.serializer import SerializationError

    storage = MemoryStorage()
    connection = Connection(storage, serializer=serializer)
    connection.get_root()["gadget"] = gadget = app_module.Gadget()
    gadget.size = 3
    connection.commit()
    oid = gadget._p_oid
    _oid, data, refs = unpack_record(storage.load(oid))
    for old, new in ((b"oldapp\nGadget", b"oldapp\nGizmo_"), (b":Gadget", b":Gizmo_")):
        data = data.replace(old, new)
    data = data.replace(b"\x8c\x06Gadget", b"\x8c\x06Gizmo_")  # dill, protocol 4
    storage.records[oid] = pack_record(oid, data, refs)

    root = Connection(storage).get_root()
    with pytest.raises(SerializationError) as raised:
        root["gadget"].size  # noqa: B018
    assert "oldapp.Gizmo_, which cannot be found" in str(raised.value)
    assert "name oldapp.Gadget" in str(raised.value)
