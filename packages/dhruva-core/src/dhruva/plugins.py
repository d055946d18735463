"""The plugin manager and a typed facade over its hooks.

Nothing is loaded at import time: :func:`get_plugin_manager` returns a fresh
manager, :func:`load_plugins` loads the ``dhruva`` entry points, and
:class:`Plugins` wraps the (untyped) hook calls in typed methods.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import TYPE_CHECKING, Any

import pluggy
from dhruva import hookspecs
from dhruva.registry import PluginError, SerializerRegistry, StorageRegistry

if TYPE_CHECKING:
    import click
    from dhruva.registry import StorageKind
    from dhruva.storage import Storage

log = logging.getLogger(__name__)

#: The entry-point group (and pluggy project name) of dhruva plugins.
GROUP = "dhruva"

#: The storage kind a new file gets when none is named.
DEFAULT_STORAGE = "file"

#: Storage kinds of dhruva's own distributions, for "install this" messages.
KNOWN_STORAGES = {
    "file": "dhruva-file",
    "file2": "dhruva-file",
    "shelf": "dhruva-file",
    "sqlite": "dhruva-sqlite",
}

#: File headers of those kinds, for files no installed plugin recognizes.
KNOWN_HEADERS = {
    b"DHRUVA1\n": "file",
    b"SHELF-1": "file",
    b"DFS20": "file2",
    b"SQLite format 3\0": "sqlite",
}


def get_plugin_manager() -> pluggy.PluginManager:
    """Return a new plugin manager that knows the hook specs, with no plugins."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


def load_plugins(pm: pluggy.PluginManager) -> pluggy.PluginManager:
    """Load every installed ``dhruva`` entry point into ``pm`` and check them."""
    pm.load_setuptools_entrypoints(GROUP)
    pm.check_pending()
    return pm


class Plugins:
    """Typed access to what the installed plugins provide."""

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        self.pm = pm if pm is not None else load_plugins(get_plugin_manager())
        self._storages: StorageRegistry | None = None
        self._serializers: SerializerRegistry | None = None

    def _fill(self, registry: Any, hook_name: str) -> None:
        # Call each plugin's hook in turn so the registry knows who adds what.
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            registry.current_plugin = self.pm.get_name(impl.plugin) or "?"
            impl.function(registry=registry)
        registry.current_plugin = ""

    @property
    def storages(self) -> StorageRegistry:
        """The registered storage kinds."""
        if self._storages is None:
            registry = StorageRegistry()
            self._fill(registry, "dhruva_register_storages")
            self._storages = registry
        return self._storages

    @property
    def serializers(self) -> SerializerRegistry:
        """The registered serializers."""
        if self._serializers is None:
            registry = SerializerRegistry()
            self._fill(registry, "dhruva_register_serializers")
            self._serializers = registry
        return self._serializers

    def plugin_names(self) -> list[str]:
        """Return the names of the loaded plugins."""
        return sorted(
            name for name, _plugin in self.pm.list_name_plugin() if name is not None
        )

    def get_storage_kind(self, name: str) -> StorageKind:
        """Return the storage kind called ``name``.

        :raises PluginError: naming the installed kinds and the closest match.
        """
        if name in self.storages:
            return self.storages[name]
        names = self.storages.names()
        if name in KNOWN_STORAGES:
            package = KNOWN_STORAGES[name]
            raise PluginError(
                f"storage {name!r} comes with {package}, which is not installed: "
                f"pip install {package} (installed storages: {', '.join(names)})"
            )
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PluginError(
            f"no storage called {name!r} is installed; installed: "
            f"{', '.join(names) or 'none'}{hint}"
        )

    def recognize(self, path: str) -> str | None:
        """Name the storage kind of the file at ``path`` from its first bytes.

        :return: the kind's name, or None for a missing or empty file.
        :raises PluginError: when the file exists but no plugin knows it.
        """
        try:
            with open(path, "rb") as f:
                header = f.read(64)
        except FileNotFoundError:
            return None
        if not header:
            return None
        name = self.pm.hook.dhruva_recognize_storage(path=path, header=header)
        if name is None:
            for start, known in KNOWN_HEADERS.items():
                if header.startswith(start):
                    return known  # get_storage_kind names the package
        if name is None:
            raise PluginError(
                f"{path} is not a database any installed storage recognizes "
                f"(it starts with {header[:16]!r}); installed storages: "
                f"{', '.join(self.storages.names())}. If it is a dhruva "
                "database of another kind, install the plugin for it"
            )
        return str(name)

    def open_storage(
        self,
        path: str | os.PathLike[str] | None,
        storage: str | None = None,
        *,
        readonly: bool = False,
        repair: bool = False,
        **options: Any,
    ) -> Storage:
        """Open a storage: by kind name, or recognized from the file's bytes.

        A missing or empty file without a kind name gets :data:`DEFAULT_STORAGE`.
        """
        text_path = os.fspath(path) if path is not None else None
        name = storage
        if name is None and text_path is not None:
            name = self.recognize(text_path)
        if name is None:
            name = DEFAULT_STORAGE
        kind = self.get_storage_kind(name)
        log.debug("opening %s with storage %r", text_path, name)
        result: Storage = kind.open(
            text_path, readonly=readonly, repair=repair, **options
        )
        return result

    def register_commands(self, cli: click.Group) -> None:
        """Let every plugin add its subcommands to ``cli``."""
        self.pm.hook.dhruva_register_commands(cli=cli)


_default: Plugins | None = None


def get_plugins() -> Plugins:
    """Return the process-wide :class:`Plugins`, loading entry points once."""
    global _default
    if _default is None:
        _default = Plugins()
    return _default


def open_storage(
    path: str | os.PathLike[str] | None,
    storage: str | None = None,
    **options: Any,
) -> Storage:
    """Open a storage through the installed plugins (see Plugins.open_storage)."""
    return get_plugins().open_storage(path, storage, **options)


__all__ = [
    "GROUP",
    "PluginError",
    "Plugins",
    "get_plugin_manager",
    "get_plugins",
    "load_plugins",
    "open_storage",
]
