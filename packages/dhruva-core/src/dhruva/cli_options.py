"""Options and helpers shared by the ``dhruva`` subcommands.

Plugins that add subcommands (``dhruva server`` from dhruva-net) may use these
too, so that every subcommand spells ``--file``, ``--storage``, ``--host``,
``--port`` and ``--address`` the same way and turns library errors into the
same click errors.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource
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


def file_option(func: F) -> F:
    """Add ``--file``: the database file to open directly."""
    return click.option(
        "--file",
        "file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Database file to open directly.",
    )(func)


def storage_option(func: F) -> F:
    """Add ``--storage NAME``: the storage kind, checked against the plugins."""
    return click.option(
        "--storage",
        "storage",
        metavar="NAME",
        default=None,
        callback=_check_storage_name,
        help="Storage kind (see `dhruva plugins`); by default it is "
        "recognized from the file, and a new file gets 'file'.",
    )(func)


def readonly_option(func: F) -> F:
    """Add ``--readonly``."""
    return click.option(
        "--readonly",
        is_flag=True,
        default=False,
        help="Open the file read-only.",
    )(func)


def repair_option(func: F) -> F:
    """Add ``--repair``."""
    return click.option(
        "--repair",
        is_flag=True,
        default=False,
        help="Truncate a damaged file after its last good transaction "
        "instead of refusing to open it.",
    )(func)


def storage_options(func: F) -> F:
    """Add ``--file``, ``--storage``, ``--readonly`` and ``--repair``."""
    for decorator in (repair_option, readonly_option, storage_option, file_option):
        func = decorator(func)
    return func


def refused_option(name: str, reason: str) -> Callable[[F], F]:
    """Accept the flag ``--NAME`` only to refuse it with ``reason``.

    For options users may carry over from another command; hidden from
    ``--help``, since the command never honours it.
    """

    def refuse(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value:
            raise click.UsageError(f"--{name}: {reason}", ctx=ctx)

    def decorator(func: F) -> F:
        return click.option(
            f"--{name}",
            is_flag=True,
            hidden=True,
            expose_value=False,
            callback=refuse,
        )(func)

    return decorator


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


#: Client options for a secured server, and the environment variables
#: dhruva-net's ClientStorage reads when they are not given.
_CLIENT_SECURITY = {
    "--auth-file": ("DHRUVA_AUTH_FILE", "File holding the server's shared secret."),
    "--tls-ca": ("DHRUVA_TLS_CA", "CA certificate (PEM) to check a TLS server with."),
    "--tls-cert": ("DHRUVA_TLS_CERT", "Client certificate (PEM), if the server asks."),
    "--tls-key": ("DHRUVA_TLS_KEY", "Private key (PEM) of --tls-cert."),
}


#: Where the client security options of a command keep what was given.
_CLIENT_SECURITY_META = "dhruva.client_security"


def _remember_client_security(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> None:
    if value is not None and param.name:
        ctx.meta.setdefault(_CLIENT_SECURITY_META, {})[param.name] = value


def client_security(ctx: click.Context) -> dict[str, str]:
    """The ``--auth-file``/``--tls-*`` values given, as ClientStorage keywords
    (``auth_file``, ``tls_ca``, ``tls_cert``, ``tls_key``) for
    :func:`open_client_storage`."""
    return dict(ctx.meta.get(_CLIENT_SECURITY_META, {}))


def client_security_options(func: F) -> F:
    """Add ``--auth-file`` and ``--tls-ca/--tls-cert/--tls-key`` for clients.

    Each defaults to its ``DHRUVA_*`` environment variable (which
    ClientStorage reads); :func:`client_security` returns those given.
    """
    for option, (envvar, help_text) in reversed(_CLIENT_SECURITY.items()):
        func = click.option(
            option,
            type=click.Path(exists=True, dir_okay=False),
            metavar="PATH",
            default=None,
            expose_value=False,
            callback=_remember_client_security,
            help=f"{help_text} [env: {envvar}]",
        )(func)
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


#: Library messages name keyword arguments (``readonly=True``); on the command
#: line the same thing is an option. Each pattern and the text that replaces it.
_OPTION_SPELLINGS = [
    # "with repair=True (or `--repair`)": the option alone is enough.
    (re.compile(r"\b(readonly|repair|force)=True \(`--\1`\)"), r"--\1"),
    (re.compile(r"\b(readonly|repair)=True \(or `--\1`\)"), r"--\1"),
    (re.compile(r"\b(readonly|repair|force)=True\b"), r"--\1"),
]


def as_cli_message(message: str) -> str:
    """Return a library error message with option names for keyword arguments.

    ``"open the file with readonly=True"`` becomes ``"open the file with
    --readonly"``; the same for ``repair=True``.
    """
    for pattern, replacement in _OPTION_SPELLINGS:
        message = pattern.sub(replacement, message)
    return message


def describe_os_error(error: OSError, *, writing: bool = False) -> str:
    """Return what an OS error means for the file it names, and what to do.

    :param writing: the file was being opened for writing, so ``--readonly``
        is a way around a permission error.
    """
    if error.filename is None:
        return str(error)
    path = os.fsdecode(error.filename)
    if isinstance(error, FileNotFoundError):
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            return (
                f"{path}: the folder {folder} does not exist; create it first, "
                "or check the path"
            )
        return f"{path}: no such file; check the path"
    if isinstance(error, PermissionError):
        message = f"{path}: permission denied"
        if writing:
            message += (
                " (opening it for writing); to only read it, open it with "
                "--readonly, or fix its permissions"
            )
        return message
    return f"{path}: {error.strerror or error}"


#: For commands that have no --readonly (they only read): library advice to
#: open a file without readonly=True, and what to say instead.
_NO_READONLY_OPTION = [
    (re.compile(r",? or open it without readonly=True to create it"), ""),
    (
        re.compile(
            r"(\S+) is empty; it is not a database yet \(open it without "
            r"readonly=True to create one\)"
        ),
        r"\1 is empty (0 bytes): it holds no database yet; a program (or "
        r"`dhruva client --file \1`) that opens it for writing starts one",
    ),
]

#: "`dhruva convert X NEW` --storage K": the option belongs inside the command.
_OPTION_OUTSIDE_COMMAND = re.compile(r"`(dhruva [^`]*)` (--[a-z-]+(?: [\w.-]+)?)")


class _Hold(logging.Filter):
    """Keeps back the warnings and errors of dhruva's loggers, in ``held``."""

    def __init__(self, held: list[logging.LogRecord]) -> None:
        super().__init__()
        self.held = held
        self._seen: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("dhruva") and record.levelno >= logging.WARNING:
            if id(record) not in self._seen:  # one record, several handlers
                self._seen.add(id(record))
                self.held.append(record)
            return False
        return True


@contextmanager
def held_library_logs(*, show: bool = True) -> Iterator[list[logging.LogRecord]]:
    """Hold back what the library logs as warnings and errors in the block:
    shown once it ends normally (unless ``show`` is False: the command
    reports them itself), dropped when it raises.

    A storage logs an error and raises it; the command line shows the error
    it raised (``Error: ...``), so the log line would say it twice. With
    ``--log-level DEBUG``, everything is shown as it comes.

    :return: the records held, in order; the block may remove those it
        reports itself.
    """
    held: list[logging.LogRecord] = []
    root = logging.getLogger()
    if root.getEffectiveLevel() <= logging.DEBUG:
        yield held
        return
    hold = _Hold(held)
    handlers = list(root.handlers)
    for handler in handlers:
        handler.addFilter(hold)
    ended = False
    try:
        yield held
        ended = True
    finally:
        for handler in handlers:
            handler.removeFilter(hold)
    if ended and show:
        # To the handlers that held them back only: others had them already.
        for record in held:
            for handler in handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)


@contextmanager
def library_errors(
    what: str,
    subject: str | None = None,
    *,
    writing: bool = False,
    readonly_option: bool = True,
) -> Iterator[None]:
    """Turn a library or OS error raised in the block into a click error.

    Keyword arguments named in library messages (``readonly=True``) are shown
    as the options (``--readonly``); OS errors name their file. What the
    library logs as a warning or error in the block is shown after it, or
    not at all when the block fails (:func:`held_library_logs`).

    :param what: what was being done, e.g. ``"cannot open test.durus"``; it
        leads the message.
    :param subject: the file (or other thing) ``what`` names; when the error's
        own message names it already, ``what`` is left out.
    :param writing: a file is being opened for writing: a permission error
        suggests ``--readonly``.
    :param readonly_option: False for a command without ``--readonly`` (it
        only reads): advice to open without it is left out.
    """
    try:
        with held_library_logs():
            yield
    except click.ClickException:
        raise
    except (DhruvaError, OSError) as error:
        log.debug("%s failed", what, exc_info=True)
        if isinstance(error, DhruvaError):
            message = str(error)
            if not readonly_option:
                for pattern, replacement in _NO_READONLY_OPTION:
                    message = pattern.sub(replacement, message)
            message = as_cli_message(message)
        else:
            message = describe_os_error(error, writing=writing)
        message = _OPTION_OUTSIDE_COMMAND.sub(r"`\1 \2`", message)
        if subject is None or subject not in message:
            message = f"{what}: {message}"
        raise click.ClickException(message) from error


def given_options(ctx: click.Context, *names: str) -> list[str]:
    """Return the options among ``names`` that the user typed, as ``--name``.

    :param names: parameter names, e.g. ``"host"``, ``"cache_size"``.
    """
    given = []
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source is not ParameterSource.DEFAULT:
            given.append("--" + name.replace("_", "-"))
    return given


def refuse_server_address(ctx: click.Context, direct: str) -> None:
    """Refuse ``--host``, ``--port`` or ``--address`` for a storage opened here.

    :param direct: what is opened instead, e.g. ``"--file test.durus"``.
    :raises click.UsageError: when any of them was given.
    """
    given = given_options(ctx, "host", "port", "address")
    if given:
        raise click.UsageError(
            f"{' and '.join(given)} name a server, but {direct} is opened "
            "directly: give a file OR a server address, not both",
            ctx=ctx,
        )


def require_existing_file(file: str, what: str) -> None:
    """Refuse a database file that does not exist, naming it.

    :param what: the command, e.g. ``"pack"``, for the message.
    :raises click.ClickException: when ``file`` is missing.
    """
    if os.path.exists(file):
        return
    folder = os.path.dirname(file)
    if folder and not os.path.isdir(folder):
        reason = f"the folder {folder} does not exist"
    else:
        reason = "there is no such file"
    raise click.ClickException(
        f"no database file {file}: {reason}; {what} works on an existing "
        "database, so check the path"
    )


def refuse_fileless_storage(
    file: str | None, storage: str | None, ctx: click.Context | None = None
) -> None:
    """Refuse a file for a storage kind that is not file based (e.g. memory).

    :raises click.UsageError: naming the kind and the storages that keep a
        file, instead of ignoring ``file``.
    """
    if file is None or storage is None:
        return
    plugins = cli_plugins(ctx)
    kind = plugins.get_storage_kind(storage)
    if kind.file_based:
        return
    with_files = ", ".join(k.name for k in plugins.storages if k.file_based)
    raise click.UsageError(
        f"the {storage} storage is not file based ({kind.description}), so it "
        f"cannot open {file}: leave the file out, or choose a storage that "
        f"keeps a file ({with_files or 'none is installed'})",
        ctx=ctx,
    )


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
    :raises click.UsageError: when ``storage`` is not file based but ``file``
        is given (it would be ignored).
    :raises click.ClickException: naming the file and what is wrong with it.
    """
    plugins = cli_plugins(ctx)
    refuse_fileless_storage(file, storage, ctx)
    has_readonly = ctx is not None and any(
        parameter.name == "readonly" for parameter in ctx.command.params
    )
    with library_errors(
        f"cannot open {file or storage}",
        file,
        writing=not readonly,
        readonly_option=has_readonly,
    ):
        return plugins.open_storage(file, storage, readonly=readonly, repair=repair)


def open_client_storage(address: Address, **security: str) -> Storage:
    """Connect to a dhruva server through dhruva-net's ClientStorage.

    :param security: ``auth_file``, ``tls_ca``, ``tls_cert``, ``tls_key``, as
        :func:`client_security` returns them.

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
        client: Storage = client_storage.ClientStorage(address=address, **security)
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
