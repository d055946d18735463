"""The built-in plugin of dhruva-net: the ``dhruva server`` command (``dhruva -s``).

It registers no storage kind: a ClientStorage is opened by address (see
:mod:`dhruva.client_storage`), not by file name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from dhruva.hookspecs import hookimpl

if TYPE_CHECKING:
    import click

log = logging.getLogger(__name__)


def make_server_command() -> click.Command:
    """Return the ``server`` click command; imports happen only when called."""
    import signal

    import click
    from dhruva.cli_options import (
        address_options,
        as_cli_message,
        cli_plugins,
        describe_address,
        library_errors,
        make_address,
        open_file_storage,
        serializer_refused_option,
        storage_options,
    )
    from dhruva.error import DhruvaError

    @click.command("server")
    @storage_options
    @address_options
    @click.option(
        "--cache-size",
        type=click.IntRange(min=1),
        hidden=True,
        expose_value=False,
        callback=_ignore_cache_size,
        help="Accepted as Durus's server did, and ignored: no object cache.",
    )
    @serializer_refused_option
    @click.option(
        "--gcbytes",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Pack the storage after this many bytes of commits; 0 never.",
    )
    @click.option(
        "--stop",
        is_flag=True,
        default=False,
        help="Stop the server running at the address, and exit.",
    )
    @click.option(
        "--auth-file",
        type=click.Path(dir_okay=False),
        default=None,
        envvar="DHRUVA_AUTH_FILE",
        help="File holding the shared secret clients must prove they know "
        "(or set DHRUVA_AUTH_KEY to the secret itself).",
    )
    @click.option(
        "--tls-cert",
        type=click.Path(dir_okay=False, exists=True),
        default=None,
        help="PEM certificate (chain) of the server: serve over TLS. With "
        "--stop, a client certificate.",
    )
    @click.option(
        "--tls-key",
        type=click.Path(dir_okay=False, exists=True),
        default=None,
        help="PEM private key of --tls-cert (if not in the same file).",
    )
    @click.option(
        "--tls-ca",
        type=click.Path(dir_okay=False, exists=True),
        default=None,
        help="PEM CA: clients must present certificates it signed. With "
        "--stop, the CA of the server's certificate.",
    )
    @click.option(
        "--insecure",
        is_flag=True,
        default=False,
        help="Allow listening on a network address without --auth-file or TLS.",
    )
    @click.option("--socket-owner", default=None, help="Owner of the unix socket.")
    @click.option("--socket-group", default=None, help="Group of the unix socket.")
    @click.option(
        "--socket-mode",
        default=None,
        metavar="OCTAL",
        help="Permissions of the unix socket, e.g. 660.",
    )
    @click.option(
        "--idle-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Close connections silent this many seconds (default: never).",
    )
    @click.option(
        "--request-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=120.0,
        show_default=True,
        help="Seconds a client has to finish a request it started, or to read a reply.",
    )
    @click.pass_context
    def server_command(
        ctx: click.Context,
        file: str | None,
        storage: str | None,
        readonly: bool,
        repair: bool,
        host: str,
        port: int,
        address: str | None,
        gcbytes: int,
        stop: bool,
        auth_file: str | None,
        tls_cert: str | None,
        tls_key: str | None,
        tls_ca: str | None,
        insecure: bool,
        socket_owner: str | None,
        socket_group: str | None,
        socket_mode: str | None,
        idle_timeout: float | None,
        request_timeout: float,
    ) -> None:
        """Serve a storage to clients until stopped (``dhruva -s``).

        Without --file it serves a new temporary FileStorage. It stops on
        SIGTERM, SIGINT (Ctrl-C) or `dhruva server --stop`.

        Under systemd socket activation (LISTEN_FDS) it serves the socket
        systemd passes instead of --host/--port/--address. On anything but
        loopback or a unix socket it needs --auth-file and/or --tls-cert, or
        --insecure.
        """
        # The dhruva command line has configured logging already; this only
        # helps when the command runs on its own.
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        import os

        from dhruva.net_protocol import check_auth_key, format_address, read_auth_file
        from dhruva.server_sockets import bound_address, parse_mode, systemd_socket

        where = make_address(host, port, address)
        with library_errors("reading the authentication key"):
            auth_key: bytes | None = None
            if auth_file is not None:
                auth_key = read_auth_file(auth_file)
            elif os.environ.get("DHRUVA_AUTH_KEY"):
                auth_key = check_auth_key(
                    os.environ["DHRUVA_AUTH_KEY"].encode(), "DHRUVA_AUTH_KEY"
                )

        if stop:
            from dhruva.client_storage import stop_server

            with library_errors(f"stopping the server at {describe_address(where)}"):
                stop_server(
                    where,
                    auth_key=auth_key,
                    tls_ca=tls_ca,
                    tls_cert=tls_cert,
                    tls_key=tls_key,
                )
            click.echo(f"stopped the server at {describe_address(where)}")
            return

        with library_errors("setting up the listening socket"):
            mode = None if socket_mode is None else parse_mode(socket_mode)
            inherited = systemd_socket()
        if inherited is not None:
            # --host/--port/--address are not used: name the socket served.
            shown = (
                "the socket passed by systemd "
                f"({format_address(bound_address(inherited))})"
            )
        else:
            shown = describe_address(where)

        if file is None and storage is None:
            storage = "file"
            if storage not in cli_plugins(ctx).storages:
                raise click.ClickException(
                    "without --file the server serves a temporary FileStorage, "
                    "but the file storage is not installed: `pip install "
                    "dhruva-file`, or give --storage (e.g. --storage memory)"
                )
        before = _files_of(file)
        opened = open_file_storage(
            file, storage, readonly=readonly, repair=repair, ctx=ctx
        )
        server: Any = None
        try:
            from dhruva.storage_server import StorageServer

            with library_errors(f"serving on {shown}"):
                server = StorageServer(
                    opened,
                    address=where,
                    gcbytes=gcbytes,
                    auth_key=auth_key,
                    tls_cert=tls_cert,
                    tls_key=tls_key,
                    tls_ca=tls_ca,
                    insecure=insecure,
                    sock=inherited,
                    socket_owner=socket_owner,
                    socket_group=socket_group,
                    socket_mode=mode,
                    idle_timeout=idle_timeout,
                    request_timeout=request_timeout,
                    write_timeout=request_timeout,
                )
            # Not inside library_errors, which holds warnings back until its
            # block ends: a server's log lines must show as they happen.
            try:
                server.serve(stop_signals=(signal.SIGTERM, signal.SIGINT))
            except (DhruvaError, OSError) as error:
                raise click.ClickException(
                    f"serving on {shown}: {as_cli_message(str(error))}"
                ) from error
        finally:
            opened.close()
            if server is None or server.bound_address is None:
                # It never served: remove the files it made (a new, empty
                # database), so that an address in use leaves nothing behind.
                _remove_new_files(file, before)

    return server_command


def _files_of(file: str | None) -> set[str]:
    """The paths of ``file`` and its companions (``file.*``) that exist."""
    import glob

    if file is None:
        return set()
    return set(glob.glob(glob.escape(file))) | set(glob.glob(glob.escape(file) + ".*"))


def _remove_new_files(file: str | None, before: set[str]) -> None:
    """Remove the files of ``file`` that were not there ``before``."""
    import os

    for path in _files_of(file) - before:
        if not os.path.isfile(path):
            continue
        try:
            os.remove(path)
        except OSError as exc:
            log.warning(
                "could not remove %s, made by a server that never served: %s", path, exc
            )


def _ignore_cache_size(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Accept ``--cache-size`` (Durus's ``durus -s`` did) and say it does nothing."""
    if value is not None:
        log.info(
            "--cache-size is ignored: the server keeps no object cache (it is "
            "an option of the clients, `dhruva -c --cache-size N`)"
        )


@hookimpl
def dhruva_register_commands(cli: click.Group) -> None:
    cli.add_command(make_server_command())
