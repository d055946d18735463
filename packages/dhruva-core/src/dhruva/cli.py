"""The ``dhruva`` command line.

Durus users type ``durus -s``, ``durus -c`` and ``durus -p``; the same flags
work here and mean the subcommands ``dhruva server``, ``dhruva client`` and
``dhruva pack``, with the same options after them::

    dhruva -s --file test.durus        # serve a file on 127.0.0.1:2972
    dhruva -c                          # a Python console on that server
    dhruva -c --file test.durus        # ... or on the file itself
    dhruva -s --stop                   # stop the server
    dhruva -p --file test.durus        # pack the file
    dhruva migrate test.durus --rename old.mod.Cls=new.mod.Cls

Plugins add subcommands through the ``dhruva_register_commands`` hook; the
``server`` subcommand comes from dhruva-net that way. ``dhruva plugins`` lists
what each installed plugin provides.

This is the only place in dhruva that configures logging: ``--log-level``
(INFO for the server, WARNING otherwise) to stderr.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import click
from dhruva.cli_client import client_command
from dhruva.cli_convert import convert_command
from dhruva.cli_options import (
    address_options,
    cli_plugins,
    client_security,
    client_security_options,
    describe_address,
    file_option,
    library_errors,
    make_address,
    open_client_storage,
    open_file_storage,
    refuse_fileless_storage,
    refuse_server_address,
    refused_option,
    repair_option,
    require_existing_file,
    serializer_option,
    server_only_option,
    storage_option,
)
from dhruva.cli_tools import (
    backup_command,
    info_command,
    pack_with_progress,
    verify_command,
)
from dhruva.plugins import Plugins, get_plugins

log = logging.getLogger(__name__)

#: The Durus flags and the subcommands they stand for.
DURUS_FLAGS = {"-s": "server", "-c": "client", "-p": "pack"}

_FLAG_HELP = {
    "-s": "Start or stop a storage server (`dhruva server`).",
    "-c": "Open an interactive client (`dhruva client`).",
    "-p": "Pack a storage (`dhruva pack`).",
}

_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def rewrite_durus_flags(args: Sequence[str]) -> list[str]:
    """Turn Durus-style arguments into subcommand ones.

    The first ``-s``, ``-c`` or ``-p`` becomes the subcommand's name, in place;
    ``--log-level`` (an option of the group) moves to the front wherever it is
    written, so ``dhruva -s --log-level DEBUG`` works as Durus users expect.
    """
    args = list(args)
    end = args.index("--") if "--" in args else len(args)

    # Hoist --log-level VALUE / --log-level=VALUE in front of the subcommand.
    hoisted: list[str] = []
    rest: list[str] = []
    i = 0
    while i < end:
        arg = args[i]
        if arg == "--log-level" and i + 1 < end:
            hoisted += args[i : i + 2]
            i += 2
            continue
        if arg.startswith("--log-level="):
            hoisted.append(arg)
        else:
            rest.append(arg)
        i += 1
    rest += args[end:]

    # Replace the first Durus flag that comes before any subcommand name.
    for position, arg in enumerate(rest):
        if arg in DURUS_FLAGS:
            rest[position] = DURUS_FLAGS[arg]
            break
        if not arg.startswith("-"):
            break
    return hoisted + rest


class DhruvaGroup(click.Group):
    """The ``dhruva`` group: subcommands, plus the Durus ``-s/-c/-p`` flags."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, rewrite_durus_flags(args))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] == "server" and "server" not in self.commands:
            raise click.ClickException(
                "no plugin provides the `server` command: the dhruva server "
                "comes with dhruva-net, `pip install dhruva-net`"
            )
        return super().resolve_command(ctx, args)

    def format_options(
        self, ctx: click.Context, formatter: click.HelpFormatter
    ) -> None:
        super().format_options(ctx, formatter)
        with formatter.section("Durus-style flags"):
            formatter.write_dl(list(_FLAG_HELP.items()))


def _configure_logging(ctx: click.Context, level_name: str | None) -> None:
    # Only the command line adds a handler; it goes away with the command. It
    # sits on the root logger, which the command owns while it runs, so that a
    # later logging.basicConfig() call (in a plugin's command) adds no second one.
    if level_name is None:
        level_name = "INFO" if ctx.invoked_subcommand == "server" else "WARNING"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logger = logging.getLogger()
    old_level = logger.level
    logger.setLevel(level_name)
    logger.addHandler(handler)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    ctx.call_on_close(restore)


def make_cli(plugins: Plugins | None = None) -> click.Group:
    """Build the ``dhruva`` group, with the subcommands the plugins add.

    :param plugins: the plugins to use; by default the installed ones.
    """
    plugins = plugins if plugins is not None else get_plugins()

    @click.group(
        name="dhruva",
        cls=DhruvaGroup,
        context_settings={"obj": plugins, "help_option_names": ["-h", "--help"]},
    )
    @click.option(
        "--log-level",
        type=click.Choice(_LOG_LEVELS, case_sensitive=False),
        default=None,
        help="Log messages from this level up to stderr "
        "[default: INFO for the server, WARNING otherwise].",
    )
    @click.version_option(package_name="dhruva-core", prog_name="dhruva")
    @click.pass_context
    def cli(ctx: click.Context, log_level: str | None) -> None:
        """dhruva: a persistent object database for Python, continuing Durus."""
        _configure_logging(ctx, log_level.upper() if log_level else None)

    cli.add_command(client_command)
    cli.add_command(convert_command)
    cli.add_command(pack_command)
    cli.add_command(migrate_command)
    cli.add_command(plugins_command)
    cli.add_command(verify_command)
    cli.add_command(info_command)
    cli.add_command(backup_command)
    with library_errors("loading the command-line plugins"):
        plugins.register_commands(cli)
    return cli


# --- dhruva pack --------------------------------------------------------------


@click.command("pack")
@file_option
@storage_option
@repair_option
@address_options
@client_security_options
@refused_option("readonly", "a pack rewrites the database, so it cannot be read-only")
@server_only_option("gcbytes")
@server_only_option("stop")
@click.pass_context
def pack_command(
    ctx: click.Context,
    file: str | None,
    storage: str | None,
    repair: bool,
    host: str,
    port: int,
    address: str | None,
) -> None:
    """Remove the objects no longer reachable from the root.

    With --file the file is packed directly (no server may be using it); it
    must exist. Without it, the server at --host/--port or --address packs
    its storage. On a terminal, progress goes to stderr (a bar for a file,
    a status line while a server packs); piped, only the result is printed.
    """
    if file is None:
        if storage is not None or repair:
            raise click.UsageError(
                "--storage and --repair apply to a file: give --file too "
                "(a server is packed with the storage it was started with)",
                ctx=ctx,
            )
        where = make_address(host, port, address)
        opened = open_client_storage(where, **client_security(ctx))
        description = f"the server at {describe_address(where)}"
    else:
        refuse_server_address(ctx, f"--file {file}")
        refuse_fileless_storage(file, storage, ctx)
        require_existing_file(file, "pack")
        opened = open_file_storage(file, storage, repair=repair, ctx=ctx)
        description = file

    from dhruva.connection import Connection

    with library_errors(f"packing {description}"):
        try:
            connection = Connection(opened)
        except BaseException:
            opened.close()
            raise
        try:
            before = opened.get_size()
            # Nothing to drop (the connection is new): the packer may run alone.
            connection.abort()
            pack_with_progress(connection.pack, opened, f"packing {description}")
            after = opened.get_size()
        finally:
            connection.close()
    if before is not None and after is not None:
        click.echo(f"packed {description}: {before} objects before, {after} after")
    else:
        click.echo(f"packed {description}")


# --- dhruva migrate ------------------------------------------------------------


def _is_terminal() -> bool:
    # A progress bar on a terminal; piped output stays quiet.
    return sys.stdout.isatty()


def _parse_renames(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    renames = {}
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise click.BadParameter(
                f"{value!r} is not OLD=NEW, e.g. myapp.models.User=myapp.users.User",
                ctx=ctx,
                param=param,
            )
        renames[old.strip()] = new.strip()
    return renames


@click.command("migrate")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--storage",
    metavar="NAME",
    default=None,
    help="Storage kind; by default it is recognized from the file.",
)
@click.option(
    "--rename",
    "renames",
    metavar="OLD=NEW",
    multiple=True,
    callback=_parse_renames,
    help="A class moved or renamed: module.Old=module.New (repeatable).",
)
@serializer_option
@click.pass_context
def migrate_command(
    ctx: click.Context,
    file: str,
    storage: str | None,
    renames: dict[str, str],
    serializer: str | None,
) -> None:
    """Rewrite the records of renamed classes in FILE.

    Every record naming an OLD class (as its own class, or as the class of
    an object or value it holds) is stored again naming NEW. With --serializer
    every record is rewritten with that serializer. No server may be using
    the file; the modules of the NEW classes must be importable.
    """
    if not renames and serializer is None:
        raise click.UsageError("give --rename OLD=NEW, or --serializer NAME", ctx=ctx)
    from dhruva.connection import Connection
    from dhruva.migrate import migrate, oids_to_migrate

    opened = open_file_storage(file, storage, ctx=ctx)
    with library_errors(f"migrating {file}"):
        try:
            connection = Connection(
                opened, renames=renames, serializer=serializer or "pickle"
            )
        except BaseException:
            opened.close()
            raise
        try:
            # Records keep the serializer that wrote them unless one is named.
            convert = serializer is not None
            oids = oids_to_migrate(connection, renames, convert)
            if _is_terminal():
                with click.progressbar(length=len(oids), label="migrating") as bar:
                    count = migrate(
                        connection, oids, progress=bar.update, convert=convert
                    )
            else:
                count = migrate(connection, oids, convert=convert)
        finally:
            connection.close()
    click.echo(f"rewrote {count} record{'' if count == 1 else 's'} in {file}")


# --- dhruva plugins -----------------------------------------------------------


def _commands_by_plugin(plugins: Plugins) -> dict[str, list[click.Command]]:
    # Run each plugin's command hook on a scratch group to see what it adds.
    # TODO(#2): move into the Plugins facade once the lead agrees on the name.
    found: dict[str, list[click.Command]] = {}
    hook = plugins.pm.hook.dhruva_register_commands
    for impl in hook.get_hookimpls():
        scratch = click.Group()
        impl.function(cli=scratch)
        name = plugins.pm.get_name(impl.plugin) or "?"
        found[name] = list(scratch.commands.values())
    return found


def _distributions(plugins: Plugins) -> dict[str, str]:
    found: dict[str, str] = {}
    for plugin, dist in plugins.pm.list_plugin_distinfo():
        name = plugins.pm.get_name(plugin)
        if name is not None:
            found[name] = f"{dist.project_name} {dist.version}"
    return found


@click.command("plugins")
@click.pass_context
def plugins_command(ctx: click.Context) -> None:
    """List the installed plugins and what each provides."""
    plugins = cli_plugins(ctx)
    with library_errors("listing the plugins"):
        rows: dict[str, list[tuple[str, str, str]]] = {
            name: [] for name in plugins.plugin_names()
        }
        for kind in plugins.storages:
            rows.setdefault(kind.plugin, []).append(
                ("storage", kind.name, kind.description)
            )
        for serializer in plugins.serializers:
            rows.setdefault(serializer.plugin, []).append(
                ("serializer", serializer.name, serializer.description)
            )
        for name, commands in _commands_by_plugin(plugins).items():
            for command in commands:
                summary = command.get_short_help_str(limit=60)
                rows.setdefault(name, []).append(
                    ("command", command.name or "?", summary)
                )
        distributions = _distributions(plugins)

    if not rows:
        click.echo("no dhruva plugins are installed")
        return
    for name in sorted(rows):
        where = distributions.get(name)
        click.echo(f"{name} ({where})" if where else name)
        if not rows[name]:
            click.echo("  (registers nothing)")
        for what, item, description in rows[name]:
            line = f"  {what:<10} {item:<10} {description}"
            click.echo(line.rstrip())


# --- entry point --------------------------------------------------------------


def main(args: Sequence[str] | None = None) -> Any:
    """Run the ``dhruva`` command line (the console script)."""
    try:
        cli = make_cli()
    except click.ClickException as error:
        # A plugin failed before click took over: report it as click would.
        error.show()
        sys.exit(error.exit_code)
    return cli.main(args=args, prog_name="dhruva")


if __name__ == "__main__":
    main()
