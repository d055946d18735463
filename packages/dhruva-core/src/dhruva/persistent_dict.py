"""A dict that persists and notices its own changes.

:class:`PersistentDict` behaves like :class:`dict`; every change through its
methods marks it changed, so the next commit stores it. Its stored state is
``{"data": <the dict>}``, as in Durus.

Limitations:

- The whole dict is one stored object: changing one key rewrites all of it.
  Use :class:`dhruva.btree.BTree` for large mappings.
- Changes made inside a mutable value (``d["k"].append(1)`` on a plain list)
  are not seen; call ``d._p_note_change()`` after them or store persistent
  values.
- Like :class:`dict` subclasses with ``__eq__``, it is not hashable.
"""

from __future__ import annotations

import logging
from collections.abc import (
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    ValuesView,
)
from typing import Any

from dhruva.persistent import Persistent

log = logging.getLogger(__name__)

__all__ = ["PersistentDict"]

_MISSING: Any = object()


class PersistentDict(Persistent, MutableMapping[Any, Any]):
    """A persistent mapping; takes the same arguments as :class:`dict`.

    Subclasses may define ``__missing__(key)``, which ``d[key]`` then calls
    for an absent key, as with :class:`dict`.
    """

    #: The plain dict holding the items; the only stored attribute.
    data: dict[Any, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.data = dict(*args, **kwargs)

    # -- reading (never marks the dict changed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: Any) -> Any:
        try:
            return self.data[key]
        except KeyError:
            missing = getattr(type(self), "__missing__", None)
            if missing is None:
                raise
            return missing(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def has_key(self, key: Any) -> bool:
        """Return True when ``key`` is present (Durus spelling of ``in``)."""
        return key in self.data

    def get(self, key: Any, default: Any = None) -> Any:
        """Return ``self[key]``, or ``default`` when absent (no ``__missing__``)."""
        return self.data.get(key, default)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self.data)

    def keys(self) -> KeysView[Any]:
        """Return a live view of the keys."""
        return self.data.keys()

    def values(self) -> ValuesView[Any]:
        """Return a live view of the values."""
        return self.data.values()

    def items(self) -> ItemsView[Any, Any]:
        """Return a live view of the ``(key, value)`` items."""
        return self.data.items()

    def iterkeys(self) -> Iterator[Any]:
        """Iterate over the keys (Durus spelling)."""
        return iter(self.data)

    def itervalues(self) -> Iterator[Any]:
        """Iterate over the values (Durus spelling)."""
        return iter(self.data.values())

    def iteritems(self) -> Iterator[tuple[Any, Any]]:
        """Iterate over the ``(key, value)`` items (Durus spelling)."""
        return iter(self.data.items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PersistentDict):
            return self.data == other.data
        if isinstance(other, Mapping):
            return self.data == dict(other.items())
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> PersistentDict:
        """Return a new, unsaved dict of the same class with the same items.

        Other attributes of a subclass are copied too (shallowly).
        """
        result = type(self).__new__(type(self))
        state = dict(self.__getstate__())
        state["data"] = self.data.copy()
        result.__setstate__(state)
        return result

    def __copy__(self) -> PersistentDict:
        return self.copy()

    @classmethod
    def fromkeys(cls, iterable: Iterable[Any], value: Any = None) -> PersistentDict:
        """Return a new dict with the keys from ``iterable``, all set to ``value``."""
        result = cls()
        result.data = dict.fromkeys(iterable, value)
        return result

    def __or__(self, other: Any) -> Any:
        if isinstance(other, PersistentDict):
            other = other.data
        elif not isinstance(other, Mapping):
            return NotImplemented
        result = self.copy()
        result.data.update(other)
        return result

    def __ror__(self, other: Any) -> Any:
        if not isinstance(other, Mapping):
            return NotImplemented
        result = self.copy()
        result.data = dict(other)
        result.data.update(self.data)
        return result

    # -- changing (always marks the dict changed)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._p_note_change()
        self.data[key] = value

    def __delitem__(self, key: Any) -> None:
        data = self.data
        if key not in data:
            raise KeyError(key)
        self._p_note_change()
        del data[key]

    def clear(self) -> None:
        """Remove every item."""
        if self.data:
            self._p_note_change()
            self.data.clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add items from a mapping or iterable of pairs, then from keywords."""
        if len(args) > 1:
            raise TypeError(f"update expected at most 1 argument, got {len(args)}")
        self._p_note_change()
        data = self.data
        if args:
            other = args[0]
            if isinstance(other, PersistentDict):
                data.update(other.data)
            elif isinstance(other, dict) or hasattr(other, "keys"):
                data.update(other)
            else:
                for key, value in other:
                    data[key] = value
        if kwargs:
            data.update(kwargs)

    def __ior__(self, other: Any) -> PersistentDict:
        self.update(other)
        return self

    def setdefault(self, key: Any, default: Any = None) -> Any:
        """Return ``self[key]``, first setting it to ``default`` when absent."""
        data = self.data
        if key in data:
            return data[key]
        self._p_note_change()
        data[key] = default
        return default

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value (or ``default`` when absent).

        :raises KeyError: when ``key`` is absent and no default is given.
        """
        data = self.data
        if key in data:
            self._p_note_change()
            return data.pop(key)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the most recently added ``(key, value)`` item.

        :raises KeyError: when the dict is empty.
        """
        data = self.data
        if not data:
            raise KeyError("popitem(): PersistentDict is empty")
        self._p_note_change()
        return data.popitem()
