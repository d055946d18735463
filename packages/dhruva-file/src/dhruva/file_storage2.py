"""FileStorage2: object records in one file, in Durus's "DFS20" layout.

Durus 3.7 made this its standard file format and later versions still read and
write it; :class:`FileStorage2` opens such files unchanged and appends to them
in the same layout, so that Durus can go on reading them. The layout is::

    b"DFS20\\0" | int8 offset of the index record
    transactions | the index record | transactions

A transaction is a run of records, each ``int4 r`` followed by an ``r``-byte
object record (see :mod:`dhruva.record`), ended by an int4 zero. The index
record is ``int8 n`` followed by ``n`` bytes: a zlib-compressed pickle of a
dict mapping oid bytes to the file offset of each record written before it.
It is written when the file is created or packed; records committed later are
found by scanning the transactions after it when the file is opened. The whole
index is kept in memory.

Everything else is :class:`~dhruva.file_storage.FileStorage`'s: one ``fsync``
per commit before :meth:`~FileStorage2.end` returns (or deferred with
``end(durable=False)`` to a later ``make_durable()``), one writer at a time
(``flock`` plus a ``<file>.lock`` note naming the holder), an incomplete last
transaction refused at open unless ``repair=True`` cuts it off (saving it as
``<file>.torn-<offset>``), read-only opens that never change the file and
follow later commits on :meth:`~FileStorage2.sync`, views of the past with
``at=`` (until a pack; the format records no commit times), and a pack that
writes a new file and renames it over the old one.

Limitations:

- The layout has no checksums. A last transaction cut short, zero-filled or
  followed by garbage is found: at open, the records of the last
  transaction that trailing zeros reach are read, and zeros where pickle
  data (or a serializer's tag) belongs, or where a reference its pickle
  names should be, make it a torn tail (see
  :func:`~dhruva.shelf.record_data_problem`). Bytes changed in place inside
  a record whose lengths still add up are not found, nor zeros inside the
  payload of a tagged record (msgspec, dill) past its tag.
- Zeros that start exactly at a record's length word read as the end of
  the transaction: such a file is byte for byte a complete commit followed
  by a zero-filled one, and it is read so (the commit is kept, only the
  zeros are cut), so that no durable commit is ever cut off. Only when the
  kept part refers to an oid that has no record is it known to be torn, and
  cut with the zeros.
  TODO(#7): checksums, in a format Durus ignores.
- Commits with no records write nothing (Durus writes an empty transaction, a
  lone int4 zero). A file ending in more than one empty transaction is taken
  for a zero-filled tail; repairing it cuts only empty transactions.
- A record must be shorter than 4 GiB (the int4 length word);
  :meth:`~FileStorage2.end` refuses a longer one and writes nothing.
- Oids are never handed out twice by dhruva: a pack records the next oid
  after the pickled index, where Durus's reader ignores it. Durus itself
  reuses the oids a pack freed when it packs the file.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import zlib
from collections.abc import Iterator, Mapping, MutableSequence
from typing import Any, BinaryIO

from dhruva.error import StorageError
from dhruva.file_pack import PackWriter
from dhruva.file_repair import wrong_header_error
from dhruva.indexed_file import IndexedFileStorage
from dhruva.shelf import ScanResult, TransactionSpan, zeros_to_end

log = logging.getLogger(__name__)

#: The first bytes of every DFS20 file.
MAGIC = b"DFS20\0"

#: Offset of the first transaction's first byte in a new file, where Durus
#: writes the (empty) index record.
HEADER_SIZE = len(MAGIC) + 8

#: Marks the next oid, written after the pickled index; pickle.loads (and so
#: Durus) ignores bytes after the pickle's end.
NEXT_OID_MARK = b"\0dhruva-next-oid"

_int8 = struct.Struct(">Q")
_int4 = struct.Struct(">I")

#: The smallest object record: oid and data length.
_MIN_RECORD = 12

#: The index pickle is protocol 4, as Durus 4 writes it on Python 3.
_PICKLE_PROTOCOL = 4


def encode_index(index: Mapping[bytes, int], next_oid: int = 0) -> bytes:
    """Return a whole index record (length word included).

    :param index: record offsets by oid.
    :param next_oid: the number of the next oid to hand out; it is written
        only when it is above every oid in ``index``.
    """
    payload = pickle.dumps(dict(index), protocol=_PICKLE_PROTOCOL)
    highest = max((int.from_bytes(oid, "big") for oid in index), default=-1)
    if next_oid > highest + 1:
        payload += NEXT_OID_MARK + _int8.pack(next_oid)
    compressed = zlib.compress(payload)
    return _int8.pack(len(compressed)) + compressed


def encode_empty_file() -> bytes:
    """Return the bytes of a new, empty DFS20 file (as Durus writes it)."""
    return MAGIC + _int8.pack(HEADER_SIZE) + encode_index({})


def encode_transaction(records: Mapping[bytes, bytes]) -> bytes:
    """Return one transaction holding ``records`` (by oid), terminator included.

    :raises StorageError: when a record does not fit its int4 length word.
    """
    parts = []
    for oid, record in records.items():
        if len(record) >= 1 << 32:
            raise StorageError(
                f"the record of oid {int.from_bytes(oid, 'big')} has "
                f"{len(record)} bytes; a DFS20 record must be under 4 GiB: "
                "split the object, or use FileStorage"
            )
        parts.append(_int4.pack(len(record)))
        parts.append(record)
    parts.append(_int4.pack(0))
    return b"".join(parts)


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles an index dict, refusing every class but the bytes helper."""

    def find_class(self, module: str, name: str) -> Any:
        # A protocol 2 pickle from Python 3 spells bytes as _codecs.encode.
        if (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} in an index record")


def decode_index(payload: bytes) -> tuple[dict[bytes, int], int]:
    """Return the offsets by oid and the next oid recorded (0 if none).

    :param payload: the decompressed index pickle.
    :raises ValueError: when the payload is not an index.
    """
    try:
        loaded = _IndexUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except Exception as e:
        raise ValueError(f"its pickle does not load ({e})") from e
    if not isinstance(loaded, dict):
        raise ValueError(f"it holds a {type(loaded).__name__}, not a dict")
    index: dict[bytes, int] = {}
    for key, offset in loaded.items():
        # Python 2 wrote oids as str; Durus reads them as latin-1.
        oid = key.encode("latin1") if isinstance(key, str) else key
        if not isinstance(oid, bytes) or len(oid) != 8 or not isinstance(offset, int):
            raise ValueError(f"it maps {key!r} to {offset!r}")
        index[oid] = offset
    next_oid = 0
    if payload[-24:-8] == NEXT_OID_MARK:
        (next_oid,) = _int8.unpack(payload[-8:])
    return index, next_oid


def scan_transactions(
    file: BinaryIO,
    start: int,
    file_size: int,
    spans: MutableSequence[TransactionSpan] | None = None,
) -> ScanResult:
    """Index the transactions from ``start`` to the end of the file.

    Each record's lengths are checked, so that a transaction cut short,
    filled with zeros, or followed by garbage is found. Scanning stops at
    the first bad transaction; everything from there on is the torn tail.

    :param spans: when given, a :class:`~dhruva.shelf.TransactionSpan` is
        appended to it for each complete transaction.
    """
    result = ScanResult(index={}, end=start, transactions=0)
    position = start
    while position < file_size:
        checked = _check_transaction(file, position, file_size)
        if isinstance(checked, str):
            result.torn_at, result.reason = position, checked
            break
        found, after = checked
        result.index.update(found)
        result.last = TransactionSpan(position, after, len(found))
        if spans is not None:
            spans.append(result.last)
        result.transactions += 1
        position = result.end = after
    return result


def record_spans(file: BinaryIO, span: TransactionSpan) -> Iterator[tuple[int, int]]:
    """Yield ``(offset, length)`` of the object records of a complete
    transaction, in file order."""
    at = span.start
    while at < span.end - 4:
        file.seek(at)
        (length,) = _int4.unpack(file.read(4))
        yield at + 4, length
        at += 4 + length


def _check_transaction(
    file: BinaryIO, position: int, file_size: int
) -> tuple[dict[bytes, int], int] | str:
    """Check the transaction at ``position``.

    :return: the offsets of its records by oid and the offset after it, or
        what is wrong with it.
    """
    found: dict[bytes, int] = {}
    at = position
    while True:
        if file_size - at < 4:
            return (
                f"it has no end marker: the file ends {file_size - at} bytes "
                f"after byte offset {at}"
            )
        file.seek(at)
        (length,) = _int4.unpack(file.read(4))

        # The end marker; zeros running on to the end are what a crash leaves.
        if length == 0:
            if at == position and file_size - at > 4 and zeros_to_end(file, at):
                return f"{file_size - at} zero bytes run to the end of the file"
            return found, at + 4

        if length < _MIN_RECORD or at + 4 + length > file_size:
            return (
                f"the record at byte offset {at} claims {length} bytes; "
                f"{file_size - at - 4} follow"
            )
        head = file.read(_MIN_RECORD)
        oid = head[:8]
        (data_length,) = _int4.unpack_from(head, 8)
        refs_length = length - _MIN_RECORD - data_length
        if refs_length < 0 or refs_length % 8:
            return f"the record at byte offset {at} is damaged"
        if head == bytes(_MIN_RECORD) and file.read(refs_length) == bytes(refs_length):
            return f"the record at byte offset {at} is zero-filled"
        found[oid] = at
        at += 4 + length


class _DFS20PackWriter(PackWriter):
    """A packed DFS20 file: the reachable records as one transaction, the
    carried ones as another, then the index of both (with the oid counter)."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        file.write(MAGIC + bytes(8))
        self.position = HEADER_SIZE

    def add(self, oid: bytes, record: bytes) -> None:
        self.file.write(_int4.pack(len(record)) + record)
        self.offsets[oid] = self.position
        self.position += 4 + len(record)

    def end_reachable(self, next_oid: int) -> None:
        self.file.write(_int4.pack(0))
        self.position += 4

    def finish(self, carried: dict[bytes, bytes], next_oid: int) -> None:
        if carried:
            for oid, record in carried.items():
                self.offsets[oid] = self.position
                self.position += 4 + len(record)
            self.file.write(encode_transaction(carried))
            self.position += 4

        # The index of everything above; it records the next oid, so that
        # the oids of dropped records are not handed out again.
        self.file.write(encode_index(self.offsets, next_oid))
        self.file.seek(len(MAGIC))
        self.file.write(_int8.pack(self.position))


class FileStorage2(IndexedFileStorage):
    """A storage in one DFS20 file; the format of Durus's FileStorage2.

    It shares :class:`~dhruva.file_storage.FileStorage`'s locking, repair,
    read-only and temporary-file handling, and
    :class:`~dhruva.indexed_file.IndexedFileStorage`'s index in memory; only
    the layout differs.

    :param path: the database file; created when missing (unless read-only).
        None makes a temporary file that is removed on :meth:`close`.
    :param readonly: open without locking and refuse every write; the file
        is never created or changed.
    :param repair: cut an incomplete last transaction off the file instead
        of refusing to open it.
    :raises FileLockedError: when another process has the file open for
        writing.
    :raises TornTailError: when the file ends in an incomplete transaction
        and ``repair`` is false.
    :raises StorageError: when the file is missing (read-only), damaged, or
        not a DFS20 file.
    """

    _index_name = "index record"

    packable = True
    iterable = True

    # --- opening -------------------------------------------------------------------

    def _empty_file(self) -> bytes:
        """Return an empty DFS20 file: the header and an empty index record."""
        return encode_empty_file()

    def _damaged(self, what: str) -> StorageError:
        message = f"{self.path}: {what}; the file is damaged: restore it from a backup"
        log.error("%s", message)
        return StorageError(message)

    def _load_layout(self, repair: bool) -> None:
        """Read the header and the index record, then scan the transactions
        after it."""
        file = self._live_file()
        visible = self._visible_size()
        size = os.fstat(file.fileno()).st_size
        file.seek(0)
        head = file.read(HEADER_SIZE)
        if not head.startswith(MAGIC):
            raise wrong_header_error(self.path, head, "FileStorage2 (DFS20)")
        if len(head) < HEADER_SIZE:
            raise self._damaged(f"the file ends at byte offset {size}, in its header")

        # The index record.
        (index_at,) = _int8.unpack_from(head, len(MAGIC))
        if not HEADER_SIZE <= index_at <= size - 8:
            raise self._damaged(
                f"the header puts the index record at byte offset {index_at}, "
                f"outside the file's {size} bytes"
            )
        file.seek(index_at)
        (length,) = _int8.unpack(file.read(8))
        if index_at + 8 + length > size:
            raise self._damaged(
                f"the index record at byte offset {index_at} claims {length} "
                f"bytes; {size - index_at - 8} follow"
            )
        try:
            index, recorded_next = decode_index(zlib.decompress(file.read(length)))
        except (ValueError, zlib.error) as e:
            raise self._damaged(
                f"the index record at byte offset {index_at} is unreadable: {e}"
            ) from None
        stray = [o for o in index.values() if not HEADER_SIZE <= o < index_at]
        if stray:
            raise self._damaged(
                f"the index record at byte offset {index_at} points to byte "
                f"offset {stray[0]}, which is not before it"
            )

        # The transactions committed after it.
        self._take_in(
            file,
            index,
            index_at + 8 + length,
            visible=visible,
            repair=repair,
            recorded_next=recorded_next,
            index_name=self._index_name,
        )

    # --- reading -------------------------------------------------------------------

    def _scan(
        self,
        file: BinaryIO,
        start: int,
        size: int,
        spans: MutableSequence[TransactionSpan] | None = None,
    ) -> ScanResult:
        return scan_transactions(file, start, size, spans)

    _record_trailer = 4

    def _record_spans(
        self, file: BinaryIO, span: TransactionSpan
    ) -> Iterator[tuple[int, int]]:
        return record_spans(file, span)

    def _read_record(self, file: BinaryIO, oid: bytes, offset: int) -> bytes:
        file.seek(offset)
        head = file.read(4)
        if len(head) == 4:
            (length,) = _int4.unpack(head)
            record = file.read(length)
            if length >= _MIN_RECORD and len(record) == length and record[:8] == oid:
                return record
        raise self._damaged(
            f"the record of oid {int.from_bytes(oid, 'big')} at byte offset "
            f"{offset} is not there"
        )

    # --- writing -------------------------------------------------------------------

    def _encode_commit(
        self, records: dict[bytes, bytes]
    ) -> tuple[bytes, dict[bytes, int]]:
        """Return a commit's DFS20 transaction and its records' offsets."""
        offsets: dict[bytes, int] = {}
        position = 0
        for oid, record in records.items():
            offsets[oid] = position
            position += 4 + len(record)
        return encode_transaction(records), offsets

    # --- packing -------------------------------------------------------------------

    def _pack_writer(self, file: BinaryIO) -> PackWriter:
        return _DFS20PackWriter(file)
