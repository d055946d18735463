"""The pure-Python hot path of persistent objects.

:mod:`dhruva.persistent` imports :class:`PersistentBase` and
:class:`ConnectionBase` from a C accelerator when one is built, and from here
otherwise (``dhruva/_persistent.c``); both must behave the same. Only the
attribute hooks and :meth:`PersistentBase._p_note_change` live here, so that
an accelerated version replaces exactly this module.

States (``_p_status``): ``UNSAVED`` (new or changed since the last commit),
``SAVED`` (the same as stored), ``GHOST`` (state not loaded; loaded on first
attribute access).
"""

from __future__ import annotations

from typing import Any

UNSAVED = 1
SAVED = 0
GHOST = -1

_setattribute = object.__setattr__
_delattribute = object.__delattr__
_getattribute = object.__getattribute__

# Attributes that a ghost can answer without loading its state.
_GHOST_SAFE = frozenset({"__class__", "__repr__", "__setstate__"})


class ConnectionBase:
    """The part of a Connection that persistent objects touch on every access."""

    __slots__ = ("transaction_serial",)

    #: Counts commits and aborts; objects stamp it on access.
    transaction_serial: int

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        instance = object.__new__(cls)
        instance.transaction_serial = 1
        return instance


class PersistentBase:
    """Slots and attribute hooks shared by every persistent object.

    ``_p_serial`` is the connection's transaction serial at the object's last
    access: it tells the connection which objects the current transaction read.
    """

    __slots__ = ("_p_status", "_p_serial", "_p_connection", "_p_oid")

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        instance = object.__new__(cls)
        _setattribute(instance, "_p_status", UNSAVED)
        _setattribute(instance, "_p_serial", 0)
        _setattribute(instance, "_p_connection", None)
        _setattribute(instance, "_p_oid", None)
        return instance

    def __getattribute__(self, name: str) -> Any:
        if name[:3] != "_p_" and name not in _GHOST_SAFE:
            if _getattribute(self, "_p_status") == GHOST:
                _getattribute(self, "_p_load_state")()
            connection = _getattribute(self, "_p_connection")
            if (
                connection is not None
                and _getattribute(self, "_p_serial") != connection.transaction_serial
            ):
                connection.note_access(self)
        return _getattribute(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name[:3] != "_p_":
            _getattribute(self, "_p_note_change")()
        _setattribute(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name[:3] != "_p_":
            _getattribute(self, "_p_note_change")()
        _delattribute(self, name)

    def _p_note_change(self) -> None:
        """Mark this object changed, so the next commit stores it."""
        if _getattribute(self, "_p_status") != UNSAVED:
            _getattribute(self, "_p_set_status_unsaved")()
            connection = _getattribute(self, "_p_connection")
            if connection is not None:
                connection.note_change(self)
