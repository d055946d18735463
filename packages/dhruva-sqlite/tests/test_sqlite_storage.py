import hashlib
import importlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from dhruva import sqlite_storage
from dhruva.error import DhruvaKeyError, ReadOnlyError, StorageError
from dhruva.record import ROOT_OID, pack_record, split_oids, unpack_record
from dhruva.sqlite_storage import SQLITE_HEADER, SqliteStorage
from dhruva.storage_testing import (
    BasicStorageContract,
    DurableStorageContract,
    IterableStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
    commit,
    make_record,
)

REPO = Path(__file__).resolve().parents[3]
SHARED = REPO / ".." / "shared"
DURUS_FIXTURE = SHARED / "fixtures" / "durus-4" / "legacy-sqlite.sqlite"


def oid(number: int) -> bytes:
    return number.to_bytes(8, "big")


def raw(path: Path) -> sqlite3.Connection:
    """A plain read-only SQLite connection, the way another program sees the file."""
    return sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)


class TestSqliteStorageContract(
    BasicStorageContract,
    IterableStorageContract,
    DurableStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
):
    @pytest.fixture
    def path(self, tmp_path):
        return tmp_path / "db.sqlite"

    @pytest.fixture
    def storage(self, path):
        s = SqliteStorage(path)
        yield s
        s.close()

    @pytest.fixture
    def reopen(self, path):
        return lambda s: (s.close(), SqliteStorage(path))[1]

    @pytest.fixture
    def open_readonly(self, path):
        return lambda s: (s.close(), SqliteStorage(path, readonly=True))[1]


# --- oids ---------------------------------------------------------------------


def test_new_file_hands_out_the_root_oid_first(tmp_path):
    with SqliteStorage(tmp_path / "db") as s:
        assert s.new_oid() == ROOT_OID
        assert s.new_oid() == oid(1)


def test_oids_are_not_reused_after_reopen(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as s:
        used = [s.new_oid() for _ in range(5)]
        commit(s, *(make_record(o, b"first %d" % i) for i, o in enumerate(used)))
    with SqliteStorage(path) as s:
        fresh = s.new_oid()
        assert fresh not in used
        commit(s, make_record(fresh, b"new"))
        for i, o in enumerate(used):
            assert unpack_record(s.load(o))[1] == b"first %d" % i


def test_records_stored_under_their_own_oids_move_the_counter_past_them(tmp_path):
    # A bulk copy stores records without asking new_oid(); Durus's counter
    # stayed at zero, and its next new object overwrote the root.
    with SqliteStorage(tmp_path / "db") as s:
        commit(s, make_record(ROOT_OID, b"root", [oid(7)]), make_record(oid(7)))
        fresh = s.new_oid()
        assert int.from_bytes(fresh, "big") == 8
        commit(s, make_record(fresh, b"new"))
        commit(s, make_record(oid(30), b"copied later"))
        assert s.new_oid() == oid(31)
        assert unpack_record(s.load(ROOT_OID))[1] == b"root"


def test_oids_are_not_reused_after_pack_and_reopen(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as s:
        root, kept, newest = (s.new_oid() for _ in range(3))
        commit(s, make_record(root, b"r", [kept]), make_record(kept))
        commit(s, make_record(newest, b"garbage, the newest record"))
        s.pack()
        with pytest.raises(DhruvaKeyError):
            s.load(newest)
    with SqliteStorage(path) as s:
        assert s.new_oid() not in {root, kept, newest}


def test_oids_skip_records_another_program_inserted_while_closed(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as s:
        commit(s, make_record(s.new_oid(), b"root"))
    con = sqlite3.connect(path)
    with con:
        con.execute("INSERT INTO objects VALUES (1000, x'00', x'')")
    con.close()
    with SqliteStorage(path) as s:
        assert int.from_bytes(s.new_oid(), "big") == 1001


def test_commit_refused_when_another_program_took_its_new_oids(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as s:
        commit(s, make_record(s.new_oid(), b"root"))
        mine = s.new_oid()
        other = sqlite3.connect(path)
        with other:
            other.execute(
                "INSERT INTO objects VALUES (?, x'6f74686572', x'')",
                (int.from_bytes(mine, "big"),),
            )
        other.close()

        with pytest.raises(StorageError, match="another program"):
            commit(s, make_record(mine, b"mine"))
        assert unpack_record(s.load(mine))[1] == b"other"

        # Running the transaction again with a new oid works.
        again = s.new_oid()
        assert again != mine
        commit(s, make_record(again, b"mine"))
        assert unpack_record(s.load(again))[1] == b"mine"


# --- transactions -----------------------------------------------------------------


def test_a_commit_is_all_or_nothing(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as s:
        a, b = s.new_oid(), s.new_oid()
        commit(s, make_record(a, b"before"))
        # Another program's trigger makes the second insert fail.
        other = sqlite3.connect(path)
        with other:
            other.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON objects "
                f"WHEN NEW.id = {int.from_bytes(b, 'big')} "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        other.close()

        with pytest.raises(StorageError, match="db"):
            commit(s, make_record(a, b"after"), make_record(b, b"b"))
        assert unpack_record(s.load(a))[1] == b"before"
        with pytest.raises(DhruvaKeyError):
            s.load(b)


def test_commit_waits_for_a_busy_file_then_names_it(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path, timeout=0.2) as s:
        a = s.new_oid()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StorageError, match=str(path)):
                commit(s, make_record(a, b"blocked"))
        finally:
            other.execute("ROLLBACK")
            other.close()
        with pytest.raises(DhruvaKeyError):
            s.load(a)
        commit(s, make_record(a, b"later"))
        assert unpack_record(s.load(a))[1] == b"later"


def test_store_checks_the_record_oid(tmp_path):
    with SqliteStorage(tmp_path / "db") as s:
        s.begin()
        with pytest.raises(StorageError, match="oid 1"):
            s.store(oid(1), make_record(oid(2)))


def test_bulk_load_of_many_oids_and_a_missing_one(tmp_path):
    with SqliteStorage(tmp_path / "db") as s:
        oids = [s.new_oid() for _ in range(1200)]
        commit(s, *(make_record(o, o) for o in oids))
        wanted = oids[::-1]
        assert [unpack_record(r)[1] for r in s.bulk_load(wanted)] == wanted
        with pytest.raises(DhruvaKeyError):
            list(s.bulk_load([oids[0], oid(99999)]))


def test_every_record_is_listed_across_batches(tmp_path):
    with SqliteStorage(tmp_path / "db") as s:
        oids = [s.new_oid() for _ in range(25)]
        commit(s, *(make_record(o, b"x", [oids[0]]) for o in oids))
        listed = list(s.gen_oid_record(batch_size=7))
        assert [o for o, _r in listed] == oids
        assert all(split_oids(unpack_record(r)[2]) == [oids[0]] for _o, r in listed)
        assert s.get_size() == 25


def test_incremental_pack_keeps_what_is_committed_while_it_runs(tmp_path):
    with SqliteStorage(tmp_path / "db") as s:
        root, a, garbage, late = (s.new_oid() for _ in range(4))
        commit(
            s,
            make_record(root, b"root", [a]),
            make_record(a),
            make_record(garbage),
        )
        packer = s.get_packer()
        assert packer is not None
        next(packer)
        # Mid-pack, the root starts referring to a new record.
        commit(s, make_record(root, b"root", [a, late]), make_record(late, b"late"))
        for _step in packer:
            pass
        assert unpack_record(s.load(late))[1] == b"late"
        assert unpack_record(s.load(a))[0] == a
        with pytest.raises(DhruvaKeyError):
            s.load(garbage)


def test_pack_without_a_root_removes_nothing(tmp_path):
    with SqliteStorage(tmp_path / "db") as s:
        s.new_oid()
        a = s.new_oid()
        commit(s, make_record(a))
        s.pack()
        assert s.get_size() == 1


# --- opening and read-only ----------------------------------------------------------


def test_readonly_never_creates_a_file(tmp_path):
    path = tmp_path / "missing.sqlite"
    with pytest.raises(StorageError, match="missing.sqlite"):
        SqliteStorage(path, readonly=True)
    assert os.listdir(tmp_path) == []


def test_readonly_never_changes_the_file_or_its_folder(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as s:
        a = s.new_oid()
        commit(s, make_record(a, b"a"))
    before = sorted(os.listdir(tmp_path))
    content, mtime = path.read_bytes(), path.stat().st_mtime_ns

    with SqliteStorage(path, readonly=True) as ro:
        assert unpack_record(ro.load(a))[1] == b"a"
        assert ro.get_size() == 1
        for call in (ro.new_oid, ro.begin, ro.pack, ro.get_packer):
            with pytest.raises(ReadOnlyError, match="read-only"):
                call()
        with pytest.raises(ReadOnlyError):
            ro.store(a, make_record(a, b"changed"))
        with pytest.raises(ReadOnlyError):
            ro.end()

    assert sorted(os.listdir(tmp_path)) == before
    assert path.read_bytes() == content
    assert path.stat().st_mtime_ns == mtime


def test_readonly_of_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(StorageError, match="empty"):
        SqliteStorage(path, readonly=True)
    assert path.read_bytes() == b""


def test_empty_file_is_initialized(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with SqliteStorage(path) as s:
        root = s.new_oid()
        assert root == ROOT_OID
        commit(s, make_record(root, b"root"))
    assert path.read_bytes().startswith(SQLITE_HEADER)
    with SqliteStorage(path, readonly=True) as s:
        assert unpack_record(s.load(ROOT_OID))[1] == b"root"


@pytest.mark.parametrize("readonly", [False, True])
def test_a_file_that_is_not_sqlite_is_refused(tmp_path, readonly):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"SHELF-1\nnot a SQLite database at all" * 100)
    with pytest.raises(StorageError, match="notes.txt.*not a SQLite database"):
        SqliteStorage(path, readonly=readonly)
    assert path.read_bytes() == b"SHELF-1\nnot a SQLite database at all" * 100
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("readonly", [False, True])
def test_sqlite_file_of_another_application_is_refused(tmp_path, readonly):
    path = tmp_path / "app.db"
    con = sqlite3.connect(path)
    with con:
        con.execute("CREATE TABLE customers (id integer primary key, name text)")
    con.close()
    content = path.read_bytes()
    with pytest.raises(StorageError, match="app.db.*customers"):
        SqliteStorage(path, readonly=readonly)
    assert path.read_bytes() == content
    con = raw(path)
    assert con.execute("SELECT name FROM sqlite_master").fetchall() == [("customers",)]
    con.close()


def test_closed_storage_says_so(tmp_path):
    s = SqliteStorage(tmp_path / "db")
    s.close()
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.load(ROOT_OID)


def test_file_keeps_the_durus_layout_and_journal_mode(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as s:
        root = s.new_oid()
        commit(s, make_record(root, b"data", [oid(7)]))
    con = raw(path)
    try:
        columns = [
            (name, kind)
            for _c, name, kind, *_ in con.execute("PRAGMA table_info(objects)")
        ]
        assert columns == [("id", "INTEGER"), ("data", "BLOB"), ("refs", "BLOB")]
        assert con.execute("SELECT id, data, refs FROM objects").fetchall() == [
            (0, b"data", oid(7))
        ]
        assert con.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        con.close()


# --- a second writer --------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from dhruva.error import StorageError
    from dhruva.record import pack_record
    from dhruva.sqlite_storage import SqliteStorage

    path, timeout = sys.argv[1], float(sys.argv[2])
    print("opening", flush=True)
    try:
        s = SqliteStorage(path, timeout=timeout)
    except StorageError as exc:
        print("refused:", exc, flush=True)
        sys.exit(0)
    oid = s.new_oid()
    s.begin()
    s.store(oid, pack_record(oid, b"from the child", b""))
    s.end()
    s.close()
    print("committed:", int.from_bytes(oid, "big"), flush=True)
    """
)


@pytest.fixture
def start_child():
    """Start the writer script in a real second process; stop it afterwards."""
    children: list[subprocess.Popen[str]] = []

    def start(path: Path, timeout: float) -> subprocess.Popen[str]:
        child = _spawn(path, timeout)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate()


def _spawn(path: Path, timeout: float) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "opening\n"
    return child


def test_second_writer_process_is_refused_and_no_commit_is_lost(tmp_path, start_child):
    path = tmp_path / "db"
    with SqliteStorage(path) as s:
        root, a = s.new_oid(), s.new_oid()
        commit(s, make_record(root, b"root", [a]), make_record(a, b"a"))

        child = start_child(path, timeout=0.3)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert out.startswith("refused:")
        assert str(path) in out and "another process" in out

        b = s.new_oid()
        commit(s, make_record(a, b"a again", [b]), make_record(b, b"b"))

    with SqliteStorage(path, readonly=True) as s:
        assert unpack_record(s.load(root))[1] == b"root"
        assert unpack_record(s.load(a))[1] == b"a again"
        assert unpack_record(s.load(b))[1] == b"b"
        assert s.get_size() == 3


def test_second_writer_process_waits_for_the_first_to_close(tmp_path, start_child):
    path = tmp_path / "db"
    s = SqliteStorage(path)
    try:
        root, a = s.new_oid(), s.new_oid()
        commit(s, make_record(root, b"root", [a]), make_record(a, b"a"))
        child = start_child(path, timeout=120)
        b = s.new_oid()
        commit(s, make_record(b, b"parent, while the child waits"))
    finally:
        s.close()

    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.startswith("committed:"), out
    child_oid = oid(int(out.split()[-1]))
    assert child_oid not in {root, a, b}

    with SqliteStorage(path, readonly=True) as s:
        assert unpack_record(s.load(a))[1] == b"a"
        assert unpack_record(s.load(b))[1] == b"parent, while the child waits"
        assert unpack_record(s.load(child_oid))[1] == b"from the child"


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as s:
        with pytest.raises(StorageError, match="another process"):
            SqliteStorage(path, timeout=0)
        a = s.new_oid()
        commit(s, make_record(a, b"still works"))
        with SqliteStorage(path, readonly=True) as ro:
            assert unpack_record(ro.load(a))[1] == b"still works"


# --- a file Durus wrote -------------------------------------------------------------


@pytest.fixture
def durus_copy(tmp_path):
    if not DURUS_FIXTURE.exists():
        pytest.skip(f"the shared Durus fixtures are not here: {DURUS_FIXTURE}")
    copy = tmp_path / "legacy-sqlite.sqlite"
    copy.write_bytes(DURUS_FIXTURE.read_bytes())
    copy.chmod(0o644)
    return copy


def original_records(path: Path) -> dict[bytes, bytes]:
    con = raw(path)
    try:
        return {
            oid(number): pack_record(oid(number), data, refs)
            for number, data, refs in con.execute("SELECT id, data, refs FROM objects")
        }
    finally:
        con.close()


def test_durus_file_opens_and_new_records_overwrite_nothing(durus_copy):
    before = original_records(durus_copy)
    newest = max(before)

    with SqliteStorage(durus_copy) as s:
        reachable = dict(s.gen_oid_record(start_oid=ROOT_OID))
        assert set(reachable) < set(before)
        assert all(before[o] == r for o, r in reachable.items())
        assert s.get_size() == len(before)

        fresh = s.new_oid()
        assert fresh not in before
        assert fresh > newest
        root_oid, data, refs = unpack_record(s.load(ROOT_OID))
        s.begin()
        s.store(fresh, pack_record(fresh, b"a dhruva record", b""))
        s.store(ROOT_OID, pack_record(ROOT_OID, data, refs + fresh))
        s.end()
        assert s.load(newest) == before[newest]

    with SqliteStorage(durus_copy) as s:
        assert s.new_oid() > fresh
        assert s.load(newest) == before[newest]
        assert unpack_record(s.load(fresh))[1] == b"a dhruva record"
        assert unpack_record(s.load(ROOT_OID)) == (ROOT_OID, data, refs + fresh)
        everything = dict(s.gen_oid_record())
        assert set(everything) == set(before) | {fresh}
        for o, record in before.items():
            if o != ROOT_OID:
                assert everything[o] == record

    # What Durus reads is still there, in its layout.
    after = original_records(durus_copy)
    assert after[newest] == before[newest]
    assert len(after) == len(before) + 1


def test_durus_file_packs_to_what_is_reachable(durus_copy):
    before = original_records(durus_copy)
    with SqliteStorage(durus_copy) as s:
        reachable = {o for o, _r in s.gen_oid_record(start_oid=ROOT_OID)}
        assert len(reachable) < len(before), "the fixture should hold garbage"
        s.pack()
        assert s.get_size() == len(reachable)
        assert {o for o, _r in s.gen_oid_record()} == reachable
        assert s.new_oid() > max(before)
    with SqliteStorage(durus_copy, readonly=True) as s:
        for o in reachable:
            assert s.load(o) == before[o]


# --- the Durus file through a Connection ------------------------------------------


@pytest.fixture
def legacy_model(monkeypatch):
    """The fixture's application classes, importable as ``legacy_model``."""
    monkeypatch.syspath_prepend(str(DURUS_FIXTURE.parent))
    yield
    sys.modules.pop("legacy_model", None)


def expected_values() -> dict[str, Any]:
    manifest = json.loads((DURUS_FIXTURE.parent / "manifest.json").read_text())
    values: dict[str, Any] = manifest["legacy-sqlite.sqlite"]
    return values


def canonical(value: Any) -> Any:
    if isinstance(value, frozenset):
        return ("frozenset", sorted(value))
    return value


def people_digest(people: Any) -> str:
    """SHA-256 of one line per person, in key order, as manifest.json has it.

    A line is ``key|name|age|tags|friends`` with the tags and the friends'
    names joined by commas, ended by a newline, encoded as UTF-8.
    """
    digest = hashlib.sha256()
    for key, person in people.items():
        tags = ",".join(person.tags)
        friends = ",".join(friend.name for friend in person.friends)
        digest.update(f"{key}|{person.name}|{person.age}|{tags}|{friends}\n".encode())
    return digest.hexdigest()


def observed_values(root: Any) -> dict[str, Any]:
    """What a reader sees, in the terms of manifest.json."""
    numbers = root["numbers"]
    return {
        "root_keys": sorted(root.keys()),
        "people_len": len(root["people"]),
        "by_name_len": len(root["by_name"]),
        "people_sha256": people_digest(root["people"]),
        "numbers_len": len(numbers),
        "numbers_min": min(numbers),
        "numbers_max": max(numbers),
        "numbers_sum": sum(numbers.values()),
        "evens": sorted(root["evens"]),
        "log": list(root["log"]),
        "values_canonical_repr": repr(
            sorted((key, canonical(value)) for key, value in root["values"].items())
        ),
        "blob_sha256": hashlib.sha256(root["blob"]).hexdigest(),
        "slotted": [root["slotted"].x, root["slotted"].y],
        "counter": root["counter"].value,
    }


def test_durus_file_through_a_connection(durus_copy, legacy_model):
    from dhruva.connection import Connection

    expected = expected_values()
    before = original_records(durus_copy)

    connection = Connection(SqliteStorage(durus_copy))
    try:
        root = connection.get_root()
        assert observed_values(root) == expected
        assert all(
            root["by_name"][person.name] is person for person in root["people"].values()
        )

        # A change of the kind an application makes after migrating.
        Person = importlib.import_module("legacy_model").Person

        root["counter"].bump()
        root["log"].append("changed by dhruva")
        newcomer = Person("Zoë-new", 30)
        root["newcomer"] = newcomer
        connection.commit()
        newcomer_oid = newcomer._p_oid
    finally:
        connection.close()

    assert newcomer_oid not in before
    assert int.from_bytes(newcomer_oid, "big") > int.from_bytes(max(before), "big")
    after = original_records(durus_copy)
    assert after[max(before)] == before[max(before)]

    expected.update(
        counter=expected["counter"] + 1,
        log=[*expected["log"], "changed by dhruva"],
        root_keys=sorted([*expected["root_keys"], "newcomer"]),
    )
    with Connection(SqliteStorage(durus_copy)) as connection:
        root = connection.get_root()
        assert observed_values(root) == expected
        assert (root["newcomer"].name, root["newcomer"].age) == ("Zoë-new", 30)
        assert list(root["newcomer"].friends) == []


def test_file_returns_to_its_journal_mode_after_readers_held_it_in_wal(tmp_path):
    path = tmp_path / "db"
    writer = SqliteStorage(path)
    a = writer.new_oid()
    commit(writer, make_record(a, b"a"))
    reader = SqliteStorage(path, readonly=True)
    writer.close()  # the reader keeps the file in WAL mode
    reader.close()

    # The next writer to close puts it back, and leaves no side files.
    with SqliteStorage(path) as writer:
        assert unpack_record(writer.load(a))[1] == b"a"
    assert sorted(os.listdir(tmp_path)) == ["db", "db.lock"]
    con = raw(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        con.close()


# --- readers next to a writer, busy files (issue #3) ------------------------------


def test_a_reader_is_not_blocked_by_a_commit_in_progress_and_sees_none_of_it(
    tmp_path,
):
    path = tmp_path / "db"
    with SqliteStorage(path, timeout=5) as writer:
        a = writer.new_oid()
        commit(writer, make_record(a, b"committed"))

        # Another program is in the middle of a write transaction (WAL mode).
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("UPDATE objects SET data = ? WHERE id = ?", (b"half", 0))
            other.execute(
                "INSERT INTO objects (id, data, refs) VALUES (99, ?, ?)", (b"x", b"")
            )
            with SqliteStorage(path, readonly=True, timeout=5) as reader:
                assert unpack_record(reader.load(a))[1] == b"committed"
                with pytest.raises(DhruvaKeyError):
                    reader.load(oid(99))
                assert reader.get_size() == 1
            other.execute("COMMIT")
        finally:
            other.close()
        assert unpack_record(writer.load(oid(99)))[1] == b"x"


def test_a_read_of_a_file_locked_by_another_program_fails_clearly(tmp_path):
    # A Durus process writing in rollback-journal mode locks readers out; a
    # load waits for the timeout and then names the file, it does not hang.
    path = tmp_path / "db"
    with SqliteStorage(path) as writer:
        a = writer.new_oid()
        commit(writer, make_record(a, b"a"))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        with SqliteStorage(path, readonly=True, timeout=0.2) as reader:
            other.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StorageError, match=rf"{path} stayed locked .*0\.2 s"):
                reader.load(a)
            other.execute("ROLLBACK")
            assert unpack_record(reader.load(a))[1] == b"a"
    finally:
        other.close()


def test_readonly_creates_no_side_files_for_a_file_left_in_wal_mode(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as writer:
        commit(writer, make_record(writer.new_oid(), b"a"))
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    before = sorted(os.listdir(tmp_path))
    with SqliteStorage(path, readonly=True) as reader:
        reader.load(oid(0))
        assert sorted(os.listdir(tmp_path)) == before
        # A writer that opens the file later is followed as usual.
        with SqliteStorage(path) as writer:
            commit(writer, make_record(oid(0), b"changed"))
            assert oid(0) in reader.sync()
            assert unpack_record(reader.load(oid(0)))[1] == b"changed"


def test_a_readonly_storage_reads_one_state_between_syncs(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as writer:
        root, child = writer.new_oid(), writer.new_oid()
        commit(writer, make_record(root, b"1", [child]), make_record(child, b"1"))
        with SqliteStorage(path, readonly=True) as reader:
            assert unpack_record(reader.load(root))[1] == b"1"
            commit(writer, make_record(root, b"2", [child]), make_record(child, b"2"))
            # Loaded after the root, the child is of the root's commit.
            assert unpack_record(reader.load(child))[1] == b"1"

            assert reader.sync() == [root, child]
            assert unpack_record(reader.load(child))[1] == b"2"
            assert reader.sync() == []


def test_sync_reports_what_commits_and_packs_changed(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as writer:
        root, a, b, c = (writer.new_oid() for _ in range(4))
        commit(writer, make_record(root, b"r", [a, b]), make_record(a), make_record(b))
        with SqliteStorage(path, readonly=True) as reader:
            commit(writer, make_record(a, b"a2", [c]), make_record(c))
            commit(writer, make_record(root, b"r", [a]))
            writer.pack()  # b is gone
            assert reader.sync() == [root, a, b, c]
            with pytest.raises(DhruvaKeyError):
                reader.load(b)


def test_a_reader_far_behind_gets_every_oid(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_storage, "KEEP_CHANGES", 3)
    path = tmp_path / "db"
    with SqliteStorage(path) as writer:
        oids = [writer.new_oid() for _ in range(5)]
        commit(writer, *(make_record(o) for o in oids))
        with SqliteStorage(path, readonly=True) as reader:
            for _ in range(2):
                commit(writer, make_record(oids[1], b"again"))
            assert reader.sync() == [oids[1]]
            for _ in range(4):
                commit(writer, make_record(oids[2], b"again"))
            assert reader.sync() == oids
    con = raw(path)
    try:
        assert con.execute("SELECT count(*) FROM dhruva_changes").fetchone() == (3,)
    finally:
        con.close()


def test_commits_to_a_durus_file_no_dhruva_writer_opened_report_every_oid(
    tmp_path,
):
    # Durus's own SqliteStorage keeps no list of changes.
    path = tmp_path / "durus.sqlite"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("CREATE TABLE objects (id integer primary key, data blob, refs blob)")
    con.execute("INSERT INTO objects VALUES (0, ?, ?)", (b"r", b""))
    con.execute("INSERT INTO objects VALUES (1, ?, ?)", (b"a", b""))
    try:
        with SqliteStorage(path, readonly=True) as reader:
            assert reader.sync() == []
            con.execute("UPDATE objects SET data = ? WHERE id = 1", (b"a2",))
            assert reader.sync() == [oid(0), oid(1)]
            assert unpack_record(reader.load(oid(1)))[1] == b"a2"
    finally:
        con.close()


def test_a_readonly_connection_refreshes_on_abort(tmp_path):
    from dhruva.connection import Connection
    from dhruva.persistent_dict import PersistentDict

    path = tmp_path / "db"
    writer = Connection(SqliteStorage(path))
    reader = None
    try:
        writer.get_root()["items"] = PersistentDict(a=1)
        writer.commit()
        reader = Connection(SqliteStorage(path, readonly=True))
        items = reader.get_root()["items"]
        assert items["a"] == 1
        writer.get_root()["items"]["a"] = 2
        writer.get_root()["new"] = "here"
        writer.commit()

        assert items["a"] == 1
        reader.abort()
        assert items["a"] == 2
        assert reader.get_root()["new"] == "here"
    finally:
        if reader is not None:
            reader.close()
        writer.close()


#: Commits in a loop: each transaction rewrites the root and 8 records, all
#: holding the transaction's number.
LOOP_WRITER = textwrap.dedent(
    """
    import os, sys
    from dhruva.record import ROOT_OID, pack_record
    from dhruva.sqlite_storage import SqliteStorage

    path, stop = sys.argv[1], sys.argv[2]
    storage = SqliteStorage(path)
    oids = [(n + 1).to_bytes(8, "big") for n in range(8)]
    n = 0
    while not (n % 20 == 0 and os.path.exists(stop)):
        n += 1
        mark = str(n).encode()
        storage.begin()
        storage.store(ROOT_OID, pack_record(ROOT_OID, mark, b"".join(oids)))
        for oid in oids:
            storage.store(oid, pack_record(oid, mark + b" " * 20000, b""))
        storage.end()
        if n == 1:
            print("ready", flush=True)
    storage.close()
    print(n, flush=True)
    """
)


def _check_consistent(storage: SqliteStorage) -> int:
    _oid, mark, refs = unpack_record(storage.load(ROOT_OID))
    for ref in split_oids(refs):
        data = unpack_record(storage.load(ref))[1]
        assert data.rstrip(b" ") == mark, "a reader mixed two commits"
    return int(mark)


def test_readers_next_to_a_writer_process_read_whole_commits(tmp_path):
    path, stop = tmp_path / "db", tmp_path / "stop"
    proc = subprocess.Popen(
        [sys.executable, "-c", LOOP_WRITER, str(path), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        with SqliteStorage(path, readonly=True) as follower:
            marks = [_check_consistent(follower)]
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                with SqliteStorage(path, readonly=True) as fresh:
                    _check_consistent(fresh)
                changed = follower.sync()
                marks.append(_check_consistent(follower))
                if marks[-1] != marks[-2]:
                    assert ROOT_OID in changed
            assert marks == sorted(marks)
            assert marks[-1] > marks[0]
        stop.touch()
        out, _err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and int(out) > 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_file_another_program_locks_is_reported_as_locked(tmp_path):
    path = tmp_path / "db"
    with SqliteStorage(path) as writer:
        commit(writer, make_record(writer.new_oid(), b"a"))
    other = sqlite3.connect(path)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StorageError, match="locked by another program"):
            SqliteStorage(path, readonly=True, timeout=0.2)
    finally:
        other.rollback()
        other.close()
