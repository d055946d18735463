from importlib.metadata import entry_points

from dhruva import _sqlite_plugin
from dhruva.plugins import Plugins, get_plugin_manager
from dhruva.record import ROOT_OID, unpack_record
from dhruva.sqlite_storage import SqliteStorage
from dhruva.storage_testing import commit, make_record


def only_sqlite() -> Plugins:
    pm = get_plugin_manager()
    pm.register(_sqlite_plugin, name="sqlite")
    return Plugins(pm)


def test_registers_the_sqlite_kind():
    kind = only_sqlite().storages["sqlite"]
    assert kind.file_based
    assert kind.distribution == "dhruva-sqlite"
    assert kind.plugin == "sqlite"
    assert "SQLite" in kind.description


def test_opens_and_recognizes_a_sqlite_file(tmp_path):
    plugins = only_sqlite()
    path = tmp_path / "db"
    storage = plugins.open_storage(path, "sqlite")
    assert isinstance(storage, SqliteStorage)
    commit(storage, make_record(storage.new_oid(), b"root"))
    storage.close()

    assert plugins.recognize(str(path)) == "sqlite"
    with plugins.open_storage(path, readonly=True) as reopened:
        assert isinstance(reopened, SqliteStorage)
        assert reopened.readonly
        assert unpack_record(reopened.load(ROOT_OID))[1] == b"root"


def test_does_not_claim_other_files():
    assert (
        _sqlite_plugin.dhruva_recognize_storage(path="x", header=b"SHELF-1\n") is None
    )
    assert _sqlite_plugin.dhruva_recognize_storage(path="x", header=b"SQLite") is None


def test_installed_entry_point_is_this_plugin():
    (entry_point,) = entry_points(group="dhruva", name="sqlite")
    assert entry_point.load() is _sqlite_plugin


def test_a_connection_given_a_path_opens_a_sqlite_file_with_this_storage(tmp_path):
    from dhruva.connection import Connection

    path = tmp_path / "db"
    with Connection(SqliteStorage(path)) as connection:
        connection.get_root()["answer"] = 42
        connection.commit()

    with Connection(str(path)) as connection:
        assert isinstance(connection.get_storage(), SqliteStorage)
        assert connection.get_root()["answer"] == 42
