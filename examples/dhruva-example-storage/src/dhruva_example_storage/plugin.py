"""The dhruva plugin of dhruva-example-storage.

The ``dhruva`` entry point in this distribution's ``pyproject.toml`` names
this module; dhruva loads it and calls the hooks below. Each hook imports
what it needs when called, so that loading the plugin costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dhruva.hookspecs import hookimpl

if TYPE_CHECKING:
    import click
    from dhruva.registry import StorageRegistry
    from dhruva.storage import Storage

#: Kept equal to snapshot_storage.MAGIC (a test checks), so that recognizing a
#: file does not import the storage module.
_MAGIC = b"DHRUVA-SNAPSHOT-1\n"


def open_snapshot(
    path: str | None, readonly: bool = False, repair: bool = False, **options: Any
) -> Storage:
    """The opener dhruva calls for ``--storage snapshot``."""
    from dhruva.error import StorageError

    if path is None:
        raise StorageError(
            "the snapshot storage keeps its data in a file: give a path with --file"
        )
    from dhruva_example_storage.snapshot_storage import SnapshotStorage

    return SnapshotStorage(path, readonly=readonly, repair=repair, **options)


@hookimpl
def dhruva_register_storages(registry: StorageRegistry) -> None:
    from dhruva.registry import StorageKind

    registry.add(
        StorageKind(
            name="snapshot",
            open=open_snapshot,
            description="the whole database in one file, rewritten at each commit",
            file_based=True,
            distribution="dhruva-example-storage",
        )
    )


@hookimpl
def dhruva_recognize_storage(path: str, header: bytes) -> str | None:
    return "snapshot" if header.startswith(_MAGIC) else None


@hookimpl
def dhruva_register_commands(cli: click.Group) -> None:
    import click

    @click.command("snapshot-info")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False))
    def snapshot_info(file: str) -> None:
        """Show the records and the next oid of a snapshot file."""
        from dhruva.error import DhruvaError

        from dhruva_example_storage.snapshot_storage import SnapshotStorage

        try:
            storage = SnapshotStorage(file, readonly=True)
        except DhruvaError as e:
            raise click.ClickException(str(e)) from e
        with storage:
            size = storage.get_size()
            next_oid = storage.next_oid
        click.echo(f"{file}: {size} records, next oid {next_oid}")

    cli.add_command(snapshot_info)
