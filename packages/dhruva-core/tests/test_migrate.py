"""Rewriting the records of renamed classes."""

from __future__ import annotations

import sys
import types

from dhruva.connection import Connection
from dhruva.migrate import migrate, oids_to_migrate
from dhruva.persistent import Persistent
from dhruva.storage import MemoryStorage, get_census


class NewThing(Persistent):
    pass


def test_migrate_rewrites_only_the_records_that_name_an_old_class() -> None:
    module = types.ModuleType("legacy")
    exec(
        "from dhruva.persistent import Persistent\nclass Thing(Persistent): pass",
        vars(module),
    )
    sys.modules["legacy"] = module
    try:
        storage = MemoryStorage()
        connection = Connection(storage)
        root = connection.get_root()
        root["things"] = [module.Thing() for _ in range(3)]
        root["unrelated"] = NewThing()
        connection.commit()
    finally:
        del sys.modules["legacy"]

    renames = {"legacy.Thing": f"{__name__}.NewThing"}
    connection = Connection(storage, renames=renames)
    oids = oids_to_migrate(connection)
    assert len(oids) == 4  # the three things and the root that refers to them
    seen: list[int] = []
    assert migrate(connection, oids, progress=seen.append) == 4
    assert seen == [1, 1, 1, 1]
    assert get_census(storage) == {
        "dhruva.persistent_dict.PersistentDict": 1,
        f"{__name__}.NewThing": 4,
    }
    assert oids_to_migrate(Connection(storage, renames=renames)) == []
    things = Connection(storage).get_root()["things"]
    assert [type(thing) for thing in things] == [NewThing] * 3
