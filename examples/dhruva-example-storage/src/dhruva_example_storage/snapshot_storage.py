"""SnapshotStorage: a whole dhruva database in one file, rewritten at each commit.

The file is::

    MAGIC | int8 next oid | int8 n | n times (int8 length | object record)

where an object record is the one :mod:`dhruva.record` defines (it starts
with its oid). A commit writes the whole new state to ``<file>.tmp``, makes it
durable with ``fsync`` and renames it over ``<file>``: a crash at any moment
leaves the old state or the new one, never a mix. ``next oid`` only grows, so
an oid is never handed out twice, not even after a pack removed its record.

One process at a time may open a file for writing; it holds an ``flock`` on
``<file>.lock``. Read-only opens take no lock and never write.

Limitations:

- Every commit rewrites the file and every record is kept in memory: fine
  for a few megabytes, hopeless for a real database. It is an example.
- No invalidations: two processes can not share one file for writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
from collections.abc import Iterator

from dhruva.error import DhruvaKeyError, ReadOnlyError, StorageError
from dhruva.record import ROOT_OID
from dhruva.storage import InvalidationHandler, Storage, gen_reachable_records

log = logging.getLogger(__name__)

#: The first bytes of every snapshot file; the plugin recognizes files by them.
MAGIC = b"DHRUVA-SNAPSHOT-1\n"

_int8 = struct.Struct(">Q")


def encode_snapshot(records: dict[bytes, bytes], next_oid: int) -> bytes:
    """Return the bytes of a snapshot file holding ``records``."""
    parts = [MAGIC, _int8.pack(next_oid), _int8.pack(len(records))]
    for record in records.values():
        parts.append(_int8.pack(len(record)))
        parts.append(record)
    return b"".join(parts)


def decode_snapshot(data: bytes, path: str) -> tuple[dict[bytes, bytes], int]:
    """Return the records by oid and the next oid of a snapshot file's bytes.

    :raises StorageError: naming ``path`` and the byte offset of the damage.
    """
    if not data.startswith(MAGIC):
        raise StorageError(
            f"{path} is not a snapshot file: it starts with {data[:18]!r}; open "
            "it with the storage kind that wrote it"
        )
    at = len(MAGIC)
    try:
        next_oid, count = struct.unpack_from(">QQ", data, at)
        at += 16
        records: dict[bytes, bytes] = {}
        for _ in range(count):
            (length,) = _int8.unpack_from(data, at)
            record = data[at + 8 : at + 8 + length]
            if len(record) != length or length < 8:
                raise struct.error("short record")
            records[record[:8]] = record
            at += 8 + length
    except struct.error:
        raise StorageError(
            f"{path} is damaged at byte offset {at}: it ends inside a record; "
            "restore it from a backup"
        ) from None
    return records, next_oid


class SnapshotStorage(Storage):
    """A storage kept whole in one file, rewritten at each commit.

    :param path: the database file; created when missing (unless read-only).
    :param readonly: open without locking; every write raises
        :class:`~dhruva.error.ReadOnlyError` and the file is never changed.
    :param repair: accepted for dhruva's common opener signature; there is
        nothing to repair, since a commit replaces the file whole.
    :raises StorageError: when the file is missing (read-only), damaged, not
        a snapshot file, or open for writing in another process.
    """

    packable = True
    iterable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        readonly: bool = False,
        repair: bool = False,
    ) -> None:
        #: The database file.
        self.path = os.fspath(path)
        self.readonly = readonly
        self._records: dict[bytes, bytes] = {}
        self._next_oid = 0
        self._pending: dict[bytes, bytes] | None = None
        self._lock_fd: int | None = None
        self._open = False

        if not readonly:
            self._lock()
        try:
            self._load_file()
        except BaseException:
            self._unlock()
            raise
        self._open = True
        log.info("opened %s with %d records", self.path, len(self._records))

    # --- the file ------------------------------------------------------------

    def _lock(self) -> None:
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(
                f"{self.path} is open for writing in another process (it holds "
                f"{self.path}.lock); close it there, or open it read-only"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load_file(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if self.readonly:
                raise StorageError(
                    f"no database file {self.path}; check the path, or open it "
                    "without readonly=True to create it"
                ) from None
            data = b""
        if not data:
            if self.readonly:
                raise StorageError(f"{self.path} is empty; it holds no database")
            self._write(self._records, self._next_oid)
            return

        self._records, self._next_oid = decode_snapshot(data, self.path)
        if not self.readonly:
            # A commit killed before its rename leaves its temporary file.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + ".tmp")
                log.warning("%s: removed an unfinished commit's .tmp", self.path)

    def _write(self, records: dict[bytes, bytes], next_oid: int) -> None:
        """Replace the file with ``records``, durably and in one step."""
        temporary = self.path + ".tmp"
        try:
            with open(temporary, "wb") as f:
                f.write(encode_snapshot(records, next_oid))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
            directory = os.open(os.path.dirname(os.path.abspath(self.path)), 0)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise StorageError(
                f"writing {self.path} failed ({e.strerror or e}); nothing was "
                "changed. Free disk space or fix the permissions and try again"
            ) from e

    def close(self) -> None:
        """Give back the lock; a second call is harmless."""
        if self._open:
            self._open = False
            self._unlock()
            log.info("closed %s", self.path)

    # --- reading -------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise StorageError(f"{self.path} is closed; open it again")

    def load(self, oid: bytes) -> bytes:
        self._check_open()
        try:
            return self._records[oid]
        except KeyError:
            raise DhruvaKeyError(oid) from None

    def gen_oid_record(
        self, start_oid: bytes | None = None, batch_size: int = 100
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield every record, or those reachable from ``start_oid``."""
        self._check_open()
        if start_oid is not None:
            return gen_reachable_records(self, start_oid, batch_size)
        return iter(list(self._records.items()))

    def get_size(self) -> int:
        return len(self._records)

    @property
    def next_oid(self) -> int:
        """The number of the next oid :meth:`new_oid` hands out."""
        return self._next_oid

    def sync(self) -> list[bytes]:
        """Return nothing: no other process writes to an open file."""
        return []

    # --- writing -------------------------------------------------------------

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(
                f"{what}: {self.path} was opened read-only; open it without "
                "readonly=True to change it"
            )

    def new_oid(self) -> bytes:
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

    def end(self, handle_invalidations: InvalidationHandler | None = None) -> None:
        """Write the whole new state; on failure nothing changes."""
        self._check_writable("end()")
        pending, self._pending = self._pending or {}, None
        if not pending:
            return
        records = {**self._records, **pending}
        highest = max(int.from_bytes(oid, "big") for oid in pending)
        next_oid = max(self._next_oid, highest + 1)
        self._write(records, next_oid)
        self._records, self._next_oid = records, next_oid

    def pack(self) -> None:
        """Rewrite the file with only the records reachable from the root."""
        self._check_writable("pack()")
        if ROOT_OID not in self._records:
            return
        kept = dict(gen_reachable_records(self))
        self._write(kept, self._next_oid)
        removed = len(self._records) - len(kept)
        self._records = kept
        log.info("packed %s: %d kept, %d removed", self.path, len(kept), removed)

    def __repr__(self) -> str:
        return f"SnapshotStorage({self.path!r})"
