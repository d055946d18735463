"""Persistent objects: subclass :class:`Persistent` and your instances persist.

A persistent object tracks its own changes: setting or deleting an attribute
tells its connection that it must be stored at the next commit. Changes made
inside a plain container held by an attribute are invisible to it; call
``obj._p_note_change()`` after such a change.

As in Durus, the class's attribute hook loads a ghost on its first attribute
access and tells the connection the first time a transaction reads an object
(so that a read of an object another client changed raises a conflict, and the
cache keeps the objects used recently). ``type(obj) is Cls`` holds for every
instance, ghost or not.

Fast reads (opt-in, per class)
------------------------------

``class Item(Persistent, fast_reads=True)`` makes reading an attribute of a
loaded object cost about what it costs on a plain object: the class keeps
Python's own attribute lookup, which the interpreter specializes. The mode is
inherited by subclasses (a subclass may say ``fast_reads=False``) and readable
as ``Item._p_fast_reads`` (a class's own ``__init_subclass__`` passes the
keyword on with ``super().__init_subclass__(**kwargs)``, as usual). Ghosts,
and objects of such a class not yet used in the current transaction, have
instead the class's *ghost class* (see
:mod:`dhruva._persistent_py`), which loads and notes the object on its first
access and then gives it back its own class; the connection gives the objects
read in a transaction their ghost class again when it ends. Conflict detection
and the cache behave as for a default class. What a fast_reads class shows:

- Until its first access in a transaction, ``type(obj)`` is the ghost class,
  not the class itself: it has the same name, module and qualified name,
  compares and hashes equal to the class (``type(obj) == Cls``, and lookups in
  sets and dicts of classes, work), calling it makes an instance of the class,
  and ``isinstance`` is unchanged, but ``type(obj) is Cls`` is False.
  ``obj.__class__`` always answers the class itself, without loading anything;
  use it (or ``isinstance``) rather than ``type(obj) is Cls``.
  ``type(obj).__new__(type(obj))`` makes an object of the ghost class, which
  becomes its class at its first access.
- Making a ghost class (on the first ghost of the class) calls the class's
  ``__init_subclass__``, and the ghost class shows among
  ``Cls.__subclasses__()``; it is told apart by the key
  :data:`GHOST_CLASS_MARK` in its own ``__dict__``.
- The class's ``__dict__`` holds ``__getattribute__ = object.__getattribute__``
  (what keeps the generic lookup); a ``__getattribute__`` of the class's own
  runs only after a ghost has been loaded.

Code written for Durus needs none of this: a class without ``fast_reads``
behaves as Durus's.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_intern = sys.intern

if os.environ.get("DHRUVA_PURE_PYTHON"):
    from dhruva._persistent_py import (
        GHOST,
        SAVED,
        UNSAVED,
        ConnectionBase,
        PersistentBase,
        _btree_add,
        _delattribute,
        _getattribute,
        _ghost_class,
        _persistent_id_filter,
        _retouch,
        _setattribute,
        _untouch,
        _untouch_all,
        _user_class,
    )
else:
    try:
        from dhruva._persistent import (  # type: ignore[import-untyped,no-redef,unused-ignore]
            GHOST,
            SAVED,
            UNSAVED,
            ConnectionBase,
            PersistentBase,
            _btree_add,
            _delattribute,
            _getattribute,
            _ghost_class,
            _persistent_id_filter,
            _retouch,
            _setattribute,
            _untouch,
            _untouch_all,
            _user_class,
        )
    except ImportError:
        from dhruva._persistent_py import (
            GHOST,
            SAVED,
            UNSAVED,
            ConnectionBase,
            PersistentBase,
            _btree_add,
            _delattribute,
            _getattribute,
            _ghost_class,
            _persistent_id_filter,
            _retouch,
            _setattribute,
            _untouch,
            _untouch_all,
            _user_class,
        )

#: A key only the ``__dict__`` of a ghost class has (see dhruva._persistent_py).
GHOST_CLASS_MARK = "__dhruva_user_class__"

__all__ = [
    "GHOST",
    "SAVED",
    "UNSAVED",
    "ComputedAttribute",
    "ConnectionBase",
    "Persistent",
    "PersistentBase",
    "PersistentObject",
    "call_if_persistent",
    # Used by the connection, its cache, the serializers and the BTree:
    "_btree_add",
    "_ghost_class",
    "_persistent_id_filter",
    "_retouch",
    "_untouch",
    "_untouch_all",
    "_user_class",
]


def _has_attribute(obj: object, name: str) -> bool:
    try:
        _getattribute(obj, name)
    except AttributeError:
        return False
    return True


def call_if_persistent(f: Callable[[Any], Any], x: object) -> Any:
    """Return ``f(x)`` when ``x`` is persistent, else None."""
    if isinstance(x, PersistentBase):
        return f(x)
    return None


class PersistentObject(PersistentBase):
    """A persistent object whose state lives in ``__slots__``.

    Subclasses declare ``__slots__``; the stored state is a dict of the slots
    that have values. Subclasses that also have a ``__dict__`` store both.
    """

    __slots__ = ("__weakref__",)

    def _p_gen_data_slots(self) -> Iterator[str]:
        """Yield the names of the data slots that hold a value."""
        for name in _data_slots(_user_class(self)):
            if _has_attribute(self, name):
                yield name

    def __getstate__(self) -> Any:
        if _getattribute(self, "_p_status") == GHOST:
            self._p_load_state()
        state: dict[str, Any] = {}
        if _has_attribute(self, "__dict__"):
            state.update(_getattribute(self, "__dict__"))
        for name in _data_slots(_user_class(self)):
            try:  # noqa: SIM105 - contextlib.suppress costs more per load
                state[name] = _getattribute(self, name)
            except AttributeError:
                pass  # an empty slot
        return state

    def __setstate__(self, state: Any) -> None:
        if _has_attribute(self, "__dict__"):
            _getattribute(self, "__dict__").clear()
        status = _getattribute(self, "_p_status")
        if status != GHOST:  # a ghost's slots are empty already
            for name in _data_slots(_user_class(self)):
                try:  # noqa: SIM105
                    _delattribute(self, name)
                except AttributeError:
                    pass
        if state:
            for key, value in state.items():
                _setattribute(self, key, value)

    def __repr__(self) -> str:
        oid = _getattribute(self, "_p_oid")
        identifier = f"@{id(self):x}" if oid is None else self._p_format_oid()
        return f"<{type(self).__name__} {identifier}>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Persistent objects are pickled by reference (see dhruva.serialize);
        # copy.copy and plain pickle get an unsaved copy of the state.
        if _getattribute(self, "_p_status") == GHOST:
            self._p_load_state()
        return (_reconstruct, (_user_class(self),), self.__getstate__())

    def _p_load_state(self) -> None:
        """Load the stored state of a ghost."""
        connection = _getattribute(self, "_p_connection")
        if connection is None:
            raise AttributeError(
                f"{type(self).__name__} oid {self._p_format_oid()} is a ghost "
                "with no connection to load its state from"
            )
        connection.load_state(self)
        _setattribute(self, "_p_status", SAVED)

    def _p_format_oid(self) -> str:
        oid = _getattribute(self, "_p_oid")
        return "None" if oid is None else str(int.from_bytes(oid, "big"))

    def _p_set_status_ghost(self) -> None:
        """Drop the loaded state; the next access loads it again."""
        self.__setstate__({})
        _setattribute(self, "_p_status", GHOST)
        _untouch(self)

    def _p_set_status_saved(self) -> None:
        _setattribute(self, "_p_status", SAVED)

    def _p_set_status_unsaved(self) -> None:
        if _getattribute(self, "_p_status") == GHOST:
            self._p_load_state()
        _setattribute(self, "_p_status", UNSAVED)

    def _p_is_ghost(self) -> bool:
        return bool(_getattribute(self, "_p_status") == GHOST)

    def _p_is_unsaved(self) -> bool:
        return bool(_getattribute(self, "_p_status") == UNSAVED)

    def _p_is_saved(self) -> bool:
        return bool(_getattribute(self, "_p_status") == SAVED)


# The data slot names of each persistent class, computed once.
_slot_names: dict[type, tuple[str, ...]] = {}


def _data_slots(cls: type) -> tuple[str, ...]:
    """Return the names of the data slots of instances of ``cls``."""
    names = _slot_names.get(cls)
    if names is None:
        found = []
        for klass in cls.__mro__:
            if klass is PersistentBase or klass is object:
                continue
            slots = klass.__dict__.get("__slots__", ())
            if isinstance(slots, str):
                slots = (slots,)
            for name in slots:
                if name in ("__weakref__", "__dict__"):
                    continue
                if name.startswith("__") and not name.endswith("__"):
                    name = f"_{klass.__name__.lstrip('_')}{name}"
                found.append(name)
        names = _slot_names[cls] = tuple(found)
    return names


def _reconstruct(cls: Any) -> Any:
    return cls.__new__(cls)


class Persistent(PersistentObject):
    """The usual persistent base class: the state is the instance ``__dict__``."""

    def __getstate__(self) -> Any:
        if _getattribute(self, "_p_status") == GHOST:
            self._p_load_state()
        return _getattribute(self, "__dict__")

    def __setstate__(self, state: Any) -> None:
        own = _getattribute(self, "__dict__")
        own.clear()
        if state:
            # Interned names, as attribute assignment makes them: the
            # interpreter's fast attribute reads compare names by identity.
            for key, value in state.items():
                own[_intern(key) if type(key) is str else key] = value


class ComputedAttribute(PersistentObject):
    """A cached value computed from other persistent objects.

    It stores no state, but has an oid: calling :meth:`invalidate` in one
    connection makes every other connection forget its cached value too.
    """

    __slots__ = ("value",)

    def __getstate__(self) -> Any:
        return None

    def _p_load_state(self) -> None:
        # There is no stored state to read.
        _setattribute(self, "_p_status", SAVED)

    def invalidate(self) -> None:
        """Forget the value here and, after commit, in every connection."""
        self.__setstate__(None)
        self._p_note_change()

    def get(self, compute: Callable[[], Any]) -> Any:
        """Return the cached value, calling ``compute()`` when there is none."""
        if _has_attribute(self, "value"):
            return _getattribute(self, "value")
        value = compute()
        # Setting the slot directly keeps the object saved.
        _setattribute(self, "value", value)
        return value
