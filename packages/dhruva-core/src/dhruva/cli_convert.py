"""``dhruva convert SRC DST``: copy a database into a new storage of any kind.

The source is opened read-only with the kind recognized from its first bytes
(or ``--from-storage``). The destination gets ``--storage``; without it, the
kind whose plugin claims DST's file name ending (``.sqlite``, ``.sqlite3``
and ``.db`` are SQLite's), or ``file`` for any other name. An ending claimed by
several kinds, or known to belong to a kind that is not installed, is refused
with a message asking for ``--storage``. DST must not exist, or be an empty
file. Progress goes to stderr as a
bar when stderr is a terminal, and nothing when it is piped; the summary goes
to stdout. A conversion that fails removes what it wrote.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

import click
from dhruva.cli_options import _check_storage_name, cli_plugins, library_errors
from dhruva.plugins import DEFAULT_STORAGE, KNOWN_STORAGES, Plugins
from dhruva.verify import refuse_damage_in_the_middle

log = logging.getLogger(__name__)

#: Files that storages keep next to a database file.
_SIDE_FILES = (".lock", "-wal", "-shm", "-journal")

#: Endings of dhruva's own kinds, for a message when their plugin is missing.
_KNOWN_SUFFIXES = {".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}


def kind_for_new_file(plugins: Plugins, path: str) -> str:
    """Choose the storage kind of a new file from the ending of its name.

    :return: the one kind whose plugin claims the ending, or
        :data:`~dhruva.plugins.DEFAULT_STORAGE` when none does.
    :raises click.ClickException: when several kinds claim it, or when it
        belongs to one of dhruva's kinds whose distribution is not installed.
    """
    suffix = os.path.splitext(path)[1].lower()
    if not suffix:
        return DEFAULT_STORAGE
    claiming = sorted(kind.name for kind in plugins.storages if suffix in kind.suffixes)
    if len(claiming) == 1:
        return claiming[0]
    if claiming:
        raise click.ClickException(
            f"{path} ends in {suffix}, which the storage kinds "
            f"{', '.join(claiming)} all claim; pass --storage NAME to choose"
        )
    known = _KNOWN_SUFFIXES.get(suffix)
    if known is not None:
        raise click.ClickException(
            f"{path} ends in {suffix}, the ending of {known} databases, but no "
            f"installed plugin provides the {known} storage: install "
            f"{KNOWN_STORAGES[known]} (`pip install {KNOWN_STORAGES[known]}`), or "
            "pass --storage NAME to write another kind under that name"
        )
    return DEFAULT_STORAGE


@contextlib.contextmanager
def _progress(total: int | None, label: str) -> Iterator[Callable[[int], None]]:
    """Yield a progress callback: a bar on a terminal, silence otherwise."""
    if total is None or not sys.stderr.isatty():
        yield lambda _n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update
        # Unreachable records are not copied: the bar ends full all the same.
        bar.update(max(0, total - bar.pos))


def _refuse_existing(src: str, dst: str) -> None:
    if not os.path.exists(dst):
        return
    if os.path.exists(src) and os.path.samefile(src, dst):
        raise click.ClickException(
            f"{dst} is the source itself; convert writes a new database: give "
            "another DST"
        )
    size = os.path.getsize(dst)
    if size:
        raise click.ClickException(
            f"{dst} exists and is not empty ({size} bytes); convert writes a new "
            "database only: choose another DST, or remove it first"
        )


def _remove_partial(dst: str, existed: set[str]) -> None:
    """Remove what a failed conversion wrote at ``dst`` and beside it."""
    for path in (dst, *(dst + suffix for suffix in _SIDE_FILES)):
        if path not in existed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    log.info("removed the partial conversion %s", dst)


@click.command("convert")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option(
    "--storage",
    "storage",
    metavar="NAME",
    default=None,
    callback=_check_storage_name,
    help="Storage kind of DST (see `dhruva plugins`) [default: from DST's "
    f"ending, .sqlite/.sqlite3/.db for sqlite; {DEFAULT_STORAGE} otherwise].",
)
@click.option(
    "--from-storage",
    "from_storage",
    metavar="NAME",
    default=None,
    callback=_check_storage_name,
    help="Storage kind of SRC; by default it is recognized from the file.",
)
@click.pass_context
def convert_command(
    ctx: click.Context,
    src: str,
    dst: str,
    storage: str | None,
    from_storage: str | None,
) -> None:
    """Copy every object reachable from the root of SRC into a new DST.

    Any two storage kinds work: Durus files to dhruva, file to sqlite, sqlite
    to file, file2 to file... Records are copied as they are, under the same
    oids; DST takes new commits right away, and never hands out an oid SRC
    handed out (where both storages tell and take their oid counter). SRC is
    only read. Without --storage, DST's kind comes from its name: .sqlite,
    .sqlite3 and .db make a SQLite database, other names a dhruva file.
    """
    from dhruva.convert import copy_reachable

    plugins = cli_plugins(ctx)
    with library_errors("choosing the destination"):
        kind = storage or kind_for_new_file(plugins, dst)
        if not plugins.get_storage_kind(kind).file_based:
            raise click.ClickException(
                f"the {kind} storage keeps no file, so DST would be lost when "
                "the command ends; give --storage a kind that writes a file "
                "(see `dhruva plugins`)"
            )
    _refuse_existing(src, dst)
    existed = {p for p in (dst, *(dst + s for s in _SIDE_FILES)) if os.path.exists(p)}

    with library_errors(f"cannot open {src}", src, readonly_option=False):
        source = plugins.open_storage(src, from_storage, readonly=True)
        try:
            refuse_damage_in_the_middle(
                source,
                src,
                "a conversion would copy only the database as it was before it, "
                "so none is made",
            )
        except BaseException:
            source.close()
            raise
    try:
        with library_errors(f"cannot create {dst}"):
            destination = plugins.open_storage(dst, kind)
        try:
            with (
                library_errors(f"converting {src} to {dst}"),
                _progress(source.get_size(), f"copying {src}") as progress,
            ):
                result = copy_reachable(source, destination, progress=progress)
        except BaseException:
            destination.close()
            _remove_partial(dst, existed)
            raise
        with library_errors(f"closing {dst}"):
            destination.close()
    finally:
        source.close()
    click.echo(
        f"converted {src} to {dst} ({kind}): {result.records} objects, "
        f"{result.size} bytes"
    )
