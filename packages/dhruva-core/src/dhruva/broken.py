"""Placeholders for persistent objects whose class cannot be found.

A record naming a class that no longer exists (a module removed, a class
renamed without a rename table entry) loads as an instance of a
:class:`BrokenPersistent` subclass named like the missing class, instead of
making every object that refers to it unloadable. The placeholder keeps the
state as loaded (:attr:`BrokenPersistent.broken_state`, for inspection) and
the record data it came from; it cannot be changed, and when it is stored
again (after ``_p_note_change()``) its record is written back byte for byte.

Limitations:

- A value of a missing class *inside* another object's state (not a
  persistent object of its own) also loads as a placeholder, so the object
  holding it can be read; but that object cannot be stored again while it
  holds the placeholder: the commit is refused, naming the class.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from dhruva.error import DhruvaError
from dhruva.persistent import Persistent, _getattribute, _setattribute

log = logging.getLogger(__name__)

__all__ = ["BrokenPersistent", "BrokenState", "broken_class", "is_broken"]


class BrokenObjectError(DhruvaError):
    """A placeholder for a missing class was changed or stored inside a state."""


class BrokenState:
    """What a reader returns for the record of a missing class.

    :param state: the state as loaded (references are live objects).
    :param data: the record data, written back unchanged.
    :param refs: the record's joined reference oids.
    """

    __slots__ = ("data", "refs", "state")

    def __init__(self, state: Any, data: bytes, refs: bytes) -> None:
        self.state = state
        self.data = data
        self.refs = refs


class BrokenPersistent(Persistent):
    """A stand-in for a persistent object whose class is missing."""

    #: ``module.Class`` named by the record.
    broken_name = ""
    #: The module and qualified name of the missing class.
    broken_module = ""
    broken_qualname = ""

    def __setstate__(self, state: Any) -> None:
        own = _getattribute(self, "__dict__")
        own.clear()
        if isinstance(state, BrokenState):
            own["broken_state"] = state.state
            own["_p_broken_record"] = (state.data, state.refs)
        elif state:
            own["broken_state"] = state

    def __getstate__(self) -> Any:
        return _getattribute(self, "__dict__").get("broken_state")

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: say why the attribute is not there.
        if name[:3] == "_p_" or name[:2] == "__":
            raise AttributeError(name)
        raise AttributeError(
            f"{self!r} is a broken placeholder: its class {self.broken_name} is "
            f"missing, so it has no attribute {name!r}. Its state as loaded is in "
            "obj.broken_state; make the class importable (or give a rename "
            "table) to load it as itself"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name[:3] == "_p_":
            _setattribute(self, name, value)
            return
        raise BrokenObjectError(
            f"{self!r} stands for the missing class {self.broken_name}; it cannot "
            "be changed. Make the class importable, or give a rename table"
        )

    def __repr__(self) -> str:
        return f"<broken {self.broken_name} {self._p_format_oid()}>"


_broken: dict[str, type[BrokenPersistent]] = {}

#: Every placeholder class made so far (membership tests by writers).
BROKEN_TYPES: set[type] = set()


def broken_class(module: str, name: str) -> type[BrokenPersistent]:
    """Return the placeholder class for the missing class ``module.name``."""
    full = f"{module}.{name}"
    cls = _broken.get(full)
    if cls is None:
        log.warning(
            "class %s cannot be found; its objects load as broken placeholders "
            "(make its module importable, or give a rename table)",
            full,
        )
        cls = type(
            name.rpartition(".")[2] or "Broken",
            (BrokenPersistent,),
            {
                "broken_name": full,
                "broken_module": module,
                "broken_qualname": name,
                "__module__": "dhruva.broken",
            },
        )
        _broken[full] = cls
        BROKEN_TYPES.add(cls)
    return cls


def find_class(module: str, name: str) -> type[Any]:
    """Return the class ``module.name``, or its placeholder when it is missing.

    Pickles name the class of a reference to a placeholder as a call of this
    function, so that they load again once the class is back; dhruva's
    unpicklers answer the call with their own class lookup.
    """
    try:
        value: Any = importlib.import_module(module)
        for part in name.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError):
        return broken_class(module, name)
    found: type[Any] = value
    return found


def is_broken(obj: object) -> bool:
    """Return True when ``obj`` is a placeholder for a missing class."""
    return obj.__class__ in BROKEN_TYPES


def broken_record(obj: Any) -> tuple[bytes, bytes]:
    """Return the ``(data, refs)`` a placeholder was loaded from.

    :raises BrokenObjectError: for a placeholder that is not a stored object
        of its own (a value inside another object's state).
    """
    record = _getattribute(obj, "__dict__").get("_p_broken_record")
    if record is None:
        raise BrokenObjectError(
            f"an object holds a placeholder for the missing class "
            f"{obj.broken_name} inside its state; it cannot be stored. Make the "
            "class importable, or give a rename table"
        )
    result: tuple[bytes, bytes] = record
    return result
