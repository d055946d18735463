"""The third-party example storage (dhruva-example-storage) behind a real
``dhruva server`` process: chosen by name, packed through the server."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from dhruva.cli import make_cli
from dhruva.connection import Connection
from dhruva.persistent_dict import PersistentDict
from dhruva.plugins import Plugins
from dhruva.record import ROOT_OID
from dhruva_example_storage.snapshot_storage import MAGIC, SnapshotStorage


def test_a_served_snapshot_file_commits_and_packs(tmp_path: Path, dhruva_server):
    client_storage = pytest.importorskip("dhruva.client_storage")
    path = tmp_path / "served.snap"
    server = dhruva_server("--storage", "snapshot", "--file", str(path))

    connection = Connection(client_storage.ClientStorage(address=server.address))
    root = connection.get_root()
    root["kept"] = PersistentDict(n=1)
    root["dropped"] = PersistentDict(n=2)
    connection.commit()
    del root["dropped"]
    connection.commit()
    connection.close()

    # `dhruva -p` without --file packs the storage of the server it names.
    cli = make_cli(Plugins())
    result = CliRunner().invoke(cli, ["-p", *server.options], prog_name="dhruva")
    assert result.exit_code == 0, result.output
    assert "3 objects before, 2 after" in result.stdout
    assert server.stop() == 0

    assert path.read_bytes().startswith(MAGIC)
    with SnapshotStorage(path, readonly=True) as storage:
        assert storage.get_size() == 2
        assert ROOT_OID in dict(storage.gen_oid_record())
