"""CheckedFileStorage: dhruva's own file format, with a checksum per transaction.

Durus's file layouts (SHELF-1, DFS20) carry no checksums: a bit flipped on
disk is read back as other data. New dhruva files use this layout instead
(``FileStorage(path)`` on a missing file creates one; see
``docs/file-format.md``). All integers are unsigned big-endian; every
checksum is ``zlib.crc32``, written as an int4::

    header (36 bytes)
        b"DHRUVA1\\n" | int8 index_at | int8 next_oid | int8 written | crc32
    base transactions   (written by a pack; none in a new file)
    index block         (at index_at)
        b"IDX1" | int8 size | int8 count | count * (oid, int8 offset) | crc32
    transactions        (one per commit, appended)

A transaction is::

    b"TXN1" | int8 size | int8 time | int4 count | crc32 of those 24 bytes
    count records, each: int8 n | crc32 of (n and the record) | n-byte record
    crc32 of every byte of the transaction before it

``size`` counts every byte of the transaction, ``time`` is when it was
committed in nanoseconds since the epoch (UTC), and each record is an object
record in the Durus layout (see :mod:`dhruva.record`). The header's
``next_oid`` is the oid counter when the file was written (oids a pack
removed are never handed out again) and ``written`` the time of that. The
index block maps each record of the base transactions to its offset; the
transactions after it are found by scanning them when the file is opened.
The whole index is kept in memory.

What the checksums catch, and what happens then:

- At open, every transaction after the index block is read whole and its
  checksums are checked. A bad transaction with no good one after it is a
  torn tail (a crash mid-commit, zeros where a write never reached the disk,
  garbage): a writable open refuses it with
  :class:`~dhruva.shelf.TornTailError` unless ``repair=True`` cuts it off and
  saves it as ``<file>.torn-<offset>``, as FileStorage does. A read-only open
  reads up to it.
- A bad transaction with a good one after it is damage in the middle of the
  file. A writable open refuses it, with or without ``repair``, raising
  :class:`~dhruva.shelf.MidFileDamageError` with the path and byte offset
  (as FileStorage does for SHELF-1): cutting there would drop later commits.
  A read-only open reads the database as it was just before the damage
  (logged as an error); ``dhruva restore FILE --at POSITION`` can write that
  state to a new file.
- The header and the index block are checked at open; damage in the header
  is a :class:`DamagedFileError`. A damaged index block is rebuilt by
  scanning the base transactions it maps (they have their own checksums),
  with a warning naming the path and offset; a pack writes a sound one.
  Only when the base is damaged as well is it a :class:`DamagedFileError`.
- Every :meth:`~CheckedFileStorage.load` checks the record's own checksum
  (base records are not read at open), so a damaged record raises
  :class:`DamagedRecordError` naming the path, byte offset and oid; it is
  never returned as other data.

Each commit is one ``write`` and one ``fsync`` of the file before
:meth:`~CheckedFileStorage.end` returns (a new file or a pack also syncs the
folder); ``end(durable=False)`` leaves the ``fsync`` to a later
:meth:`~dhruva.file_storage.FileStorage.make_durable`, which syncs many
commits at once. Commits with no records write nothing. Locking, read-only opens that
follow the file, point-in-time views (``at=``; :meth:`transactions` gives
each commit's time) and crash-safe packs are
:class:`~dhruva.file_storage.FileStorage`'s.

Limitations:

- The index is in memory: about 100 bytes per object.
- Durus can not read this format; ``FileStorage(path, format="durus")``
  creates a SHELF-1 file for programs that still run Durus.
- A damaged header makes the file unreadable; so does a damaged index
  block when the base transactions it maps are damaged too. A rebuilt index
  block is rebuilt again at each open (nothing is changed in place) until a
  pack writes a new file.
- Damage inside the base (records a pack wrote) is found only when such a
  record is loaded (or by reading every record, as ``dhruva verify`` does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Mapping, MutableSequence
from dataclasses import dataclass
from typing import BinaryIO

from dhruva.error import StorageError
from dhruva.file_pack import PackWriter
from dhruva.file_repair import wrong_header_error
from dhruva.file_storage import FileStorage
from dhruva.indexed_file import IndexedFileStorage
from dhruva.shelf import MidFileDamageError, ScanResult, TransactionSpan

log = logging.getLogger(__name__)

#: The first bytes of every file in this format.
MAGIC = b"DHRUVA1\n"

#: Marks the start of a transaction.
TXN_MARK = b"TXN1"

#: Marks the start of the index block.
INDEX_MARK = b"IDX1"

_header = struct.Struct(">8sQQQI")
_txn_head = struct.Struct(">4sQQII")
_index_head = struct.Struct(">4sQQ")
_record_head = struct.Struct(">QI")
_int4 = struct.Struct(">I")
_entry = struct.Struct(">8sQ")

#: Bytes of the file header.
HEADER_SIZE = _header.size
#: Bytes of a transaction's header (the checksum of its first 24 included).
TXN_HEAD = _txn_head.size
#: Bytes of a record's length and checksum.
RECORD_HEAD = _record_head.size
#: The smallest object record: oid and data length.
_MIN_RECORD = 12
#: Bytes read at a time when looking for a good transaction after a bad one.
_SEARCH_CHUNK = 1 << 20


class DamagedRecordError(StorageError):
    """A record's bytes do not match their checksum.

    :param path: the database file.
    :param offset: the byte offset of the record.
    :param oid: the oid that was loaded.
    :param reason: what is wrong.
    """

    def __init__(self, path: str, offset: int, oid: bytes, reason: str) -> None:
        super().__init__(path, offset, oid, reason)
        self.path = path
        self.offset = offset
        self.oid = oid
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"{self.path}: the record of oid {int.from_bytes(self.oid, 'big')} at "
            f"byte offset {self.offset} is damaged ({self.reason}); restore the "
            "file from a backup (`dhruva verify` lists every damaged record)"
        )


class DamagedFileError(StorageError):
    """Part of the file other than its last transaction fails its checksum.

    :param path: the database file.
    :param offset: the byte offset of the damaged part.
    :param reason: what is wrong, and what can be done.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(path, offset, reason)
        self.path = path
        self.offset = offset
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: damaged at byte offset {self.offset}: {self.reason}"


# --- encoding ----------------------------------------------------------------------


def encode_header(index_at: int, next_oid: int, written_ns: int) -> bytes:
    """Return the 36-byte file header."""
    body = _header.pack(MAGIC, index_at, next_oid, written_ns, 0)[:-4]
    return body + _int4.pack(zlib.crc32(body))


def encode_index(offsets: Mapping[bytes, int]) -> bytes:
    """Return an index block mapping oids to record offsets."""
    entries = b"".join(_entry.pack(oid, at) for oid, at in sorted(offsets.items()))
    size = _index_head.size + len(entries) + 4
    body = _index_head.pack(INDEX_MARK, size, len(offsets)) + entries
    return body + _int4.pack(zlib.crc32(body))


def encode_empty_file(written_ns: int | None = None) -> bytes:
    """Return the bytes of a new, empty file: the header and an empty index."""
    now = time.time_ns() if written_ns is None else written_ns
    return encode_header(HEADER_SIZE, 0, now) + encode_index({})


def encode_transaction(
    records: Mapping[bytes, bytes], time_ns: int
) -> tuple[bytes, dict[bytes, int]]:
    """Return one transaction and the offset of each record in it.

    :param records: object records by oid.
    :param time_ns: the commit's time, in nanoseconds since the epoch.
    """
    parts: list[bytes] = []
    offsets: dict[bytes, int] = {}
    at = TXN_HEAD
    for oid, record in records.items():
        length = _record_head.pack(len(record), 0)[:8]
        parts.append(length + _int4.pack(zlib.crc32(record, zlib.crc32(length))))
        parts.append(record)
        offsets[oid] = at
        at += RECORD_HEAD + len(record)
    size = at + 4
    head = _txn_head.pack(TXN_MARK, size, time_ns, len(records), 0)[:-4]
    head += _int4.pack(zlib.crc32(head))
    body = head + b"".join(parts)
    return body + _int4.pack(zlib.crc32(body)), offsets


# --- reading -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Transaction:
    """A transaction read whole and found good."""

    #: Offsets of its records by oid.
    records: dict[bytes, int]
    #: Its size in bytes.
    size: int
    #: Commit time, nanoseconds since the epoch.
    time_ns: int


def read_transaction(fd: int, position: int, limit: int) -> _Transaction | str:
    """Read and check the transaction at ``position``, not past ``limit``.

    :return: the transaction, or what is wrong with it.
    """
    if limit - position < TXN_HEAD:
        return f"{limit - position} bytes where a transaction header belongs"
    head = os.pread(fd, TXN_HEAD, position)
    mark, size, time_ns, count, check = _txn_head.unpack(head)
    if mark != TXN_MARK or zlib.crc32(head[:-4]) != check:
        if head.count(0) == len(head):
            return "zero bytes where a transaction header belongs"
        return "no transaction header, or a damaged one, is there"
    if size < TXN_HEAD + 4:
        return f"its header gives it an impossible size of {size} bytes"
    if position + size > limit:
        return f"its header says {size} bytes but only {limit - position} follow"

    data = os.pread(fd, size, position)
    if (
        len(data) != size
        or zlib.crc32(memoryview(data)[:-4]) != _int4.unpack_from(data, size - 4)[0]
    ):
        return "its checksum does not match its bytes"

    # The checksum holds: the records must add up (else it was written so).
    records: dict[bytes, int] = {}
    at = TXN_HEAD
    for _ in range(count):
        if size - 4 - at < RECORD_HEAD + _MIN_RECORD:
            return f"its record at byte offset {position + at} is cut short"
        length, _check = _record_head.unpack_from(data, at)
        if length < _MIN_RECORD or at + RECORD_HEAD + length > size - 4:
            return f"its record at byte offset {position + at} has a bad length"
        records[data[at + RECORD_HEAD : at + RECORD_HEAD + 8]] = position + at
        at += RECORD_HEAD + length
    if at != size - 4:
        return f"{size - 4 - at} stray bytes follow its records"
    return _Transaction(records, size, time_ns)


def find_good_transaction(fd: int, start: int, limit: int) -> int | None:
    """Return the offset of the first good transaction at or after ``start``."""
    position = start
    while position < limit:
        chunk = os.pread(fd, min(_SEARCH_CHUNK, limit - position), position)
        if not chunk:
            return None
        found = chunk.find(TXN_MARK)
        while found >= 0:
            if not isinstance(read_transaction(fd, position + found, limit), str):
                return position + found
            found = chunk.find(TXN_MARK, found + 1)
        # A mark may straddle two chunks.
        position += max(1, len(chunk) - len(TXN_MARK) + 1)
    return None


@dataclass
class _Scan(ScanResult):
    """A :class:`~dhruva.shelf.ScanResult` that also knows about mid-file damage."""

    #: Where a bad transaction with good ones after it starts, or None.
    damaged_at: int | None = None
    #: Where the first good transaction after the damage starts.
    resumes_at: int = 0


def scan_transactions(
    fd: int,
    start: int,
    limit: int,
    spans: MutableSequence[TransactionSpan] | None = None,
) -> _Scan:
    """Index the good transactions from ``start`` up to ``limit``.

    Stops at the first bad one: a torn tail when no good transaction follows
    it, damage in the middle of the file otherwise.

    :param spans: when given, a :class:`~dhruva.shelf.TransactionSpan` is
        appended to it for each good transaction.
    """
    result = _Scan(index={}, end=start, transactions=0)
    position = start
    while position < limit:
        found = read_transaction(fd, position, limit)
        if isinstance(found, str):
            later = find_good_transaction(fd, position + 1, limit)
            if later is None:
                result.torn_at, result.reason = position, found
            else:
                result.damaged_at, result.reason = position, found
                result.resumes_at = later
            break
        result.index.update(found.records)
        if spans is not None:
            spans.append(
                TransactionSpan(
                    position,
                    position + found.size,
                    len(found.records),
                    time=found.time_ns / 1e9,
                )
            )
        position = result.end = position + found.size
        result.transactions += 1
    return result


# --- choosing the format ------------------------------------------------------------

#: The formats ``FileStorage(path, format=...)`` can give a new file:
#: ``"dhruva"`` (this one) and ``"durus"`` (SHELF-1, which Durus reads).
FORMATS = ("dhruva", "durus")

#: The format of a file ``FileStorage(path)`` creates.
DEFAULT_FORMAT = "dhruva"


def storage_class_for(
    path: str | os.PathLike[str] | None, format: str | None = None
) -> type[FileStorage]:
    """Return the class :class:`~dhruva.file_storage.FileStorage` opens
    ``path`` with: the file's own format, or ``format`` for a new file.

    :param format: the format of a new (missing or empty) file, one of
        :data:`FORMATS`; None for :data:`DEFAULT_FORMAT`.
    :raises StorageError: when ``format`` is unknown, or names another
        format than an existing file's.
    """
    if format is not None and format not in FORMATS:
        raise StorageError(
            f"{path}: unknown file format {format!r}; choose one of "
            f"{', '.join(map(repr, FORMATS))}"
        )
    header = b""
    if path is not None:
        # A Durus pack may have moved the file aside (FileStorage puts it back).
        for candidate in (os.fspath(path), os.fspath(path) + ".prepack"):
            with contextlib.suppress(OSError), open(candidate, "rb") as f:
                header = f.read(len(MAGIC))
                break
    if not header:
        return (
            CheckedFileStorage
            if (format or DEFAULT_FORMAT) == "dhruva"
            else (FileStorage)
        )
    found = "dhruva" if header.startswith(MAGIC) else "durus"
    if format is not None and format != found:
        raise StorageError(
            f"{path} is a {found} file already; format={format!r} chooses the "
            f"format of a new file only. To change it, `dhruva convert {path} NEW`"
            + (" --storage shelf" if format == "durus" else "")
        )
    return CheckedFileStorage if found == "dhruva" else FileStorage


# --- the storage -------------------------------------------------------------------


class _CheckedPackWriter(PackWriter):
    """A packed DHRUVA1 file: the header, the reachable records as a
    transaction per pack step, the carried ones as one more, then the index
    block; the header, written last, points to it and keeps the oid counter."""

    def __init__(self, file: BinaryIO, step: int) -> None:
        super().__init__(file)
        self.step = step
        self.now = time.time_ns()
        self.chunk: dict[bytes, bytes] = {}
        file.write(bytes(HEADER_SIZE))
        self.position = HEADER_SIZE

    def _put(self, records: dict[bytes, bytes]) -> None:
        data, where = encode_transaction(records, self.now)
        self.file.write(data)
        self.offsets.update((oid, self.position + at) for oid, at in where.items())
        self.position += len(data)

    def add(self, oid: bytes, record: bytes) -> None:
        self.chunk[oid] = record
        if len(self.chunk) == self.step:
            self._put(self.chunk)
            self.chunk = {}

    def end_reachable(self, next_oid: int) -> None:
        if self.chunk:
            self._put(self.chunk)
            self.chunk = {}

    def finish(self, carried: dict[bytes, bytes], next_oid: int) -> None:
        if carried:
            self._put(carried)
        self.file.write(encode_index(self.offsets))
        self.file.seek(0)
        self.file.write(encode_header(self.position, next_oid, self.now))


class CheckedFileStorage(IndexedFileStorage):
    """A storage in one file of dhruva's checked format (``DHRUVA1``).

    ``FileStorage(path)`` returns one when ``path`` is missing, empty or in
    this format. It shares :class:`~dhruva.file_storage.FileStorage`'s
    locking, repair, read-only, point-in-time and temporary-file handling,
    and :class:`~dhruva.indexed_file.IndexedFileStorage`'s index in memory;
    the layout and its checks are its own.

    :param path: the database file; created when missing (unless read-only).
        None makes a temporary file that is removed on :meth:`close`.
    :param readonly: open without locking and refuse every write; the file
        is never created or changed.
    :param repair: cut an incomplete last transaction off the file instead
        of refusing to open it.
    :param at: with ``readonly``, a view as of a position of
        :meth:`transactions`.
    :raises FileLockedError: when another process has the file open for
        writing.
    :raises TornTailError: when the file ends in an incomplete transaction
        and ``repair`` is false.
    :raises MidFileDamageError: when a transaction before the last one fails
        its checks (read-only opens read up to it instead).
    :raises DamagedFileError: when the header fails its checksum, or the
        index block does and the base can not be read again without it.
    :raises StorageError: when the file is missing (read-only) or not in
        this format.
    """

    _index_name = "index block"

    packable = True
    iterable = True

    # Checksums find zeros in a transaction: no need to read its records.
    _checksummed = True

    #: The offset of mid-file damage a read-only storage has logged already.
    _damage_reported: int | None = None

    #: Where the index block is damaged, and how, when it was rebuilt at open.
    _index_damage: tuple[int, str] | None = None

    _LAYOUT_STATE = (
        *IndexedFileStorage._LAYOUT_STATE,
        "_written_ns",
        "_index_damage",
    )

    # --- opening -------------------------------------------------------------------

    def _empty_file(self) -> bytes:
        """Return an empty file: the header and an empty index block."""
        return encode_empty_file()

    def _damaged(self, offset: int, what: str) -> DamagedFileError:
        error = DamagedFileError(
            self.path, offset, f"{what}; restore the file from a backup"
        )
        log.error("%s", error)
        return error

    def _load_layout(self, repair: bool) -> None:
        """Check the header and the index block, then scan the transactions
        after it."""
        fd = self._live_file().fileno()
        visible = self._visible_size()
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEADER_SIZE, 0)
        if not head.startswith(MAGIC):
            raise wrong_header_error(self.path, head, "dhruva checked file (DHRUVA1)")
        if len(head) < HEADER_SIZE:
            raise self._damaged(
                len(head),
                f"the file ends at byte offset {len(head)}, inside its "
                f"{HEADER_SIZE}-byte header (cut short)",
            )
        magic, index_at, next_oid, written_ns, check = _header.unpack(
            head.ljust(HEADER_SIZE, b"\0")
        )
        if len(head) < HEADER_SIZE or zlib.crc32(head[:-4]) != check:
            raise self._damaged(0, "the file header fails its checksum")

        # The index block of the base, or the base read again without it.
        if not HEADER_SIZE <= index_at <= size:
            raise self._damaged(0, f"the header puts the index block at {index_at}")
        read = self._read_index(fd, index_at, size)
        if isinstance(read, str):
            index, base_end = self._rebuild_index(fd, index_at, size, read)
        else:
            index, base_end = read
        self._index_damage = None if not isinstance(read, str) else (index_at, read)

        # The transactions committed after it.
        self._written_ns = written_ns
        self._take_in(
            self._live_file(),
            index,
            base_end,
            visible=visible,
            repair=repair,
            recorded_next=next_oid,
            index_name=self._index_name,
        )

    def _scan(
        self,
        file: BinaryIO,
        start: int,
        size: int,
        spans: MutableSequence[TransactionSpan] | None = None,
    ) -> ScanResult:
        scan = scan_transactions(file.fileno(), start, size, spans)
        if scan.damaged_at is None:
            return scan
        where = (
            f"{scan.reason}; a good transaction follows at byte offset "
            f"{scan.resumes_at}"
        )
        if not self.readonly:
            error = MidFileDamageError(self.path, scan.damaged_at, size, where)
            log.error("%s", error)
            raise error
        self.damage = MidFileDamageError(self.path, scan.damaged_at, size, where)
        if self._damage_reported != scan.damaged_at:
            self._damage_reported = scan.damaged_at
            log.error(
                "%s: damaged at byte offset %d: %s; reading the database as it "
                "was before it",
                self.path,
                scan.damaged_at,
                where,
            )
        return scan

    def _read_index(
        self, fd: int, index_at: int, size: int
    ) -> tuple[dict[bytes, int], int] | str:
        """Read and check the index block at ``index_at``.

        :return: the offsets by oid and the end of the block, or what is
            wrong with the block.
        """
        block = os.pread(fd, _index_head.size, index_at)
        if len(block) < _index_head.size:
            return "the index block is cut short"
        mark, block_size, count = _index_head.unpack(block)
        if (
            mark != INDEX_MARK
            or block_size != _index_head.size + count * _entry.size + 4
            or index_at + block_size > size
        ):
            return "the index block's header is damaged"
        block = os.pread(fd, block_size, index_at)
        if (
            zlib.crc32(memoryview(block)[:-4])
            != _int4.unpack_from(block, block_size - 4)[0]
        ):
            return "the index block fails its checksum"
        entries = memoryview(block)[_index_head.size : block_size - 4]
        return dict(_entry.iter_unpack(entries)), index_at + block_size

    def _rebuild_index(
        self, fd: int, index_at: int, size: int, damage: str
    ) -> tuple[dict[bytes, int], int]:
        """Index the base again from its transactions, which the damaged
        index block maps (they carry their own checksums).

        The block holds an entry per record of the base, so its size, and
        where the later transactions start, follow from the records found.

        :return: the offsets by oid and the end of the index block.
        :raises DamagedFileError: when the base transactions are damaged too,
            or the later transactions do not start where the block must end.
        """
        scan = scan_transactions(fd, HEADER_SIZE, index_at)
        bad = scan.damaged_at if scan.damaged_at is not None else scan.torn_at
        if bad is not None or scan.end != index_at:
            raise self._damaged(
                index_at,
                f"{damage}, and the base transactions it indexes are damaged too "
                f"(at byte offset {bad}: {scan.reason})",
            )
        base_end = index_at + _index_head.size + len(scan.index) * _entry.size + 4
        following = find_good_transaction(fd, index_at, size)
        if base_end > size or following not in (None, base_end):
            raise self._damaged(
                index_at,
                f"{damage}, and its size can not be told from the base "
                "transactions (later transactions do not start where it "
                "would end)",
            )
        log.warning(
            "%s: %s (byte offset %d); rebuilt the index of %d records from the "
            "base transactions. Pack the database (`dhruva pack`) to write a "
            "sound index block",
            self.path,
            damage,
            index_at,
            len(scan.index),
        )
        return scan.index, base_end

    # --- reading -------------------------------------------------------------------

    def _read_record(self, file: BinaryIO, oid: bytes, offset: int) -> bytes:
        """Return the record of ``oid`` at ``offset``, its checksum checked.

        :raises DamagedRecordError: when its bytes fail their checksum.
        """
        fd = file.fileno()
        head = os.pread(fd, RECORD_HEAD, offset)
        reason = "it is cut short"
        if len(head) == RECORD_HEAD:
            length, check = _record_head.unpack(head)
            room = os.fstat(fd).st_size - offset - RECORD_HEAD
            record = os.pread(fd, min(length, room), offset + RECORD_HEAD)
            if len(record) != length:
                reason = f"its length word says {length} bytes"
            elif zlib.crc32(record, zlib.crc32(head[:8])) != check:
                reason = "its bytes do not match its checksum"
            elif record[:8] != oid:
                reason = f"it holds oid {int.from_bytes(record[:8], 'big')}"
            else:
                return record
        error = DamagedRecordError(self.path, offset, oid, reason)
        log.error("%s", error)
        raise error

    def _base_time(self) -> float | None:
        return self._written_ns / 1e9

    def check(self) -> list[DamagedFileError | DamagedRecordError]:
        """Read every byte this storage can see and check it against its
        checksums, the base (which opening does not read) included.

        :return: what is damaged, as the errors a load or open would raise;
            empty when the file is sound.
        """
        fd = self._live_file().fileno()
        problems: list[DamagedFileError | DamagedRecordError] = []
        index_at = int.from_bytes(os.pread(fd, 8, len(MAGIC)), "big")
        if self._index_damage is not None:
            at, damage = self._index_damage
            problems.append(
                DamagedFileError(
                    self.path,
                    at,
                    f"{damage} (rebuilt from the base transactions at open; "
                    "pack the database to write a sound one)",
                )
            )

        # The base transactions must run exactly to the index block.
        for start, limit in ((HEADER_SIZE, index_at), (self._base_end, self._end)):
            scan = scan_transactions(fd, start, limit)
            bad = scan.damaged_at if scan.damaged_at is not None else scan.torn_at
            if bad is not None:
                problems.append(DamagedFileError(self.path, bad, scan.reason))

        # Every current record, whichever transaction holds it.
        for oid, position in self._gen_positions():
            try:
                self._read_record(self._live_file(), oid, position)
            except DamagedRecordError as e:
                problems.append(e)
        return problems

    # --- writing -------------------------------------------------------------------

    def _encode_commit(
        self, records: dict[bytes, bytes]
    ) -> tuple[bytes, dict[bytes, int]]:
        """Return a commit's checksummed transaction, stamped with the time."""
        return encode_transaction(records, time.time_ns())

    # --- packing -------------------------------------------------------------------

    def _pack_writer(self, file: BinaryIO) -> PackWriter:
        return _CheckedPackWriter(file, self.pack_step)
