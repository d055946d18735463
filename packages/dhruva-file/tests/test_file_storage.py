"""Tests of FileStorage: the storage contract, locking, torn tails, read-only."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dhruva.error import ReadOnlyError, StorageError
from dhruva.file_storage import FileLockedError, FileStorage
from dhruva.record import ROOT_OID, unpack_record
from dhruva.shelf import PREFIX, TornTailError
from dhruva.storage_testing import (
    BasicStorageContract,
    DurableStorageContract,
    IterableStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
    commit,
    make_record,
)


def oid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TestFileStorageContract(
    BasicStorageContract,
    IterableStorageContract,
    DurableStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
):
    @pytest.fixture
    def storage(self, tmp_path):
        s = FileStorage(tmp_path / "db.durus")
        yield s
        s.close()

    @pytest.fixture
    def reopen(self, tmp_path):
        def reopen(s):
            s.close()
            return FileStorage(tmp_path / "db.durus")

        return reopen

    @pytest.fixture
    def open_readonly(self, tmp_path):
        def open_readonly(s):
            s.close()
            return FileStorage(tmp_path / "db.durus", readonly=True)

        return open_readonly


def test_capabilities():
    assert FileStorage.packable and FileStorage.iterable
    assert not FileStorage.invalidating


# --- oids --------------------------------------------------------------------


def test_first_new_oid_of_a_new_file_is_the_root(tmp_path):
    with FileStorage(tmp_path / "db") as s:
        assert s.new_oid() == ROOT_OID
        assert s.new_oid() == oid(1)


def test_oids_are_not_reused_after_pack_and_reopen(tmp_path):
    path = tmp_path / "db"
    s = FileStorage(path)
    root, a, garbage, unused = (s.new_oid() for _ in range(4))
    commit(s, make_record(root, b"r", [a]), make_record(a), make_record(garbage))
    s.pack()
    handed_out = {root, a, garbage, unused}
    assert not {s.new_oid() for _ in range(5)} & handed_out
    s.close()

    # The packed file's offset map covers every oid handed out before.
    s = FileStorage(path)
    try:
        assert not {s.new_oid() for _ in range(5)} & handed_out
    finally:
        s.close()


def test_get_size_counts_current_records(tmp_path):
    with FileStorage(tmp_path / "db") as s:
        a, b = s.new_oid(), s.new_oid()
        commit(s, make_record(a), make_record(b))
        commit(s, make_record(a, b"again"))
        assert s.get_size() == 2


# --- durability and layout ---------------------------------------------------


def test_a_new_file_has_the_durus_layout(tmp_path):
    path = tmp_path / "db"
    FileStorage(path, format="durus").close()
    # Prefix, an empty first transaction, an empty map of 1-byte words.
    assert path.read_bytes() == (
        PREFIX + bytes(8) + (16).to_bytes(8, "big") + (1).to_bytes(8, "big") + bytes(8)
    )


def test_each_commit_is_one_transaction_fsynced_once(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    with FileStorage(tmp_path / "db") as s:
        a, b = s.new_oid(), s.new_oid()
        synced.clear()
        size_before = os.path.getsize(s.path)
        commit(s, make_record(a, b"x" * 100), make_record(b))
        assert len(synced) == 1
        # The bytes are in the file as soon as end() returns.
        assert os.path.getsize(s.path) > size_before


def test_empty_commit_writes_nothing(tmp_path):
    with FileStorage(tmp_path / "db") as s:
        size = os.path.getsize(s.path)
        commit(s)
        assert os.path.getsize(s.path) == size


def test_temporary_file_is_removed_on_close():
    s = FileStorage()
    path = s.path
    a = s.new_oid()
    commit(s, make_record(a, b"temp"))
    assert os.path.exists(path)
    assert unpack_record(s.load(a))[1] == b"temp"
    s.close()
    assert not os.path.exists(path)
    s.close()  # twice is harmless


def test_closed_storage_says_so(tmp_path):
    s = FileStorage(tmp_path / "db")
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.load(ROOT_OID)


def test_not_a_shelf_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "other.dfs"
    path.write_bytes(b"DFS20\0" + bytes(100))
    before = open_fds()
    with pytest.raises(StorageError, match=r"other\.dfs.*SHELF-1"):
        FileStorage(path)
    assert open_fds() == before
    assert path.read_bytes() == b"DFS20\0" + bytes(100)


# --- pack --------------------------------------------------------------------


def test_pack_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "db"
    with FileStorage(path) as s:
        root, a, garbage = (s.new_oid() for _ in range(3))
        commit(s, make_record(root, b"r", [a]), make_record(a), make_record(garbage))
        commit(s, make_record(a, b"newer"))
        size = path.stat().st_size
        s.pack()
        assert path.stat().st_size < size
        assert sorted(tmp_path.iterdir()) == [path, tmp_path / "db.lock"]
        assert garbage in s.sync()
        assert s.sync() == []
    with FileStorage(path) as s:
        assert s.get_size() == 2
        assert unpack_record(s.load(a))[1] == b"newer"


def test_commits_during_an_incremental_pack_are_kept(tmp_path):
    with FileStorage(tmp_path / "db") as s:
        root, a, garbage, late = (s.new_oid() for _ in range(4))
        commit(s, make_record(root, b"r", [a]), make_record(a), make_record(garbage))
        packer = s.get_packer()
        next(packer)
        commit(s, make_record(root, b"r2", [a, late]), make_record(late, b"late"))
        allocated_while_packing = s.new_oid()
        for _step in packer:
            pass
        assert s.new_oid() > allocated_while_packing
        assert unpack_record(s.load(late))[1] == b"late"
        assert unpack_record(s.load(root))[1] == b"r2"
        with pytest.raises(KeyError):
            s.load(garbage)


def test_pack_without_a_root_changes_nothing(tmp_path):
    path = tmp_path / "db"
    with FileStorage(path) as s:
        a = oid(5)
        commit(s, make_record(a))
        before = path.read_bytes()
        s.pack()
        assert path.read_bytes() == before


# --- locking -----------------------------------------------------------------

HOLD = """
import sys
from dhruva.file_storage import FileStorage
s = FileStorage(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
s.close()
"""


@pytest.fixture
def holder(tmp_path):
    """A real second process that holds the database open for writing."""
    path = tmp_path / "db.durus"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield path, proc
    proc.communicate("", timeout=60)


def test_second_writer_is_refused_at_once_naming_file_and_holder(holder):
    path, proc = holder
    before = open_fds()
    started = time.monotonic()
    with pytest.raises(FileLockedError) as info:
        FileStorage(path)
    assert time.monotonic() - started < 10  # refused, not left waiting
    message = str(info.value)
    assert str(path) in message
    assert f"pid {proc.pid}" in message
    assert socket.gethostname() in message
    assert isinstance(info.value, StorageError)
    assert open_fds() == before


def test_holder_is_found_without_the_lock_note(holder):
    path, proc = holder
    Path(f"{path}.lock").unlink()
    with pytest.raises(FileLockedError, match=f"pid {proc.pid}"):
        FileStorage(path)


def test_readonly_open_does_not_wait_for_a_writer(holder):
    path, _proc = holder
    with FileStorage(path, readonly=True) as s:
        assert s.get_size() == 0


def test_the_lock_is_released_on_close(tmp_path):
    path = tmp_path / "db"
    FileStorage(path).close()
    assert not Path(f"{path}.lock").exists()
    code = "import sys; from dhruva.file_storage import FileStorage as F; "
    code += "F(sys.argv[1]).close()"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)


def test_a_second_open_in_the_same_process_is_refused(tmp_path):
    with FileStorage(tmp_path / "db"), pytest.raises(FileLockedError):
        FileStorage(tmp_path / "db")


# --- read-only ---------------------------------------------------------------


def test_readonly_missing_file_is_an_error_and_creates_nothing(tmp_path):
    with pytest.raises(StorageError, match=r"no database file .*missing"):
        FileStorage(tmp_path / "missing", readonly=True)
    assert list(tmp_path.iterdir()) == []


def test_readonly_never_changes_the_file(tmp_path):
    path = tmp_path / "db"
    with FileStorage(path) as s:
        a = s.new_oid()
        commit(s, make_record(a, b"a"))
    old = os.stat(path).st_mtime_ns - 10_000_000_000
    os.utime(path, ns=(old, old))
    content = path.read_bytes()

    with FileStorage(path, readonly=True) as s:
        assert unpack_record(s.load(a))[1] == b"a"
        assert s.get_size() == 1
        for call in (s.begin, s.new_oid, s.pack, s.end):
            with pytest.raises(ReadOnlyError, match="read-only"):
                call()
        with pytest.raises(ReadOnlyError):
            s.store(a, make_record(a))
    assert path.read_bytes() == content
    assert os.stat(path).st_mtime_ns == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_readonly_and_repair_together_are_refused(tmp_path):
    FileStorage(tmp_path / "db").close()
    with pytest.raises(StorageError, match="repair"):
        FileStorage(tmp_path / "db", readonly=True, repair=True)


# --- torn tails --------------------------------------------------------------


@pytest.fixture
def three_commits(tmp_path):
    """A file with three commits; returns (path, oids, start and end of the last)."""
    path = tmp_path / "db.durus"
    with FileStorage(path, format="durus") as s:
        root, a, b = (s.new_oid() for _ in range(3))
        commit(s, make_record(root, b"root", [a]), make_record(a, b"a1"))
        commit(s, make_record(a, b"a2"))
        start = path.stat().st_size
        commit(s, make_record(a, b"a3" * 50), make_record(b, b"b"))
        end = path.stat().st_size
    return path, (root, a, b), start, end


def cut(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("keep", [1, 7, 8, 9, 30, -1])
def test_a_cut_last_transaction_is_refused_then_repaired(three_commits, keep, caplog):
    path, (root, a, b), start, end = three_commits
    cut(path, start + keep if keep > 0 else end + keep)
    tail = path.read_bytes()[start:]

    fds = open_fds()
    with pytest.raises(TornTailError) as info:
        FileStorage(path)
    message = str(info.value)
    assert str(path) in message and f"byte offset {start}" in message
    assert "repair=True" in message and "--repair" in message
    assert info.value.offset == start
    assert open_fds() == fds
    assert not Path(f"{path}.lock").exists()

    # The refused open released its lock: a repairing open in this process works.
    with caplog.at_level(logging.WARNING, logger="dhruva.file_storage"):
        repaired = FileStorage(path, repair=True)
    try:
        warning = caplog.records[-1]
        assert warning.levelno == logging.WARNING
        assert str(path) in warning.getMessage()
        assert str(start) in warning.getMessage()
        assert path.stat().st_size == start
        assert Path(f"{path}.torn-{start}").read_bytes() == tail
        assert unpack_record(repaired.load(a))[1] == b"a2"
        with pytest.raises(KeyError):
            repaired.load(b)
        commit(repaired, make_record(b, b"after repair"))
    finally:
        repaired.close()
    with FileStorage(path) as s:
        assert unpack_record(s.load(b))[1] == b"after repair"
        assert unpack_record(s.load(root))[1] == b"root"


@pytest.mark.parametrize(
    "damage",
    ["zero tail", "zeroed last transaction", "garbage tail", "zeroed last record"],
)
def test_damaged_tails_are_found(three_commits, damage):
    path, (_root, a, b), start, end = three_commits
    data = bytearray(path.read_bytes())
    if damage == "zero tail":
        data += bytes(4096)
        torn_at = end
    elif damage == "zeroed last transaction":
        data[start:] = bytes(end - start)
        torn_at = start
    elif damage == "garbage tail":
        data += b"\xde\xad\xbe\xef" * 64
        torn_at = end
    else:
        data[end - 20 :] = bytes(20)
        torn_at = start
    path.write_bytes(bytes(data))

    with pytest.raises(TornTailError) as info:
        FileStorage(path)
    assert info.value.offset == torn_at
    with FileStorage(path, repair=True) as s:
        assert path.stat().st_size == torn_at
        expected = b"a3" * 50 if torn_at == end else b"a2"
        assert unpack_record(s.load(a))[1] == expected


def test_one_empty_transaction_at_the_end_is_not_damage(three_commits):
    # Durus writes an empty transaction for a commit with no records.
    path, (_root, a, _b), _start, end = three_commits
    with open(path, "ab") as f:
        f.write(bytes(8))
    with FileStorage(path) as s:
        assert unpack_record(s.load(a))[1] == b"a3" * 50
    assert path.stat().st_size == end + 8


def test_readonly_reads_up_to_a_torn_tail_and_changes_nothing(three_commits, caplog):
    path, (_root, a, _b), start, end = three_commits
    cut(path, end - 3)
    content = path.read_bytes()
    with (
        caplog.at_level(logging.WARNING, logger="dhruva.file_storage"),
        FileStorage(path, readonly=True) as s,
    ):
        assert unpack_record(s.load(a))[1] == b"a2"
    assert f"byte offset {start}" in caplog.text
    assert path.read_bytes() == content


def test_repair_does_not_cut_complete_transactions_after_damage(tmp_path):
    path = tmp_path / "db.durus"
    with FileStorage(path, format="durus") as s:
        root, a, b = (s.new_oid() for _ in range(3))
        commit(s, make_record(root, b"root", [a]))
        middle = path.stat().st_size
        commit(s, make_record(a, b"a"))
        commit(s, make_record(b, b"b"))
    data = bytearray(path.read_bytes())
    data[middle + 8 + 8 + 8 + 7] ^= 0xFF  # the record's own copy of its oid
    path.write_bytes(bytes(data))

    with pytest.raises(StorageError, match=f"byte offset {middle}"):
        FileStorage(path, repair=True).close()
    assert path.read_bytes() == bytes(data)
