"""Serializers as plugins: tags, choosing one, missing libraries, refusals."""

from __future__ import annotations

import datetime
import pickle
import sys
from decimal import Decimal

import dhruva._core_plugin
import pytest
from click.testing import CliRunner
from dhruva.cli import make_cli
from dhruva.connection import Connection
from dhruva.persistent import Persistent
from dhruva.persistent_dict import PersistentDict
from dhruva.plugins import Plugins, get_plugin_manager
from dhruva.record import ROOT_OID, pack_record, unpack_record
from dhruva.registry import PluginError
from dhruva.serialize import extract_class_name
from dhruva.serializer import (
    MissingSerializerError,
    SerializationError,
    make_tag,
    split_tagged,
)
from dhruva.storage import MemoryStorage, get_census


class Thing(Persistent):
    pass


def core_plugins() -> Plugins:
    pm = get_plugin_manager()
    pm.register(dhruva._core_plugin, "core")
    return Plugins(pm)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_no_pickle_starts_with_a_tag(protocol: int) -> None:
    values: list[object] = [None, 1, "s", b"b", (1,), [1], {1: 2}, {1}, Thing]
    values += [datetime.date(2020, 1, 1), PersistentDict, 2**100, 1.5, Decimal(1)]
    for value in values:
        assert pickle.dumps(value, protocol)[:1] != b"\0"
    for name in ("msgspec", "dill"):
        assert make_tag(name)[:1] == b"\0"


def test_pickle_records_keep_the_durus_layout() -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="pickle")
    connection.get_root()["x"] = 1
    connection.commit()
    data = unpack_record(storage.load(ROOT_OID))[1]
    assert data.startswith(b"\x80\x02cdurus.persistent_dict\nPersistentDict\n")


def test_plugins_command_lists_the_three_serializers() -> None:
    result = CliRunner().invoke(make_cli(core_plugins()), ["plugins"])
    assert result.exit_code == 0, result.output
    text = " ".join(" ".join(line.split()) for line in result.stdout.splitlines())
    assert "serializer pickle pickle, Durus-compatible records" in text
    assert "serializer msgspec msgpack of exact plain types" in text
    assert "serializer dill dill: also functions" in text


def test_tagged_records_name_their_class_without_the_library() -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="msgspec")
    connection.get_root()["thing"] = Thing()
    connection.commit()
    data = unpack_record(storage.load(ROOT_OID))[1]
    assert split_tagged(data)[:2] == (
        "msgspec",
        "dhruva.persistent_dict:PersistentDict",
    )
    assert extract_class_name(storage.load(ROOT_OID)) == (
        "dhruva.persistent_dict.PersistentDict"
    )
    assert get_census(storage) == {
        "dhruva.persistent_dict.PersistentDict": 1,
        f"{__name__}.Thing": 1,
    }


def test_unknown_serializer_name_lists_the_installed_ones() -> None:
    with pytest.raises(PluginError) as raised:
        Connection(MemoryStorage(), serializer="yaml")
    assert "no serializer called 'yaml'" in str(raised.value)
    assert "dill, msgspec, pickle" in str(raised.value)


@pytest.mark.parametrize("name", ["msgspec", "dill"])
def test_missing_library_when_writing_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setitem(sys.modules, name, None)
    storage = MemoryStorage()
    with pytest.raises(MissingSerializerError) as raised:
        Connection(storage, serializer=name)
    assert f"serializer {name!r} needs the {name} library" in str(raised.value)
    assert f"pip install 'dhruva-core[{name}]'" in str(raised.value)
    assert storage.get_size() == 0


@pytest.mark.parametrize("name", ["msgspec", "dill"])
def test_missing_library_when_reading_names_serializer_and_install(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    storage = MemoryStorage()
    writer = Connection(storage, serializer=name)
    writer.get_root()["thing"] = Thing()
    writer.commit()

    monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingSerializerError) as raised:
        Connection(storage).get_root()["thing"]
    message = str(raised.value)
    assert f"serializer {name!r} needs the {name} library" in message
    assert f"pip install 'dhruva-core[{name}]'" in message


def test_record_of_a_serializer_nobody_registered() -> None:
    storage = MemoryStorage()
    storage.new_oid()
    storage.begin()
    data = make_tag("frob") + b"dhruva.persistent_dict:PersistentDict\0..."
    storage.store(ROOT_OID, pack_record(ROOT_OID, data, b""))
    storage.end()
    with pytest.raises(MissingSerializerError) as raised:
        Connection(storage)
    assert "written by serializer 'frob', which is not installed" in str(raised.value)


def test_a_connection_writes_with_its_serializer_and_reads_every_one() -> None:
    storage = MemoryStorage()
    for name in ["msgspec", "pickle", "dill"]:
        connection = Connection(storage, serializer=name)
        connection.get_root()[name] = thing = Thing()
        thing.by = name
        connection.commit()
    starts = {unpack_record(record)[1][:9] for _oid, record in storage.gen_oid_record()}
    assert {start[:3] for start in starts} == {b"\0ms", b"\0di", b"\x80\x02c"}
    root = Connection(storage).get_root()
    assert {name: root[name].by for name in root} == {
        "msgspec": "msgspec",
        "pickle": "pickle",
        "dill": "dill",
    }


def test_refused_commit_writes_nothing_and_new_objects_stay_new() -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer="msgspec")
    root = connection.get_root()
    root["a"] = 1
    connection.commit()
    before = dict(storage.records)

    root["first"] = first = Thing()
    first.second = second = Thing()
    second.bad = object()
    with pytest.raises(SerializationError) as raised:
        connection.commit()
    assert f"{__name__}.Thing oid" in str(raised.value)
    assert "attribute 'bad'" in str(raised.value)
    assert "builtins.object" in str(raised.value)
    assert storage.records == before
    assert first._p_oid is None and second._p_oid is None

    second.bad = "fixed"
    connection.commit()
    again = Connection(storage).get_root()
    assert again["first"].second.bad == "fixed"


def test_client_command_writes_with_the_serializer_given() -> None:
    script = (
        "root['x'] = (1, 2)\nconnection.commit()\n"
        "print(connection.storage.load(b'\\0' * 8)[12:21])\n"
    )
    result = CliRunner().invoke(
        make_cli(core_plugins()),
        ["-c", "--storage", "memory", "--serializer", "msgspec"],
        input=script,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "b'\\x00msgspec\\x00'\n"


def test_client_command_refuses_an_unknown_serializer() -> None:
    result = CliRunner().invoke(
        make_cli(core_plugins()),
        ["-c", "--storage", "memory", "--serializer", "yaml"],
    )
    assert result.exit_code == 2
    assert "no serializer called 'yaml'" in result.output


@pytest.mark.parametrize("name", ["", "a\0b", "naïve", "two\nlines"])
def test_serializer_names_must_fit_a_tag(name: str) -> None:
    from dhruva.registry import SerializerKind, SerializerRegistry

    registry = SerializerRegistry()
    registry.current_plugin = "myplugin"
    with pytest.raises(PluginError, match="plugin 'myplugin' registers a serializer"):
        registry.add(SerializerKind(name=name, factory=lambda: None))


@pytest.mark.parametrize("name", ["pickle", "msgspec", "dill"])
def test_records_list_their_references_so_pack_keeps_them(name: str) -> None:
    storage = MemoryStorage()
    connection = Connection(storage, serializer=name)
    root = connection.get_root()
    kept, dropped, deep = Thing(), Thing(), Thing()
    root["keys"] = {(1, kept): "a key", "x": [({"deep": deep},)]}
    root["dropped"] = dropped
    kept.self = kept
    connection.commit()
    refs = unpack_record(storage.load(ROOT_OID))[2]
    oids = {kept._p_oid, dropped._p_oid, deep._p_oid}
    assert {refs[i : i + 8] for i in range(0, len(refs), 8)} == oids
    assert unpack_record(storage.load(kept._p_oid))[2] == b""  # not itself

    del root["dropped"]
    connection.commit()
    connection.pack()
    assert storage.get_size() == 3
    again = Connection(storage).get_root()
    assert again["keys"]["x"][0][0]["deep"]._p_oid == deep._p_oid
