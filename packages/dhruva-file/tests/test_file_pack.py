"""Packing every file layout (DHRUVA1, SHELF-1, DFS20; the ``fmt`` fixture of
``conftest.py``): the incremental packer with commits between its steps, packs
that fail, and the leftovers of interrupted packs (packs killed in a real
process: tests/test_pack_crash.py)."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import subprocess
import sys

import pytest
from dhruva.error import StorageError
from dhruva.file_storage import FileLockedError
from dhruva.record import ROOT_OID, pack_record
from dhruva.storage import Storage, gen_reachable_records
from dhruva.storage_testing import IncrementalPackStorageContract, commit, new_oids

# --- a database to pack ------------------------------------------------------------


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


def assert_holds(storage: Storage, expected: dict[bytes, bytes]) -> None:
    assert dict(gen_reachable_records(storage)) == expected


# --- packs that fail ---------------------------------------------------------------


def test_disk_full_while_packing_leaves_the_database_unchanged_and_writable(
    tmp_path, fmt, monkeypatch
):
    path = tmp_path / "db"
    storage = fmt.open(path)
    expected = build(storage)
    before = path.read_bytes()

    # Writing the packed file runs out of space; commits to the database not.
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".pack"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError) as failed:
        storage.pack()
    message = str(failed.value)
    assert f"packing {path} failed at {path}.pack: No space left on device" in message
    assert "unchanged and still writable" in message
    assert f"free disk space in {tmp_path}" in message
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "db.lock"]
    assert_holds(storage, expected)
    (late,) = new_oids(storage, 1)
    commit(storage, pack_record(late, b"after the failed pack", b""))
    storage.close()
    with fmt.open(path) as reopened:
        assert_holds(reopened, expected)
        assert reopened.load(late)[8:].endswith(b"after the failed pack")
        reopened.pack()  # and it packs once there is room
        assert_holds(reopened, expected)


def test_a_failed_incremental_pack_keeps_commits_made_during_it(
    tmp_path, fmt, monkeypatch
):
    path = tmp_path / "db"
    storage = fmt.open(path)
    monkeypatch.setattr(storage, "pack_step", 100)
    expected = build(storage)
    packer = storage.get_packer()
    next(packer)
    (late,) = new_oids(storage, 1)
    commit(storage, pack_record(late, b"during", b""))

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError, match="Input/output error"):
        for _step in packer:
            pass
    monkeypatch.undo()
    assert not (tmp_path / "db.pack").exists()
    assert storage.load(late)[8:].endswith(b"during")
    storage.close()
    with fmt.open(path) as reopened:
        assert_holds(reopened, expected)
        assert reopened.load(late)[8:].endswith(b"during")


#: Packs the database a child process opens (with ``{source}``, naming the
#: storage ``s``) where ``{limit}`` stands, printing the result, then commits.
PACK_THEN_COMMIT = """
import resource, sys
from dhruva.error import StorageError
from dhruva.record import pack_record
{source}
{limit}
try:
    s.pack()
    print("packed")
except StorageError as e:
    print("refused:", e)
{unlimit}
oid = s.new_oid()
s.begin()
s.store(oid, pack_record(oid, b"committed after", b""))
s.end()
s.close()
print("committed", oid.hex())
"""

#: Packs the database given, in a process that may not write to its folder.
PACK_IN_READONLY_FOLDER = PACK_THEN_COMMIT.replace("{limit}", "").replace(
    "{unlimit}", ""
)


def test_a_pack_in_a_readonly_folder_is_refused_and_the_database_stays_writable(
    tmp_path, fmt
):
    folder = tmp_path / "folder"
    folder.mkdir()
    path = folder / "db"
    with fmt.open(path) as storage:
        expected = build(storage)
    before = path.read_bytes()

    # Root writes anywhere; a root test process drops that privilege.
    script = PACK_IN_READONLY_FOLDER.format(source=fmt.source)
    command = [sys.executable, "-c", script, str(path)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root, and no setpriv to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        command = [setpriv, "--bounding-set", caps, "--inh-caps", caps, *command]
    folder.chmod(0o555)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=120, check=False
        )
    finally:
        folder.chmod(0o755)
    assert result.returncode == 0, result.stderr
    refused, committed = result.stdout.splitlines()
    assert refused.startswith(f"refused: packing {path} failed at {path}.pack: ")
    assert "Permission denied" in refused
    assert f"make {folder} writable" in refused

    assert path.read_bytes().startswith(before)
    assert not (folder / "db.pack").exists()
    late = bytes.fromhex(committed.split()[1])
    with fmt.open(path) as reopened:
        assert_holds(reopened, expected)
        assert reopened.load(late)[8:].endswith(b"committed after")


#: Packs the database given with file writes limited to a size (as when the
#: disk fills up), then lifts the limit and commits.
PACK_WITH_SIZE_LIMIT = PACK_THEN_COMMIT.replace(
    "{limit}",
    "soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), hard))",
).replace("{unlimit}", "resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))")


def test_a_pack_stopped_by_a_file_size_limit_leaves_the_database_as_it_was(
    tmp_path, fmt
):
    path = tmp_path / "db"
    with fmt.open(path) as storage:
        expected = build(storage)
    before = path.read_bytes()

    # The packed copy needs about half the file; the limit lets through a tenth.
    limit = str(len(before) // 10)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PACK_WITH_SIZE_LIMIT.format(source=fmt.source),
            str(path),
            limit,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    refused, committed = result.stdout.splitlines()
    assert refused == (
        f"refused: packing {path} failed at {path}.pack: File too large; the "
        "database is unchanged and still writable. To pack it, free disk space "
        f"in {tmp_path} (a pack writes a new copy of the reachable objects "
        "there) and pack again"
    )
    assert path.read_bytes().startswith(before)
    assert not (tmp_path / "db.pack").exists()
    late = bytes.fromhex(committed.split()[1])
    with fmt.open(path) as reopened:
        assert_holds(reopened, expected)
        assert reopened.load(late)[8:].endswith(b"committed after")


# --- leftovers and files ------------------------------------------------------------


def test_the_leftover_of_an_interrupted_pack_is_removed_at_open(tmp_path, fmt, caplog):
    path = tmp_path / "db"
    with fmt.open(path) as storage:
        expected = build(storage, 10)
    (tmp_path / "db.pack").write_bytes(b"half a packed file")
    with fmt.open(path, readonly=True) as reader:
        assert (tmp_path / "db.pack").exists()  # a reader never removes files
        assert_holds(reader, expected)
    with caplog.at_level(logging.WARNING), fmt.open(path) as storage:
        assert not (tmp_path / "db.pack").exists()
        assert_holds(storage, expected)
    assert f"removed {path}.pack, the unfinished new file of a pack" in caplog.text


def test_the_packed_file_keeps_the_database_files_mode(tmp_path, fmt):
    path = tmp_path / "db"
    with fmt.open(path) as storage:
        build(storage, 10)
        path.chmod(0o600)
        storage.pack()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_pack_and_reopen_hand_out_no_removed_oid(tmp_path, fmt):
    path = tmp_path / "db"
    with fmt.open(path) as storage:
        build(storage, 10)
        removed = {oid for oid, _r in storage.gen_oid_record()}
        storage.pack()
        removed -= {oid for oid, _r in storage.gen_oid_record()}
        assert len(removed) == 10
        assert not set(new_oids(storage, 50)) & removed
    with fmt.open(path) as storage:
        assert not set(new_oids(storage, 100)) & removed


class TestFileIncrementalPackInSmallSteps(IncrementalPackStorageContract):
    """Many more steps, so that commits fall between most of the walk."""

    @pytest.fixture
    def storage(self, tmp_path, fmt):
        s = fmt.open(tmp_path / "db")
        s.pack_step = 29
        yield s
        s.close()


# --- a pack by Durus, interrupted -------------------------------------------------


@pytest.fixture
def moved_aside(tmp_path, fmt):
    """A database that a Durus pack moved to <file>.prepack before it crashed,
    next to the complete packed file it did not get to rename."""
    path = tmp_path / "db"
    with fmt.open(path) as storage:
        expected = build(storage, 10)
        packed = tmp_path / "packed"
        shutil.copy(path, packed)
    path.rename(tmp_path / "db.prepack")
    packed.rename(tmp_path / "db.pack")
    return path, expected


def test_a_file_moved_aside_by_an_interrupted_durus_pack_is_put_back(
    moved_aside, fmt, caplog
):
    path, expected = moved_aside
    with caplog.at_level(logging.WARNING), fmt.open(path) as storage:
        assert_holds(storage, expected)
    assert "interrupted Durus pack" in caplog.text
    assert sorted(p.name for p in path.parent.iterdir()) == ["db"]


def test_a_readonly_open_of_a_file_moved_aside_says_what_happened(moved_aside, fmt):
    path, _expected = moved_aside
    with pytest.raises(StorageError) as refused:
        fmt.open(path, readonly=True)
    assert str(refused.value) == (
        f"no database file {path}, but {path}.prepack is there: a Durus pack "
        "was interrupted after moving the database aside. Open it once without "
        f"readonly=True to put it back, or rename {path}.prepack to {path}"
    )
    assert not path.exists()


def test_a_file_moved_aside_by_a_running_pack_is_left_alone(moved_aside, fmt):
    path, _expected = moved_aside
    with open(f"{path}.prepack", "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(FileLockedError, match="a process packing it"):
            fmt.open(path)
    assert not path.exists()


def test_a_dangling_reference_stops_the_pack_and_removes_nothing(tmp_path, fmt):
    path = tmp_path / "db"
    with fmt.open(path) as storage:
        (garbage,) = new_oids(storage, 1)
        missing = (999).to_bytes(8, "big")
        commit(
            storage,
            pack_record(ROOT_OID, b"root", missing),
            pack_record(garbage, b"garbage", b""),
        )
        before = path.read_bytes()
        with pytest.raises(StorageError) as failed:
            storage.pack()
        assert str(failed.value).startswith(
            f"packing {path} failed: a reachable record refers to oid 999, which "
            "has no record (a dangling reference); nothing was removed"
        )
        assert path.read_bytes() == before
        assert not (tmp_path / "db.pack").exists()
        assert storage.load(garbage)[8:].endswith(b"garbage")


def test_a_second_packer_is_refused_while_one_runs(tmp_path, fmt):
    path = tmp_path / "db"
    with fmt.open(path) as storage:
        storage.pack_step = 100
        expected = build(storage)
        first = storage.get_packer()
        second = storage.get_packer()  # made before the first one started
        next(first)
        with pytest.raises(StorageError, match="a pack is running already"):
            next(second)
        with pytest.raises(StorageError, match="a pack is running already"):
            storage.pack()
        for _step in first:
            pass
        assert_holds(storage, expected)
        assert storage.get_size() == len(expected)
    with fmt.open(path) as storage:
        assert_holds(storage, expected)
