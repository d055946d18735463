"""Tests of what only FileStorage's SHELF-1 layout does: its bytes, what it
refuses, and its torn tails. What every file layout does alike (the storage
contract, locking, read-only opens, packs, cuts at every byte of the last
commit) is in ``test_file_formats.py``."""

from __future__ import annotations

import os

import pytest
from dhruva.error import StorageError
from dhruva.file_storage import FileStorage
from dhruva.record import unpack_record
from dhruva.shelf import PREFIX
from dhruva.storage_testing import commit, make_record


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_new_file_has_the_durus_layout(tmp_path):
    path = tmp_path / "db"
    FileStorage(path, format="durus").close()
    # Prefix, an empty first transaction, an empty map of 1-byte words.
    assert path.read_bytes() == (
        PREFIX + bytes(8) + (16).to_bytes(8, "big") + (1).to_bytes(8, "big") + bytes(8)
    )


def test_not_a_shelf_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "other.dfs"
    path.write_bytes(b"DFS20\0" + bytes(100))
    before = open_fds()
    with pytest.raises(StorageError, match=r"other\.dfs.*SHELF-1"):
        FileStorage(path)
    assert open_fds() == before
    assert path.read_bytes() == b"DFS20\0" + bytes(100)


# --- torn tails --------------------------------------------------------------


@pytest.fixture
def three_commits(tmp_path, three_commits_in):
    """A file with three commits; returns (path, oids, start and end of the last)."""
    return three_commits_in(
        lambda path: FileStorage(path, format="durus"), tmp_path / "db.durus"
    )


def test_one_empty_transaction_at_the_end_is_not_damage(three_commits):
    # Durus writes an empty transaction for a commit with no records.
    path, (_root, a, _b), _start, end = three_commits
    with open(path, "ab") as f:
        f.write(bytes(8))
    with FileStorage(path) as s:
        assert unpack_record(s.load(a))[1] == b"a3" * 50
    assert path.stat().st_size == end + 8


def test_repair_does_not_cut_complete_transactions_after_damage(tmp_path):
    path = tmp_path / "db.durus"
    with FileStorage(path, format="durus") as s:
        root, a, b = (s.new_oid() for _ in range(3))
        commit(s, make_record(root, b"root", [a]))
        middle = path.stat().st_size
        commit(s, make_record(a, b"a"))
        commit(s, make_record(b, b"b"))
    data = bytearray(path.read_bytes())
    data[middle + 8 + 8 + 8 + 7] ^= 0xFF  # the record's own copy of its oid
    path.write_bytes(bytes(data))

    with pytest.raises(StorageError, match=f"byte offset {middle}"):
        FileStorage(path, repair=True).close()
    assert path.read_bytes() == bytes(data)


def test_the_names_programs_import_from_file_storage_still_work():
    # The module was split (file_lock, file_pack, file_repair); what other
    # packages and programs import from it is still there.
    import dhruva.file_storage as file_storage
    from dhruva.file_lock import FileLockedError
    from dhruva.file_pack import PackWriter
    from dhruva.shelf import MidFileDamageError, TornTailError

    assert file_storage.FileLockedError is FileLockedError
    assert file_storage.PackWriter is PackWriter
    assert file_storage.TornTailError is TornTailError
    assert file_storage.MidFileDamageError is MidFileDamageError
    assert issubclass(FileLockedError, StorageError)
