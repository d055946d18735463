"""Read-only FileStorage and FileStorage2 next to a writer: consistent prefixes
while it commits, and following its later commits and packs on sync().

Both storages share this code (FileStorage2 subclasses FileStorage), so every
test runs on both layouts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dhruva.connection import Connection
from dhruva.error import ReadOnlyError
from dhruva.file_storage import FileStorage
from dhruva.file_storage2 import FileStorage2
from dhruva.persistent_dict import PersistentDict
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage_testing import commit, make_record

KINDS = {"file": FileStorage, "file2": FileStorage2}


def oid(n: int) -> bytes:
    return n.to_bytes(8, "big")


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest) -> type[FileStorage]:
    return KINDS[request.param]


@pytest.fixture
def path(tmp_path: Path, kind: type[FileStorage]) -> Path:
    return tmp_path / "db"


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


# --- following commits -------------------------------------------------------


def test_sync_brings_in_later_commits_and_names_their_oids(path, kind):
    writer = kind(path)
    a, b = oid(1), oid(2)
    commit(writer, make_record(ROOT_OID, b"root", [a]), make_record(a, b"a1"))
    reader = kind(path, readonly=True)
    try:
        commit(writer, make_record(a, b"a2"), make_record(b, b"b1"))

        # Until it syncs, the reader keeps the state it opened with.
        assert unpack_record(reader.load(a))[1] == b"a1"
        with pytest.raises(KeyError):
            reader.load(b)

        assert sorted(reader.sync()) == [a, b]
        assert unpack_record(reader.load(a))[1] == b"a2"
        assert unpack_record(reader.load(b))[1] == b"b1"
        assert reader.get_size() == 3
        assert reader.sync() == []
    finally:
        reader.close()
        writer.close()


def test_sync_skips_a_transaction_still_being_written(path, kind):
    with kind(path) as writer:
        a = oid(1)
        commit(writer, make_record(ROOT_OID, b"root", [a]), make_record(a, b"a1"))
        size = path.stat().st_size
        commit(writer, make_record(a, b"a2" * 1000))
        whole = path.read_bytes()

    # A copy whose last transaction is half there, as a reader meets it while
    # the writer is in the middle of its write.
    copy = path.with_name("copy")
    copy.write_bytes(whole[: size + 50])
    with kind(copy, readonly=True) as reader:
        assert unpack_record(reader.load(a))[1] == b"a1"
        assert reader.sync() == []
        with open(copy, "ab") as f:
            f.write(whole[size + 50 : -3])
        assert reader.sync() == []
        assert unpack_record(reader.load(a))[1] == b"a1"
        with open(copy, "ab") as f:
            f.write(whole[-3:])
        assert reader.sync() == [a]
        assert unpack_record(reader.load(a))[1] == b"a2" * 1000


def test_sync_follows_a_pack_that_replaced_the_file(path, kind):
    writer = kind(path)
    a, garbage, c = oid(1), oid(2), oid(3)
    commit(
        writer,
        make_record(ROOT_OID, b"root", [a]),
        make_record(a, b"a1"),
        make_record(garbage, b"gone"),
    )
    reader = kind(path, readonly=True)
    try:
        writer.pack()
        commit(writer, make_record(a, b"a2", [c]), make_record(c, b"c"))

        changed = reader.sync()
        assert {ROOT_OID, a, garbage, c} <= set(changed)
        assert unpack_record(reader.load(a))[1] == b"a2"
        assert unpack_record(reader.load(c))[1] == b"c"
        with pytest.raises(KeyError):
            reader.load(garbage)

        # And it goes on following the new file.
        commit(writer, make_record(c, b"c2"))
        assert reader.sync() == [c]
        assert unpack_record(reader.load(c))[1] == b"c2"
    finally:
        reader.close()
        writer.close()


def test_a_writable_storage_has_nothing_to_follow(path, kind):
    with kind(path) as writer, pytest.raises(ReadOnlyError, match="read-only"):
        writer.follow()


def test_a_readonly_connection_refreshes_on_abort(path, kind):
    writer = Connection(kind(path))
    writer.get_root()["items"] = PersistentDict(a=1)
    writer.commit()

    reader = Connection(kind(path, readonly=True))
    try:
        items = reader.get_root()["items"]
        assert items["a"] == 1
        writer.get_root()["items"]["a"] = 2
        writer.get_root()["new"] = "here"
        writer.commit()

        assert items["a"] == 1  # a consistent view until the next sync
        reader.abort()
        assert items["a"] == 2
        assert reader.get_root()["new"] == "here"
    finally:
        reader.close()
        writer.close()


def test_readonly_follow_changes_no_file(path, kind):
    with kind(path) as writer:
        commit(writer, make_record(ROOT_OID, b"root"))
    directory = path.parent
    before = snapshot(directory)
    with kind(path, readonly=True) as reader:
        reader.sync()
        reader.load(ROOT_OID)
    assert snapshot(directory) == before


# --- a reader next to a real writer process ----------------------------------

#: Commits in a loop: every transaction rewrites the root and RECORDS records,
#: all holding the transaction's number, large enough that a reader often
#: catches a write half done.
WRITER = textwrap.dedent(
    """
    import sys
    from dhruva.file_storage import FileStorage
    from dhruva.file_storage2 import FileStorage2
    from dhruva.record import ROOT_OID, pack_record

    kind, path, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    pack_every = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    RECORDS = 8
    storage = {"file": FileStorage, "file2": FileStorage2}[kind](path)
    oids = [(n + 1).to_bytes(8, "big") for n in range(RECORDS)]
    n = 0
    while True:
        n += 1
        mark = str(n).encode()
        storage.begin()
        storage.store(ROOT_OID, pack_record(ROOT_OID, mark, b"".join(oids)))
        for oid in oids:
            storage.store(oid, pack_record(oid, mark + b" " * 60000, b""))
        storage.end()
        if n == 1:
            print("ready", flush=True)
        if pack_every and n % pack_every == 0:
            storage.pack()
        if n % 20 == 0 and storage.get_size() and __import__("os").path.exists(stop):
            break
    storage.close()
    print(n, flush=True)
    """
)


def check_consistent(storage: FileStorage) -> int:
    """Load the root and its records; all must be of one transaction."""
    _oid, mark, refs = unpack_record(storage.load(ROOT_OID))
    for n in range(len(refs) // 8):
        data = unpack_record(storage.load(refs[n * 8 : n * 8 + 8]))[1]
        assert data.rstrip(b" ") == mark, "a reader saw part of a transaction"
    return int(mark)


@pytest.fixture
def pack_every() -> int:
    return 0


@pytest.fixture
def writer_process(
    path: Path, kind: type[FileStorage], pack_every: int
) -> Iterator[Path]:
    stop = path.with_name("stop")
    name = next(k for k, v in KINDS.items() if v is kind)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, name, str(path), str(stop), str(pack_every)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        yield stop
        stop.touch()
        out, _err = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert int(out) > 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_readers_opened_during_commits_see_whole_transactions(
    path, kind, writer_process
):
    seen = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with kind(path, readonly=True) as reader:
            seen.append(check_consistent(reader))
    assert len(seen) > 10
    assert seen == sorted(seen)
    assert seen[-1] > seen[0], "the writer made no progress while reading"


def test_a_long_lived_reader_follows_the_commits(path, kind, writer_process):
    with kind(path, readonly=True) as reader:
        first = check_consistent(reader)
        marks = [first]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            changed = reader.sync()
            mark = check_consistent(reader)
            if mark != marks[-1]:
                assert ROOT_OID in changed
            marks.append(mark)
        assert marks == sorted(marks)
        assert marks[-1] > first


@pytest.mark.parametrize("pack_every", [7])
def test_a_long_lived_reader_follows_a_writer_that_packs(
    path, kind, writer_process, caplog
):
    caplog.set_level(logging.INFO, logger="dhruva.file_storage")
    with kind(path, readonly=True) as reader:
        marks = [check_consistent(reader)]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            reader.sync()
            marks.append(check_consistent(reader))
        assert marks == sorted(marks)
        assert marks[-1] > marks[0] + 7, "the writer packed no time while reading"
    assert any("was replaced" in r.getMessage() for r in caplog.records)


def test_the_file_of_a_killed_writer_reads_to_its_last_whole_commit(path, kind):
    stop = path.with_name("never")
    name = next(k for k, v in KINDS.items() if v is kind)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, name, str(path), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    with kind(path, readonly=True) as reader:
        time.sleep(0.3)
        proc.kill()  # SIGKILL: mid-commit, as likely as not
        proc.communicate()
        reader.sync()
        last = check_consistent(reader)
    with kind(path, readonly=True) as reader:
        assert check_consistent(reader) == last
    assert os.path.exists(path)
