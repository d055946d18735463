"""The built-in plugin of dhruva-net: the ``dhruva server`` command.

It registers no storage kind: a ClientStorage is opened by address (see
:mod:`dhruva.client_storage`), not by file name.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import click
from dhruva.hookspecs import hookimpl

log = logging.getLogger(__name__)


def _parse_address(host: str, port: int, address: str | None) -> tuple[str, int] | str:
    """Return the server address the options name.

    ``--address`` is ``HOST:PORT`` (``[v6]:PORT`` for IPv6) or a unix socket
    path; without it, ``--host`` and ``--port``.
    """
    if address is None:
        return (host, port)
    head, sep, tail = address.rpartition(":")
    if sep and tail.isdigit() and "/" not in address:
        return (head.strip("[]") or host, int(tail))
    return address


@click.command("server")
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False),
    help="The database file to serve; without it, a temporary FileStorage.",
)
@click.option(
    "--storage", "storage_name", help="The storage kind (see `dhruva plugins`)."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Interface to listen on."
)
@click.option(
    "--port",
    type=int,
    default=2972,
    show_default=True,
    help="TCP port; 0 picks a free one.",
)
@click.option(
    "--address",
    help="HOST:PORT, or the path of a unix socket; overrides --host and --port.",
)
@click.option(
    "--gcbytes",
    type=int,
    default=0,
    show_default=True,
    help="Pack after this many bytes of commits; 0 never.",
)
@click.option("--readonly", is_flag=True, help="Open the storage read-only.")
@click.option(
    "--repair", is_flag=True, help="Repair a damaged end of the file on open."
)
@click.option(
    "--stop", is_flag=True, help="Stop the server running at the address, and exit."
)
@click.option(
    "--cache-size",
    type=int,
    default=None,
    help="Accepted for symmetry with the client commands; the server has no cache.",
)
def server_command(
    path: str | None,
    storage_name: str | None,
    host: str,
    port: int,
    address: str | None,
    gcbytes: int,
    readonly: bool,
    repair: bool,
    stop: bool,
    cache_size: int | None,
) -> None:
    """Serve a storage to ClientStorage clients until stopped.

    Stops on SIGTERM, SIGINT (Ctrl-C) or `dhruva server --stop`.
    """
    from dhruva.error import DhruvaError
    from dhruva.net_protocol import format_address

    # The CLI configures logging; this only helps when the command runs alone.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server_address = _parse_address(host, port, address)

    if stop:
        from dhruva.client_storage import stop_server

        try:
            stop_server(server_address)
        except DhruvaError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"stopped the server at {format_address(server_address)}")
        return

    storage = _open_storage(path, storage_name, readonly=readonly, repair=repair)
    try:
        from dhruva.storage_server import StorageServer

        server = StorageServer(storage, address=server_address, gcbytes=gcbytes)
        server.serve(stop_signals=(signal.SIGTERM, signal.SIGINT))
    except DhruvaError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        storage.close()


def _open_storage(
    path: str | None, storage_name: str | None, *, readonly: bool, repair: bool
) -> Any:
    from dhruva.error import DhruvaError
    from dhruva.plugins import get_plugins

    plugins = get_plugins()
    if path is None and storage_name is None:
        storage_name = "file"
        if "file" not in plugins.storages:
            raise click.ClickException(
                "no --file given, so the server would serve a temporary "
                "FileStorage, but the file storage is not installed; install "
                "it with `pip install dhruva-file`, or give --storage memory"
            )
    try:
        return plugins.open_storage(
            path, storage_name, readonly=readonly, repair=repair
        )
    except DhruvaError as exc:
        raise click.ClickException(str(exc)) from exc


@hookimpl
def dhruva_register_commands(cli: click.Group) -> None:
    cli.add_command(server_command)
