"""The Durus "SHELF-1" file layout: reading and writing its parts.

A SHELF-1 file is, in order::

    b"SHELF-1\\n"
    int8 n, then n bytes of records        (the first transaction)
    the offset map
    zero or more transactions               (appended by later commits)

A transaction is an int8 length followed by records. A record on disk is
``int8 r`` followed by ``r`` bytes: the oid, then the object record (which
starts with the same oid again; see :mod:`dhruva.record`).

The offset map is ``int8 size | int8 width | int8 count`` followed by
``count`` words of ``width`` bytes (big-endian), where ``size`` is
``16 + width * count``. Word ``j`` is the file offset of the record of oid
``j`` when it is smaller than the map's own offset; a word of all 0xff bytes
is blank, and any other value ``start + k`` (``start`` being the map's
offset) links the unused slot to unused slot ``k``, the way Durus chains the
oids it may hand out again. The map is written once, when the file is created
or packed, and never changed.

This module knows the bytes only; :mod:`dhruva.file_storage` builds the
storage on it.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import zlib
from collections.abc import Iterator, Mapping, MutableSequence
from dataclasses import dataclass
from typing import BinaryIO

from dhruva.error import StorageError

log = logging.getLogger(__name__)

#: The first bytes of every SHELF-1 file.
PREFIX = b"SHELF-1\n"

_int8 = struct.Struct(">Q")
_int4 = struct.Struct(">I")

#: Offset of the first transaction's length.
FIRST_TRANSACTION = len(PREFIX)

#: The smallest on-disk record: length word aside, the oid, then the object
#: record's oid and data length.
_MIN_RECORD = 8 + 8 + 4

#: Map words read per chunk when the whole map is scanned.
_CHUNK_WORDS = 65536


class BadTransactionError(StorageError):
    """A transaction of a file fails its checks: the base of
    :class:`TornTailError` and :class:`MidFileDamageError`.

    :param path: the database file.
    :param offset: the byte offset where the bad transaction starts.
    :param size: the file's size in bytes.
    :param reason: what is wrong at ``offset``.
    """

    def __init__(self, path: str, offset: int, size: int, reason: str) -> None:
        super().__init__(path, offset, size, reason)
        self.path = path
        self.offset = offset
        self.size = size
        self.reason = reason


class TornTailError(BadTransactionError):
    """The file ends in an incomplete transaction, as a crash leaves it."""

    def __str__(self) -> str:
        return (
            f"{self.path}: the last transaction, at byte offset {self.offset} "
            f"(of {self.size} bytes), is incomplete ({self.reason}); a crash "
            "during a commit leaves this. Open it with repair=True (or "
            "`--repair`) to cut the file back to byte offset "
            f"{self.offset}; the cut bytes are saved next to the file"
        )


class MidFileDamageError(BadTransactionError):
    """A transaction that is not the file's last one is damaged.

    A crash only ever leaves the last transaction incomplete; damage followed
    by more data comes from elsewhere (a disk error, a stray write), and
    cutting the file there would throw away later commits, so repair refuses.
    """

    def __str__(self) -> str:
        return (
            f"{self.path}: the transaction at byte offset {self.offset} is damaged "
            f"({self.reason}) and {self.size - self.offset} bytes of later data "
            "follow it, so this is not an incomplete last commit. Repair would "
            "throw those later commits away and is refused. Open the file "
            "read-only to read the database up to the damage, and restore it "
            "from a backup"
        )


def width_for(largest: int) -> int:
    """Return the bytes per map word Durus picks to hold values up to ``largest``.

    Durus sizes the words for ``largest + 1`` so that a word of all 0xff bytes
    (blank) never equals a value.
    """
    return max(1, ((largest + 1).bit_length() + 7) // 8)


def encode_empty_shelf() -> bytes:
    """Return the bytes of a new, empty SHELF-1 file (as Durus writes it)."""
    map_start = FIRST_TRANSACTION + 8
    return PREFIX + _int8.pack(0) + encode_map_header(width_for(map_start), 0)


def encode_map_header(width: int, count: int) -> bytes:
    """Return the 24-byte header of an offset map of ``count`` words."""
    return _int8.pack(16 + width * count) + _int8.pack(width) + _int8.pack(count)


def encode_map(map_start: int, count: int, offsets: Mapping[int, int]) -> bytes:
    """Return a whole offset map (header and words) to be written at ``map_start``.

    :param map_start: the file offset the map will be written at; every
        value in ``offsets`` must be smaller.
    :param count: the number of slots, larger than every oid in ``offsets``
        (Durus keeps at least one free slot at the end).
    :param offsets: record offsets by oid number.

    Free slots are chained the way Durus does it, lowest first, each pointing
    to the free slot before it and the first to the last slot.
    """
    width = width_for(map_start + count)
    words = bytearray(b"\xff" * (width * count))
    previous_free = count - 1
    for j in range(count):
        value = offsets.get(j)
        if value is None:
            value = map_start + previous_free
            previous_free = j
        words[j * width : (j + 1) * width] = value.to_bytes(width, "big")
    return encode_map_header(width, count) + bytes(words)


def encode_transaction(records: Iterator[tuple[bytes, bytes]]) -> tuple[bytes, int]:
    """Return the bytes of one transaction and the number of records in it.

    :param records: ``(oid, record)`` pairs.
    """
    parts = [b""]
    total = 0
    count = 0
    for oid, record in records:
        parts.append(_int8.pack(8 + len(record)) + oid + record)
        total += len(parts[-1])
        count += 1
    parts[0] = _int8.pack(total)
    return b"".join(parts), count


@dataclass
class OffsetMap:
    """The on-disk offset map of an open SHELF-1 file; reads words on demand."""

    #: The open file holding the map.
    file: BinaryIO
    #: File offset of the map; record offsets are smaller than this.
    start: int
    #: Bytes per word.
    width: int
    #: Number of slots (the oids below this are covered by the map).
    count: int

    @property
    def end(self) -> int:
        """File offset just after the map, where later transactions begin."""
        return self.start + 24 + self.width * self.count

    @classmethod
    def read(cls, file: BinaryIO, path: str, start: int, file_size: int) -> OffsetMap:
        """Read the map header at ``start`` and check that it fits the file.

        :raises StorageError: when the header is damaged or cut short.
        """
        file.seek(start)
        header = file.read(24)
        if len(header) != 24:
            raise StorageError(
                f"{path}: the offset map at byte offset {start} is cut short "
                f"(the file has {file_size} bytes); the file is damaged beyond "
                "what repair can fix: restore it from a backup"
            )
        size, width, count = struct.unpack(">QQQ", header)
        if not 1 <= width <= 8 or size != 16 + width * count:
            raise StorageError(
                f"{path}: the offset map at byte offset {start} is damaged "
                f"(size {size}, word width {width}, {count} words); restore "
                "the file from a backup"
            )
        result = cls(file, start, width, count)
        if result.end > file_size:
            raise StorageError(
                f"{path}: the offset map at byte offset {start} needs "
                f"{result.end} bytes but the file has {file_size}; restore the "
                "file from a backup"
            )
        return result

    def _decode(self, word: bytes) -> int | None:
        if word == b"\xff" * self.width:
            return None
        value = int.from_bytes(word, "big")
        return value if value < self.start else None

    def get(self, number: int) -> int | None:
        """Return the record offset of oid ``number`` in the map, or None."""
        if not 0 <= number < self.count:
            return None
        self.file.seek(self.start + 24 + number * self.width)
        return self._decode(self.file.read(self.width))

    def items(self) -> Iterator[tuple[int, int]]:
        """Yield ``(oid number, offset)`` for every record the map holds."""
        width = self.width
        for first in range(0, self.count, _CHUNK_WORDS):
            n = min(_CHUNK_WORDS, self.count - first)
            self.file.seek(self.start + 24 + first * width)
            chunk = self.file.read(n * width)
            for i in range(n):
                value = self._decode(chunk[i * width : (i + 1) * width])
                if value is not None:
                    yield first + i, value


@dataclass(frozen=True)
class TransactionSpan:
    """Where one complete transaction lies in the file."""

    #: Offset of the transaction's first byte.
    start: int
    #: Offset just after it: the file's size right after it was committed.
    end: int
    #: The number of records it holds.
    records: int
    #: When it was committed, in seconds since the epoch; None when the
    #: format records no times (SHELF-1, DFS20).
    time: float | None = None


@dataclass
class ScanResult:
    """What :func:`scan_transactions` found after the offset map."""

    #: Offset of the newest record of each oid, by oid bytes.
    index: dict[bytes, int]
    #: Offset just after the last complete transaction.
    end: int
    #: The number of complete transactions.
    transactions: int
    #: Where the incomplete tail starts, or None when the file ends cleanly.
    torn_at: int | None = None
    #: What is wrong with the tail.
    reason: str = ""
    #: True when the bad transaction fits in the file and more data follows it:
    #: damage in the middle of the file, not an incomplete last commit.
    damaged_inside: bool = False
    #: The last complete transaction, or None when there is none.
    last: TransactionSpan | None = None


def scan_transactions(
    file: BinaryIO,
    start: int,
    file_size: int,
    spans: MutableSequence[TransactionSpan] | None = None,
) -> ScanResult:
    """Index the transactions from ``start`` to the end of the file.

    Every record's length words are checked against its transaction, so that
    a transaction cut short, filled with zeros, or overwritten with garbage
    is found. Scanning stops at the first bad transaction; everything from
    there on is the torn tail.

    :param spans: when given, a :class:`TransactionSpan` is appended to it
        for each complete transaction.
    """
    result = ScanResult(index={}, end=start, transactions=0)
    position = start
    while position < file_size:
        found: dict[bytes, int] = {}
        problem = _check_transaction(file, position, file_size, found)
        if problem is not None:
            result.torn_at = position
            result.reason = problem
            if file_size - position >= 8:
                file.seek(position)
                claimed_end = position + 8 + _int8.unpack(file.read(8))[0]
                result.damaged_inside = claimed_end < file_size and not (
                    zeros_to_end(file, claimed_end)
                )
            break
        file.seek(position)
        end = position + 8 + _int8.unpack(file.read(8))[0]
        result.index.update(found)
        result.last = TransactionSpan(position, end, len(found))
        if spans is not None:
            spans.append(result.last)
        position = result.end = end
        result.transactions += 1
    return result


def _check_transaction(
    file: BinaryIO, position: int, file_size: int, index: dict[bytes, int]
) -> str | None:
    """Check the transaction at ``position``; index its records if it is whole.

    :return: None when the transaction is complete, else what is wrong.
    """
    if file_size - position < 8:
        return f"{file_size - position} bytes where a transaction length belongs"
    file.seek(position)
    (length,) = _int8.unpack(file.read(8))
    end = position + 8 + length
    if end > file_size:
        return (
            f"its length says {length} bytes but only {file_size - position - 8} follow"
        )

    # Durus writes no empty transactions after the map in practice; zeros
    # running to the end of the file are what a crash leaves, except for a
    # single empty transaction that ends the file exactly.
    if length == 0 and file_size - position > 8 and zeros_to_end(file, position):
        return f"{file_size - position} zero bytes run to the end of the file"

    found: dict[bytes, int] = {}
    at = position + 8
    while at < end:
        if end - at < 8 + _MIN_RECORD:
            return f"{end - at} stray bytes at the end of the transaction"
        file.seek(at)
        head = file.read(8 + _MIN_RECORD)
        (size,) = _int8.unpack_from(head, 0)
        oid, record_oid = head[8:16], head[16:24]
        (data_length,) = _int4.unpack_from(head, 24)
        refs_length = size - 8 - 12 - data_length
        if (
            size < _MIN_RECORD
            or at + 8 + size > end
            or oid != record_oid
            or refs_length < 0
            or refs_length % 8
        ):
            return f"the record at byte offset {at} is damaged"
        found[oid] = at
        at += 8 + size
    index.update(found)
    return None


def record_spans(file: BinaryIO, span: TransactionSpan) -> Iterator[tuple[int, int]]:
    """Yield ``(offset, length)`` of the object records of a complete
    transaction, in file order."""
    at = span.start + 8
    while at < span.end:
        file.seek(at)
        (size,) = _int8.unpack(file.read(8))
        yield at + 16, size - 8
        at += 8 + size


def zeros_to_end(file: BinaryIO, position: int) -> bool:
    """Return whether every byte from ``position`` to the end is zero."""
    file.seek(position)
    while chunk := file.read(1 << 16):
        if chunk.count(0) != len(chunk):
            return False
    return True


# --- zeros where record data belongs -------------------------------------------------


def zeros_start(file: BinaryIO, start: int, end: int) -> int:
    """Return where the run of zero bytes that ends at ``end`` begins (``end``
    when the byte before it is not zero), not before ``start``."""
    at = end
    while at > start:
        step = min(1 << 16, at - start)
        file.seek(at - step)
        chunk = file.read(step)
        kept = len(chunk.rstrip(b"\0"))
        if kept:
            return at - step + kept
        at -= step
    return start


def _pickled_oids(data: bytes) -> set[bytes] | None:
    """Return the 8-byte strings a pickle record's data holds (the oids of
    its references among them), or None when it does not parse."""
    import pickletools

    found: set[bytes] = set()
    try:
        ops = list(pickletools.genops(data))
        end = (ops[[op.name for op, _a, _p in ops].index("STOP")][2] or 0) + 1
        state = data[end:]
        if state[:1] == b"\x78":
            with contextlib.suppress(zlib.error):
                state = zlib.decompress(state)
        for _op, arg, _pos in pickletools.genops(state):
            if isinstance(arg, bytes) and len(arg) == 8:
                found.add(arg)
            elif isinstance(arg, str) and len(arg) == 8:
                with contextlib.suppress(UnicodeEncodeError):
                    found.add(arg.encode("latin-1"))
    except (ValueError, IndexError, EOFError):
        return None
    return found


def record_data_problem(record: bytes, zeros_at: int) -> str | None:
    """Say what is wrong with an object record whose bytes from ``zeros_at``
    (an offset into ``record``) on are zeros; None when it is plausible.

    Durus layouts have no checksums, but their records are written by a
    serializer: pickles (Durus's layout), or data tagged ``\\0NAME\\0`` by one
    of dhruva's serializers (see :mod:`dhruva.serializer`). Zeros a crash left
    in place of the data do not parse as either. Only structure is read:
    nothing is imported or run.
    """
    from dhruva.serialize import check_pickle_data
    from dhruva.serializer import TAG_START

    data_end = 12 + int.from_bytes(record[8:12], "big")
    if data_end <= zeros_at:
        # Only references are zeros: references to the root, or lost ones.
        # Pickle data names every object it refers to.
        if record[12:13] == TAG_START:
            return None
        oids = _pickled_oids(record[12:data_end])
        if oids is None:
            return None  # not a pickle: opaque data, nothing to compare with
        refs = record[data_end:]
        for i in range(0, len(refs) - 7, 8):
            if refs[i : i + 8] not in oids:
                number = int.from_bytes(refs[i : i + 8], "big")
                return f"it refers to oid {number}, which its data does not name"
        return None

    data = record[12:data_end]
    if data[:1] == TAG_START:
        name_end = data.find(TAG_START, 1)
        class_end = data.find(TAG_START, name_end + 1) if name_end > 0 else -1
        name = data[1:name_end] if name_end > 0 else b""
        if class_end < 0 or not name.replace(b"_", b"").replace(b"-", b"").isalnum():
            return "its data is neither a pickle nor tagged by a serializer"
        if b":" not in data[name_end + 1 : class_end]:
            return "the class name of its serializer tag is missing"
        return None
    try:
        check_pickle_data(data)
    except ValueError as e:
        return str(e)
    return None


def read_record(file: BinaryIO, path: str, oid: bytes, offset: int) -> bytes:
    """Return the object record of ``oid`` stored at ``offset``.

    :raises StorageError: when the bytes there are not a record of ``oid``.
    """
    file.seek(offset)
    head = file.read(16)
    if len(head) == 16:
        size = _int8.unpack_from(head, 0)[0]
        if head[8:16] == oid and size >= _MIN_RECORD:
            record = file.read(size - 8)
            if len(record) == size - 8 and record[:8] == oid:
                return record
    number = int.from_bytes(oid, "big")
    message = (
        f"{path}: the record of oid {number} at byte offset {offset} is "
        "damaged; restore the file from a backup"
    )
    log.error("%s", message)
    raise StorageError(message)
