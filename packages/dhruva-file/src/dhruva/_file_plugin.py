"""The plugin of dhruva-file: registers its file storages, recognizes their files,
and adds the ``dhruva history`` and ``dhruva restore`` commands.

The kinds are ``file`` (FileStorage: a new file in dhruva's checked format
"DHRUVA1", see :mod:`dhruva.checked_file`; an existing DHRUVA1 or SHELF-1 file
in its own), ``shelf`` (FileStorage, a new file in Durus's "SHELF-1") and
``file2`` (FileStorage2, "DFS20"); all take the option ``at`` (a position,
read-only; see :mod:`dhruva.file_history`), and ``file`` takes ``format``.
The storages themselves are imported only when a file is opened.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from dhruva.hookspecs import hookimpl
from dhruva.registry import StorageKind, StorageRegistry
from dhruva.storage import Storage

if TYPE_CHECKING:
    import click

#: The first bytes of a FileStorage ("SHELF-1") file.
SHELF_PREFIX = b"SHELF-1"

#: The first bytes of a FileStorage2 ("DFS20") file.
DFS20_PREFIX = b"DFS20"

#: The first bytes of a file in dhruva's checked format ("DHRUVA1").
DHRUVA1_PREFIX = b"DHRUVA1\n"


def _no_options(kind: str, options: dict[str, Any]) -> None:
    if options:
        names = ", ".join(sorted(options))
        raise TypeError(f"the {kind} storage takes no options {names}")


def _open_file(
    path: str | os.PathLike[str] | None,
    *,
    readonly: bool = False,
    repair: bool = False,
    at: int | None = None,
    format: str | None = None,
    **options: Any,
) -> Storage:
    from dhruva.file_storage import FileStorage

    _no_options("file", options)
    return FileStorage(path, readonly=readonly, repair=repair, at=at, format=format)


def _open_shelf(
    path: str | os.PathLike[str] | None,
    *,
    readonly: bool = False,
    repair: bool = False,
    at: int | None = None,
    **options: Any,
) -> Storage:
    _no_options("shelf", options)
    return _open_file(path, readonly=readonly, repair=repair, at=at, format="durus")


def _open_file2(
    path: str | os.PathLike[str] | None,
    *,
    readonly: bool = False,
    repair: bool = False,
    at: int | None = None,
    **options: Any,
) -> Storage:
    from dhruva.file_storage2 import FileStorage2

    _no_options("file2", options)
    return FileStorage2(path, readonly=readonly, repair=repair, at=at)


@hookimpl
def dhruva_register_storages(registry: StorageRegistry) -> None:
    registry.add(
        StorageKind(
            name="file",
            open=_open_file,
            description=(
                "one append-only file; new files in dhruva's checksummed DHRUVA1 "
                "format (format=durus: Durus's SHELF-1), existing ones in theirs"
            ),
            file_based=True,
            distribution="dhruva-file",
        )
    )
    registry.add(
        StorageKind(
            name="shelf",
            open=_open_shelf,
            description="one append-only file in Durus's SHELF-1 format",
            file_based=True,
            distribution="dhruva-file",
        )
    )
    registry.add(
        StorageKind(
            name="file2",
            open=_open_file2,
            description="one file in Durus's FileStorage2 (DFS20) format",
            file_based=True,
            distribution="dhruva-file",
        )
    )


@hookimpl
def dhruva_recognize_storage(path: str, header: bytes) -> str | None:
    if header.startswith(SHELF_PREFIX) or header.startswith(DHRUVA1_PREFIX):
        return "file"
    if header.startswith(DFS20_PREFIX):
        return "file2"
    return None


@hookimpl(specname="dhruva_recognize_storage", trylast=True)
def recognize_damaged_file(path: str, header: bytes) -> str | None:
    """Hand a file of ours cut short or with a damaged header to its storage,
    which says what is wrong; asked after every plugin's own recognizer, so
    that another format's header near ours is still that format's."""
    damaged = _damaged_header(header)
    if damaged is None:
        return None
    return "file2" if damaged == "DFS20" else "file"


def _damaged_header(header: bytes) -> str | None:
    """Return the layout whose header ``header`` is a cut-short start of (two
    bytes at least: b"S" may as well be SQLite's) or one or two bytes off."""
    for name, magic in (
        ("DHRUVA1", DHRUVA1_PREFIX),
        ("SHELF-1", SHELF_PREFIX),
        ("DFS20", DFS20_PREFIX),
    ):
        if len(header) < len(magic):
            if header and magic.startswith(header) and header != b"S":
                return name
        elif sum(a != b for a, b in zip(header, magic, strict=False)) <= 2:
            return name
    return None


# --- command line -------------------------------------------------------------


def make_history_commands() -> list[click.Command]:
    """Return the ``history`` and ``restore`` commands; imports happen here."""
    import datetime

    import click
    from dhruva.cli_options import library_errors

    @click.command("history")
    @click.argument("file", type=click.Path(dir_okay=False))
    def history_command(file: str) -> None:
        """List the commits a FileStorage or FileStorage2 file still holds.

        Each line is a point in time: its position (give it to `dhruva
        restore --at`), and the number of objects written there. The first
        line, the base, is what the last pack (or the file's creation) kept;
        the commits before it are gone. Files in dhruva's own format show when
        each commit was made (UTC); Durus's formats record no times. A file
        that ends in an incomplete transaction (a crash during a commit) says
        so after the list, with its byte offset and how to repair it.
        """
        from dhruva.file_history import describe_damage, read_history

        with library_errors(f"reading the history of {file}"):
            history = read_history(file)
        spans = history.spans
        kind = history.kind.__name__
        click.echo(f"{file}: {kind}, {len(spans) - 1} commits since the base")
        if all(span.time is None for span in spans):
            click.echo("(this format records no commit times)")
        click.echo(f"{'#':>6}  {'position':>12}  {'objects':>8}  time")
        for number, span in enumerate(spans):
            label = "base" if number == 0 else str(number)
            when = "-"
            if span.time is not None:
                moment = datetime.datetime.fromtimestamp(span.time, datetime.UTC)
                when = moment.isoformat(sep=" ", timespec="microseconds")
            click.echo(f"{label:>6}  {span.end:>12}  {span.records:>8}  {when}")
        if history.damage is not None:
            click.echo(describe_damage(file, history.damage))

    @click.command("restore")
    @click.argument("file", type=click.Path(dir_okay=False))
    @click.option(
        "--at",
        "at",
        type=click.IntRange(min=0),
        required=True,
        metavar="POSITION",
        help="The point in time: a position that `dhruva history FILE` lists.",
    )
    @click.option(
        "--output",
        type=click.Path(dir_okay=False),
        required=True,
        metavar="NEW",
        help="The database file to write; FILE itself is never changed.",
    )
    @click.option(
        "--force",
        is_flag=True,
        default=False,
        help="Replace NEW if it exists.",
    )
    def restore_command(file: str, at: int, output: str, force: bool) -> None:
        """Write the database FILE held at a point in time to a new file."""
        from dhruva.file_history import restore

        with library_errors(f"restoring {file} at position {at}"):
            number, span = restore(file, at, output, force=force)
        which = "the base" if number == 0 else f"commit {number}"
        click.echo(
            f"wrote {output}: {file} as of position {span.end} ({which}); "
            f"{file} is unchanged"
        )

    return [history_command, restore_command]


@hookimpl
def dhruva_register_commands(cli: click.Group) -> None:
    for command in make_history_commands():
        cli.add_command(command)
