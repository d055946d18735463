"""A list that persists and notices its own changes.

:class:`PersistentList` behaves like :class:`list`; every change through its
methods marks it changed, so the next commit stores it. Its stored state is
``{"data": <the list>}``, as in Durus.

Limitations:

- The whole list is one stored object: appending one item rewrites all of it.
  Use :class:`dhruva.btree.BTree` keyed by position for very long sequences.
- Changes made inside a mutable element are not seen; call
  ``l._p_note_change()`` after them or store persistent elements.
- Like :class:`list`, it is not hashable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, MutableSequence
from typing import Any, SupportsIndex

from dhruva.persistent import Persistent

log = logging.getLogger(__name__)

__all__ = ["PersistentList"]


def _as_list(other: Any) -> Any:
    """Return the plain list behind ``other`` for comparisons, or NotImplemented."""
    if isinstance(other, PersistentList):
        return other.data
    if isinstance(other, list):
        return other
    return NotImplemented


class PersistentList(Persistent, MutableSequence[Any]):
    """A persistent sequence; takes the same arguments as :class:`list`."""

    #: The plain list holding the elements; the only stored attribute.
    data: list[Any]

    def __init__(self, *args: Any) -> None:
        self.data = list(*args)

    # -- reading (never marks the list changed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self._new(self.data[index])
        return self.data[index]

    def __contains__(self, item: object) -> bool:
        return item in self.data

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self.data)

    def count(self, item: Any) -> int:
        """Return how many elements equal ``item``."""
        return self.data.count(item)

    def index(self, item: Any, *args: Any) -> int:
        """Return the first index of ``item`` (``start``/``stop`` as for list).

        :raises ValueError: when ``item`` is absent.
        """
        return self.data.index(item, *args)

    def copy(self) -> PersistentList:
        """Return a new, unsaved list of the same class with the same elements."""
        return self._new(self.data[:])

    def __copy__(self) -> PersistentList:
        return self.copy()

    def _new(self, data: list[Any]) -> PersistentList:
        result = type(self).__new__(type(self))
        result.data = data
        return result

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        data = _as_list(other)
        return NotImplemented if data is NotImplemented else self.data == data

    def __ne__(self, other: object) -> bool:
        if self is other:
            return False
        data = _as_list(other)
        return NotImplemented if data is NotImplemented else self.data != data

    def __lt__(self, other: Any) -> bool:
        data = _as_list(other)
        return NotImplemented if data is NotImplemented else self.data < data

    def __le__(self, other: Any) -> bool:
        data = _as_list(other)
        return NotImplemented if data is NotImplemented else self.data <= data

    def __gt__(self, other: Any) -> bool:
        data = _as_list(other)
        return NotImplemented if data is NotImplemented else self.data > data

    def __ge__(self, other: Any) -> bool:
        data = _as_list(other)
        return NotImplemented if data is NotImplemented else self.data >= data

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: Any) -> PersistentList:
        if isinstance(other, PersistentList):
            return self._new(self.data + other.data)
        if isinstance(other, list):
            return self._new(self.data + other)
        return self._new(self.data + list(other))

    def __radd__(self, other: Any) -> PersistentList:
        if isinstance(other, list):
            return self._new(other + self.data)
        return self._new(list(other) + self.data)

    def __mul__(self, count: SupportsIndex) -> PersistentList:
        return self._new(self.data * count)

    __rmul__ = __mul__

    # -- changing (always marks the list changed)

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            value = value.data if isinstance(value, PersistentList) else list(value)
        self._p_note_change()
        self.data[index] = value

    def __delitem__(self, index: Any) -> None:
        self._p_note_change()
        del self.data[index]

    def __iadd__(self, other: Iterable[Any]) -> PersistentList:  # type: ignore[misc]
        self.extend(other)
        return self

    def __imul__(self, count: SupportsIndex) -> PersistentList:
        self._p_note_change()
        self.data *= count
        return self

    def append(self, item: Any) -> None:
        """Add ``item`` at the end."""
        self._p_note_change()
        self.data.append(item)

    def insert(self, index: SupportsIndex, item: Any) -> None:
        """Insert ``item`` before position ``index``."""
        self._p_note_change()
        self.data.insert(index, item)

    def extend(self, other: Iterable[Any]) -> None:
        """Append every element of ``other``."""
        items = other.data if isinstance(other, PersistentList) else list(other)
        self._p_note_change()
        self.data.extend(items)

    def pop(self, index: SupportsIndex = -1) -> Any:
        """Remove and return the element at ``index`` (the last by default).

        :raises IndexError: when the list is empty or ``index`` is out of range.
        """
        data = self.data
        item = data[index]
        self._p_note_change()
        del data[index]
        return item

    def remove(self, item: Any) -> None:
        """Remove the first element equal to ``item``.

        :raises ValueError: when ``item`` is absent.
        """
        data = self.data
        position = data.index(item)
        self._p_note_change()
        del data[position]

    def clear(self) -> None:
        """Remove every element."""
        if self.data:
            self._p_note_change()
            self.data.clear()

    def reverse(self) -> None:
        """Reverse the elements in place."""
        self._p_note_change()
        self.data.reverse()

    def sort(self, *, key: Any = None, reverse: bool = False) -> None:
        """Sort the elements in place, as :meth:`list.sort` does."""
        self._p_note_change()
        self.data.sort(key=key, reverse=reverse)
