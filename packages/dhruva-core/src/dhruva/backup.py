"""Consistent copies of a database that is in use (``dhruva backup``).

Three ways, by what the source is:

- An append-only file (FileStorage, FileStorage2 and any storage offering
  ``transactions()``): between packs such a file only grows, one complete
  transaction after another. A read-only open tells where the last complete
  transaction ends; the bytes up to there are copied from the very file that
  open read (so a pack renaming a new file over it does not matter) and
  synced. When the destination is already an earlier backup of the same file
  (it ends at one of the file's transaction boundaries, and its first and
  last bytes match the file's) only the new bytes are appended. Otherwise,
  after a pack for instance, the whole file is copied again.
- A SQLite file: SQLite's own online backup API, which copies a consistent
  state while writers go on.
- A server: every record reachable from the root is read through the server
  and written into a new file storage. Commits made by other clients during
  the copy are followed: the records they changed are copied again, until
  a pass ends with no commit in between, so the copy is the database as of
  one moment.

A full copy is written next to the destination and renamed over it once it
is on disk, so an interrupted backup leaves the previous one intact. A
restore is opening the copy (check it with ``dhruva verify``).

Limitations:

- The incremental check compares the destination's size with the file's
  transaction boundaries and its first and last 64 KiB with the file; it
  does not read the whole destination.
- A copy through a server needs a moment with no commit between two of its
  requests (a millisecond or so, once the first pass is done); on a server
  that commits without any pause it gives up after :data:`MAX_ROUNDS`
  passes. The copy may keep records that became unreachable while it was
  taken (a pack of the copy removes them).
- POSIX only (``fcntl``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote

from dhruva.error import DhruvaError, DhruvaKeyError, ReadConflictError, StorageError
from dhruva.record import ROOT_OID, split_oids, unpack_record
from dhruva.storage import Storage

if TYPE_CHECKING:
    from dhruva.plugins import Plugins

log = logging.getLogger(__name__)

#: Called with how much more was copied, and the total to copy.
Progress = Callable[[int, int], None]

#: Bytes compared at each end of a destination before appending to it.
_COMPARE = 64 << 10

#: Bytes copied per read.
_CHUNK = 1 << 20

#: Records read from a server per request.
_SERVER_BATCH = 500

#: Up to this many records are loaded one request each: a bulk load costs a
#: network round trip or two more.
_FEW = 16

#: Bytes of records written to the copy per transaction.
_SERVER_TRANSACTION_BYTES = 16 << 20

#: Passes over records changed by other clients before giving up (each
#: pass after the first reads only what changed).
MAX_ROUNDS = 200

#: Suffix of the file a full copy is written to before it is renamed.
PARTIAL_SUFFIX = ".backup-partial"


@dataclass(frozen=True)
class BackupResult:
    """What a backup did."""

    #: "full", "incremental" or "unchanged".
    mode: str
    #: Bytes (file, SQLite) or records (server) copied.
    copied: int
    #: The size of the destination afterwards, in bytes.
    size: int
    #: For a server copy: oids referred to but missing on the server.
    dangling: int = 0


def _no_progress(_advance: int, _total: int) -> None:
    pass


def _fsync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_destination(file: BinaryIO, dest: str) -> None:
    """Refuse a destination a dhruva storage has open for writing."""
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise StorageError(
                f"{dest} is open for writing in another process; a backup can "
                "not be written there: close it, or choose another destination"
            ) from None
        raise


def check_destination(
    src: str, dest: str, plugins: Plugins, *, what: str = "backup"
) -> None:
    """Refuse a destination that is the source, or a file that is no database.

    An earlier backup (any database file) or an empty file may be replaced.

    :raises StorageError: naming the destination and what to do.
    """
    if not os.path.exists(dest):
        return
    if os.path.isdir(dest):
        raise StorageError(f"{dest} is a folder; give the path of a file")
    if os.path.exists(src) and os.path.samefile(src, dest):
        raise StorageError(
            f"{dest} is the database itself; give another file as the {what}"
        )
    if os.path.getsize(dest) == 0:
        return
    try:
        kind = plugins.recognize(dest)
    except DhruvaError:  # no installed storage knows it
        kind = None
    if kind is None:
        raise StorageError(
            f"{dest} exists and is not a database file; a {what} replaces only "
            "an earlier backup: choose another destination, or remove it first"
        )


# --- append-only files ------------------------------------------------------------


def _open_consistent(
    src: str, kind: str | None, plugins: Plugins
) -> tuple[BinaryIO, list[int]]:
    """Open ``src`` and list its transaction boundaries, both of one file.

    :return: the open file, and the ends of its complete transactions.
    """
    for _attempt in range(10):
        file = open(src, "rb")  # noqa: SIM115 (returned open)
        try:
            storage = plugins.open_storage(src, kind, readonly=True)
            try:
                transactions = getattr(storage, "transactions", None)
                if transactions is None:
                    raise StorageError(
                        f"{src}: the {kind or 'recognized'} storage can not list "
                        "its transactions, so no consistent copy of its file can "
                        "be taken"
                    )
                ends = [span.end for span in transactions()]
            finally:
                storage.close()
            # Both must have read the same file: a pack may have renamed a new
            # one over it in between.
            if os.path.samestat(os.fstat(file.fileno()), os.stat(src)):
                return file, ends
        except BaseException:
            file.close()
            raise
        file.close()
        log.debug("%s was replaced while opening it; again", src)
    raise StorageError(f"{src} keeps being replaced (packed) while opening it; retry")


def _copy_range(
    source: BinaryIO, target: BinaryIO, start: int, end: int, progress: Progress
) -> None:
    source.seek(start)
    position = start
    while position < end:
        chunk = source.read(min(_CHUNK, end - position))
        if not chunk:
            raise StorageError(
                f"{source.name} ended at byte offset {position}, before the end "
                f"of its last transaction at {end}; was it truncated? retry"
            )
        target.write(chunk)
        position += len(chunk)
        progress(len(chunk), end)


def _is_earlier_copy(
    source: BinaryIO, target: BinaryIO, size: int, boundaries: set[int]
) -> bool:
    """Whether ``target`` (``size`` bytes) looks like an earlier copy of ``source``."""
    if size not in boundaries:
        return False
    for start in sorted({0, max(0, size - _COMPARE)}):
        length = min(_COMPARE, size - start)
        source.seek(start)
        target.seek(start)
        if source.read(length) != target.read(length):
            return False
    return True


def backup_file(
    src: str,
    dest: str,
    plugins: Plugins,
    *,
    kind: str | None = None,
    full: bool = False,
    progress: Progress = _no_progress,
) -> BackupResult:
    """Copy an append-only database file up to its last complete transaction.

    :param kind: the storage kind of ``src``; recognized when None.
    :param full: copy the whole file even when ``dest`` is an earlier copy.
    :param progress: called as bytes are copied.
    """
    check_destination(src, dest, plugins)
    source, ends = _open_consistent(src, kind, plugins)
    with source:
        end = ends[-1]

        # An earlier backup of this file: append what is new.
        if not full and os.path.exists(dest):
            with open(dest, "r+b") as target:
                _lock_destination(target, dest)
                size = os.fstat(target.fileno()).st_size
                if _is_earlier_copy(source, target, size, set(ends)):
                    if size == end:
                        return BackupResult("unchanged", 0, size)
                    target.seek(size)
                    _copy_range(source, target, size, end, progress)
                    target.flush()
                    os.fsync(target.fileno())
                    log.info("appended %d bytes of %s to %s", end - size, src, dest)
                    return BackupResult("incremental", end - size, end)
                log.info("%s is not an earlier copy of %s: copying it all", dest, src)

        # A full copy, renamed over the destination once it is on disk.
        partial = dest + PARTIAL_SUFFIX
        try:
            with open(partial, "wb") as target:
                _copy_range(source, target, 0, end, progress)
                target.flush()
                os.fsync(target.fileno())
            _replace(partial, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
    log.info("copied %s to %s: %d bytes", src, dest, end)
    return BackupResult("full", end, end)


def _replace(partial: str, dest: str) -> None:
    """Rename ``partial`` over ``dest``, unless a writer has ``dest`` open."""
    if os.path.exists(dest):
        with open(dest, "rb") as old:
            _lock_destination(old, dest)
            os.replace(partial, dest)
    else:
        os.replace(partial, dest)
    _fsync_directory(dest)


# --- SQLite -----------------------------------------------------------------------


def backup_sqlite(
    src: str, dest: str, plugins: Plugins, *, progress: Progress = _no_progress
) -> BackupResult:
    """Copy a SQLite database with SQLite's online backup API."""
    check_destination(src, dest, plugins)
    if not os.path.exists(src):
        raise StorageError(f"no database file {src}; check the path")
    partial = dest + PARTIAL_SUFFIX
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)

    done = [0]

    def step(_status: int, remaining: int, total: int) -> None:
        progress(total - remaining - done[0], total)
        done[0] = total - remaining

    uri = f"file:{quote(os.path.abspath(src))}?mode=ro"
    try:
        source = sqlite3.connect(uri, uri=True)
        try:
            target = sqlite3.connect(partial)
            try:
                # One step: a writer in another process would restart a
                # backup taken in several.
                source.backup(target, pages=-1, progress=step)
                _set_journal_mode(target)
            finally:
                target.close()
        finally:
            source.close()
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        _replace(partial, dest)
    except sqlite3.Error as error:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise StorageError(f"backing up {src} to {dest} failed: {error}") from error
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    size = os.path.getsize(dest)
    log.info("copied %s to %s with the SQLite backup API: %d bytes", src, dest, size)
    return BackupResult("full", size, size)


def _set_journal_mode(target: sqlite3.Connection) -> None:
    """Leave the copy in the file's own journal mode, not the writer's WAL."""
    mode = "delete"
    with contextlib.suppress(sqlite3.Error):
        row = target.execute(
            "SELECT value FROM dhruva_meta WHERE key = 'journal_mode'"
        ).fetchone()
        if row and str(row[0]).lower() in ("delete", "truncate", "persist"):
            mode = str(row[0]).lower()
    target.execute(f"PRAGMA journal_mode={mode}")


# --- through a server ------------------------------------------------------------


def _load_batch(
    source: Storage, oids: list[bytes], changed: set[bytes]
) -> list[tuple[bytes, bytes | None]]:
    """Load ``oids``; None for those missing. Invalidations go to ``changed``."""
    for _attempt in range(MAX_ROUNDS):
        try:
            try:
                if len(oids) <= _FEW:
                    return [(oid, source.load(oid)) for oid in oids]
                return list(zip(oids, source.bulk_load(oids), strict=True))
            except DhruvaKeyError:
                result: list[tuple[bytes, bytes | None]] = []
                for oid in oids:
                    try:
                        result.append((oid, source.load(oid)))
                    except DhruvaKeyError:
                        result.append((oid, None))
                return result
        except ReadConflictError:
            # Another client changed some of them: take note, then read anew.
            changed.update(source.sync())
    raise StorageError(
        f"{source}: records keep changing while they are read; retry the "
        "backup when the server is less busy"
    )


def copy_snapshot(
    source: Storage, destination: Storage, *, progress: Progress = _no_progress
) -> tuple[int, int]:
    """Copy the records reachable from the root of an invalidating storage.

    Records other clients change while the copy runs are copied again until a
    pass ends with no commit in between: the copy is then the database as of
    that moment.

    :return: the number of records written, and the number of oids referred
        to that were missing on the source.
    :raises StorageError: when the source has no root, or keeps changing for
        :data:`MAX_ROUNDS` passes.
    """
    changed = set(source.sync())  # from here on, commits are reported
    changed.clear()
    total = source.get_size() or 0
    copied: set[bytes] = set()
    missing: set[bytes] = set()
    seen = {ROOT_OID}
    todo = [ROOT_OID]
    # Records are written in transactions of a few megabytes; the passes
    # after the first read few records and write nothing until the end, so
    # that they take as short a time as possible.
    pending: dict[bytes, bytes] = {}
    pending_bytes = written = 0

    def flush() -> None:
        nonlocal pending_bytes
        destination.begin()
        for oid, record in pending.items():
            destination.store(oid, record)
        destination.end()
        pending.clear()
        pending_bytes = 0

    for round_ in range(MAX_ROUNDS):
        while todo:
            batch, todo = todo[:_SERVER_BATCH], todo[_SERVER_BATCH:]
            for oid, record in _load_batch(source, batch, changed):
                if record is None:
                    missing.add(oid)
                    continue
                missing.discard(oid)
                pending[oid] = record
                pending_bytes += len(record)
                copied.add(oid)
                written += 1
                for ref in split_oids(unpack_record(record)[2]):
                    if ref not in seen:
                        seen.add(ref)
                        todo.append(ref)
            if pending_bytes >= _SERVER_TRANSACTION_BYTES:
                flush()
            progress(len(batch), max(total, written))
        if ROOT_OID not in copied:
            raise StorageError(f"{source} has no root object: nothing to back up")
        changed.update(source.sync())
        again = sorted((changed & copied) | (changed & missing))
        changed.clear()
        if not again:
            break
        log.debug(
            "backup pass %d: %d records changed meanwhile", round_ + 1, len(again)
        )
        todo = again
    else:
        raise StorageError(
            f"{source}: still {len(todo)} records changed after {MAX_ROUNDS} "
            "passes; retry the backup when the server is less busy"
        )
    flush()

    # Report only the missing oids the copy still refers to.
    dangling = 0
    if missing:
        referred = {
            ref
            for _oid, record in destination.gen_oid_record()
            for ref in split_oids(unpack_record(record)[2])
        }
        dangling = len(missing & referred)
    return written, dangling


def backup_server(
    source: Storage,
    dest: str,
    plugins: Plugins,
    *,
    kind: str = "file",
    progress: Progress = _no_progress,
) -> BackupResult:
    """Copy what a server holds into a new database file ``dest``.

    :param source: a storage reached through the server (ClientStorage).
    :param kind: the storage kind of the copy.
    """
    check_destination("", dest, plugins)
    partial = dest + PARTIAL_SUFFIX
    for leftover in (partial, partial + ".lock", partial + "-wal", partial + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    try:
        destination = plugins.open_storage(partial, kind)
        try:
            written, dangling = copy_snapshot(source, destination, progress=progress)
        finally:
            destination.close()
        _replace(partial, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    size = Path(dest).stat().st_size
    log.info("copied %d records from %s to %s", written, source, dest)
    return BackupResult("full", written, size, dangling)
