"""`dhruva verify`, `dhruva info` and `dhruva backup` on real files and servers."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from dhruva.cli import make_cli
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.persistent import Persistent
from dhruva.persistent_dict import PersistentDict
from dhruva.persistent_list import PersistentList
from dhruva.plugins import open_storage
from dhruva.record import ROOT_OID
from dhruva.storage import MemoryStorage, Storage

#: Storage kinds, and "dhruva": the file kind in its checked DHRUVA1 format.
KINDS = ["file", "dhruva", "file2", "sqlite"]


def open_db(path: Path | str, kind: str) -> Storage:
    if kind == "dhruva":
        return FileStorage(path, format="dhruva")
    return open_storage(path, kind)


class Thing(Persistent):
    """An application object; verify never needs to import it."""


def run(*args: str) -> Result:
    return CliRunner().invoke(make_cli(), list(args), prog_name="dhruva")


def make_database(path: Path, kind: str, objects: int = 30) -> None:
    """A root with a list of small lists, and a few commits after it."""
    connection = Connection(open_db(path, kind))
    root = connection.get_root()
    root["items"] = PersistentList(PersistentList([i]) for i in range(objects))
    connection.commit()
    for i in range(3):
        root["n"] = i
        connection.commit()
    connection.close()


def read_values(path: Path, kind: str | None = None) -> tuple[int, list[int]]:
    storage = open_storage(path, kind, readonly=True)
    connection = Connection(storage)
    root = connection.get_root()
    result = (root["n"], [item[0] for item in root["items"]])
    connection.close()
    return result


# --- verify ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_verify_a_sound_database(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"db.{kind}"
    make_database(path, kind)

    result = run("verify", str(path))
    assert result.exit_code == 0, result.output
    assert "sound" in result.output and "32 records" in result.output

    report = json.loads(run("verify", "--json", str(path)).stdout)
    assert report["sound"] is True
    assert (report["records"], report["reachable"], report["unreachable"]) == (
        32,
        32,
        0,
    )


def test_verify_counts_unreachable_records(tmp_path: Path) -> None:
    path = tmp_path / "db.durus"
    make_database(path, "file")
    connection = Connection(FileStorage(path))
    del connection.get_root()["items"][:10]
    connection.commit()
    connection.close()

    report = json.loads(run("verify", "--json", str(path)).stdout)
    assert report["sound"] is True
    assert (report["reachable"], report["unreachable"]) == (22, 10)


def _database_missing_one_object(path: Path) -> tuple[int, int]:
    """A file whose Thing refers to a friend that has no record.

    :return: the missing oid and the oid of the Thing holding it.
    """
    memory = MemoryStorage()
    connection = Connection(memory)
    thing = Thing()
    thing.friends = [Thing(), Thing()]
    thing.name = "holder"
    connection.get_root()["thing"] = thing
    connection.commit()
    victim = thing.friends[1]._p_oid
    assert victim is not None and thing._p_oid is not None

    storage = FileStorage(path)
    storage.begin()
    for oid, record in memory.records.items():
        if oid != victim:
            storage.store(oid, record)
    storage.end()
    storage.close()
    return int.from_bytes(victim, "big"), int.from_bytes(thing._p_oid, "big")


def test_verify_names_the_holder_and_attribute_of_a_dangling_reference(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.durus"
    missing, holder = _database_missing_one_object(path)

    result = run("verify", str(path))
    assert result.exit_code == 1
    assert "NOT SOUND" in result.output
    assert f"oid {missing} has no record" in result.output
    assert f"oid {holder} (" in result.output and "Thing) at .friends[1]" in (
        result.output
    )

    report = json.loads(run("verify", "--json", str(path)).stdout)
    assert report["sound"] is False
    [dangling] = report["dangling"]
    assert dangling["oid"] == missing
    [found] = dangling["holders"]
    assert found["oid"] == holder
    assert found["class"].endswith("Thing")
    assert found["attributes"] == [".friends[1]"]


def test_verify_reports_a_damaged_record_by_oid_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "db.durus"
    connection = Connection(FileStorage(path, format="durus"))
    root = connection.get_root()
    root["items"] = PersistentList(PersistentList([f"marker-{i}"]) for i in range(5))
    connection.commit()
    damaged_oid = root["items"][3]._p_oid
    assert damaged_oid is not None
    connection.pack()  # records in the packed part are checked when read
    connection.close()

    # Overwrite the oid at the start of that object's record.
    data = bytearray(path.read_bytes())
    at = data.index(b"marker-3")
    start = data.rindex(damaged_oid, 0, at)
    data[start : start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))

    result = run("verify", str(path))
    assert result.exit_code == 1, result.output
    number = int.from_bytes(damaged_oid, "big")
    assert f"oid {number}: {path}: the record of oid {number} at byte offset" in (
        result.output
    )
    report = json.loads(run("verify", "--json", str(path)).stdout)
    assert [d["oid"] for d in report["damaged"]] == [number]
    assert report["complete"] is False and report["unreachable"] is None


def test_verify_checks_every_checksum_of_the_checked_format(tmp_path: Path) -> None:
    path = tmp_path / "db.dhruva"
    connection = Connection(FileStorage(path, format="dhruva"))
    items = connection.get_root()["items"] = PersistentList(
        PersistentList([f"marker-{i}"]) for i in range(5)
    )
    connection.commit()
    oids = [item._p_oid for item in items]
    connection.pack()
    del items[1]  # no longer reachable, still in the file until a pack
    connection.commit()
    connection.close()

    data = bytearray(path.read_bytes())
    for marker in (b"marker-1", b"marker-3"):
        data[data.index(marker) + 2] ^= 0x01  # one bit
    path.write_bytes(bytes(data))

    result = run("verify", "--json", str(path))
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    # Each damaged record by oid (the transactions holding them may be listed
    # too, by offset alone).
    damaged = {d["oid"]: d for d in report["damaged"]}
    records = {oid for oid in damaged if oid is not None}
    assert records == {int.from_bytes(oids[i] or b"", "big") for i in (1, 3)}
    for entry in report["damaged"]:
        assert isinstance(entry["offset"], int) and entry["offset"] > 0
        assert f"byte offset {entry['offset']}" in entry["message"]


def test_verify_finds_a_damaged_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    connection = Connection(open_storage(path, "sqlite"))
    connection.get_root()["items"] = PersistentList(
        PersistentList(["y" * 3000]) for _ in range(100)
    )
    connection.commit()
    connection.close()
    data = bytearray(path.read_bytes())
    start = len(data) - 3 * 4096  # inside a page of the objects table
    data[start : start + 8] = b"\xab" * 8
    path.write_bytes(bytes(data))

    result = run("verify", str(path))
    assert result.exit_code == 1
    assert "NOT SOUND" in result.stdout
    assert "SQLite's integrity check: database disk image is malformed" in (
        result.stdout
    )


def test_verify_reports_an_incomplete_last_transaction(tmp_path: Path) -> None:
    path = tmp_path / "db.durus"
    make_database(path, "file")
    with open(path, "ab") as f:
        f.write(b"\0" * 40)  # a commit whose bytes never reached the disk

    result = run("verify", str(path))
    assert result.exit_code == 1
    assert "warning:" in result.output and "incomplete" in result.output
    assert "32 records" in result.output  # every complete commit is there


def test_verify_of_a_dangling_reference_through_a_server(
    tmp_path: Path, dhruva_server: Callable[..., Any]
) -> None:
    path = tmp_path / "db.durus"
    missing, _holder = _database_missing_one_object(path)
    server = dhruva_server("--file", str(path))

    result = run("verify", "--json", *server.options)
    assert result.exit_code == 1
    assert [d["oid"] for d in json.loads(result.stdout)["dangling"]] == [missing]


def test_verify_through_a_busy_server_gives_no_false_alarm(
    tmp_path: Path, dhruva_server: Callable[..., Any]
) -> None:
    from dhruva.btree import BTree
    from dhruva.client_storage import ClientStorage

    path = tmp_path / "db"
    connection = Connection(FileStorage(path))
    tree = connection.get_root()["tree"] = BTree()
    for i in range(20000):
        tree[i] = PersistentDict(value=i)
    connection.commit()
    connection.close()
    server = dhruva_server("--file", str(path))

    # Another client adds objects (splitting BTree nodes) all the while.
    stop = threading.Event()

    def commit_objects() -> None:
        connection = Connection(ClientStorage(address=server.address))
        tree = connection.get_root()["tree"]
        i = 20000
        while not stop.is_set():
            for _ in range(20):
                tree[i] = PersistentDict(value=i)
                i += 1
            connection.commit()
            time.sleep(0.01)
        connection.close()

    writer = threading.Thread(target=commit_objects)
    writer.start()
    try:
        results = [run("verify", *server.options) for _ in range(3)]
    finally:
        stop.set()
        writer.join()
    for result in results:
        assert result.exit_code == 0, result.output
        assert "restore" not in result.output


def test_verify_of_a_missing_file_names_it(tmp_path: Path) -> None:
    result = run("verify", str(tmp_path / "nothing.durus"))
    assert result.exit_code == 1
    assert "nothing.durus" in result.output


# --- info -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_info_describes_the_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"db.{kind}"
    make_database(path, kind)

    info = json.loads(run("info", "--json", str(path)).stdout)
    assert info["storage"] == ("file" if kind == "dhruva" else kind)
    assert info["size"] == path.stat().st_size
    assert info["objects"] == 32
    assert info["census"] == {
        "dhruva.persistent_list.PersistentList": 31,
        "dhruva.persistent_dict.PersistentDict": 1,
    }
    if kind == "dhruva":
        assert info["header"] == "DHRUVA1"
    # The new root, the list, three more; SQLite keeps no list of commits.
    assert info["commits_since_pack"] == (None if kind == "sqlite" else 5)

    text = run("info", str(path)).output
    assert (
        f"storage:  {info['storage']}" in text
        and "dhruva.persistent_list.PersistentList" in text
    )


# --- backup -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "dhruva", "file2"])
def test_backup_is_full_then_incremental_then_full_after_a_pack(
    tmp_path: Path, kind: str
) -> None:
    path, copy = tmp_path / "db", tmp_path / "copy"
    make_database(path, kind)

    result = run("backup", str(path), str(copy))
    assert result.exit_code == 0, result.output
    assert "full copy" in result.output
    assert copy.read_bytes() == path.read_bytes()
    assert "already up to date" in run("backup", str(path), str(copy)).output

    connection = Connection(open_db(path, kind))
    connection.get_root()["n"] = 99
    connection.commit()
    connection.close()
    before = copy.stat().st_size
    result = run("backup", str(path), str(copy))
    assert "appended the new commits" in result.output
    assert f"{path.stat().st_size - before} bytes copied" in result.output
    assert read_values(copy) == (99, list(range(30)))

    connection = Connection(open_db(path, kind))
    del connection.get_root()["items"][:5]
    connection.commit()
    connection.pack()
    connection.close()
    # After a pack the file no longer starts with the backup's bytes: a
    # backup of it replaces the earlier one only when asked to.
    kept = copy.read_bytes()
    result = run("backup", str(path), str(copy))
    assert result.exit_code == 1
    assert f"{copy} is not an earlier backup of {path}" in result.output
    assert "packed" in result.output and "--full" in result.output
    assert copy.read_bytes() == kept
    assert "full copy" in run("backup", "--full", str(path), str(copy)).output
    assert copy.read_bytes() == path.read_bytes()
    assert run("verify", str(copy)).exit_code == 0


WRITER = textwrap.dedent(
    """
    import sys
    from dhruva.connection import Connection
    from dhruva.persistent_list import PersistentList
    from dhruva.file_storage import FileStorage
    from dhruva.plugins import open_storage

    path, kind = sys.argv[1], sys.argv[2]
    if kind == "dhruva":
        storage = FileStorage(path, format="dhruva")
    else:
        storage = open_storage(path, kind)
    connection = Connection(storage)
    root = connection.get_root()
    i = 0
    while True:
        root["a"] = i
        root.setdefault("log", PersistentList()).append(PersistentList([i] * 50))
        root["b"] = i
        connection.commit()
        i += 1
        if i == 1:
            print("ready", flush=True)
    """
)


@pytest.mark.parametrize("kind", KINDS)
def test_backups_taken_during_commits_open_whole(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), kind],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n"
        for round_ in range(3):
            copy = tmp_path / f"copy{round_ % 2}"  # the second time: incremental
            result = run("backup", str(path), str(copy))
            assert result.exit_code == 0, result.output

            # Opened for writing without repair: it ends at a commit's end.
            connection = Connection(open_db(copy, kind))
            root = connection.get_root()
            assert root["a"] == root["b"] == len(root["log"]) - 1
            connection.close()
            assert run("verify", str(copy)).exit_code == 0
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.communicate()


def test_a_sqlite_backup_leaves_the_writers_wal_mode_behind(tmp_path: Path) -> None:
    path, copy = tmp_path / "db.sqlite", tmp_path / "copy.sqlite"
    make_database(path, "sqlite")
    storage = open_storage(path, "sqlite")  # a writer keeps it in WAL mode
    try:
        assert run("backup", str(path), str(copy)).exit_code == 0
    finally:
        storage.close()
    with contextlib.closing(sqlite3.connect(copy)) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert read_values(copy) == (2, list(range(30)))
    assert not Path(f"{copy}-wal").exists()


@pytest.mark.parametrize("newer", [False, True])
def test_a_backup_cut_short_is_copied_again_in_full(
    tmp_path: Path, newer: bool
) -> None:
    path, copy = tmp_path / "db", tmp_path / "copy"
    make_database(path, "file")
    assert run("backup", str(path), str(copy)).exit_code == 0
    if newer:  # SRC has commits the append was copying
        connection = Connection(open_db(path, "file"))
        connection.get_root()["n"] = "x" * 500
        connection.commit()
        connection.close()
    with open(copy, "ab") as f:
        f.write(b"\0" * 100)  # an append whose bytes never reached the disk

    result = run("backup", str(path), str(copy))
    assert "full copy" in result.output
    assert "ending in an incomplete commit" in result.output  # says why
    assert copy.read_bytes() == path.read_bytes()


def test_backup_refuses_a_destination_open_for_writing(tmp_path: Path) -> None:
    path, copy = tmp_path / "db", tmp_path / "copy"
    make_database(path, "file")
    assert run("backup", str(path), str(copy)).exit_code == 0
    before = copy.read_bytes()
    writer = FileStorage(copy)  # someone works on the backup itself
    try:
        result = run("backup", "--full", str(path), str(copy))
    finally:
        writer.close()
    assert result.exit_code == 1
    assert "open for writing in another process" in result.output
    assert copy.read_bytes() == before


def test_backup_refuses_to_replace_a_file_that_is_no_database(tmp_path: Path) -> None:
    path, notes = tmp_path / "db", tmp_path / "notes.txt"
    make_database(path, "file")
    notes.write_text("my notes")
    result = run("backup", str(path), str(notes))
    assert result.exit_code == 1
    assert "notes.txt exists and is not a database file" in result.output
    assert notes.read_text() == "my notes"
    assert not list(tmp_path.glob("*partial*"))


def test_backup_through_a_server_is_one_moment_of_the_database(
    tmp_path: Path, dhruva_server: Callable[..., Any]
) -> None:
    from dhruva.client_storage import ClientStorage

    path, copy = tmp_path / "db", tmp_path / "copy"
    make_database(path, "file", objects=3000)
    server = dhruva_server("--file", str(path))

    # Another client keeps the invariant a == b while the copy runs.
    stop, first_commit = threading.Event(), threading.Event()

    def commit_pairs() -> None:
        connection = Connection(ClientStorage(address=server.address))
        root = connection.get_root()
        i = 0
        while not stop.is_set():
            root["a"] = PersistentDict(value=i)
            root["items"][i % 3000].append(i)
            root["b"] = PersistentDict(value=i)
            connection.commit()
            first_commit.set()
            i += 1
            time.sleep(0.05)  # a busy server, not one that never pauses
        connection.close()

    writer = threading.Thread(target=commit_pairs)
    writer.start()
    try:
        # The copy starts once the pairs exist, so that it has some to compare.
        assert first_commit.wait(60), "the writer never committed"
        result = run("backup", *server.options, str(copy))
    finally:
        stop.set()
        writer.join()
    assert result.exit_code == 0, result.output
    assert "full copy" in result.output
    verified = run("verify", *server.options)
    assert verified.exit_code == 0, verified.output
    assert "unreachable (a pack removes them)" in verified.output

    connection = Connection(FileStorage(copy, readonly=True))
    root = connection.get_root()
    assert root["a"]["value"] == root["b"]["value"]
    assert [item[0] for item in root["items"]] == list(range(3000))
    connection.close()
    assert run("verify", str(copy)).exit_code == 0


def _backup_process(args: list[str], stderr: int | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dhruva.cli", "backup", *args],
        stdout=subprocess.PIPE,
        stderr=stderr if stderr is not None else subprocess.PIPE,
        text=True,
        timeout=120,
    )


def test_a_piped_backup_and_verify_print_no_progress(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_database(path, "file")
    result = _backup_process([str(path), str(tmp_path / "copy")], None)
    assert result.returncode == 0 and result.stderr == ""
    verify = subprocess.run(
        [sys.executable, "-m", "dhruva.cli", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0 and verify.stderr == ""


def test_a_backup_on_a_terminal_shows_a_progress_bar(
    tmp_path: Path, on_a_terminal: Any
) -> None:
    path = tmp_path / "db"
    make_database(path, "file", objects=2000)
    result, seen = on_a_terminal(["backup", str(path), str(tmp_path / "copy")])
    assert result.returncode == 0
    assert b"backing up" in seen and b"100%" in seen
    assert result.stdout.startswith("backed up")


def test_a_backup_restores_by_opening_it(tmp_path: Path) -> None:
    path, copy = tmp_path / "db", tmp_path / "copy"
    make_database(path, "file")
    assert run("backup", str(path), str(copy)).exit_code == 0
    path.unlink()  # the database is lost

    os.replace(copy, path)
    assert run("verify", str(path)).exit_code == 0
    storage = FileStorage(path)
    assert storage.load(ROOT_OID)
    storage.close()
    assert read_values(path) == (2, list(range(30)))


# --- damaged sources and destinations -------------------------------------------


def damage_a_middle_commit(path: Path) -> int:
    """Flip one bit inside a commit of a DHRUVA1 file that has commits after
    it; return where that commit starts."""
    positions = history_positions(path)
    assert len(positions) >= 4
    start, end = positions[1], positions[2]
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    return start


def damage_a_base_record(path: Path) -> int:
    """Pack a DHRUVA1 database and flip a bit in one of its records; return
    the oid ``dhruva verify`` says is damaged."""
    connection = Connection(FileStorage(path, format="dhruva"))
    connection.pack()
    connection.close()
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    report = json.loads(run("verify", "--json", str(path)).stdout)
    (oid,) = [d["oid"] for d in report["damaged"] if d["oid"] is not None]
    return int(oid)


def test_backup_refuses_a_source_damaged_in_the_middle(tmp_path: Path) -> None:
    path, copy = tmp_path / "db", tmp_path / "copy"
    make_database(path, "dhruva")
    assert run("backup", str(path), str(copy)).exit_code == 0
    good = copy.read_bytes()
    offset = damage_a_middle_commit(path)

    result = run("backup", str(path), str(copy))
    assert result.exit_code == 1, result.output
    assert f"{path} is damaged at byte offset {offset}" in result.output
    assert "Restore" in result.output and f"--at {offset}" in result.output
    assert copy.read_bytes() == good  # the good backup is kept whole
    assert run("backup", "--full", str(path), str(tmp_path / "new")).exit_code == 1
    assert not (tmp_path / "new").exists()


def test_backup_checks_the_checksum_of_every_record(tmp_path: Path) -> None:
    path, copy = tmp_path / "db", tmp_path / "copy"
    make_database(path, "dhruva")
    oid = damage_a_base_record(path)

    result = run("backup", str(path), str(copy))
    assert result.exit_code == 1, result.output
    assert f"{path} is damaged, so no backup of it is taken" in result.output
    assert f"oid {oid}" in result.output and "byte offset" in result.output
    assert not copy.exists()


def test_info_refuses_a_file_damaged_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_database(path, "dhruva")
    offset = damage_a_middle_commit(path)

    result = run("info", str(path))
    assert result.exit_code == 1
    assert "format:   DHRUVA1" in result.output  # what is known comes first
    assert f"size:     {path.stat().st_size} bytes" in result.output
    assert f"{path} is damaged at byte offset {offset}" in result.output
    assert "commits:" not in result.output


@pytest.mark.parametrize("kind", ["file", "dhruva", "file2"])
def test_backup_refuses_a_destination_newer_than_the_source(
    tmp_path: Path, kind: str
) -> None:
    path, copy = tmp_path / "db", tmp_path / "copy"
    make_database(path, kind)
    assert run("backup", str(path), str(copy)).exit_code == 0
    connection = Connection(open_db(path, kind))
    connection.get_root()["n"] = 99
    connection.commit()
    connection.close()
    recent = path.read_bytes()

    # The arguments the wrong way round: the live file is DEST.
    result = run("backup", str(copy), str(path))
    assert result.exit_code == 1
    assert f"{path} holds" in result.output and "newer than" in result.output
    assert path.read_bytes() == recent
    assert read_values(path)[0] == 99

    # Another database is no earlier backup either.
    other = tmp_path / "other"
    make_database(other, kind, objects=3)
    result = run("backup", str(other), str(path))
    assert result.exit_code == 1
    assert f"{path} is not an earlier backup of {other}" in result.output
    assert path.read_bytes() == recent

    # --full (or --force) replaces it all the same.
    assert run("backup", "--force", str(copy), str(path)).exit_code == 0
    assert read_values(path)[0] == 2
    assert "--full" in run("backup", "--help").output


def test_a_sqlite_backup_refuses_a_newer_destination_or_another_kind(
    tmp_path: Path,
) -> None:
    path, copy = tmp_path / "db.sqlite", tmp_path / "copy.sqlite"
    make_database(path, "sqlite")
    assert run("backup", str(path), str(copy)).exit_code == 0
    connection = Connection(open_db(path, "sqlite"))
    connection.get_root()["more"] = PersistentList()  # a new oid
    connection.commit()
    connection.close()

    result = run("backup", str(copy), str(path))  # the wrong way round
    assert result.exit_code == 1
    assert "newer than" in result.output and "--full" in result.output
    connection = Connection(open_db(path, "sqlite"))
    assert "more" in connection.get_root()
    connection.close()

    other = tmp_path / "other"
    make_database(other, "file")
    result = run("backup", str(path), str(other))
    assert result.exit_code == 1
    assert f"{other} is a file database" in result.output
    assert run("backup", "--full", str(path), str(other)).exit_code == 0
    assert read_values(other, "sqlite") == (2, list(range(30)))


@pytest.mark.parametrize("kind", ["file", "dhruva", "file2"])
def test_backup_does_not_append_to_a_damaged_backup(tmp_path: Path, kind: str) -> None:
    path, copy = tmp_path / "db", tmp_path / "copy"
    make_database(path, kind)
    assert run("backup", str(path), str(copy)).exit_code == 0
    connection = Connection(open_db(path, kind))
    connection.get_root()["n"] = 99
    connection.commit()
    connection.close()
    data = bytearray(copy.read_bytes())
    offset = len(data) // 2
    data[offset] ^= 0x02
    copy.write_bytes(bytes(data))

    result = run("backup", str(path), str(copy))
    assert result.exit_code == 1
    assert f"damaged at byte offset {offset}" in result.output
    assert copy.read_bytes() == data  # nothing appended

    result = run("backup", "--full", str(path), str(copy))
    assert "full copy" in result.output
    assert f"was an earlier backup damaged at byte offset {offset}" in result.output
    assert copy.read_bytes() == path.read_bytes()


def test_verify_of_a_damaged_base_record_says_it_once_and_plainly(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db"
    make_database(path, "dhruva")
    oid = damage_a_base_record(path)

    result = run("verify", str(path))
    assert result.exit_code == 1
    text = result.output
    assert f"oid {oid}: {path}: the record of oid {oid}" in text
    assert "the transaction at byte offset 36:" in text  # not "file: ..."
    assert "lists every damaged record" not in text  # verify is that list
    assert "were read one by one instead" in text
    assert "reading every record stopped:" not in text
    assert text.count("restore the database from a backup") == 1


def test_verify_lists_damage_in_the_middle_once(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_database(path, "dhruva")
    offset = damage_a_middle_commit(path)

    result = run("verify", str(path))
    assert result.exit_code == 1
    assert f"the transaction at byte offset {offset}:" in result.output
    assert "later commits follow it and were not read" in result.output
    assert result.output.count(f"byte offset {offset}") == 1


def test_info_shows_the_format_and_size_of_a_file_it_can_not_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db"
    make_database(path, "dhruva")
    oid = damage_a_base_record(path)
    result = run("info", str(path))
    assert result.exit_code == 1
    assert "format:   DHRUVA1" in result.output
    assert f"size:     {path.stat().st_size} bytes" in result.output
    assert f"the record of oid {oid}" in result.output


def test_info_names_the_format_and_unreachable_records(tmp_path: Path) -> None:
    path = tmp_path / "db.durus"
    connection = Connection(FileStorage(path, format="durus"))  # SHELF-1
    root = connection.get_root()
    root["items"] = PersistentList(PersistentList([i]) for i in range(30))
    connection.commit()
    del root["items"][:10]
    connection.commit()
    connection.close()

    text = run("info", str(path)).output
    assert "format:   SHELF-1" in text
    assert "records:  32 (22 reachable from the root; 10 unreachable" in text
    info = json.loads(run("info", "--json", str(path)).stdout)
    assert (info["format"], info["objects"], info["reachable"]) == ("SHELF-1", 32, 22)


def test_commands_that_only_read_give_advice_they_can_follow(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    for args in (
        ["info", str(empty)],
        ["verify", str(empty)],
        ["convert", str(tmp_path / "nope.durus"), str(tmp_path / "x")],
    ):
        result = run(*args)
        assert result.exit_code == 1, args
        assert "--readonly" not in result.output, result.output
        assert "storage called '?'" not in result.output
    assert f"{empty} is empty (0 bytes)" in run("info", str(empty)).output
    assert f"{empty} is empty (0 bytes)" in run("verify", str(empty)).output

    path = tmp_path / "t1.dhruva"
    make_database(path, "dhruva")
    result = run("-c", "--file", str(path), "--storage", "shelf")
    assert f"`dhruva convert {path} NEW --storage shelf`" in result.output


def test_an_error_is_shown_once(tmp_path: Path) -> None:
    path = tmp_path / "torn.dhruva"
    make_database(path, "dhruva")
    with open(path, "ab") as f:
        f.write(os.urandom(100))  # a commit cut short
    for args in (["pack", "--file", str(path)], ["-c", "--file", str(path)]):
        result = subprocess.run(
            [sys.executable, "-m", "dhruva.cli", *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        assert result.returncode != 0
        assert result.stderr.count("is incomplete") == 1, result.stderr
        assert result.stderr.startswith("Error: ")


def test_a_warning_held_back_during_an_open_reaches_each_handler_once(
    tmp_path: Path,
) -> None:
    import logging

    path = tmp_path / "db"
    make_database(path, "dhruva")
    with open(path, "ab") as f:
        f.write(b"DHRUVA1")  # an incomplete last commit: a warning, read-only

    class Count(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    counted = Count()
    logging.getLogger("dhruva").addHandler(counted)
    try:
        result = run("info", str(path))
    finally:
        logging.getLogger("dhruva").removeHandler(counted)
    assert result.exit_code == 0, result.output
    assert len(counted.messages) == 1, counted.messages
    assert "incomplete" in counted.messages[0]
    assert result.output.count("is incomplete") == 1


def test_a_read_only_console_warns_that_it_stops_at_damage(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_database(path, "dhruva")  # root["n"] = 0, 1, 2 in the last commits
    offset = damage_a_middle_commit(path)
    result = subprocess.run(
        [sys.executable, "-m", "dhruva.cli", "-c", "--readonly", "--file", str(path)],
        input="print('n is', root.get('n'), 'items' in root)\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # The database as it was before the damaged commit.
    assert "n is None False" in result.stdout
    assert f"This read-only view stops at byte {offset}" in result.stderr
    assert "later commits are not shown" in result.stderr
    assert result.stderr.count(f"byte offset {offset}") == 1, result.stderr


# --- dhruva client --at: a past commit of a file storage ----------------------------


def history_positions(path: Path) -> list[int]:
    from dhruva.file_history import list_transactions

    return [span.end for span in list_transactions(path)]


def test_client_at_a_position_sees_the_database_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_database(path, "dhruva")  # root["n"] = 0, then 1, then 2
    before = path.read_bytes()
    positions = history_positions(path)
    script = 'print("n is", root["n"], len(root["items"]))\n'

    seen = []
    for position in positions[-3:]:
        result = CliRunner().invoke(
            make_cli(),
            ["client", "--file", str(path), "--at", str(position)],
            input=script,
        )
        assert result.exit_code == 0, result.output
        seen.append(result.stdout.strip())
    assert seen == ["n is 0 30", "n is 1 30", "n is 2 30"]
    assert path.read_bytes() == before

    # The view is read-only: a commit is refused, the file stays as it was.
    result = CliRunner().invoke(
        make_cli(),
        ["client", "--file", str(path), "--at", str(positions[-2])],
        input='root["n"] = 99\nconnection.commit()\n',
    )
    assert result.exit_code == 1
    assert "read-only" in result.output
    assert path.read_bytes() == before


def test_client_at_names_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_database(path, "dhruva")
    inside = history_positions(path)[-1] - 1
    result = run("client", "--file", str(path), "--at", str(inside))
    assert result.exit_code == 1
    assert f"byte offset {inside}" in result.output
    assert f"dhruva history {path}" in result.output

    result = run("client", "--at", "60")
    assert result.exit_code == 2
    assert "give --file" in result.output

    sqlite_path = tmp_path / "db.sqlite"
    make_database(sqlite_path, "sqlite")
    result = run("client", "--file", str(sqlite_path), "--at", "60")
    assert result.exit_code == 1
    assert "keep their past commits" in result.output
