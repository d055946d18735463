import pytest

from dhruva.hookspecs import hookimpl
from dhruva.plugins import Plugins, get_plugin_manager, load_plugins
from dhruva.registry import PluginError, StorageKind


def test_installed_plugins_register_the_built_in_storages():
    plugins = Plugins()
    assert {"core", "file", "sqlite", "net"} <= set(plugins.plugin_names())
    assert {"memory", "file", "sqlite"} <= set(plugins.storages.names())
    assert plugins.storages["memory"].plugin == "core"


def test_unknown_storage_lists_installed_ones_and_closest_match():
    with pytest.raises(PluginError) as info:
        Plugins().get_storage_kind("sqlit")
    message = str(info.value)
    assert "'sqlit'" in message and "memory" in message
    assert "did you mean 'sqlite'" in message


def test_missing_distribution_is_named_for_its_storage():
    pm = get_plugin_manager()
    from dhruva import _core_plugin

    pm.register(_core_plugin, name="core")
    plugins = Plugins(pm)
    with pytest.raises(PluginError, match="pip install dhruva-sqlite"):
        plugins.get_storage_kind("sqlite")


def test_file_kind_is_recognized_from_its_first_bytes(tmp_path):
    plugins = Plugins()
    sqlite_file = tmp_path / "x"
    sqlite_file.write_bytes(b"SQLite format 3\0" + b"\0" * 100)
    assert plugins.recognize(str(sqlite_file)) == "sqlite"
    assert plugins.recognize(str(tmp_path / "missing")) is None
    other = tmp_path / "notes.txt"
    other.write_bytes(b"hello world")
    with pytest.raises(PluginError, match="notes.txt"):
        plugins.recognize(str(other))


class _Duplicate:
    @hookimpl
    def dhruva_register_storages(self, registry):
        registry.add(StorageKind(name="memory", open=lambda path, **kw: None))


def test_a_duplicate_storage_name_names_both_plugins():
    pm = load_plugins(get_plugin_manager())
    pm.register(_Duplicate(), name="copycat")
    with pytest.raises(PluginError) as info:
        Plugins(pm).storages  # noqa: B018
    assert "'core'" in str(info.value) and "'copycat'" in str(info.value)
