"""Serializers: what turns a persistent object's state into record data.

Three are built in and registered through the ``dhruva_register_serializers``
hook like any plugin's: ``pickle`` (the default; Durus-compatible records, see
:mod:`dhruva.serialize`), ``msgspec`` (exact types, loads without running code,
see :mod:`dhruva.msgspec_serializer`) and ``dill`` (functions and closures, see
:mod:`dhruva.dill_serializer`).

Record data written by any serializer but pickle is *tagged*::

    b"\\0" NAME b"\\0" MODULE ":" QUALNAME b"\\0" PAYLOAD

No pickle starts with a zero byte (every pickle opcode is a printable character
or ``\\x80``-``\\x98``), so one database can hold records of several
serializers and each record is read by the one that wrote it, whatever the
connection writes with. The class name in the header lets tools (census,
``dhruva migrate``) name a record's class without the serializer installed.

A connection resolves serializers once, by name, through the plugins
(:func:`resolve_serializer`); records are then read and written without any
hook call.

Classes are found by :class:`LoadPolicy`: a rename table (old ``module.Class``
to new), an opt-in restricted mode for pickle records, and
:func:`find_loaded_class`, which finds persistent classes already defined in the
process without importing anything.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dhruva.broken import BROKEN_TYPES
from dhruva.error import StorageError
from dhruva.persistent import GHOST_CLASS_MARK, PersistentBase

if TYPE_CHECKING:
    from dhruva.connection import Connection
    from dhruva.plugins import Plugins

log = logging.getLogger(__name__)

#: The first byte of every tagged record's data.
TAG_START = b"\0"

#: The serializer a connection writes with when none is named.
DEFAULT_SERIALIZER = "pickle"

#: How to install the library of each of dhruva's own serializers.
INSTALL_COMMANDS = {
    "msgspec": "pip install 'dhruva-core[msgspec]'",
    "dill": "pip install 'dhruva-core[dill]'",
}


class SerializationError(StorageError):
    """An object cannot be written, or record data cannot be read."""


class MissingSerializerError(SerializationError):
    """A serializer, or the library it needs, is not installed."""


class RestrictedLoadError(SerializationError):
    """Restricted mode refused to load a class or a record."""


def make_tag(name: str) -> bytes:
    """Return the data prefix of records written by serializer ``name``."""
    if not name or "\0" in name or not name.isascii():
        raise ValueError(f"a serializer name must be plain ASCII, not {name!r}")
    return TAG_START + name.encode("ascii") + TAG_START


def split_tagged(data: bytes) -> tuple[str, str, bytes]:
    """Split tagged record data into ``(serializer, class name, payload)``.

    The class name is ``module:qualname``.

    :raises SerializationError: when the header is cut short.
    """
    end_name = data.find(b"\0", 1)
    end_class = data.find(b"\0", end_name + 1) if end_name > 0 else -1
    if end_class < 0:
        raise SerializationError(
            f"record data starts with {data[:24]!r}: a tagged record header "
            "that is cut short; the record is damaged"
        )
    return (
        data[1:end_name].decode("ascii", "replace"),
        data[end_name + 1 : end_class].decode("utf-8", "replace"),
        data[end_class + 1 :],
    )


def tagged_serializer_name(data: bytes) -> str | None:
    """Return the serializer named by ``data``'s tag, or None for pickle data."""
    if data[:1] != TAG_START:
        return None
    end = data.find(b"\0", 1)
    return data[1:end].decode("ascii", "replace") if end > 0 else "?"


def class_name(cls: type) -> str:
    """Return ``module:qualname``, the form tagged records name classes in.

    A placeholder for a missing class is named as the class it stands for.
    """
    if cls in BROKEN_TYPES:
        return f"{cls.broken_module}:{cls.broken_qualname}"  # type: ignore[attr-defined]
    return f"{cls.__module__}:{cls.__qualname__}"


def dotted(name: str) -> str:
    """Return ``module.qualname`` for ``module:qualname`` (used in messages)."""
    return name.replace(":", ".", 1)


# --- the serializer interface ------------------------------------------------


class RecordWriter(Protocol):
    """Writes the records of one commit (see :class:`BaseWriter`)."""

    new_objects: list[PersistentBase]

    def get_state(self, obj: PersistentBase) -> tuple[bytes, bytes]: ...

    def close(self) -> None: ...


class RecordReader(Protocol):
    """Reads tagged record data of one serializer for one connection."""

    def get_class(self, data: bytes) -> type[Any]: ...

    def get_state(self, data: bytes) -> Any: ...


class Serializer:
    """One serializer: a name, its record tag, and its readers and writers.

    Subclasses implement :meth:`new_writer` and :meth:`new_reader`.
    """

    #: The name users give (``Connection(serializer=...)``, ``--serializer``).
    name = ""
    #: One line for ``dhruva plugins``.
    description = ""

    @property
    def tag(self) -> bytes:
        """The prefix of this serializer's record data (empty for pickle)."""
        return make_tag(self.name)

    def new_writer(self, connection: Connection) -> RecordWriter:
        """Return a writer for one commit of ``connection``."""
        raise NotImplementedError

    def new_reader(self, connection: Connection) -> RecordReader:
        """Return a reader of this serializer's records for ``connection``."""
        raise NotImplementedError


def resolve_serializer(
    name: str | Serializer, plugins: Plugins | None = None
) -> Serializer:
    """Return the serializer registered as ``name`` (once per connection).

    :raises PluginError: when no serializer has that name, listing those
        installed.
    :raises MissingSerializerError: when its library is not installed, with the
        install command.
    """
    if isinstance(name, Serializer):
        return name
    if name == DEFAULT_SERIALIZER:
        from dhruva.serialize import PickleSerializer

        return PickleSerializer()

    from dhruva.plugins import get_plugins
    from dhruva.registry import PluginError

    registry = (plugins or get_plugins()).serializers
    if name not in registry:
        if name in INSTALL_COMMANDS:
            raise MissingSerializerError(
                f"serializer {name!r} is not registered; install it: "
                f"{INSTALL_COMMANDS[name]}"
            )
        raise PluginError(
            f"no serializer called {name!r} is installed; installed: "
            f"{', '.join(registry.names()) or 'none'}. A record written by it "
            "needs the plugin that provides it"
        )
    serializer: Serializer = registry[name].factory()
    return serializer


def require_library(serializer: str, module: str) -> Any:
    """Import ``module`` for ``serializer``, or say how to install it.

    :raises MissingSerializerError: naming the serializer and the install command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        install = INSTALL_COMMANDS.get(serializer, f"pip install {module}")
        raise MissingSerializerError(
            f"serializer {serializer!r} needs the {module} library, which is not "
            f"installed: {install}"
        ) from error


# --- finding classes -----------------------------------------------------------

_loaded: dict[tuple[str, str], type] = {}


def _scan_persistent_classes() -> None:
    _loaded.clear()
    pending: list[type] = [PersistentBase]
    while pending:
        cls = pending.pop()
        sub: type
        for sub in type.__subclasses__(cls):
            if GHOST_CLASS_MARK in sub.__dict__:
                continue  # the ghost class of a persistent class
            _loaded[(sub.__module__, sub.__qualname__)] = sub
            pending.append(sub)


def find_loaded_class(module: str, qualname: str) -> type | None:
    """Return the persistent class ``module.qualname`` already defined, or None.

    Never imports anything: only subclasses of
    :class:`~dhruva.persistent.PersistentBase` that exist in the process are
    found (dhruva's own collection modules are imported as needed).
    """
    # A module already imported is where the class lives now (a class of the
    # same name left from a module imported earlier and dropped is stale).
    value: Any = sys.modules.get(module)
    if value is not None:
        for part in qualname.split("."):
            value = getattr(value, part, None)
        if isinstance(value, type) and issubclass(value, PersistentBase):
            return value
    key = (module, qualname)
    cls = _loaded.get(key)
    if cls is None or cls.__module__ != module or cls.__qualname__ != qualname:
        if module.startswith("dhruva."):
            from dhruva.serialize import durus_names

            durus_names()  # imports dhruva's collection modules
        _scan_persistent_classes()
        cls = _loaded.get(key)
    return cls


def split_name(name: str) -> tuple[str, str]:
    """Split ``module:qualname`` or ``module.Class`` into module and name."""
    if ":" in name:
        module, _, qualname = name.partition(":")
        return module, qualname
    module, _, qualname = name.rpartition(".")
    return module, qualname


@dataclass
class LoadPolicy:
    """How a connection finds the classes that records name.

    :param restricted: load pickle records in restricted mode: only persistent
        classes, dhruva's collections, a fixed set of safe builtins and
        ``allowed_classes``; anything else is refused, naming the class.
        dill records are refused whole (loading them can run code).
    :param allowed_classes: further classes restricted mode loads: class
        objects, or ``"module.Class"`` names (imported when first needed).
    :param renames: ``{"old.module.Class": "new.module.Class"}``, applied to
        every class name a record holds before it is looked up.
    """

    restricted: bool = False
    allowed_classes: Iterable[type | str] = ()
    renames: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.allowed_names: set[tuple[str, str]] = set()
        self.allowed: dict[tuple[str, str], type] = {}
        for item in self.allowed_classes:
            if isinstance(item, str):
                self.allowed_names.add(split_name(item))
            else:
                self.allowed[(item.__module__, item.__qualname__)] = item
        self._renames = {
            split_name(old): split_name(new) for old, new in self.renames.items()
        }

    @property
    def is_default(self) -> bool:
        """True when nothing differs from plain (Durus) loading."""
        return not (self.restricted or self.allowed or self.allowed_names) and (
            not self._renames
        )

    def rename(self, module: str, name: str) -> tuple[str, str]:
        """Return the ``(module, name)`` to look ``module.name`` up under."""
        return self._renames.get((module, name), (module, name))

    def find_allowed(self, module: str, name: str) -> type | None:
        """Return the application-named class ``module.name``, or None."""
        cls = self.allowed.get((module, name))
        if cls is None and (module, name) in self.allowed_names:
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                return None
            self.allowed[(module, name)] = cls
        return cls


#: The policy of a connection that was given none.
DEFAULT_POLICY = LoadPolicy()
