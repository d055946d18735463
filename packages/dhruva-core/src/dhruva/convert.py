"""Copying a database between storages of any kinds (``dhruva convert``).

:func:`copy_reachable` copies every record reachable from the root of one
storage into another, empty one. Records are copied as bytes under their own
oids: nothing is unpickled, so the classes they name need not be importable,
and references between them stay right. Records no longer reachable (what a
pack would remove) are left behind.

The copy is written in transactions of a few megabytes, so that no storage
has to hold the whole database in one commit. The destination must hand out
new oids above every copied one afterwards; :func:`copy_reachable` checks
that, since a storage that does not (Durus's SqliteStorage after a bulk
import) would overwrite the root with the next new object.

The source's oid counter is carried over too (:func:`carry_oid_counter`), so
that an oid the source handed out, or held before a pack removed it, is not
handed out again by the destination: a stale reference to it, kept outside
the database, can never find an unrelated object. A source tells its counter
by a ``get_oid_counter()`` method (SqliteStorage and the file storages; a
storage without one is read through ``_next_oid`` if it has that); a
destination takes it by ``reserve_oids(n)`` (SqliteStorage and the file
storages, which rewrite the copy once when the counter is above its highest
oid).

Limitations:

- The copy reads one state of the source when the source's storage keeps
  one for a read-only open (file storages, and SQLite files while a dhruva
  writer has them open); a source written by a Durus process while it is
  copied may give a copy that mixes two commits.
- A destination without ``reserve_oids`` (a third-party storage that does
  not offer it) starts its counter above the highest copied oid only: it
  may hand out again the oids the source gave to records a pack removed. No
  reference to those is copied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from dhruva.error import StorageError
from dhruva.record import ROOT_OID
from dhruva.storage import Storage, gen_reachable_records

log = logging.getLogger(__name__)

#: Bytes of records written per transaction.
BATCH_BYTES = 16 << 20

#: Records copied between calls of the progress callback.
_PROGRESS_STEP = 500


@dataclass(frozen=True)
class CopyResult:
    """What :func:`copy_reachable` copied."""

    #: The number of records.
    records: int
    #: Their total size in bytes.
    size: int
    #: The highest oid copied, as a number.
    highest_oid: int
    #: The source's oid counter carried to the destination, if it was.
    oid_counter: int | None = None


def get_oid_counter(storage: Storage) -> int | None:
    """Return the number of the next oid ``storage`` would hand out, if it tells.

    :return: ``storage.get_oid_counter()`` where there is one, else the
        ``_next_oid`` counter of dhruva's storages, else None.
    """
    method = getattr(storage, "get_oid_counter", None)
    value = method() if callable(method) else getattr(storage, "_next_oid", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def carry_oid_counter(source: Storage, destination: Storage) -> int | None:
    """Make ``destination`` hand out no oid that ``source`` has handed out.

    :return: the counter carried over, or None when the source does not tell
        it or the destination cannot take it (no ``reserve_oids``).
    """
    counter = get_oid_counter(source)
    reserve = getattr(destination, "reserve_oids", None)
    if counter is None or not callable(reserve):
        log.info(
            "the oid counter of %r is not carried to %r (%s)",
            source,
            destination,
            "the source does not tell it"
            if counter is None
            else "the destination cannot take it",
        )
        return None
    reserve(counter)
    return counter


def check_empty(storage: Storage, name: str) -> None:
    """Refuse a destination that holds records already.

    :param name: how to name the storage in the message (a path).
    :raises StorageError: when it has a root record or any record.
    """
    size = storage.get_size()
    has_root = True
    try:
        storage.load(ROOT_OID)
    except KeyError:
        has_root = False
    if has_root or size:
        raise StorageError(
            f"{name} holds a database already ({size} records); convert writes "
            "into an empty storage only: choose a new name or remove it first"
        )


def copy_reachable(
    source: Storage,
    destination: Storage,
    *,
    batch_bytes: int = BATCH_BYTES,
    progress: Callable[[int], None] | None = None,
) -> CopyResult:
    """Copy every record reachable from the root of ``source`` to ``destination``.

    :param source: the storage to read; it is not changed.
    :param destination: an empty, writable storage.
    :param batch_bytes: bytes of records per transaction.
    :param progress: called with the number of records copied since its
        last call, as the copy goes.
    :return: how much was copied.
    :raises StorageError: when ``source`` has no root object, ``destination``
        is not empty, or ``destination`` would hand out a copied oid again.
    """
    try:
        source.load(ROOT_OID)
    except KeyError:
        raise StorageError(
            f"{source!r} has no root object: there is nothing to convert"
        ) from None
    check_empty(destination, repr(destination))

    records = size = highest = 0
    batch = reported = 0
    destination.begin()
    for oid, record in gen_reachable_records(source):
        destination.store(oid, record)
        records += 1
        size += len(record)
        batch += len(record)
        highest = max(highest, int.from_bytes(oid, "big"))

        # A transaction per batch of bytes; progress every so many records.
        if batch >= batch_bytes:
            destination.end()
            log.debug("copied %d records so far", records)
            destination.begin()
            batch = 0
        if progress is not None and records - reported >= _PROGRESS_STEP:
            progress(records - reported)
            reported = records
    destination.end()
    if progress is not None and records > reported:
        progress(records - reported)
    counter = carry_oid_counter(source, destination)

    # New objects must never land on a copied oid.
    probe = int.from_bytes(destination.new_oid(), "big")
    if probe <= highest:
        raise StorageError(
            f"{destination!r} hands out oid {probe} after the copy, but a copied "
            f"record has that oid (the highest copied is {highest}); its next "
            "commit would overwrite it. The storage must move its oid counter "
            "past the oids it stores: report this to its plugin's authors"
        )
    log.info(
        "copied %d records (%d bytes) from %r to %r", records, size, source, destination
    )
    return CopyResult(records, size, highest, counter)
