"""The pure-Python hot path of persistent objects.

:mod:`dhruva.persistent` imports :class:`PersistentBase` and
:class:`ConnectionBase` from a C accelerator when one is built, and from here
otherwise (``dhruva/_persistent.c``); both must behave the same. Only the
attribute hooks, the ghost classes and :meth:`PersistentBase._p_note_change`
live here, so that an accelerated version replaces exactly this module.

States (``_p_status``): ``UNSAVED`` (new or changed since the last commit),
``SAVED`` (the same as stored), ``GHOST`` (state not loaded; loaded on first
attribute access).

Design: by default, as in Durus, a persistent class has a ``__getattribute__``
hook (:meth:`PersistentBase.__getattribute__`) that loads a ghost and tells the
connection the first time a transaction reads the object
(``connection.note_access(obj)``).

A class made with ``fast_reads=True`` (see :mod:`dhruva.persistent`) keeps
instead Python's own attribute lookup, so that reading an attribute of a
loaded object costs what it costs on a plain object (the interpreter
specializes the lookup). What must happen on an access then happens in the
object's *ghost class*: a subclass made on demand for each fast_reads class
(:func:`_ghost_class`), with the same name and layout and nothing but a
``__getattribute__`` hook. A ghost, and a loaded object not read yet in the
current transaction, have the ghost class; the first access loads it if needed,
calls ``connection.note_access(obj)`` and gives it back its own class
(:func:`_touch`). At the end of a transaction the connection hands the
fast_reads objects read in it to :func:`_untouch_all`, so that the next
transaction sees their first access again. ``obj.__class__`` always answers the
persistent class; ``type(obj)`` answers the ghost class until the object is
first touched. For a default class, :func:`_ghost_class` answers the class
itself and :func:`_untouch` does nothing.
Writes keep a ``__setattr__`` hook on every persistent class (change tracking).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

UNSAVED = 1
SAVED = 0
GHOST = -1

_setattribute = object.__setattr__
_delattribute = object.__delattr__
_getattribute = object.__getattribute__

# Attributes that a ghost can answer without loading its state.
_GHOST_SAFE = frozenset({"__repr__", "__setstate__"})
# The same, for the hook of default classes.
_HOOK_SAFE = frozenset({"__class__", "__repr__", "__setstate__"})

#: Where a persistent class keeps its ghost class, and a ghost class its
#: persistent class (in their own ``__dict__``, never inherited).
GHOST_CLASS_KEY = "__dhruva_ghost_class__"
USER_CLASS_KEY = "__dhruva_user_class__"


# The generic lookup that fast_reads classes keep.
_GENERIC_LOOKUP = object.__dict__["__getattribute__"]


def init_subclass(cls: type, fast_reads: bool | None, default_hook: Any) -> None:
    """Set up the read mode of a new persistent class (both implementations).

    ``fast_reads`` is the class keyword (None: inherit the mode);
    ``default_hook`` the ``__getattribute__`` of the implementation's
    PersistentBase. A fast_reads class gets ``object.__getattribute__`` (the
    interpreter specializes its reads); a default subclass of a fast_reads
    class gets the hook back. A class with its own ``__getattribute__``, and a
    ghost class, keep theirs.
    """
    own = cls.__dict__
    if USER_CLASS_KEY in own:
        return  # a ghost class keeps its own hook
    if fast_reads is not None:
        type.__setattr__(cls, "_p_fast_reads", bool(fast_reads))
    if "__getattribute__" in own:
        return
    inherited = next(
        k.__dict__["__getattribute__"]
        for k in cls.__mro__[1:]
        if "__getattribute__" in k.__dict__
    )
    fast: Any = cls
    if fast._p_fast_reads:
        if inherited is default_hook:
            type.__setattr__(cls, "__getattribute__", _GENERIC_LOOKUP)
    elif inherited is _GENERIC_LOOKUP:
        type.__setattr__(cls, "__getattribute__", default_hook)


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
    """Slots and the change-tracking hook shared by every persistent object.

    ``_p_serial`` is the connection's transaction serial at the object's last
    first access in a transaction: it tells the connection which objects the
    current transaction read.
    """

    __slots__ = ("_p_status", "_p_serial", "_p_connection", "_p_oid")

    #: GHOST, SAVED or UNSAVED.
    _p_status: int
    #: The connection's transaction serial at the last first access.
    _p_serial: int
    #: The connection that loaded or stored this object, or None.
    _p_connection: Any
    #: The object id, or None before the first commit.
    _p_oid: Any
    #: True for a class made with ``fast_reads=True`` (see dhruva.persistent).
    _p_fast_reads: ClassVar[bool] = False

    def __init_subclass__(cls, fast_reads: bool | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init_subclass(cls, fast_reads, PersistentBase.__dict__["__getattribute__"])

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        instance = object.__new__(cls)
        _setattribute(instance, "_p_status", UNSAVED)
        _setattribute(instance, "_p_serial", 0)
        _setattribute(instance, "_p_connection", None)
        _setattribute(instance, "_p_oid", None)
        return instance

    def __getattribute__(self, name: str) -> Any:
        # The hook of default (not fast_reads) classes.
        if name[:3] != "_p_" and name not in _HOOK_SAFE:
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
        if USER_CLASS_KEY in type(self).__dict__:
            _touch(self)
        if _getattribute(self, "_p_status") != UNSAVED:
            _getattribute(self, "_p_set_status_unsaved")()
            connection = _getattribute(self, "_p_connection")
            if connection is not None:
                connection.note_change(self)


class GhostBase(PersistentBase):
    """The hook every ghost class adds: the first access touches the object."""

    __slots__ = ()

    def __getattribute__(self, name: str) -> Any:
        if name[:3] == "_p_" or name in _GHOST_SAFE:
            return _getattribute(self, name)
        if name == "__class__":
            return type(self).__dict__[USER_CLASS_KEY]
        _touch(self)
        return getattr(self, name)


def _touch(obj: Any) -> None:
    # Load a ghost, note the access, and give the object its own class back.
    cls = type(obj)
    if _getattribute(obj, "_p_status") == GHOST:
        _getattribute(obj, "_p_load_state")()
    connection = _getattribute(obj, "_p_connection")
    if (
        connection is not None
        and _getattribute(obj, "_p_serial") != connection.transaction_serial
    ):
        connection.note_access(obj)
    if type(obj) is cls:
        _setattribute(obj, "__class__", cls.__dict__[USER_CLASS_KEY])


def _ghost_class(cls: type, /) -> type:
    """Return the ghost class of the persistent class ``cls`` (made once)."""
    own = cls.__dict__
    if USER_CLASS_KEY in own:
        return cls
    ghost = own.get(GHOST_CLASS_KEY)
    if ghost is None:
        if not getattr(cls, "_p_fast_reads", False):
            if not issubclass(cls, PersistentBase):
                raise TypeError(f"{cls.__qualname__} is not a persistent class")
            return cls  # a default class: its ghosts have the class itself
        ghost = make_ghost_class(cls, GhostBase)
    return ghost  # type: ignore[no-any-return,unused-ignore]


def _class_identity(cls: Any) -> Any:
    if isinstance(cls, type):
        return cls.__dict__.get(USER_CLASS_KEY, cls)
    return cls


def _ghost_eq(cls: type, other: Any) -> bool:
    return _class_identity(cls) is _class_identity(other)


def _ghost_hash(cls: type) -> int:
    return type.__hash__(cls.__dict__[USER_CLASS_KEY])


def _ghost_call(cls: type, *args: Any, **kwargs: Any) -> Any:
    # type(obj)(...) of an object not touched yet makes an instance of its class.
    return cls.__dict__[USER_CLASS_KEY](*args, **kwargs)


# The metaclass of the ghost classes of each metaclass of persistent classes.
_ghost_metaclasses: dict[type, type] = {}


def make_ghost_class(cls: type, ghost_base: type) -> type:
    """Make and remember the ghost class of ``cls``, with hooks ``ghost_base``.

    Used by both implementations. The ghost class has the name, module and
    layout of ``cls``; its metaclass makes it compare and hash as ``cls``, so
    ``type(obj) == cls`` and lookups of ``type(obj)`` in sets and dicts keyed
    by classes answer as for ``cls`` (only ``type(obj) is cls`` does not), and
    calling it makes an instance of ``cls``.
    """
    meta: Any = type(cls)
    ghost_meta: Any = _ghost_metaclasses.get(meta)
    if ghost_meta is None:
        ghost_meta = type(meta)(
            meta.__name__,
            (meta,),
            {
                "__eq__": _ghost_eq,
                "__hash__": _ghost_hash,
                "__call__": _ghost_call,
                "__module__": __name__,
            },
        )
        _ghost_metaclasses[meta] = ghost_meta
    namespace = {
        "__slots__": (),
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "__getattribute__": ghost_base.__dict__["__getattribute__"],
        USER_CLASS_KEY: cls,
    }
    ghost: type = ghost_meta(cls.__name__, (cls, ghost_base), namespace)
    if ghost.__base__ is not cls:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} cannot have a ghost class: its "
            "layout does not allow it (is it a subclass of PersistentBase?)"
        )
    type.__setattr__(cls, GHOST_CLASS_KEY, ghost)
    return ghost


def _user_class(obj: Any, /) -> type:
    """Return the persistent class of ``obj``, whether it is touched or not."""
    cls = type(obj)
    user: type = cls.__dict__.get(USER_CLASS_KEY, cls)
    return user


def _untouch(obj: Any, /) -> None:
    """Give ``obj`` its ghost class: its next access is noted again."""
    cls = type(obj)
    if USER_CLASS_KEY not in cls.__dict__:
        ghost = _ghost_class(cls)
        if ghost is not cls:  # not a default class
            _setattribute(obj, "__class__", ghost)


def _untouch_all(objects: Iterable[Any], /) -> None:
    """:func:`_untouch` each object."""
    for obj in objects:
        _untouch(obj)


def _retouch(obj: Any, /) -> None:
    """Give ``obj`` its own class back without loading or noting anything."""
    cls = type(obj)
    user = cls.__dict__.get(USER_CLASS_KEY)
    if user is not None:
        _setattribute(obj, "__class__", user)


def _persistent_id_filter(func: Any, /) -> Any:
    """Return a callable that calls ``func(obj)`` only for persistent objects.

    (The C version saves a Python call per object; here ``func`` checks.)
    """
    return func


#: The C accelerator's descent of ``BTree.add``; dhruva.btree's own is used here.
_btree_add: Callable[[Any, Any, Any, Any], bool] | None = None
