"""Rewriting the records of renamed classes."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from dhruva.connection import Connection
from dhruva.migrate import MigrationError, migrate, oids_to_migrate
from dhruva.persistent import Persistent
from dhruva.record import unpack_record
from dhruva.serializer import tagged_serializer_name
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


@pytest.fixture
def app_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Modules ``migapp_v1`` (Customer, Money) and ``migapp_v2`` (Client, Money).

    Only v1 is imported; v2 is importable from ``tmp_path``.
    """
    body = (
        "from dhruva.persistent import Persistent\n"
        "class {0}(Persistent):\n"
        "    def __init__(self, name):\n"
        "        self.name = name\n"
        "class Money:\n"
        "    def __init__(self, cents):\n"
        "        self.cents = cents\n"
    )
    (tmp_path / "migapp_v1.py").write_text(body.format("Customer"))
    (tmp_path / "migapp_v2.py").write_text(body.format("Client"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("migapp_v1", "migapp_v2"):
        module = sys.modules.pop(name, None)
        for cls in vars(module).values() if module else ():
            if isinstance(cls, type):
                cls.__module__ = "gone"  # no later test may find it as loaded


def _write_v1(serializer: str, with_money: bool = False) -> MemoryStorage:
    import migapp_v1  # type: ignore[import-not-found]
    from dhruva.persistent_list import PersistentList

    storage = MemoryStorage()
    connection = Connection(storage, serializer=serializer)
    root = connection.get_root()
    root["cust"] = customer = migapp_v1.Customer("ann")
    root["list"] = PersistentList([customer])
    if with_money:
        customer.price = migapp_v1.Money(5)
    if serializer == "dill":
        customer.rate = lambda hours: hours * 3
    connection.commit()

    # The old module is gone from the process and cannot be imported.
    del sys.modules["migapp_v1"]
    migapp_v1.Customer.__module__ = "gone"
    return storage


def _serializers(storage: MemoryStorage) -> set[str]:
    return {
        tagged_serializer_name(unpack_record(record)[1]) or "pickle"
        for record in storage.records.values()
    }


RENAMES = {
    "migapp_v1.Customer": "migapp_v2.Client",
    "migapp_v1.Money": "migapp_v2.Money",
}


@pytest.mark.parametrize("serializer", ["pickle", "msgspec", "dill"])
def test_migrate_imports_the_new_classes_and_keeps_each_serializer(
    app_versions: Path, serializer: str
) -> None:
    storage = _write_v1(serializer, with_money=serializer != "msgspec")
    assert "migapp_v2" not in sys.modules

    connection = Connection(storage, renames=RENAMES)
    oids = oids_to_migrate(connection)
    assert len(oids) == 3  # the customer, the root and the list naming it
    assert migrate(connection, oids) == 3
    assert _serializers(storage) == {serializer}

    import migapp_v2  # type: ignore[import-not-found]

    root = Connection(storage).get_root()
    assert type(root["cust"]) is migapp_v2.Client
    assert root["cust"].name == "ann"
    assert root["list"][0] is root["cust"]
    if serializer != "msgspec":
        assert type(root["cust"].price) is migapp_v2.Money
    if serializer == "dill":
        assert root["cust"].rate(2) == 6
    assert oids_to_migrate(Connection(storage, renames=RENAMES)) == []


def test_migrate_refuses_a_new_class_that_cannot_be_found(
    app_versions: Path,
) -> None:
    storage = _write_v1("msgspec")
    before = dict(storage.records)
    connection = Connection(storage, renames={"migapp_v1.Customer": "migapp_v2.Clinet"})
    with pytest.raises(MigrationError) as raised:
        migrate(connection)
    assert "migapp_v2.Clinet (module migapp_v2 has no Clinet)" in str(raised.value)
    assert "nothing was rewritten" in str(raised.value)
    assert storage.records == before


def test_migrate_converts_when_asked(app_versions: Path) -> None:
    storage = _write_v1("msgspec")
    connection = Connection(storage, renames=RENAMES)
    oids = oids_to_migrate(connection)
    migrate(connection, oids, convert=True)  # to the connection's pickle
    assert _serializers(storage) == {"pickle"}


def test_migrate_finds_a_plain_value_of_an_old_class_in_a_dill_record(
    app_versions: Path,
) -> None:
    import migapp_v1

    storage = MemoryStorage()
    connection = Connection(storage, serializer="dill")
    connection.get_root()["thing"] = thing = NewThing()
    thing.price = migapp_v1.Money(5)
    connection.commit()

    renames = {"migapp_v1.Money": "migapp_v2.Money"}
    assert oids_to_migrate(Connection(storage, renames=renames)) == [thing._p_oid]
    assert migrate(Connection(storage, renames=renames)) == 1
    import migapp_v2

    price = Connection(storage).get_root()["thing"].price
    assert type(price) is migapp_v2.Money and price.cents == 5
    assert _serializers(storage) == {"dill"}


def test_migrate_imports_the_classes_of_msgspec_records_it_rewrites(
    app_versions: Path,
) -> None:
    # A holder of an importable module not imported yet refers to a customer.
    (app_versions / "migapp_common.py").write_text(
        "from dhruva.persistent import Persistent\nclass Holder(Persistent): pass\n"
    )
    import migapp_common  # type: ignore[import-not-found]

    storage = _write_v1("msgspec")
    connection = Connection(storage, serializer="msgspec")
    holder = connection.get_root()["holder"] = migapp_common.Holder()
    holder.who = connection.get_root()["cust"]
    connection.commit()
    del sys.modules["migapp_common"]
    migapp_common.Holder.__module__ = "gone"

    try:
        connection = Connection(storage, renames=RENAMES)
        assert migrate(connection) == 4
        import migapp_v2

        root = Connection(storage).get_root()
        assert type(root["holder"]).__name__ == "Holder"
        assert type(root["holder"].who) is migapp_v2.Client
    finally:
        module = sys.modules.pop("migapp_common", None)
        if module is not None:
            module.Holder.__module__ = "gone"


class PlainThing:
    pass


def test_migrate_refuses_a_plain_class_for_stored_objects() -> None:
    module = types.ModuleType("legacy_plain")
    exec(
        "from dhruva.persistent import Persistent\nclass Thing(Persistent): pass",
        vars(module),
    )
    sys.modules["legacy_plain"] = module
    try:
        storage = MemoryStorage()
        connection = Connection(storage)
        connection.get_root()["thing"] = module.Thing()
        connection.commit()
    finally:
        del sys.modules["legacy_plain"]
    records = dict(storage.records)

    renames = {"legacy_plain.Thing": f"{__name__}.PlainThing"}
    with pytest.raises(MigrationError, match="not a persistent class"):
        migrate(Connection(storage, renames=renames))
    assert storage.records == records
