"""Connection.pack() and ``dhruva -p --file F`` on every file storage kind."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dhruva.btree import BTree
from dhruva.checked_file import CheckedFileStorage
from dhruva.cli import make_cli
from dhruva.connection import Connection
from dhruva.file_storage import FileStorage
from dhruva.file_storage2 import FileStorage2
from dhruva.persistent_dict import PersistentDict
from dhruva.plugins import Plugins
from dhruva.sqlite_storage import SqliteStorage
from dhruva.storage import Storage

KINDS = {
    "checked": CheckedFileStorage,
    "file": FileStorage,
    "file2": FileStorage2,
    "sqlite": SqliteStorage,
}


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fill(storage: Storage) -> None:
    """Commit 10 kept objects and 20 that a later commit cuts loose."""
    connection = Connection(storage)
    root = connection.get_root()
    root["kept"] = PersistentDict((i, PersistentDict(n=i)) for i in range(10))
    root["dropped"] = PersistentDict((i, PersistentDict(n=-i)) for i in range(19))
    connection.commit()
    del root["dropped"]
    connection.commit()
    connection.close()


def check(path: Path, kind: str) -> None:
    with Connection(KINDS[kind](path, readonly=True)) as connection:
        root = connection.get_root()
        assert sorted(root) == ["kept"]
        assert [root["kept"][i]["n"] for i in range(10)] == list(range(10))


def test_connection_pack_removes_what_a_commit_cut_loose(tmp_path: Path, kind: str):
    path = tmp_path / "db"
    fill(KINDS[kind](path))
    storage = KINDS[kind](path)
    assert storage.get_size() == 32
    with Connection(storage) as connection:
        connection.get_root()["kept"][3]["n"] = 33
        connection.pack()  # drops the uncommitted change, then packs
        assert storage.get_size() == 12
        assert connection.get_root()["kept"][3]["n"] == 3
        connection.get_root()["after"] = PersistentDict(ok=True)
        connection.commit()
    with Connection(KINDS[kind](path)) as connection:
        assert connection.get_root()["after"]["ok"] is True


def test_dhruva_p_packs_a_file_of_each_kind(tmp_path: Path, kind: str):
    path = tmp_path / "db"
    fill(KINDS[kind](path))
    cli = make_cli(Plugins())
    result = CliRunner().invoke(cli, ["-p", "--file", str(path)], prog_name="dhruva")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"packed {path}: 32 objects before, 12 after\n"
    check(path, kind)
    assert sorted(p.name for p in tmp_path.iterdir() if "pack" in p.name) == []


@pytest.mark.parametrize("kind", ["file", "file2"])  # sqlite waits 10 s first
def test_dhruva_p_on_a_locked_file_says_who_holds_it(tmp_path: Path, kind: str):
    path = tmp_path / "db"
    fill(KINDS[kind](path))
    holder = KINDS[kind](path)
    try:
        cli = make_cli(Plugins())
        args = ["-p", "--file", str(path)]
        result = CliRunner().invoke(cli, args, prog_name="dhruva")
    finally:
        holder.close()
    assert result.exit_code != 0
    assert str(path) in result.output
    assert "open for writing in another process" in result.output


def test_btree_changes_between_pack_steps_are_all_kept(tmp_path: Path, kind: str):
    """Inserts and deletes split and merge BTree nodes, moving items between
    objects, while a pack is under way."""
    path = tmp_path / "db"
    storage = KINDS[kind](path)
    if hasattr(storage, "pack_step"):
        storage.pack_step = 50
    connection = Connection(storage)
    root = connection.get_root()
    root["tree"] = tree = BTree()
    for i in range(0, 6000, 2):
        tree[i] = PersistentDict(n=i)
    root["garbage"] = PersistentDict((i, PersistentDict()) for i in range(500))
    connection.commit()
    del root["garbage"]
    connection.commit()

    expected = {i: i for i in range(0, 6000, 2)}
    packer = storage.get_packer()
    assert packer is not None
    rng = random.Random(kind)
    steps = 0
    for _step in packer:
        steps += 1
        for _ in range(20):
            key = rng.randrange(6000)
            if key in expected and rng.random() < 0.5:
                del tree[key]
                del expected[key]
            else:
                tree[key] = PersistentDict(n=-key)
                expected[key] = -key
        connection.commit()
    assert steps > 3
    assert storage.get_size() < 6000 + 500

    connection.close()
    with Connection(KINDS[kind](path, readonly=True)) as reader:
        tree = reader.get_root()["tree"]
        assert {key: value["n"] for key, value in tree.items()} == expected


# --- progress: a bar on a terminal, nothing when piped ---------------------------


def fill_many(storage: Storage, kept: int = 3000, dropped: int = 2000) -> None:
    connection = Connection(storage)
    root = connection.get_root()
    root["kept"] = tree = BTree()
    tree.update((i, PersistentDict(n=i)) for i in range(kept))
    root["dropped"] = PersistentDict((i, PersistentDict()) for i in range(dropped))
    connection.commit()
    del root["dropped"]
    connection.commit()
    connection.close()


def pack_process(args: list[str], stderr: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dhruva.cli", "-p", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=120,
    )


def test_a_piped_pack_prints_no_progress(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "db"
    fill(KINDS[kind](path))
    result = pack_process(["--file", str(path)], subprocess.PIPE)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == f"packed {path}: 32 objects before, 12 after\n"


def test_a_pack_on_a_terminal_shows_a_progress_bar(
    tmp_path: Path, kind: str, on_a_terminal: Any
) -> None:
    path = tmp_path / "db"
    fill_many(KINDS[kind](path))
    result, seen = on_a_terminal(["-p", "--file", str(path)])
    assert result.returncode == 0
    assert f"packing {path}".encode() in seen
    assert re.search(rb" [1-9][0-9]?%", seen), seen  # the bar moves as it packs
    assert b"100%" in seen
    assert result.stdout.startswith(f"packed {path}:")
    with Connection(KINDS[kind](path, readonly=True)) as connection:
        kept = connection.get_root()["kept"]
        assert len(kept) == 3000 and kept[2999]["n"] == 2999
        assert "dropped" not in connection.get_root()


def test_a_server_pack_on_a_terminal_shows_a_status_and_the_result(
    tmp_path: Path, dhruva_server: Callable[..., Any], on_a_terminal: Any
) -> None:
    path = tmp_path / "db"
    fill_many(FileStorage(path))
    server = dhruva_server("--file", str(path))
    result, seen = on_a_terminal(["-p", *server.options])
    assert result.returncode == 0, seen
    where = f"the server at {server.host}:{server.port}"
    assert f"packing {where}".encode() in seen
    assert result.stdout.startswith(f"packed {where}:")

    piped = pack_process(server.options, subprocess.PIPE)
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout.startswith(f"packed {where}:")
