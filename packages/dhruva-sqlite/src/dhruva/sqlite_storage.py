"""SqliteStorage: object records in one SQLite table, in the Durus layout.

The records live in the table ``objects(id integer primary key, data blob,
refs blob)``: ``id`` is the oid as an integer, ``data`` and ``refs`` are the two
halves of the object record (see :mod:`dhruva.record`). Files that Durus's
SqliteStorage wrote open unchanged, and Durus can still read a file dhruva has
written to, because Durus only ever reads ``objects``.

dhruva adds one small table, ``dhruva_meta(key text primary key, value)``,
holding the next oid to hand out (key ``next_oid``) and the file's own journal
mode (key ``journal_mode``). The oid counter only grows: on open it is raised to
``max(id) + 1``, so oids are never reused, not after a reopen (Durus handed out
the oid of its newest record again, and overwrote it), not after
:meth:`SqliteStorage.pack` removed the newest records, and not after another
program inserted records.

Each commit is one SQLite transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) with
``synchronous=FULL``: it lands whole or not at all, and is on disk when
:meth:`SqliteStorage.end` returns. While a storage is open for writing the file
is in WAL mode, so readers in other processes never wait for a commit. On close
the file goes back to the journal mode it had when dhruva first opened it
("delete" for Durus files and new ones), so that it is one self-contained file
again; while readers are still open it stays in WAL mode until a later writer
closes it.

Only one process writes at a time. A writable open takes an exclusive lock on
the side file ``<path>.lock``; a second writer waits up to ``timeout`` seconds
for it and then gets a :class:`~dhruva.error.StorageError` naming the file.
Read-only opens take no lock and never write.

A read-only storage reads one state of the file between calls of
:meth:`SqliteStorage.sync` (a SQLite read transaction, in WAL mode), so a
Connection on it never mixes objects of two commits. Each ``sync()`` moves it to
the newest state and returns the oids changed since: every commit also notes
its oids in the table ``dhruva_changes(serial, oids)``, which keeps the last
:data:`KEEP_CHANGES` commits (a reader further behind, or a file no dhruva
writer has opened, gets every oid reported).

:meth:`SqliteStorage.pack` deletes the records not reachable from the root in
one transaction: a crash or a failure (a full disk) removes nothing, and the
failure is raised as a :class:`~dhruva.error.StorageError` naming the file.
:meth:`SqliteStorage.get_packer` does the same in steps a server can run
between client requests: it walks from the root a batch at a time, then
walks from the records committed meanwhile and deletes in one transaction.
Then the pack gives the freed space back to the file system: the first pack
of a file rewrites it with ``VACUUM`` (switching it to SQLite's
``auto_vacuum=INCREMENTAL`` mode, which any SQLite, Durus's included, reads),
and later packs give back the freed pages (``incremental_vacuum``), without
rewriting the file.
Each is an SQLite transaction, so a crash during it leaves every record.

No ``sqlite3`` exception leaves the storage: a file that is not a SQLite
database, a damaged or cut-short one, and one another program keeps locked
longer than ``timeout`` raise :class:`~dhruva.sqlite_errors.NotSqliteError`,
:class:`~dhruva.sqlite_errors.SqliteDamagedError` and
:class:`~dhruva.sqlite_errors.SqliteLockedError` (all
:class:`~dhruva.error.StorageError`), naming the file and the way out.

Limitations:

- The first pack of a file (its ``VACUUM``) needs free disk space for a copy
  of the packed database, written to the ``-wal`` file, and holds up other
  commits while it runs. Without that room the pack still removes the
  records; their pages stay free inside the file for later commits.
- Readers holding an old snapshot keep the ``-wal`` file from being emptied
  after a pack until they sync or close.
- Writers get no invalidations (``invalidating = False``): one writer at a
  time; share a database between processes through the storage server.
- A read-only storage holds its state only while the file is in WAL mode,
  that is while a dhruva writer has it open. Otherwise (no writer, or a Durus
  writer in rollback-journal mode) each load reads the newest commit, and
  the commits of Durus writers are reported only for files no dhruva writer
  has opened. A reader that does not sync keeps SQLite from shrinking the
  ``-wal`` file of the writer.
- A file left in WAL mode (by a writer that crashed, or by another program)
  gets ``-wal`` and ``-shm`` side files from SQLite even when opened read-only;
  the database file itself is not changed.
- Oids must be below 2**63 (SQLite integers are signed); a larger oid raises
  :class:`~dhruva.error.StorageError`.
- A storage object is not for use by several threads at once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dhruva.error import DhruvaKeyError, ReadOnlyError, StorageError
from dhruva.record import ROOT_OID, pack_record, split_oids, unpack_record
from dhruva.sqlite_errors import (
    SQLITE_HEADER,
    NotSqliteError,
    SqliteDamagedError,
    SqliteLockedError,
    SqliteStorageError,
    storage_error,
)
from dhruva.storage import InvalidationHandler, Storage, gen_reachable_records

log = logging.getLogger(__name__)

#: The largest oid SQLite can keep in an integer column, plus one.
OID_LIMIT = 2**63

#: How many oids go into one ``IN (...)`` query; below every SQLite limit.
_QUERY_BATCH = 500

#: The journal modes a file may be put back in when a writer closes it.
_JOURNAL_MODES = {"delete", "truncate", "persist"}

_CREATE_OBJECTS = (
    "CREATE TABLE IF NOT EXISTS objects (id integer primary key, data blob, refs blob)"
)
_CREATE_META = "CREATE TABLE IF NOT EXISTS dhruva_meta (key text primary key, value)"
_CREATE_CHANGES = (
    "CREATE TABLE IF NOT EXISTS dhruva_changes "
    "(serial integer primary key autoincrement, oids blob)"
)

#: The commits ``dhruva_changes`` keeps for read-only storages to catch up from.
KEEP_CHANGES = 1000

#: Free pages given back to the file system per transaction after a pack.
VACUUM_STEP_PAGES = 2048


def _oid_int(oid: bytes) -> int:
    return int.from_bytes(oid, "big")


def _oid_bytes(number: int) -> bytes:
    return number.to_bytes(8, "big")


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


class _WriterLock:
    """An exclusive OS lock on ``<database>.lock``, held while open for writing.

    The lock is on a side file because SQLite's own locks on the database file
    are POSIX locks, which the process loses when any other descriptor of that
    file is closed; the database file itself is never opened outside SQLite.
    """

    def __init__(self, path: str) -> None:
        #: The lock file's path.
        self.path = path + ".lock"
        self._fd: int | None = None

    def acquire(self, database: str, timeout: float) -> None:
        """Take the lock, waiting up to ``timeout`` seconds.

        :raises StorageError: naming ``database`` when another writer holds it.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(
                f"cannot create the lock file {self.path} for {database}: "
                f"{exc.strerror}; open the database read-only, or make its "
                "folder writable"
            ) from exc
        deadline = time.monotonic() + timeout
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StorageError(
                    f"{database} is open for writing in another process (it "
                    f"holds {self.path}; waited {timeout:g} s). Close that "
                    "process, open the database read-only, or share it through "
                    "the storage server"
                )
            time.sleep(0.05)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up; the file stays, since removing it would race."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


if sys.platform == "win32":
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


class SqliteStorage(Storage):
    """A storage kept in a SQLite database file, in the Durus table layout.

    :param path: the database file. A missing or empty (0 byte) file is
        created or initialized when opened for writing.
    :param readonly: open without writing anything; writes raise
        :class:`~dhruva.error.ReadOnlyError`.
    :param repair: accepted for the common opener signature and ignored:
        SQLite's journal rolls back an interrupted commit by itself.
    :param timeout: seconds to wait for another writer (its ``.lock`` file at
        open, SQLite's locks at each commit) before raising
        :class:`~dhruva.error.StorageError`.
    :raises StorageError: when the file is not a SQLite database, is a SQLite
        database of some other application, is missing and ``readonly`` is
        set, or is open for writing in another process.
    """

    packable = True
    iterable = True
    invalidating = False

    #: Oids the packer of :meth:`get_packer` walks per step (at most 500).
    pack_step = _QUERY_BATCH

    def __init__(
        self,
        path: str | os.PathLike[str],
        readonly: bool = False,
        repair: bool = False,
        timeout: float = 10.0,
    ) -> None:
        #: The database file, as given.
        self.filename = os.fspath(path)
        #: True when opened read-only.
        self.readonly = readonly
        self._timeout = timeout
        self._con: sqlite3.Connection | None = None
        self._lock: _WriterLock | None = None
        self._pending: dict[bytes, bytes] | None = None
        self._pack_extra: list[bytes] | None = None
        self._restore_journal_mode: str | None = None
        #: The next oid :meth:`new_oid` hands out.
        self._next_oid = 0
        #: The counter as last written to ``dhruva_meta`` (or found at open).
        self._durable_next = 0
        #: Read-only: the last ``dhruva_changes`` serial read (None: no table),
        #: and SQLite's data_version then.
        self._serial: int | None = None
        self._data_version = 0

        if readonly:
            self._open_readonly()
        else:
            self._open_writable()
        log.info(
            "opened %s%s, next oid %d",
            self.filename,
            " read-only" if readonly else "",
            self._next_oid,
        )

    # --- opening ------------------------------------------------------------

    def _connect(self, target: str, uri: bool) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(
                target,
                timeout=self._timeout,
                isolation_level=None,
                check_same_thread=False,
                uri=uri,
            )
        except sqlite3.Error as exc:
            raise self._sqlite_error(exc, "opening it") from exc
        con.text_factory = bytes
        return con

    #: True while a read-only storage reads a WAL file no writer has open.
    _immutable = False

    def _wal_without_side_files(self) -> bool:
        with open(self.filename, "rb") as f:
            header = f.read(20)
        in_wal_mode = header[18:20] == b"\x02\x02"
        return in_wal_mode and not any(
            os.path.exists(self.filename + suffix) for suffix in ("-wal", "-shm")
        )

    def _open_readonly(self) -> None:
        if not os.path.exists(self.filename):
            raise StorageError(
                f"{self.filename} does not exist; a read-only storage never "
                "creates a file. Check the path, or open it writable to create it"
            )
        uri = Path(self.filename).absolute().as_uri() + "?mode=ro"
        if self._wal_without_side_files():
            # No writer is open (it would have made them), and SQLite would
            # create -wal and -shm to read a WAL file: read it as it stands,
            # until a writer appears (see sync).
            uri += "&immutable=1"
            self._immutable = True
        self._con = self._connect(uri, uri=True)
        try:
            tables = self._read_tables()
            if "objects" not in tables:
                if tables:
                    raise self._foreign_error(tables)
                raise StorageError(
                    f"{self.filename} holds no database yet (it is empty); "
                    "open it writable once to initialize it"
                )
            with self._sqlite_errors("opening it read-only"):
                self._check_objects_columns()
                self._next_oid = self._durable_next = self._read_next_oid(tables)
                self._begin_snapshot()
        except BaseException:
            self._close_connection()
            raise

    def _open_writable(self) -> None:
        # Look before locking, so that no lock file is left beside a file
        # that is not ours to open.
        self._con = self._connect(self.filename, uri=False)
        try:
            tables = self._read_tables()
            if tables and "objects" not in tables:
                raise self._foreign_error(tables)

            self._lock = _WriterLock(self.filename)
            self._lock.acquire(self.filename, self._timeout)
            with self._sqlite_errors("opening it"):
                found_mode = self._journal_mode()
                self._restore_journal_mode = self._read_meta(tables, "journal_mode")
            if self._restore_journal_mode is None:
                # First open by dhruva: remember the mode the file came in.
                self._restore_journal_mode = found_mode
            self._configure_for_writing(found_mode)

            # Create the tables (a new file) or add dhruva_meta (a Durus
            # file), and settle the oid counter.
            with self._write_transaction() as con:
                tables = self._read_tables()
                if tables and "objects" not in tables:
                    raise self._foreign_error(tables)
                con.execute(_CREATE_OBJECTS)
                con.execute(_CREATE_META)
                con.execute(_CREATE_CHANGES)
                self._check_objects_columns()
                self._next_oid = self._read_next_oid({"objects", "dhruva_meta"})
                self._write_next_oid(con)
                con.execute(
                    "INSERT OR IGNORE INTO dhruva_meta (key, value) "
                    "VALUES ('journal_mode', ?)",
                    (self._restore_journal_mode,),
                )
            self._durable_next = self._next_oid
        except BaseException:
            self._close_connection()
            raise

    def _journal_mode(self, change_to: str | None = None) -> str:
        pragma = "PRAGMA journal_mode" + (f" = {change_to}" if change_to else "")
        (mode,) = self._connection().execute(pragma).fetchone()
        return (mode.decode() if isinstance(mode, bytes) else str(mode)).lower()

    def _configure_for_writing(self, found_mode: str) -> None:
        try:
            if found_mode != "wal":
                new_mode = self._journal_mode("WAL")
                if new_mode != "wal":
                    log.warning(
                        "%s: SQLite refused WAL mode, staying in %s mode; "
                        "readers will wait for commits",
                        self.filename,
                        new_mode,
                    )
            self._connection().execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise self._sqlite_error(exc, "preparing for writing") from exc

    def _read_tables(self) -> set[str]:
        try:
            rows = (
                self._connection()
                .execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise self._sqlite_error(exc, "reading its tables") from exc
        return {name.decode() if isinstance(name, bytes) else name for (name,) in rows}

    def _foreign_error(self, tables: Iterable[str]) -> StorageError:
        names = ", ".join(sorted(tables))
        return StorageError(
            f"{self.filename} is a SQLite database of another application: it "
            f"has the tables {names} but no 'objects' table. Refusing to add "
            "dhruva tables to it; choose another file name"
        )

    def _check_objects_columns(self) -> None:
        rows = self._connection().execute("PRAGMA table_info(objects)").fetchall()
        columns = {
            name.decode() if isinstance(name, bytes) else name for _, name, *_ in rows
        }
        missing = {"id", "data", "refs"} - columns
        if missing:
            raise StorageError(
                f"{self.filename} has an 'objects' table without the columns "
                f"{', '.join(sorted(missing))}; it is not a Durus or dhruva "
                "database. Choose another file"
            )

    def _read_next_oid(self, tables: set[str]) -> int:
        """Return the counter: the larger of ``dhruva_meta`` and max(id) + 1."""
        con = self._connection()
        (max_id,) = con.execute("SELECT max(id) FROM objects").fetchone()
        next_oid = 0 if max_id is None else max_id + 1
        if "dhruva_meta" in tables:
            row = con.execute(
                "SELECT value FROM dhruva_meta WHERE key = 'next_oid'"
            ).fetchone()
            if row is not None and isinstance(row[0], int):
                next_oid = max(next_oid, row[0])
        return next_oid

    def _read_meta(self, tables: set[str], key: str) -> str | None:
        if "dhruva_meta" not in tables:
            return None
        row = (
            self._connection()
            .execute("SELECT value FROM dhruva_meta WHERE key = ?", (key,))
            .fetchone()
        )
        if row is None:
            return None
        value = row[0]
        return value.decode() if isinstance(value, bytes) else str(value)

    def _write_next_oid(self, con: sqlite3.Connection) -> None:
        con.execute(
            "INSERT OR REPLACE INTO dhruva_meta (key, value) VALUES ('next_oid', ?)",
            (self._next_oid,),
        )

    # --- plumbing -----------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            raise StorageError(f"{self.filename} is closed; open it again")
        return self._con

    def _check_writable(self, what: str) -> None:
        if self.readonly:
            raise ReadOnlyError(
                f"{what}: {self.filename} is open read-only; open it without "
                "readonly=True to change it"
            )

    def _sqlite_error(self, exc: sqlite3.Error, doing: str) -> SqliteStorageError:
        return storage_error(exc, self.filename, doing, self._timeout)

    @contextmanager
    def _sqlite_errors(self, doing: str) -> Iterator[None]:
        """Raise SQLite's errors as the :mod:`dhruva.sqlite_errors` ones."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._sqlite_error(exc, doing) from exc

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """One SQLite write transaction: committed whole, or rolled back."""
        con = self._connection()
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._sqlite_error(exc, "starting a transaction") from exc
        try:
            yield con
            con.execute("COMMIT")
        except BaseException as exc:
            if con.in_transaction:
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error:
                    log.debug("%s: the rollback failed", self.filename, exc_info=True)
            if isinstance(exc, sqlite3.Error):
                raise self._sqlite_error(exc, "writing") from exc
            raise

    # --- reading ------------------------------------------------------------

    def get_filename(self) -> str:
        """Return the path of the database file."""
        return self.filename

    def load(self, oid: bytes) -> bytes:
        try:
            row = (
                self._connection()
                .execute(
                    "SELECT data, refs FROM objects WHERE id = ?", (_oid_int(oid),)
                )
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise self._sqlite_error(exc, f"loading oid {_oid_int(oid)}") from exc
        if row is None:
            raise DhruvaKeyError(oid)
        return pack_record(oid, bytes(row[0]), bytes(row[1] or b""))

    def bulk_load(self, oids: Iterable[bytes]) -> Iterator[bytes]:
        """Yield the records of ``oids`` in order, one query per 500 oids.

        :raises DhruvaKeyError: for the first oid that has no record.
        """
        con = self._connection()
        wanted = list(oids)
        for start in range(0, len(wanted), _QUERY_BATCH):
            batch = wanted[start : start + _QUERY_BATCH]
            numbers = [_oid_int(oid) for oid in batch]
            try:
                rows = con.execute(
                    "SELECT id, data, refs FROM objects "
                    f"WHERE id IN ({_placeholders(len(numbers))})",
                    numbers,
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._sqlite_error(exc, "loading records") from exc
            found = {number: (data, refs) for number, data, refs in rows}
            for oid, number in zip(batch, numbers, strict=True):
                if number not in found:
                    raise DhruvaKeyError(oid)
                data, refs = found[number]
                yield pack_record(oid, bytes(data), bytes(refs or b""))

    def gen_oid_record(
        self, start_oid: bytes | None = None, batch_size: int = 100
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(oid, record)`` pairs.

        Without ``start_oid``, every record in the file, lowest oid first,
        fetched ``batch_size`` rows per query; with it, the records reachable
        from ``start_oid``.
        """
        if start_oid is not None:
            yield from gen_reachable_records(self, start_oid, batch_size)
            return
        after = -1
        while True:
            doing = f"reading the records after oid {after}" if after >= 0 else ""
            with self._sqlite_errors(doing or "reading the records"):
                rows = (
                    self._connection()
                    .execute(
                        "SELECT id, data, refs FROM objects WHERE id > ? "
                        "ORDER BY id LIMIT ?",
                        (after, max(1, batch_size)),
                    )
                    .fetchall()
                )
            if not rows:
                return
            for number, data, refs in rows:
                oid = _oid_bytes(number)
                yield oid, pack_record(oid, bytes(data), bytes(refs or b""))
            after = rows[-1][0]

    def get_size(self) -> int:
        """Return the number of records in the file."""
        con = self._connection()
        with self._sqlite_errors("counting the records"):
            (count,) = con.execute("SELECT count(*) FROM objects").fetchone()
        return int(count)

    def sync(self) -> list[bytes]:
        """Return the oids other processes changed since the last call.

        A writable storage returns none (it is the only writer). A read-only
        one moves to the newest state of the file and returns the oids the
        commits since its last state wrote or a pack removed.
        """
        if not self.readonly:
            return []
        if self._immutable and os.path.exists(self.filename + "-wal"):
            # A writer opened the file: follow it like any read-only storage.
            self._immutable = False
            if self._con is not None:
                self._con.close()
            uri = Path(self.filename).absolute().as_uri() + "?mode=ro"
            self._con = self._connect(uri, uri=True)
        con = self._connection()
        try:
            if con.in_transaction:
                con.execute("COMMIT")  # ends the read snapshot
            serial, version = self._serial, self._data_version
            self._begin_snapshot()
            changed = self._changed_since(serial, version)
        except sqlite3.Error as exc:
            raise self._sqlite_error(exc, "reading the commits of others") from exc
        if changed:
            log.debug("%s: %d records changed by others", self.filename, len(changed))
        return changed

    # --- following a writer (read-only) ---------------------------------------

    def _begin_snapshot(self) -> None:
        """Read one state of the file from now until the next :meth:`sync`.

        In WAL mode (whenever a writer is open) this is a read transaction,
        which never holds up the writer. In other modes each read sees the
        newest commit: holding a read lock there would shut writers out.
        """
        con = self._connection()
        if self._journal_mode() == "wal":
            con.execute("BEGIN")
        try:
            (serial,) = con.execute("SELECT max(serial) FROM dhruva_changes").fetchone()
            self._serial = serial or 0
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            self._serial = None  # no writer of dhruva's has opened the file yet
        (self._data_version,) = con.execute("PRAGMA data_version").fetchone()

    def _changed_since(self, serial: int | None, version: int) -> list[bytes]:
        """Return the oids the commits after ``serial`` changed."""
        con = self._connection()
        if self._serial is not None and serial is not None:
            if self._serial == serial:
                return []
            rows = con.execute(
                "SELECT serial, oids FROM dhruva_changes WHERE serial > ? "
                "ORDER BY serial",
                (serial,),
            ).fetchall()
            if rows and rows[0][0] == serial + 1:
                changed: set[bytes] = set()
                for _serial, oids in rows:
                    changed.update(split_oids(bytes(oids)))
                return sorted(changed)
            log.info(
                "%s: more than %d commits since the last sync; every object "
                "is reported changed",
                self.filename,
                KEEP_CHANGES,
            )
        elif self._data_version == version:
            return []

        # No list of changes to go by: report every record as changed.
        return [_oid_bytes(n) for (n,) in con.execute("SELECT id FROM objects")]

    # --- writing ------------------------------------------------------------

    def new_oid(self) -> bytes:
        """Return an oid that no record in the file has ever had."""
        self._check_writable("new_oid()")
        oid = _oid_bytes(self._next_oid)
        self._next_oid += 1
        return oid

    def get_oid_counter(self) -> int:
        """Return the number of the next oid :meth:`new_oid` hands out.

        Every oid below it has been handed out (or held by a record) at some
        time; ``dhruva convert`` carries it to the new database.
        """
        return self._next_oid

    def reserve_oids(self, next_oid: int) -> None:
        """Never hand out an oid below ``next_oid`` (kept in the file).

        For copies from another storage (``dhruva convert``): the oids its
        records had, and those a pack removed, stay unused here too. A lower
        number changes nothing.

        :raises StorageError: when ``next_oid`` does not fit a SQLite integer.
        """
        self._check_writable("reserve_oids()")
        if next_oid <= self._next_oid:
            return
        if next_oid > OID_LIMIT:
            raise StorageError(
                f"reserve_oids({next_oid}): {self.filename} holds oids below 2**63 only"
            )
        self._next_oid = next_oid
        with self._write_transaction() as con:
            self._write_next_oid(con)
        self._durable_next = self._next_oid
        log.info("%s: new oids start at %d", self.filename, next_oid)

    def begin(self) -> None:
        self._check_writable("begin()")
        self._connection()
        self._pending = {}

    def store(self, oid: bytes, record: bytes) -> None:
        self._check_writable("store()")
        if self._pending is None:
            raise StorageError(
                f"store() of oid {_oid_int(oid)} outside a commit on "
                f"{self.filename}; call begin() first"
            )
        record_oid, _data, _refs = unpack_record(record)
        if record_oid != oid:
            raise StorageError(
                f"store() was given oid {_oid_int(oid)} with a record for oid "
                f"{_oid_int(record_oid)}; nothing was written to {self.filename}"
            )
        if _oid_int(oid) >= OID_LIMIT:
            raise StorageError(
                f"oid {_oid_int(oid)} does not fit a SQLite integer; "
                f"{self.filename} holds oids below 2**63 only"
            )
        self._pending[oid] = record

    def end(self, handle_invalidations: InvalidationHandler | None = None) -> None:
        """Write the records stored since :meth:`begin` in one transaction.

        :raises StorageError: when the file stays locked by another program
            for longer than the timeout, or another program wrote records
            with oids this storage handed out; nothing is written then.
        """
        self._check_writable("end()")
        pending, self._pending = self._pending, None
        if not pending:
            return
        rows = []
        for oid, record in pending.items():
            _oid, data, refs = unpack_record(record)
            rows.append((_oid_int(oid), data, refs))

        with self._write_transaction() as con:
            self._check_foreign_records(con, [number for number, _d, _r in rows])
            con.executemany(
                "INSERT OR REPLACE INTO objects (id, data, refs) VALUES (?, ?, ?)",
                rows,
            )
            self._log_changes(con, pending)
            # Records copied in from elsewhere (dhruva convert) bring their own
            # oids: new ones start above them, never on them.
            highest = max(number for number, _d, _r in rows)
            self._next_oid = max(self._next_oid, highest + 1)
            self._write_next_oid(con)
        self._durable_next = self._next_oid
        if self._pack_extra is not None:
            self._pack_extra.extend(pending)
        log.debug("committed %d records to %s", len(rows), self.filename)

    def _log_changes(self, con: sqlite3.Connection, oids: Iterable[bytes]) -> None:
        """Note the oids a commit changes, for read-only storages to sync."""
        cursor = con.execute(
            "INSERT INTO dhruva_changes (oids) VALUES (?)", (b"".join(oids),)
        )
        if cursor.lastrowid is not None and cursor.lastrowid > KEEP_CHANGES:
            con.execute(
                "DELETE FROM dhruva_changes WHERE serial <= ?",
                (cursor.lastrowid - KEEP_CHANGES,),
            )

    def _check_foreign_records(
        self, con: sqlite3.Connection, numbers: list[int]
    ) -> None:
        """Refuse a commit whose new oids another program has used meanwhile."""
        (max_id,) = con.execute("SELECT max(id) FROM objects").fetchone()
        if max_id is None or max_id < self._durable_next:
            return

        # Records at or above our counter were written by someone else.
        self._next_oid = max(self._next_oid, max_id + 1)
        fresh = [number for number in numbers if number >= self._durable_next]
        taken: list[int] = []
        for batch in _chunks(fresh, _QUERY_BATCH):
            taken.extend(
                number
                for (number,) in con.execute(
                    f"SELECT id FROM objects WHERE id IN ({_placeholders(len(batch))})",
                    batch,
                )
            )
        if taken:
            self._durable_next = self._next_oid
            raise StorageError(
                f"another program wrote records to {self.filename} with the oids "
                f"{', '.join(map(str, sorted(taken)[:10]))} that this storage had "
                "handed out; nothing was written. Call connection.abort() and "
                "run the transaction again"
            )
        log.warning(
            "%s: another program added records up to oid %d; new oids start above them",
            self.filename,
            max_id,
        )

    # --- packing ------------------------------------------------------------

    def pack(self) -> None:
        """Delete every record not reachable from the root, in one transaction.

        Nothing is deleted when there is no root record. Oids of deleted
        records are never handed out again.
        """
        self._check_writable("pack()")
        if self._pending is not None:
            raise StorageError(
                f"pack() of {self.filename} during a commit; call it between commits"
            )
        if self._pack_extra is not None:
            raise StorageError(f"a pack of {self.filename} is already running")
        try:
            with self._write_transaction() as con:
                alive: set[int] = set()
                root = [_oid_int(ROOT_OID)]
                for _step in self._walk_alive(con, alive, root, follow_commits=True):
                    pass
                self._delete_dead(con, alive)
            self._reclaim_space()
        except sqlite3.Error as exc:
            raise self._pack_failed(self._sqlite_error(exc, "reading")) from exc
        except StorageError as exc:
            raise self._pack_failed(exc) from exc

    def get_packer(self) -> Iterator[None] | None:
        """Return a pack that yields between steps, for a server to interleave.

        Records committed while it runs are kept, with what they refer to. The
        deletion at the end is one transaction. Returns None while a commit or
        another pack is in progress.
        """
        self._check_writable("get_packer()")
        if self._pending is not None or self._pack_extra is not None:
            return None
        return self._incremental_pack()

    def _incremental_pack(self) -> Iterator[None]:
        if self._pack_extra is not None:
            # Another packer from get_packer() started after this one was made.
            raise StorageError(f"a pack of {self.filename} is already running")
        self._pack_extra = []
        try:
            # The walk from the root, a batch per step. Commits made between
            # steps are only collected: chasing them here could go on for as
            # long as clients keep committing.
            alive: set[int] = set()
            yield from self._walk_alive(self._connection(), alive, [_oid_int(ROOT_OID)])

            # Then, with writers shut out, what those commits refer to.
            with self._write_transaction() as con:
                for _step in self._walk_alive(con, alive, [], follow_commits=True):
                    pass
                self._delete_dead(con, alive)
            # No step after the deletion: a commit between steps could
            # re-attach a record the pack has removed.
            self._reclaim_space()
        except sqlite3.Error as exc:
            raise self._pack_failed(self._sqlite_error(exc, "reading")) from exc
        except StorageError as exc:
            raise self._pack_failed(exc) from exc
        finally:
            self._pack_extra = None

    def _pack_failed(self, error: StorageError) -> StorageError:
        """Say that a pack failed, why, and that it changed nothing.

        The error keeps its kind (locked, damaged...).
        """
        reason = str(error).removeprefix(f"{self.filename}: ")
        message = (
            f"packing {self.filename} failed: {reason}; nothing was removed and "
            "the database is still writable"
        )
        log.error("%s", message)
        if isinstance(error, SqliteStorageError):
            return type(error)(message, self.filename)
        return StorageError(message)

    def _walk_alive(
        self,
        con: sqlite3.Connection,
        alive: set[int],
        todo: list[int],
        follow_commits: bool = False,
    ) -> Iterator[None]:
        """Add to ``alive`` every oid reachable from ``todo``; yield per batch.

        :param follow_commits: walk again from the records committed since
            the pack began (``_pack_extra``), as long as there are any.
        """
        while todo or (follow_commits and self._pack_extra):
            if follow_commits and self._pack_extra:
                # Committed since the pack began: walk their new refs again.
                for oid in self._pack_extra:
                    alive.discard(_oid_int(oid))
                    todo.append(_oid_int(oid))
                self._pack_extra.clear()

            batch: list[int] = []
            size = max(1, min(self.pack_step, _QUERY_BATCH))
            while todo and len(batch) < size:
                number = todo.pop()
                if number not in alive:
                    alive.add(number)
                    batch.append(number)
            if not batch:
                continue
            rows = con.execute(
                f"SELECT refs FROM objects WHERE id IN ({_placeholders(len(batch))})",
                batch,
            ).fetchall()
            for (refs,) in rows:
                for ref in split_oids(bytes(refs or b"")):
                    number = _oid_int(ref)
                    if number not in alive:
                        todo.append(number)
            yield None

    def _delete_dead(self, con: sqlite3.Connection, alive: set[int]) -> None:
        if (
            0 not in alive
            or con.execute("SELECT 1 FROM objects WHERE id = 0").fetchone() is None
        ):
            log.info("pack of %s: no root record, nothing removed", self.filename)
            return
        dead = [
            number
            for (number,) in con.execute("SELECT id FROM objects")
            if number not in alive
        ]
        con.executemany("DELETE FROM objects WHERE id = ?", ((n,) for n in dead))
        if dead:
            self._log_changes(con, [_oid_bytes(n) for n in dead])

        # The counter never goes back, even when the newest records went.
        if dead:
            self._next_oid = max(self._next_oid, max(dead) + 1)
        self._write_next_oid(con)
        self._durable_next = self._next_oid
        log.info(
            "packed %s: %d records removed, %d kept",
            self.filename,
            len(dead),
            len(alive),
        )

    def _reclaim_space(self) -> None:
        """Give the pages a pack freed back to the file system.

        A file in ``auto_vacuum=INCREMENTAL`` mode gives back
        :data:`VACUUM_STEP_PAGES` pages per transaction. Any other file is
        rewritten once by ``VACUUM``, which also turns that mode on, so that
        later packs need no rewrite of the whole file. Either way each step is
        one SQLite transaction: a crash leaves the file as it was before that
        step, with every record it held.

        Failing here (no room for VACUUM's copy, a long-running reader) loses
        nothing: the freed pages stay in the file for later commits, and a
        warning says so.
        """
        con = self._connection()
        try:
            (free,) = con.execute("PRAGMA freelist_count").fetchone()
            if not free:
                return
            (mode,) = con.execute("PRAGMA auto_vacuum").fetchone()
            if mode == 0:
                log.info("%s: VACUUM gives %d free pages back", self.filename, free)
                con.execute("PRAGMA auto_vacuum = INCREMENTAL")
                con.execute("VACUUM")
            elif mode == 2:
                while free:
                    # executescript() runs the pragma to its end; execute()
                    # would free a single page.
                    con.executescript(
                        f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES});"
                    )
                    (left,) = con.execute("PRAGMA freelist_count").fetchone()
                    if left >= free:
                        break
                    free = left
            self._checkpoint()
        except sqlite3.Error as exc:
            log.warning(
                "%s: the pack removed the unreachable records, but giving their "
                "space back to the file system failed (%s); later commits reuse "
                "it. Make room on the disk, or close the readers, and pack again",
                self.filename,
                exc,
            )

    def _checkpoint(self) -> None:
        """Move the write-ahead log into the file and empty it, if no reader waits.

        Readers are not waited for: their snapshots keep the log until a later
        checkpoint (SQLite runs one every 1000 pages) or the close.
        """
        con = self._connection()
        if self._journal_mode() != "wal":
            return
        con.execute("PRAGMA busy_timeout = 0")
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            con.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")

    # --- closing ------------------------------------------------------------

    def close(self) -> None:
        """Close the file and give up the writer lock; a second call is harmless."""
        if self._con is None:
            return
        if self._restore_journal_mode is not None:
            self._leave_wal_mode(self._restore_journal_mode)
        self._close_connection()
        log.info("closed %s", self.filename)

    def _leave_wal_mode(self, mode: str) -> None:
        # Put the file back in the journal mode it was found in (a Durus file,
        # a new file: "delete"), so that read-only openers need no side files.
        # That needs the file to ourselves; with readers left it stays WAL.
        if mode.lower() not in _JOURNAL_MODES:
            return
        con = self._connection()
        try:
            con.execute("PRAGMA busy_timeout = 0")
            con.execute(f"PRAGMA journal_mode = {mode}")
        except sqlite3.Error as exc:
            log.debug("%s stays in WAL mode: %s", self.filename, exc)

    def _close_connection(self) -> None:
        try:
            if self._con is not None:
                con, self._con = self._con, None
                with self._sqlite_errors("closing it"):
                    con.close()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> SqliteStorage:
        return self

    def __repr__(self) -> str:
        flag = ", readonly=True" if self.readonly else ""
        return f"{type(self).__name__}({self.filename!r}{flag})"

    __str__ = __repr__


__all__ = [
    "SQLITE_HEADER",
    "NotSqliteError",
    "SqliteDamagedError",
    "SqliteLockedError",
    "SqliteStorage",
    "SqliteStorageError",
]
