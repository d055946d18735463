"""``dhruva convert`` between the installed storages: file, file2 and sqlite.

Every pair of kinds, from Durus-written files and from dhruva-written ones.
After a conversion the new database reads the same objects and takes new
commits at once, and no new object lands on a copied oid (Durus's SQLite
bulk import left its counter at zero, so the next object overwrote the root).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dhruva.cli import make_cli
from dhruva.connection import Connection
from dhruva.hookspecs import hookimpl
from dhruva.persistent_dict import PersistentDict
from dhruva.persistent_list import PersistentList
from dhruva.plugins import (
    Plugins,
    get_plugin_manager,
    get_plugins,
    load_plugins,
    open_storage,
)
from dhruva.record import ROOT_OID
from dhruva.registry import StorageKind

FIXTURES = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "durus-4"
)
DURUS_FILES = {
    "file": "legacy-shelf.durus",
    "file2": "legacy-filestorage2.dfs20",
    "sqlite": "legacy-sqlite.sqlite",
}
KINDS = sorted(DURUS_FILES)

needs_fixtures = pytest.mark.skipif(
    not FIXTURES.exists(),
    reason=f"the Durus fixtures are not there ({FIXTURES}); they come with the "
    "shared folder next to the checkout",
)


def convert(*args: str) -> Any:
    return CliRunner().invoke(make_cli(), ["convert", *args])


def all_records(path: Path) -> dict[bytes, bytes]:
    with open_storage(path, readonly=True) as storage:
        return dict(storage.gen_oid_record())


def add_and_check(path: Path) -> None:
    """Commit new objects into ``path``; every old record must be unchanged."""
    old = all_records(path)
    connection = Connection(path)
    try:
        root = connection.get_root()
        root["added"] = PersistentList(PersistentDict(n=n) for n in range(300))
        connection.commit()
        root["added"][7]["n"] = "changed"
        root["more"] = PersistentDict(x=1)
        connection.commit()
    finally:
        connection.close()

    new = all_records(path)
    assert {oid for oid in old if new[oid] != old[oid]} == {ROOT_OID}
    assert len(new) == len(old) + 302
    connection = Connection(path)
    try:
        root = connection.get_root()
        assert [d["n"] for d in root["added"]][6:9] == [6, "changed", 8]
        assert root["more"]["x"] == 1
    finally:
        connection.close()


@pytest.fixture
def legacy_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(FIXTURES))
    yield
    sys.modules.pop("legacy_model", None)


def manifest_values(path: Path) -> dict[str, Any]:
    connection = Connection(open_storage(path, readonly=True))
    try:
        root = connection.get_root()
        numbers = root["numbers"]
        return {
            "root_keys": sorted(root.keys()),
            "counter": root["counter"].value,
            "people_len": len(root["people"]),
            "by_name_len": len(root["by_name"]),
            "numbers_len": len(numbers),
            "numbers_sum": sum(numbers.values()),
            "evens": sorted(root["evens"]),
            "log": list(root["log"]),
            "blob_sha256": hashlib.sha256(root["blob"]).hexdigest(),
        }
    finally:
        connection.close()


# --- Durus files into every kind ---------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("target", KINDS)
@pytest.mark.parametrize("origin", KINDS)
def test_durus_files_convert_to_every_kind(origin, target, tmp_path, legacy_model):
    src = tmp_path / DURUS_FILES[origin]
    shutil.copyfile(FIXTURES / DURUS_FILES[origin], src)
    original = src.read_bytes()
    dst = tmp_path / f"converted.{target}"

    result = convert(str(src), str(dst), "--storage", target)
    assert result.exit_code == 0, result.output
    assert f"({target})" in result.output
    assert get_plugins().recognize(str(dst)) == target
    assert src.read_bytes() == original

    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    expected = manifest[DURUS_FILES[origin]]
    values = manifest_values(dst)
    assert values == {key: expected[key] for key in values}

    # Unreachable records (ten deleted people) are left behind.
    with open_storage(src, readonly=True) as source:
        reachable = {oid for oid, _r in source.gen_oid_record(start_oid=ROOT_OID)}
        assert (source.get_size() or 0) > len(reachable)
        copied = dict(source.gen_oid_record(start_oid=ROOT_OID))
    assert all_records(dst) == copied

    add_and_check(dst)


# --- dhruva files, and the rules of the command ------------------------------


@pytest.fixture
def made(tmp_path: Path) -> Path:
    path = tmp_path / "made.durus"
    connection = Connection(path)
    try:
        root = connection.get_root()
        root["people"] = PersistentList(PersistentDict(name=f"p{n}") for n in range(50))
        connection.commit()
        del root["people"][10:20]  # unreachable now
        connection.commit()
    finally:
        connection.close()
    return path


@pytest.mark.parametrize("target", KINDS)
def test_a_dhruva_file_converts_and_back(made, target, tmp_path):
    there = tmp_path / f"there.{target}"
    back = tmp_path / "back.durus"
    assert convert(str(made), str(there), "--storage", target).exit_code == 0
    result = convert(str(there), str(back))
    assert result.exit_code == 0, result.output
    assert "(file)" in result.output  # the default kind
    with open_storage(made, readonly=True) as source:
        reachable = dict(source.gen_oid_record(ROOT_OID))
    assert all_records(back) == reachable
    add_and_check(back)


def test_from_storage_names_the_source_kind(made, tmp_path):
    dst = tmp_path / "dst.sqlite"
    result = convert(
        str(made), str(dst), "--from-storage", "file", "--storage", "sqlite"
    )
    assert result.exit_code == 0, result.output
    wrong = convert(str(made), str(tmp_path / "x"), "--from-storage", "sqlite")
    assert wrong.exit_code == 1
    assert "not a SQLite database" in wrong.output
    assert not (tmp_path / "x").exists()


def test_an_existing_database_is_refused_and_left_alone(made, tmp_path):
    dst = tmp_path / "dst"
    assert convert(str(made), str(dst)).exit_code == 0
    before = dst.read_bytes()
    result = convert(str(made), str(dst), "--storage", "sqlite")
    assert result.exit_code == 1
    assert f"{dst} exists and is not empty" in result.output
    assert dst.read_bytes() == before

    result = convert(str(made), str(made))
    assert result.exit_code == 1
    assert "is the source itself" in result.output


@pytest.mark.parametrize("target", KINDS)
def test_an_empty_existing_file_is_filled(made, target, tmp_path):
    dst = tmp_path / "empty"
    dst.touch()
    result = convert(str(made), str(dst), "--storage", target)
    assert result.exit_code == 0, result.output
    add_and_check(dst)


def test_an_unknown_kind_lists_the_installed_ones(made, tmp_path):
    result = convert(str(made), str(tmp_path / "x"), "--storage", "sqlit")
    assert result.exit_code == 2
    assert "sqlite" in result.output
    assert not (tmp_path / "x").exists()


def test_a_kind_that_keeps_no_file_is_refused_as_destination(made, tmp_path):
    result = convert(str(made), str(tmp_path / "x"), "--storage", "memory")
    assert result.exit_code == 1
    assert "keeps no file" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made.durus"]


def test_a_missing_source_is_an_error_and_creates_nothing(tmp_path):
    result = convert(str(tmp_path / "missing"), str(tmp_path / "dst"))
    assert result.exit_code == 1
    assert "missing" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_source_damaged_in_the_middle_is_refused(tmp_path):
    from dhruva.file_history import list_transactions
    from dhruva.file_storage import FileStorage

    src, dst = tmp_path / "src.dhruva", tmp_path / "dst.sqlite"
    connection = Connection(FileStorage(src, format="dhruva"))
    root = connection.get_root()
    for n in range(6):
        root[n] = PersistentDict(n=n)
        connection.commit()
    connection.close()
    spans = list_transactions(src)
    data = bytearray(src.read_bytes())
    data[(spans[2].start + spans[2].end) // 2] ^= 0x10  # commits follow it
    src.write_bytes(bytes(data))

    result = convert(str(src), str(dst))
    assert result.exit_code == 1, result.output
    assert f"{src} is damaged at byte offset {spans[2].start}" in result.output
    assert "Restore" in result.output
    assert not dst.exists()


def test_a_failed_conversion_removes_what_it_wrote(made, tmp_path):
    # A source record that refers to an oid it does not hold fails the copy.
    broken = tmp_path / "broken.durus"
    with Connection(broken) as connection:
        connection.get_root()["x"] = PersistentDict()
        connection.commit()
    with open_storage(broken) as storage:
        from dhruva.record import pack_record, unpack_record

        _oid, data, refs = unpack_record(storage.load(ROOT_OID))
        storage.begin()
        missing = (999).to_bytes(8, "big")
        storage.store(ROOT_OID, pack_record(ROOT_OID, data, refs + missing))
        storage.end()
    for target in KINDS:
        dst = tmp_path / f"dst.{target}"
        result = convert(str(broken), str(dst), "--storage", target)
        assert result.exit_code != 0
        assert not dst.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("dst")]


def test_piped_output_has_no_progress_bar(made, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dhruva.cli", "convert", str(made), str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"converted {made}")


def test_a_terminal_gets_a_progress_bar(made, tmp_path, on_a_terminal):
    proc, seen = on_a_terminal(["convert", str(made), str(tmp_path / "d")])
    assert proc.returncode == 0
    assert b"copying" in seen and b"100%" in seen
    assert proc.stdout.startswith("converted")


# --- the kind of DST from its name, and the oid counter ---------------------------


@pytest.mark.parametrize("name", ["new.sqlite", "new.sqlite3", "new.db", "NEW.DB"])
def test_a_sqlite_name_makes_a_sqlite_database(made, tmp_path, name):
    dst = tmp_path / name
    result = convert(str(made), str(dst))
    assert result.exit_code == 0, result.output
    assert "(sqlite)" in result.output
    assert dst.read_bytes().startswith(b"SQLite format 3\0")
    add_and_check(dst)


def test_another_name_makes_a_dhruva_file_and_storage_wins(made, tmp_path):
    result = convert(str(made), str(tmp_path / "new.durus"))
    assert result.exit_code == 0, result.output
    assert get_plugins().recognize(str(tmp_path / "new.durus")) == "file"

    dst = tmp_path / "odd.db"
    result = convert(str(made), str(dst), "--storage", "file2")
    assert result.exit_code == 0, result.output
    assert get_plugins().recognize(str(dst)) == "file2"


class ClaimsDb:
    """A plugin whose storage kind claims the .db ending too."""

    @hookimpl
    def dhruva_register_storages(self, registry: Any) -> None:
        registry.add(
            StorageKind("otherdb", open=lambda *a, **k: None, suffixes=(".db",))
        )


def plugins_with(*plugins: object, without: tuple[str, ...] = ()) -> Plugins:
    pm = load_plugins(get_plugin_manager())
    for name in without:
        pm.unregister(name=name)
    for plugin in plugins:
        pm.register(plugin)
    return Plugins(pm)


def test_an_ending_claimed_by_two_kinds_is_refused(made, tmp_path):
    cli = make_cli(plugins_with(ClaimsDb()))
    dst = tmp_path / "new.db"
    result = CliRunner().invoke(cli, ["convert", str(made), str(dst)])
    assert result.exit_code == 1
    assert "otherdb, sqlite" in result.output and "--storage" in result.output
    assert not dst.exists()

    chosen = CliRunner().invoke(
        cli, ["convert", str(made), str(dst), "--storage", "sqlite"]
    )
    assert chosen.exit_code == 0, chosen.output


def test_a_sqlite_name_without_the_sqlite_plugin_is_refused(made, tmp_path):
    cli = make_cli(plugins_with(without=("sqlite",)))
    dst = tmp_path / "new.sqlite"
    result = CliRunner().invoke(cli, ["convert", str(made), str(dst)])
    assert result.exit_code == 1
    assert "pip install dhruva-sqlite" in result.output
    assert "--storage" in result.output
    assert not dst.exists()


def new_oids(path: Path, count: int = 5) -> list[int]:
    with open_storage(path) as storage:
        return [int.from_bytes(storage.new_oid(), "big") for _ in range(count)]


@pytest.mark.parametrize("origin", ["sqlite", "file"])
def test_oids_a_pack_removed_are_not_handed_out_by_the_copy(tmp_path, origin):
    src = tmp_path / f"src.{origin}"
    connection = Connection(open_storage(src, origin))
    root = connection.get_root()
    root["kept"] = PersistentDict(n=1)
    connection.commit()
    root["dropped"] = PersistentList(PersistentDict() for _ in range(40))
    connection.commit()
    dropped = max(int.from_bytes(d._p_oid, "big") for d in root["dropped"])
    del root["dropped"]
    connection.commit()
    connection.pack()
    connection.close()

    dst = tmp_path / "dst.sqlite"
    result = convert(str(src), str(dst))
    assert result.exit_code == 0, result.output
    with open_storage(dst, readonly=True) as copy:
        assert copy.get_size() == 2  # the root and "kept"
    assert min(new_oids(dst)) > dropped
