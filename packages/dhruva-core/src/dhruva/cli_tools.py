"""``dhruva verify``, ``dhruva info`` and ``dhruva backup``: checking a database,
describing it, and copying it while it is in use.

::

    dhruva verify test.durus             # exit status 0: sound, 1: not
    dhruva verify --port 2972 --json     # the database a server holds
    dhruva info test.durus --json        # format, size, commits, census
    dhruva backup test.durus copy.durus  # again later: appends what is new
    dhruva backup --port 2972 copy.durus # through a server

Progress goes to stderr as a bar when stderr is a terminal, and nothing when
it is piped; results go to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import click
from dhruva.cli_options import (
    _check_storage_name,
    address_options,
    cli_plugins,
    client_security,
    client_security_options,
    describe_address,
    held_library_logs,
    library_errors,
    make_address,
    open_client_storage,
    open_file_storage,
)
from dhruva.storage import Storage

log = logging.getLogger(__name__)

_json_option = click.option(
    "--json", "as_json", is_flag=True, default=False, help="Print JSON."
)


def _storage_option(help_text: str) -> Any:
    return click.option(
        "--storage",
        "storage",
        metavar="NAME",
        default=None,
        callback=_check_storage_name,
        help=help_text,
    )


class ProgressBar:
    """A progress callback ``(advance, total)``: a bar on a terminal only.

    :param label: shown before the bar.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: Any = None
        self._shown = sys.stderr.isatty()

    def __call__(self, advance: int, total: int) -> None:
        if not self._shown:
            return
        if self._bar is None:
            self._bar = click.progressbar(
                length=max(total, 1), label=self.label, file=sys.stderr
            )
            self._bar.__enter__()
        self._bar.length = max(total, self._bar.length)
        self._bar.update(advance)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, error, traceback)


class Spinner:
    """A turning mark and a label on stderr while something runs; a terminal only.

    For work whose progress cannot be measured, such as a pack run by a
    server: the line is cleared when the work ends.

    :param label: what is being done.
    :param interval: seconds between two frames.
    """

    _FRAMES = "|/-\\"

    def __init__(self, label: str, interval: float = 0.1) -> None:
        self.label = label
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spin(self) -> None:
        frame = 0
        while True:
            mark = self._FRAMES[frame % len(self._FRAMES)]
            click.echo(f"\r{mark} {self.label}", nl=False, err=True)
            frame += 1
            if self._stop.wait(self.interval):
                break
        click.echo("\r" + " " * (len(self.label) + 2) + "\r", nl=False, err=True)

    def __enter__(self) -> Spinner:
        if sys.stderr.isatty():
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def pack_with_progress(pack: Callable[[], None], storage: Storage, label: str) -> None:
    """Pack ``storage``, with a bar on a terminal (a spinner if it cannot tell).

    The bar follows the storage's incremental packer (``get_packer()``) over
    the records the storage holds; a storage without one (a server's client)
    is packed by ``pack`` under a :class:`Spinner`. Piped, ``pack`` just runs.

    :param pack: packs the storage in one call (``connection.pack``).
    :param storage: the storage ``pack`` packs.
    :param label: shown before the bar.
    """
    if not sys.stderr.isatty():
        pack()
        return
    packer = storage.get_packer()
    if packer is None:
        with Spinner(label + " ..."):
            pack()
        return

    # Each step of a packer copies or walks about ``pack_step`` records.
    step = max(1, int(getattr(storage, "pack_step", 1)))
    total = max(1, storage.get_size() or 1)
    done = 0
    with ProgressBar(label) as bar:
        bar(0, total)
        for _step in packer:
            advance = min(step, total - done)
            done += advance
            bar(advance, total)
        bar(total - done, total)  # unreachable records end the walk early


class _Collect(logging.Handler):
    """Keeps the warnings storages log while a file is checked."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _collect_warnings() -> Iterator[list[str]]:
    handler = _Collect()
    logger = logging.getLogger("dhruva")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


@contextmanager
def _quiet_unless_asked() -> Iterator[None]:
    """Keep the storages' own damage messages out of stderr: the report has them.

    With ``--log-level INFO`` or lower they are shown as they come.
    """
    logger = logging.getLogger("dhruva")
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        yield
        return
    old_level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old_level)


def _open_source(
    ctx: click.Context,
    file: str | None,
    storage: str | None,
    host: str,
    port: int,
    address: str | None,
) -> tuple[Storage, str]:
    """Open a file read-only, or connect to the server; return it and its name."""
    if file is None:
        where = make_address(host, port, address)
        source = open_client_storage(where, **client_security(ctx))
        return source, f"the server at {describe_address(where)}"
    if not os.path.exists(file):
        raise click.ClickException(f"no database file {file}; check the path")
    return open_file_storage(file, storage, readonly=True, ctx=ctx), file


# --- dhruva verify ------------------------------------------------------------------


@click.command("verify")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@_storage_option("Storage kind of FILE; by default it is recognized from the file.")
@address_options
@client_security_options
@_json_option
@click.pass_context
def verify_command(
    ctx: click.Context,
    file: str | None,
    storage: str | None,
    host: str,
    port: int,
    address: str | None,
    as_json: bool,
) -> None:
    """Check every record of FILE (or of a server's database).

    Every record is read (which checks its checksum, in formats that keep
    one; SQLite files get SQLite's quick_check), every reference is
    followed, and references to missing records are listed with the objects
    and attributes holding them. Exit status 0 when
    the database is sound, 1 when it is not. Without FILE, the server at
    --host/--port or --address is checked.
    """
    from dhruva.verify import DamagedRecord, verify_settled

    # What the storage finds wrong as it opens (a torn tail) counts too.
    # The report lists them: they are not logged to stderr as well.
    with _collect_warnings() as warnings, held_library_logs(show=False):
        try:
            source, name = _open_source(ctx, file, storage, host, port, address)
        except click.ClickException:
            raise
        except Exception as error:  # a damaged file can fail in any way
            log.debug("opening %s failed", file, exc_info=True)
            raise click.ClickException(
                f"cannot open {file}, it is damaged: {error}; restore it from a backup"
            ) from error
    warnings[:] = dict.fromkeys(warnings)
    stopped = _stopped_at(source, warnings)
    try:
        with (
            library_errors(f"verifying {name}", file),
            _quiet_unless_asked(),
            ProgressBar("verifying") as bar,
        ):
            try:
                total = source.get_size() or 0
            except Exception:  # damage; verify_storage reports it
                total = 0
            report = verify_settled(source, lambda n: bar(n, total))
    finally:
        source.close()
    if stopped is not None:
        report.damaged.append(stopped)
    if file is not None and (storage or cli_plugins(ctx).recognize(file)) == "sqlite":
        report.damaged.extend(
            DamagedRecord(None, f"{file}: SQLite's integrity check: {problem}")
            for problem in _sqlite_problems(file)
        )

    sound = report.sound and not warnings
    if as_json:
        data = report.as_dict()
        data.update(database=name, sound=sound, warnings=warnings)
        click.echo(json.dumps(data, indent=2))
    else:
        _print_report(name, report, warnings, sound)
    ctx.exit(0 if sound else 1)


def _stopped_at(source: Storage, warnings: list[str]) -> Any:
    """The damage in the middle a read-only open stopped at, as a damaged
    part of the file (its warning is then left out); None if there is none."""
    from dhruva.verify import DamagedRecord, damage_in_the_middle

    damage = damage_in_the_middle(source)
    offset = getattr(damage, "offset", None)
    if damage is None or not isinstance(offset, int):
        return None
    warnings[:] = [w for w in warnings if f"byte offset {offset}" not in w]
    size = getattr(damage, "size", None)
    later = f"{size - offset} bytes of" if isinstance(size, int) else "the"
    reason = getattr(damage, "reason", "")
    return DamagedRecord(
        None,
        f"{getattr(damage, 'path', '')}: damaged at byte offset {offset}: "
        f"{reason}; {later} later commits follow it and were not read (what is "
        "counted above is the database as it was before it)",
        offset,
    )


def _sqlite_problems(path: str) -> list[str]:
    """Run SQLite's own check of its file structure; return what it finds."""
    import sqlite3
    from urllib.parse import quote

    uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True)
        try:
            rows = connection.execute("PRAGMA quick_check").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        return [str(error)]
    return [str(row[0]) for row in rows if row[0] != "ok"]


#: Advice in storage messages that verify's own report gives once, at its end.
_VERIFY_ADVICE = re.compile(
    r";? ?restore the file from a backup \(`dhruva verify` lists every damaged "
    r"record\)"
)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _damage_line(damaged: Any) -> str:
    """One damaged part of the file, as the report lists it."""
    message = _VERIFY_ADVICE.sub("", damaged.message)
    if damaged.oid is not None:
        return f"oid {damaged.oid}: {message}"
    if damaged.offset is None:
        return f"file: {message}"
    # A part of the file other than a record: say which, once.
    what = "index block" if "index block" in message else "transaction"
    message = re.sub(r"^.*?: damaged at byte offset \d+: ", "", message)
    return f"the {what} at byte offset {damaged.offset}: {message}"


def _print_report(name: str, report: Any, warnings: list[str], sound: bool) -> None:
    click.echo(f"{name}: {'sound' if sound else 'NOT SOUND'}")
    if report.complete:
        click.echo(
            f"  {report.records} records: {report.reachable} reachable from the "
            f"root, {report.unreachable} unreachable (a pack removes them)"
        )
    elif report.scan_error and report.damaged:
        click.echo(
            "  reading every record stopped at a damaged one, so the records "
            "reachable from the root were read one by one instead: "
            f"{report.records} of them (unreachable records are not counted)"
        )
    else:
        click.echo(f"  {report.records} records reachable from the root were read")
    if not report.has_root and report.records:
        click.echo("  no root object (oid 0): nothing is reachable")
    if report.scan_error and not report.damaged:
        message = _VERIFY_ADVICE.sub("", report.scan_error)
        click.echo(f"  reading every record stopped: {message}")
    for message in warnings:
        click.echo(f"  warning: {message}")
    if report.damaged:
        records = sum(1 for damaged in report.damaged if damaged.oid is not None)
        parts = len(report.damaged) - records
        counts = [_plural(records, "damaged record")] if records else []
        counts += [_plural(parts, "damaged part") + " of the file"] if parts else []
        click.echo(f"  {' and '.join(counts)}:")
        for damaged in report.damaged:
            click.echo(f"    {_damage_line(damaged)}")
    if report.dangling:
        click.echo(f"  {len(report.dangling)} dangling references:")
        for dangling in report.dangling:
            click.echo(f"    oid {dangling.oid} has no record; it is referred to by")
            for holder in dangling.holders:
                where = ", ".join(holder.attributes) or "(attribute unknown)"
                click.echo(f"      oid {holder.oid} ({holder.class_name}) at {where}")
    if not report.settled:
        click.echo(
            f"  other clients committed during each of the {report.passes} passes: "
            "what is listed may come from those commits, not from damage. Verify "
            "again when the server is quieter, or verify a copy (`dhruva backup "
            "... COPY`, then `dhruva verify COPY`)"
        )
    elif report.damaged or report.dangling or report.scan_error:
        click.echo("  restore the database from a backup (`dhruva backup` takes one)")


# --- dhruva info -------------------------------------------------------------------


def _header_text(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    text = head.split(b"\0", 1)[0].strip()
    return text.decode("ascii", "replace") if text.isascii() else head.hex()


#: File formats by how their header starts, and the name ``dhruva info`` shows.
_FORMATS = (
    ("DHRUVA1", "DHRUVA1"),
    ("SHELF-1", "SHELF-1"),
    ("DFS20", "DFS20"),
    ("SQLite format 3", "SQLite"),
)


def _format_name(header: str) -> str:
    """Return the name of the file format a header starts, or the header."""
    for prefix, name in _FORMATS:
        if header.startswith(prefix):
            return name
    return header or "?"


def _count_records(storage: Storage) -> tuple[dict[str, int], int, int | None]:
    """Read every record once: the census by class, the number of records and
    the number reachable from the root (None when there is no root)."""
    from dhruva.record import ROOT_OID, split_oids, unpack_record
    from dhruva.serialize import extract_class_name
    from dhruva.verify import reachable_oids

    census: dict[str, int] = {}
    refs_of: dict[bytes, list[bytes]] = {}
    for oid, record in storage.gen_oid_record():
        name = extract_class_name(record)
        census[name] = census.get(name, 0) + 1
        refs_of[oid] = split_oids(unpack_record(record)[2])
    if ROOT_OID not in refs_of:
        return census, len(refs_of), None
    return census, len(refs_of), len(reachable_oids(refs_of))


def _print_info_head(data: dict[str, Any], description: str) -> None:
    click.echo(f"{data['file']}")
    click.echo(f"  storage:  {data['storage']} ({description})")
    click.echo(f"  format:   {data['format']}; header {data['header']!r}")
    click.echo(f"  size:     {data['size']} bytes")


def _info_failed(
    data: dict[str, Any], description: str, as_json: bool, message: str
) -> click.ClickException:
    """Show what is known of the file, and return the error to raise."""
    if as_json:
        click.echo(json.dumps({**data, "error": message}, indent=2))
    else:
        _print_info_head(data, description)
    return click.ClickException(message)


@click.command("info")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@_storage_option("Storage kind of FILE; by default it is recognized from the file.")
@_json_option
@click.pass_context
def info_command(
    ctx: click.Context, file: str, storage: str | None, as_json: bool
) -> None:
    """Describe FILE: format, size, commits, records and a census by class.

    A file damaged in the middle is refused (exit status 1) after its format
    and size: run `dhruva verify FILE` for what is damaged.
    """
    from dhruva.verify import damage_in_the_middle, describe_damage_in_the_middle

    plugins = cli_plugins(ctx)
    with library_errors(f"reading {file}", file):
        size = os.path.getsize(file)
        if size == 0 and storage is None:
            raise click.ClickException(
                f"{file} is empty (0 bytes): it holds no database. A program (or "
                f"`dhruva client --file {file}`) that opens it for writing starts "
                "a new database in it; if it held one, restore it from a backup"
            )
        header = _header_text(file)
        kind_name = storage or plugins.recognize(file)
        if kind_name is None:
            raise click.ClickException(
                f"{file} is no database file an installed storage recognizes (it "
                f"begins {header!r}); `dhruva plugins` lists the storages: give "
                "--storage NAME, or install the plugin that writes it"
            )
        kind = plugins.get_storage_kind(kind_name)
    data: dict[str, Any] = {
        "file": file,
        "storage": kind_name,
        "format": _format_name(header),
        "header": header,
        "size": size,
    }

    # What can not be read is reported after what is known of the file.
    with held_library_logs():
        try:
            opened = open_file_storage(file, kind_name, readonly=True, ctx=ctx)
        except click.ClickException as error:
            message = error.message
            raise _info_failed(data, kind.description, as_json, message) from error
        damage = damage_in_the_middle(opened)
        if damage is not None:
            opened.close()
            message = describe_damage_in_the_middle(
                file,
                damage,
                "what follows it can not be read, so the file is not described",
            )
            raise _info_failed(data, kind.description, as_json, message)
    try:
        try:
            with library_errors(f"reading {file}", file):
                transactions = getattr(opened, "transactions", None)
                commits = len(transactions()) - 1 if transactions is not None else None
                census, records, reachable = _count_records(opened)
        except click.ClickException as error:
            message = (
                f"{error.message}; reading the records stopped there, so they are "
                "not counted"
            )
            raise _info_failed(data, kind.description, as_json, message) from error
    finally:
        opened.close()

    ordered = dict(sorted(census.items(), key=lambda item: (-item[1], item[0])))
    if as_json:
        data.update(
            commits_since_pack=commits,
            objects=records,
            reachable=reachable,
            census=ordered,
        )
        click.echo(json.dumps(data, indent=2))
        return
    _print_info_head(data, kind.description)
    if commits is not None:
        click.echo(f"  commits:  {commits} since the last pack (or creation)")
    reach = (
        "no root object, so none is reachable"
        if reachable is None
        else f"{reachable} reachable from the root; {records - reachable} "
        "unreachable, which a pack removes"
    )
    click.echo(f"  records:  {records} ({reach}); by class:")
    width = max((len(name) for name in ordered), default=0)
    for name, count in ordered.items():
        click.echo(f"    {name:<{width}}  {count:>8}")


# --- dhruva backup -----------------------------------------------------------------


@click.command("backup")
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] DEST")
@_storage_option(
    "Storage kind of SRC (recognized by default); through a server, the kind "
    "of DEST [default: file]."
)
@click.option(
    "--full",
    "--force",
    "full",
    is_flag=True,
    default=False,
    help="Copy the whole file, replacing whatever database DEST holds (needed "
    "when DEST is not an earlier backup of SRC: SRC was packed since, DEST is "
    "newer, damaged or another database).",
)
@address_options
@client_security_options
@click.pass_context
def backup_command(
    ctx: click.Context,
    paths: tuple[str, ...],
    storage: str | None,
    full: bool,
    host: str,
    port: int,
    address: str | None,
) -> None:
    """Copy a database in use to DEST, consistently.

    With SRC, a database file: a FileStorage or FileStorage2 file is copied up
    to its last complete commit (and only the new commits when DEST is an
    earlier backup of it); a SQLite file with SQLite's backup API. Without
    SRC, the database of the server at --host/--port or --address is copied
    into a new file. DEST, if it exists, must be an earlier backup of SRC
    (for a file storage: its bytes are the start of SRC's commits); any other
    database in DEST (newer than SRC, damaged, a copy of SRC from before a
    pack, another database) is refused unless --full is given. DEST is
    replaced only once the new copy is on disk. A SRC with damage (checksums
    that fail, damage in the middle of the file) is refused. Restore by
    opening the copy; check it with `dhruva verify DEST`.
    """
    from dhruva import backup

    if len(paths) > 2:
        raise click.UsageError("give SRC DEST, or DEST alone with a server address")
    plugins = cli_plugins(ctx)
    dest = paths[-1]
    with ProgressBar("backing up") as bar:
        if len(paths) == 1:
            where = make_address(host, port, address)
            name = f"the server at {describe_address(where)}"
            source = open_client_storage(where, **client_security(ctx))
            try:
                with library_errors(f"backing up {name} to {dest}", dest):
                    result = backup.backup_server(
                        source,
                        dest,
                        plugins,
                        kind=storage or "file",
                        full=full,
                        progress=bar,
                    )
            finally:
                source.close()
        else:
            name = paths[0]
            with library_errors(f"backing up {name} to {dest}", name):
                if not os.path.exists(name):
                    raise click.ClickException(f"no database file {name}")
                kind = storage or plugins.recognize(name)
                if kind == "sqlite":
                    result = backup.backup_sqlite(
                        name, dest, plugins, full=full, progress=bar
                    )
                else:
                    result = backup.backup_file(
                        name, dest, plugins, kind=kind, full=full, progress=bar
                    )

    what = {
        "full": "full copy",
        "incremental": "appended the new commits",
        "unchanged": "already up to date",
    }[result.mode]
    unit = "records" if len(paths) == 1 else "bytes"
    click.echo(
        f"backed up {name} to {dest}: {what}, {result.copied} {unit} copied, "
        f"{result.size} bytes"
    )
    if result.replaced:
        click.echo(f"note: {result.replaced}", err=True)
    if result.dangling:
        click.echo(
            f"warning: {result.dangling} references to missing objects were "
            f"copied as they are; run `dhruva verify {dest}`",
            err=True,
        )
