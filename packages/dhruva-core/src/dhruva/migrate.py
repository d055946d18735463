"""Rewriting stored records: renamed classes, or another serializer.

:func:`migrate` finds the records that name a renamed class (as the object's
own class, as the class of an object referred to, or as a plain value in a
state) and stores them again through a connection that has the rename
table, so that they name the new class. Given a serializer, it rewrites every
record with that serializer instead. ``dhruva migrate`` is the command line
for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dhruva.connection import Connection
from dhruva.record import unpack_record
from dhruva.serializer import split_name, split_tagged

log = logging.getLogger(__name__)

#: Objects stored per commit while migrating (bounds the memory used).
BATCH_SIZE = 1000


def _needles(renames: Mapping[str, str]) -> list[bytes]:
    # How a class name appears in record data: "module\nname" in a pickle,
    # "module:name" in a tagged record.
    needles = []
    for old in renames:
        module, name = split_name(old)
        needles.append(f"{module}\n{name}\n".encode())
        needles.append(f"{module}:{name}".encode())
    return needles


def find_records_to_migrate(
    connection: Connection, renames: Mapping[str, str]
) -> list[bytes]:
    """Return the oids of the records that name an old class of ``renames``."""
    needles = _needles(renames)
    found = []
    for oid, record in connection.storage.gen_oid_record():
        data = unpack_record(record)[1]
        if data[:1] == b"\0":
            header, payload = data, split_tagged(data)[2]
        else:
            header, payload = data, connection.reader.get_state_pickle(data)
        if any(needle in header or needle in payload for needle in needles):
            found.append(oid)
    return found


def oids_to_migrate(
    connection: Connection,
    renames: Mapping[str, str] | None = None,
    every_record: bool = False,
) -> list[bytes]:
    """Return the oids :func:`migrate` rewrites (every oid with ``every_record``)."""
    if every_record:
        return [oid for oid, _record in connection.storage.gen_oid_record()]
    if renames is None:
        renames = connection.load_policy.renames
    return find_records_to_migrate(connection, renames)


def migrate(
    connection: Connection,
    oids: Iterable[bytes] | None = None,
    *,
    progress: Callable[[int], Any] | None = None,
) -> int:
    """Store again the records that name renamed classes; return how many.

    :param connection: a connection opened with ``renames=`` (and the
        serializer to write with).
    :param oids: the records to rewrite; by default those
        :func:`oids_to_migrate` finds for the connection's rename table.
    :param progress: called with 1 after each object (``bar.update``).
    """
    if oids is None:
        oids = oids_to_migrate(connection)
    done = 0
    for oid in oids:
        connection.get(oid)._p_note_change()
        done += 1
        if done % BATCH_SIZE == 0:
            connection.commit()
        if progress is not None:
            progress(1)
    connection.commit()
    log.info("migrated %d records", done)
    return done
