"""Packing SqliteStorage: the incremental packer with commits between its
steps, packs killed with SIGKILL in a real process, and packs that fail."""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from dhruva.error import StorageError
from dhruva.record import pack_record
from dhruva.sqlite_storage import SqliteStorage
from dhruva.storage import Storage, gen_reachable_records
from dhruva.storage_testing import IncrementalPackStorageContract, commit


class TestSqliteStorageIncrementalPack(IncrementalPackStorageContract):
    @pytest.fixture
    def storage(self, tmp_path):
        s = SqliteStorage(tmp_path / "db.sqlite")
        yield s
        s.close()


def build(storage: Storage, reachable: int = 2000) -> dict[bytes, bytes]:
    """Commit a chain of objects and as much garbage; return the chain's records."""
    oids = [storage.new_oid() for _ in range(reachable)]
    records = {}
    for oid, following in zip(oids, [*oids[1:], b""], strict=True):
        records[oid] = pack_record(oid, b"kept " + oid + b"x" * 200, following)
    storage.begin()
    for record in records.values():
        storage.store(record[:8], record)
    for _ in range(reachable):
        oid = storage.new_oid()
        storage.store(oid, pack_record(oid, b"garbage" * 30, b""))
    storage.end()
    return records


def rows(path: Path) -> list[tuple[int, bytes, bytes]]:
    with closing(sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)) as c:
        return c.execute("SELECT id, data, refs FROM objects ORDER BY id").fetchall()


class DiskFull:
    """A stand-in for the storage's SQLite connection whose deletes fail."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def __getattr__(self, name: str) -> Any:
        return getattr(self.con, name)

    def executemany(self, sql: str, params: Any) -> Any:
        if sql.startswith("DELETE"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.con.executemany(sql, params)


@pytest.mark.parametrize("incremental", [False, True])
def test_a_failed_pack_removes_nothing_and_the_database_stays_writable(
    tmp_path, monkeypatch, incremental
):
    path = tmp_path / "db.sqlite"
    storage = SqliteStorage(path)
    expected = build(storage)
    before = rows(path)
    monkeypatch.setattr(storage, "_con", DiskFull(storage._con))  # type: ignore[arg-type]
    with pytest.raises(StorageError) as failed:
        if incremental:
            for _step in storage.get_packer() or ():
                pass
        else:
            storage.pack()
    assert str(failed.value) == (
        f"packing {path} failed: SQLite failed while writing: database or disk "
        "is full; nothing was removed and the database is still writable"
    )
    monkeypatch.undo()

    assert rows(path) == before
    late = storage.new_oid()
    commit(storage, pack_record(late, b"after the failed pack", b""))
    storage.close()
    with SqliteStorage(path) as reopened:
        assert dict(gen_reachable_records(reopened)) == expected
        assert reopened.load(late).endswith(b"after the failed pack")


PACK_WITH_SIZE_LIMIT = """
import resource, sys
from dhruva.error import StorageError
from dhruva.record import pack_record
from dhruva.sqlite_storage import SqliteStorage

storage = SqliteStorage(sys.argv[1])
wal = sys.argv[1] + "-wal"
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), hard))
try:
    storage.pack()
    print("packed")
except StorageError as e:
    print("refused:", e)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
oid = storage.new_oid()
storage.begin()
storage.store(oid, pack_record(oid, b"committed after", b""))
storage.end()
storage.close()
print("committed", oid.hex())
"""


def test_a_pack_stopped_by_a_file_size_limit_removes_nothing(tmp_path):
    path = tmp_path / "db.sqlite"
    with SqliteStorage(path) as storage:
        expected = build(storage)
    before = rows(path)

    # Writes past 64 KiB fail, as on a full disk: the deletions do not fit.
    result = subprocess.run(
        [sys.executable, "-c", PACK_WITH_SIZE_LIMIT, str(path), str(1 << 16)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    refused, committed = result.stdout.splitlines()
    assert refused.startswith(f"refused: packing {path} failed: ")
    assert refused.endswith("nothing was removed and the database is still writable")

    late = int(committed.split()[1], 16)
    after = rows(path)
    assert [row for row in after if row[0] != late] == before
    with SqliteStorage(path) as reopened:
        assert dict(gen_reachable_records(reopened)) == expected
        reopened.pack()
        assert reopened.get_size() == len(expected)


# --- giving the space back ----------------------------------------------------------


def auto_vacuum(path: Path) -> int:
    with closing(sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)) as c:
        return int(c.execute("PRAGMA auto_vacuum").fetchone()[0])


def add_garbage(storage: SqliteStorage, count: int, size: int = 2000) -> None:
    storage.begin()
    for _ in range(count):
        oid = storage.new_oid()
        storage.store(oid, pack_record(oid, b"g" * size, b""))
    storage.end()


@pytest.mark.parametrize("incremental", [False, True])
def test_a_pack_shrinks_the_file(tmp_path: Path, incremental: bool) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStorage(path) as storage:
        expected = build(storage, reachable=200)
        add_garbage(storage, 3000)
    full = path.stat().st_size
    assert full > 6_000_000

    def pack(storage: SqliteStorage) -> None:
        if incremental:
            steps = list(storage.get_packer() or ())
            assert len(steps) > 1
        else:
            storage.pack()

    # The first pack rewrites the file (VACUUM) into incremental auto-vacuum.
    with SqliteStorage(path) as storage:
        pack(storage)
        assert dict(gen_reachable_records(storage)) == expected
    packed = path.stat().st_size
    assert packed < full // 10
    assert auto_vacuum(path) == 2
    assert not Path(str(path) + "-wal").exists()

    # Later packs give the freed pages back without a VACUUM.
    with SqliteStorage(path) as storage:
        add_garbage(storage, 3000)
    assert path.stat().st_size > 6_000_000
    with SqliteStorage(path) as storage:
        pack(storage)
        assert storage.get_size() == len(expected)
    assert path.stat().st_size < packed * 2
    with SqliteStorage(path, readonly=True) as reopened:
        assert dict(gen_reachable_records(reopened)) == expected


def test_a_pack_gives_space_back_while_a_reader_is_open(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    storage = SqliteStorage(path)
    expected = build(storage, reachable=200)
    add_garbage(storage, 3000)
    reader = SqliteStorage(path, readonly=True)
    try:
        storage.pack()  # the reader's snapshot keeps the -wal file for now
        assert dict(gen_reachable_records(storage)) == expected
        assert reader.get_size() == 3400  # its snapshot: before the pack
        reader.sync()
        assert dict(gen_reachable_records(reader)) == expected
        late = storage.new_oid()
        commit(storage, pack_record(late, b"after the pack", b""))
    finally:
        reader.close()
        storage.close()
    assert path.stat().st_size < 1_000_000
    with SqliteStorage(path) as reopened:
        assert reopened.load(late).endswith(b"after the pack")


VACUUMING_PACKER = """
import sys
from dhruva.sqlite_storage import SqliteStorage

reclaim = SqliteStorage._reclaim_space

def noisy_reclaim(self):
    print("vacuum", flush=True)
    reclaim(self)
    print("vacuumed", flush=True)

SqliteStorage._reclaim_space = noisy_reclaim
storage = SqliteStorage(sys.argv[1])
print("ready", flush=True)
storage.pack()
print("packed", flush=True)
"""


def start_packer(path: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", VACUUMING_PACKER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    return child


def test_a_pack_killed_while_it_gives_space_back_loses_nothing(tmp_path: Path):
    template = tmp_path / "template.sqlite"
    with SqliteStorage(template) as storage:
        expected = build(storage, reachable=2000)
        add_garbage(storage, 5000)

    # How long the whole pack, and its VACUUM, take here.
    shutil.copyfile(template, tmp_path / "timed.sqlite")
    started = time.monotonic()
    child = start_packer(tmp_path / "timed.sqlite")
    assert child.stdout is not None
    assert child.stdout.readline() == "vacuum\n"
    vacuum_started = time.monotonic()
    assert child.stdout.readline() == "vacuumed\n"
    vacuum_seconds = time.monotonic() - vacuum_started
    pack_seconds = time.monotonic() - started
    child.communicate(timeout=60)

    # Kills at any moment of the pack, then kills inside the VACUUM.
    rng = random.Random(7)
    during_vacuum = []
    for round_ in range(10):
        path = tmp_path / f"db{round_}.sqlite"
        shutil.copyfile(template, path)
        child = start_packer(path)
        assert child.stdout is not None
        if round_ < 4:
            time.sleep(rng.uniform(0, pack_seconds))
        else:
            assert child.stdout.readline() == "vacuum\n"
            time.sleep(rng.uniform(0, vacuum_seconds))
        child.send_signal(signal.SIGKILL)
        output, _ = child.communicate(timeout=60)
        if round_ >= 4:
            during_vacuum.append("vacuumed" not in output)

        with SqliteStorage(path) as reopened:
            assert dict(gen_reachable_records(reopened)) == expected, round_
            reopened.pack()
            assert reopened.get_size() == len(expected)
        assert path.stat().st_size < template.stat().st_size // 3

    assert any(during_vacuum), "no kill landed inside the VACUUM"
