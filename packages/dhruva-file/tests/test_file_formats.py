"""What every file layout (DHRUVA1, SHELF-1, DFS20) does alike: the storage
contract, oids, one fsync per commit, temporary files, packs, locking,
read-only opens and torn tails. Each test runs once per layout (the ``fmt``
fixture of ``conftest.py``); what only one layout does is tested in
``test_checked_file.py``, ``test_file_storage.py`` and
``test_file_storage2.py``."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dhruva.checked_file import CheckedFileStorage
from dhruva.error import ReadOnlyError, StorageError
from dhruva.file_storage import FileLockedError, FileStorage
from dhruva.file_storage2 import FileStorage2
from dhruva.record import ROOT_OID, unpack_record
from dhruva.shelf import TornTailError
from dhruva.storage_testing import (
    BasicStorageContract,
    DeferredDurabilityStorageContract,
    DurableStorageContract,
    IncrementalPackStorageContract,
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


class TestFileContract(
    BasicStorageContract,
    IterableStorageContract,
    DurableStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
    DeferredDurabilityStorageContract,
):
    @pytest.fixture
    def storage(self, tmp_path, fmt):
        s = fmt.open(tmp_path / "db")
        yield s
        s.close()

    @pytest.fixture
    def reopen(self, tmp_path, fmt):
        def reopen(s):
            s.close()
            return fmt.open(tmp_path / "db")

        return reopen

    @pytest.fixture
    def open_readonly(self, tmp_path, fmt):
        def open_readonly(s):
            s.close()
            return fmt.open(tmp_path / "db", readonly=True)

        return open_readonly

    @pytest.fixture
    def open_reader(self, tmp_path, fmt):
        return lambda s: fmt.kind(tmp_path / "db", readonly=True)


class TestFileIncrementalPack(IncrementalPackStorageContract):
    @pytest.fixture
    def storage(self, tmp_path, fmt):
        s = fmt.open(tmp_path / "db")
        yield s
        s.close()


def test_capabilities(tmp_path, fmt):
    with fmt.open(tmp_path / "db") as s:
        assert type(s) is fmt.kind
        assert s.packable and s.iterable and s.deferred_durability
        assert not s.invalidating
    assert (tmp_path / "db").read_bytes().startswith(fmt.magic)


# --- oids ----------------------------------------------------------------------


def test_first_new_oid_of_a_new_file_is_the_root(tmp_path, fmt):
    with fmt.open(tmp_path / "db") as s:
        assert s.new_oid() == ROOT_OID
        assert s.new_oid() == oid(1)


def test_oids_are_not_reused_after_pack_and_reopen(tmp_path, fmt):
    path = tmp_path / "db"
    s = fmt.open(path)
    root, a, garbage, unused = (s.new_oid() for _ in range(4))
    commit(s, make_record(root, b"r", [a]), make_record(a), make_record(garbage))
    s.pack()
    handed_out = {root, a, garbage, unused}
    assert not {s.new_oid() for _ in range(5)} & handed_out
    s.close()

    # The packed file records the oid counter.
    with fmt.open(path) as s:
        assert not {s.new_oid() for _ in range(5)} & handed_out


def test_get_size_counts_current_records(tmp_path, fmt):
    with fmt.open(tmp_path / "db") as s:
        a, b = s.new_oid(), s.new_oid()
        commit(s, make_record(a), make_record(b))
        commit(s, make_record(a, b"again"))
        assert s.get_size() == 2


# --- durability ------------------------------------------------------------------


def test_each_commit_is_fsynced_once_and_on_disk_when_end_returns(
    tmp_path, fmt, fsyncs
):
    path = tmp_path / "db"
    with fmt.open(path) as s:
        a, b = s.new_oid(), s.new_oid()
        fsyncs.clear()
        size_before = path.stat().st_size
        commit(s, make_record(a, b"x" * 100), make_record(b))
        assert fsyncs == [s._live_file().fileno()]
        # Another reader sees the commit as soon as end() returns.
        with fmt.open(path, readonly=True) as reader:
            assert unpack_record(reader.load(a))[1] == b"x" * 100
        assert path.stat().st_size > size_before


def test_empty_commit_writes_nothing(tmp_path, fmt):
    with fmt.open(tmp_path / "db") as s:
        size = os.path.getsize(s.path)
        commit(s)
        assert os.path.getsize(s.path) == size


def test_temporary_file_is_removed_on_close(fmt):
    s = fmt.open()
    path = s.path
    a = s.new_oid()
    commit(s, make_record(a, b"temp"))
    assert Path(path).read_bytes().startswith(fmt.magic)
    assert unpack_record(s.load(a))[1] == b"temp"
    s.close()
    assert not os.path.exists(path)
    s.close()  # twice is harmless


def test_closed_storage_says_so(tmp_path, fmt):
    s = fmt.open(tmp_path / "db")
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.load(ROOT_OID)


# --- pack ------------------------------------------------------------------------


def test_pack_replaces_the_file_and_leaves_no_temporary(tmp_path, fmt):
    path = tmp_path / "db"
    with fmt.open(path) as s:
        root, a, garbage = (s.new_oid() for _ in range(3))
        commit(s, make_record(root, b"r", [a]), make_record(a), make_record(garbage))
        commit(s, make_record(a, b"newer"))
        size = path.stat().st_size
        s.pack()
        assert path.stat().st_size < size
        assert sorted(tmp_path.iterdir()) == [path, tmp_path / "db.lock"]
        assert garbage in s.sync()
        assert s.sync() == []
    with fmt.open(path) as s:
        assert s.get_size() == 2
        assert unpack_record(s.load(a))[1] == b"newer"


def test_commits_during_an_incremental_pack_are_kept(tmp_path, fmt, monkeypatch):
    monkeypatch.setattr(fmt.kind, "pack_step", 2)
    path = tmp_path / "db"
    with fmt.open(path) as s:
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
        with fmt.open(path, readonly=True) as reader:
            for storage in (s, reader):
                assert unpack_record(storage.load(late))[1] == b"late"
                assert unpack_record(storage.load(root))[1] == b"r2"
                assert unpack_record(storage.load(a))[1] == b"a2"
                with pytest.raises(KeyError):
                    storage.load(garbage)


def test_pack_without_a_root_changes_nothing(tmp_path, fmt):
    path = tmp_path / "db"
    with fmt.open(path) as s:
        commit(s, make_record(oid(5)))
        before = path.read_bytes()
        s.pack()
        assert path.read_bytes() == before


# --- locking ---------------------------------------------------------------------

HOLD = """
import sys
{source}
print("ready", flush=True)
sys.stdin.read()
s.close()
"""


@pytest.fixture
def holder(tmp_path, fmt):
    """A real second process that holds the database open for writing."""
    path = tmp_path / "db"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(source=fmt.source), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield path, proc
    proc.communicate("", timeout=60)


def test_second_writer_is_refused_at_once_naming_file_and_holder(holder, fmt):
    path, proc = holder
    before = open_fds()
    started = time.monotonic()
    with pytest.raises(FileLockedError) as info:
        fmt.open(path)
    assert time.monotonic() - started < 10  # refused, not left waiting
    message = str(info.value)
    assert str(path) in message
    assert f"pid {proc.pid}" in message
    assert socket.gethostname() in message
    assert isinstance(info.value, StorageError)
    assert open_fds() == before


def test_holder_is_found_without_the_lock_note(holder, fmt):
    path, proc = holder
    Path(f"{path}.lock").unlink()
    with pytest.raises(FileLockedError, match=f"pid {proc.pid}"):
        fmt.open(path)


def test_readonly_open_does_not_wait_for_a_writer(holder, fmt):
    path, _proc = holder
    with fmt.open(path, readonly=True) as s:
        assert s.get_size() == 0


def test_the_lock_is_released_on_close(tmp_path, fmt):
    path = tmp_path / "db"
    fmt.open(path).close()
    assert not Path(f"{path}.lock").exists()
    code = f"import sys\n{fmt.source}\ns.close()"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)


def test_a_second_open_in_the_same_process_is_refused(tmp_path, fmt):
    with fmt.open(tmp_path / "db"), pytest.raises(FileLockedError):
        fmt.open(tmp_path / "db")


# --- read-only -------------------------------------------------------------------


def test_readonly_missing_file_is_an_error_and_creates_nothing(tmp_path, fmt):
    with pytest.raises(StorageError, match=r"no database file .*missing"):
        fmt.open(tmp_path / "missing", readonly=True)
    assert list(tmp_path.iterdir()) == []


def test_readonly_never_changes_the_file(tmp_path, fmt):
    path = tmp_path / "db"
    with fmt.open(path) as s:
        root, a = s.new_oid(), s.new_oid()
        commit(s, make_record(root, b"r", [a]), make_record(a, b"a"))
    old = os.stat(path).st_mtime_ns - 10_000_000_000
    os.utime(path, ns=(old, old))
    content = path.read_bytes()

    with fmt.open(path, readonly=True) as s:
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


def test_readonly_and_repair_together_are_refused(tmp_path, fmt):
    fmt.open(tmp_path / "db").close()
    with pytest.raises(StorageError, match="repair"):
        fmt.open(tmp_path / "db", readonly=True, repair=True)


# --- torn tails ------------------------------------------------------------------


@pytest.fixture
def three_commits(tmp_path, fmt, three_commits_in):
    """A file with three commits; returns (path, oids, start and end of the last)."""
    return three_commits_in(fmt.open, tmp_path / "db")


def test_a_cut_at_every_byte_of_the_last_commit_is_refused_then_repaired(
    three_commits, fmt, caplog
):
    path, (root, a, b), start, end = three_commits
    whole = path.read_bytes()
    for size in range(start + 1, end):
        path.write_bytes(whole[:size])
        for leftover in path.parent.glob("db.torn-*"):
            leftover.unlink()
        where = f"cut at byte offset {size}"

        fds = open_fds()
        with pytest.raises(TornTailError) as info:
            fmt.open(path)
        message = str(info.value)
        assert info.value.offset == start, where
        assert str(path) in message and f"byte offset {start}" in message
        assert "repair=True" in message and "--repair" in message
        assert open_fds() == fds
        assert not Path(f"{path}.lock").exists()
        assert path.read_bytes() == whole[:size]  # refusing changed nothing

        # The refused open released its lock: a repairing open works.
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            repaired = fmt.open(path, repair=True)
        try:
            [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert str(path) in warning.getMessage(), where
            assert str(start) in warning.getMessage(), where
            assert path.stat().st_size == start
            assert Path(f"{path}.torn-{start}").read_bytes() == whole[start:size]
            assert unpack_record(repaired.load(a))[1] == b"a2", where
            with pytest.raises(KeyError):
                repaired.load(b)
            commit(repaired, make_record(b, b"after repair"))
        finally:
            repaired.close()
        with fmt.open(path) as s:
            assert unpack_record(s.load(b))[1] == b"after repair"
            assert unpack_record(s.load(root))[1] == b"root"


@pytest.mark.parametrize(
    "damage", ["zero tail", "zeroed last commit", "zeros from its middle", "garbage"]
)
def test_damaged_tails_are_found(three_commits, fmt, damage):
    path, (_root, a, b), start, end = three_commits
    data = bytearray(path.read_bytes())
    if damage == "zero tail":
        data += bytes(4096)
        torn_at = end
    elif damage == "zeroed last commit":
        data[start:] = bytes(end - start)
        torn_at = start
    elif damage == "zeros from its middle":
        middle = (start + end) // 2  # inside a's data
        data[middle:] = bytes(end - middle)
        torn_at = start
    else:
        data += b"\xde\xad\xbe\xef" * 64
        torn_at = end
    path.write_bytes(bytes(data))

    with pytest.raises(TornTailError) as info:
        fmt.open(path)
    assert info.value.offset == torn_at
    with fmt.open(path, repair=True) as s:
        assert path.stat().st_size == torn_at
        expected = b"a3" * 50 if torn_at == end else b"a2"
        assert unpack_record(s.load(a))[1] == expected
        assert (b in {o for o, _r in s.gen_oid_record()}) == (torn_at == end)


def test_readonly_reads_up_to_a_torn_tail_and_changes_nothing(
    three_commits, fmt, caplog
):
    path, (_root, a, _b), start, end = three_commits
    with open(path, "r+b") as f:
        f.truncate(end - 3)
    content = path.read_bytes()
    with caplog.at_level(logging.WARNING), fmt.open(path, readonly=True) as s:
        assert unpack_record(s.load(a))[1] == b"a2"
        assert isinstance(s.damage, TornTailError)
    assert f"byte offset {start}" in caplog.text
    assert path.read_bytes() == content
    assert not Path(f"{path}.torn-{start}").exists()


# --- a damaged start of the file -------------------------------------------------

#: What messages call each layout, and the part that maps its base records.
LAYOUT_NAMES = {"dhruva": "DHRUVA1", "shelf": "SHELF-1", "dfs20": "DFS20"}
INDEX_NAMES = {"dhruva": "index block", "shelf": "offset map", "dfs20": "index record"}
#: Bytes before the first transaction (SHELF-1) or the index (the others).
HEADER_SIZES = {"dhruva": 36, "shelf": 16, "dfs20": 14}


@pytest.fixture
def one_commit(tmp_path, fmt):
    path = tmp_path / "db"
    with fmt.open(path) as s:
        commit(s, make_record(s.new_oid(), b"root"))
    return path


def refusal(path: Path, opener) -> str:
    with pytest.raises(StorageError) as refused:
        opener(path)
    return str(refused.value)


def openers(fmt):
    """FileStorage(path), then the layout's own class read-only and writable."""
    return [
        FileStorage,
        lambda path: fmt.kind(path, readonly=True),
        lambda path: fmt.kind(path),
    ]


@pytest.mark.parametrize("keep", range(1, 6))
def test_a_file_cut_inside_its_magic_is_called_cut_not_another_kind(
    one_commit, fmt, keep
):
    data = one_commit.read_bytes()[:keep]
    one_commit.write_bytes(data)
    for opener in openers(fmt):
        message = refusal(one_commit, opener)
        assert str(one_commit) in message
        assert "cut short" in message
        assert LAYOUT_NAMES[fmt.name] in message
        assert "storage kind that wrote it" not in message
        assert one_commit.read_bytes() == data


def test_a_file_cut_inside_its_header_says_restore_it(one_commit, fmt):
    data = one_commit.read_bytes()
    for keep in range(len(fmt.magic), HEADER_SIZES[fmt.name]):
        one_commit.write_bytes(data[:keep])
        for opener in openers(fmt)[1:]:
            message = refusal(one_commit, opener)
            assert str(one_commit) in message
            assert "from a backup" in message, message
            assert "storage kind that wrote it" not in message


@pytest.mark.parametrize("byte", [0, 2, 5])
def test_a_damaged_magic_is_called_a_damaged_file_of_its_layout(one_commit, fmt, byte):
    data = bytearray(one_commit.read_bytes())
    data[byte] ^= 0x20
    one_commit.write_bytes(data)
    for opener in openers(fmt):
        message = refusal(one_commit, opener)
        assert f"looks like a damaged {LAYOUT_NAMES[fmt.name]} file" in message
        assert "from a backup" in message


def test_another_layouts_file_is_named(one_commit, fmt):
    # FileStorage(path) opens DHRUVA1 and SHELF-1 files each in its own.
    kinds: list[type[FileStorage]] = [CheckedFileStorage, FileStorage2]
    if fmt.kind is FileStorage2:
        kinds.append(FileStorage)
    for kind in kinds:
        if kind is not fmt.kind:
            message = refusal(one_commit, kind)
            assert f"it is a {LAYOUT_NAMES[fmt.name]} file" in message


def test_the_open_log_names_the_layouts_index(tmp_path, fmt, caplog):
    path = tmp_path / "db"
    with fmt.open(path) as s:
        root = s.new_oid()
        commit(s, make_record(root, b"root"))
        s.pack()
        commit(s, make_record(s.new_oid(), b"a"), make_record(s.new_oid(), b"b"))
    caplog.set_level(logging.INFO, logger="dhruva")
    fmt.open(path, readonly=True).close()
    assert any(
        f"2 records after the {INDEX_NAMES[fmt.name]}" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
