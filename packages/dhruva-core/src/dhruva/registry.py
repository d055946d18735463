"""Typed registries that plugins fill through the registration hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from dhruva.error import DhruvaError


class PluginError(DhruvaError):
    """A plugin registered something wrongly, or a name is not registered."""


@dataclass(frozen=True)
class StorageKind:
    """One kind of storage a plugin offers.

    ``open`` is called as ``open(path, readonly=..., repair=..., **options)`` and
    returns a :class:`~dhruva.storage.Storage`. ``path`` is None for kinds that
    are not file based, and for a temporary file where the kind supports it.
    """

    #: The name users give with ``--storage``.
    name: str
    #: ``open(path, *, readonly, repair, **options) -> Storage``.
    open: Callable[..., Any]
    #: One line for ``dhruva plugins``.
    description: str = ""
    #: True when the storage keeps its data in a file named by a path.
    file_based: bool = True
    #: The distribution to install for it (for messages).
    distribution: str = ""
    #: File name endings (".sqlite") that ask for this kind when a new file is
    #: made without a kind name (``dhruva convert``); lower case, with the dot.
    suffixes: tuple[str, ...] = ()
    #: Set by the registry: the plugin that added this kind.
    plugin: str = field(default="", compare=False)


@dataclass(frozen=True)
class SerializerKind:
    """One serializer a plugin offers (see :mod:`dhruva.serializer`).

    ``factory()`` returns a :class:`~dhruva.serializer.Serializer`; it imports
    the serializer's library, and raises
    :class:`~dhruva.serializer.MissingSerializerError` (naming ``install``)
    when that is missing. Registering imports nothing.
    """

    #: The name users give with ``serializer=`` and ``--serializer``; records
    #: written by it are tagged with it.
    name: str
    #: ``factory() -> Serializer``.
    factory: Callable[[], Any]
    #: One line for ``dhruva plugins``.
    description: str = ""
    #: The command that installs what the serializer needs (for messages).
    install: str = ""
    #: Set by the registry: the plugin that added this serializer.
    plugin: str = field(default="", compare=False)


T = TypeVar("T", StorageKind, SerializerKind)


class _Registry(Generic[T]):
    what = "item"

    def __init__(self) -> None:
        self._items: dict[str, T] = {}
        #: Set by the plugin manager while it calls one plugin's hook.
        self.current_plugin = ""

    def add(self, item: T) -> None:
        """Register ``item``; a name that is taken already is refused."""
        existing = self._items.get(item.name)
        if existing is not None:
            raise PluginError(
                f"{self.what} {item.name!r} is registered twice: by plugin "
                f"{existing.plugin!r} and by plugin {self.current_plugin!r}; "
                "uninstall one of them"
            )
        object.__setattr__(item, "plugin", self.current_plugin)
        self._items[item.name] = item

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(sorted(self._items.values(), key=lambda item: item.name))

    def names(self) -> list[str]:
        return sorted(self._items)


class StorageRegistry(_Registry[StorageKind]):
    """The storage kinds, by name."""

    what = "storage"


class SerializerRegistry(_Registry[SerializerKind]):
    """The serializers, by name (records written by one are tagged with it)."""

    what = "serializer"

    def add(self, item: SerializerKind) -> None:
        """Register ``item``; a taken name, or one unfit for a tag, is refused."""
        name = item.name
        if not name or not name.isascii() or not name.isprintable():
            raise PluginError(
                f"plugin {self.current_plugin!r} registers a serializer named "
                f"{name!r}: names are printable ASCII (they tag the records)"
            )
        super().add(item)
