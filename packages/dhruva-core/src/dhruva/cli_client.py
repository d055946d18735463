"""``dhruva client`` (``dhruva -c``): a Python console on a database.

The console's namespace holds ``connection`` (a
:class:`~dhruva.connection.Connection`), ``root`` (its root object), ``get``
(load an object by oid) and ``pp`` (pretty-print), as Durus's did. The current
directory is importable, as in the Python REPL, so the classes of the stored
objects can be imported from there.

When standard input is not a terminal, what it holds runs as one script and the
command exits: ``echo 'root["x"] = 1; connection.commit()' | dhruva -c``.

``--at POSITION`` (with ``--file``) opens a file storage read-only as it was
at one of its past commits, a position ``dhruva history FILE`` lists.
"""

from __future__ import annotations

import code
import importlib
import logging
import os
import pprint
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click
from dhruva.cli_options import (
    Address,
    address_options,
    as_cli_message,
    cache_size_option,
    cli_plugins,
    client_security,
    client_security_options,
    describe_address,
    held_library_logs,
    library_errors,
    make_address,
    open_client_storage,
    open_file_storage,
    refuse_server_address,
    serializer_option,
    server_only_option,
    storage_options,
)
from dhruva.error import DhruvaError
from dhruva.utils import int8_to_str, str_to_int8

if TYPE_CHECKING:
    from dhruva.connection import Connection
    from dhruva.storage import Storage

log = logging.getLogger(__name__)

#: Where the interactive console keeps its input history.
HISTORY_PATH = Path("~/.dhruva_history")

#: The module name code typed at the console runs as.
CONSOLE_MODULE = "__console__"


@contextmanager
def console_module(namespace: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Run the console in a module of its own, with the cwd on ``sys.path``.

    Classes defined at the console then belong to a module that
    ``sys.modules`` knows, as in Durus, and modules in the current directory
    can be imported, as in the Python REPL. Both are undone on exit.
    """
    module = ModuleType(CONSOLE_MODULE)
    vars(module).update(namespace)
    previous = sys.modules.get(CONSOLE_MODULE)
    sys.modules[CONSOLE_MODULE] = module
    sys.path.insert(0, "")
    try:
        yield vars(module)
    finally:
        if "" in sys.path:
            sys.path.remove("")
        if previous is None:
            sys.modules.pop(CONSOLE_MODULE, None)
        else:
            sys.modules[CONSOLE_MODULE] = previous


def make_namespace(connection: Connection) -> dict[str, Any]:
    """Return the names the console starts with."""
    return {
        "connection": connection,
        "root": connection.get_root(),
        "get": connection.get,
        "pp": pprint.pprint,
        "sys": sys,
        "os": os,
        "int8_to_str": int8_to_str,
        "str_to_int8": str_to_int8,
    }


def run_script(source: str, namespace: dict[str, Any], filename: str) -> int:
    """Run ``source`` in ``namespace``; print a traceback on error.

    :return: the exit status: 0, 1 after an exception, or the script's own
        ``sys.exit`` code.
    """
    try:
        compiled = compile(source, filename, "exec")
        exec(compiled, namespace)
    except SystemExit as stop:
        if stop.code is None:
            return 0
        if isinstance(stop.code, int):
            return stop.code
        click.echo(str(stop.code), err=True)
        return 1
    except BaseException as error:
        # Show the user's frames, not this function's.
        tb = error.__traceback__
        if tb is not None and tb.tb_frame.f_code is run_script.__code__:
            tb = tb.tb_next
        traceback.print_exception(type(error), error, tb, file=sys.stderr)
        return 1
    return 0


def _configure_readline(namespace: dict[str, Any]) -> Any:
    # Tab completion on the console's names and a history file, if available.
    try:
        import readline
        import rlcompleter
    except ImportError:
        return None
    readline.set_completer(rlcompleter.Completer(namespace).complete)
    readline.parse_and_bind("tab: complete")
    history = HISTORY_PATH.expanduser()
    with suppress(OSError):
        if history.exists():
            readline.read_history_file(history)
    return readline


def interact(namespace: dict[str, Any], description: str) -> None:
    """Run an interactive console on ``namespace`` until end of input."""
    readline = _configure_readline(namespace)
    banner = (
        f"dhruva client on {description}\n"
        "    connection -> the Connection (commit(), abort(), pack())\n"
        "    root       -> the root object\n"
        "    get(oid), pp(obj)"
    )
    try:
        code.InteractiveConsole(namespace, filename="<console>").interact(
            banner=banner, exitmsg=""
        )
    finally:
        if readline is not None:
            with suppress(OSError):
                readline.write_history_file(HISTORY_PATH.expanduser())


@click.command("client")
@storage_options
@address_options
@client_security_options
@cache_size_option
@serializer_option
@click.option(
    "--startup",
    type=click.Path(dir_okay=False, exists=True),
    envvar="DHRUVASTARTUP",
    default=None,
    help="Python file to run in the console's namespace first "
    "[default: $DHRUVASTARTUP].",
)
@click.option(
    "--at",
    "at",
    type=click.IntRange(min=0),
    default=None,
    metavar="POSITION",
    help="Open --file read-only as of a past commit: a position that "
    "`dhruva history FILE` lists (file storages).",
)
@server_only_option("gcbytes")
@server_only_option("stop")
@click.pass_context
def client_command(
    ctx: click.Context,
    file: str | None,
    storage: str | None,
    readonly: bool,
    repair: bool,
    host: str,
    port: int,
    address: str | None,
    cache_size: int,
    serializer: str | None,
    startup: str | None,
    at: int | None,
) -> None:
    """Open a Python console with `connection` and `root` of a database.

    With --file (or a --storage that keeps no file, such as memory) the
    storage is opened directly and exclusively; otherwise the client talks to
    the server at --host/--port or --address. Piped input runs as a script.
    With --at, --file is opened read-only as it was at that past commit.
    """
    if at is not None and (file is None or storage is not None or repair):
        raise click.UsageError(
            "--at opens a file storage as of a past commit: give --file, "
            "without --storage or --repair (the format is read from the file)",
            ctx=ctx,
        )
    direct = file is not None or (
        storage is not None
        and not cli_plugins(ctx).get_storage_kind(storage).file_based
    )
    if direct:
        refuse_server_address(
            ctx, f"--file {file}" if file is not None else f"--storage {storage}"
        )
        if file is None and (readonly or repair):
            raise click.UsageError(
                f"--readonly and --repair apply to a file opened with --file; "
                f"the {storage} storage keeps none",
                ctx=ctx,
            )
        if at is not None and file is not None:
            opened = _open_at(file, at)
            description = f"{file} as of position {at}"
        else:
            with held_library_logs() as logged:
                opened = open_file_storage(
                    file, storage, readonly=readonly, repair=repair, ctx=ctx
                )
                if file is not None and _warn_damage_in_the_middle(opened, file):
                    logged.clear()  # the warning says it
            description = file or f"a {storage} storage"
    else:
        if readonly or repair or storage is not None:
            raise click.UsageError(
                "--storage, --readonly and --repair apply to a file opened with "
                "--file; for a server, give them to `dhruva -s`",
                ctx=ctx,
            )
        where: Address = make_address(host, port, address)
        opened = open_client_storage(where, **client_security(ctx))
        description = f"the server at {describe_address(where)}"

    from dhruva.connection import Connection

    try:
        with library_errors(f"opening {description}"):
            connection = Connection(
                opened, cache_size=cache_size, serializer=serializer or "pickle"
            )
    except BaseException:
        opened.close()
        raise
    try:
        with library_errors(f"reading the root of {description}"):
            names = make_namespace(connection)
        status = _run_console(names, description, startup)
        _warn_uncommitted(connection)
    finally:
        _close(connection, opened, description)
    if status:
        ctx.exit(status)


def _warn_damage_in_the_middle(opened: Storage, file: str) -> bool:
    """Warn, on stderr, that a read-only view of a file damaged in the middle
    stops at the damage; return whether it did."""
    from dhruva.verify import damage_in_the_middle

    damage = damage_in_the_middle(opened)
    offset = getattr(damage, "offset", None)
    if damage is None or not isinstance(offset, int):
        return False
    size = getattr(damage, "size", None)
    later = f"the {size - offset} bytes of" if isinstance(size, int) else "the"
    click.echo(
        f"warning: {file} is damaged at byte offset {offset} "
        f"({getattr(damage, 'reason', damage)}). This read-only view stops at "
        f"byte {offset}: it shows the database as it was before the damage, and "
        f"{later} later commits are not shown. Restore {file} from a backup "
        f"(`dhruva verify {file}` lists the damage; `dhruva restore {file} --at "
        f"{offset} --output NEW` keeps what is before it)",
        err=True,
    )
    return True


def _open_at(file: str, at: int) -> Storage:
    """Open ``file`` read-only as of position ``at`` (dhruva-file's history)."""
    try:
        # Imported by name: dhruva-file is an optional distribution.
        file_history = importlib.import_module("dhruva.file_history")
    except ImportError as error:
        if error.name not in ("dhruva.file_history", "dhruva"):
            raise
        raise click.ClickException(
            "--at needs dhruva-file, which is not installed: `pip install dhruva-file`"
        ) from None
    with library_errors(f"cannot open {file} as of position {at}", file):
        storage: Storage = file_history.open_file(file, at=at)
    return storage


def _close(connection: Connection, opened: Storage, description: str) -> None:
    # Closing drops what was not committed, which asks the storage for news; a
    # server that has gone away cannot answer. The session is over all the
    # same: say so in one line instead of failing the command.
    try:
        connection.close()
    except (DhruvaError, OSError) as error:
        log.debug("closing %s failed", description, exc_info=True)
        if description.startswith("the server"):
            what = f"{description} went away before the session closed"
        else:
            what = f"closing {description} failed"
        click.echo(f"warning: {what}: {as_cli_message(str(error))}", err=True)
        with suppress(DhruvaError, OSError):
            opened.close()


def _warn_uncommitted(connection: Connection) -> None:
    # As in Durus, what was not committed is dropped; but say so.
    count = len(connection.changed)
    if count:
        click.echo(
            f"warning: {count} changed object{'s' if count > 1 else ''} not "
            "committed, so not saved (end with connection.commit() to keep them)",
            err=True,
        )


def _run_console(names: dict[str, Any], description: str, startup: str | None) -> int:
    # A startup file first, then a script from a pipe or a console.
    with console_module(names) as namespace:
        if startup is not None:
            source = Path(startup).read_text(encoding="utf-8")
            status = run_script(source, namespace, startup)
            if status:
                return status
        if sys.stdin.isatty():
            interact(namespace, description)
            return 0
        return run_script(sys.stdin.read(), namespace, "<stdin>")
