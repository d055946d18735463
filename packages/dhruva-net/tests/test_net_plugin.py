"""The `dhruva server` command the plugin adds, on real files and processes."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from dhruva import _core_plugin, _net_plugin
from dhruva.cli import make_cli
from dhruva.client_storage import ClientStorage
from dhruva.error import ReadOnlyError
from dhruva.plugins import Plugins, get_plugin_manager, get_plugins
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage_testing import commit, make_record


def test_the_plugin_adds_a_server_command_with_the_durus_options():
    group = click.Group("dhruva")
    _net_plugin.dhruva_register_commands(group)
    options = {opt for param in group.commands["server"].params for opt in param.opts}
    assert {
        "--file",
        "--storage",
        "--host",
        "--port",
        "--address",
        "--gcbytes",
        "--readonly",
        "--repair",
        "--stop",
    } <= options


def test_cache_size_is_not_listed_but_accepted_as_durus_did(socket_path):
    help_text = CliRunner().invoke(make_cli(), ["-s", "--help"]).output
    assert "--gcbytes" in help_text and "--cache-size" not in help_text

    # `durus -s` took the client's cache size option too: scripts keep working.
    result = CliRunner().invoke(
        make_cli(), ["-s", "--cache-size", "500", "--stop", "--address", socket_path]
    )
    assert result.exit_code == 1  # no server there, but no usage error
    assert "cannot connect" in result.output


def test_serializer_is_a_client_option_and_the_server_says_so():
    result = CliRunner().invoke(make_cli(), ["-s", "--serializer", "msgspec"])
    assert result.exit_code == 2
    assert "--serializer is an option of the clients" in result.output
    assert "dhruva -c --serializer msgspec" in result.output


def test_the_installed_cli_has_it():
    assert "server" in make_cli(get_plugins()).commands


def test_stop_without_a_server_says_where_it_looked(socket_path):
    result = CliRunner().invoke(make_cli(), ["-s", "--stop", "--address", socket_path])
    assert result.exit_code == 1
    assert "cannot connect" in result.output
    assert socket_path in result.output


def test_stop_through_the_cli_ends_a_running_server(memory_server):
    host, port = memory_server.address
    result = CliRunner().invoke(
        make_cli(), ["server", "--stop", "--host", host, "--port", str(port)]
    )
    assert result.exit_code == 0, result.output
    assert f"stopped the server at {host}:{port}" in result.output
    assert memory_server.process.wait(20) == 0


def test_without_the_file_plugin_no_file_names_what_to_install():
    pm = get_plugin_manager()
    pm.register(_core_plugin, "core")
    pm.register(_net_plugin, "net")
    result = CliRunner().invoke(make_cli(Plugins(pm)), ["server", "--port", "0"])
    assert result.exit_code == 1
    assert "pip install dhruva-file" in result.output
    assert "--storage memory" in result.output


def test_an_unknown_storage_lists_the_installed_ones():
    result = CliRunner().invoke(make_cli(), ["server", "--storage", "fiel"])
    assert result.exit_code == 2
    assert "'file'" in result.output


def test_a_file_served_keeps_its_data_across_restarts(run_server, tmp_path):
    path = str(tmp_path / "served.durus")
    server = run_server("--file", path, "--port", "0")
    client = ClientStorage(address=server.address)
    (a,) = [oid for oid in (client.new_oid(), client.new_oid()) if oid != ROOT_OID]
    commit(client, make_record(ROOT_OID, b"root", [a]), make_record(a, b"kept"))
    client.close()
    assert server.stop() == 0

    again = run_server("--file", path, "--port", "0", "--readonly")
    client = ClientStorage(address=again.address)
    try:
        assert client.readonly
        assert unpack_record(client.load(a))[1] == b"kept"
        with pytest.raises(ReadOnlyError):
            commit(client, make_record(a, b"changed"))
        assert unpack_record(client.load(a))[1] == b"kept"
    finally:
        client.close()


def test_no_file_serves_a_temporary_file_storage(run_server):
    server = run_server("--port", "0")
    client = ClientStorage(address=server.address)
    try:
        (a,) = [o for o in (client.new_oid(), client.new_oid()) if o != ROOT_OID]
        commit(client, make_record(a, b"scratch"))
        assert unpack_record(client.load(a))[1] == b"scratch"
    finally:
        client.close()
