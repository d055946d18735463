"""The object record: the bytes every storage keeps for one object.

Layout (Durus compatible)::

    oid (8 bytes) | int4 n | data (n bytes) | refs (8 bytes per referenced oid)

``data`` is what a serializer wrote; ``refs`` lists the oids the state refers
to, so that garbage collection and reference tools never need to deserialize.
"""

from __future__ import annotations

import struct

from dhruva.error import StorageError

_int4 = struct.Struct(">I")

#: The oid of the root object in every database.
ROOT_OID = b"\0" * 8


def pack_record(oid: bytes, data: bytes, refs: bytes) -> bytes:
    """Return the record for ``oid`` holding ``data`` and the joined ``refs``."""
    return oid + _int4.pack(len(data)) + data + refs


def unpack_record(record: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a record into ``(oid, data, refs)``.

    :raises StorageError: when the record is too short for the lengths it
        claims, or its refs are not whole oids.
    """
    if len(record) < 12:
        raise StorageError(f"object record of {len(record)} bytes is too short")
    oid = record[:8]
    (n,) = _int4.unpack_from(record, 8)
    end = 12 + n
    if end > len(record) or (len(record) - end) % 8:
        raise StorageError(
            f"object record for oid {int.from_bytes(oid, 'big')} is damaged: "
            f"data length {n} does not fit a record of {len(record)} bytes"
        )
    return oid, record[12:end], record[end:]


def split_oids(refs: bytes) -> list[bytes]:
    """Split joined 8-byte oids into a list."""
    return [refs[i : i + 8] for i in range(0, len(refs), 8)]


def record_oid(record: bytes) -> bytes:
    """Return the oid at the start of a record."""
    return record[:8]


def record_refs(record: bytes) -> list[bytes]:
    """Return the oids a record refers to."""
    return split_oids(unpack_record(record)[2])
