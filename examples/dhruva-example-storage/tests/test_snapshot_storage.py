"""The example storage: dhruva's storage contract, its plugin, its command line.

The plugin tests use the entry points really installed in the environment
(``Plugins()`` with no argument), so they check what a user gets from
``pip install dhruva-example-storage``.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from click.testing import CliRunner
from dhruva.cli import make_cli
from dhruva.error import ReadOnlyError, StorageError
from dhruva.plugins import Plugins
from dhruva.record import ROOT_OID, unpack_record
from dhruva.storage_testing import (
    BasicStorageContract,
    DurableStorageContract,
    IterableStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
    commit,
    make_record,
)
from dhruva_example_storage import plugin
from dhruva_example_storage.snapshot_storage import MAGIC, SnapshotStorage


class TestSnapshotStorageContract(
    BasicStorageContract,
    IterableStorageContract,
    DurableStorageContract,
    PackableStorageContract,
    ReadOnlyStorageContract,
):
    @pytest.fixture
    def path(self, tmp_path: Path) -> Path:
        return tmp_path / "db.snap"

    @pytest.fixture
    def storage(self, path: Path):
        s = SnapshotStorage(path)
        yield s
        s.close()

    @pytest.fixture
    def reopen(self, path: Path):
        return lambda s: (s.close(), SnapshotStorage(path))[1]

    @pytest.fixture
    def open_readonly(self, path: Path):
        return lambda s: (s.close(), SnapshotStorage(path, readonly=True))[1]


# --- the storage ----------------------------------------------------------------


def test_a_commit_killed_before_its_rename_leaves_the_last_state(tmp_path):
    path = tmp_path / "db.snap"
    with SnapshotStorage(path) as s:
        root = s.new_oid()
        commit(s, make_record(root, b"kept"))
    (tmp_path / "db.snap.tmp").write_bytes(b"half a commit")
    with SnapshotStorage(path) as s:
        assert unpack_record(s.load(root))[1] == b"kept"
    assert not (tmp_path / "db.snap.tmp").exists()


def test_a_second_writer_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "db.snap"
    with SnapshotStorage(path), pytest.raises(StorageError, match="db.snap"):
        SnapshotStorage(path)


def test_readonly_never_creates_a_file(tmp_path):
    with pytest.raises(StorageError, match="no database file"):
        SnapshotStorage(tmp_path / "missing", readonly=True)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_file_is_refused_with_its_offset(tmp_path):
    path = tmp_path / "db.snap"
    with SnapshotStorage(path) as s:
        commit(s, make_record(s.new_oid(), b"x" * 100))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StorageError, match="byte offset 34"):
        SnapshotStorage(path)


def test_a_failed_commit_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "db.snap"
    with SnapshotStorage(path) as s:
        root = s.new_oid()
        commit(s, make_record(root, b"first"))

        def disk_full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", disk_full)
        with pytest.raises(StorageError, match="db.snap failed .No space left"):
            commit(s, make_record(root, b"second"))
        monkeypatch.undo()
        assert unpack_record(s.load(root))[1] == b"first"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["db.snap", "db.snap.lock"]
        commit(s, make_record(root, b"third"))
    with SnapshotStorage(path) as s:
        assert unpack_record(s.load(root))[1] == b"third"


def test_readonly_refuses_writes(tmp_path):
    path = tmp_path / "db.snap"
    SnapshotStorage(path).close()
    with SnapshotStorage(path, readonly=True) as s, pytest.raises(ReadOnlyError):
        s.begin()


# --- the plugin -----------------------------------------------------------------


def test_the_entry_point_is_installed_and_names_the_plugin():
    (entry_point,) = entry_points(group="dhruva", name="snapshot")
    assert entry_point.load() is plugin
    assert entry_point.dist is not None
    assert entry_point.dist.name == "dhruva-example-storage"


def test_the_installed_plugins_offer_the_snapshot_kind(tmp_path):
    plugins = Plugins()
    kind = plugins.get_storage_kind("snapshot")
    assert kind.plugin == "snapshot"
    assert kind.distribution == "dhruva-example-storage"

    # Opened by name, then recognized from its first bytes.
    path = tmp_path / "db"
    with plugins.open_storage(path, "snapshot") as s:
        assert isinstance(s, SnapshotStorage)
        commit(s, make_record(s.new_oid(), b"root"))
    assert plugins.recognize(str(path)) == "snapshot"
    with plugins.open_storage(path, readonly=True) as s:
        assert unpack_record(s.load(ROOT_OID))[1] == b"root"


def test_the_plugin_knows_the_storage_magic_without_importing_it():
    assert MAGIC == plugin._MAGIC
    assert plugin.dhruva_recognize_storage(path="x", header=b"SHELF-1\n") is None


# --- the command line -------------------------------------------------------------


def dhruva(*args: str, input: str | None = None):
    """Run the ``dhruva`` command with the installed plugins."""
    result = CliRunner().invoke(
        make_cli(Plugins()), list(args), input=input, prog_name="dhruva"
    )
    return result


def test_client_selects_the_storage_by_name_and_pack_recognizes_it(tmp_path):
    path = str(tmp_path / "notes.snap")
    script = (
        "from dhruva.persistent_dict import PersistentDict\n"
        'root["kept"] = PersistentDict(a=1)\n'
        'root["dropped"] = PersistentDict(b=2)\n'
        "connection.commit()\n"
        'del root["dropped"]\n'
        "connection.commit()\n"
    )
    created = dhruva("-c", "--storage", "snapshot", "--file", path, input=script)
    assert created.exit_code == 0, created.output
    assert Path(path).read_bytes().startswith(MAGIC)
    with SnapshotStorage(path, readonly=True) as s:
        assert s.get_size() == 3

    packed = dhruva("-p", "--file", path)
    assert packed.exit_code == 0, packed.output
    assert "3 objects before, 2 after" in packed.stdout

    read = dhruva("-c", "--file", path, input='print(root["kept"]["a"])\n')
    assert read.exit_code == 0, read.output
    assert read.stdout == "1\n"


def test_plugins_lists_the_storage_and_the_command():
    result = dhruva("plugins")
    assert result.exit_code == 0, result.output
    assert "snapshot (dhruva-example-storage" in result.stdout
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["storage", "snapshot"] for line in lines)
    assert any(line.split()[:2] == ["command", "snapshot-info"] for line in lines)


def test_the_plugin_command_runs(tmp_path):
    path = tmp_path / "db.snap"
    with SnapshotStorage(path) as s:
        commit(s, make_record(s.new_oid(), b"root"))
    result = dhruva("snapshot-info", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: 1 records, next oid 1\n"


def test_an_unknown_storage_name_suggests_the_snapshot_kind(tmp_path):
    result = dhruva("-c", "--storage", "snapshop", "--file", str(tmp_path / "x"))
    assert result.exit_code != 0
    assert "did you mean 'snapshot'?" in result.output


def test_the_console_script_lists_the_plugin():
    script = shutil.which("dhruva", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip(f"no dhruva console script next to {sys.executable}")
    result = subprocess.run(
        [script, "plugins"], capture_output=True, text=True, check=True, timeout=60
    )
    assert "snapshot-info" in result.stdout
