"""Consistent copies of a database that is in use (``dhruva backup``).

Three ways, by what the source is:

- An append-only file (FileStorage, FileStorage2 and any storage offering
  ``transactions()``): between packs such a file only grows, one complete
  transaction after another. A read-only open tells where the last complete
  transaction ends; the bytes up to there are copied from the very file that
  open read (so a pack renaming a new file over it does not matter) and
  synced. A file damaged in the middle (the read-only open stops there) is
  refused, and so is one whose checksums (DHRUVA1) fail anywhere: no backup
  of a damaged file replaces a good one. When the destination is already
  an earlier backup of the same file (its bytes are the file's up to one of
  its transaction boundaries) only the new bytes are appended. A destination
  that is not (the file was packed since, the destination is newer, damaged,
  or another database) is refused unless a full copy is asked for.
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

- Every backup of a file reads the whole source (its checksums) and the
  whole existing destination (compared byte for byte with the source), not
  only the new commits.
- A destination that shares no bytes with the source's current file can not
  be told apart from another database: after a pack, give ``full=True``
  (``--full``).
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
from dhruva.verify import damage_in_the_middle, describe_damage_in_the_middle

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
    #: Why a full copy replaced what the destination held, when it was more
    #: than nothing or an earlier backup: for the user to read.
    replaced: str = ""


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


def _check_source(storage: Storage, src: str, dest: str) -> None:
    """Refuse a source damaged in the middle, or whose checksums fail.

    A read-only open stops at damage in the middle (the copy would end
    there); a format with checksums (DHRUVA1) has every record and
    transaction checked, so that no damaged record is copied silently.
    """
    damage = damage_in_the_middle(storage)
    if damage is not None:
        raise StorageError(
            describe_damage_in_the_middle(
                src,
                damage,
                "a backup would hold only the commits before it, so none is "
                f"taken ({dest} is left as it is)",
            )
        )
    check = getattr(storage, "check", None)
    if not callable(check):
        return
    # Damaged records first: they name the oid.
    problems = sorted(check(), key=lambda p: getattr(p, "oid", None) is None)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StorageError(
            f"{src} is damaged, so no backup of it is taken and {dest} is left "
            f"as it is: {problems[0]}{more}. `dhruva verify {src}` lists every "
            "damaged part; keep your earlier backups, they may be the only sound "
            "copy"
        )


def _open_consistent(
    src: str, dest: str, kind: str | None, plugins: Plugins
) -> tuple[BinaryIO, list[int]]:
    """Open ``src`` and list its transaction boundaries, both of one file.

    :return: the open file, and the ends of its complete transactions.
    :raises StorageError: when ``src`` is damaged (see :func:`_check_source`).
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
                _check_source(storage, src, dest)
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


def _first_difference(
    source: BinaryIO, target: BinaryIO, start: int, end: int
) -> int | None:
    """Return the first byte offset in ``start..end`` where the files differ."""
    position = start
    while position < end:
        length = min(_CHUNK, end - position)
        ours = os.pread(source.fileno(), length, position)
        theirs = os.pread(target.fileno(), length, position)
        if ours != theirs:
            for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
                if a != b:
                    return position + i
            return position + min(len(ours), len(theirs))
        position += length
    return None


def _compare(
    source: BinaryIO, target: BinaryIO, size: int, ends: list[int]
) -> tuple[str, int | None]:
    """Tell what an existing destination of ``size`` bytes is to ``source``.

    Every byte the two share is compared.

    :return: ``("same", None)``, ``("earlier", None)`` (an earlier copy ending
        at a commit), ``("cut-short", None)`` (an earlier copy whose last
        append did not finish), ``("newer", None)`` (the source's commits and
        more), ``("damaged", offset)`` (an earlier copy with some bytes
        changed), or ``("other", offset)`` (not a copy of this file as it is).
    """
    end = ends[-1]
    common = min(size, end)
    differs = _first_difference(source, target, 0, common)
    if differs is None:
        if size == end:
            return "same", None
        if size > end:
            return "newer", None
        return ("earlier" if size in set(ends) else "cut-short"), None

    # Equal again after the difference: damage in a copy of this file.
    again = max(differs + 1, common - _COMPARE)
    if again < common and _first_difference(source, target, again, common) is None:
        return "damaged", differs
    return "other", differs


def _complete_end(path: str, plugins: Plugins) -> int | None:
    """Return where the last complete transaction of a file ends, if it can
    be read and only an incomplete transaction, if anything, follows it."""
    try:
        storage = plugins.open_storage(path, None, readonly=True)
    except Exception:  # a damaged or foreign file: no answer
        log.debug("cannot open %s to list its transactions", path, exc_info=True)
        return None
    try:
        transactions = getattr(storage, "transactions", None)
        if transactions is None or damage_in_the_middle(storage) is not None:
            return None  # what follows the end it reads is more than a tail
        return transactions()[-1].end
    except Exception:
        log.debug("cannot list the transactions of %s", path, exc_info=True)
        return None
    finally:
        storage.close()


def _refusal(
    src: str, dest: str, found: str, offset: int | None, size: int, end: int
) -> str:
    """Say why ``dest`` is not replaced or appended to, and what to do."""
    if found == "newer":
        return (
            f"{dest} holds {size - end} bytes of commits after the {end} bytes of "
            f"{src}'s commits: it is newer than {src} (are SRC and DEST the "
            "wrong way round?), and a backup would throw those commits away. "
            f"Check the order of the arguments; give --full to replace {dest} "
            "all the same"
        )
    if found == "damaged":
        return (
            f"{dest} is an earlier backup of {src} that is damaged at byte offset "
            f"{offset} (its bytes there differ from {src}'s, and the later ones "
            "match): new commits are not appended to a damaged backup. Give "
            f"--full to replace it with a whole new copy of {src} "
            f"(`dhruva verify {dest}` shows the damage)"
        )
    return (
        f"{dest} is not an earlier backup of {src}: the two differ from byte "
        f"offset {offset} on (a backup taken before {src} was last packed, or a "
        "copy of another database). A backup appends only to an earlier backup "
        f"of the same file: give --full to replace {dest} with a whole copy of "
        f"{src}, or choose another destination"
    )


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

    An existing ``dest`` must be an earlier backup of ``src``: its bytes the
    start of ``src``'s (then only the new commits are appended), or of them
    up to a commit and an append that did not finish (copied again). Any
    other database file is replaced only when ``full`` is given.

    :param kind: the storage kind of ``src``; recognized when None.
    :param full: copy the whole file, replacing whatever ``dest`` holds.
    :param progress: called as bytes are copied.
    :raises StorageError: when ``src`` is damaged, or ``dest`` is not an
        earlier backup of it (newer, damaged, another database) and ``full``
        is not given.
    """
    check_destination(src, dest, plugins)
    source, ends = _open_consistent(src, dest, kind, plugins)
    replaced = ""
    with source:
        end = ends[-1]

        # An earlier backup of this file: append what is new.
        if os.path.exists(dest) and os.path.getsize(dest):
            with open(dest, "r+b") as target:
                _lock_destination(target, dest)
                size = os.fstat(target.fileno()).st_size
                found, offset = _compare(source, target, size, ends)
                if found in ("newer", "damaged", "other"):
                    # Up to its last complete commit, an earlier backup? Then
                    # the rest is an append that did not finish.
                    complete = _complete_end(dest, plugins)
                    if (
                        complete is not None
                        and complete in ends
                        and (offset is None or offset >= complete)
                    ):
                        found = "cut-short"
                if found == "same" and not full:
                    return BackupResult("unchanged", 0, size)
                if found == "earlier" and not full:
                    target.seek(size)
                    _copy_range(source, target, size, end, progress)
                    target.flush()
                    os.fsync(target.fileno())
                    log.info("appended %d bytes of %s to %s", end - size, src, dest)
                    return BackupResult("incremental", end - size, end)
                if found in ("newer", "damaged", "other"):
                    message = _refusal(src, dest, found, offset, size, end)
                    if not full:
                        raise StorageError(message)
                    replaced = _what_was_replaced(src, dest, found, offset, size, end)
                elif found == "cut-short":
                    replaced = (
                        f"{dest} was an earlier backup of {src} ending in an "
                        "incomplete commit (an append that did not finish, or "
                        "damage in its last commit): it was copied again in full"
                    )
                if replaced:
                    log.info("%s", replaced)

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
    return BackupResult("full", end, end, replaced=replaced)


def _what_was_replaced(
    src: str, dest: str, found: str, offset: int | None, size: int, end: int
) -> str:
    """Say what ``--full`` replaced, where it was not an earlier backup."""
    what = {
        "newer": f"held {size - end} bytes of commits after {src}'s",
        "damaged": f"was an earlier backup damaged at byte offset {offset}",
        "other": f"was not an earlier backup of {src} (they differed from byte "
        f"offset {offset} on)",
    }[found]
    return f"{dest} {what}; with --full it was replaced by a whole copy of {src}"


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


def _sqlite_oid_counter(path: str) -> int | None:
    """Return the oid counter of a dhruva (or Durus) SQLite file: the larger of
    the one it records and its highest oid + 1; None when it can not be read."""
    uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
            highest = connection.execute("SELECT max(id) FROM objects").fetchone()
            counter = (highest[0] or 0) + 1 if highest[0] is not None else 0
            with contextlib.suppress(sqlite3.Error):
                row = connection.execute(
                    "SELECT value FROM dhruva_meta WHERE key = 'next_oid'"
                ).fetchone()
                if row is not None:
                    counter = max(counter, int(row[0]))
            return counter
    except (sqlite3.Error, ValueError, TypeError):
        return None


def check_kind_of_destination(
    dest: str, kind: str, plugins: Plugins, *, full: bool, source: str
) -> None:
    """Refuse an existing ``dest`` that holds another kind of database than a
    backup writes, unless ``full``.

    :param kind: the storage kind the backup writes.
    :param source: how to name what is backed up, in the message.
    :raises StorageError: naming ``dest``, what it is, and ``--full``.
    """
    if full or not os.path.exists(dest) or not os.path.getsize(dest):
        return
    try:
        found = plugins.recognize(dest)
    except DhruvaError:
        found = None
    if found is not None and found != kind:
        raise StorageError(
            f"{dest} is a {found} database, so it is not an earlier backup of "
            f"{source} (a backup of it is a {kind} database): choose another "
            f"destination, or give --full to replace {dest}"
        )


def backup_sqlite(
    src: str,
    dest: str,
    plugins: Plugins,
    *,
    full: bool = False,
    progress: Progress = _no_progress,
) -> BackupResult:
    """Copy a SQLite database with SQLite's online backup API.

    :param full: replace ``dest`` even when it is not an earlier backup of
        ``src`` (another kind of database, or one that has handed out oids
        ``src`` has not: newer than it).
    :raises StorageError: when ``dest`` is refused.
    """
    check_destination(src, dest, plugins)
    if not os.path.exists(src):
        raise StorageError(f"no database file {src}; check the path")
    check_kind_of_destination(dest, "sqlite", plugins, full=full, source=src)
    if not full and os.path.exists(dest) and os.path.getsize(dest):
        ours, theirs = _sqlite_oid_counter(src), _sqlite_oid_counter(dest)
        if ours is not None and theirs is not None and theirs > ours:
            raise StorageError(
                f"{dest} has handed out oids up to {theirs - 1}, and {src} only "
                f"up to {ours - 1}: {dest} is newer than {src} (are SRC and DEST "
                "the wrong way round?), or another database; a backup would "
                "throw its commits away. Check the order of the arguments; give "
                f"--full to replace {dest} all the same"
            )
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
    full: bool = False,
    progress: Progress = _no_progress,
) -> BackupResult:
    """Copy what a server holds into a new database file ``dest``.

    :param source: a storage reached through the server (ClientStorage).
    :param kind: the storage kind of the copy.
    :param full: replace ``dest`` even when it holds another kind of database.
    """
    check_destination("", dest, plugins)
    check_kind_of_destination(dest, kind, plugins, full=full, source=str(source))
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
