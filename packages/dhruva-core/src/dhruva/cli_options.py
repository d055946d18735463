"""Options and helpers shared by the ``dhruva`` subcommands.

Plugins that add subcommands (``dhruva server`` from dhruva-net) may use these
too, so that every subcommand spells ``--file``, ``--storage``, ``--host``,
``--port`` and ``--address`` the same way and turns library errors into the
same click errors.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click
from dhruva.error import DhruvaError
from dhruva.plugins import Plugins, get_plugins

if TYPE_CHECKING:
    from dhruva.storage import Storage

log = logging.getLogger(__name__)

#: The host a server listens on and a client connects to by default.
DEFAULT_HOST = "127.0.0.1"
#: The TCP port of a server, as in Durus.
DEFAULT_PORT = 2972
#: The default size, in objects, of a connection's cache.
DEFAULT_CACHE_SIZE = 100000

#: A server address: ``(host, port)`` for TCP, a path for a unix socket.
Address = tuple[str, int] | str

F = TypeVar("F", bound=Callable[..., Any])


def cli_plugins(ctx: click.Context | None = None) -> Plugins:
    """Return the :class:`~dhruva.plugins.Plugins` the command line runs with.

    That is the one the ``dhruva`` group was built with (tests pass their own),
    or the process-wide one.
    """
    ctx = ctx if ctx is not None else click.get_current_context(silent=True)
    found = ctx.find_object(Plugins) if ctx is not None else None
    return found if found is not None else get_plugins()


def _check_storage_name(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    # An unknown name is a usage error that lists the installed ones.
    if value is None:
        return None
    try:
        cli_plugins(ctx).get_storage_kind(value)
    except DhruvaError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None
    return value


def _check_serializer_name(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    # An unknown name, or one whose library is missing, is a usage error.
    if value is None:
        return None
    from dhruva.serializer import resolve_serializer

    try:
        resolve_serializer(value, cli_plugins(ctx))
    except DhruvaError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None
    return value


def serializer_option(func: F) -> F:
    """Add ``--serializer NAME``: what the connection writes records with."""
    return click.option(
        "--serializer",
        metavar="NAME",
        default=None,
        callback=_check_serializer_name,
        help="Serializer of the records written (see `dhruva plugins`) "
        "[default: pickle]. Records are read by the one that wrote them.",
    )(func)


def serializer_refused_option(func: F) -> F:
    """Add ``--serializer`` to a command that stores records as it gets them.

    A server (and pack) never turns objects into records: the clients do.
    The option is there to say so, instead of "no such option".
    """

    def refuse(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            raise click.UsageError(
                "--serializer is an option of the clients: the server stores "
                "the records clients send as they are, and reads every "
                f"serializer's records. Use `dhruva -c --serializer {value}`",
                ctx=ctx,
            )

    return click.option(
        "--serializer",
        metavar="NAME",
        default=None,
        expose_value=False,
        callback=refuse,
        help="Not for the server: clients choose it (`dhruva -c --serializer`).",
    )(func)


def storage_options(func: F) -> F:
    """Add ``--file``, ``--storage``, ``--readonly`` and ``--repair``."""
    decorators = [
        click.option(
            "--file",
            "file",
            type=click.Path(dir_okay=False),
            default=None,
            help="Database file to open directly.",
        ),
        click.option(
            "--storage",
            "storage",
            metavar="NAME",
            default=None,
            callback=_check_storage_name,
            help="Storage kind (see `dhruva plugins`); by default it is "
            "recognized from the file, and a new file gets 'file'.",
        ),
        click.option(
            "--readonly",
            is_flag=True,
            default=False,
            help="Open the file read-only.",
        ),
        click.option(
            "--repair",
            is_flag=True,
            default=False,
            help="Truncate a damaged file after its last good transaction "
            "instead of refusing to open it.",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def address_options(func: F) -> F:
    """Add ``--host``, ``--port`` and ``--address``."""
    decorators = [
        click.option(
            "--host",
            default=DEFAULT_HOST,
            show_default=True,
            help="Host of the server.",
        ),
        click.option(
            "--port",
            type=click.IntRange(0, 65535),
            default=DEFAULT_PORT,
            show_default=True,
            help="TCP port of the server.",
        ),
        click.option(
            "--address",
            type=click.Path(dir_okay=False),
            metavar="PATH",
            default=None,
            help="Path of a unix domain socket; replaces --host and --port.",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def cache_size_option(func: F) -> F:
    """Add ``--cache-size``."""
    return click.option(
        "--cache-size",
        type=click.IntRange(min=1),
        default=DEFAULT_CACHE_SIZE,
        show_default=True,
        help="Number of objects the connection's cache aims to hold.",
    )(func)


def server_only_option(name: str) -> Callable[[F], F]:
    """Accept ``--NAME`` only to say that it belongs to ``dhruva -s``.

    Durus users pass server options to the other commands out of habit; a
    message that says where the option goes beats "no such option".
    """

    def refuse(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value not in (None, False):
            raise click.UsageError(
                f"--{name} is an option of the server: `dhruva -s --{name} ...`",
                ctx=ctx,
            )

    def decorator(func: F) -> F:
        return click.option(
            f"--{name}",
            hidden=True,
            expose_value=False,
            is_flag=name in ("stop",),
            callback=refuse,
        )(func)

    return decorator


def make_address(host: str, port: int, address: str | None) -> Address:
    """Return the server address the options name.

    ``--address`` is a unix socket path, or ``HOST:PORT`` (``[v6]:PORT``) as
    the server command accepts it; without it, ``--host`` and ``--port``.
    """
    if address is None:
        return (host, port)
    head, sep, tail = address.rpartition(":")
    if sep and tail.isdigit() and "/" not in address:
        return (head.strip("[]") or host, int(tail))
    return address


def describe_address(address: Address) -> str:
    """Return ``address`` as a user writes it: ``host:port`` or the socket path."""
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextmanager
def library_errors(what: str, subject: str | None = None) -> Iterator[None]:
    """Turn a library or OS error raised in the block into a click error.

    :param what: what was being done, e.g. ``"cannot open test.durus"``; it
        leads the message.
    :param subject: the file (or other thing) ``what`` names; when the error's
        own message names it already, ``what`` is left out.
    """
    try:
        yield
    except click.ClickException:
        raise
    except (DhruvaError, OSError) as error:
        log.debug("%s failed", what, exc_info=True)
        message = str(error)
        if subject is None or subject not in message:
            message = f"{what}: {message}"
        raise click.ClickException(message) from error


def open_file_storage(
    file: str | None,
    storage: str | None,
    *,
    readonly: bool = False,
    repair: bool = False,
    ctx: click.Context | None = None,
) -> Storage:
    """Open a storage directly through the installed plugins.

    :param file: the database file; None for kinds that keep no file.
    :param storage: the kind name; None to recognize it from the file.
    :raises click.ClickException: naming the file and what is wrong with it.
    """
    plugins = cli_plugins(ctx)
    with library_errors(f"cannot open {file or storage}", file):
        return plugins.open_storage(file, storage, readonly=readonly, repair=repair)


def open_client_storage(address: Address) -> Storage:
    """Connect to a dhruva server through dhruva-net's ClientStorage.

    :raises click.ClickException: when dhruva-net is not installed, or no server
        answers at ``address``.
    """
    try:
        # Imported by name: dhruva-net is an optional distribution.
        client_storage = importlib.import_module("dhruva.client_storage")
    except ImportError as error:
        if error.name not in ("dhruva.client_storage", "dhruva"):
            raise
        raise click.ClickException(
            "talking to a dhruva server needs dhruva-net, which is not installed: "
            "`pip install dhruva-net` (or give --file to open a database file "
            "directly)"
        ) from None

    where = describe_address(address)
    try:
        client: Storage = client_storage.ClientStorage(address=address)
    except DhruvaError as error:
        # dhruva-net's message names the address and how to start a server.
        raise click.ClickException(str(error)) from error
    except OSError as error:
        raise click.ClickException(
            f"cannot connect to a dhruva server at {where}: "
            f"{error.strerror or error}; start one with `dhruva -s`, or check "
            "--host, --port and --address"
        ) from error
    return client
