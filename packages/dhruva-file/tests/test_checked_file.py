"""Tests of CheckedFileStorage: the DHRUVA1 layout, and the crash matrix
(cuts at every byte, zero-filled and garbage tails, byte and bit flips
everywhere, SIGKILLed committing processes). The storage contract and what
every file layout does alike are in ``test_file_formats.py``."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from dhruva.checked_file import (
    HEADER_SIZE,
    MAGIC,
    TXN_MARK,
    CheckedFileStorage,
    DamagedFileError,
    DamagedRecordError,
)
from dhruva.cli import make_cli
from dhruva.error import DhruvaKeyError, StorageError
from dhruva.file_storage import FileStorage
from dhruva.plugins import get_plugins, open_storage
from dhruva.record import ROOT_OID
from dhruva.shelf import MidFileDamageError, TornTailError
from dhruva.storage_testing import (
    commit,
    make_record,
)


def oid(n: int) -> bytes:
    return n.to_bytes(8, "big")


# --- a small history to break in every way --------------------------------------


def build(path: Path, pack: bool = True) -> list[tuple[int, dict[bytes, bytes]]]:
    """Write a file with a packed base and commits after it.

    :return: ``(position, state)`` at each point in time: the file's size
        right after a commit, and every record then, by oid.
    """
    points: list[tuple[int, dict[bytes, bytes]]] = []
    state: dict[bytes, bytes] = {}
    with CheckedFileStorage(path) as s:

        def put(*records: bytes) -> None:
            commit(s, *records)
            state.update((r[:8], r) for r in records)

        put(make_record(ROOT_OID, b"root 0", [oid(1), oid(2)]))
        put(make_record(oid(1), b"one"), make_record(oid(2), b"two" * 5))
        put(make_record(oid(3), b"garbage"))
        if pack:
            s.pack()
            del state[oid(3)]
        points.append((os.path.getsize(path), dict(state)))
        put(make_record(oid(1), b"one, changed"))
        points.append((os.path.getsize(path), dict(state)))
        put(
            make_record(ROOT_OID, b"root 1", [oid(1), oid(2), oid(4)]),
            make_record(oid(4), b"four" * 3),
        )
        points.append((os.path.getsize(path), dict(state)))
    return points


def assert_holds(s: CheckedFileStorage, state: dict[bytes, bytes]) -> None:
    for key, record in state.items():
        assert s.load(key) == record
    assert {o for o, _r in s.gen_oid_record()} == set(state)


def test_a_new_file_is_a_header_and_an_empty_index(tmp_path):
    path = tmp_path / "db"
    CheckedFileStorage(path).close()
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    assert int.from_bytes(data[8:16], "big") == HEADER_SIZE  # the index block
    assert data[HEADER_SIZE : HEADER_SIZE + 4] == b"IDX1"


def test_each_commit_appends_one_transaction_with_its_time(tmp_path):
    path = tmp_path / "db"
    before = time.time()
    points = build(path, pack=False)
    after = time.time()
    with CheckedFileStorage(path, readonly=True) as s:
        spans = s.transactions()
        assert s.check() == []
    assert [span.end for span in spans[-2:]] == [p for p, _s in points[-2:]]
    assert [span.records for span in spans[1:]] == [1, 2, 1, 1, 2]
    times = [span.time for span in spans]
    assert all(t is not None and before <= t <= after for t in times)
    assert times == sorted(t or 0.0 for t in times)
    data = path.read_bytes()
    assert all(data[span.start : span.start + 4] == TXN_MARK for span in spans[1:])


def test_a_commit_is_one_write_and_one_fsync(tmp_path, fsyncs):
    with CheckedFileStorage(tmp_path / "db") as s:
        commit(s, make_record(ROOT_OID, b"root"))
        fsyncs.clear()
        records = [make_record(oid(n), b"x" * n) for n in range(1, 200)]
        commit(s, *records)
        assert fsyncs == [s._live_file().fileno()]
        commit(s)  # nothing to write, nothing to sync
        assert len(fsyncs) == 1


def test_each_point_in_time_opens_as_it_was(tmp_path):
    path = tmp_path / "db"
    points = build(path)
    for position, state in points:
        with CheckedFileStorage(path, readonly=True, at=position) as view:
            assert_holds(view, state)


def test_pack_keeps_the_oid_counter_and_the_records(tmp_path):
    path = tmp_path / "db"
    points = build(path)
    with CheckedFileStorage(path) as s:
        assert_holds(s, points[-1][1])
        assert int.from_bytes(s.new_oid(), "big") == 5
        assert s.transactions()[0].records == 3  # the packed base
        assert s.check() == []


# --- torn tails: cut at every byte, zeros, garbage --------------------------------


def test_a_cut_at_every_byte_of_the_last_transactions(tmp_path):
    """Each cut file either opens with every complete transaction, or is
    refused naming the offset; repaired, every complete transaction loads."""
    source = tmp_path / "source"
    points = build(source)
    data = source.read_bytes()
    path = tmp_path / "db"
    boundaries = [p for p, _s in points]
    for cut in range(points[0][0], len(data) + 1):
        last = max(i for i, p in enumerate(boundaries) if p <= cut)
        position, state = points[last]
        path.write_bytes(data[:cut])
        if cut == position:
            with CheckedFileStorage(path) as s:
                assert_holds(s, state)
            continue
        with pytest.raises(TornTailError) as refused:
            CheckedFileStorage(path)
        assert refused.value.offset == position
        assert str(path) in str(refused.value)
        with CheckedFileStorage(path, readonly=True) as s:
            assert_holds(s, state)
        with CheckedFileStorage(path, repair=True) as s:
            assert_holds(s, state)
            commit(s, make_record(oid(9), b"after repair"))
        assert path.stat().st_size > position
        assert Path(f"{path}.torn-{position}").read_bytes() == data[position:cut]
        os.unlink(f"{path}.torn-{position}")
        with CheckedFileStorage(path) as s:
            assert s.load(oid(9)) == make_record(oid(9), b"after repair")
            assert_holds(s, state | {oid(9): make_record(oid(9), b"after repair")})


@pytest.mark.parametrize("kept", [0, 1, 4, 27, 28, 40])
def test_a_zero_filled_last_transaction_is_a_torn_tail(tmp_path, kept):
    """The file grew but the last transaction's bytes (after ``kept`` of
    them) never reached the disk."""
    path = tmp_path / "db"
    points = build(path)
    data = path.read_bytes()
    start = points[-2][0]
    path.write_bytes(data[: start + kept] + bytes(len(data) - start - kept))
    with pytest.raises(TornTailError) as refused:
        CheckedFileStorage(path)
    assert refused.value.offset == start
    with CheckedFileStorage(path, repair=True) as s:
        assert_holds(s, points[-2][1])


@pytest.mark.parametrize("seed", range(12))
def test_garbage_after_the_last_transaction_is_a_torn_tail(tmp_path, seed):
    path = tmp_path / "db"
    points = build(path)
    rng = random.Random(seed)
    garbage = rng.randbytes(rng.randrange(1, 300))
    if seed % 3 == 0:
        # Garbage that looks like the start of a transaction.
        garbage = TXN_MARK + garbage
    with open(path, "ab") as f:
        f.write(garbage)
    with pytest.raises(TornTailError) as refused:
        CheckedFileStorage(path)
    assert refused.value.offset == points[-1][0]
    with CheckedFileStorage(path, repair=True) as s:
        assert_holds(s, points[-1][1])
    assert path.stat().st_size == points[-1][0]


# --- flips: never read as other data ----------------------------------------------


def history_of(points: list[tuple[int, dict[bytes, bytes]]]) -> dict[bytes, set[bytes]]:
    versions: dict[bytes, set[bytes]] = {}
    for _position, state in points:
        for key, record in state.items():
            versions.setdefault(key, set()).add(record)
    return versions


def assert_flip_detected(
    path: Path, points: list[tuple[int, dict[bytes, bytes]]], where: int
) -> None:
    """Opening for writing refuses the flipped file, or the flip is reported
    by check() and by loads; no load returns bytes that were never written."""
    latest = points[-1][1]
    try:
        s = CheckedFileStorage(path)
    except StorageError as e:
        assert str(path) in str(e)
        # Read-only, what can be read is a version that was committed.
        versions = history_of(points)
        try:
            view = CheckedFileStorage(path, readonly=True)
        except StorageError:
            return
        with view:
            for key in latest:
                with contextlib.suppress(DhruvaKeyError, DamagedRecordError):
                    assert view.load(key) in versions[key]
        return
    with s:
        problems = s.check()
        assert problems, f"a flip at byte offset {where} went unnoticed"
        for key, record in latest.items():
            try:
                assert s.load(key) == record
            except DamagedRecordError as e:
                assert e.oid == key and str(path) in str(e)


def test_a_byte_flip_anywhere_is_detected(tmp_path):
    source = tmp_path / "source"
    points = build(source)
    data = source.read_bytes()
    path = tmp_path / "db"
    for where in range(len(data)):
        flipped = bytearray(data)
        flipped[where] ^= 0xFF
        path.write_bytes(flipped)
        assert_flip_detected(path, points, where)


def test_a_bit_flip_anywhere_is_detected(tmp_path):
    source = tmp_path / "source"
    points = build(source)
    data = source.read_bytes()
    path = tmp_path / "db"
    for where in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[where // 8] ^= 1 << (where % 8)
        path.write_bytes(flipped)
        assert_flip_detected(path, points, where // 8)


def test_a_damaged_base_record_names_path_offset_and_oid(tmp_path):
    path = tmp_path / "db"
    points = build(path)
    with CheckedFileStorage(path, readonly=True) as s:
        at = s._index[oid(2)]
    data = bytearray(path.read_bytes())
    data[at + 30] ^= 0x01
    path.write_bytes(data)
    with CheckedFileStorage(path) as s:
        assert s.load(oid(1)) == points[-1][1][oid(1)]
        with pytest.raises(DamagedRecordError) as damaged:
            s.load(oid(2))
        assert [type(p) for p in s.check()] == [DamagedFileError, DamagedRecordError]
    error = damaged.value
    assert (error.path, error.offset, error.oid) == (str(path), at, oid(2))
    assert f"oid 2 at byte offset {at}" in str(error)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_damage_before_the_last_transaction_is_refused_even_with_repair(tmp_path):
    path = tmp_path / "db"
    points = build(path)
    start = points[0][0]  # the first commit after the pack
    data = bytearray(path.read_bytes())
    data[start + 40] ^= 0x10
    path.write_bytes(data)
    for repair in (False, True):
        with pytest.raises(MidFileDamageError) as refused:
            CheckedFileStorage(path, repair=repair)
        assert refused.value.offset == start
        assert f"byte offset {start}" in str(refused.value)
        assert str(path) in str(refused.value)
    assert path.read_bytes() == data  # nothing cut
    with CheckedFileStorage(path, readonly=True) as view:
        assert_holds(view, points[0][1])  # the database before the damage
    error = refused.value
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_a_damaged_header_is_refused(tmp_path):
    path = tmp_path / "db"
    build(path)
    flipped = bytearray(path.read_bytes())
    flipped[20] ^= 0x04
    path.write_bytes(flipped)
    with pytest.raises(DamagedFileError, match="restore the file from a backup"):
        CheckedFileStorage(path, readonly=True)


# Where the index block is damaged: its mark, size, count, an oid, an
# offset, its checksum.
@pytest.mark.parametrize("where", [0, 5, 19, 20, 30, -1])
def test_a_damaged_index_block_is_rebuilt_from_the_base(tmp_path, where, caplog):
    path = tmp_path / "db"
    points = build(path)
    data = bytearray(path.read_bytes())
    index_at = int.from_bytes(data[8:16], "big")
    count = int.from_bytes(data[index_at + 12 : index_at + 20], "big")
    block_end = index_at + 20 + 16 * count + 4
    data[where + (block_end if where < 0 else index_at)] ^= 0x21
    path.write_bytes(data)

    with caplog.at_level(logging.WARNING), CheckedFileStorage(path) as s:
        assert_holds(s, points[-1][1])
        [problem] = s.check()
        assert problem.offset == index_at
        commit(s, make_record(oid(2), b"two, after the rebuild"))
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in warning.getMessage()
    assert f"byte offset {index_at}" in warning.getMessage()
    assert "dhruva pack" in warning.getMessage()

    # Reopened (read-only too), then packed: a sound file again.
    expected = dict(points[-1][1])
    expected[oid(2)] = make_record(oid(2), b"two, after the rebuild")
    with CheckedFileStorage(path, readonly=True) as view:
        assert_holds(view, expected)
    with CheckedFileStorage(path) as s:
        assert_holds(s, expected)
        s.pack()
        assert s.check() == []
    caplog.clear()
    with caplog.at_level(logging.WARNING), CheckedFileStorage(path) as s:
        assert_holds(s, expected)
    assert not caplog.records


def test_an_index_block_and_its_base_both_damaged_are_refused(tmp_path):
    path = tmp_path / "db"
    build(path)
    data = bytearray(path.read_bytes())
    index_at = int.from_bytes(data[8:16], "big")
    data[index_at + 30] ^= 0x04
    data[HEADER_SIZE + 40] ^= 0x04  # inside the first base transaction
    path.write_bytes(data)
    with pytest.raises(DamagedFileError) as refused:
        CheckedFileStorage(path, readonly=True)
    assert refused.value.offset == index_at
    assert "restore the file from a backup" in str(refused.value)


def test_another_format_is_refused(tmp_path):
    path = tmp_path / "db"
    path.write_bytes(b"SHELF-1\n" + bytes(100))
    with pytest.raises(StorageError, match="not a dhruva checked file"):
        CheckedFileStorage(path)


# --- SIGKILL of a committing process ----------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from dhruva.checked_file import CheckedFileStorage
    from dhruva.record import pack_record

    path, first = sys.argv[1], int(sys.argv[2])
    s = CheckedFileStorage(path, repair=True)
    n = first
    while True:
        s.begin()
        for k in range(1 + n % 5):
            oid = (1 + (n * 7 + k) % 50).to_bytes(8, "big")
            s.store(oid, pack_record(oid, b"%d-%d" % (n, k) * (1 + n % 13), b""))
        root = (0).to_bytes(8, "big")
        s.store(root, pack_record(root, b"%d" % n, b""))
        s.end()
        sys.stdout.write("%d\\n" % n)
        sys.stdout.flush()
        n += 1
    """
)


def expected_after(last: int) -> dict[bytes, bytes]:
    """The records of every commit up to ``last``, as the writer makes them."""
    state: dict[bytes, bytes] = {}
    for n in range(last + 1):
        for k in range(1 + n % 5):
            key = (1 + (n * 7 + k) % 50).to_bytes(8, "big")
            state[key] = make_record(key, b"%d-%d" % (n, k) * (1 + n % 13))
        state[ROOT_OID] = make_record(ROOT_OID, b"%d" % n)
    return state


def test_commits_that_returned_survive_sigkill(tmp_path):
    path = tmp_path / "db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(7)
    done = -1
    for _round in range(25):
        with subprocess.Popen(
            [sys.executable, str(script), str(path), str(done + 1)],
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            assert child.stdout is not None
            # Wait for a commit, then kill at a random moment.
            line = child.stdout.readline()
            time.sleep(rng.uniform(0, 0.05))
            child.send_signal(signal.SIGKILL)
            out = line + child.stdout.read()
        numbers = [int(x) for x in out.split()]
        assert numbers, "the writer committed nothing before it was killed"
        done = numbers[-1]

        # Every commit that returned is there; the file reopens (repaired).
        with CheckedFileStorage(path, repair=True) as s:
            root = s.load(ROOT_OID)
            assert int(root[12:]) in (done, done + 1)
            if int(root[12:]) == done + 1:
                done += 1  # killed after end() returned, before it printed
            assert_holds(s, expected_after(done))
            assert s.check() == []


# --- which format FileStorage gives a file ----------------------------------------


def test_filestorage_opens_each_file_in_its_own_format(tmp_path):
    new = tmp_path / "new"
    durus = tmp_path / "durus"
    with FileStorage(durus, format="durus") as s:
        assert type(s) is FileStorage
        commit(s, make_record(ROOT_OID, b"durus"))
    with FileStorage(new, format="dhruva") as s:
        assert type(s) is CheckedFileStorage
        commit(s, make_record(ROOT_OID, b"dhruva"))
    assert durus.read_bytes().startswith(b"SHELF-1\n")
    assert new.read_bytes().startswith(MAGIC)

    # Reopened without a format, each keeps its own.
    with FileStorage(durus) as s:
        assert type(s) is FileStorage
        assert s.load(ROOT_OID) == make_record(ROOT_OID, b"durus")
    with FileStorage(new, readonly=True) as s:
        assert type(s) is CheckedFileStorage
        assert s.load(ROOT_OID) == make_record(ROOT_OID, b"dhruva")


def test_a_format_that_is_not_the_files_is_refused(tmp_path):
    path = tmp_path / "db"
    FileStorage(path, format="durus").close()
    with pytest.raises(StorageError, match="dhruva convert"):
        FileStorage(path, format="dhruva")
    with pytest.raises(StorageError, match="unknown file format 'zodb'"):
        FileStorage(tmp_path / "other", format="zodb")
    assert not (tmp_path / "other").exists()


# --- plugin, history, restore -----------------------------------------------------


def test_the_plugin_recognizes_the_format_and_offers_shelf(tmp_path):
    checked = tmp_path / "new"
    with open_storage(checked, "file", format="dhruva") as s:
        assert isinstance(s, CheckedFileStorage)
    assert get_plugins().recognize(str(checked)) == "file"
    with open_storage(checked) as s:
        assert isinstance(s, CheckedFileStorage)

    shelf = tmp_path / "durus"
    with open_storage(shelf, "shelf") as s:
        assert type(s) is FileStorage
    assert shelf.read_bytes().startswith(b"SHELF-1\n")
    assert get_plugins().recognize(str(shelf)) == "file"


def test_history_shows_commit_times_and_restore_writes_a_copy(tmp_path):
    path = tmp_path / "db"
    points = build(path)
    result = CliRunner().invoke(make_cli(), ["history", str(path)])
    assert result.exit_code == 0, result.output
    assert "CheckedFileStorage, 2 commits since the base" in result.output
    assert "records no commit times" not in result.output
    year = time.strftime("%Y", time.gmtime())
    assert (
        len(
            re.findall(rf"\s{year}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\+00:00", result.output)
        )
        == 3
    )

    position, state = points[1]
    output = tmp_path / "then"
    result = CliRunner().invoke(
        make_cli(),
        ["restore", str(path), "--at", str(position), "--output", str(output)],
    )
    assert result.exit_code == 0, result.output
    with FileStorage(output) as s:
        assert isinstance(s, CheckedFileStorage)
        assert_holds(s, state)
        assert s.check() == []


FIXTURES = (
    Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "durus-4"
)


@pytest.mark.parametrize(
    ("options", "magic"), [([], MAGIC), (["--storage", "shelf"], b"SHELF-1\n")]
)
def test_convert_upgrades_a_durus_file_to_the_checked_format(tmp_path, options, magic):
    if not FIXTURES.is_dir():
        pytest.skip(f"the Durus fixtures are not at {FIXTURES}")
    source = tmp_path / "legacy-shelf.durus"
    source.write_bytes((FIXTURES / "legacy-shelf.durus").read_bytes())
    target = tmp_path / "upgraded"
    result = CliRunner().invoke(
        make_cli(), ["convert", str(source), str(target), *options]
    )
    assert result.exit_code == 0, result.output
    assert target.read_bytes().startswith(magic)
    assert source.read_bytes() == (FIXTURES / "legacy-shelf.durus").read_bytes()
    with (
        FileStorage(source, readonly=True) as old,
        FileStorage(target) as new,
    ):
        copied = dict(new.gen_oid_record(ROOT_OID))
        assert copied == dict(old.gen_oid_record(ROOT_OID))
        assert len(copied) > 1000
        if magic == MAGIC:
            assert isinstance(new, CheckedFileStorage)
            assert new.check() == []
        # The copy takes commits, with oids the source never handed out.
        fresh = new.new_oid()
        assert fresh not in copied
        commit(new, make_record(fresh, b"new"))
