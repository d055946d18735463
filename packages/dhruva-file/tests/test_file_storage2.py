"""Tests of FileStorage2: the storage contract, the DFS20 layout, locking, torn
tails, read-only opens, and the DFS20 file Durus 4.3 wrote."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from dhruva.connection import Connection
from dhruva.error import ReadOnlyError, StorageError
from dhruva.file_storage import FileLockedError, FileStorage
from dhruva.file_storage2 import MAGIC, FileStorage2, encode_index
from dhruva.plugins import open_storage
from dhruva.record import ROOT_OID, pack_record, unpack_record
from dhruva.shelf import TornTailError
from dhruva.storage_testing import (
    BasicStorageContract,
    DurableStorageContract,
    IterableStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
    commit,
    make_record,
)

FIXTURES = (
    Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "durus-4"
)
LEGACY = "legacy-filestorage2.dfs20"


def oid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def index_of(path: Path) -> dict[bytes, int]:
    """Read the index record the way Durus does: header offset, then loads."""
    data = path.read_bytes()
    at = int.from_bytes(data[6:14], "big")
    length = int.from_bytes(data[at : at + 8], "big")
    index: dict[bytes, int] = pickle.loads(
        zlib.decompress(data[at + 8 : at + 8 + length])
    )
    return index


class TestFileStorage2Contract(
    BasicStorageContract,
    IterableStorageContract,
    DurableStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
):
    @pytest.fixture
    def storage(self, tmp_path):
        s = FileStorage2(tmp_path / "db.dfs20")
        yield s
        s.close()

    @pytest.fixture
    def reopen(self, tmp_path):
        def reopen(s):
            s.close()
            return FileStorage2(tmp_path / "db.dfs20")

        return reopen

    @pytest.fixture
    def open_readonly(self, tmp_path):
        def open_readonly(s):
            s.close()
            return FileStorage2(tmp_path / "db.dfs20", readonly=True)

        return open_readonly


def test_capabilities():
    assert FileStorage2.packable and FileStorage2.iterable
    assert not FileStorage2.invalidating


# --- layout --------------------------------------------------------------------


def test_a_new_file_has_the_durus_layout(tmp_path):
    path = tmp_path / "db"
    FileStorage2(path).close()
    data = path.read_bytes()
    # Magic, the index at byte 14, and there an index record of an empty dict.
    assert data[:14] == MAGIC + (14).to_bytes(8, "big")
    assert int.from_bytes(data[14:22], "big") == len(data) - 22
    assert pickle.loads(zlib.decompress(data[22:])) == {}


def test_commits_append_durus_transactions(tmp_path):
    path = tmp_path / "db"
    with FileStorage2(path) as s:
        a = s.new_oid()
        b = s.new_oid()
        before = path.stat().st_size
        ra, rb = make_record(a, b"alpha", [b]), make_record(b, b"beta")
        commit(s, ra, rb)
    # Each record is its int4 length and itself; an int4 zero ends the commit.
    tail = path.read_bytes()[before:]
    assert tail == (
        len(ra).to_bytes(4, "big") + ra + len(rb).to_bytes(4, "big") + rb + bytes(4)
    )


def test_each_commit_is_fsynced_once_and_on_disk_when_end_returns(
    tmp_path, monkeypatch
):
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    path = tmp_path / "db"
    with FileStorage2(path) as s:
        a, b = s.new_oid(), s.new_oid()
        synced.clear()
        size_before = path.stat().st_size
        commit(s, make_record(a, b"x" * 100), make_record(b))
        assert len(synced) == 1
        # Another reader sees the commit as soon as end() returns.
        with FileStorage2(path, readonly=True) as reader:
            assert unpack_record(reader.load(a))[1] == b"x" * 100
        assert path.stat().st_size > size_before


def test_empty_commit_writes_nothing(tmp_path):
    with FileStorage2(tmp_path / "db") as s:
        size = os.path.getsize(s.path)
        commit(s)
        assert os.path.getsize(s.path) == size


def test_temporary_file_is_removed_on_close():
    s = FileStorage2()
    path = s.path
    a = s.new_oid()
    commit(s, make_record(a, b"temp"))
    assert Path(path).read_bytes().startswith(MAGIC)
    assert unpack_record(s.load(a))[1] == b"temp"
    s.close()
    assert not os.path.exists(path)
    s.close()  # twice is harmless


def test_closed_storage_says_so(tmp_path):
    s = FileStorage2(tmp_path / "db")
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.load(ROOT_OID)


def test_a_shelf_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "other.durus"
    FileStorage(path).close()
    content = path.read_bytes()
    before = open_fds()
    with pytest.raises(StorageError, match=r"other\.durus.*DFS20"):
        FileStorage2(path)
    assert open_fds() == before
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:10], "header"),
        (lambda d: d[:6] + (10**6).to_bytes(8, "big") + d[14:], "outside"),
        (lambda d: d[:30] + b"\xff" * 8 + d[38:], "unreadable"),
        (
            lambda d: (
                d[:14] + encode_index({oid(1): 10**6}) + d[14 + len(encode_index({})) :]
            ),
            "byte offset 1000000",
        ),
    ],
)
def test_a_damaged_header_or_index_is_refused(tmp_path, damage, message):
    path = tmp_path / "db.dfs20"
    FileStorage2(path).close()
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StorageError, match=message) as info:
        FileStorage2(path)
    assert str(path) in str(info.value) and "backup" in str(info.value)


def test_an_index_pickle_naming_a_callable_is_refused(tmp_path):
    # An index record is a pickle: one naming a callable is refused, not run.
    path = tmp_path / "db.dfs20"
    evil = zlib.compress(pickle.dumps({oid(0): 14, "x": os.getpid}))
    path.write_bytes(MAGIC + (14).to_bytes(8, "big") + len(evil).to_bytes(8, "big"))
    with open(path, "ab") as f:
        f.write(evil)
    with pytest.raises(StorageError, match="posix.getpid"):
        FileStorage2(path)


# --- oids ----------------------------------------------------------------------


def test_first_new_oid_of_a_new_file_is_the_root(tmp_path):
    with FileStorage2(tmp_path / "db") as s:
        assert s.new_oid() == ROOT_OID
        assert s.new_oid() == oid(1)


def test_oids_are_not_reused_after_pack_and_reopen(tmp_path):
    path = tmp_path / "db"
    s = FileStorage2(path)
    root, a, garbage, unused = (s.new_oid() for _ in range(4))
    commit(s, make_record(root, b"r", [a]), make_record(a), make_record(garbage))
    s.pack()
    handed_out = {root, a, garbage, unused}
    assert not {s.new_oid() for _ in range(5)} & handed_out
    s.close()

    # The packed file records the next oid; Durus still reads a plain index.
    assert set(index_of(path)) == {root, a}
    s = FileStorage2(path)
    try:
        assert not {s.new_oid() for _ in range(5)} & handed_out
    finally:
        s.close()


def test_get_size_counts_current_records(tmp_path):
    with FileStorage2(tmp_path / "db") as s:
        a, b = s.new_oid(), s.new_oid()
        commit(s, make_record(a), make_record(b))
        commit(s, make_record(a, b"again"))
        assert s.get_size() == 2


def test_a_record_of_4_gib_is_refused_before_writing(tmp_path):
    class Huge(bytes):
        def __len__(self) -> int:
            return 1 << 32

    with FileStorage2(tmp_path / "db") as s:
        size = os.path.getsize(s.path)
        a = s.new_oid()
        s.begin()
        s.store(a, Huge(make_record(a)))
        with pytest.raises(StorageError, match="oid 0 .*4 GiB"):
            s.end()
        assert os.path.getsize(s.path) == size


# --- pack ----------------------------------------------------------------------


def test_pack_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "db"
    with FileStorage2(path) as s:
        root, a, garbage = (s.new_oid() for _ in range(3))
        commit(s, make_record(root, b"r", [a]), make_record(a), make_record(garbage))
        commit(s, make_record(a, b"newer"))
        size = path.stat().st_size
        s.pack()
        assert path.stat().st_size < size
        assert sorted(tmp_path.iterdir()) == [path, tmp_path / "db.lock"]
        assert garbage in s.sync()
        assert s.sync() == []
        # Packed files keep every record before the index, as Durus writes them.
        assert set(index_of(path)) == {root, a}
    with FileStorage2(path) as s:
        assert s.get_size() == 2
        assert unpack_record(s.load(a))[1] == b"newer"


def test_commits_during_an_incremental_pack_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(FileStorage2, "pack_step", 2)
    path = tmp_path / "db"
    with FileStorage2(path) as s:
        root, a, b, garbage, late = (s.new_oid() for _ in range(5))
        commit(
            s,
            make_record(root, b"r", [a, b]),
            make_record(a),
            make_record(b),
            make_record(garbage),
        )
        packer = s.get_packer()
        next(packer)
        commit(s, make_record(root, b"r2", [a, b, late]), make_record(late, b"late"))
        commit(s, make_record(a, b"a2"))
        allocated_while_packing = s.new_oid()
        for _step in packer:
            pass
        assert s.new_oid() > allocated_while_packing
        with FileStorage2(path, readonly=True) as reader:
            for storage in (s, reader):
                assert unpack_record(storage.load(late))[1] == b"late"
                assert unpack_record(storage.load(root))[1] == b"r2"
                assert unpack_record(storage.load(a))[1] == b"a2"
                with pytest.raises(KeyError):
                    storage.load(garbage)
        assert set(index_of(path)) == {root, a, b, late}


def test_pack_without_a_root_changes_nothing(tmp_path):
    path = tmp_path / "db"
    with FileStorage2(path) as s:
        commit(s, make_record(oid(5)))
        before = path.read_bytes()
        s.pack()
        assert path.read_bytes() == before


# --- locking -------------------------------------------------------------------

HOLD = """
import sys
from dhruva.file_storage2 import FileStorage2
s = FileStorage2(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
s.close()
"""


@pytest.fixture
def holder(tmp_path):
    """A real second process that holds the database open for writing."""
    path = tmp_path / "db.dfs20"
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
        FileStorage2(path)
    assert time.monotonic() - started < 10  # refused, not left waiting
    message = str(info.value)
    assert str(path) in message
    assert f"pid {proc.pid}" in message
    assert socket.gethostname() in message
    assert open_fds() == before


def test_readonly_open_does_not_wait_for_a_writer(holder):
    path, _proc = holder
    with FileStorage2(path, readonly=True) as s:
        assert s.get_size() == 0


def test_the_lock_is_released_on_close(tmp_path):
    path = tmp_path / "db"
    FileStorage2(path).close()
    assert not Path(f"{path}.lock").exists()
    code = "import sys; from dhruva.file_storage2 import FileStorage2 as F; "
    code += "F(sys.argv[1]).close()"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)


# --- read-only -----------------------------------------------------------------


def test_readonly_missing_file_is_an_error_and_creates_nothing(tmp_path):
    with pytest.raises(StorageError, match=r"no database file .*missing"):
        FileStorage2(tmp_path / "missing", readonly=True)
    assert list(tmp_path.iterdir()) == []


def test_readonly_never_changes_the_file(tmp_path):
    path = tmp_path / "db"
    with FileStorage2(path) as s:
        root, a = s.new_oid(), s.new_oid()
        commit(s, make_record(root, b"r", [a]), make_record(a, b"a"))
    old = os.stat(path).st_mtime_ns - 10_000_000_000
    os.utime(path, ns=(old, old))
    content = path.read_bytes()

    with FileStorage2(path, readonly=True) as s:
        assert unpack_record(s.load(a))[1] == b"a"
        assert s.get_size() == 2
        for call in (s.begin, s.new_oid, s.pack, s.end):
            with pytest.raises(ReadOnlyError, match="read-only"):
                call()
        with pytest.raises(ReadOnlyError):
            s.store(a, make_record(a))
    assert path.read_bytes() == content
    assert os.stat(path).st_mtime_ns == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_readonly_and_repair_together_are_refused(tmp_path):
    FileStorage2(tmp_path / "db").close()
    with pytest.raises(StorageError, match="repair"):
        FileStorage2(tmp_path / "db", readonly=True, repair=True)


# --- torn tails ----------------------------------------------------------------


@pytest.fixture
def three_commits(tmp_path):
    """A file with three commits; returns (path, oids, start and end of the last)."""
    path = tmp_path / "db.dfs20"
    with FileStorage2(path) as s:
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


# The last commit is a 116-byte record, a 17-byte record and the 4-byte end
# marker. Cut into the first record's length word, its oid, its data; just
# after it; into the second record's length, its data; just before the end
# marker; into the marker.
@pytest.mark.parametrize("keep", [1, 3, 4, 10, 60, 116, 118, 120, 130, 133, 135])
def test_a_cut_last_transaction_is_refused_then_repaired(three_commits, keep, caplog):
    path, (root, a, b), start, end = three_commits
    cut(path, start + keep if keep > 0 else end + keep)
    tail = path.read_bytes()[start:]

    fds = open_fds()
    with pytest.raises(TornTailError) as info:
        FileStorage2(path)
    message = str(info.value)
    assert str(path) in message and f"byte offset {start}" in message
    assert "repair=True" in message
    assert info.value.offset == start
    assert open_fds() == fds
    assert not Path(f"{path}.lock").exists()
    assert path.read_bytes()[start:] == tail  # refusing changed nothing

    with caplog.at_level(logging.WARNING):
        repaired = FileStorage2(path, repair=True)
    try:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert str(path) in warnings[0].getMessage()
        assert str(start) in warnings[0].getMessage()
        assert path.stat().st_size == start
        assert Path(f"{path}.torn-{start}").read_bytes() == tail
        assert unpack_record(repaired.load(a))[1] == b"a2"
        with pytest.raises(KeyError):
            repaired.load(b)
        commit(repaired, make_record(b, b"after repair"))
    finally:
        repaired.close()
    with FileStorage2(path) as s:
        assert unpack_record(s.load(b))[1] == b"after repair"
        assert unpack_record(s.load(root))[1] == b"root"


@pytest.mark.parametrize(
    "damage",
    [
        "zero tail",
        "zeroed last transaction",
        "garbage tail",
        "zeroed last record",
        "zero-filled last record",
    ],
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
    elif damage == "zeroed last record":
        # From inside the first record on, so the second one's length word
        # reads as an end marker.
        data[end - 30 :] = bytes(30)
        torn_at = start
    else:
        # A length word written, the rest of the commit zeros (a crash on a
        # file system that extends files with zeros).
        data[start + 4 :] = bytes(end - start - 4)
        data[start : start + 4] = (44).to_bytes(4, "big")
        torn_at = start
    path.write_bytes(bytes(data))

    with pytest.raises(TornTailError) as info:
        FileStorage2(path)
    assert info.value.offset == torn_at
    with FileStorage2(path, repair=True) as s:
        assert path.stat().st_size == torn_at
        expected = b"a3" * 50 if torn_at == end else b"a2"
        assert unpack_record(s.load(a))[1] == expected
        assert (b in {o for o, _r in s.gen_oid_record()}) == (torn_at == end)


def test_one_empty_transaction_at_the_end_is_not_damage(three_commits):
    # Durus writes a lone end marker for a commit with no records.
    path, (_root, a, _b), _start, end = three_commits
    with open(path, "ab") as f:
        f.write(bytes(4))
    with FileStorage2(path) as s:
        assert unpack_record(s.load(a))[1] == b"a3" * 50
    assert path.stat().st_size == end + 4


def test_readonly_reads_up_to_a_torn_tail_and_changes_nothing(three_commits, caplog):
    path, (_root, a, _b), start, end = three_commits
    cut(path, end - 3)
    content = path.read_bytes()
    with caplog.at_level(logging.WARNING), FileStorage2(path, readonly=True) as s:
        assert unpack_record(s.load(a))[1] == b"a2"
    assert f"byte offset {start}" in caplog.text
    assert path.read_bytes() == content
    assert not Path(f"{path}.torn-{start}").exists()


# --- choosing the storage --------------------------------------------------------


def test_open_storage_recognizes_dfs20_files(tmp_path):
    path = tmp_path / "db.dfs20"
    with open_storage(path, "file2") as s:
        assert type(s) is FileStorage2
        commit(s, make_record(ROOT_OID, b"root"))
    with open_storage(path) as s:
        assert type(s) is FileStorage2
        assert unpack_record(s.load(ROOT_OID))[1] == b"root"


# --- the DFS20 file Durus 4.3 wrote ----------------------------------------------

needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / LEGACY).exists(),
    reason=f"the Durus fixtures are not there ({FIXTURES}); they come with "
    "the shared folder next to the checkout",
)


@functools.cache
def manifest_checks() -> ModuleType:
    """The manifest checks written for the SHELF-1 fixture, shared here."""
    path = Path(__file__).with_name("test_durus_connection.py")
    spec = importlib.util.spec_from_file_location("_durus_manifest_checks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Iterator[Path]:
    """A writable copy of the Durus DFS20 file, with its model importable."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    path = tmp_path / LEGACY
    shutil.copyfile(FIXTURES / LEGACY, path)
    path.chmod(0o644)
    yield path
    sys.modules.pop("legacy_model", None)


@pytest.fixture
def manifest() -> dict[str, Any]:
    return dict(json.loads((FIXTURES / "manifest.json").read_text())[LEGACY])


def check_manifest(connection: Connection, manifest: dict[str, Any]) -> None:
    manifest_checks().check(connection.get_root(), manifest)


@needs_fixtures
def test_durus_file_opens_and_every_record_loads(legacy):
    with FileStorage2(legacy, readonly=True) as s:
        records = dict(s.gen_oid_record())
        assert 4000 < len(records) == s.get_size() < 10000
        for key, record in records.items():
            assert unpack_record(record)[0] == key
            assert s.load(key) == record
        reachable = dict(s.gen_oid_record(start_oid=ROOT_OID))
        assert set(reachable) < set(records)  # the deleted people are garbage
    assert legacy.read_bytes() == (FIXTURES / LEGACY).read_bytes()


@needs_fixtures
def test_durus_file_through_a_connection_commit_reopen_pack(legacy, manifest):
    connection = Connection(FileStorage2(legacy))
    try:
        check_manifest(connection, manifest)
        connection.get_root()["counter"].bump()
        connection.get_root()["log"].append("dhruva")
        connection.commit()
    finally:
        connection.get_storage().close()

    # The commit was appended; what Durus wrote is untouched.
    original = (FIXTURES / LEGACY).read_bytes()
    appended = legacy.read_bytes()
    assert appended.startswith(original) and len(appended) > len(original)
    assert appended.endswith(bytes(4))

    connection = Connection(FileStorage2(legacy))
    try:
        root = connection.get_root()
        assert root["counter"].value == manifest["counter"] + 1
        assert list(root["log"]) == [*manifest["log"], "dhruva"]
        root["counter"].value -= 1
        root["log"].pop()
        connection.commit()
        check_manifest(connection, manifest)
        connection.pack()
        check_manifest(connection, manifest)
    finally:
        connection.get_storage().close()

    connection = Connection(FileStorage2(legacy, readonly=True))
    try:
        check_manifest(connection, manifest)
    finally:
        connection.get_storage().close()


@needs_fixtures
def test_a_connection_on_a_path_picks_file_storage2_by_the_header(legacy, manifest):
    connection = Connection(str(legacy))
    try:
        assert type(connection.get_storage()) is FileStorage2
        assert connection.get_root()["counter"].value == manifest["counter"]
    finally:
        connection.get_storage().close()


@needs_fixtures
def test_appending_to_the_durus_file_keeps_durus_layout(legacy):
    with FileStorage2(legacy) as s:
        before = dict(s.gen_oid_record())
        new = s.new_oid()
        assert new not in before
        _oid, data, refs = unpack_record(before[ROOT_OID])
        commit(s, before[ROOT_OID], pack_record(new, data, refs))
    with FileStorage2(legacy) as s:
        after = dict(s.gen_oid_record())
        assert set(after) == set(before) | {new}
        assert all(after[key] == record for key, record in before.items())
        assert s.new_oid() > new
