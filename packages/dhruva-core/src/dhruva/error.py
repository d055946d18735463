"""The exceptions dhruva raises: one tree, rooted at :class:`DhruvaError`.

Every exception here pickles, so that a storage server can send it to a client.
Conflict errors carry the oids involved and are marked retryable: the usual
answer is ``connection.abort()`` and running the transaction again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _format_oid(oid: bytes | int) -> str:
    if isinstance(oid, bytes):
        return str(int.from_bytes(oid, "big"))
    return str(oid)


class DhruvaError(Exception):
    """The root of every error dhruva raises."""

    #: True when running the same transaction again may succeed.
    retryable = False


class DhruvaKeyError(KeyError, DhruvaError):
    """An oid (or key) that the storage does not hold."""

    def __str__(self) -> str:
        if self.args and isinstance(self.args[0], bytes) and len(self.args[0]) == 8:
            return f"no object with oid {_format_oid(self.args[0])}"
        return KeyError.__str__(self)


class InvalidObjectReference(DhruvaError):
    """A persistent object from one connection was stored in another."""


class StorageError(DhruvaError):
    """A storage cannot do what was asked (bad file, locked file, read-only)."""


class ReadOnlyError(StorageError):
    """A write to a storage opened read-only."""


class ProtocolError(DhruvaError):
    """A client and a server disagree about the bytes on the wire."""


class ConflictError(DhruvaError):
    """Another connection changed objects this transaction depends on.

    :param oids: the oids of the objects in conflict.
    :param classes: class names of those objects, where known.
    """

    retryable = True

    def __init__(self, oids: Iterable[bytes] = (), classes: Iterable[str] = ()):
        self.oids = list(oids)
        self.classes = list(classes)
        super().__init__(self.oids, self.classes)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.oids, self.classes))

    def __str__(self) -> str:
        shown = []
        for i, oid in enumerate(self.oids[:10]):
            name = self.classes[i] if i < len(self.classes) else None
            label = _format_oid(oid)
            shown.append(f"{label} ({name})" if name else label)
        more = f" and {len(self.oids) - 10} more" if len(self.oids) > 10 else ""
        return (
            f"{self._what} oids {', '.join(shown)}{more}; "
            "call connection.abort() and run the transaction again"
        )

    _what = "conflict on"


class WriteConflictError(ConflictError):
    """A commit touched objects that another connection changed meanwhile."""

    _what = "write conflict: another connection changed"


class ReadConflictError(ConflictError):
    """A load would mix states from before and after another commit."""

    _what = "read conflict: another connection changed"


class RemovedObjectError(ReadConflictError):
    """An object's record is gone: a pack removed it as unreachable.

    That happens to an object this connection still held (or a ghost of it)
    after every reference to it from the root was deleted and the database was
    packed, by this connection or another client.
    """

    def __str__(self) -> str:
        shown = ", ".join(
            f"{_format_oid(oid)} ({name})" if name else _format_oid(oid)
            for oid, name in zip(
                self.oids, self.classes + [""] * len(self.oids), strict=False
            )
        )
        return (
            f"object oid {shown} is no longer in the database: a pack removed it "
            "because nothing reachable from the root referred to it. Call "
            "connection.abort(); to keep an object, keep it reachable from the "
            "root until it is stored again"
        )


#: The names Durus code uses.
DurusError = DhruvaError
DurusKeyError = DhruvaKeyError
