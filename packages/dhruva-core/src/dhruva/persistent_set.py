"""A set that persists and notices its own changes.

:class:`PersistentSet` behaves like :class:`set`; every change through its
methods or in-place operators marks it changed, so the next commit stores it.
Its stored state is ``{"s": <the set>}``, as in Durus.

Operators accept another :class:`PersistentSet` or any built-in set or
frozenset and return a new, unsaved :class:`PersistentSet`; the named methods
(``union``, ``issubset``, ...) accept any iterables, as :class:`set`'s do.

Limitations:

- The whole set is one stored object: adding one element rewrites all of it.
  Use :class:`dhruva.btree.BTree` (``tree.add(key)``) for large sets.
- Like :class:`set`, it is not hashable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, MutableSet
from typing import Any

from dhruva.persistent import Persistent

log = logging.getLogger(__name__)

__all__ = ["PersistentSet"]


def _as_set(other: Any) -> Any:
    """Return the plain set behind ``other`` for operators, or NotImplemented."""
    if isinstance(other, PersistentSet):
        return other.s
    if isinstance(other, (set, frozenset)):
        return other
    return NotImplemented


def _plain(others: tuple[Any, ...]) -> list[Any]:
    return [other.s if isinstance(other, PersistentSet) else other for other in others]


class PersistentSet(Persistent, MutableSet[Any]):
    """A persistent set; takes the same argument as :class:`set`."""

    #: The plain set holding the elements; the only stored attribute.
    s: set[Any]

    def __init__(self, *args: Any) -> None:
        self.s = set(*args)

    def _new(self, elements: set[Any]) -> PersistentSet:
        result = type(self).__new__(type(self))
        result.s = elements
        return result

    def __repr__(self) -> str:
        oid = self._p_oid
        identifier = f"@{id(self):x}" if oid is None else self._p_format_oid()
        return f"<{type(self).__name__} {identifier} {list(self.s)!r}>"

    # -- reading (never marks the set changed)

    def __len__(self) -> int:
        return len(self.s)

    def __contains__(self, item: object) -> bool:
        return item in self.s

    def __iter__(self) -> Iterator[Any]:
        return iter(self.s)

    def copy(self) -> PersistentSet:
        """Return a new, unsaved set of the same class with the same elements."""
        return self._new(set(self.s))

    def __copy__(self) -> PersistentSet:
        return self.copy()

    def __eq__(self, other: object) -> bool:
        elements = _as_set(other)
        return NotImplemented if elements is NotImplemented else self.s == elements

    def __ne__(self, other: object) -> bool:
        elements = _as_set(other)
        return NotImplemented if elements is NotImplemented else self.s != elements

    def __lt__(self, other: Any) -> bool:
        elements = _as_set(other)
        return NotImplemented if elements is NotImplemented else self.s < elements

    def __le__(self, other: Any) -> bool:
        elements = _as_set(other)
        return NotImplemented if elements is NotImplemented else self.s <= elements

    def __gt__(self, other: Any) -> bool:
        elements = _as_set(other)
        return NotImplemented if elements is NotImplemented else self.s > elements

    def __ge__(self, other: Any) -> bool:
        elements = _as_set(other)
        return NotImplemented if elements is NotImplemented else self.s >= elements

    __hash__ = None  # type: ignore[assignment]

    def __and__(self, other: Any) -> Any:
        elements = _as_set(other)
        return (
            NotImplemented
            if elements is NotImplemented
            else self._new(self.s & elements)
        )

    def __or__(self, other: Any) -> Any:
        elements = _as_set(other)
        return (
            NotImplemented
            if elements is NotImplemented
            else self._new(self.s | elements)
        )

    def __sub__(self, other: Any) -> Any:
        elements = _as_set(other)
        return (
            NotImplemented
            if elements is NotImplemented
            else self._new(self.s - elements)
        )

    def __xor__(self, other: Any) -> Any:
        elements = _as_set(other)
        return (
            NotImplemented
            if elements is NotImplemented
            else self._new(self.s ^ elements)
        )

    __rand__ = __and__
    __ror__ = __or__
    __rxor__ = __xor__

    def __rsub__(self, other: Any) -> Any:
        elements = _as_set(other)
        return (
            NotImplemented
            if elements is NotImplemented
            else self._new(elements - self.s)
        )

    def isdisjoint(self, other: Iterable[Any]) -> bool:
        """Return True when no element is also in ``other``."""
        return self.s.isdisjoint(_plain((other,))[0])

    def issubset(self, other: Iterable[Any]) -> bool:
        """Return True when every element is in ``other``."""
        return self.s.issubset(_plain((other,))[0])

    def issuperset(self, other: Iterable[Any]) -> bool:
        """Return True when every element of ``other`` is here."""
        return self.s.issuperset(_plain((other,))[0])

    def union(self, *others: Iterable[Any]) -> PersistentSet:
        """Return a new set with the elements here and in every one of ``others``."""
        return self._new(self.s.union(*_plain(others)))

    def intersection(self, *others: Iterable[Any]) -> PersistentSet:
        """Return a new set with the elements common to this set and ``others``."""
        return self._new(self.s.intersection(*_plain(others)))

    def difference(self, *others: Iterable[Any]) -> PersistentSet:
        """Return a new set with the elements here but in none of ``others``."""
        return self._new(self.s.difference(*_plain(others)))

    def symmetric_difference(self, other: Iterable[Any]) -> PersistentSet:
        """Return a new set with the elements in exactly one of the two."""
        return self._new(self.s.symmetric_difference(_plain((other,))[0]))

    # -- changing (always marks the set changed)

    def add(self, item: Any) -> None:
        """Add ``item`` (no change is noted when it is already here)."""
        elements = self.s
        if item not in elements:
            self._p_note_change()
            elements.add(item)

    def discard(self, item: Any) -> None:
        """Remove ``item`` if it is here."""
        elements = self.s
        if item in elements:
            self._p_note_change()
            elements.discard(item)

    def remove(self, item: Any) -> None:
        """Remove ``item``.

        :raises KeyError: when ``item`` is absent.
        """
        elements = self.s
        if item not in elements:
            raise KeyError(item)
        self._p_note_change()
        elements.remove(item)

    def pop(self) -> Any:
        """Remove and return an arbitrary element.

        :raises KeyError: when the set is empty.
        """
        elements = self.s
        if not elements:
            raise KeyError("pop from an empty PersistentSet")
        self._p_note_change()
        return elements.pop()

    def clear(self) -> None:
        """Remove every element."""
        if self.s:
            self._p_note_change()
            self.s.clear()

    def update(self, *others: Iterable[Any]) -> None:
        """Add the elements of every one of ``others``."""
        self._p_note_change()
        self.s.update(*_plain(others))

    def intersection_update(self, *others: Iterable[Any]) -> None:
        """Keep only the elements also found in every one of ``others``."""
        self._p_note_change()
        self.s.intersection_update(*_plain(others))

    def difference_update(self, *others: Iterable[Any]) -> None:
        """Remove the elements found in any of ``others``."""
        self._p_note_change()
        self.s.difference_update(*_plain(others))

    def symmetric_difference_update(self, other: Iterable[Any]) -> None:
        """Keep the elements found in exactly one of this set and ``other``."""
        self._p_note_change()
        self.s.symmetric_difference_update(_plain((other,))[0])

    def __ior__(self, other: Any) -> Any:
        elements = _as_set(other)
        if elements is NotImplemented:
            return NotImplemented
        self._p_note_change()
        self.s |= elements
        return self

    def __iand__(self, other: Any) -> Any:
        elements = _as_set(other)
        if elements is NotImplemented:
            return NotImplemented
        self._p_note_change()
        self.s &= elements
        return self

    def __isub__(self, other: Any) -> Any:
        elements = _as_set(other)
        if elements is NotImplemented:
            return NotImplemented
        self._p_note_change()
        self.s -= elements
        return self

    def __ixor__(self, other: Any) -> Any:
        elements = _as_set(other)
        if elements is NotImplemented:
            return NotImplemented
        self._p_note_change()
        self.s ^= elements
        return self
