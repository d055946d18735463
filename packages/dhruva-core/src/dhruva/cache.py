"""The object cache of a connection: one object per oid, and a size target.

Objects are held weakly by oid, so an object nobody refers to goes away. Objects
accessed recently are also held strongly; when there are more of those than
the target size, the least recently accessed are turned back into ghosts
(their state is dropped, to be loaded again on the next access).
"""

from __future__ import annotations

import heapq
import logging
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dhruva.persistent import (
    GHOST,
    SAVED,
    _getattribute,
    _ghost_class,
    _setattribute,
    _user_class,
)

if TYPE_CHECKING:
    from dhruva.connection import Connection

log = logging.getLogger(__name__)


class Cache:
    """Objects of one connection, by oid.

    :param size: the target number of recently used objects kept loaded.
    """

    def __init__(self, size: int) -> None:
        self.objects: weakref.WeakValueDictionary[bytes, Any] = (
            weakref.WeakValueDictionary()
        )
        #: Objects accessed since they were last ghosted, by id.
        self.recent: dict[int, Any] = {}
        self.size = 0
        self.set_size(size)

    def get_size(self) -> int:
        """Return the target number of loaded objects."""
        return self.size

    def set_size(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"cache size must be a positive number, not {size}")
        self.size = size

    def get_count(self) -> int:
        """Return the number of objects in the cache, ghosts included."""
        return len(self.objects)

    def get(self, oid: bytes) -> Any:
        return self.objects.get(oid)

    def get_instance(self, oid: bytes, cls: Any, connection: Connection) -> Any:
        """Return the object for ``oid``, making a ghost of ``cls`` if needed.

        Called for every reference while unpickling, so it stays short.
        """
        obj = self.objects.get(oid)
        if obj is None or _user_class(obj) is not cls:
            ghost_class: Any = _ghost_class(cls)
            obj = ghost_class.__new__(ghost_class)
            _setattribute(obj, "_p_oid", oid)
            _setattribute(obj, "_p_connection", connection)
            _setattribute(obj, "_p_status", GHOST)
            self.objects[oid] = obj
        return obj

    def __setitem__(self, oid: bytes, obj: Any) -> None:
        self.objects[oid] = obj

    def __delitem__(self, oid: bytes) -> None:
        obj = self.objects.pop(oid, None)
        if obj is not None:
            self.recent.pop(id(obj), None)

    def note_access(self, obj: Any) -> None:
        self.recent[id(obj)] = obj

    def shrink(self, transaction_serial: int) -> int:
        """Ghost the least recently used saved objects beyond the target size.

        :return: how many objects were ghosted.
        """
        excess = len(self.recent) - self.size
        if excess <= 0:
            return 0
        oldest = heapq.nsmallest(
            excess,
            self.recent.values(),
            key=lambda obj: _getattribute(obj, "_p_serial"),
        )
        ghosted = 0
        for obj in oldest:
            if _getattribute(obj, "_p_serial") == transaction_serial:
                continue  # in use by the current transaction
            if _getattribute(obj, "_p_status") == SAVED:
                obj._p_set_status_ghost()
                ghosted += 1
            del self.recent[id(obj)]
        log.debug("cache shrink: ghosted %d, %d recent", ghosted, len(self.recent))
        return ghosted

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.objects.values()))
