"""The built-in plugin of dhruva-net: the ``dhruva server`` command (``dhruva -s``).

It registers no storage kind: a ClientStorage is opened by address (see
:mod:`dhruva.client_storage`), not by file name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dhruva.hookspecs import hookimpl

if TYPE_CHECKING:
    import click


def make_server_command() -> click.Command:
    """Return the ``server`` click command; imports happen only when called."""
    import logging
    import signal

    import click
    from dhruva.cli_options import (
        address_options,
        cache_size_option,
        cli_plugins,
        describe_address,
        library_errors,
        make_address,
        open_file_storage,
        serializer_refused_option,
        storage_options,
    )

    @click.command("server")
    @storage_options
    @address_options
    @cache_size_option
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
        cache_size: int,
        gcbytes: int,
        stop: bool,
    ) -> None:
        """Serve a storage to clients until stopped (``dhruva -s``).

        Without --file it serves a new temporary FileStorage. It stops on
        SIGTERM, SIGINT (Ctrl-C) or `dhruva server --stop`. --cache-size is
        accepted for symmetry with the other commands: the server keeps no
        object cache.
        """
        # The dhruva command line has configured logging already; this only
        # helps when the command runs on its own.
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        where = make_address(host, port, address)

        if stop:
            from dhruva.client_storage import stop_server

            with library_errors(f"stopping the server at {describe_address(where)}"):
                stop_server(where)
            click.echo(f"stopped the server at {describe_address(where)}")
            return

        if file is None and storage is None:
            storage = "file"
            if storage not in cli_plugins(ctx).storages:
                raise click.ClickException(
                    "without --file the server serves a temporary FileStorage, "
                    "but the file storage is not installed: `pip install "
                    "dhruva-file`, or give --storage (e.g. --storage memory)"
                )
        opened = open_file_storage(
            file, storage, readonly=readonly, repair=repair, ctx=ctx
        )
        try:
            from dhruva.storage_server import StorageServer

            with library_errors(f"serving on {describe_address(where)}"):
                server = StorageServer(opened, address=where, gcbytes=gcbytes)
                server.serve(stop_signals=(signal.SIGTERM, signal.SIGINT))
        finally:
            opened.close()

    return server_command


@hookimpl
def dhruva_register_commands(cli: click.Group) -> None:
    cli.add_command(make_server_command())
