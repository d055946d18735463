"""The hook specifications every dhruva plugin implements a part of.

Plugins, the built-in ones included, are modules named by an entry point in the
``dhruva`` group. Hooks are for registration and lifecycle only: loading and
storing objects go through the :class:`~dhruva.storage.Storage` methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click
    from dhruva.registry import SerializerRegistry, StorageRegistry

hookspec = pluggy.HookspecMarker("dhruva")
hookimpl = pluggy.HookimplMarker("dhruva")


# --- registration -----------------------------------------------------------


@hookspec
def dhruva_register_storages(registry: StorageRegistry) -> None:
    """Add the storage kinds this plugin provides.

    :param registry: call ``registry.add(StorageKind(...))`` once per kind.
    :return: nothing; a name another plugin registered already is refused.

    Called once, when the plugin manager first lists the storages.
    """


@hookspec
def dhruva_register_serializers(registry: SerializerRegistry) -> None:
    """Add the serializers this plugin provides.

    :param registry: call ``registry.add(SerializerKind(...))`` once per
        serializer; its factory imports the serializer's library, not the hook.
    :return: nothing; a name another plugin registered already is refused.

    Called once, when the plugin manager first lists the serializers (a
    connection resolves its serializers by name once; records are never read
    or written through hooks).
    """


@hookspec(firstresult=True)
def dhruva_recognize_storage(path: str, header: bytes) -> str | None:
    """Name the storage kind that wrote a file, from its first bytes.

    :param path: the file's path, for plugins that look at its name too.
    :param header: up to the first 64 bytes of the file (empty for an empty file).
    :return: a registered storage name, or None when this plugin does not
        recognize the file. The first answer that is not None wins.

    Called when a file is opened without an explicit storage name.
    """


# --- command line -----------------------------------------------------------


@hookspec
def dhruva_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``dhruva`` command line.

    :param cli: the top-level click group; call ``cli.add_command(...)``.
    :return: nothing.

    Called once, when the command line starts, before it parses arguments.
    """
