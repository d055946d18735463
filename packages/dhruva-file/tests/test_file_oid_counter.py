"""The oid counter of the file storages: get_oid_counter() and reserve_oids(),
and ``dhruva convert`` carrying it from a packed file to a new one."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from dhruva.checked_file import MAGIC as DHRUVA1_MAGIC
from dhruva.cli import make_cli
from dhruva.error import ReadOnlyError, StorageError
from dhruva.file_storage import FileStorage
from dhruva.file_storage2 import MAGIC as DFS20_MAGIC
from dhruva.plugins import open_storage
from dhruva.shelf import PREFIX
from dhruva.storage_testing import commit, make_record

#: The first bytes of a new file of each ``--storage`` name.
DESTINATIONS = {"file": DHRUVA1_MAGIC, "shelf": PREFIX, "file2": DFS20_MAGIC}


def packed_source(fmt, path: Path) -> int:
    """Write a database whose highest oids a pack removed.

    :return: the oid counter after the pack.
    """
    with fmt.open(path) as s:
        root, kept = s.new_oid(), s.new_oid()
        dropped = [s.new_oid() for _ in range(20)]
        commit(
            s,
            make_record(root, b"root", [kept, *dropped]),
            make_record(kept, b"kept"),
            *(make_record(oid, b"dropped") for oid in dropped),
        )
        commit(s, make_record(root, b"root", [kept]))
        s.pack()
        assert s.get_size() == 2
        counter = s.get_oid_counter()
        assert counter == int.from_bytes(dropped[-1], "big") + 1
    return counter


def new_oids(path: Path, count: int = 3) -> list[int]:
    with open_storage(path) as s:
        assert isinstance(s, FileStorage)
        return [int.from_bytes(s.new_oid(), "big") for _ in range(count)]


def test_the_counter_is_the_next_oid_handed_out(fmt, tmp_path):
    with fmt.open(tmp_path / "db") as s:
        assert s.get_oid_counter() == 0
        oid = s.new_oid()
        assert s.get_oid_counter() == int.from_bytes(oid, "big") + 1 == 1


@pytest.mark.parametrize("destination", sorted(DESTINATIONS))
def test_convert_carries_the_counter_of_a_packed_file(fmt, destination, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    counter = packed_source(fmt, src)

    result = CliRunner().invoke(
        make_cli(), ["convert", str(src), str(dst), "--storage", destination]
    )

    assert result.exit_code == 0, result.output
    assert dst.read_bytes().startswith(DESTINATIONS[destination])
    with open_storage(dst, readonly=True) as s:
        assert s.get_size() == 2
        assert isinstance(s, FileStorage)
        assert s.get_oid_counter() == counter
    # The oids the pack removed in the source are never handed out, also
    # after the copy is opened again.
    assert new_oids(dst) == [counter, counter + 1, counter + 2]


def test_a_reserved_counter_survives_reopening_and_packing(fmt, tmp_path):
    path = tmp_path / "db"
    with fmt.open(path) as s:
        root = s.new_oid()
        commit(s, make_record(root, b"root"))
        s.reserve_oids(1000)
        assert s.get_oid_counter() == 1000
        s.reserve_oids(10)  # lower: changes nothing
        assert s.get_oid_counter() == 1000
        assert s.load(root) == make_record(root, b"root")
        assert s.sync() == []  # nothing was removed
    with fmt.open(path) as s:
        assert s.get_oid_counter() == 1000
        commit(s, make_record(s.new_oid(), b"later"))
        s.pack()
    assert new_oids(path) == [1001, 1002, 1003]


def test_reserving_on_an_empty_file(fmt, tmp_path):
    path = tmp_path / "db"
    with fmt.open(path) as s:
        s.reserve_oids(7)
    assert new_oids(path, 1) == [7]


def test_reserving_needs_a_writable_storage_and_no_commit_under_way(fmt, tmp_path):
    path = tmp_path / "db"
    with fmt.open(path) as s:
        s.begin()
        with pytest.raises(StorageError, match="commit under way"):
            s.reserve_oids(5)
        s.end()
        with pytest.raises(StorageError, match="2\\*\\*64"):
            s.reserve_oids((1 << 64) + 1)
    with (
        fmt.kind(path, readonly=True) as s,
        pytest.raises(ReadOnlyError, match="read-only"),
    ):
        s.reserve_oids(5)
