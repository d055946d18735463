"""No raw sqlite3 error leaves a SqliteStorage: files that are not databases,
damaged and cut-short databases, and databases another program keeps locked
give StorageError subclasses naming the file, on every public operation."""

from __future__ import annotations

import os
import pickle
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dhruva.error import StorageError
from dhruva.record import ROOT_OID, pack_record
from dhruva.sqlite_storage import (
    NotSqliteError,
    SqliteDamagedError,
    SqliteLockedError,
    SqliteStorage,
    SqliteStorageError,
)

RECORDS = 3000


def oid(number: int) -> bytes:
    return number.to_bytes(8, "big")


def make(path: Path) -> None:
    """A database of RECORDS records of 300 bytes, root first, closed."""
    with SqliteStorage(path) as storage:
        storage.begin()
        for _ in range(RECORDS):
            new = storage.new_oid()
            storage.store(new, pack_record(new, b"x" * 300, b""))
        storage.end()


def commit_one(storage: SqliteStorage) -> None:
    storage.begin()
    storage.store(ROOT_OID, pack_record(ROOT_OID, b"changed", b""))
    storage.end()


def drain_packer(storage: SqliteStorage) -> None:
    for _step in storage.get_packer() or ():
        pass


#: The public operations of a storage that read, by name.
READS: dict[str, Callable[[SqliteStorage], object]] = {
    "load": lambda s: s.load(ROOT_OID),
    "bulk_load": lambda s: list(s.bulk_load([oid(n) for n in range(RECORDS)])),
    "gen_oid_record": lambda s: list(s.gen_oid_record()),
    "get_size": lambda s: s.get_size(),
    "sync": lambda s: s.sync(),
}

#: ... and those that write.
WRITES: dict[str, Callable[[SqliteStorage], object]] = {
    "end": commit_one,
    "pack": lambda s: s.pack(),
    "get_packer": drain_packer,
}


def check_message(error: StorageError, path: Path, *words: str) -> None:
    text = str(error)
    assert str(path) in text
    for word in words:
        assert word in text


# --- not a database ------------------------------------------------------------------


@pytest.mark.parametrize("readonly", [False, True])
def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path, readonly: bool):
    path = tmp_path / "notes.db"
    content = b"just some notes, no database\n" * 500
    path.write_bytes(content)
    with pytest.raises(NotSqliteError) as refused:
        SqliteStorage(path, readonly=readonly)
    check_message(refused.value, path, "not a SQLite database", "storage kind")
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_a_missing_folder_is_named(tmp_path: Path):
    path = tmp_path / "missing" / "db.sqlite"
    with pytest.raises(SqliteStorageError) as refused:
        SqliteStorage(path)
    check_message(refused.value, path, "cannot open", "folder exists")
    assert not (tmp_path / "missing").exists()


# --- damaged -------------------------------------------------------------------------


@pytest.mark.parametrize("readonly", [False, True])
def test_a_cut_short_database_is_reported_damaged(tmp_path: Path, readonly: bool):
    path = tmp_path / "db.sqlite"
    make(path)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(SqliteDamagedError) as refused:
        SqliteStorage(path, readonly=readonly)
    check_message(refused.value, path, "damaged", "backup", "dhruva verify")


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """A database with one page in the middle of its records overwritten."""
    path = tmp_path / "db.sqlite"
    make(path)
    with open(path, "r+b") as f:
        f.seek(4096 * 20)
        f.write(b"\xa5" * 4096)
    return path


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("operation", ["bulk_load", "gen_oid_record", "get_size"])
def test_reading_a_damaged_page_is_reported(
    damaged: Path, readonly: bool, operation: str
):
    with (
        SqliteStorage(damaged, readonly=readonly) as storage,
        pytest.raises(SqliteDamagedError) as failed,
    ):
        READS[operation](storage)
    check_message(failed.value, damaged, "damaged", "backup")


def test_loading_each_record_of_a_damaged_database(damaged: Path):
    """Records on good pages load; those on the damaged page raise, by name."""
    failures: list[StorageError] = []
    with SqliteStorage(damaged, readonly=True) as storage:
        for number in range(RECORDS):
            try:
                storage.load(oid(number))
            except SqliteDamagedError as error:
                failures.append(error)
    assert 0 < len(failures) < RECORDS // 2
    check_message(failures[0], damaged, "loading oid", "damaged")


@pytest.mark.parametrize("operation", ["pack", "get_packer"])
def test_packing_a_damaged_database_is_reported(damaged: Path, operation: str):
    with SqliteStorage(damaged) as storage, pytest.raises(SqliteDamagedError) as failed:
        WRITES[operation](storage)
    check_message(failed.value, damaged, "packing", "damaged", "nothing was removed")


# --- locked by another program -------------------------------------------------------


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    """A database (in rollback-journal mode) another program holds exclusively."""
    path = tmp_path / "db.sqlite"
    make(path)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    yield path, other
    if other.in_transaction:
        other.execute("ROLLBACK")
    other.close()


def lock(other: sqlite3.Connection, exclusive: bool = True) -> None:
    other.execute("BEGIN EXCLUSIVE" if exclusive else "BEGIN IMMEDIATE")
    other.execute("UPDATE objects SET data = data WHERE id = 5")


@pytest.mark.parametrize("readonly", [False, True])
def test_opening_a_locked_database_is_reported(
    locked: tuple[Path, sqlite3.Connection], readonly: bool
):
    path, other = locked
    lock(other)
    with pytest.raises(SqliteLockedError) as failed:
        SqliteStorage(path, readonly=readonly, timeout=0.1)
    check_message(failed.value, path, "locked by another program", "timeout")
    assert failed.value.retryable


@pytest.mark.parametrize("operation", sorted(READS))
def test_reading_a_locked_database_is_reported(
    locked: tuple[Path, sqlite3.Connection], operation: str
):
    path, other = locked
    with SqliteStorage(path, readonly=True, timeout=0.1) as storage:
        lock(other)
        with pytest.raises(SqliteLockedError) as failed:
            READS[operation](storage)
        other.execute("ROLLBACK")
        READS[operation](storage)  # works again once the lock is gone
    check_message(failed.value, path, "locked by another program")


@pytest.mark.parametrize("operation", sorted(WRITES))
def test_writing_a_locked_database_is_reported(
    locked: tuple[Path, sqlite3.Connection], operation: str
):
    path, other = locked
    with SqliteStorage(path, timeout=0.1) as storage:
        lock(other, exclusive=False)  # the storage's WAL readers still read
        with pytest.raises(SqliteLockedError) as failed:
            WRITES[operation](storage)
        assert storage.load(oid(7)).endswith(b"x" * 300)
        other.execute("ROLLBACK")
        WRITES[operation](storage)
    check_message(failed.value, path, "locked by another program")


def test_closing_while_another_program_holds_the_lock(
    locked: tuple[Path, sqlite3.Connection],
):
    path, other = locked
    storage = SqliteStorage(path, timeout=0.1)
    commit_one(storage)
    lock(other, exclusive=False)
    storage.close()  # the file stays in WAL mode, nothing is lost
    other.execute("ROLLBACK")
    with SqliteStorage(path, readonly=True) as reopened:
        assert reopened.load(ROOT_OID).endswith(b"changed")


# --- the errors themselves -----------------------------------------------------------


@pytest.mark.parametrize(
    "kind", [NotSqliteError, SqliteDamagedError, SqliteLockedError, SqliteStorageError]
)
def test_the_errors_pickle_for_the_server(kind: type[SqliteStorageError]):
    error = kind("/data/db.sqlite is something; do this", "/data/db.sqlite")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is kind and isinstance(copy, StorageError)
    assert str(copy) == str(error) and copy.path == "/data/db.sqlite"
