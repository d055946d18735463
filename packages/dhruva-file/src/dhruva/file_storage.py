"""FileStorage: object records in one append-only file, in Durus's SHELF-1 layout.

Files written by Durus 4 open unchanged, and files dhruva appends to stay
readable by Durus (see :mod:`dhruva.shelf` for the layout). Lookups go through
the offset map on disk, so opening a large file reads only the transactions
committed after its last pack.

Every commit is written as one transaction and made durable with one
``fsync`` before :meth:`FileStorage.end` returns. ``end(durable=False)``
writes the transaction and makes it visible without the ``fsync``;
:meth:`FileStorage.make_durable` then syncs every commit written so far in one
go (a server's group commit), and may be called from another thread while the
next commit is written. A crash mid-commit leaves an
incomplete transaction at the end of the file; opening it for writing is then
refused until it is opened with ``repair=True``, which cuts the tail off and
saves it next to the file as ``<file>.torn-<offset>``. The layout has no
checksums, so a last transaction whose lengths add up but whose end is zeros
(the file grew before its data reached the disk) is found by reading the
records the zeros reach: pickle data, a serializer's tag and the references
a pickle names do not read as zeros (see
:func:`~dhruva.shelf.record_data_problem`).

One process at a time may open a file for writing (see
:mod:`dhruva.file_lock`); read-only opens take no lock and never block.

A read-only storage follows the file: it sees the commits that were complete
when it was opened (never part of a transaction still being written), and
each :meth:`FileStorage.sync` brings in the commits made since, reporting
their oids so that a Connection refreshes those objects. A pack by the
writer, which renames a new file over the old one, is followed too.

A pack (:meth:`FileStorage.pack`, or step by step through
:meth:`FileStorage.get_packer` while commits go on between the steps) writes
the reachable records to a new file and renames it over the old one, so a
crash leaves one or the other (see :mod:`dhruva.file_pack`).

Point in time: until a pack, every commit is still in the file.
:meth:`FileStorage.transactions` lists them, and ``at=`` opens a read-only
view of the database as it was right after one of them (see
:mod:`dhruva.file_history` for ``dhruva history`` and ``dhruva restore``).
The format records no commit times.

Limitations:

- POSIX only (``fcntl``); a process can not open one file for writing twice.
- A read-only storage ignores an empty transaction at the end of what it
  can see (Durus writes a zero length first and fills it in after the
  records); it is read once something follows it.
- Oids freed by a pack are never handed out again by dhruva (Durus reuses
  them).
- Bytes changed in place inside a record whose lengths still add up are
  not found at open (``dhruva verify`` parses every record), nor zeros
  inside the payload of a tagged record (msgspec, dill) past its tag, nor
  zeros in record data a program stored that is not a serializer's.
- A pack needs room for a second copy of the reachable records next to the
  file (see :mod:`dhruva.file_pack`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableSequence
from typing import BinaryIO, Self, cast

from dhruva.error import DhruvaKeyError, ReadOnlyError, StorageError
from dhruva.file_lock import (
    FileLockedError,
    fsync_directory,
    open_locked,
    write_lock_note,
)
from dhruva.file_pack import (
    FilePack,
    PackWriter,
    ShelfPackWriter,
    remove_pack_leftover,
    restore_interrupted_durus_pack,
)
from dhruva.file_repair import check_last, settle_tail, wrong_header_error
from dhruva.record import ROOT_OID
from dhruva.shelf import (
    FIRST_TRANSACTION,
    PREFIX,
    MidFileDamageError,
    OffsetMap,
    ScanResult,
    TornTailError,
    TransactionSpan,
    encode_empty_shelf,
    encode_transaction,
    read_record,
    record_spans,
    scan_transactions,
)
from dhruva.storage import InvalidationHandler, Storage, gen_reachable_records

#: Names kept importable from here, where they used to live.
__all__ = [
    "FileLockedError",
    "FileStorage",
    "MidFileDamageError",
    "PackWriter",
    "TornTailError",
    "fsync_directory",
]

_fsync_directory = fsync_directory

log = logging.getLogger(__name__)

#: Records the packer copies between the points where it yields.
_PACK_STEP = 1000


class FileStorage(Storage):
    """A storage in one SHELF-1 file; the format of Durus's FileStorage.

    :param path: the database file; created when missing (unless read-only).
        None makes a temporary file that is removed on :meth:`close`.
    :param readonly: open without locking and refuse every write; the file
        is never created or changed.
    :param repair: cut an incomplete last transaction off the file instead
        of refusing to open it.
    :param at: with ``readonly``, a view of the database as it was when the
        file ended at this byte offset: the ``position`` of one of
        :meth:`transactions`. Such a view does not follow later commits.
    :param format: the format of a new file: ``"dhruva"`` (checksummed,
        see :mod:`dhruva.checked_file`) or ``"durus"`` (SHELF-1); an
        existing file keeps its own.
    :raises FileLockedError: when another process has the file open for
        writing.
    :raises TornTailError: when the file ends in an incomplete transaction
        and ``repair`` is false.
    :raises StorageError: when the file is missing (read-only) or not a
        SHELF-1 file, or ``at`` is not the end of a transaction.
    """

    packable = True
    iterable = True
    deferred_durability = True

    #: Records the packer copies between the points where it yields.
    pack_step = _PACK_STEP

    #: True for a layout whose transactions carry checksums; the others have
    #: the records of their last transaction read at open (see
    #: :meth:`_check_last_transaction`).
    _checksummed = False

    #: On a read-only storage, what it found after the complete transactions
    #: when it was opened and read up to: a
    #: :class:`~dhruva.shelf.TornTailError` (an incomplete last commit) or a
    #: :class:`~dhruva.shelf.MidFileDamageError`; None when the file ends
    #: cleanly. A writable open raises these instead.
    damage: StorageError | None = None

    #: The attributes that hold what was read of the file's layout; a
    #: read-only storage swaps them all when it follows a pack.
    _LAYOUT_STATE: tuple[str, ...] = (
        "_file",
        "_index",
        "_end",
        "_base_end",
        "_next_oid",
        "_map",
        "damage",
    )

    def __new__(
        cls,
        path: str | os.PathLike[str] | None = None,
        readonly: bool = False,
        repair: bool = False,
        *,
        at: int | None = None,
        format: str | None = None,
    ) -> Self:
        """Open the file in its own format; a new file in ``format``.

        ``FileStorage(...)`` returns a
        :class:`~dhruva.checked_file.CheckedFileStorage` for a file in
        dhruva's checked format, and for a new file unless ``format="durus"``
        asks for SHELF-1 (see :func:`dhruva.checked_file.storage_class_for`).
        """
        klass: type[FileStorage] = cls
        if cls is FileStorage:
            from dhruva.checked_file import storage_class_for

            klass = storage_class_for(path, format)
        elif format is not None:
            raise StorageError(
                f"{path}: {cls.__name__} has one format; format= is for FileStorage"
            )
        return cast(Self, super().__new__(klass))

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        readonly: bool = False,
        repair: bool = False,
        *,
        at: int | None = None,
        format: str | None = None,
    ) -> None:
        self.readonly = readonly
        #: The byte offset a point-in-time view ends at; None for the whole file.
        self.at = at
        #: True when the file is a temporary one, removed on close.
        self.temporary = path is None
        self._file: BinaryIO | None = None
        #: Held while the file is fsynced, and while it is closed or swapped
        #: for another, so that :meth:`make_durable` never syncs a closed fd.
        self._sync_lock = threading.Lock()
        #: Guards ``_unsynced``; held only briefly, never across an fsync.
        self._state_lock = threading.Lock()
        #: True when transactions were written since the file's last fsync.
        self._unsynced = False
        self._wrote_lock_note = False
        self._pending: dict[bytes, bytes] | None = None
        self._invalid: set[bytes] = set()
        #: The pack running, while one is.
        self._pack: FilePack | None = None
        if readonly and repair:
            raise StorageError(
                f"{path}: repair=True needs a writable open; drop readonly=True"
            )
        if at is not None and not readonly:
            raise StorageError(
                f"{path}: at={at} opens a view of the past, which can not be "
                "written to; add readonly=True"
            )
        if path is None:
            if readonly:
                raise StorageError("a temporary FileStorage can not be read-only")
            fd, self.path = tempfile.mkstemp(prefix="dhruva-", suffix=".durus")
            os.close(fd)
        else:
            self.path = os.fspath(path)
        try:
            self._open(repair)
        except BaseException:
            self._release()
            raise
        log.info(
            "opened %s%s: %d records after the %s, next oid %d",
            self.path,
            " read-only" if readonly else "",
            self._records_after_base(),
            self._index_name,
            self._next_oid,
        )

    # --- opening and closing ---------------------------------------------------

    def _open(self, repair: bool) -> None:
        if not self.temporary:
            restore_interrupted_durus_pack(self.path, self.readonly)
        if self.readonly:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 (kept open)
            except FileNotFoundError:
                raise StorageError(
                    f"no database file {self.path}; check the path, or open it "
                    "without readonly=True to create it"
                ) from None
        else:
            self._file = open_locked(self.path)
            if not self.temporary:
                self._wrote_lock_note = write_lock_note(self.path)
                remove_pack_leftover(self.path)

        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            if self.readonly:
                raise StorageError(
                    f"{self.path} is empty; it is not a database yet (open it "
                    "without readonly=True to create one)"
                )
            self._write_new_file()
        self._load_layout(repair)

    def _empty_file(self) -> bytes:
        """Return the bytes of a new, empty file in this layout."""
        return encode_empty_shelf()

    def _write_new_file(self) -> None:
        file = self._live_file()
        file.seek(0)
        file.write(self._empty_file())
        file.flush()
        os.fsync(file.fileno())
        fsync_directory(self.path)
        log.info("created %s", self.path)

    def _visible_size(self) -> int:
        """Return the file's size, or the end of a point-in-time view."""
        size = os.fstat(self._live_file().fileno()).st_size
        if self.at is None:
            return size
        if not 0 <= self.at <= size:
            raise self._not_a_position(f"the file has {size} bytes")
        return self.at

    def _not_a_position(self, why: str) -> StorageError:
        return StorageError(
            f"{self.path}: byte offset {self.at} is not the end of a "
            f"transaction ({why}); `dhruva history {self.path}` lists the "
            "positions a view can be opened at"
        )

    def _check_tail(self, scan: ScanResult, size: int, repair: bool) -> None:
        """Deal with what a scan at open found after the last transaction."""
        if scan.torn_at is not None and self.at is not None:
            raise self._not_a_position(f"it falls inside a transaction: {scan.reason}")
        damage = settle_tail(
            self._live_file(),
            self.path,
            scan,
            size,
            readonly=self.readonly,
            repair=repair,
        )
        if damage is not None:
            self.damage = damage

    def _scan(
        self,
        file: BinaryIO,
        start: int,
        size: int,
        spans: MutableSequence[TransactionSpan] | None = None,
    ) -> ScanResult:
        """Index the complete transactions between ``start`` and ``size``.

        A read-only storage leaves out an empty transaction that ends what
        it can see: it may be a length Durus has yet to fill in.
        """
        last: deque[TransactionSpan] = deque(maxlen=1)
        collect = spans if spans is not None else last
        scan = scan_transactions(file, start, size, collect)
        if collect:
            final = collect[-1]
            if (
                self.readonly
                and self.at is None
                and final.records == 0
                and final.end == scan.end
                and final.end - final.start == 8
            ):
                scan.end = final.start
                scan.transactions -= 1
                collect.pop()
        scan.last = collect[-1] if collect else None
        return scan

    #: What the layout calls the part that maps the base's records.
    _index_name = "offset map"

    def _records_after_base(self) -> int:
        """Return the number of records committed after the base."""
        return len(self._index)

    #: Bytes of a transaction after its last record (DFS20's end marker).
    _record_trailer = 0

    def _record_spans(
        self, file: BinaryIO, span: TransactionSpan
    ) -> Iterator[tuple[int, int]]:
        """Yield ``(offset, length)`` of each object record of a complete
        transaction, in file order."""
        return record_spans(file, span)

    def _check_last_transaction(
        self,
        file: BinaryIO,
        scan: ScanResult,
        start: int,
        *,
        base: Mapping[bytes, int] | None = None,
        size: int = 0,
    ) -> ScanResult:
        """Treat the last transaction as torn when zeros stand where its
        records' data belongs (see :func:`dhruva.file_repair.check_last`);
        a checksummed layout, or a view of the past, is left as scanned."""
        if self._checksummed or self.at is not None:
            return scan
        return check_last(
            file,
            scan,
            rescan=lambda end: self._scan(file, start, end),
            record_spans=self._record_spans,
            trailer=self._record_trailer,
            base=base,
            size=size,
        )

    def _load_layout(self, repair: bool) -> None:
        """Read the prefix and offset map, then index the later transactions."""
        file = self._file
        assert file is not None
        size = self._visible_size()
        file.seek(0)
        head = file.read(FIRST_TRANSACTION + 8)
        if not head.startswith(PREFIX):
            raise wrong_header_error(self.path, head, "FileStorage (SHELF-1)")
        if len(head) < FIRST_TRANSACTION + 8:
            raise StorageError(
                f"{self.path} ends at byte offset {size}, inside its first "
                "transaction; the file is damaged: restore it from a backup"
            )
        map_start = FIRST_TRANSACTION + 8 + int.from_bytes(head[-8:], "big")
        real_size = os.fstat(file.fileno()).st_size
        self._map = OffsetMap.read(file, self.path, map_start, real_size)
        if size < self._map.end:
            raise self._not_a_position(
                f"the offset map, written when the file was created or last "
                f"packed, ends at byte offset {self._map.end}"
            )

        scan = self._scan(file, self._map.end, size)
        scan = self._check_last_transaction(file, scan, self._map.end)
        self._check_tail(scan, size, repair)
        self._index = scan.index
        self._end = scan.end
        self._base_end = self._map.end
        highest = max((int.from_bytes(oid, "big") for oid in self._index), default=-1)
        self._next_oid = max(self._map.count, highest + 1)

    def _release(self) -> None:
        """Give back the lock note, the lock and the file; remove a temp file."""
        if self._wrote_lock_note:
            with contextlib.suppress(OSError):
                os.unlink(self.path + ".lock")
            self._wrote_lock_note = False
        with self._sync_lock:
            if self._file is not None:
                self._file.close()  # closing the descriptor releases the flock
                self._file = None
                self._unsynced = False
                if self.temporary:
                    with contextlib.suppress(OSError):
                        os.unlink(self.path)

    def close(self) -> None:
        """Make every commit durable, then release the file and its lock; a
        temporary file is removed."""
        if self._file is not None:
            try:
                self.make_durable()
            finally:
                self._release()
            log.info("closed %s", self.path)

    def __enter__(self) -> Self:
        return self

    def get_filename(self) -> str:
        """Return the path of the database file."""
        return self.path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    # --- reading -----------------------------------------------------------------

    def _live_file(self) -> BinaryIO:
        if self._file is None:
            raise StorageError(f"{self.path} is closed; open a new FileStorage")
        return self._file

    def _position(self, oid: bytes) -> int | None:
        position = self._index.get(oid)
        if position is None and len(oid) == 8:
            position = self._map.get(int.from_bytes(oid, "big"))
        return position

    def _read_record(self, file: BinaryIO, oid: bytes, offset: int) -> bytes:
        """Return the record of ``oid`` at ``offset``, or raise naming both."""
        return read_record(file, self.path, oid, offset)

    def load(self, oid: bytes) -> bytes:
        file = self._live_file()
        position = self._position(oid)
        if position is None:
            raise DhruvaKeyError(oid)
        return self._read_record(file, oid, position)

    def _gen_positions(self) -> Iterator[tuple[bytes, int]]:
        index = dict(self._index)
        for number, position in self._map.items():
            oid = number.to_bytes(8, "big")
            if oid not in index:
                yield oid, position
        yield from index.items()

    def gen_oid_record(
        self, start_oid: bytes | None = None, batch_size: int = 100
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(oid, record)``: every current record, or those reachable
        from ``start_oid`` when it is given."""
        if start_oid is not None:
            yield from gen_reachable_records(self, start_oid, batch_size)
            return
        file = self._live_file()
        for oid, position in list(self._gen_positions()):
            yield oid, self._read_record(file, oid, position)

    def get_size(self) -> int:
        """Return the number of current records."""
        self._live_file()
        return sum(1 for _ in self._gen_positions())

    # --- writing -----------------------------------------------------------------

    def _check_writable(self, what: str) -> None:
        if self.readonly:
            raise ReadOnlyError(
                f"{what}: {self.path} was opened read-only; open it without "
                "readonly=True to change it"
            )
        self._live_file()

    def new_oid(self) -> bytes:
        """Return the next unused oid; the first of a new file is the root's."""
        self._check_writable("new_oid()")
        oid = self._next_oid.to_bytes(8, "big")
        self._next_oid += 1
        return oid

    def begin(self) -> None:
        self._check_writable("begin()")
        self._pending = {}

    def store(self, oid: bytes, record: bytes) -> None:
        self._check_writable("store()")
        if self._pending is None:
            raise StorageError(f"{self.path}: store() called without begin()")
        if record[:8] != oid:
            raise StorageError(
                f"{self.path}: the record stored for oid "
                f"{int.from_bytes(oid, 'big')} names another oid"
            )
        self._pending[oid] = record

    def _encode_commit(
        self, records: dict[bytes, bytes]
    ) -> tuple[bytes, dict[bytes, int]]:
        """Return a commit's transaction in this file's layout, and the offset
        of each record from the transaction's first byte."""
        data, _count = encode_transaction(iter(records.items()))
        offsets: dict[bytes, int] = {}
        position = 8
        for oid, record in records.items():
            offsets[oid] = position
            position += 16 + len(record)
        return data, offsets

    def end(
        self,
        handle_invalidations: InvalidationHandler | None = None,
        *,
        durable: bool = True,
    ) -> None:
        """Write the commit as one transaction and fsync it before returning.

        :param durable: False to return without the fsync: the commit is
            written and visible (to loads, and to read-only openers), and a
            later :meth:`make_durable`, a durable commit or :meth:`close`
            makes it durable. A crash before then may lose it, never part of
            it.
        :raises StorageError: when the write fails; nothing of the commit is
            left in the file.
        """
        self._check_writable("end()")
        file = self._live_file()
        pending, self._pending = self._pending or {}, None
        if not pending:
            if durable:
                self.make_durable()
            return
        data, offsets = self._encode_commit(pending)

        # One write, then one fsync unless deferred; on failure cut back
        # whatever reached the file.
        start = self._end
        try:
            file.seek(start)
            file.write(data)
            file.flush()
            with self._state_lock:
                self._unsynced = True
            if durable:
                self.make_durable()
        except (OSError, StorageError) as e:
            with contextlib.suppress(OSError):
                file.truncate(start)
                file.flush()
            raise StorageError(
                f"{self.path}: writing a transaction at byte offset {start} "
                f"failed ({e}); nothing was committed"
            ) from e

        for oid, at in offsets.items():
            self._index[oid] = start + at
            self._next_oid = max(self._next_oid, int.from_bytes(oid, "big") + 1)
        self._end = start + len(data)
        if self._pack is not None:
            self._pack.note_commit(pending)
        log.debug(
            "%s: committed %d records at byte offset %d%s",
            self.path,
            len(pending),
            start,
            "" if durable else " (not synced yet)",
        )

    def make_durable(self) -> None:
        """Fsync every transaction written so far; nothing to do (and no
        fsync) when every commit is durable already.

        It may be called from another thread while the next commit is being
        written: what any :meth:`end` that returned before the call wrote is
        on disk when it returns.

        :raises StorageError: when the fsync fails; the commits since the
            last durable point may then be lost in a crash.
        """
        with self._sync_lock:
            with self._state_lock:
                if not self._unsynced or self._file is None:
                    return
                self._unsynced = False
                fd = self._file.fileno()
            try:
                os.fsync(fd)
            except OSError as e:
                with self._state_lock:
                    self._unsynced = True
                message = (
                    f"{self.path}: fsync failed ({e}); the commits written "
                    "since the last durable one may be lost in a crash. Free "
                    "the disk (or fix its error) and commit again"
                )
                log.error("%s", message)
                raise StorageError(message) from e

    def sync(self) -> list[bytes]:
        """Return the oids whose records changed or went since the last call.

        For a writable storage, those a pack removed. A read-only storage
        also reads the commits other processes made since (see
        :meth:`follow`).
        """
        result = set(self._invalid)
        self._invalid.clear()
        if self.readonly and self.at is None and self._file is not None:
            result.update(self.follow())
        return sorted(result)

    # --- following a file another process writes --------------------------------

    def follow(self) -> set[bytes]:
        """Read the transactions committed to the file since it was last read.

        Only complete transactions are taken in. When the file was replaced
        (packed) or cut back (repaired, restored), the new one is opened and
        every oid either file knows is reported.

        :return: the oids whose records changed or went.
        :raises ReadOnlyError: on a writable storage, which writes the file
            itself and has nothing to follow.
        """
        if not self.readonly:
            raise ReadOnlyError(
                f"follow(): {self.path} is open for writing; only a read-only "
                "storage follows the file"
            )
        file = self._live_file()

        # New transactions in the file we have open.
        changed: set[bytes] = set()
        size = os.fstat(file.fileno()).st_size
        if size > self._end:
            scan = self._scan(file, self._end, size)
            self._index.update(scan.index)
            self._end = scan.end
            changed.update(scan.index)
            highest = max((int.from_bytes(o, "big") for o in scan.index), default=-1)
            self._next_oid = max(self._next_oid, highest + 1)

        # A new file under the path, or this one cut back: start over on it.
        try:
            replaced = not os.path.samestat(os.fstat(file.fileno()), os.stat(self.path))
        except FileNotFoundError:
            replaced = False  # moved away, nothing new to read yet
        if replaced or size < self._end:
            changed.update(self._reopen())
        if changed:
            log.debug(
                "%s: %d records changed by other processes", self.path, len(changed)
            )
        return changed

    def _reopen(self) -> set[bytes]:
        """Open the file anew in place of the one read so far.

        :return: every oid of the old and the new file.
        """
        fresh = type(self)(self.path, readonly=True)
        old_oids = {oid for oid, _position in self._gen_positions()}
        new_oids = {oid for oid, _position in fresh._gen_positions()}
        old_file = self._file
        for name in self._LAYOUT_STATE:
            setattr(self, name, getattr(fresh, name))
        fresh._file = None
        if old_file is not None:
            old_file.close()
        log.info(
            "%s was replaced (packed or restored); reading the new file", self.path
        )
        return old_oids | new_oids

    # --- point in time -----------------------------------------------------------

    def _base_records(self) -> int:
        """Return the number of records written before the later transactions."""
        return sum(1 for _ in self._map.items())

    def transactions(self) -> list[TransactionSpan]:
        """List the points in time this storage can be viewed at, oldest first.

        The first is the base: the records written when the file was created
        or last packed. Each later one is a commit. A span's ``end`` is the
        position to give as ``at`` (the file's size right after that commit);
        everything before the base was lost to a pack. Its ``time`` is when
        it was committed (seconds since the epoch) where the layout records
        it (DHRUVA1), else None.
        """
        file = self._live_file()
        spans: list[TransactionSpan] = [
            TransactionSpan(
                0, self._base_end, self._base_records(), time=self._base_time()
            )
        ]
        self._scan(file, self._base_end, self._end, spans)
        return spans

    def _base_time(self) -> float | None:
        """Return when the base was written, where the layout records it."""
        return None

    # --- packing -----------------------------------------------------------------

    def pack(self) -> None:
        """Rewrite the file with only the records reachable from the root."""
        for _step in self.get_packer():
            pass

    def get_packer(self) -> Iterator[None]:
        """Return a generator that packs a step at each ``next()``.

        Commits may happen between steps; their records, and what they refer
        to, are carried over into the packed file. The packed file is written
        next to the database as ``<file>.pack`` and renamed over it once it is
        complete and on disk, so a crash leaves one or the other, never
        neither; a ``.pack`` file left by a crash is removed at the next
        writable open. A pack that fails (disk full, permissions) removes its
        ``.pack`` file and leaves the database as it was, still writable.

        :raises StorageError: when a pack is running already; from the
            generator, naming the file and the cause when the pack fails.
        """
        self._check_writable("pack()")
        if self._pack is not None:
            raise StorageError(f"{self.path}: a pack is running already")
        return self._start_packer()

    def _start_packer(self) -> Iterator[None]:
        # A second packer made before the first one started must not run:
        # it would truncate the first one's .pack file.
        if self._pack is not None:
            raise StorageError(f"{self.path}: a pack is running already")
        if self._position(ROOT_OID) is None:
            log.info("%s has no root object; nothing to pack", self.path)
            return
        yield from self._rewrite(lambda: gen_reachable_records(self))

    def _rewrite(
        self, records: Callable[[], Iterable[tuple[bytes, bytes]]]
    ) -> Iterator[None]:
        """Write a new file that starts with ``records`` (and those committed
        meanwhile) and the oid counter, and rename it over the file."""
        self._pack = FilePack(
            self,
            self.path,
            step=self.pack_step,
            records=records,
            current_oids=lambda: {oid for oid, _at in self._gen_positions()},
            oid_counter=self.get_oid_counter,
            writer=self._pack_writer,
            install=self._install_packed,
        )
        try:
            mode = os.fstat(self._live_file().fileno()).st_mode
            removed = yield from self._pack.run(mode)
        finally:
            self._pack = None
        self._invalid.update(removed)

    # --- the oid counter -----------------------------------------------------------

    def get_oid_counter(self) -> int:
        """Return the number of the next oid :meth:`new_oid` hands out.

        No oid at or above it has been handed out; ``dhruva convert`` carries
        it to the new database.
        """
        self._live_file()
        return self._next_oid

    def reserve_oids(self, next_oid: int) -> None:
        """Never hand out an oid below ``next_oid``, in this process or after
        the file is opened again.

        For copies from another storage (``dhruva convert``): the oids the
        source handed out, and those its packs removed, stay unused here too.
        A number at or below :meth:`get_oid_counter` changes nothing.

        An open finds the counter as the higher of the one the file's base
        records (written when the file was created or last packed: the
        DHRUVA1 header, the DFS20 index, the size of SHELF-1's offset map)
        and the highest oid of a record after it. None of the layouts can
        record a higher counter with a commit, so a counter above both is
        kept by rewriting the file once, as a pack does but keeping every
        record (crash-safe: a crash leaves the old file, whose counter is
        then the highest oid plus one). A SHELF-1 file keeps it as an
        offset map entry per oid below it: a few bytes per reserved oid.

        :raises ReadOnlyError: on a read-only storage.
        :raises StorageError: when ``next_oid`` is not below 2**64, or a
            pack or a commit is under way; from the rewrite, as a failed
            pack does (the file is then unchanged).
        """
        self._check_writable("reserve_oids()")
        if next_oid <= self._next_oid:
            return
        if next_oid > 1 << 64:
            raise StorageError(
                f"reserve_oids({next_oid}): {self.path} holds 8-byte oids, all "
                "below 2**64"
            )
        if self._pack is not None or self._pending is not None:
            raise StorageError(
                f"reserve_oids(): {self.path} has a pack or a commit under way; "
                "call it between them"
            )
        # Kept in memory even when the rewrite fails.
        self._next_oid = next_oid
        for _step in self._rewrite(lambda: self.gen_oid_record()):
            pass
        log.info("%s: new oids start at %d", self.path, next_oid)

    def _pack_writer(self, file: BinaryIO) -> PackWriter:
        """Return what writes a packed file in this layout to ``file``."""
        return ShelfPackWriter(file)

    def _install_packed(self, packed: BinaryIO) -> None:
        """Take the packed file, renamed over the database, as the file."""
        with self._sync_lock:
            old, self._file = self._file, packed
            self._unsynced = False
            if old is not None:
                old.close()
        handed_out = self._next_oid
        self._load_layout(repair=False)
        self._next_oid = max(self._next_oid, handed_out)
