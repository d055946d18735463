"""The ``dhruva`` command line, driven through click's CliRunner.

Most tests run the group on a :class:`Plugins` made here, so that what is
installed does not matter: the core plugin, a small file-backed storage kind
("picklefile", recognized from its first bytes) and, where a test needs it, a
stand-in ``server`` command that reports the options it received.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import click
import dhruva._core_plugin
import pytest
from click.testing import CliRunner, Result
from dhruva.cli import main, make_cli, rewrite_durus_flags
from dhruva.cli_options import as_cli_message, make_address
from dhruva.error import StorageError
from dhruva.hookspecs import hookimpl
from dhruva.plugins import Plugins, get_plugin_manager
from dhruva.registry import PluginError, StorageKind, StorageRegistry
from dhruva.storage import MemoryStorage

MAGIC = b"TESTPICKLE\n"


class PickleFileStorage(MemoryStorage):
    """MemoryStorage written to a file after every commit (a test double)."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.readonly = readonly
        if not readonly:
            # As real storages do, a writable open creates the file.
            self.path.touch()
        if self.path.exists() and self.path.stat().st_size:
            data = self.path.read_bytes()
            assert data.startswith(MAGIC)
            self.records, self._next_oid = pickle.loads(data[len(MAGIC) :])

    def _save(self) -> None:
        self.path.write_bytes(MAGIC + pickle.dumps((self.records, self._next_oid)))

    def end(self, handle_invalidations: Any = None) -> None:
        super().end(handle_invalidations)
        self._save()

    def pack(self) -> None:
        super().pack()
        self._save()


class PickleFilePlugin:
    @hookimpl
    def dhruva_register_storages(self, registry: StorageRegistry) -> None:
        registry.add(
            StorageKind(
                name="picklefile",
                open=lambda path, readonly=False, repair=False: PickleFileStorage(
                    path, readonly
                ),
                description="a pickled dict in a file (tests only)",
                distribution="test",
            )
        )

    @hookimpl
    def dhruva_recognize_storage(self, path: str, header: bytes) -> str | None:
        return "picklefile" if header.startswith(MAGIC) else None


class FakeServerPlugin:
    """Adds a ``server`` command that prints the options it was given."""

    @hookimpl
    def dhruva_register_commands(self, cli: click.Group) -> None:
        @click.command("server")
        @click.option("--file")
        @click.option("--port", type=int, default=2972)
        @click.option("--address")
        @click.option("--gcbytes", type=int, default=0)
        @click.option("--stop", is_flag=True)
        def server(**options: Any) -> None:
            """Start or stop a storage server (stand-in)."""
            logging.getLogger("dhruva.fake_server").info("fake server ready")
            click.echo(json.dumps(options, sort_keys=True))

        cli.add_command(server)


def make_plugins(*, server: bool = False) -> Plugins:
    pm = get_plugin_manager()
    pm.register(dhruva._core_plugin, "core")
    pm.register(PickleFilePlugin(), "picklefile")
    if server:
        pm.register(FakeServerPlugin(), "fakenet")
    return Plugins(pm)


def run(args: list[str], input: str | None = None, **plugin_options: Any) -> Result:
    cli = make_cli(make_plugins(**plugin_options))
    return CliRunner().invoke(cli, args, input=input, prog_name="dhruva")


def client(path: Path, script: str, *options: str) -> Result:
    return run(["-c", "--file", str(path), *options], input=script)


# --- the group, Durus flags and the server ------------------------------------


def test_help_names_the_subcommands_and_the_durus_flags() -> None:
    result = run(["--help"], server=True)
    assert result.exit_code == 0
    for word in ("client", "pack", "plugins", "server", "-s", "-c", "-p"):
        assert word in result.stdout


def test_version() -> None:
    result = run(["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("dhruva, version ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-s"], ["server"]),
        (["-s", "--file", "F", "--stop"], ["server", "--file", "F", "--stop"]),
        (["-c", "--log-level", "DEBUG"], ["--log-level", "DEBUG", "client"]),
        (["--log-level=INFO", "-p"], ["--log-level=INFO", "pack"]),
        (["client", "-p"], ["client", "-p"]),
        (["pack", "--file", "-c"], ["pack", "--file", "-c"]),
    ],
)
def test_durus_flags_become_subcommands(args: list[str], expected: list[str]) -> None:
    assert rewrite_durus_flags(args) == expected


def test_dash_s_runs_the_plugin_server_with_the_same_options(tmp_path: Path) -> None:
    path = tmp_path / "test.durus"
    result = run(["-s", "--file", str(path), "--port", "3001"], server=True)
    assert result.exit_code == 0, result.output
    options = json.loads(result.stdout)
    assert options["file"] == str(path)
    assert options["port"] == 3001
    assert options["stop"] is False

    stop = run(["-s", "--stop", "--port", "3001"], server=True)
    assert json.loads(stop.stdout)["stop"] is True


@pytest.mark.parametrize("spelling", [["-s"], ["server"], ["-s", "--stop"]])
def test_server_without_dhruva_net_says_what_to_install(spelling: list[str]) -> None:
    result = run(spelling)
    assert result.exit_code == 1
    assert "pip install dhruva-net" in result.stderr


def test_server_logs_at_info_by_default_and_others_at_warning() -> None:
    result = run(["-s"], server=True)
    assert "fake server ready" in result.stderr

    quiet = run(["--log-level", "WARNING", "-s"], server=True)
    assert quiet.exit_code == 0
    assert "fake server ready" not in quiet.stderr


def test_log_level_debug_shows_library_messages(tmp_path: Path) -> None:
    path = tmp_path / "db"
    handlers = list(logging.getLogger().handlers)
    args = ["-c", "--file", str(path), "--storage", "picklefile", "--log-level=debug"]
    result = run(args, input="")
    assert result.exit_code == 0, result.output
    assert "opening" in result.stderr and str(path) in result.stderr
    # The handler goes away with the command.
    assert logging.getLogger().handlers == handlers


# --- dhruva -c ----------------------------------------------------------------


def test_piped_client_commits_to_a_file_and_a_second_run_reads_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "test.durus"
    first = run(
        ["-c", "--file", str(path), "--storage", "picklefile"],
        input='root["x"] = 1\nroot["names"] = ["a", "b"]\nconnection.commit()\n',
    )
    assert first.exit_code == 0, first.output

    # The second run recognizes the kind from the file's first bytes.
    second = client(path, 'print(root["x"], root["names"])')
    assert second.exit_code == 0, second.output
    assert second.stdout == "1 ['a', 'b']\n"


def test_uncommitted_changes_are_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "test.durus"
    client(path, 'root["kept"] = 1; connection.commit()', "--storage", "picklefile")
    dropped = client(path, 'root["dropped"] = 2')
    assert dropped.exit_code == 0
    assert "1 changed object not committed" in dropped.stderr
    result = client(path, "print(sorted(root.keys()))")
    assert result.stdout == "['kept']\n"
    assert result.stderr == ""


def test_abort_reverts_to_the_last_commit(tmp_path: Path) -> None:
    path = tmp_path / "test.durus"
    script = 'root["a"] = 1; connection.commit(); root["a"] = 2\nconnection.abort()\n'
    result = run(
        ["-c", "--file", str(path), "--storage", "picklefile"],
        input=script + 'print(root["a"])',
    )
    assert result.stdout == "1\n"


def test_client_namespace_has_get_and_pp(tmp_path: Path) -> None:
    result = run(
        ["-c", "--storage", "memory"],
        input='print(get(0) is root)\npp({"b": 2, "a": 1})\n',
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "True\n{'a': 1, 'b': 2}\n"


def test_client_imports_classes_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cli_test_things.py").write_text(
        "from dhruva.persistent import Persistent\n"
        "class Thing(Persistent):\n"
        "    def __init__(self, name):\n"
        "        self.name = name\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cli_test_things", raising=False)
    path = tmp_path / "things.db"
    script = "from cli_test_things import Thing\nroot['t'] = Thing('spoon')\n"
    first = client(path, script + "connection.commit()", "--storage", "picklefile")
    assert first.exit_code == 0, first.output

    # A fresh import in the second run, found through the current directory.
    monkeypatch.delitem(sys.modules, "cli_test_things")
    second = client(path, "t = root['t']; print(type(t).__name__, t.name)")
    assert second.exit_code == 0, second.output
    assert second.stdout == "Thing spoon\n"
    monkeypatch.delitem(sys.modules, "cli_test_things", raising=False)


def test_script_error_prints_a_traceback_and_exits_1(tmp_path: Path) -> None:
    result = run(["-c", "--storage", "memory"], input="x = 1\nroot[missing_name]\n")
    assert result.exit_code == 1
    assert "NameError" in result.stderr
    assert 'File "<stdin>", line 2' in result.stderr
    assert "cli_client.py" not in result.stderr


def test_script_exit_code_is_the_commands(tmp_path: Path) -> None:
    result = run(["-c", "--storage", "memory"], input="sys.exit(3)")
    assert result.exit_code == 3


def test_startup_file_runs_first(tmp_path: Path) -> None:
    startup = tmp_path / "startup.py"
    startup.write_text("greeting = 'hello from startup'\n")
    result = CliRunner(env={"DHRUVASTARTUP": str(startup)}).invoke(
        make_cli(make_plugins()), ["-c", "--storage", "memory"], input="print(greeting)"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello from startup\n"


def test_client_without_file_needs_dhruva_net(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if dhruva-net were not installed: its module cannot be imported.
    monkeypatch.setitem(sys.modules, "dhruva.client_storage", None)
    for command in (["-c"], ["-p"], ["client", "--port", "4000"]):
        result = run(command, input="")
        assert result.exit_code == 1
        assert "pip install dhruva-net" in result.stderr
        assert "--file" in result.stderr


def test_readonly_needs_a_file() -> None:
    result = run(["-c", "--readonly"], input="")
    assert result.exit_code == 2
    assert "--file" in result.stderr


def test_file_kind_without_a_file_is_refused() -> None:
    result = run(["-c", "--storage", "picklefile"], input="")
    assert result.exit_code == 2
    assert "--file" in result.stderr


@pytest.mark.parametrize("option", [["--gcbytes", "100"], ["--stop"]])
def test_server_options_given_to_the_client_point_to_the_server(
    option: list[str],
) -> None:
    result = run(["-c", "--storage", "memory", *option], input="")
    assert result.exit_code == 2
    assert f"dhruva -s {option[0]}" in result.stderr


# --- storages: names and recognition ------------------------------------------


def test_unknown_storage_lists_the_installed_ones_and_the_closest(
    tmp_path: Path,
) -> None:
    result = run(["-c", "--file", str(tmp_path / "x"), "--storage", "picklefil"])
    assert result.exit_code == 2
    assert "memory, picklefile" in result.stderr
    assert "did you mean 'picklefile'?" in result.stderr


def test_unrecognized_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"just some text\n")
    result = client(path, "print(root)")
    assert result.exit_code == 1
    assert str(path) in result.stderr
    assert "Traceback" not in result.output


# --- dhruva -p ----------------------------------------------------------------


def test_pack_removes_unreachable_objects_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "test.durus"
    setup = (
        "from dhruva.persistent_dict import PersistentDict\n"
        "root['keep'] = PersistentDict(); root['drop'] = PersistentDict()\n"
        "connection.commit()\n"
        "del root['drop']; connection.commit()\n"
    )
    assert client(path, setup, "--storage", "picklefile").exit_code == 0

    result = run(["-p", "--file", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"packed {path}: 3 objects before, 2 after\n"

    after = client(path, "print(sorted(root.keys()))")
    assert after.stdout == "['keep']\n"


def test_pack_refuses_readonly(tmp_path: Path) -> None:
    result = run(["-p", "--file", str(tmp_path / "db"), "--readonly"])
    assert result.exit_code == 2
    assert "--readonly" in result.stderr
    assert "rewrites the database" in result.stderr


def test_pack_help_lists_only_the_options_pack_uses() -> None:
    result = run(["pack", "--help"])
    assert result.exit_code == 0
    for option in ("--file", "--storage", "--repair", "--host", "--address"):
        assert option in result.stdout
    for option in ("--readonly", "--cache-size", "--gcbytes", "--stop"):
        assert option not in result.stdout


def test_pack_refuses_a_missing_file_and_creates_none(tmp_path: Path) -> None:
    path = tmp_path / "nosuch.durus"
    result = run(["-p", "--file", str(path)])
    assert result.exit_code == 1
    assert f"no database file {path}" in result.stderr
    assert "packed" not in result.output
    assert not path.exists()


def test_pack_names_a_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "nodir" / "x.durus"
    result = run(["-p", "--file", str(path), "--storage", "picklefile"])
    assert result.exit_code == 1
    assert f"the folder {tmp_path / 'nodir'} does not exist" in result.stderr


@pytest.mark.parametrize(
    "option", [["--storage", "picklefile"], ["--repair"]], ids=["storage", "repair"]
)
def test_pack_of_a_server_refuses_file_options(option: list[str]) -> None:
    result = run(["-p", *option])
    assert result.exit_code == 2
    assert "give --file too" in result.stderr


def test_pack_with_repair_packs_the_file(tmp_path: Path) -> None:
    path = tmp_path / "db"
    assert client(path, "connection.commit()", "--storage", "picklefile").exit_code == 0
    result = run(["-p", "--file", str(path), "--repair"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"packed {path}")


# --- options that conflict ----------------------------------------------------


@pytest.mark.parametrize("command", ["-c", "-p"])
def test_a_storage_that_is_not_file_based_refuses_a_file(
    tmp_path: Path, command: str
) -> None:
    path = tmp_path / "mem.durus"
    result = run([command, "--file", str(path), "--storage", "memory"], input="")
    assert result.exit_code == 2
    assert "the memory storage is not file based" in result.stderr
    assert str(path) in result.stderr
    assert "picklefile" in result.stderr  # a storage that does keep a file
    assert not path.exists()


def test_client_creates_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "new.durus"
    result = client(path, "print(len(root))", "--storage", "picklefile")
    assert result.exit_code == 0, result.output
    assert result.stdout == "0\n"
    assert path.exists()


@pytest.mark.parametrize("command", ["-c", "-p"])
@pytest.mark.parametrize(
    "option",
    [["--address", "/tmp/s"], ["--host", "example.org"], ["--port", "4000"]],
    ids=["address", "host", "port"],
)
def test_a_file_and_a_server_address_are_refused_together(
    tmp_path: Path, command: str, option: list[str]
) -> None:
    path = tmp_path / "x.durus"
    path.write_bytes(MAGIC + pickle.dumps(({}, 0)))
    result = run([command, "--file", str(path), *option], input="")
    assert result.exit_code == 2
    assert f"{option[0]} name a server" in result.stderr
    assert "a file OR a server address" in result.stderr


def test_a_memory_client_refuses_a_server_address() -> None:
    result = run(["-c", "--storage", "memory", "--port", "4000"], input="")
    assert result.exit_code == 2
    assert "--port name a server, but --storage memory" in result.stderr


@pytest.mark.parametrize("option", ["--readonly", "--repair"])
def test_a_memory_client_refuses_file_options(option: str) -> None:
    result = run(["-c", "--storage", "memory", option], input="")
    assert result.exit_code == 2
    assert "apply to a file opened with --file" in result.stderr


# --- dhruva plugins -----------------------------------------------------------


def test_plugins_lists_each_plugin_with_what_it_adds() -> None:
    result = run(["plugins"], server=True)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "core" in lines
    assert "fakenet" in lines
    assert "picklefile" in lines
    text = " ".join(" ".join(line.split()) for line in lines)
    assert "storage memory records in a dict" in text
    assert "storage picklefile a pickled dict in a file (tests only)" in text
    assert "command server Start or stop a storage server" in text


def test_plugins_lists_the_installed_distributions() -> None:
    result = CliRunner().invoke(make_cli(), ["plugins"])
    assert result.exit_code == 0, result.output
    assert "core (dhruva-core " in result.stdout
    assert "storage    memory" in result.stdout


@pytest.mark.parametrize(
    ("host", "port", "address", "expected"),
    [
        ("127.0.0.1", 2972, None, ("127.0.0.1", 2972)),
        ("127.0.0.1", 2972, "/tmp/dhruva.sock", "/tmp/dhruva.sock"),
        ("127.0.0.1", 2972, "localhost:4000", ("localhost", 4000)),
        ("127.0.0.1", 2972, "[::1]:4000", ("::1", 4000)),
        ("127.0.0.1", 2972, "relative.sock", "relative.sock"),
    ],
)
def test_address_option_is_a_socket_path_or_host_and_port(
    host: str, port: int, address: str | None, expected: object
) -> None:
    assert make_address(host, port, address) == expected


def test_readonly_empty_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    result = client(path, "print(root)", "--storage", "picklefile", "--readonly")
    assert result.exit_code == 1
    assert f"opening {path}" in result.stderr
    assert "read-only" in result.stderr
    assert "Traceback" not in result.output


class BrokenCommandsPlugin:
    @hookimpl
    def dhruva_register_commands(self, cli: click.Group) -> None:
        raise PluginError("plugin 'broken' cannot add its commands: reinstall it")


def test_a_plugin_failing_at_startup_is_reported_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plugins = make_plugins()
    plugins.pm.register(BrokenCommandsPlugin(), "broken")
    monkeypatch.setattr("dhruva.cli.get_plugins", lambda: plugins)
    with pytest.raises(SystemExit) as stopped:
        main(["plugins"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "plugin 'broken' cannot add its commands: reinstall it" in err
    assert "Traceback" not in err


# --- error messages -----------------------------------------------------------


def test_client_names_a_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "nodir" / "x.durus"
    result = client(path, "print(root)", "--storage", "picklefile")
    assert result.exit_code == 1
    assert f"{path}: the folder {tmp_path / 'nodir'} does not exist" in result.stderr
    assert "Errno" not in result.stderr


def _deny_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    # As a file this user may read but not write (root may write any file).
    opened = PickleFileStorage.__init__

    def init(self: PickleFileStorage, path: str, readonly: bool = False) -> None:
        if not readonly:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        opened(self, path, readonly)

    monkeypatch.setattr(PickleFileStorage, "__init__", init)


def test_permission_denied_for_writing_suggests_readonly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "theirs.durus"
    setup = client(
        path, "root['x'] = 1; connection.commit()", "--storage", "picklefile"
    )
    assert setup.exit_code == 0, setup.output
    _deny_writing(monkeypatch)

    result = client(path, "print(root)")
    assert result.exit_code == 1
    assert f"{path}: permission denied" in result.stderr
    assert "--readonly" in result.stderr

    readonly = client(path, "print(root['x'])", "--readonly")
    assert readonly.exit_code == 0, readonly.output
    assert readonly.stdout == "1\n"


def test_library_messages_name_the_options_not_the_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "busy.durus"

    def busy(self: PickleFileStorage, path: str, readonly: bool = False) -> None:
        raise StorageError(
            f"{path} is open for writing in another process; close it there "
            "first, or open the file with readonly=True"
        )

    monkeypatch.setattr(PickleFileStorage, "__init__", busy)
    result = client(path, "print(root)", "--storage", "picklefile")
    assert result.exit_code == 1
    assert "open the file with --readonly" in result.stderr
    assert "readonly=True" not in result.stderr


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("repair=True needs a writable open; drop readonly=True", "--repair needs "),
        ("repair=True needs a writable open; drop readonly=True", "drop --readonly"),
        ("Open it with repair=True (or `--repair`) to cut", "Open it with --repair to"),
        ("open it without readonly=True to change it", "without --readonly to"),
    ],
)
def test_keyword_arguments_become_options(message: str, expected: str) -> None:
    assert expected in as_cli_message(message)


def test_client_security_options_reach_open_client_storage_as_arguments(
    tmp_path, monkeypatch
):
    from dhruva.cli_options import client_security, client_security_options

    key = tmp_path / "key"
    key.write_text("secret")
    seen: dict[str, str | None] = {}

    @click.command()
    @client_security_options
    @click.pass_context
    def show(ctx):
        seen.update(client_security(ctx))
        seen["environment"] = os.environ.get("DHRUVA_AUTH_FILE")

    monkeypatch.delenv("DHRUVA_AUTH_FILE", raising=False)
    result = CliRunner().invoke(show, ["--auth-file", str(key)])
    assert result.exit_code == 0, result.output
    # Passed on as ClientStorage keywords; the environment is left alone.
    assert seen == {"auth_file": str(key), "environment": None}
    missing = CliRunner().invoke(show, ["--auth-file", str(tmp_path / "nope")])
    assert missing.exit_code == 2


def test_force_keyword_is_shown_as_the_option():
    message = "NEW exists; pass force=True (`--force`) to replace it"
    assert as_cli_message(message) == "NEW exists; pass --force to replace it"
