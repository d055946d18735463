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
