"""The Storage interface, MemoryStorage, and tools that scan a storage.

A storage keeps object records (see :mod:`dhruva.record`) by oid. A
:class:`~dhruva.connection.Connection` talks to it through the methods of
:class:`Storage` only; plugins never sit on this data path.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable, Iterator

from dhruva.error import DhruvaKeyError, ReadOnlyError
from dhruva.record import ROOT_OID, split_oids, unpack_record

log = logging.getLogger(__name__)

#: A callback a storage calls with oids that other clients changed.
InvalidationHandler = Callable[[list[bytes]], None]


class Storage:
    """What a Connection needs of a storage.

    Subclasses implement :meth:`load`, :meth:`begin`, :meth:`store`,
    :meth:`end`, :meth:`sync` and :meth:`new_oid`. The rest have working
    defaults. Optional capabilities are announced by the class attributes
    below, which the contract suite in :mod:`dhruva.testing` reads.
    """

    #: The storage removes unreachable records in :meth:`pack`.
    packable: bool = False
    #: :meth:`gen_oid_record` without a start oid yields every record.
    iterable: bool = True
    #: The storage reports other clients' commits through :meth:`sync`.
    invalidating: bool = False
    #: The storage was opened read-only; writes raise ReadOnlyError.
    readonly: bool = False
    #: :meth:`end` takes ``durable=False`` (write and show the commit, but
    #: leave the fsync to a later :meth:`make_durable`, which may be called
    #: from another thread), so a server can sync many commits at once.
    deferred_durability: bool = False

    def load(self, oid: bytes) -> bytes:
        """Return the record stored for ``oid``.

        :raises DhruvaKeyError: when there is no such record.
        :raises ReadConflictError: when another client changed ``oid`` since
            this client last synchronized.
        """
        raise NotImplementedError

    def begin(self) -> None:
        """Start a commit."""
        raise NotImplementedError

    def store(self, oid: bytes, record: bytes) -> None:
        """Add a record to the commit started by :meth:`begin`."""
        raise NotImplementedError

    def end(self, handle_invalidations: InvalidationHandler | None = None) -> None:
        """Make the commit durable and visible, or raise and write nothing.

        :param handle_invalidations: called with oids other clients changed,
            before the commit is made; it may raise a ConflictError to stop it.
        """
        raise NotImplementedError

    def make_durable(self) -> None:
        """Make every commit that :meth:`end` returned from durable.

        A storage with :attr:`deferred_durability` syncs here what
        ``end(durable=False)`` wrote; others made each commit durable in
        :meth:`end` already, so the default does nothing.
        """

    def sync(self) -> list[bytes]:
        """Return the oids other clients changed since the last call."""
        raise NotImplementedError

    def new_oid(self) -> bytes:
        """Return an oid that was never handed out before."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files, locks and sockets. Calling it twice is harmless."""

    def pack(self) -> None:
        """Remove records that are not reachable from the root, if supported."""

    def get_packer(self) -> Iterator[None] | None:
        """Return an incremental packer (a generator), or None."""
        return None

    def get_size(self) -> int | None:
        """Return the number of records, where that is cheap to know."""
        return None

    def bulk_load(self, oids: Iterable[bytes]) -> Iterator[bytes]:
        """Yield the records of ``oids``, in order."""
        for oid in oids:
            yield self.load(oid)

    def gen_oid_record(
        self, start_oid: bytes | None = None, batch_size: int = 100
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(oid, record)`` pairs.

        With ``start_oid``, the records reachable from it, nearest first. Without
        it, every record the storage holds: the default walks from the root, so
        a storage that can scan all records should override this.
        """
        return gen_reachable_records(self, start_oid or ROOT_OID, batch_size)

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gen_reachable_records(
    storage: Storage, start_oid: bytes = ROOT_OID, batch_size: int = 100
) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(oid, record)`` for every record reachable from ``start_oid``.

    Oids are visited lowest first within the frontier, and loaded in batches
    through :meth:`Storage.bulk_load`.
    """
    todo = [start_oid]
    seen = {start_oid}
    while todo:
        batch = [heapq.heappop(todo) for _ in range(min(batch_size, len(todo)))]
        for record in storage.bulk_load(batch):
            oid, _data, refs = unpack_record(record)
            yield oid, record
            for ref in split_oids(refs):
                if ref not in seen:
                    seen.add(ref)
                    heapq.heappush(todo, ref)


def gen_referring_oid_record(
    storage: Storage, referred_oid: bytes
) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(oid, record)`` for every record that refers to ``referred_oid``."""
    for oid, record in storage.gen_oid_record():
        if referred_oid in split_oids(unpack_record(record)[2]):
            yield oid, record


def gen_oid_class(storage: Storage, *classes: str) -> Iterator[tuple[bytes, str]]:
    """Yield ``(oid, class_name)`` pairs, only of ``classes`` when given."""
    from dhruva.serialize import extract_class_name

    for oid, record in storage.gen_oid_record():
        class_name = extract_class_name(record)
        if not classes or class_name in classes:
            yield oid, class_name


def get_census(storage: Storage) -> dict[str, int]:
    """Return the number of stored instances of each class name."""
    result: dict[str, int] = {}
    for _oid, class_name in gen_oid_class(storage):
        result[class_name] = result.get(class_name, 0) + 1
    return result


def get_reference_index(storage: Storage) -> dict[bytes, list[bytes]]:
    """Return, for each oid, the oids of the records that refer to it."""
    result: dict[bytes, list[bytes]] = {}
    for oid, record in storage.gen_oid_record():
        for ref in split_oids(unpack_record(record)[2]):
            result.setdefault(ref, []).append(oid)
    return result


class MemoryStorage(Storage):
    """A storage that keeps every record in a dict; for tests and scratch work.

    Nothing survives the process. One connection uses it at a time.
    """

    packable = True

    def __init__(self) -> None:
        self.records: dict[bytes, bytes] = {}
        self._next_oid = 0
        self._transaction: dict[bytes, bytes] | None = None

    def new_oid(self) -> bytes:
        oid = self._next_oid.to_bytes(8, "big")
        self._next_oid += 1
        return oid

    def load(self, oid: bytes) -> bytes:
        try:
            return self.records[oid]
        except KeyError:
            raise DhruvaKeyError(oid) from None

    def begin(self) -> None:
        self._transaction = {}

    def store(self, oid: bytes, record: bytes) -> None:
        if self._transaction is None:
            raise ReadOnlyError("store() called outside begin() and end()")
        self._transaction[oid] = record

    def end(self, handle_invalidations: InvalidationHandler | None = None) -> None:
        transaction, self._transaction = self._transaction or {}, None
        self.records.update(transaction)
        for oid in transaction:  # copied records bring their own oids
            self._next_oid = max(self._next_oid, int.from_bytes(oid, "big") + 1)

    def sync(self) -> list[bytes]:
        return []

    def get_size(self) -> int:
        return len(self.records)

    def gen_oid_record(
        self, start_oid: bytes | None = None, batch_size: int = 100
    ) -> Iterator[tuple[bytes, bytes]]:
        if start_oid is not None:
            return gen_reachable_records(self, start_oid, batch_size)
        return iter(list(self.records.items()))

    def pack(self) -> None:
        if ROOT_OID not in self.records:
            return
        reachable = {oid for oid, _record in gen_reachable_records(self)}
        for oid in list(self.records):
            if oid not in reachable:
                del self.records[oid]
        log.info("packed memory storage: %d records kept", len(self.records))
